"""SparseArch: raw-id KJTs → embeddings, through the unsharded TorchRec modules.

Shapes: B batch, F fields, D embedding dim, L a sequence's max_len.

    fields_BFD     pooled field embeddings, in schema order
    sequences      one (x_BLD, lengths_B) per sequence: side features summed per position,
                   left-aligned, newest last, zero padding after ``lengths``
    sequence_features  per sequence, each side feature's own x_BLD (for towers that split them)

Under ``DistributedModelParallel`` the EBC/EC become their sharded twins; this module is unchanged.

Managed-collision tables (``embedding.modules.build_field_mc_ebc``) are looked up by a second,
managed-collision EBC; the module counts, per managed table, lookups and misses (ids without a
row of their own, which read the all-zero miss row) for the per-day metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.modules import (
    build_field_ebc,
    build_field_mc_ebc,
    build_sequence_ec,
    field_hasher,
    managed_tables,
    sequence_hasher,
    zero_unsharded_miss_rows,
)
from embedding.schema import FeatureSchema


@dataclass
class SparseOutput:
    fields_BFD: torch.Tensor
    sequences: list[tuple[torch.Tensor, torch.Tensor]]
    sequence_features: list[dict[str, torch.Tensor]] = field(default_factory=list)  # per side feature


def common_dim(schema: FeatureSchema, what: str) -> int:
    dims = {t.dim for t in schema.tables}
    if len(dims) != 1:
        raise ValueError(f"{what} needs one embedding dim for all tables; the schema has {sorted(dims)}")
    return dims.pop()


class SparseArch(nn.Module):
    def __init__(self, schema: FeatureSchema, device: torch.device | None = None, num_shards: int = 1) -> None:
        """``num_shards``: the row-wise shards managed-collision tables will be split into (the
        number of workers when sharded; each shard owns an equal range of ids and rows)."""
        super().__init__()
        device = device or torch.device("cpu")
        self.schema = schema
        self.field_hasher = field_hasher(schema)
        self.ebc = build_field_ebc(schema, device)
        uneven = [t.name for t in schema.field_tables if t.managed_collision and t.hash_size % num_shards]
        if uneven:
            raise ValueError(f"managed-collision tables {uneven}: hash_size must be divisible by the number "
                             f"of workers ({num_shards}); each worker owns an equal range of rows")
        self.mc_ebc = build_field_mc_ebc(schema, device, buckets=num_shards)
        if self.mc_ebc is not None and device.type != "meta":
            zero_unsharded_miss_rows(self.mc_ebc)  # sharded: embedding.sharding.shard() does it
        managed = set(managed_tables(schema))
        self._mc_keys = [f.name for f in schema.sparse if f.table in managed]
        self._plain_keys = [f.name for f in schema.sparse if f.table not in managed]
        names = schema.field_names
        self._split_order = [names.index(k) for k in self._plain_keys + self._mc_keys]
        self._key_table = {f.name: f.table for f in schema.sparse}
        # per managed table: [lookups, misses] since the last reset (not part of the state dict)
        self.mc_counts: dict[str, torch.Tensor] = {t: torch.zeros(2, dtype=torch.int64) for t in sorted(managed)}
        self.seq_hasher = sequence_hasher(schema) if schema.sequences else None
        self.ec = build_sequence_ec(schema, device) if schema.sequences else None
        self._orders: dict[tuple[str, ...], torch.Tensor | None] = {}

    def _field_order(self, keys: list[str]) -> torch.Tensor | None:
        key = tuple(keys)
        if key not in self._orders:
            pos = {k: i for i, k in enumerate(keys)}
            idx = [pos[n] for n in self.schema.field_names]
            self._orders[key] = None if idx == list(range(len(idx))) else torch.tensor(idx)
        return self._orders[key]

    def _pooled(self, fields: KeyedJaggedTensor) -> tuple[torch.Tensor, list[str]]:
        """[B, F·D] pooled values and their keys, plain tables first, then managed ones."""
        hashed = self.field_hasher(fields)
        if self.mc_ebc is None:
            kt = self.ebc(hashed)
            return kt.values(), kt.keys()
        plain, managed = hashed.permute(self._split_order).split([len(self._plain_keys), len(self._mc_keys)])
        values, keys = [], []
        if self.ebc is not None:
            kt = self.ebc(plain)
            values.append(kt.values())
            keys += kt.keys()
        kt, remapped = self.mc_ebc(managed)
        kt, remapped = _wait(kt), _wait(remapped)
        values.append(kt.values())
        keys += kt.keys()
        self._count_misses(remapped)
        return torch.cat(values, dim=1) if len(values) > 1 else values[0], keys

    @torch.no_grad()
    def _count_misses(self, remapped: KeyedJaggedTensor) -> None:
        mcms = self.mc_modules()
        for key, jt in remapped.to_dict().items():
            table = self._key_table[key]
            segments = mcms[table]._output_segments_tensor
            miss_rows = segments[1:][segments[1:] > 0] - 1  # each shard's last row
            v = jt.values()
            self.mc_counts[table] += torch.stack([torch.tensor(v.numel()),
                                                  torch.isin(v, miss_rows.to(v.device)).sum().cpu()])

    def mc_modules(self) -> dict[str, nn.Module]:
        """The (local, when sharded) MCH module of each managed table."""
        if self.mc_ebc is None:
            return {}
        return dict(self.mc_ebc._managed_collision_collection._managed_collision_modules)

    @torch.no_grad()
    def mc_occupancy(self) -> dict[str, torch.Tensor]:
        """Per managed table (this rank's shard): [rows holding an id, rows]."""
        out = {}
        for table, m in self.mc_modules().items():
            used = (m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum()
            out[table] = torch.stack([used.cpu(), torch.tensor(m._mch_sorted_raw_ids.numel())])
        return out

    def pooled_fields(self, fields: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled field embeddings [B, F, D] in schema order (no sequences: candidate rows)."""
        values, keys = self._pooled(fields)
        fields_BFD = values.view(values.shape[0], len(self.schema.sparse), -1)
        order = self._field_order(keys)
        if order is not None:  # sharded EBCs may emit keys in another order: back to schema order
            fields_BFD = fields_BFD.index_select(1, order.to(fields_BFD.device))
        return fields_BFD

    def forward(self, fields: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None) -> SparseOutput:
        fields_BFD = self.pooled_fields(fields)
        seqs, feats = [], []
        if self.ec is not None:
            if sequences is None:
                raise ValueError("the schema declares sequences but the batch has none")
            jts = self.ec(self.seq_hasher(sequences))
            for q in self.schema.sequences:
                per_feature = {f.name: jts[q.column(f)].to_padded_dense(desired_length=q.max_len)
                               for f in q.features}
                feats.append(per_feature)
                seqs.append((sum(per_feature.values()), jts[q.columns[0]].lengths()))
        return SparseOutput(fields_BFD=fields_BFD, sequences=seqs, sequence_features=feats)


def _wait(x):
    """Sharded modules may hand back awaitables."""
    return x.wait() if hasattr(x, "wait") else x

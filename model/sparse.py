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

Id-space tables (``FeatureSchema.id_space_tables``: the target ``item_id`` field and the history's
item ids on one table) are looked up with the sequences in one unpooled lookup (EC, or
managed-collision EC), then the field's rows are pooled here (sum or mean, as an EBC would): the
target item and the history items read the same rows, so no tower has to learn to align two
tables (DIN, SASRec and HSTU share the item embedding the same way).
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
    build_sequence_mc_ec,
    field_hasher,
    managed_tables,
    sequence_hasher,
    zero_unsharded_miss_rows,
    zero_unsharded_miss_rows_ec,
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
    def __init__(self, schema: FeatureSchema, device: torch.device | None = None, num_shards: int = 1,
                 batch_rows: int = 0) -> None:
        """``num_shards``: the row-wise shards managed-collision tables will be split into (the
        number of workers when sharded; each shard owns an equal range of ids and rows).
        ``batch_rows``: the most rows of one step, which sizes the managed-collision admission
        buffers (``embedding.modules.SizedMCHModule``); 0: TorchRec's first-batch sizing."""
        super().__init__()
        device = device or torch.device("cpu")
        self.schema = schema
        self.field_hasher = field_hasher(schema)
        self.ebc = build_field_ebc(schema, device)
        managed = set(managed_tables(schema))
        uneven = [t for t in sorted(managed) if schema.table(t).hash_size % num_shards]
        if uneven:
            raise ValueError(f"managed-collision tables {uneven}: hash_size must be divisible by the number "
                             f"of workers ({num_shards}); each worker owns an equal range of rows")
        self.mc_ebc = build_field_mc_ebc(schema, device, buckets=num_shards, batch_rows=batch_rows)
        if self.mc_ebc is not None and device.type != "meta":
            zero_unsharded_miss_rows(self.mc_ebc)  # sharded: embedding.sharding.shard() does it
        shared = set(schema.id_space_tables)
        self._shared_keys = [f.name for f in schema.sparse if f.table in shared]
        self._mc_keys = [f.name for f in schema.sparse if f.table in managed and f.table not in shared]
        self._plain_keys = [f.name for f in schema.sparse if f.table not in managed | shared]
        names = schema.field_names
        self._split_order = [names.index(k) for k in self._plain_keys + self._mc_keys + self._shared_keys]
        self._key_table = ({f.name: f.table for f in schema.sparse}
                           | {q.column(f): f.table for q in schema.sequences for f in q.features})
        self._shared_pooling = {f.name: f.pooling for f in schema.sparse if f.table in shared}
        # per managed table, since the last reset (not part of the state dict): [field lookups,
        # field misses, sequence lookups, sequence misses] — an id-space table's history ids apart
        self.mc_counts: dict[str, torch.Tensor] = {t: torch.zeros(4, dtype=torch.int64) for t in sorted(managed)}
        self._sequence_keys = set(schema.sequence_columns)
        self.seq_hasher = sequence_hasher(schema) if schema.sequences else None
        self.ec = build_sequence_ec(schema, device) if schema.sequences else None
        self.mc_ec = (build_sequence_mc_ec(schema, device, buckets=num_shards, batch_rows=batch_rows)
                      if schema.sequences else None)
        if self.mc_ec is not None and device.type != "meta":
            zero_unsharded_miss_rows_ec(self.mc_ec)
        # unpooled lookups: the id-space fields, then the sequence columns; plain tables first
        unpooled = self._shared_keys + schema.sequence_columns
        self._unpooled_keys = unpooled
        mc_unpooled = [k for k in unpooled if self._key_table[k] in managed]
        plain_unpooled = [k for k in unpooled if self._key_table[k] not in managed]
        self._unpooled_split = ([unpooled.index(k) for k in plain_unpooled + mc_unpooled],
                                [len(plain_unpooled), len(mc_unpooled)])
        self._orders: dict[tuple[str, ...], torch.Tensor | None] = {}

    def _field_order(self, keys: list[str]) -> torch.Tensor | None:
        """Indices putting pooled fields emitted in ``keys`` order back into schema order (None:
        already in order). Cached per key order — except while ``torch.export`` traces, where a
        tensor stored on the module would be an unregistered buffer (export warned about it)."""
        key = tuple(keys)
        if key in self._orders:
            return self._orders[key]
        pos = {k: i for i, k in enumerate(keys)}
        idx = [pos[n] for n in self.schema.field_names]
        order = None if idx == list(range(len(idx))) else torch.tensor(idx)
        if not torch.compiler.is_compiling():
            self._orders[key] = order
        return order

    def _lookup(self, fields: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None,
                need_sequences: bool) -> tuple[torch.Tensor, list[str], dict]:
        """[B, F·D] pooled values and their keys (plain tables, managed ones, id-space fields) and
        the unpooled lookups (sequence columns) when ``need_sequences`` or id-space fields need
        them; missing sequences read as empty histories."""
        hashed = self.field_hasher(fields)
        if torch.compiler.is_exporting() and _unsharded(self.ebc):
            return self._lookup_exporting(hashed, sequences, need_sequences)
        if self.mc_ebc is None and not self._shared_keys:
            kt = self.ebc(hashed)
            jts = self._unpooled(self.seq_hasher(sequences)) if need_sequences else {}
            return kt.values(), kt.keys(), jts
        plain, managed, shared = hashed.permute(self._split_order).split(
            [len(self._plain_keys), len(self._mc_keys), len(self._shared_keys)])
        values, keys = [], []
        if self.ebc is not None:
            kt = self.ebc(plain)
            values.append(kt.values())
            keys += kt.keys()
        if self.mc_ebc is not None:
            kt, remapped = self.mc_ebc(managed)
            kt, remapped = _wait(kt), _wait(remapped)
            values.append(kt.values())
            keys += kt.keys()
            self._count_misses(remapped)
        jts: dict = {}
        if self._shared_keys or need_sequences:
            seq = (_empty_kjt(self.schema.sequence_columns, hashed.stride(), hashed.values()) if sequences is None
                   else self.seq_hasher(sequences))  # no ids: nothing to hash (and no data-dependent sizes)
            jts = self._unpooled(KeyedJaggedTensor.concat([shared, seq]) if self._shared_keys else seq)
            for k in self._shared_keys:
                values.append(_pool(jts[k], self._shared_pooling[k], hashed.stride()))
                keys.append(k)
        return torch.cat(values, dim=1) if len(values) > 1 else values[0], keys, jts

    def _lookup_exporting(self, hashed: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None,
                          need_sequences: bool) -> tuple[torch.Tensor, list[str], dict]:
        """``_lookup`` as ``torch.export`` traces it: the same unsharded modules and weights, the
        same result, but the fields' ids are grouped by table (a stable sort of the values by
        their field's group) and each plain table pools all its fields' bags in one
        ``nn.EmbeddingBag`` call; the managed-collision fields and the id-space fields form one
        group each. The EBC's ``KeyedJaggedTensor.to_dict`` (and the KJT ``permute``/``split``)
        would trace every field's offset as a sum of the previous fields' data-dependent sizes:
        work quadratic in the number of fields (~10 minutes for the demo's 516 fields); here
        there is one data-dependent size per group. Returns the pooled values [B, F·D] in schema
        order, the schema's field names and the unpooled lookups."""
        names, stride = hashed.keys(), hashed.stride()
        values, lengths_FB = hashed.values(), hashed.lengths().view(len(names), -1)
        index = {n: i for i, n in enumerate(names)}
        groups: list[list[str]] = []  # plain tables (schema order inside), managed, id-space
        if self.ebc is not None:
            groups += [sorted(cfg.feature_names, key=index.get) for cfg in self.ebc.embedding_bag_configs()]
        groups += [g for g in (self._mc_keys, self._shared_keys) if g]
        group_of_key = [0] * len(names)
        for g, keys in enumerate(groups):
            for k in keys:
                group_of_key[index[k]] = g
        per_key = lengths_FB.sum(1)
        key_group = torch.tensor(group_of_key, device=values.device)
        value_group = torch.repeat_interleave(key_group, per_key.long(), output_size=values.numel())
        grouped = values[torch.argsort(value_group, stable=True)]  # by group, then field, then row
        ends = torch.zeros(len(groups), dtype=per_key.dtype, device=values.device).index_add(
            0, key_group, per_key).cumsum(0).tolist()  # one data-dependent size per group
        pieces, start = [], 0
        for g, keys in enumerate(groups):
            stop = ends[g]
            torch._check(stop >= start)
            torch._check(stop <= values.numel())
            lengths = lengths_FB[torch.tensor([index[k] for k in keys], device=values.device)].reshape(-1)
            pieces.append((grouped[start:stop], lengths))
            start = stop
        pooled_FBD, order = [], []
        n_plain = len(groups) - bool(self._mc_keys) - bool(self._shared_keys)
        if self.ebc is not None:
            for cfg, keys, (ids, lengths) in zip(self.ebc.embedding_bag_configs(), groups, pieces):
                offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
                bags = self.ebc.embedding_bags[cfg.name](input=ids, offsets=offsets).float()
                pooled_FBD.append(bags.view(len(keys), stride, -1))
                order += keys

        def kjt(keys: list[str], piece) -> KeyedJaggedTensor:
            return KeyedJaggedTensor(keys=keys, values=piece[0], lengths=piece[1], stride=stride)

        at = n_plain
        if self._mc_keys:
            kt, _ = self.mc_ebc(kjt(self._mc_keys, pieces[at]))
            kt = _wait(kt)
            pooled_FBD.append(kt.values().view(stride, len(kt.keys()), -1).transpose(0, 1))
            order += kt.keys()
            at += 1
        jts: dict = {}
        if self._shared_keys or need_sequences:
            seq = (_empty_kjt(self.schema.sequence_columns, stride, values) if sequences is None
                   else self.seq_hasher(sequences))
            jts = self._unpooled(KeyedJaggedTensor.concat([kjt(self._shared_keys, pieces[at]), seq])
                                 if self._shared_keys else seq)
            if self._shared_keys:
                pooled_FBD.append(torch.stack([_pool(jts[k], self._shared_pooling[k], stride)
                                               for k in self._shared_keys]))
                order += self._shared_keys
        where = {k: i for i, k in enumerate(order)}
        schema_order = list(self.schema.field_names)
        fields_FBD = torch.cat(pooled_FBD).index_select(
            0, torch.tensor([where[n] for n in schema_order], device=values.device))
        return fields_FBD.transpose(0, 1).reshape(stride, -1), schema_order, jts

    def _unpooled(self, kjt: KeyedJaggedTensor) -> dict:
        """Per key of ``kjt`` (id-space fields and sequence columns, hashed): its JaggedTensor."""
        if self.mc_ec is None:
            return self.ec(kjt)
        order, sizes = self._unpooled_split
        plain, managed = kjt.permute(order).split(sizes)
        out = dict(self.ec(plain)) if self.ec is not None else {}
        jts, remapped = self.mc_ec(managed)
        jts, remapped = _wait(jts), _wait(remapped)
        self._count_misses(remapped)
        return out | dict(jts)

    @torch.no_grad()
    def _count_misses(self, remapped: KeyedJaggedTensor) -> None:
        mcms = self.mc_modules()
        for key, jt in remapped.to_dict().items():
            table = self._key_table[key]
            segments = mcms[table]._output_segments_tensor
            miss_rows = segments[1:][segments[1:] > 0] - 1  # each shard's last row
            v = jt.values()
            at = 2 if key in self._sequence_keys else 0  # target/field lookups, history lookups
            self.mc_counts[table][at:at + 2] += torch.stack([torch.tensor(v.numel()),
                                                             torch.isin(v, miss_rows.to(v.device)).sum().cpu()])

    def mc_modules(self) -> dict[str, nn.Module]:
        """The (local, when sharded) MCH module of each managed table."""
        out = {}
        for m in (self.mc_ebc, self.mc_ec):
            if m is not None:
                out |= dict(m._managed_collision_collection._managed_collision_modules)
        return out

    @torch.no_grad()
    def mc_occupancy(self) -> dict[str, torch.Tensor]:
        """Per managed table (this rank's shard): [rows holding an id, rows]."""
        out = {}
        for table, m in self.mc_modules().items():
            used = (m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum()
            out[table] = torch.stack([used.cpu(), torch.tensor(m._mch_sorted_raw_ids.numel())])
        return out

    def _fields_BFD(self, values: torch.Tensor, keys: list[str]) -> torch.Tensor:
        fields_BFD = values.view(values.shape[0], len(self.schema.sparse), -1)
        order = self._field_order(keys)
        if order is not None:  # sharded EBCs may emit keys in another order: back to schema order
            fields_BFD = fields_BFD.index_select(1, order.to(fields_BFD.device))
        return fields_BFD

    def pooled_fields(self, fields: KeyedJaggedTensor) -> torch.Tensor:
        """Pooled field embeddings [B, F, D] in schema order (no sequences: candidate rows)."""
        values, keys, _ = self._lookup(fields, None, need_sequences=False)
        return self._fields_BFD(values, keys)

    def forward(self, fields: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None) -> SparseOutput:
        """Raises ``ValueError`` when the schema declares sequences and ``sequences`` is None."""
        has_seqs = self.ec is not None or self.mc_ec is not None
        if has_seqs and sequences is None:
            raise ValueError("the schema declares sequences but the batch has none")
        values, keys, jts = self._lookup(fields, sequences, need_sequences=has_seqs)
        fields_BFD = self._fields_BFD(values, keys)
        seqs, feats = [], []
        if has_seqs:
            for q in self.schema.sequences:
                per_feature = {f.name: jts[q.column(f)].to_padded_dense(desired_length=q.max_len)
                               for f in q.features}
                feats.append(per_feature)
                seqs.append((sum(per_feature.values()), jts[q.columns[0]].lengths()))
        return SparseOutput(fields_BFD=fields_BFD, sequences=seqs, sequence_features=feats)


def _pool(jt, pooling: str, batch: int) -> torch.Tensor:
    """Sum (or mean) of each row's embeddings: [B, D] from a JaggedTensor of [N, D] values, as
    an EBC pools (a row without ids gives zeros)."""
    values, lengths = jt.values(), jt.lengths()
    rows = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths,
                                   output_size=values.shape[0])
    out = values.new_zeros(batch, values.shape[1]).index_add(0, rows, values)
    if pooling == "mean":
        out = out / lengths.clamp(min=1).unsqueeze(1).to(out.dtype)
    return out


def _empty_kjt(keys: list[str], batch: int, like: torch.Tensor) -> KeyedJaggedTensor:
    """A KJT of ``keys`` with no ids in any of ``batch`` rows."""
    return KeyedJaggedTensor(keys=keys, values=like.new_zeros(0),
                             lengths=torch.zeros(batch * len(keys), dtype=torch.int32, device=like.device),
                             stride=batch, length_per_key=[0] * len(keys),  # static: export needs
                             offset_per_key=[0] * (len(keys) + 1))          # no data-dependent sizes


def _unsharded(ebc) -> bool:
    """Whether the plain field EBC (or its absence) is TorchRec's unsharded module."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return ebc is None or type(ebc) is EmbeddingBagCollection


def _wait(x):
    """Sharded modules may hand back awaitables."""
    return x.wait() if hasattr(x, "wait") else x

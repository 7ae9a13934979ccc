"""SparseArch: raw-id KJTs → embeddings, through the unsharded TorchRec modules.

Shapes: B batch, F fields, D embedding dim, L a sequence's max_len.

    fields_BFD     pooled field embeddings, in schema order
    sequences      one (x_BLD, lengths_B) per sequence: side features summed per position,
                   left-aligned, newest last, zero padding after ``lengths``
    sequence_features  per sequence, each side feature's own x_BLD (for towers that split them)

Under ``DistributedModelParallel`` the EBC/EC become their sharded twins; this module is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embedding.modules import build_field_ebc, build_sequence_ec, field_hasher, sequence_hasher
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
    def __init__(self, schema: FeatureSchema, device: torch.device | None = None) -> None:
        super().__init__()
        device = device or torch.device("cpu")
        self.schema = schema
        self.field_hasher = field_hasher(schema)
        self.ebc = build_field_ebc(schema, device)
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

    def forward(self, fields: KeyedJaggedTensor, sequences: KeyedJaggedTensor | None) -> SparseOutput:
        kt = self.ebc(self.field_hasher(fields))
        values = kt.values()
        fields_BFD = values.view(values.shape[0], len(self.schema.sparse), -1)
        order = self._field_order(kt.keys())
        if order is not None:  # sharded EBCs may emit keys in another order: back to schema order
            fields_BFD = fields_BFD.index_select(1, order.to(fields_BFD.device))
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

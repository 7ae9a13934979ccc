"""Baseline towers on the same embeddings and heads: DCNv2 and DIN.

Shapes: B batch, F fields, L behaviour slots, De embedding dim, N flattened input width.

* DCNv2 (Wang et al. 2021): x0 = [dense | fields | mean-pooled sequences] flattened;
  cross layers ``x_{l+1} = x0 ⊙ (W_l x_l + b_l) + x_l`` (W full rank, or ``U V^T`` with
  ``rank > 0``) stacked with a deep MLP → one logit per task.
* DIN (Zhou et al. 2018): target attention over the behaviour sequence, weights
  ``a_j = MLP([e_j, t, e_j − t, e_j ⊙ t])`` (no softmax, as in the paper), padding masked;
  the target ``t`` is the sum of the target groups' field embeddings; MLP over
  [dense | fields | Σ a_j e_j | t].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from embedding.schema import FeatureSchema
from model.dlrm import masked_mean, mlp
from model.sparse import SparseOutput


@dataclass(frozen=True, kw_only=True)
class DCNv2Config:
    cross_layers: int = 3  # DCNv2 cross layers x_{l+1} = x_0 ⊙ (W x_l + b) + x_l
    rank: int = 0  # 0: full-rank W; > 0: low-rank U V^T (many fields)
    deep_mlp: tuple[int, ...] = (256, 128)  # hidden sizes of the parallel deep network


@dataclass(frozen=True, kw_only=True)
class DINConfig:
    attention_mlp: tuple[int, ...] = (64, 32)  # DIN activation unit: hidden sizes of the target-behaviour MLP
    top_mlp: tuple[int, ...] = (256, 128)  # hidden sizes over the fields and the attended history
    target_groups: tuple[str, ...] = ("item",)  # schema token groups that describe the target (the query)


def _flat_inputs(dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
    parts = [dense_BDd, sparse.fields_BFD.flatten(1)]
    parts += [masked_mean(x, lens) for x, lens in sparse.sequences]
    return torch.cat(parts, dim=1)


class CrossLayer(nn.Module):
    def __init__(self, n: int, rank: int) -> None:
        super().__init__()
        self.w = nn.Linear(n, n) if rank == 0 else nn.Sequential(nn.Linear(n, rank, bias=False), nn.Linear(rank, n))

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.w(x) + x


class DCNv2Tower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: DCNv2Config, emb_dim: int, num_tasks: int) -> None:
        super().__init__()
        n = len(schema.dense) + (len(schema.sparse) + len(schema.sequences)) * emb_dim
        self.norm = nn.LayerNorm(n)
        self.cross = nn.ModuleList(CrossLayer(n, cfg.rank) for _ in range(cfg.cross_layers))
        self.deep = mlp([n, *cfg.deep_mlp, num_tasks], final_act=False)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        x0 = self.norm(_flat_inputs(dense_BDd, sparse))
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.deep(x)


class DINTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: DINConfig, emb_dim: int, num_tasks: int) -> None:
        super().__init__()
        if len(schema.sequences) != 1:
            raise ValueError(f"DIN attends over one behaviour sequence; the schema has {len(schema.sequences)}")
        target = [i for i, f in enumerate(schema.sparse) if f.group in cfg.target_groups]
        if not target:
            raise ValueError(f"din.target_groups {list(cfg.target_groups)}: no field of the schema is in them")
        self.register_buffer("target_idx", torch.tensor(target, dtype=torch.long), persistent=False)
        self.att = mlp([4 * emb_dim, *cfg.attention_mlp, 1], final_act=False)
        n = len(schema.dense) + (len(schema.sparse) + 2) * emb_dim
        self.norm = nn.LayerNorm(n)
        self.top = mlp([n, *cfg.top_mlp, num_tasks], final_act=False)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        fields = sparse.fields_BFD
        t_BD = fields.index_select(1, self.target_idx).sum(1)
        e_BLD, lengths_B = sparse.sequences[0]
        t_BLD = t_BD[:, None].expand_as(e_BLD)
        a_BL = self.att(torch.cat([e_BLD, t_BLD, e_BLD - t_BLD, e_BLD * t_BLD], dim=-1)).squeeze(-1)
        valid_BL = torch.arange(e_BLD.shape[1], device=e_BLD.device)[None] < lengths_B[:, None]
        pooled_BD = (a_BL * valid_BL)[..., None].mul(e_BLD).sum(1)
        x = torch.cat([dense_BDd, fields.flatten(1), pooled_BD, t_BD], dim=1)
        return self.top(self.norm(x))

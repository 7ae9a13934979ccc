"""DLRM tower (Naumov et al. 2019): bottom MLP on dense, pairwise dot interactions between all
embedding vectors, top MLP → one logit per task. Sequences enter as mean-pooled vectors.

Shapes: B batch, N interacting vectors (1 dense + F fields + S sequences), D embedding dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.sparse import SparseOutput


@dataclass(frozen=True, kw_only=True)
class DLRMConfig:
    bottom_mlp: tuple[int, ...] = (64,)  # hidden sizes; a final layer to D is added
    top_mlp: tuple[int, ...] = (256, 128)  # hidden sizes over the pairwise dot products; then one logit per label


def mlp(sizes: list[int], final_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if final_act or i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def masked_mean(x_BLD: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions (padding is zero already)."""
    return x_BLD.sum(1) / lengths_B.clamp(min=1).unsqueeze(1).to(x_BLD.dtype)


class DLRMTower(nn.Module):
    def __init__(self, *, num_dense: int, num_fields: int, num_sequences: int, dim: int,
                 num_tasks: int, cfg: DLRMConfig) -> None:
        super().__init__()
        self.num_dense = num_dense
        self.bottom = mlp([num_dense, *cfg.bottom_mlp, dim], final_act=True) if num_dense else None
        n = num_fields + num_sequences + (1 if num_dense else 0)
        self.register_buffer("triu", torch.triu_indices(n, n, offset=1), persistent=False)
        self.top = mlp([n * (n - 1) // 2 + (dim if num_dense else 0), *cfg.top_mlp, num_tasks],
                       final_act=False)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        vectors = [sparse.fields_BFD]
        vectors += [masked_mean(x, lens).unsqueeze(1) for x, lens in sparse.sequences]
        parts = []
        if self.bottom is not None:
            d_BD = self.bottom(dense_BDd)
            vectors.insert(0, d_BD.unsqueeze(1))
            parts.append(d_BD)
        x_BND = torch.cat(vectors, dim=1)
        inter_BNN = torch.bmm(x_BND, x_BND.transpose(1, 2))
        parts.append(inter_BNN[:, self.triu[0], self.triu[1]])
        return self.top(torch.cat(parts, dim=1))

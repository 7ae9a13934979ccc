"""RankMixer + LONGER baseline: the decoupled pipeline HyFormer and TokenFormer are measured against.

Shapes: B batch, T tokens, D model dim, L behaviour slots, K recent-window queries, De emb dim.

* LONGER (long-sequence compression), one encoder per behaviour sequence: behaviour tokens
  projected to D; the newest K behaviours are queries that cross-attend over the whole
  (padding-masked) sequence, then self-attend; their mean is that sequence's token.
* RankMixer tokens: the non-sequential features (fields, then dense) concatenated in schema
  order, cut into ``num_tokens - S`` equal chunks (S sequences), each chunk through its own
  linear map to D.
* RankMixer layer: ``S = LN(TokenMix(X) + X)``, ``X' = LN(PerTokenFFN(S) + S)``. Token mixing
  splits every token into T chunks and token h gathers chunk h of every token (T must divide D).
* Head: mean of the final tokens → one logit per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedding.schema import FeatureSchema
from model.sparse import SparseOutput
from model.tokenformer import right_align


@dataclass(frozen=True, kw_only=True)
class RankMixerConfig:
    d_model: int = 64  # token width D
    num_tokens: int = 8  # including one LONGER token per sequence; must divide d_model
    num_layers: int = 2  # RankMixer layers (token mixing + per-token FFN)
    ffn_mult: int = 2  # per-token FFN hidden = ffn_mult · D
    recent_window: int = 8  # LONGER queries: the newest K behaviours
    num_heads: int = 2  # LONGER attention heads

    def __post_init__(self) -> None:
        if self.num_tokens < 2 or self.d_model % self.num_tokens:
            raise ValueError(f"rankmixer: num_tokens ({self.num_tokens}) must be >= 2 and divide "
                             f"d_model ({self.d_model})")
        if self.d_model % self.num_heads:
            raise ValueError("rankmixer: num_heads must divide d_model")


def token_mix(x_BTD: torch.Tensor) -> torch.Tensor:
    """RankMixer's parameter-free mixing: token h of the output is the concatenation of chunk h
    of every input token (each token split into T chunks of D/T). Example, T = 2, D = 4::

        [[a0 a1 a2 a3],      [[a0 a1 b0 b1],
         [b0 b1 b2 b3]]  →    [a2 a3 b2 b3]]
    """
    B, T, D = x_BTD.shape
    return x_BTD.view(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)


class PerTokenFFN(nn.Module):
    """A separate two-layer GELU FFN for each token (one batched einsum, no per-token loop)."""

    def __init__(self, num_tokens: int, d: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(num_tokens, d, hidden) / math.sqrt(d))
        self.b1 = nn.Parameter(torch.zeros(num_tokens, hidden))
        self.w2 = nn.Parameter(torch.randn(num_tokens, hidden, d) / math.sqrt(hidden))
        self.b2 = nn.Parameter(torch.zeros(num_tokens, d))

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        h = F.gelu(torch.einsum("btd,tdh->bth", x_BTD, self.w1) + self.b1)
        return torch.einsum("bth,thd->btd", h, self.w2) + self.b2


class RankMixerLayer(nn.Module):
    def __init__(self, num_tokens: int, d: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_mix, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = PerTokenFFN(num_tokens, d, ffn_mult * d)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        s = self.norm_mix(token_mix(x_BTD) + x_BTD)
        return self.norm_ffn(self.ffn(s) + s)


class LongerEncoder(nn.Module):
    def __init__(self, emb_dim: int, cfg: RankMixerConfig) -> None:
        super().__init__()
        d = cfg.d_model
        self.k = cfg.recent_window
        self.proj = nn.Linear(emb_dim, d)
        self.cross = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.self_attn = nn.MultiheadAttention(d, cfg.num_heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x_BLDe: torch.Tensor, lengths_B: torch.Tensor) -> torch.Tensor:
        L = x_BLDe.shape[1]
        h_BLD = self.proj(right_align(x_BLDe, lengths_B))  # newest last
        pad_BL = torch.arange(L, device=h_BLD.device)[None] < (L - lengths_B[:, None])
        pad_BL = pad_BL & ~pad_BL.all(1, keepdim=True).expand_as(pad_BL)  # empty history: attend to pads
        k = min(self.k, L)
        q_BKD, q_pad = h_BLD[:, -k:], pad_BL[:, -k:]
        a, _ = self.cross(q_BKD, h_BLD, h_BLD, key_padding_mask=pad_BL, need_weights=False)
        q_BKD = self.norm1(q_BKD + a)
        q_pad = q_pad & ~q_pad.all(1, keepdim=True).expand_as(q_pad)
        a, _ = self.self_attn(q_BKD, q_BKD, q_BKD, key_padding_mask=q_pad, need_weights=False)
        q_BKD = self.norm2(q_BKD + a)
        keep = (~q_pad).float()[..., None]
        return (q_BKD * keep).sum(1) / keep.sum(1).clamp(min=1)


class RankMixerLongerTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: RankMixerConfig, emb_dim: int, num_tasks: int) -> None:
        super().__init__()
        S = len(schema.sequences)
        if not 1 <= S < cfg.num_tokens:
            raise ValueError(f"rankmixer_longer: needs 1 to num_tokens - 1 ({cfg.num_tokens - 1}) behaviour "
                             f"sequences; the schema has {S}")
        d, t = cfg.d_model, cfg.num_tokens - S
        n_in = len(schema.sparse) * emb_dim + len(schema.dense)
        self.chunk = math.ceil(n_in / t)
        self.pad = self.chunk * t - n_in
        self.tok_w = nn.Parameter(torch.randn(t, self.chunk, d) / math.sqrt(self.chunk))
        self.tok_b = nn.Parameter(torch.zeros(t, d))
        self.longer = nn.ModuleList(LongerEncoder(emb_dim, cfg) for _ in range(S))
        self.layers = nn.ModuleList(RankMixerLayer(cfg.num_tokens, d, cfg.ffn_mult) for _ in range(cfg.num_layers))
        self.head = nn.Linear(d, num_tasks)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        B = dense_BDd.shape[0]
        flat = F.pad(torch.cat([sparse.fields_BFD.flatten(1), dense_BDd], dim=1), (0, self.pad))
        x = torch.einsum("btc,tcd->btd", flat.view(B, -1, self.chunk), self.tok_w) + self.tok_b
        seq_tokens = [enc(*seq)[:, None] for enc, seq in zip(self.longer, sparse.sequences)]
        x = torch.cat([x] + seq_tokens, dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.head(x.mean(1))

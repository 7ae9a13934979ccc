"""OneTrans baseline (ByteDance/NTU, arXiv 2510.26104): one causal Transformer over
``[S-tokens ; NS-tokens]`` with mixed parameters and a pyramid stack.

Shapes: B batch, L behaviour slots, N non-sequential (NS) tokens, S stream length, Q query
tokens of a layer, D model dim, H heads, E head dim.

* S-tokens: each behaviour (side features summed) through one MLP to D, right-aligned (padding
  first, masked as keys). NS-tokens: "auto-split" — one MLP over all non-sequential features
  concatenated, split into N tokens. NS tokens come last, so with a causal mask they see all.
* Block, pre-RMSNorm: ``Z = MixedMHA(Norm X) + X``, ``X' = MixedFFN(Norm Z) + Z``. Mixed
  parameterisation: the S-tokens share one QKV projection and FFN; every NS token has its own.
* Pyramid: layer l lets only the last ``Q_l`` tokens issue queries (keys and values still cover
  the whole input of the layer), so the stream shrinks linearly to the N NS tokens.
* Head: mean of the final NS tokens → one logit per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from embedding.schema import FeatureSchema
from model.blocks import RMSNorm
from model.sparse import SparseOutput
from model.tokenformer import right_align


@dataclass(frozen=True, kw_only=True)
class OneTransConfig:
    d_model: int = 64  # token width D
    num_heads: int = 4  # attention heads
    num_layers: int = 4  # OneTrans blocks
    num_ns_tokens: int = 8  # non-sequential tokens the fields are grouped into
    ffn_mult: int = 2  # FFN hidden = ffn_mult · D
    pyramid: bool = True  # False: every token issues queries in every layer

    def __post_init__(self) -> None:
        if self.d_model % self.num_heads:
            raise ValueError("onetrans: num_heads must divide d_model")


def pyramid_schedule(total: int, keep: int, num_layers: int) -> list[int]:
    """Query tokens per layer: linear from ``total`` down to ``keep`` at the last layer."""
    return [round(total - (total - keep) * (i + 1) / num_layers) for i in range(num_layers)]


class MixedLinear(nn.Module):
    """One shared map for the S-tokens, a token-specific map for each of the last N tokens."""

    def __init__(self, n_ns: int, d_in: int, d_out: int, shared: bool = True) -> None:
        super().__init__()
        self.shared = nn.Linear(d_in, d_out) if shared else None
        self.w = nn.Parameter(torch.randn(n_ns, d_in, d_out) / math.sqrt(d_in))
        self.b = nn.Parameter(torch.zeros(n_ns, d_out))

    def forward(self, x_BSD: torch.Tensor, n_ns: int) -> torch.Tensor:
        s, ns = x_BSD[:, : x_BSD.shape[1] - n_ns], x_BSD[:, x_BSD.shape[1] - n_ns:]
        ns_out = torch.einsum("bnd,nde->bne", ns, self.w[-n_ns:]) + self.b[-n_ns:]
        if s.shape[1] == 0:
            return ns_out
        return torch.cat([self.shared(s), ns_out], dim=1)


class OneTransBlock(nn.Module):
    def __init__(self, cfg: OneTransConfig, s_queries: bool = True) -> None:
        """``s_queries=False``: only NS tokens issue queries here (the pyramid's top), so the
        S-token output and FFN weights would be dead and are not built."""
        super().__init__()
        d, n = cfg.d_model, cfg.num_ns_tokens
        self.heads, self.n = cfg.num_heads, n
        self.norm_attn, self.norm_ffn = RMSNorm(d), RMSNorm(d)
        self.qkv = MixedLinear(n, d, 3 * d)
        self.out = MixedLinear(n, d, d, shared=s_queries)
        self.ffn_in = MixedLinear(n, d, cfg.ffn_mult * d, shared=s_queries)
        self.ffn_out = MixedLinear(n, cfg.ffn_mult * d, d, shared=s_queries)

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor, num_queries: int) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm_attn(x_BSD), self.n).chunk(3, dim=-1)
        q = q[:, S - num_queries:]
        q, k, v = (t.reshape(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        i = torch.arange(S - num_queries, S, device=x_BSD.device)[:, None]
        j = torch.arange(S, device=x_BSD.device)[None, :]
        mask = ((j <= i)[None] & valid_BS[:, None, :]) | (j == i)[None]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
        z = x_BSD[:, S - num_queries:] + self.out(a.transpose(1, 2).reshape(B, num_queries, D), self.n)
        return z + self.ffn_out(F.gelu(self.ffn_in(self.norm_ffn(z), self.n)), self.n)


class OneTransTower(nn.Module):
    def __init__(self, schema: FeatureSchema, cfg: OneTransConfig, emb_dim: int, num_tasks: int) -> None:
        super().__init__()
        if len(schema.sequences) != 1:
            raise ValueError(f"onetrans (as built here) reads one behaviour sequence; the schema has "
                             f"{len(schema.sequences)}")
        d, n = cfg.d_model, cfg.num_ns_tokens
        self.cfg = cfg
        self.s_mlp = nn.Sequential(nn.Linear(emb_dim, d), nn.GELU(), nn.Linear(d, d))
        n_in = len(schema.sparse) * emb_dim + len(schema.dense)
        self.ns_mlp = nn.Sequential(nn.Linear(n_in, n * d), nn.GELU(), nn.Linear(n * d, n * d))
        self.max_len = schema.sequences[0].max_len
        total = self.max_len + n
        self.queries = pyramid_schedule(total, n, cfg.num_layers) if cfg.pyramid else [total] * cfg.num_layers
        self.blocks = nn.ModuleList(OneTransBlock(cfg, s_queries=q > n) for q in self.queries)
        self.final_norm = RMSNorm(d)
        self.head = nn.Linear(d, num_tasks)

    def forward(self, dense_BDd: torch.Tensor, sparse: SparseOutput) -> torch.Tensor:
        x_BLDe, lengths_B = sparse.sequences[0]
        B, L, _ = x_BLDe.shape
        n = self.cfg.num_ns_tokens
        s_tokens = self.s_mlp(right_align(x_BLDe, lengths_B))
        ns = self.ns_mlp(torch.cat([sparse.fields_BFD.flatten(1), dense_BDd], dim=1)).view(B, n, -1)
        x = torch.cat([s_tokens, ns], dim=1)
        slot = torch.arange(L, device=x.device)[None]
        valid = torch.cat([slot >= (L - lengths_B[:, None]), torch.ones(B, n, dtype=torch.bool, device=x.device)],
                          dim=1)
        for block, q in zip(self.blocks, self.queries):
            x = block(x, valid, q)
            valid = valid[:, valid.shape[1] - q:]
        return self.head(self.final_norm(x[:, -n:]).mean(1))

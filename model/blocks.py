"""The layers of the TokenFormer family: RMSNorm, SwiGLU, RoPE, the Unified Interaction Block
(UIB: pre-RMSNorm attention with the NLIR gate, then SwiGLU) and the HSTU block, both with
receptive-field trimming (``q_len``: queries and everything after them on the last rows only).

Shapes: B batch, K input rows (keys), Q query rows, D model dim, H heads, E head dim.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import attention, causal_mask

if TYPE_CHECKING:
    from model.tokenformer import TokenFormerConfig


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class SwiGLU(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(d, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(a) * b)


def rope_tables(pos_BS: torch.Tensor, E: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [B, 1, S, E/2] for per-row positions."""
    freq = theta ** (-torch.arange(0, E, 2, device=pos_BS.device, dtype=torch.float32) / E)
    ang = pos_BS[:, None, :, None].float() * freq
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x_BHSE: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, rotate-half convention."""
    x1, x2 = x_BHSE.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class UnifiedInteractionBlock(nn.Module):
    """One UIB. ``forward(x [B, K, D], pos [B, K], key_valid [B, K], q_len=Q) → [B, Q, D]``: keys
    and values from all K input rows; queries, gate, output projection and SwiGLU only on the
    last Q rows (receptive-field trimming; ``q_len=None`` means Q = K)."""

    def __init__(self, cfg: TokenFormerConfig, window: int | None, kernel: str) -> None:
        super().__init__()
        d = cfg.d_model
        self.window, self.kernel, self.heads, self.theta = window, kernel, cfg.num_heads, cfg.rope_theta
        self.norm_attn = RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.gate = None
        if cfg.nlir:
            self.gate = nn.Linear(d, d)
            nn.init.zeros_(self.gate.weight)
            nn.init.constant_(self.gate.bias, cfg.gate_bias)
        self.norm_ffn = RMSNorm(d)
        self.ffn = SwiGLU(d, cfg.ffn_hidden or 8 * math.ceil(8 * d / 3 / 8))
        self.drop = nn.Dropout(cfg.dropout)
        self.captured: dict[str, torch.Tensor] | None = None  # set to {} to keep q, k for diagnostics

    def forward(self, x_BKD: torch.Tensor, pos_BK: torch.Tensor, key_valid_BK: torch.Tensor,
                q_len: int | None = None) -> torch.Tensor:
        return self.feed_forward(self.attend(x_BKD, pos_BK, key_valid_BK, q_len))

    def feed_forward(self, i_BQD: torch.Tensor) -> torch.Tensor:
        return i_BQD + self.drop(self.ffn(self.norm_ffn(i_BQD)))

    def keys_values(self, x_BKD: torch.Tensor, pos_BK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (after RoPE) and values [B, H, K, E] of every input row: what a cache keeps."""
        B, K, D = x_BKD.shape
        kv = F.linear(self.norm_attn(x_BKD), self.qkv.weight[D:]).view(B, K, 2, self.heads, D // self.heads)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))
        cos, sin = rope_tables(pos_BK, k.shape[-1], self.theta, k.dtype)
        return rope(k, cos, sin), v

    def queries(self, x_BQD: torch.Tensor, pos_BQ: torch.Tensor) -> torch.Tensor:
        """Queries (after RoPE) [B, H, Q, E] of the given rows."""
        B, Q, D = x_BQD.shape
        q = F.linear(self.norm_attn(x_BQD), self.qkv.weight[:D]).view(B, Q, self.heads, D // self.heads)
        cos, sin = rope_tables(pos_BQ, q.shape[-1], self.theta, q.dtype)
        return rope(q.transpose(1, 2), cos, sin)

    def mix(self, x_BQD: torch.Tensor, a_BHQE: torch.Tensor) -> torch.Tensor:
        """``I = X + σ(X W_g + b) ⊙ (A W_o)`` on the query rows."""
        B, Q, D = x_BQD.shape
        a_BQD = self.proj(a_BHQE.transpose(1, 2).reshape(B, Q, D))
        if self.gate is not None:
            a_BQD = torch.sigmoid(self.gate(x_BQD)) * a_BQD
        return x_BQD + self.drop(a_BQD)

    def attend(self, x_BKD: torch.Tensor, pos_BK: torch.Tensor, key_valid_BK: torch.Tensor,
               q_len: int | None = None) -> torch.Tensor:
        """The attention sub-layer ``I = X + σ(X W_g + b) ⊙ Attn(RMSNorm(X))`` on the last
        ``q_len`` rows: everything the attention kernel and window change."""
        K = x_BKD.shape[1]
        Q = K if q_len is None else q_len
        k, v = self.keys_values(x_BKD, pos_BK)
        q = self.queries(x_BKD[:, K - Q:], pos_BK[:, K - Q:])
        if self.captured is not None:
            self.captured.update(q=q.detach(), k=k.detach(), key_valid=key_valid_BK)
        return self.mix(x_BKD[:, K - Q:], attention(self.kernel, q, k, v, key_valid_BK, self.window))


class HSTUBlock(nn.Module):
    """HSTU layer (Zhai et al. 2024) on the same stream, as a baseline: pointwise SiLU-gated
    attention without softmax, ``Y = X + f2(Norm(φ(QKᵀ)/n · V) ⊙ U)``, ``U, V, Q, K = φ(f1(Norm X))``.
    RoPE stands in for the paper's relative attention bias. ``q_len`` trims like the UIB: U and Q
    on the last Q rows, V and K on all of them."""

    def __init__(self, cfg: TokenFormerConfig, window: int | None, kernel: str) -> None:
        super().__init__()
        d = cfg.d_model
        self.window, self.heads, self.theta = window, cfg.num_heads, cfg.rope_theta
        self.norm_in = RMSNorm(d)
        self.f1 = nn.Linear(d, 4 * d)
        self.norm_av = RMSNorm(d)
        self.f2 = nn.Linear(d, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.captured = None  # softmax-attention diagnostics do not apply

    def forward(self, x_BKD: torch.Tensor, pos_BK: torch.Tensor, key_valid_BK: torch.Tensor,
                q_len: int | None = None) -> torch.Tensor:
        B, K, D = x_BKD.shape
        Q = K if q_len is None else q_len
        h = self.norm_in(x_BKD)
        w, b = self.f1.weight, self.f1.bias  # rows: U, V, Q, K
        v, k = F.silu(F.linear(h, w[D:2 * D], b[D:2 * D])), F.silu(F.linear(h, w[3 * D:], b[3 * D:]))
        u, q = F.silu(F.linear(h[:, K - Q:], w[:D], b[:D])), F.silu(F.linear(h[:, K - Q:], w[2 * D:3 * D],
                                                                               b[2 * D:3 * D]))
        q = q.view(B, Q, self.heads, D // self.heads).transpose(1, 2)
        k, v = (t.view(B, K, self.heads, D // self.heads).transpose(1, 2) for t in (k, v))
        cos, sin = rope_tables(pos_BK, q.shape[-1], self.theta, q.dtype)
        q, k = rope(q, cos[:, :, K - Q:], sin[:, :, K - Q:]), rope(k, cos, sin)
        mask = causal_mask(key_valid_BK, self.window, Q)  # B 1 Q K
        a = F.silu(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])) * mask
        a = a / mask.sum(-1, keepdim=True).clamp(min=1)  # mean over the keys a query may see
        av = (a @ v).transpose(1, 2).reshape(B, Q, D)
        return x_BKD[:, K - Q:] + self.drop(self.f2(self.norm_av(av) * u))


BLOCKS = {"uib": UnifiedInteractionBlock, "hstu": HSTUBlock}

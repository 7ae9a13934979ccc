"""Causal attention kernels: full (SDPA), sliding-window (banded, O(L·w)), and the reference.

Shapes: B batch, H heads, L tokens, E head dim, W window, N number of W-blocks.

Semantics shared by every kernel, so they are interchangeable and testable against each other:
query ``i`` attends to keys ``j`` with ``i - window < j <= i`` (``window=None``: all ``j <= i``)
whose ``key_valid[b, j]`` is true — and always to itself, so a padding query never sees an empty
row (its output is ignored downstream, but a NaN would poison gradients).

* ``reference``: builds the L×L boolean mask and calls ``scaled_dot_product_attention``. Plain,
  obviously right, O(L²) for any window. The default on unknown devices.
* ``sdpa``: full causal attention through SDPA (its fused kernels when there is no padding);
  falls back to the reference mask for windows.
* ``banded``: sliding windows as blocks of W queries against their 2W preceding keys, so work
  and memory are O(L·W) instead of O(L²). Equal to the reference in outputs and gradients
  (``tests/unit/test_attention.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNELS = ("reference", "sdpa", "banded")


def causal_mask(key_valid_BL: torch.Tensor, window: int | None) -> torch.Tensor:
    """[B, 1, L, L] boolean, True where query i may attend key j."""
    L = key_valid_BL.shape[1]
    i = torch.arange(L, device=key_valid_BL.device)
    rel = i[:, None] - i[None, :]  # i - j
    allowed_LL = rel >= 0
    if window is not None:
        allowed_LL = allowed_LL & (rel < window)
    mask = allowed_LL[None] & key_valid_BL[:, None, :]
    mask = mask | torch.eye(L, dtype=torch.bool, device=mask.device)[None]
    return mask[:, None]


def reference_attention(q_BHLE, k_BHLE, v_BHLE, key_valid_BL, window: int | None = None):
    return F.scaled_dot_product_attention(q_BHLE, k_BHLE, v_BHLE,
                                          attn_mask=causal_mask(key_valid_BL, window))


def sdpa_attention(q_BHLE, k_BHLE, v_BHLE, key_valid_BL, window: int | None = None):
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()  # no data-dependent branch
    if window is None and not tracing and bool(key_valid_BL.all()):
        return F.scaled_dot_product_attention(q_BHLE, k_BHLE, v_BHLE, is_causal=True)
    return reference_attention(q_BHLE, k_BHLE, v_BHLE, key_valid_BL, window)


def banded_attention(q_BHLE, k_BHLE, v_BHLE, key_valid_BL, window: int | None = None):
    """Sliding-window causal attention in O(L·W): query block n (W queries) reads the keys of
    blocks n-1 and n (2W keys), which contain every key its window can reach."""
    B, H, L, E = q_BHLE.shape
    if window is None or window >= L:
        return sdpa_attention(q_BHLE, k_BHLE, v_BHLE, key_valid_BL, None)
    W = window
    N = math.ceil(L / W)
    pad = N * W - L
    q = F.pad(q_BHLE, (0, 0, 0, pad)).view(B, H, N, W, E)
    k = _with_previous_block(F.pad(k_BHLE, (0, 0, 0, pad)).view(B, H, N, W, E))  # B H N 2W E
    v = _with_previous_block(F.pad(v_BHLE, (0, 0, 0, pad)).view(B, H, N, W, E))
    kv_valid = F.pad(key_valid_BL, (0, pad), value=False).view(B, N, W)
    valid = torch.cat([F.pad(kv_valid, (0, 0, 1, 0), value=False)[:, :N], kv_valid], dim=2)  # B N 2W

    r = torch.arange(W, device=q.device)
    c = torch.arange(2 * W, device=q.device)
    rel_WC = (r[:, None] + W) - c[None, :]  # (query pos) - (key pos) inside a block pair
    band_WC = (rel_WC >= 0) & (rel_WC < W)
    mask = band_WC[None, None] & valid[:, :, None, :]  # B N W 2W
    mask = mask | (rel_WC == 0)[None, None]  # always self
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(E))
    scores = scores.masked_fill(~mask[:, None], float("-inf"))
    out = scores.softmax(-1) @ v
    return out.reshape(B, H, N * W, E)[:, :, :L]


def _with_previous_block(x_BHNWE: torch.Tensor) -> torch.Tensor:
    """[..., N, W, E] → [..., N, 2W, E]: block n-1 (zeros for n = 0) then block n."""
    prev = F.pad(x_BHNWE, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([prev, x_BHNWE], dim=3)


def attention(kernel: str, q, k, v, key_valid_BL, window: int | None = None):
    if kernel == "banded":
        return banded_attention(q, k, v, key_valid_BL, window)
    if kernel == "sdpa":
        return sdpa_attention(q, k, v, key_valid_BL, window)
    if kernel == "reference":
        return reference_attention(q, k, v, key_valid_BL, window)
    raise ValueError(f"unknown attention kernel '{kernel}'; choose one of {KERNELS}")


def default_kernel(device: torch.device) -> str:
    """The reference on devices this project has not measured; banded where it has (CPU, CUDA)."""
    return "banded" if device.type in ("cpu", "cuda") else "reference"

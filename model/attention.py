"""Causal attention kernels: reference (masked SDPA), sdpa (fused causal), banded (O(L·W)), and
``auto``, which picks one of them per call from the shapes (static under ``torch.export``).

Shapes: B batch, H heads, Q query rows, K keys, E head dim, W window, N number of W-blocks.

Semantics shared by every kernel, so they are interchangeable and testable against each other.
The Q queries are the *last* Q of the K key positions (end-aligned, as receptive-field trimming
needs; ``Q == K`` is ordinary self-attention): query ``i`` sits at key position
``p = K - Q + i`` and attends to keys ``j`` with ``p - window < j <= p`` (``window=None``: all
``j <= p``) whose ``key_valid[b, j]`` is true. ``key_valid=None`` means every key is valid.

Outputs at *padding* query rows (``key_valid[b, p]`` false) are unspecified but finite: no
consumer reads them (a padding slot is masked as a key everywhere above). The reference lets a
padding query see itself; the fused path gives it the valid keys it can see, or a uniform mix of
padding when it sees none. Valid query rows — everything that reaches a logit — are equal across
kernels in outputs and gradients (``tests/unit/test_attention.py``).

* ``reference``: builds the [B, 1, Q, K] boolean mask and calls SDPA. Plain, obviously right,
  O(Q·K) for any window.
* ``sdpa``: full causal attention through SDPA's fused causal kernel. Key padding is folded into
  one extra head dimension (``q' = [q, 1]``, ``k' = [k, −c·[j is padding]]``, the scale kept at
  ``1/√E``): a padding key's score drops by ``c/√E`` (1e4) and its softmax weight is exactly 0, so
  no [B, Q, K] mask is built and the fused kernel still skips the upper triangle. ``Q < K`` runs
  the fused kernel on all K rows when ``Q ≥ K/2`` (cheaper than a mask that cannot skip blocks),
  else the reference. Windows that do not cover the keys go to the reference.
* ``banded``: sliding windows as blocks of W queries against their 2W preceding keys, so work
  and memory are O(K·W) instead of O(K²).
* ``auto`` (the model's default): full attention → ``sdpa`` from ``FUSED_MIN_KEYS`` keys on
  (below it the masked reference measured faster on CPU, the fold costing copies: equal at 529
  keys, the fold 17% faster at 700 and 25% at 1,041) or with one query; a window that covers
  the keys → full; a window with at least ``BANDED_MIN_BLOCKS`` windows of queries → ``banded``
  (10% faster than the mask at 273 keys, 6× at 1,041; 5× slower at 49); otherwise (few
  queries, or a window over most of the stream) → ``reference``. Measured by
  ``benchmarks/tokenformer.py``'s kernel table (docs/benchmarks.md, docs/architecture.md).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KERNELS = ("reference", "sdpa", "banded")
FUSED_MIN_KEYS = 512
BANDED_MIN_BLOCKS = 4


def causal_mask(key_valid_BK: torch.Tensor, window: int | None, q_len: int | None = None) -> torch.Tensor:
    """[B, 1, Q, K] boolean, True where query i (at key position K − Q + i) may attend key j;
    a query always sees itself.

    >>> causal_mask(torch.tensor([[False, True, True]]), None, q_len=2)[0, 0].tolist()
    [[False, True, False], [False, True, True]]
    """
    K = key_valid_BK.shape[1]
    Q = K if q_len is None else q_len
    p = torch.arange(K - Q, K, device=key_valid_BK.device)
    rel = p[:, None] - torch.arange(K, device=key_valid_BK.device)[None, :]  # p - j
    allowed_QK = rel >= 0
    if window is not None:
        allowed_QK = allowed_QK & (rel < window)
    return ((allowed_QK[None] & key_valid_BK[:, None, :]) | (rel == 0)[None])[:, None]


def reference_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window: int | None = None):
    B, _, K, _ = k_BHKE.shape
    if key_valid_BK is None:
        key_valid_BK = torch.ones(B, K, dtype=torch.bool, device=k_BHKE.device)
    return F.scaled_dot_product_attention(q_BHQE, k_BHKE, v_BHKE,
                                          attn_mask=causal_mask(key_valid_BK, window, q_BHQE.shape[2]))


def sdpa_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window: int | None = None):
    Q, K, E = q_BHQE.shape[2], k_BHKE.shape[2], q_BHQE.shape[3]
    if window is not None and window < K:
        return reference_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window)
    if Q == 1:  # the last position sees every key: no causal structure left
        return _fused(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, causal=False)
    if Q < K and 2 * Q < K:
        return reference_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, None)
    if Q < K:  # the fused causal kernel aligns top-left: run it on every row, keep the last Q
        q_BHQE = torch.cat([q_BHQE.new_zeros(*q_BHQE.shape[:2], K - Q, E), q_BHQE], dim=2)
    return _fused(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, causal=True)[:, :, K - Q:]


def _fused(q, k, v, key_valid_BK, causal: bool):
    """SDPA without a mask tensor; key padding folded into one extra head dimension (eager runs
    skip the fold when no key is padding; a traced program always folds: no data-dependent branch)."""
    tracing = torch.compiler.is_compiling() or torch.compiler.is_exporting()
    if key_valid_BK is None or (not tracing and bool(key_valid_BK.all())):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    B, H, K, E = k.shape
    scale = 1.0 / math.sqrt(E)
    # score drop c·scale: 1e4 in fp32/bf16 (exp(-1e4) == 0), ≥ ~1,000 in fp16 (max/8 caps c):
    # either underflows to exactly 0 against the query's own (valid) key
    c = min(1e4 / scale, torch.finfo(q.dtype).max / 8)
    drop = ((~key_valid_BK).to(q.dtype) * -c)[:, None, :, None].expand(B, H, K, 1)
    q = torch.cat([q, q.new_ones(*q.shape[:3], 1)], dim=-1)
    k = torch.cat([k, drop], dim=-1)
    v = torch.cat([v, v.new_zeros(B, H, K, 1)], dim=-1)  # fused kernels want one head dim
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)[..., :E]


def banded_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window: int | None = None):
    """Sliding-window causal attention in O(K·W): query block n (W queries) reads the keys of
    blocks n-1 and n (2W keys), which contain every key its window can reach. ``Q < K``: the
    queries are placed at the end of K rows (zero rows before them) and the last Q kept."""
    B, H, K, E = k_BHKE.shape
    Q = q_BHQE.shape[2]
    if window is None or window >= K:
        return sdpa_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, None)
    if key_valid_BK is None:
        key_valid_BK = torch.ones(B, K, dtype=torch.bool, device=k_BHKE.device)
    W = window
    N = math.ceil(K / W)
    pad = N * W - K
    q = F.pad(q_BHQE, (0, 0, K - Q, pad)).view(B, H, N, W, E)
    k = _with_previous_block(F.pad(k_BHKE, (0, 0, 0, pad)).view(B, H, N, W, E))  # B H N 2W E
    v = _with_previous_block(F.pad(v_BHKE, (0, 0, 0, pad)).view(B, H, N, W, E))
    kv_valid = F.pad(key_valid_BK, (0, pad), value=False).view(B, N, W)
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
    return out.reshape(B, H, N * W, E)[:, :, K - Q:K]


def _with_previous_block(x_BHNWE: torch.Tensor) -> torch.Tensor:
    """[..., N, W, E] → [..., N, 2W, E]: block n-1 (zeros for n = 0) then block n."""
    prev = F.pad(x_BHNWE, (0, 0, 0, 0, 1, 0))[:, :, :-1]
    return torch.cat([prev, x_BHNWE], dim=3)


def choose_kernel(q_len: int, k_len: int, window: int | None) -> str:
    """The cheapest exact kernel for these static shapes (see the module docstring)."""
    if window is None or window >= k_len:
        return "sdpa" if k_len >= FUSED_MIN_KEYS or q_len == 1 else "reference"
    return "banded" if q_len >= BANDED_MIN_BLOCKS * window else "reference"


def attention(kernel: str, q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window: int | None = None):
    """Causal (optionally sliding-window) attention of the last Q key positions.

    q [B, H, Q, E], k and v [B, H, K, E] with Q <= K, key_valid [B, K] bool or None → [B, H, Q, E].
    ``kernel``: ``auto`` or one of ``KERNELS``; raises ``ValueError`` for any other name.
    """
    if kernel == "auto":
        kernel = choose_kernel(q_BHQE.shape[2], k_BHKE.shape[2], window)
    if kernel == "banded":
        return banded_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window)
    if kernel == "sdpa":
        return sdpa_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window)
    if kernel == "reference":
        return reference_attention(q_BHQE, k_BHKE, v_BHKE, key_valid_BK, window)
    raise ValueError(f"unknown attention kernel '{kernel}'; choose auto or one of {KERNELS}")


def default_kernel(device: torch.device) -> str:
    """``auto`` (shape-based choice) on devices this project has measured (CPU, CUDA), else the
    reference."""
    return "auto" if device.type in ("cpu", "cuda") else "reference"

"""TokenFormer compute (issue 16): receptive-field trimming, and the towers' FLOP rate.

    .venv/bin/python benchmarks/tokenformer.py [--out benchmarks/results/tokenformer.json] [--quick]

(a) Training step per row of the dense tower (forward + backward of ``TokenFormer`` on fixed
    embeddings; the sparse side is the same for every variant), one thread, all variants timed
    in interleaved rounds in one run (median of the rounds):
      * ``2F2S trimmed``    the demo config's tower (``configs/demo_world.toml`` schema, d 64, 4 heads,
                            2F2S windows (32, 16), the default layout: one target token per
                            item field — 3 — and concatenated event tokens), receptive-field plan;
      * ``2F2S untrimmed``  the same weights, every row of every layer;
      * ``naive 4F``        the naive Transformer (full attention, no gate, no drop), trimmed in
                            its last layer (the only layer a full stack can trim);
    at the demo stream (32 behaviours, 51 tokens) and at 256 / 1,024 / 4,096 behaviours.
    Behaviour counts per row are uniform in [L/2, L] (padding in every batch).
(b) FLOPs of one training step (``FlopCounterMode`` in train mode; the CPU fused-attention op,
    which PyTorch's counter misses, is counted with PyTorch's own SDPA formula: full Q×K, causal
    skipping not credited) divided by the step time, as a share of this machine's fp32 GEMM rate
    (one thread, 512×512 @ 512×512). Where TokenFormer's share is below the naive Transformer's,
    the op profile of both (torch.profiler, self CPU time) is saved beside it.

(c) The kernel-choice table behind ``model.attention.choose_kernel``: one attention op per
    kernel at demo and long-stream shapes (padded full layer: padding fold vs mask; window 32:
    banded vs mask).

Targets (checks): 2F2S trimmed ≤ 0.5× naive 4F at 1,024 and 4,096 behaviours and ≤ 0.8× on the
demo stream; trimming ≥ 1.5× faster than untrimmed at 1,024 behaviours.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from embedding.schema import load_schema  # noqa: E402
from model.attention import attention  # noqa: E402
from model.cost import register_cpu_attention_flops  # noqa: E402
from model.sparse import SparseOutput  # noqa: E402
from model.tokenformer import TokenFormer, TokenFormerConfig, naive_transformer  # noqa: E402

register_cpu_attention_flops()


SCHEMA = load_schema(ROOT / "configs/demo_world.toml")
DE = 16
ROWS = {32: 512, 256: 64, 1024: 16, 4096: 4}  # rows per step: ~25-60k tokens


def inputs(L: int, rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(L // 2, L + 1, (rows,), generator=g)
    mask = (torch.arange(L)[None, :, None] < lengths[:, None, None]).float()
    feats = {f.name: torch.randn(rows, L, DE, generator=g) * mask for f in SCHEMA.sequences[0].features}
    sparse = SparseOutput(fields_BFD=torch.randn(rows, len(SCHEMA.sparse), DE, generator=g),
                          sequences=[(sum(feats.values()), lengths)], sequence_features=[feats])
    return torch.randn(rows, len(SCHEMA.dense), generator=g), sparse


def variants() -> dict[str, tuple[TokenFormer, bool]]:
    cfg = TokenFormerConfig()  # the demo's tower: d 64, 4 heads, 2F2S (32, 16)
    torch.manual_seed(0)
    tf = TokenFormer(SCHEMA, cfg, emb_dim=DE, num_tasks=1)
    torch.manual_seed(0)
    naive = TokenFormer(SCHEMA, naive_transformer(cfg), emb_dim=DE, num_tasks=1)
    return {"2F2S trimmed": (tf, True), "2F2S untrimmed": (tf, False), "naive 4F": (naive, True)}


def step(tower: TokenFormer, trim: bool, dense, sparse) -> None:
    tower.zero_grad(set_to_none=True)
    tower.forward_with_aux(dense, sparse, trim=trim)[0].sum().backward()


def gemm_rate(n: int = 512, repeats: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n ** 3 / best


def _timed(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def profile(tower, trim, dense, sparse, top: int = 12) -> list[dict]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step(tower, trim, dense, sparse)
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return [{"op": e.key, "self_ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
             "calls": e.count} for e in events]


def _op(kernel, q, k, v, valid, window) -> None:
    attention(kernel, q, k, v, valid, window).sum().backward()


def kernel_choice(repeats: int = 7) -> dict[str, float]:
    """The measurements behind ``model.attention.choose_kernel``'s thresholds: one attention op
    (forward + backward, one thread) per kernel at the shapes the demo and long streams give —
    a padded full layer (the padding-fold fused path against the masked reference) and a sliding
    layer (banded against the masked reference)."""
    out = {}
    for B, H, K, E in ((512, 4, 49, 16), (64, 4, 273, 16), (16, 4, 1041, 16)):
        g = torch.Generator().manual_seed(K)
        q, k, v = (torch.randn(B, H, K, E, generator=g, requires_grad=True) for _ in range(3))
        valid = torch.ones(B, K, dtype=torch.bool)
        valid[:, 15:15 + K // 4] = False  # padding behind the field tokens, as in the stream
        for name, kernel, window in (("full, padding fold (sdpa)", "sdpa", None),
                                     ("full, masked (reference)", "reference", None),
                                     ("window 32, banded", "banded", 32), ("window 32, masked (reference)",
                                                                           "reference", 32)):
            args = (kernel, q, k, v, valid, window)
            _op(*args)
            out[f"{name}@K{K}"] = statistics.median(_timed(_op, *args) for _ in range(repeats))
            print(f"kernel choice: {name:<32} K={K:>5} B={B:>4} {out[f'{name}@K{K}'] * 1e3:8.2f} ms")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/tokenformer.json")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="2 rounds, no L = 4096")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rounds = 2 if a.quick else a.rounds
    lengths = [32, 256, 1024] if a.quick else [32, 256, 1024, 4096]
    models = variants()
    gemm = gemm_rate()
    kernels = kernel_choice()
    print(f"fp32 GEMM rate, one thread: {gemm / 1e9:.1f} GFLOP/s")
    per_row, flops, share, profiles = {}, {}, {}, {}
    print(f"{'variant':<16} {'L':>5} {'ms/row':>9} {'MFLOP/row':>10} {'% GEMM':>7}")
    for L in lengths:
        dense, sparse = inputs(L, ROWS[L])
        times: dict[str, list[float]] = {name: [] for name in models}
        for name, (tower, trim) in models.items():
            step(tower, trim, dense, sparse)  # warm-up
            with FlopCounterMode(display=False) as fc:
                step(tower, trim, dense, sparse)
            flops[f"{name}@{L}"] = fc.get_total_flops() / ROWS[L]
        for _ in range(rounds):
            for name, (tower, trim) in models.items():
                times[name].append(_timed(step, tower, trim, dense, sparse))
        for name in models:
            key = f"{name}@{L}"
            per_row[key] = statistics.median(times[name]) / ROWS[L]
            share[key] = flops[key] / per_row[key] / gemm
            print(f"{name:<16} {L:>5} {per_row[key] * 1e3:>9.4f} {flops[key] / 1e6:>10.2f} {share[key]:>7.1%}")
        if share[f"2F2S trimmed@{L}"] < share[f"naive 4F@{L}"]:
            profiles[str(L)] = {name: profile(models[name][0], models[name][1], dense, sparse)
                                for name in ("2F2S trimmed", "naive 4F")}

    def ratio(x: str, y: str, L: int) -> float:
        return per_row[f"{x}@{L}"] / per_row[f"{y}@{L}"]

    checks = {
        "trimmed_2F2S_vs_naive_4F_demo": {"value": ratio("2F2S trimmed", "naive 4F", 32), "target": "<= 0.8"},
        "trimmed_2F2S_vs_naive_4F_L1024": {"value": ratio("2F2S trimmed", "naive 4F", 1024), "target": "<= 0.5"},
        "trimming_speedup_L1024": {"value": ratio("2F2S untrimmed", "2F2S trimmed", 1024), "target": ">= 1.5"},
    }
    if 4096 in lengths:
        checks["trimmed_2F2S_vs_naive_4F_L4096"] = {"value": ratio("2F2S trimmed", "naive 4F", 4096),
                                                    "target": "<= 0.5"}
    for c in checks.values():
        op, bound = c["target"].split()
        c["met"] = c["value"] <= float(bound) if op == "<=" else c["value"] >= float(bound)
    for L in lengths:
        checks[f"untrimmed_vs_trimmed_L{L}"] = {"value": ratio("2F2S untrimmed", "2F2S trimmed", L),
                                               "target": "(context)", "met": True}
    for k, c in checks.items():
        print(f"{k:<36} {c['value']:>7.3f}  target {c['target']}: {'met' if c['met'] else 'MISSED'}")
    result = {"benchmark": "tokenformer", "rows_per_step": {str(k): v for k, v in ROWS.items() if k in lengths},
              "rounds": rounds, "threads": 1, "gemm_flops_per_s": gemm, "seconds_per_row": per_row,
              "train_flops_per_row": flops, "gemm_share": share, "profiles": profiles, "checks": checks,
              "kernel_choice_seconds": kernels,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

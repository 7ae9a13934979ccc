"""Attention benchmark: a sliding (banded) UIB layer against a full causal one, and BFTS stacks.

    .venv/bin/python benchmarks/attention.py [--out benchmarks/results/attention.json] [--quick]

Targets (issue 3), all measured side by side in one run, forward + backward, one thread:
  * L = 4096, w = 32, d = 64: a sliding attention layer is >= 5x faster than a full causal one.
    The attention layer is the UIB's attention sub-layer ``I = X + σ(X W_g + b) ⊙ Attn(RMSNorm(X))``
    (norm, QKV, RoPE, kernel, output projection, NLIR gate): everything the window changes. The
    whole block (plus the SwiGLU sub-layer, identical for both) is reported beside it;
  * the sliding attention layer's time grows <= 5x from L = 1024 to L = 4096;
  * a 2F2S TokenFormer stack (windows 32, 16) is >= 15% cheaper than 4F at L = 1024.
Also a sequence-length table for 2F2S vs 4F at L = 256, 1024, 4096 (issue 7).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import replace
from pathlib import Path

import torch

from model.attention import attention
from model.blocks import UnifiedInteractionBlock
from model.tokenformer import TokenFormerConfig

ROOT = Path(__file__).resolve().parents[1]


DEVICE = torch.device("cpu")


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, repeats: int) -> float:
    fn()  # warm-up
    sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def stack_step(layers, x, pos, valid):
    def run():
        h = x
        for layer in layers:
            h = layer(h, pos, valid)
        h.sum().backward()
    return run


def op_step(kernel, q, k, v, valid, window):
    return lambda: attention(kernel, q, k, v, valid, window).sum().backward()


def sublayer_step(layer, x, pos, valid):
    return lambda: layer.attend(x, pos, valid).sum().backward()


def make(cfg: TokenFormerConfig, windows: list[int | None], kernel: str):
    torch.manual_seed(0)
    return [UnifiedInteractionBlock(cfg, w, kernel).to(DEVICE) for w in windows]


def inputs(batch: int, L: int, d: int):
    x = torch.randn(batch, L, d, device=DEVICE, requires_grad=True)
    pos = torch.arange(L, device=DEVICE)[None].expand(batch, L)
    return x, pos, torch.ones(batch, L, dtype=torch.bool, device=DEVICE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/attention.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu", help="cpu (one thread) or cuda")
    a = ap.parse_args()
    global DEVICE
    DEVICE = torch.device(a.device)
    torch.set_num_threads(1)
    cfg = TokenFormerConfig(d_model=64, num_heads=1, num_full_layers=2, windows=(32, 16))
    rows = {}
    print(f"{'what':<48} {'L':>5} {'ms':>9}")
    for L in (1024, 4096):
        x, pos, valid = inputs(a.batch, L, 64)
        for name, window, kernel in (("full causal layer (sdpa)", None, "sdpa"),
                                     ("sliding layer w=32 (banded)", 32, "banded")):
            (layer,) = make(cfg, [window], kernel)
            t = time_fn(sublayer_step(layer, x, pos, valid), a.repeats)
            rows[f"attention sub-layer: {name}@{L}"] = t
            print(f"{'attention sub-layer: ' + name:<48} {L:>5} {t * 1e3:>9.1f}")
            t = time_fn(stack_step([layer], x, pos, valid), a.repeats)
            rows[f"whole block: {name}@{L}"] = t
            print(f"{'whole block (+ SwiGLU): ' + name:<48} {L:>5} {t * 1e3:>9.1f}")
    ops = {}
    for L in (1024, 4096):
        q, k, v = (torch.randn(a.batch, 1, L, 64, device=DEVICE, requires_grad=True) for _ in range(3))
        ok = torch.ones(a.batch, L, dtype=torch.bool, device=DEVICE)
        for name, window, kernel in (("attention op only: sdpa causal", None, "sdpa"),
                                     ("attention op only: banded w=32", 32, "banded")):
            t = time_fn(op_step(kernel, q, k, v, ok, window), a.repeats)
            ops[f"{name}@{L}"] = t
            print(f"{name:<48} {L:>5} {t * 1e3:>9.1f}")
    seq = {}
    for L in (256, 1024, 4096):
        x, pos, valid = inputs(a.batch, L, 64)
        for sched, windows in (("4F", [None] * 4), ("2F2S", [None, None, 32, 16])):
            t = time_fn(stack_step(make(replace(cfg), windows, "banded"), x, pos, valid), a.repeats)
            seq[f"{sched}@{L}"] = t
            print(f"{'TokenFormer stack ' + sched:<48} {L:>5} {t * 1e3:>9.1f}")
    full, slide = "full causal layer (sdpa)", "sliding layer w=32 (banded)"
    speedup_4096 = rows[f"attention sub-layer: {full}@4096"] / rows[f"attention sub-layer: {slide}@4096"]
    block_speedup = rows[f"whole block: {full}@4096"] / rows[f"whole block: {slide}@4096"]
    growth = rows[f"attention sub-layer: {slide}@4096"] / rows[f"attention sub-layer: {slide}@1024"]
    block_growth = rows[f"whole block: {slide}@4096"] / rows[f"whole block: {slide}@1024"]
    saving_1024 = 1 - seq["2F2S@1024"] / seq["4F@1024"]
    op_speedup = ops["attention op only: sdpa causal@4096"] / ops["attention op only: banded w=32@4096"]
    checks = {
        "attention_op_speedup_L4096": {"value": op_speedup, "target": "(context)", "met": True},
        "sliding_vs_full_attention_layer_speedup_L4096": {"value": speedup_4096, "target": ">= 5",
                                                          "met": speedup_4096 >= 5},
        "sliding_vs_full_whole_block_speedup_L4096": {"value": block_speedup, "target": "(context)",
                                                      "met": True},
        "sliding_attention_layer_growth_1024_to_4096": {"value": growth, "target": "<= 5", "met": growth <= 5},
        "sliding_whole_block_growth_1024_to_4096": {"value": block_growth, "target": "<= 5",
                                                    "met": block_growth <= 5},
        "2F2S_saving_vs_4F_L1024": {"value": saving_1024, "target": ">= 0.15", "met": saving_1024 >= 0.15},
    }
    for k, v in checks.items():
        print(f"{k:<48} {v['value']:>9.2f}  target {v['target']}: {'met' if v['met'] else 'MISSED'}")
    result = {"benchmark": "attention", "batch": a.batch, "d_model": 64, "heads": 1, "threads": 1,
              "fwd_bwd_seconds": rows, "attention_op_fwd_bwd_seconds": ops,
              "stack_fwd_bwd_seconds": seq, "checks": checks,
              "device": torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu (1 thread)",
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
              "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Shared by the benchmark scripts (run as ``python benchmarks/NAME.py``, so importable as ``common``)."""

from __future__ import annotations

import statistics


def mean_std(xs: list[float]) -> str:
    """``"0.1234 ± 0.0056"`` over seeds (std 0 for one value)."""
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"


def register_cpu_attention_flops() -> None:
    """Count SDPA's CPU fused-attention ops in ``torch.utils.flop_counter`` (PyTorch's counter
    knows the CUDA kernels only and reports 0 FLOPs for attention on CPU), with PyTorch's own
    SDPA formula: the full Q×K product, causal skipping not credited. Idempotent."""
    import torch
    from torch.utils import flop_counter
    from torch.utils.flop_counter import register_flop_formula, sdpa_backward_flop_count, sdpa_flop_count

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    if fwd in flop_counter.flop_registry or fwd.default in flop_counter.flop_registry:
        return

    @register_flop_formula(fwd)
    def _forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    @register_flop_formula(bwd)
    def _backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)

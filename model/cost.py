"""Training cost of a tower: dense parameters and FLOPs per example, counted in training mode.

``torch.utils.flop_counter`` knows only the CUDA attention kernels: on CPU, SDPA's fused kernel
counts as 0 FLOPs, and under ``eval()`` / no-grad PyTorch's multi-head attention takes that
path, so attention towers were undercounted (issue 17). ``register_cpu_attention_flops`` adds
PyTorch's own SDPA formulas for the CPU kernel; ``tower_cost`` counts one training step.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode


def register_cpu_attention_flops() -> None:
    """Count SDPA's CPU fused-attention ops in ``torch.utils.flop_counter`` with PyTorch's own
    SDPA formula: the full Q×K product, causal skipping not credited. Idempotent."""
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


def tower_cost(model, batch) -> tuple[int, float, float]:
    """``(dense parameters, forward FLOPs per example, forward + backward FLOPs per example)`` of
    ``model``'s tower (a ``RankingModel``) on ``batch``, in training mode; the embedding lookups
    are left out (the same for every tower of one schema). Leaves gradients on the tower."""
    register_cpu_attention_flops()
    model.train()
    rows = batch.dense.shape[0]
    with torch.no_grad():
        sparse = model.sparse_arch(batch.fields, batch.sequences if model.schema.sequences else None)
    with FlopCounterMode(display=False) as forward:
        logits = model.tower(batch.dense, sparse)
    with FlopCounterMode(display=False) as backward:
        logits.sum().backward()
    fwd = forward.get_total_flops() / rows
    return sum(p.numel() for p in model.tower.parameters()), fwd, fwd + backward.get_total_flops() / rows

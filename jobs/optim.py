"""The dense training recipe (``[train.optim]``): decoupled weight decay on the right parameters,
a learning-rate schedule over the run's known number of steps, global gradient-norm clipping.

The sparse side (embedding tables) keeps its fused optimizer (``[train.sharding]``); everything
here applies to the dense parameters only. The schedule is a pure function of the global step
and the run's total steps, so a checkpoint (which holds the step) resumes it exactly, and a daily
warm start — a new run, step 0 — goes through its warmup again (a short re-warmup per day: the
Adam moments come from the checkpoint, the first steps on new data are small).

Schedule (``lr_factor``), with W warmup steps and T total steps::

    step < W:        (step + 1) / W                          linear warmup
    otherwise:       decay from 1 at step W to ``min_lr_ratio`` at the last step T − 1
                     (cosine | linear), flat after it
    decay=constant:  1 after the warmup
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    weight_decay: float = 0.0  # decoupled (AdamW, ``dense_optimizer = "adamw"``), on matrices only
    warmup_steps: int = 0  # linear warmup; the larger of this and warmup_share × total steps
    warmup_share: float = 0.0  # … as a share of the run's planned steps
    decay: str = "constant"  # after the warmup: constant | cosine | linear down to min_lr_ratio
    min_lr_ratio: float = 0.1  # the decay's floor, as a share of the base learning rate
    clip_grad_norm: float = 0.0  # max global L2 norm of the dense gradients; 0: no clipping

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"train.optim.decay: choose one of {DECAYS}, got '{self.decay}'")
        for key in ("weight_decay", "warmup_steps", "warmup_share", "min_lr_ratio", "clip_grad_norm"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.optim.{key}: must be >= 0, got {getattr(self, key)}")
        if self.warmup_share > 1 or self.min_lr_ratio > 1:
            raise ValueError("train.optim: warmup_share and min_lr_ratio are fractions in [0, 1]")

    def warmup(self, total_steps: int) -> int:
        return max(self.warmup_steps, int(self.warmup_share * total_steps))


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """The multiplier of the base learning rate at 0-based ``step`` (module docstring)."""
    warm = cfg.warmup(total_steps)
    if step < warm:
        return (step + 1) / warm
    if cfg.decay == "constant" or total_steps <= warm:
        return 1.0
    t = min(1.0, (step - warm) / max(1, total_steps - 1 - warm))  # the last step (T − 1) is at the floor
    shape = 0.5 * (1 + math.cos(math.pi * t)) if cfg.decay == "cosine" else 1 - t
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether weight decay applies: projection matrices do; norms, biases (gates' included, and
    the batched per-token biases ``b``, ``b1``, ``*_b`` of the towers' einsum projections), learned
    tokens (``sep``) do not. Embedding tables are not
    dense parameters (the fused sparse optimizer owns them)."""
    last = name.rsplit(".", 1)[-1]
    bias_like = last in ("bias", "b", "sep") or last.endswith("_b") or re.fullmatch(r"b\d+", last) is not None
    return (param.ndim >= 2 and not bias_like and "norm" not in name
            and "sparse_arch." not in name)  # unsharded tables are plain parameters: still no decay


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, factor: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = base_lr * factor


def clip(params: list[torch.Tensor], max_norm: float) -> torch.Tensor | None:
    """Clip the dense gradients to ``max_norm`` (global L2 norm); returns the norm before (a
    tensor: no device sync), or None when clipping is off. Under DDP the gradients are already
    averaged, so every worker clips the same way."""
    if max_norm <= 0:
        return None
    return torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_norm)

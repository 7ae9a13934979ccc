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
from typing import Any

import torch

DECAYS = ("constant", "cosine", "linear")


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """``[train.optim]``. The defaults below are the first wave's recipe; a job config's keys left
    out take the tower's measured defaults instead (``tower_recipe``) unless ``tower_defaults``
    is false. Raises ``ValueError`` naming a bad key."""

    weight_decay: float = 0.0  # decoupled (AdamW, ``dense_optimizer = "adamw"``), on matrices only
    warmup_steps: int = 0  # linear warmup; the larger of this and warmup_share × total steps
    warmup_share: float = 0.0  # … as a share of the run's planned steps
    decay: str = "constant"  # after the warmup: constant | cosine | linear down to min_lr_ratio
    min_lr_ratio: float = 0.1  # the decay's floor, as a share of the base learning rate
    clip_grad_norm: float = 0.0  # max global L2 norm of the dense gradients; 0: no clipping
    # true: every recipe key left out (here, dense_optimizer/dense_lr, model.tokenformer.dropout)
    # takes the tower's measured default (docs/daily.md), not the wave-1 default in this table
    tower_defaults: bool = True

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


# The recipe's defaults per tower (issue 17), chosen by `tokenrec tune` on two datasets with the
# same four points for every tower (docs/daily.md has the numbers): filled in by
# ``tower_recipe`` for every key a job config leaves out. Shared by all towers: AdamW (weight
# decay 0 won on both), cosine decay to 0.1 × the base rate, clipping at 1.0.
RECIPE_SHARED: dict[str, Any] = {
    "train.sharding.dense_optimizer": "adamw",
    "train.optim.weight_decay": 0.0,
    "train.optim.decay": "cosine",
    "train.optim.min_lr_ratio": 0.1,
    "train.optim.clip_grad_norm": 1.0,
}
_SLOW = {"train.sharding.dense_lr": 2e-3, "train.optim.warmup_share": 0.05}  # point 1 of the studies
_FAST = {"train.sharding.dense_lr": 4e-3, "train.optim.warmup_share": 0.1}  # point 2
TOWER_RECIPES: dict[str, dict[str, Any]] = {
    "tokenformer": {**_SLOW, "model.tokenformer.dropout": 0.0},  # point 1 on the collapse preset and ML-100K
    "hyformer": dict(_SLOW),  # ML-100K
    "dlrm": dict(_SLOW),  # ML-100K point 1; collapse preset flat (0.803–0.807 over the 4 points)
    "naive_transformer": {**_FAST, "model.tokenformer.dropout": 0.1},  # point 2 on both
    "hstu": {**_FAST, "model.tokenformer.dropout": 0.1},  # ML-100K
    "rankmixer_longer": dict(_FAST),  # point 2 on both
    # not measured yet: the most common choice
    "dcnv2": dict(_SLOW), "din": dict(_SLOW), "onetrans": dict(_SLOW),
}


def tower_recipe(doc: dict) -> dict:
    """Fill the dense recipe's keys a job document leaves out with its tower's measured defaults
    (``RECIPE_SHARED`` + ``TOWER_RECIPES[model.tower]``), in place; keys the document sets (in
    the file or by ``--set``) win. ``[train.optim] tower_defaults = false`` turns this off: the
    dataclass defaults are then the first wave's recipe (Adam at a constant 3e-3, no clipping, no
    dropout). Returns ``doc``; an unknown tower is left to the model config's own error."""
    train = doc.get("train", {})
    if not isinstance(train, dict) or not isinstance(train.get("optim", {}), dict):
        return doc  # a wrong type: the typed config's error names it
    if train.get("optim", {}).get("tower_defaults", True) is False:  # a non-bool: OptimConfig names it
        return doc
    from model.ranking import ModelConfig

    model = doc.get("model", {})
    tower = model.get("tower", ModelConfig().tower) if isinstance(model, dict) else None
    if tower not in TOWER_RECIPES:
        return doc
    for key, value in {**RECIPE_SHARED, **TOWER_RECIPES[tower]}.items():
        *parents, leaf = key.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                break
        else:
            node.setdefault(leaf, value)
    return doc


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


def dense_step(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, total_steps: int, *,
               dense_opt: torch.optim.Optimizer, dense_params: list[torch.Tensor], base_lr: float,
               cfg: OptimConfig) -> None:
    """One optimizer step of the training loop (``jobs/worker.py``): gradients of ``loss`` (a
    scalar), the schedule's learning rate for 0-based ``step`` of ``total_steps`` on the dense
    optimizer (``lr_factor`` × ``base_lr``), the dense gradients clipped to
    ``cfg.clip_grad_norm``, then ``opt.step()``. ``opt`` steps everything (the worker's combined
    sparse + dense optimizer, or the dense one alone); ``dense_opt`` and ``dense_params`` are the
    dense side that the recipe applies to."""
    opt.zero_grad()
    loss.backward()
    set_lr(dense_opt, base_lr, lr_factor(step, total_steps, cfg))
    clip(dense_params, cfg.clip_grad_norm)
    opt.step()


def describe(sharding, cfg: OptimConfig, model) -> str:
    """One line for a run's log: the dense recipe it trains with (after the tower defaults);
    ``sharding`` is the ``ShardingConfig``, ``model`` the ``ModelConfig`` (its dropout is shown for
    the towers that read ``[model.tokenformer].dropout``)."""
    warm = f"warmup {cfg.warmup_share:.0%}" + (f" or {cfg.warmup_steps} steps" if cfg.warmup_steps else "")
    decay = "constant" if cfg.decay == "constant" else f"{cfg.decay} to {cfg.min_lr_ratio:g}×"
    clip_ = f"clip {cfg.clip_grad_norm:g}" if cfg.clip_grad_norm > 0 else "no clipping"
    from model.ranking import TOKENFORMER_TOWERS

    dropout = f", dropout {model.tokenformer.dropout:g}" if model.tower in TOKENFORMER_TOWERS else ""
    return (f"{sharding.dense_optimizer} lr {sharding.dense_lr:g}, weight decay {cfg.weight_decay:g}, {warm}, "
            f"{decay}, {clip_}{dropout}"
            + (" (tower defaults for keys not set)" if cfg.tower_defaults else " (tower defaults off)"))

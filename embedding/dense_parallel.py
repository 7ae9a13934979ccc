"""Dense-tower parallelism beside TorchRec's sharded tables: DDP replicas or FSDP2 shards.

TorchRec shards the embedding tables (``embedding.sharding``); what is left — the tower, the heads,
any other dense parameter — is data-parallel. ``DistributedModelParallel`` takes a
``DataParallelWrapper`` for that part: TorchRec's default wraps it in DDP (every worker holds all
dense parameters, their gradients and both Adam moments); ``FSDP2Wrapper`` here shards them with
FSDP2 (``torch.distributed.fsdp.fully_shard``) over the same process group, as TorchRec's FAQ
recommends and torchtitan's ``parallelize`` does. Passes, in order, on the module DMP wraps:

1. activation checkpointing per block (optional; ``torch.distributed._composable.checkpoint``,
   which keeps parameter names, so checkpoints do not depend on it);
2. ``fully_shard`` on each block of the tower (the elements of its ``layers`` or ``blocks``
   list: TokenFormer, naive Transformer, HSTU, RankMixer, OneTrans), so one block's parameters
   are all-gathered at a time;
3. ``fully_shard`` on the root with TorchRec's sharded table parameters ignored: every other dense
   parameter (projections, heads, towers without a block list) is sharded as one group.

Each dense parameter becomes a ``DTensor`` sharded on dim 0 across the N workers, with its
gradient (reduce-scattered, averaged over workers like DDP's all-reduce) and the optimizer's
moments: about (N − 1)/N of the replicated dense state is gone from each worker. DCP saves the
``DTensor`` shards with their global shapes, so a checkpoint moves between world sizes, between
``ddp`` and ``fsdp``, and into the unsharded export (``jobs.checkpoint``).

Mixed precision (``bf16``, the blocks only): a block's parameters are all-gathered and used in
bfloat16, its input cast to bfloat16 and its output back to float32, its gradients reduced in
float32 (``MixedPrecisionPolicy``); the root group (projections of TorchRec's fp32 embeddings,
norms, heads) stays fp32. Meant for GPUs, where it halves the all-gathers and the blocks'
activations; ``jobs.config`` refuses it on CPU.

In ``eval()`` the blocks' parameters are all-gathered once and kept until the next training
forward (``_GatherInEval``): request-level candidate scoring reads a block's weights without
calling the block, and evaluation then holds the full dense parameters, as DDP does.

Limits: data-parallel *tables* (TorchRec's ``data_parallel`` sharding type) are replicated dense
parameters that DDP averages; under ``fsdp`` the planner does not use that type, and a table
that allows only it is an error (``embedding.sharding``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed._composable import checkpoint as checkpoint_activations
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torchrec.distributed.model_parallel import (
    DataParallelWrapper,
    DefaultDataParallelWrapper,
    DistributedModelParallel,
)
from torchrec.distributed.types import ShardingEnv

DENSE_PARALLEL = ("ddp", "fsdp")
MIXED_PRECISION = ("fp32", "bf16")
BLOCK_LISTS = ("layers", "blocks")  # a tower's repeated blocks, called one after the other


@dataclass(frozen=True, kw_only=True)
class DenseParallelConfig:
    """How the dense parameters are data-parallel (``[train]`` keys of the same names).

    Raises ``ValueError`` for an unknown mode or precision."""

    dense_parallel: str = "ddp"  # ddp: replicated (DDP) | fsdp: sharded (FSDP2)
    mixed_precision: str = "fp32"  # fsdp only: bf16 = bf16 parameters, fp32 gradient reduction
    activation_checkpointing: bool = False  # recompute each block's activations in the backward

    def __post_init__(self) -> None:
        if self.dense_parallel not in DENSE_PARALLEL:
            raise ValueError(f"[train].dense_parallel: choose one of {DENSE_PARALLEL}, got '{self.dense_parallel}'")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"[train].mixed_precision: choose one of {MIXED_PRECISION}, got '{self.mixed_precision}'")
        if self.mixed_precision != "fp32" and self.dense_parallel != "fsdp":
            raise ValueError("[train].mixed_precision = 'bf16' needs [train].dense_parallel = 'fsdp' "
                             "(FSDP2's MixedPrecisionPolicy); DDP trains in fp32")


def _tower(module: nn.Module) -> nn.Module | None:
    """The model's dense tower (``RankingModel.tower``) inside any wrapper, or None."""
    return next((m for name, m in module.named_modules() if name.rsplit(".", 1)[-1] == "tower"), None)


def tower_blocks(module: nn.Module) -> list[nn.Module]:
    """The repeated blocks of the model's tower: the elements of its ``layers`` or ``blocks``
    ``ModuleList`` (each called as a module), or [] when it has none (DLRM, HyFormer's nested
    lists): those towers are sharded as part of the root group."""
    tower = _tower(module)
    for attr in BLOCK_LISTS:
        blocks = getattr(tower, attr, None)
        if isinstance(blocks, nn.ModuleList) and all(
                not isinstance(b, nn.ModuleList) and any(True for _ in b.parameters()) for b in blocks):
            return list(blocks)
    return []


class FSDP2Wrapper(DataParallelWrapper):
    """TorchRec's data-parallel hook, applying the passes of the module docstring with FSDP2
    instead of DDP. ``DistributedModelParallel(..., data_parallel_wrapper=FSDP2Wrapper(cfg))``."""

    def __init__(self, cfg: DenseParallelConfig) -> None:
        self.cfg = cfg

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        pg = env.process_group
        if pg is None:
            raise RuntimeError("FSDP2 needs a process-group sharding environment")
        root = dmp._dmp_wrapped_module.to(device)
        sharded_names = set(DistributedModelParallel._sharded_parameter_names(root))
        ignored = {p for name, p in root.named_parameters() if name in sharded_names}
        mesh = DeviceMesh.from_group(pg, device_type=device.type)
        # bf16: the blocks take their input in bf16 and give fp32 back; the root group (projections
        # of TorchRec's fp32 embeddings, norms, heads) stays fp32
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.float32)
              if self.cfg.mixed_precision == "bf16" else MixedPrecisionPolicy())
        blocks = tower_blocks(root)
        if self.cfg.activation_checkpointing:
            for block in blocks:
                checkpoint_activations(block)
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp)
        fully_shard(root, mesh=mesh, ignored_params=ignored)
        if blocks:
            root.register_forward_pre_hook(_GatherInEval(blocks))


class _GatherInEval:
    """A forward pre-hook on the root: in ``eval()`` the blocks' parameters are all-gathered once
    and kept (request-level candidate scoring reads a block's weights without calling it, which
    FSDP2's per-block hooks would miss); the first training forward reshards them again.
    Collective like every forward: all workers switch modes together (``jobs.worker``)."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks, self.gathered = blocks, False

    def __call__(self, module: nn.Module, args) -> None:
        if not module.training:  # every eval forward: FSDP2 may have resharded (state_dict, load)
            for block in self.blocks:
                block.set_reshard_after_forward(False, recurse=False)
                block.unshard()  # a no-op when already gathered
            self.gathered = True
        elif self.gathered:
            for block in self.blocks:
                block.set_reshard_after_forward(True, recurse=False)
                block.reshard()
            self.gathered = False


def check_tower(model: nn.Module, cfg: DenseParallelConfig) -> None:
    """Raises ``ValueError`` when ``cfg`` asks for a per-block option (bf16 blocks, activation
    checkpointing) that ``model``'s tower cannot take: it has no ``layers``/``blocks`` list (DLRM,
    DCNv2, DIN, HyFormer), so the option would silently do nothing. Called on the driver."""
    wants = [k for k, on in (("mixed_precision = 'bf16'", cfg.mixed_precision == "bf16"),
                             ("activation_checkpointing = true", cfg.activation_checkpointing)) if on]
    if wants and not tower_blocks(model):
        tower = type(_tower(model)).__name__
        raise ValueError(f"[train].{' and '.join(wants)} applies to a tower's blocks, and {tower} has no block "
                         f"list (layers/blocks): remove it, or use a tower with blocks (tokenformer, "
                         f"naive_transformer, hstu, rankmixer_longer, onetrans)")


def data_parallel_wrapper(cfg: DenseParallelConfig) -> DataParallelWrapper:
    """The wrapper ``embedding.sharding.shard`` hands to DMP for ``cfg.dense_parallel``."""
    if cfg.dense_parallel == "fsdp":
        return FSDP2Wrapper(cfg)
    if cfg.activation_checkpointing:
        return _CheckpointedDDPWrapper()
    return DefaultDataParallelWrapper()


class _CheckpointedDDPWrapper(DefaultDataParallelWrapper):
    """DDP with per-block activation checkpointing (the same pass 1 as under FSDP2)."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        for block in tower_blocks(dmp._dmp_wrapped_module):
            checkpoint_activations(block)
        super().wrap(dmp, env, device)


def fsdp_modules(model: nn.Module) -> list[FSDPModule]:
    """The FSDP2 groups of ``model``, the root first (pre-order); [] under DDP."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]

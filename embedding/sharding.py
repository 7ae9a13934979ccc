"""Sharding: planner + ``DistributedModelParallel`` + the fused sparse optimizer.

With ``embedding/dense_parallel.py`` (the dense tower's DDP/FSDP2 wrapper it hands to DMP), the
only place outside ``jobs/`` that touches ``torch.distributed``. Passes, in order:

1. ``apply_sparse_optimizer`` — tables get a fused optimizer (row-wise Adagrad by default),
   applied inside the backward by the FBGEMM kernels (no dense gradient for tables);
2. ``shard`` — the planner proposes a plan (optionally restricted to some sharding types) and
   ``DistributedModelParallel`` replaces the EBC/EC with sharded twins, materializing only the
   local shards of tables built on ``meta``; the dense parameters are made data-parallel by the
   wrapper ``embedding.dense_parallel`` gives for ``[train].dense_parallel``: DDP replicas
   (default) or FSDP2 shards;
3. ``dense_optimizer`` — Adam (or SGD) over every parameter that has no fused optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embedding import (
    ManagedCollisionEmbeddingCollectionSharder,
    ShardedManagedCollisionEmbeddingCollection,
)
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.modules.mc_embedding_modules import (
    ManagedCollisionEmbeddingBagCollection,
    ManagedCollisionEmbeddingCollection,
)
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from embedding.dense_parallel import DenseParallelConfig, data_parallel_wrapper
from embedding.modules import zero_unsharded_miss_rows, zero_unsharded_miss_rows_ec

SHARDING_TYPES = tuple(t.value for t in ShardingType)
SPARSE_OPTIMIZERS = ("rowwise_adagrad", "sgd")
DENSE_OPTIMIZERS = ("adam", "adamw", "sgd")


@dataclass(frozen=True, kw_only=True)
class ShardingConfig:
    sharding_types: tuple[str, ...] = ()  # allowed for every table; empty: the planner chooses
    table_sharding_types: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per table name: its allowed types
    sparse_optimizer: str = "rowwise_adagrad"  # the tables' fused optimizer: rowwise_adagrad | sgd
    sparse_lr: float = 0.1  # the tables' learning rate
    # the dense parameters': adam | adamw ([train.optim] weight decay) | sgd; left out of a job
    # config: the tower's measured default (jobs.optim.tower_recipe, docs/daily.md), not this one
    dense_optimizer: str = "adam"
    dense_lr: float = 3e-3  # the dense base learning rate ([train.optim] schedules it); left out: the tower's

    def __post_init__(self) -> None:
        bad = [t for ts in (self.sharding_types, *self.table_sharding_types.values()) for t in ts
               if t not in SHARDING_TYPES]
        if bad:
            raise ValueError(f"sharding.sharding_types: unknown {bad}; choose from {SHARDING_TYPES}")
        if self.sparse_optimizer not in SPARSE_OPTIMIZERS:
            raise ValueError(f"sharding.sparse_optimizer: choose one of {SPARSE_OPTIMIZERS}")
        if self.dense_optimizer not in DENSE_OPTIMIZERS:
            raise ValueError(f"sharding.dense_optimizer: choose one of {DENSE_OPTIMIZERS}")


def embedding_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (EmbeddingBagCollection, EmbeddingCollection))]


def apply_sparse_optimizer(model: nn.Module, cfg: ShardingConfig) -> None:
    params = [p for m in embedding_modules(model) for p in m.parameters()]
    if cfg.sparse_optimizer == "rowwise_adagrad":
        apply_optimizer_in_backward(RowWiseAdagrad, params, {"lr": cfg.sparse_lr})
    else:
        apply_optimizer_in_backward(torch.optim.SGD, params, {"lr": cfg.sparse_lr})


class CPURowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """TorchRec lists row-wise for pooled tables only on CUDA; the FBGEMM CPU kernels it needs
    (block bucketize, reduce-scatter of pooled rows) exist, and ``tests/distributed`` checks the
    result against the unsharded model, so it is allowed on CPU too."""

    def sharding_types(self, compute_device_type: str) -> list[str]:
        types = super().sharding_types(compute_device_type)
        if compute_device_type == "cpu":
            types = types + [ShardingType.ROW_WISE.value]
        return types


class _CPUEvictMixin:
    """On an admission/eviction the stock module resets the rows' weights and optimizer state
    with ``fbgemm::reset_weight_momentum``, which has no CPU kernel; the same reset in torch."""

    def _evict(self, evictions_per_table) -> None:
        if self._embedding_module._device.type != "cpu":
            return super()._evict(evictions_per_table)
        for table, local_rows in evictions_per_table.items():
            if local_rows is None or local_rows.numel() == 0:
                continue
            tbe, index = self._table_to_tbe_and_index[table]
            t, rows = int(index), local_rows.long()
            cfg = self._embedding_module._table_name_to_config[table]
            with torch.no_grad():
                for state in tbe.split_optimizer_states()[t]:  # row-wise Adagrad momentum
                    state[rows] = 0
                weights = tbe.split_embedding_weights()[t]  # a view of the TBE's storage
                fresh = torch.empty_like(weights[rows])
                fresh = cfg.init_fn(fresh) if cfg.init_fn is not None else fresh.uniform_(
                    cfg.get_weight_init_min(), cfg.get_weight_init_max())
                weights[rows] = fresh


class _CPUShardedMCEBC(_CPUEvictMixin, ShardedManagedCollisionEmbeddingBagCollection):
    """Managed-collision EBC with the CPU eviction reset."""


class _CPUShardedMCEC(_CPUEvictMixin, ShardedManagedCollisionEmbeddingCollection):
    """Managed-collision EC (sequence and id-space tables) with the CPU eviction reset."""


class _CPUManagedCollisionSharding:
    """Managed-collision tables are sharded row-wise (id ranges follow row ranges), with the
    fused kernel; TorchRec lists neither for CPU. ``_sharded`` is the CPU module class and
    ``_sharder_arg`` its keyword for the embedding sharder. Checked by ``tests/distributed``."""

    _sharded: type
    _sharder_arg: str

    def sharding_types(self, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return [ShardingType.ROW_WISE.value]
        return super().sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> list[str]:
        if compute_device_type == "cpu":
            return ["fused"]
        return super().compute_kernels(sharding_type, compute_device_type)

    def shard(self, module, params, env, device=None, module_fqn=None):
        if device is not None and device.type != "cpu":
            return super().shard(module, params, env, device, module_fqn)
        return self._sharded(module, params, mc_sharder=self._mc_sharder, env=env,
                             device=device or torch.device("cpu"), **{self._sharder_arg: self._e_sharder})


class CPUManagedCollisionEBCSharder(_CPUManagedCollisionSharding, ManagedCollisionEmbeddingBagCollectionSharder):
    """Managed-collision field tables (a managed-collision EBC), row-wise and fused on CPU."""

    _sharded, _sharder_arg = _CPUShardedMCEBC, "ebc_sharder"


class CPUManagedCollisionECSharder(_CPUManagedCollisionSharding, ManagedCollisionEmbeddingCollectionSharder):
    """Managed-collision unpooled tables (an id-space ``item`` table read by the target field and
    the history: a managed-collision EC), row-wise and fused on CPU."""

    _sharded, _sharder_arg = _CPUShardedMCEC, "ec_sharder"


@torch.no_grad()
def zero_miss_rows(model: nn.Module) -> int:
    """Managed-collision tables: set every shard's miss row (its last row, read by ids that have no
    row of their own) and its optimizer state to zero, so an unknown id contributes nothing, the
    same on any number of shards (a checkpoint resharded to another world size, the unsharded
    export) — call after each optimizer step. Returns the number of rows zeroed here."""
    n = 0
    for m in model.modules():
        if isinstance(m, (ShardedManagedCollisionEmbeddingBagCollection,
                          ShardedManagedCollisionEmbeddingCollection)):
            for tbe, index in m._table_to_tbe_and_index.values():
                weights = tbe.split_embedding_weights()[int(index)]
                if weights.numel():
                    weights[-1] = 0
                    for state in tbe.split_optimizer_states()[int(index)]:
                        state[-1] = 0
                    n += 1
        elif isinstance(m, ManagedCollisionEmbeddingBagCollection):
            n += zero_unsharded_miss_rows(m)
        elif isinstance(m, ManagedCollisionEmbeddingCollection):
            n += zero_unsharded_miss_rows_ec(m)
    return n


def sharders() -> list:
    return [CPURowWiseEBCSharder(), EmbeddingCollectionSharder(), CPUManagedCollisionEBCSharder(),
            CPUManagedCollisionECSharder()]


def _constraints(model: nn.Module, cfg: ShardingConfig, device: torch.device, fsdp: bool = False):
    """Per-table planner constraints. ``fsdp``: no table may be data-parallel (a replicated
    table is a dense parameter DDP would average; FSDP2 does not take it over)."""
    constraints = {}
    managed = {name for m in model.modules()
               if isinstance(m, (ManagedCollisionEmbeddingBagCollection, ManagedCollisionEmbeddingCollection))
               for name in _table_names(m._embedding_module)}
    for module, sharder in _modules_and_sharders(model):
        supported = sharder.sharding_types(device.type)
        if fsdp:
            supported = [t for t in supported if t != ShardingType.DATA_PARALLEL.value]
        for table in _table_names(module):
            if table in managed:  # MCH: id ranges follow row ranges
                constraints[table] = ParameterConstraints(sharding_types=[ShardingType.ROW_WISE.value])
                continue
            wanted = cfg.table_sharding_types.get(table, cfg.sharding_types)
            if not wanted:
                if fsdp:
                    constraints[table] = ParameterConstraints(sharding_types=supported)
                continue
            allowed = [t for t in wanted if t in supported]
            if not allowed:
                raise ValueError(
                    f"sharding: table '{table}' ({type(module).__name__}) cannot use {list(wanted)} on "
                    f"{device.type}" + (" with [train].dense_parallel = 'fsdp'" if fsdp else "")
                    + f"; supported there: {supported}"
                )
            constraints[table] = ParameterConstraints(sharding_types=allowed)
    return constraints or None


def _modules_and_sharders(model: nn.Module):
    ebc_sharder, ec_sharder, _, _ = sharders()
    for m in embedding_modules(model):
        yield m, ebc_sharder if isinstance(m, EmbeddingBagCollection) else ec_sharder


def plan(model: nn.Module, cfg: ShardingConfig, device: torch.device,
         pg: dist.ProcessGroup | None = None, fsdp: bool = False) -> ShardingPlan:
    pg = pg or dist.group.WORLD
    world = dist.get_world_size(pg)
    topology = Topology(world_size=world, compute_device=device.type, local_world_size=world)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=_constraints(model, cfg, device, fsdp))
    return planner.collective_plan(model, sharders(), pg)


def _table_names(module: nn.Module) -> list[str]:
    if isinstance(module, EmbeddingBagCollection):
        return [c.name for c in module.embedding_bag_configs()]
    return [c.name for c in module.embedding_configs()]


def shard(model: nn.Module, cfg: ShardingConfig, device: torch.device,
          pg: dist.ProcessGroup | None = None,
          dense: DenseParallelConfig | None = None) -> DistributedModelParallel:
    """Fused optimizer, plan, DMP with the dense wrapper of ``dense`` (DDP by default) — in that
    order (the optimizer must be attached first). Raises ``ValueError`` when a table's allowed
    sharding types cannot be used here (e.g. ``data_parallel`` under FSDP2)."""
    dense = dense or DenseParallelConfig()
    apply_sparse_optimizer(model, cfg)
    sharding_plan = plan(model, cfg, device, pg, fsdp=dense.dense_parallel == "fsdp")
    dmp = DistributedModelParallel(module=model, device=device, plan=sharding_plan, sharders=sharders(),
                                   data_parallel_wrapper=data_parallel_wrapper(dense))
    zero_miss_rows(dmp)
    return dmp


def dense_optimizer(model: nn.Module, cfg: ShardingConfig, weight_decay: float = 0.0,
                    decays=None) -> CombinedOptimizer:
    """One optimizer for the step: the dense one plus the tables' fused one (for state_dict).
    ``adamw``: decoupled ``weight_decay`` on the parameters for which ``decays(name, param)`` is
    true (``jobs.optim.decays``), none on the rest (two parameter groups)."""
    params = dict(in_backward_optimizer_filter(model.named_parameters()))
    if cfg.dense_optimizer == "adam":
        dense = KeyedOptimizerWrapper(params, lambda ps: torch.optim.Adam(ps, lr=cfg.dense_lr))
    elif cfg.dense_optimizer == "adamw":
        decayed = {id(p) for n, p in params.items() if decays is None or decays(n, p)}

        def adamw(ps):
            groups = [{"params": [p for p in ps if id(p) in decayed], "weight_decay": weight_decay},
                      {"params": [p for p in ps if id(p) not in decayed], "weight_decay": 0.0}]
            return torch.optim.AdamW(groups, lr=cfg.dense_lr)
        dense = KeyedOptimizerWrapper(params, adamw)
    else:
        dense = KeyedOptimizerWrapper(params, lambda ps: torch.optim.SGD(ps, lr=cfg.dense_lr))
    parts = [("dense", dense)]
    if isinstance(model, DistributedModelParallel):
        parts.append(("sparse", model.fused_optimizer))
    return CombinedOptimizer(parts)

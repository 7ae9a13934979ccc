"""The job config: one TOML file with a table per component, each read into its typed config.

    [schema]     embedding.schema.FeatureSchema
    [generator]  pipeline.generator.GeneratorConfig
    [model]      model.ranking.ModelConfig
    [train]      TrainConfig below (with [train.sharding] → embedding.sharding.ShardingConfig,
                 [train.optim] → jobs.optim.OptimConfig)
    [tracking]   TrackingConfig below
    [gate]       GateConfig below (promotion to champion)

Unknown tables and keys are errors naming the key.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embedding.dense_parallel import DenseParallelConfig
from embedding.schema import FeatureSchema
from embedding.sharding import ShardingConfig
from embedding.typed_config import from_dict
from jobs.optim import OptimConfig, tower_recipe
from model.ranking import ModelConfig
from pipeline.days import parse_range
from pipeline.generator import GeneratorConfig


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    days: str = ""  # "YYYY-MM-DD..YYYY-MM-DD"; --days overrides
    eval_offset: int = 1  # evaluate on the day this many days after the last training day
    eval_days: int = 1  # ... and on this many consecutive days from there
    # named evaluation day ranges, each evaluated after training and logged under its own metric
    # prefix (validation_auc, test_auc, …): "+1" (the day after the last training day), "+2..+3",
    # or absolute days ("2026-01-05..2026-01-06"). Empty: one range "eval" from eval_offset and
    # eval_days. The first range is the one the registry's tags and the daily gate read.
    eval_ranges: dict[str, str] = field(default_factory=dict)
    num_workers: int = 2  # Ray Train workers (one process each; tables sharded over them)
    batch_size: int = 512  # rows per worker per step (the global batch is num_workers × this)
    eval_batch_size: int = 1024  # rows per eval step (larger batches were slower per row on CPU)
    epochs: int = 1  # passes over the training days
    log_every: int = 50  # steps between progress lines and logged training metrics
    seed: int = 0  # model initialisation, dropout masks and (deterministic) data order
    use_gpu: bool = False  # one GPU per worker, NCCL, CUDA FBGEMM (requirements/gpu.txt)
    # where Ray places the workers: PACK = as few nodes as possible (Ray Train's default: gloo /
    # NCCL traffic stays inside a node), SPREAD = over as many nodes as possible (docs/cluster.md)
    placement_strategy: str = "PACK"
    checkpoint_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_checkpoints: int = 3  # published checkpoints kept per run (the newest)
    max_steps: int = 0  # stop (with a checkpoint) after this many steps; 0: no limit
    deterministic: bool = False  # fixed data order per worker + deterministic kernels: exact resume
    # worker-group failures Ray Train recovers from, each time from this run's newest checkpoint
    # (set checkpoint_every so there is one mid-day); with deterministic=false a restart mid-epoch
    # cannot replay the same rows, so the row accounting then fails the run instead of registering
    max_failures: int = 2
    unknown_columns: str = "warn"  # columns in the logs the schema does not read: warn | error | ignore
    diagnostics_rows: int = 1024  # after training: collapse diagnostics on this many held-out rows (0: off)
    # the dense tower's data parallelism (embedding/dense_parallel.py, docs/architecture.md):
    # ddp = replicated on every worker; fsdp = parameters, gradients and optimizer state sharded (FSDP2)
    dense_parallel: str = "ddp"
    mixed_precision: str = "fp32"  # fsdp on GPUs: bf16 = bf16 parameters and activations, fp32 gradient reduction
    activation_checkpointing: bool = False  # recompute each tower block's activations in the backward (long sequences)
    sharding: ShardingConfig = field(default_factory=ShardingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)  # [train.optim]: the dense recipe

    def __post_init__(self) -> None:
        for key in ("num_workers", "batch_size", "eval_batch_size", "epochs", "log_every",
                    "keep_checkpoints", "eval_days"):
            if getattr(self, key) <= 0:
                raise ValueError(f"[train].{key}: must be positive, got {getattr(self, key)}")
        if self.placement_strategy not in ("PACK", "SPREAD"):
            raise ValueError(f"[train].placement_strategy: choose PACK or SPREAD, got '{self.placement_strategy}'")
        if self.unknown_columns not in ("warn", "error", "ignore"):
            raise ValueError(f"[train].unknown_columns: choose warn, error or ignore, got '{self.unknown_columns}'")
        for name, spec in self.eval_ranges.items():
            if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or name == "train":
                raise ValueError(f"[train.eval_ranges]: '{name}' is not a valid range name (lower-case letters, "
                                 "digits and '_', not 'train'): it becomes a metric prefix")
            if not isinstance(spec, str):
                raise ValueError(f"[train.eval_ranges].{name}: expected a day range string ('+1', '+2..+3' or "
                                 f"'2026-01-05..2026-01-06'), got {spec!r}")
            try:
                parse_range(spec)
            except ValueError as e:
                raise ValueError(f"[train.eval_ranges].{name}: {e}") from None
        for key in ("checkpoint_every", "max_steps", "max_failures", "diagnostics_rows"):
            if getattr(self, key) < 0:
                raise ValueError(f"[train].{key}: must be >= 0 (0 turns it off), got {getattr(self, key)}")
        if self.dense.mixed_precision != "fp32" and not self.use_gpu:  # building it checks the three keys
            raise ValueError("[train].mixed_precision = 'bf16' is for GPUs (set [train].use_gpu = true); "
                             "on CPU the dense tower trains in fp32")

    @property
    def dense(self) -> DenseParallelConfig:
        """The dense tower's parallelism (``embedding.dense_parallel``)."""
        return DenseParallelConfig(dense_parallel=self.dense_parallel, mixed_precision=self.mixed_precision,
                                   activation_checkpointing=self.activation_checkpointing)


@dataclass(frozen=True, kw_only=True)
class TrackingConfig:
    experiment: str = "tokenrec"  # the MLflow experiment runs are logged to
    model_name: str = "tokenrec-ranker"  # the registered model versions go to (and the gate compares within)


@dataclass(frozen=True, kw_only=True)
class GateConfig:
    """Promotion to ``champion``: the candidate may be worse than the champion, on the same
    evaluation day, by at most these margins, and its calibration must lie inside the band."""

    auc_margin: float = 0.002  # candidate AUC >= champion AUC - auc_margin
    logloss_margin: float = 0.005  # candidate logloss <= champion logloss + logloss_margin
    calibration_band: tuple[float, float] = (0.8, 1.25)  # mean prediction / mean label
    label: str = ""  # the label the gate decides on; "": the first (primary) label of the schema

    def __post_init__(self) -> None:
        lo, hi = self.calibration_band
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"[gate].calibration_band: need 0 < low <= 1 <= high, got {self.calibration_band}")
        if self.auc_margin < 0 or self.logloss_margin < 0:
            raise ValueError("[gate]: margins must be >= 0")


@dataclass(frozen=True, kw_only=True)
class JobConfig:
    schema: FeatureSchema
    generator: GeneratorConfig
    model: ModelConfig
    train: TrainConfig
    tracking: TrackingConfig
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.gate.label and self.gate.label not in self.schema.labels:
            raise ValueError(f"[gate].label: '{self.gate.label}' is not a label of the schema "
                             f"{list(self.schema.labels)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=str)


SECTIONS = ("schema", "generator", "model", "train", "tracking", "gate")


def _override(doc: dict, assignment: str) -> None:
    """Apply ``section.key=value`` (value in TOML syntax; bare words are strings)."""
    if "=" not in assignment:
        raise ValueError(f"--set {assignment!r}: expected section.key=value")
    key, raw = assignment.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    set_dotted(doc, key.strip(), value, f"--set {assignment!r}")


def set_dotted(doc: dict, key: str, value: Any, where: str = "") -> None:
    """``doc["a"]["b"]["c"] = value`` for ``key = "a.b.c"``, creating tables on the way. Raises
    ``ValueError`` (prefixed with ``where``) when a part of the path is not a table."""
    *parents, leaf = key.split(".")
    node = doc
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where or key}: '{p}' is not a table")
    node[leaf] = value


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Read a job TOML; ``overrides`` are ``section.key=value`` strings applied first."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML: {e}") from None
    for assignment in overrides:
        _override(doc, assignment)
    return config_from_doc(doc, str(path))


apply_override = _override


def config_from_doc(doc: dict, where: str) -> JobConfig:
    """A job config from a parsed TOML document (``where`` names it in errors)."""
    path = where
    unknown = sorted(set(doc) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown table(s) {unknown}; allowed: {list(SECTIONS)}")
    if "schema" not in doc:
        raise ValueError(f"{path}: a [schema] table is required")
    doc = tower_recipe(copy.deepcopy(doc))  # a copy: the caller's document stays as written
    try:
        return JobConfig(
            schema=FeatureSchema.from_dict(doc["schema"]),
            generator=from_dict(GeneratorConfig, doc.get("generator"), "generator"),
            model=from_dict(ModelConfig, doc.get("model"), "model"),
            train=from_dict(TrainConfig, doc.get("train"), "train"),
            tracking=from_dict(TrackingConfig, doc.get("tracking"), "tracking"),
            gate=from_dict(GateConfig, doc.get("gate"), "gate"),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None

"""``[train].dense_parallel`` and its companions are checked before any worker starts; FSDP2
never gets a data-parallel table (a replicated table is a dense parameter DDP would average)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embedding.dense_parallel import tower_blocks
from embedding.schema import load_schema
from embedding.sharding import ShardingConfig, _constraints
from jobs.config import TrainConfig
from model.hyformer import HyFormerConfig
from model.ranking import ModelConfig, RankingModel, RankingTrain

ROOT = Path(__file__).resolve().parents[2]


def test_dense_parallel_keys_are_checked() -> None:
    assert TrainConfig(dense_parallel="fsdp").dense.dense_parallel == "fsdp"
    with pytest.raises(ValueError, match="dense_parallel: choose one of"):
        TrainConfig(dense_parallel="zero3")
    with pytest.raises(ValueError, match="needs \\[train\\].dense_parallel = 'fsdp'"):
        TrainConfig(mixed_precision="bf16", use_gpu=True)
    with pytest.raises(ValueError, match="is for GPUs"):
        TrainConfig(dense_parallel="fsdp", mixed_precision="bf16")
    assert TrainConfig(dense_parallel="fsdp", mixed_precision="bf16", use_gpu=True).dense.mixed_precision == "bf16"


def _model(tower: str = "tokenformer") -> RankingTrain:
    cfg = ModelConfig(tower=tower, hyformer=HyFormerConfig(d_model=60))  # T = 5 tokens divide 60
    return RankingTrain(RankingModel(load_schema(ROOT / "configs/tiny.toml"), cfg, sparse_device=torch.device("meta")))


def test_fsdp_plans_no_data_parallel_table() -> None:
    model = _model()
    free = _constraints(model, ShardingConfig(), torch.device("cpu"), fsdp=True)
    assert free and all("data_parallel" not in c.sharding_types for c in free.values())
    assert _constraints(model, ShardingConfig(), torch.device("cpu"), fsdp=False) is None  # ddp: the planner's choice
    refused = "cannot use \\['data_parallel'\\] on cpu with \\[train\\].dense_parallel = 'fsdp'"
    with pytest.raises(ValueError, match=refused):
        _constraints(model, ShardingConfig(table_sharding_types={"user": ("data_parallel",)}), torch.device("cpu"),
                     fsdp=True)


def test_tower_blocks_are_the_layers_or_none() -> None:
    assert len(tower_blocks(_model("tokenformer"))) == 4
    assert len(tower_blocks(_model("rankmixer_longer"))) > 0
    assert tower_blocks(_model("dlrm")) == [] and tower_blocks(_model("hyformer")) == []


def test_per_block_options_need_a_tower_with_blocks() -> None:
    from embedding.dense_parallel import DenseParallelConfig, check_tower

    check_tower(_model("tokenformer"), DenseParallelConfig(dense_parallel="fsdp", activation_checkpointing=True))
    check_tower(_model("dlrm"), DenseParallelConfig(dense_parallel="fsdp"))  # sharded as one group: fine
    with pytest.raises(ValueError, match="DLRMTower has no block list"):
        check_tower(_model("dlrm"), DenseParallelConfig(dense_parallel="fsdp", mixed_precision="bf16"))
    with pytest.raises(ValueError, match="activation_checkpointing = true applies to a tower's blocks"):
        check_tower(_model("hyformer"), DenseParallelConfig(activation_checkpointing=True))


def test_placement_strategy_is_pack_or_spread() -> None:
    assert TrainConfig().placement_strategy == "PACK"
    assert TrainConfig(placement_strategy="SPREAD").placement_strategy == "SPREAD"
    with pytest.raises(ValueError, match="placement_strategy: choose PACK or SPREAD, got 'spread'"):
        TrainConfig(placement_strategy="spread")

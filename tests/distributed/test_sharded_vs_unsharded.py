"""The sharded model equals the unsharded one: outputs, dense gradients, and outputs after one
SGD step (which checks the fused table updates), for each sharding type TorchRec allows on CPU.
Two real gloo processes."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

from embedding.schema import load_schema
from embedding.sharding import ShardingConfig, apply_sparse_optimizer, shard
from jobs.worker import strip_prefixes
from model.ranking import ModelConfig, RankingModel
from pipeline.collate import collate
from tests.distributed.harness import copy_into_sharded, one_day_file, run_multiprocess

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
BATCH = 64
LR = 0.1


def _check(rank: int, world: int, sharding_type: str, data_file: str) -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    table = pq.read_table(data_file).slice(0, BATCH * world)
    global_batch = collate(table, schema)
    local_batch = collate(table.slice(rank * BATCH, BATCH), schema)
    # pooled (EBC) and sequence (EC) tables each get the type when their sharder allows it on CPU
    ec_type = {"data_parallel": "table_wise", "table_column_wise": "column_wise"}.get(sharding_type,
                                                                                     sharding_type)
    cfg = ShardingConfig(
        sparse_optimizer="sgd", sparse_lr=LR,
        table_sharding_types={t.name: (sharding_type,) for t in schema.field_tables}
        | {t.name: (ec_type,) for t in schema.sequence_tables},
    )

    torch.manual_seed(0)
    ref = RankingModel(schema, ModelConfig())
    sharded_module = RankingModel(schema, ModelConfig(), sparse_device=torch.device("meta"))
    dmp = shard(sharded_module, cfg, torch.device("cpu"))
    state = dmp.state_dict()
    copy_into_sharded(state, ref.state_dict())
    dmp.load_state_dict(state)
    if sharding_type == "data_parallel":
        # DP tables are replicated dense parameters (DDP-averaged gradients, dense optimizer);
        # only the sequence tables keep the fused optimizer.
        apply_optimizer_in_backward(torch.optim.SGD, ref.sparse_arch.ec.parameters(), {"lr": LR})
    else:
        apply_sparse_optimizer(ref, cfg)

    # forward equal
    out = dmp(local_batch)
    ref_out = ref(global_batch)
    torch.testing.assert_close(out, ref_out[rank * BATCH:(rank + 1) * BATCH], atol=1e-5, rtol=1e-5)

    # one step. The reference: the global batch's mean loss. Sharded, every gradient is the
    # workers' mean: DDP averages the dense ones, TorchRec divides the tables' by the world size
    # (so the fused table update equals the reference's: checked by the outputs after the step)
    F.binary_cross_entropy_with_logits(out, local_batch.labels).backward()
    F.binary_cross_entropy_with_logits(ref_out, global_batch.labels).backward()
    ref_params = dict(ref.named_parameters())
    checked = 0
    for name, p in dmp.named_parameters():
        if p.grad is None:
            continue
        rp = ref_params[strip_prefixes(name)]
        if rp.grad is None:
            raise AssertionError(f"{name}: gradient on the sharded side only ({p.grad.shape})")
        torch.testing.assert_close(p.grad, rp.grad, atol=1e-5, rtol=1e-4, msg=name)
        with torch.no_grad():
            p -= LR * p.grad
            rp -= LR * rp.grad
        checked += 1
    assert checked >= 6, f"only {checked} dense parameters had gradients"

    with torch.no_grad():
        after = dmp(local_batch)
        ref_after = ref(global_batch)[rank * BATCH:(rank + 1) * BATCH]
    assert not torch.allclose(after, out.detach()), "the step changed nothing"
    torch.testing.assert_close(after, ref_after, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), load_schema(ROOT / "configs/tiny.toml"), BATCH * WORLD, seed=1)


@pytest.mark.parametrize(
    "sharding_type", ["table_wise", "row_wise", "column_wise", "table_column_wise", "data_parallel"])
def test_sharded_equals_unsharded(sharding_type: str, data_file: str) -> None:
    run_multiprocess(_check, WORLD, sharding_type, data_file)

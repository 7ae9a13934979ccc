"""Checkpoints of an FSDP2-sharded dense tower (``[train].dense_parallel = "fsdp"``) move between
world sizes and modes: written with ``fsdp`` on 2 workers, loaded with ``fsdp`` on 1 and 4, with
``ddp`` on 2 (and re-saved, then loaded with ``fsdp`` again), and exported unsharded — each
predicting the same on a fixed batch, with the model and the optimizer state (Adam moments,
row-wise Adagrad momentum) unchanged by the round trip. Real gloo processes, real DCP files."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from embedding.dense_parallel import DenseParallelConfig
from embedding.schema import load_schema
from embedding.sharding import ShardingConfig, dense_optimizer, shard
from jobs import checkpoint
from jobs.optim import decays
from model.ranking import ModelConfig, RankingModel, RankingTrain
from model.tokenformer import TokenFormerConfig
from pipeline.collate import collate
from tests.distributed.harness import full, one_day_file, run_multiprocess

ROOT = Path(__file__).resolve().parents[2]
BATCH = 32
CFG = ShardingConfig(sharding_types=("row_wise",), dense_optimizer="adamw")
MODEL = ModelConfig(tower="tokenformer", tokenformer=TokenFormerConfig(windows=(8, 4), dropout=0.0))


def _build(mode: str, cfg: ShardingConfig = CFG):
    schema = load_schema(ROOT / "configs/tiny.toml")
    torch.manual_seed(0)
    model = RankingTrain(RankingModel(schema, MODEL, sparse_device=torch.device("meta"),
                                      num_shards=dist.get_world_size()))
    dmp = shard(model, cfg, torch.device("cpu"), dense=DenseParallelConfig(dense_parallel=mode))
    return schema, dmp, dense_optimizer(dmp, cfg, 0.01, decays)


def _predict(dmp, schema, data_file: str) -> torch.Tensor:
    batch = collate(pq.read_table(data_file).slice(0, BATCH), schema)  # the same rows on every rank
    dmp.eval()
    with torch.no_grad():
        out = dmp(batch)[1]
    dmp.train()
    return out


def _train_and_save(rank: int, world: int, mode: str, data_file: str, out: str) -> None:
    schema, dmp, opt = _build(mode)
    table = pq.read_table(data_file)
    for step in range(3):
        loss, _ = dmp(collate(table.slice((step * world + rank) * BATCH, BATCH), schema))
        opt.zero_grad()
        loss.backward()
        opt.step()
    ckpt = checkpoint.save(Path(out) / f"{mode}-{world}", dmp, opt, checkpoint.Position(step=3, world_size=world))
    preds = _predict(dmp, schema, data_file)
    if rank == 0:
        torch.save({"preds": preds, "ckpt": str(ckpt)}, Path(out) / f"{mode}-{world}.pt")


def _load_predict_resave(rank: int, world: int, mode: str, source: str, data_file: str, out: str) -> None:
    schema, dmp, opt = _build(mode)
    saved = torch.load(Path(out) / f"{source}.pt", weights_only=True)
    pos = checkpoint.load(saved["ckpt"], dmp, opt, dense_opt=opt._optims[0][1])
    assert pos.step == 3
    torch.testing.assert_close(_predict(dmp, schema, data_file), saved["preds"], atol=1e-6, rtol=1e-5)
    ckpt = checkpoint.save(Path(out) / f"{source}-as-{mode}-{world}", dmp, opt,
                           checkpoint.Position(step=3, world_size=world))
    if rank == 0:
        torch.save({"preds": saved["preds"], "ckpt": str(ckpt)}, Path(out) / f"{source}-as-{mode}-{world}.pt")


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), load_schema(ROOT / "configs/tiny.toml"), BATCH * 8, seed=4)


@pytest.fixture(scope="module")
def saved(data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    run_multiprocess(_train_and_save, 2, "fsdp", data_file, str(out))
    return out


def _flat(ckpt: str, tmp: Path) -> dict:
    dcp_to_torch_save(ckpt, str(tmp))
    full = torch.load(tmp, weights_only=False)

    def flatten(d, prefix=""):
        out = {}
        for k, v in d.items():
            out |= flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else (
                {f"{prefix}{k}": v} if isinstance(v, torch.Tensor) else {})
        return out
    return flatten(full)


def _same_state(a: str, b: str, tmp: Path) -> None:
    """Two checkpoints hold the same model and optimizer state (whatever their layouts were)."""
    fa, fb = _flat(a, tmp / "a.pt"), _flat(b, tmp / "b.pt")
    assert fa.keys() == fb.keys()
    assert any(k.endswith("exp_avg_sq") for k in fa) and any(k.endswith("momentum1") for k in fa)
    for k in fa:
        torch.testing.assert_close(fb[k], fa[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("mode,world", [("fsdp", 1), ("fsdp", 4), ("ddp", 2)])
def test_fsdp_checkpoint_from_2_workers_loads_as(mode: str, world: int, saved: Path, data_file: str,
                                                 tmp_path: Path) -> None:
    run_multiprocess(_load_predict_resave, world, mode, "fsdp-2", data_file, str(saved))
    first = torch.load(saved / "fsdp-2.pt", weights_only=True)["ckpt"]
    again = torch.load(saved / f"fsdp-2-as-{mode}-{world}.pt", weights_only=True)["ckpt"]
    _same_state(first, again, tmp_path)


def test_ddp_checkpoint_loads_back_into_fsdp(saved: Path, data_file: str, tmp_path: Path) -> None:
    """fsdp → ddp (re-saved by DDP) → fsdp: the same predictions and state."""
    if not (saved / "fsdp-2-as-ddp-2.pt").exists():
        run_multiprocess(_load_predict_resave, 2, "ddp", "fsdp-2", data_file, str(saved))
    run_multiprocess(_load_predict_resave, 2, "fsdp", "fsdp-2-as-ddp-2", data_file, str(saved))
    first = torch.load(saved / "fsdp-2.pt", weights_only=True)["ckpt"]
    back = torch.load(saved / "fsdp-2-as-ddp-2-as-fsdp-2.pt", weights_only=True)["ckpt"]
    _same_state(first, back, tmp_path)


def test_fsdp_checkpoint_exports_unsharded(saved: Path, data_file: str, tmp_path: Path) -> None:
    from deploy.export import export_checkpoint, load_servable

    state = torch.load(saved / "fsdp-2.pt", weights_only=True)
    schema = load_schema(ROOT / "configs/tiny.toml")
    out = export_checkpoint(schema, MODEL, state["ckpt"], tmp_path / "export")
    model, _ = load_servable(out / "model.pt", out / "config.json")
    with torch.no_grad():
        preds = torch.sigmoid(model(collate(pq.read_table(data_file).slice(0, BATCH), schema)))
    torch.testing.assert_close(preds, torch.sigmoid(state["preds"]), atol=1e-6, rtol=1e-5)


# DDP with the ``category`` table data-parallel (a dense parameter under AdamW); FSDP2 never plans
# that type, so there the table keeps its fused row-wise Adagrad
DP_TABLE = ShardingConfig(sharding_types=("row_wise",), table_sharding_types={"category": ("data_parallel",)},
                          dense_optimizer="adamw")


def _save_with_a_data_parallel_table(rank: int, world: int, data_file: str, out: str) -> None:
    schema, dmp, opt = _build("ddp", DP_TABLE)
    assert any("embedding_bags.category" in k for k in opt._optims[0][1].params)
    loss, _ = dmp(collate(pq.read_table(data_file).slice(rank * BATCH, BATCH), schema))
    loss.backward()
    opt.step()  # the optimizer state exists once it has stepped
    checkpoint.save(Path(out) / "dp-table", dmp, opt, checkpoint.Position(step=1, world_size=world))


def _warm_start_into_fsdp(rank: int, world: int, out: str) -> None:
    _, dmp, opt = _build("fsdp")
    ckpt = checkpoint.latest(Path(out) / "dp-table")
    with pytest.raises(RuntimeError, match="holds no optimizer state for 1 parameter.*category"):  # resume: strict
        checkpoint.load(ckpt, dmp, opt, dense_opt=opt._optims[0][1])
    said = []
    checkpoint.load(ckpt, dmp, opt, dense_opt=opt._optims[0][1], partial_optim=True, log=said.append)
    assert len(said) == 1 and "embedding_bags.category.weight" in said[0] and "start fresh" in said[0], said
    state = opt.state_dict()["state"]
    fused = [v for k, d in state.items() if "embedding_bags.category" in k for v in d.values()]
    adam = [v for k, d in state.items() if k.startswith("dense.") and "tower" in k for v in d.values()]
    assert fused and all(not s.tensor.any() for v in fused for s in v.local_shards()), \
        "the table's fused state should start fresh"
    assert adam and any(full(v).any() for v in adam), "the tower's AdamW moments should be loaded"


def test_warm_start_across_modes_gives_a_table_that_changed_optimizer_fresh_state(data_file: str,
                                                                                 tmp_path: Path) -> None:
    """A warm start (``daily``) from a DDP run whose planner made a small table data-parallel into
    an FSDP2 run (where it is fused): the weights load, that table's optimizer state starts fresh
    and is named; exact resume refuses the same checkpoint."""
    run_multiprocess(_save_with_a_data_parallel_table, 2, data_file, str(tmp_path))
    run_multiprocess(_warm_start_into_fsdp, 2, str(tmp_path))

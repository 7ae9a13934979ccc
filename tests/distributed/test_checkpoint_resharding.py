"""A checkpoint written by 2 workers loads on 1 and on 4 workers: predictions on a fixed batch are
equal, and the model *and optimizer* state (row-wise Adagrad momentum of row-wise sharded tables,
Adam moments, the managed-collision id→row buffers of the user and item tables) survive the round
trip unchanged. ``item`` is an id-space table (the target field and the history read it): its
managed-collision twin is an EC, the user table's an EBC. Real gloo processes, real DCP files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from embedding.sharding import ShardingConfig, dense_optimizer, shard, zero_miss_rows
from jobs import checkpoint
from jobs.config import load_config
from model.ranking import ModelConfig, RankingModel, RankingTrain
from pipeline.collate import collate
from tests.distributed.harness import one_day_file, run_multiprocess

ROOT = Path(__file__).resolve().parents[2]
BATCH = 32
CFG = ShardingConfig(sharding_types=("row_wise",))  # every table split by rows across workers
MANAGED = ["schema.tables.user.managed_collision=true", "schema.tables.item.managed_collision=true"]


def _schema():
    return load_config(ROOT / "configs/tiny.toml", MANAGED).schema


def _build():
    schema = _schema()
    torch.manual_seed(0)
    model = RankingTrain(RankingModel(schema, ModelConfig(), sparse_device=torch.device("meta"),
                                      num_shards=dist.get_world_size()))
    dmp = shard(model, CFG, torch.device("cpu"))
    return schema, dmp, dense_optimizer(dmp, CFG)


def fixed_batch(schema, data_file: str):
    """Trained rows, plus the same rows with never-seen user and item ids (managed-table misses)."""
    seen = pq.read_table(data_file).slice(0, BATCH)
    unseen = seen
    for k, col in enumerate(("user_id", "item_id")):
        ids = pa.array(np.arange(BATCH, dtype=np.int64) * 7919 + 10**12 + k)
        unseen = unseen.set_column(unseen.schema.get_field_index(col), col, ids)
    return collate(pa.concat_tables([seen, unseen]), schema)


def _predict(dmp, schema, data_file: str) -> torch.Tensor:
    batch = fixed_batch(schema, data_file)  # the same batch on every rank
    dmp.eval()
    with torch.no_grad():
        return dmp(batch)[1]


def _train_and_save(rank: int, world: int, data_file: str, out: str, ckpt_root: str | None = None) -> None:
    """Three steps, then a checkpoint under ``ckpt_root`` (default ``<out>/ckpts``; an ``s3://``
    URI in ``test_checkpoint_s3``) and the predictions in ``<out>/saved.pt``."""
    schema, dmp, opt = _build()
    table = pq.read_table(data_file)
    for step in range(3):
        batch = collate(table.slice((step * world + rank) * BATCH, BATCH), schema)
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        zero_miss_rows(dmp)  # as the worker's step does
    ckpt = checkpoint.save(ckpt_root or Path(out) / "ckpts", dmp, opt, checkpoint.Position(step=3, world_size=world))
    preds = _predict(dmp, schema, data_file)
    if rank == 0:
        torch.save({"preds": preds, "ckpt": str(ckpt)}, Path(out) / "saved.pt")


def _load_predict_resave(rank: int, world: int, data_file: str, out: str) -> None:
    schema, dmp, opt = _build()
    saved = torch.load(Path(out) / "saved.pt", weights_only=True)
    dense = opt._optims[0][1]
    pos = checkpoint.load(saved["ckpt"], dmp, opt, dense_opt=dense)
    assert pos.step == 3 and pos.world_size == 2
    preds = _predict(dmp, schema, data_file)
    torch.testing.assert_close(preds, saved["preds"], atol=1e-6, rtol=1e-5)
    checkpoint.save(Path(out) / f"resaved-{world}", dmp, opt, checkpoint.Position(step=3, world_size=world))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), _schema(), BATCH * 8, seed=2)


@pytest.fixture(scope="module")
def saved(data_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    run_multiprocess(_train_and_save, 2, data_file, str(out))
    return out


def _full(ckpt: Path, tmp: Path) -> dict:
    dcp_to_torch_save(str(ckpt), str(tmp))
    return torch.load(tmp, weights_only=False)


def test_exported_model_predicts_like_the_workers(saved: Path, data_file: str, tmp_path: Path) -> None:
    """The unsharded export of a 2-worker checkpoint: same predictions, misses included (every
    shard's miss row is zero: ``embedding.sharding.zero_miss_rows``)."""
    from deploy.export import export_checkpoint, load_servable

    saved_state = torch.load(saved / "saved.pt", weights_only=True)
    schema = _schema()
    out = export_checkpoint(schema, ModelConfig(), saved_state["ckpt"], tmp_path / "export")
    model, _ = load_servable(out / "model.pt", out / "config.json")
    with torch.no_grad():
        preds = torch.sigmoid(model(fixed_batch(schema, data_file)))
    torch.testing.assert_close(preds, torch.sigmoid(saved_state["preds"]), atol=1e-6, rtol=1e-5)
    counts = model.sparse_arch.mc_counts
    assert counts["user"][1] == BATCH and counts["item"][1] == BATCH  # the unseen half missed
    # the torch.export inference program of the same export: the workers' predictions again
    from deploy.export import inference_inputs, load_program

    program, _, _ = load_program(out)
    with torch.no_grad():
        exported = program(*inference_inputs(fixed_batch(schema, data_file), schema))
    torch.testing.assert_close(exported, torch.sigmoid(saved_state["preds"]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("world", [1, 4])
def test_checkpoint_from_2_workers_loads_on(world: int, saved: Path, data_file: str, tmp_path: Path) -> None:
    run_multiprocess(_load_predict_resave, world, data_file, str(saved))
    original = _full(Path(torch.load(saved / "saved.pt", weights_only=True)["ckpt"]), tmp_path / "a.pt")
    resaved = _full(checkpoint.latest(saved / f"resaved-{world}"), tmp_path / "b.pt")
    assert original.keys() == resaved.keys() == {"model", "optim"}
    optim = _flatten(original["optim"])
    momentum = [k for k in optim if k.endswith("momentum1")]
    adam = [k for k in optim if k.endswith("exp_avg_sq")]
    assert len(momentum) == 7 and adam, f"optimizer state missing: {sorted(optim)[:8]}"
    model = _flatten(original["model"])
    ids = [k for k in model if k.endswith("_mch_sorted_raw_ids")]
    assert len(ids) == 2 and all((model[k] != torch.iinfo(torch.int64).max).sum() > 10 for k in ids), \
        "the managed-collision tables admitted no ids"
    assert all(optim[k].abs().sum() > 0 for k in momentum), "some table's Adagrad momentum is still 0"
    managed = [k.rsplit(".", 1)[0] for k in ids]
    tables = {p.rsplit(".", 1)[1] for p in managed}
    for part in ("model", "optim"):
        flat_a, flat_b = _flatten(original[part]), _flatten(resaved[part])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            if "_managed_collision_modules" in k or any(f"{w}.{t}." in k for t in tables for w in _WEIGHTS):
                continue  # compared below per id: rows of managed tables may move between shards
            torch.testing.assert_close(flat_b[k], flat_a[k], rtol=0, atol=0, msg=f"{part}/{k}")
    for prefix in managed:
        a, b = _by_id(original, prefix), _by_id(resaved, prefix)
        assert a.keys() == b.keys(), prefix
        for i in a:
            for x, y in zip(a[i], b[i]):
                torch.testing.assert_close(y, x, rtol=0, atol=0, msg=f"{prefix} id {i}")


_WEIGHTS = ("mc_ebc._embedding_module.embedding_bags", "mc_ec._embedding_module.embeddings")


def _by_id(state: dict, prefix: str) -> dict[int, tuple]:
    """A managed table's contents by raw id: (access count, embedding row, Adagrad momentum)."""
    model, optim = _flatten(state["model"]), _flatten(state["optim"])
    table = prefix.rsplit(".", 1)[1]
    weight = next(model[f"model.sparse_arch.{w}.{table}.weight"] for w in _WEIGHTS
                  if f"model.sparse_arch.{w}.{table}.weight" in model)
    momentum = next(v for k, v in optim.items()
                    if k.endswith((f"embedding_bags.{table}.weight.{table}.momentum1",
                                   f"embeddings.{table}.weight.{table}.momentum1")))
    ids, rows, counts = (model[f"{prefix}.{b}"] for b in
                         ("_mch_sorted_raw_ids", "_mch_remapped_ids_mapping", "_mch_counts"))
    return {int(i): (counts[j], weight[rows[j]], momentum[rows[j]])
            for j, i in enumerate(ids.tolist()) if i != torch.iinfo(torch.int64).max}


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            out[f"{prefix}{k}"] = v
    return out

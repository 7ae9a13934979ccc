"""Checkpoints on an object store (a real S3-compatible server on 127.0.0.1: moto's server mode):
written by 2 workers to ``s3://…``, loaded on 1 and 4 (managed-collision tables rewritten for 4
workers through a local temporary copy), predicting the same; ``meta.json`` is the commit
marker, so a crash between the shards and the marker leaves the previous checkpoint as the
newest, and the next save deletes the orphaned objects."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from embedding import storage
from embedding.sharding import ShardingConfig, dense_optimizer
from jobs import checkpoint
from model.ranking import ModelConfig, RankingModel, RankingTrain
from pipeline.collate import collate
from tests.distributed.harness import one_day_file, run_multiprocess
from tests.distributed.test_checkpoint_resharding import BATCH, _build, _predict, _schema, _train_and_save


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), _schema(), BATCH * 8, seed=2)


def _load_predict(rank: int, world: int, data_file: str, root: str, expected: str) -> None:
    schema, dmp, opt = _build()
    ckpt = checkpoint.latest(root)
    pos = checkpoint.load(ckpt, dmp, opt, dense_opt=opt._optims[0][1])
    assert pos.step == 3 and pos.world_size == 2 and str(ckpt).startswith("s3://")
    torch.testing.assert_close(_predict(dmp, schema, data_file),
                               torch.load(expected, weights_only=True)["preds"], atol=1e-6, rtol=1e-5)


@pytest.fixture
def on_s3(s3_bucket: str, data_file: str, tmp_path: Path) -> tuple[str, Path]:
    local = tmp_path / "local"  # where the test keeps the workers' predictions
    local.mkdir()
    root = s3_bucket + "/work/ckpts"
    run_multiprocess(_train_and_save_s3, 2, data_file, root, str(local))
    return root, local


def _train_and_save_s3(rank: int, world: int, data_file: str, root: str, local: str) -> None:
    _train_and_save(rank, world, data_file, local, ckpt_root=root)


@pytest.mark.parametrize("world", [1, 4])
def test_s3_checkpoint_from_2_workers_loads_on(world: int, on_s3, data_file: str) -> None:
    root, local = on_s3
    assert [Path(p).name for p in checkpoint.published(root)] == ["step-00000003"]
    assert "meta.json" in storage.names(checkpoint.latest(root))
    run_multiprocess(_load_predict, world, data_file, root, str(local / "saved.pt"))
    if world == 4:  # the managed tables' rewrite for 4 workers lives next to the checkpoint, committed
        copy = storage.join(root, ".step-00000003-mc-world4")
        assert checkpoint.is_published(copy)


def test_a_crash_before_the_commit_marker_keeps_the_previous_checkpoint(s3_bucket: str, monkeypatch,
                                                                        data_file: str) -> None:
    schema = _schema()
    torch.manual_seed(0)
    model = RankingTrain(RankingModel(schema, ModelConfig()))
    opt = dense_optimizer(model, ShardingConfig())
    loss, _ = model(collate(pq.read_table(data_file).slice(0, 32), schema))
    loss.backward()
    opt.step()
    root = s3_bucket + "/ckpts"
    first = checkpoint.save(root, model, opt, checkpoint.Position(step=1))

    real = storage.write_text

    def crash_on_marker(path, text):
        if str(path).endswith("step-00000002/meta.json"):
            raise KeyboardInterrupt("killed before the commit marker")
        real(path, text)
    monkeypatch.setattr(storage, "write_text", crash_on_marker)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(root, model, opt, checkpoint.Position(step=2))
    monkeypatch.setattr(storage, "write_text", real)
    assert storage.exists(storage.join(root, "step-00000002", ".metadata")), "the shards were written"
    assert checkpoint.published(root) == [first] and checkpoint.latest(root) == first
    assert checkpoint.read_position(checkpoint.latest(root)).step == 1
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        checkpoint.read_position(storage.join(root, "step-00000002"))

    # a failed run's driver deletes them (jobs.train: checkpoint.discard_uncommitted); so does the next save
    assert checkpoint.discard_uncommitted(root) == [storage.join(root, "step-00000002")]
    assert storage.names(root) == ["step-00000001"] and checkpoint.discard_uncommitted(root) == []
    storage.write_text(storage.join(root, "step-00000002", "__0_0.distcp"), "orphan")
    third = checkpoint.save(root, model, opt, checkpoint.Position(step=3))
    assert checkpoint.published(root) == [first, third]
    assert "step-00000002" not in storage.names(root), "the uncommitted write's objects are cleaned up"
    # the same step saved again (the final save after a periodic one): stays published throughout,
    # only its marker is rewritten
    again = checkpoint.save(root, model, opt, checkpoint.Position(step=3, final=True))
    assert again == third and checkpoint.published(root) == [first, third]
    assert checkpoint.read_position(third).final
    fresh = RankingTrain(RankingModel(schema, ModelConfig()))
    checkpoint.load(third, fresh, None)
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=k)

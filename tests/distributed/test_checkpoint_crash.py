"""A worker killed (SIGKILL, by pid) between shard writes of a checkpoint: the previous
checkpoint stays the newest published one and loads; the half-written folder is never picked;
the next save of the same step replaces it. Real gloo processes, real DCP files."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.checkpoint import FileSystemWriter

from jobs import checkpoint
from pipeline.collate import collate
from tests.distributed.harness import _entry, _free_port, one_day_file, run_multiprocess
from tests.distributed.test_checkpoint_resharding import BATCH, _build, _predict, _schema


def _train_save_then_stall(rank: int, world: int, data_file: str, root: str) -> None:
    """Save step 1; then, saving step 2, rank 1 stalls before writing its shard (rank 0 has
    written its own and waits for rank 1): the parent kills the processes there."""
    schema, dmp, opt = _build()
    batch = collate(pq.read_table(data_file).slice(rank * BATCH, BATCH), schema)
    loss, _ = dmp(batch)
    opt.zero_grad()
    loss.backward()
    opt.step()
    checkpoint.save(root, dmp, opt, checkpoint.Position(step=1, world_size=world))
    torch.save(_predict(dmp, schema, data_file), Path(root) / f"preds-rank{rank}.pt")
    if rank == 1:
        write = FileSystemWriter.write_data

        def stalled(self, plan, planner):
            Path(root, "rank1-stalled").touch()
            time.sleep(600)
            return write(self, plan, planner)

        FileSystemWriter.write_data = stalled
    dmp.train()
    checkpoint.save(root, dmp, opt, checkpoint.Position(step=2, world_size=world))


def _load_and_resave(rank: int, world: int, data_file: str, root: str) -> None:
    schema, dmp, opt = _build()
    latest = checkpoint.latest(root)
    assert latest is not None and latest.name == "step-00000001", latest
    pos = checkpoint.load(latest, dmp, opt, dense_opt=opt._optims[0][1])
    assert pos.step == 1
    preds = _predict(dmp, schema, data_file)
    torch.testing.assert_close(preds, torch.load(Path(root) / "preds-rank0.pt", weights_only=True),
                               atol=1e-6, rtol=1e-5)
    out = checkpoint.save(root, dmp, opt, checkpoint.Position(step=2, world_size=world))
    assert out.name == "step-00000002"


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> str:
    return one_day_file(tmp_path_factory.mktemp("logs"), _schema(), BATCH * 4, seed=3)


def test_worker_killed_between_shard_writes(data_file: str, tmp_path: Path) -> None:
    root = tmp_path / "ckpts"
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, 2, port, _train_save_then_stall, (data_file, str(root)), errors))
             for r in range(2)]
    for p in procs:
        p.start()
    tmp_ckpt = root / ".tmp-step-00000002"
    deadline = time.time() + 300
    # rank 1 stalls before its shard; rank 0's shard of step 2 is on disk
    while not ((root / "rank1-stalled").exists() and list(tmp_ckpt.glob("__0_*.distcp"))):
        assert time.time() < deadline and all(p.is_alive() for p in procs), \
            f"never reached the stall (exit codes {[p.exitcode for p in procs]})"
        time.sleep(0.2)
    os.kill(procs[1].pid, signal.SIGKILL)  # the worker dies between shard writes ...
    os.kill(procs[0].pid, signal.SIGKILL)  # ... and the job with it (rank 0 waits on it forever)
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [-signal.SIGKILL, -signal.SIGKILL]

    assert tmp_ckpt.is_dir() and not list(tmp_ckpt.glob("__1_*.distcp"))  # half written
    assert [p.name for p in checkpoint.published(root)] == ["step-00000001"]
    assert checkpoint.latest(root).name == "step-00000001"
    # the previous checkpoint loads (on 1 worker), predicts as saved; re-saving step 2 publishes it
    run_multiprocess(_load_and_resave, 1, data_file, str(root))
    assert checkpoint.latest(root).name == "step-00000002" and not tmp_ckpt.exists()

"""Faults with real processes: a Ray Train worker killed by pid mid-day, an unreachable tracking
server at start, and concurrent `tokenrec promote` calls on one registry (docs/reliability.md)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs import checkpoint
from jobs.config import load_config
from pipeline.days import parse_days
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def _cli(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def _train_worker_pids(root: int) -> list[int]:
    """The Ray Train workers among the descendants of process ``root`` (the job, whose local Ray
    it started): never another Ray's on the machine (a study running beside the suite)."""
    out = subprocess.run(["ps", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines()[1:]]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    mine, todo = set(), [root]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo += children.get(pid, [])
    return [int(r[0]) for r in rows if len(r) == 3 and "ray::RayTrainWorker" in r[2] and int(r[0]) in mine]


def test_killed_worker_restarts_from_the_last_checkpoint_and_registers_once(tmp_path: Path) -> None:
    cfg = load_config(TINY, ["generator.rows_per_day=8192", "generator.files_per_day=2"])
    generate(cfg.schema, cfg.generator, tmp_path / "data", parse_days("2026-01-01..2026-01-02"),
             log=lambda *_: None)
    work = tmp_path / "work"
    job = _cli("train", "--config", str(TINY), "--days", "2026-01-01", "--data", str(tmp_path / "data"),
               "--workdir", str(work), "--set", "train.epochs=3", "--set", "train.checkpoint_every=8",
               "--set", "train.deterministic=true", "--set", "train.max_failures=1")
    deadline = time.time() + 600
    killed = None
    while killed is None:
        assert job.poll() is None, "the job ended before a worker could be killed:\n" + job.stdout.read()[-4000:]
        assert time.time() < deadline, "no mid-run checkpoint appeared"
        ckpts = [p for run in (work / "runs").glob("*") for p in checkpoint.published(run / "checkpoints")]
        pids = _train_worker_pids(job.pid)
        if ckpts and pids:
            killed = pids[-1]
            os.kill(killed, signal.SIGKILL)  # one Ray Train worker dies mid-day
        time.sleep(0.2)
    out, _ = job.communicate(timeout=900)
    assert job.returncode == 0, out[-6000:]
    assert "going on from" in out and "registered tokenrec-ranker version 1" in out, out[-6000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    versions = client.search_model_versions("name='tokenrec-ranker'")
    assert len(versions) == 1  # the day's model, exactly once
    m = client.get_run(versions[0].run_id).data.metrics
    assert m["rows_trained"] == m["rows_in"] == 8192 and m["samples_trained"] == 3 * 8192


def test_unreachable_tracking_server_stops_before_training(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(TINY, ["generator.rows_per_day=64"])
    generate(cfg.schema, cfg.generator, tmp_path / "data", parse_days("2026-01-01..2026-01-02"),
             log=lambda *_: None)
    t0 = time.time()
    job = _cli("train", "--config", str(TINY), "--days", "2026-01-01", "--data", str(tmp_path / "data"),
               "--workdir", str(tmp_path / "work"), "--tracking-uri", f"http://bob:pw123@127.0.0.1:{port}")
    out, _ = job.communicate(timeout=300)
    assert job.returncode == 2, out[-3000:]
    assert "cannot reach the MLflow tracking server at http://***@127.0.0.1" in out and "pw123" not in out
    assert not (tmp_path / "work" / "runs").exists()  # nothing started
    assert time.time() - t0 < 120


def test_concurrent_promotes_leave_one_champion_and_a_full_history(tmp_path: Path) -> None:
    from deploy.export import export_model, register_export
    from jobs.registry import HISTORY, Registry
    from model.ranking import RankingModel

    cfg = load_config(TINY)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    export = export_model(RankingModel(cfg.schema, cfg.model), tmp_path / "export", program=False)
    for _ in range(7):
        register_export(export, uri, cfg.tracking.experiment, cfg.tracking.model_name, tmp_path / "mlartifacts")
    client = MlflowClient(uri)
    reg = Registry(client, cfg.tracking.model_name)
    reg.set_champion(1, "first")
    procs = [_cli("promote", "--config", str(TINY), "--version", str(v), "--no-gate", "--workdir", str(tmp_path),
                  "--tracking-uri", uri) for v in range(2, 8)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    history = json.loads(client.get_registered_model(cfg.tracking.model_name).tags[HISTORY])
    assert history[0] == 1 and sorted(history[1:]) == [2, 3, 4, 5, 6, 7], history  # no update lost
    assert reg.champion() == history[-1]

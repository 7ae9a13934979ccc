"""A real Ray cluster on 127.0.0.1: ``ray start --head``, ``ray job submit`` of a tiny
``tokenrec train`` (the job's driver finds the cluster through ``RAY_ADDRESS``), success and the
registered version asserted, the head stopped — this cluster's processes only (not ``ray stop``,
which ends every Ray on the machine: the suite can run beside a study)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from jobs.config import load_config
from pipeline.days import parse_days
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_of(temp_dir: str) -> list[int]:
    """The processes of the Ray cluster started with ``--temp-dir temp_dir``: those whose command
    line names it (GCS, raylet, dashboard, …) and all their descendants (workers, whose process
    titles Ray rewrites). Read from /proc: ``ray stop`` would end every Ray on the machine — a
    study running beside the tests included."""
    parent, roots = {}, []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        if temp_dir in cmdline and int(entry.name) != os.getpid():
            roots.append(int(entry.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += [child for child, ppid in parent.items() if ppid == pid]
    return sorted(found)


def _stop(temp_dir: str) -> None:
    """Stop this test's cluster only: SIGTERM, then SIGKILL what is left after 20 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _processes_of(temp_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + 20
        while pids and time.time() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and "zombie" not in _state(p)]
            time.sleep(0.5)
        if not pids:
            return


def _state(pid: int) -> str:
    try:
        return "zombie" if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z" else "alive"
    except OSError:
        return "zombie"


def test_ray_job_submit_trains_on_a_started_head(tmp_path: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = tempfile.mkdtemp(prefix="tr-ray-", dir="/tmp")  # short: Ray's socket paths must fit
    cfg = load_config(TINY, ["generator.rows_per_day=512", "generator.files_per_day=1"])
    generate(cfg.schema, cfg.generator, tmp_path / "data", parse_days("2026-01-01..2026-01-02"),
             log=lambda *_: None)
    bin_dir = Path(sys.executable).parent
    # token authentication, as Ray 2.60 sets up a head by default: a fresh token for this cluster
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    dashboard = _free_port()
    start = subprocess.run([str(bin_dir / "ray"), "start", "--head", "--node-ip-address=127.0.0.1",
                            f"--port={_free_port()}", f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1",
                            "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats",
                            f"--temp-dir={temp_dir}",
                            # ports of its own: another Ray on the machine (a study) holds the defaults
                            *(f"--{flag}={_free_port()}" for flag in (
                                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                                "metrics-export-port", "ray-client-server-port", "node-manager-port",
                                "object-manager-port"))],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        work = tmp_path / "work"
        deadline = time.time() + 120
        while True:  # the head's job agent comes up a little after `ray start` returns (slower on a busy machine)
            job = subprocess.run(
                [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                 str(bin_dir / "tokenrec"), "train", "--config", str(TINY), "--days", "2026-01-01",
                 "--data", str(tmp_path / "data"), "--workdir", str(work), "--set", "train.epochs=1"],
                env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
            out = job.stdout + job.stderr
            if "No available agent to submit job" not in out or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0, out[-5000:]
        assert "succeeded" in out and "registered tokenrec-ranker version 1" in out, out[-5000:]
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        (version,) = client.search_model_versions("name='tokenrec-ranker'")
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["rows_trained"] == 512
    finally:
        _stop(temp_dir)
        assert not _processes_of(temp_dir), "the test cluster's processes outlived it"
        shutil.rmtree(temp_dir, ignore_errors=True)

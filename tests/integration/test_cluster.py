"""A real Ray cluster on 127.0.0.1: ``ray start --head``, ``ray job submit`` of a tiny
``tokenrec train`` (the job's driver finds the cluster through ``RAY_ADDRESS``), success and the
registered version asserted, the head stopped."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
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


def test_ray_job_submit_trains_on_a_started_head(tmp_path: Path) -> None:
    if ray.is_initialized():  # `ray stop` below ends every Ray process on the machine
        ray.shutdown()
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
                            "--include-dashboard=true", "--num-cpus=4", "--disable-usage-stats"],
                           env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stdout[-3000:] + start.stderr[-3000:]
        work = tmp_path / "work"
        job = subprocess.run(
            [str(bin_dir / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
             str(bin_dir / "tokenrec"), "train", "--config", str(TINY), "--days", "2026-01-01",
             "--data", str(tmp_path / "data"), "--workdir", str(work), "--set", "train.epochs=1"],
            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-5000:]
        assert "succeeded" in out and "registered tokenrec-ranker version 1" in out, out[-5000:]
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        (version,) = client.search_model_versions("name='tokenrec-ranker'")
        run = client.get_run(version.run_id)
        assert run.info.status == "FINISHED" and run.data.metrics["rows_trained"] == 512
    finally:
        subprocess.run([str(bin_dir / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=180)

"""A real Ray cluster on 127.0.0.1: ``ray start --head``, ``ray job submit`` of a tiny
``tokenrec train`` (the job's driver finds the cluster through ``RAY_ADDRESS``), success and the
registered version asserted, the head stopped — this cluster's processes only (not ``ray stop``,
which ends every Ray on the machine: the suite can run beside a study)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient

from jobs.config import load_config
from pipeline.days import parse_days
from pipeline.generator import generate
from tests.integration import ray_cluster

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def test_ray_job_submit_trains_on_a_started_head(tmp_path: Path) -> None:
    if ray.is_initialized():
        ray.shutdown()
    temp_dir = ray_cluster.temp_dir()
    cfg = load_config(TINY, ["generator.rows_per_day=512", "generator.files_per_day=1"])
    generate(cfg.schema, cfg.generator, tmp_path / "data", parse_days("2026-01-01..2026-01-02"),
             log=lambda *_: None)
    bin_dir = ray_cluster.BIN
    env = ray_cluster.cluster_env()
    try:
        _, dashboard = ray_cluster.start(env, temp_dir, num_cpus=4)
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
        ray_cluster.stop(temp_dir)
        assert not ray_cluster.processes_of(temp_dir), "the test cluster's processes outlived it"
        shutil.rmtree(temp_dir, ignore_errors=True)

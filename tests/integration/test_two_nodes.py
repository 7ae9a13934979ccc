"""A real two-node Ray cluster on one machine sharing nothing but an S3 server (issue 21).

``ray start --head`` and a second ``ray start --address`` node, each with its own resources and
its own ``--temp-dir``; an MLflow tracking server (``mlflow server``, SQLite behind it, no
artifact proxying); the logs, the work folder and the MLflow artifacts on the S3 server
(``tests/conftest.py``: moto's server mode on 127.0.0.1). ``tokenrec train`` (day 1) and
``tokenrec daily`` (day 2: warm start from what the first run published, gate, champion), both
with ``[train].placement_strategy = SPREAD`` so that the two Ray Train workers land on different
nodes (checked against the cluster's node ids); then ``tokenrec score`` of the champion writes
its scores to the store. No checkpoint, quarantine or export file of either run is left on
local disk outside the two Ray temp folders (the command and run logs are written locally and
uploaded), and the planted S3 secret appears in no output or log."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import ray
import requests

from embedding import storage
from jobs.config import load_config
from pipeline.days import parse_days
from pipeline.generator import generate
from tests.integration import ray_cluster

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
SECRET = "PLANTED-SECRET-9f3c1e"  # the S3 server's secret key (tests/conftest.py s3_server)


def _mlflow_server(env: dict[str, str], folder: Path, artifact_root: str) -> tuple[subprocess.Popen, str]:
    folder.mkdir(parents=True)
    port = ray_cluster.free_port()
    proc = subprocess.Popen(
        [str(ray_cluster.BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--default-artifact-root", artifact_root, "--no-serve-artifacts", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=open(folder / "server.log", "w"), stderr=subprocess.STDOUT, cwd=folder)
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 120
    while time.time() < deadline:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                return proc, uri
        except requests.ConnectionError:
            time.sleep(1)
    proc.kill()
    raise AssertionError("mlflow server did not come up: " + (folder / "server.log").read_text()[-3000:])


def _node_ids(env: dict[str, str], dashboard: int) -> set[str]:
    out = subprocess.run([str(ray_cluster.BIN / "ray"), "list", "nodes", "--format", "json",
                          "--address", f"http://127.0.0.1:{dashboard}"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return {n["node_id"] for n in json.loads(out.stdout) if n["state"] == "ALIVE"}


def _files_naming(roots: list[Path], needles: set[str], skip: list[Path]) -> list[Path]:
    """Every file or folder under ``roots`` whose path names one of ``needles``, not under ``skip``."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = [d for d in dirnames if not any((here / d).is_relative_to(s) for s in skip)]
            found += [here / n for n in dirnames + filenames if any(x in str(here / n) for x in needles)]
    return found


def test_train_daily_and_score_on_two_ray_nodes_sharing_only_s3(s3_bucket: str, tmp_path: Path,
                                                                monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.setenv("TOKENREC_LOCAL_DIR", str(tmp_path / "local"))
    cfg = load_config(TINY, ["generator.rows_per_day=1024", "generator.files_per_day=2"])
    generate(cfg.schema, cfg.generator, tmp_path / "logs", parse_days("2026-01-01..2026-01-03"), log=lambda *_: None)
    logs, work = s3_bucket + "/logs", s3_bucket + "/tokenrec"
    storage.upload(tmp_path / "logs", logs)
    shutil.rmtree(tmp_path / "logs")

    env = ray_cluster.cluster_env()  # with the S3 endpoint and credentials, as on every node of a cluster
    head_tmp, node_tmp = ray_cluster.temp_dir(), ray_cluster.temp_dir()
    server, tracking = _mlflow_server(env, tmp_path / "tracking-server", work + "/mlartifacts")
    try:
        # each node and the driver get their own scratch folder (TMPDIR), scanned at the end like the rest
        scratch = {who: tmp_path / f"{who}-tmp" for who in ("head", "node", "driver")}
        for folder in scratch.values():
            folder.mkdir()
        gcs, dashboard = ray_cluster.start(env | {"TMPDIR": str(scratch["head"])}, head_tmp, num_cpus=2,
                                           resources={"head_node": 1})
        ray_cluster.start(env | {"TMPDIR": str(scratch["node"])}, node_tmp, num_cpus=2, head_address=gcs,
                          resources={"second_node": 1})
        deadline = time.time() + 60
        while len(nodes := _node_ids(env, dashboard)) < 2 and time.time() < deadline:
            time.sleep(2)
        assert len(nodes) == 2, nodes

        def tokenrec(*args: str) -> subprocess.CompletedProcess:
            config = [] if args[0] == "score" else ["--config", str(TINY)]
            out = subprocess.run([sys.executable, "-m", "jobs.cli", *args, *config, "--data", logs,
                                  "--workdir", work, "--tracking-uri", tracking, "--address", gcs],
                                 env=env | {"TMPDIR": str(scratch["driver"])}, cwd=ROOT, capture_output=True,
                                 text=True, timeout=900)
            assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
            return out

        spread = ["--set", "train.placement_strategy=SPREAD"]
        outs = [tokenrec("train", "--days", "2026-01-01", *spread),
                tokenrec("daily", "--date", "2026-01-02", *spread, "--set", "gate.calibration_band=[0.5, 2.0]")]
        outs.append(tokenrec("score", "--model", "models:/tokenrec-ranker@champion", "--days", "2026-01-03",
                             "--out", s3_bucket + "/scores"))

        client = MlflowClient(tracking)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time"])
        assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
        for run in runs:  # each run's two workers on the cluster's two nodes
            placed = json.loads(run.data.tags["tokenrec.worker_nodes"])
            assert len(placed) == 2 and set(placed) == nodes, (placed, nodes)
            assert run.info.artifact_uri.startswith(work + "/mlartifacts/")
            assert run.data.tags["tokenrec.export"] == f"{work}/runs/{run.info.run_id}/export"
            on_store = storage.files_under(f"{work}/runs/{run.info.run_id}")
            assert {"export/_SUCCESS", "export/model.pt", "run.log"} <= set(on_store)
            assert any(f.startswith("checkpoints/step-") and f.endswith("/meta.json") for f in on_store)
        daily = runs[1]
        assert daily.data.tags["tokenrec.init_from"] == runs[0].data.tags["tokenrec.checkpoint"], \
            "the daily run warm-starts from the checkpoint the first run published on the store"
        champion = client.get_model_version_by_alias("tokenrec-ranker", "champion")
        assert champion.run_id == daily.info.run_id and "gate on" in champion.tags["tokenrec.gate"]
        def rows(folder: str) -> int:
            fs, base = storage.filesystem(folder)
            return sum(pq.read_metadata(fs.open_input_file(f"{base}/{f}")).num_rows
                       for f in storage.files_under(folder) if f.endswith(".parquet"))

        assert storage.is_published_folder(s3_bucket + "/scores"), "the scores' commit marker"
        assert rows(s3_bucket + "/scores") == rows(logs + "/day=2026-01-03") == 1024, "every row of day 3 scored"

        run_ids = {r.info.run_id for r in runs}
        local = _files_naming([tmp_path, Path("/tmp"), Path.home(), ROOT], run_ids,
                              skip=[Path(head_tmp), Path(node_tmp), ROOT / ".venv", ROOT / ".git"])
        assert all(p.suffix == ".log" or p.is_dir() and all(c.suffix == ".log" for c in p.rglob("*") if c.is_file())
                   for p in local), [str(p) for p in local]
        texts = [o.stdout + o.stderr for o in outs] + [p.read_text(errors="replace")
                                                       for p in (tmp_path / "local").rglob("*.log")]
        texts += [f"{k}={v}" for r in runs for k, v in {**r.data.tags, **r.data.params}.items()]
        assert not [t for t in texts if SECRET in t], "the S3 secret leaked"
    finally:
        for temp in (node_tmp, head_tmp):
            ray_cluster.stop(temp)
        server.terminate()
        server.wait(timeout=60)
        assert not ray_cluster.processes_of(head_tmp) and not ray_cluster.processes_of(node_tmp)
        for temp in (node_tmp, head_tmp):
            shutil.rmtree(temp, ignore_errors=True)

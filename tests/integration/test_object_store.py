"""Logs on an object store: a day range read from ``s3://`` (a real S3-compatible server on
127.0.0.1) through Ray Data gives the same rows, the same quarantine and the same accounting as
the same files on disk; the quarantine files themselves land on the store."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from embedding import storage
from jobs.config import load_config
from pipeline.days import day_files, parse_days
from pipeline.generator import generate
from pipeline.source import read_logs
from pipeline.validate import check_files, count_quarantined

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ray_with_s3(s3_bucket: str):
    """Local Ray started after ``s3_bucket`` set the S3 server's environment, so its workers (Ray
    Data tasks, Ray Train workers) inherit it — as on a cluster whose nodes have it set; never
    through Ray's runtime_env, which Ray writes to its logs."""
    ray.shutdown()
    # CPUs as jobs.train.init_ray asks for: 2 Ray Train workers plus room for Ray Data tasks
    ray.init(num_cpus=4, include_dashboard=False)
    yield s3_bucket
    ray.shutdown()


def test_a_day_range_on_s3_reads_like_the_same_files_on_disk(ray_with_s3: str, tmp_path: Path) -> None:
    bucket = ray_with_s3
    cfg = load_config(ROOT / "configs/tiny.toml")
    local = tmp_path / "logs"
    days = parse_days("2026-01-01..2026-01-02")
    generate(cfg.schema, cfg.generator, local, days, log=lambda *_: None)
    f = next((local / "day=2026-01-02").glob("*.parquet"))
    t = pq.read_table(f)
    click = t.column("click").to_pylist()
    click[0] = click[5] = None  # two rows for the quarantine
    pq.write_table(t.set_column(t.schema.get_field_index("click"), "click", pa.array(click, pa.float32())), f)
    storage.upload(local, bucket + "/logs")

    on_disk, on_s3 = day_files(local, days), day_files(bucket + "/logs", days)
    assert check_files(on_s3, cfg.schema, log=lambda *_: None) == check_files(on_disk, cfg.schema, log=lambda *_: None)
    a = read_logs(on_disk, cfg.schema, tmp_path / "quarantine").to_pandas()
    b = read_logs(on_s3, cfg.schema, bucket + "/work/quarantine").to_pandas()
    assert len(a) == len(b) == 8000 - 2
    key = [cfg.schema.user_id, cfg.schema.ts, "item_id"]
    a, b = (x.sort_values(key, kind="stable").reset_index(drop=True) for x in (a, b))
    assert a.drop(columns=[c for c in a.columns if c.startswith("_")]).equals(
        b.drop(columns=[c for c in b.columns if c.startswith("_")]))
    assert count_quarantined(bucket + "/work/quarantine") == count_quarantined(tmp_path / "quarantine") == \
        (2, {"null label 'click'": 2})
    assert storage.files_under(bucket + "/work/quarantine"), "the quarantine files are on the store"


SECRET = "PLANTED-SECRET-9f3c1e"  # the S3 server's secret key (tests/conftest.py s3_server)


def tokenrec(*args: str) -> subprocess.CompletedProcess:
    """The CLI in its own process, with this test's environment (the S3 endpoint and credentials)."""
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_daily_on_an_s3_workdir_trains_once_and_leaks_no_credential(s3_bucket: str, tmp_path: Path,
                                                                    monkeypatch) -> None:
    """``tokenrec daily`` with ``--data`` and ``--workdir`` on the S3 server (MLflow's store: a
    local SQLite file; its artifacts on the bucket): the run's checkpoint, quarantine, export,
    Ray Train's results, the run and command logs and the MLflow artifacts are on the store;
    the gate scores the export read back from it; a second ``daily`` of the same day trains
    nothing. Nothing of the run is left on local disk but the logs (written locally, uploaded at
    the end). The S3 secret appears in no output, log, tag, param or error message."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("TOKENREC_LOCAL_DIR", str(tmp_path / "local"))
    cfg = load_config(ROOT / "configs/tiny.toml", ["generator.rows_per_day=1024", "generator.files_per_day=2"])
    generate(cfg.schema, cfg.generator, tmp_path / "logs", parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    logs, work = s3_bucket + "/logs", s3_bucket + "/tokenrec"
    storage.upload(tmp_path / "logs", logs)
    shutil.rmtree(tmp_path / "logs")
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    daily = ["daily", "--config", str(ROOT / "configs/tiny.toml"), "--data", logs, "--workdir", work,
             "--tracking-uri", tracking, "--date", "2026-01-01",
             "--set", "gate.calibration_band=[0.5, 2.0]"]  # 1,024 rows of one day: a rough calibration
    first = tokenrec(*daily)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    second = tokenrec(*daily)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "day 2026-01-01 is already done" in second.stdout

    client = MlflowClient(tracking)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1, "the second daily trained again"
    run = runs[0]
    tags = run.data.tags
    assert run.info.artifact_uri.startswith(work + "/mlartifacts/")
    assert tags["tokenrec.data_root"] == logs, "the run records the URI as its data root"
    assert run.data.metrics["rows_in"] == run.data.metrics["rows_trained"] + run.data.metrics["rows_quarantined"] \
        == 1024, "listed, checked, read and accounted on the store"
    assert tags["tokenrec.checkpoint"].startswith(f"{work}/runs/{run.info.run_id}/checkpoints/step-")
    assert tags["tokenrec.export"] == f"{work}/runs/{run.info.run_id}/export"
    on_store = storage.files_under(f"{work}/runs/{run.info.run_id}")
    assert {"export/_SUCCESS", "export/model.pt", "export/model.pt2", "run.log"} <= set(on_store)
    assert any(f.startswith("checkpoints/step-") and f.endswith("/meta.json") for f in on_store)
    assert [n for n in storage.names(f"{work}/logs") if n.startswith("daily-")], "the command logs are uploaded"
    assert storage.files_under(f"{work}/ray_results"), "Ray Train's results are on the store"
    assert storage.files_under(run.info.artifact_uri), "MLflow's artifacts are on the store"
    version = client.get_model_version_by_alias("tokenrec-ranker", "champion")
    assert int(version.version) == 1 and "gate on" in version.tags["tokenrec.gate"]
    assert not client.search_registered_models("name LIKE '%tokenrec-lock%'"), "the champion lock was released"

    local = [p for p in _files(tmp_path) if not p.name.startswith("mlflow.db")]
    assert local and all(p.suffix == ".log" for p in local), [str(p) for p in local if p.suffix != ".log"]
    texts = [first.stdout, first.stderr, second.stdout, second.stderr] + [p.read_text(errors="replace") for p in local]
    texts += [storage.read_text(f"{work}/runs/{run.info.run_id}/run.log")]
    texts += [f"{k}={v}" for k, v in {**tags, **run.data.params, **version.tags}.items()]
    assert texts and not [t for t in texts if SECRET in t], "the S3 secret leaked"

    bad = tokenrec("train", "--config", str(ROOT / "configs/tiny.toml"), "--data", s3_bucket + "-missing/logs",
                   "--workdir", work, "--tracking-uri", tracking, "--days", "2026-01-01")
    assert bad.returncode != 0 and "s3://" in bad.stderr and SECRET not in bad.stdout + bad.stderr

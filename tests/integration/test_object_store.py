"""Logs on an object store: a day range read from ``s3://`` (a real S3-compatible server on
127.0.0.1) through Ray Data gives the same rows, the same quarantine and the same accounting as
the same files on disk; the quarantine files themselves land on the store."""

from __future__ import annotations

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


def test_train_reads_its_days_from_s3(ray_with_s3: str, tmp_path: Path) -> None:
    """``tokenrec train --data s3://…``: listed, checked, read, quarantined and accounted on the
    store; the run records the URI as its data root."""
    from jobs.train import TrainRequest, run_train

    bucket = ray_with_s3
    cfg = load_config(ROOT / "configs/tiny.toml")
    local = tmp_path / "logs"
    generate(cfg.schema, cfg.generator, local, parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    storage.upload(local, bucket + "/logs")
    m = run_train(cfg, TrainRequest(days="2026-01-01", data_root=bucket + "/logs", workdir=tmp_path / "work",
                                    register=False), log=lambda *_: None)
    assert m["rows_in"] == m["rows_trained"] + m["rows_quarantined"] == 4000
    assert 0.5 < m["eval_auc"] <= 1 and m["eval_rows"] == 4000
    from mlflow.tracking import MlflowClient

    run = MlflowClient(m["tracking_uri"]).get_run(m["run_id"])
    assert run.data.tags["tokenrec.data_root"] == bucket + "/logs"

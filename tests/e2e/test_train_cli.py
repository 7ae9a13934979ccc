"""The CLI end to end on tiny data: real local Ray, real MLflow (SQLite in a temp dir), real
Parquet. A day seeded with bad rows trains on the good ones (TokenFormer, its tower sharded
with FSDP2) and quarantines the rest; a file
whose column types disagree with the schema stops the job before training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"
# the sharded end-to-end path runs the primary tower, small enough for CI
TOKENFORMER = ["--set", "model.tower=tokenformer", "--set", "model.tokenformer.d_model=16",
               "--set", "model.tokenformer.num_heads=2", "--set", "model.tokenformer.windows=[6, 3]"]


def tokenrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _seed_bad_rows(path: Path) -> int:
    t = pq.read_table(path)
    click = t.column("click").to_pylist()
    dense = t.column("dense_0").to_pylist()
    hist = t.column("hist_item_id").to_pylist()
    click[0] = None                  # null label
    dense[1] = float("nan")          # NaN dense
    dense[2] = float("inf")          # inf dense
    hist[3] = hist[3] + [12345]      # misaligned sequence lists
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click, pa.float32()))
    t = t.set_column(t.schema.get_field_index("dense_0"), "dense_0", pa.array(dense, pa.float32()))
    t = t.set_column(t.schema.get_field_index("hist_item_id"), "hist_item_id",
                     pa.array(hist, pa.list_(pa.int64())))
    pq.write_table(t, path)
    return 4


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    r = tokenrec("generate", "--config", str(TINY), "--days", "2026-01-01..2026-01-03", "--out", str(root))
    assert r.returncode == 0, r.stderr
    return root


def test_train_quarantines_registers_and_serves(data: Path, tmp_path: Path) -> None:
    n_bad = _seed_bad_rows(next((data / "day=2026-01-02").glob("*.parquet")))
    work = tmp_path / "work"
    r = tokenrec("train", "--config", str(TINY), "--days", "2026-01-01..2026-01-02",
                 "--data", str(data), "--workdir", str(work), *TOKENFORMER,
                 "--set", "train.dense_parallel=fsdp")  # the tower sharded with FSDP2 (issue 20)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "step" in r.stdout + r.stderr and "rows/s" in r.stdout + r.stderr  # progress output
    # the console: the job's lines and a progress bar; the libraries' output went to the run's log
    for noise in ("TBE=", "GreedyPerfPartitioner", "FutureWarning", "Traceback", "RayTrainWorker pid="):
        assert noise not in r.stdout + r.stderr, noise
    assert "  evaluate eval: 4,000 rows, AUC" in r.stdout and "  plan and shard: tokenformer over 2 workers" in r.stdout

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tokenrec")
    (run,) = client.search_runs([exp.experiment_id])
    m = run.data.metrics
    assert m["rows_in"] == 8000
    assert m["rows_quarantined"] == n_bad
    assert m["rows_in"] == m["rows_trained"] + m["rows_quarantined"]
    assert 0.5 < m["eval_auc"] <= 1.0 and m["eval_rows"] == 4000
    assert {"eval_gauc", "eval_logloss", "eval_calibration", "train_loss"} <= set(m)
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) >= 1
    assert run.data.params["train.num_workers"] == "2" and run.data.params["train.dense_parallel"] == "fsdp"
    meta = dcp.FileSystemReader(run.data.tags["tokenrec.checkpoint"]).read_metadata().state_dict_metadata
    layers = [v for k, v in meta.items() if k.startswith("model.model.tower.layers.") and k.endswith("weight")]
    assert layers and all(len(v.chunks) == 2 for v in layers), "the tower was not sharded over the 2 workers"
    assert run.data.tags["tokenrec.days"] == "2026-01-01..2026-01-02"
    run_log = (work / "runs" / run.info.run_id / "run.log").read_text()
    assert "TBE=" in run_log and "GreedyPerfPartitioner" in run_log  # the libraries' output, kept
    assert {f.path for f in client.list_artifacts(run.info.run_id, "logs")} == {"logs/run.log"}
    # the run page: its name, a description with the exact command, the day files as dataset inputs
    assert run.info.run_name == "tokenformer 2026-01-01..2026-01-02"
    assert "Command: `tokenrec train --config" in run.data.tags["mlflow.note.content"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"training 2026-01-01..2026-01-02", "eval 2026-01-03"}
    assert json.loads(inputs["training 2026-01-01..2026-01-02"].dataset.profile)["num_rows"] == 8000
    assert [t.value for t in inputs["eval 2026-01-03"].tags] == ["eval"]
    plots = {f.path for f in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/training_curve.png"}  # and the collapse diagnostics, below

    qfiles = list((work / "runs" / run.info.run_id / "quarantine" / "train").glob("part-*.parquet"))
    reasons = pd.concat([pq.read_table(f).to_pandas() for f in qfiles])["_reason"].tolist()
    assert sorted(reasons) == sorted([
        "null label 'click'", "NaN or inf dense 'dense_0'", "NaN or inf dense 'dense_0'",
        "misaligned sequence 'hist': 'hist_category' length differs from 'hist_item_id'"])

    (version,) = client.search_model_versions("name='tokenrec-ranker'")
    assert version.run_id == run.info.run_id
    assert float(version.tags["eval_auc"]) == pytest.approx(m["eval_auc"])
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/tokenrec-ranker/{version.version}")
    rows = pq.read_table(next((data / "day=2026-01-03").glob("*.parquet"))).slice(0, 16).to_pandas()
    probs = model.predict(rows.drop(columns=["click", "p_true"]))  # a request carries no labels
    assert list(probs.columns) == ["click"] and len(probs) == 16
    assert ((probs["click"] > 0) & (probs["click"] < 1)).all()

    # collapse diagnostics of the run: logged by the run itself ([train].diagnostics_rows), and again
    # on demand: JSON + PNG logged to it, one entry per layer
    assert len(client.get_metric_history(run.info.run_id, "effective_rank")) == 4
    r = tokenrec("analyze", "--run", run.info.run_id, "--workdir", str(work), "--rows", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 3 (window 3): effective rank" in r.stdout
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "diagnostics")}
    assert artifacts == {"diagnostics/diagnostics.json", "diagnostics/diagnostics.png"}
    assert len(client.get_metric_history(run.info.run_id, "effective_rank")) == 8  # 4 layers, twice


def test_type_mismatch_stops_before_training(data: Path, tmp_path: Path) -> None:
    bad_day = tmp_path / "logs" / "day=2026-01-01"
    bad_day.mkdir(parents=True)
    t = pq.read_table(next((data / "day=2026-01-01").glob("*.parquet")))
    t = t.set_column(t.schema.get_field_index("dense_1"), "dense_1", t.column("dense_1").cast(pa.string()))
    pq.write_table(t, bad_day / "part-00000.parquet")
    r = tokenrec("train", "--config", str(TINY), "--days", "2026-01-01", "--data", str(tmp_path / "logs"),
                 "--workdir", str(tmp_path / "work"))
    assert r.returncode == 2
    assert "part-00000.parquet: column 'dense_1' has type string" in r.stderr
    work = tmp_path / "work"  # stopped before any run, Ray or MLflow store (the command's log may exist)
    assert not (work / "mlflow.db").exists() and not (work / "runs").exists() and not (work / "ray_results").exists()


def test_two_sequences_hyformer_end_to_end(tmp_path: Path) -> None:
    """A schema with two behaviour sequences, both reading the target's ``item`` table (one id
    space for three features): generated, validated, sharded, trained with HyFormer through Ray
    Train, evaluated on two named day ranges in the same run (validation and test, each under its
    own metric prefix), registered, diagnosed."""
    text = TINY.read_text().replace(
        "[generator]",
        '[[schema.sequences]]\nname = "buy"\nmax_len = 6\nfeatures = [{ name = "item_id", table = "item" }, '
        '{ name = "category", table = "buy_category" }]\n\n[generator]')
    text = text.replace("hist_category = { hash_size = 32, dim = 16 }",
                        "hist_category = { hash_size = 32, dim = 16 }\nbuy_category = { hash_size = 32, dim = 16 }")
    config = tmp_path / "two.toml"
    config.write_text(text)
    data, work = tmp_path / "logs", tmp_path / "work"
    r = tokenrec("generate", "--config", str(config), "--days", "2026-01-01..2026-01-04", "--out", str(data))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "buy_item_id" in pq.read_table(next((data / "day=2026-01-01").glob("*.parquet"))).column_names
    # T = 1 query × 2 sequences + 4 NS tokens (user, item, ctx, dense) = 6 divides 48
    r = tokenrec("train", "--config", str(config), "--data", str(data), "--workdir", str(work),
                 "--days", "2026-01-01..2026-01-02",
                 "--set", 'train.eval_ranges.validation="+1"', "--set", 'train.eval_ranges.test="2026-01-04"',
                 "--set", "model.tower=hyformer", "--set", "model.hyformer.d_model=48",
                 "--set", "model.hyformer.encoder=longer", "--set", "model.hyformer.recent_window=4")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tokenrec").experiment_id])
    assert run.data.tags["tokenrec.tower"] == "hyformer" and run.data.params["schema.num_sequences"] == "2"
    m = run.data.metrics
    assert "eval_auc" not in m
    for name in ("validation", "test"):  # 4000 rows a day, each range accounted for on its own
        assert 0.5 < m[f"{name}_auc"] <= 1.0 and m[f"{name}_rows"] == m[f"{name}_rows_in"] == 4000
        assert {f"{name}_gauc", f"{name}_logloss", f"{name}_oracle_auc"} <= set(m)
    assert m["validation_auc"] != m["test_auc"]
    assert json.loads(run.data.tags["tokenrec.eval_ranges"]) == {"validation": "2026-01-03", "test": "2026-01-04"}
    assert run.data.tags["tokenrec.eval_day"] == "2026-01-03"  # the first range: registry tags, gate
    (version,) = client.search_model_versions("name='tokenrec-ranker'")
    assert float(version.tags["test_auc"]) == pytest.approx(m["test_auc"])
    r = tokenrec("analyze", "--run", run.info.run_id, "--workdir", str(work), "--rows", "256")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "layer 1 (window None): effective rank" in r.stdout


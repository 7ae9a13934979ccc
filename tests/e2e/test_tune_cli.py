"""``tokenrec tune`` end to end on tiny data: Ray Tune runs real ``tokenrec train`` runs (Ray
Train workers, MLflow nested under the study's parent run), chooses on validation days, trains
the chosen settings with seeds, reports test metrics and the paired difference; a rerun after an
interruption runs only what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
STUDY = """
[tune]
name = "tiny"
towers = ["dlrm", "tokenformer"]
trials = 1
seeds = 1  # [tune].tower_seeds: tests/unit/test_tune.py
metric = "validation_auc"
days = "2026-01-01..2026-01-02"
eval_ranges = { validation = "+1", test = "+2" }
pairs = [["tokenformer", "dlrm"]]

[tune.space]
"train.sharding.dense_lr" = { loguniform = [1e-3, 1e-2] }
"train.optim.warmup_share" = { choice = [0.0, 0.1] }

[tune.fixed.tokenformer]
"model.tokenformer.d_model" = 16
"model.tokenformer.num_heads" = 2
"model.tokenformer.windows" = [6, 3]
"""


def tokenrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=1200)


def test_tune_chooses_seeds_reports_and_resumes(tmp_path: Path) -> None:
    data, work, study = tmp_path / "logs", tmp_path / "work", tmp_path / "study.toml"
    study.write_text(STUDY)
    r = tokenrec("generate", "--config", "configs/tiny.toml", "--days", "2026-01-01..2026-01-04", "--out", str(data))
    assert r.returncode == 0, r.stderr[-3000:]
    args = ("tune", "--config", "configs/tiny.toml", "--study", str(study), "--data", str(data), "--workdir", str(work))
    r = tokenrec(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    out = work / "studies" / "tiny"
    assert sorted(p.stem for p in (out / "jobs").glob("*.json")) == [
        "seed-dlrm-1", "seed-tokenformer-1", "trial-dlrm-0", "trial-tokenformer-0"]
    summary = json.loads((out / "summary.json").read_text())
    tf = summary["towers"]["tokenformer"]
    assert tf["click"]["auc"]["n"] == 1 and 0.5 < tf["click"]["auc"]["mean"] < 1.0
    assert len(tf["effective_rank"]) == 4  # one per layer (2 full + 2 sliding)
    assert "effective_rank" not in summary["towers"]["dlrm"]
    assert tf["train_flops_per_example"] > tf["forward_flops_per_example"] > 0 and tf["dense_params"] > 0
    (pair,) = summary["pairs"]
    assert pair["seeds"] == [1] and pair["metric"] == "test_auc"
    trial = json.loads((out / "jobs" / "trial-tokenformer-0.json").read_text())
    best = tomllib.loads((out / "best" / "tokenformer.toml").read_text())
    assert best["train"]["sharding"]["dense_lr"] == trial["job"]["settings"]["train.sharding.dense_lr"]
    assert best["model"]["tokenformer"]["windows"] == [6, 3]
    seed = json.loads((out / "jobs" / "seed-tokenformer-1.json").read_text())
    assert {"validation_auc", "test_auc", "test_rows"} <= set(seed["metrics"]) and "eval_auc" not in seed["metrics"]

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tokenrec")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`tokenrec.study_parent` = 'tiny'")
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 4 and {c.data.tags["tokenrec.study_job"] for c in children} >= {"seed-dlrm-1"}
    assert client.get_run(children[0].info.run_id).data.params["train.eval_ranges.test"] == "+2"
    for child in children:  # every trial's run keeps its library output, as `tokenrec train` runs do
        run_log = work / "runs" / child.info.run_id / "run.log"
        assert run_log.exists() and run_log.stat().st_size > 0, run_log
        assert "logs/run.log" in {f.path for f in client.list_artifacts(child.info.run_id, "logs")}

    # an interrupted study: one seed run's result is missing; the rerun runs only that one
    (out / "jobs" / "seed-tokenformer-1.json").unlink()
    r = tokenrec(*args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "trials: 2 of 2 done before, 0 to run" in r.stdout
    assert "seeds: 1 of 2 done before, 1 to run" in r.stdout
    assert (out / "jobs" / "seed-tokenformer-1.json").exists()
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) == 5  # the same parent run, one more child

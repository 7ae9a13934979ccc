"""Daily incremental training against a real MLflow SQLite registry, real Ray, real Parquet.

One registry lives through the whole scenario (each step depends on the one before):
day 1 (cold) → champion; day 1 again → skipped; day 2 warm-starts from the champion; a model
trained on shuffled labels is kept out by the gate (and by ``promote``) but can be forced in with
``--no-gate``, and ``rollback`` restores the previous champion; a backfill stops at a day whose
evaluation data is missing, with a report, and continues from there when rerun."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from mlflow.tracking import MlflowClient

from jobs.config import load_config
from jobs.daily import BackfillError, DailyRequest, run_backfill, run_daily
from jobs.registry import Registry
from pipeline.days import parse_days
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs/tiny.toml"
MANAGED = ["schema.tables.user.managed_collision=true", "schema.tables.item.managed_collision=true"]
# user and item ids get managed-collision rows; a one-day tiny model is poorly calibrated (0.79
# seen), so the band is wide here: the gate must reject on AUC/logloss below
CFG = load_config(TINY, MANAGED + ["gate.calibration_band=[0.5, 2.0]"])


def scored(version, day: str, metric: str = "eval_auc") -> float:
    """The gate's cached score of a version on a day (tag tokenrec.eval.<day>.<root>.<metric>)."""
    (value,) = [v for k, v in version.tags.items() if k.startswith(f"tokenrec.eval.{day}.") and k.endswith(metric)]
    return float(value)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def roots(tmp_path_factory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("daily")
    data, shuffled = base / "data", base / "shuffled"
    generate(CFG.schema, CFG.generator, data, parse_days("2026-01-01..2026-01-04"), log=lambda *_: None)
    shutil.copytree(data, shuffled)
    rng = np.random.default_rng(0)
    for f in (shuffled / "day=2026-01-03").glob("*.parquet"):
        t = pq.read_table(f)
        labels = t.column("click").to_numpy()
        t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(rng.permutation(labels)))
        pq.write_table(t, f)
    yield data, shuffled
    ray.shutdown()


def test_daily_gate_promote_rollback_backfill(roots, tmp_path: Path) -> None:
    data, shuffled = roots
    work = tmp_path / "work"
    req = DailyRequest(data_root=data, workdir=work)
    quiet = lambda *_: None  # noqa: E731
    flags = ["--config", str(TINY), "--workdir", str(work), "--set", "gate.calibration_band=[0.5, 2.0]"]

    d1 = run_daily(CFG, "2026-01-01", req, log=quiet)
    assert d1["promoted"] and d1["parent_version"] is None
    reg = Registry(MlflowClient(d1["tracking_uri"]), CFG.tracking.model_name)
    assert reg.champion() == d1["model_version"] == 1
    v1 = reg.version(1)
    assert v1.tags["tokenrec.rows_in"] == str(d1["rows_in"]) and v1.tags["tokenrec.eval_day"] == "2026-01-02"
    assert scored(v1, "2026-01-02") > 0.6  # the gate's own scoring

    again = run_daily(CFG, "2026-01-01", req, log=quiet)
    assert again["skipped"] and len(reg.versions()) == 1

    d2 = run_daily(CFG, "2026-01-02", req, log=quiet)
    assert d2["parent_version"] == 1 and d2["model_version"] == 2
    run2_metrics = reg.client.get_run(d2["run_id"]).data.metrics
    v1_on_day3 = scored(reg.version(1), "2026-01-03")
    assert run2_metrics["gate_champion_eval_auc"] == pytest.approx(v1_on_day3, abs=1e-5)
    # the gate's scoring of the new model agrees with the workers' sharded evaluation of it
    assert run2_metrics["gate_eval_auc"] == pytest.approx(run2_metrics["eval_auc"], abs=1e-4)
    run2 = reg.client.get_run(d2["run_id"]).data.tags
    assert run2["tokenrec.init_from"] == reg.run_tags(1)["tokenrec.checkpoint"]
    assert run2["tokenrec.daily_date"] == "2026-01-02" and reg.version(2).tags["tokenrec.parent_version"] == "1"
    # new users and items arrive every day: the managed tables admit them, occupancy grows
    assert d2["mc_user_ids"] > d1["mc_user_ids"] > 0 and d2["mc_item_ids"] > d1["mc_item_ids"] > 0
    assert 0 < d1["mc_user_occupancy"] < d2["mc_user_occupancy"] < 1
    assert d1["mc_user_occupancy"] == d1["mc_user_ids"] / 1000 and d2["mc_item_occupancy"] == d2["mc_item_ids"] / 500
    assert 0 <= d1["mc_user_eval_collision_rate"] < 0.5 and d1["mc_user_train_collision_rate"] < 0.5
    champion = reg.champion()
    assert champion in (1, 2)
    assert (champion == 2) == d2["promoted"]

    # A model trained from scratch on shuffled labels: the gate keeps the champion.
    bad = run_daily(CFG, "2026-01-03", DailyRequest(data_root=shuffled, workdir=work, cold_start=True), log=quiet)
    assert bad["model_version"] == 3 and not bad["promoted"]
    assert reg.champion() == champion and reg.alias("challenger") == 3
    assert "below champion" in reg.version(3).tags["tokenrec.gate"]
    assert "Gate → **challenger**" in reg.version(3).description and "below champion" in reg.version(3).description
    assert scored(reg.version(3), "2026-01-04") < 0.6

    r = cli("promote", "--version", "3", *flags)
    assert r.returncode == 2 and "gate kept the champion" in r.stderr, r.stderr[-2000:]
    assert reg.champion() == champion
    r = cli("promote", "--version", "3", "--no-gate", *flags)
    assert r.returncode == 0, r.stderr[-2000:]
    assert reg.champion() == 3
    r = cli("rollback", *flags)
    assert r.returncode == 0 and f"to version {champion}" in r.stdout, r.stdout + r.stderr[-2000:]
    assert reg.champion() == champion and "tokenrec.rolled_back" in reg.version(3).tags
    r = cli("models", "--json", *flags)
    rows = {row["version"]: row for row in json.loads(r.stdout)}
    assert sorted(rows) == [1, 2, 3] and rows[champion]["aliases"] == "champion"
    assert rows[2]["parent"] == "1" and rows[3]["aliases"] == ""  # promoted, then rolled back
    assert rows[1]["tower"] == CFG.model.tower and rows[1]["seed"] == "0" and float(rows[1]["gauc"]) > 0.5
    assert float(rows[1]["rows_per_s"]) > 0
    # each version's MLflow page says what it was trained on, from which parent, and the gate's call
    assert "warm-started from version 1" in reg.version(2).description
    assert "Gate → **champion**: promoted by hand with --no-gate" in reg.version(3).description  # the last call
    r = cli("models", "--model-name", "someone-elses-model", *flags)  # another model: named, not the config's
    assert r.returncode == 0 and "model 'someone-elses-model' has no versions yet" in r.stdout
    assert CFG.tracking.model_name in r.stdout  # … and the models that do exist are listed

    # Backfill: days 1-3 are done (skipped); day 4 needs day 5 to evaluate, which is missing.
    with pytest.raises(BackfillError) as err:
        run_backfill(CFG, "2026-01-01..2026-01-04", req, log=quiet)
    msg = str(err.value)
    assert "stopped at 2026-01-04" in msg and "day=2026-01-05" in msg and "2026-01-03 (v3)" in msg
    assert len(reg.versions()) == 3  # nothing trained or registered twice
    generate(CFG.schema, CFG.generator, data, parse_days("2026-01-05"), log=quiet)
    done = run_backfill(CFG, "2026-01-01..2026-01-04", req, log=quiet)
    assert [r["skipped"] for r in done] == [True, True, True, False]
    parent = reg.history()[-2] if done[-1]["promoted"] else reg.champion()
    assert done[-1]["model_version"] == 4 and done[-1]["parent_version"] == parent

"""Issue 19 end to end: the examples that went wrong, replayed through `tokenrec train` and
`tokenrec score` on the tiny world with string user ids. A day holds a file whose ``item_id`` is
``uint64`` with ids ≥ 2^63, a user id with bytes that are not UTF-8, a file in a sub-folder
(``hour=23/``), Spark's ``_SUCCESS`` marker and a stray CSV. The job finishes; every row is
trained or quarantined with its reason (``rows_in = rows_trained + rows_quarantined``); the
sub-folder's rows are counted; the CSV is named; scoring reads the same files. The evaluation
day has one class (every click 0): the run warns, and the gate refuses for that reason."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.toml"


def _string_user_config(tmp_path: Path) -> Path:
    """tiny.toml with string user ids (the column and its sparse field)."""
    text = TINY.read_text()
    text = text.replace('user_id = "user_id"\n', 'user_id = "user_id"\nuser_id_type = "string"\n', 1)
    field = 'name = "user_id"\ntable = "user"\n'
    text = text.replace(field, field + 'raw_type = "string"\n', 1)
    assert text.count('"string"') == 2, "configs/tiny.toml changed: update this test's edits"
    path = tmp_path / "tiny_string_users.toml"
    path.write_text(text)
    return path


def tokenrec(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=900)


def _wild(day: Path) -> None:
    """Rewrite a generated day as the wild writers would (see the module docstring)."""
    (first, second) = sorted(day.glob("*.parquet"))
    t = pq.read_table(first)
    raw = [f"user-{v}".encode() for v in t.column("user_id").to_pylist()]
    raw[5] = b"user-\xff\xfe"  # stray bytes: not UTF-8
    binary = pa.array(raw, pa.binary())
    users = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())
    items = t.column("item_id").to_numpy().view(np.uint64) | np.uint64(1 << 63)  # ≥ 2^63 as uint64
    t = t.set_column(t.column_names.index("user_id"), "user_id", users)
    t = t.set_column(t.column_names.index("item_id"), "item_id", pa.array(items, pa.uint64()))
    pq.write_table(t, first)
    s = pq.read_table(second)
    s = s.set_column(s.column_names.index("user_id"), "user_id",
                     pa.array([f"user-{v}" for v in s.column("user_id").to_pylist()], pa.large_string()))
    (day / "hour=23").mkdir()
    pq.write_table(s, day / "hour=23" / second.name)
    second.unlink()
    (day / "_SUCCESS").write_text("")
    (day / "export.csv").write_text("a,b\n")


def test_wild_inputs_train_and_score(tmp_path: Path) -> None:
    data, work = tmp_path / "logs", tmp_path / "work"
    r = tokenrec("generate", "--config", str(TINY), "--days", "2026-01-01..2026-01-02", "--out", str(data))
    assert r.returncode == 0, r.stderr
    for day in ("2026-01-01", "2026-01-02"):
        _wild(data / f"day={day}")
    for path in (data / "day=2026-01-02").rglob("*.parquet"):  # the evaluation day: one class
        t = pq.read_table(path)
        pq.write_table(t.set_column(t.column_names.index("click"), "click", pa.array([0.0] * t.num_rows, pa.float32())),
                       path)
    r = tokenrec("train", "--config", str(_string_user_config(tmp_path)), "--days", "2026-01-01",
                 "--data", str(data), "--workdir", str(work))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stdout + r.stderr
    assert "1 file(s) under" in r.stdout and "export.csv" in r.stdout  # said, not silently skipped
    assert "warning: every 'click' label of the eval rows is 0" in r.stdout  # kind 5
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tokenrec").experiment_id])
    m = run.data.metrics
    assert m["rows_in"] == 4000  # both files, the sub-folder's included
    assert m["rows_quarantined"] == 1 and m["rows_in"] == m["rows_trained"] + m["rows_quarantined"]
    reasons = client.download_artifacts(run.info.run_id, "quarantine/reasons.json", str(tmp_path))
    assert "invalid UTF-8 in 'user_id'" in Path(reasons).read_text()

    promote = tokenrec("promote", "--version", "1", "--workdir", str(work),
                       "--config", str(_string_user_config(tmp_path)))
    assert promote.returncode == 2 and "every label is one class" in promote.stderr, promote.stderr[-2000:]
    assert "calibration" not in promote.stderr.split("gate kept the champion:")[1].split(";")[0]

    out = tmp_path / "scores"
    r = tokenrec("score", "--model", "models:/tokenrec-ranker/1", "--data", str(data), "--days", "2026-01-02",
                 "--out", str(out), "--workdir", str(work), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    scored = pq.read_table(sorted(out.glob("*.parquet")))
    assert scored.num_rows == 4000 - 1  # every row but the one with stray bytes

"""Bad input and failure handling that needs no cluster: id ranges, duplicates, over-long
sequences, unknown columns, empty and missing days, checkpoint metadata that would unpickle code,
tracking retries and an unreachable tracking server (docs/reliability.md)."""

from __future__ import annotations

import os
import pickle
import socket
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from mlflow.tracking import MlflowClient

from embedding.schema import FeatureSchema, load_schema
from jobs import checkpoint
from jobs.tracking import RetryingClient, StepLogger, connect, log_metrics, with_retries
from pipeline.collate import collate_blocks
from pipeline.days import day_files, parse_days
from pipeline.generator import GeneratorConfig, generate
from pipeline.row_hash import DuplicateFinder, row_hashes
from pipeline.validate import REASON, SchemaMismatchError, check_files, split_valid, to_canonical

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("logs")
    generate(SCHEMA, GeneratorConfig(seed=5, rows_per_day=50, files_per_day=1, num_users=10, num_items=8,
                                     num_categories=2), root, parse_days("2026-01-01..2026-01-02"),
             log=lambda *_: None)
    return root


def _table(logs: Path) -> pa.Table:
    return pq.read_table(next((logs / "day=2026-01-01").glob("*.parquet")))


def _with_range(lo: int, hi: int) -> FeatureSchema:
    d = SCHEMA.to_dict()
    for f in d["sparse"]:
        if f["name"] in ("item_id", "item_tags"):
            f["id_range"] = [lo, hi]
    return FeatureSchema.from_dict(d)


def test_ids_outside_the_schema_range_are_quarantined(logs: Path) -> None:
    t = _table(logs)
    ids, tags = t.column("item_id").to_pylist(), t.column("item_tags").to_pylist()
    lo, hi = min(ids + sum(tags, [])), max(ids + sum(tags, []))  # the generator's raw ids fit
    schema = _with_range(lo, hi)
    ids[2], ids[5] = lo - 1, hi + 1
    tags[7] = tags[7] + [lo - 3]
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(ids, pa.int64()))
    t = t.set_column(t.schema.get_field_index("item_tags"), "item_tags", pa.array(tags, pa.list_(pa.int64())))
    good, bad = split_valid(t, schema)
    assert good.num_rows + bad.num_rows == t.num_rows and bad.num_rows == 3
    reasons = bad.column(REASON).to_pylist()
    assert reasons[:2] == [f"id out of range in 'item_id' (allowed {lo}..{hi})"] * 2
    assert reasons[2].startswith("id out of range in 'item_tags'")
    assert FeatureSchema.from_dict(schema.to_dict()).sparse == schema.sparse  # round trip keeps it
    assert SCHEMA.fingerprint() == FeatureSchema.from_dict(SCHEMA.to_dict()).fingerprint()
    d = SCHEMA.to_dict()
    d["sparse"][0]["id_range"] = [5, 1]
    with pytest.raises(ValueError, match=r"schema.sparse 'user_id'.id_range: expected \[lo, hi\]"):
        FeatureSchema.from_dict(d)


def test_duplicated_rows_are_quarantined_once_across_blocks(logs: Path) -> None:
    t = _table(logs)
    finder = DuplicateFinder()
    first = finder(t.slice(0, 30))
    second_block = pa.concat_tables([t.slice(30, 20), t.slice(3, 2), t.slice(40, 1)])  # 3 repeats
    dup = finder(second_block)
    assert not first.any() and dup.tolist() == [False] * 20 + [True] * 3
    good, bad = split_valid(second_block, SCHEMA, duplicate=dup)
    assert good.num_rows == 20 and set(bad.column(REASON).to_pylist()) == {
        "duplicate row (the same values as an earlier row of this file)"}


def test_row_hashes_tell_values_nulls_and_columns_apart() -> None:
    t = pa.table({"a": pa.array([1, 1, 2, None, 0, 1], pa.int64()),
                  "b": pa.array([0, 0, 0, 0, 0, None], pa.int64()),
                  "x": pa.array([0.5, 0.5, 0.5, 0.5, 0.5, 0.5], pa.float32()),
                  "s": ["u", "u", "u", "u", "u", "u"]})
    h = row_hashes(t, ["a", "b", "x", "s"]).tolist()
    assert h[0] == h[1]  # equal rows
    assert len({h[0], h[2], h[3], h[4], h[5]}) == 5  # a value, a null, 0 and a null elsewhere differ
    swapped = pa.table({"a": [0], "b": [1], "x": pa.array([0.5], pa.float32()), "s": ["u"]})
    assert row_hashes(swapped, ["a", "b", "x", "s"])[0] != h[4]  # b = 1 vs b = 0
    ab = pa.table({"a": [1], "b": [2]})
    assert row_hashes(ab, ["a", "b"])[0] != row_hashes(ab, ["b", "a"])[0]  # order matters
    floats = pa.table({"x": pa.array([0.1, 0.1, 0.2], pa.float64())})
    assert row_hashes(floats, ["x"]).tolist()[:2] == [row_hashes(floats, ["x"])[0]] * 2
    assert row_hashes(floats, ["x"])[0] != row_hashes(floats, ["x"])[2]


def overlong_rows(t: pa.Table, schema) -> int:
    return sum(n for _, n in collate_blocks([t], schema, t.num_rows))


def test_overlong_sequences_are_counted(logs: Path) -> None:
    t = to_canonical(_table(logs), SCHEMA)
    q = SCHEMA.sequences[0]
    lens = [len(x) for x in t.column(q.columns[0]).to_pylist()]
    assert overlong_rows(t, SCHEMA) == sum(n > q.max_len for n in lens)
    long = [list(range(q.max_len + 3))] * t.num_rows
    for col in q.columns:
        t = t.set_column(t.schema.get_field_index(col), col, pa.array(long, pa.list_(pa.int64())))
    assert overlong_rows(t, SCHEMA) == t.num_rows


def test_unknown_columns_warn_or_stop(logs: Path, tmp_path: Path) -> None:
    t = _table(logs).append_column("colour", pa.array(["red"] * 50))
    pq.write_table(t, tmp_path / "a.parquet")
    printed = []
    assert check_files([tmp_path / "a.parquet"], SCHEMA, "warn", printed.append) == 50
    assert "colour (1 files)" in printed[0] and "p_true (1 files)" in printed[0]
    with pytest.raises(SchemaMismatchError, match=r"a.parquet: column '(colour|p_true)' is not in the schema"):
        check_files([tmp_path / "a.parquet"], SCHEMA, "error")


def test_empty_day_counts_zero_and_a_missing_day_is_named(logs: Path, tmp_path: Path) -> None:
    empty = tmp_path / "day=2026-01-03"
    empty.mkdir()
    pq.write_table(_table(logs).slice(0, 0), empty / "part-0.parquet")
    assert check_files(day_files(tmp_path, parse_days("2026-01-03")), SCHEMA) == 0
    (tmp_path / "day=2026-01-04").mkdir()
    with pytest.raises(FileNotFoundError, match="day=2026-01-04 holds no"):
        day_files(tmp_path, parse_days("2026-01-04"))
    with pytest.raises(FileNotFoundError, match="day=2026-01-05 does not exist"):
        day_files(tmp_path, parse_days("2026-01-05"))


def test_corrupt_parquet_stops_before_training(logs: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"PAR1 not really parquet")
    with pytest.raises(SchemaMismatchError, match="broken.parquet: not a readable Parquet file"):
        check_files([bad], SCHEMA)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))


def test_checkpoint_metadata_that_would_run_code_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "good"
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(good))
    checkpoint.verify_metadata(good)  # real DCP metadata passes
    evil = tmp_path / "evil"
    evil.mkdir()
    _Evil.marker = tmp_path / "pwned"
    (evil / ".metadata").write_bytes(pickle.dumps(_Evil()))
    (evil / "meta.json").write_text('{"step": 1, "world_size": 1}')
    with pytest.raises(checkpoint.UnsafeCheckpointError, match="would unpickle 'posix.system'"):
        checkpoint.load(evil, torch.nn.Linear(2, 2))
    assert not _Evil.marker.exists()


class _Flaky:
    """A real MLflow client whose ``log_batch`` fails ``failures`` times first."""

    def __init__(self, client: MlflowClient, failures: int, error: Exception) -> None:
        self.client, self.failures, self.error, self.calls = client, failures, error, 0

    @property
    def tracking_uri(self) -> str:
        return self.client.tracking_uri

    def log_batch(self, *args, **kwargs):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.client.log_batch(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.client, name)


def test_transient_tracking_failures_are_retried(tmp_path: Path) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.create_run(client.create_experiment("retry"))
    flaky = _Flaky(client, 2, ConnectionError("Connection refused"))
    log_metrics(RetryingClient(flaky, base_delay=0.01), run.info.run_id, {"auc": 0.7})
    assert flaky.calls == 3 and client.get_run(run.info.run_id).data.metrics["auc"] == 0.7
    permanent = _Flaky(client, 1, ValueError("INVALID_PARAMETER_VALUE: bad metric"))
    with pytest.raises(ValueError):
        with_retries(permanent.log_batch, run.info.run_id, what="x", base_delay=0.01)
    assert permanent.calls == 1  # not transient: no retry


def test_step_logger_never_stops_training(monkeypatch, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = StepLogger(f"http://127.0.0.1:{port}", "0" * 32, attempts=2, base_delay=0.01)
    t0 = time.perf_counter()
    logger.log(5, {"train_loss": 0.5})  # returns at once: the send runs on the logger's thread
    assert time.perf_counter() - t0 < 0.5
    logger.close()  # waits for the retries to give up
    assert logger.dropped == 1 and "step 5 metrics not logged" in capsys.readouterr().err


def test_unreachable_tracking_server_fails_fast_without_credentials(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match=r"cannot reach the MLflow tracking server at http://\*\*\*@127") as e:
        connect(f"http://alice:s3cret@127.0.0.1:{port}", "x", tmp_path)
    assert "s3cret" not in str(e.value) and "Nothing was trained" in str(e.value)


def test_no_torch_load_of_pickles_in_the_code() -> None:
    """Every torch.load in the shipped code is weights_only=True (models, checkpoints, RNG)."""
    hits = []
    for folder in ("jobs", "deploy", "model", "embedding", "pipeline"):
        for path in (ROOT / folder).rglob("*.py"):
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line:
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, hits


def test_label_outside_0_1_and_null_id_are_quarantined(logs: Path) -> None:
    t = _table(logs)
    click = t.column("click").to_pylist()
    click[1] = 2.0
    item = t.column("item_id").to_pylist()
    item[4] = None
    t = t.set_column(t.schema.get_field_index("click"), "click", pa.array(click, t.schema.field("click").type))
    t = t.set_column(t.schema.get_field_index("item_id"), "item_id", pa.array(item, pa.int64()))
    good, bad = split_valid(t, SCHEMA)
    assert good.num_rows == t.num_rows - 2
    assert bad.column(REASON).to_pylist() == ["label 'click' not 0 or 1", "null id 'item_id'"]

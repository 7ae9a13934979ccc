"""Row-level problems are quarantined with a reason; schema-level problems stop with the file
and column named."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from embedding.schema import load_schema
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate
from pipeline.validate import (
    REASON,
    QuarantineWriter,
    SchemaMismatchError,
    check_files,
    count_quarantined,
    split_valid,
)

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> pa.Table:
    root = tmp_path_factory.mktemp("v")
    generate(SCHEMA, GeneratorConfig(seed=2, rows_per_day=200, files_per_day=1, num_users=50,
                                     num_items=40, num_categories=4),
             root, parse_days("2026-01-01"), log=lambda *_: None)
    return pq.read_table(next(root.glob("day=*/*.parquet")))


def _set(table: pa.Table, col: str, row: int, value) -> pa.Table:
    values = table.column(col).to_pylist()
    values[row] = value
    return table.set_column(table.schema.get_field_index(col), col,
                            pa.array(values, table.schema.field(col).type))


def test_bad_rows_get_their_reason_and_nothing_is_lost(clean: pa.Table) -> None:
    t = _set(clean, "click", 3, None)
    t = _set(t, "dense_0", 5, float("nan"))
    t = _set(t, "dense_1", 7, float("inf"))
    t = _set(t, "hist_item_id", 9, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17])
    good, bad = split_valid(t, SCHEMA)
    assert good.num_rows + bad.num_rows == t.num_rows
    reasons = dict(zip(bad.column("ts").to_pylist(), bad.column(REASON).to_pylist()))
    ts = t.column("ts").to_pylist()
    assert reasons == {
        ts[3]: "null label 'click'",
        ts[5]: "NaN or inf dense 'dense_0'",
        ts[7]: "NaN or inf dense 'dense_1'",
        ts[9]: "misaligned sequence 'hist': 'hist_category' length differs from 'hist_item_id'",
    }


def test_quarantine_writer_is_idempotent_per_block(clean: pa.Table, tmp_path: Path) -> None:
    t = _set(clean, "click", 0, None)
    w = QuarantineWriter(SCHEMA, str(tmp_path))
    assert w(t).num_rows == t.num_rows - 1
    w(t)  # the same block again (a second epoch, a retried task): same file, not a second copy
    assert count_quarantined(tmp_path) == (1, {"null label 'click'": 1})


def test_type_mismatch_stops_with_file_and_column(clean: pa.Table, tmp_path: Path) -> None:
    t = clean.set_column(clean.schema.get_field_index("ctx_1"), "ctx_1",
                         clean.column("ctx_1").cast(pa.string()))
    pq.write_table(clean, tmp_path / "ok.parquet")
    pq.write_table(t, tmp_path / "bad.parquet")
    assert check_files([tmp_path / "ok.parquet"], SCHEMA) == clean.num_rows
    with pytest.raises(SchemaMismatchError, match=r"bad\.parquet: column 'ctx_1' has type string"):
        check_files([tmp_path / "ok.parquet", tmp_path / "bad.parquet"], SCHEMA)
    pq.write_table(clean.drop_columns(["dense_1"]), tmp_path / "missing.parquet")
    with pytest.raises(SchemaMismatchError, match=r"missing\.parquet: column 'dense_1' is missing"):
        check_files([tmp_path / "missing.parquet"], SCHEMA)


def test_null_element_in_a_sequence_is_caught_even_beside_a_null_list(clean: pa.Table) -> None:
    t = _set(clean, "hist_item_id", 0, None)  # a null list in one row …
    hist = t.column("hist_category").to_pylist()
    hist[1] = [None] + hist[1][1:]  # … must not hide a null element in another
    t = t.set_column(t.schema.get_field_index("hist_category"), "hist_category",
                     pa.array(hist, pa.list_(pa.int64())))
    good, bad = split_valid(t, SCHEMA)
    assert good.num_rows == t.num_rows - 2
    assert sorted(bad.column(REASON).to_pylist()) == [
        "null element in sequence 'hist_category'", "null sequence list 'hist_item_id'"]


def test_blocks_with_identical_bad_rows_keep_separate_files(clean: pa.Table, tmp_path: Path) -> None:
    bad_row = _set(clean.slice(0, 1), "click", 0, None)
    w = QuarantineWriter(SCHEMA, str(tmp_path))
    w(pa.concat_tables([bad_row, clean.slice(1, 5)]))
    w(pa.concat_tables([bad_row, clean.slice(6, 5)]))  # same bad row, another block
    assert count_quarantined(tmp_path)[0] == 2


def test_accepted_widths_are_cast_to_one_schema(clean: pa.Table) -> None:
    from pipeline.validate import canonical_schema, to_canonical

    t = clean.set_column(clean.schema.get_field_index("dense_0"), "dense_0",
                         clean.column("dense_0").cast(pa.float64()))
    small = pa.array([v % 1000 for v in t.column("ctx_0").to_pylist()], pa.int32())
    t = t.set_column(t.schema.get_field_index("ctx_0"), "ctx_0", small)
    assert to_canonical(t, SCHEMA).schema == to_canonical(clean, SCHEMA).schema == canonical_schema(SCHEMA)

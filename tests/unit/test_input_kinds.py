"""Issue 19: the same logical column in every physical typing a common writer produces trains,
scores and serves alike; values that cannot be read as their kind quarantine their row with a
reason; a file whose column name repeats is refused naming it.

Kinds covered: integer ids of any width and signedness (uint64 ids ≥ 2^63 keep their 64 bits),
dictionary-encoded columns, large_string / large_list / fixed layouts, ``list<null>`` (pandas'
type for all-empty lists) and ``null`` (all-null) columns, boolean labels, string ids that are
not valid UTF-8, repeated column names (files and serving requests)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.config import load_config
from pipeline.days import parse_days
from pipeline.generator import generate
from pipeline.row_hash import DuplicateFinder
from pipeline.validate import (
    REASON,
    QuarantineWriter,
    SchemaMismatchError,
    check_files,
    normalize,
    split_valid,
    to_canonical,
)

ROOT = Path(__file__).resolve().parents[2]
CFG = load_config(ROOT / "configs/tiny.toml", ["generator.rows_per_day=40", "generator.files_per_day=1"])
SCHEMA = CFG.schema


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> pa.Table:
    """A generated day with ids small enough for every integer width (ids mod 100)."""
    out = tmp_path_factory.mktemp("kinds")
    generate(SCHEMA, CFG.generator, out, parse_days("2026-01-01"), log=lambda *_: None)
    t = pq.read_table(next(out.glob("day=*/*.parquet")))
    for i, field in enumerate(t.schema):
        if field.name in ("ts", "p_true"):
            continue
        if pa.types.is_integer(field.type):
            t = t.set_column(i, field.name, pa.array(np.abs(t.column(i).to_numpy()) % 100))
        elif pa.types.is_list(field.type):
            col = t.column(i).combine_chunks()
            t = t.set_column(i, field.name, pa.ListArray.from_arrays(
                col.offsets, pa.array(np.abs(col.values.to_numpy()) % 100)))
    return t.drop_columns(["p_true"])


def _canonical(table: pa.Table) -> pa.Table:
    good, bad = split_valid(table, SCHEMA, duplicate=DuplicateFinder()(normalize(table, SCHEMA)[0]))
    assert bad.num_rows == 0, bad.column(REASON).to_pylist()[:3]
    return to_canonical(good, SCHEMA)


def _set(table: pa.Table, name: str, col) -> pa.Table:
    return table.set_column(table.column_names.index(name), name, col)


INT_TYPES = [pa.int8(), pa.int16(), pa.int32(), pa.int64(), pa.uint8(), pa.uint16(), pa.uint32(), pa.uint64()]


def _retype_int(col: pa.ChunkedArray, how: tuple) -> pa.ChunkedArray | pa.Array:
    width, dictionary = how
    out = col.cast(width)
    return out.dictionary_encode() if dictionary else out


def _retype_list(col: pa.ChunkedArray, how: tuple) -> pa.Array:
    width, layout = how
    arr = col.combine_chunks()
    values = arr.values.cast(width)
    plain = pa.ListArray.from_arrays(arr.offsets, values)
    return plain.cast(pa.large_list(width)) if layout == "large" else plain


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_physical_typing_of_the_same_values_gives_the_same_canonical_rows(logs, data) -> None:
    """The property: retype each integer and list column to any width / signedness /
    dictionary / list layout a writer may choose; the canonical rows are the int64 ones."""
    want = _canonical(logs)
    table = logs
    for field in logs.schema:
        if field.name == "ts":
            continue
        if pa.types.is_integer(field.type):
            how = data.draw(st.tuples(st.sampled_from(INT_TYPES), st.booleans()), label=field.name)
            table = _set(table, field.name, _retype_int(logs.column(field.name), how))
        elif pa.types.is_list(field.type):
            how = data.draw(st.tuples(st.sampled_from(INT_TYPES), st.sampled_from(["plain", "large"])),
                            label=field.name)
            table = _set(table, field.name, _retype_list(logs.column(field.name), how))
    assert _canonical(table).equals(want)


def test_uint64_ids_at_or_above_2_63_are_their_64_bits(logs, tmp_path) -> None:
    """A hash written as uint64 is the same id as the int64 of the same bits, through the footer
    check, validation, the canonical cast and the quarantine writer (kind 1)."""
    big = np.array([(1 << 63) + 7, (1 << 64) - 1] + [5] * (logs.num_rows - 2), dtype=np.uint64)
    as_u64 = _set(logs, "item_id", pa.array(big, pa.uint64()))
    as_i64 = _set(logs, "item_id", pa.array(big.view(np.int64), pa.int64()))
    pq.write_table(as_u64, tmp_path / "u64.parquet")
    assert check_files([tmp_path / "u64.parquet"], SCHEMA, unknown="error") == logs.num_rows
    got = _canonical(as_u64)
    assert got.equals(_canonical(as_i64))
    assert got.column("item_id")[0].as_py() == -(1 << 63) + 7 and got.column("item_id")[1].as_py() == -1
    out = QuarantineWriter(SCHEMA, str(tmp_path / "q"))(normalize(as_u64, SCHEMA)[0])
    assert out.num_rows == logs.num_rows and not (tmp_path / "q").exists()


def test_all_empty_and_all_null_columns_are_read_by_their_shape(logs, tmp_path) -> None:
    """pandas types a column whose every list is empty ``list<null>`` and an all-None column
    ``null``: the first is valid (empty lists), the second quarantines every row as a null id —
    neither stops the job (kind 2)."""
    frame = logs.to_pandas()
    frame["item_tags"] = [[] for _ in range(len(frame))]
    for col in ("hist_item_id", "hist_category"):
        frame[col] = [[] for _ in range(len(frame))]
    empty = pa.Table.from_pandas(frame, preserve_index=False)
    assert str(empty.schema.field("item_tags").type) == "list<item: null>"
    pq.write_table(empty, tmp_path / "empty.parquet")
    check_files([tmp_path / "empty.parquet"], SCHEMA, unknown="error")
    got = _canonical(empty)
    assert got.num_rows == logs.num_rows and got.schema.field("item_tags").type == pa.list_(pa.int64())
    assert all(len(v) == 0 for v in got.column("hist_item_id").to_pylist())

    nulls = _set(logs, "item_category", pa.nulls(logs.num_rows))
    pq.write_table(nulls, tmp_path / "nulls.parquet")
    check_files([tmp_path / "nulls.parquet"], SCHEMA, unknown="error")
    good, bad = split_valid(nulls, SCHEMA)
    assert good.num_rows == 0 and set(bad.column(REASON).to_pylist()) == {"null id 'item_category'"}


def test_boolean_labels_are_0_and_1(logs) -> None:
    as_bool = _set(logs, "click", logs.column("click").cast(pa.bool_()))
    assert _canonical(as_bool).column("click").equals(_canonical(logs).column("click"))


def test_invalid_utf8_quarantines_the_row_with_its_bytes(logs, tmp_path) -> None:
    """One string id with stray bytes: that row is quarantined with a reason naming the column,
    its bytes kept in the quarantine file; the other rows go on (kind 3)."""
    schema = load_config(ROOT / "configs/tiny.toml", ['schema.user_id_type="string"']).schema
    raw = [f"u{i}".encode() for i in range(logs.num_rows)]
    raw[3] = b"bad\xff\xfe"
    for kind, (binary_type, string_type) in {"string": (pa.binary(), pa.string()),
                                             "large_string": (pa.large_binary(), pa.large_string())}.items():
        binary = pa.array(raw, binary_type)
        users = pa.Array.from_buffers(string_type, len(binary), binary.buffers())
        table = normalize(_set(logs, "user_id", users), schema)[0]
        writer = QuarantineWriter(schema, str(tmp_path / kind))
        out = writer(table, DuplicateFinder()(table))
        assert out.num_rows == logs.num_rows - 1, kind
        (part,) = (tmp_path / kind).glob("part-*.parquet")
        bad = pq.read_table(part)
        assert bad.column(REASON).to_pylist() == ["invalid UTF-8 in 'user_id'"]
        assert bad.column("user_id").cast(pa.binary()).to_pylist() == [b"bad\xff\xfe"]


def test_a_repeated_column_is_named_as_repeated(logs, tmp_path) -> None:
    """Not 'column is missing' (kind 4): the footer check and a serving request both name it."""
    from deploy.export import RequestError, check_request

    pq.write_table(logs.append_column("item_id", logs.column("item_id")), tmp_path / "dup.parquet")
    with pytest.raises(SchemaMismatchError, match=r"dup.parquet: column\(s\) \['item_id'\] appear more than once"):
        check_files([tmp_path / "dup.parquet"], SCHEMA)
    request = logs.drop_columns(["click"]).slice(0, 2)
    with pytest.raises(RequestError, match=r"column\(s\) \['item_id'\] more than once"):
        check_request(request.append_column("item_id", request.column("item_id")), SCHEMA, 10)


def test_serving_requests_of_any_typing_are_scored_alike(logs, tmp_path) -> None:
    """The serving path (``check_request``): a cold-start request — a new user, empty history
    lists, pandas' ``list<null>`` — is scored, as are uint64 and small-int ids (kind 2 in
    serving, which answered HTTP 400)."""
    from deploy.export import check_request

    request = logs.drop_columns(["click"]).slice(0, 4)
    want = to_canonical(request, SCHEMA, with_labels=False)
    frame = request.to_pandas()
    for col in ("hist_item_id", "hist_category", "item_tags"):
        frame[col] = [[] for _ in range(len(frame))]
    cold = check_request(pa.Table.from_pandas(frame, preserve_index=False), SCHEMA, 10)
    assert cold.num_rows == 4 and all(v == [] for v in cold.column("hist_item_id").to_pylist())
    typed = _set(request, "item_id", request.column("item_id").cast(pa.uint64()))
    typed = _set(typed, "user_id", typed.column("user_id").cast(pa.int16()))
    assert check_request(typed, SCHEMA, 10).equals(want)
    assert check_request(pa.Table.from_pandas(pd.DataFrame(request.to_pandas()), preserve_index=False),
                         SCHEMA, 10).equals(want)


def test_files_in_sub_folders_are_read_markers_ignored_others_reported(logs, tmp_path) -> None:
    """Kind 8: a day folder with ``hour=23/part-….parquet`` (read), Spark/Hadoop markers
    (``_SUCCESS``, ``.part-0.parquet.crc``, ``_temporary/…``: ignored by the documented rule) and a
    stray CSV (not read, and said so)."""
    from pipeline.days import day_files

    day = tmp_path / "day=2026-01-01"
    (day / "hour=23").mkdir(parents=True)
    (day / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(logs, day / "part-0.parquet")
    pq.write_table(logs, day / "hour=23" / "part-1.parquet")
    pq.write_table(logs, day / "_temporary" / "0" / "part-2.parquet")  # an unfinished write
    (day / "_SUCCESS").write_text("")
    (day / ".part-0.parquet.crc").write_bytes(b"\0")
    (day / "export.csv").write_text("a,b\n")
    said: list[str] = []
    files = day_files(tmp_path, parse_days("2026-01-01"), log=said.append)
    assert [str(f.relative_to(day)) for f in files] == ["hour=23/part-1.parquet", "part-0.parquet"]
    assert len(said) == 1 and "1 file(s)" in said[0] and "export.csv" in said[0]
    assert check_files(files, SCHEMA, unknown="error") == 2 * logs.num_rows


STRING_TYPINGS = ["string", "large_string", "dictionary<string>", "dictionary<large_string>", "string_view"]


@settings(max_examples=10, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(typing=st.sampled_from(STRING_TYPINGS), nulls=st.booleans())
def test_string_ids_in_every_string_layout_give_the_same_rows(logs, typing: str, nulls: bool) -> None:
    """String ids as a writer may store them (pyarrow/Polars large_string, pandas categoricals as
    dictionaries, string_view): the same canonical rows and the same quarantine reasons."""
    schema = load_config(ROOT / "configs/tiny.toml", ['schema.user_id_type="string"']).schema
    values = [None if nulls and i % 7 == 3 else f"user-{i % 9}" for i in range(logs.num_rows)]
    plain = pa.array(values, pa.string())
    if typing == "string_view" and not hasattr(pa, "string_view"):
        return
    typed = {"string": plain, "large_string": plain.cast(pa.large_string()),
             "dictionary<string>": plain.dictionary_encode(),
             "dictionary<large_string>": plain.cast(pa.large_string()).dictionary_encode(),
             "string_view": plain.cast(pa.string_view()) if hasattr(pa, "string_view") else plain}[typing]

    def rows(column):
        good, bad = split_valid(_set(logs, "user_id", column), schema)
        return to_canonical(good, schema), sorted(bad.column(REASON).to_pylist())

    got, want = rows(typed), rows(plain)
    assert got[0].equals(want[0]) and got[1] == want[1]
    assert len(want[1]) == (sum(v is None for v in values))


def test_a_converted_list_column_sliced_with_a_null_row(logs) -> None:
    """A chunk that starts mid-array (the reader re-cuts chunks at request boundaries) with a
    null list row, in a layout that needs converting: rebuilt, not 'Null bitmap with offsets
    slice not supported' (review of issue 19)."""
    tags = logs.column("item_tags").to_pylist()
    tags[5] = None
    for typ in (pa.list_(pa.uint64()), pa.large_list(pa.int32())):
        table = _set(logs, "item_tags", pa.array(tags, typ)).slice(3)
        good, bad = split_valid(table, SCHEMA)
        assert bad.column(REASON).to_pylist() == ["null id 'item_tags'"]
        want = split_valid(_set(logs, "item_tags", pa.array(tags, pa.list_(pa.int64()))).slice(3), SCHEMA)[0]
        assert to_canonical(good, SCHEMA).equals(to_canonical(want, SCHEMA))


@pytest.mark.parametrize("typing", ["uint64", "dictionary<string>", "large_string", "int16"])
def test_request_ids_in_any_layout_group_alike(logs, typing: str) -> None:
    """``request_id`` is normalised like the ids (a pandas Categorical is a dictionary; a hash a
    uint64 ≥ 2^63): the same requests as int64 / string ids, no crash (review of issue 19)."""
    from pipeline.requests import group_requests
    from pipeline.validate import REQUEST_ID

    n = logs.num_rows
    base = [(1 << 63) + i // 4 for i in range(n)] if typing == "uint64" else [i // 4 for i in range(n)]
    ids = {"uint64": lambda: pa.array(base, pa.uint64()), "int16": lambda: pa.array(base, pa.int16()),
           "dictionary<string>": lambda: pa.array([f"r{v}" for v in base]).dictionary_encode(),
           "large_string": lambda: pa.array([f"r{v}" for v in base], pa.large_string())}[typing]()
    table = normalize(logs.append_column(REQUEST_ID, ids), SCHEMA)[0]
    assert table.schema.field(REQUEST_ID).type in (pa.int64(), pa.string())
    groups = group_requests(table, SCHEMA, ("item",))
    assert len(groups.counts) == (n + 3) // 4


def test_request_ids_above_2_53_stay_apart(logs) -> None:
    """Request-id words mixed with row numbers went through float64 and merged ids above 2^53."""
    from pipeline.requests import group_requests
    from pipeline.validate import REQUEST_ID

    n = logs.num_rows
    ids = pa.array([(1 << 62) + i // 4 for i in range(n)], pa.int64())
    assert len(group_requests(logs.append_column(REQUEST_ID, ids), SCHEMA, ("item",)).counts) == (n + 3) // 4

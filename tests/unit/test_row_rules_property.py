"""Issue 19: the property over the validation path. Generated tables mix valid rows with every
kind of bad row the docs name (null ids, labels, timestamps and dense values; NaN/inf dense;
labels not 0/1; null list elements; misaligned sequences; exact duplicates; ids out of a
declared range), in one of the physical typings common writers produce. Every row is either
kept or quarantined with a reason — ``rows_in = kept + quarantined`` — and what is kept, with
which reasons the rest are refused, equals a plain row-by-row reference of the documented rules
(``docs/data-format.md``), written here in Python and nowhere else."""

from __future__ import annotations

import math
import struct
import tomllib
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jobs.config import config_from_doc
from pipeline.collate import collate
from pipeline.row_hash import DuplicateFinder
from pipeline.validate import REASON, normalize, split_valid, to_canonical

ROOT = Path(__file__).resolve().parents[2]
def _schema():
    """tiny.toml with a declared id range on ``item_category`` (the out-of-range rule)."""
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        doc = tomllib.load(f)
    (field,) = [f for f in doc["schema"]["sparse"] if f["name"] == "item_category"]
    field["id_range"] = [0, 50]
    return config_from_doc(doc, "tiny.toml").schema


SCHEMA = _schema()
INTS = [c.name for c in SCHEMA.sparse if not c.multi_valued]
DENSE = [d.name for d in SCHEMA.dense]
SEQ = SCHEMA.sequences[0]
LIST_COLUMNS = {"item_tags", *SEQ.columns}


def _base_row(i: int) -> dict:
    return {"ts": 1_700_000_000 + i, "user_id": i % 7, "click": float(i % 2),
            **{d: 0.5 * i for d in DENSE}, **{c: (i * 13) % 40 for c in INTS if c != "user_id"},
            "item_tags": [i % 5, (i + 1) % 5][: i % 3], SEQ.columns[0]: [1, 2, 3][: i % 4],
            SEQ.columns[1]: [4, 5, 6][: i % 4]}


CORRUPTIONS = ["none", "null_label", "label_2", "null_user", "null_ts", "null_dense", "nan_dense", "inf_dense",
               "null_id", "null_tag_elem", "null_seq", "null_seq_elem", "misaligned", "out_of_range", "duplicate"]


def _corrupt(row: dict, how: str, previous: dict | None) -> dict:
    row = dict(row)
    if how == "null_label":
        row["click"] = None
    elif how == "label_2":
        row["click"] = 2.0
    elif how == "null_user":
        row["user_id"] = None
    elif how == "null_ts":
        row["ts"] = None
    elif how == "null_dense":
        row[DENSE[1]] = None
    elif how == "nan_dense":
        row[DENSE[0]] = float("nan")
    elif how == "inf_dense":
        row[DENSE[1]] = float("-inf")
    elif how == "null_id":
        row["item_id"] = None
    elif how == "null_tag_elem":
        row["item_tags"] = [1, None]
    elif how == "null_seq":
        row[SEQ.columns[1]] = None
    elif how == "null_seq_elem":
        row[SEQ.columns[0]] = [None] + [0] * (len(row[SEQ.columns[1]]) - 1) if row[SEQ.columns[1]] else [None]
        row[SEQ.columns[1]] = row[SEQ.columns[1]] or [7]
    elif how == "misaligned":
        row[SEQ.columns[1]] = row[SEQ.columns[1]] + [9]
    elif how == "out_of_range":
        row["item_category"] = 99
    elif how == "duplicate" and previous is not None:
        row = dict(previous)
    return row


def reference(rows: list[dict]) -> list[str]:
    """The documented rules, row by row, first failure wins ("" = kept)."""
    out, seen = [], set()
    for r in rows:
        why = ""

        def fail(reason: str) -> None:
            nonlocal why
            why = why or reason
        if r["click"] is None:
            fail("null label 'click'")
        elif r["click"] not in (0.0, 1.0):
            fail("label 'click' not 0 or 1")
        if r["user_id"] is None:
            fail("null user id 'user_id'")
        if r["ts"] is None:
            fail("null timestamp 'ts'")
        for d in DENSE:
            if r[d] is None:
                fail(f"null dense '{d}'")
            elif not math.isfinite(r[d]):
                fail(f"NaN or inf dense '{d}'")
        for f in SCHEMA.sparse:
            v = r[f.name]
            if v is None:
                fail(f"null id '{f.name}'")
            elif f.multi_valued and any(x is None for x in v):
                fail(f"null element in '{f.name}'")
            elif f.id_range is not None and any(not f.id_range[0] <= x <= f.id_range[1]
                                                for x in (v if f.multi_valued else [v])):
                fail(f"id out of range in '{f.name}' (allowed {f.id_range[0]}..{f.id_range[1]})")
        first = None
        for col in SEQ.columns:
            v = r[col]
            if v is None:
                fail(f"null sequence list '{col}'")
            elif any(x is None for x in v):
                fail(f"null element in sequence '{col}'")
            n = -1 if v is None else len(v)
            if first is None:
                first = n
            elif n != first:
                fail(f"misaligned sequence '{SEQ.name}': '{col}' length differs from '{SEQ.columns[0]}'")
        key = tuple(struct.pack("<d", r[c]) if isinstance(r[c], float) else r[c]  # NaN equals NaN
                    for c in sorted(r) if c not in LIST_COLUMNS)  # single-valued columns only
        if key in seen:
            fail("duplicate row (the same values as an earlier row of this file)")
        seen.add(key)
        out.append(why)
    return out


TYPINGS = {  # how a writer may store the same columns
    "int64": (pa.int64(), pa.list_(pa.int64())),
    "int32/large_list": (pa.int32(), pa.large_list(pa.int32())),
    "uint16": (pa.uint16(), pa.list_(pa.uint16())),
}


def _arrow(rows: list[dict], typing: str) -> pa.Table:
    ids, lists = TYPINGS[typing]
    fields = [pa.field("ts", pa.int64()), pa.field("user_id", ids), pa.field("click", pa.float64())]
    fields += [pa.field(d, pa.float32()) for d in DENSE]
    fields += [pa.field(c, ids) for c in INTS if c != "user_id"]
    fields += [pa.field(c, lists) for c in ("item_tags", *SEQ.columns)]
    return pa.Table.from_pylist(rows, schema=pa.schema(fields))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(plan=st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=30),
       typing=st.sampled_from(sorted(TYPINGS)))
def test_every_row_is_kept_or_quarantined_exactly_as_the_rules_say(plan: list[str], typing: str) -> None:
    rows: list[dict] = []
    for i, how in enumerate(plan):
        rows.append(_corrupt(_base_row(i), how, rows[-1] if rows else None))
    table = _arrow(rows, typing)
    normalized = normalize(table, SCHEMA)[0]
    good, bad = split_valid(table, SCHEMA, duplicate=DuplicateFinder()(normalized))
    assert good.num_rows + bad.num_rows == len(rows)  # rows_in = kept + quarantined
    want = reference(rows)
    assert sorted(bad.column(REASON).to_pylist()) == sorted(w for w in want if w)
    kept = [r for r, w in zip(rows, want) if not w]
    canonical = to_canonical(good, SCHEMA)
    assert canonical.equals(to_canonical(_arrow(kept, "int64"), SCHEMA))
    if kept:  # what is trained: the collated batch of the kept rows
        batch = collate(canonical, SCHEMA)
        assert batch.labels.shape[0] == len(kept)


SERVING_CORRUPTIONS = [c for c in CORRUPTIONS if c not in ("null_label", "label_2", "duplicate")]


@settings(max_examples=30, deadline=None, derandomize=True)
@given(plan=st.lists(st.sampled_from(["none"] * 4 + SERVING_CORRUPTIONS), min_size=1, max_size=12),
       typing=st.sampled_from(sorted(TYPINGS)))
def test_a_serving_request_is_scored_whole_or_refused_naming_its_first_bad_row(plan: list[str], typing: str) -> None:
    """The same property for serving (``check_request``, which the pyfunc calls): requests carry
    no labels and are not checked for duplicates; a request of valid rows in any typing becomes
    the same canonical rows, one with a bad row is refused whole naming the first one."""
    from deploy.export import RequestError, check_request

    rows = [_corrupt(_base_row(i), how, None) for i, how in enumerate(plan)]
    for r in rows:
        r["click"] = 0.0  # the reference's label rule passes; the column is dropped below
    want = [w for w in reference(rows) if not w.startswith("duplicate")]  # serving has no duplicate rule
    request = _arrow(rows, typing).drop_columns(["click"])
    bad = [w for w in want if w]
    if not any(want):
        got = check_request(request, SCHEMA, 100)
        assert got.equals(to_canonical(_arrow(rows, "int64"), SCHEMA, with_labels=False))
    else:
        with pytest.raises(RequestError) as info:
            check_request(request, SCHEMA, 100)
        first = next(w for w in want if w)
        assert f"{len(bad)} invalid request row(s), first: {first}" in str(info.value)

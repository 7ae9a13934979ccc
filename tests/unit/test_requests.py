"""Requests (issue 16): rows sharing a request id are grouped; a request whose rows disagree on a
request-level column is flagged whole, with the columns named, in every consumer (quarantine,
serving 400); the exported shared-prefix program equals the per-row program."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException

from deploy.candidates import load_candidate_program, score_request, score_requests
from deploy.export import TokenrecPyfunc, export_model, load_program, score_table
from embedding.schema import load_schema
from model.ranking import ModelConfig, RankingModel
from model.tokenformer import TokenFormerConfig
from pipeline.generator import GeneratorConfig, World
from pipeline.requests import group_requests, request_level_columns
from pipeline.validate import REASON, REQUEST_ID, QuarantineWriter, _column_words, to_canonical

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")
GROUPS = ("item",)


def _logs(rows=48, per_request=4, seed=1) -> pa.Table:
    world = World(SCHEMA, GeneratorConfig(seed=seed, rows_per_day=rows, candidates_per_request=per_request,
                                          max_hist_len=12))
    return world.day_rows(0)[0]


def test_generator_writes_requests_that_share_request_level_columns() -> None:
    t = _logs()
    assert t.column(REQUEST_ID).to_pylist() == [i // 4 for i in range(48)]
    g = group_requests(t, SCHEMA, GROUPS)
    assert g.counts.tolist() == [4] * 12 and not g.bad.any()
    items = np.array(t.column("item_id").to_pylist()).reshape(12, 4)
    assert (items != items[:, :1]).any(axis=1).mean() > 0.5  # candidates differ
    assert "item_tags" not in request_level_columns(SCHEMA, GROUPS)  # the item group's multi-valued field


@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_a_disagreeing_request_is_flagged_whole_and_only_it(data) -> None:
    """Property: changing one row's request-level value flags exactly that row's request, with
    the column named; changing a candidate-level value flags nothing."""
    t = _logs(rows=24, per_request=3, seed=data.draw(st.integers(0, 50)))
    row = data.draw(st.integers(0, 23))
    col = data.draw(st.sampled_from(request_level_columns(SCHEMA, GROUPS)))
    values = t.column(col).to_pylist()
    values[row] = (values[row] + 1.5 if isinstance(values[row], float) else
                   list(values[row]) + [7] if isinstance(values[row], list) else values[row] + 1)
    bad = group_requests(t.set_column(t.column_names.index(col), col, pa.array(values, t.schema.field(col).type)),
                         SCHEMA, GROUPS)
    assert np.flatnonzero(bad.bad).tolist() == [3 * (row // 3) + k for k in range(3)]
    assert list(bad.reasons) == [row // 3] and f"'{col}'" in bad.reasons[row // 3]
    items = t.column("item_id").to_pylist()
    items[row] += 1
    assert not group_requests(t.set_column(t.column_names.index("item_id"), "item_id", pa.array(items)),
                              SCHEMA, GROUPS).bad.any()


@settings(max_examples=50, deadline=None)
@given(lists=st.lists(st.lists(st.integers(-2**63, 2**63 - 1), max_size=5), min_size=1, max_size=12))
def test_list_words_are_equal_exactly_for_equal_lists(lists) -> None:
    words = _column_words(pa.array(lists, pa.list_(pa.int64())))
    for i in range(len(lists)):
        for j in range(len(lists)):
            assert (words[i] == words[j]) == (lists[i] == lists[j])


def test_unordered_ids_group_by_first_appearance_and_nulls_are_flagged() -> None:
    t = _logs(rows=12, per_request=12)  # one request's values for every row
    ids = pa.array(["b", "a", "b", None, "a", "c", "b", "a", "c", "c", "b", "a"])
    g = group_requests(t.set_column(t.column_names.index(REQUEST_ID), REQUEST_ID, ids), SCHEMA, GROUPS)
    assert g.counts.tolist() == [4, 4, 1, 3] and g.first.tolist() == [0, 1, 3, 5]
    assert g.order.tolist() == [0, 2, 6, 10, 1, 4, 7, 11, 3, 5, 8, 9]
    assert np.flatnonzero(g.bad).tolist() == [3] and None in g.reasons


def test_quarantine_takes_disagreeing_requests_with_their_reason(tmp_path) -> None:
    t = _logs()
    ctx = t.column("ctx_1").to_pylist()
    ctx[5] += 1  # request 1 (rows 4..7)
    t = t.set_column(t.column_names.index("ctx_1"), "ctx_1", pa.array(ctx))
    good = QuarantineWriter(SCHEMA, str(tmp_path), request_groups=GROUPS)(t)
    assert good.num_rows == 44 and REQUEST_ID in good.column_names
    bad = pa.concat_tables([pq.read_table(p) for p in tmp_path.glob("*.parquet")])
    assert sorted(bad.column(REQUEST_ID).to_pylist()) == [1] * 4
    assert "disagree on request-level column(s) ['ctx_1']" in bad.column(REASON)[0].as_py()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, ModelConfig(tower="tokenformer", tokenformer=TokenFormerConfig(
        d_model=32, num_heads=4, windows=(6, 3)))).eval()
    out = export_model(model, tmp_path_factory.mktemp("cand") / "export", max_rows=200)
    pyfunc = TokenrecPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"export": str(out)}))
    return SimpleNamespace(model=model, out=out, pyfunc=pyfunc)


def test_candidate_program_equals_the_per_row_program(exported) -> None:
    program, schema, _ = load_program(exported.out)
    candidates, groups = load_candidate_program(exported.out)
    assert candidates is not None and groups == GROUPS
    t = _logs(rows=60, per_request=12)
    ids = pa.array([0] * 1 + [1] * 11 + [2] * 12 + [3] * 2 + [4] * 10 + [5] * 12 + [6] * 12)  # C = 1 .. 12
    canon = to_canonical(t, SCHEMA, with_labels=False)
    got, bad, _ = score_requests(candidates, canon, SCHEMA, GROUPS, ids)
    want = score_table(program, canon, SCHEMA)
    assert not bad.any()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    chunked = score_request(candidates, canon.slice(24, 1), canon.slice(24, 12), SCHEMA, chunk=5)  # 5 + 5 + 1
    np.testing.assert_allclose(chunked, want[24:36], rtol=1e-5, atol=1e-6)


def test_pyfunc_groups_requests_and_answers_400_for_a_disagreeing_one(exported) -> None:
    t = _logs(rows=40, per_request=8)
    frame = t.drop_columns(["click", "p_true"]).to_pandas()
    got = exported.pyfunc.predict(None, frame)
    want = exported.pyfunc.predict(None, frame.drop(columns=[REQUEST_ID]))  # the per-row program
    np.testing.assert_allclose(got["click"].to_numpy(), want["click"].to_numpy(), rtol=1e-5, atol=1e-6)
    frame.loc[9, "dense_1"] += 1.0
    with pytest.raises(MlflowException, match=r"request_id'=1: its 8 rows disagree on .*'dense_1'"):
        exported.pyfunc.predict(None, frame)

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
from pipeline.row_hash import _column_words
from pipeline.validate import REASON, REQUEST_ID, QuarantineWriter, SchemaMismatchError, request_id_type, to_canonical

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


def test_unordered_ids_group_by_first_appearance_and_a_null_id_is_a_request_alone() -> None:
    t = _logs(rows=12, per_request=1)  # every row a different user: only the grouping can flag
    ids = pa.array(["b", "a", "b", None, "a", "c", "b", "a", "c", "c", "b", None])
    t = t.set_column(t.column_names.index(REQUEST_ID), REQUEST_ID, ids) if REQUEST_ID in t.column_names \
        else t.append_column(REQUEST_ID, ids)
    g = group_requests(t, SCHEMA, GROUPS)
    assert g.counts.tolist() == [4, 3, 1, 3, 1] and g.first.tolist() == [0, 1, 3, 5, 11]
    assert g.order.tolist() == [0, 2, 6, 10, 1, 4, 7, 3, 5, 8, 9, 11]
    assert np.flatnonzero(g.bad).tolist() == [0, 1, 2, 4, 5, 6, 7, 8, 9, 10]  # nulls never disagree
    assert sorted(g.reasons) == ["a", "b", "c"]


def test_request_id_type_must_agree_across_files(tmp_path) -> None:
    t = _logs(rows=8, per_request=2)
    pq.write_table(t, tmp_path / "a.parquet")
    pq.write_table(t.drop_columns([REQUEST_ID]), tmp_path / "b.parquet")
    assert request_id_type([tmp_path / "a.parquet", tmp_path / "b.parquet"]) == pa.int64()
    assert request_id_type([tmp_path / "b.parquet"]) is None
    pq.write_table(t.set_column(t.column_names.index(REQUEST_ID), REQUEST_ID,
                                t.column(REQUEST_ID).cast(pa.string())), tmp_path / "c.parquet")
    with pytest.raises(SchemaMismatchError, match="is int in .*a.parquet but string in .*c.parquet"):
        request_id_type([tmp_path / "a.parquet", tmp_path / "c.parquet"])


def test_quarantine_takes_disagreeing_requests_with_their_reason(tmp_path) -> None:
    t = _logs()
    ctx = t.column("ctx_1").to_pylist()
    ctx[5] += 1  # request 1 (rows 4..7)
    t = t.set_column(t.column_names.index("ctx_1"), "ctx_1", pa.array(ctx))
    writer = QuarantineWriter(SCHEMA, str(tmp_path), request_groups=GROUPS, request_type=pa.int64())
    good = writer(t)
    assert good.num_rows == 44 and good.column(REQUEST_ID).to_pylist() == [i // 4 for i in range(48) if i // 4 != 1]
    plain = writer(_logs(rows=8, per_request=1))  # a file without the column: a null id, each row alone
    assert plain.num_rows == 8 and plain.column(REQUEST_ID).null_count == 8
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
    ids = pa.array([0] * 1 + [1] * 11 + [2] * 12 + [3] * 2 + [4] * 10 + [5] * 11 + [None] + [6] * 12)  # C = 1..12
    canon = to_canonical(t, SCHEMA, with_labels=False)
    got, bad, _ = score_requests(candidates, program, canon, SCHEMA, GROUPS, ids)
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


def test_evaluation_scores_request_rows_against_one_prefix(exported) -> None:
    """A batch that carries request ids (the eval reader keeps them) is scored per request in
    eval mode — each request's prefix once — with the logits of row-by-row scoring."""
    from pipeline.collate import collate

    model = exported.model
    t = _logs(rows=40, per_request=8)
    ids = t.column(REQUEST_ID).to_pylist()
    ids[5], ids[17] = None, None  # rows of their own
    t = t.set_column(t.column_names.index(REQUEST_ID), REQUEST_ID, pa.array(ids, pa.int64()))
    canon = to_canonical(t, SCHEMA, keep=(REQUEST_ID,))
    batch = collate(canon, SCHEMA)
    assert batch.request_ids is not None and batch.request_ids[5] == -1
    before = model.tower.prefix_passes
    with torch.no_grad():
        grouped = model(batch)
        batch.request_ids = None
        rows = model(batch)
    torch.testing.assert_close(grouped, rows, rtol=1e-5, atol=1e-6)
    assert model.tower.prefix_passes - before == 5 + 2  # 5 requests, 2 rows alone


def test_gate_evaluation_reads_requests_with_the_same_metrics(exported, tmp_path) -> None:
    from jobs.registry import evaluate_export

    t = _logs(rows=64, per_request=8)
    for name, table in (("with", t), ("without", t.drop_columns([REQUEST_ID]))):
        (tmp_path / name / "day=2026-01-01").mkdir(parents=True)
        pq.write_table(table, tmp_path / name / "day=2026-01-01" / "part-0.parquet")
    grouped = evaluate_export(exported.out, tmp_path / "with", "2026-01-01")
    rows = evaluate_export(exported.out, tmp_path / "without", "2026-01-01")
    assert grouped["eval_rows"] == rows["eval_rows"] == 64
    assert grouped["eval_auc"] == pytest.approx(rows["eval_auc"], abs=1e-9)
    assert grouped["eval_logloss"] == pytest.approx(rows["eval_logloss"], rel=1e-6)


def test_reader_chunks_never_split_a_request() -> None:
    from pipeline.source import whole_requests

    t = _logs(rows=48, per_request=6)
    ids = t.column(REQUEST_ID).to_pylist()
    ids[46:] = [None, None]  # the last two rows have no request
    t = t.set_column(t.column_names.index(REQUEST_ID), REQUEST_ID, pa.array(ids, pa.int64()))
    for size in (1, 5, 7, 13, 48, 100):
        chunks = list(whole_requests(t.slice(lo, size) for lo in range(0, 48, size)))
        assert sum(c.num_rows for c in chunks) == 48
        assert pa.concat_tables(chunks).equals(t)
        seen = [set(c.column(REQUEST_ID).drop_null().to_pylist()) for c in chunks]
        for a in range(len(seen)):
            for b in range(a + 1, len(seen)):
                assert not seen[a] & seen[b], f"chunk size {size}: a request split over two chunks"


def test_serving_request_ids_as_json_gives_them(exported) -> None:
    """JSON nulls only (Arrow null type) → every row alone; ints with a null (pandas floats) → ints;
    a fractional id → 400. Scores stay the per-row ones."""
    t = _logs(rows=16, per_request=4)
    frame = t.drop_columns(["click", "p_true"]).to_pandas()
    want = exported.pyfunc.predict(None, frame.drop(columns=[REQUEST_ID]))["click"].to_numpy()
    nulls = frame.assign(request_id=[None] * 16)
    np.testing.assert_allclose(exported.pyfunc.predict(None, nulls)["click"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    floats = frame.assign(request_id=[float(i // 4) if i != 3 else None for i in range(16)])
    np.testing.assert_allclose(exported.pyfunc.predict(None, floats)["click"].to_numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(MlflowException, match="fractional"):
        exported.pyfunc.predict(None, frame.assign(request_id=[0.5] * 16))


def test_large_string_request_ids_and_empty_histories_through_the_programs(exported) -> None:
    from pipeline.collate import collate

    program, _, _ = load_program(exported.out)
    candidates, _ = load_candidate_program(exported.out)
    t = _logs(rows=24, per_request=8)
    hist = [[] if i < 8 else v for i, v in enumerate(t.column("hist_item_id").to_pylist())]
    cats = [[] if i < 8 else v for i, v in enumerate(t.column("hist_category").to_pylist())]
    t = t.set_column(t.column_names.index("hist_item_id"), "hist_item_id", pa.array(hist, pa.list_(pa.int64())))
    t = t.set_column(t.column_names.index("hist_category"), "hist_category", pa.array(cats, pa.list_(pa.int64())))
    canon = to_canonical(t, SCHEMA, with_labels=False)
    ids = t.column(REQUEST_ID).cast(pa.large_string())
    got, bad, _ = score_requests(candidates, program, canon, SCHEMA, GROUPS, ids)
    assert not bad.any()
    np.testing.assert_allclose(got, score_table(program, canon, SCHEMA), rtol=1e-5, atol=1e-6)
    batch = collate(canon.append_column(REQUEST_ID, ids), SCHEMA, with_labels=False)
    assert batch.request_ids.unique().numel() == 3


@pytest.mark.parametrize("rows", [1, 3])
def test_cold_start_rows_with_no_history_score_like_the_eager_model(exported, rows) -> None:
    from pipeline.collate import collate

    t = _logs(rows=8, per_request=1).slice(0, rows)
    for c in ("hist_item_id", "hist_category"):
        t = t.set_column(t.column_names.index(c), c, pa.array([[]] * rows, pa.list_(pa.int64())))
    canon = to_canonical(t, SCHEMA, with_labels=False)
    program, _, _ = load_program(exported.out)
    with torch.no_grad():
        want = torch.sigmoid(exported.model(collate(canon, SCHEMA, with_labels=False))).numpy()
    np.testing.assert_allclose(score_table(program, canon, SCHEMA), want, rtol=1e-5, atol=1e-6)

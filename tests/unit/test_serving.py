"""The exported inference program and the MLflow pyfunc around it: same probabilities as the
eager model for any batch size, requests without labels, and a clear 400-style error (an
``MlflowException`` with ``INVALID_PARAMETER_VALUE``) for every malformed request."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.exceptions import MlflowException

from deploy.export import TokenrecPyfunc, export_model, load_program, score_table
from embedding.schema import load_schema
from model.ranking import ModelConfig, RankingModel
from pipeline.collate import collate
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate
from pipeline.validate import to_canonical

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serving")
    generate(SCHEMA, GeneratorConfig(seed=1, rows_per_day=40, files_per_day=1, num_users=10, num_items=8,
                                     num_categories=2), tmp / "d", parse_days("2026-01-01"), log=lambda *_: None)
    table = pq.read_table(next((tmp / "d").glob("day=*/*.parquet")))
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, ModelConfig(tower="tokenformer")).eval()
    out = export_model(model, tmp / "export", max_rows=30)
    pyfunc = TokenrecPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"export": str(out)}))
    return SimpleNamespace(model=model, out=out, table=table, pyfunc=pyfunc)


@pytest.mark.parametrize("rows", [1, 2, 7, 30])
def test_exported_program_equals_the_eager_model(exported, rows: int) -> None:
    program, schema, max_rows = load_program(exported.out)
    assert max_rows == 30 and schema.fingerprint() == SCHEMA.fingerprint()
    table = to_canonical(exported.table.slice(3, rows), SCHEMA, with_labels=False)
    with torch.no_grad():
        want = torch.sigmoid(exported.model(collate(table, SCHEMA, with_labels=False))).numpy()
    got = score_table(program, table, SCHEMA)
    assert got.shape == (rows, 1)
    assert got == pytest.approx(want, abs=1e-5)


def test_pyfunc_answers_rows_without_labels(exported) -> None:
    request = exported.table.slice(0, 12).drop_columns(["click", "p_true"]).to_pandas()
    got = exported.pyfunc.predict(None, request)
    with torch.no_grad():
        want = torch.sigmoid(exported.model(collate(exported.table.slice(0, 12), SCHEMA))).numpy()[:, 0]
    assert list(got.columns) == ["click"]
    assert got["click"].to_numpy() == pytest.approx(want, abs=1e-5)
    with_label = exported.table.slice(0, 12).drop_columns(["p_true"]).to_pandas()  # labels are ignored
    assert exported.pyfunc.predict(None, with_label)["click"].to_numpy() == pytest.approx(want, abs=1e-5)


def test_pyfunc_scores_a_cold_start_request(exported) -> None:
    """Issue 19 (kind 2): one new user with an empty history scored against several items — as
    a DataFrame every history list is empty, which pandas types ``list<null>``; it was refused
    (HTTP 400) though the same rows with one non-empty list were scored. Scores equal the eager
    model's on the same rows."""
    rows = exported.table.slice(0, 5).drop_columns(["click", "p_true"])
    request = rows.to_pandas()
    for col in ("hist_item_id", "hist_category"):
        request[col] = [[] for _ in range(len(request))]
    got = exported.pyfunc.predict(None, request)["click"].to_numpy()
    empty = pa.array([[]] * 5, pa.list_(pa.int64()))
    cold = rows.set_column(rows.column_names.index("hist_item_id"), "hist_item_id", empty)
    cold = cold.set_column(cold.column_names.index("hist_category"), "hist_category", empty)
    with torch.no_grad():
        want = torch.sigmoid(exported.model(collate(to_canonical(cold, SCHEMA, with_labels=False), SCHEMA,
                                                    with_labels=False))).numpy()[:, 0]
    assert got == pytest.approx(want, abs=1e-5)


def _bad(request, match: str, exported) -> None:
    with pytest.raises(MlflowException, match=match) as e:
        exported.pyfunc.predict(None, request)
    assert e.value.get_http_status_code() == 400


def test_malformed_requests_get_a_400_naming_the_problem(exported) -> None:
    request = exported.table.slice(0, 10).drop_columns(["click", "p_true"]).to_pandas()
    bad = request.copy()
    bad.loc[3, "dense_1"] = float("inf")
    _bad(bad, "1 invalid request row.*NaN or inf dense 'dense_1'", exported)
    _bad(request.drop(columns=["ctx_2"]), r"request lacks column\(s\) \['ctx_2'\]", exported)
    _bad(request.assign(colour="red"), r"unknown column\(s\) \['colour'\]", exported)
    _bad(request.assign(item_id=request["item_id"].astype(str)),
         "column 'item_id' has type .*string.*the model expects int", exported)
    big = exported.table.slice(0, 31).drop_columns(["click", "p_true"]).to_pandas()
    _bad(big, "31 rows; the limit is 30", exported)
    _bad(request.iloc[:0], "no rows", exported)
    # JSON numbers without a fraction are fine for float columns
    ok = request.assign(dense_0=request["dense_0"].round().astype("int64"))
    assert len(exported.pyfunc.predict(None, ok)) == 10


def test_wide_schema_with_managed_and_id_space_tables_exports_equal_to_eager(tmp_path: Path) -> None:
    """The demo's schema — 516 fields over 21 tables (fields of one table not adjacent), a
    managed-collision field table (``user``) and a managed-collision id-space table (``item``,
    shared by the target and the history) — through both exported programs: the same
    probabilities as the eager model. ``SparseArch._lookup_exporting`` groups the fields by
    table for the trace (the EBC path traced in ~10 minutes; issue 18)."""
    from deploy.candidates import load_candidate_program
    from jobs.config import load_config

    cfg = load_config(ROOT / "configs/demo.toml", ["generator.rows_per_day=64", "generator.files_per_day=1"])
    schema = cfg.schema
    assert len(schema.sparse) >= 500 and schema.id_space_tables
    generate(schema, cfg.generator, tmp_path / "d", parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    torch.manual_seed(0)
    model = RankingModel(schema, cfg.model)
    with torch.no_grad():  # train-mode forwards admit ids into the managed tables' rows
        for day in ("2026-01-01", "2026-01-02"):
            table = to_canonical(pq.read_table(next((tmp_path / "d").glob(f"day={day}/*.parquet"))), schema)
            model(collate(table, schema, with_labels=False))
    model.eval()
    assert sum(int((m._mch_sorted_raw_ids != torch.iinfo(torch.int64).max).sum())
               for m in model.sparse_arch.mc_modules().values()) > 0
    out = export_model(model, tmp_path / "export", max_rows=64)
    program, _, _ = load_program(out)
    table = to_canonical(pq.read_table(next((tmp_path / "d").glob("day=2026-01-02/*.parquet"))).slice(0, 9),
                         schema, with_labels=False)
    with torch.no_grad():
        want = torch.sigmoid(model(collate(table, schema, with_labels=False))).numpy()
    assert score_table(program, table, schema) == pytest.approx(want, abs=1e-5)
    candidates, groups = load_candidate_program(out)
    assert candidates is not None
    from deploy.candidates import score_request
    from pipeline.requests import request_level_columns

    request = table.slice(0, 6)  # one request: row 0's user and context, six candidate items
    for col in request_level_columns(schema, groups):
        request = request.set_column(request.column_names.index(col), col,
                                     pa.concat_arrays([request.column(col).chunk(0).slice(0, 1)] * 6))
    with torch.no_grad():
        want = torch.sigmoid(model(collate(request, schema, with_labels=False))).numpy()
    got = score_request(candidates, request.slice(0, 1), request, schema)
    assert got == pytest.approx(want, abs=1e-5)

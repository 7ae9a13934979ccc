"""Requests for real (issue 16): a registered TokenFormer version scores request-grouped logs with
``tokenrec score`` (one prefix per request, a disagreeing request quarantined) and answers a
many-candidate request through ``mlflow models serve``, both equal to the per-row program."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deploy.export import export_model, load_program, register_export, score_table
from jobs.cli import main
from jobs.config import load_config
from model.ranking import RankingModel
from pipeline.days import parse_days
from pipeline.generator import generate
from pipeline.validate import to_canonical
from tests.integration.test_serving_registry import _post, _serve

ROOT = Path(__file__).resolve().parents[2]
NAME = "tokenrec-requests-test"
DAY = "2026-01-01"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("requests")
    cfg = load_config(ROOT / "configs/tiny.toml", [
        "generator.rows_per_day=240", "generator.files_per_day=2", "generator.candidates_per_request=6",
        "model.tower=tokenformer", "model.tokenformer.d_model=32", "model.tokenformer.windows=[6,3]"])
    generate(cfg.schema, cfg.generator, tmp / "data", parse_days(DAY), log=lambda *_: None)
    torch.manual_seed(0)
    export = export_model(RankingModel(cfg.schema, cfg.model), tmp / "export", max_rows=64)
    assert (export / "candidates.pt2").exists()
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    register_export(export, uri, "requests-test", NAME, tmp / "mlartifacts", alias="champion")
    program, schema, _ = load_program(export)
    return {"tmp": tmp, "uri": uri, "program": program, "schema": schema}


def test_score_groups_requests_and_quarantines_a_disagreeing_one(registered, capsys) -> None:
    tmp, schema = registered["tmp"], registered["schema"]
    day = tmp / "data" / f"day={DAY}"
    first = sorted(day.glob("*.parquet"))[0]
    logs = pq.read_table(first)
    ctx = logs.column("ctx_2").to_pylist()
    ctx[8] += 1  # a row of request 1 (rows 6..11) disagrees with the others on a request-level field
    pq.write_table(logs.set_column(logs.column_names.index("ctx_2"), "ctx_2", pa.array(ctx)), first)
    out = tmp / "scores"
    rc = main(["score", "--model", f"models:/{NAME}@champion", "--data", str(tmp / "data"), "--days", DAY,
               "--out", str(out), "--workdir", str(tmp / "work"), "--tracking-uri", registered["uri"]])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quarantined 6 rows" in printed and "disagree on request-level column(s) ['ctx_2']" in printed
    scores = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])
    assert scores.num_rows == 240 - 6 and 1 not in scores.column("request_id").to_pylist()
    every = pa.concat_tables([pq.read_table(f) for f in sorted(day.glob("*.parquet"))])
    every = every.filter(pa.compute.not_equal(every.column("request_id"), 1))
    want = score_table(registered["program"], to_canonical(every, schema), schema)[:, 0]
    got = dict(zip(zip(scores.column("request_id").to_pylist(), scores.column("item_id").to_pylist()),
                   scores.column("p_click").to_pylist()))
    keys = list(zip(every.column("request_id").to_pylist(), every.column("item_id").to_pylist()))
    np.testing.assert_allclose([got[k] for k in keys], want, rtol=1e-5, atol=1e-6)


def test_served_many_candidate_request_equals_rows_and_a_disagreeing_one_is_a_400(registered) -> None:
    tmp = registered["tmp"]
    rows = pq.read_table(sorted((tmp / "data" / f"day={DAY}").glob("*.parquet"))[1]).slice(0, 18)
    rows = rows.drop_columns(["click", "p_true"])
    with _serve(registered["uri"], f"models:/{NAME}@champion") as port:
        status, grouped = _post(port, {"dataframe_records": rows.to_pylist()})  # 3 requests of 6
        assert status == 200, grouped
        status, single = _post(port, {"dataframe_records": rows.drop_columns(["request_id"]).to_pylist()})
        assert status == 200, single
        np.testing.assert_allclose([p["click"] for p in grouped["predictions"]],
                                   [p["click"] for p in single["predictions"]], rtol=1e-5, atol=1e-6)
        records = rows.to_pylist()
        records[3]["dense_0"] += 0.5
        status, body = _post(port, {"dataframe_records": records})
        assert status == 400 and "disagree on request-level column(s) ['dense_0']" in body["message"], body

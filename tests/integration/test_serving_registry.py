"""A registered version, served and batch-scored for real: ``mlflow models serve`` on 127.0.0.1
and ``tokenrec score`` through Ray Data, both against the exported program's own predictions."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from deploy.export import export_model, load_program, register_export, request_example, score_table
from jobs.cli import main
from jobs.config import load_config
from model.ranking import RankingModel
from pipeline.days import parse_days
from pipeline.generator import generate
from pipeline.validate import canonical_schema, to_canonical

ROOT = Path(__file__).resolve().parents[2]
NAME = "tokenrec-serving-test"
DAYS = "2026-01-01..2026-01-02"


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("registry")
    cfg = load_config(ROOT / "configs/tiny.toml", ["generator.rows_per_day=300", "generator.files_per_day=2"])
    generate(cfg.schema, cfg.generator, tmp / "data", parse_days(DAYS), log=lambda *_: None)
    torch.manual_seed(0)
    export = export_model(RankingModel(cfg.schema, cfg.model), tmp / "export", max_rows=64)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    files = sorted((tmp / "data" / "day=2026-01-02").glob("*.parquet"))
    register_export(export, uri, "serving-test", NAME, tmp / "mlartifacts", alias="champion",
                    input_example=request_example(cfg.schema, files))
    program, schema, _ = load_program(export)
    return {"tmp": tmp, "uri": uri, "cfg": cfg, "program": program, "schema": schema}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, payload) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@contextlib.contextmanager
def _serve(tracking_uri: str, model_uri: str):
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1, up when this yields its port."""
    port = _free_port()
    bin_dir = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH
    env = os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    server = subprocess.Popen([str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
                               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stdout.read().decode()[-3000:]
            assert time.time() < deadline, "mlflow models serve did not come up in 180 s"
            time.sleep(1)
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_mlflow_serve_answers_and_survives_bad_requests(registered) -> None:
    tmp, schema = registered["tmp"], registered["schema"]
    table = pq.read_table(next((tmp / "data" / "day=2026-01-01").glob("*.parquet")))
    rows = table.slice(0, 5).drop_columns(["click", "p_true"])
    want = score_table(registered["program"], to_canonical(rows, schema, with_labels=False), schema)[:, 0]
    with _serve(registered["uri"], f"models:/{NAME}@champion") as port:
        records = rows.to_pylist()
        status, body = _post(port, {"dataframe_records": records})
        assert status == 200, body
        got = np.array([p["click"] for p in body["predictions"]])
        np.testing.assert_allclose(got, want, atol=1e-5)

        bad = [dict(r, colour="red") for r in records]
        status, body = _post(port, {"dataframe_records": bad})
        assert status == 400 and "unknown column(s) ['colour']" in body["message"], body
        status, body = _post(port, {"dataframe_records": records * 13})  # 65 rows > max_rows 64
        assert status == 400 and "limit is 64" in body["message"], body
        status, body = _post(port, {"dataframe_records": [dict(records[0], dense_0="high")]})
        assert status == 400 and "dense_0" in body["message"], body
        status, body = _post(port, {"dataframe_records": records[:1]})  # still serving
        assert status == 200 and abs(body["predictions"][0]["click"] - want[0]) < 1e-5


def test_logged_model_has_a_signature_and_an_example_that_never_overrule_predict(registered) -> None:
    """The signature declares the outputs and no inputs: MLflow's input enforcement would drop
    unknown columns and refuse or cast others before ``predict`` sees them (issue 18). A request
    with 64-bit ids and a ``request_id`` column reaches ``predict`` as sent, and an unknown
    column is still refused by ``predict`` itself."""
    import mlflow
    from mlflow.exceptions import MlflowException

    tmp, schema = registered["tmp"], registered["schema"]
    mlflow.set_tracking_uri(registered["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    assert model.metadata.signature.inputs is None
    assert model.metadata.signature.outputs.input_names() == list(schema.labels)
    example = model.metadata.load_input_example(model.metadata.get_model_info().model_uri)
    assert example is not None and len(example) >= 1
    assert set(example.columns) - {"request_id"} == set(canonical_schema(schema, with_labels=False).names)
    out = model.predict(example)
    assert list(out.columns) == list(schema.labels) and out.shape[0] == len(example)

    table = pq.read_table(next((tmp / "data" / "day=2026-01-01").glob("*.parquet")))
    rows = table.slice(0, 4).drop_columns(["click", "p_true"]).to_pandas()
    rows[schema.user_id] = rows[schema.user_id].astype("int64") + (1 << 62) if schema.user_id_type == "int64" \
        else rows[schema.user_id]
    rows["request_id"] = [7, 7, 9, 9]
    want = model.unwrap_python_model().predict(None, rows)  # predict itself, no MLflow in between
    np.testing.assert_allclose(model.predict(rows).to_numpy(), want.to_numpy(), atol=0)
    with pytest.raises(MlflowException, match=r"unknown column\(s\) \['colour'\]"):
        model.predict(rows.assign(colour="red"))


def test_score_writes_every_valid_row_and_quarantines_the_rest(registered, capsys) -> None:
    tmp, schema = registered["tmp"], registered["schema"]
    day2 = tmp / "data" / "day=2026-01-02"
    good = pq.read_table(next(day2.glob("*.parquet"))).slice(0, 3)
    dense = good.column("dense_0").to_pylist()
    bad = good.set_column(good.schema.get_field_index("dense_0"), "dense_0",
                          pa.array([float("nan")] + dense[1:], good.schema.field("dense_0").type))
    pq.write_table(bad, day2 / "zz-bad.parquet")
    out = tmp / "scores"
    rc = main(["score", "--model", f"models:/{NAME}@champion", "--data", str(tmp / "data"), "--days", DAYS,
               "--out", str(out), "--workdir", str(tmp / "work"), "--tracking-uri", registered["uri"],
               "--batch-size", "128"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "quarantined 1 rows" in printed and "NaN or inf dense 'dense_0'" in printed
    scores = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])
    logs = pa.concat_tables([pq.read_table(f) for d in ("day=2026-01-01", "day=2026-01-02")
                             for f in sorted((tmp / "data" / d).glob("*.parquet"))])
    assert scores.num_rows == logs.num_rows - 1 == 600 + 2
    marker = json.loads((out / "_SUCCESS").read_text())  # written last, after the row accounting
    assert marker["rows_scored"] == scores.num_rows and len(marker["files"]) == len(list(out.glob("*.parquet")))
    assert {"user_id", "ts", "item_id", "click", "p_click"} <= set(scores.column_names)
    valid = to_canonical(pa.concat_tables([logs.slice(0, 600), good.slice(1)]), schema)
    want = np.sort(score_table(registered["program"], valid, schema)[:, 0])
    np.testing.assert_allclose(np.sort(scores.column("p_click").to_numpy()), want, atol=1e-5)
    assert main(["score", "--model", f"models:/{NAME}@champion", "--data", str(tmp / "data"), "--days", DAYS,
                 "--out", str(out), "--workdir", str(tmp / "work"), "--tracking-uri", registered["uri"]]) == 2

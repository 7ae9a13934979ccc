"""The MLflow pyfunc answers requests without labels and rejects invalid rows by name."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from deploy.export import TokenrecPyfunc, servable_config
from embedding.schema import load_schema
from model.ranking import ModelConfig, RankingModel
from pipeline.collate import collate
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[2]


def test_predict_without_labels_equals_the_module(tmp_path: Path) -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    generate(schema, GeneratorConfig(seed=1, rows_per_day=20, files_per_day=1, num_users=10, num_items=8,
                                     num_categories=2), tmp_path / "d", parse_days("2026-01-01"),
             log=lambda *_: None)
    table = pq.read_table(next((tmp_path / "d").glob("day=*/*.parquet")))
    torch.manual_seed(0)
    model = RankingModel(schema, ModelConfig()).eval()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps(servable_config(schema, ModelConfig())))
    pyfunc = TokenrecPyfunc()
    pyfunc.load_context(SimpleNamespace(artifacts={"model": str(tmp_path / "model.pt"),
                                                   "config": str(tmp_path / "config.json")}))
    request = table.drop_columns(["click", "p_true"]).to_pandas()
    got = pyfunc.predict(None, request)
    with torch.no_grad():
        want = torch.sigmoid(model(collate(table, schema))).numpy()[:, 0]
    assert list(got.columns) == ["click"]
    assert got["click"].to_numpy() == pytest.approx(want, abs=1e-6)

    bad = request.copy()
    bad.loc[3, "dense_1"] = float("inf")
    with pytest.raises(ValueError, match="1 invalid request row.*NaN or inf dense 'dense_1'"):
        pyfunc.predict(None, bad)
    with pytest.raises(ValueError, match=r"request lacks column\(s\) \['ctx_2'\]"):
        pyfunc.predict(None, request.drop(columns=["ctx_2"]))

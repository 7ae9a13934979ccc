"""Export: a sharded DCP checkpoint → an unsharded servable model, and its MLflow pyfunc.

The servable model is ``model.ranking.RankingModel`` (no loss), rebuilt from ``config.json`` and
loaded from ``model.pt`` with ``weights_only=True`` (no unpickling of untrusted data).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.distributed.checkpoint as dcp

from embedding.schema import FeatureSchema
from embedding.typed_config import from_dict
from model.ranking import ModelConfig, RankingModel, RankingTrain
from pipeline.collate import collate
from pipeline.validate import REASON, canonical_schema, split_valid, to_canonical

PACKAGES = ("embedding", "model", "pipeline", "deploy")


def servable_config(schema: FeatureSchema, model_cfg: ModelConfig) -> dict:
    """What serving needs to rebuild the model: the expanded schema and the model config."""
    return {"schema": schema.to_dict(), "model": dataclasses.asdict(model_cfg)}


def load_servable_config(config_json: str | Path) -> tuple[FeatureSchema, ModelConfig]:
    doc = json.loads(Path(config_json).read_text())
    return FeatureSchema.from_dict(doc["schema"]), from_dict(ModelConfig, doc["model"], "model")


def export_checkpoint(schema: FeatureSchema, model_cfg: ModelConfig, checkpoint_dir: str | Path,
                      out_dir: str | Path) -> Path:
    """Load a (sharded, any world size) DCP checkpoint into the unsharded model; write
    ``out_dir/model.pt`` and ``out_dir/config.json``."""
    train = RankingTrain(RankingModel(schema, model_cfg))
    state = {"model": train.state_dict()}  # the optimizer part of the checkpoint is not read
    dcp.load(state, checkpoint_id=str(checkpoint_dir))
    train.load_state_dict(state["model"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(train.model.state_dict(), out / "model.pt")
    (out / "config.json").write_text(json.dumps(servable_config(schema, model_cfg), indent=1))
    return out


def load_servable(model_pt: str | Path, config_json: str | Path) -> tuple[RankingModel, FeatureSchema]:
    schema, model_cfg = load_servable_config(config_json)
    model = RankingModel(schema, model_cfg)
    model.load_state_dict(torch.load(model_pt, weights_only=True))
    model.eval()
    return model, schema


class TokenrecPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame of log rows → one probability column per task."""

    def load_context(self, context) -> None:
        self.model, self.schema = load_servable(context.artifacts["model"], context.artifacts["config"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Rows in the log format; label columns are not needed. Invalid rows are an error
        naming the row and the reason (a request is answered whole or not at all)."""
        table = pa.Table.from_pandas(model_input, preserve_index=False)
        missing = [c for c in canonical_schema(self.schema, with_labels=False).names if c not in table.column_names]
        if missing:
            raise ValueError(f"request lacks column(s) {missing}")
        good, bad = split_valid(table, self.schema, check_labels=False)
        if bad.num_rows:
            raise ValueError(f"{bad.num_rows} invalid request row(s), first: {bad.column(REASON)[0].as_py()}")
        table = to_canonical(table, self.schema, with_labels=False)
        with torch.no_grad():
            probs = torch.sigmoid(self.model(collate(table, self.schema, with_labels=False))).numpy()
        return pd.DataFrame(probs.astype(np.float64), columns=list(self.schema.labels))


def log_pyfunc(export_dir: Path, pip_requirements: list[str]):
    """Log the exported model as an MLflow pyfunc in the active run; returns ModelInfo."""
    root = Path(__file__).resolve().parents[1]
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TokenrecPyfunc(),
        artifacts={"model": str(export_dir / "model.pt"), "config": str(export_dir / "config.json")},
        code_paths=[str(root / p) for p in PACKAGES],
        pip_requirements=pip_requirements,
    )

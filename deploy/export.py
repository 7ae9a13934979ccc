"""Export: a sharded DCP checkpoint → an unsharded inference program, and its MLflow pyfunc.

An export folder holds

* ``model.pt2`` — the inference program: ``InferenceModule`` (id hashing, managed-collision id
  remapping, embeddings, tower, sigmoid; no loss) captured by ``torch.export`` with a dynamic
  batch size and dynamic id counts. Serving runs this, no model code needed;
* ``config.json`` — the feature schema and model config it was built from (what a request must
  contain; also enough to rebuild the eager model);
* ``model.pt`` — the same weights as a state dict, for the eager ``RankingModel`` (evaluation,
  diagnostics), loaded with ``weights_only=True``.

Neither file is unpickled: ``torch.load(weights_only=True)`` and ``torch.export.load`` only read
tensors and a serialized graph.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import torch
import torch.distributed.checkpoint as dcp
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from torch import nn
from torch.export import Dim
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from deploy.candidates import export_candidate_program, has_candidate_path, load_candidate_program, score_requests
from deploy.tracking import connect
from embedding.checkpoint_safety import verify_metadata
from embedding.schema import FeatureSchema
from embedding.typed_config import from_dict
from model.ranking import ModelConfig, RankingModel, RankingTrain
from pipeline.collate import collate
from pipeline.validate import (
    REASON,
    REQUEST_ID,
    _kind,
    accepts,
    canonical_schema,
    expected_kinds,
    split_valid,
    to_canonical,
)

PACKAGES = ("embedding", "model", "pipeline", "deploy")
REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements" / "cpu.lock"  # a logged model's pins
MAX_REQUEST_ROWS = 10_000  # default limit on rows per serving request (``export_checkpoint(max_rows=)``)


class InferenceModule(nn.Module):
    """``RankingModel`` for serving, with plain tensor inputs so ``torch.export`` can take it::

        dense [B, Dd], field_values [Nf], field_lengths [F·B], seq_values [Ns], seq_lengths [C·B]
        → probabilities [B, T]

    Field and sequence KJTs are rebuilt inside with the schema's keys (``pipeline.collate``
    order); ids are raw, hashed and remapped by the model itself."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        schema = model.schema
        self.field_keys = list(schema.field_names)
        self.seq_keys = [c for q in schema.sequences for c in q.columns]

    def forward(self, dense: torch.Tensor, field_values: torch.Tensor, field_lengths: torch.Tensor,
                seq_values: torch.Tensor, seq_lengths: torch.Tensor) -> torch.Tensor:
        fields = KeyedJaggedTensor(keys=self.field_keys, values=field_values, lengths=field_lengths)
        seqs = (KeyedJaggedTensor(keys=self.seq_keys, values=seq_values, lengths=seq_lengths)
                if self.seq_keys else None)
        sparse = self.model.sparse_arch(fields, seqs)
        tower = self.model.tower
        logits = (tower.forward_with_aux(dense, sparse)[0] if hasattr(tower, "forward_with_aux")
                  else tower(dense, sparse))
        return torch.sigmoid(logits)


def inference_inputs(batch, schema: FeatureSchema) -> tuple[torch.Tensor, ...]:
    """A ``Batch`` → ``InferenceModule``'s inputs (sequences only as far as the model uses them)."""
    if schema.sequences:
        seq_values, seq_lengths = batch.sequences.values(), batch.sequences.lengths()
    else:
        seq_values = seq_lengths = torch.zeros(0, dtype=torch.int64)
    return batch.dense, batch.fields.values(), batch.fields.lengths(), seq_values, seq_lengths


def _example_inputs(schema: FeatureSchema, rows: int = 4) -> tuple[torch.Tensor, ...]:
    """Synthetic inputs to trace with: uneven list lengths, so that no id count is tied to the
    batch size in the exported program's shape guards."""
    g = torch.Generator().manual_seed(0)
    field_lengths = torch.tensor([2 if f.multi_valued else 1 for f in schema.sparse for _ in range(rows)])
    seq_lengths = torch.tensor([1 + (r + c) % 3 for c in range(sum(len(q.columns) for q in schema.sequences))
                                for r in range(rows)], dtype=torch.int64)
    return (torch.randn(rows, len(schema.dense), generator=g),
            torch.randint(0, 1000, (int(field_lengths.sum()),), generator=g),
            field_lengths,
            torch.randint(0, 1000, (int(seq_lengths.sum()),), generator=g),
            seq_lengths)


def export_program(model: RankingModel) -> torch.export.ExportedProgram:
    """``torch.export`` of the inference module; batch size and id counts are dynamic. The
    program needs at least 2 rows (export specializes size 1): ``predict_probabilities`` pads."""
    module = InferenceModule(model).eval()
    dyn = [{0: Dim.AUTO}] * 5
    with torch.no_grad():
        return torch.export.export(module, _example_inputs(model.schema), dynamic_shapes=dyn, strict=False)


def score_table(program: nn.Module, table: pa.Table, schema: FeatureSchema) -> np.ndarray:
    """Valid rows in the canonical layout → probabilities [rows, tasks] from an exported program
    (``torch.export.load(...).module()``). The program is traced for >= 2 rows and >= 2 history
    ids (``torch.export`` specializes sizes 0 and 1): a single row is scored twice, and rows with
    fewer than 2 history ids in all (cold-start users) get a filler row with a 2-id history;
    only the given rows' probabilities are returned."""
    n = table.num_rows
    if n == 1:
        table = pa.concat_tables([table, table])
    columns = schema.sequence_columns
    if columns and sum(pa.compute.sum(pa.compute.list_value_length(table.column(c))).as_py() or 0
                       for c in columns) < 2:
        filler = table.slice(0, 1)
        for c in columns:
            typ = filler.schema.field(c).type
            filler = filler.set_column(filler.column_names.index(c), c,
                                       pa.array([["0", "0"] if pa.types.is_string(typ.value_type) else [0, 0]], typ))
        table = pa.concat_tables([table, filler])
    batch = collate(table, schema, with_labels=False)
    with torch.no_grad():
        probs = program(*inference_inputs(batch, schema))
    return probs[:n].numpy()


def servable_config(schema: FeatureSchema, model_cfg: ModelConfig, max_rows: int = MAX_REQUEST_ROWS) -> dict:
    """What serving needs: the expanded schema, the model config, the request row limit."""
    return {"schema": schema.to_dict(), "model": dataclasses.asdict(model_cfg), "serving": {"max_rows": max_rows}}


def load_servable_config(config_json: str | Path) -> tuple[FeatureSchema, ModelConfig]:
    doc = json.loads(Path(config_json).read_text())
    return FeatureSchema.from_dict(doc["schema"]), from_dict(ModelConfig, doc["model"], "model")


def export_model(model: RankingModel, out_dir: str | Path, max_rows: int = MAX_REQUEST_ROWS,
                 program: bool = True) -> Path:
    """Write ``model.pt``, ``model.pt2`` (unless ``program=False``: runs that are never served
    skip the ~4 s trace) and ``config.json`` of an unsharded model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    torch.save(model.state_dict(), out / "model.pt")
    if program:
        torch.export.save(export_program(model), out / "model.pt2")
        if has_candidate_path(model):  # one request's prefix, many candidates (deploy.candidates)
            torch.export.save(export_candidate_program(model), out / "candidates.pt2")
    (out / "config.json").write_text(json.dumps(servable_config(model.schema, model.cfg, max_rows), indent=1))
    return out


def export_checkpoint(schema: FeatureSchema, model_cfg: ModelConfig, checkpoint_dir: str | Path,
                      out_dir: str | Path, max_rows: int = MAX_REQUEST_ROWS, program: bool = True) -> Path:
    """Load a (sharded, any world size) DCP checkpoint into the unsharded model and export it
    (``export_model``)."""
    train = RankingTrain(RankingModel(schema, model_cfg))
    state = {"model": train.state_dict()}  # the optimizer part of the checkpoint is not read
    verify_metadata(checkpoint_dir)  # DCP unpickles .metadata: allow-list it first
    dcp.load(state, checkpoint_id=str(checkpoint_dir))
    train.load_state_dict(state["model"])
    return export_model(train.model, out_dir, max_rows, program)


def load_servable(model_pt: str | Path, config_json: str | Path) -> tuple[RankingModel, FeatureSchema]:
    """The eager model of an export (evaluation, diagnostics)."""
    schema, model_cfg = load_servable_config(config_json)
    model = RankingModel(schema, model_cfg)
    model.load_state_dict(torch.load(model_pt, weights_only=True))
    model.eval()
    return model, schema


def load_program(export_dir: str | Path) -> tuple[nn.Module, FeatureSchema, int]:
    """The exported inference program of an export folder, its schema and request row limit."""
    export_dir = Path(export_dir)
    doc = json.loads((export_dir / "config.json").read_text())
    program = torch.export.load(export_dir / "model.pt2").module()
    max_rows = int(doc.get("serving", {}).get("max_rows", MAX_REQUEST_ROWS))
    return program, FeatureSchema.from_dict(doc["schema"]), max_rows


class RequestError(ValueError):
    """A request the model cannot answer; the message names what to fix."""


def check_request(table: pa.Table, schema: FeatureSchema, max_rows: int,
                  request_groups: tuple[str, ...] | None = None) -> pa.Table:
    """Rows of a request → the canonical table (and its ``request_id`` column, if any), or
    ``RequestError`` naming the problem: too many rows, missing or unknown columns, a column of
    the wrong type, an invalid row, and — with ``request_groups`` (a model that scores a request
    against one prefix) — rows of one request id that disagree on a request-level column
    (``pipeline.requests``)."""
    names = table.schema.names  # once: Table.column_names rebuilds the list at every call
    repeated = sorted(c for c, n in Counter(names).items() if n > 1)
    if repeated:
        raise RequestError(f"request has column(s) {repeated} more than once; each column once")
    if table.num_rows == 0:
        raise RequestError("request has no rows")
    if table.num_rows > max_rows:
        raise RequestError(f"request has {table.num_rows:,} rows; the limit is {max_rows:,} per request "
                           f"(split it, or score days in bulk with `tokenrec score`)")
    kinds = expected_kinds(schema)
    needed = [c for c in canonical_schema(schema, with_labels=False).names]
    missing = [c for c in needed if c not in table.column_names]
    if missing:
        raise RequestError(f"request lacks column(s) {missing}")
    allowed = set(needed) | set(schema.labels) | {REQUEST_ID}
    unknown = [c for c in table.column_names if c not in allowed]
    if unknown:
        raise RequestError(f"request has unknown column(s) {unknown}; the model reads {needed}")
    for col in needed:
        got = _kind(table.schema.field(col).type)
        if got == "int" and "float" in kinds[col]:
            continue  # JSON numbers without a fraction: cast exactly
        if not accepts(got, kinds[col]):
            raise RequestError(f"column '{col}' has type {table.schema.field(col).type} ({got}); "
                               f"the model expects {' or '.join(sorted(kinds[col]))}")
    if REQUEST_ID in table.column_names:
        table = _request_ids(table)
    _, bad = split_valid(table, schema, check_labels=False, request_groups=request_groups)
    if bad.num_rows:
        raise RequestError(f"{bad.num_rows} invalid request row(s), first: {bad.column(REASON)[0].as_py()}")
    try:
        return to_canonical(table, schema, with_labels=False, keep=(REQUEST_ID,))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
        raise RequestError(f"request columns do not convert to the model's types: {e}") from None


def _request_ids(table: pa.Table) -> pa.Table:
    """A request's ``request_id`` column as int64 or string: JSON nulls only → dropped (every row
    on its own), whole floats (pandas turns ints with a null into floats) → int64."""
    ids = table.column(REQUEST_ID)
    if pa.types.is_null(ids.type):
        return table.drop_columns([REQUEST_ID])
    kind = _kind(ids.type)
    if kind == "float":
        values = ids.to_numpy(zero_copy_only=False)
        if not np.all(np.isnan(values) | (values == np.round(values))):
            raise RequestError(f"column '{REQUEST_ID}' has fractional values; request ids are int or string")
        ids, kind = ids.cast(pa.int64(), safe=False), "int"  # NaN stays null
    if kind not in ("int", "string"):
        raise RequestError(f"column '{REQUEST_ID}' has type {ids.type}; request ids are int or string")
    return table.set_column(table.column_names.index(REQUEST_ID), REQUEST_ID, ids)


class TokenrecPyfunc(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: a DataFrame of log rows → one probability column per task, computed by the
    exported program (``model.pt2``); rows with a ``request_id`` column are grouped into requests
    and each request's candidates scored against its prefix, computed once (``candidates.pt2``,
    when the tower has one). A bad request raises an ``MlflowException`` with
    ``INVALID_PARAMETER_VALUE``, which ``mlflow models serve`` answers with HTTP 400 and the
    message; the server keeps serving."""

    def load_context(self, context) -> None:
        export = Path(context.artifacts["export"])
        self.program, self.schema, self.max_rows = load_program(export)
        self.candidates, self.candidate_groups = load_candidate_program(export)

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        """Rows in the log format; label columns may be present and are ignored. A request is
        answered whole or not at all."""
        try:
            if not isinstance(model_input, pd.DataFrame):
                raise RequestError(f"expected rows (a DataFrame), got {type(model_input).__name__}")
            repeated = sorted({str(c) for c in model_input.columns[model_input.columns.duplicated()]})
            if repeated:
                raise RequestError(f"request has column(s) {repeated} more than once; each column once")
            try:
                table = pa.Table.from_pandas(model_input, preserve_index=False)
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise RequestError(f"request rows do not form typed columns: {e}") from None
            groups = self.candidate_groups if self.candidates is not None else None  # row by row: no prefix
            table = check_request(table, self.schema, self.max_rows, groups)
        except RequestError as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        if REQUEST_ID in table.column_names and self.candidates is not None:  # one prefix per request
            ids = table.column(REQUEST_ID)
            probs, _, _ = score_requests(self.candidates, self.program, table.drop_columns([REQUEST_ID]),
                                         self.schema, self.candidate_groups, ids)
        else:
            probs = score_table(self.program, table.drop_columns([c for c in (REQUEST_ID,)
                                                                  if c in table.column_names]), self.schema)
        return pd.DataFrame(probs.astype(np.float64), columns=list(self.schema.labels))


def register_export(export_dir: Path, tracking_uri: str, experiment: str, model_name: str,
                    artifact_root: Path, alias: str | None = None,
                    input_example: pd.DataFrame | None = None) -> int:
    """Log an export folder as the model of a new run, register it, optionally alias it;
    returns the version number (what tests and the serving benchmark need; training jobs log
    into their own run, see ``jobs.train``)."""
    client, exp_id = connect(tracking_uri, experiment, artifact_root)
    with mlflow.start_run(experiment_id=exp_id):
        info = log_pyfunc(export_dir, input_example=input_example)
    version = mlflow.register_model(info.model_uri, model_name)
    if alias:
        client.set_registered_model_alias(model_name, alias, version.version)
    return int(version.version)


def request_example(schema: FeatureSchema, files: list[Path], max_rows: int = 3) -> pd.DataFrame | None:
    """A serving request built from real log rows, for the logged model's input example: the
    first valid rows of the first of ``files`` that has any (those of its first ``request_id``,
    when the logs have one), with the columns the model reads (labels and unknown columns
    dropped). None when no file has a valid row. Reads at most 4,096 rows per file."""
    import pyarrow.parquet as pq

    needed = canonical_schema(schema, with_labels=False).names
    for path in files:
        pf = pq.ParquetFile(path)
        if pf.metadata.num_rows == 0:
            continue
        head = pa.Table.from_batches([next(pf.iter_batches(batch_size=4096))])
        has_ids = REQUEST_ID in head.column_names and not pa.types.is_null(head.schema.field(REQUEST_ID).type)
        try:
            table = to_canonical(head.select(needed + ([REQUEST_ID] if has_ids else [])), schema,
                                 with_labels=False, keep=(REQUEST_ID,) if has_ids else ())
        except (KeyError, pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            continue  # a file the data check quarantines or refuses: not an example
        good, _ = split_valid(table, schema, check_labels=False)
        if has_ids and good.num_rows:
            first = good.column(REQUEST_ID)[0]
            good = good.filter(pa.compute.equal(good.column(REQUEST_ID), first)) if first.is_valid else good
        if good.num_rows:
            return good.slice(0, max_rows).to_pandas()
    return None


def pyfunc_signature(schema: FeatureSchema):
    """The logged model's signature: its outputs (one float64 probability column per label, in
    the schema's order) and, on purpose, no input schema. MLflow enforces an input schema before
    ``predict`` runs — it drops columns it does not know (which ``check_request`` refuses by
    name), refuses missing ones with its own message and casts types — so any input schema would
    make the served model refuse or answer requests that ``predict`` treats otherwise. The one
    validation is ``check_request``; the input example shows the request format."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(outputs=Schema([ColSpec("double", label) for label in schema.labels]))


def log_pyfunc(export_dir: Path, pip_requirements: list[str] | None = None,
               input_example: pd.DataFrame | None = None):
    """Log the export folder as an MLflow pyfunc in the active run; returns ModelInfo. The
    requirements default to the lock file (``REQUIREMENTS``). The model gets the signature of
    ``pyfunc_signature`` and ``input_example`` (e.g. ``request_example``), which MLflow checks
    by serving it through the logged model before this returns.

    MLflow's own check of the pinned requirements (a ``pip install --dry-run`` against PyPI,
    ~30 s of CPU per model) is skipped: they are the lock file ``make install`` resolved."""
    root = Path(__file__).resolve().parents[1]
    os.environ.setdefault("MLFLOW_SKIP_PIP_REQUIREMENTS_CHECK", "true")
    schema = FeatureSchema.from_dict(json.loads((Path(export_dir) / "config.json").read_text())["schema"])
    return mlflow.pyfunc.log_model(
        name="model",
        python_model=TokenrecPyfunc(),
        artifacts={"export": str(export_dir)},
        code_paths=[str(root / p) for p in PACKAGES],
        pip_requirements=pip_requirements or REQUIREMENTS.read_text().split(),
        signature=pyfunc_signature(schema),
        input_example=input_example,
    )

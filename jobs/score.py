"""Batch scoring: a registered model's predictions over days of logs, written as Parquet by Ray Data.

    tokenrec score --model models:/tokenrec-ranker@champion --data LOGS --days D..E --out PATH

The model is the version's exported inference program (``deploy.export``: ``model.pt2`` and the
schema it was trained on). Rows go through the same reader and validation as training
(``pipeline.source.read_logs``): bad rows are quarantined under the work folder with their
reason, never scored and never dropped silently; ``rows_in = rows_scored + rows_quarantined`` is
checked. Each output row carries the row's request id (when the logs have one), user id,
timestamp, single-valued id fields and labels (when the logs have them) and one ``p_<task>``
probability per task.

Logs with a ``request_id`` column (several candidate rows per request) are scored with the
export's shared-prefix program when it has one (``deploy.candidates``): each request's prefix is
computed once per chunk read; a request whose rows disagree on a request-level column is
quarantined with the reason (``pipeline.requests``), never scored from one row's prefix.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deploy.candidates import load_candidate_program, score_requests
from deploy.export import load_program, score_table
from embedding import storage
from embedding.schema import FeatureSchema
from jobs.tracking import default_tracking_uri, redact
from pipeline.days import day_files, parse_days
from pipeline.source import read_logs
from pipeline.validate import REASON, REQUEST_ID, QuarantineWriter, canonical_schema, check_files, count_quarantined


@dataclass(frozen=True, kw_only=True)
class ScoreRequest:
    model_uri: str
    data_root: Path | str
    days: str
    out: Path | str  # a local folder or an object-store URI
    workdir: Path | str = Path(".tokenrec")
    tracking_uri: str | None = None
    address: str | None = None
    batch_size: int = 4096
    num_actors: int = 2


def find_export(model_dir: Path) -> Path:
    """The export folder (``model.pt2`` + ``config.json``) inside a downloaded MLflow model."""
    found = sorted(p.parent for p in Path(model_dir).rglob("model.pt2") if (p.parent / "config.json").exists())
    if not found:
        raise FileNotFoundError(f"{model_dir} holds no exported program (model.pt2 + config.json); "
                                f"was the model registered by `tokenrec train`?")
    return found[0]


def output_columns(schema: FeatureSchema, present: list[str]) -> list[str]:
    keep = [REQUEST_ID, schema.user_id, schema.ts] + [f.name for f in schema.sparse if not f.multi_valued]
    keep += [label for label in schema.labels if label in present]
    return list(dict.fromkeys(c for c in keep if c in present))


class Scorer:
    """Ray Data actor: loads the program once, scores canonical row blocks."""

    def __init__(self, export_dir: str, model_uri: str, tracking_uri: str, quarantine_dir: str) -> None:
        import torch

        torch.set_num_threads(1)
        path = Path(export_dir)
        if not (path / "model.pt2").exists():  # another node: fetch the model here
            mlflow.set_tracking_uri(tracking_uri)
            path = find_export(Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri)))
        self.program, self.schema, _ = load_program(path)
        self.candidates, self.groups = load_candidate_program(path)
        self.quarantine = QuarantineWriter(self.schema, quarantine_dir)

    def __call__(self, table: pa.Table) -> pa.Table:
        if REQUEST_ID in table.column_names and self.candidates is not None:  # one prefix per request
            probs, bad, reasons = score_requests(self.candidates, self.program, table.drop_columns([REQUEST_ID]),
                                                 self.schema, self.groups, table.column(REQUEST_ID))
            if bad.any():  # a request whose rows reached this block from two files: never one row's prefix
                ids = table.column(REQUEST_ID).to_pylist()
                self.quarantine.write(table.filter(pa.array(bad)).append_column(
                    REASON, pa.array([reasons[ids[i]] for i in np.flatnonzero(bad)])), table)
                table, probs = table.filter(pa.array(~bad)), probs[~bad]
        else:
            probs = score_table(self.program, table.select(canonical_schema(self.schema).names), self.schema)
        out = table.select(output_columns(self.schema, table.column_names))
        for i, label in enumerate(self.schema.labels):
            out = out.append_column(f"p_{label}", pa.array(probs[:, i].astype("float64")))
        return out


def run_score(req: ScoreRequest, log=print) -> dict:
    t0 = time.perf_counter()
    if storage.names(req.out) if storage.is_uri(req.out) else (Path(req.out).exists() and any(Path(req.out).iterdir())):
        raise FileExistsError(f"--out {req.out} exists and is not empty; choose a new folder")
    tracking_uri = req.tracking_uri or default_tracking_uri(req.workdir)
    mlflow.set_tracking_uri(tracking_uri)
    scratch = tempfile.mkdtemp(prefix="tokenrec-score-")  # the model's local copy, removed at the end
    try:
        return _score(req, tracking_uri, scratch, t0, log)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _score(req: ScoreRequest, tracking_uri: str, scratch: str, t0: float, log) -> dict:
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=req.model_uri, dst_path=scratch))
    except Exception as e:  # noqa: BLE001 - unknown name, alias, version or an unreachable store
        raise RuntimeError(f"cannot load {req.model_uri} from {redact(tracking_uri)}: {e}") from None
    export_dir = find_export(local)
    _, schema, _ = load_program(export_dir)
    _, groups = load_candidate_program(export_dir)
    if not (export_dir / "candidates.pt2").exists():
        groups = None  # this tower scores rows one by one: request ids change nothing
    days = parse_days(req.days)
    files = day_files(req.data_root, days, log=log)
    rows_in = check_files(files, schema)  # schema problems stop here, naming the file and column
    log(f"scoring {req.model_uri} on {days[0]}..{days[-1]}: {len(files)} files, {rows_in:,} rows, "
        f"{req.num_actors} actors")

    from jobs.train import init_ray

    init_ray(req.address, req.num_actors)
    quarantine = storage.under(req.workdir, "score-quarantine", time.strftime("%Y%m%dT%H%M%S"))
    ds = read_logs(files, schema, quarantine, request_groups=groups).map_batches(
        Scorer, fn_constructor_args=(str(export_dir), req.model_uri, tracking_uri, str(quarantine)),
        batch_size=req.batch_size, batch_format="pyarrow", concurrency=req.num_actors, num_cpus=1)
    out = storage.under(req.out)
    if not storage.is_uri(out):
        out.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(out))  # Ray Data's writers: a local folder or an object-store URI
    written = [storage.child(out, rel) for rel in storage.files_under(out) if rel.endswith(".parquet")]
    rows_scored = sum(storage.retry(lambda f=f: pq.read_metadata(str(f)).num_rows, f"reading {f}") for f in written)
    rows_quarantined, reasons = count_quarantined(quarantine)
    if rows_in != rows_scored + rows_quarantined:
        raise RuntimeError(f"row accounting broken: {rows_in} rows in, {rows_scored} scored, "
                           f"{rows_quarantined} quarantined")
    # the commit marker, written last (as for exports, embedding/storage.publish): Ray Data's
    # writers put the files in place one by one, so a reader waits for it before trusting the folder
    storage.write_text(storage.join(out, storage.MARKER), json.dumps(
        {"files": [rel for rel in storage.files_under(out) if rel.endswith(".parquet")],
         "rows_scored": rows_scored, "model": req.model_uri}, indent=1))
    seconds = time.perf_counter() - t0
    log(f"wrote {rows_scored:,} predictions in {len(written)} files to {req.out} in {seconds:.0f}s "
        f"({rows_scored / max(seconds, 1e-9):,.0f} rows/s)")
    if rows_quarantined:
        log(f"quarantined {rows_quarantined:,} rows into {quarantine}: {reasons}")
    return {"rows_in": rows_in, "rows_scored": rows_scored, "rows_quarantined": rows_quarantined,
            "files": [str(f) for f in written], "seconds": seconds}

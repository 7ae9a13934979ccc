"""``tokenrec analyze --run ID [--run ID2 …]``: collapse diagnostics of trained runs.

For each run: rebuild its exported model, take a held-out batch of its evaluation day, compute
per-layer effective rank, spectrum, cluster MI and field-attention mass (``model.diagnostics``),
and log ``diagnostics.json`` + ``diagnostics.png`` (all given runs on one plot) to the run.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from mlflow.tracking import MlflowClient

from deploy.export import load_servable
from embedding import storage
from model.diagnostics import analyze, plot
from pipeline.collate import collate
from pipeline.days import day_files, parse_days
from pipeline.validate import expected_kinds, split_valid


def held_out_batch(schema, data_root: Path, day: str, rows: int):
    columns = list(expected_kinds(schema))
    tables, have = [], 0
    for path in day_files(data_root, parse_days(day)):
        good, _ = split_valid(pq.read_table(path, columns=columns), schema)
        tables.append(good)
        have += good.num_rows
        if have >= rows:
            break
    return collate(pa.concat_tables(tables).slice(0, rows), schema)


def run_analyze(run_ids: list[str], tracking_uri: str, rows: int = 2048, log=print) -> dict:
    client = MlflowClient(tracking_uri)
    reports, dirs = {}, {}
    for run_id in run_ids:
        tags = client.get_run(run_id).data.tags
        if "tokenrec.export" not in tags:
            raise ValueError(f"run {run_id} has no exported model (tag tokenrec.export); was it a train run?")
        export = tags["tokenrec.export"]
        with storage.fetched(export) as local:  # object storage: a temporary download
            model, schema = load_servable(local / "model.pt", local / "config.json")
        batch = held_out_batch(schema, storage.location(tags["tokenrec.data_root"]), tags["tokenrec.eval_day"], rows)
        name = f"{tags.get('tokenrec.tower', 'model')} {run_id[:8]}"
        reports[name] = analyze(model, batch)
        # beside the export on a local work folder; only on the run (MLflow) on object storage
        dirs[name] = (run_id, None if storage.is_uri(export) else Path(export).parent / "diagnostics")
        for layer in reports[name]["layers"]:
            log(f"{name} layer {layer['layer']} (window {layer['window']}): effective rank "
                f"{layer['effective_rank']:.2f}, MI(K=16) {layer.get('mi_k16', float('nan')):.4f}, "
                f"field attention {layer['field_attention_mass']}")
    for name, (run_id, out) in dirs.items():
        scratch = out is None
        out = Path(tempfile.mkdtemp(prefix="tokenrec-diagnostics-")) if scratch else out
        out.mkdir(parents=True, exist_ok=True)
        (out / "diagnostics.json").write_text(json.dumps(reports[name], indent=1))
        plot(reports, out / "diagnostics.png")
        client.log_artifacts(run_id, str(out), "diagnostics")
        if scratch:
            shutil.rmtree(out, ignore_errors=True)
        for layer in reports[name]["layers"]:
            client.log_metric(run_id, "effective_rank", layer["effective_rank"], step=layer["layer"])
    return reports

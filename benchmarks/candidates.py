"""Serving many candidates for one user (issue 16): shared-prefix scoring against C independent rows.

    .venv/bin/python benchmarks/candidates.py [--out benchmarks/results/candidates.json] [--repeats 15]

The demo layout (``configs/demo_world.toml`` schema: 13 field tokens + a dense token, 32 behaviour
slots, one target token per ``item`` field — item_id, item_category, item_tags — so 51 tokens a
row) with the TokenFormer tower of the demo's ``[model.tokenformer]`` defaults (d 64, 4 heads,
2F2S windows (32, 16)), weights as
initialised (time does not depend on them). One generated request of 1,000 candidates (one user,
one context, one history; ``generator.candidates_per_request``); its first C rows for
C = 1, 16, 128, 1,000:

* exported programs, in this process, one thread: the per-row program (``model.pt2``, already
  trimmed to the receptive field) on the C rows, against the shared-prefix program
  (``candidates.pt2``: the prefix once, C candidates against its cache), interleaved rounds,
  median;
* ``mlflow models serve`` (one uvicorn worker, 127.0.0.1): the same C rows as one
  ``dataframe_records`` request without and with a ``request_id`` column (per row vs shared
  prefix), round-trip median.

Check: shared-prefix ≥ 10× faster than per-row at C = 1,000, both exported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serving import mlflow_serve  # noqa: E402

NAME = "tokenrec-candidates"
SIZES = (1, 16, 128, 1000)


def _median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _post(port: int, body: bytes) -> float:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.status == 200
        r.read()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/candidates.json")
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    from deploy.candidates import load_candidate_program, score_request
    from deploy.export import export_model, load_program, register_export, score_table
    from jobs.config import load_config
    from model.ranking import RankingModel
    from pipeline.days import parse_days
    from pipeline.generator import generate
    from pipeline.validate import REQUEST_ID, to_canonical

    torch.set_num_threads(1)
    cfg = load_config(ROOT / "configs/demo_world.toml", ["model.tower=tokenformer", "generator.rows_per_day=1000",
                                                    "generator.files_per_day=1",
                                                    "generator.candidates_per_request=1000"])
    tmp = Path(tempfile.mkdtemp(prefix="tokenrec-candidates-"))
    generate(cfg.schema, cfg.generator, tmp / "data", parse_days("2026-01-01"), log=lambda *_: None)
    rows = pq.read_table(next((tmp / "data").glob("day=*/*.parquet"))).drop_columns(["click", "p_true"])
    torch.manual_seed(0)
    model = RankingModel(cfg.schema, cfg.model).eval()
    export = export_model(model, tmp / "export")
    program, schema, _ = load_program(export)
    cand_program, _ = load_candidate_program(export)
    tower = model.tower
    layout = {"tokens_per_row": tower.num_prefix_tokens + cfg.schema.sequences[0].max_len + 1
              + tower.num_target_tokens, "target_tokens": tower.num_target_tokens,
              "field_tokens": tower.num_field_tokens, "schedule": f"{cfg.model.tokenformer.num_full_layers}F"
              f"{len(cfg.model.tokenformer.windows)}S {list(cfg.model.tokenformer.windows)}"}
    print(f"layout: {layout}")
    canon = to_canonical(rows, schema, with_labels=False)
    exported = {}
    print(f"{'C':>5} {'per-row ms':>11} {'shared ms':>10} {'speedup':>8}")
    for C in SIZES:
        part = canon.slice(0, C)
        per_row, shared = [], []
        for _ in range(max(3, a.repeats // (1 + C // 200))):
            per_row.append(_median_time(lambda part=part: score_table(program, part, schema), 1))
            shared.append(_median_time(lambda part=part: score_request(cand_program, part.slice(0, 1), part,
                                                                       schema), 1))
        got = score_request(cand_program, part.slice(0, 1), part, schema)
        want = score_table(program, part, schema)
        assert np.allclose(got, want, rtol=1e-4, atol=1e-5), "shared-prefix scores differ from per-row"
        exported[str(C)] = {"per_row_s": statistics.median(per_row), "shared_prefix_s": statistics.median(shared),
                            "speedup": statistics.median(per_row) / statistics.median(shared)}
        e = exported[str(C)]
        print(f"{C:>5} {e['per_row_s'] * 1e3:>11.2f} {e['shared_prefix_s'] * 1e3:>10.2f} {e['speedup']:>8.1f}x")

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    register_export(export, uri, "candidates", NAME, tmp / "mlartifacts", alias="champion")
    http = {}
    with mlflow_serve(uri, f"models:/{NAME}@champion") as port:
        for C in SIZES:
            part = rows.slice(0, C)
            with_id = json.dumps({"dataframe_records": part.to_pylist()}).encode()
            without = json.dumps({"dataframe_records": part.drop_columns([REQUEST_ID]).to_pylist()}).encode()
            n = max(3, a.repeats // (1 + C // 200))
            per_row = [_post(port, without) for _ in range(n + 1)][1:]
            shared = [_post(port, with_id) for _ in range(n + 1)][1:]
            http[str(C)] = {"per_row_s": statistics.median(per_row), "shared_prefix_s": statistics.median(shared),
                            "speedup": statistics.median(per_row) / statistics.median(shared)}
            h = http[str(C)]
            print(f"HTTP {C:>5}: per-row {h['per_row_s'] * 1e3:.1f} ms, shared prefix "
                  f"{h['shared_prefix_s'] * 1e3:.1f} ms, {h['speedup']:.1f}x", flush=True)
    speedup = exported["1000"]["speedup"]
    checks = {"shared_prefix_speedup_C1000_exported": {"value": speedup, "target": ">= 10", "met": speedup >= 10},
              "shared_prefix_speedup_C1000_http": {"value": http["1000"]["speedup"], "target": "(context)",
                                                   "met": True}}
    for k, c in checks.items():
        print(f"{k:<40} {c['value']:>7.1f}  target {c['target']}: {'met' if c['met'] else 'MISSED'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "candidates", "config": "configs/demo_world.toml", "tower": "tokenformer", "layout": layout,
        "threads_in_process": 1, "exported_programs": exported, "http": http, "checks": checks,
        "server": "mlflow models serve --env-manager local (uvicorn, 1 worker), 127.0.0.1",
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()

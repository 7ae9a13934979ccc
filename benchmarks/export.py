"""Export time of wide schemas: ``torch.export`` of the demo's TokenFormer (``configs/demo.toml``,
516 sparse fields on 21 tables, managed-collision and id-space tables) and of the same model with
a quarter of its context fields, side by side in one run.

    .venv/bin/python benchmarks/export.py

Each width: the per-row program (``deploy.export.export_program``) and the shared-prefix
candidate program (``deploy.candidates.export_candidate_program``), traced and saved
(``torch.export.save``), on the untrained model (trace time does not depend on the weights).
Before issue 18's fix the trace was quadratic in the number of fields (each field's offset a sum
of the previous fields' data-dependent sizes: ~10 minutes for 516 fields); the check asks for
near-linear growth. Writes benchmarks/results/export.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def time_export(overrides: list[str]) -> dict:
    from deploy.candidates import export_candidate_program
    from deploy.export import export_program
    from jobs.config import load_config
    from model.ranking import RankingModel

    cfg = load_config(ROOT / "configs/demo.toml", overrides)
    torch.manual_seed(0)
    model = RankingModel(cfg.schema, cfg.model).eval()
    out = {"fields": len(cfg.schema.sparse), "tables": len(cfg.schema.tables)}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("program", export_program), ("candidates", export_candidate_program)):
            t0 = time.perf_counter()
            ep = fn(model)
            t1 = time.perf_counter()
            torch.export.save(ep, Path(tmp) / f"{name}.pt2")
            out[f"{name}_trace_s"] = round(t1 - t0, 2)
            out[f"{name}_save_s"] = round(time.perf_counter() - t1, 2)
            out[f"{name}_nodes"] = len(ep.graph.nodes)
    out["total_s"] = round(sum(v for k, v in out.items() if k.endswith("_s")), 2)
    return out


def main() -> None:
    narrow = time_export(['schema.sparse_groups=[{prefix="ctx", count=128, num_tables=16, hash_size=4000, dim=16}]'])
    wide = time_export([])
    growth = wide["total_s"] / narrow["total_s"]
    field_ratio = (wide["fields"]) / narrow["fields"]
    result = {
        "benchmark": "export", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(), "torch": torch.__version__, "narrow": narrow, "wide": wide,
        "growth": round(growth, 2), "field_ratio": round(field_ratio, 2),
        "checks": {
            f"the demo model (516 fields) exports in under 60 s: {wide['total_s']} s": wide["total_s"] < 60,
            f"export time grows at most linearly with the fields ({growth:.2f}× for {field_ratio:.2f}× the fields)":
                growth <= field_ratio,
        },
    }
    path = ROOT / "benchmarks/results/export.json"
    path.write_text(json.dumps(result, indent=1))
    for k in ("narrow", "wide"):
        print(k, result[k])
    for check, ok in result["checks"].items():
        print(("met     " if ok else "MISSED  ") + check)


if __name__ == "__main__":
    main()

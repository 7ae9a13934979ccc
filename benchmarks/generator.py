"""Generator throughput: rows/s for a 100-field schema on one core (target: >= 100k rows/s).

    .venv/bin/python benchmarks/generator.py [--rows 200000] [--out benchmarks/results/generator.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from embedding.schema import FeatureSchema, load_schema
from pipeline.generator import GeneratorConfig, World

ROOT = Path(__file__).resolve().parents[1]


def schema_with_fields(num_fields: int) -> FeatureSchema:
    d = load_schema(ROOT / "configs/demo_world.toml").to_dict()
    d["sparse"] = d["sparse"][:4] + [{"name": f"f_{i}", "table": "ctx_t0"} for i in range(num_fields - 4)]
    d["tables"]["ctx_t0"] = {"hash_size": 1000, "dim": 16}
    return FeatureSchema.from_dict(d)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--fields", type=int, default=100)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/generator.json")
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    world = World(schema_with_fields(a.fields), GeneratorConfig(rows_per_day=a.rows))
    world.day_rows(0)  # warm-up
    best = float("inf")
    for day in (1, 2, 3):
        t0 = time.process_time()
        world.day_rows(day)
        best = min(best, time.process_time() - t0)
    result = {"benchmark": "generator", "fields": a.fields, "rows": a.rows,
              "cpu_seconds": round(best, 3), "rows_per_s": round(a.rows / best),
              "target_rows_per_s": 100_000, "meets_target": a.rows / best >= 100_000,
              "machine": f"{platform.machine()} {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    print(f"{'fields':>8} {'rows':>9} {'cpu s':>7} {'rows/s':>10}  target 100k")
    verdict = "ok" if result["meets_target"] else "MISS"
    print(f"{a.fields:>8} {a.rows:>9} {best:>7.2f} {a.rows / best:>10.0f}  {verdict}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

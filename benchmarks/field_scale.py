"""Field scale: 100, 1,000 and 5,000 sparse fields (plus the behaviour sequence), TokenFormer tower.

    .venv/bin/python benchmarks/field_scale.py [--fields 100 1000 5000] [--rows 4096]

The demo schema with its ``ctx`` sparse group widened to N fields sharing N/50 tables (5,000
ids each), the TokenFormer tower (fields grouped into 32 field tokens), generated rows. Per N, in
2 gloo processes (the way the training workers run):

* planner + sharding time (``embedding.sharding.shard``: plan, DMP, fused optimizer);
* peak resident memory per worker (``ru_maxrss`` after the steps);
* collate time per batch (a 512-row pyarrow slice → ``Batch`` of KJTs), median;
* step time (forward, backward, optimizer), median over the steps after 2 warm-up steps;
* and for the largest N a real ``run_train`` (Ray Data + Ray Train, MLflow) stopped after 3
  steps: seconds from the call to the first finished training step ("starts training").

Targets (issue 7): step time from 1,000 to 5,000 fields grows at most 5×; 5,000 fields start
training in under 2 minutes. Writes benchmarks/results/field_scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.config import JobConfig, apply_override, config_from_doc  # noqa: E402


def scaled_config(n_fields: int, rows: int, overrides: list[str] = ()) -> JobConfig:
    """demo_world.toml with the ``ctx`` group widened to ``n_fields`` fields over n/50 tables."""
    doc = tomllib.loads((ROOT / "configs/demo_world.toml").read_text())
    (group,) = [g for g in doc["schema"]["sparse_groups"] if g["prefix"] == "ctx"]
    group.update(count=n_fields, num_tables=max(1, n_fields // 50), hash_size=5000)
    for o in ["model.tower=tokenformer", f"generator.rows_per_day={rows}", "generator.files_per_day=1",
              "train.epochs=1", *overrides]:
        apply_override(doc, o)
    return config_from_doc(doc, f"demo_world.toml with {n_fields} ctx fields")


def _worker(rank: int, world_size: int, cfg: JobConfig, data: str, steps: int, out: str) -> None:
    import pyarrow.parquet as pq

    from embedding.sharding import dense_optimizer, shard
    from model.ranking import RankingModel, RankingTrain
    from pipeline.collate import collate
    from pipeline.validate import to_canonical

    tc, schema = cfg.train, cfg.schema
    table = to_canonical(pq.read_table(data), schema)
    bs = tc.batch_size
    slices = [table.slice(i, bs) for i in range(rank * bs, table.num_rows - bs + 1, world_size * bs)]
    collate_s, batches = [], []
    for s in slices:
        t0 = time.perf_counter()
        batches.append(collate(s, schema))
        collate_s.append(time.perf_counter() - t0)
    torch.manual_seed(tc.seed)
    t0 = time.perf_counter()
    model = RankingTrain(RankingModel(schema, cfg.model, sparse_device=torch.device("meta"),
                                      num_shards=world_size))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    dmp = shard(model, tc.sharding, torch.device("cpu"))
    opt = dense_optimizer(dmp, tc.sharding)
    shard_s = time.perf_counter() - t0
    step_s = []
    for j in range(steps + 2):
        t0 = time.perf_counter()
        loss, _ = dmp(batches[j % len(batches)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step_s.append(time.perf_counter() - t0)
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "build_seconds": build_s, "plan_and_shard_seconds": shard_s,
        "collate_seconds_median": statistics.median(collate_s), "step_seconds": step_s[2:],
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "dense_params": sum(p.numel() for n, p in model.named_parameters() if "tower" in n)}))


def measure(n: int, workdir: Path, rows: int, steps: int) -> dict:
    from pipeline.days import parse_days
    from pipeline.generator import generate
    from tests.distributed.harness import run_multiprocess

    cfg = scaled_config(n, rows)
    data = workdir / f"data{n}"
    t0 = time.perf_counter()
    if not data.exists():
        generate(cfg.schema, cfg.generator, data, parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    gen_s = time.perf_counter() - t0
    out = workdir / f"out{n}"
    out.mkdir(exist_ok=True)
    run_multiprocess(_worker, 2, cfg, str(next((data / "day=2026-01-01").glob("*.parquet"))), steps, str(out))
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    step = statistics.median(max(a, b) for a, b in zip(ranks[0]["step_seconds"], ranks[1]["step_seconds"]))
    return {"fields": n, "tables": len(cfg.schema.tables), "generate_seconds": gen_s,
            "plan_and_shard_seconds": max(r["plan_and_shard_seconds"] for r in ranks),
            "model_build_seconds": max(r["build_seconds"] for r in ranks),
            "peak_rss_gib_per_worker": max(r["peak_rss_gib"] for r in ranks),
            "collate_seconds_per_batch": max(r["collate_seconds_median"] for r in ranks),
            "step_seconds": step, "dense_params": ranks[0]["dense_params"]}


def start_training(n: int, workdir: Path, rows: int) -> dict:
    """A real job on ``n`` fields, stopped after 3 steps: seconds from the call to the first step."""
    from jobs.train import TrainRequest, run_train

    cfg = scaled_config(n, rows, ["train.max_steps=3"])
    t_call = time.time()
    m = run_train(cfg, TrainRequest(days="2026-01-01", data_root=workdir / f"data{n}", workdir=workdir / "job",
                                    register=False), log=lambda *_: None)
    return {"fields": n, "seconds_to_first_step": m["first_step_time"] - t_call,
            "job_wall_seconds": time.time() - t_call}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", type=int, nargs="+", default=[100, 1000, 5000])
    ap.add_argument("--rows", type=int, default=4096, help="generated rows (a day); 512 per batch per worker")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokenrec-field-scale")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/field_scale.json")
    a = ap.parse_args()
    a.workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows = []
    print(f"{'fields':>6} {'tables':>6} {'plan+shard s':>12} {'peak GiB':>9} {'collate ms':>10} {'step ms':>9}")
    for n in a.fields:
        r = measure(n, a.workdir, a.rows, a.steps)
        rows.append(r)
        print(f"{n:>6} {r['tables']:>6} {r['plan_and_shard_seconds']:>12.2f} {r['peak_rss_gib_per_worker']:>9.2f} "
              f"{r['collate_seconds_per_batch'] * 1e3:>10.1f} {r['step_seconds'] * 1e3:>9.1f}", flush=True)
    job = start_training(max(a.fields), a.workdir, a.rows)
    print(f"{max(a.fields)} fields: first training step {job['seconds_to_first_step']:.1f}s after run_train was called")
    by = {r["fields"]: r for r in rows}
    checks = {}
    if 1000 in by and 5000 in by:
        g = by[5000]["step_seconds"] / by[1000]["step_seconds"]
        checks["step_growth_1000_to_5000"] = {"value": g, "target": "<= 5", "met": g <= 5}
    checks["seconds_to_first_step_max_fields"] = {"value": job["seconds_to_first_step"], "target": "< 120",
                                                  "met": job["seconds_to_first_step"] < 120}
    for k, v in checks.items():
        print(f"{k:<36} {v['value']:>8.2f}  target {v['target']}: {'met' if v['met'] else 'MISSED'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "field_scale", "tower": "tokenformer", "rows": rows, "start_training": job,
        "checks": checks, "seconds": time.perf_counter() - t_start,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()

"""Throughput: the input pipeline and the full job, each against its bound, side by side in one run.

    .venv/bin/python benchmarks/throughput.py [--workdir /tmp/tokenrec-throughput] [--days 2] [--rows-per-day 150000]

Four rates on the same generated demo logs (``configs/demo_world.toml``: managed-collision user/item
tables, a 50-long behaviour sequence, the DLRM tower, 512 rows per worker batch):

A. **upper bound**: one process reads the files with pyarrow and decodes every column to numpy
   (lists as flat values + offsets) — no validation, no KJTs;
B. **pipeline**: 2 consumers (long-lived Ray actors, one CPU each, like Ray Train's workers),
   each streaming ``pipeline.source.read_logs`` (Ray Data: read, validate, quarantine) over the
   files dealt to it and cutting every batch into a ``Batch`` of KJTs
   (``pipeline.collate.collate_blocks``) — what each training worker does
   (``pipeline.source.UnequalSplit``); also split into start-up and the steady rate after it;
C. **pre-built batches**: the demo model sharded by DMP over 2 gloo processes and trained from
   batches collated in memory before the clock starts (``embedding.sharding.shard``, the same
   optimizers and the same step as ``jobs.worker``): what the step alone can consume;
D. **full job**: ``jobs.train.run_train`` (Ray Data + Ray Train + DMP, 2 workers, MLflow), the
   workers' training rate: rows trained over the time from the model being ready to the last
   step, the clock C uses (the worker opens its data stream before building the model, so the
   stream's start-up overlaps it; time spent waiting for data after that is inside the clock).

B0. **Ray Data with no work**: B's stream on the same consumers, the read tasks only reading the
   files and the consumers only taking the blocks — what Ray Data itself costs here.

CPU per row (every process on the machine, from ``/proc``) is recorded for A, B and B0, and the
pipeline's own work besides the read (validate, collate) once in one process with no Ray; B0's CPU plus that
work, spread over every core, is the best B this machine allows (``pipeline_cpu_bound``).

Targets (issue 7): B ≥ 50% of A; B ≥ 3× C (training is never input-bound); D ≥ 85% of C.
Writes benchmarks/results/throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jobs.config import JobConfig, load_config  # noqa: E402
from pipeline.days import day_files, next_day, parse_day  # noqa: E402
from pipeline.generator import generate  # noqa: E402
from pipeline.validate import expected_kinds  # noqa: E402


def decode_numpy(table: pa.Table) -> int:
    """Every column to numpy; list columns as flat values and offsets. Returns the values touched."""
    n = 0
    for col in table.columns:
        arr = col.combine_chunks()
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            n += len(pc.list_flatten(arr).to_numpy(zero_copy_only=False))
            n += len(arr.offsets.to_numpy())
        else:
            n += len(arr.to_numpy(zero_copy_only=False))
    return n


def upper_bound(files: list[Path], columns: list[str]) -> tuple[int, float, dict]:
    t0, c0 = time.perf_counter(), time.process_time()
    rows = 0
    for f in files:
        table = pq.read_table(f, columns=columns)
        decode_numpy(table)
        rows += table.num_rows
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0  # pyarrow's reader threads included
    return rows, seconds, {"cpu_us_per_row": cpu / rows * 1e6, "cores_busy": cpu / seconds}


def start_consumers(n: int) -> list:
    """B's consumers: long-lived Ray actors (one CPU each), as Ray Train's workers are."""
    import ray

    @ray.remote(num_cpus=1)
    class Consumer:
        def __init__(self) -> None:
            torch.set_num_threads(1)

        def consume(self, mine: list[Path], schema, batch_size: int, quarantine: Path) -> list[tuple[float, int]]:
            from pipeline.collate import collate_blocks
            from pipeline.source import read_logs

            done = []  # (time, rows) per batch
            ds = read_logs(mine, schema, quarantine)
            blocks = ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
            for batch, _ in collate_blocks(blocks, schema, batch_size):  # as jobs.worker does
                done.append((time.time(), batch.size))
            return done

        def floor(self, mine: list[Path], columns: list[str]) -> list[tuple[float, int]]:
            """B0: the same Ray Data stream (read tasks, blocks, 2 consumers) with no work in
            it: the read tasks only read the files, the consumer only takes the blocks."""
            import pyarrow.parquet as pq
            import ray.data

            from pipeline.source import READ_TASKS, chunk_rows

            def read(paths):
                for path in paths.column("path").to_pylist():
                    with pq.ParquetFile(path) as f:
                        for rb in f.iter_batches(batch_size=chunk_rows(len(columns)), columns=columns):
                            yield pa.Table.from_batches([rb])

            items = [{"path": str(f)} for f in mine]
            ds = ray.data.from_items(items, override_num_blocks=min(len(items), READ_TASKS)).map_batches(
                read, batch_format="pyarrow", batch_size=None, zero_copy_batch=True)
            ds.context.enable_progress_bars = False  # as read_logs
            return [(time.time(), b.num_rows) for b in
                    ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)]

    return [Consumer.remote() for _ in range(n)]


def cpu_seconds() -> float:
    """User + system CPU seconds of every process on the machine so far (Linux ``/proc``)."""
    total = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue  # the process ended meanwhile
            total += int(stat[11]) + int(stat[12])
    return total / os.sysconf("SC_CLK_TCK")


def floor_rate(consumers: list, files: list[Path], columns: list[str]) -> tuple[int, float, dict]:
    """B0: the Ray Data stream with no work in it (``Consumer.floor``), and its CPU per row."""
    import ray

    from pipeline.source import deal_files

    c0, t0 = cpu_seconds(), time.time()
    out = ray.get([c.floor.remote(mine, columns) for c, mine in zip(consumers, deal_files(files, len(consumers)))])
    end, cpu = max(t for o in out for t, _ in o), cpu_seconds() - c0
    rows = sum(n for o in out for _, n in o)
    return rows, end - t0, {"cpu_us_per_row": cpu / rows * 1e6}


def work_per_row(files: list[Path], cfg: JobConfig) -> dict:
    """CPU µs per row of the pipeline's work besides the Parquet read (A's cost), in one process
    with no Ray: validation + duplicate check + quarantine (``ParquetReader``'s steps) and
    ``collate_blocks`` over the whole stream, as a worker runs it."""
    from pipeline.collate import collate_blocks
    from pipeline.row_hash import DuplicateFinder
    from pipeline.source import ParquetReader, chunk_rows
    from pipeline.validate import QuarantineWriter

    columns = list(expected_kinds(cfg.schema))
    cost = {"validate": 0.0, "collate": 0.0}
    good = []
    with tempfile.TemporaryDirectory() as q:
        reader = ParquetReader(columns, chunk_rows(len(columns)), QuarantineWriter(cfg.schema, q))
        for path in files:
            with pq.ParquetFile(path) as f:
                chunks = [pa.Table.from_batches([rb]) for rb in f.iter_batches(batch_size=reader.rows_per_block,
                                                                               columns=columns)]
            t = time.process_time()
            dup = DuplicateFinder()
            good += [reader.checked(c, str(path), dup) for c in chunks]
            cost["validate"] += time.process_time() - t
    t = time.process_time()
    rows = sum(b.size for b, _ in collate_blocks(good, cfg.schema, cfg.train.batch_size))
    cost["collate"] += time.process_time() - t
    return {k: v / rows * 1e6 for k, v in cost.items()}


def pipeline_rate(consumers: list, files: list[Path], cfg: JobConfig, quarantine: Path) -> tuple[int, float, dict]:
    """B: what the training workers do — each of 2 consumers streams its own ``read_logs`` over
    the files dealt to it (``deal_files``, as ``UnequalSplit`` does) and collates every batch.
    Also returns the start-up (call to the last consumer's first batch) and the steady rate
    after it."""
    import ray

    from pipeline.source import deal_files

    c0, t0 = cpu_seconds(), time.time()
    out = ray.get([c.consume.remote(mine, cfg.schema, cfg.train.batch_size, quarantine)
                   for c, mine in zip(consumers, deal_files(files, len(consumers)))])
    cpu = cpu_seconds() - c0
    batches = [b for o in out for b in o]
    end = max(t for t, _ in batches)
    both = max(o[0][0] for o in out if o)  # from here on both consumers have had data
    after = sum(n for t, n in batches if t > both)
    rows = sum(n for _, n in batches)
    return rows, end - t0, {"startup_seconds": both - t0, "steady_rows_per_s": after / max(end - both, 1e-9),
                            "cpu_us_per_row": cpu / rows * 1e6}


def _prebuilt_worker(rank: int, world_size: int, cfg: JobConfig, files: list[str], out: str) -> None:
    import torch.distributed as dist

    from embedding.sharding import dense_optimizer, shard, zero_miss_rows
    from model.ranking import RankingModel, RankingTrain
    from pipeline.collate import collate
    from pipeline.validate import to_canonical

    tc = cfg.train
    columns = list(expected_kinds(cfg.schema))
    table = to_canonical(pa.concat_tables([pq.read_table(f, columns=columns) for f in files]), cfg.schema)
    half = table.num_rows // world_size
    mine = table.slice(rank * half, half)
    batches = [collate(mine.slice(i, tc.batch_size), cfg.schema)
               for i in range(0, half - tc.batch_size + 1, tc.batch_size)]  # full batches only
    torch.manual_seed(tc.seed)
    model = RankingTrain(RankingModel(cfg.schema, cfg.model, sparse_device=torch.device("meta"),
                                      num_shards=world_size))
    dmp = shard(model, tc.sharding, torch.device("cpu"))
    opt = dense_optimizer(dmp, tc.sharding)
    dmp.train()
    dist.barrier()
    t0 = time.perf_counter()
    for batch in batches:  # the step of jobs.worker.train_loop
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        zero_miss_rows(dmp)
    seconds = time.perf_counter() - t0
    Path(out, f"rank{rank}.json").write_text(json.dumps(
        {"rows": len(batches) * tc.batch_size, "seconds": seconds}))


def prebuilt_rate(files: list[Path], cfg: JobConfig) -> tuple[int, float]:
    from tests.distributed.harness import run_multiprocess

    with tempfile.TemporaryDirectory() as out:
        run_multiprocess(_prebuilt_worker, 2, cfg, [str(f) for f in files], out)
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(2)]
    return sum(r["rows"] for r in ranks), max(r["seconds"] for r in ranks)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tokenrec-throughput")
    ap.add_argument("--config", type=Path, default=ROOT / "configs/demo_world.toml")
    ap.add_argument("--days", type=int, default=2)
    ap.add_argument("--rows-per-day", type=int, default=150_000)
    ap.add_argument("--repeats", type=int, default=2, help="A and B: best of this many")
    ap.add_argument("--scale-days", type=int, default=10,
                    help="A and B again over this many days (the fixed start-up's share shrinks)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/throughput.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    cfg = load_config(a.config, [f"generator.rows_per_day={a.rows_per_day}", "train.epochs=1"])
    first = parse_day("2026-01-01")
    days = [next_day(first, i) for i in range(a.days)]
    data = a.workdir / f"data-{a.rows_per_day}"
    if not (data / f"day={next_day(days[-1]).isoformat()}").exists():
        generate(cfg.schema, cfg.generator, data, days + [next_day(days[-1])], log=lambda *_: None)
    files = day_files(data, days)
    columns = list(expected_kinds(cfg.schema))
    rates: dict[str, dict] = {}

    def record(name: str, rows: int, seconds: float, extra: dict | None = None) -> None:
        rates[name] = {"rows": rows, "seconds": seconds, "rows_per_s": rows / seconds} | (extra or {})
        cpu = f" {extra['cpu_us_per_row']:5.2f} CPU us/row" if extra and "cpu_us_per_row" in extra else ""
        print(f"{name:<40} {rows:>9,} rows {seconds:>7.2f} s {rows / seconds:>11,.0f} rows/s{cpu}", flush=True)

    best = min((upper_bound(files, columns) for _ in range(a.repeats)), key=lambda r: r[1])
    record("A upper bound (pyarrow + numpy, 1 proc)", *best)
    work = work_per_row(files, cfg)
    print("  pipeline work in one process, CPU us/row: "
          + ", ".join(f"{k} {v:.2f}" for k, v in work.items()), flush=True)
    record("C pre-built batches (DMP, 2 gloo procs)", *prebuilt_rate(files, cfg))

    from jobs.train import TrainRequest, init_ray, run_train

    init_ray(None, cfg.train.num_workers)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    consumers = start_consumers(2)
    pipeline_rate(consumers, files[:2], cfg, a.workdir / "quarantine")  # warm-up, not timed: imports
    best = min((pipeline_rate(consumers, files, cfg, a.workdir / "quarantine") for _ in range(a.repeats)),
               key=lambda r: r[1])
    record("B pipeline (Ray Data, 2 consumers)", *best)
    b0 = min((floor_rate(consumers, files, columns) for _ in range(a.repeats)), key=lambda r: r[1])
    record("B0 Ray Data with no work (2 consumers)", *b0)
    print(f"  B start-up {best[2]['startup_seconds']:.2f} s, then {best[2]['steady_rows_per_s']:,.0f} rows/s",
          flush=True)
    scale = {}
    if a.scale_days > a.days:  # A and B over more rows: B's fixed start-up is then a smaller share
        more = [next_day(first, i) for i in range(a.scale_days)]
        if not (data / f"day={more[-1].isoformat()}").exists():
            generate(cfg.schema, cfg.generator, data, more[a.days + 1:], log=lambda *_: None)
        big = day_files(data, more)
        a_big = min((upper_bound(big, columns) for _ in range(a.repeats)), key=lambda r: r[1])
        b_big = min((pipeline_rate(consumers, big, cfg, a.workdir / "quarantine") for _ in range(a.repeats)),
                    key=lambda r: r[1])
        b0_big = min((floor_rate(consumers, big, columns) for _ in range(a.repeats)), key=lambda r: r[1])
        record(f"A upper bound, {a.scale_days} days", *a_big)
        record(f"B pipeline, {a.scale_days} days", *b_big)
        record(f"B0 Ray Data with no work, {a.scale_days} days", *b0_big)
        scale = {"A": rates[f"A upper bound, {a.scale_days} days"]["rows_per_s"],
                 "B": rates[f"B pipeline, {a.scale_days} days"]["rows_per_s"]}
    for c in consumers:
        ray.kill(c)
    m = run_train(cfg, TrainRequest(days=f"{days[0]}..{days[-1]}", data_root=data, workdir=a.workdir,
                                    register=False), log=lambda *_: None)
    record("D full job (Ray Train, 2 workers)", int(m["rows_trained"]), float(m["train_seconds"]))
    rates["D full job (Ray Train, 2 workers)"] |= {"job_wall_seconds": m["wall_seconds"],
                                                   "data_wait_seconds": m["data_wait_seconds"]}

    A, B, C, D = (rates[k]["rows_per_s"] for k in (
        "A upper bound (pyarrow + numpy, 1 proc)", "B pipeline (Ray Data, 2 consumers)",
        "C pre-built batches (DMP, 2 gloo procs)", "D full job (Ray Train, 2 workers)"))
    # What the cores allow at best: B0's CPU per row (the stream with the Parquet read in it)
    # plus the validation and collate work as measured in one process, every core busy.
    cores = os.cpu_count() or 1
    bound = {"cores": cores, "work_in_one_process_cpu_us_per_row": work}
    sizes = [("", "B0 Ray Data with no work (2 consumers)", A)]
    if scale:
        sizes.append((f"_{a.scale_days}_days", f"B0 Ray Data with no work, {a.scale_days} days", scale["A"]))
    for suffix, floor_key, upper in sizes:
        need = rates[floor_key]["cpu_us_per_row"] + work["validate"] + work["collate"]
        bound[f"cpu_us_per_row{suffix}"] = need
        bound[f"rows_per_s{suffix}"] = cores / need * 1e6
        bound[f"vs_upper_bound{suffix}"] = cores / need * 1e6 / upper
        print(f"  best B on {cores} cores{suffix.replace('_', ' ')}: {need:.2f} CPU us/row -> "
              f"{cores / need * 1e6:,.0f} rows/s = {cores / need * 1e6 / upper:.2f} of A", flush=True)
    checks = {
        "pipeline_vs_upper_bound": {"value": B / A, "target": ">= 0.5", "met": B / A >= 0.5},
        "pipeline_vs_training_step": {"value": B / C, "target": ">= 3", "met": B / C >= 3},
        "full_job_vs_prebuilt": {"value": D / C, "target": ">= 0.85", "met": D / C >= 0.85},
    }
    if scale:
        checks[f"pipeline_vs_upper_bound_{a.scale_days}_days"] = {
            "value": scale["B"] / scale["A"], "target": ">= 0.5", "met": scale["B"] / scale["A"] >= 0.5}
    for k, v in checks.items():
        print(f"{k:<40} {v['value']:>9.2f}  target {v['target']}: {'met' if v['met'] else 'MISSED'}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "throughput", "config": str(a.config.relative_to(ROOT)) if a.config.is_relative_to(ROOT)
        else str(a.config), "days": a.days, "scale_days": a.scale_days, "rows_per_day": a.rows_per_day,
        "batch_size_per_worker": cfg.train.batch_size, "rates": rates, "checks": checks,
        "pipeline_cpu_bound": bound,
        "seconds": time.perf_counter() - t_start,
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d")}, indent=1))


if __name__ == "__main__":
    main()

"""Memory and speed of the dense tower's parallelism: DDP replicas vs FSDP2 shards (issue 20).

    .venv/bin/python benchmarks/dense_parallel.py            # ~4 min on 2 cores

A large TokenFormer tower (d_model 512, 8 layers: 4 full + windows 32, 32, 16, 16; 27.4 M dense
parameters) on the tiny schema's sharded tables, AdamW, 64 rows per worker per step, on 2 and 4
gloo processes (one thread each), each configuration in fresh processes; every table row-wise
(so both modes train the same dense parameters). Per worker:

* ``peak_rss_mb`` — the process's peak resident memory (``ru_maxrss``), the headline;
* ``dense_state_mb`` — the dense parameters + gradients + AdamW moments held by the worker
  (local shards under FSDP2), counted from the tensors;
* ``rss_after_steps_mb`` — resident memory after the last step (the steady state);
* ``step_ms`` — median step time (forward, backward, clip, optimizer), 2 processes only: 4
  processes on 2 cores measure oversubscription, so they report memory only.

Each configuration runs under two allocator settings. glibc's default grows its mmap threshold
to 32 MB after the first large frees, so later tensors of a few MB come from the heap, whose
high-water mark stays resident: the RSS then records fragmentation as much as what is live.
``MALLOC_MMAP_THRESHOLD_=262144`` (a fixed threshold: every tensor above 256 KB is mapped and
unmapped on its own) makes RSS follow the live tensors. Both are checked: the default-allocator
runs miss on this machine (docs/benchmarks.md says why).

The checks: FSDP2's peak and steady RSS per worker are lower than DDP's by about the replicated
dense state's (N − 1)/N — at least 75% of that expectation (the transient all-gathered block and
the activations add to both). Writes benchmarks/results/dense_parallel.json.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 64
TOWER = ['train.sharding.sharding_types=["row_wise"]', "model.tower=tokenformer", "model.tokenformer.d_model=512",
         "model.tokenformer.num_heads=8", "model.tokenformer.num_full_layers=4",
         "model.tokenformer.windows=[32, 32, 16, 16]", "model.tokenformer.dropout=0.0",
         "train.sharding.dense_optimizer=adamw", "train.optim.weight_decay=0.01", "train.optim.clip_grad_norm=1.0"]


def _worker(rank: int, world: int, port: int, mode: str, steps: int, data_file: str, out) -> None:
    import pyarrow.parquet as pq
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from embedding.sharding import dense_optimizer, shard
    from jobs.config import load_config
    from jobs.optim import clip, decays
    from model.ranking import RankingModel, RankingTrain
    from pipeline.collate import collate

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = load_config(ROOT / "configs/tiny.toml", TOWER + [f"train.dense_parallel={mode}"])
    table = pq.read_table(data_file)
    batches = [collate(table.slice(((s * world + rank) * BATCH) % (table.num_rows - BATCH), BATCH), cfg.schema)
               for s in range(steps)]
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch.manual_seed(0)
    model = RankingTrain(RankingModel(cfg.schema, cfg.model, sparse_device=torch.device("meta"),
                                      num_shards=world))
    dmp = shard(model, cfg.train.sharding, torch.device("cpu"), dense=cfg.train.dense)
    opt = dense_optimizer(dmp, cfg.train.sharding, cfg.train.optim.weight_decay, decays)
    dense_opt = opt._optims[0][1]
    params = [p for g in dense_opt.param_groups for p in g["params"]]
    times = []
    for batch in batches:
        t0 = time.perf_counter()
        loss, _ = dmp(batch)
        opt.zero_grad()
        loss.backward()
        clip(params, cfg.train.optim.clip_grad_norm)
        opt.step()
        times.append(time.perf_counter() - t0)

    def local_bytes(t: torch.Tensor | None) -> int:
        if t is None:
            return 0
        t = t.to_local() if isinstance(t, DTensor) else t
        return t.numel() * t.element_size()
    state = sum(local_bytes(v) for s in dense_opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    with open("/proc/self/statm") as f:
        resident_mb = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    result = {
        "rank": rank,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "rss_after_steps_mb": resident_mb,
        "rss_before_model_mb": base_rss,
        "dense_params": sum(p.numel() for p in params) if mode == "ddp" else
        sum(p.full_tensor().numel() if isinstance(p, DTensor) else p.numel() for p in params),
        "dense_state_mb": (sum(local_bytes(p) + local_bytes(p.grad) for p in params) + state) / 2**20,
        "step_ms": 1000 * statistics.median(times[2:]),  # the first two warm up
    }
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        out.put(gathered)
    dist.destroy_process_group()


ALLOCATORS = {"fixed_mmap_threshold": {"MALLOC_MMAP_THRESHOLD_": "262144"}, "glibc_default": {}}


def run(mode: str, world: int, steps: int, data_file: str, allocator: str) -> dict:
    ctx = mp.get_context("spawn")
    os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)
    os.environ.update(ALLOCATORS[allocator])  # read by glibc when the spawned interpreter starts
    out = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_worker, args=(r, world, port, mode, steps, data_file, out)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=900)
    if any(p.exitcode != 0 for p in procs) or out.empty():
        raise RuntimeError(f"{mode} on {world} workers failed: exit codes {[p.exitcode for p in procs]}")
    ranks = out.get()
    return {"mode": mode, "workers": world, "allocator": allocator, "dense_params": ranks[0]["dense_params"],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1),
            "rss_after_steps_mb": round(max(r["rss_after_steps_mb"] for r in ranks), 1),
            "rss_before_model_mb": round(max(r["rss_before_model_mb"] for r in ranks), 1),
            "dense_state_mb": round(max(r["dense_state_mb"] for r in ranks), 1),
            "step_ms": round(statistics.median(r["step_ms"] for r in ranks), 1)}


def main() -> None:
    from jobs.config import load_config
    from pipeline.days import parse_days
    from pipeline.generator import generate

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(ROOT / "configs/tiny.toml")
        generate(cfg.schema, cfg.generator, Path(tmp), parse_days("2026-01-01"), log=lambda *_: None)
        data_file = str(next(Path(tmp).glob("day=*/*.parquet")))
        rows = []
        for allocator in ALLOCATORS:
            for world, steps in ((2, 6), (4, 3)):
                for mode in ("ddp", "fsdp"):  # interleaved: drift on a shared machine hits both alike
                    rows.append(run(mode, world, steps, data_file, allocator))
                    print(rows[-1], flush=True)

    def pick(mode: str, world: int, key: str, allocator: str = "fixed_mmap_threshold") -> float:
        (value,) = [r[key] for r in rows if r["mode"] == mode and r["workers"] == world and r["allocator"] == allocator]
        return value
    summary, checks = {}, {}
    for world in (2, 4):
        replicated = pick("ddp", world, "dense_state_mb")
        expected = replicated * (world - 1) / world
        summary[world] = {"ddp_dense_state_mb": replicated,
                          "fsdp_dense_state_mb": pick("fsdp", world, "dense_state_mb"),
                          "expected_saving_mb": round(expected, 1)}
        for allocator in ALLOCATORS:
            for key in ("peak_rss_mb", "rss_after_steps_mb"):
                saved = pick("ddp", world, key, allocator) - pick("fsdp", world, key, allocator)
                summary[world][f"{allocator}_{key}"] = {"ddp": pick("ddp", world, key, allocator),
                                                         "fsdp": pick("fsdp", world, key, allocator),
                                                         "saved": round(saved, 1)}
                checks[f"{world} workers, {allocator}, {key}: fsdp saves {saved:.0f} MB per worker, expected "
                       f"~{expected:.0f} MB ((N − 1)/N of the {replicated:.0f} MB replicated dense state)"] = \
                    saved >= 0.75 * expected
    summary["step_time_ratio_2_workers"] = round(pick("fsdp", 2, "step_ms") / pick("ddp", 2, "step_ms"), 3)
    result = {"benchmark": "dense_parallel", "date": time.strftime("%Y-%m-%d"),
              "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "batch_per_worker": BATCH, "tower": TOWER, "runs": rows,
              "summary": summary, "checks": checks,
              "reported": f"fsdp / ddp step time at 2 workers: {summary['step_time_ratio_2_workers']:.2f}×"}
    path = ROOT / "benchmarks/results/dense_parallel.json"
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(summary, indent=1))
    for check, ok in checks.items():
        print(("met     " if ok else "MISSED  ") + check)
    print(result["reported"])


if __name__ == "__main__":
    main()

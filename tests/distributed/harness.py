"""Multi-process gloo harness for sharded tests on CPU (real processes, real collectives)."""

from __future__ import annotations

import os
import socket
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed.tensor import DTensor, distribute_tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn, args, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn, world_size: int, *args) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raise failures."""
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, errors))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    msgs = []
    while not errors.empty():
        msgs.append(errors.get())
    if msgs or any(p.exitcode != 0 for p in procs):
        raise AssertionError("distributed test failed:\n" + "\n".join(msgs)
                             + f"\nexit codes {[p.exitcode for p in procs]}")


def copy_into_sharded(sharded_state: dict, full_state: dict) -> None:
    """Copy full (unsharded) tensors into a sharded state dict's local shards, in place."""
    for key, dst in sharded_state.items():
        src = full_state[key]
        if isinstance(dst, DTensor):  # an FSDP2-sharded dense parameter
            dst.detach().copy_(distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements))
        elif isinstance(dst, ShardedTensor):
            for shard in dst.local_shards():
                sl = tuple(slice(o, o + n) for o, n in
                           zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.detach().copy_(src[sl])
        elif isinstance(dst, torch.Tensor):
            dst.detach().copy_(src)
        else:
            raise TypeError(f"{key}: unsupported state type {type(dst)}")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (collective), or the tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def one_day_file(root: Path, schema, rows: int, seed: int, **generator) -> str:
    """Generate one day (2026-01-01) of ``rows`` rows in one Parquet file under ``root``, from a
    small world (50 users, 40 items, 4 categories; ``generator`` overrides more fields); its path."""
    from pipeline.days import parse_days
    from pipeline.generator import GeneratorConfig, generate

    generate(schema, GeneratorConfig(seed=seed, rows_per_day=rows, files_per_day=1, num_users=50, num_items=40,
                                     num_categories=4, **generator),
             root, parse_days("2026-01-01"), log=lambda *_: None)
    return str(next(Path(root).glob("day=*/*.parquet")))

"""Training checkpoints: ``torch.distributed.checkpoint`` (DCP), published atomically, last K kept.

A checkpoint is a folder ``<root>/step-00000123/`` holding

* the DCP shards of ``{"model": ..., "optim": ...}``: sharded embedding tables (``ShardedTensor``)
  with their fused optimizer state (row-wise Adagrad momentum), dense weights and the dense
  optimizer state (Adam moments and step). DCP reshards on load, so a checkpoint written by N
  workers loads on M;
* ``meta.json``: the step, epoch, global row counters (the data position) and the world size;
* ``rng-rank{r}.pt``: each rank's torch RNG state (restored only on the same world size).

All ranks write into ``<root>/.tmp-step-…``; after a barrier rank 0 renames it to ``step-…`` (one
atomic ``rename`` on a POSIX filesystem shared by the workers), so a reader never sees a partial
checkpoint, and deletes all but the newest ``keep`` published ones.

State-dict keys are normalized (DMP/DDP wrapper prefixes removed) so the same checkpoint loads into
a model wrapped differently — any world size, or the unsharded model for export.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_WRAPPERS = re.compile(r"(^|\.)(?:_dmp_wrapped_module|module)\.")
STEP_DIR = re.compile(r"^step-(\d{8})$")


def normalize_key(key: str) -> str:
    """``_dmp_wrapped_module.module.model.x`` → ``model.x`` (also inside optimizer keys)."""
    prev = None
    while prev != key:
        prev, key = key, _WRAPPERS.sub(r"\1", key)
    return key


@dataclass(frozen=True)
class Position:
    """Where training stands: ``step`` steps done (over all epochs), in ``epoch``; row counters
    summed over all workers (``rows``: real rows trained, ``first_epoch_rows``: of epoch 0)."""

    step: int = 0
    epoch: int = 0
    rows: int = 0
    first_epoch_rows: int = 0
    world_size: int = 1
    final: bool = False


def _normalized(d: dict) -> tuple[dict, dict[str, str]]:
    out, names = {}, {}
    for k, v in d.items():
        n = normalize_key(k)
        if n in out:
            raise RuntimeError(f"state keys {names[n]!r} and {k!r} both normalize to {n!r}")
        out[n], names[n] = v, k
    return out, names


def _optim_state(opt) -> tuple[dict, dict[str, str]]:
    return _normalized(opt.state_dict()["state"])


def save(root: str | Path, model, opt, pos: Position, keep: int = 3) -> Path:
    """Write a checkpoint of ``model`` (a DMP or a plain module) and ``opt`` (a KeyedOptimizer);
    collective: every rank calls it. Returns the published folder."""
    root = Path(root)
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step-{pos.step:08d}"
    tmp, final = root / f".tmp-{name}", root / name
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd, _ = _normalized(model.state_dict())
    optim_sd, _ = _optim_state(opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
    torch.save({"torch": torch.get_rng_state()}, tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(json.dumps(asdict(pos) | {"saved_at": time.time()}, indent=1))
        if final.exists():  # the same step saved again (a rerun): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in published(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def published(root: str | Path) -> list[Path]:
    """Published checkpoints under ``root``, oldest first (temporary folders are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").exists())


def latest(root: str | Path) -> Path | None:
    found = published(root)
    return found[-1] if found else None


def read_position(ckpt: str | Path) -> Position:
    meta = Path(ckpt) / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{ckpt} is not a published tokenrec checkpoint (no meta.json)")
    doc = json.loads(meta.read_text())
    return Position(**{k: doc[k] for k in Position.__dataclass_fields__ if k in doc})


def load(ckpt: str | Path, model, opt=None, dense_opt=None, restore_rng: bool = False) -> Position:
    """Load weights (and, given ``opt``, optimizer state) in place; any world size. ``dense_opt``
    (the lazily initialized dense part of ``opt``) gets its state created first so that it can
    be loaded into. Returns the saved position."""
    pos = read_position(ckpt)
    model_sd, model_names = _normalized(model.state_dict())
    state = {"model": model_sd}
    if opt is not None:
        if dense_opt is not None and not dense_opt.state:
            dense_opt.init_state()  # zero-gradient step: creates the state, leaves weights alone
        state["optim"], optim_names = _optim_state(opt)
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict({model_names[k]: v for k, v in state["model"].items()})
    if opt is not None:
        opt.load_state_dict({"state": {optim_names[k]: v for k, v in state["optim"].items()}})
    if restore_rng:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng = Path(ckpt) / f"rng-rank{rank}.pt"
        if world == pos.world_size and rng.exists():
            torch.set_rng_state(torch.load(rng, weights_only=True)["torch"])
    return pos


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()

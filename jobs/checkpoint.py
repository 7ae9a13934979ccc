"""Training checkpoints: ``torch.distributed.checkpoint`` (DCP), published atomically, last K kept.

A checkpoint is a folder ``<root>/step-00000123/`` holding

* the DCP shards of ``{"model": ..., "optim": ...}``: sharded embedding tables (``ShardedTensor``)
  with their fused optimizer state (row-wise Adagrad momentum), dense weights and the dense
  optimizer state (Adam moments and step). DCP reshards on load, so a checkpoint written by N
  workers loads on M;
* ``meta.json``: the step, epoch, global row counters (the data position) and the world size;
* ``rng-rank{r}.pt``: each rank's torch RNG state, and its CUDA one on a GPU (restored only on
  the same world size).

Publication: on a POSIX filesystem shared by the workers, all ranks write into
``<root>/.tmp-step-…`` and after a barrier rank 0 renames it to ``step-…`` (one atomic
``rename``). On an object store (``root`` an ``s3://`` URI, ``embedding.storage``), which has no
rename, all ranks write straight into ``step-…/`` and rank 0 writes ``meta.json`` last, after a
barrier: **``meta.json`` is the commit marker** — a folder without it is not a checkpoint, so a
crash between the shards and the marker leaves the previous checkpoint as the newest, and the next
save deletes such orphaned objects. A step already committed is never rewritten: saving it
again (same run, same step, so the same state) rewrites only its marker. Either way a reader
never sees a partial checkpoint, and rank 0 deletes all but the newest ``keep`` published ones
(the marker first).

Managed-collision (MCH) tables: TorchRec can merge their row-wise shards (N → a divisor of N
workers) but not split them, because each shard owns the ids of one input range. Loading on a
world size that does not divide the saved one goes through ``reshard_managed``: one process
rewrites the checkpoint so that every id moves, with its embedding row and optimizer state, to the
shard that owns its range for the new world size (written once next to the checkpoint, reused).

State-dict keys are normalized (DMP/DDP wrapper prefixes removed) so the same checkpoint loads into
a model wrapped differently — any world size, or the unsharded model for export.

Loading never unpickles untrusted data: DCP reads its ``.metadata`` file with ``pickle``, so
``verify_metadata`` first replays that pickle with an unpickler that only admits DCP's metadata
classes, torch dtypes/sizes and plain containers, and refuses the checkpoint otherwise; tensors and
RNG states are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from embedding import storage
from embedding.checkpoint_safety import UnsafeCheckpointError, verify_metadata  # noqa: F401  (re-exported)

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
    summed over all workers (``rows``: real rows trained, ``first_epoch_rows``: of epoch 0);
    ``total_steps`` with ``step`` is the learning-rate schedule's state (a resumed run keeps it)."""

    step: int = 0
    epoch: int = 0
    rows: int = 0
    first_epoch_rows: int = 0
    world_size: int = 1
    final: bool = False
    total_steps: int = 0  # the run's planned steps: the learning-rate schedule's length (jobs.optim)


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
    if storage.is_uri(root):
        return _save_uri(str(root), model, opt, pos, keep)
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
    torch.save(_rng_state(), tmp / f"rng-rank{rank}.pt")
    _barrier()
    if rank == 0:
        (tmp / "meta.json").write_text(_meta(pos))
        old = root / f".old-{name}"
        if final.exists():  # the same step saved again: move the old one aside, never leave a gap
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        for gone in published(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(gone, ignore_errors=True)
            for copy in root.glob(f".{gone.name}-mc-world*"):
                shutil.rmtree(copy, ignore_errors=True)
    _barrier()
    return final


def _meta(pos: Position) -> str:
    """``meta.json``: the position and the time it was saved (a resharded copy's freshness check)."""
    return json.dumps(asdict(pos) | {"saved_at": time.time()}, indent=1)


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # dropout on a GPU draws from it
        rng["cuda"] = torch.cuda.get_rng_state()
    return rng


def _save_uri(root: str, model, opt, pos: Position, keep: int) -> str:
    """``save`` on an object store: shards into ``step-…/``, then ``meta.json`` as the commit
    marker (module docstring). Uncommitted step folders are deleted first."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step-{pos.step:08d}"
    final = storage.join(root, name)
    again = torch.tensor([0])
    committed = set()
    if rank == 0:
        committed = {str(p) for p in published(root)}
        again[0] = int(final in committed)
        for entry in storage.names(root):
            if STEP_DIR.match(entry) and storage.join(root, entry) not in committed:
                storage.delete(storage.join(root, entry))  # orphans of an uncommitted write
    if dist.is_initialized():
        dist.broadcast(again, src=0)
    if again.item():
        # the same step saved again in this run (the final save right after a periodic one, a
        # restarted worker group): the state is the same — no optimizer step in between — so only
        # the marker is rewritten (one atomic PUT; the committed shards are never unpublished)
        if rank == 0:
            storage.write_text(storage.join(final, "meta.json"), _meta(pos))
        _barrier()
        return final
    _barrier()
    model_sd, _ = _normalized(model.state_dict())
    optim_sd, _ = _optim_state(opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=final)
    buf = io.BytesIO()
    torch.save(_rng_state(), buf)
    storage.write_bytes(storage.join(final, f"rng-rank{rank}.pt"), buf.getvalue())
    _barrier()
    if rank == 0:
        storage.write_text(storage.join(final, "meta.json"), _meta(pos))  # the commit
        now = sorted(committed | {final})  # = published(root): zero-padded step names sort by step
        for gone in now[:-keep] if keep > 0 else []:
            storage.delete(storage.join(gone, "meta.json"))
            storage.delete(gone)
            for entry in storage.names(root):
                if entry.startswith(f".{posixpath.basename(gone)}-mc-world"):
                    storage.delete(storage.join(root, entry))
    _barrier()
    return final


def published(root: str | Path) -> list[Path] | list[str]:
    """Published checkpoints under ``root``, oldest first (temporary folders and, on an object
    store, folders without their ``meta.json`` commit marker are ignored)."""
    if storage.is_uri(root):
        return [storage.join(root, n) for n in storage.names(root)
                if STEP_DIR.match(n) and storage.exists(storage.join(root, n, "meta.json"))]
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "meta.json").exists())


def discard_uncommitted(root: str | Path) -> list[str]:
    """Delete what unfinished saves left under ``root``: on an object store the ``step-…``
    folders without their ``meta.json``, on disk the ``.tmp-step-…`` / ``.old-step-…`` folders.
    Published checkpoints are never touched. Returns what was deleted (the driver calls it when
    a run fails; a save in the same root does the same first)."""
    if storage.is_uri(root):
        done = {str(p) for p in published(root)}
        gone = [storage.join(root, n) for n in storage.names(root)
                if STEP_DIR.match(n) and storage.join(root, n) not in done]
        for path in gone:
            storage.delete(path)
        return gone
    root = Path(root)
    gone = [str(p) for pattern in (".tmp-step-*", ".old-step-*") for p in root.glob(pattern)]
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


def latest(root: str | Path) -> Path | None:
    found = published(root)
    return found[-1] if found else None


def is_published(ckpt: str | Path) -> bool:
    """Whether ``ckpt`` (a local folder or a URI) holds a complete checkpoint: its ``meta.json``."""
    return storage.exists(storage.join(ckpt, "meta.json"))


def read_position(ckpt: str | Path) -> Position:
    meta = storage.join(ckpt, "meta.json")
    if not storage.exists(meta):
        raise FileNotFoundError(f"{ckpt} is not a published tokenrec checkpoint (no meta.json)")
    doc = json.loads(storage.read_text(meta))
    return Position(**{k: doc[k] for k in Position.__dataclass_fields__ if k in doc})


def _layout_diff(meta, model, prefix: str, keep=lambda k: True) -> list[str]:
    """What differs between the checkpoint's and ``model``'s entries under ``prefix``: missing,
    extra and reshaped names (without the leading ``model.``), at most 4 of each named."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in meta.items()
             if k.startswith("model." + prefix) and hasattr(v, "size") and keep(k)}
    want = {k: tuple(v.shape) for k, v in _normalized(model.state_dict())[0].items()
            if k.startswith(prefix) and keep(k)}
    short = {k: k.removeprefix("model.") for k in want.keys() | saved.keys()}  # tower.x, as in [model]
    missing = sorted(short[k] for k in want.keys() - saved.keys())
    extra = sorted(short[k] for k in saved.keys() - want.keys())
    shapes = [f"{short[k]}: {saved[k]} in the checkpoint, {want[k]} now" for k in sorted(want.keys() & saved.keys())
              if saved[k] != want[k]]
    return [f"{what} ({len(names)}): {', '.join(names[:4])}{', …' if len(names) > 4 else ''}"
            for what, names in (("not in the checkpoint", missing), ("only in the checkpoint", extra),
                                ("other shapes", shapes)) if names]


def check_layout(ckpt: str | Path, model, prefix: str = "model.tower.", flag: str = "--init-from") -> None:
    """Before a warm start (or resume) reaches the workers: the checkpoint's dense tower must be
    ``model``'s — the same parameter names and shapes — and so must its embedding tables (names,
    global shapes, which collection holds them), read from the DCP metadata (no tensor is loaded).
    Raises ``ValueError`` naming what differs and how to go on. ``model`` is the training wrapper
    (``RankingTrain``), e.g. built on the meta device."""
    verify_metadata(ckpt)
    meta = _reader(ckpt).read_metadata().state_dict_metadata
    parts = _layout_diff(meta, model, prefix)
    if parts:
        raise ValueError(f"{flag} {ckpt}: the checkpoint's dense tower has another layout than this [model] config — "
                         + "; ".join(parts) + ". Set the layout it was trained with (a wave-1 TokenFormer: "
                         "[model.tokenformer] target_tokens = \"group\", event_tokens = \"sum\") or train from "
                         "scratch (`tokenrec daily --cold-start`, or no --init-from).")
    tables = _layout_diff(meta, model, "model.sparse_arch.", keep=lambda k: k.endswith(".weight"))
    if tables:
        raise ValueError(f"{flag} {ckpt}: the checkpoint's embedding tables differ from this [schema] — "
                         + "; ".join(tables) + ". Use the schema it was trained with (a wave-1 config keeps the "
                         "history on tables of its own, e.g. hist_item, where today's configs share the item "
                         "table between the target and the history) or train from scratch "
                         "(`tokenrec daily --cold-start`, or no --init-from).")


def load(ckpt: str | Path, model, opt=None, dense_opt=None, restore_rng: bool = False,
         partial_optim: bool = False, log=None) -> Position:
    """Load weights (and, given ``opt``, optimizer state) in place; any world size. ``dense_opt``
    (the lazily initialized dense part of ``opt``) gets its state created first so that it can
    be loaded into. Returns the saved position.

    ``partial_optim`` (warm starts): optimizer state the checkpoint does not hold starts fresh,
    named through ``log``, instead of failing. That happens when a table changes optimizer between
    the runs: TorchRec's planner may make a small table data-parallel (a dense parameter, under the
    dense optimizer) with ``dense_parallel = "ddp"`` but never with ``"fsdp"``, where every table
    keeps its fused optimizer. Exact resume loads strictly (``RuntimeError`` naming the keys)."""
    pos = read_position(ckpt)
    verify_metadata(ckpt)
    model_sd, model_names = _normalized(model.state_dict())
    world = dist.get_world_size() if dist.is_initialized() else 1
    if any(k.endswith(MC_IDS) for k in model_sd) and pos.world_size % world:
        ckpt = _resharded_copy(ckpt if storage.is_uri(ckpt) else Path(ckpt), world)
    state = {"model": model_sd}
    if opt is not None:
        if dense_opt is not None and not dense_opt.state:
            dense_opt.init_state()  # zero-gradient step: creates the state, leaves weights alone
        state["optim"], optim_names = _optim_state(opt)
        saved = _reader(ckpt).read_metadata().state_dict_metadata
        fresh = sorted(k for k, v in state["optim"].items() if any(f"optim.{k}.{s}" not in saved for s in v))
        if fresh and not partial_optim:
            raise RuntimeError(f"{ckpt} holds no optimizer state for {len(fresh)} parameter(s) of this model: "
                               f"{', '.join(fresh[:4])}{', …' if len(fresh) > 4 else ''}. Resume with the "
                               "[train] settings it was written with (dense_parallel, sharding types), or "
                               "warm-start from it instead (--init-from)")
        if partial_optim:
            for k in fresh:
                del state["optim"][k]
            if fresh and log is not None:
                log(f"warm start: no optimizer state in {ckpt} for {len(fresh)} parameter(s), which start "
                    f"fresh: {', '.join(fresh[:4])}{', …' if len(fresh) > 4 else ''} (a table with another "
                    "optimizer in this run, e.g. data-parallel under dense_parallel = 'ddp' only)")
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict({model_names[k]: v for k, v in state["model"].items()})
    if opt is not None:
        loaded = {optim_names[k]: v for k, v in state["optim"].items()}
        current = opt.state_dict()["state"]
        opt.load_state_dict({"state": {k: loaded.get(k, v) for k, v in current.items()}})
    if restore_rng:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng = storage.join(ckpt, f"rng-rank{rank}.pt")
        if world == pos.world_size and storage.exists(rng):
            state = torch.load(io.BytesIO(storage.read_bytes(rng)), weights_only=True)
            torch.set_rng_state(state["torch"])
            if "cuda" in state and torch.cuda.is_available():
                torch.cuda.set_rng_state(state["cuda"])
    return pos


def _reader(ckpt: str | Path):
    """DCP's reader for a local folder or an object-store URI (fsspec: s3fs, gcsfs, …)."""
    if storage.is_uri(ckpt):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(str(ckpt))
    return dcp.FileSystemReader(str(ckpt))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


MC_IDS = "._mch_sorted_raw_ids"
I64MAX = torch.iinfo(torch.int64).max


def _resharded_copy(ckpt: Path | str, world: int) -> Path | str:
    """The checkpoint rewritten for ``world`` shards, next to it; rebuilt when the checkpoint was
    re-saved since (its ``saved_at`` differs)."""
    if storage.is_uri(ckpt):  # rewritten in a local temporary folder, uploaded next to it
        parent, name = posixpath.split(str(ckpt).rstrip("/"))
        out = storage.join(parent, f".{name}-mc-world{world}")
    else:
        out = ckpt.parent / f".{ckpt.name}-mc-world{world}"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        saved_at = json.loads(storage.read_text(storage.join(ckpt, "meta.json"))).get("saved_at")
        meta = storage.join(out, "meta.json")
        if not storage.exists(meta) or json.loads(storage.read_text(meta)).get("saved_at") != saved_at:
            if storage.is_uri(ckpt):
                with tempfile.TemporaryDirectory() as tmp:
                    storage.download(ckpt, Path(tmp, "in"))
                    reshard_managed(Path(tmp, "in"), world, Path(tmp, "out"))
                    storage.delete(storage.join(out, "meta.json"))  # unpublish the old copy first
                    storage.delete(out)
                    marker = Path(tmp, "out", "meta.json")
                    doc = marker.read_text()
                    marker.unlink()
                    storage.upload(Path(tmp, "out"), out)
                    storage.write_text(storage.join(out, "meta.json"), doc)  # the commit marker, last
            else:
                reshard_managed(ckpt, world, out)
    _barrier()
    return out


def reshard_managed(ckpt: str | Path, world: int, out: str | Path, log=print) -> Path:
    """Rewrite a checkpoint's managed-collision tables for ``world`` row-wise shards (single
    process, the whole checkpoint in memory). Shard k owns the ids in the k-th of ``world``
    equal ranges of the MCH input space and the rows [k·R/world, (k+1)·R/world), the last one
    being its miss row; ids beyond a shard's capacity are dropped, least used first (reported)."""
    from embedding.modules import MC_INPUT_HASH_SIZE

    ckpt, out = Path(ckpt), Path(out)
    pos = read_position(ckpt)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    verify_metadata(ckpt)
    dcp_to_torch_save(str(ckpt), str(tmp / "full.pt"))
    full = torch.load(tmp / "full.pt", weights_only=True)
    model, optim = full["model"], full.get("optim", {})
    old_block = -(-MC_INPUT_HASH_SIZE // pos.world_size)  # TorchRec's block bucketing: ceil
    new_block = -(-MC_INPUT_HASH_SIZE // world)
    for ids_key in [k for k in model if k.endswith(MC_IDS)]:
        prefix = ids_key[: -len(MC_IDS)]
        table = prefix.rsplit(".", 1)[1]
        module = prefix.split("._managed_collision_collection.")[0] + "._embedding_module."
        w_key = next(k for k in (f"{module}embedding_bags.{table}.weight", f"{module}embeddings.{table}.weight")
                     if k in model)  # MC-EBC (field tables) or MC-EC (sequence and id-space tables)
        ids, rows = model[ids_key], model[prefix + "._mch_remapped_ids_mapping"]
        extra = [k for k in model if k.startswith(prefix + "._mch_") and k not in
                 (ids_key, prefix + "._mch_remapped_ids_mapping")]
        counts = model.get(prefix + "._mch_counts", torch.zeros_like(ids))
        tensors = [model[w_key]] + [v for k, d in optim.items() if k.endswith(w_key)
                                    for v in d.values() if v.shape[:1] == ids.shape]
        new_tensors = [t.clone() for t in tensors]
        new_ids = torch.full_like(ids, I64MAX)
        new_extra = {k: torch.zeros_like(model[k]) for k in extra}
        R = ids.numel()
        valid = ids != I64MAX
        dropped = 0
        for k in range(world):
            lo, hi = k * R // world, (k + 1) * R // world
            idx = (valid & (ids // new_block == k)).nonzero().squeeze(1)
            if idx.numel() > hi - lo - 1:
                dropped += idx.numel() - (hi - lo - 1)
                idx = idx[counts[idx].argsort(descending=True, stable=True)[: hi - lo - 1]]
            n = idx.numel()
            new_ids[lo:lo + n] = ids[idx]
            for key in extra:
                new_extra[key][lo:lo + n] = model[key][idx]
            old_shard = (k * new_block) // old_block
            old_miss = (old_shard + 1) * R // pos.world_size - 1
            for old, new in zip(tensors, new_tensors):
                new[lo:lo + n] = old[rows[idx]]
                new[hi - 1] = old[old_miss]  # the range's miss row reads what it read before
        model[ids_key] = new_ids
        model[prefix + "._mch_remapped_ids_mapping"] = torch.arange(R, dtype=rows.dtype)
        model.update(new_extra)
        model[w_key] = new_tensors[0]
        i = 1
        for key, d in optim.items():
            if key.endswith(w_key):
                for name, v in d.items():
                    if v.shape[:1] == ids.shape:
                        d[name] = new_tensors[i]
                        i += 1
        seg = model[prefix + "._output_segments_tensor"]
        new_seg = torch.full_like(seg, -1)
        new_seg[: world + 1] = torch.tensor([k * R // world for k in range(world + 1)])
        model[prefix + "._output_segments_tensor"] = new_seg
        if dropped:
            log(f"resharding {table} for {world} workers: {dropped} ids beyond their shard's capacity "
                f"were dropped (least used first)")
    torch.save(full, tmp / "full.pt")
    torch_save_to_dcp(str(tmp / "full.pt"), str(tmp / "dcp"))
    (tmp / "full.pt").unlink()
    doc = json.loads((ckpt / "meta.json").read_text())
    (tmp / "dcp" / "meta.json").write_text(json.dumps(doc | {"resharded_for": world}, indent=1))
    for rng in ckpt.glob("rng-rank*.pt"):
        shutil.copy(rng, tmp / "dcp" / rng.name)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp / "dcp", out)
    shutil.rmtree(tmp, ignore_errors=True)
    return out

"""The Ray Train worker: shard the model, train on this worker's stream, evaluate, checkpoint.

Checkpoints (``jobs.checkpoint``): every ``checkpoint_every`` steps and at the end, with the
optimizer state, the data position and the RNG. ``init_from`` warm-starts weights and optimizer
state from another run's checkpoint (daily training); ``resume_from`` continues a stopped run of
the same job exactly: it restores the step and the row counters, and replays the data stream up to
that step without training (with ``[train].deterministic`` the stream, and so the result, is the
same as an uninterrupted run's, bit for bit).

Every worker runs the same number of steps with the same batch size (sharded collectives need
both): a short batch is filled up with zero-weight padding rows, and a worker whose stream ends
first runs all-padding batches until the others are done, so uneven shards never hang. Rows are
counted only when really trained (weight 1).
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from embedding.sharding import dense_optimizer, shard, zero_miss_rows
from jobs import checkpoint
from jobs.config import JobConfig
from jobs.console import emit
from jobs.metrics import evaluate, one_class_labels
from jobs.optim import decays, dense_step
from jobs.optim import describe as describe_recipe
from jobs.tracking import StepLogger
from model.ranking import RankingModel, RankingTrain
from model.sparse import SparseArch
from pipeline.collate import collate, collate_blocks


@dataclass(frozen=True)
class WorkerArgs:
    cfg: JobConfig
    run_id: str
    tracking_uri: str
    checkpoint_root: str  # published checkpoints go to checkpoint_root/step-NNNNNNNN
    eval_sets: tuple[str, ...]  # named evaluation datasets, each evaluated after training ("eval", or
                                # [train.eval_ranges]: "validation", "test", …), metrics prefixed "<name>_"
    template: object  # a one-row pyarrow.Table: a worker whose stream is empty pads with it
    init_from: str | None = None  # warm start: weights + optimizer state, not the position
    resume_from: str | None = None  # exact resume: weights, optimizer, position, RNG
    total_steps: int = 0  # the run's optimizer steps, for the learning-rate schedule (jobs.optim)


def strip_prefixes(name: str) -> str:
    """DMP/DDP wrapper prefixes off a state-dict key, so keys match the unsharded model."""
    for prefix in ("_dmp_wrapped_module.", "module."):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name


def synced(batches: Iterator, padding) -> Iterator:
    """Batches until every worker's stream is done; an exhausted worker yields ``padding`` (an
    all-zero-weight batch of the same size), so all workers run the same steps."""
    while True:
        batch = next(batches, None)
        more = torch.tensor([0 if batch is None else 1], dtype=torch.int64)
        dist.all_reduce(more, op=dist.ReduceOp.MAX)
        if more.item() == 0:
            return
        yield padding if batch is None else batch


class EarlyStart:
    """An iterator whose first item is pulled in a background thread from construction on.

    The training stream's start-up (Ray Data's executor, read tasks, the first block) then
    runs while the model is built, sharded and loaded, instead of after it. Iterating joins the
    thread, re-raises its error if it had one, and yields the first item, then the rest."""

    _END = object()

    def __init__(self, it: Iterator) -> None:
        self._it, self._first, self._error = it, self._END, None
        self.opened_at, self.ready_at = time.perf_counter(), float("nan")  # ready: first item in
        self._thread = threading.Thread(target=self._pull, name="tokenrec-early-stream", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            self._first = next(self._it, self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the training thread
            self._error = e
        self.ready_at = time.perf_counter()

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._first is self._END:
            return
        yield self._first
        yield from self._it


class Timed:
    """An iterator that adds up the time spent waiting in ``next`` (``seconds``): how long
    the training loop waited for its input."""

    def __init__(self, it: Iterator) -> None:
        self.it, self.seconds = iter(it), 0.0

    def __iter__(self) -> Timed:
        return self

    def __next__(self):
        t = time.perf_counter()
        try:
            return next(self.it)
        finally:
            self.seconds += time.perf_counter() - t


def train_loop(args: WorkerArgs) -> None:
    cfg, tc = args.cfg, args.cfg.train
    t_enter = time.perf_counter()
    torch.set_num_threads(1)
    if tc.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")

    truncated = [0]  # first-epoch training rows whose sequence was longer than max_len (cut)

    def stream(name: str, batch_size: int, count_truncated: bool = False) -> Iterator:
        shard_it = ray.train.get_dataset_shard(name)  # on this thread; iteration may run on another

        def batches() -> Iterator:
            blocks = shard_it.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=2)
            # each block decoded once, its batches cut from it (pipeline.collate.Decoded)
            for batch, overlong in collate_blocks(blocks, cfg.schema, batch_size, padding_row=args.template):
                if count_truncated:
                    truncated[0] += overlong
                yield batch.to(device, non_blocking=True)
        return batches()

    # Ray Train restarts the worker group after a worker failure ([train].max_failures): this
    # run's newest published checkpoint is then the place to go on from, like --resume.
    resume_from = args.resume_from
    restarted = checkpoint.latest(args.checkpoint_root)
    if restarted is not None and str(restarted) == str(args.resume_from):
        restarted = None
    if restarted is not None:
        resume_from = str(restarted)

    # The first epoch's stream starts now and gets its first batch ready while the model is
    # built below (docs/benchmarks.md, "end to end").
    first_stream = EarlyStart(stream("train", tc.batch_size, count_truncated=not resume_from))
    model = RankingTrain(RankingModel(cfg.schema, cfg.model, sparse_device=torch.device("meta"),
                                      num_shards=dist.get_world_size(),
                                      batch_rows=max(tc.batch_size, tc.eval_batch_size)))
    dmp = shard(model, tc.sharding, device, dense=tc.dense)
    # after the (identical) initialisation: each worker draws its own dropout masks
    torch.manual_seed(tc.seed + 1_000_003 * (rank + 1))
    opt = dense_optimizer(dmp, tc.sharding, tc.optim.weight_decay, decays)
    dense_opt = opt._optims[0][1]  # the lazily initialized part, see checkpoint.load
    dense_params = [p for group in dense_opt.param_groups for p in group["params"]]
    if rank == 0:
        print(f"model built and sharded over {dist.get_world_size()} workers in "
              f"{time.perf_counter() - t_enter:.1f}s", flush=True)
        emit("line", text=f"  plan and shard: {cfg.model.tower} over {dist.get_world_size()} workers "
                          f"({time.perf_counter() - t_enter:.0f}s)")
        emit("line", text=f"  dense recipe: {describe_recipe(tc.sharding, tc.optim, cfg.model)}")

    pos = checkpoint.Position(world_size=dist.get_world_size())
    if restarted is not None:
        if rank == 0:
            print(f"worker group restarted after a failure: going on from {restarted}", flush=True)
            emit("line", text=f"  worker group restarted after a failure: going on from {restarted}")
    elif args.init_from:
        checkpoint.load(args.init_from, dmp, opt, dense_opt, partial_optim=True,
                        log=(lambda m: print(m, flush=True)) if rank == 0 else None)
        if rank == 0:
            print(f"warm start from {args.init_from}", flush=True)  # the log; `daily` shows the version
    total_steps = args.total_steps
    if resume_from:
        pos = checkpoint.load(resume_from, dmp, opt, dense_opt, restore_rng=True)
        total_steps = pos.total_steps or total_steps  # the schedule the checkpoint was written under
        if rank == 0:
            print(f"resuming at step {pos.step} (epoch {pos.epoch}) from {resume_from}", flush=True)
            emit("line", text=f"  resuming at step {pos.step} (epoch {pos.epoch}) from {resume_from}")
    start_step = pos.step

    def padding(size: int):
        return collate(args.template.slice(0, 0), cfg.schema, pad_to=size,
                       padding_row=args.template).to(device)

    logger = StepLogger(args.tracking_uri, args.run_id) if rank == 0 else None

    # row counters: the checkpoint holds the sums over workers; rank 0 carries them on
    step = start_step  # 0 unless resumed
    rows = pos.rows if rank == 0 else 0
    first_epoch_rows = pos.first_epoch_rows if rank == 0 else 0
    t0, window_rows, window_t = time.perf_counter(), 0, time.perf_counter()
    stopped = False
    first_step_time = float("nan")

    def save(epoch: int, final: bool = False) -> str:
        totals = torch.tensor([rows, first_epoch_rows], dtype=torch.int64)
        dist.all_reduce(totals)
        p = checkpoint.Position(step=step, epoch=epoch, rows=int(totals[0]),
                                first_epoch_rows=int(totals[1]), world_size=dist.get_world_size(),
                                final=final, total_steps=total_steps)
        path = checkpoint.save(args.checkpoint_root, dmp, opt, p, keep=tc.keep_checkpoints)
        if rank == 0:
            print(f"checkpoint {path}", flush=True)
        return str(path)

    dmp.train()
    replayed = 0
    epoch = 0
    data_wait = 0.0  # rank 0's seconds blocked on its input stream (an input-bound job shows it)
    for epoch in range(tc.epochs):
        count = epoch == 0 and not resume_from  # a resumed run's position excludes replayed rows
        batches = Timed(first_stream if epoch == 0 else stream("train", tc.batch_size, count))
        for batch in synced(batches, padding(tc.batch_size)):
            if replayed < start_step:  # resume: this step is already in the weights
                replayed += 1
                continue
            if tc.max_steps and step >= tc.max_steps:
                stopped = True
                break
            loss, _ = dmp(batch)
            dense_step(opt, loss, step, total_steps, dense_opt=dense_opt, dense_params=dense_params,
                       base_lr=tc.sharding.dense_lr, cfg=tc.optim)
            zero_miss_rows(dmp)  # unknown ids read zeros, on any number of shards
            step += 1
            if step == start_step + 1 and rank == 0:
                first_step_time = time.time()  # wall clock: the driver compares it with its own
                print(f"first step done {time.perf_counter() - t0:.1f}s after the model was ready; "
                      f"the data stream opened {t0 - first_stream.opened_at:.1f}s before that and "
                      f"had its first batch {first_stream.ready_at - first_stream.opened_at:.1f}s "
                      f"after opening", flush=True)
            real = int(batch.weights.sum())
            rows += real
            first_epoch_rows += real if epoch == 0 else 0
            window_rows += real
            if step % tc.log_every == 0:
                rate = torch.tensor([window_rows / (time.perf_counter() - window_t)])
                dist.all_reduce(rate)  # rows/s over all workers
                if rank == 0:
                    print(f"epoch {epoch} step {step:6d} | loss {loss.item():.4f} | "
                          f"{rate.item():8.0f} rows/s", flush=True)
                    logger.log(step, {"train_loss": loss.item(), "rows_per_s": rate.item()})
                    emit("progress", step=step, total=total_steps, epoch=epoch, loss=loss.item(),
                         rows_per_s=rate.item())
                window_rows, window_t = 0, time.perf_counter()
            if tc.checkpoint_every and step % tc.checkpoint_every == 0:
                save(epoch)
        data_wait += batches.seconds
        if stopped:
            break
        if rank == 0:
            print(f"epoch {epoch} done: step {step}, {rows:,} rows so far on rank 0, "
                  f"{time.perf_counter() - t0:.0f}s ({data_wait:.1f}s of it waiting for data)", flush=True)
    train_seconds = time.perf_counter() - t0
    t_save = time.perf_counter()
    final_ckpt = save(epoch, final=not stopped)
    if rank == 0:
        print(f"final checkpoint written in {time.perf_counter() - t_save:.1f}s", flush=True)
        emit("progress", step=step, total=total_steps, epoch=epoch, done=True)
        emit("line", text=f"  train: {step:,} steps in {train_seconds:.0f}s")
    totals = torch.tensor([rows, first_epoch_rows, truncated[0]], dtype=torch.int64)
    dist.all_reduce(totals)

    sparse_arch = next(m for m in dmp.modules() if isinstance(m, SparseArch))
    metrics = managed_collision_metrics(sparse_arch, "train")
    for name in args.eval_sets if not stopped else ():
        t_eval = time.perf_counter()
        tower = model.model.tower
        prefixes = getattr(tower, "prefix_passes", 0)
        metrics |= evaluate_shard(dmp, stream(name, tc.eval_batch_size), padding(tc.eval_batch_size),
                                  prefix=f"{name}_", names=cfg.schema.labels)
        metrics |= managed_collision_metrics(sparse_arch, name)
        if rank == 0:
            shared = getattr(tower, "prefix_passes", 0) - prefixes  # rows sharing a request_id
            print(f"{name}: evaluated {int(metrics[f'{name}_rows']):,} rows in {time.perf_counter() - t_eval:.1f}s"
                  + (f" ({shared:,} request prefixes on this worker, each computed once)" if shared else ""),
                  flush=True)
            emit("line", text=f"  evaluate {name}: {int(metrics[f'{name}_rows']):,} rows, AUC "
                              f"{metrics[f'{name}_auc']:.4f} ({time.perf_counter() - t_eval:.0f}s)")
            for label, rate in one_class_labels(metrics, f"{name}_", cfg.schema.labels).items():
                emit("line", text=f"  warning: every '{label}' label of the {name} rows is {int(rate)}: "
                                  "AUC, GAUC and calibration are undefined (NaN) for it")
    # which Ray node each rank ran on (the driver tags the run: tokenrec.worker_nodes)
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    if rank == 0:
        slots = (step - start_step) * tc.batch_size * dist.get_world_size()
        new_samples = int(totals[0]) - pos.rows
        metrics.update(samples_trained=int(totals[0]), rows_trained=int(totals[1]), steps=step,
                       rows_sequence_truncated=int(totals[2]), first_step_time=first_step_time,
                       stopped_early=int(stopped), train_seconds=train_seconds,
                       data_wait_seconds=data_wait,
                       train_rows_per_s=new_samples / max(train_seconds, 1e-9),
                       padding_share=1.0 - new_samples / max(slots, 1),
                       checkpoint_path=str(final_ckpt),  # the driver exports it (a path or a URI)
                       worker_nodes=json.dumps(nodes))  # by rank; the driver tags the run with it
        logger.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.close()  # everything queued is sent before the run is reported done
    # Ray Train V2 fills Result.metrics only with a checkpoint: rank 0 hands it a small folder
    # naming the published checkpoint (the DCP files stay where jobs.checkpoint put them).
    report = None
    if rank == 0:
        report = tempfile.mkdtemp(prefix="tokenrec-report-")
        with open(f"{report}/checkpoint.json", "w") as f:
            json.dump({"checkpoint": final_ckpt}, f)
    # (uploaded to RunConfig.storage_path, then removed here: nothing of the run stays on the node)
    ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(report) if report else None,
                     delete_local_checkpoint_after_upload=True)


def managed_collision_metrics(sparse_arch: SparseArch, phase: str) -> dict[str, float]:
    """Per managed-collision table, over all workers: ``mc_<table>_<phase>_collision_rate``
    (share of field lookups since the last call that got no row of their own: new ids not
    admitted yet, or with the table full), ``mc_<table>_<phase>_history_collision_rate`` for the
    sequence lookups of a table that has them (an id-space table's history ids), and, after
    training, ``mc_<table>_occupancy`` (share of rows holding an id) and ``mc_<table>_ids``.
    Collective; resets the lookup counters."""
    out = {}
    occupancy = sparse_arch.mc_occupancy()
    sequence_tables = {t.name for t in sparse_arch.schema.sequence_tables}
    for table, counts in sorted(sparse_arch.mc_counts.items()):  # same order on every rank
        c = counts.clone()
        dist.all_reduce(c)
        counts.zero_()
        out[f"mc_{table}_{phase}_collision_rate"] = float(c[1]) / max(float(c[0]), 1.0)
        if table in sequence_tables:
            out[f"mc_{table}_{phase}_history_collision_rate"] = float(c[3]) / max(float(c[2]), 1.0)
        if phase == "train":
            occ = occupancy[table].clone()
            dist.all_reduce(occ)
            out[f"mc_{table}_ids"] = float(occ[0])
            out[f"mc_{table}_occupancy"] = float(occ[0]) / float(occ[1])
    return out


@torch.no_grad()
def evaluate_shard(dmp, batches: Iterator, padding, prefix: str = "eval_",
                   names: tuple[str, ...] | None = None) -> dict:
    """Predict this worker's eval rows, gather all workers' on every rank, compute metrics
    (``jobs.metrics.evaluate``, keys prefixed ``prefix``)."""
    dmp.eval()
    labels, probs, users = [], [], []
    for batch in synced(batches, padding):
        _, logits = dmp(batch)
        real = batch.weights.cpu().numpy() > 0
        labels.append(batch.labels.cpu().numpy()[real])
        probs.append(torch.sigmoid(logits).cpu().numpy()[real])
        users.append(batch.user_ids.cpu().numpy()[real])
    local = (np.concatenate(labels) if labels else np.zeros((0, 1), np.float32),
             np.concatenate(probs) if probs else np.zeros((0, 1), np.float32),
             np.concatenate(users) if users else np.zeros(0, np.int64))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    y, p, u = (np.concatenate([g[i] for g in gathered]) for i in range(3))
    dmp.train()
    return evaluate(y, p, u, prefix=prefix, names=names)

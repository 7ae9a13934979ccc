"""The Ray Train worker: shard the model, train on this worker's stream, evaluate, checkpoint.

Every worker runs the same number of steps with the same batch size (sharded collectives need
both): a short batch is filled up with zero-weight padding rows, and a worker whose stream ends
first runs all-padding batches until the others are done, so uneven shards never hang. Rows are
counted only when really trained (weight 1).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from embedding.sharding import dense_optimizer, shard
from jobs.config import JobConfig
from jobs.metrics import evaluate
from jobs.tracking import StepLogger
from model.ranking import RankingModel, RankingTrain
from pipeline.collate import collate


@dataclass(frozen=True)
class WorkerArgs:
    cfg: JobConfig
    run_id: str
    tracking_uri: str
    checkpoint_dir: str
    has_eval: bool
    template: object  # a one-row pyarrow.Table: a worker whose stream is empty pads with it


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


def train_loop(args: WorkerArgs) -> None:
    cfg, tc = args.cfg, args.cfg.train
    torch.set_num_threads(1)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(tc.seed)
    device = ray.train.torch.get_device() if tc.use_gpu else torch.device("cpu")
    model = RankingTrain(RankingModel(cfg.schema, cfg.model, sparse_device=torch.device("meta")))
    dmp = shard(model, tc.sharding, device)
    opt = dense_optimizer(dmp, tc.sharding)

    def padding(size: int):
        return collate(args.template.slice(0, 0), cfg.schema, pad_to=size,
                       padding_row=args.template).to(device)

    logger = StepLogger(args.tracking_uri, args.run_id) if rank == 0 else None

    def stream(name: str, batch_size: int) -> Iterator:
        shard_it = ray.train.get_dataset_shard(name)
        for table in shard_it.iter_batches(batch_size=batch_size, batch_format="pyarrow",
                                           prefetch_batches=2):
            yield collate(table, cfg.schema, pad_to=batch_size,
                          padding_row=args.template).to(device, non_blocking=True)

    step, rows, first_epoch_rows = 0, 0, 0
    t0, window_rows, window_t = time.perf_counter(), 0, time.perf_counter()
    dmp.train()
    for epoch in range(tc.epochs):
        for batch in synced(stream("train", tc.batch_size), padding(tc.batch_size)):
            loss, _ = dmp(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
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
                window_rows, window_t = 0, time.perf_counter()
        if rank == 0:
            print(f"epoch {epoch} done: step {step}, {rows:,} rows so far on rank 0, "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    train_seconds = time.perf_counter() - t0
    totals = torch.tensor([rows, first_epoch_rows], dtype=torch.int64)
    dist.all_reduce(totals)

    metrics = {}
    if args.has_eval:
        metrics = evaluate_shard(dmp, stream("eval", tc.eval_batch_size), padding(tc.eval_batch_size))
    state = {strip_prefixes(k): v for k, v in dmp.state_dict().items()}
    dcp.save(state, checkpoint_id=args.checkpoint_dir)
    if rank == 0:
        slots = step * tc.batch_size * dist.get_world_size()
        metrics.update(samples_trained=int(totals[0]), rows_trained=int(totals[1]), steps=step,
                       train_seconds=train_seconds,
                       train_rows_per_s=float(totals[0]) / max(train_seconds, 1e-9),
                       padding_share=1.0 - float(totals[0]) / max(slots, 1))
        logger.log(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    # Rank 0 hands the (shared-folder) checkpoint to Ray Train, which copies it into the run's
    # storage; the driver reads metrics and the checkpoint from the Result.
    checkpoint = ray.train.Checkpoint.from_directory(args.checkpoint_dir) if rank == 0 else None
    ray.train.report(metrics, checkpoint=checkpoint)


@torch.no_grad()
def evaluate_shard(dmp, batches: Iterator, padding) -> dict:
    """Predict this worker's eval rows, gather all workers' on every rank, compute metrics."""
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
    return evaluate(y, p, u)

"""``tokenrec train``: days of logs → Ray Train workers → next-day evaluation → MLflow registry.

Order: check every file's columns (before anything starts) → open the MLflow run → Ray Data
streams with quarantine → TorchTrainer (N gloo workers, DMP) → accounting identity
``rows_in = rows_trained + rows_quarantined`` → export the unsharded model → register a version
carrying its metrics.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig, UserCallback
from ray.train.torch import TorchConfig, TorchTrainer

from deploy.export import export_checkpoint, log_pyfunc, request_example
from embedding import storage
from embedding.dense_parallel import check_tower
from jobs.checkpoint import check_layout, discard_uncommitted, is_published, read_position
from jobs.config import JobConfig
from jobs.console import active
from jobs.tracking import connect, default_tracking_uri, flatten, log_day_inputs, log_metrics, redact, with_retries
from jobs.worker import WorkerArgs, train_loop
from model.ranking import RankingModel, RankingTrain
from pipeline.days import day_files, next_day, parse_days, parse_range
from pipeline.source import UnequalSplit, deal_files, read_logs
from pipeline.validate import check_files, count_quarantined, first_valid_row


@dataclass(frozen=True, kw_only=True)
class TrainRequest:
    days: str
    data_root: Path
    workdir: Path | str  # a local folder or an object-store URI (s3://bucket/prefix)
    tracking_uri: str | None = None
    address: str | None = None  # a Ray cluster; None starts a local one
    init_from: str | None = None  # warm start from this checkpoint (weights + optimizer state)
    resume_from: str | None = None  # continue a stopped run of the same job from this checkpoint
    tags: dict[str, str] | None = None  # extra MLflow run tags
    register: bool = True  # register the exported model as a new version
    command: str | None = None  # the command that started it (the run's description); None: the CLI's


def planned_steps(files: list[Path], tc) -> int:
    """Optimizer steps of a run, for the learning-rate schedule: per epoch, the largest worker
    share of rows (files dealt by row count, ``pipeline.source.deal_files``) in batches; an
    upper bound when rows are quarantined (the schedule then ends a little above its floor)."""
    shares = [sum(pq.read_metadata(f).num_rows for f in mine) for mine in deal_files(files, tc.num_workers)]
    per_epoch = max((math.ceil(n / tc.batch_size) for n in shares), default=0)
    return per_epoch * tc.epochs  # not cut by max_steps: a run stopped early resumes the same schedule


def _worker_entry(config: dict) -> None:
    train_loop(config["args"])


def init_ray(address: str | None, num_workers: int) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")  # worker prints once, not twice
    address = address or os.environ.get("RAY_ADDRESS")  # set inside `ray job submit` and on cluster nodes
    if address:
        ray.init(address=address)
    else:  # a new local Ray (never a `ray start` cluster found on the machine: that needs --address);
        # logical CPUs for the workers plus room for Ray Data's read and quarantine tasks
        # with the dashboard (on 127.0.0.1): Ray Train's placement-group cleaner asks its state
        # API every few seconds whether the controller lives; without it each check logged
        # "Failed to query Ray Train Controller actor state" (~470 lines in a run on real data)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_workers + 2), include_dashboard=True,
                 dashboard_host="127.0.0.1", configure_logging=False)


def oracle_auc(data_root: Path | str, day: str) -> float | None:
    meta = storage.join(data_root, "_generator.json")
    if storage.exists(meta):
        return json.loads(storage.read_text(meta)).get(day, {}).get("oracle_auc")
    return None


def eval_spec(days: list) -> str:
    """``YYYY-MM-DD`` for one day, ``A..B`` for several (what ``tokenrec.eval_day`` holds)."""
    return str(days[0]) if len(days) == 1 else f"{days[0]}..{days[-1]}"


def eval_ranges(tc, days: list) -> dict[str, list]:
    """The run's named evaluation ranges, name → days, in declared order: ``[train].eval_ranges``
    resolved against the last training day, or one range ``eval`` from ``eval_offset`` and
    ``eval_days``. Raises ``ValueError`` when a range overlaps the training days (leakage)."""
    if not tc.eval_ranges:
        first = next_day(days[-1], tc.eval_offset)
        ranges = {"eval": [next_day(first, k) for k in range(tc.eval_days)]}
    else:
        ranges = {name: parse_range(spec, days[-1]) for name, spec in tc.eval_ranges.items()}
    train = set(days)
    for name, ds in ranges.items():
        if train & set(ds):
            raise ValueError(f"evaluation range '{name}' ({eval_spec(ds)}) overlaps the training days "
                             f"{days[0]}..{days[-1]}: evaluate on days the model has not trained on")
    return ranges


def log_plots(client, run_id: str, tracking_uri: str, cfg, run_dir: Path, log) -> None:
    """Images on the run page: the training curve (loss and rows/s by step) and, for towers with
    per-layer sequence states, the collapse diagnostics (``tokenrec analyze`` on
    ``[train].diagnostics_rows`` held-out rows of the first evaluation range)."""
    from jobs.analyze import run_analyze
    from model.diagnostics import LAYER_TOWERS, plot_training_curve

    history = {name: [(p.step, p.value) for p in client.get_metric_history(run_id, name)]
               for name in ("train_loss", "rows_per_s")}
    out = run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    plot_training_curve(history, out / "training_curve.png")
    client.log_artifact(run_id, str(out / "training_curve.png"), "plots")
    if cfg.train.diagnostics_rows and cfg.model.tower in LAYER_TOWERS:
        reports = run_analyze([run_id], tracking_uri, rows=cfg.train.diagnostics_rows, log=lambda *_: None)
        ranks = [round(layer["effective_rank"], 1) for rep in reports.values() for layer in rep["layers"]]
        log(f"collapse diagnostics: effective rank per layer {ranks} (diagnostics/diagnostics.png on the run)")


def run_description(cfg, days: list, evals: dict, command: str | None = None) -> str:
    """The run page's description: what the run is and the exact command, when known (given, or
    this process's own ``tokenrec`` command line; not Ray's worker command inside a Tune trial)."""
    import shlex

    prog = Path(sys.argv[0]).name if sys.argv else ""
    if command is None and prog in ("cli.py", "tokenrec"):  # `python -m jobs.cli` is `tokenrec`
        # an argument may be a URI with user:password@ (--tracking-uri): stored redacted
        command = " ".join(shlex.quote(redact(a)) for a in ["tokenrec", *sys.argv[1:]])
    ranges = ", ".join(f"{name} {spec}" for name, (_, _, spec) in evals.items())
    return (f"**{cfg.model.tower}** trained on {days[0]}..{days[-1]} ({len(cfg.schema.sparse)} sparse fields, "
            f"{len(cfg.schema.sequences)} sequences, labels {', '.join(cfg.schema.labels)}); evaluated on {ranges}."
            + (f"\n\nCommand: `{command}`" if command else ""))


def register_once(client, name: str, model_uri: str, run_id: str, tags: dict):
    """Register ``model_uri`` as a version of ``name``, exactly once per run: a retry after a
    failure whose request may have gone through first looks for the run's version."""
    def attempt():
        for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            return v
        return mlflow.register_model(model_uri, name, tags=tags)
    return with_retries(attempt, what="registering the model")


# Exceptions that recur on every attempt: a bad value, a wrong type, a missing key — raised by
# this project's checks or by code given the same inputs. A lost worker (RayActorError), a broken
# collective (RuntimeError from gloo/NCCL) or an OS error may pass on a retry.
DETERMINISTIC_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, NotImplementedError,
                        AssertionError, ZeroDivisionError)


class DeterministicWorkerError(RuntimeError):
    """A worker raised an exception that would recur on a retry (``DETERMINISTIC_ERRORS``)."""


def worker_cause(e: BaseException) -> BaseException:
    """The exception a worker raised, out of Ray's wrappers: ``RayTaskError.cause``, and the
    ``__cause__`` of Ray Data's ``UserCodeException`` ("UDF failed to process a data block"),
    which wraps an error raised in the reader or the quarantine step."""
    import ray.exceptions

    for _ in range(16):
        if getattr(e, "cause", None) is not None:
            e = e.cause
        elif isinstance(e, ray.exceptions.RayError) and e.__cause__ is not None:
            e = e.__cause__
        else:
            break
    return e


class StopOnDeterministicError(UserCallback):
    """Ray Train's failure policy restarts the worker group after any worker exception, up to
    ``[train].max_failures`` times — right for a lost worker, wrong for an error that recurs
    (the issue-19 example: 76 s and two restarts for a configuration error). Called on the Ray
    Train controller when workers raise: a deterministic exception (``DETERMINISTIC_ERRORS``)
    ends the run at once — a callback that raises is a controller error, which Ray Train does
    not retry — naming the rank and the worker's message. Other failures are left to the
    policy."""

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        causes = {rank: worker_cause(e) for rank, e in worker_exceptions.items()}
        if any(_is_system_error(c) for c in causes.values()):
            return  # a lost worker: other ranks' errors may be its knock-on effects — retry
        for rank, cause in sorted(causes.items()):
            if isinstance(cause, DETERMINISTIC_ERRORS) and not _is_system_error(cause):
                text = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
                raise DeterministicWorkerError(f"worker {rank}: {type(cause).__name__}: {text} "
                                               "(an error that would recur: not retried)")


def _find(e: BaseException | None, kind: type) -> BaseException | None:
    """``e`` or the first exception of ``kind`` it wraps (causes, Ray's ``controller_failure``
    and ``cause``)."""
    for _ in range(16):
        if e is None or isinstance(e, kind):
            return e
        e = (getattr(e, "controller_failure", None) or getattr(e, "cause", None) or e.__cause__
             or e.__context__)
    return None


def _is_system_error(e: BaseException) -> bool:
    """Ray's own errors can subclass a builtin (``as_instanceof_cause``): those that mean a lost
    worker or actor are system errors whatever else they are."""
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError))


def worker_model_template(cfg: JobConfig) -> RankingTrain:
    """The model as each worker builds it (world size, step rows), on the meta device (no
    memory). A configuration error — e.g. a managed-collision ``hash_size`` the worker count
    does not divide — raises ``ValueError`` here, on the driver, before any worker starts:
    inside the workers Ray Train would restart the group ``max_failures`` times for an error that
    recurs every time."""
    with torch.device("meta"):
        model = RankingTrain(RankingModel(cfg.schema, cfg.model, sparse_device=torch.device("meta"),
                                          num_shards=cfg.train.num_workers,
                                          batch_rows=max(cfg.train.batch_size, cfg.train.eval_batch_size)))
    check_tower(model, cfg.train.dense)  # per-block options on a tower without blocks
    return model


def run_train(cfg: JobConfig, req: TrainRequest, log=print) -> dict:
    worker_model_template(cfg)  # deterministic model errors: before the MLflow run and the workers
    days = parse_days(req.days or cfg.train.days)
    ranges = eval_ranges(cfg.train, days)
    for name, ds in ranges.items():
        if ds[0] < days[0]:
            log(f"warning: evaluation range '{name}' ({eval_spec(ds)}) starts before the training days "
                f"{days[0]}..{days[-1]}: its rows' histories may include days the model trained on")
    train_files = day_files(req.data_root, days, log=log)
    # schema problems stop here, before training
    rows_in = check_files(train_files, cfg.schema, cfg.train.unknown_columns, log)
    evals = {}  # name → (files, rows_in, day spec)
    for name, ds in ranges.items():
        files = day_files(req.data_root, ds, log=log)
        evals[name] = (files, check_files(files, cfg.schema, cfg.train.unknown_columns, log=lambda *_: None),
                       eval_spec(ds))
    eval_day = next(iter(evals.values()))[2]  # the first range: registry tags, daily gate
    log(f"train days {days[0]}..{days[-1]}: {len(train_files)} files, {rows_in:,} rows; "
        + "; ".join(f"{name} {spec}: {n:,} rows" for name, (_, n, spec) in evals.items()))

    tracking_uri = req.tracking_uri or default_tracking_uri(req.workdir)
    if not storage.is_uri(req.workdir):
        Path(req.workdir).mkdir(parents=True, exist_ok=True)
    client, exp_id = connect(tracking_uri, cfg.tracking.experiment, storage.join(req.workdir, "mlartifacts"))
    run = client.create_run(exp_id, run_name=f"{cfg.model.tower} {days[0]}..{days[-1]}", tags={
        "mlflow.note.content": run_description(cfg, days, evals, req.command),
        "tokenrec.days": f"{days[0]}..{days[-1]}", "tokenrec.eval_day": str(eval_day),
        "tokenrec.schema": cfg.schema.fingerprint(), "tokenrec.data_root": storage.absolute(req.data_root),
        "tokenrec.tower": cfg.model.tower,
        "tokenrec.eval_ranges": json.dumps({name: spec for name, (_, _, spec) in evals.items()}),
    } | ({"tokenrec.init_from": req.init_from} if req.init_from else {})
      | ({"tokenrec.resumed_from": req.resume_from} if req.resume_from else {})
      | (req.tags or {}))
    run_id = run.info.run_id
    log(f"MLflow run {run_id} in {redact(tracking_uri)}")
    console = active()  # the CLI's: this run's library and worker output goes to runs/<id>/run.log
    # written locally (an object-store work folder: under storage.local_dir), uploaded at the end
    run_log = (storage.local_dir(req.workdir) / "runs" / run_id / "run.log").resolve()
    try:
        with_retries(log_day_inputs, client, run_id, req.data_root, {"training": (days, train_files, rows_in)}
                     | {name: (ranges[name], files, n) for name, (files, n, _) in evals.items()}, cfg.schema,
                     what="logging the dataset inputs")
        with console.capture(run_log) if console else contextlib.nullcontext():
            metrics = _train_and_register(cfg, req, client, run_id, tracking_uri, train_files, evals,
                                          rows_in, eval_day, log)
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    finally:
        if run_log.exists():
            with contextlib.suppress(Exception):  # the log is a convenience: never fail the run on it
                client.log_artifact(run_id, str(run_log), "logs")
            with contextlib.suppress(Exception):
                storage.mirror(run_log, req.workdir, "runs", run_id, "run.log")
    client.set_terminated(run_id, "FINISHED")
    return metrics | {"run_id": run_id, "tracking_uri": tracking_uri, "eval_range": next(iter(evals))}


def _train_and_register(cfg, req, client, run_id, tracking_uri, train_files, evals: dict, rows_in,
                        eval_day: str, log) -> dict:
    params = flatten({k: v for k, v in cfg.to_dict().items() if k != "schema"})
    params |= {"schema.num_sparse": len(cfg.schema.sparse), "schema.num_dense": len(cfg.schema.dense),
               "schema.num_tables": len(cfg.schema.tables), "schema.num_sequences": len(cfg.schema.sequences)}
    for i in range(0, len(params), 100):
        chunk = dict(list(params.items())[i:i + 100])
        client.log_batch(run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in chunk.items()])
    client.log_text(run_id, cfg.to_json(), "config/resolved_config.json")

    init_ray(req.address, cfg.train.num_workers)
    ray.data.DataContext.get_current().enable_progress_bars = False  # workers print progress
    run_dir = storage.under(req.workdir, "runs", run_id)  # a Path, or a URI on object storage
    quarantine = storage.join(run_dir, "quarantine")
    # TokenFormer evaluates rows that share a request_id against one prefix per request (exact)
    requests = cfg.model.tokenformer.target_groups if cfg.model.tower == "tokenformer" else None
    datasets = {"train": read_logs(train_files, cfg.schema, storage.join(quarantine, "train"))} | {
        name: read_logs(files, cfg.schema, storage.join(quarantine, name), request_groups=requests)
        for name, (files, _, _) in evals.items()}
    template = worker_model_template(cfg)
    for path, flag in ((req.init_from, "--init-from"), (req.resume_from, "--resume")):
        if path and not is_published(path):
            raise FileNotFoundError(f"checkpoint {path} does not exist or was never published "
                                    f"(no meta.json)")
        if path:  # another tower layout stops here, naming the difference, not inside the workers
            check_layout(path, template, flag=flag)
    if req.resume_from:
        pos = read_position(req.resume_from)
        if pos.world_size != cfg.train.num_workers:
            raise ValueError(f"--resume: {req.resume_from} was saved by {pos.world_size} workers; exact resume "
                             f"replays each worker's stream, so it needs {pos.world_size} workers, not "
                             f"{cfg.train.num_workers} (--init-from warm-starts on any number)")
        if cfg.train.max_steps and cfg.train.max_steps <= pos.step:
            raise ValueError(f"--resume: the checkpoint is at step {pos.step} and [train].max_steps is "
                             f"{cfg.train.max_steps}: raise it or set it to 0 to train on")
    args = WorkerArgs(cfg=cfg, run_id=run_id, tracking_uri=tracking_uri,
                      checkpoint_root=storage.join(run_dir, "checkpoints"), eval_sets=tuple(evals),
                      template=first_valid_row(train_files, cfg.schema),
                      init_from=req.init_from, resume_from=req.resume_from,
                      total_steps=planned_steps(train_files, cfg.train))
    trainer = TorchTrainer(
        _worker_entry, train_loop_config={"args": args},
        torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     placement_strategy=cfg.train.placement_strategy),
        datasets=datasets, dataset_config=UnequalSplit(deterministic=cfg.train.deterministic, sources={
            "train": (train_files, cfg.schema, storage.join(quarantine, "train"))} | {
            name: (files, cfg.schema, storage.join(quarantine, name), requests)
            for name, (files, _, _) in evals.items()}),
        run_config=RunConfig(name=f"train-{run_id}", storage_path=str(storage.under(req.workdir, "ray_results")),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             callbacks=[StopOnDeterministicError()]),
    )
    t0 = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as e:  # a deterministic worker error: its own message, one line (exit 2)
        with contextlib.suppress(Exception):  # a failed run leaves no half-written checkpoint behind
            gone = discard_uncommitted(args.checkpoint_root)
            if gone:
                log(f"deleted {len(gone)} unfinished checkpoint folder(s) of this run: {', '.join(gone)}")
        stop = _find(e, DeterministicWorkerError)
        if stop is not None:
            raise ValueError(str(stop)) from None
        raise
    if result.checkpoint is None or not result.metrics:
        raise RuntimeError(f"training returned no checkpoint/metrics (Ray Train result: {result})")
    m = dict(result.metrics)
    checkpoint = m.pop("checkpoint_path")  # a local path or a URI, as jobs.checkpoint published it
    nodes = json.loads(m.pop("worker_nodes"))  # the Ray node id of each rank
    client.set_tag(run_id, "tokenrec.worker_nodes", json.dumps(nodes))
    if len(set(nodes)) > 1:
        log(f"  {len(nodes)} workers ran on {len(set(nodes))} Ray nodes")
    m["wall_seconds"] = time.perf_counter() - t0
    client.set_tag(run_id, "tokenrec.checkpoint", str(checkpoint))
    m["checkpoint"] = str(checkpoint)
    if m.get("stopped_early"):
        log(f"stopped after step {m['steps']} ([train].max_steps); continue with --resume {checkpoint} "
            f"and [train].max_steps raised or 0")
        log_metrics(client, run_id, m)
        return m

    # Accounting: nothing lost. rows_trained counts the first epoch; every epoch re-reads them all.
    rows_trained = m["rows_trained"]
    if m["samples_trained"] != rows_trained * cfg.train.epochs:
        raise RuntimeError(f"row accounting broken: {m['samples_trained']} samples trained over "
                           f"{cfg.train.epochs} epochs of {rows_trained} rows")
    q_train, reasons = count_quarantined(storage.join(quarantine, "train"))
    m |= {"rows_in": rows_in, "rows_trained": rows_trained, "rows_quarantined": q_train}
    if rows_in != rows_trained + q_train:
        raise RuntimeError(f"row accounting broken: train rows_in {rows_in} != trained {rows_trained} + "
                           f"quarantined {q_train}")
    all_reasons, q_evals = {"train": reasons}, 0
    for name, (_, n_in, spec) in evals.items():
        q, all_reasons[name] = count_quarantined(storage.join(quarantine, name))
        m |= {f"{name}_rows_in": n_in, f"{name}_rows_quarantined": q}
        if n_in != m[f"{name}_rows"] + q:
            raise RuntimeError(f"row accounting broken: {name} rows_in {n_in} vs evaluated {m[f'{name}_rows']} + {q}")
        q_evals += q
        oracle = oracle_auc(req.data_root, spec) if ".." not in spec else None
        if oracle is not None:
            m[f"{name}_oracle_auc"] = oracle
    if m.get("rows_sequence_truncated"):
        log(f"{int(m['rows_sequence_truncated']):,} training rows had a behaviour sequence longer than its "
            f"max_len: their newest max_len behaviours were kept (metric rows_sequence_truncated)")
    if q_train or q_evals:
        log(f"quarantined {q_train:,} train and {q_evals:,} evaluation rows into {quarantine}: "
            f"{{{', '.join(f'{k!r}: {v}' for r in all_reasons.values() for k, v in r.items())}}}")
    log_metrics(client, run_id, m)
    client.log_dict(run_id, all_reasons, "quarantine/reasons.json")

    t_export = time.perf_counter()
    # written to a local staging folder, then published whole (storage.publish: one rename, or
    # the files then a commit marker on object storage); serving is logged from the local copy
    local_run = (storage.local_dir(req.workdir) / "runs" / run_id).resolve()
    staging = local_run / f".export-{os.getpid()}"
    export_checkpoint(cfg.schema, cfg.model, checkpoint, staging, program=req.register)
    export_dir = storage.join(run_dir, "export")
    remote = storage.is_uri(export_dir)
    storage.publish(staging, export_dir, consume=not remote)
    local_export = staging if remote else Path(export_dir)
    log(f"  export: {'the serving programs (torch.export)' if req.register else 'the weights'} "
        f"({time.perf_counter() - t_export:.0f}s)")
    client.set_tag(run_id, "tokenrec.export", str(export_dir))
    m["export_dir"] = str(export_dir)
    try:
        return _log_and_register(cfg, req, client, run_id, tracking_uri, evals, eval_day, m, local_export, local_run,
                                 log)
    finally:
        if remote:  # the staged copies (the run log beside them is uploaded at the end)
            for staged in (staging, local_run / "plots"):
                shutil.rmtree(staged, ignore_errors=True)


def _log_and_register(cfg, req, client, run_id, tracking_uri, evals, eval_day, m, export_dir, local_run, log):
    try:  # images for the run page: never the reason a trained run fails
        log_plots(client, run_id, tracking_uri, cfg, local_run, log)
    except Exception as e:  # noqa: BLE001
        log(f"warning: the run's plots were not logged ({type(e).__name__}: {e})")
    if not req.register:
        return m
    example = request_example(cfg.schema, list(next(iter(evals.values()))[0]))  # the first range's rows

    def log_model():
        with mlflow.start_run(run_id=run_id):
            return log_pyfunc(export_dir, input_example=example)

    info = with_retries(log_model, what="logging the model")
    tags = ({k: str(v) for k, v in m.items() if k.startswith(tuple(f"{name}_" for name in evals))}
            | {"tokenrec.days": client.get_run(run_id).data.tags["tokenrec.days"], "tokenrec.eval_day": eval_day,
               "tokenrec.eval_range": next(iter(evals)),  # whose metrics the registry lists
               "tokenrec.tower": cfg.model.tower, "tokenrec.seed": str(cfg.train.seed),
               "train_rows_per_s": f"{m.get('train_rows_per_s', 0.0):.1f}"})
    version = register_once(client, cfg.tracking.model_name, info.model_uri, run_id, tags)
    m["model_version"] = int(version.version)
    client.set_tag(run_id, "tokenrec.model_version", str(version.version))
    log(f"registered {cfg.tracking.model_name} version {version.version}")
    return m

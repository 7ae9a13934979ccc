"""``tokenrec``: the command line. Each subcommand parses its flags and calls one job."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

from embedding import storage
from pipeline.validate import SchemaMismatchError

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.toml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="show the libraries' output and full tracebacks instead of only the job's lines")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="job TOML (default: configs/demo.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value, e.g. --set model.use_sequences=false (repeatable)")


def cmd_generate(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from pipeline.days import parse_days
    from pipeline.generator import generate

    cfg = load_config(a.config, a.overrides)
    generate(cfg.schema, cfg.generator, a.out, parse_days(a.days))
    print(f"wrote {a.out}")
    return 0


@contextlib.contextmanager
def _captured(a: argparse.Namespace):
    """The command's console capture: library and worker output to WORKDIR/logs/<command>-<time>.log
    (each training run nests its own runs/<id>/run.log), the job's lines on the terminal. Ray is
    shut down inside it, so its last forwarded worker lines land in the log too."""
    name = f"{a.command}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    local = storage.local_dir(a.workdir) / "logs" / name  # an object-store work folder: uploaded after
    try:
        with a.console.capture(local):
            try:
                yield
            finally:
                if "ray" in sys.modules:
                    import ray

                    if ray.is_initialized():
                        ray.shutdown()
    finally:
        with contextlib.suppress(Exception):  # the log is a convenience: never fail the command on it
            storage.mirror(local, a.workdir, "logs", name)


def cmd_train(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.train import TrainRequest, run_train

    overrides = list(a.overrides) + ([f"train.num_workers={a.num_workers}"] if a.num_workers else [])
    cfg = load_config(a.config, overrides)
    with _captured(a):
        m = run_train(cfg, TrainRequest(days=a.days or "", data_root=a.data, workdir=a.workdir,
                                        tracking_uri=a.tracking_uri, address=a.address,
                                        init_from=a.init_from and storage.absolute(a.init_from),
                                        resume_from=a.resume and storage.absolute(a.resume)), log=a.console.line)
    _summary(m)
    return 0


def cmd_tune(a: argparse.Namespace) -> int:
    from jobs.tune import StudyRequest, run_study

    with _captured(a):
        run_study(StudyRequest(config=a.config, study=a.study, data_root=a.data, workdir=a.workdir,
                               overrides=tuple(a.overrides), tracking_uri=a.tracking_uri, address=a.address,
                               results=a.results), log=a.console.line)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.demo import DemoRequest, follow_up_commands, run_demo
    from jobs.registry import Registry
    from jobs.tracking import connect

    cfg = load_config(a.config, a.overrides)
    req = DemoRequest(workdir=a.workdir, daily_days=a.daily_days)
    with _captured(a):
        result = run_demo(cfg, req, log=a.console.line)
    client, _ = connect(result["tracking_uri"], cfg.tracking.experiment, a.workdir / "mlartifacts")
    print("\nthe registry (tokenrec models):")
    for line in _models_table(Registry(client, cfg.tracking.model_name).table()):
        print("  " + line)
    print("\nnext:")
    for what, command in follow_up_commands(cfg, req, result):
        print(f"  # {what}\n  {command}")
    return 0


def cmd_analyze(a: argparse.Namespace) -> int:
    from jobs.analyze import run_analyze
    from jobs.tracking import default_tracking_uri

    run_analyze(a.run, a.tracking_uri or default_tracking_uri(a.workdir), rows=a.rows)
    return 0


def _daily_request(a: argparse.Namespace):
    from jobs.daily import DailyRequest

    return DailyRequest(data_root=a.data, workdir=a.workdir, tracking_uri=a.tracking_uri,
                        address=a.address, force=a.force, cold_start=a.cold_start)


def cmd_daily(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.daily import run_daily

    with _captured(a):
        m = run_daily(load_config(a.config, a.overrides), a.date, _daily_request(a), log=a.console.line)
    if not m.get("skipped"):
        _summary(m)
    return 0


def cmd_backfill(a: argparse.Namespace) -> int:
    from jobs.config import load_config
    from jobs.daily import BackfillError, run_backfill

    try:
        with _captured(a):
            results = run_backfill(load_config(a.config, a.overrides), a.days, _daily_request(a), log=a.console.line)
    except BackfillError as e:
        print(f"tokenrec backfill: {e}", file=sys.stderr)
        return 1
    for r in results:
        state = "skipped (done before)" if r.get("skipped") else ("champion" if r["promoted"] else "challenger")
        key = f"{r.get('eval_range', 'eval')}_auc"  # [train.eval_ranges]: the first range
        auc = f"AUC {r[key]:.4f}" if key in r else ""
        print(f"{r['day']}: version {r['model_version']} {state} {auc}")
    return 0


def _registry(a: argparse.Namespace):
    from jobs.config import load_config
    from jobs.registry import Registry
    from jobs.tracking import connect, default_tracking_uri

    cfg = load_config(a.config, a.overrides)
    uri = a.tracking_uri or default_tracking_uri(a.workdir)
    if not a.verbose:  # the registry commands print their answer only, not MLflow's store set-up
        for name in ("mlflow.store.db.utils", "alembic.runtime.migration"):
            logging.getLogger(name).setLevel(logging.WARNING)
    client, _ = connect(uri, cfg.tracking.experiment, storage.join(a.workdir, "mlartifacts"))
    return cfg, Registry(client, cfg.tracking.model_name)


def cmd_models(a: argparse.Namespace) -> int:
    cfg, reg = _registry(a)
    rows = reg.table()
    if not rows:
        names = sorted(m.name for m in reg.client.search_registered_models())
        others = f"; registered models in this store: {', '.join(names)} (choose one with --model-name)" \
            if names else ""
        print(f"model '{reg.name}' has no versions yet{others}")
        return 0
    if a.json:
        print(json.dumps(rows, indent=1))
        return 0
    for line in _models_table(rows):
        print(line)
    return 0


def _models_table(rows: list[dict]) -> list[str]:
    """The registry's versions as text lines, newest first (``tokenrec models``)."""
    def num(r: dict, k: str, fmt: str = ".4f") -> str:
        return f"{float(r[k]):{fmt}}" if r[k] else "-"

    lines = [f"{'ver':>4} {'aliases':<20} {'tower':<17} {'seed':>4} {'days':<22} {'eval day':<10} {'auc':>7} "
             f"{'gauc':>7} {'logloss':>7} {'calib':>6} {'rows/s':>7} {'parent':>6}  gate"]
    for r in reversed(rows):
        lines.append(f"{r['version']:>4} {r['aliases'] or '-':<20} {r['tower'] or '-':<17} {r['seed'] or '-':>4} "
                     f"{r['days']:<22} {r['eval_day']:<10} {num(r, 'auc'):>7} {num(r, 'gauc'):>7} "
                     f"{num(r, 'logloss'):>7} {num(r, 'calibration'):>6} {num(r, 'rows_per_s', ',.0f'):>7} "
                     f"{r['parent'] or '-':>6}  {r['gate'][:90]}")
    return lines


def cmd_promote(a: argparse.Namespace) -> int:
    cfg, reg = _registry(a)
    v = reg.version(a.version)
    if a.no_gate:
        reg.set_champion(int(a.version), "promoted by hand with --no-gate")
        print(f"version {a.version} is champion (gate skipped)")
        return 0
    run = reg.run_tags(a.version)
    day = a.eval_day or v.tags.get("tokenrec.eval_day") or run.get("tokenrec.eval_day")
    data = a.data or run.get("tokenrec.data_root")
    d = reg.decide(int(a.version), data, day, cfg.gate)
    if not d.promote:
        print(f"tokenrec promote: the gate kept the champion: {d.summary()}\n"
              f"(--no-gate promotes anyway)", file=sys.stderr)
        return 2
    return 0


def cmd_rollback(a: argparse.Namespace) -> int:
    _, reg = _registry(a)
    reg.rollback()
    return 0


def cmd_data_fetch(a: argparse.Namespace) -> int:
    from pipeline.datasets.fetch import fetch

    report = fetch(a.dataset, out=a.out, source=a.source, cache=a.cache, max_len=a.max_len)
    days = sorted(report["days"])
    print(f"{report['rows']:,} rows, {len(days)} days {days[0]} .. {days[-1]} in {report['out']}\n"
          f"train with: tokenrec train --config configs/movielens.toml --data {report['out']} --days A..B")
    return 0


def _summary(m: dict) -> None:
    """The run's headline numbers: rows, each evaluation range's metrics (``eval_*``, or
    ``validation_*``, ``test_*``, … with ``[train.eval_ranges]``), speed."""
    names = sorted({k[:-len("_rows_in")] for k in m if k.endswith("_rows_in")} - {""}) or ["eval"]
    keys = ["run_id", "model_version", "rows_in", "rows_trained", "rows_quarantined"]
    for n in names:
        keys += [f"{n}_{k}" for k in ("rows", "auc", "oracle_auc", "gauc", "logloss", "calibration")]
    keys += ["train_rows_per_s", "wall_seconds"]
    print(json.dumps({k: m[k] for k in keys if k in m}, indent=1))


TRACKING_HELP = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite under --workdir)"
ADDRESS_HELP = "Ray cluster address (default: $RAY_ADDRESS, else a new local Ray)"


def cmd_score(a: argparse.Namespace) -> int:
    from jobs.score import ScoreRequest, run_score

    with _captured(a):
        run_score(ScoreRequest(model_uri=a.model, data_root=a.data, days=a.days, out=a.out, workdir=a.workdir,
                               tracking_uri=a.tracking_uri, address=a.address, batch_size=a.batch_size,
                               num_actors=a.num_actors), log=a.console.line)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenrec", description=__doc__)
    parser.add_argument("--verbose", action="store_true",
                        help="show the libraries' output and full tracebacks instead of only the job's lines")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="write synthetic day-partitioned logs with a planted signal")
    _common(g)
    g.add_argument("--days", required=True, help="YYYY-MM-DD..YYYY-MM-DD")
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(fn=cmd_generate)

    t = sub.add_parser("train", help="train on days of logs, evaluate on the next day, register")
    _common(t)
    t.add_argument("--days", help="YYYY-MM-DD..YYYY-MM-DD (default: [train].days)")
    t.add_argument("--data", type=storage.location, required=True, help="root of the day=YYYY-MM-DD folders")
    t.add_argument("--workdir", type=storage.location, default=Path(".tokenrec"),
                   help="runs, checkpoints, MLflow store")
    t.add_argument("--tracking-uri", help=TRACKING_HELP)
    t.add_argument("--address", help=ADDRESS_HELP)
    t.add_argument("--num-workers", type=int, help="Ray Train workers (default: [train].num_workers)")
    t.add_argument("--init-from", type=storage.location,
                   help="warm start from a checkpoint folder (weights + optimizer state)")
    t.add_argument("--resume", type=storage.location,
                   help="continue a stopped run of this job from its checkpoint folder")
    t.set_defaults(fn=cmd_train)

    tu = sub.add_parser("tune", help="fair tower comparison: Ray Tune trials chosen on validation days, "
                                     "then seeds on test days")
    _common(tu)
    tu.add_argument("--study", type=Path, required=True, help="study TOML ([tune]: towers, trials, seeds, space)")
    tu.add_argument("--data", type=storage.location, required=True, help="root of the day=YYYY-MM-DD folders")
    tu.add_argument("--workdir", type=storage.location, default=Path(".tokenrec"),
                    help="runs, studies/<name>, MLflow store")
    tu.add_argument("--tracking-uri", help=TRACKING_HELP)
    tu.add_argument("--address", help=ADDRESS_HELP)
    tu.add_argument("--results", type=storage.location,
                    help="each run's result, the best settings, the summary (default: "
                    "WORKDIR/studies/NAME); a lasting place lets a long study resume in a fresh workdir")
    tu.set_defaults(fn=cmd_tune)

    d = sub.add_parser("demo", help="the production loop on generated data: train, gate → champion, daily "
                                    "retraining, the registry and the commands to serve and score")
    _common(d)
    d.add_argument("--workdir", type=Path, default=Path(".tokenrec/demo"))
    d.add_argument("--daily-days", type=int, default=2, help="daily runs after the initial training (default 2)")
    d.set_defaults(fn=cmd_demo)

    z = sub.add_parser("analyze", help="collapse diagnostics (effective rank, MI, field attention) of runs")
    z.add_argument("--run", action="append", required=True, help="MLflow run id (repeat to compare)")
    z.add_argument("--workdir", type=storage.location, default=Path(".tokenrec"))
    z.add_argument("--tracking-uri", help=TRACKING_HELP)
    z.add_argument("--rows", type=int, default=2048, help="held-out rows of the run's evaluation day")
    z.set_defaults(fn=cmd_analyze)

    def registry_flags(p: argparse.ArgumentParser) -> None:
        _common(p)
        p.add_argument("--workdir", type=storage.location, default=Path(".tokenrec"),
                       help="runs, checkpoints, MLflow store")
        p.add_argument("--tracking-uri", help=TRACKING_HELP)
        p.add_argument("--model-name", help="registered model (default: [tracking].model_name of --config)")

    def daily_flags(p: argparse.ArgumentParser) -> None:
        registry_flags(p)
        p.add_argument("--data", type=storage.location, required=True, help="root of the day=YYYY-MM-DD folders")
        p.add_argument("--address", help=ADDRESS_HELP)
        p.add_argument("--force", action="store_true", help="retrain days that are already done")
        p.add_argument("--cold-start", action="store_true", help="train from scratch, not from the champion")

    y = sub.add_parser("daily", help="warm start from the champion, train one day, evaluate, gate")
    daily_flags(y)
    y.add_argument("--date", required=True, help="the day to train on, YYYY-MM-DD")
    y.set_defaults(fn=cmd_daily)

    b = sub.add_parser("backfill", help="run `daily` for each day of a range, in order")
    daily_flags(b)
    b.add_argument("--days", required=True, help="YYYY-MM-DD..YYYY-MM-DD")
    b.set_defaults(fn=cmd_backfill)

    mo = sub.add_parser("models", help="registered versions: aliases, metrics, lineage, gate decisions")
    registry_flags(mo)
    mo.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    mo.set_defaults(fn=cmd_models)

    pr = sub.add_parser("promote", help="make a version champion, through the gate unless --no-gate")
    registry_flags(pr)
    pr.add_argument("--version", type=int, required=True)
    pr.add_argument("--no-gate", action="store_true", help="skip the gate")
    pr.add_argument("--eval-day", help="day to compare on (default: the version's evaluation day)")
    pr.add_argument("--data", type=storage.location, help="data root (default: the version's training data root)")
    pr.set_defaults(fn=cmd_promote)

    rb = sub.add_parser("rollback", help="give champion back to the previous champion")
    registry_flags(rb)
    rb.set_defaults(fn=cmd_rollback)

    sc = sub.add_parser("score", help="batch predictions of a registered model over days of logs → Parquet")
    sc.add_argument("--model", required=True, help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")
    sc.add_argument("--data", type=storage.location, required=True, help="root of the day=YYYY-MM-DD folders")
    sc.add_argument("--days", required=True, help="YYYY-MM-DD or YYYY-MM-DD..YYYY-MM-DD")
    sc.add_argument("--out", type=storage.location, required=True,
                    help="output folder or URI (Parquet files; must not exist)")
    sc.add_argument("--workdir", type=storage.location, default=Path(".tokenrec"),
                    help="MLflow store, quarantine")
    sc.add_argument("--tracking-uri", help=TRACKING_HELP)
    sc.add_argument("--address", help=ADDRESS_HELP)
    sc.add_argument("--batch-size", type=int, default=4096, help="rows per scoring call")
    sc.add_argument("--num-actors", type=int, default=2, help="scoring actors (one CPU each)")
    sc.set_defaults(fn=cmd_score)

    from pipeline.datasets.fetch import DATASETS, DEFAULT_CACHE

    da = sub.add_parser("data", help="public datasets: fetch and convert to day-partitioned logs")
    dsub = da.add_subparsers(dest="data_command", required=True)
    fe = dsub.add_parser("fetch", help="MovieLens → logs (ML-100K from the recbole wheel on PyPI, or --source)")
    fe.add_argument("dataset", choices=DATASETS)
    fe.add_argument("--source", type=Path, help="a local GroupLens or RecBole MovieLens folder")
    fe.add_argument("--out", type=Path, help="where the day partitions go (default: CACHE/DATASET/logs)")
    fe.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"download cache (default {DEFAULT_CACHE})")
    fe.add_argument("--max-len", type=int, default=50, help="behaviour sequence length kept per row")
    fe.set_defaults(fn=cmd_data_fetch)

    # the console renders every worker's event line: Ray must not fold them as repeats
    os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"tokenrec\.event")
    a = parser.parse_args(argv)
    # SIGTERM (`ray job stop`, a pod's eviction or deadline) as an exception: `finally` blocks run —
    # the champion lock is released, the logs are uploaded
    previous = None
    with contextlib.suppress(ValueError):  # not the main thread (tests calling main in a thread)
        previous = signal.signal(signal.SIGTERM, _terminated)
    from jobs.console import Console

    a.console = Console(verbose=a.verbose)
    if getattr(a, "model_name", None):  # --model-name: the same as --set tracking.model_name=…
        a.overrides.append(f"tracking.model_name={json.dumps(a.model_name)}")
    try:
        return a.fn(a)
    except Exception as e:
        if not _is_ray_error(e) and isinstance(e, (ValueError, FileNotFoundError, FileExistsError,
                                                    SchemaMismatchError, RuntimeError)):
            print(f"tokenrec {a.command}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        return _library_error(a, e)
    except KeyboardInterrupt:
        print(f"tokenrec {a.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:  # main() called in-process (tests): the caller's handler again
            signal.signal(signal.SIGTERM, previous)


def _is_ray_error(e: BaseException) -> bool:
    if "ray" not in sys.modules:
        return False
    import ray.exceptions

    return isinstance(e, ray.exceptions.RayError) or type(e).__module__.startswith("ray.")


def _library_error(a: argparse.Namespace, e: BaseException) -> int:
    """MLflow, Ray, …: one line naming it (a Ray error: its cause), the traceback in a log file."""
    import re

    log = _write_traceback(a)
    cause = getattr(e, "cause", None)
    failures = getattr(e, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
    message = _one_line(cause if isinstance(cause, BaseException) else e)
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    runs = storage.local_dir(getattr(a, "workdir", "") or ".") / "runs"
    print(f"tokenrec {a.command}: error ({_origin(e)}): {message}\n"
          f"  the full traceback is in {log}{'' if a.verbose else ' (--verbose prints it here)'}"
          + (f"; the workers' output is in the run's log, {runs}/<run id>/run.log" if runs.exists() else ""),
          file=sys.stderr)
    if a.verbose:
        import traceback

        traceback.print_exception(e)
    return 1


def _terminated(signum, frame) -> None:
    raise SystemExit(128 + signum)


def _one_line(e: BaseException, limit: int = 400) -> str:
    """The exception's message on one line (its first line, at most ``limit`` characters)."""
    text = str(e).strip() or type(e).__name__
    first = text.splitlines()[0]
    return first[:limit] + ("…" if len(first) > limit or "\n" in text else "")


def _origin(e: BaseException) -> str:
    """Which library raised: the exception class's top-level package and name."""
    module = type(e).__module__.split(".")[0]
    return f"{module}.{type(e).__name__}" if module not in ("builtins", "__main__") else type(e).__name__


def _write_traceback(a: argparse.Namespace) -> Path | str:
    """The current exception's traceback in ``<workdir>/logs/`` (or the temp folder; on an
    object-store work folder written locally, then uploaded: the uploaded copy is returned)."""
    import tempfile
    import traceback

    base = getattr(a, "workdir", None)
    out = (storage.local_dir(base) if base else Path(tempfile.gettempdir())) / "logs"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError:
        out = Path(tempfile.gettempdir())
    from jobs.tracking import redact

    path = out / f"tokenrec-{a.command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    path.write_text(f"tokenrec {' '.join(redact(x) for x in sys.argv[1:])}\n\n{traceback.format_exc()}")
    if base and storage.is_uri(base):  # the node's disk may not outlive the job (a pod): upload it
        with contextlib.suppress(Exception):
            storage.mirror(path, base, "logs", path.name)
            return storage.join(base, "logs", path.name)
    return path


if __name__ == "__main__":
    sys.exit(main())

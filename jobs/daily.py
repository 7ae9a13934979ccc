"""``tokenrec daily --date D`` and ``tokenrec backfill --days A..B``: incremental retraining.

One day:

1. skip when day D already has a finished daily run whose version went through the gate
   (``--force`` retrains; a finished run whose gate never ran gets only the gate);
2. warm start from the ``champion`` (or, when none, the latest version) among the versions trained
   only on days before D (a rerun of an old day never starts from a model of later days): its checkpoint's sharded
   tables, fused optimizer state, dense weights and Adam state — any worker count;
3. train on day D (``jobs.train.run_train``), evaluate on D + ``[train].eval_offset``, register a
   version tagged with the day, the parent version and the row counts;
4. gate (``jobs.registry``): candidate and champion scored by the same ``evaluate_export`` on the
   same day → alias ``champion`` or ``challenger``; both scores are logged to the run
   (``gate_eval_*``, ``gate_champion_eval_*``) beside the workers' own ``eval_*``.

A backfill runs days in order, skipping finished ones, and stops at the first failure with a report;
rerunning the same command continues from the failed day.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mlflow.tracking import MlflowClient

from embedding import storage
from jobs.checkpoint import is_published
from jobs.config import JobConfig
from jobs.registry import Registry
from jobs.tracking import connect, default_tracking_uri, log_metrics
from jobs.train import TrainRequest, eval_ranges, eval_spec, run_train
from pipeline.days import parse_day, parse_days

DAY_TAG = "tokenrec.daily_date"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DailyRequest:
    data_root: Path | str
    workdir: Path | str  # a local folder or an object-store URI (s3://bucket/prefix)
    tracking_uri: str | None = None
    address: str | None = None
    force: bool = False
    cold_start: bool = False  # train from scratch instead of warm-starting from the champion


def finished_run(client: MlflowClient, exp_id: str, day: str):
    """The newest FINISHED daily run of ``day`` that registered a version, or None."""
    runs = client.search_runs([exp_id], f"tags.`{DAY_TAG}` = '{day}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=20)
    for r in runs:
        if "tokenrec.model_version" in r.data.tags:
            return r
    return None


def run_daily(cfg: JobConfig, day: str, req: DailyRequest, log=print) -> dict:
    day = parse_day(day).isoformat()
    eval_day = eval_spec(next(iter(eval_ranges(cfg.train, [parse_day(day)]).values())))  # the gate's range
    tracking_uri = req.tracking_uri or default_tracking_uri(req.workdir)
    if not storage.is_uri(req.workdir):
        Path(req.workdir).mkdir(parents=True, exist_ok=True)
    client, exp_id = connect(tracking_uri, cfg.tracking.experiment, storage.join(req.workdir, "mlartifacts"))
    reg = Registry(client, cfg.tracking.model_name)

    if cfg.train.max_steps:
        raise ValueError(f"daily trains whole days; unset [train].max_steps ({cfg.train.max_steps})")
    done = finished_run(client, exp_id, day)
    if done is not None and not req.force:
        version = int(done.data.tags["tokenrec.model_version"])
        if reg.champion() == version and "tokenrec.gate" not in reg.version(version).tags:
            reg.client.set_model_version_tag(reg.name, str(version), "tokenrec.gate",
                                             "champion (alias set before a crash; gate tag restored)")
        if "tokenrec.gate" in reg.version(version).tags:
            log(f"day {day} is already done: run {done.info.run_id}, version {version} "
                f"({reg.version(version).tags['tokenrec.gate']}); --force retrains it")
            return {"day": day, "skipped": True, "model_version": version, "run_id": done.info.run_id}
        log(f"day {day}: run {done.info.run_id} registered version {version} but its gate never ran")
        d = reg.decide(version, req.data_root, eval_day, cfg.gate, log)
        return {"day": day, "skipped": True, "model_version": version, "promoted": d.promote}

    parent = None if req.cold_start else reg.parent_for(day)
    init_from = None
    if parent is not None:
        tags = reg.run_tags(parent)
        if tags.get("tokenrec.schema") != cfg.schema.fingerprint():
            raise ValueError(f"the schema changed since version {parent} (fingerprint "
                             f"{tags.get('tokenrec.schema')} vs {cfg.schema.fingerprint()}): its tables "
                             f"do not fit this model; rerun with --cold-start to train from scratch")
        init_from = tags.get("tokenrec.checkpoint")
        if not init_from or not is_published(init_from):
            raise FileNotFoundError(f"version {parent}'s checkpoint {init_from} is missing; "
                                    f"restore it or rerun with --cold-start")
        log(f"day {day}: warm start from version {parent} ({'champion' if parent == reg.champion() else 'latest'})")
    else:
        log(f"day {day}: cold start")

    tags = {DAY_TAG: day, "tokenrec.parent_version": str(parent or "")}
    m = run_train(cfg, TrainRequest(days=day, data_root=req.data_root, workdir=req.workdir,
                                    tracking_uri=tracking_uri, address=req.address, init_from=init_from,
                                    tags=tags), log=log)
    version = m["model_version"]
    run_id = m["run_id"]
    for k in ("rows_in", "rows_trained", "rows_quarantined"):
        client.set_model_version_tag(cfg.tracking.model_name, str(version), f"tokenrec.{k}", str(m[k]))
    client.set_model_version_tag(cfg.tracking.model_name, str(version), "tokenrec.parent_version",
                                 str(parent or ""))
    client.set_model_version_tag(cfg.tracking.model_name, str(version), "tokenrec.checkpoint", m["checkpoint"])
    d = reg.decide(version, req.data_root, eval_day, cfg.gate, log)
    scores = {f"gate_{k}": v for k, v in d.candidate.items()}  # the gate's own scoring of this model
    scores |= {f"gate_champion_{k}": v for k, v in (d.champion or {}).items()}
    log_metrics(client, run_id, scores)
    client.set_tag(run_id, "tokenrec.gate", d.summary()[:4000])
    client.set_tag(run_id, "tokenrec.model_version", str(version))  # marks the day done
    return m | {"day": day, "skipped": False, "promoted": d.promote, "parent_version": parent}


def run_backfill(cfg: JobConfig, days: str, req: DailyRequest, log=print) -> list[dict]:
    """Days in order; raises ``BackfillError`` (with what finished) at the first failure."""
    results = []
    for day in parse_days(days):
        try:
            results.append(run_daily(cfg, day.isoformat(), req, log))
        except Exception as e:  # noqa: BLE001 - reported whole, with the days that are done
            raise BackfillError(day.isoformat(), days, results, e) from e
    return results


class BackfillError(RuntimeError):
    def __init__(self, day: str, days: str, done: list[dict], cause: BaseException) -> None:
        finished = ", ".join(f"{r['day']} (v{r['model_version']})" for r in done) or "none"
        super().__init__(f"backfill {days} stopped at {day}: {type(cause).__name__}: {cause}\n"
                         f"  finished before it: {finished}\n"
                         f"  fix the cause and rerun the same command: finished days are skipped, "
                         f"it continues from {day}")
        self.day, self.done = day, done

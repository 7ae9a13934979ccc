"""``tokenrec tune``: a fair comparison of towers on a user's own data (issue 17).

The protocol: every tower gets the same hyper-parameter budget — the same ``trials`` points of
one search space (learning rate, weight decay, warmup, dropout, …), sampled once with
``search_seed`` by Ray Tune's search-space domains and shared by all towers — each point a real
``tokenrec train`` run (Ray Data → Ray Train → MLflow) evaluated on the named day ranges of
``eval_ranges``. The best point per tower is chosen on ``metric`` (a validation range: the test
days are never looked at to choose), written out, and then trained with ``seeds`` seeds; the
report gives, per tower, test metrics mean ± std over seeds, effective rank per layer, and for
each pair in ``pairs`` the per-seed paired difference with its standard error.

Ray Tune runs the jobs (one at a time on a small machine; ``max_concurrent`` on a cluster): each
Tune trial is a driver that launches one Ray Train run, as Ray Train V2's Tune integration has it.
Every job's result is written to ``<results>/jobs/<job>.json`` when it finishes (``--results``,
default ``<workdir>/studies/<name>``), so an interrupted study resumes where it stopped: rerunning
the same command skips finished jobs, even with a fresh workdir and MLflow store.
Runs are MLflow runs nested under one parent run per study (tag ``mlflow.parentRunId``).

A study file::

    [tune]
    name = "collapse"
    towers = ["tokenformer", "naive_transformer", "dlrm"]
    trials = 4                      # points of the space, the same for every tower (0: no tuning,
                                    # seeds of the common + fixed settings only)
    seeds = 5                       # seeds of each tower's best point
    tower_seeds = { tokenformer = 8, naive_transformer = 8 }   # more for the headline pair
    metric = "validation_auc"       # chosen on validation; test untouched
    days = "2026-01-01..2026-01-04"
    eval_ranges = { validation = "+1", test = "+2..+3" }
    pairs = [["tokenformer", "naive_transformer"]]

    [tune.space]                    # dotted config keys → a Ray Tune domain
    "train.sharding.dense_lr" = { loguniform = [3e-4, 3e-3] }
    "train.optim.weight_decay" = { choice = [0.0, 0.01, 0.1] }

    [tune.common]                   # settings every run gets
    "train.sharding.dense_optimizer" = "adamw"

    [tune.fixed.tokenformer]        # per-tower settings every trial and seed of it gets
    "model.tokenformer.windows" = [64, 16]

Entries of ``towers`` may also be variants of one tower (ablations): a name that is not a tower
sets its tower in ``[tune.fixed.<name>]``, e.g. ``"model.tower" = "tokenformer"`` with
``"model.tokenformer.schedule" = "4S"``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedding import storage
from embedding.typed_config import from_dict
from jobs.config import JobConfig, apply_override, config_from_doc, set_dotted
from jobs.study_report import _toml_value, best_settings, markdown, summarize, tower_costs, write_best  # noqa: F401
from jobs.study_store import fingerprint, load_result, pending, result_path
from model.diagnostics import LAYER_TOWERS  # effective rank per layer for these
from pipeline.days import day_files, parse_days

SPACE_KINDS = ("loguniform", "uniform", "choice", "randint", "grid")
RANGE_METRICS = ("auc", "gauc", "logloss", "calibration", "rows", "oracle_auc")  # jobs.metrics.evaluate


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """The ``[tune]`` table of a study file (module docstring). Raises ``ValueError`` naming the
    key on a bad value."""

    name: str
    towers: tuple[str, ...]
    trials: int = 4
    seeds: int = 5
    tower_seeds: dict[str, int] = field(default_factory=dict)
    metric: str = "validation_auc"
    mode: str = "max"
    days: str = ""  # training days; default: the base config's [train].days
    eval_ranges: dict[str, str] = field(default_factory=lambda: {"validation": "+1", "test": "+2"})
    test_range: str = "test"  # the range the seeds' report reads
    search_seed: int = 0
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    common: dict[str, Any] = field(default_factory=dict)  # settings every tower's runs get
    settings_from: str = ""  # a best/<tower>.toml another study wrote (load_study; "{tower}": per tower)
    fixed: dict[str, dict[str, Any]] = field(default_factory=dict)  # per tower, on top of common
    pairs: tuple[tuple[str, str], ...] = ()
    analyze: bool = True  # effective rank per layer of each seed run (attention towers)
    max_concurrent: int = 1  # jobs at once (each is a multi-worker Ray Train run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "pairs", tuple(tuple(p) for p in self.pairs))
        if not self.name or "/" in self.name:
            raise ValueError(f"[tune].name: a non-empty name without '/', got {self.name!r}")
        if not self.towers:
            raise ValueError("[tune].towers: at least one tower")
        for key, low in (("trials", 0), ("seeds", 1), ("max_concurrent", 1)):
            if getattr(self, key) < low:
                raise ValueError(f"[tune].{key}: must be >= {low}, got {getattr(self, key)}")
        if self.trials == 0 and self.space:
            raise ValueError("[tune].trials = 0 (seeds of the fixed settings only) leaves [tune.space] unused: "
                             "remove it or set trials")
        if self.mode not in ("max", "min"):
            raise ValueError(f"[tune].mode: 'max' or 'min', got {self.mode!r}")
        ranges = set(self.eval_ranges)
        if metric_range(self.metric, ranges) is None:
            raise ValueError(f"[tune].metric '{self.metric}' is not a metric of an eval range {sorted(ranges)}: "
                             f"<range>_<{'|'.join(RANGE_METRICS)}>[_taskN], e.g. validation_auc")
        if metric_range(self.metric, ranges) == self.test_range:
            raise ValueError(f"[tune].metric '{self.metric}' reads the test range '{self.test_range}': choose "
                             "on a validation range and keep the test days untouched")
        if self.test_range not in ranges:
            raise ValueError(f"[tune].test_range '{self.test_range}' is not in eval_ranges {sorted(ranges)}")
        for key, spec in self.space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in SPACE_KINDS:
                raise ValueError(f"[tune.space].\"{key}\": expected one of {SPACE_KINDS} with its arguments, "
                                 f"e.g. {{ loguniform = [1e-4, 1e-2] }}; got {spec!r}")
        from model.ranking import TOWERS

        for name in self.towers:
            if name not in TOWERS and "model.tower" not in self.fixed.get(name, {}):
                raise ValueError(f"[tune].towers: '{name}' is not a tower ({', '.join(TOWERS)}); a variant "
                                 f"(an ablation) names its tower in [tune.fixed.{name}] \"model.tower\"")
        for where, settings in [("common", self.common)] + [(f"fixed.{t}", v) for t, v in self.fixed.items()]:
            for key, value in settings.items():
                try:
                    _toml_value(value)
                except ValueError:
                    raise ValueError(f"[tune.{where}].\"{key}\": {value!r} is not a TOML value") from None
        for tower in list(self.fixed) + list(self.tower_seeds):
            if tower not in self.towers:
                raise ValueError(f"[tune]: settings for tower '{tower}', which is not in towers {list(self.towers)}")
        for a, b in self.pairs:
            if a not in self.towers or b not in self.towers:
                raise ValueError(f"[tune].pairs: ({a}, {b}) names a tower not in towers {list(self.towers)}")

    def seeds_of(self, tower: str) -> int:
        return int(self.tower_seeds.get(tower, self.seeds))


def metric_parts(metric: str, ranges) -> tuple[str, str, str] | None:
    """``(range, metric, label)`` of a metric name (``validation_auc_like`` → ``("validation",
    "auc", "like")``; the label is "" for the primary one), or None when the name is not
    ``<range>_<metric>[_<label>]`` of one of ``ranges`` (longest first: range names may contain
    ``_``; the label is checked against the schema in ``run_study``)."""
    import re

    for r in sorted(ranges, key=len, reverse=True):
        if metric.startswith(f"{r}_"):
            m = re.fullmatch(rf"({'|'.join(sorted(RANGE_METRICS, key=len, reverse=True))})(?:_(\w+))?",
                             metric[len(r) + 1:])
            if m:
                return r, m.group(1), m.group(2) or ""
    return None


def metric_range(metric: str, ranges) -> str | None:
    """The evaluation range a metric name reads (``metric_parts``), or None."""
    parts = metric_parts(metric, ranges)
    return parts[0] if parts else None


def load_study(path: str | Path) -> StudyConfig:
    """Read the ``[tune]`` table of a study TOML file. ``settings_from`` (relative to the study
    file's folder or the current one) is read now: its settings go under ``common``. With
    ``{tower}`` in it (``…/best/{tower}.toml``) each entry of ``towers`` reads the file of its own
    tower (a variant's ``model.tower``), under ``common`` and that entry's ``fixed`` settings (which
    win, as in the one-file form): every tower keeps the settings another study chose for it. Raises
    ``ValueError`` naming a bad key, ``FileNotFoundError`` for a missing ``settings_from`` file."""
    with open(path, "rb") as f:
        doc = tomllib.load(f)
    if "tune" not in doc:
        raise ValueError(f"{path}: no [tune] table")
    try:
        study = from_dict(StudyConfig, doc["tune"], "tune")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if not study.settings_from:
        return study

    def read(name: str) -> dict[str, Any]:
        source = next((p for p in (Path(path).parent / name, Path(name)) if p.exists()), None)
        if source is None:
            raise FileNotFoundError(f"{path}: [tune].settings_from {name} does not exist (run the "
                                    "study that writes it first)")
        with open(source, "rb") as f:
            return _flatten(tomllib.load(f))

    if "{tower}" not in study.settings_from:
        return dataclasses.replace(study, common={**read(study.settings_from), **study.common})
    fixed = {}
    for name in study.towers:
        own = study.fixed.get(name, {})
        tower = own.get("model.tower", name)
        fixed[name] = {**read(study.settings_from.replace("{tower}", str(tower))), **study.common, **own}
    return dataclasses.replace(study, fixed=fixed)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested TOML tables → dotted keys (the inverse of ``write_best``'s grouping; a dict value
    becomes its keys, which ``set_dotted`` puts back the same way)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def sample_points(study: StudyConfig) -> list[dict[str, Any]]:
    """The study's ``trials`` points of the search space, the same on every call and for every
    tower: ``grid`` keys cycle through their values (the cartesian product, in order; Ray Tune's
    ``grid_search`` semantics), the others are drawn with Ray Tune's domains from one seeded
    random state. A grid covers a wide range (e.g. learning rates a factor 2 apart) with few
    trials, where 4 random draws can all fall on one side."""
    import itertools

    from ray import tune

    rng = np.random.RandomState(study.search_seed)
    domains, grids = {}, {}
    for key, spec in study.space.items():
        kind, args = next(iter(spec.items()))
        if kind == "grid":
            grids[key] = list(args)
        else:
            domains[key] = tune.choice(list(args)) if kind == "choice" else getattr(tune, kind)(*args)
    combos = list(itertools.product(*grids.values())) or [()]
    points = []
    for i in range(study.trials):
        point = dict(zip(grids, combos[i % len(combos)]))
        for key in sorted(domains):
            v = domains[key].sample(random_state=rng)
            point[key] = v.item() if hasattr(v, "item") else v
        points.append(dict(sorted(point.items())))
    return points


@dataclass(frozen=True)
class Job:
    """One training run of the study: a trial (a point of the space, seed 0) or a seed run."""

    key: str  # file name and Tune grid value: "trial-tokenformer-2", "seed-dlrm-3"
    kind: str  # "trial" | "seed"
    tower: str
    index: int  # the trial's point, or the seed
    settings: dict[str, Any]  # dotted config keys → values, on top of the base config


def job_config(base_doc: dict, study: StudyConfig, job: Job, where: str) -> JobConfig:
    """The job's full config: the base document, the study's days and ranges, the tower's fixed
    settings, the job's own settings. Raises ``ValueError`` naming a bad key or value."""
    doc = json.loads(json.dumps(base_doc))  # a deep copy
    set_dotted(doc, "model.tower", job.tower)
    if study.days:
        set_dotted(doc, "train.days", study.days)
    set_dotted(doc, "train.eval_ranges", dict(study.eval_ranges))
    for key, value in {**study.common, **study.fixed.get(job.tower, {}), **job.settings}.items():
        set_dotted(doc, key, value, f"'{key}'")
    try:
        return config_from_doc(doc, f"{where} ({job.key})")
    except ValueError as e:
        raise ValueError(f"{e}") from None


@dataclass(frozen=True)
class StudyRequest:
    config: Path  # the base job config
    study: Path  # the study file
    data_root: Path | str
    workdir: Path | str  # a local folder or an object-store URI
    overrides: tuple[str, ...] = ()  # --set on the base config
    tracking_uri: str | None = None
    address: str | None = None
    results: Path | str | None = None  # where each run's result goes (default <workdir>/studies/<name>); keep
                                 # it somewhere lasting (e.g. in the repository) to resume a long study


def _run_job(config: dict, *, jobs: dict, base_doc: dict, study: StudyConfig, req: StudyRequest,
             tracking_uri: str, parent_id: str, study_dir: Path) -> None:
    """One Tune trial: one ``tokenrec train`` run, its result saved (then reported to Tune)."""
    from ray import tune

    from jobs.train import TrainRequest, run_train

    job: Job = jobs[config["job"]]
    cfg = job_config(base_doc, study, job, str(req.study))
    stamp = fingerprint(cfg, req.data_root)
    from jobs.console import Console

    t0 = time.perf_counter()
    console = Console()  # this trial's output in a log file, and its run's in runs/<id>/run.log
    name = f"tune-{study.name}-{job.key}-{os.getpid()}.log"
    trial_log = storage.local_dir(req.workdir) / "logs" / name
    try:
        with console.capture(trial_log):
            m = run_train(cfg, TrainRequest(
                days=cfg.train.days, data_root=req.data_root, workdir=req.workdir, tracking_uri=tracking_uri,
                address=req.address, register=False,
                tags={"mlflow.parentRunId": parent_id, "tokenrec.study": study.name, "tokenrec.study_job": job.key}),
                log=console.line)
    finally:  # an object-store work folder: the trial's log goes there too (the trial's node may be gone later)
        storage.mirror(trial_log, req.workdir, "logs", name)
    result = {"job": dataclasses.asdict(job), "fingerprint": stamp, "run_id": m["run_id"],
              "seconds": time.perf_counter() - t0,
              "metrics": {k: v for k, v in m.items() if isinstance(v, (int, float))}}
    if job.kind == "seed" and study.analyze and cfg.model.tower in LAYER_TOWERS:
        result["effective_rank"] = _effective_ranks(m["run_id"], tracking_uri)
    # readers see the old file or the new one (storage.write_text: a rename, or one PUT)
    storage.write_text(result_path(study_dir, job.key), json.dumps(result, indent=1, default=str))
    tune.report({study.metric: m.get(study.metric, float("nan")), "seconds": result["seconds"]})


def _effective_ranks(run_id: str, tracking_uri: str) -> list[float]:
    """Effective rank per layer of a run's exported model on held-out rows: the run's own
    diagnostics (``[train].diagnostics_rows``), else computed now."""
    from mlflow.tracking import MlflowClient

    from jobs.analyze import run_analyze

    logged = MlflowClient(tracking_uri).get_metric_history(run_id, "effective_rank")
    if logged:  # one value per layer (the step): the latest, should diagnostics have run twice
        latest = {m.step: m for m in sorted(logged, key=lambda m: m.timestamp)}
        return [latest[step].value for step in sorted(latest)]
    reports = run_analyze([run_id], tracking_uri, log=lambda *_: None)
    return [float(layer["effective_rank"]) for rep in reports.values() for layer in rep.get("layers", [])]


def _check_builds(cfg: JobConfig, where: str) -> None:
    """The job's model as its workers will build it (``jobs.train.worker_model_template``: meta
    device, world size): configuration errors raise ``ValueError`` here, naming ``where``."""
    from jobs.train import worker_model_template

    try:
        worker_model_template(cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _parent_run(client, exp_id: str, study: StudyConfig) -> str:
    """The study's MLflow parent run: found by tag on a resumed study, else created."""
    runs = client.search_runs([exp_id], f"tags.`tokenrec.study_parent` = '{study.name}'", max_results=1)
    if runs:
        return runs[0].info.run_id
    run = client.create_run(exp_id, run_name=f"tune {study.name}",
                            tags={"tokenrec.study_parent": study.name, "tokenrec.study": study.name})
    return run.info.run_id


def _run_with_tune(pending: list[Job], phase: str, study: StudyConfig, **kw) -> None:
    """Run ``pending`` jobs as Ray Tune trials (a grid over their keys); raise naming the failed
    ones after the others finished (their results are saved: a rerun retries only those)."""
    import functools

    from ray import tune

    if not pending:
        return
    jobs = {j.key: j for j in pending}
    # a Tune trial is a driver: its Ray Train workers hold the CPUs
    trainable = tune.with_resources(functools.partial(_run_job, jobs=jobs, study=study, **kw), {"cpu": 0.01})
    tuner = tune.Tuner(
        trainable, param_space={"job": tune.grid_search(list(jobs))},
        tune_config=tune.TuneConfig(max_concurrent_trials=study.max_concurrent),
        run_config=tune.RunConfig(name=f"{study.name}-{phase}-{int(time.time())}",
                                  storage_path=str(storage.under(kw["req"].workdir, "ray_results")), verbose=0))
    grid = tuner.fit()
    failed = [(r.config.get("job"), r.error) for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(pending)} {phase} jobs failed ({failed[0][0]}: {failed[0][1]}); "
                           "finished jobs are saved, run the same command again to retry the rest")


def plan_jobs(study: StudyConfig, points: list[dict]) -> list[Job]:
    """Every trial job, tower by tower (seed jobs depend on the trials' outcome). Every tower gets
    every point, keys that do not apply to it included (a DLRM has no attention dropout): the
    same budget for all."""
    return [Job(f"trial-{tower}-{i}", "trial", tower, i, dict(p))  # point by point: an interrupted
            for i, p in enumerate(points) for tower in study.towers]      # study has paired trials


def plan_seed_jobs(study: StudyConfig, tower: str, chosen: dict[str, Any]) -> list[Job]:
    """A tower's seed jobs: seeds 1..``study.seeds_of(tower)`` (``[tune].tower_seeds`` or
    ``seeds``), each at the tower's chosen settings plus ``train.seed``."""
    return [Job(f"seed-{tower}-{s}", "seed", tower, s, {**chosen, "train.seed": s})
            for s in range(1, study.seeds_of(tower) + 1)]


def run_study(req: StudyRequest, log=print) -> dict:
    """Tune, choose, seed, report (module docstring). Everything deterministic is checked before
    any run starts: the study file, every job's config, the data days. Returns the summary."""
    from jobs.tracking import connect, default_tracking_uri
    from jobs.train import eval_ranges, init_ray

    study = load_study(req.study)
    with open(req.config, "rb") as f:
        base_doc = tomllib.load(f)
    for assignment in req.overrides:
        apply_override(base_doc, assignment)
    points = sample_points(study)
    trials = plan_jobs(study, points)
    configs = {j.key: job_config(base_doc, study, j, str(req.study)) for j in trials}  # errors now
    for tower in study.towers:  # the seed runs' settings are validated too (with the first point)
        configs[tower] = job_config(base_doc, study, Job(f"seed-{tower}-check", "seed", tower, 1,
                                                         {**(points[0] if points else {}), "train.seed": 1}),
                                    str(req.study))
    for tower in study.towers:  # a tower that cannot be built (e.g. a token count that does not
        _check_builds(configs[tower], f"{req.study} ({tower})")  # divide d_model) stops here
    cfg = configs[study.towers[0]]
    label = metric_parts(study.metric, study.eval_ranges)[2]
    if label and label not in cfg.schema.labels:
        raise ValueError(f"{req.study}: [tune].metric '{study.metric}': '{label}' is not a label of the "
                         f"schema {list(cfg.schema.labels)}")
    days = parse_days(cfg.train.days)
    for ds in eval_ranges(cfg.train, days).values():
        day_files(req.data_root, ds)  # a missing evaluation day stops here
    day_files(req.data_root, days)

    study_dir = storage.under(req.results) if req.results else storage.under(req.workdir, "studies", study.name)
    storage.write_text(storage.join(study_dir, "points.json"), json.dumps(points, indent=1))
    costs = tower_costs({t: configs[t] for t in study.towers}, req.data_root)
    storage.write_text(storage.join(study_dir, "costs.json"), json.dumps(costs, indent=1))
    req = dataclasses.replace(req, workdir=storage.under(req.workdir),
                              data_root=storage.location(storage.absolute(req.data_root)))
    tracking_uri = req.tracking_uri or default_tracking_uri(req.workdir)
    client, exp_id = connect(tracking_uri, cfg.tracking.experiment, storage.join(req.workdir, "mlartifacts"))
    parent_id = _parent_run(client, exp_id, study)
    log(f"study {study.name}: {len(study.towers)} towers × {study.trials} trials, then "
        f"{sum(study.seeds_of(t) for t in study.towers)} seed runs; results in {study_dir}; "
        f"MLflow parent run {parent_id}")
    init_ray(req.address, cfg.train.num_workers)
    common = dict(base_doc=base_doc, req=req, tracking_uri=tracking_uri, parent_id=parent_id, study_dir=study_dir)

    stamps = {j.key: fingerprint(configs[j.key], req.data_root) for j in trials}
    _run_with_tune(pending(study_dir, trials, stamps, "trials", log), "trials", study, **common)

    best, seed_jobs = {}, []
    for tower in study.towers:
        if trials:
            done = [(j, load_result(study_dir, j, stamps[j.key])) for j in trials if j.tower == tower]
            job, result = best_settings(study, done)
            chosen, index, value = job.settings, job.index, result["metrics"][study.metric]
            log(f"{tower}: best trial {index} ({study.metric} {value:.4f}): {chosen}")
        else:  # no tuning: the common and fixed settings as they are
            chosen, index, value = {}, None, float("nan")
        settings = {**study.common, **study.fixed.get(tower, {}), **chosen}
        best[tower] = {"trial": index, "settings": settings, "value": value}
        write_best(storage.join(study_dir, "best", f"{tower}.toml"), tower, settings, study.metric, value)
        seed_jobs += plan_seed_jobs(study, tower, chosen)
    seed_jobs.sort(key=lambda j: j.index)  # seed by seed: an interrupted study has paired seeds
    storage.write_text(storage.join(study_dir, "best.json"), json.dumps(best, indent=1))

    for j in seed_jobs:
        stamps[j.key] = fingerprint(job_config(base_doc, study, j, str(req.study)), req.data_root)
    _run_with_tune(pending(study_dir, seed_jobs, stamps, "seeds", log), "seeds", study, **common)

    results = {t: sorted((load_result(study_dir, j, stamps[j.key]) for j in seed_jobs if j.tower == t),
                         key=lambda r: r["job"]["index"]) for t in study.towers}
    summary = summarize(study, cfg, results, best, costs)
    storage.write_text(storage.join(study_dir, "summary.json"), json.dumps(summary, indent=1, default=str))
    table = markdown(summary)
    storage.write_text(storage.join(study_dir, "summary.md"), table + "\n")
    client.log_dict(parent_id, summary, "study/summary.json")
    client.log_text(parent_id, table, "study/summary.md")
    for tower, row in summary["towers"].items():
        label = summary["labels"][0]
        client.log_metric(parent_id, f"{tower}_{study.test_range}_auc_mean", row[label]["auc"]["mean"])
    client.set_terminated(parent_id, "FINISHED")
    log(table)
    return summary

"""``tokenrec demo``: the production loop on generated data, start to end (issue 18).

1. generate the days: the initial training days of ``[train].days``, ``daily_days`` more, and
   each one's evaluation day;
2. train on the initial days (``jobs.train.run_train``), register, and put the version through
   the gate (``jobs.registry.Registry.decide``): the first version becomes ``champion``;
3. ``daily`` on each following day (``jobs.daily.run_daily``): warm start from the champion,
   train the day, evaluate on the next, register, gate → ``champion`` or ``challenger`` with
   the reason;
4. the registry as a table, and the commands that serve the champion, score a day with it and
   open the MLflow UI — each printed so it works as printed.

Every model's AUC is shown beside the generator's oracle AUC (the best any model can do on that
day), so the gap is visible.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from jobs.config import JobConfig
from pipeline.days import next_day, parse_days


@dataclass(frozen=True)
class DemoRequest:
    workdir: Path
    daily_days: int = 2  # daily runs after the initial training


def _auc_line(m: dict, name: str = "eval") -> str:
    label = f"{m.get(f'{name}_auc', float('nan')):.4f}"
    oracle = m.get(f"{name}_oracle_auc")
    return f"AUC {label}" + (f" (oracle {oracle:.4f}, gap {oracle - m[f'{name}_auc']:.4f})" if oracle else "")


def run_demo(cfg: JobConfig, req: DemoRequest, log=print) -> dict:
    """Run the loop (module docstring); returns ``{"versions": [...], "champion": N, ...}``.
    Raises ``ValueError`` on a config the loop cannot run (evaluation ranges, max_steps)."""
    from jobs.daily import DailyRequest, run_daily
    from jobs.registry import Registry
    from jobs.tracking import connect
    from jobs.train import TrainRequest, eval_spec, run_train
    from pipeline.generator import generate

    if cfg.train.eval_ranges:
        raise ValueError("the demo evaluates on the day after each training day; unset [train].eval_ranges")
    if cfg.train.max_steps:
        raise ValueError(f"the demo trains whole days; unset [train].max_steps ({cfg.train.max_steps})")
    t0 = time.perf_counter()
    workdir = req.workdir.resolve()
    if (workdir / "mlflow.db").exists():
        raise FileExistsError(f"{workdir} holds an earlier demo (its registry already has a champion): use another "
                              f"--workdir, or delete {workdir}")
    initial = parse_days(cfg.train.days)
    daily = [next_day(initial[-1], k) for k in range(1, req.daily_days + 1)]
    last = next_day(daily[-1] if daily else initial[-1], cfg.train.eval_offset + cfg.train.eval_days - 1)
    days = [next_day(initial[0], k) for k in range((last - initial[0]).days + 1)]
    data = workdir / "data"
    steps = 3 + len(daily)
    log(f"[1/{steps}] generate {len(days)} days ({days[0]}..{days[-1]}), {cfg.generator.rows_per_day:,} rows a "
        f"day: {len(cfg.schema.sparse)} sparse fields on {len(cfg.schema.tables)} tables, "
        f"{len(cfg.schema.sequences)} behaviour sequence(s), labels {', '.join(cfg.schema.labels)} → {data}")
    generate(cfg.schema, cfg.generator, data, days, log=lambda *_: None)

    tracking_uri = f"sqlite:///{workdir / 'mlflow.db'}"  # its own store, never $MLFLOW_TRACKING_URI
    client, _ = connect(tracking_uri, cfg.tracking.experiment, workdir / "mlartifacts")
    reg = Registry(client, cfg.tracking.model_name)
    log(f"[2/{steps}] train {cfg.model.tower} on {initial[0]}..{initial[-1]} "
        f"({cfg.train.num_workers} Ray Train workers)")
    m = run_train(cfg, TrainRequest(days=cfg.train.days, data_root=data, workdir=workdir,
                                    tracking_uri=tracking_uri), log=_indent(log))
    log(f"      version {m['model_version']}: {_auc_line(m)}")
    eval_day = eval_spec([next_day(initial[-1], cfg.train.eval_offset + k) for k in range(cfg.train.eval_days)])
    reg.decide(m["model_version"], data, eval_day, cfg.gate, log=_indent(log))
    results = [m]
    for i, day in enumerate(daily):
        log(f"[{3 + i}/{steps}] daily {day}: warm start from champion version {reg.champion()}, train the day, "
            f"evaluate on the next, gate")
        r = run_daily(cfg, day.isoformat(), DailyRequest(data_root=data, workdir=workdir, tracking_uri=tracking_uri),
                      log=_indent(log))
        state = "champion" if r.get("promoted") else "challenger"
        log(f"      version {r['model_version']}: {_auc_line(r)} → {state}")
        results.append(r)
    log(f"[{steps}/{steps}] done in {time.perf_counter() - t0:.0f}s; champion: version {reg.champion()}")
    return {"versions": [r["model_version"] for r in results], "champion": reg.champion(),
            "tracking_uri": tracking_uri, "data": str(data), "last_eval_day": last.isoformat(),
            "seconds": time.perf_counter() - t0, "results": results}


def _indent(log):
    return lambda text="": log(f"      {text}")


def follow_up_commands(cfg: JobConfig, req: DemoRequest, result: dict) -> list[tuple[str, str]]:
    """The commands a user runs next, exactly as they work from any folder (absolute, quoted):
    serve the champion, score a day with it, open the MLflow UI."""
    bin_dir = Path(sys.executable).parent
    tokenrec = ([str(bin_dir / "tokenrec")] if (bin_dir / "tokenrec").exists()
                else [sys.executable, "-m", "jobs.cli"])  # no console script: the module
    mlflow = str(bin_dir / "mlflow") if (bin_dir / "mlflow").exists() else f"{sys.executable} -m mlflow"
    uri = result["tracking_uri"]
    model = f"models:/{cfg.tracking.model_name}@champion"
    q = shlex.quote
    score = [*tokenrec, "score", "--model", model, "--data", result["data"], "--days", result["last_eval_day"],
             "--out", str(req.workdir.resolve() / f"scores-{result['last_eval_day']}"),
             "--workdir", str(req.workdir.resolve()), "--tracking-uri", uri]
    return [
        ("serve the champion (a REST endpoint on port 5001)",
         # mlflow starts `uvicorn` from PATH: the venv's bin first, activated or not
         f"PATH={q(str(bin_dir))}:\"$PATH\" MLFLOW_TRACKING_URI={q(uri)} {mlflow} models serve -m {q(model)} "
         "--env-manager local "
         "--host 127.0.0.1 --port 5001"),
        (f"score the day {result['last_eval_day']} with it (Parquet out)", " ".join(q(x) for x in score)),
        ("open the MLflow UI (runs, datasets, plots, registry)",
         f"{mlflow} ui --backend-store-uri {q(uri)} --host 127.0.0.1 --port 5000"),
    ]

"""Daily incremental training vs a model frozen after day 1, on generated data with drift and new ids.

    .venv/bin/python benchmarks/incremental.py --workdir /tmp/incremental [--days 5] [--rows-per-day 100000]

1. generate days 1..N+1 with the demo config (context effects drift every day; every day brings
   new users and items, which the managed-collision user/item tables must admit);
2. ``tokenrec backfill`` over days 1..N: each day warm-starts from the champion, trains on that
   day, is evaluated on the next day and gated (MLflow SQLite registry in --workdir);
3. the day-1 version ("frozen") is scored on every later evaluation day by the same
   ``evaluate_export`` the gate uses (scores are cached in the registry).

Writes benchmarks/results/incremental.json and prints the markdown table for docs/quality.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

from jobs.config import load_config
from jobs.daily import DailyRequest, run_backfill
from jobs.registry import Registry
from pipeline.days import next_day, parse_day
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--config", type=Path, default=ROOT / "configs/demo_world.toml")
    ap.add_argument("--start", default="2026-01-01")
    ap.add_argument("--days", type=int, default=5)
    ap.add_argument("--rows-per-day", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/incremental.json")
    a = ap.parse_args()

    t0 = time.perf_counter()
    cfg = load_config(a.config, [f"generator.rows_per_day={a.rows_per_day}", f"train.epochs={a.epochs}"])
    first = parse_day(a.start)
    train_days = [next_day(first, i) for i in range(a.days)]
    data = a.workdir / "data"
    if not (data / f"day={next_day(train_days[-1]).isoformat()}").exists():
        generate(cfg.schema, cfg.generator, data, train_days + [next_day(train_days[-1])])
    req = DailyRequest(data_root=data, workdir=a.workdir)
    results = run_backfill(cfg, f"{train_days[0]}..{train_days[-1]}", req)

    client = MlflowClient(f"sqlite:///{(a.workdir / 'mlflow.db').resolve()}")
    reg = Registry(client, cfg.tracking.model_name)
    frozen = results[0]["model_version"]
    rows = []
    for r in results:
        version = r["model_version"]
        run = client.get_run(reg.version(version).run_id)
        eval_day = run.data.tags["tokenrec.eval_day"]
        inc = reg.evaluation(version, data, eval_day)
        frz = reg.evaluation(frozen, data, eval_day)
        m = run.data.metrics
        rows.append({
            "train_day": r["day"], "eval_day": eval_day, "version": version,
            "parent": reg.version(version).tags.get("tokenrec.parent_version", ""),
            "gate": reg.version(version).tags.get("tokenrec.gate", "").split(":")[1].strip(),
            "incremental_auc": inc["eval_auc"], "frozen_auc": frz["eval_auc"],
            "incremental_logloss": inc["eval_logloss"], "frozen_logloss": frz["eval_logloss"],
            "oracle_auc": m.get("eval_oracle_auc"),
            **{k: m[k] for k in sorted(m) if k.startswith("mc_")},
        })
    result = {"benchmark": "incremental", "config": str(a.config.relative_to(ROOT)),
              "rows_per_day": a.rows_per_day, "epochs": a.epochs, "rows": rows,
              "wall_seconds": time.perf_counter() - t0, "date": time.strftime("%Y-%m-%d")}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))

    print("\n| train day | eval day | version (parent) | gate | incremental AUC | frozen day-1 AUC | Δ AUC "
          "| incremental logloss | frozen logloss | oracle AUC | user rows used | item rows used "
          "| new-id miss rate at eval (user / item) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['train_day']} | {r['eval_day']} | {r['version']} ({r['parent'] or '-'}) | {r['gate']} "
              f"| {r['incremental_auc']:.4f} | {r['frozen_auc']:.4f} | {r['incremental_auc'] - r['frozen_auc']:+.4f} "
              f"| {r['incremental_logloss']:.4f} | {r['frozen_logloss']:.4f} | {r['oracle_auc'] or float('nan'):.4f} "
              f"| {r.get('mc_user_ids', 0):,.0f} ({r.get('mc_user_occupancy', 0):.1%}) "
              f"| {r.get('mc_item_ids', 0):,.0f} ({r.get('mc_item_occupancy', 0):.1%}) "
              f"| {r.get('mc_user_eval_collision_rate', 0):.2%} / {r.get('mc_item_eval_collision_rate', 0):.2%} |")
    print(f"\n{len(rows)} days in {result['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()

"""TokenFormer vs the naive unified Transformer on generated data: next-day AUC and the effective
rank of sequence-token states (Sequential Collapse Propagation), over several seeds.

    .venv/bin/python benchmarks/collapse.py --workdir /tmp/collapse [--rows-per-day 60000] [--seeds 0 1 2]

Each (tower, seed) is a real `tokenrec train` run (2 Ray Train workers, MLflow in --workdir);
then `tokenrec analyze` on all runs. Results: benchmarks/results/collapse.json and a markdown
table on stdout (copied into docs/quality.md).

Since issue 17 this runs with the per-tower recipe defaults (``jobs.optim.TOWER_RECIPES``), the
paper's TokenFormer layout and the history on the target's item table; the recorded results were
measured before (Adam at a constant 3e-3, one target token per group, tables of its own). Add
``train.optim.tower_defaults=false`` to the overrides for the old recipe. The tuned, seeded
comparisons are ``tokenrec tune`` studies (``configs/studies/``, docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import mean_std

from jobs.analyze import run_analyze
from jobs.config import load_config
from jobs.train import TrainRequest, run_train
from pipeline.days import next_day, parse_days
from pipeline.generator import generate

ROOT = Path(__file__).resolve().parents[1]
TOWERS = ("tokenformer", "naive_transformer")
MODEL = ["model.tokenformer.d_model=32", "model.tokenformer.num_heads=2", "model.tokenformer.windows=[16, 8]"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--rows-per-day", type=int, default=60_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/collapse.json")
    a = ap.parse_args()
    base = [f"generator.rows_per_day={a.rows_per_day}", f"train.epochs={a.epochs}", *MODEL]
    cfg = load_config(ROOT / "configs/demo_world.toml", base)
    days = parse_days(cfg.train.days)
    data = a.workdir / "data"
    generate(cfg.schema, cfg.generator, data, days + [next_day(days[-1], cfg.train.eval_offset)])
    runs: dict[str, list[dict]] = {t: [] for t in TOWERS}
    for seed in a.seeds:
        for tower in TOWERS:
            t0 = time.perf_counter()
            c = load_config(ROOT / "configs/demo_world.toml", base + [f"model.tower={tower}", f"train.seed={seed}"])
            m = run_train(c, TrainRequest(days=c.train.days, data_root=data, workdir=a.workdir))
            m["seconds"] = time.perf_counter() - t0
            runs[tower].append(m)
            print(f"== {tower} seed {seed}: AUC {m['eval_auc']:.4f} ({m['seconds']:.0f}s)", flush=True)
    ids = [m["run_id"] for t in TOWERS for m in runs[t]]
    reports = run_analyze(ids, runs[TOWERS[0]][0]["tracking_uri"])
    by_run = {name.split()[-1]: rep for name, rep in reports.items()}
    summary = {}
    for tower in TOWERS:
        eranks = [[layer["effective_rank"] for layer in by_run[m["run_id"][:8]]["layers"]] for m in runs[tower]]
        summary[tower] = {
            "eval_auc": mean_std([m["eval_auc"] for m in runs[tower]]),
            "eval_gauc": mean_std([m["eval_gauc"] for m in runs[tower]]),
            "eval_logloss": mean_std([m["eval_logloss"] for m in runs[tower]]),
            "effective_rank_per_layer": [mean_std(list(col)) for col in zip(*eranks)],
            "train_rows_per_s": mean_std([m["train_rows_per_s"] for m in runs[tower]]),
            "oracle_auc": runs[tower][0].get("eval_oracle_auc"),
            "run_ids": [m["run_id"] for m in runs[tower]],
        }
    print("\n| tower | next-day AUC | GAUC | logloss | effective rank per layer (L0..L3) | rows/s |")
    print("|---|---|---|---|---|---|")
    for tower, s in summary.items():
        print(f"| {tower} | {s['eval_auc']} | {s['eval_gauc']} | {s['eval_logloss']} | "
              f"{' / '.join(s['effective_rank_per_layer'])} | {s['train_rows_per_s']} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"benchmark": "collapse", "args": vars(a) | {"workdir": str(a.workdir),
                                                                           "out": str(a.out)},
                                 "overrides": base, "summary": summary, "date": time.strftime("%Y-%m-%d")},
                                indent=1, default=str))


if __name__ == "__main__":
    main()

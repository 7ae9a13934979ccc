"""HyFormer vs "LONGER + RankMixer" (the paper's base architecture) vs TokenFormer on generated data
with two behaviour sequences: next-day AUC over seeds, dense parameters and FLOPs per example.

    .venv/bin/python benchmarks/hyformer.py --workdir /tmp/hyformer [--rows-per-day 60000] [--seeds 0 1 2]

Each (tower, seed) is a real `tokenrec train` run (2 Ray Train workers, MLflow in --workdir) with
configs/two_sequences.toml (sequences "hist" and "buy", both carrying signal). The three towers
get the same model width (d_model 48, 2 heads, 2 interaction layers; TokenFormer 2F + 2S).
Results: benchmarks/results/hyformer.json and a markdown table on stdout (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import mean_std

from jobs.config import load_config
from jobs.train import TrainRequest, run_train
from model.cost import tower_cost
from model.ranking import RankingModel
from pipeline.collate import collate
from pipeline.days import day_files, next_day, parse_days
from pipeline.generator import generate
from pipeline.validate import to_canonical

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/two_sequences.toml"
TOWERS = {
    "hyformer": ["model.hyformer.d_model=48", "model.hyformer.num_heads=2", "model.hyformer.num_layers=2"],
    "rankmixer_longer": ["model.rankmixer.d_model=48", "model.rankmixer.num_tokens=8",
                         "model.rankmixer.num_heads=2", "model.rankmixer.num_layers=2"],
    "tokenformer": ["model.tokenformer.d_model=48", "model.tokenformer.num_heads=2",
                    "model.tokenformer.num_full_layers=2", "model.tokenformer.windows=[16, 8]"],
}


def cost(cfg, data: Path, rows: int = 256) -> tuple[int, float, float]:
    """Dense-tower parameters and FLOPs per example of one training step (``model.cost``)."""
    torch.manual_seed(0)
    model = RankingModel(cfg.schema, cfg.model)
    table = to_canonical(pq.read_table(day_files(data, parse_days(cfg.train.days))[0]).slice(0, rows),
                         cfg.schema)
    return tower_cost(model, collate(pa.Table.from_batches(table.to_batches()), cfg.schema))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--rows-per-day", type=int, default=60_000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/hyformer.json")
    a = ap.parse_args()
    base = [f"generator.rows_per_day={a.rows_per_day}", f"train.epochs={a.epochs}"]
    cfg = load_config(CONFIG, base)
    days = parse_days(cfg.train.days)
    data = a.workdir / "data"
    generate(cfg.schema, cfg.generator, data, days + [next_day(days[-1], cfg.train.eval_offset)])
    runs: dict[str, list[dict]] = {t: [] for t in TOWERS}
    costs = {}
    for seed in a.seeds:
        for tower, overrides in TOWERS.items():
            c = load_config(CONFIG, base + overrides + [f"model.tower={tower}", f"train.seed={seed}"])
            costs.setdefault(tower, cost(c, data))
            t0 = time.perf_counter()
            m = run_train(c, TrainRequest(days=c.train.days, data_root=data, workdir=a.workdir))
            m["seconds"] = time.perf_counter() - t0
            runs[tower].append(m)
            print(f"== {tower} seed {seed}: AUC {m['eval_auc']:.4f} ({m['seconds']:.0f}s)", flush=True)
    summary = {}
    for tower in TOWERS:
        params, flops, train_flops = costs[tower]
        summary[tower] = {
            "eval_auc": mean_std([m["eval_auc"] for m in runs[tower]]),
            "eval_gauc": mean_std([m["eval_gauc"] for m in runs[tower]]),
            "eval_logloss": mean_std([m["eval_logloss"] for m in runs[tower]]),
            "dense_params": params, "forward_flops_per_example": flops, "train_flops_per_example": train_flops,
            "train_rows_per_s": mean_std([m["train_rows_per_s"] for m in runs[tower]]),
            "oracle_auc": runs[tower][0].get("eval_oracle_auc"),
            "aucs": [m["eval_auc"] for m in runs[tower]],
            "run_ids": [m["run_id"] for m in runs[tower]],
        }
    print("\n| tower | next-day AUC | GAUC | logloss | dense params | forward FLOPs / example | rows/s |")
    print("|---|---|---|---|---|---|---|")
    for tower, s in summary.items():
        print(f"| {tower} | {s['eval_auc']} | {s['eval_gauc']} | {s['eval_logloss']} | "
              f"{s['dense_params'] / 1e3:.0f} k | {s['forward_flops_per_example'] / 1e6:.2f} M | "
              f"{s['train_rows_per_s']} |")
    print(f"oracle AUC {summary['hyformer']['oracle_auc']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"benchmark": "hyformer", "config": str(CONFIG.relative_to(ROOT)),
                                 "args": vars(a) | {"workdir": str(a.workdir), "out": str(a.out)},
                                 "towers": TOWERS, "summary": summary, "date": time.strftime("%Y-%m-%d")},
                                indent=1, default=str))


if __name__ == "__main__":
    main()

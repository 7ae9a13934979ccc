"""Model quality on MovieLens-100K: every tower, 3 seeds, a chronological split.

    .venv/bin/python benchmarks/quality.py --workdir /tmp/quality [--data LOGS] [--seeds 0 1 2] [--towers ...]

1. ``tokenrec data fetch ml-100k`` (the recbole wheel from PyPI) unless ``--data`` names converted
   logs; 2. split the days: the earliest 80 % of the time span trains, the next 10 % validates,
   the last 10 % tests (``pipeline.datasets.movielens.chronological_split``); 3. for each seed and
   tower a real ``tokenrec train`` run (2 Ray Train workers, MLflow in --workdir) that evaluates
   itself on the validation period (``[train].eval_days``); its export is scored on the test period
   by ``jobs.registry.evaluate_export`` (AUC, GAUC over users with both classes, logloss);
   4. TokenFormer vs the naive unified Transformer: collapse diagnostics (effective rank per
   layer) of every run on held-out validation rows.

Results: benchmarks/results/quality_ml100k.json and a markdown table on stdout (docs/quality.md).

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
from jobs.registry import evaluate_export
from jobs.train import TrainRequest, run_train
from pipeline.datasets.fetch import DEFAULT_CACHE, fetch
from pipeline.datasets.movielens import chronological_split

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/movielens.toml"
D = 32  # one width for the attention towers; RankMixer and HyFormer token counts divide it
TOWERS = {
    "dlrm": [],
    "dcnv2": [],
    "din": [],
    "rankmixer_longer": [f"model.rankmixer.d_model={D}", "model.rankmixer.num_tokens=4"],
    "onetrans": [f"model.onetrans.d_model={D}"],
    "hstu": [f"model.tokenformer.d_model={D}", "model.tokenformer.num_heads=2",
             "model.tokenformer.windows=[16, 8]"],
    "naive_transformer": [f"model.tokenformer.d_model={D}", "model.tokenformer.num_heads=2",
                          "model.tokenformer.windows=[16, 8]"],
    "tokenformer": [f"model.tokenformer.d_model={D}", "model.tokenformer.num_heads=2",
                    "model.tokenformer.windows=[16, 8]"],
    "hyformer": [f"model.hyformer.d_model={D}", "model.hyformer.encoder=longer",
                 "model.hyformer.recent_window=8"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--data", type=Path, help="converted ML-100K logs (default: fetch into --cache)")
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--towers", nargs="+", default=list(TOWERS), choices=list(TOWERS))
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/quality_ml100k.json")
    a = ap.parse_args()
    t_start = time.perf_counter()
    data = a.data
    if data is None:
        data = a.cache / "ml-100k" / "logs"
        if not data.exists():
            fetch("ml-100k", out=data, cache=a.cache)
    days = sorted(p.name.removeprefix("day=") for p in data.glob("day=*"))
    from pipeline.days import parse_day

    train, valid, test = chronological_split([parse_day(d) for d in days])
    span = lambda ds: f"{ds[0]}..{ds[-1]}"  # noqa: E731
    print(f"train {span(train)} ({len(train)} days), validation {span(valid)}, test {span(test)}", flush=True)

    runs: dict[str, list[dict]] = {t: [] for t in a.towers}
    for seed in a.seeds:
        for tower in a.towers:
            t0 = time.perf_counter()
            cfg = load_config(CONFIG, TOWERS[tower] + [f"model.tower={tower}", f"train.seed={seed}",
                                                       f"train.epochs={a.epochs}", f"train.eval_days={len(valid)}"])
            # the run evaluates itself on the validation period (sharded, like every run) ...
            m = run_train(cfg, TrainRequest(days=span(train), data_root=data, workdir=a.workdir, register=False),
                          log=lambda *_: None)
            # ... and its export is scored on the test period by the gate's evaluation
            tst = evaluate_export(m["export_dir"], data, span(test))
            r = {"run_id": m["run_id"], "seconds": time.perf_counter() - t0,
                 "train_rows_per_s": m["train_rows_per_s"], "tracking_uri": m["tracking_uri"],
                 **{f"valid_{k[5:]}": m[k] for k in ("eval_auc", "eval_gauc", "eval_logloss")},
                 **{f"test_{k[5:]}": v for k, v in tst.items()}}
            runs[tower].append(r)
            print(f"== {tower} seed {seed}: valid AUC {r['valid_auc']:.4f}, test AUC {r['test_auc']:.4f} "
                  f"GAUC {r['test_gauc']:.4f} ({r['seconds']:.0f}s)", flush=True)

    diag = {}
    pair = [t for t in ("tokenformer", "naive_transformer") if t in runs]
    if pair:
        ids = [r["run_id"] for t in pair for r in runs[t]]
        reports = run_analyze(ids, runs[pair[0]][0]["tracking_uri"], rows=2048, log=lambda *_: None)
        by_run = {name.split()[-1]: rep for name, rep in reports.items()}
        for t in pair:
            eranks = [[x["effective_rank"] for x in by_run[r["run_id"][:8]]["layers"]] for r in runs[t]]
            diag[t] = [mean_std(list(col)) for col in zip(*eranks)]

    summary = {t: {k: mean_std([r[k] for r in rs]) for k in
                   ("valid_auc", "test_auc", "test_gauc", "test_logloss", "train_rows_per_s")}
               | {"test_aucs": [r["test_auc"] for r in rs], "run_ids": [r["run_id"] for r in rs]}
               for t, rs in runs.items()}
    print("\n| tower | validation AUC | test AUC | test GAUC | test logloss | rows/s |")
    print("|---|---|---|---|---|---|")
    for t, s in sorted(summary.items(), key=lambda kv: -float(kv[1]["test_auc"].split()[0])):
        print(f"| {t} | {s['valid_auc']} | {s['test_auc']} | {s['test_gauc']} | {s['test_logloss']} | "
              f"{s['train_rows_per_s']} |")
    for t, e in diag.items():
        print(f"effective rank per layer, {t}: {' / '.join(e)}")
    seconds = time.perf_counter() - t_start
    print(f"\n{sum(len(r) for r in runs.values())} runs in {seconds / 60:.1f} min")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({
        "benchmark": "quality_ml100k", "config": str(CONFIG.relative_to(ROOT)), "towers": TOWERS,
        "split": {"train": span(train), "valid": span(valid), "test": span(test)},
        "seeds": a.seeds, "epochs": a.epochs, "summary": summary, "effective_rank": diag, "runs": runs,
        "seconds": seconds, "date": time.strftime("%Y-%m-%d")}, indent=1, default=str))


if __name__ == "__main__":
    main()

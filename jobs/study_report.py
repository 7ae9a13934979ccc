"""``tokenrec tune``'s choice and report: the best trial of a tower, its settings written as
TOML, and the study's summary (per-label test metrics over seeds, effective rank per layer,
training cost, paired differences with their standard errors) as JSON and markdown."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedding import storage

if TYPE_CHECKING:
    from jobs.config import JobConfig
    from jobs.tune import Job, StudyConfig

FINAL_KEYS = ("auc", "gauc", "logloss", "calibration")


def best_settings(study: StudyConfig, trials: list[tuple[Job, dict]]) -> tuple[Job, dict]:
    """The trial with the best ``metric`` (ties: the lower trial index; a missing or NaN value
    ranks last). The settings are the ones the result was trained with (``result["job"]``)."""
    sign = 1.0 if study.mode == "max" else -1.0

    def score(item):
        job, result = item
        v = result["metrics"].get(study.metric)
        v = -math.inf if v is None or v != v else sign * float(v)
        return (v, -job.index)
    job, result = max(trials, key=score)
    saved = result["job"]
    from jobs.tune import Job

    return Job(saved["key"], saved["kind"], saved["tower"], saved["index"], dict(saved["settings"])), result


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {_toml_value(x)}" for k, x in v.items()) + " }"
    raise ValueError(f"cannot write {v!r} as TOML")


def write_best(path: Path | str, tower: str, settings: dict, metric: str, value: float) -> None:
    """The chosen settings of a tower as ``--set`` lines and as a TOML fragment to paste into a
    job config (dotted keys grouped by table)."""
    tables: dict[str, list[str]] = {}
    for key, v in sorted(settings.items()):
        table, leaf = key.rsplit(".", 1)
        tables.setdefault(table, []).append(f"{leaf} = {_toml_value(v)}")
    lines = [f"# tokenrec tune: best settings of {tower} ({metric} = {value:.5f})",
             "# as overrides: " + " ".join(f"--set '{k}={_toml_value(v)}'" for k, v in sorted(settings.items())), ""]
    for table, entries in tables.items():
        lines += [f"[{table}]", *entries, ""]
    storage.write_text(path, "\n".join(lines))


def _stats(xs: list[float]) -> dict:
    xs = [float(x) for x in xs if x == x]
    return {"mean": statistics.mean(xs) if xs else float("nan"),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(study: StudyConfig, cfg: JobConfig, results: dict[str, list[dict]], best: dict,
              costs: dict | None = None) -> dict:
    """Per tower: the chosen settings and validation metric, test metrics per label (mean, std,
    n over seeds), effective rank per layer, training cost (``tower_costs``); per pair: the
    paired per-seed difference of the test AUC (first label) with its standard error and whether
    it exceeds two of them."""
    test = study.test_range
    labels = list(cfg.schema.labels)
    towers = {}
    for tower, runs in results.items():
        row = {"settings": best[tower]["settings"], "chosen_on": {study.metric: best[tower]["value"]},
               **(costs or {}).get(tower, {}),
               "seeds": [r["job"]["index"] for r in runs], "run_ids": [r["run_id"] for r in runs],
               "seconds": _stats([r["seconds"] for r in runs])}
        for t, label in enumerate(labels):
            def value(r: dict, k: str, t=t, label=label) -> float:  # label-named; _taskN before that
                m = r["metrics"]
                return m.get(f"{test}_{k}_{label}", m.get(f"{test}_{k}" if t == 0 else f"{test}_{k}_task{t}",
                                                          float("nan")))
            row[label] = {k: _stats([value(r, k) for r in runs]) for k in FINAL_KEYS}
        eranks = [r.get("effective_rank") or [] for r in runs]
        if eranks and all(eranks) and len({len(e) for e in eranks}) == 1:
            row["effective_rank"] = [_stats(list(col)) for col in zip(*eranks)]
        towers[tower] = row
    pairs = []
    for a, b in study.pairs:
        by_seed_a = {r["job"]["index"]: r["metrics"].get(f"{test}_auc") for r in results.get(a, [])}
        by_seed_b = {r["job"]["index"]: r["metrics"].get(f"{test}_auc") for r in results.get(b, [])}
        seeds = sorted(set(by_seed_a) & set(by_seed_b))
        diffs = [by_seed_a[s] - by_seed_b[s] for s in seeds]
        st = _stats(diffs)
        se = st["std"] / math.sqrt(st["n"]) if st["n"] > 1 else float("nan")
        pairs.append({"a": a, "b": b, "metric": f"{test}_auc", "seeds": seeds, "differences": diffs,
                      "mean": st["mean"], "se": se,
                      "more_than_2se": bool(st["n"] > 1 and abs(st["mean"]) > 2 * se)})  # either sign
    return {"study": study.name, "metric": study.metric, "test_range": test, "labels": labels,
            "towers": towers, "pairs": pairs}


def _fmt(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def markdown(summary: dict) -> str:
    """The summary as markdown tables (per tower and label; the pairs)."""
    test = summary["test_range"]
    lines = [f"| tower | label | {test} AUC | GAUC | logloss | seeds | chosen on {summary['metric']} | "
             "effective rank per layer | train FLOPs / example |", "|---|---|---|---|---|---|---|---|---|"]
    for tower, row in summary["towers"].items():
        erank = " / ".join(f"{s['mean']:.1f}" for s in row.get("effective_rank", [])) or "–"
        flops = f"{row['train_flops_per_example'] / 1e6:.2f} M" if "train_flops_per_example" in row else "–"
        chosen = row["chosen_on"][summary["metric"]]
        chosen = "– (not tuned)" if math.isnan(chosen) else f"{chosen:.4f}"  # trials = 0: fixed settings
        for i, label in enumerate(summary["labels"]):
            s = row[label]
            lines.append(f"| {tower} | {label} | {_fmt(s['auc'])} | {_fmt(s['gauc'])} | {_fmt(s['logloss'])} | "
                         f"{s['auc']['n']} | {chosen} | {erank if i == 0 else ''} | "
                         f"{flops if i == 0 else ''} |")
    if summary["pairs"]:
        lines += ["", f"| pair | paired Δ {test} AUC (mean ± SE) | seeds | \\|Δ\\| > 2 SE |", "|---|---|---|---|"]
        for p in summary["pairs"]:
            lines.append(f"| {p['a']} − {p['b']} | {p['mean']:+.4f} ± {p['se']:.4f} | {len(p['seeds'])} | "
                         f"{'yes' if p['more_than_2se'] else 'no'} |")
    return "\n".join(lines)


def tower_costs(configs: dict[str, JobConfig], data_root: Path, rows: int = 256) -> dict[str, dict]:
    """Per tower (or variant): dense parameters and FLOPs per example of one training step
    (``model.cost.tower_cost``) on ``rows`` rows of its first training day."""
    import torch

    from jobs.analyze import held_out_batch
    from model.cost import tower_cost
    from model.ranking import RankingModel
    from pipeline.days import parse_days

    out = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = RankingModel(cfg.schema, cfg.model)
        batch = held_out_batch(cfg.schema, data_root, parse_days(cfg.train.days)[0].isoformat(), rows)
        params, fwd, train = tower_cost(model, batch)
        out[name] = {"dense_params": params, "forward_flops_per_example": fwd, "train_flops_per_example": train}
    return out

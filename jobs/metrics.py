"""Evaluation metrics, one implementation used by training, evaluation and (later) the gate."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.generator import auc


def logloss(labels: np.ndarray, probs: np.ndarray) -> float:
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def gauc(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> float:
    """Impression-weighted mean of per-user AUC over users having both classes."""
    df = pd.DataFrame({"y": (labels > 0.5).astype(np.float64), "p": probs, "u": users})
    df["r"] = df.groupby("u")["p"].rank()  # within-user ranks, ties averaged
    df["ry"] = df.r * df.y
    g = df.groupby("u").agg(n=("y", "size"), pos=("y", "sum"), rpos=("ry", "sum"))
    g["neg"] = g.n - g.pos
    g = g[(g.pos > 0) & (g.neg > 0)]
    if g.empty:
        return float("nan")
    user_auc = (g.rpos - g.pos * (g.pos + 1) / 2) / (g.pos * g.neg)
    return float(np.average(user_auc, weights=g.n))


def evaluate(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, prefix: str = "eval_",
             names: list[str] | tuple[str, ...] | None = None) -> dict:
    """AUC, GAUC, logloss, calibration (mean prediction / mean label) and the positive rate
    per label column. A label with one class on these rows has AUC, GAUC (and, without a
    positive, calibration) NaN: undefined, reported as such (``one_class_labels``).

    ``labels``, ``probs``: [N] or [N, T]; ``users``: [N]. Keys: ``<prefix>auc`` … for the first
    (primary) label — what the gate compares — and, given the label ``names``, ``<prefix>auc_<name>``
    … for every label (the first included); without names, ``<prefix>auc_task<t>`` for t ≥ 1."""
    labels, probs = np.atleast_2d(labels.T).T, np.atleast_2d(probs.T).T
    if names is not None and len(names) != labels.shape[1]:
        raise ValueError(f"evaluate: {len(names)} label names for {labels.shape[1]} label columns")
    out: dict[str, float] = {f"{prefix}rows": float(len(labels))}
    for t in range(labels.shape[1]):
        y, p = labels[:, t], probs[:, t]
        rate = float(y.mean()) if len(y) else float("nan")
        m = {"auc": auc(y, p), "gauc": gauc(y, p, users), "logloss": logloss(y, p),
             # undefined without a positive (not a huge ratio that reads like a miscalibration)
             "calibration": float(p.mean() / rate) if rate > 0 else float("nan"),
             "positive_rate": rate}
        suffixes = ([""] if t == 0 else []) + ([f"_{names[t]}"] if names is not None else
                                               ([f"_task{t}"] if t else []))
        for sfx in suffixes:
            out |= {f"{prefix}{k}{sfx}": v for k, v in m.items()}
    return out


def one_class_labels(metrics: dict[str, float], prefix: str, names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The labels whose evaluation rows (``<prefix>…`` metrics of ``evaluate``) are all one
    class, with their positive rate (0.0 or 1.0): their AUC and calibration are undefined."""
    out = {}
    for name in names:
        rate = metrics.get(f"{prefix}positive_rate_{name}")
        if rate is not None and (rate == 0.0 or rate == 1.0):
            out[name] = rate
    return out

from __future__ import annotations

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from jobs.metrics import evaluate


def test_metrics_match_sklearn_and_per_user_definition() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random(4000) < 0.3).astype(np.float32)
    p = np.clip(0.3 * y + 0.7 * rng.random(4000), 0.01, 0.99)
    u = rng.integers(0, 40, 4000)
    m = evaluate(y, p, u)
    assert abs(m["eval_auc"] - roc_auc_score(y, p)) < 1e-9
    assert abs(m["eval_logloss"] - log_loss(y, p)) < 1e-6
    per_user = [(roc_auc_score(y[u == k], p[u == k]), (u == k).sum()) for k in range(40)
                if 0 < y[u == k].sum() < (u == k).sum()]
    expected = sum(a * n for a, n in per_user) / sum(n for _, n in per_user)
    assert abs(m["eval_gauc"] - expected) < 1e-9
    assert abs(m["eval_calibration"] - p.mean() / y.mean()) < 1e-6


def test_metrics_are_named_by_label() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((2000, 2)) < 0.3).astype(np.float32)
    p = np.clip(0.3 * y + 0.7 * rng.random((2000, 2)), 0.01, 0.99)
    u = rng.integers(0, 40, 2000)
    m = evaluate(y, p, u, prefix="test_", names=("click", "like"))
    assert m["test_auc"] == m["test_auc_click"] == roc_auc_score(y[:, 0], p[:, 0])  # primary, also by name
    assert abs(m["test_auc_like"] - roc_auc_score(y[:, 1], p[:, 1])) < 1e-9
    assert {"test_gauc_like", "test_logloss_like", "test_calibration_like"} <= set(m)
    assert not any("task" in k for k in m)
    assert "eval_auc_task1" in evaluate(y, p, u)  # without names: positional, as before

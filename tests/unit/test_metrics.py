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

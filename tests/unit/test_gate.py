"""The promotion gate's rule, the checkpoint key normalization, and their config validation."""

from __future__ import annotations

import pytest

from jobs.checkpoint import normalize_key
from jobs.config import GateConfig, TrainConfig
from jobs.registry import gate

CHAMP = {"eval_auc": 0.80, "eval_logloss": 0.50, "eval_calibration": 1.0, "eval_rows": 100.0}


def cand(**kw) -> dict:
    return CHAMP | {f"eval_{k}": v for k, v in kw.items()}


def test_first_version_needs_only_calibration() -> None:
    assert gate(cand(), None, GateConfig()).promote
    d = gate(cand(calibration=1.4), None, GateConfig())
    assert not d.promote and "outside" in d.summary()


@pytest.mark.parametrize("champion", [None, CHAMP])
def test_a_one_class_day_is_refused_for_that_reason(champion) -> None:
    """Issue 19 (kind 5): every label 0 on the evaluation day gives AUC NaN; the gate refuses
    because the AUC is undefined — not "calibration outside the band" — with or without a
    champion."""
    import numpy as np

    from jobs.metrics import evaluate, one_class_labels

    m = evaluate(np.zeros(50), np.full(50, 0.1), np.arange(50) % 5, names=["click"])
    assert np.isnan(m["eval_auc"]) and np.isnan(m["eval_calibration"]) and m["eval_positive_rate"] == 0.0
    assert one_class_labels(m, "eval_", ["click"]) == {"click": 0.0}
    d = gate(m, champion, GateConfig())
    assert not d.promote and "every label is one class" in d.summary() and "outside" not in d.summary()
    both = evaluate(np.arange(50) % 2, np.full(50, 0.5), np.arange(50) % 5, names=["click"])
    assert one_class_labels(both, "eval_", ["click"]) == {} and both["eval_calibration"] == 1.0


def test_nan_predictions_are_not_called_one_class() -> None:
    import numpy as np

    from jobs.metrics import evaluate

    m = evaluate(np.arange(50) % 2, np.full(50, np.nan), np.arange(50) % 5, names=["click"])
    d = gate(m, CHAMP, GateConfig())
    assert not d.promote and "predictions are not finite" in d.summary() and "one class" not in d.summary()


@pytest.mark.parametrize("change, promote", [
    ({}, True),
    ({"auc": 0.7985}, True),                     # 0.0015 worse: inside the 0.002 margin
    ({"auc": 0.797}, False),                     # 0.003 worse
    ({"logloss": 0.504}, True),                  # 0.004 worse: inside the 0.005 margin
    ({"logloss": 0.506}, False),
    ({"auc": 0.9, "calibration": 0.7}, False),   # better AUC cannot buy calibration
    ({"auc": 0.85, "logloss": 0.45}, True),
])
def test_candidate_against_champion(change: dict, promote: bool) -> None:
    d = gate(cand(**change), CHAMP, GateConfig())
    assert d.promote is promote, d.summary()


def test_gate_config_is_validated() -> None:
    with pytest.raises(ValueError, match="calibration_band"):
        GateConfig(calibration_band=(1.1, 1.3))
    with pytest.raises(ValueError, match="margins"):
        GateConfig(auc_margin=-0.1)
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=-1)


def test_checkpoint_keys_lose_wrapper_prefixes() -> None:
    assert normalize_key("_dmp_wrapped_module.module.model.tower.w") == "model.tower.w"
    assert normalize_key("sparse._dmp_wrapped_module.model.sparse_arch.ebc.t.weight") == \
        "sparse.model.sparse_arch.ebc.t.weight"
    assert normalize_key("model.tower.w") == "model.tower.w"


def test_eval_period_spec() -> None:
    import datetime as dt

    from jobs.train import eval_spec

    d = dt.date(2026, 1, 5)
    assert eval_spec([d]) == "2026-01-05"
    assert eval_spec([d, dt.date(2026, 1, 7)]) == "2026-01-05..2026-01-07"
    with pytest.raises(ValueError, match="eval_days"):
        TrainConfig(eval_days=0)


def test_the_gate_can_decide_on_another_label() -> None:
    """Several labels: the primary (first) one by default, ``[gate].label`` picks another."""
    champ = CHAMP | {"eval_auc_like": 0.70, "eval_logloss_like": 0.30, "eval_calibration_like": 1.0}
    worse_like = champ | {"eval_auc_like": 0.69}  # the primary label unchanged
    assert gate(worse_like, champ, GateConfig()).promote
    d = gate(worse_like, champ, GateConfig(label="like"))
    assert not d.promote and "AUC (like) 0.6900 is 0.0100 below champion 0.7000" in d.summary()


def test_the_gate_label_must_be_a_label() -> None:
    from pathlib import Path

    from jobs.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs/tiny.toml"
    with pytest.raises(ValueError, match=r"\[gate\].label: 'like' is not a label of the schema \['click'\]"):
        load_config(tiny, ['gate.label="like"'])

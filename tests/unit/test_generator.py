"""The generator is deterministic, fast enough, and plants the signal it claims."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from embedding.schema import load_schema
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, World, auc, generate

ROOT = Path(__file__).resolve().parents[2]


def test_same_seed_same_bytes_and_any_day_regenerates_alone(tmp_path: Path) -> None:
    s = load_schema(ROOT / "configs/tiny.toml")
    cfg = GeneratorConfig(seed=5, rows_per_day=3000, files_per_day=2, num_users=200, num_items=100)
    generate(s, cfg, tmp_path / "a", parse_days("2026-01-01..2026-01-02"), log=lambda *_: None)
    generate(s, cfg, tmp_path / "b", parse_days("2026-01-02"), log=lambda *_: None)
    a = pq.read_table(tmp_path / "a/day=2026-01-02")
    b = pq.read_table(tmp_path / "b/day=2026-01-02")
    assert a.equals(b)
    other = World(s, dataclasses.replace(cfg, seed=6)).day_rows(1)[0]
    assert not a.column("click").equals(other.column("click"))


def test_signal_is_planted_and_new_ids_appear() -> None:
    s = load_schema(ROOT / "configs/demo_world.toml")
    w = World(s, GeneratorConfig(seed=1, rows_per_day=50_000))
    t0, stats0 = w.day_rows(0)
    t3, stats3 = w.day_rows(3)
    assert 0.8 < stats0["oracle_auc"] < 0.95  # a learnable, not trivial, signal
    y, p = t0.column("click").to_numpy(), t0.column("p_true").to_numpy()
    assert abs(y.mean() - p.mean()) < 0.01  # labels are drawn from p_true
    new_users = set(t3.column("user_id").to_numpy()) - set(t0.column("user_id").to_numpy())
    assert len(new_users) > 500
    # the sequence effect: rows whose history matches the target category click more
    hist = t0.column("hist_category").to_pylist()[:5000]
    tgt = t0.column("item_category").to_numpy()[:5000]
    share = np.array([np.mean(np.array(h[-32:]) == c) for h, c in zip(hist, tgt)])
    assert auc(y[:5000], share) > 0.6


def test_labels_with_their_own_mix_of_the_planted_parts() -> None:
    """label_parts gives each label its own dependencies: a sequence-only label is predicted by
    the sequence part alone, a dense-only one by the dense part alone; each has its own p_true."""
    import pytest

    from jobs.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/collapse.toml")
    schema = cfg.schema
    gen = dataclasses.replace(cfg.generator, rows_per_day=20000, label_parts={
        "click": {"sequence": 1.0, "offset": -1.0}, "like": {"dense": 2.0, "offset": -1.0}})
    world = World(schema, gen)
    table, stats = world.day_rows(0)
    assert {"p_true", "p_true_like", "p_true_long_view"} <= set(table.column_names)
    assert stats["oracle_auc_click"] > 0.6 and stats["oracle_auc_like"] > 0.7
    dense = np.stack([table.column(f.name).to_numpy() for f in schema.dense], 1) @ world.dense_w
    like = table.column("like").to_numpy()
    click = table.column("click").to_numpy()
    assert auc(like, dense) > 0.7 and abs(auc(click, dense) - 0.5) < 0.03  # click ignores the dense part
    assert np.allclose(table.column("p_true_like").to_numpy(), 1 / (1 + np.exp(-(2.0 * dense - 1.0))), atol=1e-5)
    with pytest.raises(ValueError, match="unknown part"):
        GeneratorConfig(label_parts={"click": {"sequnce": 1.0}})
    with pytest.raises(ValueError, match=r"\['watch'\] are not labels"):
        World(schema, dataclasses.replace(gen, label_parts={"watch": {"bias": 1.0}}))


def test_collapse_preset_has_the_structure_the_paper_blames() -> None:
    from jobs.config import load_config

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/collapse.toml")
    ctx = [f for f in cfg.schema.sparse if f.name.startswith("ctx_")]
    assert len(ctx) >= 24 and cfg.generator.num_signal_fields <= len(ctx) // 6  # many fields, few informative
    assert cfg.generator.context_cardinality[1] <= 20  # low cardinality
    assert cfg.schema.sequences[0].max_len >= 128 and len(cfg.schema.labels) >= 3
    assert set(cfg.generator.label_parts) == set(cfg.schema.labels)

"""``tokenrec tune`` without runs: the study file is validated naming the key, every tower gets the
same points of the space (seeded, reproducible), the best trial is chosen on validation only,
the best settings are written as TOML that loads back, and the report's paired differences and
standard errors are right. The runs themselves: ``tests/e2e/test_tune_cli.py``."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest
import torch

from embedding.schema import load_schema
from jobs.config import load_config
from jobs.tune import (
    LAYER_TOWERS,
    Job,
    StudyConfig,
    best_settings,
    job_config,
    markdown,
    plan_jobs,
    plan_seed_jobs,
    sample_points,
    summarize,
    write_best,
)
from model.diagnostics import has_layer_states
from model.ranking import TOWERS, ModelConfig, RankingModel

ROOT = Path(__file__).resolve().parents[2]
SPACE = {"train.sharding.dense_lr": {"loguniform": [1e-4, 1e-2]},
         "train.optim.weight_decay": {"choice": [0.0, 0.01, 0.1]},
         "model.tokenformer.dropout": {"uniform": [0.0, 0.2]}}


def _study(**kw) -> StudyConfig:
    return StudyConfig(**({"name": "s", "towers": ("dlrm", "tokenformer", "naive_transformer"), "space": SPACE,
                           "pairs": (("tokenformer", "naive_transformer"),)} | kw))


def test_points_are_seeded_and_shared_by_every_tower() -> None:
    study = _study(trials=5)
    points = sample_points(study)
    assert points == sample_points(study) and points != sample_points(_study(trials=5, search_seed=1))
    assert len(points) == 5 and len({p["train.sharding.dense_lr"] for p in points}) == 5
    assert all(1e-4 <= p["train.sharding.dense_lr"] <= 1e-2 and p["train.optim.weight_decay"] in (0.0, 0.01, 0.1)
               for p in points)
    jobs = plan_jobs(study, points)
    assert len(jobs) == 15
    for tower in study.towers:  # the same budget: the same points, in the same order
        assert [j.settings for j in jobs if j.tower == tower] == points
    assert [j.tower for j in jobs[:3]] == list(study.towers)  # point by point: paired when interrupted


def test_tower_seeds_give_a_tower_more_seed_runs_at_its_chosen_settings() -> None:
    study = _study(seeds=2, tower_seeds={"tokenformer": 4})
    chosen = {"train.sharding.dense_lr": 2e-3}
    tf, dlrm = plan_seed_jobs(study, "tokenformer", chosen), plan_seed_jobs(study, "dlrm", chosen)
    assert [j.key for j in tf] == [f"seed-tokenformer-{s}" for s in (1, 2, 3, 4)]
    assert [j.key for j in dlrm] == ["seed-dlrm-1", "seed-dlrm-2"]
    assert tf[2].settings == {"train.sharding.dense_lr": 2e-3, "train.seed": 3} and tf[2].kind == "seed"
    with pytest.raises(ValueError, match="tower 'hstu', which is not in towers"):
        _study(tower_seeds={"hstu": 3})


def test_job_config_layers_the_study_over_the_base() -> None:
    study = _study(fixed={"tokenformer": {"model.tokenformer.windows": [6, 3]}},
                   eval_ranges={"validation": "+1", "test": "+2..+3"}, days="2026-01-01..2026-01-02")
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        base = tomllib.load(f)
    job = Job("trial-tokenformer-0", "trial", "tokenformer", 0, {"train.sharding.dense_lr": 0.002})
    cfg = job_config(base, study, job, "study.toml")
    assert cfg.model.tower == "tokenformer" and cfg.model.tokenformer.windows == (6, 3)
    assert cfg.train.sharding.dense_lr == 0.002 and cfg.train.eval_ranges == {"validation": "+1", "test": "+2..+3"}
    assert cfg.train.days == "2026-01-01..2026-01-02"
    assert "windows" not in base.get("model", {}).get("tokenformer", {})  # the base document is untouched
    bad = Job("trial-dlrm-0", "trial", "dlrm", 0, {"train.sharding.dense_lrr": 0.002})
    with pytest.raises(ValueError, match=r"study.toml \(trial-dlrm-0\).*unknown key\(s\) \['dense_lrr'\]"):
        job_config(base, study, bad, "study.toml")


@pytest.mark.parametrize("change, message", [
    ({"metric": "test_auc"}, "reads the test range 'test'"),
    ({"metric": "holdout_auc"}, "is not a metric of an eval range"),
    ({"trials": -1}, r"\[tune\].trials: must be >= 0"),
    ({"trials": 0}, r"trials = 0 \(seeds of the fixed settings only\) leaves \[tune.space\] unused"),
    ({"seeds": 0}, r"\[tune\].seeds: must be >= 1"),
    ({"space": {"train.sharding.dense_lr": {"normal": [0, 1]}}}, r"\[tune.space\].\"train.sharding.dense_lr\""),
    ({"pairs": (("tokenformer", "hstu"),)}, "names a tower not in towers"),
    ({"fixed": {"hstu": {"model.hstu.d_model": 8}}}, "settings for tower 'hstu'"),
    ({"mode": "up"}, "'max' or 'min'"),
    ({"metric": "validation_acu"}, "is not a metric of an eval range"),
    ({"common": {"train.seed": None}}, r"\[tune.common\].\"train.seed\": None is not a TOML value"),
])
def test_bad_study_files_are_named(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _study(**change)


def _result(job: Job, **metrics) -> dict:
    return {"job": {"key": job.key, "kind": job.kind, "tower": job.tower, "index": job.index,
                    "settings": job.settings}, "run_id": f"run-{job.key}", "seconds": 1.0, "metrics": metrics}


def test_best_is_chosen_on_validation_never_on_test() -> None:
    study = _study()
    jobs = [Job(f"trial-dlrm-{i}", "trial", "dlrm", i, {"x": i}) for i in range(3)]
    trials = [(jobs[0], _result(jobs[0], validation_auc=0.70, test_auc=0.90)),
              (jobs[1], _result(jobs[1], validation_auc=0.75, test_auc=0.60)),
              (jobs[2], _result(jobs[2], validation_auc=0.75, test_auc=0.99))]
    job, _ = best_settings(study, trials)
    assert job.index == 1  # the best validation AUC; a tie goes to the earlier trial
    job, _ = best_settings(_study(metric="validation_logloss", mode="min"),
                           [(j, _result(j, validation_logloss=v)) for j, v in zip(jobs, (0.5, 0.4, 0.45))])
    assert job.index == 1
    # a NaN or missing metric ranks last, whichever the mode
    for mode, values in (("max", (float("nan"), 0.7, 0.8)), ("min", (float("nan"), 0.5, 0.4))):
        study = _study(metric="validation_logloss", mode=mode)
        job, _ = best_settings(study, [(j, _result(j, validation_logloss=v)) for j, v in zip(jobs, values)])
        assert job.index == 2, mode
    # the chosen settings are the ones the result was trained with, not today's plan
    planned = Job("trial-dlrm-0", "trial", "dlrm", 0, {"x": "changed since"})
    job, _ = best_settings(study, [(planned, _result(jobs[0], validation_logloss=0.1))])
    assert job.settings == {"x": 0}


def test_metric_names_follow_the_ranges() -> None:
    from jobs.tune import metric_parts, metric_range

    ranges = {"val", "val_late", "test"}
    assert metric_range("val_late_auc", ranges) == "val_late" and metric_range("val_auc_like", ranges) == "val"
    assert metric_range("val_late_acu", ranges) is None and metric_range("holdout_auc", ranges) is None
    assert metric_parts("val_oracle_auc", ranges) == ("val", "oracle_auc", "")
    assert metric_parts("val_late_gauc_long_view", ranges) == ("val_late", "gauc", "long_view")
    StudyConfig(name="s", towers=("dlrm",), metric="val_late_gauc",
                eval_ranges={"val_late": "+1", "test": "+2"})  # a range name with '_' is fine


def test_fingerprints_follow_config_and_data(tmp_path: Path) -> None:
    from jobs.study_store import fingerprint
    from pipeline.days import parse_days
    from pipeline.generator import GeneratorConfig, generate

    cfg = load_config(ROOT / "configs/tiny.toml", ['train.eval_ranges.validation="+1"'])
    gen = GeneratorConfig(seed=1, rows_per_day=100, files_per_day=1, num_users=50, num_items=40, num_categories=4)
    for root in ("a", "b"):
        generate(cfg.schema, gen, tmp_path / root, parse_days("2026-01-01..2026-01-03"), log=lambda *_: None)
    stamp = fingerprint(cfg, tmp_path / "a")
    assert fingerprint(cfg, tmp_path / "b") == stamp  # the same data in another folder
    other = load_config(ROOT / "configs/tiny.toml", ['train.eval_ranges.validation="+1"', "train.seed=3"])
    assert fingerprint(other, tmp_path / "a") != stamp
    generate(cfg.schema, GeneratorConfig(seed=2, rows_per_day=120, files_per_day=1, num_users=50, num_items=40,
                                         num_categories=4), tmp_path / "b", parse_days("2026-01-03"),
             log=lambda *_: None)
    assert fingerprint(cfg, tmp_path / "b") != stamp  # the evaluation day's data changed
    from jobs.config import TrainConfig
    # spelling out a default (the dataclass's, or the tower's recipe default it resolved to) changes nothing
    same = load_config(ROOT / "configs/tiny.toml", ['train.eval_ranges.validation="+1"',
                                                    f"train.max_steps={TrainConfig().max_steps}",
                                                    f"train.optim.clip_grad_norm={cfg.train.optim.clip_grad_norm}"])
    assert fingerprint(same, tmp_path / "a") == stamp


def test_a_new_key_with_its_default_keeps_saved_results_valid() -> None:
    """Saved study results must survive a later version adding a config key (with a default):
    the fingerprint hashes only values that differ from their defaults."""
    from dataclasses import dataclass, field

    from embedding.typed_config import non_defaults

    @dataclass(frozen=True)
    class Inner:
        a: int = 1
        b: tuple = (1, 2)

    @dataclass(frozen=True)
    class Old:
        name: str
        inner: Inner = field(default_factory=Inner)
        items: tuple = ()

    @dataclass(frozen=True)
    class InnerNew:
        a: int = 1
        b: tuple = (1, 2)
        c: float = 0.5  # added later

    @dataclass(frozen=True)
    class New:
        name: str
        inner: InnerNew = field(default_factory=InnerNew)
        items: tuple = ()
        extra: str = ""  # added later

    assert non_defaults(Old("x")) == non_defaults(New("x")) == {"name": "x"}
    assert non_defaults(Old("x", Inner(a=2), (Inner(),))) == non_defaults(New("x", InnerNew(a=2), (InnerNew(),)))
    assert non_defaults(Old("x", Inner(a=2))) == {"name": "x", "inner": {"a": 2}}
    assert non_defaults(New("x", InnerNew(c=0.7))) != non_defaults(Old("x"))  # a changed new key counts


def test_best_settings_are_written_as_loadable_toml(tmp_path: Path) -> None:
    settings = {"train.sharding.dense_lr": 0.0017, "train.optim.decay": "cosine", "model.tokenformer.windows": [6, 3],
                "train.deterministic": True, "train.eval_ranges": {"validation": "+1", "test": "+2..+3"}}
    write_best(tmp_path / "best.toml", "tokenformer", settings, "validation_auc", 0.7)
    doc = tomllib.loads((tmp_path / "best.toml").read_text())
    assert doc["train"]["sharding"]["dense_lr"] == 0.0017 and doc["model"]["tokenformer"]["windows"] == [6, 3]
    assert doc["train"]["optim"]["decay"] == "cosine" and doc["train"]["deterministic"] is True
    assert doc["train"]["eval_ranges"] == {"validation": "+1", "test": "+2..+3"}
    text = (tmp_path / "best.toml").read_text()
    overrides = [o.strip("'") for o in text.splitlines()[1].split("--set ")[1:]]
    cfg = load_config(ROOT / "configs/tiny.toml", [o.strip().strip("'") for o in overrides])
    assert cfg.train.sharding.dense_lr == 0.0017 and cfg.model.tokenformer.windows == (6, 3)


def test_summary_pairs_seeds_and_gives_the_standard_error() -> None:
    study = _study(towers=("tokenformer", "naive_transformer"), space={})
    cfg = load_config(ROOT / "configs/collapse.toml")  # three labels: click, like, long_view
    tf = [0.80, 0.81, 0.79, 0.82, 0.80]
    nv = [0.78, 0.80, 0.78, 0.79, 0.79]
    results = {
        "tokenformer": [_result(Job(f"seed-tokenformer-{s}", "seed", "tokenformer", s, {}), test_auc=a,
                                test_auc_like=a - 0.1, test_gauc=a, test_logloss=0.4, test_calibration=1.0,
                                test_auc_long_view=a - 0.2)
                        | {"effective_rank": [10.0 + s, 8.0]} for s, a in enumerate(tf, 1)],
        "naive_transformer": [_result(Job(f"seed-naive_transformer-{s}", "seed", "naive_transformer", s, {}),
                                      test_auc=a, test_gauc=a, test_logloss=0.41, test_calibration=1.0)
                              | {"effective_rank": [9.0, 4.0]} for s, a in enumerate(nv, 1)],
    }
    best = {t: {"settings": {}, "value": 0.7} for t in results}
    s = summarize(study, cfg, results, best)
    diffs = [a - b for a, b in zip(tf, nv)]
    mean = sum(diffs) / 5
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4) / math.sqrt(5)
    (pair,) = s["pairs"]
    assert pair["seeds"] == [1, 2, 3, 4, 5] and pair["mean"] == pytest.approx(mean) and pair["se"] == pytest.approx(se)
    assert pair["more_than_2se"] == (abs(mean) > 2 * se)
    reverse = summarize(_study(towers=("tokenformer", "naive_transformer"), space={},
                               pairs=(("naive_transformer", "tokenformer"),)), cfg, results, best)["pairs"][0]
    assert reverse["mean"] == pytest.approx(-mean) and reverse["more_than_2se"] == pair["more_than_2se"]
    row = s["towers"]["tokenformer"]
    assert row["click"]["auc"]["mean"] == pytest.approx(sum(tf) / 5) and row["click"]["auc"]["n"] == 5
    assert row["like"]["auc"]["mean"] == pytest.approx(sum(tf) / 5 - 0.1)  # per label, by name
    assert row["long_view"]["auc"]["mean"] == pytest.approx(sum(tf) / 5 - 0.2)
    legacy = {"tokenformer": [dict(r, metrics={"test_auc": 0.8, "test_auc_task1": 0.7})
                              for r in results["tokenformer"]]}
    assert summarize(study, cfg, legacy, best)["towers"]["tokenformer"]["like"]["auc"]["mean"] == pytest.approx(0.7)
    assert row["effective_rank"][0]["mean"] == pytest.approx(13.0) and row["effective_rank"][1]["std"] == 0.0
    table = markdown(s)
    assert "| tokenformer − naive_transformer |" in table and "| tokenformer | like |" in table
    assert "| 0.7000 |" in table
    untuned = summarize(study, cfg, results, {t: {"settings": {}, "value": float("nan")} for t in results})
    assert "| 5 | – (not tuned) |" in markdown(untuned)  # trials = 0: no nan in the chosen-on column


def test_layer_towers_are_the_ones_with_layer_states() -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    torch.manual_seed(0)
    for tower in TOWERS:
        cfg = ModelConfig(tower=tower)
        try:
            model = RankingModel(schema, cfg)
        except ValueError:  # a tower this schema cannot build with defaults (e.g. token-count rules)
            continue
        assert has_layer_states(model) == (tower in LAYER_TOWERS), tower


def test_grid_keys_cycle_through_their_values() -> None:
    study = _study(trials=6, space={"train.sharding.dense_lr": {"grid": [1e-3, 2e-3, 4e-3]},
                                    "train.optim.weight_decay": {"choice": [0.0, 0.1]}})
    points = sample_points(study)
    assert [p["train.sharding.dense_lr"] for p in points] == [1e-3, 2e-3, 4e-3] * 2
    assert all(p["train.optim.weight_decay"] in (0.0, 0.1) for p in points)


@pytest.mark.parametrize("name", ["collapse", "movielens"])
def test_shipped_studies_load_and_build(name: str) -> None:
    from jobs.tune import _check_builds, load_study

    study = load_study(ROOT / "configs/studies" / f"{name}.toml")
    with open(ROOT / "configs" / f"{name}.toml", "rb") as f:
        base = tomllib.load(f)
    points = sample_points(study)
    assert len(points) == study.trials >= 4  # the protocol: at least 4 trials per tower
    for tower in study.towers:
        _check_builds(job_config(base, study, Job("check", "seed", tower, 1, points[0]), name), tower)


def test_the_layout_study_gives_the_group_layout_the_ml100k_budget() -> None:
    """movielens_layout: the same points as the ml100k study (so its paper-layout runs are reused),
    and the variant differs from TokenFormer by the target-token layout only."""
    from embedding.typed_config import non_defaults
    from jobs.tune import _check_builds, load_study

    layout = load_study(ROOT / "configs/studies/movielens_layout.toml")
    ml100k = load_study(ROOT / "configs/studies/movielens.toml")
    assert sample_points(layout) == sample_points(ml100k) and layout.eval_ranges == ml100k.eval_ranges
    with open(ROOT / "configs/movielens.toml", "rb") as f:
        base = tomllib.load(f)
    point = sample_points(layout)[1]
    paper = job_config(base, layout, Job("a", "seed", "tokenformer", 1, point), "layout")
    assert non_defaults(paper) == non_defaults(job_config(base, ml100k, Job("b", "seed", "tokenformer", 1, point), "m"))
    group = job_config(base, layout, Job("c", "seed", "tokenformer_group", 1, point), "layout")
    assert group.model.tower == "tokenformer" and group.model.tokenformer.target_tokens == "group"
    assert dataclasses.replace(group.model.tokenformer, target_tokens=paper.model.tokenformer.target_tokens) \
        == paper.model.tokenformer
    _check_builds(group, "tokenformer_group")


def test_the_collapse_layout_control_gives_the_naive_transformer_the_same_layout() -> None:
    """collapse_layout: TokenFormer and the naive Transformer both with one target token per item
    group, each on its own tower's chosen settings; the naive one stays all-full, no gate."""
    from jobs.tune import _check_builds, load_study

    study = load_study(ROOT / "configs/studies/collapse_layout.toml")
    with open(ROOT / "configs/collapse.toml", "rb") as f:
        base = tomllib.load(f)
    cfgs = {t: job_config(base, study, Job(f"seed-{t}-1", "seed", t, 1, {"train.seed": 1}), "layout")
            for t in study.towers}
    tf, naive = cfgs["tokenformer_group"], cfgs["naive_group"]
    assert tf.model.tokenformer.target_tokens == naive.model.tokenformer.target_tokens == "group"
    assert tf.model.tower == "tokenformer" and naive.model.tower == "naive_transformer"
    assert tf.model.tokenformer.num_full_layers == 2 and tf.model.tokenformer.windows == (32, 16)
    from model.tokenformer import naive_transformer
    full = naive_transformer(naive.model.tokenformer)
    assert full.num_full_layers == full.num_layers and full.windows == () and not full.nlir
    assert full.target_tokens == "group"
    for tower, cfg in cfgs.items():
        _check_builds(cfg, tower)


def test_the_demo_world_study_is_seeds_only_with_one_recipe_for_all() -> None:
    from jobs.tune import _check_builds, load_study

    study = load_study(ROOT / "configs/studies/demo_world.toml")
    with open(ROOT / "configs/demo_world.toml", "rb") as f:
        base = tomllib.load(f)
    assert study.trials == 0 and study.seeds >= 5 and {"tokenformer", "dlrm"} <= set(study.towers)
    configs = {t: job_config(base, study, Job(f"seed-{t}-1", "seed", t, 1, {"train.seed": 1}), "demo_world")
               for t in study.towers}
    recipes = {(c.train.sharding.dense_lr, c.train.optim, c.train.days, c.train.epochs) for c in configs.values()}
    assert len(recipes) == 1
    for tower, cfg in configs.items():
        _check_builds(cfg, tower)


def test_variants_of_one_tower_are_ablations() -> None:
    fixed = {"tf_4S": {"model.tower": "tokenformer", "model.tokenformer.schedule": "4S",
                       "model.tokenformer.windows": [6, 6, 3, 3]}}
    study = StudyConfig(name="ablation", towers=("tf_4S",), trials=0, seeds=3, fixed=fixed)
    with open(ROOT / "configs/tiny.toml", "rb") as f:
        base = tomllib.load(f)
    cfg = job_config(base, study, Job("seed-tf_4S-1", "seed", "tf_4S", 1, {"train.seed": 1}), "s")
    assert cfg.model.tower == "tokenformer" and cfg.model.tokenformer.schedule == "4S"
    with pytest.raises(ValueError, match=r"'tf_4F' is not a tower .* \[tune.fixed.tf_4F\] \"model.tower\""):
        StudyConfig(name="ablation", towers=("tf_4F",), trials=0)


def test_tower_costs_count_attention_in_training_mode(tmp_path: Path) -> None:
    from jobs.tune import tower_costs
    from pipeline.days import parse_days
    from pipeline.generator import GeneratorConfig, generate

    cfgs = {t: load_config(ROOT / "configs/tiny.toml", [f"model.tower={t}", "model.tokenformer.d_model=16",
                                                         "model.tokenformer.num_heads=2",
                                                         "model.tokenformer.windows=[6, 3]"])
            for t in ("dlrm", "tokenformer")}
    generate(cfgs["dlrm"].schema, GeneratorConfig(seed=1, rows_per_day=300, files_per_day=1, num_users=50,
                                                  num_items=40, num_categories=4),
             tmp_path, parse_days("2026-01-01"), log=lambda *_: None)
    costs = tower_costs(cfgs, tmp_path, rows=64)
    for c in costs.values():
        assert c["dense_params"] > 0 and c["train_flops_per_example"] > c["forward_flops_per_example"] > 0
    # attention on CPU is counted (PyTorch's counter alone reports 0 for the fused CPU kernel)
    from torch.nn.functional import scaled_dot_product_attention
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 2, 8, 4, requires_grad=True)
    with FlopCounterMode(display=False) as m:
        scaled_dot_product_attention(q, q, q)
    assert m.get_total_flops() == 4 * 2 * 2 * 8 * 8 * 4  # Q·Kᵀ and P·V: 2 FLOPs per multiply-add each


def test_the_ablation_study_inherits_the_chosen_settings(tmp_path: Path) -> None:
    """``settings_from``: a best/<tower>.toml written by another study becomes common settings;
    the ablations are variants of TokenFormer that all build."""
    from jobs.tune import _check_builds, load_study

    best = tmp_path / "best" / "tokenformer.toml"
    write_best(best, "tokenformer", {"train.sharding.dense_lr": 0.004, "train.optim.weight_decay": 0.01,
                                     "model.tokenformer.dropout": 0.1}, "validation_auc", 0.8)
    text = (ROOT / "configs/studies/collapse_ablations.toml").read_text()
    shipped = 'settings_from = "../../benchmarks/results/studies/collapse/best/tokenformer.toml"'
    study_file = tmp_path / "ablations.toml"
    study_file.write_text(text.replace(shipped, f'settings_from = "{best}"'))
    study = load_study(study_file)
    assert study.common["train.sharding.dense_lr"] == 0.004 and study.trials == 0
    with open(ROOT / "configs/collapse.toml", "rb") as f:
        base = tomllib.load(f)
    windows = {}
    for name in study.towers:
        cfg = job_config(base, study, Job("check", "seed", name, 1, {"train.seed": 1}), "ablations")
        _check_builds(cfg, name)
        assert cfg.model.tower == "tokenformer" and cfg.train.sharding.dense_lr == 0.004
        tf = cfg.model.tokenformer
        windows[name] = (tf.num_full_layers, tf.windows, tf.nlir)
    assert windows["bfts_4F"] == (4, (), True) and windows["bfts_4S"][0] == 0
    assert windows["bfts_2F2S"] == (2, (32, 16), True)  # the preset's own layout is 2F2S (its seeds are reused)
    assert windows["nlir_off"][2] is False and windows["uniform_windows"] == (2, (32, 32), True)
    missing = tmp_path / "missing.toml"
    missing.write_text(text.replace(shipped, 'settings_from = "no/such/best.toml"'))
    with pytest.raises(FileNotFoundError, match=r"settings_from no/such/best.toml does not exist"):
        load_study(missing)


def test_settings_from_per_tower_gives_each_tower_its_own_choice(tmp_path: Path) -> None:
    """``settings_from`` with ``{tower}``: every entry (a variant by its ``model.tower``) reads its
    own tower's best file, under its fixed settings; the shipped table study's ``*_own`` variants
    build with the history on tables of its own, the plain towers on the target's tables."""
    from jobs.tune import _check_builds, load_study

    lrs = {"tokenformer": 0.002, "naive_transformer": 0.004, "dlrm": 0.008, "rankmixer_longer": 0.001}
    for tower, lr in lrs.items():
        write_best(tmp_path / "best" / f"{tower}.toml", tower,
                   {"train.sharding.dense_lr": lr, "model.tokenformer.d_model": 32,
                    "model.tokenformer.num_heads": 2, "model.tokenformer.windows": [16, 8],
                    "model.rankmixer.d_model": 32, "model.rankmixer.num_tokens": 4}, "validation_auc", 0.7)
    text = (ROOT / "configs/studies/movielens_tables.toml").read_text()
    shipped = 'settings_from = "../../benchmarks/results/studies/ml100k/best/{tower}.toml"'
    assert shipped in text
    study_file = tmp_path / "tables.toml"
    study_file.write_text(text.replace(shipped, f'settings_from = "{tmp_path}/best/{{tower}}.toml"'))
    study = load_study(study_file)
    with open(ROOT / "configs/movielens.toml", "rb") as f:
        base = tomllib.load(f)
    for name in study.towers:
        cfg = job_config(base, study, Job("check", "seed", name, 1, {"train.seed": 1}), "tables")
        _check_builds(cfg, name)
        assert cfg.train.sharding.dense_lr == lrs[cfg.model.tower], name
        tables = {f.table for f in cfg.schema.sequences[0].features}
        assert tables == ({"hist_item", "hist_genre", "hist_rating"} if name.endswith("_own")
                          else {"item", "genre", "hist_rating"}), name
    # [tune.common] wins over the inherited settings, as in the one-file form; fixed wins over both
    with_common = tmp_path / "tables_common.toml"
    common = '[tune.common]\n"model.tokenformer.num_heads" = 4\n\n'
    with_common.write_text(study_file.read_text().replace("[tune.fixed.tokenformer_own]",
                                                          common + "[tune.fixed.tokenformer_own]"))
    study = load_study(with_common)
    cfg = job_config(base, study, Job("check", "seed", "tokenformer_own", 1, {"train.seed": 1}), "tables")
    assert cfg.model.tokenformer.num_heads == 4 and cfg.schema.sequences[0].features[0].table == "hist_item"
    (tmp_path / "best" / "dlrm.toml").unlink()
    with pytest.raises(FileNotFoundError, match=r"best/dlrm.toml does not exist"):
        load_study(study_file)

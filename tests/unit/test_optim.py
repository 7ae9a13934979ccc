"""The dense training recipe (issue 17): schedule values, what decays, clipping, AdamW groups."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from embedding.schema import load_schema
from embedding.sharding import ShardingConfig, dense_optimizer
from jobs.config import load_config
from jobs.optim import OptimConfig, clip, decays, lr_factor
from model.hyformer import HyFormerConfig
from model.ranking import ModelConfig, RankingModel
from model.tokenformer import TokenFormerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = OptimConfig(warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, 111, cfg) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_factor(10, 111, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 111, cfg) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_factor(110, 111, cfg) == pytest.approx(0.1)  # the last step (T − 1) reaches the floor
    assert lr_factor(500, 111, cfg) == pytest.approx(0.1)  # flat after the end


def test_linear_decay_constant_and_warmup_share() -> None:
    lin = OptimConfig(warmup_share=0.1, decay="linear", min_lr_ratio=0.0)
    assert lin.warmup(201) == 20
    assert lr_factor(19, 201, lin) == pytest.approx(1.0)
    assert lr_factor(110, 201, lin) == pytest.approx(0.5)
    assert lr_factor(200, 201, lin) == pytest.approx(0.0)
    assert lr_factor(5, 200, OptimConfig()) == 1.0  # today's recipe: constant, no warmup
    with pytest.raises(ValueError, match="decay: choose one of"):
        OptimConfig(decay="step")
    with pytest.raises(ValueError, match="warmup_share"):
        OptimConfig(warmup_share=1.5)


def test_weight_decay_on_matrices_only() -> None:
    schema = load_schema(ROOT / "configs/tiny.toml")
    model = RankingModel(schema, ModelConfig(tower="tokenformer", tokenformer=TokenFormerConfig(d_model=32)))
    names = {n for n, p in model.named_parameters() if decays(n, p)}
    assert "tower.layers.0.qkv.weight" in names and "tower.layers.0.gate.weight" in names
    assert "tower.field_w" in names and "tower.head.weight" in names
    for kept in ("tower.layers.0.gate.bias", "tower.layers.0.norm_attn.weight", "tower.final_norm.weight",
                 "tower.sep", "tower.field_b", "tower.head.bias"):
        assert kept not in names, kept
    assert not any(n.startswith("sparse_arch.") for n in names)  # embedding tables never decay
    assert "tower.target_w" in names and "tower.target_b" not in names  # per-feature target tokens
    for tower, biases in (("rankmixer_longer", ("b1", "b2", "tok_b")), ("onetrans", ("b",)),
                          ("hyformer", ("query_out_b",))):
        other = RankingModel(schema, ModelConfig(tower=tower, hyformer=HyFormerConfig(d_model=40)))
        decayed = [n for n, p in other.named_parameters() if decays(n, p)]
        assert decayed and not [n for n in decayed if n.rsplit(".", 1)[-1] in biases], (tower, decayed)
    opt = dense_optimizer(model, ShardingConfig(dense_optimizer="adamw"), weight_decay=0.05, decays=decays)
    dense = opt._optims[0][1]
    groups = {id(p): g["weight_decay"] for g in dense.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert groups[id(params["tower.layers.0.qkv.weight"])] == 0.05
    assert groups[id(params["tower.layers.0.gate.bias"])] == 0.0
    assert isinstance(dense._optimizer, torch.optim.AdamW)


def test_clipping_bounds_the_global_norm() -> None:
    a, b = torch.zeros(3, requires_grad=True), torch.zeros(4, requires_grad=True)
    a.grad, b.grad = torch.full((3,), 3.0), torch.full((4,), 4.0)  # norm sqrt(27 + 64)
    before = clip([a, b], 1.0)
    assert before == pytest.approx(91 ** 0.5)
    assert torch.cat([a.grad, b.grad]).norm() == pytest.approx(1.0, rel=1e-5)
    assert clip([a, b], 0.0) is None  # off


def test_the_training_step_sets_the_scheduled_lr_and_clips_before_stepping() -> None:
    """``dense_step`` is the worker loop's step: at step 3 of a 10-step warmup the rate is 0.4 ×
    the base, the gradients the optimizer sees are clipped to the configured norm, and the update
    equals AdamW's on those clipped gradients (with clipping off they stay large)."""
    from jobs.optim import dense_step

    def run(max_norm: float) -> tuple[torch.nn.Linear, torch.optim.AdamW]:
        torch.manual_seed(0)
        lin = torch.nn.Linear(4, 3)
        opt = torch.optim.AdamW(lin.parameters(), lr=1.0)
        loss = (100 * lin(torch.ones(2, 4))).pow(2).sum()  # a gradient norm in the thousands
        cfg = OptimConfig(warmup_steps=10, decay="cosine", clip_grad_norm=max_norm)
        dense_step(opt, loss, 3, 100, dense_opt=opt, dense_params=list(lin.parameters()), base_lr=0.01, cfg=cfg)
        return lin, opt

    lin, opt = run(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 * 0.4)
    assert torch.cat([p.grad.flatten() for p in lin.parameters()]).norm() == pytest.approx(0.5, rel=1e-5)
    torch.manual_seed(0)
    ref = torch.nn.Linear(4, 3)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.004)
    (100 * ref(torch.ones(2, 4))).pow(2).sum().backward()
    torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 0.5)
    ref_opt.step()
    for p, q in zip(lin.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)
    unclipped, _ = run(0.0)
    assert torch.cat([p.grad.flatten() for p in unclipped.parameters()]).norm() > 1000


def test_optim_section_parses_and_rejects_unknown_keys() -> None:
    cfg = load_config(ROOT / "configs/tiny.toml", ["train.optim.warmup_steps=5", "train.optim.decay=cosine",
                                                   "train.sharding.dense_optimizer=adamw"])
    assert cfg.train.optim.warmup_steps == 5 and cfg.train.optim.decay == "cosine"
    with pytest.raises(ValueError, match="warmup"):
        load_config(ROOT / "configs/tiny.toml", ["train.optim.warmup=5"])


@pytest.mark.parametrize("tower", ["tokenformer", "naive_transformer", "dlrm", "rankmixer_longer", "hstu",
                                   "hyformer", "dcnv2"])
def test_each_tower_gets_its_measured_recipe_unless_a_key_is_set(tower: str) -> None:
    """``tower_recipe``: keys a config leaves out take the tower's measured defaults (the shared
    AdamW / cosine / clipping recipe and its learning rate, warmup and dropout); keys the file or
    ``--set`` gives win; ``tower_defaults = false`` keeps the first wave's dataclass defaults."""
    from jobs.optim import RECIPE_SHARED, TOWER_RECIPES

    cfg = load_config(ROOT / "configs/tiny.toml", [f'model.tower="{tower}"'])
    want = {**RECIPE_SHARED, **TOWER_RECIPES[tower]}
    got = {"train.sharding.dense_optimizer": cfg.train.sharding.dense_optimizer,
           "train.sharding.dense_lr": cfg.train.sharding.dense_lr,
           "train.optim.weight_decay": cfg.train.optim.weight_decay,
           "train.optim.decay": cfg.train.optim.decay, "train.optim.min_lr_ratio": cfg.train.optim.min_lr_ratio,
           "train.optim.clip_grad_norm": cfg.train.optim.clip_grad_norm,
           "train.optim.warmup_share": cfg.train.optim.warmup_share,
           "model.tokenformer.dropout": cfg.model.tokenformer.dropout}
    assert {k: got[k] for k in want} == want
    assert cfg.train.sharding.dense_optimizer == "adamw" and cfg.train.optim.clip_grad_norm == 1.0
    mine = load_config(ROOT / "configs/tiny.toml", [f'model.tower="{tower}"', "train.sharding.dense_lr=0.0005",
                                                    'train.optim.decay="linear"', "model.tokenformer.dropout=0.3"])
    assert (mine.train.sharding.dense_lr, mine.train.optim.decay,
            mine.model.tokenformer.dropout) == (0.0005, "linear", 0.3)
    assert mine.train.optim.warmup_share == want["train.optim.warmup_share"]  # the rest still filled
    off = load_config(ROOT / "configs/tiny.toml", [f'model.tower="{tower}"', "train.optim.tower_defaults=false"])
    assert (off.train.sharding, off.train.optim.decay, off.train.optim.clip_grad_norm, off.model.tokenformer.dropout) \
        == (ShardingConfig(), "constant", 0.0, 0.0)


def test_every_tower_has_a_recipe_and_the_per_tower_choices_differ() -> None:
    from jobs.optim import TOWER_RECIPES
    from model.ranking import TOWERS

    assert set(TOWER_RECIPES) == set(TOWERS)
    lr = "train.sharding.dense_lr"
    assert TOWER_RECIPES["tokenformer"][lr] != TOWER_RECIPES["naive_transformer"][lr]

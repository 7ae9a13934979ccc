"""Receptive-field trimming (issue 16): the trimmed stack equals the untrimmed one in logits and
every parameter's gradient, across schedules, windows, kernels, drop, NLIR, block types, target
token counts and behaviour counts; the plan is the worked one; rows outside the receptive field
never move the logit."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest
import torch

from embedding.schema import load_schema
from model.ranking import ModelConfig, RankingModel
from model.sparse import SparseOutput
from model.tokenformer import TokenFormer, TokenFormerConfig, naive_transformer, receptive_field_plan

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")  # 5 field tokens + dense + <sep> = 7 dropped
DE = 16


def _sparse(lengths: list[int], L: int, seed: int = 0) -> tuple[torch.Tensor, SparseOutput]:
    """Random embeddings; row b has ``lengths[b]`` behaviours (left-aligned, zero padding after)."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = (torch.arange(L)[None, :, None] < torch.tensor(lengths)[:, None, None]).float()
    feats = {f.name: torch.randn(B, L, DE, generator=g) * mask for f in SCHEMA.sequences[0].features}
    fields = torch.randn(B, len(SCHEMA.sparse), DE, generator=g)
    dense = torch.randn(B, len(SCHEMA.dense), generator=g)
    return dense, SparseOutput(fields_BFD=fields, sequences=[(sum(feats.values()), torch.tensor(lengths))],
                               sequence_features=[feats])


def _tower(cfg: TokenFormerConfig, block: str = "uib") -> TokenFormer:
    torch.manual_seed(0)
    tower = TokenFormer(SCHEMA, cfg, emb_dim=DE, num_tasks=2, block=block)
    with torch.no_grad():  # non-trivial gates, so NLIR matters
        for layer in tower.layers:
            if getattr(layer, "gate", None) is not None:
                layer.gate.weight.normal_(0, 0.2)
    return tower


def _logits_and_grads(tower: TokenFormer, dense, sparse, trim: bool):
    tower.zero_grad(set_to_none=True)
    logits, _ = tower.forward_with_aux(dense, sparse, trim=trim)
    (logits * torch.tensor([1.0, -0.7])).sum().backward()
    return logits.detach(), {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p))
                             for n, p in tower.named_parameters()}


def _assert_parity(tower: TokenFormer, L: int, lengths: list[int]) -> None:
    dense, sparse = _sparse(lengths, L)
    want, g_want = _logits_and_grads(tower, dense, sparse, trim=False)
    got, g_got = _logits_and_grads(tower, dense, sparse, trim=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for name in g_want:
        torch.testing.assert_close(g_got[name], g_want[name], rtol=1e-4, atol=1e-5, msg=name)


SCHEDULES = ("4F", "3F1S", "2F2S", "1F3S", "4S")
KERNELS = ("reference", "sdpa", "banded", "auto")
# drop, nlir, target groups, layout: per group gives 1 and 2 target tokens, per feature 3 and 4
VARIANTS = list(itertools.product((True, False), (True, False), (("item",), ("user", "item")),
                                  (("group", "sum"), ("feature", "concat"))))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("first_window", [8, 64])  # 64: every window larger than the stream
def test_trimmed_equals_untrimmed_logits_and_gradients(schedule, kernel, first_window) -> None:
    L = 20
    lengths = [0, 1, 5, 7, L, 13]  # none, one, fewer than a window, max_len
    for drop, nlir, targets, (target_tokens, event_tokens) in VARIANTS:
        cfg = TokenFormerConfig(d_model=32, num_heads=4, schedule=schedule, first_window=first_window,
                                attention_kernel=kernel, drop_field_tokens=drop, nlir=nlir,
                                target_groups=targets, target_tokens=target_tokens, event_tokens=event_tokens)
        _assert_parity(_tower(cfg), L, lengths)


@pytest.mark.parametrize("schedule", ["4F", "2F2S", "4S"])
def test_hstu_and_naive_transformer_trimmed_equal_untrimmed(schedule) -> None:
    cfg = TokenFormerConfig(d_model=32, num_heads=4, schedule=schedule, first_window=8)
    for targets in (("item",), ("user", "item")):
        _assert_parity(_tower(dataclasses.replace(cfg, target_groups=targets), block="hstu"), 20, [0, 3, 20, 9])
        _assert_parity(_tower(naive_transformer(dataclasses.replace(cfg, target_groups=targets))), 20,
                       [0, 3, 20, 9])


def test_plan_for_the_demo_stream() -> None:
    demo = load_schema(ROOT / "configs/demo_world.toml")
    # 2F2S (32, 16) with one target token (one per group): the worked numbers of issue 16
    tower = TokenFormer(demo, TokenFormerConfig(target_tokens="group"), emb_dim=16, num_tasks=1)
    S = tower.num_prefix_tokens + demo.sequences[0].max_len + 1 + 1
    assert (tower.num_prefix_tokens, S) == (15, 49)
    assert [q for _, q in tower.plan(S, trimmed=True)] == [49, 34, 16, 1]
    assert [q for _, q in tower.plan(S, trimmed=False)] == [49, 49, 34, 34]
    for L in (256, 1024, 4096):
        assert [q for _, q in tower.plan(15 + L + 2, trimmed=True)] == [15 + L + 2, 47, 16, 1]
    per_feature = TokenFormer(demo, TokenFormerConfig(), emb_dim=16, num_tasks=1)  # 3 target tokens: item fields
    assert [q for _, q in per_feature.plan(51, trimmed=True)] == [51, 36, 16, 1]
    naive = TokenFormer(demo, naive_transformer(TokenFormerConfig(target_tokens="group")), emb_dim=16, num_tasks=1)
    assert [q for _, q in naive.plan(S, trimmed=True)] == [49, 49, 49, 1]  # only the last layer trims
    two_targets = TokenFormer(demo, TokenFormerConfig(target_groups=("user", "item"), target_tokens="group"),
                              emb_dim=16, num_tasks=1)
    S2 = two_targets.num_prefix_tokens + 32 + 1 + 2
    assert two_targets.plan(S2, trimmed=True) == receptive_field_plan(S2, [None, None, 32, 16], 2,
                                                                      two_targets.num_prefix_tokens)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rows_outside_the_receptive_field_never_move_the_logit(schedule) -> None:
    """Untrimmed forward; at each layer's input, replace every row the plan says that layer does
    not read: the logit stays (to the bit); replacing the rows it reads moves it."""
    cfg = TokenFormerConfig(d_model=32, num_heads=4, schedule=schedule, first_window=8)
    tower = _tower(cfg).eval()
    dense, sparse = _sparse([0, 4, 30, 17], 30)
    with torch.no_grad():
        base, _ = tower.forward_with_aux(dense, sparse, trim=False)
        S = tower.tokens(dense, sparse)[0].shape[1]
        for i, (keys, _) in enumerate(tower.plan(S, trimmed=True)):
            for outside in (True, False):
                def perturb(module, args, outside=outside, keys=keys):
                    x = args[0].clone()
                    if outside:
                        x[:, : x.shape[1] - keys] = 1e3 * torch.randn_like(x[:, : x.shape[1] - keys])
                    else:
                        x[:, -1] += 1.0  # the last row is always read
                    return (x, *args[1:])
                handle = tower.layers[i].register_forward_pre_hook(perturb)
                try:
                    moved, _ = tower.forward_with_aux(dense, sparse, trim=False)
                finally:
                    handle.remove()
                if outside:
                    assert torch.equal(moved, base), f"layer {i}: a row outside the receptive field moved the logit"
                else:
                    assert not torch.allclose(moved, base)


def test_trimming_is_refused_where_every_position_is_read() -> None:
    cfg = TokenFormerConfig(d_model=32, num_heads=4)
    tower = _tower(cfg)
    dense, sparse = _sparse([2, 3], 8)
    with pytest.raises(ValueError, match="every position"):
        tower.forward_with_aux(dense, sparse, return_states=True, trim=True)
    # states and diagnostics take the untrimmed path by default, with the same logits
    logits, aux = tower.forward_with_aux(dense, sparse, return_states=True)
    torch.testing.assert_close(logits, tower.forward_with_aux(dense, sparse)[0], rtol=1e-5, atol=1e-6)
    assert len(aux["states"]) == cfg.num_layers


def test_exported_trimmed_program_equals_untrimmed_eager(tmp_path) -> None:
    import pyarrow.parquet as pq

    from deploy.export import export_program, inference_inputs
    from pipeline.collate import collate
    from pipeline.days import parse_days
    from pipeline.generator import GeneratorConfig, generate

    generate(SCHEMA, GeneratorConfig(seed=2, rows_per_day=24, files_per_day=1, num_users=10, num_items=8,
                                     num_categories=2), tmp_path, parse_days("2026-01-01"), log=lambda *_: None)
    batch = collate(pq.read_table(next(tmp_path.glob("day=*/*.parquet"))), SCHEMA)
    torch.manual_seed(0)
    model = RankingModel(SCHEMA, ModelConfig(tower="tokenformer", tokenformer=TokenFormerConfig(
        d_model=32, num_heads=4, windows=(6, 3)))).eval()
    program = export_program(model).module()
    with torch.no_grad():
        sparse = model.sparse_arch(batch.fields, batch.sequences)
        want = torch.sigmoid(model.tower.forward_with_aux(batch.dense, sparse, trim=False)[0])
        got = program(*inference_inputs(batch, SCHEMA))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

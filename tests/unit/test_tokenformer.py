"""TokenFormer: BFTS dropping equals masking, the gate starts at σ(b), schedule validation,
stream causality, and every tower's shape and gradients."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from embedding.schema import load_schema
from model.blocks import UnifiedInteractionBlock
from model.hyformer import HyFormerConfig
from model.ranking import TOWERS, ModelConfig, RankingModel, RankingTrain
from model.tokenformer import TokenFormerConfig
from pipeline.collate import collate
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = load_schema(ROOT / "configs/tiny.toml")
TF = TokenFormerConfig(d_model=32, num_heads=4, num_full_layers=2, windows=(6, 3))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("tf")
    generate(SCHEMA, GeneratorConfig(seed=4, rows_per_day=64, files_per_day=1, num_users=30,
                                     num_items=20, num_categories=4), root, parse_days("2026-01-01"),
             log=lambda *_: None)
    return collate(pq.read_table(next(root.glob("day=*/*.parquet"))), SCHEMA)


def _model(cfg: TokenFormerConfig, tower="tokenformer") -> RankingModel:
    torch.manual_seed(0)
    return RankingModel(SCHEMA, ModelConfig(tower=tower, tokenformer=cfg)).eval()


def test_dropping_field_tokens_equals_masking_them(batch) -> None:
    m = _model(TF)
    with torch.no_grad():
        dropped = m(batch)
        tf = m.tower
        sparse = m.sparse_arch(batch.fields, batch.sequences)
        x, pos, valid, _ = tf.tokens(batch.dense, sparse)
        for i, layer in enumerate(tf.layers):
            if i == TF.num_full_layers:
                valid = valid.clone()
                valid[:, : tf.num_prefix_tokens] = False  # masked for every later query
            x = layer(x, pos, valid)
        masked = tf.head(tf.final_norm(x[:, -1]))
    torch.testing.assert_close(dropped, masked, atol=1e-5, rtol=1e-5)


def test_gate_starts_at_sigmoid_of_bias() -> None:
    block = UnifiedInteractionBlock(dataclasses.replace(TF, gate_bias=-1.5), None, "reference")
    x = torch.randn(3, 5, 32)
    g = torch.sigmoid(block.gate(x))
    torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(-1.5)).item()))


@pytest.mark.parametrize("windows, message", [((16, 32), "must not grow"), ((8, 8, 16), "must not grow"),
                                              ((0,), ">= 1")])
def test_window_schedule_is_validated(windows, message) -> None:
    with pytest.raises(ValueError, match=message):
        TokenFormerConfig(windows=windows)


def test_uniform_windows_are_a_valid_ablation(batch) -> None:
    cfg = dataclasses.replace(TF, windows=(6, 6))
    assert cfg.windows == (6, 6)
    assert torch.isfinite(_model(cfg)(batch)).all()


def test_per_feature_target_tokens_and_concatenated_event_tokens(batch) -> None:
    """The paper's layout (the default): one target token per target field, each event token one
    projection of its side features' embeddings side by side (so it is not their sum)."""
    m = _model(TF)
    tower = m.tower
    target_fields = [f.name for f in SCHEMA.sparse if f.group == "item"]
    assert tower.num_target_tokens == len(target_fields) == 3
    assert tower.behaviour_proj.in_features == 16 * len(SCHEMA.sequences[0].features)
    with torch.no_grad():
        sparse = m.sparse_arch(batch.fields, batch.sequences)
        feats = sparse.sequence_features[0]
        swapped = dict(zip(feats, reversed(list(feats.values()))))  # same sum, other order
        x1 = tower.prefix_tokens(batch.dense, sparse)[0]
        x2 = tower.prefix_tokens(batch.dense, dataclasses.replace(sparse, sequence_features=[swapped]))[0]
        assert not torch.allclose(x1, x2)  # a sum could not tell the features apart
        t = tower.target_tokens(sparse.fields_BFD, batch.dense)
        assert t.shape[1] == 3
        f2 = sparse.fields_BFD.clone()
        f2[:, tower.target_field_idx[1]] += 1.0  # change only item_category
        t2 = tower.target_tokens(f2, batch.dense)
        assert torch.equal(t[:, [0, 2]], t2[:, [0, 2]]) and not torch.allclose(t[:, 1], t2[:, 1])
    wave1 = _model(dataclasses.replace(TF, target_tokens="group", event_tokens="sum")).tower
    assert wave1.num_target_tokens == 1 and wave1.behaviour_proj.in_features == 16


def test_changing_targets_never_changes_behaviour_states(batch) -> None:
    m = _model(TF)
    with torch.no_grad():
        sparse = m.sparse_arch(batch.fields, batch.sequences)
        _, states = m.tower(batch.dense, sparse, return_states=True)
        sparse.fields_BFD = sparse.fields_BFD.clone()
        tgt = m.tower.target_field_idx
        sparse.fields_BFD[:, tgt] += 1.0
        logits2, states2 = m.tower(batch.dense, sparse, return_states=True)
    for (a, _), (b, _) in zip(states, states2):
        torch.testing.assert_close(a, b)  # behaviours come before the targets in the stream


@pytest.mark.parametrize("tower", TOWERS)
def test_every_tower_shape_and_gradients(tower, batch) -> None:
    torch.manual_seed(0)
    hy = HyFormerConfig(d_model=40)  # T = 1 query + 4 NS tokens must divide d_model
    model = RankingTrain(RankingModel(SCHEMA, ModelConfig(tower=tower, tokenformer=TF, hyformer=hy)))
    loss, logits = model(batch)
    assert logits.shape == (batch.size, len(SCHEMA.labels))
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("schedule", ["4F", "3F1S", "2F2S", "1F3S", "4S"])
def test_bfts_schedules_build_and_run(schedule, batch) -> None:
    full = int(schedule[0]) if schedule[1] == "F" else 0
    windows = {0: (), 1: (8,), 2: (8, 4), 3: (8, 4, 2), 4: (16, 8, 4, 2)}[4 - full]
    m = _model(dataclasses.replace(TF, num_full_layers=full, windows=windows))
    assert len(m.tower.layers) == 4
    assert torch.isfinite(m(batch)).all()


def test_diagnostics_report_every_layer(batch) -> None:
    from model.diagnostics import analyze, effective_rank

    torch.manual_seed(0)
    eye_rank, _ = effective_rank(torch.eye(8))
    assert abs(eye_rank - 8.0) < 1e-6  # a flat spectrum has full effective rank
    one_rank, _ = effective_rank(torch.ones(8, 8))
    assert abs(one_rank - 1.0) < 1e-6
    for tower, cfg in (("tokenformer", TF), ("naive_transformer", TF)):
        rep = analyze(_model(cfg, tower), batch, ks=(8,))
        assert len(rep["layers"]) == 4
        for layer in rep["layers"]:
            assert 1.0 <= layer["effective_rank"] <= 32 and 0.0 <= layer["mi_k8"]
        masses = [x["field_attention_mass"] for x in rep["layers"]]
        assert all(0.0 < m < 1.0 for m in masses[: TF.num_full_layers])
        if tower == "tokenformer":
            assert masses[TF.num_full_layers:] == [0.0, 0.0]  # fields dropped
        else:
            assert all(0.0 < m < 1.0 for m in masses)


UC_SCHEMA = load_schema(ROOT / "configs/demo_world.toml")  # hist has item_id, category, action
UC = dataclasses.replace(TF, mode="user_centric", windows=(12, 6))


@pytest.fixture(scope="module")
def uc_batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("uc")
    generate(UC_SCHEMA, GeneratorConfig(seed=5, rows_per_day=32, files_per_day=1, num_users=30,
                                        num_items=20, num_categories=4, max_hist_len=40),
             root, parse_days("2026-01-01"), log=lambda *_: None)
    return collate(pq.read_table(next(root.glob("day=*/*.parquet"))), UC_SCHEMA)


def _uc_model() -> RankingModel:
    torch.manual_seed(0)
    return RankingModel(UC_SCHEMA, ModelConfig(tower="tokenformer", tokenformer=UC)).eval()


def test_user_centric_item_token_never_sees_its_own_action(uc_batch) -> None:
    m = _uc_model()
    with torch.no_grad():
        sparse = m.sparse_arch(uc_batch.fields, uc_batch.sequences)
        _, aux = m.tower.forward_with_aux(uc_batch.dense, sparse)
        lengths = sparse.sequences[0][1]
        row = int(torch.argmax(lengths))
        t = int(lengths[row]) - 2  # a behaviour with one after it (left-aligned slot index)
        feats = sparse.sequence_features[0]
        shifted = dict(feats)
        shifted["action"] = feats["action"].clone()
        shifted["action"][row, t] += 5.0  # change only action_t
        x, lens = sparse.sequences[0]
        sparse2 = dataclasses.replace(sparse, sequence_features=[shifted],
                                      sequences=[(x - feats["action"] + shifted["action"], lens)])
        _, aux2 = m.tower.forward_with_aux(uc_batch.dense, sparse2)
    a, b = aux["action_logits_BL"][row], aux2["action_logits_BL"][row]
    assert a.shape == (UC_SCHEMA.sequences[0].max_len,)
    torch.testing.assert_close(a[: t + 1], b[: t + 1])  # item_t and earlier: unchanged
    assert not torch.allclose(a[t + 1], b[t + 1])  # item_{t+1} reads action_t


def test_user_centric_loss_masks_padding_and_trains_the_action_head(uc_batch) -> None:
    torch.manual_seed(0)
    train = RankingTrain(RankingModel(UC_SCHEMA, ModelConfig(tower="tokenformer", tokenformer=UC)))
    loss, _ = train(uc_batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert train.model.tower.action_head.weight.grad.abs().sum() > 0
    _, aux = train.model.forward_with_aux(uc_batch)
    lengths = uc_batch.sequences["hist_action"].lengths()
    padded = torch.arange(32)[None] >= lengths[:, None]
    assert padded.any()
    assert (aux["action_logits_BL"][padded] == 0).all()  # padding slots carry no prediction


def test_the_user_centric_loss_takes_ratings_of_4_or_more_as_positive(uc_batch) -> None:
    """MovieLens' action is the rating 1–5 (``action_positive_min = 4``): the loss's labels are
    rating >= 4 on every real behaviour — not "raw action id > 0", which is 1 for every rating."""
    from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

    jts = uc_batch.sequences.to_dict()
    act = jts["hist_action"]
    ratings = torch.arange(act.values().numel()) % 5 + 1  # 1, 2, 3, 4, 5, 1, …
    jts["hist_action"] = rated_jt = JaggedTensor(values=ratings, lengths=act.lengths())
    batch = dataclasses.replace(uc_batch, sequences=KeyedJaggedTensor.from_jt_dict(jts))
    torch.manual_seed(0)
    train = RankingTrain(RankingModel(UC_SCHEMA, ModelConfig(tower="tokenformer", tokenformer=dataclasses.replace(
        UC, action_positive_min=4))))
    with torch.no_grad():
        _, aux = train.model.forward_with_aux(batch)
        got = train._action_loss(batch, aux)
    L = UC_SCHEMA.sequences[0].max_len
    valid = torch.arange(L)[None] < act.lengths()[:, None]
    rated = rated_jt.to_padded_dense(desired_length=L)
    logits = aux["action_logits_BL"][valid]

    def bce(target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(got, bce((rated[valid] >= 4).float()))
    assert 0.3 < (rated[valid] >= 4).float().mean() < 0.5  # 4 and 5 of 1–5: both kinds of label occur
    assert not torch.allclose(got, bce(torch.ones_like(logits)))  # the old "> 0" label


def test_user_centric_needs_the_action_feature() -> None:
    with pytest.raises(ValueError, match="action_feature 'clicks'"):
        RankingModel(UC_SCHEMA, ModelConfig(tower="tokenformer",
                                            tokenformer=dataclasses.replace(UC, action_feature="clicks")))


@pytest.mark.parametrize("schedule, full, windows", [("4F", 4, ()), ("3F1S", 3, (32,)), ("2F2S", 2, (32, 16)),
                                                     ("1F3S", 1, (32, 16, 8)), ("4S", 0, (32, 16, 8, 4))])
def test_schedule_shorthand(schedule, full, windows) -> None:
    cfg = TokenFormerConfig(schedule=schedule)
    assert (cfg.num_full_layers, cfg.windows, cfg.num_layers) == (full, windows, 4)


def test_bad_schedule_is_named() -> None:
    with pytest.raises(ValueError, match="expected like '2F2S'"):
        TokenFormerConfig(schedule="2X2S")


@pytest.mark.parametrize("schedule", ["4F", "3F1S", "2F2S", "1F3S", "4S"])
def test_the_naive_baseline_stays_all_full_under_any_schedule(schedule) -> None:
    from model.tokenformer import naive_transformer

    naive = naive_transformer(TokenFormerConfig(schedule=schedule))
    assert (naive.num_full_layers, naive.windows, naive.nlir, naive.drop_field_tokens) == (4, (), False, False)
    for tower in ("naive_transformer", "hstu"):
        m = RankingModel(SCHEMA, ModelConfig(tower=tower, tokenformer=TokenFormerConfig(schedule=schedule)))
        assert [layer.window for layer in m.tower.layers] == [None] * 4


def test_movielens_action_label_is_a_rating_of_4_or_more() -> None:
    from jobs.config import load_config
    from model.ranking import positive_actions

    cfg = load_config(ROOT / "configs/movielens.toml", [])
    ratings = torch.tensor([[1, 2, 3, 4, 5]])
    assert positive_actions(ratings, cfg.model.tokenformer.action_positive_min).tolist() == [[0, 0, 0, 1, 1]]
    assert positive_actions(torch.tensor([[0, 1]]), TokenFormerConfig().action_positive_min).tolist() == [[0, 1]]

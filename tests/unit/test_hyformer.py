"""HyFormer: the token-mixing permutation (a worked example), shapes with 1 and 3 sequences, each
sequence encoder, gradients to every parameter, and that decoding really reads the sequences."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from embedding.schema import FeatureSchema, load_schema
from model.hyformer import ENCODERS, HyFormerConfig
from model.ranking import ModelConfig, RankingModel, RankingTrain
from model.rankmixer import token_mix
from pipeline.collate import collate
from pipeline.days import parse_days
from pipeline.generator import GeneratorConfig, generate

ROOT = Path(__file__).resolve().parents[2]
TINY = load_schema(ROOT / "configs/tiny.toml")  # groups user, item, ctx + dense: M = 4


def schema_with(num_sequences: int) -> FeatureSchema:
    d = TINY.to_dict()
    base = d["sequences"][0]
    d["sequences"] = [base] + [dict(base, name=f"seq{k}", max_len=6 + k) for k in range(1, num_sequences)]
    return FeatureSchema.from_dict(d)


def batch_for(schema: FeatureSchema, tmp: Path):
    generate(schema, GeneratorConfig(seed=5, rows_per_day=48, files_per_day=1, num_users=30, num_items=20,
                                     num_categories=4, max_hist_len=10), tmp, parse_days("2026-01-01"),
             log=lambda *_: None)
    return collate(pq.read_table(next(tmp.glob("day=*/*.parquet"))), schema)


def model_for(schema: FeatureSchema, **kw) -> RankingModel:
    torch.manual_seed(0)
    T = len(schema.sequences) * kw.get("queries_per_sequence", 1) + 4
    cfg = HyFormerConfig(d_model=8 * T, num_heads=2, recent_window=3, **kw)
    return RankingModel(schema, ModelConfig(tower="hyformer", hyformer=cfg))


def test_token_mixing_is_the_papers_permutation() -> None:
    """T = 4 tokens of D = 8: each split into 4 chunks of 2; output token h = chunk h of tokens
    1..4, in token order (q̃_h = Concat(q_1^(h), …, q_T^(h)))."""
    x = torch.arange(32.0).view(1, 4, 8)  # token t holds 8t .. 8t+7; chunk h of token t = 8t+2h, 8t+2h+1
    expected = torch.tensor([[[0, 1, 8, 9, 16, 17, 24, 25],
                              [2, 3, 10, 11, 18, 19, 26, 27],
                              [4, 5, 12, 13, 20, 21, 28, 29],
                              [6, 7, 14, 15, 22, 23, 30, 31]]], dtype=torch.float32)
    torch.testing.assert_close(token_mix(x), expected)


def test_tokens_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match=r"T = N·S \+ M = 1·1 \+ 4 = 5 to divide d_model \(64\)"):
        RankingModel(TINY, ModelConfig(tower="hyformer", hyformer=HyFormerConfig(d_model=64)))
    with pytest.raises(ValueError, match="encoder"):
        HyFormerConfig(encoder="lstm")


@pytest.mark.parametrize("num_sequences", [1, 3])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_shapes_and_gradients(num_sequences: int, encoder: str, tmp_path: Path) -> None:
    schema = schema_with(num_sequences)
    batch = batch_for(schema, tmp_path)
    model = RankingTrain(model_for(schema, encoder=encoder, queries_per_sequence=2 if num_sequences == 1 else 1))
    tower = model.model.tower
    assert (tower.S, tower.M) == (num_sequences, 4)
    loss, logits = model(batch)
    assert logits.shape == (batch.size, 1) and torch.isfinite(logits).all()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient reaches {missing}"


@pytest.mark.parametrize("encoder", ENCODERS)
def test_decoding_reads_the_sequence(encoder: str, tmp_path: Path) -> None:
    """Change sequence 2's behaviours without changing their mean: the generated queries are
    identical (they see only the mean), the decoded queries of sequence 2 differ, sequence 1's
    do not (each sequence has its own queries and keys/values)."""
    schema = schema_with(2)
    batch = batch_for(schema, tmp_path)
    model = model_for(schema, encoder=encoder).eval()
    tower = model.tower
    seen: dict[str, list[torch.Tensor]] = {"gen": [], "dec0": [], "dec1": []}
    tower.query_in.register_forward_hook(lambda m, i, o: seen["gen"].append(o.detach()))
    tower.decoders[0][0].register_forward_hook(lambda m, i, o: seen["dec0"].append(o.detach()))
    tower.decoders[0][1].register_forward_hook(lambda m, i, o: seen["dec1"].append(o.detach()))
    with torch.no_grad():
        sparse = model.sparse_arch(batch.fields, batch.sequences)
        tower(batch.dense, sparse)
        x, lengths = sparse.sequences[1]
        rows = lengths >= 2
        x2 = x.clone()
        x2[rows, 0] += 0.5  # the two oldest behaviours move in opposite directions: same mean
        x2[rows, 1] -= 0.5
        sparse.sequences[1] = (x2, lengths)
        tower(batch.dense, sparse)
    assert rows.sum() > 10
    torch.testing.assert_close(seen["gen"][1], seen["gen"][0])
    torch.testing.assert_close(seen["dec0"][1], seen["dec0"][0])
    changed = (seen["dec1"][1] - seen["dec1"][0]).abs().amax(dim=(1, 2))
    if encoder == "longer":  # the recent window reads only the newest K; the oldest move via its keys
        assert (changed[rows] > 1e-6).float().mean() > 0.5
    else:
        assert (changed[rows] > 1e-6).all()
    assert (changed[~rows] < 1e-6).all()


@pytest.mark.parametrize("tower", ["tokenformer", "rankmixer_longer", "dlrm"])
def test_other_towers_read_several_sequences(tower: str, tmp_path: Path) -> None:
    """The towers HyFormer is compared with take every sequence, and each one matters."""
    from model.tokenformer import TokenFormerConfig

    schema = schema_with(2)
    batch = batch_for(schema, tmp_path)
    torch.manual_seed(0)
    cfg = ModelConfig(tower=tower, tokenformer=TokenFormerConfig(d_model=32, num_heads=2, windows=(6, 3)))
    model = RankingModel(schema, cfg).eval()
    with torch.no_grad():
        sparse = model.sparse_arch(batch.fields, batch.sequences)
        before = model.tower(batch.dense, sparse)
        x, lengths = sparse.sequences[1]
        sparse.sequences[1] = (x + 0.5 * (x != 0), lengths)
        if sparse.sequence_features:  # towers that read each side feature (TokenFormer's event tokens)
            sparse.sequence_features[1] = {k: v + 0.5 * (v != 0) for k, v in sparse.sequence_features[1].items()}
        after = model.tower(batch.dense, sparse)
    assert not torch.allclose(before, after), "the second sequence is ignored"

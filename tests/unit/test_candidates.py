"""Shared-prefix candidate scoring (issue 16): equal to scoring each candidate's full row, one
prefix computation per request, candidates independent of each other."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from embedding.schema import DenseField, load_schema
from model.candidates import expand_requests
from model.sparse import SparseOutput
from model.tokenformer import TokenFormer, TokenFormerConfig, naive_transformer

ROOT = Path(__file__).resolve().parents[2]
TINY = load_schema(ROOT / "configs/tiny.toml")
# one request-level and two candidate-level dense features: a fourth kind of target token
MIXED = dataclasses.replace(TINY, dense=(DenseField(name="dense_0"), DenseField(name="price", candidate=True),
                                         DenseField(name="quality", candidate=True)))
DE = 16


def _requests(schema, lengths: list[int], counts: list[int], L: int = 20, seed: int = 0):
    """R prefix rows (request-level inputs) and N candidate rows (every field and dense value
    random, so request-level columns of candidate rows differ from their prefix: they must be
    ignored)."""
    g = torch.Generator().manual_seed(seed)
    R, N = len(lengths), sum(counts)
    mask = (torch.arange(L)[None, :, None] < torch.tensor(lengths)[:, None, None]).float()
    feats = {f.name: torch.randn(R, L, DE, generator=g) * mask for f in schema.sequences[0].features}
    sparse_R = SparseOutput(fields_BFD=torch.randn(R, len(schema.sparse), DE, generator=g),
                            sequences=[(sum(feats.values()), torch.tensor(lengths))], sequence_features=[feats])
    return (torch.randn(R, len(schema.dense), generator=g), sparse_R,
            torch.randn(N, len(schema.sparse), DE, generator=g), torch.randn(N, len(schema.dense), generator=g),
            torch.tensor(counts))


def _tower(schema, cfg, block="uib") -> TokenFormer:
    torch.manual_seed(0)
    tower = TokenFormer(schema, cfg, emb_dim=DE, num_tasks=2, block=block).eval()
    with torch.no_grad():
        for layer in tower.layers:
            if getattr(layer, "gate", None) is not None:
                layer.gate.weight.normal_(0, 0.2)
    return tower


def _per_row(tower, dense_R, sparse_R, fields_N, dense_N, counts):
    with torch.no_grad():
        return tower(*expand_requests(dense_R, sparse_R, fields_N, dense_N, counts, tower.target_field_idx,
                                      tower.candidate_dense_idx))


CASES = [([0, 3, 20, 7], [1, 5, 0, 3]), ([12], [1]), ([0], [4]), ([20], [9])]  # empty history, C = 1, C = 0


@pytest.mark.parametrize("schedule", ["4F", "2F2S", "1F3S", "4S"])
@pytest.mark.parametrize("kernel", ["reference", "auto"])
@pytest.mark.parametrize("schema", [TINY, MIXED], ids=["request_dense", "candidate_dense"])
@pytest.mark.parametrize("targets", [("item",), ("user", "item")])
@pytest.mark.parametrize("layout", [("feature", "concat"), ("group", "sum")])  # the paper's; wave 1's
def test_shared_prefix_equals_per_row(schedule, kernel, schema, targets, layout) -> None:
    cfg = TokenFormerConfig(d_model=32, num_heads=4, schedule=schedule, first_window=8, attention_kernel=kernel,
                            target_groups=targets, target_tokens=layout[0], event_tokens=layout[1])
    tower = _tower(schema, cfg)
    for lengths, counts in CASES:
        inputs = _requests(schema, lengths, counts)
        want = _per_row(tower, *inputs)
        for chunk in (1024, 2):
            got = tower.score_candidates(*inputs, chunk_size=chunk)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_naive_transformer_and_hstu_through_the_same_interface() -> None:
    for tower in (_tower(TINY, naive_transformer(TokenFormerConfig(d_model=32, num_heads=4))),
                  _tower(TINY, TokenFormerConfig(d_model=32, num_heads=4, windows=(8, 4)), block="hstu")):
        inputs = _requests(TINY, [0, 5, 20], [2, 1, 4])
        torch.testing.assert_close(tower.score_candidates(*inputs), _per_row(tower, *inputs), rtol=1e-5, atol=1e-6)


def test_changing_one_candidate_never_changes_another() -> None:
    tower = _tower(MIXED, TokenFormerConfig(d_model=32, num_heads=4, windows=(8, 4), target_groups=("user", "item")))
    dense_R, sparse_R, fields_N, dense_N, counts = _requests(MIXED, [6, 20], [4, 3])
    base = tower.score_candidates(dense_R, sparse_R, fields_N, dense_N, counts)
    for n in range(fields_N.shape[0]):
        f2, d2 = fields_N.clone(), dense_N.clone()
        f2[n] += 2.0
        d2[n] -= 1.0
        moved = tower.score_candidates(dense_R, sparse_R, f2, d2, counts)
        others = torch.arange(fields_N.shape[0]) != n
        assert torch.equal(moved[others], base[others])
        assert not torch.allclose(moved[n], base[n])


def test_the_prefix_is_computed_once_per_request(monkeypatch) -> None:
    tower = _tower(TINY, TokenFormerConfig(d_model=32, num_heads=4))
    rows_seen = []
    real = tower.prefix_tokens

    def counting(dense, sparse):
        rows_seen.append(dense.shape[0])
        return real(dense, sparse)

    monkeypatch.setattr(tower, "prefix_tokens", counting)
    inputs = _requests(TINY, [3, 20, 0], [100, 7, 1])
    tower.score_candidates(*inputs, chunk_size=16)  # 8 chunks of candidates, one prefix pass
    assert rows_seen == [3] and tower.prefix_passes == 3


def test_counts_must_match_the_rows() -> None:
    tower = _tower(TINY, TokenFormerConfig(d_model=32, num_heads=4))
    dense_R, sparse_R, fields_N, dense_N, _ = _requests(TINY, [3, 4], [2, 2])
    with pytest.raises(ValueError, match="summing to the 4 candidate rows"):
        tower.score_candidates(dense_R, sparse_R, fields_N, dense_N, torch.tensor([2, 1]))


def test_candidate_dense_adds_a_target_token_and_request_dense_keeps_the_stream() -> None:
    plain, mixed = _tower(TINY, TokenFormerConfig()), _tower(MIXED, TokenFormerConfig())
    assert (plain.num_target_tokens, mixed.num_target_tokens) == (3, 4)  # item_id, item_category, item_tags
    by_group = _tower(MIXED, TokenFormerConfig(target_tokens="group"))
    assert by_group.num_target_tokens == 2
    assert plain.num_prefix_tokens == mixed.num_prefix_tokens  # one request-level dense token either way
    assert MIXED.candidate_columns(("item",)) == ["item_id", "item_category", "item_tags", "price", "quality"]
    assert MIXED.fingerprint() != TINY.fingerprint()


TWO = load_schema(ROOT / "configs/two_sequences.toml")  # two behaviour sequences
DEMO = load_schema(ROOT / "configs/demo_world.toml")  # hist has an action feature: user-centric mode


def _two_sequence_requests(lengths: list[tuple[int, int]], counts: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    R, N = len(lengths), sum(counts)
    seqs, feats = [], []
    for k, q in enumerate(TWO.sequences):
        n = torch.tensor([lens[k] for lens in lengths])
        mask = (torch.arange(q.max_len)[None, :, None] < n[:, None, None]).float()
        f = {feat.name: torch.randn(R, q.max_len, DE, generator=g) * mask for feat in q.features}
        seqs.append((sum(f.values()), n))
        feats.append(f)
    sparse_R = SparseOutput(fields_BFD=torch.randn(R, len(TWO.sparse), DE, generator=g), sequences=seqs,
                            sequence_features=feats)
    return (torch.randn(R, len(TWO.dense), generator=g), sparse_R, torch.randn(N, len(TWO.sparse), DE, generator=g),
            torch.randn(N, len(TWO.dense), generator=g), torch.tensor(counts))


@pytest.mark.parametrize("schedule", ["4F", "2F2S", "4S"])
def test_two_sequences_shared_prefix_and_trimming_are_exact(schedule) -> None:
    tower = _tower(TWO, TokenFormerConfig(d_model=32, num_heads=4, schedule=schedule, first_window=8))
    inputs = _two_sequence_requests([(0, 16), (32, 0), (5, 3)], [3, 1, 4])
    torch.testing.assert_close(tower.score_candidates(*inputs), _per_row(tower, *inputs), rtol=1e-5, atol=1e-6)
    dense_N, sparse_N = expand_requests(*inputs, tower.target_field_idx, tower.candidate_dense_idx)
    with torch.no_grad():
        torch.testing.assert_close(tower.forward_with_aux(dense_N, sparse_N, trim=True)[0],
                                   tower.forward_with_aux(dense_N, sparse_N, trim=False)[0], rtol=1e-4, atol=1e-5)


def test_user_centric_target_scores_share_the_prefix_too() -> None:
    """The user-centric stream (interleaved item/action tokens) is still causal: its target
    logit — what evaluation reads — is equal through the cached prefix."""
    cfg = TokenFormerConfig(d_model=32, num_heads=4, windows=(12, 6), mode="user_centric")
    tower = _tower(DEMO, cfg)
    g = torch.Generator().manual_seed(1)
    L, R, counts = DEMO.sequences[0].max_len, 3, torch.tensor([2, 5, 1])
    lengths = torch.tensor([0, 7, L])
    mask = (torch.arange(L)[None, :, None] < lengths[:, None, None]).float()
    feats = {f.name: torch.randn(R, L, DE, generator=g) * mask for f in DEMO.sequences[0].features}
    sparse_R = SparseOutput(fields_BFD=torch.randn(R, len(DEMO.sparse), DE, generator=g),
                            sequences=[(sum(feats.values()), lengths)], sequence_features=[feats])
    inputs = (torch.randn(R, len(DEMO.dense), generator=g), sparse_R,
              torch.randn(8, len(DEMO.sparse), DE, generator=g), torch.randn(8, len(DEMO.dense), generator=g), counts)
    torch.testing.assert_close(tower.score_candidates(*inputs), _per_row(tower, *inputs), rtol=1e-5, atol=1e-6)

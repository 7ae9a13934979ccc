from __future__ import annotations

import pytest
import torch

from model.rankmixer import RankMixerConfig, token_mix


def test_token_mix_worked_example_t2() -> None:
    x = torch.tensor([[[0.0, 1, 2, 3], [10, 11, 12, 13]]])
    assert token_mix(x).tolist() == [[[0.0, 1, 10, 11], [2, 3, 12, 13]]]


def test_token_mix_worked_example_t4() -> None:
    # token t, chunk c holds value 10*t + c; output token h holds chunk h of tokens 0..3
    x = torch.tensor([[[10.0 * t + c for c in range(4)] for t in range(4)]])
    assert token_mix(x)[0].tolist() == [[10.0 * t + h for t in range(4)] for h in range(4)]


def test_num_tokens_must_divide_d_model() -> None:
    with pytest.raises(ValueError, match="must be >= 2 and divide"):
        RankMixerConfig(d_model=64, num_tokens=6)


def test_onetrans_pyramid_shrinks_to_the_ns_tokens() -> None:
    from model.onetrans import pyramid_schedule

    assert pyramid_schedule(40, 8, 4) == [32, 24, 16, 8]
    assert pyramid_schedule(9, 8, 2) == [8, 8]


def test_onetrans_ns_tokens_see_every_behaviour_s_tokens_never_see_ns() -> None:
    from model.onetrans import OneTransBlock, OneTransConfig

    torch.manual_seed(0)
    block = OneTransBlock(OneTransConfig(d_model=16, num_heads=2, num_ns_tokens=2))
    x = torch.randn(1, 6, 16)
    valid = torch.ones(1, 6, dtype=torch.bool)
    out = block(x, valid, 6)
    x2 = x.clone()
    x2[:, 0] += 1.0  # the oldest behaviour
    out2 = block(x2, valid, 6)
    assert not torch.allclose(out[:, -1], out2[:, -1])  # the last NS token reads it
    x3 = x.clone()
    x3[:, -1] += 1.0  # the last NS token
    torch.testing.assert_close(block(x3, valid, 6)[:, :4], out[:, :4])  # causal: S-tokens never see it

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

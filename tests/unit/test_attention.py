"""Attention kernels: causality, windows, banded == reference (outputs and gradients)."""

from __future__ import annotations

import pytest
import torch

from model.attention import KERNELS, attention, causal_mask


def _qkv(B=2, H=2, L=37, E=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, L, E, generator=g, requires_grad=True) for _ in range(3)]


def _valid(B, L, pad):
    v = torch.ones(B, L, dtype=torch.bool)
    v[1, :pad] = False  # row 1: right-aligned padding at the start
    return v


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("window", [None, 1, 5, 16])
def test_causal_changing_a_later_token_never_changes_an_earlier_output(kernel, window) -> None:
    q, k, v = _qkv()
    valid = _valid(2, 37, 4)
    out = attention(kernel, q, k, v, valid, window)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 20:] += 3.0
    v2[:, :, 20:] -= 2.0
    out2 = attention(kernel, q, k2, v2, valid, window)
    torch.testing.assert_close(out[:, :, :20], out2[:, :, :20])
    assert not torch.allclose(out[:, :, 20:], out2[:, :, 20:])


@pytest.mark.parametrize("kernel", KERNELS)
def test_window_at_least_L_equals_full(kernel) -> None:
    q, k, v = _qkv(L=23)
    valid = _valid(2, 23, 3)
    torch.testing.assert_close(attention(kernel, q, k, v, valid, 23), attention("reference", q, k, v, valid, None))
    torch.testing.assert_close(attention(kernel, q, k, v, valid, 50), attention("reference", q, k, v, valid, None))


@pytest.mark.parametrize("window", [1, 4, 7, 16, 36])
@pytest.mark.parametrize("L", [16, 37])
def test_banded_equals_reference_outputs_and_gradients(window, L) -> None:
    q, k, v = _qkv(L=L, seed=window)
    valid = _valid(2, L, 5)
    ref = attention("reference", q, k, v, valid, window)
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = attention("banded", q, k, v, valid, window)
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_mask_window_semantics() -> None:
    m = causal_mask(torch.ones(1, 6, dtype=torch.bool), 3)[0, 0]
    assert m[5].tolist() == [False, False, False, True, True, True]  # i-3 < j <= i
    assert m[0].tolist() == [True, False, False, False, False, False]
    padded = causal_mask(torch.tensor([[False, False, True, True]]), None)[0, 0]
    assert padded[0].tolist() == [True, False, False, False]  # a padding query still sees itself
    assert padded[3].tolist() == [False, False, True, True]


def test_unknown_kernel_is_named() -> None:
    q, k, v = _qkv(L=4)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        attention("flash", q, k, v, torch.ones(2, 4, dtype=torch.bool))

"""Attention kernels: causality, windows, end-aligned queries (Q <= K), and every fast path equal
to the reference on valid query rows, in outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.attention import KERNELS, attention, causal_mask, choose_kernel

ALL = (*KERNELS, "auto")


def _qkv(B=2, H=2, L=37, E=8, seed=0, Q=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Q or L, E, generator=g, requires_grad=True)
    return [q] + [torch.randn(B, H, L, E, generator=g, requires_grad=True) for _ in range(2)]


def _valid(B, L, pad, start=0):
    v = torch.ones(B, L, dtype=torch.bool)
    v[1, start:start + pad] = False  # row 1: padding in the middle, as behaviour slots are
    return v


def _query_rows_valid(valid_BK, Q):
    return valid_BK[:, valid_BK.shape[1] - Q:]  # B Q


def _assert_equal_on_valid_rows(kernel, q, k, v, valid, window):
    """Outputs and gradients of ``kernel`` equal the reference's where the query row is valid."""
    Q = q.shape[2]
    rows = _query_rows_valid(valid, Q)[:, None, :, None].float() if valid is not None else 1.0
    ref = attention("reference", q, k, v, valid, window) * rows
    g_ref = torch.autograd.grad(ref.square().sum(), (q, k, v))
    out = attention(kernel, q, k, v, valid, window) * rows
    g_out = torch.autograd.grad(out.square().sum(), (q, k, v))
    assert torch.isfinite(attention(kernel, q, k, v, valid, window)).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ALL)
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


@pytest.mark.parametrize("kernel", ALL)
def test_window_at_least_L_equals_full(kernel) -> None:
    q, k, v = _qkv(L=23)
    valid = _valid(2, 23, 3, start=5)
    rows = valid[:, None, :, None]
    full = attention("reference", q, k, v, valid, None) * rows
    torch.testing.assert_close(attention(kernel, q, k, v, valid, 23) * rows, full)
    torch.testing.assert_close(attention(kernel, q, k, v, valid, 50) * rows, full)


@pytest.mark.parametrize("kernel", ALL)
@pytest.mark.parametrize("window", [None, 1, 4, 7, 16, 36])
@pytest.mark.parametrize("L, Q", [(16, 16), (37, 37), (37, 1), (37, 12), (37, 30), (300, 300), (300, 200),
                                  (300, 40)])
def test_every_kernel_equals_reference_outputs_and_gradients(kernel, window, L, Q) -> None:
    q, k, v = _qkv(L=L, seed=window or 0, Q=Q)
    _assert_equal_on_valid_rows(kernel, q, k, v, _valid(2, L, 5, start=3), window)
    _assert_equal_on_valid_rows(kernel, q, k, v, None, window)


@settings(max_examples=40, deadline=None)
@given(L=st.integers(1, 70), data=st.data())
def test_auto_equals_reference_on_random_shapes(L, data) -> None:
    """Property: for any K, Q <= K, window and padding block, ``auto`` (whichever kernel it picks)
    equals the reference on valid query rows."""
    Q = data.draw(st.integers(1, L))
    window = data.draw(st.one_of(st.none(), st.integers(1, L + 3)))
    start = data.draw(st.integers(0, L - 1))
    pad = data.draw(st.integers(0, L - start))
    q, k, v = _qkv(L=L, Q=Q, seed=L)
    _assert_equal_on_valid_rows("auto", q, k, v, _valid(2, L, pad, start), window)
    _assert_equal_on_valid_rows("sdpa", q, k, v, _valid(2, L, pad, start), window)
    _assert_equal_on_valid_rows("banded", q, k, v, _valid(2, L, pad, start), window)


def test_mask_window_semantics() -> None:
    m = causal_mask(torch.ones(1, 6, dtype=torch.bool), 3)[0, 0]
    assert m[5].tolist() == [False, False, False, True, True, True]  # i-3 < j <= i
    assert m[0].tolist() == [True, False, False, False, False, False]
    padded = causal_mask(torch.tensor([[False, False, True, True]]), None)[0, 0]
    assert padded[0].tolist() == [True, False, False, False]  # a padding query still sees itself
    assert padded[3].tolist() == [False, False, True, True]
    tail = causal_mask(torch.ones(1, 6, dtype=torch.bool), 3, q_len=2)[0, 0]  # end-aligned queries
    assert tail.tolist() == [[False, False, True, True, True, False], [False, False, False, True, True, True]]


def test_kernel_choice_by_cost() -> None:
    assert choose_kernel(49, 49, None) == "reference"  # short stream: the mask is as fast
    assert choose_kernel(1024, 1024, None) == "sdpa"
    assert choose_kernel(1, 49, None) == "sdpa"  # one query sees every key: no mask at all
    assert choose_kernel(34, 34, 32) == "reference"  # the window covers most of the stream
    assert choose_kernel(16, 47, 32) == "reference"
    assert choose_kernel(1024, 1024, 32) == "banded"
    assert choose_kernel(30, 30, 40) == "reference"  # window >= K: full attention


def test_unknown_kernel_is_named() -> None:
    q, k, v = _qkv(L=4)
    with pytest.raises(ValueError, match="unknown attention kernel 'flash'"):
        attention("flash", q, k, v, torch.ones(2, 4, dtype=torch.bool))

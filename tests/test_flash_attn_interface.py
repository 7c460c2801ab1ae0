"""aule.flash_attn against the float64 reference, in flash-attn's layout and defaults."""
from __future__ import annotations

import numpy as np
import pytest

import aule
import aule.flash_attn as fa
from aule.reference import attention_reference


def _bshd(rng, b, s, h, d):
    return rng.standard_normal((b, s, h, d)).astype(np.float32)


def _ref(q, k, v, **kw):
    out, lse = attention_reference(*(np.swapaxes(x, 1, 2) for x in (q, k, v)), return_lse=True, **kw)
    return np.swapaxes(out, 1, 2), lse


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (7, 0))])
def test_func_matches_reference_in_flash_attn_layout(causal, window):
    rng = np.random.default_rng(0)
    q, k, v = _bshd(rng, 2, 13, 4, 32), _bshd(rng, 2, 21, 2, 32), _bshd(rng, 2, 21, 2, 32)
    out, lse, probs = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                         return_attn_probs=True)
    want, want_lse = _ref(q, k, v, causal=causal, scale=0.3, window_size=window)
    assert out.shape == q.shape and out.flags["C_CONTIGUOUS"] and probs is None
    assert np.abs(out - want).max() < 2e-5
    seen = np.isfinite(want_lse)
    assert np.abs(lse[seen] - want_lse[seen]).max() < 2e-5 and np.isneginf(lse[~seen]).all()


def test_default_is_not_causal():
    rng = np.random.default_rng(1)
    q, k, v = (_bshd(rng, 1, 9, 2, 16) for _ in range(3))
    want, _ = _ref(q, k, v, causal=False)
    assert np.abs(fa.flash_attn_func(q, k, v) - want).max() < 2e-5


def test_packed_forms():
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 11, 3, 4, 16)).astype(np.float32)
    want, _ = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert np.abs(fa.flash_attn_qkvpacked_func(qkv, causal=True) - want).max() < 2e-5
    q, kv = _bshd(rng, 2, 5, 4, 16), rng.standard_normal((2, 17, 2, 2, 16)).astype(np.float32)
    want, _ = _ref(q, kv[:, :, 0], kv[:, :, 1], causal=True)
    assert np.abs(fa.flash_attn_kvpacked_func(q, kv, causal=True) - want).max() < 2e-5


def test_torch_tensors_come_back_as_contiguous_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = (torch.from_numpy(_bshd(rng, 1, 8, 2, 16)) for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    want, _ = _ref(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert isinstance(out, torch.Tensor) and out.is_contiguous() and (out.numpy() - want).__abs__().max() < 2e-5


@pytest.mark.parametrize("kw,match", [
    ({"dropout_p": 0.1}, "dropout_p=0.1"), ({"dropout_p": 1.5}, "dropout_p must be"),
    ({"softcap": 30.0}, "softcap=30.0"), ({"alibi_slopes": np.ones(2, np.float32)}, "alibi_slopes"),
    ({"window_size": 4}, "window_size must be a \\(left, right\\) pair"),
])
def test_unserved_arguments_are_refused_by_name(kw, match):
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises((ValueError, aule.UnsupportedError), match=match):
        fa.flash_attn_func(q, q, q, **kw)


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match="q must be 4-D \\[batch, seqlen, heads, head_dim\\]"):
        fa.flash_attn_func(np.zeros((4, 2, 8), np.float32), np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="qkv must be 5-D"):
        fa.flash_attn_qkvpacked_func(np.zeros((1, 4, 2, 2, 8), np.float32))

"""ALiBi (flash-attn's definition): -slope * |i + seq_k - seq_q - j| added to each scaled score."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import masks
from aule.reference import attention_reference
from attn_util import assert_routed_to_numpy


def _naive(q, k, v, scale, slope, left, right):
    """The definition written out on one head, float64."""
    sq, sk = q.shape[0], k.shape[0]
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    s = (q @ k.T) * scale - slope * np.abs(i + sk - sq - j)
    s = np.where(masks.mask(sq, sk, left, right), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def test_reference_follows_the_definition():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, n, 16)) for n in (5, 12, 12))
    slopes = np.array([[0.5, 0.25], [1.0, 0.125]])
    out = attention_reference(q, k, v, causal=True, scale=0.3, alibi_slopes=slopes)
    for b in range(2):
        for h in range(2):
            want = _naive(q[b, h], k[b, h], v[b, h], 0.3, slopes[b, h], -1, 0)
            assert np.abs(out[b, h] - want).max() < 1e-12


@pytest.mark.parametrize("shape,causal,window,per_batch", [((2, 4, 2, 37, 53, 40), True, -1, True),
                                                          ((1, 2, 2, 97, 45, 64), False, (10, 3), False),
                                                          ((1, 8, 1, 1, 700, 32), True, -1, False)])
def test_numpy_backend_matches_reference(shape, causal, window, per_batch):
    b, hq, hk, sq, sk, d = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, hk, sk, d)).astype(np.float32) for _ in range(2))
    slopes = rng.uniform(0.01, 0.5, (b, hq) if per_batch else (hq,)).astype(np.float32)
    out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, alibi_slopes=slopes,
                                    backend="numpy", return_lse=True)
    want, want_lse = attention_reference(q, k, v, causal=causal, window_size=window, alibi_slopes=slopes,
                                         return_lse=True)
    assert np.abs(out - want).max() < 2e-5
    seen = np.isfinite(want_lse)
    assert np.abs(lse[seen] - want_lse[seen]).max() < 2e-4
    assert np.abs(attention_reference(q, k, v, causal=causal, window_size=window) - want).max() > 1e-2


def test_auto_routes_alibi_to_a_backend_that_applies_it_and_others_say_why():
    assert_routed_to_numpy("alibi", (), alibi_slopes=np.array([0.5, 0.1], np.float32))


@pytest.mark.parametrize("bad,err,match", [
    (np.ones(3, np.float32), ValueError, "alibi_slopes must have shape"),
    (np.array([np.nan, 1.0], np.float32), ValueError, "alibi_slopes must be finite"),
    ([0.5, 0.5], TypeError, "alibi_slopes must be a NumPy array"),
])
def test_bad_slopes_are_refused_by_name(bad, err, match):
    q = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(err, match=match):
        aule.flash_attention(q, q, q, alibi_slopes=bad)


def test_slopes_that_need_grad_are_refused():
    torch = pytest.importorskip("torch")
    q = torch.zeros(1, 2, 4, 8)
    with pytest.raises(aule.UnsupportedError, match="alibi_slopes requires grad"):
        aule.flash_attention(q, q, q, alibi_slopes=torch.ones(2, requires_grad=True))

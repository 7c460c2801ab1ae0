"""softcap (Gemma 2): scores become softcap * tanh(score / softcap) after scaling, before masks."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import masks
from aule.reference import attention_reference
from attn_util import assert_routed_to_numpy


def _naive(q, k, v, scale, cap, left, right):
    """The definition written out on one head, float64."""
    s = (q @ k.T) * scale
    s = cap * np.tanh(s / cap)
    vis = masks.mask(q.shape[0], k.shape[0], left, right)
    s = np.where(vis, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v, np.log(np.exp(s).sum(-1))


def test_reference_follows_the_definition():
    rng = np.random.default_rng(0)
    q, k, v = (4 * rng.standard_normal((1, 1, n, 16)) for n in (7, 11, 11))
    out, lse = attention_reference(q, k, v, causal=True, scale=0.5, softcap=3.0, return_lse=True)
    want, want_lse = _naive(q[0, 0], k[0, 0], v[0, 0], 0.5, 3.0, -1, 0)
    assert np.abs(out[0, 0] - want).max() < 1e-12 and np.abs(lse[0, 0] - want_lse).max() < 1e-12


@pytest.mark.parametrize("shape,causal,window", [((2, 4, 2, 37, 53, 40), True, -1),
                                                 ((1, 2, 2, 97, 45, 64), False, (10, 3)),
                                                 ((1, 8, 1, 1, 600, 32), True, -1)])
def test_numpy_backend_matches_reference(shape, causal, window):
    b, hq, hk, sq, sk, d = shape
    rng = np.random.default_rng(1)
    q = (5 * rng.standard_normal((b, hq, sq, d))).astype(np.float32)
    k, v = ((5 * rng.standard_normal((b, hk, sk, d))).astype(np.float32) for _ in range(2))
    out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, softcap=4.0, backend="numpy",
                                    return_lse=True)
    want, want_lse = attention_reference(q, k, v, causal=causal, window_size=window, softcap=4.0, return_lse=True)
    assert np.abs(out - want).max() < 2e-5
    seen = np.isfinite(want_lse)
    assert np.abs(lse[seen] - want_lse[seen]).max() < 2e-5
    plain = attention_reference(q, k, v, causal=causal, window_size=window)
    assert np.abs(plain - want).max() > 1e-2, "the cap must change these scores"


def test_auto_routes_softcap_to_a_backend_that_applies_it_and_others_say_why():
    assert_routed_to_numpy("softcap", (), softcap=1.5)


@pytest.mark.parametrize("bad,err", [(-1.0, ValueError), (float("inf"), ValueError), (1e39, ValueError),
                                     ("2", TypeError), (True, TypeError)])
def test_bad_softcap_is_refused_by_name(bad, err):
    q = np.zeros((1, 1, 4, 8), np.float32)
    with pytest.raises(err, match="softcap must be"):
        aule.flash_attention(q, q, q, softcap=bad)

"""Float64 naive attention: the oracle every backend is checked against. O(seq_q*seq_k) memory."""
from __future__ import annotations

import math

import numpy as np

from . import masks


def attention_reference(q, k, v, causal=True, scale=None, window_size=-1, return_lse=False):
    """Reference attention on NumPy arrays (any float dtype), computed in float64.

    Same meaning as :func:`aule.flash_attention`: layout ``[batch, heads, seq, head_dim]``,
    GQA when ``heads_q`` is a multiple of ``heads_kv``, bottom-right causal, windows per
    :mod:`aule.masks`. Returns float64 output (and float64 LSE ``[batch, heads_q, seq_q]``).
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = hq // hk
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    left, right = masks.canonical_window(causal, window_size)
    vis = masks.mask(sq, sk, left, right)
    kx = np.repeat(k, group, axis=1)  # fine for an oracle; backends never expand K/V
    vx = np.repeat(v, group, axis=1)
    s = np.einsum("bhqd,bhkd->bhqk", q, kx) * scale
    s = np.where(vis, s, -np.inf)
    m = s.max(axis=-1, keepdims=True) if sk else np.full(s.shape[:-1] + (1,), -np.inf)
    m_safe = np.where(np.isfinite(m), m, 0.0)
    p = np.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.einsum("bhqk,bhkd->bhqd", p, vx) / np.where(l > 0, l, 1.0)
        lse = np.where(l[..., 0] > 0, np.log(np.where(l[..., 0] > 0, l[..., 0], 1.0)) + m_safe[..., 0], -np.inf)
    out = np.where(l > 0, out, 0.0)
    return (out, lse) if return_lse else out

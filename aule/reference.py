"""Float64 naive attention: the oracle every backend is checked against. O(seq_q*seq_k) memory."""
from __future__ import annotations

import math

import numpy as np

from . import masks


def attention_reference(q, k, v, causal=True, scale=None, window_size=-1, return_lse=False, softcap=0.0,
                        alibi_slopes=None, sinks=None, attn_mask=None):
    """Reference attention on NumPy arrays (any float dtype), computed in float64.

    Same meaning as :func:`aule.flash_attention`: layout ``[batch, heads, seq, head_dim]``,
    GQA when ``heads_q`` is a multiple of ``heads_kv``, bottom-right causal, windows per
    :mod:`aule.masks`, rows with NaN or infinite scores by the rule stated there. Returns float64
    output (and float64 LSE ``[batch, heads_q, seq_q]``).
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
    with np.errstate(invalid="ignore", over="ignore"):
        s = np.einsum("bhqd,bhkd->bhqk", q, kx) * scale
        if softcap:
            masks.apply_softcap(s, softcap)
        if alibi_slopes is not None:
            slopes = np.broadcast_to(np.asarray(alibi_slopes, np.float64), (b, hq))
            s = s + masks.alibi_bias(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk, slopes)
        if attn_mask is not None:
            am = np.asarray(attn_mask)
            masks.apply_attn_mask(s, am if am.dtype == np.bool_ else am.astype(np.float64))
        s = np.where(vis, s, -np.inf)
        # np.max keeps a NaN score, so the row's maximum says which rule of aule.masks applies.
        m = s.max(axis=-1) if sk else np.full(s.shape[:-1], -np.inf)
        p = np.exp(s - np.where(np.isfinite(m), m, 0.0)[..., None])
        sink = None if sinks is None else np.asarray(sinks, np.float64)[None, :, None]
        out, lse = masks.finish_rows(m, p.sum(axis=-1), np.einsum("bhqk,bhkd->bhqd", p, vx), sink)
    return (out, lse) if return_lse else out

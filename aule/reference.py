"""Float64 naive attention: the oracle every backend is checked against. O(seq_q*seq_k) memory."""
from __future__ import annotations

import math

import numpy as np

from . import masks


def _descaled(x, descale, heads_kv: int, group: int):
    """``x [B, H, S, D]`` times its descale factors (a scalar or ``[B, heads_kv]``, flash-attn 3's
    per-KV-head form; query head ``h`` takes KV head ``h // group``'s), or ``x`` without any."""
    if descale is None:
        return x
    d = np.broadcast_to(np.asarray(descale, dtype=np.float64), (x.shape[0], heads_kv))
    return x * np.repeat(d, group, axis=1)[:, :, None, None]


def attention_reference(q, k, v, causal=True, scale=None, window_size=-1, return_lse=False, softcap=0.0,
                        alibi_slopes=None, sinks=None, attn_mask=None, q_descale=None, k_descale=None,
                        v_descale=None):
    """Reference attention on NumPy arrays (any float dtype), computed in float64.

    Same meaning as :func:`aule.flash_attention`: layout ``[batch, heads, seq, head_dim]``,
    GQA when ``heads_q`` is a multiple of ``heads_kv``, bottom-right causal, windows per
    :mod:`aule.masks`, rows with NaN or infinite scores by the rule stated there. Returns float64
    output (and float64 LSE ``[batch, heads_q, seq_q]``). ``q_descale``, ``k_descale``,
    ``v_descale`` (FP8's factors: scalars or ``[batch, heads_kv]``) multiply the inputs first, so
    the answer is that of the dequantised tensors.
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    group = hq // hk
    q, k, v = (_descaled(x, d, hk, g) for x, d, g in ((q, q_descale, group), (k, k_descale, 1), (v, v_descale, 1)))
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


def paged_reference(q, ks, vs, query_start_loc=None, scale=None, window_size=-1, **features):
    """Reference paged attention on each sequence's contiguous keys and values, in float64.

    ``ks[b], vs[b]``: sequence ``b``'s ``[heads_kv, context_len, head_dim]``. ``q`` is
    ``[batch, heads_q, q_len, head_dim]``, or packed ``[num_tokens, heads_q, head_dim]`` with
    ``query_start_loc [batch + 1]``; either way each sequence's rows are its last positions,
    causal among themselves (:func:`aule.flash_attention_paged`). ``features`` as in
    :func:`attention_reference` (``softcap=``, ``sinks=``, ``alibi_slopes=`` ``[heads_q]`` or
    ``[batch, heads_q]``, sequence ``b`` taking its row). Each sequence is attended alone with
    bottom-right positions, which puts its rows at their positions in it: ALiBi's distances are
    the paged call's. Returns float64 in q's layout.
    """
    q = np.asarray(q, dtype=np.float64)
    out = np.zeros_like(q)
    slopes = features.pop("alibi_slopes", None)
    if slopes is not None:
        slopes = np.asarray(slopes, np.float64)
        slopes = np.broadcast_to(slopes, (len(ks), slopes.shape[-1]))

    def seq_features(b):
        return features if slopes is None else dict(features, alibi_slopes=slopes[b])

    if query_start_loc is None:
        for b in range(q.shape[0]):
            out[b] = attention_reference(q[b:b + 1], ks[b][None], vs[b][None], causal=True, scale=scale,
                                         window_size=window_size, **seq_features(b))[0]
        return out
    loc = np.asarray(query_start_loc, dtype=np.int64)
    for b in range(len(loc) - 1):
        lo, hi = int(loc[b]), int(loc[b + 1])
        if hi > lo:
            rows = q[lo:hi].transpose(1, 0, 2)[None]  # [1, heads_q, n_b, head_dim]
            o = attention_reference(rows, ks[b][None], vs[b][None], causal=True, scale=scale,
                                    window_size=window_size, **seq_features(b))
            out[lo:hi] = o[0].transpose(1, 0, 2)
    return out

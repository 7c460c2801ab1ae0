"""flash-attn's interface over aule: ``import aule.flash_attn as flash_attn``.

Code written for the ``flash_attn`` package calls these with its own layout and defaults:
``[batch, seqlen, heads, head_dim]`` tensors, ``causal=False``, ``softmax_scale``,
``window_size=(-1, -1)``, ``softcap``, ``alibi_slopes`` and ``return_attn_probs`` (which returns the log-sum-exp, as
flash-attn does, not probabilities). Causal masks are bottom-right aligned in both libraries. aule's kernels
are deterministic (no atomics), so ``deterministic`` holds whatever its value.

:func:`flash_attn_varlen_func` takes packed ``[total, heads, head_dim]`` sequences and ``cu_seqlens``.
Not served yet, and refused with an error naming the argument rather than ignored: ``dropout_p > 0``,
``block_table`` in :func:`flash_attn_varlen_func` and, in :func:`flash_attn_with_kvcache`, rotary
embedding, ``cache_batch_idx``, ``cache_leftpad``, and ``softcap`` or ``alibi_slopes`` over a paged cache.

Under ``torch.compile`` :func:`flash_attn_func` and the packed forms trace into one aule custom op
(:func:`aule.flash_attention`), so ``fullgraph=True`` holds. :func:`flash_attn_varlen_func` and
:func:`flash_attn_with_kvcache` read ``cu_seqlens`` / ``cache_seqlens`` and block tables on the host
to cut the batch into sequences, which a traced graph cannot: Dynamo breaks the graph at them and
runs them eagerly, and ``fullgraph=True`` fails at once with that reason.
"""
from __future__ import annotations

import numbers

import numpy as np

try:  # flash-attn's callers hold torch tensors; NumPy callers need no torch
    import torch
except ImportError:
    torch = None

from .api import copy_kv_to_paged, flash_attention, flash_attention_paged, flash_attention_varlen
from .arrays import to_numpy
from .errors import UnsupportedError

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func", "flash_attn_varlen_func",
           "flash_attn_with_kvcache"]


def _eager_under_compile(reason: str):
    """Run the decorated function outside any graph: ``torch.compile`` breaks the graph at it, and
    ``fullgraph=True`` raises naming ``reason``. Built when the function is defined, since Dynamo
    cannot trace the building."""
    def wrap(fn):
        return fn if torch is None else torch.compiler.disable(fn, reason=reason)
    return wrap


def _refuse_dropout(dropout_p) -> None:
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        raise UnsupportedError(f"dropout_p={dropout_p}: aule's kernels have no attention dropout; pass "
                               f"dropout_p=0.0 (flash-attn's value for evaluation)")


def _heads_first(x, name: str):
    """``[B, S, H, D]`` as ``[B, H, S, D]`` (a view)."""
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{name} must be 4-D [batch, seqlen, heads, head_dim] (flash-attn's layout), "
                         f"got shape {tuple(getattr(x, 'shape', ()))}")
    return np.swapaxes(x, 1, 2) if isinstance(x, np.ndarray) else x.transpose(1, 2)


def _seq_first(x):
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(np.swapaxes(x, 1, 2))
    return x.transpose(1, 2).contiguous()


def _window(window_size):
    if isinstance(window_size, (tuple, list)) and len(window_size) == 2:
        return tuple(int(w) for w in window_size)
    raise ValueError(f"window_size must be a (left, right) pair with -1 for an unbounded side (flash-attn's "
                     f"form), got {window_size!r}")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, *,
                    q_descale=None, k_descale=None, v_descale=None):
    """flash-attn's ``flash_attn_func``: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (Hq a
    multiple of Hkv). Returns ``out [B, Sq, Hq, D]``, or ``(out, softmax_lse [B, Hq, Sq], None)``
    with ``return_attn_probs``. float8_e4m3fn inputs take flash-attn 3's ``q_descale``,
    ``k_descale``, ``v_descale`` (float32 ``[B, Hkv]``) and return bfloat16, as there."""
    _refuse_dropout(dropout_p)
    fp8 = {n: x for n, x in dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale).items()
           if x is not None}
    res = flash_attention(_heads_first(q, "q"), _heads_first(k, "k"), _heads_first(v, "v"), causal=causal,
                          scale=softmax_scale, window_size=_window(window_size), return_lse=return_attn_probs,
                          softcap=softcap, alibi_slopes=alibi_slopes, **fp8)
    if return_attn_probs:
        out, lse = res
        return _seq_first(out), lse, None
    return _seq_first(res)


@_eager_under_compile("aule's flash_attn_varlen_func reads cu_seqlens on the host to cut the batch into "
                      "sequences, which a traced graph cannot: it runs eagerly, outside the graph")
def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: ``q [total_q, Hq, D]``, ``k, v [total_k, Hkv, D]`` with
    sequences packed along dimension 0 at int32 offsets ``cu_seqlens_q/k [batch + 1]``, each attended
    alone (causal bottom-right within it). Returns ``out [total_q, Hq, D]``, or ``(out, softmax_lse
    [Hq, total_q], None)`` with ``return_attn_probs``."""
    _refuse_dropout(dropout_p)
    if block_table is not None:
        raise UnsupportedError("block_table: aule's flash_attn_varlen_func does not read a paged cache yet; use "
                               "flash_attn_with_kvcache or aule.flash_attention_paged")
    res = flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal,
                                 window_size=_window(window_size), scale=softmax_scale, softcap=softcap,
                                 alibi_slopes=alibi_slopes, return_lse=return_attn_probs)
    if return_attn_probs:
        out, lse = res
        return out, lse, None
    return res


def _unpack(x, n: int, axis_name: str, name: str):
    if getattr(x, "ndim", None) != 5 or x.shape[2] != n:
        raise ValueError(f"{name} must be 5-D [batch, seqlen, {n}, heads, head_dim] ({axis_name}), "
                         f"got shape {tuple(getattr(x, 'shape', ()))}")
    return tuple(x[:, :, i] for i in range(n))


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: ``qkv [B, S, 3, H, D]``."""
    q, k, v = _unpack(qkv, 3, "q, k and v stacked", "qkv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: ``q [B, Sq, Hq, D]``, ``kv [B, Sk, 2, Hkv, D]``."""
    k, v = _unpack(kv, 2, "k and v stacked", "kv")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def _batch_row(slopes, b: int):
    """Sequence ``b``'s slopes from ``[heads]`` or ``[batch, heads]`` ones, as ``[1, heads]``."""
    return slopes[None] if slopes.ndim == 1 else slopes[b:b + 1]


def _lengths(cache_seqlens, batch: int) -> np.ndarray:
    if cache_seqlens is None:
        raise ValueError("cache_seqlens is required: aule needs each sequence's length in the cache")
    if isinstance(cache_seqlens, numbers.Integral) and not isinstance(cache_seqlens, bool):
        return np.full(batch, int(cache_seqlens), np.int64)
    lens = to_numpy(cache_seqlens).astype(np.int64).reshape(-1)
    if lens.shape != (batch,) or (lens < 0).any():
        raise ValueError(f"cache_seqlens must be an int or {batch} non-negative lengths, got {lens.tolist()}")
    return lens


def _like(values, ref):
    """``values`` (int32 NumPy) as the type of ``ref`` (a torch tensor's device), for table arguments."""
    if isinstance(ref, np.ndarray):
        return values
    return torch.from_numpy(values).to(ref.device)


@_eager_under_compile("aule's flash_attn_with_kvcache reads cache_seqlens (and a block_table) on the host "
                      "to find each sequence's keys, which a traced graph cannot: it runs eagerly, outside the graph")
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn's ``flash_attn_with_kvcache``: ``q [B, Sq, Hq, D]`` over a KV cache of
    ``cache_seqlens`` tokens per sequence, after writing the new ``k, v [B, Snew, Hkv, D]`` (if given)
    into it in place at those positions. The cache is contiguous ``[B, S_cache, Hkv, D]`` or paged
    ``[num_blocks, block_size, Hkv, D]`` with ``block_table [B, max_blocks]`` (vLLM's layout, served by
    aule's paged attention). The query rows are the last ``Sq`` positions of each sequence.
    ``softcap`` and ``alibi_slopes`` (``[Hq]`` or ``[B, Hq]``) apply on either cache, ALiBi at each
    row's position in its sequence. ``num_splits`` is aule's choice and is ignored."""

    for name, value in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin), ("cache_batch_idx", cache_batch_idx),
                        ("cache_leftpad", cache_leftpad)):
        if value is not None:
            raise UnsupportedError(f"{name}: aule's flash_attn_with_kvcache does not take it yet")
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new tokens' keys and values) or not at all")
    qh = _heads_first(q, "q")
    batch, s_q = qh.shape[0], qh.shape[2]
    lens = _lengths(cache_seqlens, batch)
    left, right = _window(window_size)
    s_new = 0 if k is None else _heads_first(k, "k").shape[2]
    total = lens + s_new
    if block_table is not None:
        if not causal and s_q > 1:
            raise UnsupportedError("causal=False with several query rows over a paged cache: aule's paged "
                                   "attention keeps the query rows causal among themselves (decode, chunked prefill)")
        if right not in (-1, 0) or return_softmax_lse:
            raise UnsupportedError("a paged cache serves window_size=(left, -1 or 0) and no return_softmax_lse")
        bs = k_cache.shape[1]
        table = to_numpy(block_table).astype(np.int64)
        if table.ndim != 2 or table.shape[0] != batch or int(total.max(initial=0)) > table.shape[1] * bs:
            raise ValueError(f"block_table must be [{batch}, max_blocks] with room for cache_seqlens + new tokens "
                             f"({total.tolist()} tokens at block size {bs}), got shape {table.shape}")
        if k is not None:
            pos = lens[:, None] + np.arange(s_new)[None]
            blocks = np.take_along_axis(table, pos // bs, axis=1)
            slots = (blocks * bs + pos % bs).astype(np.int64).reshape(-1)
            copy_kv_to_paged(k.reshape(batch * s_new, *k.shape[2:]), v.reshape(batch * s_new, *v.shape[2:]),
                             k_cache, v_cache, _like(slots, k))
        out = flash_attention_paged(qh, k_cache, v_cache, block_table, _like(total.astype(np.int32), q),
                                    scale=softmax_scale, window_size=(left, -1), softcap=softcap,
                                    alibi_slopes=alibi_slopes)
        return _seq_first(out)
    if k_cache.shape[0] != batch or int(total.max(initial=0)) > k_cache.shape[1]:
        raise ValueError(f"k_cache must be [{batch}, seqlen_cache, heads_kv, head_dim] with room for cache_seqlens + "
                         f"new tokens ({total.tolist()}), got shape {tuple(k_cache.shape)}")
    if k is not None:
        for b in range(batch):
            k_cache[b, lens[b]:total[b]] = k[b]
            v_cache[b, lens[b]:total[b]] = v[b]
    outs, lses = [], []
    for b in range(batch):  # each sequence's own length: one call per sequence
        n = int(total[b])
        res = flash_attention(qh[b:b + 1], _heads_first(k_cache[b:b + 1, :n], "k_cache"),
                              _heads_first(v_cache[b:b + 1, :n], "v_cache"), causal=causal, scale=softmax_scale,
                              window_size=(left, right), return_lse=True, softcap=softcap,
                              alibi_slopes=None if alibi_slopes is None else _batch_row(alibi_slopes, b))
        outs.append(res[0])
        lses.append(res[1])
    cat = np.concatenate if isinstance(q, np.ndarray) else torch.cat
    out = _seq_first(cat(outs, 0))
    return (out, cat(lses, 0)) if return_softmax_lse else out

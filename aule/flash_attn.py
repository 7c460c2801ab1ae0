"""flash-attn's interface over aule: ``import aule.flash_attn as flash_attn``.

Code written for the ``flash_attn`` package calls these with its own layout and defaults:
``[batch, seqlen, heads, head_dim]`` tensors, ``causal=False``, ``softmax_scale``,
``window_size=(-1, -1)`` and ``return_attn_probs`` (which returns the log-sum-exp, as flash-attn
does, not probabilities). Causal masks are bottom-right aligned in both libraries. aule's kernels
are deterministic (no atomics), so ``deterministic`` holds whatever its value.

Not served yet, and refused with an error naming the argument rather than ignored: ``dropout_p > 0``,
``softcap`` and ``alibi_slopes``.
"""
from __future__ import annotations

import numbers

import numpy as np

from .api import flash_attention
from .errors import UnsupportedError

__all__ = ["flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func"]


def _refuse_unserved(dropout_p, softcap, alibi_slopes) -> None:
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a real number in [0, 1), got {dropout_p!r}")
    if dropout_p > 0:
        raise UnsupportedError(f"dropout_p={dropout_p}: aule's kernels have no attention dropout; pass "
                               f"dropout_p=0.0 (flash-attn's value for evaluation)")
    if softcap:
        raise UnsupportedError(f"softcap={softcap}: aule does not apply a score softcap yet")
    if alibi_slopes is not None:
        raise UnsupportedError("alibi_slopes: aule does not add ALiBi biases yet")


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
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: ``q [B, Sq, Hq, D]``, ``k, v [B, Sk, Hkv, D]`` (Hq a
    multiple of Hkv). Returns ``out [B, Sq, Hq, D]``, or ``(out, softmax_lse [B, Hq, Sq], None)``
    with ``return_attn_probs``."""
    _refuse_unserved(dropout_p, softcap, alibi_slopes)
    res = flash_attention(_heads_first(q, "q"), _heads_first(k, "k"), _heads_first(v, "v"), causal=causal,
                          scale=softmax_scale, window_size=_window(window_size), return_lse=return_attn_probs)
    if return_attn_probs:
        out, lse = res
        return _seq_first(out), lse, None
    return _seq_first(res)


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

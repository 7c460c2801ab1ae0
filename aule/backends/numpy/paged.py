"""Paged attention and ``copy_kv_to_paged`` on the host: NumPy arrays and torch tensors.

Attention gathers, per sequence, only the blocks the window can see into one contiguous
``[heads_kv, n, head_dim]`` run and hands it to :func:`attention_numpy`, the dense backend's
online-softmax loop. The gathered run ends at the sequence's last key, so bottom-right alignment
(``seq_q = q_len``, ``seq_k = n``) puts every query row at its true position relative to the
gathered keys, and the window's left/right distances carry over unchanged. Extra memory: the
visible part of one sequence's K and V. A packed call (``query_start_loc``) runs each sequence's
rows through the same loop as a batch of one.
"""
from __future__ import annotations

import numpy as np

from ... import masks
from .dense import attention_numpy


def visible_key_span(context_len: int, q_len: int, left: int, right: int) -> tuple[int, int]:
    """Half-open span of key positions any of a sequence's ``q_len`` rows can see."""
    return masks.key_range(0, q_len, q_len, context_len, left, right)


def paged_attention_numpy(q, k_cache, v_cache, block_tables, context_lens, scale, left, right, sinks=None,
                          query_start_loc=None):
    """``q [B, Hq, q_len, D]`` (or packed ``[num_tokens, Hq, D]`` with ``query_start_loc [B + 1]``,
    host-checked) over NumPy caches ``[num_blocks, block_size, Hkv, D]``, with ``sinks [Hq]`` or
    ``None``; returns the output in q's layout and the accumulation dtype (float32, or float64 for
    float64 inputs)."""
    acc_t = np.float64 if q.dtype == np.float64 else np.float32
    out = np.zeros(q.shape, dtype=acc_t)
    for i in range(len(context_lens)):
        if query_start_loc is None:
            rows = q[i:i + 1]
        else:
            lo, hi = int(query_start_loc[i]), int(query_start_loc[i + 1])
            if lo == hi:
                continue
            rows = q[lo:hi].transpose(1, 0, 2)[None]  # a batch of one, [1, Hq, n_b, D]: the dense layout
        o = _attend_sequence(rows, k_cache, v_cache, block_tables[i], int(context_lens[i]), scale, left, right,
                             sinks)
        if o is None:
            continue
        if query_start_loc is None:
            out[i] = o
        else:
            out[lo:hi] = o.transpose(1, 0, 2)
    return out


def _attend_sequence(rows, k_cache, v_cache, table, length: int, scale, left, right, sinks):
    """One sequence's ``rows [1, Hq, n, D]`` (its last n positions) over its blocks: ``[Hq, n, D]``,
    or None when no row sees a key (the output stays zeros, with or without sinks)."""
    bs, hk, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    k_lo, k_hi = visible_key_span(length, rows.shape[2], left, right)
    if k_lo >= k_hi:
        return None
    first = k_lo // bs  # blocks before the window are never touched
    ids = np.asarray(table[first:-(-length // bs)], dtype=np.int64)
    n = length - first * bs
    kk = k_cache[ids].reshape(-1, hk, d)[:n].transpose(1, 0, 2)[None]
    vv = v_cache[ids].reshape(-1, hk, d)[:n].transpose(1, 0, 2)[None]
    o, _ = attention_numpy(np.ascontiguousarray(rows), np.ascontiguousarray(kk), np.ascontiguousarray(vv),
                           scale, left, right, sinks=sinks)
    return o[0]


def write_kv_rows(call) -> None:
    """A validated KV write (``call``: :class:`aule.paged_call.KVWriteCall`) into host caches:
    NumPy arrays, or torch tensors on any device (written with torch indexing)."""
    slots = call.slot_mapping
    if call.kind == "torch":
        import torch

        slots = torch.as_tensor(slots, device=call.k_cache.device).to(torch.int64)
        keep = slots >= 0
        for src, cache in ((call.key, call.k_cache), (call.value, call.v_cache)):
            flat = cache.view(-1, call.heads_kv, call.head_dim)
            flat[slots[keep]] = src[keep]
        return
    slots = np.asarray(slots).astype(np.int64, copy=False)
    keep = slots >= 0
    for src, cache in ((call.key, call.k_cache), (call.value, call.v_cache)):
        flat = cache.reshape(-1, call.heads_kv, call.head_dim)
        if not np.shares_memory(flat, cache):
            raise ValueError("the cache must be C-contiguous to be written in place")
        flat[slots[keep]] = np.asarray(src)[keep]

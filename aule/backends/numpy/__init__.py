"""The NumPy backend: runs everywhere, on NumPy arrays and torch tensors (through host memory).

Dense attention is FlashAttention-2's blocked online softmax (:mod:`.dense`); paged attention
gathers each sequence's visible blocks and runs the same loop (:mod:`.paged`). It also stores
:class:`aule.kv_cache.PagedKVCache` blocks as NumPy arrays.
"""
from __future__ import annotations

import numpy as np

from ...arrays import like, lse_like, to_numpy
from ..base import Backend
from .dense import BLOCK_K, BLOCK_Q, attention_numpy
from .paged import paged_attention_numpy, write_kv_rows


class NumpyBackend(Backend):
    name = "numpy"
    ops = ("attention", "paged_attention", "write_kv", "kv_store")
    features = frozenset({"softcap", "alibi", "sinks", "mask", "general_mask"})

    # -- dense --------------------------------------------------------------------------------
    def why_not_attention(self, call, forced):
        if call.kind == "gpu":
            return "the inputs are Vulkan GpuTensors; the NumPy backend reads host memory (use .numpy())"
        return None

    def attention(self, call):
        q, k, v = (to_numpy(x) for x in (call.q, call.k, call.v))
        out, lse = attention_numpy(q, k, v, call.scale, call.left, call.right, call.return_lse,
                                   softcap=call.softcap, alibi=call.alibi, sinks=call.sinks,
                                   mask=call.mask)
        return like(out, call.q), (lse_like(lse, call.q) if call.return_lse else None)

    # -- paged --------------------------------------------------------------------------------
    def why_not_paged_attention(self, call, forced):
        return self._host_cache_reason(call)

    def why_not_write_kv(self, call, forced):
        return self._host_cache_reason(call)

    @staticmethod
    def _host_cache_reason(call):
        if call.kind == "gpu":
            return "the cache is a Vulkan GpuTensor; the NumPy backend reads host memory"
        return None

    def paged_attention(self, call):
        q = to_numpy(call.q)
        kc, vc = to_numpy(call.k_cache), to_numpy(call.v_cache)
        bt, cl = to_numpy(call.block_tables), to_numpy(call.context_lens)
        qsl = None if call.query_start_loc is None else to_numpy(call.query_start_loc)
        out = paged_attention_numpy(q, kc, vc, bt, cl, call.scale, call.left, call.right, sinks=call.sinks,
                                    query_start_loc=qsl)
        return like(out, call.q)

    def write_kv(self, call):
        write_kv_rows(call)

    # -- storage for PagedKVCache -------------------------------------------------------------
    def why_not_kv_store(self, spec, forced):
        if spec.dtype == "bfloat16":
            return "it stores NumPy data, which has no bfloat16"
        return None

    def allocate_cache(self, spec):
        if spec.device is not None and spec.device != "cpu":
            raise ValueError(f"the NumPy backend keeps the cache in host memory, not on {spec.device!r}")
        return np.zeros(spec.shape, dtype=spec.dtype), np.zeros(spec.shape, dtype=spec.dtype)

    def copy_slots(self, k_cache, v_cache, src, dst):
        for cache in (k_cache, v_cache):
            flat = cache.reshape(-1, *cache.shape[2:])
            flat[dst] = flat[src]

    def to_host(self, cache):
        return to_numpy(cache)

    def details(self):
        return {"block_q": BLOCK_Q, "block_k": BLOCK_K}


__all__ = ["NumpyBackend", "attention_numpy", "paged_attention_numpy"]

"""Paged attention and ``copy_kv_to_paged`` on Vulkan (glsl/paged.comp, glsl/copy_kv_to_paged.comp).

The cache lives in :class:`GpuTensor` s, so a decode step moves only ``q``, the small tables and
the output between host and device. One dispatch computes attention with the context split
across workgroups (split-K); when it was split, a second submission of the same module in merge
mode combines the partial results through their log-sum-exp (the runtime records no barrier
between dispatches of one submission, and the merge must see every split's writes).
"""
from __future__ import annotations

import logging

import numpy as np

from ...arrays import like, to_numpy
from ...errors import UnsupportedError
from ..base import Backend
from . import kernels, runtime
from .tensor import GpuTensor

log = logging.getLogger("aule")

# Mirror of PagedParams in glsl/paged.comp.
PAGED_PUSH = kernels.push_block([
    ("heads_kv", "<u4"), ("group", "<u4"), ("q_len", "<u4"), ("block_size", "<u4"), ("max_blocks", "<u4"),
    ("left", "<i4"), ("scale_log2", "<f4"), ("num_splits", "<u4"), ("mode", "<u4"),
])
PAGED_BINDINGS = 8  # q, k_cache, v_cache, block_tables, context_lens, out, partial out, partial lse
# Mirror of CopyParams in glsl/copy_kv_to_paged.comp.
COPY_PUSH = kernels.push_block([("row_words", "<u4"), ("num_tokens", "<u4"), ("token_base", "<u4")])
COPY_BINDINGS = 6  # src k, src v, dst k, dst v, src slots, dst slots
COPY_WG = 64
WG = 128
MAX_SPLITS = 64
# Workgroups a decode dispatch should have in flight before splitting the context stops paying.
# H100, batch 8 x 8 KV heads at 8k: 8 splits (512 groups) read 1.02 TB/s, 16 splits 0.36-0.8;
# batch 1 at 32k: 64 splits (512 groups) 0.93 TB/s, 8 splits 0.35.
TARGET_GROUPS = {"gpu": 512, "cpu": 64}


def _module(dtype: str) -> str:
    return "paged_fp16" if dtype == "float16" else "paged"


def shared_bytes(bm: int, bn: int, d: int, elem_bytes: int) -> int:
    """Mirror of glsl/paged.comp's shared arrays: Q in fp32, K/V tiles in the storage type, scores,
    probabilities and row statistics in fp32."""
    d4 = d // 4
    return 16 * bm * d4 + 4 * elem_bytes * (bn * (d4 + 1) + bn * d4) + 4 * (2 * bm * (bn + 1) + 3 * bm)


def pick_tiles(rows: int, d: int, info, elem_bytes: int) -> tuple[int, int] | None:
    """(BM stacked rows, BN keys per tile) that fit the device's shared memory, or None."""
    bm = 4
    while bm < min(rows, 16):
        bm *= 2
    for bn in (32, 16, 8):
        if shared_bytes(bm, bn, d, elem_bytes) <= info.max_shared_memory:
            return bm, bn
    return None


def _binding(buf, nbytes: int):
    return (buf, 0, max(4, min(int(nbytes), buf.nbytes)))


def _int32(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x), dtype=np.int32)


class VulkanPagedBackend(Backend):
    name = "vulkan"

    def __init__(self):
        self._dummy = None

    def _probe(self):
        from .. import get

        return get("vulkan").unavailable_reason

    @property
    def is_gpu(self) -> bool:
        return self.unavailable_reason is None and not runtime.context().info.is_cpu

    def _dummy_buffer(self, ctx):
        if self._dummy is None:
            self._dummy = ctx.pool.acquire(16)
        return self._dummy.buffer

    # -- which calls ------------------------------------------------------------------------------
    def _cache_reason(self, call, forced, ctx):
        info = ctx.info
        if call.kind == "torch" and not call.device.startswith("cpu"):
            return f"vulkan takes NumPy arrays, CPU tensors and GpuTensors; the cache is on {call.device}"
        if call.kind != "gpu" and not forced:
            return ("the cache is in host memory and would be uploaded on every call; keep it on the GPU "
                    "as GpuTensors (PagedKVCache(..., backend='vulkan')) or force backend='vulkan'")
        if call.kind == "gpu" and (call.k_cache.ctx is not ctx or call.v_cache.ctx is not ctx):
            return "the cache GpuTensors belong to another Vulkan context"
        if call.dtype not in ("float32", "float16"):
            return f"vulkan stores float32 or float16, not {call.dtype}"
        if call.dtype == "float16" and not info.fp16:
            return f"{info.name} lacks shaderFloat16 / 16-bit storage for a float16 cache"
        if call.head_dim % 4 or call.head_dim > 256:
            return f"head_dim must be a multiple of 4 up to 256 for the paged shader, got {call.head_dim}"
        cache_bytes = call.num_blocks * call.block_size * call.heads_kv * call.head_dim * (
            2 if call.dtype == "float16" else 4)
        if cache_bytes > info.max_storage_buffer_range:
            return (f"a cache of {cache_bytes} bytes exceeds the device's storage-buffer range "
                    f"({info.max_storage_buffer_range} bytes): use fewer blocks per cache")
        return None

    def unsupported(self, call, forced):
        ctx = runtime.context()
        why = self._cache_reason(call, forced, ctx)
        if why or not hasattr(call, "q_len"):
            return why
        info = ctx.info
        tiles = pick_tiles(call.group * call.q_len, call.head_dim, info, np.dtype(call.dtype).itemsize)
        if tiles is None:
            return f"head_dim {call.head_dim} needs more shared memory than {info.name}'s {info.max_shared_memory} bytes"
        gx, gy = info.max_workgroup_count[0], info.max_workgroup_count[1]
        if call.batch * call.heads_q > gx or -(-call.group * call.q_len // tiles[0]) > gy or call.q_len > gy:
            return f"batch {call.batch} x heads {call.heads_q} x q_len {call.q_len} exceeds the device's workgroup grid"
        if call.q_kind == "gpu" and call.q.ctx is not ctx:
            return "q belongs to another Vulkan context"
        return None

    # -- attention --------------------------------------------------------------------------------
    def choose_splits(self, call, bm: int, bn: int, info) -> int:
        programs = call.batch * call.heads_kv * -(-call.group * call.q_len // bm)
        tiles = -(-max(call.max_context, 1) // bn)
        want = TARGET_GROUPS["cpu" if info.is_cpu else "gpu"]
        return max(1, min(MAX_SPLITS, -(-want // programs), tiles // 2))

    def forward(self, call):
        out, _ = run_paged(self, call)
        return out

    # -- cache writes -----------------------------------------------------------------------------
    def copy_kv(self, call):
        ctx = runtime.context()
        n = call.num_tokens
        src = np.arange(n, dtype=np.int32)
        held = []
        try:
            kv = []
            for x in (call.key, call.value):
                if isinstance(x, GpuTensor):
                    kv.append(x.buffer)
                else:
                    lease = ctx.upload(np.ascontiguousarray(to_numpy(x), dtype=np.dtype(call.dtype)))
                    held.append(lease)
                    kv.append(lease.buffer)
            slots = ctx.upload(_int32(call.slot_mapping))
            held.append(slots)
            self._copy_rows(ctx, kv[0], kv[1], call.k_cache, call.v_cache, src, slots.buffer, n, held)
        finally:
            for lease in held:
                lease.release()

    def _copy_rows(self, ctx, src_k, src_v, k_cache, v_cache, src_slots, dst_slots_buf, n, held):
        row_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.dtype.itemsize
        if row_bytes % 4:
            raise UnsupportedError(f"a cache row of {row_bytes} bytes is not whole 32-bit words")
        src_lease = ctx.upload(src_slots)
        held.append(src_lease)
        pipe = ctx.pipeline("copy_kv_to_paged", lambda: kernels.checked_code("copy_kv_to_paged", COPY_PUSH.itemsize),
                            COPY_BINDINGS, COPY_PUSH.itemsize, ((0, COPY_WG),))
        span = n * row_bytes
        bindings = (_binding(src_k, max(span, int(src_slots.max(initial=0) + 1) * row_bytes)),
                    _binding(src_v, max(span, int(src_slots.max(initial=0) + 1) * row_bytes)),
                    _binding(k_cache.buffer, k_cache.nbytes), _binding(v_cache.buffer, v_cache.nbytes),
                    _binding(src_lease.buffer, 4 * n), _binding(dst_slots_buf, 4 * n))
        limit = ctx.info.max_workgroup_count[0]
        dispatches = []
        for t0 in range(0, n, limit):
            pc = np.zeros((), dtype=COPY_PUSH)
            pc["row_words"], pc["num_tokens"], pc["token_base"] = row_bytes // 4, n, t0
            dispatches.append(runtime.Dispatch(pipe, bindings, pc.tobytes(), (min(limit, n - t0), 1, 1)))
        ctx.run(dispatches)

    # -- storage for PagedKVCache -----------------------------------------------------------------
    def allocate_cache(self, shape, dtype, device=None):
        if device not in (None, "vulkan"):
            raise ValueError(f"the Vulkan backend keeps the cache in GpuTensors, not on {device!r}")
        zeros = np.zeros(shape, dtype=dtype)  # pooled memory may hold another call's data
        return GpuTensor.from_numpy(zeros, dtype), GpuTensor.from_numpy(zeros, dtype)

    def copy_slots(self, k_cache, v_cache, src, dst):
        ctx = runtime.context()
        held = []
        try:
            dst_lease = ctx.upload(np.asarray(dst, dtype=np.int32))
            held.append(dst_lease)
            # Source and destination are the same buffers; the slots are disjoint blocks.
            self._copy_rows(ctx, k_cache.buffer, v_cache.buffer, k_cache, v_cache,
                            np.asarray(src, dtype=np.int32), dst_lease.buffer, len(dst), held)
        finally:
            for lease in held:
                lease.release()

    def to_host(self, cache):
        return cache.numpy() if isinstance(cache, GpuTensor) else to_numpy(cache)


def run_paged(backend: VulkanPagedBackend, call, timestamps: bool = False):
    """Paged attention for a validated call; returns ``(out, gpu_ns)`` (``gpu_ns`` summed over the
    attention and merge submissions when ``timestamps``, else None)."""
    ctx = runtime.context()
    info = ctx.info
    elem = np.dtype(call.dtype)
    bm, bn = pick_tiles(call.group * call.q_len, call.head_dim, info, elem.itemsize)
    splits = backend.choose_splits(call, bm, bn, info)
    module = _module(call.dtype)
    d = call.head_dim
    rows = call.batch * call.heads_q * call.q_len
    pipe = ctx.pipeline(module, lambda: kernels.checked_code(module, PAGED_PUSH.itemsize), PAGED_BINDINGS,
                        PAGED_PUSH.itemsize, ((0, d), (1, bm), (2, bn), (3, WG)))
    held = []
    try:
        def device_buffer(x, nbytes):
            if isinstance(x, GpuTensor):
                return x.buffer
            lease = ctx.upload(np.ascontiguousarray(to_numpy(x), dtype=elem))
            held.append(lease)
            return lease.buffer

        q_bytes = rows * d * elem.itemsize
        cache_bytes = call.num_blocks * call.block_size * call.heads_kv * d * elem.itemsize
        qb = device_buffer(call.q, q_bytes)
        kb, vb = device_buffer(call.k_cache, cache_bytes), device_buffer(call.v_cache, cache_bytes)
        bt, cl = ctx.upload(_int32(call.block_tables)), ctx.upload(_int32(call.context_lens))
        held += [bt, cl]
        if call.q_kind == "gpu":
            out_t = GpuTensor.empty((call.batch, call.heads_q, call.q_len, d), elem)
            ob = out_t.buffer
        else:
            out_t = None
            o_lease = ctx.pool.acquire(q_bytes)
            held.append(o_lease)
            ob = o_lease.buffer
        if splits > 1:
            po, pl = ctx.pool.acquire(rows * splits * d * 4), ctx.pool.acquire(rows * splits * 4)
            held += [po, pl]
            pob, plb, po_n, pl_n = po.buffer, pl.buffer, rows * splits * d * 4, rows * splits * 4
        else:
            pob = plb = backend._dummy_buffer(ctx)
            po_n = pl_n = 16
        bindings = (_binding(qb, q_bytes), _binding(kb, cache_bytes), _binding(vb, cache_bytes),
                    _binding(bt.buffer, 4 * call.batch * call.max_blocks), _binding(cl.buffer, 4 * call.batch),
                    _binding(ob, q_bytes), _binding(pob, po_n), _binding(plb, pl_n))
        pc = np.zeros((), dtype=PAGED_PUSH)
        pc["heads_kv"], pc["group"], pc["q_len"] = call.heads_kv, call.group, call.q_len
        pc["block_size"], pc["max_blocks"], pc["left"] = call.block_size, call.max_blocks, call.left
        pc["scale_log2"] = call.scale * kernels.LOG2E
        pc["num_splits"], pc["mode"] = splits, 0
        m_tiles = -(-call.group * call.q_len // bm)
        ns = ctx.run([runtime.Dispatch(pipe, bindings, pc.tobytes(), (call.batch * call.heads_kv, m_tiles, splits))],
                     timestamps=timestamps)
        if splits > 1:
            pc["mode"] = 1
            ns2 = ctx.run([runtime.Dispatch(pipe, bindings, pc.tobytes(), (call.batch * call.heads_q, call.q_len, 1))],
                          timestamps=timestamps)
            ns = None if ns is None or ns2 is None else ns + ns2
        if out_t is not None:
            return out_t, ns
        out = ctx.download(ob, np.empty((call.batch, call.heads_q, call.q_len, d), elem))
        return like(out, call.q), ns
    finally:
        for lease in held:
            lease.release()

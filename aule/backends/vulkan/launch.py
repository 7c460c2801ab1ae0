"""Running a validated call: device buffers for its arrays, the planned dispatches, the results.

Host arrays (NumPy, CPU torch) are uploaded into pooled leases that are released when the call
ends; :class:`GpuTensor` s are bound as they are. Results come back in the caller's array type,
or as GpuTensors when the inputs were.
"""
from __future__ import annotations

import numpy as np

from ... import settings
from ...arrays import like, lse_like, to_numpy
from ...call import shape_tuple
from ..base import nothing_to_compute
from .plans import (COPY_WG, Shape, attention_plan, bind, copy_pushes, extras_array, extras_flags, mask_array,
                    mask_shape, paged_plan)
from .runtime import Dispatch
from .select import variant_for
from .shaders import pipeline
from .tensor import GpuTensor

_PLANS: dict = {}
_DUMMY: dict = {}


def _dummy_buffer(ctx):
    """A 16-byte buffer for bindings a dispatch declares but does not use (no LSE, one split)."""
    lease = _DUMMY.get(ctx)
    if lease is None:
        lease = _DUMMY[ctx] = ctx.pool.acquire(16)
    return lease.buffer


def _binding(buf, nbytes: int):
    return (buf, 0, max(4, min(int(nbytes), buf.nbytes)))


def _int32(x) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x), dtype=np.int32)


class _Held(list):
    """Leases taken for one call, released when it ends however it ends."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for lease in self:
            lease.release()

    def upload(self, ctx, array: np.ndarray):
        """The device buffer of a lease holding ``array``, released with the others."""
        lease = ctx.upload(array)
        self.append(lease)
        return lease.buffer

    def device_buffer(self, ctx, x, dtype):
        """``x``'s device buffer: a GpuTensor's own, else an upload of the host data as ``dtype``."""
        if isinstance(x, GpuTensor):
            return x.buffer
        return self.upload(ctx, np.ascontiguousarray(to_numpy(x), dtype=dtype))

    def acquire(self, ctx, nbytes: int):
        lease = ctx.pool.acquire(nbytes)
        self.append(lease)
        return lease.buffer


# --- attention ---------------------------------------------------------------------------------------

def attention_plan_for(call, ctx):
    """(variant, shape, dispatch plan, pipeline) for a call, cached by everything that shapes the
    dispatches, so a repeated call costs one dictionary lookup. UnsupportedError when a device
    limit cannot be met."""
    vk = settings.kernel_choice()
    extras = extras_flags(call)
    mask = mask_shape(call)
    key = (call.dtype, call.kind, call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_k,
           call.head_dim, call.scale, call.left, call.right, call.return_lse, vk.variant, vk.tiles_key,
           call.softcap, extras, mask)
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is ctx:
        return hit[1]
    variant = variant_for(call, ctx.info)
    shape = Shape(call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_k, call.head_dim)
    spec, chunks = attention_plan(variant, shape, call.scale, call.left, call.right, call.return_lse,
                                  ctx.info, vk.tiles, call.softcap, extras, mask)
    plan = (variant, shape, chunks, pipeline(ctx, variant.name, spec))
    if len(_PLANS) > 4096:
        _PLANS.clear()
    _PLANS[key] = (ctx, plan)
    return plan


def _to_caller(kind: str, ref, host: np.ndarray, dtype, as_lse: bool = False):
    """A result computed on the host, handed back where the call's data lives: a GpuTensor of
    ``dtype`` for GpuTensor calls, else the type of ``ref`` (the query)."""
    if kind == "gpu":
        return GpuTensor.from_numpy(host, dtype)
    return lse_like(host, ref) if as_lse else like(host, ref)


def _empty_attention(call):
    """``(out, lse, None)`` of a call with no rows or no keys: zeros and an LSE of -inf, where the
    inputs live, without a dispatch (a plan of zero rows or heads would divide by zero)."""
    rows = (call.batch, call.heads_q, call.seq_q)
    out = _to_caller(call.kind, call.q, np.zeros(rows + (call.head_dim,), np.float32), call.dtype)
    lse = None
    if call.return_lse:
        lse = _to_caller(call.kind, call.q, np.full(rows, -np.inf, np.float32), np.float32, as_lse=True)
    return out, lse, None


def _result_sizes(variant, shape):
    """(element type, rows of the output, output bytes, LSE bytes) of a planned call."""
    elem = np.dtype(variant.elem)
    rows = (shape.batch, shape.heads_q, shape.seq_q)
    n_rows = shape.batch * shape.heads_q * shape.seq_q
    return elem, rows, n_rows * shape.head_dim * elem.itemsize, n_rows * 4


def feature_buffers(call, ctx, held) -> tuple:
    """The buffers of bindings 5 and 6 for a call: its :func:`plans.extras_array` and
    :func:`plans.mask_array` uploaded once (held until the call ends), the dummy buffer where it
    has none. GpuTensor and host calls alike: a mask is host data."""
    extras, mask = extras_array(call), mask_array(call)
    return (held.upload(ctx, extras) if extras is not None else _dummy_buffer(ctx),
            held.upload(ctx, mask) if mask is not None else _dummy_buffer(ctx))


def gpu_dispatches(call, ctx, extras=None, mask=None):
    """``(out, lse, dispatches)`` of a GpuTensor call with something to compute: new output
    GpuTensors (``lse`` None unless asked) and the planned dispatches that write them. ``extras``,
    ``mask``: the buffers of bindings 5 and 6 (:func:`feature_buffers`) of a call with ALiBi, sinks
    or a mask, kept alive by the caller until the dispatches ran."""
    if (extras is None and extras_flags(call)) or (mask is None and mask_shape(call) is not None):
        raise ValueError("a call with ALiBi, sinks or a mask needs the buffers of its slopes, sinks, key spans "
                         "and mask (launch.feature_buffers)")
    variant, shape, chunks, pipe = attention_plan_for(call, ctx)
    elem, rows, out_bytes, lse_bytes = _result_sizes(variant, shape)
    o = GpuTensor(ctx, ctx.pool.acquire(out_bytes), rows + (shape.head_dim,), elem)
    lse = GpuTensor(ctx, ctx.pool.acquire(lse_bytes), rows, np.float32) if call.return_lse else None
    bufs = (call.q.buffer, call.k.buffer, call.v.buffer, o.buffer,
            lse.buffer if lse is not None else _dummy_buffer(ctx), extras or _dummy_buffer(ctx),
            mask or _dummy_buffer(ctx))
    return o, lse, bind(pipe, chunks, bufs)


def attention(call, ctx, timestamps: bool = False):
    """Attention for a validated call; returns ``(out, lse, gpu_ns)``."""
    if nothing_to_compute(call):
        return _empty_attention(call)
    if call.kind == "gpu":
        with _Held() as held:
            o, lse, dispatches = gpu_dispatches(call, ctx, *feature_buffers(call, ctx, held))
            return o, lse, ctx.run(dispatches, timestamps=timestamps)
    variant, shape, chunks, pipe = attention_plan_for(call, ctx)
    elem, rows, out_bytes, lse_bytes = _result_sizes(variant, shape)
    with _Held() as held:
        bufs = tuple(held.device_buffer(ctx, x, elem) for x in (call.q, call.k, call.v))
        ob = held.acquire(ctx, out_bytes)
        lb = held.acquire(ctx, lse_bytes) if call.return_lse else _dummy_buffer(ctx)
        ns = ctx.run(bind(pipe, chunks, bufs + (ob, lb) + feature_buffers(call, ctx, held)), timestamps=timestamps)
        out = ctx.download(ob, np.empty(rows + (shape.head_dim,), elem))
        lse = ctx.download(lb, np.empty(rows, np.float32)) if call.return_lse else None
    return like(out, call.q), (lse_like(lse, call.q) if lse is not None else None), ns


# --- paged attention ---------------------------------------------------------------------------------

def _attend_then_merge(ctx, pipe, bindings, plan, timestamps: bool):
    """The split-K attention dispatch and, when the context was split, the merge of its splits,
    in one submission: the barrier between the passes lets the merge read every split's writes.
    Returns the GPU time of both passes (None unless asked)."""
    passes = [[Dispatch(pipe, bindings, *plan.attend)]]
    if plan.merge is not None:
        passes.append([Dispatch(pipe, bindings, *plan.merge)])
    return ctx.run_passes(passes, timestamps=timestamps)


def paged_attention(call, ctx, timestamps: bool = False):
    """Paged attention for a validated call; returns ``(out, gpu_ns)``."""
    elem = np.dtype(call.dtype)
    if call.batch == 0 or call.q_len == 0:  # no rows: nothing to plan (the split count divides by them)
        return _to_caller(call.q_kind, call.q, np.zeros(shape_tuple(call.q), np.float32), elem), None
    plan = paged_plan(call, ctx.info)
    pipe = pipeline(ctx, plan.module, plan.spec)
    d = call.head_dim
    rows = call.batch * call.heads_q * call.q_len
    q_bytes = rows * d * elem.itemsize
    cache_bytes = call.num_blocks * call.block_size * call.heads_kv * d * elem.itemsize
    with _Held() as held:
        qb = held.device_buffer(ctx, call.q, elem)
        kb, vb = held.device_buffer(ctx, call.k_cache, elem), held.device_buffer(ctx, call.v_cache, elem)
        bt, cl = held.upload(ctx, _int32(call.block_tables)), held.upload(ctx, _int32(call.context_lens))
        out_t = GpuTensor.empty((call.batch, call.heads_q, call.q_len, d), elem) if call.q_kind == "gpu" else None
        ob = out_t.buffer if out_t is not None else held.acquire(ctx, q_bytes)
        if plan.splits > 1:
            po_n, pl_n = rows * plan.splits * d * 4, rows * plan.splits * 8  # part_ml: (m, l) per split
            pob, plb = held.acquire(ctx, po_n), held.acquire(ctx, pl_n)
        else:
            pob = plb = _dummy_buffer(ctx)
            po_n = pl_n = 16
        bindings = (_binding(qb, q_bytes), _binding(kb, cache_bytes), _binding(vb, cache_bytes),
                    _binding(bt, 4 * call.batch * call.max_blocks), _binding(cl, 4 * call.batch),
                    _binding(ob, q_bytes), _binding(pob, po_n), _binding(plb, pl_n))
        ns = _attend_then_merge(ctx, pipe, bindings, plan, timestamps)
        if out_t is not None:
            return out_t, ns
        out = ctx.download(ob, np.empty((call.batch, call.heads_q, call.q_len, d), elem))
    return like(out, call.q), ns


# --- cache writes ------------------------------------------------------------------------------------

def _copy_rows(ctx, held, src_k, src_v, k_cache, v_cache, src_slots, dst_slots_buf, n):
    """Copy rows ``src_slots`` of (src_k, src_v) to the rows listed in ``dst_slots_buf`` of the
    caches; a destination slot of -1 is skipped by the shader."""
    row_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.dtype.itemsize
    pushes = copy_pushes(n, row_bytes, ctx.info)
    src_buf = held.upload(ctx, src_slots)
    pipe = pipeline(ctx, "copy_kv_to_paged", ((0, COPY_WG),))
    span = max(n, int(src_slots.max(initial=0) + 1)) * row_bytes
    bindings = (_binding(src_k, span), _binding(src_v, span),
                _binding(k_cache.buffer, k_cache.nbytes), _binding(v_cache.buffer, v_cache.nbytes),
                _binding(src_buf, 4 * n), _binding(dst_slots_buf, 4 * n))
    ctx.run([Dispatch(pipe, bindings, push, groups) for push, groups in pushes])


def write_kv(call, ctx) -> None:
    """Write the call's token rows into the cache GpuTensors at its slot mapping."""
    n = call.num_tokens
    with _Held() as held:
        kb, vb = (held.device_buffer(ctx, x, np.dtype(call.dtype)) for x in (call.key, call.value))
        slots = held.upload(ctx, _int32(call.slot_mapping))
        _copy_rows(ctx, held, kb, vb, call.k_cache, call.v_cache, np.arange(n, dtype=np.int32), slots, n)


def copy_slots(ctx, k_cache, v_cache, src, dst) -> None:
    """Copy cache rows ``src`` to ``dst`` within both caches (the slots are disjoint blocks)."""
    with _Held() as held:
        dst_buf = held.upload(ctx, np.asarray(dst, dtype=np.int32))
        _copy_rows(ctx, held, k_cache.buffer, v_cache.buffer, k_cache, v_cache,
                   np.asarray(src, dtype=np.int32), dst_buf, len(dst))

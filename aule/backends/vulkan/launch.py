"""Running a validated call: device buffers for its arrays, the planned dispatches, the results.

Host arrays (NumPy, CPU torch) are uploaded into pooled leases that are released when the call
ends; :class:`GpuTensor` s are bound as they are. Results come back in the caller's array type,
or as GpuTensors when the inputs were.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, replace

import numpy as np

from ... import settings
from ...arrays import like, lse_like, to_numpy
from ...call import shape_tuple
from ...errors import UnsupportedError
from ...masks import no_key_lse
from ..base import nothing_to_compute
from .plans import (COPY_WG, EXTRAS_ROWS, Shape, attention_plan, bind, bind_within, cache_split, copy_pushes,
                    extras_array, extras_flags, mask_array, mask_shape, offset_alignment, paged_features, paged_plan)
from .runtime import Dispatch
from .select import variant_for
from .shaders import REPACK_PUSH, pipeline
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
    """Leases and transfers taken for one call, released when it ends however it ends.

    ``uploads``/``downloads`` collect the GPU copies of :meth:`staged` inputs and
    :meth:`readback` results, for the call's own submission, ``up_chunks``/``down_chunks`` the
    chunks of those cut for overlap (:meth:`run` hands both to the context): host data costs no
    submission of its own unless it is large enough to gain by overlapping its copies and DMA."""

    def __init__(self):
        super().__init__()
        self.uploads, self.downloads, self.up_chunks, self.down_chunks = [], [], [], []

    def run(self, ctx, passes, timestamps: bool = False):
        """``ctx.run_passes`` of ``passes`` with every transfer this call staged or reads back."""
        return ctx.run_passes(passes, self.uploads, self.downloads, timestamps, self.up_chunks, self.down_chunks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        # Last taken, first given back: the pool hands buffers out last-in first-out, so the next
        # call binds the same buffer in the same place and re-submits its recording.
        for held in reversed(self):
            held.release()

    def staged(self, ctx, x, dtype):
        """``x``'s device buffer: a GpuTensor's own, else a lease that the copies added to
        ``uploads`` fill (already filled where device memory is mapped)."""
        if isinstance(x, GpuTensor):
            return x.buffer
        lease, transfer = ctx.stage(np.ascontiguousarray(to_numpy(x), dtype=dtype))
        self += (lease, transfer)
        self.uploads += transfer.copies
        self.up_chunks += transfer.chunks
        return lease.buffer

    def readback(self, ctx, buf, shape, dtype):
        """The transfer of ``buf``'s first bytes into a new host array of ``shape`` and ``dtype``,
        its copies added to ``downloads``: ``finish()`` it after the run."""
        transfer = ctx.readback(buf, ctx.host_empty(shape, dtype))
        self.append(transfer)
        self.downloads += transfer.copies
        self.down_chunks += transfer.chunks
        return transfer

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


_BOUND: dict = {}
_ID = operator.attrgetter("_id")


def _bound(pipe, chunks, bufs) -> tuple:
    """:func:`plans.bind` of a plan over whole buffers, remembered by the buffers' ids (never
    reused): a repeated call binds the same pooled buffers, and building its dispatches anew was
    a tenth of its host time. The cache forgets everything when full."""
    key = (pipe, chunks) + tuple(map(_ID, bufs))
    hit = _BOUND.get(key)
    if hit is None:
        if len(_BOUND) >= 256:
            _BOUND.clear()
        hit = _BOUND[key] = tuple(bind(pipe, chunks, bufs))  # shared by the calls: never to be changed
    return hit


def feature_buffers(call, ctx, held) -> tuple:
    """The buffers of bindings 5 and 6 for a call: its :func:`plans.extras_array` and
    :func:`plans.mask_array` uploaded once (held until the call ends), the dummy buffer where it
    has none. GpuTensor and host calls alike: a mask is host data (staged: its copies, where
    device memory is not mapped, join the call's submission through ``held.uploads``)."""
    extras, mask = extras_array(call), mask_array(call)
    return (held.staged(ctx, extras, extras.dtype) if extras is not None else _dummy_buffer(ctx),
            held.staged(ctx, mask, mask.dtype) if mask is not None else _dummy_buffer(ctx))


class GpuLaunch:
    """A planned call on GpuTensors, ready to bind and run on any q, k and v of its shapes: what a
    repeated call needs beyond its tensors' buffers, worked out once (:mod:`.fastpath` keeps one
    per public call; :func:`attention` makes one from its cached plan)."""

    __slots__ = ("ctx", "pipe", "chunks", "out_shape", "lse_shape", "elem", "out_bytes", "lse_bytes", "dummy")

    def __init__(self, ctx, plan, return_lse: bool):
        variant, shape, chunks, pipe = plan
        elem, rows, out_bytes, lse_bytes = _result_sizes(variant, shape)
        self.ctx, self.pipe, self.chunks, self.elem = ctx, pipe, chunks, elem
        self.out_shape, self.out_bytes = rows + (shape.head_dim,), out_bytes
        self.lse_shape, self.lse_bytes = (rows, lse_bytes) if return_lse else (None, 0)
        self.dummy = _dummy_buffer(ctx)

    def dispatches(self, q, k, v, extras=None, mask=None):
        """``(out, lse, dispatches)``: new output GpuTensors (``lse`` None unless asked) and the
        dispatches that write them from ``q``, ``k``, ``v`` (GpuTensors), ``extras`` and ``mask``
        (bindings 5 and 6, or None)."""
        ctx, dummy = self.ctx, self.dummy
        try:  # whole tensors of one buffer each (split caches never reach a dense plan)
            qkv = (q.leases[0].buffer, k.leases[0].buffer, v.leases[0].buffer)
        except IndexError:
            raise ValueError("a GpuTensor of this call (q, k or v) was freed") from None
        o = GpuTensor.wrap(ctx, ctx.pool.acquire(self.out_bytes), self.out_shape, self.elem)
        lse = None
        if self.lse_shape is not None:
            lse = GpuTensor.wrap(ctx, ctx.pool.acquire(self.lse_bytes), self.lse_shape, _F32)
        bufs = qkv + (o.leases[0].buffer, lse.leases[0].buffer if lse is not None else dummy,
                      extras or dummy, mask or dummy)
        return o, lse, _bound(self.pipe, self.chunks, bufs)

    def run(self, q, k, v, held=None, extras=None, mask=None, timestamps: bool = False):
        """``(out, lse, gpu_ns)`` of the call on these tensors, submitted without waiting where
        the context runs asynchronously (``held``: what the call's feature buffers are held by,
        moved to the submission then)."""
        o, lse, dispatches = self.dispatches(q, k, v, extras, mask)
        keep = held if held is not None else []
        return o, lse, self.ctx.run_passes((dispatches,), held.uploads if held is not None else (), (), timestamps,
                                           held.up_chunks if held is not None else (), (), keep)


_F32 = np.dtype(np.float32)


def gpu_dispatches(call, ctx, extras=None, mask=None):
    """``(out, lse, dispatches)`` of a GpuTensor call with something to compute: new output
    GpuTensors (``lse`` None unless asked) and the planned dispatches that write them. ``extras``,
    ``mask``: the buffers of bindings 5 and 6 (:func:`feature_buffers`) of a call with ALiBi, sinks
    or a mask, kept alive by the caller until the dispatches ran."""
    if (extras is None and extras_flags(call)) or (mask is None and mask_shape(call) is not None):
        raise ValueError("a call with ALiBi, sinks or a mask needs the buffers of its slopes, sinks, key spans "
                         "and mask (launch.feature_buffers)")
    return GpuLaunch(ctx, attention_plan_for(call, ctx), call.return_lse).dispatches(
        call.q, call.k, call.v, extras, mask)


def attention(call, ctx, timestamps: bool = False):
    """Attention for a validated call; returns ``(out, lse, gpu_ns)``."""
    if nothing_to_compute(call):
        return _empty_attention(call)
    if call.kind == "gpu":
        with _Held() as held:
            extras, mask = feature_buffers(call, ctx, held)
            return GpuLaunch(ctx, attention_plan_for(call, ctx), call.return_lse).run(
                call.q, call.k, call.v, held, extras, mask, timestamps)
    variant, shape, chunks, pipe = attention_plan_for(call, ctx)
    elem, rows, out_bytes, lse_bytes = _result_sizes(variant, shape)
    with _Held() as held:  # one submission: uploads, dispatches, downloads
        bufs = tuple(held.staged(ctx, x, elem) for x in (call.q, call.k, call.v))
        ob = held.acquire(ctx, out_bytes)
        lb = held.acquire(ctx, lse_bytes) if call.return_lse else _dummy_buffer(ctx)
        features = feature_buffers(call, ctx, held)
        out = held.readback(ctx, ob, rows + (shape.head_dim,), elem)
        lse = held.readback(ctx, lb, rows, np.float32) if call.return_lse else None
        ns = held.run(ctx, (_bound(pipe, chunks, bufs + (ob, lb) + features),), timestamps)
        out, lse = out.finish(), (lse.finish() if lse is not None else None)
    return like(out, call.q), (lse_like(lse, call.q) if lse is not None else None), ns


# --- paged attention ---------------------------------------------------------------------------------

def _cache_bindings(ctx, held, cache, elem) -> tuple:
    """``(split, bindings)`` of a K or V cache: the descriptor binding of each buffer it lies in,
    and its :class:`plans.CacheSplit` where that is more than one (else None). A GpuTensor is bound
    as it lies; host data is uploaded for the call, in pieces where one buffer cannot hold it."""
    if isinstance(cache, GpuTensor):
        split = cache.split
        if split is None:
            return None, (_binding(cache.buffer, cache.nbytes),)
        return split, tuple(_binding(b, split.piece_bytes(i)) for i, b in enumerate(cache.buffers))
    a = np.ascontiguousarray(to_numpy(cache), dtype=elem)
    split = cache_split(a.shape, elem.itemsize, ctx.info)
    if split.pieces == 1:
        return None, (_binding(held.upload(ctx, a), a.nbytes),)
    return split, tuple(_binding(held.upload(ctx, a[slice(*split.blocks(i))]), split.piece_bytes(i))
                        for i in range(split.pieces))


def paged_passes(call, ctx, held):
    """``(passes, out, plan)`` of a paged call with rows: the attention dispatch and, with splits, the
    merge (each a list of dispatches, a compute barrier between them), and the output: a new
    GpuTensor for GpuTensor q, else a buffer leased in ``held``, which also keeps every upload
    and scratch buffer the dispatches bind until it is released."""
    elem = np.dtype(call.dtype)
    d = call.head_dim
    rows = call.rows * call.heads_q
    q_bytes = rows * d * elem.itemsize
    qb = held.device_buffer(ctx, call.q, elem)
    split, kb = _cache_bindings(ctx, held, call.k_cache, elem)
    _, vb = _cache_bindings(ctx, held, call.v_cache, elem)  # split as K is (backend._bound_caches)
    plan = paged_plan(call, ctx.info, split)
    # A split cache's K and V bindings are arrays of its pieces.
    pipe = pipeline(ctx, plan.module, plan.spec, None if split is None else (1, len(kb), len(vb)) + (1,) * 5)
    bt = held.upload(ctx, _int32(call.block_tables))
    # A packed call's offsets follow the lengths in one buffer, and the features' slopes and sinks
    # follow them (plans.paged_features): every binding the runtime allows is taken. Host-checked
    # (Vulkan's tables always are): the shader follows them as they are.
    lens = [_int32(call.context_lens)]
    if call.packed:
        lens.append(_int32(call.query_start_loc))
    lens = np.concatenate(lens + [paged_features(call)[1]])
    cl = held.upload(ctx, lens)
    out = GpuTensor.empty(shape_tuple(call.q), elem) if call.q_kind == "gpu" else None
    ob = out.buffer if out is not None else held.acquire(ctx, q_bytes)
    if plan.splits > 1:
        po_n, pl_n = rows * plan.splits * d * 4, rows * plan.splits * 8  # part_ml: (m, l) per split
        pob, plb = held.acquire(ctx, po_n), held.acquire(ctx, pl_n)
    else:
        pob = plb = _dummy_buffer(ctx)
        po_n = pl_n = 16
    bindings = (_binding(qb, q_bytes),) + kb + vb + (
                _binding(bt, 4 * call.batch * call.max_blocks), _binding(cl, lens.nbytes),
                _binding(ob, q_bytes), _binding(pob, po_n), _binding(plb, pl_n))
    # The split-K attention dispatch and, when the context was split, the merge of its splits, in
    # one submission: the barrier between the passes lets the merge read every split's writes.
    passes = [[Dispatch(pipe, bindings, *plan.attend)]]
    if plan.merge is not None:
        passes.append([Dispatch(pipe, bindings, *plan.merge)])
    return passes, (out if out is not None else ob), plan


def paged_attention(call, ctx, timestamps: bool = False):
    """Paged attention for a validated call (packed or not); returns ``(out, gpu_ns)``: the GPU time
    of both passes (None unless asked)."""
    elem = np.dtype(call.dtype)
    shape = shape_tuple(call.q)
    if call.batch == 0 or call.q_len == 0:  # no rows: nothing to plan (the split count divides by them)
        return _to_caller(call.q_kind, call.q, np.zeros(shape, np.float32), elem), None
    with _Held() as held:
        passes, out, _ = paged_passes(call, ctx, held)
        if isinstance(out, GpuTensor):  # nothing to read back: submitted without waiting where it may be
            return out, ctx.run_passes(passes, timestamps=timestamps, keep=held)
        ns = ctx.run_passes(passes, timestamps=timestamps)
        out = ctx.download(out, np.empty(shape, elem))
    return like(out, call.q), ns


# --- cache writes ------------------------------------------------------------------------------------

def _copy_rows(ctx, held, src_k, src_v, k_cache, v_cache, src_slots, dst_slots_buf, n):
    """Copy rows ``src_slots`` of the sources to the rows listed in ``dst_slots_buf`` of the
    caches; a destination slot of -1 is skipped by the shader. ``src_k``, ``src_v``: the bindings
    of the source rows, one buffer of new rows or, copying within the caches, their own pieces
    (slots are numbered across the pieces, as in the caches)."""
    row_bytes = k_cache.shape[2] * k_cache.shape[3] * k_cache.dtype.itemsize
    pushes = copy_pushes(n, row_bytes, ctx.info)
    src_buf = held.upload(ctx, src_slots)
    split, kd = _cache_bindings(ctx, held, k_cache, k_cache.dtype)
    _, vd = _cache_bindings(ctx, held, v_cache, v_cache.dtype)
    if split is None:
        pipe = pipeline(ctx, "copy_kv_to_paged", ((0, COPY_WG),))
    else:
        spec = ((0, COPY_WG), (1, len(src_k)), (2, split.pieces), (3, split.blocks_per_piece * k_cache.shape[1]))
        pipe = pipeline(ctx, "copy_kv_to_paged_split", spec, (len(src_k), len(src_v), len(kd), len(vd), 1, 1))
    bindings = src_k + src_v + kd + vd + (_binding(src_buf, 4 * n), _binding(dst_slots_buf, 4 * n))
    # The caches are GpuTensors, so nothing comes back: submitted without waiting where it may be.
    ctx.run_passes(([Dispatch(pipe, bindings, push, groups) for push, groups in pushes],), keep=held)


def write_kv(call, ctx) -> None:
    """Write the call's token rows into the cache GpuTensors at its slot mapping."""
    n = call.num_tokens
    row_bytes = call.heads_kv * call.head_dim * np.dtype(call.dtype).itemsize
    with _Held() as held:
        kb, vb = (held.device_buffer(ctx, x, np.dtype(call.dtype)) for x in (call.key, call.value))
        slots = held.upload(ctx, _int32(call.slot_mapping))
        src = ((_binding(kb, n * row_bytes),), (_binding(vb, n * row_bytes),))
        _copy_rows(ctx, held, *src, call.k_cache, call.v_cache, np.arange(n, dtype=np.int32), slots, n)


def copy_slots(ctx, k_cache, v_cache, src, dst) -> None:
    """Copy cache rows ``src`` to ``dst`` within both caches (the slots are disjoint blocks)."""
    with _Held() as held:
        dst_buf = held.upload(ctx, np.asarray(dst, dtype=np.int32))
        src_slots = np.asarray(src, dtype=np.int32)
        if k_cache.split is None:  # bound up to the last row read, as the new rows of a write are
            span = max(len(dst), int(src_slots.max(initial=0) + 1)) * k_cache.shape[2] * k_cache.shape[3] \
                * k_cache.dtype.itemsize
            sk, sv = (_binding(k_cache.buffer, span),), (_binding(v_cache.buffer, span),)
        else:  # the caches' own pieces: slots are numbered across them
            sk, sv = (_cache_bindings(ctx, held, c, c.dtype)[1] for c in (k_cache, v_cache))
        _copy_rows(ctx, held, sk, sv, k_cache, v_cache, src_slots, dst_buf, len(dst))


# --- varlen attention --------------------------------------------------------------------------------
# The shaders read each head's rows contiguously ([H, S, D] per sequence), while varlen packs
# tokens first ([total, H, D]). The packed tensors are staged as they lie, as a dense call's are,
# and the device repacks them (glsl/varlen_repack.comp): each sequence's rows go heads-first into
# its own aligned block of one buffer per tensor, so each sequence is a dense [1, H, len, D] call
# bound to its blocks and the attention plans serve it unchanged; the output blocks go back into
# the packed layout the same way, and the packed output is read back as a dense call's output is.
# A transposing copy on the host cost more than the transfers themselves (issue 15).

#: Words per sequence in the repack tables: ``RECORD`` in glsl/varlen_repack.comp.
REPACK_RECORD = 6
_NO_PIECE = 0xFFFFFFFF
_WORDS = 0xFFFFFFFF
REPACK_WG = 128  # invocations of a repack workgroup (every device has at least 128)


@dataclass(frozen=True)
class VarlenPiece:
    """One sequence with query rows: its rows and keys in the packed data, its plan (None when it
    has no keys: zeros, no dispatch) and the byte offsets of its blocks: ``q_at`` in the q and the
    output buffers, ``k_at`` in the k and v buffers, ``x_at`` in the extras (or None), ``lse_at`` in
    the LSE buffer (or None)."""

    seq: int               # its index in the batch (its row of ALiBi slopes)
    q0: int
    q1: int
    k0: int
    k1: int
    plan: tuple | None = None
    q_at: int = 0
    k_at: int = 0
    x_at: int | None = None
    lse_at: int | None = None


@dataclass(frozen=True)
class VarlenGroup:
    """The planned sequences whose plans store one element type (nearly always all of them): one
    staged copy of the packed tensors in that type serves them, and one buffer per tensor holds
    their blocks, of these sizes."""

    elem: np.dtype
    pieces: tuple          # VarlenPiece with a plan, in order
    q_bytes: int           # the q blocks, and the output blocks (the same offsets)
    k_bytes: int           # the k blocks, and the v blocks
    x_bytes: int
    lse_bytes: int
    q_boxes: tuple         # RepackBox es of q and the output
    k_boxes: tuple         # of k and v


@dataclass(frozen=True)
class VarlenLayout:
    pieces: tuple          # VarlenPiece per sequence with query rows, in order
    groups: tuple          # VarlenGroup per element type of the plans


def _elem_of(plan) -> np.dtype:
    return np.dtype(plan[0].elem)


class _Blocks:
    """Aligned offsets handed out one after another in one buffer."""

    def __init__(self, align: int):
        self.align, self.end = align, 0

    def place(self, nbytes: int) -> int:
        at = -(-self.end // self.align) * self.align
        self.end = at + nbytes
        return at


def varlen_layout(call, ctx) -> VarlenLayout:
    """Where every sequence of a varlen call lies on the device, with its plan (variants and chunks
    follow each sequence's lengths; plans are shared by sequences of equal lengths). Raises
    UnsupportedError when a sequence cannot be planned, or a buffer would exceed the device's
    allocation or binding limit (the router then serves the sequences one dense call each)."""
    w, info = call.whole, ctx.info
    align = offset_alignment(info)
    hq, hk, d = w.heads_q, w.heads_kv, w.head_dim
    has_extras = call.alibi is not None or w.sinks is not None
    plans: dict = {}
    pieces, grouped = [], {}
    for i in range(call.batch):
        q0, q1, k0, k1 = (int(x) for x in (call.cu_q[i], call.cu_q[i + 1], call.cu_k[i], call.cu_k[i + 1]))
        if q1 == q0:
            continue
        if k1 == k0:
            pieces.append(VarlenPiece(i, q0, q1, k0, k1))
            continue
        plan = plans.get((q1 - q0, k1 - k0))
        if plan is None:
            plan = plans[(q1 - q0, k1 - k0)] = attention_plan_for(call.sequence(i), ctx)
        elem = _elem_of(plan)
        g = grouped.get(elem)
        if g is None:
            g = grouped[elem] = ([], _Blocks(align), _Blocks(align), _Blocks(align), _Blocks(align))
        members, qs, ks, xs, ls = g
        es = elem.itemsize
        pieces.append(VarlenPiece(i, q0, q1, k0, k1, plan, qs.place(hq * (q1 - q0) * d * es),
                                  ks.place(hk * (k1 - k0) * d * es),
                                  xs.place(4 * EXTRAS_ROWS * hq) if has_extras else None,
                                  ls.place(4 * hq * (q1 - q0)) if w.return_lse else None))
        members.append(pieces[-1])
    groups = []
    for elem, (members, qs, ks, xs, ls) in grouped.items():
        es = elem.itemsize
        for what, n in (("q and output blocks", qs.end), ("k and v blocks", ks.end),
                        ("packed q and output", w.seq_q * hq * d * es), ("packed k and v", w.seq_k * hk * d * es)):
            if n > info.max_allocation:
                raise UnsupportedError(f"the {what} of this varlen call take {n} bytes in one buffer, more "
                                       f"than {info.name}'s maxMemoryAllocationSize ({info.max_allocation}): "
                                       "split the batch")
        groups.append(VarlenGroup(elem, tuple(members), qs.end, ks.end, xs.end, ls.end,
                                  _repack_boxes(members, False, hq, d * es, align, info),
                                  _repack_boxes(members, True, hk, d * es, align, info)))
    return VarlenLayout(tuple(pieces), tuple(groups))


@dataclass(frozen=True)
class RepackBox:
    """Rows ``[t0, t1)`` x heads ``[h0, h1)`` of one packed tensor, repacked by dispatches that bind
    bytes ``packed`` of the packed buffer and ``blocks`` of the blocks buffer (``(start, end)``,
    starts aligned): both within the storage-buffer range."""

    t0: int
    t1: int
    h0: int
    h1: int
    packed: tuple
    blocks: tuple


def _repack_boxes(pieces: list, keys: bool, heads: int, row: int, align: int, info) -> tuple:
    """The :class:`RepackBox` es covering one tensor (q and output, or k and v: ``keys``) of the
    ``pieces``, ``row`` bytes a head's row: runs of whole consecutive sequences, or for a sequence
    too large for one binding, one head and a run of its tokens at a time. UnsupportedError where
    even one row does not fit."""
    limit = info.max_storage_buffer_range

    def span(p):  # (first token, tokens, first byte of its block)
        return (p.k0, p.k1 - p.k0, p.k_at) if keys else (p.q0, p.q1 - p.q0, p.q_at)

    def box(a, b, t0, t1, h0, h1) -> RepackBox:
        (fa, na, at_a), (fb, nb, at_b) = span(a), span(b)
        lo = (t0 * heads + h0) * row // align * align
        first = (at_a + (h0 * na + t0 - fa) * row) // align * align
        return RepackBox(t0, t1, h0, h1, (lo, ((t1 - 1) * heads + h1) * row),
                         (first, at_b + ((h1 - 1) * nb + t1 - fb) * row))

    def fits(bx: RepackBox) -> bool:
        return bx.packed[1] - bx.packed[0] <= limit and bx.blocks[1] - bx.blocks[0] <= limit

    def whole(lo, hi) -> RepackBox:
        a, b = pieces[lo], pieces[hi - 1]
        return box(a, b, span(a)[0], span(b)[0] + span(b)[1], 0, heads)

    out, lo = [], 0
    while lo < len(pieces):
        if fits(whole(lo, lo + 1)):
            hi = lo + 1
            while hi < len(pieces) and fits(whole(lo, hi + 1)):
                hi += 1
            out.append(whole(lo, hi))
            lo = hi
            continue
        p = pieces[lo]
        first, n, _ = span(p)
        # Tokens of one head per box: the packed window strides over every head of its tokens.
        cut = min(n, (limit - align - row) // (heads * row) + 1, (limit - align) // row)
        if cut < 1:
            raise UnsupportedError(f"one row of sequence {p.seq} of this varlen call does not fit {info.name}'s "
                                   f"storage-buffer range ({limit} bytes)")
        out += [box(p, p, t, min(first + n, t + cut), h, h + 1)
                for h in range(heads) for t in range(first, first + n, cut)]
        lo += 1
    return tuple(out)


def _packed(x):
    """The caller's packed ``[total, H, D]`` array or tensor behind the ``[1, H, total, D]`` view a
    varlen call holds: its own layout, so reading it as NumPy copies nothing when it was contiguous."""
    x = x[0]
    return x.swapaxes(0, 1) if isinstance(x, np.ndarray) else x.transpose(0, 1)


def varlen_tables(call, group: VarlenGroup) -> np.ndarray:
    """What varlen_repack reads (uint32): the group's record index of each query token, then of each
    key token (``_NO_PIECE`` for tokens of other sequences), then a record per sequence: (first
    query token, rows, first 32-bit word of its q block; first key token, keys, first word of its
    k block)."""
    index = np.full(call.batch, _NO_PIECE, np.uint32)
    index[[p.seq for p in group.pieces]] = np.arange(len(group.pieces), dtype=np.uint32)
    # Word offsets modulo 2**32: the shader's uint arithmetic wraps alike, and every offset it
    # forms within a binding's window is below 2**32.
    records = np.array([(p.q0, p.q1 - p.q0, (p.q_at // 4) & _WORDS, p.k0, p.k1 - p.k0, (p.k_at // 4) & _WORDS)
                        for p in group.pieces], np.uint32).reshape(len(group.pieces), REPACK_RECORD)
    # cu_seqlens run from 0 to each tensor's total (call.check_cu_seqlens): one entry per token.
    return np.concatenate([np.repeat(index, np.diff(call.cu_q)), np.repeat(index, np.diff(call.cu_k)),
                           records.reshape(-1)])


def _repack_word(call, group: VarlenGroup) -> int:
    """Bytes varlen_repack moves at a time: 16 where a head's row is whole 16-byte words (the
    blocks and windows start at multiples of 16, plans.offset_alignment), else 4 (head_dim is a
    multiple of 4 for the 16-bit variants)."""
    return 16 if call.whole.head_dim * group.elem.itemsize % 16 == 0 else 4


def _repack(pipe, call, group, packed, blocks, tables, keys: bool, unpack: bool, ctx) -> list:
    """The dispatches moving every row of one tensor between its packed buffer and its blocks:
    per :class:`RepackBox`, a workgroup per token, the tokens cut where the grid's x limit ends."""
    w = call.whole
    unit = _repack_word(call, group)
    row_words = w.head_dim * group.elem.itemsize // unit
    limit = ctx.info.max_workgroup_count[0]
    out = []
    for bx in group.k_boxes if keys else group.q_boxes:
        bindings = ((packed, bx.packed[0], bx.packed[1] - bx.packed[0]),
                    (blocks, bx.blocks[0], bx.blocks[1] - bx.blocks[0]), (tables, 0, tables.nbytes))
        for base in range(bx.t0, bx.t1, limit):
            pc = np.zeros((), dtype=REPACK_PUSH)
            pc["row_words"], pc["heads"] = row_words, w.heads_kv if keys else w.heads_q
            pc["head_base"], pc["head_end"] = bx.h0, bx.h1
            pc["token_base"], pc["token_end"] = base, bx.t1
            pc["packed_origin"], pc["block_origin"] = (bx.packed[0] // unit) & _WORDS, (bx.blocks[0] // unit) & _WORDS
            pc["piece_of"] = w.seq_q if keys else 0
            pc["record_base"] = w.seq_q + w.seq_k + (3 if keys else 0)
            pc["unpack"] = int(unpack)
            out.append(Dispatch(pipe, bindings, pc.tobytes(), (min(limit, bx.t1 - base), 1, 1)))
    return out


def _varlen_extras(call, group: VarlenGroup) -> np.ndarray:
    """Binding 5's words for every sequence of the group, each at its ``x_at``."""
    w = call.whole
    # Every sequence's slopes and sinks at once: column block i is sequence i's [EXTRAS_ROWS, heads_q].
    whole = extras_array(replace(w, batch=call.batch, alibi=call.alibi, mask=None))
    whole = whole.reshape(EXTRAS_ROWS, call.batch, w.heads_q)
    out = np.zeros(group.x_bytes // 4, np.uint32)
    for p in group.pieces:
        out[p.x_at // 4:p.x_at // 4 + EXTRAS_ROWS * w.heads_q].reshape(EXTRAS_ROWS, w.heads_q)[...] = whole[:, p.seq]
    return out


def _varlen_group(call, group: VarlenGroup, ctx, held):
    """``(passes, out transfer, LSE transfer or None)`` of one group: its packed q, k and v staged
    (their copies join ``held.uploads``), the repack, attention and unpack passes over its
    buffers, and the read-backs of its packed output and LSE blocks."""
    w = call.whole
    elem = group.elem
    pipe = pipeline(ctx, "varlen_repack_vec4" if _repack_word(call, group) == 16 else "varlen_repack",
                    ((0, REPACK_WG),))
    tables = held.staged(ctx, varlen_tables(call, group), np.uint32)
    packed = [held.staged(ctx, _packed(x), elem) for x in (w.q, w.k, w.v)]
    qb, kb, vb, ob = (held.acquire(ctx, n) for n in (group.q_bytes, group.k_bytes, group.k_bytes, group.q_bytes))
    lb = held.acquire(ctx, group.lse_bytes) if group.lse_bytes else None
    xb = held.staged(ctx, _varlen_extras(call, group), np.uint32) if group.x_bytes else None
    out_b = held.acquire(ctx, w.seq_q * w.heads_q * w.head_dim * elem.itemsize)
    into = [d for src, dst, keys in ((packed[0], qb, False), (packed[1], kb, True), (packed[2], vb, True))
            for d in _repack(pipe, call, group, src, dst, tables, keys, False, ctx)]
    dummy = _dummy_buffer(ctx)
    none = (dummy, 0, dummy.nbytes)
    attend, es = [], elem.itemsize
    for p in group.pieces:
        _, shape, chunks, attn = p.plan
        nq, nk = w.heads_q * shape.seq_q * w.head_dim * es, w.heads_kv * shape.seq_k * w.head_dim * es
        regions = ((qb, p.q_at, nq), (kb, p.k_at, nk), (vb, p.k_at, nk), (ob, p.q_at, nq),
                   (lb, p.lse_at, 4 * w.heads_q * shape.seq_q) if lb is not None else none,
                   (xb, p.x_at, 4 * EXTRAS_ROWS * w.heads_q) if xb is not None else none,
                   none)   # binding 6: varlen takes no attn_mask
        attend += bind_within(attn, chunks, regions)
    back = _repack(pipe, call, group, out_b, ob, tables, False, True, ctx)
    out = held.readback(ctx, out_b, (w.seq_q, w.heads_q, w.head_dim), elem)
    lse = held.readback(ctx, lb, (group.lse_bytes,), np.uint8) if lb is not None else None
    return (into, attend, back), out, lse


def varlen_attention(call, ctx, timestamps: bool = False):
    """A validated varlen call in one submission: the packed inputs' uploads, the repack into
    blocks, every sequence's dispatches (no barrier between them: they write disjoint blocks), the
    unpack and the download. Returns ``(out [total_q, Hq, D] like q, lse [Hq, total_q] float32 or
    None, gpu_ns)`` (GPU time from the repack to the unpack)."""
    w = call.whole
    layout = varlen_layout(call, ctx)
    total, hq, d = w.seq_q, w.heads_q, w.head_dim
    lse = no_key_lse((hq, total), w.sinks, np.float32) if w.return_lse else None
    ns, outs = None, []
    with _Held() as held:
        runs = [(g,) + _varlen_group(call, g, ctx, held) for g in layout.groups]
        if runs:
            # One submission for every group: the passes of each group run side by side.
            passes = [[d for _, ps, _, _ in runs for d in ps[i]] for i in range(3)]
            ns = held.run(ctx, passes, timestamps)
        for g, _, out_t, lse_t in runs:
            outs.append((g, out_t.finish()))
            if lse_t is not None:
                raw = lse_t.finish()
                for p in g.pieces:
                    n = hq * (p.q1 - p.q0)
                    lse[:, p.q0:p.q1] = raw[p.lse_at:p.lse_at + 4 * n].view(np.float32).reshape(hq, p.q1 - p.q0)
    if len(outs) == 1:
        out = outs[0][1]  # every sequence with keys wrote its rows: the rest are zeroed below
    else:  # no group, or sequences of several element types: their rows gathered into one array
        out = ctx.host_empty((total, hq, d), np.float16 if w.dtype == "float16" else np.float32)
        for g, o in outs:
            for p in g.pieces:
                out[p.q0:p.q1] = o[p.q0:p.q1]
    for p in layout.pieces:
        if p.plan is None:
            out[p.q0:p.q1] = 0  # no keys: zeros, and the LSE of no key (-inf, or the sink)
    ref = _packed(w.q)
    return like(out, ref), (lse_like(lse, ref) if lse is not None else None), ns

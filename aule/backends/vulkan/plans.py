"""Dispatch planning: how a call is cut into dispatches that respect the device's limits (storage
buffer range, workgroup grid, shared memory), with their push constants. Plans depend only on
shapes, settings and the device, never on which buffers hold the data, so they are cached."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from ... import settings
from ...errors import UnsupportedError
from .runtime import Dispatch
from .runtime.pipelines import MAX_DESCRIPTORS
from .shaders import ATTN_PUSH, COPY_PUSH, MODULES, PAGED_PUSH, Module

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def pairs(self) -> int:
        return self.batch * self.heads_kv


def offset_alignment(info) -> int:
    # 16 bytes at least, so the element offset left for the shader is whole vec4s.
    return max(16, info.min_storage_offset_alignment)


def unbounded_beyond(side: int, extent: int) -> int:
    """A window side (``left`` or ``right``, -1 unbounded) as the shaders take it: a side of
    ``extent`` or more reaches past every key, so it is unbounded (-1). A window of any size then
    fits the int32 push constants, and the shaders' ``pos - left`` / ``pos + right`` cannot
    overflow int32 (windows near 2**31 hid keys they should show)."""
    return -1 if side >= extent else side


def plan_chunks(per_pair: dict, pairs: int, info, max_heads: int) -> int:
    """How many (batch, kv-head) pairs one dispatch may cover so that every binding's range fits
    ``maxStorageBufferRange`` (with room for offset alignment) and heads fit the grid."""
    room = info.max_storage_buffer_range - offset_alignment(info)
    fit = pairs
    for name, nbytes in per_pair.items():
        if nbytes > room:
            raise UnsupportedError(
                f"one head's {name} takes {nbytes} bytes, more than the device's storage-buffer range "
                f"({info.max_storage_buffer_range} bytes): shorten the sequence")
        fit = min(fit, room // max(1, nbytes))
    return max(1, min(fit, max_heads))


@functools.lru_cache(maxsize=1024)
def attention_plan(variant: Module, shape: Shape, scale: float, left: int, right: int, want_lse: bool,
                   info, tiles: tuple | None, softcap: float = 0.0, extras: int = 0,
                   mask: tuple | None = None) -> tuple:
    """Everything about a call's dispatches that does not depend on which buffers hold the data:
    ``(spec, [(push bytes, ((binding start, nbytes) or None x 7), groups), ...])``. ``extras``:
    the EXTRAS_* flags of the values binding 5 holds (:func:`extras_array`); ``mask``: the
    broadcast shape of a general mask in binding 6 (:func:`mask_shape`). Raises UnsupportedError
    when a device limit cannot be met."""
    d = shape.head_dim
    mask_row = mask_col = 0
    mask_range = None   # no mask: the whole (dummy) buffer
    if mask is not None:
        nbytes = 4 * math.prod(mask)
        if nbytes > info.max_storage_buffer_range:
            raise UnsupportedError(
                f"the attn_mask takes {nbytes} bytes as float32 in its broadcast shape {list(mask)}, more than "
                f"the device's storage-buffer range ({info.max_storage_buffer_range} bytes), and it is bound "
                "whole: broadcast it along the dimensions it does not vary in, or use a padding mask")
        mask_row, mask_col = mask_strides(mask)[2:]
        # Exactly the mask's bytes: its pooled buffer may be larger, past the range.
        mask_range = (0, nbytes)
    es = 2 if variant.elem == "float16" else 4
    g = shape.group
    # Key j is visible from a row at position pos when pos - left <= j <= pos + right, with pos in
    # [seq_k - seq_q, seq_k - 1]: left >= seq_k or right >= seq_q excludes no key.
    left, right = unbounded_beyond(left, shape.seq_k), unbounded_beyond(right, shape.seq_q)
    blocks = math.ceil(shape.seq_q / variant.rows_per_group(d, info, tiles))
    if blocks > info.max_workgroup_count[0]:
        raise UnsupportedError(f"seq_q={shape.seq_q} needs {blocks} workgroups in x, more than the device's "
                               f"{info.max_workgroup_count[0]}")
    per_pair = {"query": g * shape.seq_q * d * es, "key": shape.seq_k * d * es, "value": shape.seq_k * d * es,
                "output": g * shape.seq_q * d * es, "lse": g * shape.seq_q * 4}
    chunk = plan_chunks(per_pair, shape.pairs, info, info.max_workgroup_count[1] // g)
    align = offset_alignment(info)
    chunks = []
    for p0 in range(0, shape.pairs, chunk):
        n = min(chunk, shape.pairs - p0)
        pc = np.zeros((), dtype=ATTN_PUSH)
        pc["seq_q"], pc["seq_k"], pc["group"], pc["heads"] = shape.seq_q, shape.seq_k, g, n * g
        pc["left"], pc["right"] = left, right
        pc["scale_log2"] = scale * LOG2E
        pc["flags"] = (1 if want_lse else 0) | (2 if softcap else 0) | extras
        pc["softcap2"] = softcap * LOG2E
        pc["x_base"], pc["x_stride"] = p0 * g, shape.pairs * g
        pc["mask_row"], pc["mask_col"] = mask_row, mask_col
        pc["reverse"] = 1 if right >= 0 else 0
        ranges = []
        for name, base in (("query", "q_base"), ("key", "k_base"), ("value", "v_base"), ("output", "o_base"),
                           ("lse", "lse_base")):
            if name == "lse" and not want_lse:
                ranges.append(None)
                continue
            start, nbytes = p0 * per_pair[name], n * per_pair[name]
            off = start // align * align
            pc[base] = (start - off) // (4 if name == "lse" else es)
            ranges.append((off, nbytes + (start - off)))
        ranges.append(None)   # the slopes, sinks, spans and mask offsets of every head
        ranges.append(mask_range)   # the general mask, whole: each head reads it through its own offset
        chunks.append((pc.tobytes(), tuple(ranges), (blocks, n * g, 1)))
    return variant.spec(d, info, tiles), tuple(chunks)


# flags bits of attn_common.glsl's push constants whose values binding 5 holds (EXTRAS_MASK: with
# the general mask in binding 6).
EXTRAS_ALIBI, EXTRAS_SINKS, EXTRAS_SPAN, EXTRAS_MASK = 4, 8, 16, 32


def mask_shape(call) -> tuple | None:
    """The broadcast shape ``(b, h, rows, keys)`` (1 or the call's extent each) in which a call's
    mask is read per (row, key) from binding 6, or None where it needs no such read: no mask, or a
    padding mask whose keys are one run per head (its span in binding 5 is all the shaders need).
    A padding mask with holes is read as ``[b, h, 1, seq_k]`` inside its span."""
    m = call.mask
    if m is None or "general_mask" not in call.features:
        return None
    if m.padding:
        return m.keys.shape[:2] + (1, m.keys.shape[2])
    return m.values.shape


def mask_strides(shape: tuple) -> tuple:
    """Element strides of a C-contiguous array of ``shape`` where its size-1 dimensions take 0:
    the strides of the call's full ``[batch, heads_q, seq_q, seq_k]`` in the broadcast array."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step if n > 1 else 0)
        step *= n
    return tuple(reversed(strides))


def mask_array(call) -> np.ndarray | None:
    """Binding 6's contents: the mask of :func:`mask_shape` as float32, booleans as 0 (visible)
    and -inf (hidden), which masked_score treats alike; None when the call needs none."""
    shape = mask_shape(call)
    if shape is None:
        return None
    m = call.mask
    values = m.keys[:, :, None, :] if m.padding else m.values
    if values.dtype == np.bool_:
        return np.where(values, np.float32(0), np.float32(-np.inf))
    return np.ascontiguousarray(values, dtype=np.float32)


def extras_flags(call) -> int:
    mask = call.mask
    if mask is None and call.alibi is None and call.sinks is None:  # the plain call, asked thrice per call
        return 0
    return ((EXTRAS_ALIBI if call.alibi is not None else 0) | (EXTRAS_SINKS if call.sinks is not None else 0)
            | (EXTRAS_SPAN if mask is not None and mask.padding else 0)
            | (EXTRAS_MASK if mask_shape(call) is not None else 0))


# Rows of binding 5 per flat head: slope, sink, span start, span end, mask plane offset.
EXTRAS_ROWS = 5


def extras_array(call) -> np.ndarray | None:
    """Binding 5's contents for a call with ALiBi, sinks or a mask: ``[5, batch * heads_q]``
    32-bit words per flat (batch, query head): the slope and the sink (float32 bits), the start and
    end of its span of visible keys (padding masks), the element offset of its plane of the general
    mask in binding 6; None when it has none of them."""
    flags = extras_flags(call)
    if not flags:
        return None
    b, hq = call.batch, call.heads_q
    n = b * hq
    out = np.zeros((EXTRAS_ROWS, n), np.uint32)
    if call.alibi is not None:
        out[0] = np.asarray(call.alibi, np.float32).reshape(n).view(np.uint32)
    if call.sinks is not None:
        out[1] = np.tile(np.asarray(call.sinks, np.float32).reshape(hq), b).view(np.uint32)
    if flags & EXTRAS_SPAN:
        span, _ = call.mask.spans(b, hq)
        out[2:4] = span.reshape(n, 2).T
    if flags & EXTRAS_MASK:
        sb, sh = mask_strides(mask_shape(call))[:2]
        out[4] = (np.arange(b, dtype=np.uint64)[:, None] * sb + np.arange(hq, dtype=np.uint64)[None, :] * sh).reshape(n)
    return out


def bind(pipeline, chunks, buffers) -> list[Dispatch]:
    """Dispatches of a plan's chunks over ``buffers`` (q, k, v, o, lse, extras, mask), each bound to its range."""
    return bind_within(pipeline, chunks, tuple((b, 0, b.nbytes) for b in buffers))


def bind_within(pipeline, chunks, regions) -> list[Dispatch]:
    """Dispatches of a plan's chunks over regions of buffers: ``(buffer, start, nbytes)`` per binding
    (q, k, v, o, lse, extras, mask), ``start`` a multiple of :func:`offset_alignment`, so several calls'
    data may share one buffer (varlen's sequences). A chunk's range lies at ``start`` plus its
    offset; a binding the plan leaves whole covers the whole region."""
    if chunks and len(regions) != len(chunks[0][1]):
        # zip would leave the last bindings unwritten: the shader would read whatever is there.
        raise ValueError(f"the plan binds {len(chunks[0][1])} buffers, {len(regions)} were given")
    out = []
    for push, ranges, groups in chunks:
        bindings = tuple((b, at, n) if r is None else (b, at + r[0], max(4, min(r[1], n - r[0])))
                         for (b, at, n), r in zip(regions, ranges))
        out.append(Dispatch(pipeline, bindings, push, groups))
    return out


# --- KV caches split across buffers ---------------------------------------------------------------
# One device buffer may hold at most maxMemoryAllocationSize bytes and be bound with at most
# maxStorageBufferRange bytes; a cache beyond either is split along its block dimension into pieces
# of whole blocks, each its own buffer, which the paged shaders bind as arrays (AULE_SPLIT).


@dataclass(frozen=True)
class CacheSplit:
    """How a ``[num_blocks, block_size, heads_kv, head_dim]`` cache lies in device buffers:
    ``pieces`` buffers of ``blocks_per_piece`` blocks each, the last holding the rest."""

    num_blocks: int
    blocks_per_piece: int
    block_bytes: int

    @property
    def pieces(self) -> int:
        return max(1, -(-self.num_blocks // self.blocks_per_piece))

    def blocks(self, i: int) -> tuple[int, int]:
        """The blocks ``[first, end)`` of piece ``i``."""
        first = i * self.blocks_per_piece
        return first, min(first + self.blocks_per_piece, self.num_blocks)

    def piece_bytes(self, i: int) -> int:
        first, end = self.blocks(i)
        return (end - first) * self.block_bytes


def piece_limit(info) -> int:
    """The most bytes one piece of a cache may take: one allocation, bound whole."""
    return min(info.max_allocation, info.max_storage_buffer_range)


def max_pieces(info) -> int:
    """The most pieces a cache may have: a copy-on-write binds source and destination K and V as
    arrays of every piece (4 per piece, plus the two slot lists), within the device's storage
    buffers per stage and the runtime's descriptors per set."""
    return max(1, (min(info.max_stage_storage_buffers, MAX_DESCRIPTORS) - 2) // 4)


def cache_split(shape: tuple, itemsize: int, info) -> CacheSplit:
    """The split of a cache of ``shape`` and element size ``itemsize`` on the device: as few
    pieces as fit :func:`piece_limit`, their blocks shared out evenly (one piece, the whole cache,
    where it fits). Raises UnsupportedError, saying why, when no split fits."""
    num_blocks, block_size, heads_kv, head_dim = (int(x) for x in shape)
    block_bytes = block_size * heads_kv * head_dim * itemsize
    limit = piece_limit(info)
    what = (f"a cache of {num_blocks} blocks x {block_bytes} bytes = {num_blocks * block_bytes} bytes on {info.name} "
            f"(at most {limit} bytes per buffer: maxMemoryAllocationSize {info.max_allocation}, "
            f"maxStorageBufferRange {info.max_storage_buffer_range})")
    if block_bytes > limit:
        raise UnsupportedError(f"{what}: one block exceeds a buffer; use a smaller block_size, heads_kv or head_dim")
    most = limit // block_bytes
    pieces = -(-num_blocks // most) if num_blocks else 1
    if pieces == 1:
        return CacheSplit(num_blocks, max(num_blocks, 1), block_bytes)
    if not info.storage_array_indexing:
        raise UnsupportedError(f"{what} must be split across {pieces} buffers, which the shaders index as arrays: "
                               f"{info.name} lacks shaderStorageBufferArrayDynamicIndexing; use at most {most} "
                               "blocks (num_blocks)")
    if pieces > max_pieces(info):
        raise UnsupportedError(f"{what} needs {pieces} buffers, more than the {max_pieces(info)} the shaders can "
                               f"bind (maxPerStageDescriptorStorageBuffers {info.max_stage_storage_buffers}): use at "
                               f"most {max_pieces(info) * most} blocks (num_blocks), or split the model's layers or "
                               "heads over several caches")
    return CacheSplit(num_blocks, -(-num_blocks // pieces), block_bytes)


# --- paged attention ------------------------------------------------------------------------------

PAGED_WG = 128
MAX_SPLITS = 64
# Workgroups a decode dispatch should have in flight; below that the context is split across more
# workgroups (split-K), above it splitting costs more in merging than it gains.
TARGET_GROUPS = {"gpu": 512, "cpu": 64}


def paged_shared_bytes(bm: int, bn: int, d: int, elem_bytes: int) -> int:
    """Mirror of glsl/paged.comp's shared arrays: Q in fp32, K/V tiles in the storage type, scores,
    probabilities and row statistics in fp32 (row_a, row_m twice, row_bad, row_slope2)."""
    d4 = d // 4
    return 16 * bm * d4 + 4 * elem_bytes * (bn * (d4 + 1) + bn * d4) + 4 * (2 * bm * (bn + 1) + 5 * bm)


def paged_tiles(rows: int, d: int, info, elem_bytes: int) -> tuple[int, int] | None:
    """(BM stacked rows, BN keys per tile) for ``rows`` rows per KV head; the widest key tile that
    fits the device's shared memory, or None."""
    bm = 4
    while bm < min(rows, 16):
        bm *= 2
    for bn in (32, 16, 8):
        if paged_shared_bytes(bm, bn, d, elem_bytes) <= info.max_shared_memory:
            return bm, bn
    return None


def paged_loop_iterations(key_tiles: int, splits: int) -> int:
    """Loop iterations one invocation of paged.comp runs (what lavapipe's loop limit counts, see
    shaders.KeyLoop); every loop of the shader is unrolled but the key-tile loop and the merge's two
    loops over the splits. llvmpipe runs a branch not taken under an all-off lane mask, and a loop
    there costs one pass, so the attention pass (``key_tiles`` tiles of its split, plus the pass that
    finds the loop done) also pays for the merge's two loops, and the merge for the key loop.
    Measured on lavapipe: one split over 65533 tiles is right, over 65534 it loses keys."""
    return max(key_tiles + PAGED_LOOP_PASSES, 2 * (splits + 1) + 1)


PAGED_LOOP_PASSES = 3  # of an attention invocation besides its key tiles (paged_loop_iterations)


def _key_tiles(call, bn: int) -> int:
    """Key tiles a row tile's range spans at most (it lies within the longest context)."""
    return -(-max(call.max_context, 1) // bn)


def paged_splits(call, bm: int, bn: int, info) -> int:
    """How many workgroups share one row tile's context: enough to reach the device's target of
    workgroups in flight, at most one per two key tiles; more where one split's key tiles would
    run past the device's loop limit (paged_unfit refuses beyond MAX_SPLITS)."""
    programs = call.batch * call.heads_kv * -(-call.group * call.q_len // bm)
    tiles = _key_tiles(call, bn)
    want = TARGET_GROUPS["cpu" if info.is_cpu else "gpu"]
    splits = max(1, min(MAX_SPLITS, -(-want // programs), tiles // 2))
    if info.loop_limit:
        most = info.loop_limit - PAGED_LOOP_PASSES  # tiles one split may walk
        splits = max(splits, -(-tiles // most))
    return splits


# The subgroup path (glsl/paged.comp's AULE_PAGED_SG): decode-sized row tiles, K and V in registers.
PAGED_SG_ROWS = 8        # most stacked rows per workgroup (registers per lane grow with them)
PAGED_SG_SUBGROUPS = 4   # subgroups per workgroup, fewer where their combine exceeds shared memory
PAGED_SG_KEYS = 4        # keys each lane group has in flight per step
# Workgroups the subgroup path aims for, and the fewest keys a split keeps: shorter splits cost more
# in their fixed work (q, the combine, the merge) than they add in parallelism. On the H200 half the
# splits of a 1024-workgroup target were 3-6% faster at b8 ctx 8k/32k and b64 ctx 4k
# (results/notes/vulkan_paged_NOTES.md).
SG_TARGET_GROUPS = {"gpu": 512, "cpu": 64}
SG_MIN_SPLIT_KEYS = 256


@dataclass(frozen=True)
class PagedKernel:
    """How mode 0 of glsl/paged.comp runs: ``tiled`` (BM rows x BN keys through shared memory) or
    ``subgroup`` (BM rows, BN lanes per key row, KT keys in flight per lane group, AULE_PAGED_SG)."""

    kind: str
    bm: int
    bn: int
    wg: int
    kt: int = 1
    sg: int = 0

    @property
    def keys_per_step(self) -> int:
        """Keys one pass of the key loop covers (what lavapipe's loop limit counts per pass)."""
        return self.bn if self.kind == "tiled" else self.wg // self.bn * self.kt

    @property
    def spec(self) -> tuple:
        base = ((1, self.bm), (2, self.bn), (3, self.wg))
        return base + (((4, self.sg), (5, self.kt)) if self.kind == "subgroup" else ())

    @property
    def split_ids(self) -> tuple:
        """The constant ids of a split cache's piece count and blocks per piece (after the
        subgroup path's own two)."""
        return (6, 7) if self.kind == "subgroup" else (4, 5)


def paged_sg_shared_bytes(bm: int, d: int, subgroups: int) -> int:
    """Mirror of the subgroup path's shared arrays: each subgroup's accumulators and (m, l) per row."""
    return subgroups * bm * (16 * (d // 4) + 8)


def _sg_kernel(call, info, choice) -> PagedKernel | str:
    """The subgroup path's kernel for ``call`` on the device, or why it has none."""
    elem = np.dtype(call.dtype).itemsize
    rows, d, sg = call.group * call.q_len, call.head_dim, info.subgroup_size
    why = MODULES["paged_sg_fp16" if call.dtype == "float16" else "paged_sg"].needs.unfit("the subgroup paged path", info)
    if why:
        return why
    if rows > PAGED_SG_ROWS:
        return f"{rows} stacked rows per KV head exceed the subgroup path's {PAGED_SG_ROWS}"
    if (d * elem) % 16:
        return f"a head_dim {d} row of {d * elem} bytes is not whole 16-byte chunks"
    if sg < 1 or sg & (sg - 1):
        return f"subgroup size {sg} is not a power of two"
    chunks = d * elem // 16
    lanes = choice.lanes or min(sg, 16, 1 << max(0, (-(-chunks // 2) - 1).bit_length()))
    if lanes > sg:
        return f"{lanes} lanes per key exceed the subgroup size {sg}"
    wg = choice.invocations or min(PAGED_SG_SUBGROUPS * sg, info.max_workgroup_size)
    if wg % sg or wg > info.max_workgroup_size:
        return f"{wg} invocations are not whole subgroups of {sg} within the device's {info.max_workgroup_size}"
    while paged_sg_shared_bytes(rows, d, wg // sg) > info.max_shared_memory:
        if choice.invocations or wg == sg:
            return (f"the subgroup path's combine of {wg // sg} subgroups needs "
                    f"{paged_sg_shared_bytes(rows, d, wg // sg)} bytes of shared memory, more than {info.max_shared_memory}")
        wg //= 2
    return PagedKernel("subgroup", rows, lanes, wg, choice.keys or PAGED_SG_KEYS, sg)


def paged_kernel(call, info) -> PagedKernel | None:
    """The mode-0 kernel for ``call``: the subgroup path for decode-sized row tiles on GPUs, the
    tiled path otherwise (and on CPU drivers, where the tiled one is the measured default);
    AULE_VULKAN_PAGED forces either. None: neither fits; a forced subgroup path that does not fit
    raises UnsupportedError saying why."""
    choice = settings.paged_choice()
    elem = np.dtype(call.dtype).itemsize
    if choice.kernel == "subgroup" or (choice.kernel is None and not info.is_cpu):
        k = _sg_kernel(call, info, choice)
        if isinstance(k, PagedKernel):
            return k
        if choice.kernel == "subgroup":
            raise UnsupportedError(f"AULE_VULKAN_PAGED=subgroup: {k}")
    tiles = paged_tiles(call.group * call.q_len, call.head_dim, info, elem)
    return None if tiles is None else PagedKernel("tiled", *tiles, PAGED_WG)


def paged_kernel_splits(call, kernel: PagedKernel, info) -> int:
    """Splits of the context for ``kernel``: AULE_VULKAN_PAGED's when it names them, the tiled
    path's rule (:func:`paged_splits`), or the subgroup path's: enough workgroups for the device's
    target, each split at least SG_MIN_SPLIT_KEYS keys, more where the loop limit asks."""
    forced = settings.paged_choice().splits
    if kernel.kind == "tiled" and not forced:
        return paged_splits(call, kernel.bm, kernel.bn, info)
    programs = call.batch * call.heads_kv * -(-call.group * call.q_len // kernel.bm)
    keys = max(call.max_context, 1)
    want = SG_TARGET_GROUPS["cpu" if info.is_cpu else "gpu"]
    splits = forced or max(1, min(MAX_SPLITS, -(-want // programs), keys // SG_MIN_SPLIT_KEYS))
    if info.loop_limit:
        most = (info.loop_limit - PAGED_LOOP_PASSES) * kernel.keys_per_step  # keys one split may walk
        splits = max(splits, -(-keys // most))
    return splits


def _split_steps(call, kernel: PagedKernel, splits: int) -> int:
    """Passes of the key loop one split runs at most."""
    if kernel.kind == "tiled":
        return -(-_key_tiles(call, kernel.bn) // splits)
    return -(-(-(-max(call.max_context, 1) // splits)) // kernel.keys_per_step)


def paged_unfit(call, info) -> str | None:
    """Why the paged module cannot run ``call``'s shape on the device, else None."""
    if call.batch == 0 or call.q_len == 0:
        return None  # no rows: launch answers with zeros, no dispatch (and no split count) is planned
    try:
        kernel = paged_kernel(call, info)
    except UnsupportedError as exc:
        return str(exc)
    if kernel is None:
        return f"head_dim {call.head_dim} needs more shared memory than {info.name}'s {info.max_shared_memory} bytes"
    gx, gy = info.max_workgroup_count[0], info.max_workgroup_count[1]
    attend, merge = _paged_grids(call, kernel.bm, 1)
    if any(g > limit for grid in (attend, merge) for g, limit in zip(grid, (gx, gy))):
        rows = (f"{call.num_tokens} packed rows (at most {call.q_len} a sequence)" if call.packed
                else f"q_len {call.q_len}")
        return f"batch {call.batch} x heads {call.heads_q} x {rows} exceeds the device's workgroup grid"
    if info.loop_limit:
        splits = paged_kernel_splits(call, kernel, info)
        if splits > MAX_SPLITS or paged_loop_iterations(_split_steps(call, kernel, splits), splits) > info.loop_limit:
            most = (info.loop_limit - PAGED_LOOP_PASSES) * kernel.keys_per_step
            return (f"a context of {call.max_context} keys needs {splits} splits of at most {most} keys on "
                    f"{info.name}, which silently ends every loop after {info.loop_limit} in total; the "
                    f"merge takes at most {MAX_SPLITS} splits, so the context may be at most "
                    f"{MAX_SPLITS * most} keys here")
    return None


@dataclass(frozen=True)
class PagedPlan:
    module: str
    spec: tuple
    splits: int
    attend: tuple       # (push bytes, groups) of the attention dispatch
    merge: tuple | None  # the same for the merge of the splits, None with one split
    kernel: PagedKernel | None = None


def _paged_grids(call, bm: int, splits: int) -> tuple[tuple, tuple]:
    """Workgroups of the attention and the merge dispatch. A packed call's row tiles are sized for
    its longest sequence (``q_len``), and its merge runs over the rows of q, one head per y."""
    attend = (call.batch * call.heads_kv, -(-call.group * call.q_len // bm), splits)
    if call.packed:
        return attend, (call.num_tokens, call.heads_q, 1)
    return attend, (call.batch * call.heads_q, call.q_len, 1)


def paged_features(call) -> tuple[int, np.ndarray]:
    """``(flags, words)`` of a paged call's softcap, ALiBi and sinks: the push constant's flag bits
    (attn_common.glsl's) and the int32 words that follow the lengths (and a packed call's offsets)
    in binding 4, the slopes ``[B, Hq]`` then the sinks ``[Hq]`` as float32 bits."""
    flags = (2 if call.softcap else 0) | (EXTRAS_ALIBI if call.alibi is not None else 0) \
        | (EXTRAS_SINKS if call.sinks is not None else 0)
    parts = [np.asarray(x, np.float32).reshape(-1).view(np.int32) for x in (call.alibi, call.sinks) if x is not None]
    return flags, np.concatenate(parts) if parts else np.zeros(0, np.int32)


def paged_lengths_words(call) -> int:
    """Words of binding 4 before the features: the lengths, then a packed call's offsets."""
    return call.batch + (call.batch + 1 if call.packed else 0)


def paged_plan(call, info, split: CacheSplit | None = None) -> PagedPlan:
    """The dispatches of a paged call; ``split``: how its cache lies in buffers when it is split
    across several (the split module, its pieces bound as arrays), else None."""
    kernel = paged_kernel(call, info)
    bm = kernel.bm
    splits = paged_kernel_splits(call, kernel, info)
    pc = np.zeros((), dtype=PAGED_PUSH)
    pc["heads_kv"], pc["group"], pc["q_len"] = call.heads_kv, call.group, call.q_len
    # A window reaching past the longest context is no window (and fits the int32 push constant).
    pc["block_size"], pc["max_blocks"] = call.block_size, call.max_blocks
    pc["left"] = unbounded_beyond(call.left, call.max_context)
    pc["scale_log2"] = call.scale * LOG2E
    pc["num_splits"], pc["mode"], pc["packed"], pc["batch"] = splits, 0, int(call.packed), call.batch
    pc["softcap2"], pc["flags"] = call.softcap * LOG2E, paged_features(call)[0]
    pc["slopes_at"] = paged_lengths_words(call)
    pc["sinks_at"] = pc["slopes_at"] + (call.batch * call.heads_q if call.alibi is not None else 0)
    attend_groups, merge_groups = _paged_grids(call, bm, splits)
    attend = (pc.tobytes(), attend_groups)
    merge = None
    if splits > 1:
        pc["mode"] = 1
        merge = (pc.tobytes(), merge_groups)
    spec = ((0, call.head_dim),) + kernel.spec
    module = "paged"
    if split is not None and split.pieces > 1:
        module = "paged_split"
        spec += tuple(zip(kernel.split_ids, (split.pieces, split.blocks_per_piece)))
    module += "_sg" if kernel.kind == "subgroup" else ""
    return PagedPlan(module + ("_fp16" if call.dtype == "float16" else ""), tuple(sorted(spec)), splits, attend, merge, kernel)


# --- cache row copies -------------------------------------------------------------------------------

COPY_WG = 64


def copy_pushes(n: int, row_bytes: int, info) -> list[tuple[bytes, tuple]]:
    """(push bytes, groups) of the dispatches copying ``n`` cache rows of ``row_bytes``: one
    workgroup per row, cut where the grid's x limit ends."""
    if row_bytes % 4:
        raise UnsupportedError(f"a cache row of {row_bytes} bytes is not whole 32-bit words")
    limit = info.max_workgroup_count[0]
    out = []
    for t0 in range(0, n, limit):
        pc = np.zeros((), dtype=COPY_PUSH)
        pc["row_words"], pc["num_tokens"], pc["token_base"] = row_bytes // 4, n, t0
        out.append((pc.tobytes(), (min(limit, n - t0), 1, 1)))
    return out

"""Paged attention on CUDA and ROCm through Triton: decode, chunked prefill and split-K.

One program serves one (sequence, KV head, row tile, context split). Its rows are the query
heads of the KV head's group stacked with the query positions (row ``r`` is position ``r // GROUP``
of head ``r % GROUP``), so K/V are read once for the whole group and never expanded. Keys are
walked in tiles of ``BLOCK_N`` positions; each position's block id comes from the block table,
so a tile may span several cache blocks (small blocks) or part of one (large blocks).

Decode has few rows and, with a short batch, few programs: the context is then split across
``NUM_SPLITS`` programs (flash-decoding) whose partial results carry their base-2 log-sum-exp and
are merged by a second kernel. Keys outside the window or past the context are masked out of
every load, so they are never read, and no NaN in unused cache memory can reach the output.

Softcap and ALiBi (SOFTCAP, HAS_ALIBI) modify every score as the dense kernels do
(:func:`aule.backends.triton.kernels._scores2`), each row with its own head's slope and its position
in the sequence. Sinks (HAS_SINKS) are one more term of each row's whole softmax, so they join once:
after the last key tile when the context is not split, else in the merge, never in a split's partial.

With ``CHECK`` on (tables from the caller, not from a :class:`aule.kv_cache.PagedKVCache`) the
kernels check every table entry they are about to follow instead of the host reading the tables
back, which would be a synchronisation: a context length outside ``[0, max_blocks * block_size]``
is taken as 0, a used block id outside ``[0, num_blocks)`` as block 0, a slot past the cache is
skipped, and the first such entry of a launch is recorded in its error flag (:mod:`.flags`), which
aule raises as ``ValueError``. The rows of a sequence with a bad entry are then meaningless, but
nothing outside the cache, the tables and the output is read or written.
"""
from __future__ import annotations

import functools
import logging

import triton
import triton.language as tl

from . import flags as _flags
from . import ops as _ops
from .devcheck import (BLOCK_ID, CONTEXT_LEN, QUERY_BOUND, QUERY_ROWS, QUERY_START, SINK, SLOPE, SLOT,
                       check_finite, record as _record)
from .common import (LOG2E, MAX_HEAD_DIM, block_d, cdiv, feature_table, interpreting, next_pow2,
                     torch_gpu_flavour)
from .kernels import _finish_rows, _join_sink, _scores2, _shift

log = logging.getLogger("aule")

MAX_SPLITS = 64


@triton.jit
def _paged_tiles(acc, l_i, m_i, q, kv_head_k, kv_head_v, bt_row, t_from, t_to, k_lo, k_hi, pos, LEFT,
                 scale2, cap_in, cap_out, slope2, offs_d, d_ok, stride_kb, stride_kt, stride_kd, stride_vb,
                 stride_vt, stride_vd, b, ERR, DIRTY, NUM_BLOCKS,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr,
                 MASKED: tl.constexpr, PAD_D: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr,
                 PRECISION: tl.constexpr, CHECK: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Online softmax over key tiles ``[t_from, t_to)``. MASKED tiles may cross the context's
    ends, the window or the causal diagonal; the others are fully visible to every row and load
    without predicates. ``slope2 [BLOCK_M]``: each row's ALiBi slope times log2(e)."""
    for t in range(t_from, t_to):
        offs_n = t * BLOCK_N + tl.arange(0, BLOCK_N)
        if MASKED:
            n_ok = (offs_n >= k_lo) & (offs_n < k_hi)
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE, mask=n_ok, other=0)
        else:
            blk = tl.load(bt_row + offs_n // BLOCK_SIZE)
        if CHECK:
            bad = (blk < 0) | (blk >= NUM_BLOCKS)
            if MASKED:
                bad = bad & n_ok
            if tl.max(bad.to(tl.int32), 0) > 0:
                first = tl.min(tl.where(bad, offs_n, 2147483647), 0)
                _record(ERR, DIRTY, BLOCK_ID, b, first // BLOCK_SIZE, tl.sum(tl.where(offs_n == first, blk, 0), 0))
            # Block 0 stands in for a bad id: the loads stay unpredicated on full tiles, and in bounds.
            blk = tl.where(bad, 0, blk)
        if WIDE:  # caches past 2**31 elements need 64-bit offsets
            blk = blk.to(tl.int64)
        slot = offs_n % BLOCK_SIZE
        k_ptrs = kv_head_k + (blk * stride_kb + slot * stride_kt)[:, None] + offs_d[None, :] * stride_kd
        v_ptrs = kv_head_v + (blk * stride_vb + slot * stride_vt)[:, None] + offs_d[None, :] * stride_vd
        if MASKED:
            k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif PAD_D:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
        if UPCAST:
            k = k.to(tl.float32)
        s, _ = _scores2(tl.dot(q, tl.trans(k), input_precision=PRECISION), pos[:, None], offs_n[None, :], scale2,
                        cap_in, cap_out, slope2[:, None], SOFTCAP, HAS_ALIBI)
        if MASKED:
            vis = n_ok[None, :] & (offs_n[None, :] <= pos[:, None])
            if HAS_LEFT:
                vis = vis & (offs_n[None, :] >= pos[:, None] - LEFT)
            s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = _shift(m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED:
            v = tl.load(v_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        elif PAD_D:
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _query_rows(QSL, b, ctx, ERR, DIRTY, BATCH, NUM_TOKENS, MAX_Q, CHECK: tl.constexpr):
    """``(first row, rows)`` of sequence ``b`` of a packed q: ``query_start_loc[b]`` and ``n_b``
    (``MAX_Q``: the launch's bound on ``n_b``, which sized its grid).

    Checked, each sequence vouches for its end offset (and sequence 0 for offset 0), so every bad
    offset is some sequence's to record: an offset past ``num_tokens`` or below the one before it
    (which is also how a negative one or one past the end shows), a last one short of
    ``num_tokens``. A sequence whose offsets are bad gets no rows, so no row outside q is read or
    written. More rows than keys, or than the launch's bound, are recorded too; the rows are still
    in q, and are attended (or, past the bound, not) as the grid allows."""
    start = tl.load(QSL + b)
    end = tl.load(QSL + b + 1)
    if CHECK:
        # Compared at the table's own width: an int64 offset must not wrap into range first.
        first_bad = (b == 0) & (start != 0)
        if first_bad:
            _record(ERR, DIRTY, QUERY_START, b, b * 0, start)
        past = end > NUM_TOKENS
        down = end < start
        short = (b == BATCH - 1) & (end != NUM_TOKENS)
        if past | down | short:
            _record(ERR, DIRTY, QUERY_START, b + 1, tl.where(past, 2, tl.where(down, 1, 3)), end)
        # An offset before 0 or past the end is also the end of the sequence before: recorded there.
        insane = first_bad | past | down | short | (start < 0) | (start > NUM_TOKENS)
        n = tl.where(insane, 0, end - start)
        start = tl.where(insane, 0, start)
        if n > ctx:
            _record(ERR, DIRTY, QUERY_ROWS, b, ctx, n)
        if n > MAX_Q:
            _record(ERR, DIRTY, QUERY_BOUND, b, b * 0 + MAX_Q, n)
    else:
        n = end - start
    return start.to(tl.int32), n.to(tl.int32)


@triton.jit
def _paged_attn_fwd(
        Q, KC, VC, BT, CL, QSL, O, PO, ERR, DIRTY, ALIBI, SINKS,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kt, stride_kh, stride_kd,
        stride_vb, stride_vt, stride_vh, stride_vd,
        stride_bt, stride_ob, stride_oh, stride_om, stride_od,
        HEADS_KV, NUM_SPLITS, scale2, cap_in, cap_out, LEFT, NUM_BLOCKS, CAPACITY, BATCH, NUM_TOKENS, MAX_Q,
        Q_LEN: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr,
        SPLIT: tl.constexpr, UPCAST: tl.constexpr, WIDE: tl.constexpr, PRECISION: tl.constexpr,
        CHECK: tl.constexpr, PACKED: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
        HAS_SINKS: tl.constexpr):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // HEADS_KV
    hk = pid_bh % HEADS_KV
    ctx = tl.load(CL + b)
    if CHECK:
        # Compared at the table's own width: an int64 length must not wrap into range first.
        bad_len = (ctx < 0) | (ctx > CAPACITY)
        if bad_len:
            _record(ERR, DIRTY, CONTEXT_LEN, b, b * 0, ctx)
        # An empty cache has no block for any key: the row's first entry is out of range.
        no_block = (ctx > 0) & (NUM_BLOCKS == 0) & ~bad_len
        if no_block:
            _record(ERR, DIRTY, BLOCK_ID, b, b * 0, tl.load(BT + b * stride_bt))
        ctx = tl.where(bad_len | no_block, 0, ctx)
    ctx = ctx.to(tl.int32)
    # The sequence's rows: q_len of its own batch entry, or n_b packed ones from row tok0 (dimension 0
    # of a packed q is the token, so its stride_qb is 0 and stride_qm the token stride). Partial
    # results of the splits are kept per (row of q, head) either way: tok0 numbers the rows of q.
    if PACKED:
        tok0, n_q = _query_rows(QSL, b, ctx, ERR, DIRTY, BATCH, NUM_TOKENS, MAX_Q, CHECK)
        q_off = tok0
    else:
        n_q = ctx * 0 + Q_LEN
        tok0 = b * Q_LEN
        q_off = b * 0

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < GROUP * n_q
    qi = rows // GROUP
    head = hk * GROUP + rows % GROUP
    pos = ctx - n_q + qi  # key position of each row; < 0 for rows before the context
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q_ptrs = (Q + b * stride_qb + head[:, None] * stride_qh + (q_off + qi)[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # Keys any row of this tile can see: causal up to the last row's position, the window from
    # the first row's left edge. Keys in [full_lo, full_hi) are visible to every row.
    # A tile past the sequence's rows (packed: the grid is sized for the longest) walks no key tile.
    empty = pid_m * BLOCK_M >= GROUP * n_q
    first_pos = ctx - n_q + (pid_m * BLOCK_M) // GROUP
    last_pos = ctx - n_q + tl.maximum(tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, GROUP * n_q - 1), 0) // GROUP
    k_hi = tl.where(empty, 0, tl.minimum(ctx, last_pos + 1))
    full_hi = tl.minimum(ctx, first_pos + 1)
    k_lo = ctx * 0
    full_lo = ctx * 0
    if HAS_LEFT:
        k_lo = tl.maximum(first_pos - LEFT, 0)
        full_lo = tl.maximum(last_pos - LEFT, 0)
    t_lo = k_lo // BLOCK_N
    t_hi = tl.maximum((k_hi + BLOCK_N - 1) // BLOCK_N, t_lo)
    # Unmasked tiles: wholly inside [full_lo, full_hi). Clamped so the three runs tile [t_lo, t_hi).
    u_lo = tl.minimum(tl.maximum((full_lo + BLOCK_N - 1) // BLOCK_N, t_lo), t_hi)
    u_hi = tl.maximum(tl.minimum(full_hi // BLOCK_N, t_hi), u_lo)
    per = (t_hi - t_lo + NUM_SPLITS - 1) // NUM_SPLITS
    t_start = t_lo + split * per
    t_end = tl.minimum(t_start + per, t_hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bt_row = BT + b * stride_bt
    kv_head_k = KC + hk * stride_kh
    kv_head_v = VC + hk * stride_vh
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    if CHECK and (HAS_ALIBI or HAS_SINKS):
        # Slopes and sinks a caller left on the device: one program per (sequence, KV head) checks
        # its group's. A bad one is still used; its rows are meaningless, never out of bounds.
        if (pid_m == 0) & (split == 0):
            for g in tl.static_range(GROUP):
                if HAS_ALIBI:
                    check_finite(tl.load(ALIBI + b * (HEADS_KV * GROUP) + hk * GROUP + g), ERR, DIRTY, SLOPE, b,
                                 hk * GROUP + g)
                if HAS_SINKS:
                    check_finite(tl.load(SINKS + hk * GROUP + g), ERR, DIRTY, SINK, hk * GROUP + g, b * 0)
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b * (HEADS_KV * GROUP) + head, mask=row_ok, other=0.0) * 1.4426950408889634
    else:
        slope2 = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, kv_head_k, kv_head_v, bt_row, t_start, tl.minimum(t_end, u_lo), k_lo, k_hi, pos,
        LEFT, scale2, cap_in, cap_out, slope2, offs_d, d_ok, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt,
        stride_vd, b, ERR, DIRTY, NUM_BLOCKS, BLOCK_SIZE, BLOCK_N, HAS_LEFT, True, PAD_D, UPCAST, WIDE, PRECISION,
        CHECK, SOFTCAP, HAS_ALIBI)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, kv_head_k, kv_head_v, bt_row, tl.maximum(t_start, u_lo), tl.minimum(t_end, u_hi),
        k_lo, k_hi, pos, LEFT, scale2, cap_in, cap_out, slope2, offs_d, d_ok, stride_kb, stride_kt, stride_kd,
        stride_vb, stride_vt, stride_vd, b, ERR, DIRTY, NUM_BLOCKS, BLOCK_SIZE, BLOCK_N, HAS_LEFT, False, PAD_D,
        UPCAST, WIDE, PRECISION, CHECK, SOFTCAP, HAS_ALIBI)
    acc, l_i, m_i = _paged_tiles(
        acc, l_i, m_i, q, kv_head_k, kv_head_v, bt_row, tl.maximum(t_start, u_hi), t_end, k_lo, k_hi, pos,
        LEFT, scale2, cap_in, cap_out, slope2, offs_d, d_ok, stride_kb, stride_kt, stride_kd, stride_vb, stride_vt,
        stride_vd, b, ERR, DIRTY, NUM_BLOCKS, BLOCK_SIZE, BLOCK_N, HAS_LEFT, True, PAD_D, UPCAST, WIDE, PRECISION,
        CHECK, SOFTCAP, HAS_ALIBI)

    if HAS_SINKS:
        if not SPLIT:  # split, the merge joins it
            # A row that saw no key is zeros, whatever 0 * value its accumulator holds (the join scales
            # it by 0 and gives it l = 1).
            unseen = m_i == float("-inf")
            sink2 = tl.load(SINKS + head, mask=row_ok, other=0.0) * 1.4426950408889634
            acc, l_i, m_i = _join_sink(acc, l_i, m_i, sink2)
            acc = tl.where(unseen[:, None], 0.0, acc)
    out, lse2 = _finish_rows(acc, l_i, m_i)
    if SPLIT:
        # Partial result of this split: its output and its (maximum, sum) in base 2, merged by
        # _paged_attn_merge. Kept apart, not as one LSE: beside logits of 1e7 and more an fp32 LSE has
        # no bits left for log2(sum), and ties across splits would be weighed by split, not by key.
        # A split that is empty, NaN or +inf (aule.masks' rule) stores its LSE as the maximum.
        prow = ((tok0 + qi) * (HEADS_KV * GROUP) + head) * NUM_SPLITS + split
        # The (maximum, sum) pairs follow the partial outputs in the one scratch (see _partials).
        PL = PO + NUM_TOKENS * (HEADS_KV * GROUP) * NUM_SPLITS * BLOCK_D
        finite = tl.abs(lse2) < float("inf")
        tl.store(PL + 2 * prow, tl.where(finite, m_i, lse2), mask=row_ok)
        tl.store(PL + 2 * prow + 1, tl.where(finite, l_i, tl.where(lse2 == float("-inf"), 0.0, 1.0)), mask=row_ok)
        tl.store(PO + prow[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        o_ptrs = (O + b * stride_ob + head[:, None] * stride_oh + (q_off + qi)[:, None] * stride_om
                  + offs_d[None, :] * stride_od)
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _paged_attn_merge(PO, O, SINKS, stride_ob, stride_oh, stride_om, stride_od, HEADS_Q, NUM_SPLITS,
                      Q_LEN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_S: tl.constexpr, PACKED: tl.constexpr, HAS_SINKS: tl.constexpr):
    row = tl.program_id(0)  # (row of q, head) flattened, rows numbered as _paged_attn_fwd's tok0 does
    head = row % HEADS_Q
    tok = row // HEADS_Q
    if PACKED:
        b = tok * 0  # a packed output's stride_ob is 0: the token is its dimension 0
        qi = tok
    else:
        b = tok // Q_LEN
        qi = tok % Q_LEN
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    at = 2 * (row * NUM_SPLITS + offs_s)
    PL = PO + tl.num_programs(0) * NUM_SPLITS * BLOCK_D  # one program per (row, head): _partials' layout
    ms = tl.load(PL + at, mask=s_ok, other=float("-inf"))
    ls = tl.load(PL + at + 1, mask=s_ok, other=0.0)
    m = tl.max(ms, 0)  # skips NaN: a NaN split shows in total instead
    if HAS_SINKS:
        # The sink joins the merged row once, as one more term of value 0 (no split holds it).
        sink2 = tl.load(SINKS + head) * 1.4426950408889634
        m = tl.maximum(m, sink2)  # keeps a +inf maximum: the row stays NaN
        extra = tl.math.exp2(sink2 - _shift(m))
    else:
        extra = 0.0
    w = ls * tl.math.exp2(ms - _shift(m))  # 0 for empty splits and padding lanes
    total = tl.sum(w, 0) + extra
    part = tl.load(PO + (row * NUM_SPLITS + offs_s)[:, None] * BLOCK_D + offs_d[None, :],
                   mask=s_ok[:, None], other=0.0)
    ok = (tl.abs(m) < float("inf")) & (total == total)
    out = tl.sum(part * w[:, None], 0) / tl.where(ok, total, 1.0)
    # The splits' rule, merged: a NaN or +inf split poisons the row, all empty leaves zeros.
    poisoned = (total != total) | (m == float("inf"))
    out = tl.where(ok, out, tl.where(poisoned, float("nan"), 0.0))
    tl.store(O + b * stride_ob + head * stride_oh + qi * stride_om + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit
def _copy_kv_to_paged(K, V, KC, VC, SLOTS, ERR, DIRTY,
                      stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                      stride_cb, stride_ct, stride_ch, stride_cd,
                      stride_db, stride_dt, stride_dh, stride_dd, CAPACITY,
                      HEADS_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      CHECK: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(SLOTS + t).to(tl.int64)
    keep = slot >= 0  # a negative slot is padding: skip the token
    if CHECK:
        if slot >= CAPACITY:
            _record(ERR, DIRTY, SLOT, t, t * 0, slot)
        keep = keep & (slot < CAPACITY)
    if keep:
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_h[:, None] < HEADS_KV) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd, mask=ok)
        v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd, mask=ok)
        tl.store(KC + blk * stride_cb + off * stride_ct + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd,
                 k, mask=ok)
        tl.store(VC + blk * stride_db + off * stride_dt + offs_h[:, None] * stride_dh + offs_d[None, :] * stride_dd,
                 v, mask=ok)


# ---------------------------------------------------------------------------------------------------
# launch configuration


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> tuple[int, int]:
    """(multiprocessors, shared memory bytes per multiprocessor) of a torch device."""
    import torch

    props = torch.cuda.get_device_properties(index)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or SMEM_PER_SM
    return props.multi_processor_count, int(smem)


def choose_config(batch, heads_kv, group, q_len, head_dim, max_context, device_index, amd=False, itemsize=2):
    """``(BLOCK_M, BLOCK_N, num_warps, num_stages, num_splits, m_tiles)`` for a call.

    Measured on an H100 (what `aule bench --suite decode_tune` sweeps; fp16, head_dim 128): 64-key tiles, 4 warps,
    2 pipeline stages read the cache fastest of the configurations tried (32-key tiles with 3 or
    4 stages, 2 or 8 warps were 1-5% slower). Split-K fills the GPU when ``batch * heads_kv`` programs cannot: as
    many splits as fit in ONE wave of resident programs (a second, partial wave would leave most
    multiprocessors idle while it runs), and at least two, never below ``MIN_TILES`` key tiles per split.
    """
    rows = group * q_len
    block_m = max(16, min(64, next_pow2(rows)))
    m_tiles = cdiv(rows, block_m)
    bd = block_d(head_dim)
    block_n = 64 if bd * itemsize <= 256 else 32  # keeps a stage of K+V tiles at 32 KB
    num_warps = 4
    num_stages = 1 if amd else 2
    if interpreting():
        return block_m, 16, 1, 1, min(4, max(1, cdiv(max_context, 16))), m_tiles
    smem = num_stages * block_n * bd * itemsize * 2 + block_m * bd * itemsize
    sms, smem_per_sm = _device_limits(device_index)
    slots = sms * max(1, min(8, smem_per_sm // smem))
    programs = batch * heads_kv * m_tiles
    tiles = cdiv(max(max_context, 1), block_n)
    # At least two splits where the context has the tiles: with more programs than one wave
    # holds, halving each program's key run still paid on the H200 (b64 32/8 heads d128 fp16,
    # graph replay: ctx 1k 3.25 -> 3.59 TB/s, ctx 4k 3.49 -> 4.17 TB/s; 3 to 16 splits were slower).
    splits = max(1, min(MAX_SPLITS, max(slots // programs, 2), tiles // MIN_TILES))
    return block_m, block_n, num_warps, num_stages, splits, m_tiles


SMEM_PER_SM = 227 * 1024  # fallback when torch does not report it (H100/H200's figure)
MIN_TILES = 2


def _index_table(t, torch):
    """An integer table as the kernels read it: int32 or int64 as given (another width is widened,
    never narrowed: a wrapped value could pass the kernels' bounds checks), unit stride in its last
    dimension. No copy for what the public API is normally given."""
    if t.dtype not in (torch.int32, torch.int64):
        t = t.to(torch.int64)
    return t if t.stride(-1) == 1 else t.contiguous()


def paged_attention_triton(q, k_cache, v_cache, block_tables, context_lens, scale, left, max_context,
                           out=None, config=None, check=False, query_start_loc=None, max_query_len=None,
                           softcap=0.0, alibi=None, sinks=None):
    """Launch the paged kernels on validated torch tensors (see :mod:`aule.paged_call`).

    ``left`` is the window's left extent (-1 unbounded; paged attention is always causal).
    ``max_context`` only sizes the split; any value >= 1 is safe, longer contexts are still
    attended in full. ``config`` overrides :func:`choose_config` (benchmarks tune with it).
    ``check``: the kernel bounds-checks the tables and reports through an error flag (tables the
    host has not checked); off, the tables must be valid. With ``query_start_loc [batch + 1]`` q
    is packed ``[num_tokens, Hq, D]`` and ``max_query_len`` (default ``num_tokens``) bounds each
    sequence's rows: it sizes the grid (row tiles per sequence) and the split, so no offset is read
    here. ``softcap``, ``alibi [B, Hq]`` and ``sinks [Hq]`` (float32 NumPy arrays or tensors, or
    ``None``) as in :mod:`aule.masks`. Returns ``out`` (q's shape and dtype). Nothing here reads device memory back, and the
    scratch is allocated per call, so inside a CUDA graph capture it comes from the graph's pool
    and the launch replays as is.
    """
    import torch

    packed = query_start_loc is not None
    if packed:
        num_tokens, heads_q, head_dim = q.shape
        batch = context_lens.shape[0]
        q_len = num_tokens if max_query_len is None else max_query_len
    else:
        batch, heads_q, q_len, head_dim = q.shape
        num_tokens = batch * q_len
    num_blocks, block_size, heads_kv = k_cache.shape[:3]
    group = heads_q // heads_kv
    # Repeatable (aule.fastcall) only with an output of its own and tables the kernels read as given.
    repeatable = out is None and alibi is None and sinks is None
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    block_tables, context_lens = _index_table(block_tables, torch), _index_table(context_lens, torch)
    # Offsets given as host data were checked on the host; they are copied to where the kernel reads.
    qsl = _index_table(torch.as_tensor(query_start_loc, device=q.device), torch) if packed else context_lens
    max_blocks = block_tables.shape[1]
    flag, err, dirty = _flags.open_flag(check, context_lens, kernel="paged attention", device=str(q.device),
                                  num_blocks=num_blocks, block_size=block_size, max_blocks=max_blocks,
                                  num_tokens=num_tokens, max_query_len=q_len, alibi_ndim=2)
    dev = q.device.index or 0
    block_m, block_n, num_warps, num_stages, splits, m_tiles = config or choose_config(
        batch, heads_kv, group, max(q_len, 1), head_dim, max_context, dev, amd=torch_gpu_flavour() == "hip",
        itemsize=q.element_size())
    bd = block_d(head_dim)
    # One allocation for the splits' partial outputs and their (maximum, sum) pairs: a serving step's
    # host time is counted in allocations too.
    po = _partials(torch, num_tokens * heads_q * splits, bd, q.device) if splits > 1 else out  # unused unsplit
    # A packed q and output are [num_tokens, Hq, D]: as [B, Hq, rows, D] with no batch stride.
    q_strides = (0, q.stride(1), q.stride(0), q.stride(2)) if packed else q.stride()
    o_strides = (0, out.stride(1), out.stride(0), out.stride(2)) if packed else out.stride()
    # The features' small tables go where the kernels read them (copies: validated NumPy tables may be
    # read-only views of the caller's arrays); absent ones pass any tensor, never read.
    # A caller's tensor (left on the device: its values checked in the kernel) is converted there.
    alibi_t, sinks_t = (out if x is None else feature_table(x, shape, q.device)
                        for x, shape in ((alibi, (batch, heads_q)), (sinks, (heads_q,))))
    cap_in, cap_out = (float(scale) / softcap, softcap * LOG2E) if softcap else (0.0, 0.0)
    grid = (batch * heads_kv, m_tiles, splits)
    args = (q, k_cache, v_cache, block_tables, context_lens, qsl, out, po, err, dirty, alibi_t, sinks_t,
            *q_strides, *k_cache.stride(), *v_cache.stride(), block_tables.stride(0), *o_strides,
            heads_kv, splits, float(scale) * LOG2E, cap_in, cap_out, max(left, 0), num_blocks,
            # Key positions are int32 in the kernel; no table holds more keys than that anyway.
            min(max_blocks * block_size, 2 ** 31 - 1), batch, num_tokens, q_len)
    # Packed, the row bound is a runtime argument: a new num_tokens every step compiles nothing.
    meta = dict(Q_LEN=1 if packed else q_len, GROUP=group, BLOCK_M=block_m, BLOCK_SIZE=block_size, BLOCK_N=block_n,
                HEAD_DIM=head_dim, BLOCK_D=bd, HAS_LEFT=left >= 0, SPLIT=splits > 1,
                # Triton 3.9's interpreter computes bfloat16 dots wrongly; fp32 operands sidestep it on CPU.
                UPCAST=interpreting() and q.dtype == torch.bfloat16,
                WIDE=max(k_cache.numel(), v_cache.numel(), q.numel()) >= 2 ** 31 - 2 ** 20,
                # float32 callers get float32 products, not tf32 (decode is memory-bound: it costs nothing).
                PRECISION="ieee" if q.dtype == torch.float32 else "tf32", CHECK=check, PACKED=packed,
                SOFTCAP=bool(softcap), HAS_ALIBI=alibi is not None, HAS_SINKS=sinks is not None,
                num_warps=num_warps, num_stages=num_stages)
    launches = [_ops.launch_direct("paged_fwd", _paged_attn_fwd, grid, args, meta, q)]
    if splits > 1:
        launches.append(_ops.launch_direct(
            "paged_merge", _paged_attn_merge, (num_tokens * heads_q,), (po, out, sinks_t, *o_strides, heads_q, splits),
            dict(Q_LEN=1 if packed else q_len, HEAD_DIM=head_dim, BLOCK_D=bd, BLOCK_S=max(2, next_pow2(splits)),
                 PACKED=packed, HAS_SINKS=sinks is not None, num_warps=4), q))
    _flags.close_flag(flag, q.device)
    if repeatable:  # the features' tables are converted per call: never repeated as they are
        inputs = (q, k_cache, v_cache, block_tables, context_lens) + ((qsl,) if packed else ())
        _ops.offer_ready(launches, inputs, (out,) if splits == 1 else (out, po), 1, flag)
    return out


def _partials(torch, rows: int, bd: int, device):
    """The split-K scratch of ``rows`` partial rows (row of q, head, split): their ``BLOCK_D`` float32
    outputs, then their (maximum, sum) pairs, which the kernels find at ``rows * BLOCK_D`` (the pairs
    start 64-byte aligned, as ``BLOCK_D >= 16``)."""
    return torch.empty((rows * (bd + 2),), dtype=torch.float32, device=device)


def copy_kv_triton(key, value, k_cache, v_cache, slot_mapping, check=False):
    """Launch the slot-mapping write on validated torch tensors; ``check`` as in
    :func:`paged_attention_triton` (a slot past the cache is skipped and reported)."""
    import torch

    num_tokens, heads_kv, head_dim = key.shape
    num_blocks, block_size = k_cache.shape[:2]
    slot_mapping = _index_table(slot_mapping, torch)
    flag, err, dirty = _flags.open_flag(check, slot_mapping, kernel="KV write", device=str(key.device),
                                  capacity=num_blocks * block_size)
    args = (key, value, k_cache, v_cache, slot_mapping, err, dirty,
            *key.stride(), *value.stride(), *k_cache.stride(), *v_cache.stride(), num_blocks * block_size)
    meta = dict(HEADS_KV=heads_kv, HEAD_DIM=head_dim, BLOCK_H=next_pow2(heads_kv), BLOCK_D=next_pow2(head_dim),
                BLOCK_SIZE=block_size, CHECK=check, num_warps=4 if heads_kv * head_dim >= 1024 else 1)
    launched = _ops.launch_direct("copy_kv", _copy_kv_to_paged, (num_tokens,), args, meta, key)
    _flags.close_flag(flag, key.device)
    _ops.offer_ready((launched,), (key, value, k_cache, v_cache, slot_mapping), (), 0, flag)


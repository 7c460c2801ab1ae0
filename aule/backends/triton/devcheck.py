"""What the Triton kernels check of the values they are handed unread from the device (block
tables, lengths, offsets, sinks, slopes), and how they record a bad one in their launch's error flag
(:mod:`.flags`) instead of raising, which a kernel cannot, or having the host read it back, which
would be a synchronisation per call. A recorded entry is never followed out of bounds: the caller
of each check gets a value that keeps every load inside its tensor.
"""
from __future__ import annotations

import triton
import triton.language as tl

from . import flags as _flags

SINK = tl.constexpr(_flags.SINK)
SLOPE = tl.constexpr(_flags.SLOPE)
CU_START = tl.constexpr(_flags.CU_START)
CU_ORDER = tl.constexpr(_flags.CU_ORDER)
CU_PAST = tl.constexpr(_flags.CU_PAST)
CU_END = tl.constexpr(_flags.CU_END)
CU_LONG = tl.constexpr(_flags.CU_LONG)
BLOCK_ID = tl.constexpr(_flags.BLOCK_ID)
CONTEXT_LEN = tl.constexpr(_flags.CONTEXT_LEN)
SLOT = tl.constexpr(_flags.SLOT)
QUERY_START = tl.constexpr(_flags.QUERY_START)
QUERY_ROWS = tl.constexpr(_flags.QUERY_ROWS)
QUERY_BOUND = tl.constexpr(_flags.QUERY_BOUND)


@triton.jit
def record(ERR, DIRTY, code: tl.constexpr, i0, i1, value):
    """Record one bad entry in the launch's flag row; the first of the launch wins it. Every
    word is written by a scalar atomic, so by one thread, and ``done`` is written last with release
    semantics at system scope: a host that reads ``done`` set reads the fields with it."""
    zero = i0.to(tl.int64) * 0
    if tl.atomic_cas(ERR, zero, zero + code, sem="acq_rel", scope="sys") == 0:
        tl.atomic_xchg(ERR + 1, i0.to(tl.int64), sem="relaxed", scope="sys")
        tl.atomic_xchg(ERR + 2, i1.to(tl.int64), sem="relaxed", scope="sys")
        tl.atomic_xchg(ERR + 3, value.to(tl.int64), sem="relaxed", scope="sys")
        tl.atomic_xchg(ERR + 4, zero + 1, sem="release", scope="sys")
        tl.atomic_xchg(DIRTY, zero + 1, sem="release", scope="sys")


@triton.jit
def check_finite(x, ERR, DIRTY, code: tl.constexpr, i0, i1):
    """Record float32 scalar ``x`` (a sink or a slope) when it is NaN or infinite, as its bits. The
    value is still used: a row it reaches is meaningless, never out of bounds."""
    if (x != x) | (tl.abs(x) == float("inf")):
        record(ERR, DIRTY, code, i0, i1, x.to(tl.int32, bitcast=True))


@triton.jit
def checked_sequence(CU, b, TOTAL, MAX_LEN, ERR, DIRTY, SIDE: tl.constexpr):
    """``(first row as int64, length as int32)`` of sequence ``b`` from cumulative offsets ``CU``
    (int32 or int64 as the caller gave them; compared at that width, so an int64 offset cannot wrap
    into range), which must run from 0, never decreasing, to ``TOTAL``. Each sequence vouches for
    its end offset (and sequence 0 for offset 0), so every bad offset is some sequence's to record;
    a sequence whose offsets are bad gets no rows, so nothing outside the packed tensors is read or
    written. A length past ``MAX_LEN`` (the bound that sized the grid) is recorded too; its rows
    past the bound are not computed. ``SIDE``: 0 for q's offsets, 1 for k's. The grid's third
    dimension is the sequence, so the last sequence is ``num_programs(2) - 1``."""
    start = tl.load(CU + b)
    end = tl.load(CU + b + 1)
    zero = b * 0
    first_bad = (b == 0) & (start != 0)
    if first_bad:
        record(ERR, DIRTY, CU_START, zero + SIDE, zero, start)
    down = end < start
    short = (b == tl.num_programs(2) - 1) & (end != TOTAL)
    past = end > TOTAL
    at = 2 * (b + 1) + SIDE
    if down:
        record(ERR, DIRTY, CU_ORDER, at, start, end)
    elif short:
        record(ERR, DIRTY, CU_END, at, zero, end)
    elif past:
        record(ERR, DIRTY, CU_PAST, at, zero, end)
    # An offset before 0 or past the end is also the end of the sequence before: recorded there.
    insane = first_bad | down | short | past | (start < 0) | (start > TOTAL)
    n = tl.where(insane, 0, end - start)
    start = tl.where(insane, 0, start)
    if n > MAX_LEN:
        record(ERR, DIRTY, CU_LONG, 2 * b + SIDE, zero + MAX_LEN, n)
    return start.to(tl.int64), n.to(tl.int32)

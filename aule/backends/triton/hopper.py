"""The Hopper (sm_90) forward for plain 16-bit attention: Q, K, V and O move through TMA tensor
descriptors instead of pointer arithmetic.

It serves the calls the general forward (:func:`.kernels._attn_fwd`) would serve without any
feature: float16/bfloat16, dense, no attn_mask, ALiBi, softcap, sinks or FP8; causal and windows
(aule.masks' bottom-right rule) and GQA are on the path. Its results are the general kernel's: the
same online softmax in base 2, the same key-tile runs (:func:`.kernels._key_runs`), the same rule
for rows that see no key or a NaN (:func:`.kernels._finish_rows`).

Why descriptors: a TMA load is one instruction per tile issued by one thread, which leaves the
warps' registers and issue slots to the matrix products and the softmax, and its boundary handling
is the hardware's: rows past a sequence's end and lanes past head_dim read as zeros and are never
written, so ragged shapes need no predicates at all. Descriptors are 4-D ``[B, H, S, D]`` on the
host (any batch and head strides, rows contiguous) or 2-D per (batch, head) on the device.

The variants (``VARIANT``), chosen by ``AULE_TRITON_HOPPER`` until timed on the GPU:

* ``tma`` (0): host descriptors, one program per (query tile, batch and head), Triton's software
  pipelining of the key loop (num_stages buffers);
* ``persistent`` (1): the same on a grid of one program per SM, each walking tiles; with a causal
  (or right-bounded) mask the longest query tiles go first, across every head, so the last wave
  holds the shortest rows;
* ``ws`` (2): device descriptors (``tl.make_tensor_descriptor``, whose scratch comes from
  Triton's allocator) and the key loop ``warp_specialize``d: Triton's Hopper pass splits a
  producer warp group issuing the loads from the consumers doing the products, which it does only
  for loops whose loads come from device-made descriptors. One loop over every visible tile.
* ``ws_two`` (3): only the fully visible run of tiles in the specialised loop, since the pass's
  split of a tile's rows between two consumer groups was measured wrong with a mask inside its
  loop (Triton 3.6; its own tutorial specialises attention on Hopper only without one); the masked
  runs (the causal diagonal, a window's edge, a partial last tile) in a second, plain launch that
  finishes each row from the O and LSE the first left. (A second loop beside the specialised one
  fails to compile on Triton 3.6 and 3.9, and straight-line tiles after it make the pass decline:
  those forms were measured and dropped, results/notes/triton_hopper_NOTES.md.)
* ``ws_table`` (4): the single loop, its causal and window bounds read as tiles of a small
  visibility table through a descriptor (rows the pass splits as it splits Q's) and its key bound
  per column, with no row vector in the loop, since the row vectors the pass split were what went
  wrong on the H200.
* ``ws_rows`` (5): ws's single loop and mask, its query rows' positions loaded once per query tile
  through a 1-D descriptor over a table of row numbers (:func:`_row_table`), as the LSE is stored,
  instead of made by ``tl.arange``: a descriptor is what the pass was measured to split right, and
  this one costs four bytes per query row, not a table tile per key tile as ws_table's does.

Which variant serves which calls is measured (:data:`MEASURED_RIGHT`, scripts/hopper_ws_probe.py).
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from ... import settings
from .common import LOG2E, autotuned, block_d, cdiv, next_pow2
from .configs import prune
from .kernels import _finish_rows, _key_runs, _run_bounds, _shift, _visible

log = logging.getLogger("aule")

VARIANTS = {"tma": 0, "persistent": 1, "ws": 2, "ws_two": 3, "ws_table": 4, "ws_rows": 5}
WS_VARIANTS = tuple(name for name in VARIANTS if name.startswith("ws"))

# How a query tile's key runs are warp-specialised (from VARIANT): not at all; one loop over every
# run (masked throughout when any tile needs it); only the fully visible run (ws_two's first
# launch; its second takes the masked runs unspecialised); one loop whose bounds are read from a
# table (_diagonal_table) instead of row positions; one loop whose row positions are read through a
# descriptor (_row_table) instead of made from a range.
WS_NONE = tl.constexpr(0)
WS_ONE = tl.constexpr(1)
WS_SPLIT = tl.constexpr(2)
WS_TABLE = tl.constexpr(3)
WS_ROWS = tl.constexpr(4)
LOG2E_C = tl.constexpr(LOG2E)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per head-dim class on sm_90. 128 query rows with 8
# warps is two warp groups of 64 rows, each one wgmma M; key tiles of 128 halve the softmax's
# per-tile cost against 64 where registers allow (FlashAttention-3 runs 128 x 128 at hd 64/128).
# The warp-specialised loop runs its consumers in the kernel's warps and adds a producer group,
# so it takes 4 warps (one consumer group) or 8 (two).
TILES = {
    "tma": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
            128: [(128, 128, 8, 2), (128, 64, 8, 3), (128, 128, 8, 3)],
            256: [(128, 64, 8, 2), (64, 64, 4, 2)]},
    # Each persistent program keeps its next tile's Q in flight beside the key buffers: one stage
    # less where the one-program-per-tile kernel's shared memory was near the 227 KB limit.
    "persistent": {64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4)],
                   128: [(128, 128, 8, 2), (128, 64, 8, 3)],
                   256: [(128, 64, 8, 1), (64, 64, 4, 2)]},
    # Every warp-specialised variant (WS_VARIANTS): the kernel's 4 warps are the consumers (Triton's
    # Hopper pass splits 128 rows between two consumer groups of 64) beside a producer group it
    # adds; offline (Triton 3.9, tests/hopper_compile_check.py) these specialise, with setmaxnreg
    # and no spills (with 8 warps the pass declines the loop). On the H200 (Triton 3.6, hopws-1)
    # the 128-row tiles got the row vectors the pass splits wrong (see MEASURED_RIGHT) and gave NaN
    # with three stages; the 64-row tiles (one consumer group, no split) were right everywhere at
    # half the general kernel's speed. A launch without a forced tile takes the first row.
    "ws": {64: [(128, 128, 4, 2), (64, 128, 4, 2)],
           128: [(128, 128, 4, 2), (64, 128, 4, 2)],
           256: [(128, 32, 4, 2), (64, 64, 4, 2)]},
}

# The interpreter's tile (one modest tile, as configs.INTERPRET_TILE for the general kernel).
INTERPRET_TILE = (32, 32)


def tiles(variant: str, head_dim: int) -> list:
    """The tile rows of ``variant`` for ``head_dim`` (by its padded power-of-two width)."""
    bd = block_d(head_dim)
    return TILES["ws" if variant in WS_VARIANTS else variant][64 if bd <= 64 else (128 if bd <= 128 else 256)]


@triton.jit
def _tile(desc, off_b, off_h, row, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr):
    """Rows ``[row, row + ROWS)`` of (batch, head) through a 4-D host descriptor, or a 2-D one made
    in the kernel for that (batch, head) (FLAT)."""
    if FLAT:
        x = desc.load([row, 0])
    else:
        x = desc.load([off_b, off_h, row, 0]).reshape(ROWS, BLOCK_D)
    return x


@triton.jit
def _put(desc, off_b, off_h, row, x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr):
    if FLAT:
        desc.store([row, 0], x)
    else:
        desc.store([off_b, off_h, row, 0], x.reshape(1, 1, ROWS, BLOCK_D))


@triton.jit
def _head_desc(T, off_b, off_h, stride_b, stride_h, stride_r, rows, HEAD_DIM: tl.constexpr,
               ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A 2-D descriptor of (batch, head)'s ``[rows, HEAD_DIM]`` made on the device."""
    return tl.make_tensor_descriptor(T + off_b.to(tl.int64) * stride_b + off_h.to(tl.int64) * stride_h,
                                     shape=[rows, HEAD_DIM], strides=[stride_r, 1], block_shape=[ROWS, BLOCK_D])


@triton.jit
def _key_tile(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, start_n, SEQ_K, LEFT, RIGHT,
              qk_scale, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr, vis_desc, diag, ldiag,
              TABLE: tl.constexpr):
    """One step of the online softmax (base 2) over key tile ``start_n``, as
    kernels._attn_fwd_inner computes it for a call without features: the row maximum takes the
    scale once per row, visibility applies only when MASKED, and rows with no visible key keep a
    ``-inf`` maximum and zero sums. Keys past SEQ_K read as zeros and are hidden by the mask.

    TABLE: the right (causal) bound comes from a tile of :func:`_diagonal_table` read through
    ``vis_desc`` at the row that puts this tile's diagonal (``diag - start_n``: the last key row 0
    sees, less the tile's first) in place, the left one likewise from ``ldiag`` (the first key row
    0 sees), not from row positions: the bounds' rows are then read as Q's are, which the Hopper
    pass splits between its consumer groups right (on the H200 its split of row vectors was not)."""
    k = _tile(desc_k, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, FLAT)
    qk = tl.dot(q, k.T)
    if MASKED:
        if TABLE:
            # No row vector at all: the key bound is per column, the window's bounds are table
            # tiles (the left one the complement of the tile one key further left).
            rows: tl.constexpr = pos.shape[0]
            vis = ((start_n + offs_n0) < SEQ_K)[None, :]
            if HAS_RIGHT:
                shift = tl.minimum(tl.maximum(diag - start_n + rows, 0), rows + BLOCK_N)
                vis = vis & (vis_desc.load([shift, 0]) != 0)
            if HAS_LEFT:
                shift = tl.minimum(tl.maximum(ldiag - start_n - 1 + rows, 0), rows + BLOCK_N)
                vis = vis & (vis_desc.load([shift, 0]) == 0)
        else:
            vis = _visible(pos[:, None], (start_n + offs_n0)[None, :], SEQ_K, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    m_use = _shift(m_new)
    p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _tile(desc_v, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, FLAT)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def _key_loop(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, start, end, SEQ_K, LEFT, RIGHT,
              qk_scale, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, FLAT: tl.constexpr, WS: tl.constexpr, vis_desc=None,
              diag=0, ldiag=0, TABLE: tl.constexpr = False):
    """Key tiles ``[start, end)`` of one query tile; WS: the loop warp-specialised."""
    for start_n in tl.range(start, end, BLOCK_N, warp_specialize=WS):
        acc, l_i, m_i = _key_tile(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, start_n, SEQ_K,
                                  LEFT, RIGHT, qk_scale, MASKED, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D, FLAT,
                                  vis_desc, diag, ldiag, TABLE)
    return acc, l_i, m_i


@triton.jit
def _query_tile(desc_q, desc_k, desc_v, desc_o, LSE, VIS, off_b, off_h, pid_m, H_Q, GROUP, SEQ_Q, SEQ_K,
                LEFT, RIGHT, qk_scale,
                stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FLAT: tl.constexpr,
                WS: tl.constexpr, PART: tl.constexpr, LSE_TMA: tl.constexpr):
    """O and LSE of query tile ``pid_m`` of (batch, query head). EVEN_K: SEQ_K is a multiple of 128,
    so of every BLOCK_N, and only a mask can hide keys of a tile."""
    off_kvh = off_h // GROUP  # GQA: the query head's KV head, read in place
    if FLAT:
        desc_q = _head_desc(desc_q, off_b, off_h, stride_qb, stride_qh, stride_qm, SEQ_Q, HEAD_DIM, BLOCK_M, BLOCK_D)
        desc_o = _head_desc(desc_o, off_b, off_h, stride_ob, stride_oh, stride_om, SEQ_Q, HEAD_DIM, BLOCK_M, BLOCK_D)
        desc_k = _head_desc(desc_k, off_b, off_kvh, stride_kb, stride_kh, stride_kn, SEQ_K, HEAD_DIM, BLOCK_N,
                            BLOCK_D)
        desc_v = _head_desc(desc_v, off_b, off_kvh, stride_vb, stride_vh, stride_vn, SEQ_K, HEAD_DIM, BLOCK_N,
                            BLOCK_D)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    if WS == WS_ROWS:
        # A 1-D tile, as the LSE's store: the pass split that right on the H200 (Triton 3.6), and
        # failed to compile the same numbers read as a 2-D tile and split to a row vector.
        rows_desc = tl.make_tensor_descriptor(VIS, shape=[SEQ_Q], strides=[1], block_shape=[BLOCK_M])
        pos = rows_desc.load([start_m]) + (SEQ_K - SEQ_Q)
    else:
        pos = offs_m + (SEQ_K - SEQ_Q)
    q = _tile(desc_q, off_b, off_h, start_m, BLOCK_M, BLOCK_D, FLAT)
    row0 = (off_b * H_Q + off_h).to(tl.int64) * SEQ_Q
    if PART == 2:
        # The rows as the first launch left them: O normalised and its LSE are the online softmax's
        # state rescaled to l = 1 at m = LSE (base 2). A NaN row keeps its NaN in l, where
        # _finish_rows looks for it (the maximum skips NaN).
        lse0 = tl.load(LSE + row0 + offs_m, mask=offs_m < SEQ_Q, other=float("-inf")) * LOG2E_C
        m_i = tl.where(lse0 == lse0, lse0, float("-inf"))
        l_i = tl.where(lse0 == lse0, 1.0, float("nan"))
        acc = _tile(desc_o, off_b, off_h, start_m, BLOCK_M, BLOCK_D, FLAT).to(tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, lo_end, mid0, mid1, hi = _key_runs(start_m, SEQ_Q, SEQ_K, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    if WS == WS_ONE or WS == WS_TABLE or WS == WS_ROWS:
        # One loop over every visible tile, each masked unless no tile can need it.
        vis_desc = None
        if WS == WS_TABLE and (HAS_LEFT or HAS_RIGHT):
            vis_desc = tl.make_tensor_descriptor(VIS, shape=[2 * BLOCK_M + BLOCK_N, BLOCK_N], strides=[BLOCK_N, 1],
                                                 block_shape=[BLOCK_M, BLOCK_N])
        acc, l_i, m_i = _key_loop(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, lo, hi,
                                  SEQ_K, LEFT, RIGHT, qk_scale, HAS_LEFT or HAS_RIGHT or not EVEN_K, HAS_LEFT,
                                  HAS_RIGHT, BLOCK_N, BLOCK_D, FLAT, True, vis_desc, start_m + SEQ_K - SEQ_Q + RIGHT,
                                  start_m + SEQ_K - SEQ_Q - LEFT, WS == WS_TABLE)
    else:
        # The general kernel's three runs in its order; with warp specialisation (WS_SPLIT) only
        # the fully visible middle run is specialised.
        for run in tl.static_range(3):
            # Run 0 is empty without a left bound, run 2 without a right one on whole key tiles;
            # PART 1 takes only the fully visible run, PART 2 only the masked ones.
            if ((run != 0 or HAS_LEFT) and (run != 2 or HAS_RIGHT or not EVEN_K)
                    and (PART == 0 or (PART == 1) == (run == 1))):
                start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
                acc, l_i, m_i = _key_loop(acc, l_i, m_i, q, desc_k, desc_v, off_b, off_kvh, pos, offs_n0,
                                          start, end, SEQ_K, LEFT, RIGHT, qk_scale, run != 1, HAS_LEFT,
                                          HAS_RIGHT, BLOCK_N, BLOCK_D, FLAT, run == 1 and WS != WS_NONE)
    out, lse2 = _finish_rows(acc, l_i, m_i)
    if LSE_TMA:
        # Through a descriptor, as O: on the H200 the specialised kernels' pointer store of this
        # row vector wrote the wrong rows (an LSE off by its own size) where O, stored so, was right.
        lse_desc = tl.make_tensor_descriptor(LSE + row0, shape=[SEQ_Q], strides=[1], block_shape=[BLOCK_M])
        lse_desc.store([start_m], lse2 * 0.6931471805599453)
    else:
        tl.store(LSE + row0 + offs_m, lse2 * 0.6931471805599453, mask=offs_m < SEQ_Q)
    _put(desc_o, off_b, off_h, start_m, out.to(q.dtype), BLOCK_M, BLOCK_D, FLAT)


@triton.jit
def _attn_fwd_tma(desc_q, desc_k, desc_v, desc_o, LSE,
                  stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                  stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                  B, H_Q, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, Q_BUCKET, K_BUCKET, VIS,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  EVEN_K: tl.constexpr, VARIANT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  PART: tl.constexpr = 0, LSE_TMA: tl.constexpr = False):
    """The Hopper forward (module docstring). ``desc_*``: 4-D host descriptors (VARIANT 0, 1) or the
    tensors themselves (VARIANT 2: descriptors are made per (batch, head) here, from the strides).
    Q_BUCKET/K_BUCKET key the autotuner only. LSE ``[B, H_Q, SEQ_Q]`` float32, natural log. VIS:
    ws_table's :func:`_diagonal_table`, ws_rows' :func:`_row_table` (None for the others)."""
    FLAT: tl.constexpr = VARIANT >= 2
    # ws_two's launches: PART 1 the specialised run, PART 2 the masked ones.
    WS: tl.constexpr = WS_NONE if VARIANT < 2 else (WS_ONE if VARIANT == 2 else (
        WS_SPLIT if VARIANT == 3 else (WS_TABLE if VARIANT == 4 else WS_ROWS)))
    num_m = tl.cdiv(SEQ_Q, BLOCK_M)
    if VARIANT == 1:
        heads = B * H_Q
        for t in tl.range(tl.program_id(0), num_m * heads, tl.num_programs(0), flatten=False):
            if HAS_RIGHT:
                # The longest rows first, every head's at once: late query tiles see the most keys.
                pid_m = num_m - 1 - t // heads
                bh = t % heads
            else:
                # A head's tiles side by side, so its keys are read from L2 by the programs after it.
                pid_m = t % num_m
                bh = t // num_m
            _query_tile(desc_q, desc_k, desc_v, desc_o, LSE, VIS, bh // H_Q, bh % H_Q, pid_m, H_Q, GROUP, SEQ_Q, SEQ_K,
                        LEFT, RIGHT, qk_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                        stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                        HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, EVEN_K, BLOCK_M, BLOCK_N, FLAT, WS, PART, LSE_TMA)
    else:
        pid_m = tl.program_id(0)
        if HAS_RIGHT:
            pid_m = num_m - 1 - pid_m  # the longest rows start first, as in the general forward
        bh = tl.program_id(1)
        _query_tile(desc_q, desc_k, desc_v, desc_o, LSE, VIS, bh // H_Q, bh % H_Q, pid_m, H_Q, GROUP, SEQ_Q, SEQ_K,
                    LEFT, RIGHT, qk_scale, stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
                    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_om,
                    HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, EVEN_K, BLOCK_M, BLOCK_N, FLAT, WS, PART, LSE_TMA)


# --- host side ----------------------------------------------------------------------------------

_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "EVEN_K", "VARIANT"]
EVEN = 128  # the largest BLOCK_N of TILES: a multiple of it is a multiple of every one
_PLAIN_DTYPES = (torch.float16, torch.bfloat16)


def _descriptor_ok(t: torch.Tensor) -> bool:
    """Whether TMA can address ``t [B, H, S, D]`` as it is: rows contiguous, every other stride a
    positive multiple of 16 bytes (0 where a dimension is broadcast would not be), base 16-byte
    aligned. Triton's TensorDescriptor asserts the same; asking first lets the call fall back."""
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st > 0 and (st * size) % 16 == 0 for st in t.stride()[:-1]))


def refusal(q, k, v, features: bool) -> str | None:
    """Why the Hopper forward cannot serve a call (None if it can). ``features``: the call has an
    attn_mask, ALiBi, softcap, sinks, packing or FP8, which only the general kernel applies."""
    if features:
        return "the call has features only the general forward applies"
    if q.dtype not in _PLAIN_DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"the Hopper forward takes float16/bfloat16, got {q.dtype}"
    d = q.shape[-1]
    if d % 8 or d > 256:
        return f"the Hopper forward takes head_dim a multiple of 8 up to 256 (16-byte rows), got {d}"
    if not all(_descriptor_ok(t) for t in (q, k, v)):
        return "q, k or v has strides TMA cannot address (rows must be contiguous, strides 16-byte multiples)"
    return None


# What the H200 measured right (Triton 3.6; results/notes/triton_hopper_NOTES.md), per
# warp-specialised variant: its head_dims, and the call classes (CALL_CLASSES) beyond unmasked,
# whole-tile, equal-length MHA it was right on. Routing hands a variant only calls inside its row;
# a variant without a row was not measured right anywhere and is handed nothing (the general kernel
# serves), though attention_forward runs it when asked (scripts/hopper_ws_probe.py does).
# hopws-2 (Triton 3.6, the LSE through a descriptor; hopws-1 before it had the LSE off by its own
# size): at 128 x 128, four warps, two stages. ws: right unmasked (GQA 16/4 at 1024/2048 and 64/8,
# ragged 1000/1100) and wrong with any mask (the row positions, off by up to 1.2). ws_two: right
# on every class. ws_table: right on every class but a window at d128, whose two table tiles per
# step overflow shared memory (257 KB). The 64-row tiles were right everywhere at half speed and
# three stages NaN; routing launches neither.
# hopws-3 (this row only at d128): ws_rows, its row positions through a 1-D descriptor, right on every
# masked class; the same positions read as a 2-D tile and split to a row vector failed to compile.
MEASURED_RIGHT: dict = {
    "ws": {"head_dims": (64, 128), "classes": frozenset({"gqa", "ragged", "unequal"})},
    "ws_rows": {"head_dims": (128,), "classes": frozenset({"causal", "window", "gqa", "ragged", "unequal"})},
    "ws_two": {"head_dims": (64, 128), "classes": frozenset({"causal", "window", "gqa", "ragged", "unequal"})},
    "ws_table": {"head_dims": (64, 128), "classes": frozenset({"causal", "gqa", "ragged", "unequal"})},
}
# What AULE_TRITON_HOPPER unset ("auto") routes: where a variant was measured right and faster
# than the general kernel on the H200 (hopws-2, bfloat16, TFLOP/s against the general kernel's):
# ws at d128 unmasked from 4k keys (1.15x s4k, 1.16x s16k, 1.03x GQA 16/2 s4k; 0.97x at s1k, and
# slower at d64: 0.72-0.96x), ws_two at d128 causal from 16k keys without GQA (1.08x; 0.87x at
# s4k, 0.79x GQA s4k, 0.38x s1k). Each route stays inside its variant's MEASURED_RIGHT row.
DEFAULT_ROUTES = (
    {"variant": "ws", "head_dims": (128,), "causal": False, "min_seq_k": 4096, "gqa": True},
    {"variant": "ws_two", "head_dims": (128,), "causal": True, "min_seq_k": 16384, "gqa": False},
)
_DEFAULT_DTYPES = (torch.bfloat16,)  # measured in bfloat16 only


def default_variant(q, k, left: int, right: int) -> str | None:
    """The variant DEFAULT_ROUTES gives this call (within its MEASURED_RIGHT row), else None: no
    window, bfloat16, head_dim, mask, GQA and key count as a route was measured faster at."""
    if q.dtype not in _DEFAULT_DTYPES or left >= 0:
        return None
    for route in DEFAULT_ROUTES:
        if (q.shape[-1] in route["head_dims"] and (right >= 0) == route["causal"]
                and k.shape[2] >= route["min_seq_k"] and (route["gqa"] or q.shape[1] == k.shape[1])
                and measured_refusal(route["variant"], q, k, left, right) is None):
            return route["variant"]
    return None


CALL_CLASSES = ("causal", "window", "ragged", "gqa", "unequal")


def call_classes(q, k, left: int, right: int) -> frozenset:
    """The classes of CALL_CLASSES a call is in: a right bound (causal), a left one (a sliding
    window; Mistral's causal one is both), a length that is not a multiple of 128 (a partial tile),
    GQA/MQA, seq_q != seq_k."""
    sq, sk = q.shape[2], k.shape[2]
    found = {"causal": right >= 0, "window": left >= 0, "ragged": bool(sq % EVEN or sk % EVEN),
             "gqa": q.shape[1] != k.shape[1], "unequal": sq != sk}
    return frozenset(name for name, yes in found.items() if yes)


def measured_refusal(variant: str, q, k, left: int, right: int) -> str | None:
    """Why ``variant`` is not handed a call that :func:`refusal` accepts, from what the H200 measured
    (MEASURED_RIGHT); None for the variants without warp specialisation, which were right on all."""
    if variant not in WS_VARIANTS:
        return None
    row = MEASURED_RIGHT.get(variant)
    if row is None:
        return f"{variant} has not been measured right on the H200 (Triton 3.6): routing keeps the general forward"
    if q.shape[2] % 4:
        # Its LSE then goes through the pointer store the H200 showed the pass splitting wrong.
        return f"{variant} stores its LSE through a descriptor, which needs seq_q a multiple of 4, got {q.shape[2]}"
    d = q.shape[-1]
    missing = sorted(call_classes(q, k, left, right) - row["classes"])
    if d in row["head_dims"] and not missing:
        return None
    served = ", ".join(sorted(row["classes"])) or "none of them"
    return (f"{variant} serves head_dim {'/'.join(map(str, row['head_dims']))} and, of the classes "
            f"{'/'.join(CALL_CLASSES)}, {served} (measured right on the H200, Triton 3.6); this call has "
            f"head_dim {d}{', ' + ', '.join(missing) if missing else ''} (bounds ({left}, {right}), "
            f"seq {q.shape[2]}/{k.shape[2]}, heads {q.shape[1]}/{k.shape[1]})")


def variant_for(q, k, v, left: int, right: int, features: bool) -> str | None:
    """The Hopper variant ``AULE_TRITON_HOPPER`` asks for (unset: :func:`default_variant`'s), when
    this call can take it: a CUDA tensor on a compute capability 9.x device, no features, strides
    TMA can address, and a call of the class the variant was measured right on
    (:func:`measured_refusal`). None otherwise (the general forward serves it), with the reason
    logged at DEBUG."""
    variant = settings.triton_hopper()
    if variant is None or q.device.type != "cuda" or getattr(torch.version, "hip", None):
        return None
    if _capability(q.device.index or 0)[0] != 9:
        return None
    if variant == "auto":
        if refusal(q, k, v, features):
            return None
        variant = default_variant(q, k, left, right)
        if variant is None:
            return None
    why = refusal(q, k, v, features) or measured_refusal(variant, q, k, left, right)
    if why:
        log.debug("AULE_TRITON_HOPPER=%s passed over for the general forward: %s", variant, why)
        return None
    return variant


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _descriptor(t: torch.Tensor, rows: int, bd: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, bd])


def _set_block_shapes(nargs: dict) -> None:
    """A configuration's pre-hook: the host descriptors' boxes are its tiles (a descriptor's block
    shape is part of its type, so each configuration compiles with its own)."""
    bm, bn = nargs["BLOCK_M"], nargs["BLOCK_N"]
    for name, rows in (("desc_q", bm), ("desc_k", bn), ("desc_v", bn), ("desc_o", bm)):
        desc = nargs[name]
        if not isinstance(desc, torch.Tensor):
            desc.block_shape = [1, 1, rows, block_d(desc.shape[-1])]


def _configs(variant: str, head_dim: int) -> list:
    """The autotuner's candidates: ws's first tile only (the one measured right, see TILES)."""
    hook = None if variant in WS_VARIANTS else _set_block_shapes
    rows = tiles(variant, head_dim)
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s, pre_hook=hook)
            for bm, bn, w, s in (rows[:1] if variant in WS_VARIANTS else rows)]


@functools.lru_cache(maxsize=None)
def _tuned(variant: str, dim_class: int):
    return autotuned(_attn_fwd_tma, _configs(variant, dim_class), _TUNE_KEY, prune)


def _torch_scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-made descriptors live in scratch memory Triton asks its allocator for; give it torch's
    caching allocator unless the process has set one of its own."""
    try:
        from triton.runtime import _allocation
        unset = isinstance(_allocation._allocator.get(), _allocation.NullAllocator)
    except (ImportError, AttributeError):  # another Triton layout: set ours
        unset = True
    if unset:
        triton.set_allocator(_torch_scratch)


@functools.lru_cache(maxsize=None)
def _diagonal_table(bm: int, bn: int, device) -> torch.Tensor:
    """ws_table's visibility table, uint8 ``[2 bm + bn, bn]``: 1 where ``c + bm <= x``. Its
    ``[bm, bn]`` tile from row ``t + bm`` is 1 exactly where key column ``c`` of row ``r`` has
    ``c - r <= t``: the causal (right) bound of a key tile whose first key is ``t`` before row 0's
    last visible one (``t >= bn``, all visible, reads from row bm + bn). Shifts go along rows, which
    TMA takes at any offset (columns only at 16-byte ones); rows of bn bytes are 16-byte multiples."""
    x = torch.arange(2 * bm + bn, device=device)[:, None]
    c = torch.arange(bn, device=device)[None, :]
    return (c + bm <= x).to(torch.uint8).contiguous()


@functools.lru_cache(maxsize=None)
def _row_table(rows: int, device) -> torch.Tensor:
    """ws_rows' row numbers, int32 ``[rows]``. Sized by powers of two, so a few tables serve every
    length."""
    return torch.arange(rows, dtype=torch.int32, device=device)


def _grid(variant: str, sq: int, heads: int, device):
    if variant == "persistent":
        sms = _sm_count(device.index or 0) if device.type == "cuda" else 4
        return lambda m: (min(sms, cdiv(sq, m["BLOCK_M"]) * heads),)
    return lambda m: (cdiv(sq, m["BLOCK_M"]), heads)


def attention_forward(q, k, v, scale: float, left: int, right: int, variant: str, tile=None):
    """``(out, lse)`` as :func:`.ops.attention_forward` gives them, for a call :func:`refusal` accepts:
    ``q [B, Hq, Sq, D]``, ``k, v [B, Hkv, Sk, D]`` float16/bfloat16 with TMA-addressable strides,
    ``left``/``right`` aule.masks' canonical window (-1 unbounded). ``variant``: tma, persistent or
    ws. ``tile`` forces ``(BLOCK_M, BLOCK_N[, num_warps, num_stages])``; otherwise the interpreter's
    tile, the configuration ``AULE_TRITON_CONFIG``/``AULE_TRITON_AUTOTUNE=0`` names, or the
    autotuner's pick among :data:`TILES`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    why = refusal(q, k, v, False)
    if why:
        raise ValueError(why)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d or hq % hkv:
        raise ValueError(f"k and v must be [batch, heads_kv, seq_k, head_dim] with heads_q % heads_kv == 0, "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    out = torch.empty((b, hq, sq, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or sk == 0:
        lse.fill_(float("-inf"))
        return out.zero_(), lse
    bd = block_d(d)
    interpret = q.device.type == "cpu"
    if tile is None and interpret:
        tile = INTERPRET_TILE
    index = settings.triton_config()
    buckets = (next_pow2(sq), next_pow2(sk))
    if tile is None and index is not None:
        fits = prune(_configs(variant, d), {"Q_BUCKET": buckets[0], "K_BUCKET": buckets[1]})
        c = fits[index % len(fits)]
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    if variant in WS_VARIANTS:
        if not interpret:
            _ensure_allocator()
        descs = (q, k, v, out)
    else:
        bm, bn = (tile[0], tile[1]) if tile is not None else (64, 64)  # a tuned tile's pre-hook sets its own
        descs = (_descriptor(q, bm, bd), _descriptor(k, bn, bd), _descriptor(v, bn, bd), _descriptor(out, bm, bd))
    args = (*descs, lse, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3],
            b, hq, hq // hkv, sq, sk, left, right, scale * LOG2E, *buckets, None)
    meta = dict(HEAD_DIM=d, BLOCK_D=bd, HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0, EVEN_K=sk % EVEN == 0,
                VARIANT=VARIANTS[variant])
    grid = _grid(variant, sq, b * hq, q.device)
    if tile is None and variant in WS_VARIANTS:
        tile = tiles(variant, d)[0]  # one configuration each (TILES): nothing for an autotuner to pick
    if variant == "ws_table" and (left >= 0 or right >= 0):
        args = (*args[:-1], _diagonal_table(tile[0], tile[1], q.device))
    if variant == "ws_rows":
        args = (*args[:-1], _row_table(next_pow2(max(sq, 128)), q.device))
    if variant in WS_VARIANTS and sq % 4 == 0:  # the LSE rows' base 16-byte aligned, as TMA needs
        meta["LSE_TMA"] = True
    if tile is None:
        _tuned(variant, 64 if bd <= 64 else (128 if bd <= 128 else 256))[grid](*args, **meta)
        return out, lse
    kw = {"BLOCK_M": tile[0], "BLOCK_N": tile[1]}
    if not interpret:
        kw.update(num_warps=tile[2] if len(tile) > 2 else 4, num_stages=tile[3] if len(tile) > 3 else 2)
    masked = left >= 0 or right >= 0 or sk % EVEN
    if variant != "ws_two" or not masked:
        _attn_fwd_tma[grid(kw)](*args, **meta, **kw)
        return out, lse
    # ws_two: the fully visible tiles in the specialised loop, the known-good shape of Triton's
    # Hopper pass (one unmasked loop); then a plain launch of the same tile finishes each row over
    # its masked tiles from the O and LSE the first left. Eight warps there: without the producer
    # group a 128-row tile's products and softmax need two consumer warp groups' registers.
    _attn_fwd_tma[grid(kw)](*args, **meta, **kw, PART=1)
    if not interpret:
        kw.update(num_warps=8 if tile[0] >= 128 else 4)
    _attn_fwd_tma[grid(kw)](*args, **meta, **kw, PART=2)
    return out, lse

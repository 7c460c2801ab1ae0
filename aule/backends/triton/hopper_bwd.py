"""The Hopper (sm_90) backward for plain 16-bit attention: dK/dV and dQ with Q, K, V, dO and the
gradients moving through TMA tensor descriptors.

It serves what :mod:`.hopper`'s forward serves (float16/bfloat16, dense, no attn_mask, ALiBi,
softcap, sinks or packing; causal, windows and GQA on the path) and computes what the general
backward's two kernels (:func:`.kernels._attn_bwd_dkdv`, :func:`.kernels._attn_bwd_dq`) compute,
from the same preprocess (delta and lse2, :func:`.kernels._attn_bwd_preprocess`, launched by
:func:`.ops.attention_backward`, which hands the rest here): the same base-2 probabilities, the
same tile runs (:func:`.kernels._query_runs`, :func:`.kernels._key_runs`), the same flat loop over
a GQA group's heads and query tiles that keeps dK/dV in registers, summed over the group without
atomics.

What differs from the general kernels is how tiles move: one TMA load per tile, issued by one
thread, instead of a pointer per element and predicates at ragged ends (rows past a sequence and
lanes past head_dim read as zeros, stores are clipped), and sm_90 tiles of their own
(:data:`TILES`). Three variants (``AULE_TRITON_HOPPER_BWD``):

* ``tma`` (0): dK/dV in one kernel, dQ in a second that recomputes the scores per query tile:
  seven products per tile pair against five, but every gradient is a fixed-order sum, so the
  result is deterministic (the default where the Hopper backward is on);
* ``atomic`` (1): dQ accumulated in the dK/dV kernel (FlashAttention-2's order), each key tile
  adding ``dS^T K`` into a float32 buffer with atomic adds: five products, one kernel, but the
  order of the adds varies from run to run, so dQ's last bits do too. Opt-in only;
* ``fused`` (2): the tma variant's two kernels in one launch (its dK/dV programs, then its dQ
  programs, in one grid), so neither waits for the other's tail: deterministic, the same bits.
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
from .hopper import _capability, _put, _tile, refusal
from .kernels import _key_runs, _query_runs, _run_bounds, _visible

log = logging.getLogger("aule")

VARIANTS = {"tma": 0, "atomic": 1, "fused": 2}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim class on sm_90, chosen from
# tests/hopper_bwd_compile_check.py's report (no spills causal or not, within 227 KB of shared
# memory); the H200 has timed only the first rows (results/notes/triton_hopper_bwd_NOTES.md). The dK/dV kernel holds a
# key tile and two fp32 accumulators of BLOCK_N x BLOCK_D: 128 keys take two warp groups (8 warps,
# 64 rows each, one wgmma M), and the transposed score tile beside them fits with 64 query rows at
# head_dim 64 and 32 at 128 (64 x 128 spilled 48 bytes there when causal). The dQ kernel holds one
# accumulator: 128 query rows with 8 warps, as the forward. An untuned launch takes the first row.
TILES = {
    "dkdv": {64: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
             128: [(32, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2), (16, 128, 8, 3)]},
    "dq": {64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
           # 3 stages first: the general dQ kernel's tile, to which the H200 compared 2 stages slower
           128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3)]},
    # The fused launch: a dK/dV tile and a dQ tile (BLOCK_M, BLOCK_N, BLOCK_M2, BLOCK_N2) sharing
    # num_warps and num_stages; registers and shared memory are the larger kernel's.
    "fused": {64: [(64, 128, 128, 64, 8, 3), (64, 64, 64, 64, 4, 3)],
              128: [(32, 128, 128, 64, 8, 2), (32, 128, 64, 64, 8, 2)]},
    # The atomic variant's dK/dV kernel also holds a dQ tile per step: at head_dim 128 a 32-row
    # query tile with 3 stages spilled when causal, so its rows are its own.
    "dkdv_atomic": {64: [(64, 128, 8, 3), (64, 64, 4, 3)],
                    128: [(32, 128, 8, 2), (16, 128, 8, 3)]},
}
# Beyond head_dim 128 every dK/dV tile tried spilled (offline, sm_90: 88 to 1024 bytes of stack
# per thread for 16-64 key rows; two BLOCK_N x 256 fp32 accumulators do not fit beside the
# scores), so those calls keep the general kernels.
MAX_HEAD_DIM = 128

# Where the H200 measured a deterministic variant right and faster than the general kernels in
# forward+backward (results/notes/triton_hopper_bwd_NOTES.md, scripts/time_hopper_bwd.py), by
# (head-dim class, right-bounded mask): what an sm_90 call takes with AULE_TRITON_HOPPER_BWD unset.
# Empty: on the H200 (Triton 3.6, issue 16's grid) every variant was right (tma and fused bit for bit
# the general kernels' gradients) but none faster: tma 0.90-1.00x the general kernels in
# forward+backward at its first tiles, fused and atomic slower still.
MEASURED: dict = {}

# The interpreter's tile, the general kernels' (configs.INTERPRET_TILE), so that the two compute
# in the same order there.
INTERPRET_TILE = (32, 32)


def tiles(kernel: str, head_dim: int) -> list:
    """The tile rows of ``kernel`` ('dkdv', 'dkdv_atomic', 'dq' or 'fused') for ``head_dim`` (by its
    padded width, at most :data:`MAX_HEAD_DIM`)."""
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"the Hopper backward takes head_dim up to {MAX_HEAD_DIM}, got {head_dim}")
    return TILES[kernel][64 if block_d(head_dim) <= 64 else 128]


@triton.jit
def _dkdv_run(dk, dv, k, v, desc_q, desc_do, LSE2, DELTA, DQ, off_b, first_head, offs_n, offs_m0, offs_d,
              start, end, GROUP, H_Q, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale,
              stride_dqb, stride_dqh, stride_dqm, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
              HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
              ATOMIC_DQ: tl.constexpr):
    """dK and dV of one key tile over query tiles ``[start, end)`` of every head of its GQA group, as
    kernels._attn_bwd_dkdv_inner computes them for a call without features (heads and tiles in one
    flat loop, which kept the accumulators out of local memory). ATOMIC_DQ: each tile's share of dQ
    is added into DQ (float32) as well."""
    n_tiles = (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M
    for t in range(0, n_tiles * GROUP):
        g = t // n_tiles
        start_m = start + (t - g * n_tiles) * BLOCK_M
        h = first_head + g
        offs_m = start_m + offs_m0
        q = _tile(desc_q, off_b, h, start_m, BLOCK_M, BLOCK_D, False)
        rows = (off_b * H_Q + h).to(tl.int64) * SEQ_Q + offs_m
        if MASKED:
            # Rows past the sequence get lse2 = +inf: p = 0, so they add nothing.
            m_ok = offs_m < SEQ_Q
            lse2 = tl.load(LSE2 + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        else:
            lse2 = tl.load(LSE2 + rows)
            delta = tl.load(DELTA + rows)
        st = tl.dot(k, tl.trans(q))
        pt = tl.math.exp2(st * qk_scale - lse2[None, :])
        if MASKED:
            pos = offs_m + (SEQ_K - SEQ_Q)
            vis = _visible(pos[None, :], offs_n[:, None], SEQ_K, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(vis, pt, 0.0)
        do = _tile(desc_do, off_b, h, start_m, BLOCK_M, BLOCK_D, False)
        dv = tl.dot(pt.to(do.dtype), do, dv)
        dpt = tl.dot(v, tl.trans(do))
        dst = (pt * (dpt - delta[None, :])).to(q.dtype)
        dk = tl.dot(dst, q, dk)
        if ATOMIC_DQ:
            # Keys past SEQ_K read as zero rows of K, so their share of dQ is zero without a mask.
            dq = tl.dot(tl.trans(dst), k) * sm_scale
            ptrs = (DQ + off_b.to(tl.int64) * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm
                    + offs_d[None, :])
            ok = (offs_m < SEQ_Q)[:, None] & (offs_d < HEAD_DIM)[None, :]
            tl.atomic_add(ptrs, dq, mask=ok, sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_program(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE2, DELTA, DQ, stride_dqb, stride_dqh,
                  stride_dqm, pid_n, pid_bh, H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                  ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK (scaled) and dV of key tile ``pid_n`` of (batch, KV head) ``pid_bh``, summed over the query
    heads of its group in registers."""
    start_n = pid_n * BLOCK_N
    off_b = pid_bh // H_KV
    off_kvh = pid_bh % H_KV
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = _tile(desc_k, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, False)
    v = _tile(desc_v, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, False)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, lo_end, mid0, mid1, hi = _query_runs(start_n, SEQ_Q, SEQ_K, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                             HAS_LEFT, HAS_RIGHT)
    first_head = off_kvh * GROUP
    for run in tl.static_range(3):
        if run != 0 or HAS_RIGHT:
            start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
            dk, dv = _dkdv_run(dk, dv, k, v, desc_q, desc_do, LSE2, DELTA, DQ, off_b, first_head, offs_n,
                               offs_m0, offs_d, start, end, GROUP, H_Q, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale,
                               sm_scale, stride_dqb, stride_dqh, stride_dqm, run != 1, HAS_LEFT, HAS_RIGHT,
                               HEAD_DIM, BLOCK_D, BLOCK_M, ATOMIC_DQ)
    _put(desc_dk, off_b, off_kvh, start_n, (dk * sm_scale).to(k.dtype), BLOCK_N, BLOCK_D, False)
    _put(desc_dv, off_b, off_kvh, start_n, dv.to(v.dtype), BLOCK_N, BLOCK_D, False)


@triton.jit
def _attn_bwd_dkdv_tma(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE2, DELTA, DQ,
                       stride_dqb, stride_dqh, stride_dqm,
                       H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """One program per (key tile, batch entry, KV head), grid (key tiles, B * H_KV). ``desc_*``: 4-D
    ``[B, H, S, D]`` host descriptors; LSE2/DELTA ``[B, H_Q, SEQ_Q]`` float32 from the preprocess;
    DQ the float32 dQ accumulator (ATOMIC_DQ, zeroed by the caller; its rows contiguous)."""
    _dkdv_program(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE2, DELTA, DQ, stride_dqb, stride_dqh,
                  stride_dqm, tl.program_id(0), tl.program_id(1), H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT,
                  qk_scale, sm_scale, HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, ATOMIC_DQ, BLOCK_M, BLOCK_N)


@triton.jit
def _dq_run(dq, q, do, lse2, delta, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, start, end, SEQ_K, LEFT, RIGHT,
            qk_scale, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dQ of one query tile over key tiles ``[start, end)``, as kernels._attn_bwd_dq_inner computes
    it for a call without features."""
    for start_n in range(start, end, BLOCK_N):
        k = _tile(desc_k, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, False)
        s = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            vis = _visible(pos[:, None], (start_n + offs_n0)[None, :], SEQ_K, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            p = tl.where(vis, p, 0.0)
        v = _tile(desc_v, off_b, off_kvh, start_n, BLOCK_N, BLOCK_D, False)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _dq_program(desc_q, desc_k, desc_v, desc_do, desc_dq, LSE2, DELTA, pid_m, pid_bh, num_m, H_Q, GROUP, SEQ_Q,
                SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ = scale * dS K of query tile ``pid_m`` (of ``num_m``) of (batch, query head) ``pid_bh`` over
    its visible keys; with a causal-like mask the longest tiles come first."""
    if HAS_RIGHT:
        pid_m = num_m - 1 - pid_m
    off_b = pid_bh // H_Q
    off_h = pid_bh % H_Q
    off_kvh = off_h // GROUP
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_ok = offs_m < SEQ_Q
    q = _tile(desc_q, off_b, off_h, start_m, BLOCK_M, BLOCK_D, False)
    do = _tile(desc_do, off_b, off_h, start_m, BLOCK_M, BLOCK_D, False)
    rows = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    lse2 = tl.load(LSE2 + rows, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
    pos = offs_m + (SEQ_K - SEQ_Q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo, lo_end, mid0, mid1, hi = _key_runs(start_m, SEQ_Q, SEQ_K, LEFT, RIGHT, BLOCK_M, BLOCK_N, HAS_LEFT, HAS_RIGHT)
    for run in tl.static_range(3):
        if run != 0 or HAS_LEFT:
            start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
            dq = _dq_run(dq, q, do, lse2, delta, desc_k, desc_v, off_b, off_kvh, pos, offs_n0, start, end, SEQ_K,
                         LEFT, RIGHT, qk_scale, run != 1, HAS_LEFT, HAS_RIGHT, BLOCK_N, BLOCK_D)
    _put(desc_dq, off_b, off_h, start_m, (dq * sm_scale).to(q.dtype), BLOCK_M, BLOCK_D, False)


@triton.jit
def _attn_bwd_dq_tma(desc_q, desc_k, desc_v, desc_do, desc_dq, LSE2, DELTA,
                     H_Q, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, Q_BUCKET, K_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEFT: tl.constexpr,
                     HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query tile, batch entry, query head), grid (query tiles, B * H_Q)."""
    _dq_program(desc_q, desc_k, desc_v, desc_do, desc_dq, LSE2, DELTA, tl.program_id(0), tl.program_id(1),
                tl.num_programs(0), H_Q, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, HEAD_DIM, BLOCK_D,
                HAS_LEFT, HAS_RIGHT, BLOCK_M, BLOCK_N)


@triton.jit
def _attn_bwd_fused_tma(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, desc_q2, desc_k2, desc_v2, desc_do2,
                        desc_dq, LSE2, DELTA, B, H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale,
                        Q_BUCKET, K_BUCKET, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr):
    """The two kernels in one launch (the fused variant), a 1-D grid: the dK/dV programs first (key
    tiles of BLOCK_N, walking query tiles of BLOCK_M), then the dQ programs (query tiles of
    BLOCK_M2, walking key tiles of BLOCK_N2), each on descriptors boxed for its own tiles. Every
    gradient still has one writer, so the result is the tma variant's, but neither kernel waits
    for the other's last wave."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(SEQ_K, BLOCK_N)
    programs = num_n * B * H_KV
    if pid < programs:
        _dkdv_program(desc_q, desc_k, desc_v, desc_do, desc_dk, desc_dv, LSE2, DELTA, LSE2, 0, 0, 0,
                      pid % num_n, pid // num_n, H_Q, H_KV, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale,
                      HEAD_DIM, BLOCK_D, HAS_LEFT, HAS_RIGHT, False, BLOCK_M, BLOCK_N)
    else:
        num_m = tl.cdiv(SEQ_Q, BLOCK_M2)
        pid = pid - programs
        _dq_program(desc_q2, desc_k2, desc_v2, desc_do2, desc_dq, LSE2, DELTA, pid % num_m, pid // num_m, num_m,
                    H_Q, GROUP, SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, HEAD_DIM, BLOCK_D, HAS_LEFT,
                    HAS_RIGHT, BLOCK_M2, BLOCK_N2)


# --- host side ----------------------------------------------------------------------------------

_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT"]
_KERNELS = {"dkdv": _attn_bwd_dkdv_tma, "dq": _attn_bwd_dq_tma, "fused": _attn_bwd_fused_tma}
# Each kernel's descriptors, in its order, with the tile constexpr that sizes each one's box.
_DKDV_BOXES = {"desc_q": "BLOCK_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N", "desc_do": "BLOCK_M",
               "desc_dk": "BLOCK_N", "desc_dv": "BLOCK_N"}
_BOXES = {
    "dkdv": _DKDV_BOXES,
    "dq": {"desc_q": "BLOCK_M", "desc_k": "BLOCK_N", "desc_v": "BLOCK_N", "desc_do": "BLOCK_M", "desc_dq": "BLOCK_M"},
    "fused": {**_DKDV_BOXES, "desc_q2": "BLOCK_M2", "desc_k2": "BLOCK_N2", "desc_v2": "BLOCK_N2",
              "desc_do2": "BLOCK_M2", "desc_dq": "BLOCK_M2"},
}
# A tile row is its kernel's block sizes in this order, then num_warps and num_stages.
_BLOCKS = {"dkdv": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"),
           "fused": ("BLOCK_M", "BLOCK_N", "BLOCK_M2", "BLOCK_N2")}


def _split(kernel: str, tile) -> tuple[dict, int, int]:
    """``(block sizes, num_warps, num_stages)`` of a tile row of ``kernel``."""
    names = _BLOCKS[kernel]
    rest = tuple(tile[len(names):])
    return dict(zip(names, tile)), (rest[0] if rest else 4), (rest[1] if len(rest) > 1 else 2)


def _set_block_shapes(kernel: str):
    """A configuration's pre-hook for ``kernel``: the descriptors' boxes are its tiles (a
    descriptor's block shape is part of its type, so each configuration compiles with its own)."""
    boxes = _BOXES[kernel]

    def hook(nargs: dict) -> None:
        for name, block in boxes.items():
            desc = nargs[name]
            desc.block_shape = [1, 1, nargs[block], block_d(desc.shape[-1])]
    return hook


def _configs(kernel: str, head_dim: int, atomic: bool = False) -> list:
    hook = _set_block_shapes(kernel)
    out = []
    for row in tiles(kernel + ("_atomic" if atomic else ""), head_dim):
        blocks, warps, stages = _split(kernel, row)
        out.append(triton.Config(blocks, num_warps=warps, num_stages=stages, pre_hook=hook))
    return out


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, dim_class: int, atomic: bool):
    # The atomic variant's dK/dV kernel adds into dQ: its tuner would time repeated adds into one
    # buffer, which is harmless for speed but leaves dQ wrong, so it takes the first tile untuned.
    cfgs = _configs(kernel, dim_class, atomic)
    return autotuned(_KERNELS[kernel], cfgs[:1] if atomic else cfgs, _TUNE_KEY, prune)


def _descriptor(t: torch.Tensor, rows: int, bd: int):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, bd])


def _tile_for(kernel: str, tile, head_dim: int, buckets: tuple, interpret: bool, atomic: bool):
    """The forced tile, the interpreter's, the one ``AULE_TRITON_CONFIG``/``AULE_TRITON_AUTOTUNE=0``
    names among those that fit the shape, or None (the autotuner's pick)."""
    if tile is not None or interpret:
        return tile if tile is not None else INTERPRET_TILE * (len(_BLOCKS[kernel]) // 2)
    index = settings.triton_config()
    if index is None:
        return None
    fits = prune(_configs(kernel, head_dim, atomic), {"Q_BUCKET": buckets[0], "K_BUCKET": buckets[1]})
    c = fits[index % len(fits)]
    return (*(c.kwargs[n] for n in _BLOCKS[kernel]), c.num_warps, c.num_stages)


def _run(kernel: str, tensors: dict, rest: tuple, meta: dict, grid, tile, head_dim: int, buckets, interpret,
         atomic: bool = False):
    """Launch ``kernel`` with descriptors of ``tensors`` (by descriptor name), then ``rest``; a
    forced tile sizes the boxes here, a tuned one in its pre-hook."""
    bd = block_d(head_dim)
    tile = _tile_for(kernel, tile, head_dim, buckets, interpret, atomic)
    if tile is None:
        descs = [_descriptor(tensors[name], 64, bd) for name in _BOXES[kernel]]  # boxed by each config's pre-hook
        _tuned(kernel, 64 if bd <= 64 else 128, atomic)[grid](*descs, *rest, **meta)
        return
    kw, warps, stages = _split(kernel, tile)
    descs = [_descriptor(tensors[name], kw[block], bd) for name, block in _BOXES[kernel].items()]
    launch = dict(kw) if interpret else dict(kw, num_warps=warps, num_stages=stages)
    _KERNELS[kernel][grid(kw)](*descs, *rest, **meta, **launch)


def _tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` as TMA can address it: itself, or a contiguous copy (an upstream gradient may arrive
    broadcast, with stride 0, from a sum)."""
    size = t.element_size()
    if t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and all(st > 0 and (st * size) % 16 == 0
                                                            for st in t.stride()[:-1]):
        return t
    return t.contiguous()


def backward(dout, q, k, v, lse2, delta, dq, dk, dv, scale: float, left: int, right: int, variant: str,
             tile_dkdv=None, tile_dq=None) -> None:
    """Write dq, dk and dv (``[B, H, S, D]``, rows contiguous, in the inputs' dtype) of a call
    :func:`.hopper.refusal` accepts, from the preprocess's ``lse2`` and ``delta`` (float32
    ``[B, Hq, Sq]``). ``variant``: tma, atomic or fused. ``tile_dkdv``/``tile_dq`` force
    ``(BLOCK_M, BLOCK_N[, num_warps, num_stages])`` (the fused kernel's is ``tile_dkdv``,
    ``(BLOCK_M, BLOCK_N, BLOCK_M2, BLOCK_N2[, num_warps, num_stages])``); otherwise the
    interpreter's tile, the configuration ``AULE_TRITON_CONFIG`` names, or the autotuner's pick
    among :data:`TILES`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    dout = _tma_ready(dout)
    interpret = q.device.type == "cpu"
    buckets = (next_pow2(sq), next_pow2(sk))
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d(d), HAS_LEFT=left >= 0, HAS_RIGHT=right >= 0)
    shape = (hq // hkv, sq, sk, left, right, scale * LOG2E, scale, *buckets)
    tensors = dict(desc_q=q, desc_k=k, desc_v=v, desc_do=dout, desc_dk=dk, desc_dv=dv, desc_dq=dq,
                   desc_q2=q, desc_k2=k, desc_v2=v, desc_do2=dout)
    run = functools.partial(_run, head_dim=d, buckets=buckets, interpret=interpret)
    if variant == "fused":
        run("fused", tensors, (lse2, delta, b, hq, hkv, *shape), meta,
            lambda m: (cdiv(sk, m["BLOCK_N"]) * b * hkv + cdiv(sq, m["BLOCK_M2"]) * b * hq,), tile_dkdv)
        return
    atomic = variant == "atomic"
    # The atomic variant's dQ: float32, added into by every key tile that sees a row, cast at the end.
    acc = torch.zeros((b, hq, sq, d), dtype=torch.float32, device=q.device) if atomic else lse2
    run("dkdv", tensors, (lse2, delta, acc, *(acc.stride()[:3] if atomic else (0, 0, 0)), hq, hkv, *shape),
        dict(meta, ATOMIC_DQ=atomic), lambda m: (cdiv(sk, m["BLOCK_N"]), b * hkv), tile_dkdv, atomic=atomic)
    if atomic:
        dq.copy_(acc)
        return
    run("dq", tensors, (lse2, delta, hq, *shape), meta, lambda m: (cdiv(sq, m["BLOCK_M"]), b * hq), tile_dq)


def variant_for(q, k, v, features: bool, forced=None, right: int = -1) -> str | None:
    """The Hopper backward variant for this call, or None for the general kernels. ``forced``: a
    variant name (raises ``ValueError`` when the call cannot take it), False (the general kernels),
    or None: ``AULE_TRITON_HOPPER_BWD`` decides, for a CUDA tensor on a compute capability 9.x device
    with no features and strides TMA can address (the reason it passed over logged at DEBUG); unset,
    it takes :data:`MEASURED`'s variant for the call's head_dim class and mask (``right`` >= 0: causal
    or another right-bounded mask), none where nothing was measured faster."""
    if forced is False:
        return None
    if forced is not None:
        if forced not in VARIANTS:
            raise ValueError(f"hopper_bwd must be one of {', '.join(VARIANTS)}, False or None, got {forced!r}")
        why = _refusal(q, k, v, features)
        if why:
            raise ValueError(f"the Hopper backward cannot serve this call: {why}")
        return forced
    variant = settings.triton_hopper_bwd()
    if variant is None or q.device.type != "cuda" or getattr(torch.version, "hip", None):
        return None
    if _capability(q.device.index or 0)[0] != 9:
        return None
    why = _refusal(q, k, v, features)
    if why:
        log.debug("AULE_TRITON_HOPPER_BWD=%s passed over for the general backward: %s", variant, why)
        return None
    if variant == "auto":
        return MEASURED.get((64 if block_d(q.shape[-1]) <= 64 else 128, right >= 0))
    return variant


def _refusal(q, k, v, features: bool) -> str | None:
    """Why the Hopper backward cannot serve a call: the Hopper forward's rules (:func:`.hopper.refusal`)
    and its own head_dim bound."""
    why = refusal(q, k, v, features)
    if why is None and q.shape[-1] > MAX_HEAD_DIM:
        why = f"the Hopper backward takes head_dim up to {MAX_HEAD_DIM} (its tiles spilled beyond), got {q.shape[-1]}"
    return why

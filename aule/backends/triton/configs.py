"""Per-target tile configurations for the attention kernels, and their pruning by shape.

NVIDIA and AMD run the same kernels (:mod:`.kernels`); only these tables differ. Each kernel is
autotuned over the configurations that survive :func:`prune`, keyed on the shape (power-of-two
buckets of seq_q and seq_k, head_dim, mask sides, dtype), so a new sequence length within a
bucket reuses the tuned choice instead of tuning again.
"""
from __future__ import annotations

import functools

from .common import amd_family, block_d

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and head-dim class.
# "fwd" and "dq" tile queries by BLOCK_M and walk keys by BLOCK_N; "dkdv" holds a BLOCK_N key tile
# (its dK/dV accumulators) and walks queries by BLOCK_M.
# Hopper/Ampere: 128-row query tiles with 8 warps (two warpgroups) keep the tensor cores fed.
# Chosen from the resource report of Triton's sm_90 compile (no spills, shared memory under
# the 227 KB limit); the dK/dV kernel holds two fp32 accumulators, hence 8 warps for 128 keys.
_NVIDIA = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
        # 64-row tiles waste fewer keys at the edges of a narrow sliding window.
        128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3)],
        256: [(64, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2)],
    },
    "dkdv": {
        64: [(64, 128, 8, 3), (64, 64, 4, 3), (32, 128, 8, 3)],
        128: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 64, 8, 3)],
        256: [(32, 64, 4, 2), (32, 32, 4, 2), (64, 32, 4, 1)],
    },
    "dq": {
        64: [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 4, 3)],
        256: [(64, 32, 4, 2), (32, 32, 4, 2), (64, 64, 8, 1)],
    },
}

# float32 on NVIDIA runs its products as three TF32 passes (near-fp32 accuracy): operands take
# twice the bytes and three times the registers, so tiles shrink. Beyond head_dim 128 every
# float32 tile spilled kilobytes per thread in the sm_90 resource report: refused (FP32_MAX_DIM).
_NVIDIA_FP32 = {
    "fwd": {64: [(64, 64, 8, 2)], 128: [(64, 32, 4, 2)]},
    "dkdv": {64: [(32, 64, 8, 2)], 128: [(32, 32, 4, 2)]},
    "dq": {64: [(64, 32, 8, 2)], 128: [(32, 32, 4, 2)]},
}
NVIDIA_FP32_MAX_DIM = 128

# FP8 forward (NVIDIA, sm_89+): operands take half the bytes of 16-bit ones, so a key tile of 128
# costs the shared memory and registers a tile of 64 does in bf16, and twice the keys per step
# halve the softmax's per-tile overhead (FlashAttention-3 runs 128 x 128 fp8 tiles at hd 128).
# Each row compiles for sm_90 (Triton 3.9, ptxas offline) to e4m3 wgmma without spills: hd 128
# 128x128/8 warps 227 registers, 112 KB shared at 3 stages; 128x128 with 4 warps at hd 64 and at
# hd 256 with one stage spilled to the stack, so neither is here. Forward only: FP8 has no backward.
_NVIDIA_FP8 = {
    "fwd": {
        64: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 3)],
        128: [(128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 3), (64, 128, 4, 3)],
        256: [(128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3)],
    },
}

# CDNA (MI200/MI300): wave64, a stream-pipelined loop wants 1-2 stages; waves_per_eu trades
# registers for occupancy and is a compile option only the AMD backend accepts.
_CDNA = {
    "fwd": {
        64: [(128, 64, 4, 2, 2), (128, 128, 8, 2, 2), (64, 64, 4, 2, 1)],
        128: [(128, 64, 4, 2, 2), (128, 32, 4, 2, 2), (64, 64, 4, 2, 1)],
        256: [(64, 64, 4, 1, 1), (64, 32, 4, 1, 1)],
    },
    "dkdv": {
        64: [(32, 128, 4, 1, 1), (64, 64, 4, 1, 1)],
        128: [(32, 128, 4, 1, 1), (64, 64, 4, 1, 1), (32, 64, 4, 1, 1)],
        256: [(32, 64, 4, 1, 1), (32, 32, 4, 1, 1)],
    },
    "dq": {
        64: [(128, 32, 4, 1, 1), (64, 64, 4, 1, 1)],
        128: [(128, 32, 4, 1, 1), (64, 64, 4, 1, 1), (64, 32, 4, 1, 1)],
        256: [(64, 32, 4, 1, 1), (32, 32, 4, 1, 1)],
    },
}

# RDNA3/4 (wave32, smaller register file per SIMD): smaller tiles, no waves_per_eu.
_RDNA = {
    "fwd": {64: [(64, 64, 4, 1), (64, 32, 4, 1)], 128: [(64, 32, 4, 1), (32, 32, 4, 1)],
            256: [(32, 32, 4, 1), (32, 16, 4, 1)]},
    "dkdv": {64: [(32, 64, 4, 1), (32, 32, 4, 1)], 128: [(32, 64, 4, 1), (32, 32, 4, 1)],
             256: [(16, 32, 4, 1), (32, 32, 4, 1)]},
    "dq": {64: [(64, 32, 4, 1), (32, 32, 4, 1)], 128: [(64, 32, 4, 1), (32, 32, 4, 1)],
           256: [(32, 16, 4, 1), (32, 32, 4, 1)]},
}

# The interpreter runs each program op by op on the CPU: one modest tile, no tuning.
INTERPRET_TILE = (32, 32)


def table_for(target: str, fp32: bool = False, fp8: bool = False) -> dict:
    """The configuration table for 'cuda' or an AMD architecture name such as 'gfx942'. AMD's FP8
    forward takes its 16-bit tiles (no FP8 measurements on AMD yet)."""
    if target == "cuda":
        return _NVIDIA_FP8 if fp8 else (_NVIDIA_FP32 if fp32 else _NVIDIA)
    family = amd_family(target)
    if family == "cdna":
        return _CDNA
    if family == "rdna":
        return _RDNA
    return _NVIDIA if target.startswith("sm") else _RDNA


def head_dim_class(head_dim: int) -> int:
    """Which row of a table serves ``head_dim`` (by its padded power-of-two width)."""
    bd = block_d(head_dim)
    return 64 if bd <= 64 else (128 if bd <= 128 else 256)


@functools.lru_cache(maxsize=None)
def configs(target: str, kernel: str, head_dim_class: int, fp32: bool = False, fp8: bool = False):
    """``triton.Config`` objects for one kernel on one target, head-dim class and precision."""
    import triton

    out = []
    for row in table_for(target, fp32, fp8)[kernel][head_dim_class]:
        bm, bn, warps, stages = row[:4]
        kw = {"BLOCK_M": bm, "BLOCK_N": bn}
        if len(row) > 4:
            kw["waves_per_eu"] = row[4]
        out.append(triton.Config(kw, num_warps=warps, num_stages=stages))
    return out


def prune(cfgs, named_args, **kwargs):
    """Drop tiles much larger than the sequence they cover (a 128-row tile for 5 queries wastes
    the tensor cores); keep the smallest tile when nothing else fits. The sequence is the shape
    bucket (the power of two above seq_q, seq_k), which for varlen is the longest sequence's:
    SEQ_Q and SEQ_K are then the packed totals."""
    sq = max(16, int(named_args["Q_BUCKET"]))
    sk = max(16, int(named_args["K_BUCKET"]))
    kept = [c for c in cfgs if c.kwargs["BLOCK_M"] <= sq and c.kwargs["BLOCK_N"] <= sk]
    if kept:
        return kept
    return [min(cfgs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_warps))]

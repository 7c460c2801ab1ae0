"""Compile the dense and varlen attention kernels with CHECK on (device-side checks of cu_seqlens,
sinks and slopes, recorded in an error flag) for an H100/H200 (sm90) without a GPU, as
``paged_compile_check.py`` does for the paged kernels: the interpreter accepts code the compiler
refuses, so this is what catches it on a CPU machine. Offsets both as int32 and int64 (the caller's
width is kept). Run in its own process, ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

from paged_compile_check import compile_kernel  # noqa: E402

from aule.backends.triton import kernels  # noqa: E402

_FLOATS = {"qk_scale", "sm_scale", "cap_in", "cap_out"}
_FP32_POINTERS = {"LSE", "LSE2", "DELTA", "ALIBI", "SINKS", "MASK", "QD", "KD", "VD"}


def signature(fn, cu: str) -> tuple[dict, dict]:
    """``(pointers, scalars)`` of a dense kernel: upper-case pointer names (fp16 data, fp32
    statistics and features, int32 spans, ``cu`` offsets, int64 flag words), int32 scalars."""
    pointers, scalars = {}, {}
    constexprs = {p.name for p in fn.params if p.is_constexpr}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in _FLOATS:
            scalars[name] = "fp32"
        elif name.startswith("stride_") or not name.isupper() or name in (
                "SEQ_Q", "SEQ_K", "LEFT", "RIGHT", "H_Q", "H_KV", "GROUP", "Q_BUCKET", "K_BUCKET", "MAX_Q", "MAX_K"):
            scalars[name] = "i32"
        elif name in ("CU_Q", "CU_K"):
            pointers[name] = cu
        elif name in ("ERR", "DIRTY"):
            pointers[name] = "*i64"
        elif name == "KSPAN":
            pointers[name] = "*i32"
        else:
            pointers[name] = "*fp32" if name in _FP32_POINTERS else "*fp16"
    return pointers, scalars


def main() -> int:
    common = dict(HEAD_DIM=128, BLOCK_D=128, PAD_D=False, HAS_LEFT=False, HAS_RIGHT=True, DOT_PREC="tf32",
                  SOFTCAP=False, HAS_ALIBI=True, HAS_KSPAN=False, MASK_KIND=0, VARLEN=True, CHECK=True,
                  TANH=kernels.TANH_EXP2, BLOCK_M=64, BLOCK_N=64)
    ptx = ""
    for cu in ("*i32", "*i64"):
        for fn, extra in ((kernels._attn_fwd, dict(HAS_SINKS=True, FP8=0, ALIBI_MODE=kernels.ALIBI_LEFT)),
                          (kernels._attn_bwd_dkdv, {}),
                          (kernels._attn_bwd_dq, {})):
            pointers, scalars = signature(fn, cu)
            ptx += compile_kernel(fn, pointers, scalars, {**common, **extra})
    # The dense forward with sinks and slopes checked (no offsets).
    pointers, scalars = signature(kernels._attn_fwd, "*i32")
    ptx += compile_kernel(kernels._attn_fwd, pointers, scalars, {**common, "VARLEN": False, "HAS_SINKS": True, "FP8": 0,
                                                                 "ALIBI_MODE": kernels.ALIBI_LEFT})
    # A device-analysed mask: the span and the boolean mask, whose tiles the span may make unread.
    for mode in (kernels.ALIBI_LEFT, 0):
        compile_kernel(kernels._attn_fwd, pointers, scalars, {**common, "VARLEN": False, "HAS_SINKS": False, "FP8": 0,
                                                              "HAS_KSPAN": True, "MASK_KIND": 1, "CHECK": False,
                                                              "HAS_ALIBI": mode != 0, "ALIBI_MODE": mode})
    # The device hull of boolean and additive masks.
    hull_ptrs = {"MASK": "*u8", "KSPAN": "*i32"}
    hull_scalars = {n: "i32" for n in ("H_Q", "ROWS", "SEQ_K", "stride_mb", "stride_mh", "stride_mm", "stride_mn")}
    for kind, ptr in ((1, "*u8"), (2, "*fp32")):
        compile_kernel(kernels._mask_hull, {**hull_ptrs, "MASK": ptr}, hull_scalars,
                       dict(MASK_KIND=kind, BLOCK_M=16, BLOCK_N=256))
    ops = re.findall(r"atom\.[\w.]+", ptx)
    if not ops or any(".sys." not in op for op in ops) or not any("release" in op for op in ops):
        print(f"the flag atomics are not all at system scope with a release: {sorted(set(ops))}", file=sys.stderr)
        return 1
    print("compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())

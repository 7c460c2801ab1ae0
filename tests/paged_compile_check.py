"""Compile the bounds-checking paged kernels (with and without softcap, ALiBi and sinks, and the
split-K merge) for an H100/H200 (sm90) without a GPU: Triton's compiler and the ptxas it ships need
no device. The interpreter accepts code the compiler refuses
(a global that is no constexpr, mismatched atomic operand types), so this is what catches it on a
CPU machine. Run in its own process: the interpreter must not be on (``TRITON_INTERPRET`` unset).
"""
from __future__ import annotations

import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aule.backends.triton import paged as tp  # noqa: E402


def compile_kernel(fn, pointers: dict, scalars: dict, constexprs: dict) -> str:
    """The PTX of ``fn`` for sm90; ``scalars`` maps each runtime scalar to its Triton type."""
    sig = {**pointers, **scalars, **{n: "constexpr" for n in constexprs}}
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", 90, 32))
    return kernel.asm["ptx"]


def main() -> int:
    strides = ("qb qh qm qd kb kt kh kd vb vt vh vd bt ob oh om od").split()
    attn = ""
    # packed: the query offsets' checks too; features: softcap, ALiBi and sinks, the sinks joined
    # after the last tile (unsplit) or in the merge (split).
    for packed, split, features in ((False, True, False), (True, True, False), (True, False, True),
                                    (False, True, True)):
        attn += compile_kernel(
            tp._paged_attn_fwd,
            {"Q": "*fp16", "KC": "*fp16", "VC": "*fp16", "BT": "*i64", "CL": "*i32", "QSL": "*i32", "O": "*fp16",
             "PO": "*fp32", "ERR": "*i64", "DIRTY": "*i64", "ALIBI": "*fp32", "SINKS": "*fp32"},
            {**{"stride_" + n: "i32" for n in strides}, "HEADS_KV": "i32", "NUM_SPLITS": "i32", "scale2": "fp32",
             "cap_in": "fp32", "cap_out": "fp32", "LEFT": "i32", "NUM_BLOCKS": "i32", "CAPACITY": "i32",
             "BATCH": "i32", "NUM_TOKENS": "i32", "MAX_Q": "i32"},
            dict(Q_LEN=1, GROUP=4, BLOCK_M=16, BLOCK_SIZE=16, BLOCK_N=64, HEAD_DIM=128, BLOCK_D=128, HAS_LEFT=False,
                 SPLIT=split, UPCAST=False, WIDE=False, PRECISION="tf32", CHECK=True, PACKED=packed,
                 SOFTCAP=features, HAS_ALIBI=features, HAS_SINKS=features))
    for packed in (False, True):
        compile_kernel(
            tp._paged_attn_merge, {"PO": "*fp32", "O": "*fp16", "SINKS": "*fp32"},
            {**{"stride_" + n: "i32" for n in "ob oh om od".split()}, "HEADS_Q": "i32", "NUM_SPLITS": "i32"},
            dict(Q_LEN=1, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=8, PACKED=packed, HAS_SINKS=True))
    strides = ("kt kh kd vt vh vd cb ct ch cd db dt dh dd").split()
    copy = compile_kernel(
        tp._copy_kv_to_paged,
        {"K": "*fp16", "V": "*fp16", "KC": "*fp16", "VC": "*fp16", "SLOTS": "*i32", "ERR": "*i64", "DIRTY": "*i64"},
        {**{"stride_" + n: "i32" for n in strides}, "CAPACITY": "i32"},
        dict(HEADS_KV=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, CHECK=True))
    # The flag lives in host memory: every word is written by a system-scope atomic, and the done
    # word (like the dirty word) with release semantics.
    for name, ptx in (("paged attention", attn), ("KV write", copy)):
        ops = re.findall(r"atom\.[\w.]+", ptx)
        if not ops or any(".sys." not in op for op in ops) or not any("release" in op for op in ops):
            print(f"{name}: the flag atomics are not all at system scope with a release: {sorted(set(ops))}",
                  file=sys.stderr)
            return 1
    print("compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())

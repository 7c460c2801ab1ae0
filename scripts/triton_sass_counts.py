"""Instructions per score in the Triton forward's key loops, from its SASS, without a GPU.

Compiles ``kernels._attn_fwd`` for an NVIDIA target (default sm_90) with Triton's own compiler and
the ptxas/nvdisasm it ships, finds each loop of the SASS (a label and the backward branch to it),
and prints its instruction mix divided by the scores one thread computes per iteration
(BLOCK_M * BLOCK_N / threads). The feature variants (softcap's tanh forms, ALiBi's forms) are
compiled beside plain attention, so what each costs per score reads off one table; MUFU
operations (exp2, tanh, reciprocals) run at a sixteenth of the FMA rate on Hopper.

The kernels are specialised as a launch would specialise them (16-byte aligned pointers and
strides, head-dim strides of 1). What this cannot show is time: use
scripts/time_score_variants.py on the GPU for that.

    python scripts/triton_sass_counts.py                       # bf16, head_dim 128, 128x64 tiles, 8 warps
    python scripts/triton_sass_counts.py --tile 128,128,8,2 --only plain,softcap-approx
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # the compiler, not the interpreter
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aule.backends.triton import kernels  # noqa: E402

# name: (causal, compile-time flags beyond plain attention)
VARIANTS = {
    "plain": (True, {}),
    "plain-noncausal": (False, {}),
    "softcap-exp2": (True, dict(SOFTCAP=True, TANH=kernels.TANH_EXP2)),
    "softcap-rcp": (True, dict(SOFTCAP=True, TANH=kernels.TANH_RCP)),
    "softcap-approx": (True, dict(SOFTCAP=True, TANH=kernels.TANH_APPROX)),
    "alibi-exact": (True, dict(HAS_ALIBI=True, ALIBI_MODE=kernels.ALIBI_EXACT)),
    "alibi-left": (True, dict(HAS_ALIBI=True, ALIBI_MODE=kernels.ALIBI_LEFT)),
    "alibi-exact-noncausal": (False, dict(HAS_ALIBI=True, ALIBI_MODE=kernels.ALIBI_EXACT)),
    "alibi-split-noncausal": (False, dict(HAS_ALIBI=True, ALIBI_MODE=kernels.ALIBI_SPLIT)),
    "softcap-approx+alibi-left": (True, dict(SOFTCAP=True, TANH=kernels.TANH_APPROX, HAS_ALIBI=True,
                                             ALIBI_MODE=kernels.ALIBI_LEFT)),
}
COLUMNS = ("MUFU.EX2", "MUFU.TANH", "MUFU.RCP", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "I2FP", "IMAD", "F2FP")
_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_FLOATS = {"qk_scale", "cap_in", "cap_out"}
_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}


def compile_forward(causal: bool, flags: dict, dtype: str, head_dim: int, tile, arch: int):
    fn = kernels._attn_fwd
    bm, bn, warps, stages = tile
    block_d = max(16, 1 << (head_dim - 1).bit_length())
    const = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PAD_D=block_d != head_dim, HAS_LEFT=False,
                 HAS_RIGHT=causal, DOT_PREC="tf32", SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False,
                 HAS_KSPAN=False, MASK_KIND=0, VARLEN=False, TANH=0, ALIBI_MODE=0, CHECK=False, FP8=0,
                 BLOCK_M=bm, BLOCK_N=bn)
    const.update(flags)
    sig, attrs = {}, {}
    pointers = fn.arg_names[:fn.arg_names.index("stride_qb")]  # the tensors come first
    for i, name in enumerate(fn.arg_names):
        if name in const:
            sig[name] = "constexpr"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name], const[name] = "constexpr", 1  # launches specialise unit strides
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name in ("Q", "K", "V", "O"):
            sig[name] = "*" + _DTYPES[dtype]
        elif name in ("KSPAN", "CU_Q", "CU_K"):
            sig[name] = "*i32"
        elif name == "MASK":
            sig[name] = "*u8"
        elif name in pointers:
            sig[name] = "*fp32"
        else:
            sig[name] = "i32"
        aligned = sig[name].startswith("*") or (name.startswith("stride_") and not name.startswith("stride_m"))
        if sig[name] != "constexpr" and aligned:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn, sig, const, attrs), target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages))


def _tool(name: str, cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(_TOOLS / name), *flags, f.name], capture_output=True, text=True,
                              check=True).stdout


def loops(sass: str) -> list[dict]:
    """The opcode counts of each loop (a label, then a branch back to it) in nvdisasm's output."""
    lines = sass.splitlines()
    labels, found = {}, []
    for n, line in enumerate(lines):
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = n
        branch = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if branch and labels.get(branch.group(1), n) < n:
            counts: dict = {}
            for body in lines[labels[branch.group(1)]:n + 1]:
                op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_]+)(\.([A-Z0-9_]+))?", body)
                if op:
                    # Opcodes without modifiers, except MUFU, whose modifier is the function.
                    key = f"MUFU.{op.group(4)}" if op.group(2) == "MUFU" else op.group(2)
                    counts[key] = counts.get(key, 0) + 1
            if sum(counts.values()) > 8:
                found.append(counts)
    return found


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--tile", default="128,64,8,3", help="BLOCK_M,BLOCK_N,num_warps,num_stages (default %(default)s)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (default %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all of %s)" % ", ".join(VARIANTS))
    args = ap.parse_args()
    tile = tuple(int(x) for x in args.tile.split(","))
    per = tile[0] * tile[1] / (tile[2] * 32)  # scores per thread per key tile
    print(f"sm_{args.arch} {args.dtype} head_dim {args.head_dim} tile {tile}: instructions per score in each key loop")
    print(f"{'variant':<28} {'regs':>4} {'loop':>4} {'all':>6} " + " ".join(f"{c:>9}" for c in COLUMNS))
    for name in (args.only.split(",") if args.only else VARIANTS):
        causal, flags = VARIANTS[name]
        kernel = compile_forward(causal, flags, args.dtype, args.head_dim, tile, args.arch)
        cubin = kernel.asm["cubin"]
        regs = re.search(r"REG:(\d+)", _tool("cuobjdump", cubin, "--dump-resource-usage"))
        for i, counts in enumerate(loops(_tool("nvdisasm", cubin, "-c"))):
            row = " ".join(f"{counts.get(c, 0) / per:9.2f}" for c in COLUMNS)
            print(f"{name:<28} {regs.group(1) if regs else '?':>4} {i:>4} {sum(counts.values()) / per:6.2f} {row}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

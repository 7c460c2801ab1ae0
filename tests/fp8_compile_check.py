"""Compile the FP8 forward kernel for the GPUs that run it, without one: an H100/H200 (sm90: its
products must become e4m3 wgmma, and with the tiles of configs._NVIDIA_FP8 at hd 128 use no
stack), MI300 (gfx942, e4m3fnuz) and MI350 (gfx950, e4m3fn) with CDNA's first tile. The interpreter
runs code the compiler refuses (and widens fp8 products to float16), so this is what catches a
kernel that would not build. Run in its own process: ``TRITON_INTERPRET`` must be unset.
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import torch  # noqa: E402

from aule.backends.triton import configs, kernels, ops  # noqa: E402

_POINTERS = {"O": "*bf16", "LSE": "*fp32", "ALIBI": "*fp32", "SINKS": "*fp32", "KSPAN": "*i32", "MASK": "*u8",
             "CU_Q": "*i32", "CU_K": "*i32", "QD": "*fp32", "KD": "*fp32", "VD": "*fp32"}
# The strides a contiguous q, k, out, [B, Hkv] descales and a keys-contiguous V have as 1 (Triton
# specialises those), so the compile sees the launch's contiguity.
_UNIT = ("stride_qd", "stride_kd", "stride_vn", "stride_od", "stride_qdh", "stride_kdh", "stride_vdh")


def compile_fwd(target, element: str, shift: int, tile, causal: bool, head_dim: int = 128, dot_prec: str = "ieee"):
    bm, bn, warps, stages = tile[:4]
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=head_dim, PAD_D=False, HAS_LEFT=False, HAS_RIGHT=causal, DOT_PREC=dot_prec,
                 SOFTCAP=False, HAS_ALIBI=False, HAS_SINKS=False, HAS_KSPAN=False, MASK_KIND=0, VARLEN=False,
                 TANH=kernels.TANH_EXP2, ALIBI_MODE=kernels.ALIBI_EXACT, BLOCK_M=bm, BLOCK_N=bn, FP8=shift,
                 **{n: 1 for n in _UNIT})
    sig, aligned = {}, {}
    for i, name in enumerate(inspect.signature(kernels._attn_fwd.fn).parameters):
        if name in flags:
            sig[name] = "constexpr"
            continue
        if name in ("Q", "K", "V"):
            sig[name] = "*" + element
        elif name in _POINTERS:
            sig[name] = _POINTERS[name]
        else:
            sig[name] = "fp32" if name in ("qk_scale", "cap_in", "cap_out") else "i32"
        if sig[name].startswith("*") or name.startswith("stride") or name in ("SEQ_Q", "SEQ_K"):
            # What a launch on allocator-aligned tensors at a 16k sequence tells the compiler.
            aligned[(i,)] = [["tt.divisibility", 16]]
    options = dict(num_warps=warps, num_stages=stages)
    if target.backend == "hip":
        options["waves_per_eu"] = tile[4] if len(tile) > 4 else 0
    return triton.compile(ASTSource(fn=kernels._attn_fwd, signature=sig, constexprs=flags, attrs=aligned),
                          target=target, options=options)


def resource_usage(cubin: bytes) -> dict:
    """cuobjdump's resource usage of a cubin as ``{"REG": .., "STACK": .., "SHARED": ..}`` (spilled
    registers live on the STACK); empty without cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {name: int(n) for name, n in re.findall(r"(REG|STACK|SHARED):(\d+)", usage)}


def _stack_bytes(cubin: bytes) -> int | None:
    """The STACK of cuobjdump's resource usage, None without cuobjdump."""
    return resource_usage(cubin).get("STACK")


def main() -> int:
    failures = []
    for row in configs.table_for("cuda", fp8=True)["fwd"][128]:
        for causal in (False, True):
            k = compile_fwd(GPUTarget("cuda", 90, 32), "fp8e4nv", 8, row, causal)
            products = set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.\w+\.f32\.e4m3\.e4m3", k.asm["ptx"]))
            stack = _stack_bytes(k.asm["cubin"])
            if not products:
                failures.append(f"sm90 {row}: no e4m3 wgmma in the PTX")
            if stack:
                failures.append(f"sm90 {row} causal={causal}: {stack} bytes of stack (spills)")
    cdna = configs.table_for("gfx942")["fwd"][128][0]
    for arch, element, shift in (("gfx942", "fp8e4b8", 7), ("gfx950", "fp8e4nv", 8)):
        try:
            k = compile_fwd(GPUTarget("hip", arch, 64), element, shift, cdna, True)
        except Exception as exc:  # noqa: BLE001 - reported with the target it failed for
            failures.append(f"{arch}: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}")
            continue
        if not re.search(r"v_mfma\w*(fp8|f8)", k.asm.get("amdgcn", "")):
            failures.append(f"{arch}: no fp8 MFMA in the code")
    # The 16-bit kernel with the precision name the launcher gives each AMD target (gfx950 has no tf32).
    for arch in ("gfx942", "gfx950"):
        try:
            compile_fwd(GPUTarget("hip", arch, 64), "fp16", 0, cdna, True,
                        dot_prec=ops.dot_precision(torch.float16, arch))
        except Exception as exc:  # noqa: BLE001 - reported with the target it failed for
            failures.append(f"{arch} fp16: {type(exc).__name__}: {str(exc).splitlines()[-1] if str(exc) else ''}")
    return finish(failures)


def finish(failures: list) -> int:
    """A compile check's exit: its failures on stderr and 1, or 'compiled' (what the test looks for) and 0."""
    for f in failures:
        print(f, file=sys.stderr)
    if failures:
        return 1
    print("compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())

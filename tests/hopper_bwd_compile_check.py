"""Compile the backward's dK/dV and dQ kernels for sm_90 without a GPU, the general ones
(aule/backends/triton/kernels.py, every NVIDIA tile of configs) beside the Hopper ones
(aule/backends/triton/hopper_bwd.py, every tile of hopper_bwd.TILES, every variant), bfloat16 at
head_dim 64 and 128 (its bound, hopper_bwd.MAX_HEAD_DIM), causal and not, and report what each became: registers
per thread, stack (spilled registers), shared memory, TMA loads (``cp.async.bulk.tensor``), wgmma
products, and the per-element global loads and atomics left in the PTX.

Arguments are specialised as the GPU launch would see them at the H200's shapes: pointers and
strides 16-byte divisible, head-dim strides 1, so the general kernels' loads vectorise as they do
there. Fails when a Hopper tile does not compile, spills, needs more than sm_90's shared memory or
issues no TMA load or no wgmma; the general kernels' rows are reported only (what the Hopper ones
are measured against). Run in its own process: ``TRITON_INTERPRET`` must be unset.
"""
from __future__ import annotations

import os
import re
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aule.backends.triton import configs, hopper_bwd, kernels  # noqa: E402
from fp8_compile_check import finish, resource_usage  # noqa: E402

SM90_SHARED = 232448  # the most shared memory one block may have on sm_90 (227 KB)
_FLOATS = {"qk_scale", "sm_scale", "cap_in", "cap_out"}
_FP32 = {"LSE", "LSE2", "DELTA", "ALIBI", "SINKS", "MASK", "DQ"}


def _compile(fn, sig: dict, constexprs: dict, attrs: dict, warps: int, stages: int):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def _signature(fn, flags: dict, desc_rows=None, element: str = "bf16") -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` of ``fn``: its constexprs from ``flags``, head-dim strides
    1 (as Triton specialises them), descriptors of ``desc_rows[name]`` rows, fp32 statistics."""
    sig, consts, attrs = {}, dict(flags), {}
    for i, name in enumerate(fn.arg_names):
        if name in flags:
            sig[name] = "constexpr"
        elif name.startswith("desc_"):
            sig[name] = f"tensordesc<{element}[1,1,{desc_rows[name]},{flags['BLOCK_D']}]>"
        elif name.startswith("stride_") and name.endswith("d"):
            sig[name] = "constexpr"
            consts[name] = 1
        elif name in _FLOATS:
            sig[name] = "fp32"
        elif name.startswith("stride_") or not name.isupper() or name in (
                "B", "SEQ_Q", "SEQ_K", "LEFT", "RIGHT", "H_Q", "H_KV", "GROUP", "Q_BUCKET", "K_BUCKET", "MAX_Q",
                "MAX_K"):
            sig[name] = "i32"
        elif name in ("ERR", "DIRTY"):
            sig[name] = "*i64"
        elif name in ("KSPAN", "CU_Q", "CU_K"):
            sig[name] = "*i32"
        else:
            sig[name] = "*fp32" if name in _FP32 else "*" + element
        sized = name.startswith("stride") or name in ("SEQ_Q", "SEQ_K")
        if sig[name].startswith("*") or (sig[name] == "i32" and sized):
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocator-aligned tensors at the H200's shapes
    return sig, consts, attrs


def _general_flags(d: int, causal: bool, bm: int, bn: int) -> dict:
    return dict(HEAD_DIM=d, BLOCK_D=d, PAD_D=False, HAS_LEFT=False, HAS_RIGHT=causal, DOT_PREC="tf32",
                SOFTCAP=False, HAS_ALIBI=False, HAS_KSPAN=False, MASK_KIND=0, VARLEN=False, CHECK=False,
                TANH=kernels.TANH_EXP2, BLOCK_M=bm, BLOCK_N=bn)


def compile_general(kernel: str, tile, causal: bool, d: int):
    bm, bn, warps, stages = tile
    fn = {"dkdv": kernels._attn_bwd_dkdv, "dq": kernels._attn_bwd_dq}[kernel]
    sig, consts, attrs = _signature(fn, _general_flags(d, causal, bm, bn))
    return _compile(fn, sig, consts, attrs, warps, stages)


def compile_hopper(kernel: str, tile, causal: bool, d: int, atomic: bool = False):
    fn = hopper_bwd._KERNELS[kernel]
    blocks, warps, stages = hopper_bwd._split(kernel, tile)
    flags = dict(HEAD_DIM=d, BLOCK_D=hopper_bwd.block_d(d), HAS_LEFT=False, HAS_RIGHT=causal, **blocks)
    if kernel == "dkdv":
        flags["ATOMIC_DQ"] = atomic
    rows = {name: blocks[block] for name, block in hopper_bwd._BOXES[kernel].items()}
    sig, consts, attrs = _signature(fn, flags, rows)
    return _compile(fn, sig, consts, attrs, warps, stages)


def describe(k) -> tuple[str, dict]:
    ptx = k.asm["ptx"]
    usage = resource_usage(k.asm["cubin"])
    facts = dict(regs=usage.get("REG"), stack=usage.get("STACK"), smem=k.metadata.shared,
                 tma=ptx.count("cp.async.bulk.tensor"), wgmma=len(re.findall(r"wgmma\.mma_async", ptx)),
                 ldg=len(re.findall(r"ld\.global", ptx)), atom=len(re.findall(r"(?<![\w.])(red|atom)\.global", ptx)))
    text = (f"regs {facts['regs']} stack {facts['stack']} smem {facts['smem'] // 1024:3d} KB tma {facts['tma']:2d} "
            f"wgmma {facts['wgmma']:3d} ld.global {facts['ldg']:3d} atomics {facts['atom']:3d}")
    return text, facts


def main() -> int:
    dims = (64, 128)
    failures, rows = [], []
    t0 = time.time()
    for d in dims:
        for causal in (False, True):
            mask = "causal" if causal else "full"
            for kernel in ("dkdv", "dq", "fused"):
                for tile in configs.table_for("cuda")[kernel][d] if kernel != "fused" else ():
                    name = f"general     {kernel:5s} d{d:<3d} {str(tile):26s} {mask:6s}"
                    try:
                        rows.append(f"{name} {describe(compile_general(kernel, tile, causal, d))[0]}")
                    except Exception as exc:  # noqa: BLE001 - reported with the tile it failed for
                        rows.append(f"{name} FAILED: {str(exc).strip().splitlines()[-1][:160] if str(exc) else exc}")
                variants = {"dkdv": (("tma", False), ("atomic", True)), "dq": (("tma", False),),
                            "fused": (("fused", False),)}[kernel]
                for variant, atomic in variants:
                    for tile in hopper_bwd.tiles(kernel + ("_atomic" if atomic else ""), d):
                        name = f"hopper {variant:6s} {kernel:5s} d{d:<3d} {str(tile):26s} {mask:6s}"
                        try:
                            text, f = describe(compile_hopper(kernel, tile, causal, d, atomic))
                        except Exception as exc:  # noqa: BLE001 - reported with the tile it failed for
                            msg = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
                            rows.append(f"{name} FAILED: {msg}")
                            failures.append(f"{name}: {msg}")
                            continue
                        rows.append(f"{name} {text}")
                        if f["stack"] or not f["tma"] or not f["wgmma"] or f["smem"] > SM90_SHARED:
                            failures.append(f"{name}: {text}")
    print("\n".join(rows))
    print(f"({time.time() - t0:.0f} s)")
    return finish(failures)


if __name__ == "__main__":
    sys.exit(main())

"""Compile the Hopper forward (aule/backends/triton/hopper.py) for sm_90 without a GPU, every
variant and tile of hopper.TILES at head_dim 64, 128 and 256, causal and
not, and report what each became: registers per thread, stack (spilled registers), shared memory,
and whether its loads are TMA copies (``cp.async.bulk.tensor``), its products wgmma and, for the
warp-specialised variant, whether Triton's Hopper pass split the loop into warp groups
(``setmaxnreg``, which only a specialised kernel issues; ``warps`` counts the groups it added).
Fails when a tile does not compile, spills, needs more than sm_90's shared memory, or issues no TMA
load or no wgmma, and when a ws form's loop is not specialised.
Run in its own process: ``TRITON_INTERPRET`` must be unset.
"""
from __future__ import annotations

import inspect
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from aule.backends.triton import hopper  # noqa: E402
from fp8_compile_check import finish, resource_usage  # noqa: E402

SM90_SHARED = 232448  # the most shared memory one block may have on sm_90 (227 KB)


def compile_variant(variant: str, tile, causal: bool, head_dim: int, element: str = "bf16", part: int = 0):
    bm, bn, warps, stages = tile
    bd = hopper.block_d(head_dim)
    flags = dict(HEAD_DIM=head_dim, BLOCK_D=bd, HAS_LEFT=False, HAS_RIGHT=causal, EVEN_K=True,
                 VARIANT=hopper.VARIANTS[variant], BLOCK_M=bm, BLOCK_N=bn, PART=part,
                 LSE_TMA=variant in hopper.WS_VARIANTS)
    sig, attrs = {}, {}
    for i, name in enumerate(inspect.signature(hopper._attn_fwd_tma.fn).parameters):
        if name == "VIS" and variant == "ws_rows":
            sig[name] = "*i32"  # its row numbers, read with or without a mask
        elif name == "VIS" and not (variant == "ws_table" and causal):
            flags[name] = None  # as attention_forward passes it: only ws_table's causal bound reads a table
            sig[name] = "constexpr"
        elif name == "VIS":
            sig[name] = "*u8"
        elif name in flags:
            sig[name] = "constexpr"
        elif name.startswith("desc_"):
            rows = bm if name in ("desc_q", "desc_o") else bn
            sig[name] = "*" + element if variant in hopper.WS_VARIANTS else f"tensordesc<{element}[1,1,{rows},{bd}]>"
        elif name == "LSE":
            sig[name] = "*fp32"
        elif name == "qk_scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
        if sig[name].startswith("*") or name.startswith("stride") or name in ("SEQ_Q", "SEQ_K"):
            attrs[(i,)] = [["tt.divisibility", 16]]  # allocator-aligned tensors at a 16k sequence
    return triton.compile(ASTSource(fn=hopper._attn_fwd_tma, signature=sig, constexprs=flags, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


def builds():
    """``(variant, head_dim, tile, causal, part)`` of every kernel to compile: every tile of tma,
    persistent and ws, the other ws forms' first tile at head_dim 64 and 128 (their others are ws's),
    and for ws_two with a mask both of its launches (PART 1: the specialised run; PART 2: the
    masked tiles, eight warps)."""
    for variant in hopper.VARIANTS:
        for d in (64, 128, 256):
            rows = hopper.tiles(variant, d)
            if variant in hopper.WS_VARIANTS and variant != "ws":
                if d == 256:
                    continue
                rows = rows[:1]
            for tile in rows:
                for causal in (False, True):
                    if variant == "ws_two" and causal:
                        yield variant, d, tile, causal, 1
                        yield variant, d, (*tile[:2], 8 if tile[0] >= 128 else 4, tile[3]), causal, 2
                    elif variant != "ws_two":  # unmasked, ws_two is the ws kernel
                        yield variant, d, tile, causal, 0


def main() -> int:
    failures, rows = [], []
    for variant, d, tile, causal, part in builds():
        name = (f"{variant:10s} d{d:<3d} {str(tile):18s} {'causal' if causal else 'full':6s}"
                f"{f' part {part}' if part else ''}")
        try:
            k = compile_variant(variant, tile, causal, d, part=part)
        except Exception as exc:  # noqa: BLE001 - reported with the tile it failed for
            msg = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            rows.append(f"{name} FAILED: {msg}")
            failures.append(f"{name}: {msg}")
            continue
        ptx = k.asm["ptx"]
        tma = "cp.async.bulk.tensor" in ptx
        wgmma = "wgmma.mma_async" in ptx
        ws = "setmaxnreg" in ptx
        usage = resource_usage(k.asm["cubin"])
        stack = usage.get("STACK")
        rows.append(f"{name} regs {usage.get('REG')} stack {stack} smem {k.metadata.shared // 1024:3d} KB "
                    f"warps {k.metadata.num_warps:2d} tma {int(tma)} wgmma {int(wgmma)} specialised {int(ws)}")
        smem = k.metadata.shared
        if stack or not tma or not wgmma or smem > SM90_SHARED:
            failures.append(f"{name}: stack {stack}, tma {tma}, wgmma {wgmma}, shared {smem}")
        if variant in hopper.WS_VARIANTS and part != 2 and not ws:
            failures.append(f"{name}: the 4-warp loop was not warp-specialised")
    print("\n".join(rows))
    return finish(failures)


if __name__ == "__main__":
    sys.exit(main())

"""Shader variants: which module serves a call, its specialization constants, push constants and
how a call is cut into dispatches that respect the device's limits.

``VARIANTS`` is declarative: one row per attention module (the SPIR-V file comes from
build_shaders.py's table of the same name). Other shader families (paged attention) add their
own rows and reuse :func:`spirv_code`, :func:`push_block` and :func:`plan_chunks`.
"""
from __future__ import annotations

import functools
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...errors import UnsupportedError
from .runtime import Context, Dispatch

LOG2E = 1.4426950408889634

# --- SPIR-V files --------------------------------------------------------------------------------


def spirv_dir() -> Path:
    """aule/spirv in an installed wheel (a link to spirv/ in a checkout), else the checkout's spirv/."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "spirv", here.parent.parent.parent / "spirv"):
        if (cand / "MANIFEST.json").is_file():
            return cand
    raise UnsupportedError(f"no compiled shaders: spirv/MANIFEST.json not found beside {here.parent.parent}; "
                           "reinstall aule or run build_shaders.py")


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((spirv_dir() / "MANIFEST.json").read_text())


@functools.lru_cache(maxsize=None)
def spirv_code(module: str) -> bytes:
    entry = manifest()["variants"].get(module)
    if entry is None:
        raise UnsupportedError(f"shader module {module!r} is not in spirv/MANIFEST.json; run build_shaders.py")
    return (spirv_dir() / entry["spv"]).read_bytes()


def push_constant_size(code: bytes) -> int:
    """Size in bytes of the push-constant block declared by a SPIR-V module (0 if none).

    Read from the module itself (member offsets of the Block used by the PushConstant variable),
    so a GLSL edit that the Python mirror missed is caught before any dispatch.
    """
    words = struct.unpack(f"<{len(code) // 4}I", code)
    pointers, offsets, members, pc_ptr = {}, {}, {}, None
    i = 5
    while i < len(words):
        op, n = words[i] & 0xFFFF, words[i] >> 16
        a = words[i + 1:i + n]
        if op == 32:  # OpTypePointer result storage type
            pointers[a[0]] = (a[1], a[2])
        elif op == 59 and a[2] == 9:  # OpVariable type result PushConstant
            pc_ptr = a[0]
        elif op == 72 and a[2] == 35:  # OpMemberDecorate struct member Offset value
            offsets.setdefault(a[0], {})[a[1]] = a[3]
        elif op == 30:  # OpTypeStruct result members...
            members[a[0]] = len(a) - 1
        i += max(n, 1)
    if pc_ptr is None:
        return 0
    struct_id = pointers[pc_ptr][1]
    offs = offsets.get(struct_id, {})
    return (max(offs.values()) + 4) if offs else 0  # every aule push field is 4 bytes


def push_block(fields: list[tuple[str, str]]) -> np.dtype:
    """A NumPy mirror of a GLSL push-constant block: 4-byte fields only, packed in order."""
    dt = np.dtype(fields)
    for name in dt.names:
        if dt.fields[name][0].itemsize != 4:
            raise TypeError(f"push constant field {name} must be 4 bytes, got {dt.fields[name][0]}")
    if dt.itemsize > 128:
        raise ValueError(f"push constants of {dt.itemsize} bytes exceed the 128 guaranteed by Vulkan")
    return dt


# Mirror of `Params` in glsl/attn_common.glsl.
ATTN_PUSH = push_block([
    ("seq_q", "<u4"), ("seq_k", "<u4"), ("group", "<u4"), ("heads", "<u4"),
    ("left", "<i4"), ("right", "<i4"), ("scale_log2", "<f4"), ("flags", "<u4"),
    ("q_base", "<u4"), ("k_base", "<u4"), ("v_base", "<u4"), ("o_base", "<u4"), ("lse_base", "<u4"),
    ("reverse", "<u4"),
])
ATTN_BINDINGS = 5  # q, k, v, o, lse


@functools.lru_cache(maxsize=None)
def checked_code(module: str, push_size: int) -> bytes:
    code = spirv_code(module)
    declared = push_constant_size(code)
    if declared != push_size:
        raise RuntimeError(f"shader {module} declares {declared} bytes of push constants but the Python "
                           f"mirror has {push_size}: rebuild spirv/ or fix the mirror")
    return code


# --- variants ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Tiles:
    bm: int   # query rows per workgroup
    bn: int   # keys per tile
    wg: int   # invocations
    tc: int   # invocations sharing a row group


@dataclass(frozen=True)
class Variant:
    """One attention module and what it needs from the device."""

    name: str
    module: str
    elem: str                     # storage type of q/k/v/o: 'float32' or 'float16'
    tiled: bool                   # attn_tiled.comp (tiles) or attn_baseline.comp (row per invocation)
    needs_fp16: bool = False
    tiles: tuple = ()             # Tiles candidates, best first; the first that fits is used
    cpu_tiles: tuple = ()         # the same for CPU devices (lavapipe), where other shapes win
    for_vendor: str | None = None  # chosen automatically only on this vendor
    math: str = ""                # shared-memory/arithmetic type when it differs from elem
    coopmat: bool = False         # attn_coopmat.comp: whole 16-row / COOPMAT_BN-key tiles
    lanes: tuple = ()             # attn_cpu.comp: (largest head_dim, rows per invocation, keys per
                                  # block) rows; one workgroup = one subgroup; CPU devices only

    def lane_shape(self, d: int) -> tuple:
        """(rows per invocation, keys per block) of attn_cpu.comp for head_dim ``d``."""
        # AULE_VULKAN_TILES="rows,keys" tries another shape (benchmarks tune with it).
        env = os.environ.get("AULE_VULKAN_TILES", "").strip()
        if env and len(env.split(",")) == 2:
            rows, keys = (int(x) for x in env.split(","))
            if rows < 4 or rows % 4 or keys < 1:
                raise ValueError(f"AULE_VULKAN_TILES={env!r} for {self.name}: rows must be a positive "
                                 f"multiple of 4 and keys positive")
            return rows, keys
        return next((r, k) for dmax, r, k in self.lanes if d <= dmax)

    def supports_head_dim(self, d: int) -> bool:
        if self.coopmat:
            return 16 <= d <= 256 and d % 16 == 0
        return 1 <= d <= 256 and (not (self.tiled or self.lanes) or d % 4 == 0)

    def coopmat_groups(self, info) -> int:
        # subgroups of 16 rows per workgroup: 128 invocations
        return max(1, 128 // max(16, info.subgroup_size))

    def shared_bytes(self, t: Tiles, d: int) -> int:
        if self.coopmat:
            nsg = t.bm // 16
            return nsg * 16 * COOPMAT_BN * 6 + nsg * 256 * 4 + nsg * 16 * 4
        if not self.tiled:
            return 0
        es = 2 if (self.math or self.elem) == "float16" else 4
        dp = (d // 4 + 1) * 4
        sp = t.bn + 4  # score rows padded by one vec4 (glsl SP4)
        return es * dp * (t.bm + t.bn) + 4 * t.bm * sp + (2 * t.bm * sp if es == 2 else 0) + 4 * t.bm

    def pick_tiles(self, d: int, info) -> Tiles | None:
        # AULE_VULKAN_TILES="bm,bn,wg,tc" tries a tile shape first (benchmarks tune with it).
        env = os.environ.get("AULE_VULKAN_TILES", "").strip()
        tried = ((Tiles(*(int(x) for x in env.split(","))),) if env.count(",") == 3 else ())  # 2 fields: cpu's
        tried += (self.cpu_tiles if info.is_cpu and self.cpu_tiles else ()) + self.tiles
        for t in tried:
            if (self.shared_bytes(t, d) <= info.max_shared_memory and t.wg <= info.max_workgroup_size
                    and t.wg >= t.bm and t.bn % t.tc == 0 and t.wg % t.tc == 0 and t.bm % (t.wg // t.tc) == 0):
                return t
        return None

    def keys_per_iteration(self, d: int, info) -> int:
        if self.coopmat:
            return COOPMAT_BN
        if self.lanes:
            return self.lane_shape(d)[1]
        return self.pick_tiles(d, info).bn if self.tiled else 1

    def unfit(self, d: int, info, seq_k: int = 0, seq_q: int = 0) -> str | None:
        """Why this variant cannot run head_dim ``d`` (``seq_q`` rows over ``seq_k`` keys) on the
        device, else None."""
        if self.coopmat:
            if not info.coopmat_f16:
                return (f"{self.name} needs VK_KHR_cooperative_matrix with 16x16x16 fp16 matrices and the "
                        f"Vulkan memory model, which {info.name} lacks")
            if info.subgroup_size < 16:
                return f"{self.name} gives each of 16 rows its own lane: needs subgroups of 16+, not {info.subgroup_size}"
            if (seq_q and seq_q % 16) or (seq_k and seq_k % COOPMAT_BN):
                return f"{self.name} needs seq_q % 16 == 0 and seq_k % {COOPMAT_BN} == 0, got {seq_q}, {seq_k}"
            if self.shared_bytes(Tiles(16 * self.coopmat_groups(info), COOPMAT_BN, 128, 1), d) > info.max_shared_memory:
                return f"{self.name} needs more shared memory than {info.name} has"
        if self.lanes and not info.is_cpu:
            return (f"{self.name} is built for CPU Vulkan drivers (one subgroup per workgroup, subgroup "
                    f"broadcasts); {info.name} is a {info.type} device")
        if self.needs_fp16 and not info.fp16:
            return f"{self.name} needs shaderFloat16 and storageBuffer16BitAccess, which {info.name} lacks"
        if not self.supports_head_dim(d):
            return f"{self.name} supports head_dim {'1..256' if self.name == 'baseline' else '4..256 in steps of 4'}, got {d}"
        if self.tiled and self.pick_tiles(d, info) is None:
            return f"{self.name} needs more shared memory for head_dim {d} than {info.name}'s {info.max_shared_memory} bytes"
        if info.loop_limit and seq_k:
            # The key loop is the shader's only loop (plus a few iterations outside it).
            max_keys = (info.loop_limit - 64) * self.keys_per_iteration(d, info)
            if seq_k > max_keys:
                return (f"{self.name} handles at most {max_keys} keys on {info.name}, which stops a shader "
                        f"after {info.loop_limit} loop iterations; seq_k is {seq_k}")
        return None

    def spec(self, d: int, info) -> tuple:
        if self.coopmat:
            nsg = self.coopmat_groups(info)
            return ((0, d), (1, nsg), (2, COOPMAT_BN), (3, nsg * max(16, info.subgroup_size)))
        if self.lanes:
            rows, keys = self.lane_shape(d)
            return ((0, d), (1, rows), (2, keys), (3, info.subgroup_size))
        if not self.tiled:
            return ((0, d), (1, 64))
        t = self.pick_tiles(d, info)
        return ((0, d), (1, t.bm), (2, t.bn), (3, t.wg), (4, t.tc))

    def rows_per_group(self, d: int, info) -> int:
        if self.coopmat:
            return 16 * self.coopmat_groups(info)
        if self.lanes:
            return self.lane_shape(d)[0] * info.subgroup_size
        return self.pick_tiles(d, info).bm if self.tiled else 64


# Best first; measured on an H100 (benchmarks/vulkan_attention.py, B1 H32 S4096 causal, GPU time):
# fp32 D64 (64,32,256,16) 20.5 TFLOP/s, D128 (32,32,128,16) 15.2; fp16 (32,32,128,16) 33.8 at D64
# and 35.4 at D128. Later rows fit smaller shared memories (lavapipe 32 KB, 16 KB devices).
COOPMAT_BN = 64
_FP32_TILES = (Tiles(64, 32, 256, 16), Tiles(32, 32, 128, 16), Tiles(32, 16, 64, 8),
               Tiles(16, 16, 64, 8), Tiles(16, 8, 64, 8))
_FP16_TILES = (Tiles(32, 32, 128, 16), Tiles(64, 32, 256, 16), Tiles(32, 16, 64, 8), Tiles(16, 16, 64, 8))
# lavapipe (2 cores, AVX2), fp32 B1 H8 S1024 D64 causal: (64,16,64,4) 229 ms, (64,16,128,8) 253,
# (32,32,128,16) 284, (32,32,64,8) 320 (one run each on a shared machine).
_CPU_TILES = (Tiles(64, 16, 64, 4), Tiles(64, 32, 128, 8))
# cpu variant (lavapipe, 2 shared cores, fp32 B1 H8 S1024 D64 causal, interleaved runs): rows per
# invocation 16: 85 ms, 12: 88, 8: 112; 16 rows and 8-key blocks 84 but twice the JIT time (53 s
# against 30 s for the first call). Rows shrink with head_dim to bound the registers and JIT time.
_CPU_LANES = ((64, 16, 4), (128, 8, 4), (256, 4, 4))
_WAVE64_TILES = (Tiles(64, 32, 256, 16), Tiles(32, 32, 128, 16), Tiles(32, 16, 64, 8), Tiles(16, 16, 64, 8))

VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("baseline", "baseline", "float32", tiled=False),
    Variant("fast", "fast", "float32", tiled=True, tiles=_FP32_TILES, cpu_tiles=_CPU_TILES),
    Variant("fp16", "fp16", "float16", tiled=True, needs_fp16=True, tiles=_FP16_TILES, cpu_tiles=_CPU_TILES),
    Variant("fp16_io", "fp16_io", "float16", tiled=True, needs_fp16=True, tiles=_FP32_TILES,
            cpu_tiles=_CPU_TILES, math="float32"),
    Variant("coopmat", "coopmat", "float16", tiled=False, needs_fp16=True, coopmat=True),
    Variant("fp16_amd", "fp16_amd", "float16", tiled=True, needs_fp16=True, tiles=_WAVE64_TILES,
            for_vendor="AMD"),
    Variant("cpu", "cpu", "float32", tiled=False, lanes=_CPU_LANES),
)}


def forced_variant() -> str | None:
    name = os.environ.get("AULE_VULKAN_VARIANT", "").strip()
    if not name:
        return None
    if name not in VARIANTS:
        raise ValueError(f"AULE_VULKAN_VARIANT={name!r} names no variant; choose one of {sorted(VARIANTS)}")
    return name


def select(dtype: str, d: int, info, forced: str | None = None, seq_k: int = 0, seq_q: int = 0) -> Variant:
    """See :func:`_select`; cached per (arguments, AULE_VULKAN_VARIANT, AULE_VULKAN_TILES)."""
    forced = forced or forced_variant()
    # The sequence lengths matter only for whole-tile variants and loop-limited drivers.
    exact = info.loop_limit or info.coopmat_f16
    return _select(dtype, d, info, forced, seq_k if exact else 0, seq_q if exact else 0,
                   os.environ.get("AULE_VULKAN_TILES", ""))


@functools.lru_cache(maxsize=1024)
def _select(dtype: str, d: int, info, forced: str | None, seq_k: int, seq_q: int, _tiles_env: str) -> Variant:
    """The variant for inputs of ``dtype`` and head_dim ``d``: forced, or the best that fits.

    float16 inputs use an fp16 variant where the device has fp16 arithmetic and 16-bit storage,
    else they are computed in float32. A variant the device cannot run is never picked.
    """
    if forced is not None:
        v = VARIANTS[forced]
        why = v.unfit(d, info, seq_k, seq_q)
        if why:
            raise UnsupportedError(f"AULE_VULKAN_VARIANT={forced}: {why}")
        return v
    order = []
    if dtype == "float16":
        order += ["fp16_amd"] if info.vendor == "AMD" and info.subgroup_size == 64 else []
        # coopmat is correct on the H100 but slower there than fp16 (9 and 14 TFLOP/s against 34 and
        # 35 at head_dim 64/128: its row softmax runs on 16 lanes and the accumulators round-trip
        # through shared memory every tile), so only AULE_VULKAN_VARIANT=coopmat selects it.
        order += ["fp16"]
    # CPU devices, float32: lavapipe (2 shared cores) fp32 B1 H8 S1024 D64 causal, medians of runs
    # interleaved in one process: cpu 45-58 ms, fast 179-241, torch SDPA 13-15 (load ~1.3); cpu 98,
    # fast 459 (busy); benchmark script: cpu 35, fast 233-279, torch 10.5. D128: cpu 168, fast 617.
    # float16 keeps its fp16 variant: GpuTensors must stay in their dtype.
    # head_dim 256 is left to `fast`: unmeasured there, and its first call JITs for minutes.
    order += (["cpu"] if info.is_cpu and dtype != "float16" and d <= 128 else []) + ["fast", "baseline"]
    for name in order:
        v = VARIANTS[name]
        if v.for_vendor and v.for_vendor != info.vendor:
            continue
        if v.unfit(d, info, seq_k, seq_q) is None:
            return v
    raise UnsupportedError(f"no Vulkan variant runs head_dim {d} on {info.name}: "
                           + "; ".join(VARIANTS[n].unfit(d, info, seq_k, seq_q) or "" for n in order))


# --- dispatch planning -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    @property
    def pairs(self) -> int:
        return self.batch * self.heads_kv


def plan_chunks(per_pair: dict, pairs: int, info, max_heads: int) -> int:
    """How many (batch, kv-head) pairs one dispatch may cover so that every binding's range fits
    ``maxStorageBufferRange`` (with room for offset alignment) and heads fit the grid."""
    room = info.max_storage_buffer_range - offset_alignment(info)
    fit = pairs
    for name, nbytes in per_pair.items():
        if nbytes > room:
            raise UnsupportedError(
                f"one head's {name} takes {nbytes} bytes, more than the device's storage-buffer range "
                f"({info.max_storage_buffer_range} bytes): shorten the sequence")
        fit = min(fit, room // max(1, nbytes))
    return max(1, min(fit, max_heads))


def offset_alignment(info) -> int:
    # 16 bytes at least, so the element offset left for the shader is whole vec4s.
    return max(16, info.min_storage_offset_alignment)


@functools.lru_cache(maxsize=1024)
def attention_plan(variant: Variant, shape: Shape, scale: float, left: int, right: int, want_lse: bool,
                   info, _tiles_env: str = "") -> tuple:
    """Everything about a call's dispatches that does not depend on which buffers hold the data:
    ``(spec, [(push bytes, ((binding start, nbytes, element size) x 5), groups), ...])``.
    Cached, so a repeated call shape costs a dictionary lookup. Raises UnsupportedError when a
    device limit cannot be met."""
    d = shape.head_dim
    es = 2 if variant.elem == "float16" else 4
    g = shape.group
    bm = variant.rows_per_group(d, info)
    blocks = math.ceil(shape.seq_q / bm)
    if blocks > info.max_workgroup_count[0]:
        raise UnsupportedError(f"seq_q={shape.seq_q} needs {blocks} workgroups in x, more than the device's "
                               f"{info.max_workgroup_count[0]}")
    per_pair = {"query": g * shape.seq_q * d * es, "key": shape.seq_k * d * es, "value": shape.seq_k * d * es,
                "output": g * shape.seq_q * d * es, "lse": g * shape.seq_q * 4}
    chunk = plan_chunks(per_pair, shape.pairs, info, info.max_workgroup_count[1] // g)
    chunks = []
    for p0 in range(0, shape.pairs, chunk):
        n = min(chunk, shape.pairs - p0)
        pc = np.zeros((), dtype=ATTN_PUSH)
        pc["seq_q"], pc["seq_k"], pc["group"], pc["heads"] = shape.seq_q, shape.seq_k, g, n * g
        pc["left"], pc["right"] = left, right
        pc["scale_log2"] = scale * LOG2E
        pc["flags"] = 1 if want_lse else 0
        pc["reverse"] = 1 if right >= 0 else 0
        ranges = []
        for name, field in (("query", "q_base"), ("key", "k_base"), ("value", "v_base"), ("output", "o_base"),
                            ("lse", "lse_base")):
            if name == "lse" and not want_lse:
                ranges.append(None)
                continue
            size = 4 if name == "lse" else es
            start, nbytes = p0 * per_pair[name], n * per_pair[name]
            off = start // offset_alignment(info) * offset_alignment(info)
            pc[field] = (start - off) // size
            ranges.append((off, nbytes + (start - off)))
        chunks.append((pc.tobytes(), tuple(ranges), (blocks, n * g, 1)))
    return variant.spec(d, info), tuple(chunks)


def bind(pipeline, chunks, buffers) -> list[Dispatch]:
    """Dispatches of a plan's chunks over ``buffers`` (q, k, v, o, lse), each bound to its range."""
    out = []
    for push, ranges, groups in chunks:
        bindings = tuple((b, 0, b.nbytes) if r is None else (b, r[0], max(4, min(r[1], b.nbytes - r[0])))
                         for b, r in zip(buffers, ranges))
        out.append(Dispatch(pipeline, bindings, push, groups))
    return out


def attention_dispatches(ctx: Context, variant: Variant, shape: Shape, bufs, scale: float,
                         left: int, right: int, want_lse: bool) -> list[Dispatch]:
    """Dispatches computing attention over device buffers ``bufs`` (q, k, v, o, lse)."""
    spec, chunks = attention_plan(variant, shape, scale, left, right, want_lse, ctx.info,
                                  os.environ.get("AULE_VULKAN_TILES", ""))
    pipeline = ctx.pipeline(variant.module, functools.partial(checked_code, variant.module, ATTN_PUSH.itemsize),
                            ATTN_BINDINGS, ATTN_PUSH.itemsize, spec)
    return bind(pipeline, chunks, bufs)

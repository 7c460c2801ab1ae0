"""The one table of shader modules, and loading their SPIR-V.

Each :class:`Module` row says everything about one compiled module: its GLSL entry point and
``#define`` s (what build_shaders.py compiles), its push-constant block (the NumPy mirror), how
many bindings and which specialization constants it takes, what it needs from the device and,
for attention modules, the kernel family (code path) that knows its tiles and limits.

build_shaders.py loads this file by path, outside the ``aule`` package, so that building the
shaders needs neither aule's imports nor the Vulkan binding: nothing here may import from aule
at module level.
"""
from __future__ import annotations

import functools
import json
import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_warned: set = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logging.getLogger("aule").warning(message)


# --- push-constant mirrors ----------------------------------------------------------------------


def push_block(fields: list[tuple[str, str]]) -> np.dtype:
    """A NumPy mirror of a GLSL push-constant block: 4-byte fields only, packed in order."""
    dt = np.dtype(fields)
    for name in dt.names:
        if dt.fields[name][0].itemsize != 4:
            raise TypeError(f"push constant field {name} must be 4 bytes, got {dt.fields[name][0]}")
    if dt.itemsize > 128:
        raise ValueError(f"push constants of {dt.itemsize} bytes exceed the 128 guaranteed by Vulkan")
    return dt


# `Params` in glsl/attn_common.glsl.
ATTN_PUSH = push_block([
    ("seq_q", "<u4"), ("seq_k", "<u4"), ("group", "<u4"), ("heads", "<u4"),
    ("left", "<i4"), ("right", "<i4"), ("scale_log2", "<f4"), ("flags", "<u4"),
    ("q_base", "<u4"), ("k_base", "<u4"), ("v_base", "<u4"), ("o_base", "<u4"), ("lse_base", "<u4"),
    ("reverse", "<u4"), ("softcap2", "<f4"), ("x_base", "<u4"), ("x_stride", "<u4"),
    ("mask_row", "<u4"), ("mask_col", "<u4"),
])
# `PagedParams` in glsl/paged.comp.
PAGED_PUSH = push_block([
    ("heads_kv", "<u4"), ("group", "<u4"), ("q_len", "<u4"), ("block_size", "<u4"), ("max_blocks", "<u4"),
    ("left", "<i4"), ("scale_log2", "<f4"), ("num_splits", "<u4"), ("mode", "<u4"), ("packed", "<u4"),
    ("batch", "<u4"), ("softcap2", "<f4"), ("flags", "<u4"), ("slopes_at", "<u4"), ("sinks_at", "<u4"),
])
# `CopyParams` in glsl/copy_kv_to_paged.comp.
COPY_PUSH = push_block([("row_words", "<u4"), ("num_tokens", "<u4"), ("token_base", "<u4")])
# `RepackParams` in glsl/varlen_repack.comp.
REPACK_PUSH = push_block([
    ("row_words", "<u4"), ("heads", "<u4"), ("head_base", "<u4"), ("head_end", "<u4"), ("token_base", "<u4"),
    ("token_end", "<u4"), ("packed_origin", "<u4"), ("block_origin", "<u4"), ("piece_of", "<u4"),
    ("record_base", "<u4"), ("unpack", "<u4"),
])
# `PeakParams` in glsl/coopmat_peak.comp.
PEAK_PUSH = push_block([("chunks", "<u4"), ("chunk_iters", "<u4"), ("a", "<f4"), ("b", "<f4")])

# --- kernel families: the code paths of the attention entry points ----------------------------


@dataclass(frozen=True)
class Tiles:
    bm: int   # query rows per workgroup
    bn: int   # keys per tile
    wg: int   # invocations
    tc: int   # invocations sharing a row group


def _needs_multiple_of_4(name: str, d: int) -> str | None:
    if 1 <= d <= 256 and d % 4 == 0:
        return None
    return f"{name} supports head_dim 4..256 in steps of 4, got {d}"


class KeyLoop:
    """What lavapipe's loop limit sees of an attention shader. llvmpipe keeps one counter per
    invocation for all its loops together, taken down at every loop back-edge, and ends every loop
    once it is spent; a loop NIR unrolls (trip count constant after specialization, marked
    [[unroll]]) has no back-edge. Every loop of the attention shaders but the key loop is such a
    loop, so an invocation runs the key loop's steps plus one: the pass that finds it done (loops
    end under a lane mask, so that pass is a real iteration). Measured on lavapipe (Mesa 22.3): a
    key loop of 65535 steps is right and one of 65536 loses its last keys, so this count is one
    above the truth, the safe side. A loop in a branch the invocation does not take still costs a
    pass (llvmpipe runs it under an all-off lane mask): paged.comp's merge loops do, see
    plans.paged_loop_iterations."""

    def loop_iterations(self, d, info, tiles, seq_k, seq_q) -> int:
        return -(-seq_k // self.keys_per_iteration(d, info, tiles)) + 1

    def max_seq_k(self, d, info, tiles) -> int:
        """The longest seq_k whose loop_iterations stay within ``info.loop_limit``."""
        return (info.loop_limit - 1) * self.keys_per_iteration(d, info, tiles)


@dataclass(frozen=True)
class RowPerInvocation(KeyLoop):
    """attn_baseline.comp: one invocation per query row, one key per step, no shared memory."""

    SPEC = ("head_dim", "rows per workgroup")
    ROWS = 64

    def unfit(self, name, d, info, seq_k, seq_q, tiles) -> str | None:
        return None if 1 <= d <= 256 else f"{name} supports head_dim 1..256, got {d}"

    def shared_bytes(self, d, info, tiles) -> int:
        return 0

    def spec(self, d, info, tiles) -> tuple:
        return ((0, d), (1, self.ROWS))

    def rows_per_group(self, d, info, tiles) -> int:
        return self.ROWS

    def keys_per_iteration(self, d, info, tiles) -> int:
        return 1


@dataclass(frozen=True)
class Tiled(KeyLoop):
    """attn_tiled.comp: BM rows x BN keys per step through shared memory, vec4 loads.

    ``tiles`` are best first (``cpu_tiles`` first on CPU devices, where other shapes win); the first
    that fits the device's shared memory and workgroup size is used. A 4-field AULE_VULKAN_TILES
    is tried before them."""

    tiles: tuple
    cpu_tiles: tuple = ()
    shared_elem_bytes: int = 4    # element size of the shared-memory tiles and arithmetic

    SPEC = ("head_dim", "rows", "keys", "invocations", "invocations per row group")

    def pick_tiles(self, d, info, tiles) -> Tiles | None:
        tried = (self.cpu_tiles if info.is_cpu and self.cpu_tiles else ()) + self.tiles
        if tiles and len(tiles) == 4:  # 2 fields belong to `cpu`
            why = self.tiles_unfit(Tiles(*tiles), d, info)
            if why is None:
                return Tiles(*tiles)
            _warn_once(f"AULE_VULKAN_TILES={','.join(map(str, tiles))} is ignored for head_dim {d} on "
                       f"{info.name}: {why}; the default tiles are used")
        return next((t for t in tried if self.tiles_unfit(t, d, info) is None), None)

    def tiles_unfit(self, t: Tiles, d: int, info) -> str | None:
        """Why tile shape ``t`` cannot run head_dim ``d`` on the device, else None."""
        if self.tile_bytes(t, d) > info.max_shared_memory:
            return f"it needs {self.tile_bytes(t, d)} bytes of shared memory, the device has {info.max_shared_memory}"
        if t.wg > info.max_workgroup_size:
            return f"{t.wg} invocations exceed the device's {info.max_workgroup_size} per workgroup"
        if not (t.wg >= t.bm and t.bn % 4 == 0 and t.bn % t.tc == 0 and t.wg % t.tc == 0
                and t.bm % (t.wg // t.tc) == 0):
            return ("the shape breaks the shader's rules (invocations >= rows, keys a multiple of 4 and of "
                    "the row-group width, rows a multiple of invocations / row-group width)")
        return None

    def tile_bytes(self, t: Tiles, d: int) -> int:
        es = self.shared_elem_bytes
        dp = (d // 4 + 1) * 4
        sp = t.bn + 4  # score rows padded by one vec4 (glsl SP4)
        return es * dp * (t.bm + t.bn) + 4 * t.bm * sp + (2 * t.bm * sp if es == 2 else 0) + 4 * t.bm

    def unfit(self, name, d, info, seq_k, seq_q, tiles) -> str | None:
        why = _needs_multiple_of_4(name, d)
        if why is None and self.pick_tiles(d, info, tiles) is None:
            why = f"{name} needs more shared memory for head_dim {d} than {info.name}'s {info.max_shared_memory} bytes"
        return why

    def shared_bytes(self, d, info, tiles) -> int:
        return self.tile_bytes(self.pick_tiles(d, info, tiles), d)

    def spec(self, d, info, tiles) -> tuple:
        t = self.pick_tiles(d, info, tiles)
        return ((0, d), (1, t.bm), (2, t.bn), (3, t.wg), (4, t.tc))

    def rows_per_group(self, d, info, tiles) -> int:
        return self.pick_tiles(d, info, tiles).bm

    def keys_per_iteration(self, d, info, tiles) -> int:
        return self.pick_tiles(d, info, tiles).bn


@dataclass(frozen=True)
class CoopTiles:
    subgroups: int   # per workgroup
    row_tiles: int   # row tiles of M rows per subgroup
    keys: int        # keys per step
    buffers: int     # K/V tile buffers in shared memory (2: the next tile's loads overlap the math)
    registers: int = -1  # 1: the softmax on the accumulators in registers, 0: through shared memory,
    #                      -1: the device's (registers where its matrix layout is known to allow it)


@dataclass(frozen=True)
class CoopMat(KeyLoop):
    """attn_coopmat.comp: matrix-core tiles in the device's own cooperative-matrix shape.

    ``shapes`` are the (M, N, K) shapes it prefers, best first; a device listing none of them gets
    the largest it lists that fits. ``tiles`` rows are (largest head_dim, CoopTiles), best first
    (measurements: results/vulkan-tuning.md); the first that fits the device's shared memory and
    the shader's rules is used. AULE_VULKAN_TILES=MxNxK (or auto), optionally followed by
    subgroups,row_tiles,keys,buffers[,registers], forces a shape and tiles."""

    tiles: tuple
    shapes: tuple = ((16, 8, 16), (16, 16, 16))
    # Lanes holding one row of an accumulator tile, by vendor, where the register softmax applies:
    # NVIDIA's layout keeps a row in 4 lanes that differ in their two low bits (the shader checks).
    row_lanes: tuple = (("NVIDIA", 4),)

    SPEC = ("head_dim", "subgroups", "row tiles", "keys", "invocations", "M", "N", "K", "buffers",
            "row lanes (register softmax)")

    @staticmethod
    def forced(tiles) -> tuple:
        """(shape or None, CoopTiles or None) that an AULE_VULKAN_TILES override names."""
        if not tiles or not (isinstance(tiles[0], tuple) or tiles[0] == "auto"):
            return None, None
        shape = tiles[0] if isinstance(tiles[0], tuple) else None
        return shape, (CoopTiles(*tiles[1:]) if len(tiles) > 1 else None)

    def groups(self, t: CoopTiles, info) -> int:
        """QG, the specialization constant choosing the softmax path (0: through shared memory):
        the vendor's row-group width, or 4 where tiles ask for the register path (1) elsewhere."""
        if t.registers == 0:
            return 0
        return dict(self.row_lanes).get(info.vendor, 0) or (4 if t.registers == 1 else 0)

    def tiles_unfit(self, t: CoopTiles, shape: tuple, d: int, info) -> str | None:
        """Why tiles ``t`` in matrix shape ``shape`` cannot run head_dim ``d`` on the device."""
        m, n, k = shape
        lanes = info.subgroup_size
        sr = t.row_tiles * m
        tpr = lanes // sr if lanes >= sr else 1
        if t.subgroups * lanes > info.max_workgroup_size:
            return f"{t.subgroups * lanes} invocations exceed the device's {info.max_workgroup_size} per workgroup"
        if (lanes % sr if lanes >= sr else sr % lanes) or tpr & (tpr - 1):
            return f"{sr} rows per subgroup do not divide among {lanes} lanes"
        if d % n or d % k or t.keys % n or t.keys % k or n % 4 or k % 4:
            return f"head_dim {d} and {t.keys} keys must be multiples of the {m}x{n}x{k} matrices' N and K (4s)"
        if t.keys % (4 * tpr) or t.buffers not in (1, 2):
            return f"{t.keys} keys do not split into vec4s over {tpr} lanes per row, or buffers is not 1 or 2"
        st4 = sr * (t.keys // 4 + 1)
        reg = self.groups(t, info) > 0
        if not reg and (t.row_tiles * m * n // 4 > st4 or m * n // 4 + -(-sr // 4) > st4):
            return "the score block cannot hold the rescale and output tiles"
        if self.tile_bytes(t, shape, d, reg) > info.max_shared_memory:
            return (f"it needs {self.tile_bytes(t, shape, d, reg)} bytes of shared memory, the device has "
                    f"{info.max_shared_memory}")
        return None

    @staticmethod
    def arrays(t: CoopTiles, shape: tuple, d: int, registers: bool) -> tuple[int, int, int, int]:
        """Lengths of the shader's shared arrays, which it takes as specialization constants:
        K/V tiles (or the staged Q block) and P in f16vec4, scores in vec4 (one on the register
        path), the two index tiles in f16vec4. The index tiles keep their length on the shared-memory
        path, which never reads them: with one element there, every row that path gave on the H200
        was wrong (NVIDIA 580)."""
        sr = t.row_tiles * shape[0]
        dp4 = d // 4 + 2
        kvs = max(t.buffers * 2 * t.keys * dp4, t.subgroups * sr * dp4)
        scores = 1 if registers else t.subgroups * sr * (t.keys // 4 + 1)
        index = shape[0] * shape[1] // 2
        return kvs, scores, t.subgroups * sr * (t.keys // 4 + 2), index

    @classmethod
    def tile_bytes(cls, t: CoopTiles, shape: tuple, d: int, registers: bool) -> int:
        kvs, scores, p, index = cls.arrays(t, shape, d, registers)
        return 8 * kvs + 16 * scores + 8 * p + 8 * index

    def pick(self, d, info, tiles) -> tuple | None:
        """(shape, CoopTiles) for head_dim ``d`` on the device, or None."""
        return _coop_pick(self, d, info, tiles)

    def _pick(self, d, info, tiles):
        shape, forced = self.forced(tiles)
        offered = tuple(info.coopmat_shapes)
        if shape is not None:
            shapes = (shape,) if shape in offered else ()
        else:
            shapes = tuple(s for s in self.shapes if s in offered) + tuple(
                sorted((s for s in offered if s not in self.shapes), key=lambda s: -s[0] * s[1] * s[2]))
        for sh in shapes:
            cands = (forced,) if forced else tuple(t for dmax, t in self.tiles if d <= dmax)
            for t in cands:
                if self.tiles_unfit(t, sh, d, info) is None:
                    return sh, t
        return None

    def unfit(self, name, d, info, seq_k, seq_q, tiles) -> str | None:
        if not (16 <= d <= 256 and d % 16 == 0):
            return f"{name} supports head_dim 16..256 in steps of 16, got {d}"
        shape, forced = self.forced(tiles)
        if shape is not None and shape not in info.coopmat_shapes:
            return (f"AULE_VULKAN_TILES names the {'x'.join(map(str, shape))} matrix shape, which {info.name} "
                    f"does not offer (it offers {', '.join('x'.join(map(str, s)) for s in info.coopmat_shapes)})")
        picked = self.pick(d, info, tiles)
        if picked is None:
            sh = shape or next(iter(info.coopmat_shapes), None)
            why = self.tiles_unfit(forced, sh, d, info) if forced and sh else "no tile shape fits"
            return f"{name} cannot run head_dim {d} on {info.name}: {why}"
        return None

    def shared_bytes(self, d, info, tiles) -> int:
        shape, t = self.pick(d, info, tiles)
        return self.tile_bytes(t, shape, d, self.groups(t, info) > 0)

    def spec(self, d, info, tiles) -> tuple:
        (m, n, k), t = self.pick(d, info, tiles)
        qg = self.groups(t, info)
        kvs, scores, _, index = self.arrays(t, (m, n, k), d, qg > 0)
        return ((0, d), (1, t.subgroups), (2, t.row_tiles), (3, t.keys), (4, t.subgroups * info.subgroup_size),
                (5, m), (6, n), (7, k), (8, t.buffers), (9, qg), (10, kvs), (11, scores), (12, index))

    def rows_per_group(self, d, info, tiles) -> int:
        (m, _, _), t = self.pick(d, info, tiles)
        return t.subgroups * t.row_tiles * m

    def keys_per_iteration(self, d, info, tiles) -> int:
        return self.pick(d, info, tiles)[1].keys


@functools.lru_cache(maxsize=256)
def _coop_pick(family, d, info, tiles):
    return family._pick(d, info, tiles)


@dataclass(frozen=True)
class CpuLanes(KeyLoop):
    """attn_cpu.comp: rows held in registers, K/V rows shared by subgroup broadcast; one workgroup
    is one subgroup. ``lanes`` rows are (largest head_dim, rows per invocation, keys per block);
    a 2-field AULE_VULKAN_TILES (rows,keys) replaces them."""

    lanes: tuple

    SPEC = ("head_dim", "rows per invocation", "keys per block", "subgroup size")

    def lane_shape(self, d, tiles) -> tuple:
        if tiles and len(tiles) == 2:
            rows, keys = tiles
            if rows < 4 or rows % 4 or keys < 1:
                raise ValueError(f"AULE_VULKAN_TILES={','.join(map(str, tiles))!r} for attn_cpu.comp: rows must "
                                 f"be a positive multiple of 4 and keys positive")
            return rows, keys
        return next((r, k) for dmax, r, k in self.lanes if d <= dmax)

    def unfit(self, name, d, info, seq_k, seq_q, tiles) -> str | None:
        return _needs_multiple_of_4(name, d)

    def shared_bytes(self, d, info, tiles) -> int:
        return 0

    def spec(self, d, info, tiles) -> tuple:
        rows, keys = self.lane_shape(d, tiles)
        return ((0, d), (1, rows), (2, keys), (3, info.subgroup_size))

    def rows_per_group(self, d, info, tiles) -> int:
        return self.lane_shape(d, tiles)[0] * info.subgroup_size

    def keys_per_iteration(self, d, info, tiles) -> int:
        return self.lane_shape(d, tiles)[1]


# --- what a module needs, and when automatic selection considers it --------------------------


@dataclass(frozen=True)
class Needs:
    """Device requirements; a module whose requirements fail is never run."""

    fp16: bool = False       # shaderFloat16 and storageBuffer16BitAccess
    coopmat: bool = False    # VK_KHR_cooperative_matrix fp16 x fp16 + fp32 shapes and the memory model
    cpu_only: bool = False   # built around a CPU driver's subgroups
    shuffle: bool = False    # subgroup basic and shuffle operations in compute shaders

    def unfit(self, name, info) -> str | None:
        if self.coopmat and not info.coopmat_f16:
            return (f"{name} needs VK_KHR_cooperative_matrix with fp16 x fp16 + fp32 subgroup matrices and "
                    f"the Vulkan memory model, which {info.name} lacks")
        if self.cpu_only and not info.is_cpu:
            return (f"{name} is built for CPU Vulkan drivers (one subgroup per workgroup, subgroup "
                    f"broadcasts); {info.name} is a {info.type} device")
        if self.fp16 and not info.fp16:
            return f"{name} needs shaderFloat16 and storageBuffer16BitAccess, which {info.name} lacks"
        if self.shuffle and (info.subgroup_ops & SUBGROUP_SHUFFLE_OPS) != SUBGROUP_SHUFFLE_OPS:
            return f"{name} needs subgroup basic and shuffle operations in compute shaders, which {info.name} lacks"
        return None


#: VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_SHUFFLE_BIT
SUBGROUP_SHUFFLE_OPS = 0x01 | 0x10


@dataclass(frozen=True)
class Auto:
    """When automatic selection considers an attention module (AULE_VULKAN_VARIANT ignores this).
    Candidates are tried by ``rank``; the first that fits the device is used."""

    rank: int
    dtypes: tuple                  # input dtypes it serves
    vendor: str | None = None      # only on this vendor
    subgroup: int | None = None    # only at this subgroup size
    max_head_dim: int = 256

    def considers(self, dtype: str, d: int, info, cpu_only: bool) -> bool:
        return (dtype in self.dtypes and d <= self.max_head_dim and (not cpu_only or info.is_cpu)
                and self.vendor in (None, info.vendor) and self.subgroup in (None, info.subgroup_size))


@dataclass(frozen=True, eq=False)  # hashed by identity: rows are singletons and key plan caches
class Module:
    name: str
    source: str                    # entry point in glsl/
    defines: tuple = ()            # (name, value) pairs passed as -D
    push: np.dtype = ATTN_PUSH
    bindings: int = 5
    constants: tuple = ()          # specialization constants by constant_id
    needs: Needs = Needs()
    # attention modules only
    path: object = None            # the kernel family
    elem: str = "float32"          # storage type of q/k/v/o
    auto: Auto | None = None       # None: only AULE_VULKAN_VARIANT selects it
    features: frozenset = frozenset()  # the optional score modifiers it applies (AttentionCall.features)

    @property
    def module(self) -> str:
        return self.name

    def unfit(self, d: int, info, seq_k: int = 0, seq_q: int = 0, tiles: tuple | None = None) -> str | None:
        """Why this module cannot run head_dim ``d`` (``seq_q`` rows over ``seq_k`` keys) on the
        device with the tile override ``tiles``, else None."""
        why = self.needs.unfit(self.name, info) or self.path.unfit(self.name, d, info, seq_k, seq_q, tiles)
        if why is None and info.loop_limit and seq_k:
            n = self.path.loop_iterations(d, info, tiles, seq_k, seq_q)
            if n > info.loop_limit:
                why = (f"{self.name} would run {n} loop iterations per invocation for seq_k={seq_k}, but "
                       f"{info.name} silently ends every loop after {info.loop_limit} in total: it serves "
                       f"at most seq_k={self.max_seq_k(d, info, tiles)} here")
        return why

    def max_seq_k(self, d: int, info, tiles: tuple | None = None) -> int | None:
        """The longest key sequence the device's loop limit leaves this module (None: no limit)."""
        return self.path.max_seq_k(d, info, tiles) if info.loop_limit else None

    def spec(self, d: int, info, tiles: tuple | None = None) -> tuple:
        return self.path.spec(d, info, tiles)

    def rows_per_group(self, d: int, info, tiles: tuple | None = None) -> int:
        return self.path.rows_per_group(d, info, tiles)


#: What every attention shader (coopmat's on both softmax paths too) applies through attn_common.glsl:
#: modified_score, join_sink, the per-head key span of padding masks ("mask") and, through
#: masked_score, any other mask ("general_mask"; AttentionCall.features).
SCORE_FEATURES = frozenset({"softcap", "alibi", "sinks", "mask", "general_mask"})


def _attention(name, source, path, elem="float32", defines=(), needs=Needs(), auto=None,
               features=SCORE_FEATURES) -> Module:
    # Binding 5 holds the ALiBi slopes, sinks, padding spans and mask offsets (attn_common.glsl's
    # `extras`), binding 6 a general mask; every attention module declares both, used or not.
    return Module(name, source, defines, ATTN_PUSH, 7, path.SPEC, needs, path, elem, auto, features)


# Tile shapes, best first (measurements behind each list: results/vulkan-tuning.md). The later
# rows fit smaller shared memories (32 KB on lavapipe, 16 KB devices).
_FP32_TILES = (Tiles(64, 32, 256, 16), Tiles(32, 32, 128, 16), Tiles(32, 16, 64, 8),
               Tiles(16, 16, 64, 8), Tiles(16, 8, 64, 8))
_FP16_TILES = (Tiles(32, 32, 128, 16), Tiles(64, 32, 256, 16), Tiles(32, 16, 64, 8), Tiles(16, 16, 64, 8))
_WAVE64_TILES = (Tiles(64, 32, 256, 16), Tiles(32, 32, 128, 16), Tiles(32, 16, 64, 8), Tiles(16, 16, 64, 8))
_CPU_TILES = (Tiles(64, 16, 64, 4), Tiles(64, 32, 128, 8))
# Rows per invocation shrink with head_dim, bounding the registers and the driver's JIT time.
_CPU_LANES = ((64, 16, 4), (128, 8, 4), (256, 4, 4))
_FP16 = Needs(fp16=True)
_SPLIT_PAGED = ("head_dim", "rows", "keys", "invocations", "pieces", "blocks per piece")
# The subgroup decode path (AULE_PAGED_SG): constant 2 is the lanes sharing a key row, 4 and 5 its own;
# a split cache's two follow as 6 and 7.
_SG_PAGED = ("head_dim", "rows", "lanes per key", "invocations", "subgroup size", "keys in flight")
_SPLIT_SG_PAGED = _SG_PAGED + ("pieces", "blocks per piece")
_SG = Needs(shuffle=True)
_SG_FP16 = Needs(fp16=True, shuffle=True)
# (largest head_dim, tiles) for the cooperative-matrix variant, best first.
_COOP_TILES = ((128, CoopTiles(8, 1, 32, 2)), (128, CoopTiles(4, 1, 32, 2)), (128, CoopTiles(4, 1, 16, 2)),
               (256, CoopTiles(4, 1, 16, 2)), (256, CoopTiles(4, 1, 16, 1)), (256, CoopTiles(2, 1, 16, 1)))

MODULES: dict[str, Module] = {m.name: m for m in (
    _attention("baseline", "attn_baseline.comp", RowPerInvocation(), auto=Auto(4, ("float32", "float16"))),
    _attention("fast", "attn_tiled.comp", Tiled(_FP32_TILES, _CPU_TILES), auto=Auto(3, ("float32", "float16"))),
    _attention("fp16", "attn_tiled.comp", Tiled(_FP16_TILES, _CPU_TILES, 2), "float16", (("AULE_FP16", 1),),
               _FP16, Auto(1, ("float16",))),
    # fp16 in memory, fp32 in shared memory and arithmetic: half the bytes of `fast`, its math.
    _attention("fp16_io", "attn_tiled.comp", Tiled(_FP32_TILES, _CPU_TILES), "float16", (("AULE_HALF_IO", 1),),
               _FP16),
    # Matrix cores: chosen first for float16 where measured faster (NVIDIA: results/vulkan-tuning.md);
    # on other vendors' matrix cores (unmeasured here) AULE_VULKAN_VARIANT=coopmat selects it.
    _attention("coopmat", "attn_coopmat.comp", CoopMat(_COOP_TILES), "float16", needs=Needs(fp16=True, coopmat=True),
               auto=Auto(-1, ("float16",), "NVIDIA")),
    # fp16's arithmetic with workgroups of four 64-wide waves, for AMD's wave64.
    _attention("fp16_amd", "attn_tiled.comp", Tiled(_WAVE64_TILES, (), 2), "float16",
               (("AULE_DEFAULT_WG", 256), ("AULE_FP16", 1)), _FP16, Auto(0, ("float16",), "AMD", 64)),
    # On CPU drivers this beats `fast` for float32. head_dim 256 stays with `fast`: `cpu` is
    # unmeasured there and its first call would JIT for minutes.
    _attention("cpu", "attn_cpu.comp", CpuLanes(_CPU_LANES), needs=Needs(cpu_only=True),
               auto=Auto(2, ("float32",), max_head_dim=128)),
    # Paged attention (decode / chunked prefill over a block-table KV cache) and its cache writes.
    Module("paged", "paged.comp", (), PAGED_PUSH, 8, ("head_dim", "rows", "keys", "invocations")),
    Module("paged_fp16", "paged.comp", (("AULE_FP16", 1),), PAGED_PUSH, 8,
           ("head_dim", "rows", "keys", "invocations"), _FP16),
    Module("copy_kv_to_paged", "copy_kv_to_paged.comp", (), COPY_PUSH, 6, ("invocations",)),
    # The same over a cache split across buffers (plans.cache_split): K and V bound as arrays of
    # their pieces. Separate modules, so an unsplit cache runs exactly the code above.
    Module("paged_split", "paged.comp", (("AULE_SPLIT", 1),), PAGED_PUSH, 8, _SPLIT_PAGED),
    Module("paged_split_fp16", "paged.comp", (("AULE_FP16", 1), ("AULE_SPLIT", 1)), PAGED_PUSH, 8, _SPLIT_PAGED,
           _FP16),
    # Decode-sized row tiles without shared-memory K/V tiles (plans.paged_kernel), split cache or not.
    Module("paged_sg", "paged.comp", (("AULE_PAGED_SG", 1),), PAGED_PUSH, 8, _SG_PAGED, _SG),
    Module("paged_sg_fp16", "paged.comp", (("AULE_FP16", 1), ("AULE_PAGED_SG", 1)), PAGED_PUSH, 8, _SG_PAGED,
           _SG_FP16),
    Module("paged_split_sg", "paged.comp", (("AULE_PAGED_SG", 1), ("AULE_SPLIT", 1)), PAGED_PUSH, 8,
           _SPLIT_SG_PAGED, _SG),
    Module("paged_split_sg_fp16", "paged.comp", (("AULE_FP16", 1), ("AULE_PAGED_SG", 1), ("AULE_SPLIT", 1)),
           PAGED_PUSH, 8, _SPLIT_SG_PAGED, _SG_FP16),
    Module("copy_kv_to_paged_split", "copy_kv_to_paged.comp", (("AULE_SPLIT", 1),), COPY_PUSH, 6,
           ("invocations", "source pieces", "cache pieces", "slots per piece")),
    # A varlen call's packed rows into each sequence's heads-first blocks and its output back
    # (launch.varlen_attention), on the device; in 16-byte words where the rows allow.
    Module("varlen_repack", "varlen_repack.comp", (), REPACK_PUSH, 3, ("invocations",)),
    Module("varlen_repack_vec4", "varlen_repack.comp", (("AULE_VEC4", 1),), REPACK_PUSH, 3, ("invocations",)),
    # The matrix-core ceiling the benchmarks read cooperative-matrix rows against (aule bench).
    Module("coopmat_peak", "coopmat_peak.comp", (), PEAK_PUSH, 2, ("M", "N", "K", "invocations"),
           Needs(fp16=True, coopmat=True)),
)}

#: The attention modules, the ones AULE_VULKAN_VARIANT may name.
VARIANTS: dict[str, Module] = {n: m for n, m in MODULES.items() if m.path is not None}

# --- SPIR-V files -----------------------------------------------------------------------------


def spirv_dir() -> Path:
    """aule/spirv in an installed wheel (a link to spirv/ in a checkout), else the checkout's spirv/."""
    here = Path(__file__).resolve().parent
    for cand in (here.parent.parent / "spirv", here.parent.parent.parent / "spirv"):
        if (cand / "MANIFEST.json").is_file():
            return cand
    from ...errors import UnsupportedError

    raise UnsupportedError(f"no compiled shaders: spirv/MANIFEST.json not found beside {here.parent.parent}; "
                           "reinstall aule or run build_shaders.py")


@functools.lru_cache(maxsize=None)
def manifest() -> dict:
    return json.loads((spirv_dir() / "MANIFEST.json").read_text())


@functools.lru_cache(maxsize=None)
def spirv_code(module: str) -> bytes:
    entry = manifest()["variants"].get(module)
    if entry is None:
        from ...errors import UnsupportedError

        raise UnsupportedError(f"shader module {module!r} is not in spirv/MANIFEST.json; run build_shaders.py")
    return (spirv_dir() / entry["spv"]).read_bytes()


def push_constant_size(code: bytes) -> int:
    """Size in bytes of the push-constant block declared by a SPIR-V module (0 if none).

    Read from the module itself (member offsets of the Block used by the PushConstant variable),
    so a GLSL edit that the Python mirror missed is caught before any dispatch.
    """
    words = struct.unpack(f"<{len(code) // 4}I", code)
    pointers, offsets, pc_ptr = {}, {}, None
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
        i += max(n, 1)
    if pc_ptr is None:
        return 0
    offs = offsets.get(pointers[pc_ptr][1], {})
    return (max(offs.values()) + 4) if offs else 0  # every aule push field is 4 bytes


@functools.lru_cache(maxsize=None)
def checked_code(module: str) -> bytes:
    """The module's SPIR-V, after checking that it declares the push block its table row mirrors."""
    code = spirv_code(module)
    declared, mirrored = push_constant_size(code), MODULES[module].push.itemsize
    if declared != mirrored:
        raise RuntimeError(f"shader {module} declares {declared} bytes of push constants but the Python "
                           f"mirror has {mirrored}: rebuild spirv/ or fix the mirror")
    return code


# --- IEEE behaviour of Inf and NaN -------------------------------------------------------------
# Vulkan lets a driver assume that no float is Inf or NaN unless a shader declares the
# SignedZeroInfNanPreserve execution mode for that width (SPV_KHR_float_controls, core in Vulkan
# 1.2, supported where VkPhysicalDeviceVulkan12Properties says so). aule's numeric rule (a NaN score
# makes its row NaN, +inf gives LSE +inf, -inf is a mask) depends on it, so the mode is added to each
# module, at load time, for every width the device can preserve: one SPIR-V file still serves devices
# with and without the property.

_OP_EXTENSION, _OP_ENTRY_POINT, _OP_EXECUTION_MODE, _OP_CAPABILITY, _OP_EXECUTION_MODE_ID = 10, 15, 16, 17, 331
_CAP_FLOAT16, _CAP_PRESERVE = 9, 4466
_MODE_PRESERVE = 4461


def _instructions(words) -> list[tuple[int, int]]:
    """``(opcode, start)`` of each instruction after the 5-word header."""
    out, i = [], 5
    while i < len(words):
        n = words[i] >> 16
        if n == 0:
            raise ValueError(f"malformed SPIR-V: zero-length instruction at word {i}")
        out.append((words[i] & 0xFFFF, i))
        i += n
    return out


def _string_words(text: str) -> list[int]:
    raw = text.encode() + b"\0"
    raw += b"\0" * (-len(raw) % 4)
    return list(struct.unpack(f"<{len(raw) // 4}I", raw))


def preserve_inf_nan(code: bytes, widths: tuple) -> bytes:
    """``code`` with SignedZeroInfNanPreserve declared for each bit width in ``widths`` that the
    module computes in (32 always, 16 where it declares Float16); unchanged when there is none."""
    words = list(struct.unpack(f"<{len(code) // 4}I", code))
    ins = _instructions(words)
    ops = [op for op, _ in ins]
    caps = {words[i + 1] for op, i in ins if op == _OP_CAPABILITY}
    if _CAP_PRESERVE in caps:
        return code
    wanted = [w for w in sorted(widths) if w == 32 or (w == 16 and _CAP_FLOAT16 in caps)]
    if not wanted:
        return code
    entries = [words[i + 2] for op, i in ins if op == _OP_ENTRY_POINT]

    def after_last(*codes) -> int:
        # Each group of the module's layout goes after the last instruction of its kind (or of the
        # kinds before it): capabilities, extensions, ..., entry points, execution modes.
        last = max((k for k, op in enumerate(ops) if op in codes), default=None)
        if last is None:
            raise ValueError(f"SPIR-V module has none of opcodes {codes}")
        return ins[last + 1][1] if last + 1 < len(ins) else len(words)

    at_modes = after_last(_OP_ENTRY_POINT, _OP_EXECUTION_MODE, _OP_EXECUTION_MODE_ID)
    at_ext = after_last(_OP_CAPABILITY, _OP_EXTENSION)
    at_cap = after_last(_OP_CAPABILITY)
    modes = [x for e in entries for w in wanted for x in ((4 << 16) | _OP_EXECUTION_MODE, e, _MODE_PRESERVE, w)]
    name = _string_words("SPV_KHR_float_controls")
    ext = [((1 + len(name)) << 16) | _OP_EXTENSION, *name]
    cap = [(2 << 16) | _OP_CAPABILITY, _CAP_PRESERVE]
    # Insert from the back so the earlier positions stay valid.
    words[at_modes:at_modes] = modes
    words[at_ext:at_ext] = ext
    words[at_cap:at_cap] = cap
    return struct.pack(f"<{len(words)}I", *words)


@functools.lru_cache(maxsize=None)
def device_code(module: str, preserve: tuple) -> bytes:
    """The module's checked SPIR-V as a device that can preserve Inf/NaN at ``preserve`` widths runs it."""
    return preserve_inf_nan(checked_code(module), preserve)


def pipeline(ctx, module: str, spec: tuple, counts: tuple | None = None):
    """The context's pipeline of ``module`` with specialization constants ``spec``; ``counts``: the
    descriptors of each binding where some binding is an array (a split cache's pieces), else
    the module's single buffers."""
    m = MODULES[module]
    loader = functools.partial(device_code, m.name, ctx.info.preserve_inf_nan)
    if counts is not None and len(counts) != m.bindings:
        raise ValueError(f"{module} has {m.bindings} bindings, counts name {len(counts)}")
    return ctx.pipeline(m.name, loader, counts or m.bindings, m.push.itemsize, spec)

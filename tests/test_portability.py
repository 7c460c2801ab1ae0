"""Where the hardware is out of reach: Metal (MoltenVK's path), 32 KB shared-memory devices, and
lavapipe at a subgroup size other than its default.

- Every SPIR-V module a device without cooperative matrix can run must survive SPIRV-Cross's
  translation to Metal Shading Language, as MoltenVK performs it at pipeline creation, with its
  specialization constants still constants (MoltenVK fills them in when it builds the pipeline).
- The variants selection picks for a device with 32 KB of shared memory must fit it. The shared
  bytes are read from the SPIR-V itself (its Workgroup variables, sized by the specialization
  constants the selection passes), so a stale Python mirror of a shader's arrays is caught too.
- Under ``LP_NATIVE_VECTOR_WIDTH`` (scripts/bootstrap.sh runs the Vulkan tests a second time at
  128 bits) lavapipe must really report the narrower subgroup.
"""
from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from aule.backends.vulkan import plans, select
from aule.backends.vulkan.shaders import MODULES, manifest, spirv_dir

from test_vulkan import RECORDED, _recorded_device

SHARED_32K = 32768

# --- a small reader of the SPIR-V facts these tests need -----------------------------------------

_WORKGROUP = 4           # StorageClass Workgroup
_SPEC_ID = 1             # Decoration SpecId
# OpSpecConstantOp operations that size arrays in aule's shaders (unsigned 32-bit arithmetic).
_SPEC_OPS = {
    128: lambda a, b: a + b,                     # OpIAdd
    130: lambda a, b: a - b,                     # OpISub
    132: lambda a, b: a * b,                     # OpIMul
    134: lambda a, b: a // b,                    # OpUDiv
    135: lambda a, b: int(a / b),                # OpSDiv (operands are never negative here)
    137: lambda a, b: a % b,                     # OpUMod
    194: lambda a, b: a >> b,                    # OpShiftRightLogical
    196: lambda a, b: a << b,                    # OpShiftLeftLogical
    197: lambda a, b: a | b,                     # OpBitwiseOr
    199: lambda a, b: a & b,                     # OpBitwiseAnd
}


class Spirv:
    """The types, constants and variables of one module, enough to size its shared memory at
    given specialization-constant values."""

    def __init__(self, code: bytes):
        words = struct.unpack(f"<{len(code) // 4}I", code)
        if words[0] != 0x07230203:
            raise ValueError("not a SPIR-V module (bad magic number)")
        self.names, self.spec_ids, self.types, self.consts = {}, {}, {}, {}
        self.spec_defaults, self.spec_ops, self.variables = {}, {}, []
        i = 5
        while i < len(words):
            op, n = words[i] & 0xFFFF, words[i] >> 16
            a = words[i + 1:i + n]
            if op == 5:                                       # OpName
                self.names[a[0]] = struct.pack(f"<{n - 2}I", *a[1:]).split(b"\0")[0].decode()
            elif op == 71 and a[1] == _SPEC_ID:               # OpDecorate id SpecId n
                self.spec_ids[a[0]] = a[2]
            elif op in (21, 22):                              # OpTypeInt / OpTypeFloat
                self.types[a[0]] = ("scalar", a[1] // 8)
            elif op == 20:                                    # OpTypeBool (no storage size)
                self.types[a[0]] = ("scalar", 4)
            elif op in (23, 24):                              # OpTypeVector / OpTypeMatrix
                self.types[a[0]] = ("array", a[1], ("const", a[2]))
            elif op == 28:                                    # OpTypeArray elem length-id
                self.types[a[0]] = ("array", a[1], ("id", a[2]))
            elif op == 30:                                    # OpTypeStruct
                self.types[a[0]] = ("struct", tuple(a[1:]))
            elif op == 32:                                    # OpTypePointer
                self.types[a[0]] = ("pointer", a[1], a[2])
            elif op == 43:                                    # OpConstant (low word is enough)
                self.consts[a[1]] = a[2]
            elif op in (41, 42):                              # OpConstantTrue / False
                self.consts[a[1]] = int(op == 41)
            elif op == 50:                                    # OpSpecConstant type id default
                self.spec_defaults[a[1]] = a[2]
            elif op in (48, 49):                              # OpSpecConstantTrue / False
                self.spec_defaults[a[1]] = int(op == 48)
            elif op == 52:                                    # OpSpecConstantOp type id op operands
                self.spec_ops[a[1]] = (a[2], tuple(a[3:]))
            elif op == 59 and a[2] == _WORKGROUP:             # OpVariable type id Workgroup
                self.variables.append((a[1], a[0]))
            i += max(n, 1)

    def value(self, ident: int, spec: dict) -> int:
        if ident in self.consts:
            return self.consts[ident]
        if ident in self.spec_defaults:
            return spec.get(self.spec_ids.get(ident), self.spec_defaults[ident])
        if ident in self.spec_ops:
            opcode, operands = self.spec_ops[ident]
            if opcode not in _SPEC_OPS:
                raise NotImplementedError(f"OpSpecConstantOp opcode {opcode} (teach tests/test_portability.py it)")
            return _SPEC_OPS[opcode](*(self.value(o, spec) for o in operands)) & 0xFFFFFFFF
        raise KeyError(f"SPIR-V id {ident} ({self.names.get(ident, '?')}) is no constant")

    def size(self, type_id: int, spec: dict) -> int:
        t = self.types[type_id]
        if t[0] == "scalar":
            return t[1]
        if t[0] == "array":
            kind, n = t[2]
            return self.size(t[1], spec) * (n if kind == "const" else self.value(n, spec))
        if t[0] == "struct":
            return sum(self.size(m, spec) for m in t[1])
        raise ValueError(f"type {t[0]} has no storage size")

    def shared_bytes(self, spec: tuple) -> dict:
        """Bytes of each Workgroup variable with the specialization constants ``((id, value), ...)``."""
        values = dict(spec)
        return {self.names.get(var, f"%{var}"): self.size(self.types[ptr][2], values) for var, ptr in self.variables}


def spirv_path(module: str) -> Path:
    return spirv_dir() / manifest()["variants"][module]["spv"]


def spirv(module: str) -> Spirv:
    return Spirv(spirv_path(module).read_bytes())


# --- (a) Metal Shading Language through SPIRV-Cross ---------------------------------------------

#: Modules a device without VK_KHR_cooperative_matrix can run (Apple's GPUs through MoltenVK have none).
PORTABLE = sorted(n for n, m in MODULES.items() if not m.needs.coopmat)

# MoltenVK translates for the device's Metal version with discrete buffer bindings, or into
# argument buffers where it uses them (Metal 3 devices); MSL 2.1 is the oldest it supports for compute
# with subgroup (SIMD-group) operations on macOS, so both layouts are checked at 2.1.
MSL_OPTIONS = {"bindings": ["--msl", "--msl-version", "20100"],
               "argument-buffers": ["--msl", "--msl-version", "20100", "--msl-argument-buffers"]}


def test_the_portable_set_leaves_out_only_cooperative_matrix_modules():
    assert set(MODULES) - set(PORTABLE) == {n for n, m in MODULES.items() if m.needs.coopmat} \
        == {"coopmat", "coopmat_peak"}
    assert set(PORTABLE) <= set(manifest()["variants"])


@pytest.mark.parametrize("module", PORTABLE)
def test_specialization_constants_match_the_variant_table(module):
    ids = sorted(set(spirv(module).spec_ids.values()))  # local_size_x_id repeats one
    assert ids == list(range(len(MODULES[module].constants))), \
        f"{module}: SPIR-V SpecIds {ids} but the table names {MODULES[module].constants}"


@pytest.mark.parametrize("layout", sorted(MSL_OPTIONS))
@pytest.mark.parametrize("module", PORTABLE)
def test_translates_to_metal(module, layout, tmp_path):
    exe = shutil.which("spirv-cross")
    if exe is None:
        pytest.skip("spirv-cross is not installed (Debian: apt-get install spirv-cross; "
                    "scripts/bootstrap.sh test installs it)")
    out = tmp_path / f"{module}.metal"
    r = subprocess.run([exe, *MSL_OPTIONS[layout], str(spirv_path(module)), "--output", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and out.is_file(), f"spirv-cross --msl {module} ({layout}) failed:\n{r.stderr}"
    msl = out.read_text()
    assert re.search(r"\bkernel void main0\(", msl), f"{module}: no compute kernel in the MSL"
    for cid in sorted(set(spirv(module).spec_ids.values())):
        # A constant MoltenVK can set: a macro with the default, or a Metal function constant.
        assert (f"SPIRV_CROSS_CONSTANT_ID_{cid}" in msl or f"[[function_constant({cid})]]" in msl), \
            f"{module}: specialization constant {cid} did not stay a constant in the MSL"


# --- (b) the variants chosen for a 32 KB shared-memory device fit it -----------------------------

#: Recorded devices of tests/test_vulkan.py, as 32 KB devices: Apple M2 (MoltenVK) as recorded,
#: Intel as its Windows driver reports it, and lavapipe.
SMALL = {name: dict(RECORDED[name][0], shared=SHARED_32K) for name in ("apple-m2-moltenvk", "intel-arc", "lavapipe")}
HEAD_DIMS = range(40, 257)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("device", sorted(SMALL))
def test_selected_attention_variants_fit_32k_shared_memory(device, dtype, monkeypatch):
    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    info = _recorded_device(**SMALL[device])
    assert info.max_shared_memory == SHARED_32K
    for d in HEAD_DIMS:
        for v in {select.select(dtype, d, info), select.host_variant(dtype, d, info)}:
            mirrored = v.path.shared_bytes(d, info, None)
            declared = spirv(v.name).shared_bytes(v.spec(d, info))
            assert sum(declared.values()) <= SHARED_32K, \
                f"{device} {dtype} head_dim {d}: {v.name} declares {declared} > {SHARED_32K} bytes"
            assert mirrored == sum(declared.values()), \
                f"{v.name} head_dim {d}: the table says {mirrored} shared bytes, the SPIR-V declares {declared}"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_paged_tiles_fit_32k_shared_memory(dtype):
    info = _recorded_device(**SMALL["apple-m2-moltenvk"])
    module = "paged_fp16" if dtype == "float16" else "paged"
    es = np.dtype(dtype).itemsize
    served = 0
    for d in range(40, 257, 4):
        for rows in (1, 4, 8, 16, 64):
            tiles = plans.paged_tiles(rows, d, info, es)
            if tiles is None:
                continue  # refused by paged_unfit with the reason, never launched
            served += 1
            bm, bn = tiles
            declared = spirv(module).shared_bytes(((0, d), (1, bm), (2, bn), (3, plans.PAGED_WG)))
            assert sum(declared.values()) <= SHARED_32K, f"{module} head_dim {d} rows {rows}: {declared}"
            assert plans.paged_shared_bytes(bm, bn, d, es) == sum(declared.values()), \
                f"{module} head_dim {d} tiles {tiles}: plans.paged_shared_bytes disagrees with the SPIR-V {declared}"
    assert served, "no paged shape fits a 32 KB device at all"


def test_spirv_reader_sizes_a_known_module():
    # attn_tiled.comp at BM=16, BN=16, head_dim 64: Qs and KVs of 16 x 17 vec4, Ss of 16 x 5 vec4,
    # alpha_s of 16 floats.
    got = spirv("fast").shared_bytes(((0, 64), (1, 16), (2, 16), (3, 64), (4, 8)))
    assert got == {"KVs": 16 * 17 * 16, "Qs": 16 * 17 * 16, "Ss": 16 * 5 * 16, "alpha_s": 16 * 4}


# --- lavapipe at another subgroup size ------------------------------------------------------------


def test_lavapipe_reports_the_subgroup_its_vector_width_gives():
    width = os.environ.get("LP_NATIVE_VECTOR_WIDTH")
    if not width:
        pytest.skip("LP_NATIVE_VECTOR_WIDTH is not set (scripts/bootstrap.sh test sets it for its second Vulkan run)")
    from _vulkan_util import vulkan_context

    info = vulkan_context().info
    if "llvmpipe" not in info.name:
        pytest.skip(f"LP_NATIVE_VECTOR_WIDTH only affects lavapipe; the device is {info.name}")
    # lavapipe runs one 32-bit lane per 32 bits of the native vector.
    assert info.subgroup_size == int(width) // 32, f"{info.name} at LP_NATIVE_VECTOR_WIDTH={width}"
    assert f"{width} bits" in info.name

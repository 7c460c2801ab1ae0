"""Set-up shared by the Triton test modules: torch and triton imported, with Triton's interpreter
(``TRITON_INTERPRET=1``) chosen on a machine without a CUDA/ROCm device."""
from __future__ import annotations

import os
import sys

import pytest


def import_torch_and_triton():
    """``(torch, has_gpu)``; skips the calling module when torch or triton is missing."""
    torch = pytest.importorskip("torch")
    gpu = torch.cuda.is_available()
    if not gpu:
        # Triton decides interpreter-or-compiler when functions are decorated, its own tl.* helpers
        # included, so this must precede the first import of triton in the process.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("triton was imported before TRITON_INTERPRET=1 was set; run with "
                        "TRITON_INTERPRET=1 in the environment", allow_module_level=True)
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    return torch, gpu


def run_compile_check(script: str, timeout: int = 300) -> None:
    """Run ``tests/<script>`` (an offline compile of kernels for real targets) in a process of its
    own without the interpreter, as the GPU compiler would see them; skips where Triton's ptxas is
    missing, fails with the script's error otherwise."""
    import subprocess
    from pathlib import Path

    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).resolve().parent
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here)]
                                        + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    done = subprocess.run([sys.executable, str(here / script)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("Triton's ptxas is missing: " + done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]

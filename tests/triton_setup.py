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

"""Session-wide test set-up.

Triton chooses between its interpreter and its compiler when it is first imported, so the choice
is made here, once, before any test module imports it: on a machine without a CUDA or ROCm device
the kernels run under the interpreter (``TRITON_INTERPRET=1``) at small shapes.
"""
import os


def _has_gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


if not _has_gpu():
    os.environ.setdefault("TRITON_INTERPRET", "1")

"""Session-wide test set-up.

Triton chooses between its interpreter and its compiler when it is first imported, so the choice
is made here, once, before any test module imports it: on a machine without a CUDA or ROCm device
the kernels run under the interpreter (``TRITON_INTERPRET=1``) at small shapes.

On a GPU machine the Triton kernels take the first configuration that fits each shape instead of
autotuning: the suite checks what the kernels compute, and autotuning JIT-compiles every candidate
of every shape bucket (about three times the compile time, most of the GPU suite's wall time).
``test_full_size`` walks the other table rows and one test keeps the autotuned path.

The suite checks what aule's kernels compute, so the SDPA drop-in serves every call it can
(``AULE_PREFER_TORCH=0``): its hand-off to torch where the speed table measured torch faster is
tested on its own, in ``test_speed_table.py``, which turns it back on.
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
else:
    os.environ.setdefault("AULE_TRITON_AUTOTUNE", "0")

os.environ.setdefault("AULE_PREFER_TORCH", "0")

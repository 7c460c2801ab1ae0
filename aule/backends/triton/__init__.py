"""The Triton backends: FlashAttention forward and backward on CUDA (``triton``) and ROCm
(``triton-amd``). One set of kernels (:mod:`.kernels`); the targets differ only by configuration
(:mod:`.configs`). Importing this package imports neither torch nor triton: the probe does, once.
"""
from __future__ import annotations

import importlib.util

from ..base import Backend
from .common import MAX_HEAD_DIM, interpreting

_DTYPES = ("float16", "bfloat16", "float32")


class TritonBackend(Backend):
    """NVIDIA GPUs through a CUDA build of torch."""

    name = "triton"
    differentiable = True
    flavour = "cuda"  # torch.version.cuda / torch.version.hip: which build this backend needs

    def _probe(self):
        if importlib.util.find_spec("torch") is None:
            return "torch is not installed (pip install 'aule[torch]')"
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (pip install 'aule[torch]')"
        import torch

        from .common import torch_gpu_flavour

        have = torch_gpu_flavour()
        if have is None:
            return f"torch {torch.__version__} is a CPU-only build: no CUDA or ROCm support"
        if have != self.flavour:
            other = "triton-amd" if have == "hip" else "triton"
            return (f"torch {torch.__version__} is a {have.upper()} build, this backend needs "
                    f"{self.flavour.upper()}: use backend={other!r}")
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return f"no {'ROCm' if self.flavour == 'hip' else 'CUDA'} device is visible to torch"
        import triton  # noqa: F401  (a broken install must show up here, not mid-call)

        return None

    def unsupported(self, call, forced):
        if call.kind != "torch":
            return f"it takes torch tensors on a GPU, got {call.kind} arrays"
        if call.dtype not in _DTYPES:
            return f"dtype {call.dtype} is not supported (float16, bfloat16, float32)"
        if call.head_dim > MAX_HEAD_DIM:
            return f"head_dim {call.head_dim} > {MAX_HEAD_DIM}"
        if call.device.startswith("cpu"):
            if interpreting():
                if call.dtype == "bfloat16":
                    return "bfloat16 cannot run under Triton's interpreter (its tl.dot miscomputes it)"
                return None
            return ("the tensors are on the CPU; Triton needs a CUDA/ROCm device "
                    "(TRITON_INTERPRET=1 runs the kernels on the CPU, slowly, for testing)")
        if not call.device.startswith("cuda"):
            return f"tensors on {call.device}; Triton runs on CUDA/ROCm devices"
        from .ops import fp32_refusal

        return fp32_refusal(call.dtype, call.head_dim, "cuda")

    def forward(self, call):
        from .ops import triton_attention

        out, lse = triton_attention(call.q, call.k, call.v, call.scale, call.left, call.right)
        return out, (lse if call.return_lse else None)

    def details(self):
        import torch
        import triton

        from .common import device_arch

        return {"device": torch.cuda.get_device_name(0), "arch": device_arch(0),
                "torch": torch.__version__, "triton": triton.__version__}


class TritonAMDBackend(TritonBackend):
    """AMD GPUs through a ROCm build of torch: the same kernels with AMD configurations."""

    name = "triton-amd"
    flavour = "hip"


__all__ = ["TritonBackend", "TritonAMDBackend"]

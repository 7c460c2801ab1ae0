"""Facts about the Triton target shared by every Triton kernel in aule (attention, paged decode).

Nothing here imports torch or triton at module load, so the registry can probe cheaply.
"""
from __future__ import annotations

import functools

from ... import settings

LOG2E = 1.4426950408889634  # kernels work in base 2 (exp2 is one instruction on NVIDIA and AMD)
MAX_HEAD_DIM = 256


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels run on CPU tensors through Triton's interpreter."""
    return settings.triton_interpret()


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def block_d(head_dim: int) -> int:
    """The power-of-two tile width that holds ``head_dim``; the kernels mask the padding lanes."""
    return max(16, next_pow2(head_dim))


@functools.lru_cache(maxsize=None)
def torch_gpu_flavour() -> str | None:
    """'hip' for a ROCm build of torch, 'cuda' for a CUDA build, None when torch has neither."""
    import torch

    if getattr(torch.version, "hip", None):
        return "hip"
    if getattr(torch.version, "cuda", None):
        return "cuda"
    return None


@functools.lru_cache(maxsize=None)
def device_arch(index: int = 0) -> str:
    """'sm90', 'sm80', 'gfx942', 'gfx1100', ... for the torch device ``index``. Only ROCm's
    ``gcnArchName`` names an architecture: CUDA builds of torch fill it with the card's name
    ('NVIDIA H200'), so on NVIDIA the compute capability decides."""
    import torch

    props = torch.cuda.get_device_properties(index)
    arch = (getattr(props, "gcnArchName", "") or "") if torch.version.hip else ""
    if arch:
        return arch.split(":")[0]
    return f"sm{props.major}{props.minor}"


def amd_family(arch: str) -> str:
    """'cdna' (MI100/200/300: gfx908/90a/94x/95x), 'rdna' (gfx10/11/12) or '' for anything else."""
    if arch.startswith("gfx9"):
        return "cdna"
    if arch.startswith(("gfx10", "gfx11", "gfx12")):
        return "rdna"
    return ""


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def feature_table(x, shape, device):
    """ALiBi slopes or sinks as the kernels read them: float32, contiguous, of ``shape`` on
    ``device``. A caller's torch tensor (left on its device, its values checked in the kernel) is
    converted where it lives, ``[heads_q]`` slopes broadcast over the batch; a validated NumPy
    table is copied, since it may be a read-only view of the caller's array."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float32).expand(shape).contiguous()
    return torch.tensor(x, dtype=torch.float32, device=device).contiguous()


def _bench(fn, quantiles=None):
    # Short timing per candidate: tuning happens once per shape bucket and must not stall a step.
    import triton

    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def autotuned(fn, configs, key, prune=None):
    """``fn`` under Triton's autotuner over ``configs`` keyed on ``key`` (the argument names whose
    values pick a configuration), each candidate timed briefly; ``prune`` drops candidates per
    shape (configs.prune)."""
    import triton

    kw = dict(configs=configs, key=key)
    if prune is not None:
        kw["prune_configs_by"] = {"early_config_prune": prune}
    try:
        return triton.autotune(do_bench=_bench, **kw)(fn)
    except TypeError:  # an older Triton without the do_bench hook
        return triton.autotune(warmup=5, rep=20, **kw)(fn)

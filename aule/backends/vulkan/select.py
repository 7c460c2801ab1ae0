"""Which attention module serves a call: a pure function of the device's recorded properties, the
input dtype and shape, and the AULE_VULKAN_VARIANT / AULE_VULKAN_TILES settings."""
from __future__ import annotations

import functools

from ... import settings
from ...errors import UnsupportedError
from .shaders import VARIANTS, Module


def forced_variant() -> str | None:
    """The variant AULE_VULKAN_VARIANT names, or None; ValueError when it names none."""
    name = settings.kernel_choice().variant
    if name is not None and name not in VARIANTS:
        raise ValueError(f"AULE_VULKAN_VARIANT={name!r} names no variant; choose one of {sorted(VARIANTS)}")
    return name


def select(dtype: str, d: int, info, forced: str | None = None, seq_k: int = 0, seq_q: int = 0,
           features: frozenset = frozenset()) -> Module:
    """The module for inputs of ``dtype`` ('float32' or 'float16') and head_dim ``d``: the forced
    one, or the best that fits. float16 inputs use an fp16 module where the device has fp16
    arithmetic and 16-bit storage, else they are computed in float32. A module the device cannot
    run is never picked."""
    forced = forced or forced_variant()
    # The sequence lengths matter only for whole-tile modules and loop-limited drivers; leaving them
    # out elsewhere keeps the cache small.
    exact = info.loop_limit or info.coopmat_f16
    return _select(dtype, d, info, forced, seq_k if exact else 0, seq_q if exact else 0, settings.kernel_choice().tiles,
                   frozenset(features))


@functools.lru_cache(maxsize=1024)
def _select(dtype: str, d: int, info, forced: str | None, seq_k: int, seq_q: int, tiles: tuple | None,
            features: frozenset) -> Module:
    if forced is not None:
        v = VARIANTS[forced]
        why = _lacks(v, features) or v.unfit(d, info, seq_k, seq_q, tiles)
        if why:
            raise UnsupportedError(f"AULE_VULKAN_VARIANT={forced}: {why}")
        return v
    order = sorted((v for v in VARIANTS.values()
                    if v.auto is not None and v.auto.considers(dtype, d, info, v.needs.cpu_only)
                    and not _lacks(v, features)),
                   key=lambda v: v.auto.rank)
    for v in order:
        if v.unfit(d, info, seq_k, seq_q, tiles) is None:
            return v
    raise UnsupportedError(f"no Vulkan variant runs head_dim {d} on {info.name}: "
                           + "; ".join(v.unfit(d, info, seq_k, seq_q, tiles) or "" for v in order))


def _lacks(v: Module, features: frozenset) -> str | None:
    missing = sorted(features - v.features)
    return f"{v.name} does not apply {', '.join(missing)}" if missing else None


def host_variant(dtype: str, d: int, info, seq_k: int = 0, seq_q: int = 0,
                 features: frozenset = frozenset()) -> Module:
    """The module for NumPy / CPU-torch inputs, whose data is converted on upload anyway.

    On CPU devices float16 host data up to head_dim 128 is computed by the fp32 modules and handed
    back as float16, because the fp32 ``cpu`` module is faster there than the fp16 ones."""
    if info.is_cpu and dtype == "float16" and d <= 128:
        dtype = "float32"
    return select(dtype, d, info, seq_k=seq_k, seq_q=seq_q, features=features)


def variant_for(call, info) -> Module:
    """The module for a validated attention call. GpuTensors keep their dtype, so their module
    must store exactly it."""
    want = "float16" if call.dtype == "float16" else "float32"
    if call.kind != "gpu":
        return host_variant(want, call.head_dim, info, call.seq_k, call.seq_q, call.features)
    forced = forced_variant()
    v = select(want, call.head_dim, info, forced, seq_k=call.seq_k, seq_q=call.seq_q, features=call.features)
    if v.elem != call.dtype:
        if forced:
            raise UnsupportedError(f"AULE_VULKAN_VARIANT={forced}: {forced} stores {v.elem} but the GpuTensors "
                                   f"hold {call.dtype}: make the GpuTensors {v.elem}, name a {call.dtype} variant "
                                   "or unset AULE_VULKAN_VARIANT")
        raise UnsupportedError(f"GpuTensors hold {call.dtype} but variant {v.name} computes in {v.elem}: "
                               f"make the GpuTensors {v.elem}")
    return v

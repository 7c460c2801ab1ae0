"""The steady state of a repeated featureless ``aule.flash_attention`` call on GpuTensors.

A call on GpuTensors seen before is keyed by everything the full path decides on: the tensors'
shapes, dtypes, contexts and how they lie in buffers, each scalar argument with its type, and the
raw values of the settings a Vulkan call reads (:data:`aule.settings.VULKAN_CALL_VARS`). The key
finds a :class:`launch.GpuLaunch` (plan, pipeline, output sizes) that only binds the tensors'
buffers and submits: validation, routing, the backend's checks and the plan lookup ran once, when
the key was first seen (:func:`prepare`, after the full path's own validation and routing chose
this backend for it). Calls with ALiBi, sinks, a mask or FP8 scales, and calls with nothing to
compute, always take the full path (``aule.api`` sends only featureless calls here).
"""
from __future__ import annotations

from ... import device_errors, settings
from ..base import nothing_to_compute
from . import launch, runtime
from .backend import VulkanBackend
from .plans import extras_flags, mask_shape
from .tensor import GpuTensor

__all__ = ["GpuTensor", "key", "attend", "prepare"]

_READY: dict = {}
_LIMIT = 1024


def key(q, k, v, causal, scale, window_size, backend, return_lse, softcap):
    """The cache key of a featureless call whose query is a GpuTensor, or None when k or v is
    not one (the full path then says what is wrong). Hashing happens at the lookup: a key holding
    an unhashable argument (a list) is never found nor stored."""
    if k.__class__ is not GpuTensor or v.__class__ is not GpuTensor:
        return None
    # Each scalar with its type: True == 1 == 1.0, and the checks refuse some of those.
    w = window_size
    if w.__class__ is tuple:
        w = tuple((x.__class__, x) for x in w)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.ctx, k.ctx, v.ctx,
            q.blocks_per_piece, k.blocks_per_piece, v.blocks_per_piece,
            causal.__class__, causal, scale.__class__, scale, window_size.__class__, w,
            backend.__class__, backend, return_lse.__class__, return_lse, softcap.__class__, softcap,
            settings.vulkan_call_values())


def attend(ckey, q, k, v):
    """``(out, lse)`` of a call whose key was prepared, or None (not seen, or not cacheable)."""
    try:
        ready = _READY.get(ckey)
    except TypeError:  # an unhashable argument
        return None
    if ready is None:
        return None
    device_errors.raise_pending()
    o, lse, _ = ready.run(q, k, v)
    return o, lse


def prepare(ckey, call, backend) -> None:
    """Remember the ready launch of a validated ``call`` (what ``ckey`` was made from) that the
    router gave to ``backend``, when it is the Vulkan backend and the call has something to
    compute and no feature buffer (ALiBi, sinks, masks take the full path)."""
    if (not isinstance(backend, VulkanBackend) or call.kind != "gpu" or nothing_to_compute(call)
            or extras_flags(call) or mask_shape(call) is not None):
        return
    try:
        hash(ckey)
    except TypeError:
        return
    ctx = runtime.context()
    ready = launch.GpuLaunch(ctx, launch.attention_plan_for(call, ctx), call.return_lse)
    if len(_READY) >= _LIMIT:
        _READY.clear()
    _READY[ckey] = ready


def forget() -> None:
    """Drop every ready launch (tests; a closed context's entries are never found again anyway)."""
    _READY.clear()

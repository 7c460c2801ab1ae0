"""The Vulkan backend: FlashAttention in GLSL compute shaders on any Vulkan 1.2 device.

:class:`VulkanBackend` is what the router uses; :func:`attention` and :func:`paged_attention`
run one call without routing and report the GPU time, for benchmarks; :func:`repeated_attention`
records one call repeated back to back (and :mod:`.timed` the matrix-core peak) for their device timers.
"""
from __future__ import annotations

from ...errors import UnsupportedError
from ..base import nothing_to_compute
from . import fastpath, launch, runtime  # noqa: F401 (fastpath: aule.api finds it in sys.modules)
from .backend import VulkanBackend
from .shaders import VARIANTS
from .tensor import GpuTensor, to_gpu

__all__ = ["VulkanBackend", "GpuTensor", "to_gpu", "attention", "paged_attention", "repeated_attention", "VARIANTS"]


def _refuse_unless_served(op: str, call) -> None:
    from .. import get  # the registry's instance: one probe per process

    why = get("vulkan").why_not(op, call, forced=True)
    if why:
        raise UnsupportedError(f"backend 'vulkan' cannot serve {call.describe()}: {why}")


def attention(q, k, v, causal=True, scale=None, window_size=-1, *, return_lse=False, timestamps=False):
    """Vulkan attention without routing: returns ``(out, lse, gpu_ns)``, ``gpu_ns`` being the GPU
    time of the dispatches from timestamp queries (None unless ``timestamps``)."""
    from ...call import canonicalize

    call = canonicalize(q, k, v, causal, scale, window_size, return_lse)
    _refuse_unless_served("attention", call)
    return launch.attention(call, runtime.context(), timestamps=timestamps)


def repeated_attention(q, k, v, causal=True, scale=None, window_size=-1, *, repeat: int, **features):
    """One Vulkan attention call on GpuTensors recorded ``repeat`` times back to back in one
    submission: a :class:`.timed.TimedWork` whose ``ms()`` re-submits it and returns the GPU
    milliseconds per call; ``close()`` frees it and its output. ``features``: softcap,
    alibi_slopes, sinks, attn_mask, as :func:`aule.flash_attention` takes them."""
    from ...call import canonicalize
    from . import timed

    call = canonicalize(q, k, v, causal, scale, window_size, False, **features)
    _refuse_unless_served("attention", call)
    if nothing_to_compute(call):
        raise ValueError(f"{call.describe()} has nothing to compute: there is no dispatch to time")
    return timed.repeated_attention(call, runtime.context(), repeat)


def paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                    timestamps=False, query_start_loc=None):
    """Vulkan paged attention without routing: returns ``(out, gpu_ns)``, ``gpu_ns`` the GPU time
    of the attention pass and, when the context was split, its merge (None unless ``timestamps``).
    ``query_start_loc``: a packed q, as in :func:`aule.flash_attention_paged`."""
    from ...paged_call import canonicalize_paged

    call = canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale, window_size,
                              query_start_loc=query_start_loc)
    _refuse_unless_served("paged_attention", call)
    return launch.paged_attention(call, runtime.context(), timestamps=timestamps)


def repeated_paged_attention(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                             repeat: int, query_start_loc=None):
    """One Vulkan paged call (GpuTensor caches) recorded ``repeat`` times back to back in one
    submission, its merge in each: a :class:`.timed.TimedWork` (``ms()``: GPU milliseconds per
    call; ``close()`` frees it). Its output, ``.out``, is what the last repeat wrote."""
    from ...paged_call import canonicalize_paged
    from . import timed

    call = canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale, window_size,
                              query_start_loc=query_start_loc)
    _refuse_unless_served("paged_attention", call)
    if call.batch == 0 or call.q_len == 0:
        raise ValueError("the paged call has no query rows: there is no dispatch to time")
    return timed.repeated_paged_attention(call, runtime.context(), repeat)

"""The Vulkan backend: attention, paged attention, KV writes and KV storage on any Vulkan 1.2 device.

It takes NumPy arrays, CPU torch tensors (through NumPy; results come back in their dtype) and
:class:`GpuTensor` s (data that stays on the device; results are GpuTensors). Paged caches live in
GpuTensors, so a decode step moves only ``q``, the small tables and the output.
"""
from __future__ import annotations

import logging

import numpy as np

from ... import settings
from ...arrays import to_numpy
from ...errors import UnsupportedError
from ..base import Backend, nothing_to_compute
from . import launch, runtime
from .plans import paged_unfit
from .select import host_variant
from .shaders import SCORE_FEATURES, VARIANTS, spirv_dir
from .tensor import GpuTensor

log = logging.getLogger("aule")


def _foreign_device(call, what: str) -> str | None:
    if call.kind == "torch" and not call.device.startswith("cpu"):
        return f"vulkan takes NumPy arrays, CPU torch tensors and GpuTensors; {what} on {call.device}"
    return None


def _cpu_device_reason(info) -> str:
    return (f"the only Vulkan device is a CPU rasteriser ({info.name}); the NumPy backend serves CPUs "
            "(backend='vulkan' forces it)")


def _cache_too_big(shape: tuple, dtype: str, info) -> str | None:
    """Why a K (or V) cache of ``shape`` [num_blocks, block_size, heads_kv, head_dim] cannot be
    bound to the paged shaders, which address each cache as one storage buffer; else None."""
    num_blocks, block_size, heads_kv, head_dim = shape
    block_bytes = block_size * heads_kv * head_dim * (2 if dtype == "float16" else 4)
    limit = info.max_storage_buffer_range
    if num_blocks * block_bytes <= limit:
        return None
    return (f"a {dtype} cache of {num_blocks} blocks x {block_bytes} bytes = {num_blocks * block_bytes} bytes "
            f"exceeds {info.name}'s storage-buffer range of {limit} bytes per binding (the K and V caches "
            f"are bound whole): use at most {limit // block_bytes} blocks (num_blocks), or a smaller "
            "block_size, heads_kv or head_dim, or split the model's layers or heads over several caches")


def _host_preference(call, info) -> str | None:
    """Why host data goes to another backend unless vulkan is forced, else None."""
    if info.is_cpu:
        return _cpu_device_reason(info)
    if call.dtype == "float64":
        return "vulkan computes in float32; float64 inputs go to a float64 backend (backend='vulkan' forces it)"
    return None


class VulkanBackend(Backend):
    name = "vulkan"
    ops = ("attention", "paged_attention", "varlen_attention", "write_kv", "kv_store")
    # What the attention shaders apply (every variant, the matrix-core one included, so selection
    # passes none over for a feature; select.py); paged.comp applies softcap, ALiBi and sinks (not attn_mask, which paged calls lack).
    features = SCORE_FEATURES
    paged_features = frozenset({"softcap", "alibi", "sinks"})

    def _probe(self):
        try:
            ctx = runtime.context()
        except ImportError as exc:
            return f"the vulkan Python binding is not importable: {exc}"
        except OSError as exc:
            return f"no Vulkan loader (libvulkan): {exc}"
        spirv_dir()
        log.debug("aule: vulkan backend on %s", ctx.info.name)
        return None

    # -- attention --------------------------------------------------------------------------------
    def why_not_attention(self, call, forced: bool) -> str | None:
        ctx = runtime.context()
        why = _foreign_device(call, "these tensors are")
        if why:
            return why
        if call.kind == "gpu":
            if any(x.ctx is not ctx for x in (call.q, call.k, call.v)):
                return "the GpuTensors belong to another Vulkan context"
        elif not forced:
            why = _host_preference(call, ctx.info)
            if why:
                return why
        if nothing_to_compute(call):
            return None  # no dispatch to plan: launch.attention builds the empty results
        try:
            launch.attention_plan_for(call, ctx)
        except UnsupportedError as exc:
            return str(exc)
        return None

    def attention(self, call):
        out, lse, _ = launch.attention(call, runtime.context())
        return out, lse

    # -- paged attention and cache writes ---------------------------------------------------------
    def _cache_reason(self, call, forced: bool, ctx) -> str | None:
        """Why the call's cache cannot be used here (both paged attention and KV writes)."""
        info = ctx.info
        why = _foreign_device(call, "the cache is")
        if why:
            return why
        if call.kind != "gpu" and not forced:
            return ("the cache is in host memory and would be uploaded on every call; keep it on the GPU "
                    "as GpuTensors (PagedKVCache(..., backend='vulkan')) or force backend='vulkan'")
        if call.kind == "gpu" and (call.k_cache.ctx is not ctx or call.v_cache.ctx is not ctx):
            return "the cache GpuTensors belong to another Vulkan context"
        if call.dtype not in ("float32", "float16"):
            return f"vulkan stores float32 or float16, not {call.dtype}"
        if call.dtype == "float16" and not info.fp16:
            return f"{info.name} lacks shaderFloat16 / 16-bit storage for a float16 cache"
        if call.head_dim % 4 or call.head_dim > 256:
            return f"head_dim must be a multiple of 4 up to 256 for the paged shader, got {call.head_dim}"
        return _cache_too_big((call.num_blocks, call.block_size, call.heads_kv, call.head_dim), call.dtype, info)

    def why_not_paged_attention(self, call, forced: bool) -> str | None:
        ctx = runtime.context()
        why = self._cache_reason(call, forced, ctx) or paged_unfit(call, ctx.info)
        if why is None and call.q_kind == "gpu" and call.q.ctx is not ctx:
            why = "q belongs to another Vulkan context"
        return why

    def paged_attention(self, call):
        out, _ = launch.paged_attention(call, runtime.context())
        return out

    def why_not_write_kv(self, call, forced: bool) -> str | None:
        return self._cache_reason(call, forced, runtime.context())

    def write_kv(self, call) -> None:
        launch.write_kv(call, runtime.context())

    # -- storage for PagedKVCache -----------------------------------------------------------------
    def why_not_kv_store(self, spec, forced: bool) -> str | None:
        if spec.device not in (None, "vulkan"):
            return f"the Vulkan backend keeps the cache in GpuTensors, not on {spec.device!r}"
        if spec.dtype == "bfloat16":
            return "backend 'vulkan' stores NumPy data, which has no bfloat16"
        if spec.dtype not in ("float32", "float16"):
            return f"GpuTensors hold float32 or float16, not {spec.dtype}"
        info = runtime.context().info
        if not forced and info.is_cpu:
            return _cpu_device_reason(info)
        # Refused here, not at the first append: each cache is bound whole to the paged shaders.
        return _cache_too_big(spec.shape, spec.dtype, info)

    def allocate_cache(self, spec):
        zeros = np.zeros(spec.shape, dtype=spec.dtype)  # pooled memory may hold another call's data
        return GpuTensor.from_numpy(zeros, spec.dtype), GpuTensor.from_numpy(zeros, spec.dtype)

    def copy_slots(self, k_cache, v_cache, src, dst) -> None:
        launch.copy_slots(runtime.context(), k_cache, v_cache, src, dst)

    def to_host(self, cache):
        return cache.numpy() if isinstance(cache, GpuTensor) else to_numpy(cache)

    # -- varlen attention: every sequence in one submission ------------------------------------------
    def why_not_varlen_attention(self, call, forced: bool) -> str | None:
        ctx = runtime.context()
        w = call.whole
        why = _foreign_device(w, "these tensors are") or (None if forced else _host_preference(w, ctx.info))
        if why:
            return why
        try:
            launch.varlen_layout(call, ctx)  # plans every sequence: its lengths pick its variant and chunks
        except UnsupportedError as exc:
            return str(exc)
        return None

    def varlen_attention(self, call):
        out, lse, _ = launch.varlen_attention(call, runtime.context())
        return out, lse

    # -- aule info --------------------------------------------------------------------------------
    def details(self) -> dict:
        ctx = runtime.context()
        info = ctx.info
        chosen = {}
        for dt in ("float32", "float16"):
            for d in (64, 128, 80, 256):
                try:
                    chosen[f"{dt} head_dim {d}"] = host_variant(dt, d, info).name
                except UnsupportedError as exc:
                    chosen[f"{dt} head_dim {d}"] = f"none ({exc})"
        tiles = settings.kernel_choice().tiles
        usable = {n: (v.unfit(128, info, tiles=tiles) or "ok") for n, v in VARIANTS.items()}
        coop = VARIANTS["coopmat"]
        matrices = {"offered": ["x".join(map(str, s)) for s in info.coopmat_shapes]}
        for d in (64, 128, 256):
            if coop.unfit(d, info, tiles=tiles) is None:
                shape, t = coop.path.pick(d, info, tiles)
                matrices[f"head_dim {d}"] = (f"{'x'.join(map(str, shape))}, {t.subgroups} subgroups x {t.row_tiles} "
                                             f"row tiles, {t.keys} keys, {t.buffers} K/V buffers")
        return dict(ctx.details(), variants_chosen=chosen, variants_head_dim_128=usable, cooperative_matrix=matrices,
                    auto_route=("NumPy inputs go to Vulkan" if not info.is_cpu
                                else "CPU device only: NumPy inputs go to the numpy backend unless forced"))

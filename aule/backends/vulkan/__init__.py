"""The Vulkan backend: FlashAttention in GLSL compute shaders on any Vulkan 1.2 device.

Takes NumPy arrays, CPU torch tensors (through NumPy; the result comes back as the same dtype)
and :class:`GpuTensor` (data that stays on the device; the result is a GpuTensor).
"""
from __future__ import annotations

import functools
import logging
import os

import numpy as np

from ...arrays import like, lse_like, to_numpy
from ...errors import UnsupportedError
from ..base import Backend
from . import kernels, runtime
from .kernels import VARIANTS, Shape
from .tensor import GpuTensor, to_gpu

log = logging.getLogger("aule")

__all__ = ["VulkanBackend", "GpuTensor", "to_gpu", "attention", "VARIANTS"]


def _shape(call) -> Shape:
    return Shape(call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_k, call.head_dim)


def _variant_for(call, ctx) -> kernels.Variant:
    want = "float16" if call.dtype == "float16" else "float32"
    if call.kind == "gpu":
        forced = kernels.forced_variant()
        v = kernels.select(want, call.head_dim, ctx.info, forced, call.seq_k, call.seq_q)
        if v.elem != call.dtype:
            raise UnsupportedError(f"GpuTensors hold {call.dtype} but variant {v.name} computes in {v.elem}: "
                                   f"make the GpuTensors {v.elem}")
        return v
    return _host_variant(want, call.head_dim, ctx.info, call.seq_k, call.seq_q)


def _host_variant(want: str, head_dim: int, info, seq_k: int = 0, seq_q: int = 0) -> kernels.Variant:
    """The variant for NumPy / CPU-torch inputs, whose data is converted on upload anyway."""
    if info.is_cpu and want == "float16" and head_dim <= 128:
        # On CPU devices the fp32 `cpu` variant beats the fp16 ones (lavapipe, B1 H32/8 S2048 D128
        # causal: 2.1 s against 7.1 s), so float16 host data is computed in fp32 and handed back as
        # float16. GpuTensors keep their dtype and their fp16 variant.
        want = "float32"
    return kernels.select(want, head_dim, info, seq_k=seq_k, seq_q=seq_q)


class VulkanBackend(Backend):
    name = "vulkan"

    def __init__(self):
        self._dummy = None

    def _probe(self):
        try:
            ctx = runtime.context()
        except ImportError as exc:
            return f"the vulkan Python binding is not importable: {exc}"
        except OSError as exc:
            return f"no Vulkan loader (libvulkan): {exc}"
        kernels.spirv_dir()
        log.debug("aule: vulkan backend on %s", ctx.info.name)
        return None

    def unsupported(self, call, forced: bool):
        ctx = runtime.context()
        if call.kind == "torch" and not call.device.startswith("cpu"):
            return (f"vulkan takes NumPy arrays, CPU torch tensors and GpuTensors; these tensors are on "
                    f"{call.device}")
        if call.kind == "gpu":
            if any(x.ctx is not ctx for x in (call.q, call.k, call.v)):
                return "the GpuTensors belong to another Vulkan context"
        elif not forced:
            if ctx.info.is_cpu:
                return (f"the only Vulkan device is a CPU rasteriser ({ctx.info.name}); the NumPy backend "
                        "serves CPUs (backend='vulkan' forces it)")
            if call.dtype == "float64":
                return "vulkan computes in float32; float64 inputs go to a float64 backend (backend='vulkan' forces it)"
        try:
            _plan(call, ctx)
        except UnsupportedError as exc:
            return str(exc)
        return None

    def _dummy_buffer(self, ctx):
        if self._dummy is None:
            self._dummy = ctx.pool.acquire(16)
        return self._dummy.buffer

    def forward(self, call):
        out, lse, _ = run(call, self)
        return out, lse

    def details(self) -> dict:
        ctx = runtime.context()
        info = ctx.info
        chosen = {}
        for dt in ("float32", "float16"):
            for d in (64, 128, 80, 256):
                try:
                    chosen[f"{dt} head_dim {d}"] = _host_variant(dt, d, info).name
                except UnsupportedError as exc:
                    chosen[f"{dt} head_dim {d}"] = f"none ({exc})"
        usable = {n: (v.unfit(128, info) or "ok") for n, v in VARIANTS.items()}
        return dict(ctx.details(), variants_chosen=chosen, variants_head_dim_128=usable,
                    auto_route=("NumPy inputs go to Vulkan" if not info.is_cpu
                                else "CPU device only: NumPy inputs go to the numpy backend unless forced"))


_PLANS: dict = {}


def _plan(call, ctx):
    """(variant, shape, dispatch plan, pipeline) for a call, cached by everything that shapes
    the dispatches, so a repeated call costs one dictionary lookup. UnsupportedError when a
    device limit cannot be met."""
    env = os.environ
    key = (call.dtype, call.kind, call.batch, call.heads_q, call.heads_kv, call.seq_q, call.seq_k,
           call.head_dim, call.scale, call.left, call.right, call.return_lse,
           env.get("AULE_VULKAN_VARIANT", ""), env.get("AULE_VULKAN_TILES", ""))
    hit = _PLANS.get(key)
    if hit is not None and hit[0] is ctx:
        return hit[1]
    variant = _variant_for(call, ctx)
    shape = _shape(call)
    spec, chunks = kernels.attention_plan(variant, shape, call.scale, call.left, call.right, call.return_lse,
                                          ctx.info, key[-1])
    pipeline = ctx.pipeline(variant.module, functools.partial(kernels.checked_code, variant.module,
                                                              kernels.ATTN_PUSH.itemsize),
                            kernels.ATTN_BINDINGS, kernels.ATTN_PUSH.itemsize, spec)
    if len(_PLANS) > 4096:
        _PLANS.clear()
    plan = (variant, shape, chunks, pipeline)
    _PLANS[key] = (ctx, plan)
    return plan


def run(call, backend: VulkanBackend, timestamps: bool = False):
    """Attention for a validated call; returns ``(out, lse, gpu_ns)``."""
    ctx = runtime.context()
    variant, shape, chunks, pipeline = _plan(call, ctx)
    elem = np.dtype(variant.elem)
    if call.kind == "gpu":
        n = shape.batch * shape.heads_q * shape.seq_q
        o = GpuTensor(ctx, ctx.pool.acquire(n * shape.head_dim * elem.itemsize),
                      (shape.batch, shape.heads_q, shape.seq_q, shape.head_dim), elem)
        lse = (GpuTensor(ctx, ctx.pool.acquire(n * 4), (shape.batch, shape.heads_q, shape.seq_q), np.float32)
               if call.return_lse else None)
        bufs = (call.q.buffer, call.k.buffer, call.v.buffer, o.buffer,
                lse.buffer if lse is not None else backend._dummy_buffer(ctx))
        ns = ctx.run(kernels.bind(pipeline, chunks, bufs), timestamps=timestamps)
        return o, lse, ns
    leases = [ctx.upload(to_numpy(x).astype(elem, copy=False)) for x in (call.q, call.k, call.v)]
    o_lease = ctx.pool.acquire(shape.batch * shape.heads_q * shape.seq_q * shape.head_dim * elem.itemsize)
    lse_lease = ctx.pool.acquire(shape.batch * shape.heads_q * shape.seq_q * 4) if call.return_lse else None
    try:
        bufs = (leases[0].buffer, leases[1].buffer, leases[2].buffer, o_lease.buffer,
                lse_lease.buffer if lse_lease else backend._dummy_buffer(ctx))
        ns = ctx.run(kernels.bind(pipeline, chunks, bufs), timestamps=timestamps)
        out = ctx.download(o_lease.buffer, np.empty((shape.batch, shape.heads_q, shape.seq_q, shape.head_dim), elem))
        lse = None
        if lse_lease is not None:
            lse = ctx.download(lse_lease.buffer, np.empty((shape.batch, shape.heads_q, shape.seq_q), np.float32))
    finally:
        for l in leases + [o_lease] + ([lse_lease] if lse_lease else []):
            l.release()
    return like(out, call.q), (lse_like(lse, call.q) if lse is not None else None), ns


def attention(q, k, v, causal=True, scale=None, window_size=-1, *, return_lse=False, timestamps=False):
    """Vulkan attention without routing, for benchmarks: returns ``(out, lse, gpu_ns)`` where
    ``gpu_ns`` is the GPU time of the dispatches from timestamp queries (None unless asked)."""
    from ...call import canonicalize
    from .. import get

    call = canonicalize(q, k, v, causal, scale, window_size, return_lse)
    backend = get("vulkan")
    why = backend.unsupported(call, forced=True)
    if why:
        raise UnsupportedError(f"backend 'vulkan' cannot serve {call.describe()}: {why}")
    return run(call, backend, timestamps=timestamps)

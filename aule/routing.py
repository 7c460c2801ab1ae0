"""The one router: which backend runs an operation on a validated call, and the answer for calls
with nothing to compute. :mod:`aule.api` (the public entry points) and the SDPA glue both route
through here, so neither has to import the other.
"""
from __future__ import annotations

import logging

import numpy as np

from . import backends, device_errors, masks, settings
from .backends.base import nothing_to_compute
from .call import AttentionCall, VarlenCall, canonicalize, shape_tuple
from .errors import UnsupportedError
from .paged_call import KVWriteCall, PagedCall, check_slots

log = logging.getLogger("aule")

# Auto-routing preference by where the data lives (``call.place``; for paged calls, the cache).
_AUTO_ORDER = {
    "cuda": ("triton", "triton-amd", "numpy"),
    "host": ("vulkan", "numpy"),
    "gpu": ("vulkan",),
}


def forced_backend(backend=None) -> str | None:
    """The backend the caller (``backend=``) or the environment (``AULE_BACKEND``) names, checked
    and canonical; ``None`` for auto routing. A name that is no backend is a ``ValueError``."""
    if backend is not None:
        return backends.canonical_name(backend)
    name = settings.forced_backend()
    return None if name is None else backends.canonical_name(name, source="AULE_BACKEND")


def tensors_need_grad(*tensors) -> bool:
    """True when autograd is on and any of these torch tensors requires grad."""
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _refusal(b, op: str, call, forced: bool) -> str | None:
    """Why backend ``b`` cannot run ``op`` on ``call`` (``None`` if it can). Gradients are never
    dropped: an attention call that needs them goes only to a backend with a backward pass."""
    reason = b.why_not(op, call, forced)
    if (reason is None and op == "attention" and not b.differentiable and call.kind == "torch"
            and tensors_need_grad(call.q, call.k, call.v)):
        reason = "it has no backward pass and the inputs require grad"
    return reason


_logged: set = set()


def _log_once(name: str, op: str, reason: str, call) -> None:
    """INFO, once per (backend, operation, reason): a generation loop asks the same question every
    step, and the answer is news only the first time."""
    key = (name, op, reason)
    if key not in _logged:
        _logged.add(key)
        log.info("aule: skipping backend %s for %s (first seen on %s): %s", name, op, call.describe(), reason)


def route(call, op: str, backend=None):
    """The backend that runs ``op`` on ``call``: the forced one (``backend=`` or ``AULE_BACKEND``;
    ``UnsupportedError`` saying why when it cannot), else the first in the auto order for
    ``call.place`` that can, logging at INFO (once per reason) why the others were passed over."""
    forced = forced_backend(backend)
    if forced is not None:
        b = backends.get(forced)
        reason = _refusal(b, op, call, forced=True)
        if reason is None:
            return b
        if reason is b.unavailable_reason:
            raise UnsupportedError(f"backend {b.name!r} is unavailable here: {reason}")
        raise UnsupportedError(f"backend {forced!r} cannot serve {call.describe()}: {reason}")
    passed = []
    for name in _AUTO_ORDER[call.place]:
        b = backends.get(name)
        reason = _refusal(b, op, call, forced=False)
        if reason is None:
            return b
        passed.append(f"{name}: {reason}")
        _log_once(name, op, reason, call)
    raise UnsupportedError(f"no backend can serve {call.describe()} ({'; '.join(passed)})")


def _empty_result(call: AttentionCall):
    """Zero-sized batch, heads or sequence, or no keys at all, on host data or torch tensors: no
    kernel runs."""
    shape = (call.batch, call.heads_q, call.seq_q, call.head_dim)
    lse_shape = shape[:3]
    q = call.q
    if call.kind == "numpy":
        out = np.zeros(shape, dtype=q.dtype)
        lse = masks.no_key_lse(lse_shape, call.sinks, np.float64 if q.dtype == np.float64 else np.float32)
    else:
        import torch

        out = torch.zeros(shape, dtype=getattr(torch, call.out_dtype) if call.out_dtype else q.dtype, device=q.device)
        lse = torch.from_numpy(masks.no_key_lse(lse_shape, call.sinks, np.float32)).to(q.device)
    return out, lse


def attend(call: AttentionCall, backend=None):
    """``(out, lse)`` of a validated call, routed, or answered here when there is nothing to do.
    GpuTensors are routed even then: their empty results are GpuTensors, which only the backend
    that owns their device can make."""
    device_errors.raise_pending()
    if call.kind != "gpu" and nothing_to_compute(call):
        forced_backend(backend)  # still reject a name (argument or AULE_BACKEND) that is no backend
        return _empty_result(call.on_host())  # no kernel runs to check device values: the host does
    return route(call, "attention", backend).run("attention", call)


def _rows_first(x):
    """``[H, S, D]`` as ``[S, H, D]`` (a view), NumPy or torch."""
    return x.swapaxes(0, 1) if isinstance(x, np.ndarray) else x.transpose(0, 1)


def _varlen_backend(call: VarlenCall, backend=None):
    """The backend whose own ``varlen_attention`` serves ``call`` in one launch (the forced one only
    if it can), or None: then each sequence is routed as a dense call. In the auto order, the first
    backend that can serve the sequences one by one (asked with the longest) keeps them when it has
    no varlen kernel, as routing each sequence would pick it."""
    forced = forced_backend(backend)
    w = call.whole
    needs_grad = w.kind == "torch" and tensors_need_grad(w.q, w.k, w.v)
    for name in (forced,) if forced is not None else _AUTO_ORDER[call.place]:
        b = backends.get(name)
        if b.why_not("varlen_attention", call, forced is not None) is None and (b.differentiable or not needs_grad):
            return b
        if forced is None and _refusal(b, "attention", call.longest(), False) is None:
            return None
    return None


def attend_varlen(call: VarlenCall, backend=None):
    """``(out [total_q, Hq, D], lse [Hq, total_q] or None)`` of a validated varlen call.

    A backend with a varlen kernel of its own (``varlen_attention``) takes the packed call in one
    launch when it is the one routing would pick; otherwise each sequence is one dense call through
    :func:`attend`, served by whichever backend can serve it. Sequences without query rows are never
    routed; padding is never computed."""
    forced_backend(backend)  # a bad name is an error even when no sequence has a row
    device_errors.raise_pending()
    w = call.whole
    if w.seq_q and w.heads_q:
        b = _varlen_backend(call, backend)
        if b is not None:
            return b.run("varlen_attention", call)
    outs, lses = [], []
    for i in range(call.batch):
        piece = call.sequence(i)
        if piece.seq_q == 0:
            continue
        out, lse = attend(piece, backend)
        outs.append(_rows_first(out[0]))
        if w.return_lse:
            lses.append(lse[0])
    if not outs:  # no query rows at all
        out, lse = _empty_result(call.on_host().whole)
        return _rows_first(out[0]), (lse[0] if w.return_lse else None)
    if w.kind == "numpy":
        # Into a C-contiguous result: concatenating the [S, H, D] views would keep their layout.
        out = np.concatenate(outs, out=np.empty((sum(len(o) for o in outs),) + outs[0].shape[1:], outs[0].dtype))
        return out, (np.concatenate(lses, axis=1) if w.return_lse else None)
    import torch

    return torch.cat(outs), (torch.cat(lses, dim=1) if w.return_lse else None)


def _zeros_like_q(call: PagedCall):
    q = call.q
    if call.q_kind == "numpy":
        return np.zeros(shape_tuple(q), dtype=q.dtype)
    if call.q_kind == "torch":
        import torch

        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    return None  # a GpuTensor q: the backend builds the empty result where q lives


def attend_paged(call: PagedCall, backend=None):
    """The output of a validated paged call (see :func:`flash_attention_paged`)."""
    device_errors.raise_pending()
    if call.batch == 0 or call.q_len == 0:
        forced_backend(backend)  # still reject a name (argument or AULE_BACKEND) that is no backend
        out = _zeros_like_q(call)
        if out is not None:
            return out
    b = route(call, "paged_attention", backend)
    if call.checks == "device" and not b.checks_tables:
        call.check_on_host()
    return b.run("paged_attention", call)


def write_kv(call: KVWriteCall, backend=None) -> None:
    """Write a validated call's token rows into the caches (see :func:`copy_kv_to_paged`)."""
    device_errors.raise_pending()
    if not call.num_tokens:
        return
    b = route(call, "write_kv", backend)
    if call.checks == "device" and not b.checks_tables:
        check_slots(call.slot_mapping, call.num_blocks * call.block_size)
        call.checks = "host"
    b.run("write_kv", call)


def attention(query, key, value, causal, scale, window_size, backend, return_lse, **features):
    """``(out, lse)`` of eager dense attention: validated once, then routed (see
    :func:`aule.flash_attention`; ``features`` are its keyword-only features, ``softcap=`` ...)."""
    return attend(canonicalize(query, key, value, causal, scale, window_size, return_lse, **features), backend)

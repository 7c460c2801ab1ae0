"""The public entry points: canonicalise and validate once, then route to one backend."""
from __future__ import annotations

import logging
import os

import numpy as np

from . import backends
from .call import AttentionCall, canonicalize
from .errors import UnsupportedError

log = logging.getLogger("aule")

# Auto-routing preference by where the data lives.
_AUTO_ORDER = {
    "cuda": ("triton", "triton-amd", "numpy"),
    "host": ("vulkan", "numpy"),
    "gpu": ("vulkan",),
}


def _place(call: AttentionCall) -> str:
    if call.kind == "gpu":
        return "gpu"
    if call.kind == "torch" and not call.device.startswith("cpu"):
        return "cuda"
    return "host"


def _forced_backend(backend):
    if backend is None:
        backend = os.environ.get("AULE_BACKEND") or None
    return None if backend is None else backends.canonical_name(backend)


def tensors_need_grad(*tensors) -> bool:
    """True when autograd is on and any of these torch tensors requires grad."""
    import torch

    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _needs_grad(call: AttentionCall) -> bool:
    return call.kind == "torch" and tensors_need_grad(call.q, call.k, call.v)


def _refusal(b, call: AttentionCall, forced: bool):
    """Why backend ``b`` cannot serve ``call`` (``None`` if it can). Gradients are never dropped:
    a call that needs them goes only to a backend with a backward pass."""
    reason = b.unavailable_reason or b.unsupported(call, forced=forced)
    if reason is None and not b.differentiable and _needs_grad(call):
        reason = "it has no backward pass and the inputs require grad"
    return reason


def route(call: AttentionCall, backend=None):
    """Pick the backend for ``call``: the forced one (or ``UnsupportedError`` saying why not),
    else the first in the auto order that can serve it, logging why others were passed over."""
    forced = _forced_backend(backend)
    if forced is not None:
        b = backends.require(forced)
        reason = _refusal(b, call, forced=True)
        if reason:
            raise UnsupportedError(f"backend {forced!r} cannot serve {call.describe()}: {reason}")
        return b
    for name in _AUTO_ORDER[_place(call)]:
        b = backends.get(name)
        reason = _refusal(b, call, forced=False)
        if reason is None:
            return b
        log.info("aule: skipping backend %s for %s: %s", name, call.describe(), reason)
    raise UnsupportedError(f"no backend can serve {call.describe()}")


def _empty_result(call: AttentionCall):
    """Zero-sized batch/sequence, or no keys at all: no kernel runs."""
    shape = (call.batch, call.heads_q, call.seq_q, call.head_dim)
    lse_shape = shape[:3]
    q = call.q
    if call.kind == "numpy":
        out = np.zeros(shape, dtype=q.dtype)
        lse = np.full(lse_shape, -np.inf, dtype=np.float64 if q.dtype == np.float64 else np.float32)
    else:
        import torch

        out = torch.zeros(shape, dtype=q.dtype, device=q.device)
        lse = torch.full(lse_shape, float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def flash_attention(query, key, value, causal=True, scale=None, window_size=-1, *,
                    backend=None, return_lse=False):
    """Exact attention, memory-efficient, on whichever backend suits the inputs.

    ``query [batch, heads_q, seq_q, head_dim]``, ``key``/``value [batch, heads_kv, seq_k, head_dim]``
    (PyTorch SDPA's layout; ``heads_q`` a multiple of ``heads_kv``). ``causal`` is bottom-right
    aligned; ``window_size`` is ``-1``/``None``, an int ``W`` (W keys ending at the query's
    position) or ``(left, right)``. See :mod:`aule.masks`. Returns an output like ``query``, and
    with ``return_lse=True`` also the float32 log-sum-exp ``[batch, heads_q, seq_q]``.
    """
    call = canonicalize(query, key, value, causal, scale, window_size, return_lse)
    if call.batch == 0 or call.seq_q == 0 or call.seq_k == 0:
        if backend is not None:
            _forced_backend(backend)  # still reject a name that is no backend
        out, lse = _empty_result(call)
    else:
        out, lse = route(call, backend).forward(call)
    return (out, lse) if return_lse else out

"""Every public entry point: validate once, then route to one backend through one router.

Dense attention (:func:`flash_attention`), paged attention (:func:`flash_attention_paged`) and
KV writes (:func:`copy_kv_to_paged`) build a validated call (:mod:`aule.call`,
:mod:`aule.paged_call`) and hand it to :func:`route`, which picks the backend for the operation.
Calls with nothing to compute (an empty batch or sequence) are answered here without a backend.
"""
from __future__ import annotations

import logging

import numpy as np

from . import backends, settings
from .backends.base import nothing_to_compute
from .call import AttentionCall, canonicalize, shape_tuple
from .errors import UnsupportedError
from .paged_call import PagedCall, canonicalize_paged, canonicalize_write_kv

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


# --------------------------------------------------------------------------------------------
# dense attention

def _empty_result(call: AttentionCall):
    """Zero-sized batch, heads or sequence, or no keys at all, on host data or torch tensors: no
    kernel runs."""
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


def attend(call: AttentionCall, backend=None):
    """``(out, lse)`` of a validated call, routed, or answered here when there is nothing to do.
    GpuTensors are routed even then: their empty results are GpuTensors, which only the backend
    that owns their device can make."""
    if call.kind != "gpu" and nothing_to_compute(call):
        forced_backend(backend)  # still reject a name (argument or AULE_BACKEND) that is no backend
        return _empty_result(call)
    return route(call, "attention", backend).run("attention", call)


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
    out, lse = attend(call, backend)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# paged attention and KV writes

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
    if call.batch == 0 or call.q_len == 0:
        forced_backend(backend)  # still reject a name (argument or AULE_BACKEND) that is no backend
        out = _zeros_like_q(call)
        if out is not None:
            return out
    return route(call, "paged_attention", backend).run("paged_attention", call)


def flash_attention_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                          backend=None):
    """Attention of ``q`` over a paged (block-table) KV cache, vLLM's layout.

    ``q [batch, heads_q, q_len, head_dim]``: the last ``q_len`` positions of each sequence, causal
    among themselves. ``k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]``;
    ``block_tables [batch, max_blocks]`` int32; ``context_lens [batch]`` int32 (new tokens included,
    already written with :func:`copy_kv_to_paged`). ``window_size`` as in
    :func:`aule.flash_attention`. Returns an array like ``q``. Bad tables raise ``ValueError``
    before any kernel runs.
    """
    call = canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale, window_size)
    return attend_paged(call, backend)


#: FlashAttention's ROCm-flavoured name, kept for callers of the system aule replaces.
flash_attention_paged_amd = flash_attention_paged


def copy_kv_to_paged(key, value, k_cache, v_cache, slot_mapping, *, backend=None):
    """Write token rows ``key, value [num_tokens, heads_kv, head_dim]`` into the caches, in place.

    vLLM's ``reshape_and_cache`` convention: token ``t`` goes to block ``slot_mapping[t] // block_size``,
    row ``slot_mapping[t] % block_size``; a negative slot skips the token (padding).
    """
    call = canonicalize_write_kv(key, value, k_cache, v_cache, slot_mapping)
    if call.num_tokens:
        route(call, "write_kv", backend).run("write_kv", call)

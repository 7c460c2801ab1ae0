"""The backend contract. The router in :mod:`aule.api` talks to backends only through it.

A backend is one class per device family (``numpy``, ``triton``, ``triton-amd``, ``vulkan``). It
declares the operations it serves in ``ops``; for each operation ``op`` it answers
``why_not_<op>(call, forced)`` (``None`` when it can serve the call, else the reason) and runs
``<op>(call)``. The calls are validated before they arrive (:mod:`aule.call`,
:mod:`aule.paged_call`), so a backend never re-checks user input and never guesses what kind of
call it was given: the operation says it.

Operations and what they return:

``attention(AttentionCall) -> (out, lse)``
    ``out`` like ``call.q`` (type, device, dtype, shape); ``lse`` float32 ``[B, Hq, Sq]`` in the
    caller's array type when ``call.return_lse``, else ``None``.
``paged_attention(PagedCall) -> out``
    ``out`` like ``call.q``.
``varlen_attention(VarlenCall) -> (out, lse)``
    Packed sequences in one launch: ``out`` like the packed ``q [total_q, Hq, D]``, ``lse``
    ``[Hq, total_q]`` float32 when asked, else ``None``. Optional: the router serves a backend
    without it one dense ``attention`` call per sequence.

A call with nothing to compute (:func:`nothing_to_compute`; for paged calls no batch or no
``q_len``) never reaches a kernel: its output is zeros and its LSE ``-inf``. The front end answers host data itself; a backend whose data
stays on its own device (Vulkan GpuTensors) builds those results there, so it must accept such
calls without planning a dispatch.
``write_kv(KVWriteCall) -> None``
    Writes token rows into the caches in place.
``kv_store(CacheSpec)``
    The storage a :class:`aule.kv_cache.PagedKVCache` keeps its blocks in; the backend then
    provides :meth:`allocate_cache`, :meth:`copy_slots`, :meth:`to_host` and
    :meth:`place_tables`.
"""
from __future__ import annotations

import functools

from ..paged_call import PagedCall

#: Every operation a backend may declare, in the order ``aule info`` lists them.
OPS = ("attention", "paged_attention", "varlen_attention", "write_kv", "kv_store")


def nothing_to_compute(call) -> bool:
    """Whether a dense attention call has no output rows (batch, heads_q or seq_q is 0) or no
    keys to attend to (seq_k is 0)."""
    return call.batch == 0 or call.heads_q == 0 or call.seq_q == 0 or call.seq_k == 0


class Backend:
    """A way to run attention on one family of devices.

    Subclasses set ``name`` and ``ops``, implement :meth:`_probe` (usable on this machine?) and,
    for each declared operation, ``why_not_<op>`` and the operation itself.
    """

    name = ""
    #: The operations this backend serves (names from :data:`OPS`).
    ops: tuple = ()
    # Optional score modifiers it applies (AttentionCall.features: "softcap"); a call using one it
    # lacks is refused with that reason, so the router moves on to a backend that has it.
    features: frozenset = frozenset()
    # Features whose arrays it differentiates (AttentionCall.grad_features: "sinks" that require grad).
    grad_features: frozenset = frozenset()
    # The features its paged attention applies, where they differ from ``features`` (None: the same).
    paged_features: frozenset | None = None
    #: Whether ``attention`` has a backward pass (gradient calls are routed only to such backends).
    differentiable = False
    #: Whether its paged kernels bounds-check tables left to the device (``PagedCall.checks ==
    #: "device"``); for other backends the router checks such tables on the host first.
    checks_tables = False
    #: Whether its dense and varlen kernels check values left on the device (``device_values`` of an
    #: AttentionCall or VarlenCall: sinks, slopes, cu_seqlens) and take an attn_mask left there; for
    #: other backends :meth:`run` hands over the call's host form (``on_host``), read and checked.
    checks_values = False

    @functools.cached_property
    def unavailable_reason(self) -> str | None:
        """``None`` when usable here, else why not (probed once, then cached)."""
        try:
            return self._probe()
        except Exception as exc:  # a probe must never take the whole library down
            return f"{type(exc).__name__}: {exc}"

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None

    def _probe(self) -> str | None:
        return None

    def why_not(self, op: str, call, forced: bool) -> str | None:
        """Why this backend cannot run ``op`` on ``call`` (``None`` if it can). ``forced``: the
        user named this backend, so preferences (not limits) are waived."""
        if op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {op!r}")
        if self.unavailable_reason is not None:
            return self.unavailable_reason
        if op not in self.ops:
            return f"backend {self.name!r} has no {op.replace('_', ' ')}"
        return self.missing_features(call) or getattr(self, "why_not_" + op)(call, forced)

    def missing_features(self, call) -> str | None:
        """Why this backend cannot apply the features ``call`` uses (``None`` if it has them all).
        Every ``why_not`` asks it, overrides included: a feature must never be dropped in silence."""
        used = getattr(call, "features", None)
        if used:
            missing = sorted(used - self.features_for(call))
            if missing:
                return f"backend {self.name!r} does not apply {', '.join(missing)} yet"
        learned = getattr(call, "grad_features", None)
        learned = sorted(learned - self.grad_features) if learned else None
        if learned:
            names = ", ".join(learned)
            return (f"{names} requires grad, and backend {self.name!r} has no backward pass for {names}; "
                    f"pass {learned[0]}.detach() or call under torch.no_grad()")
        return None

    def features_for(self, call) -> frozenset:
        """The features this backend applies to calls like ``call``: ``features`` for dense calls,
        ``paged_features`` (where set) for paged ones."""
        if self.paged_features is None or not isinstance(call, PagedCall):
            return self.features
        return self.paged_features

    def run(self, op: str, call):
        """Run a routed operation (see the module docstring for what each returns)."""
        if getattr(call, "device_values", False) and not self.checks_values:
            call = call.on_host()
        return getattr(self, op)(call)

    # -- per-operation answers; a backend overrides those of the ops it declares ---------------
    def why_not_attention(self, call, forced: bool) -> str | None:
        return None

    def why_not_paged_attention(self, call, forced: bool) -> str | None:
        return None

    def why_not_varlen_attention(self, call, forced: bool) -> str | None:
        return None

    def why_not_write_kv(self, call, forced: bool) -> str | None:
        return None

    def why_not_kv_store(self, spec, forced: bool) -> str | None:
        return None

    # -- the KV-store protocol (op ``kv_store``) ---------------------------------------------------
    def allocate_cache(self, spec):
        """``(k_cache, v_cache)`` zero-filled, of ``spec.shape`` and ``spec.dtype``, where this
        backend's paged kernels read them."""
        raise NotImplementedError

    def copy_slots(self, k_cache, v_cache, src, dst) -> None:
        """Copy cache rows (slots) ``src`` to ``dst`` (equal-length int arrays) in both caches."""
        raise NotImplementedError

    def to_host(self, cache):
        """The cache's contents as a NumPy array (a copy when it lives on a device)."""
        raise NotImplementedError

    def place_tables(self, table, k_cache):
        """An int32 NumPy table (block tables, lengths) moved to where the paged kernels read
        it next to ``k_cache``; host backends keep the NumPy array."""
        return table

    def details(self) -> dict:
        """Extra facts for ``aule info`` (devices, variants); empty by default."""
        return {}

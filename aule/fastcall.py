"""The steady state of a repeated eager call: one cache from the public call to a ready launch.

A small call's host time is aule's own Python (validation, routing, launch building) and Triton's
per-launch argument binding, not the kernel. :func:`aule.flash_attention` (no features),
:func:`aule.flash_attention_paged` (no ALiBi or sinks) and :func:`aule.copy_kv_to_paged` on plain
torch tensors (no gradient to record, not traced) first look their call up here by a key (:func:`key`,
:func:`paged_key`, :func:`write_kv_key`, all built by :func:`_key`): every property the full path's
decisions depend on (the tensors' types, shapes, strides, dtypes, devices, 16-byte alignment and
which of them are the same object; the scalar arguments with their types, since ``True == 1 ==
1.0`` and the checks tell those apart; the settings that route or configure, as raw environment
values; the device Triton launches on). A paged call's tables are in it by their layout, never
their contents: the kernels read and check those on the device whichever path launched them.
Where the full path served an equal key with direct launches of compiled kernels
(``ops._direct_launch``: the paged kernel and, split, its merge) of exactly the call's tensors into
outputs it returned, the entry holds them ready (:class:`aule.backends.triton.ops.Ready`): a hit
polls the device errors, allocates fresh outputs and scratch, takes a fresh error-flag row when the
kernels check tables, launches and returns, and a miss takes the full path, which checks
everything and raises as it always did. Anything else the full path does (features, autograd, host
backends, the interpreter, the autotuner's first run, a table the launcher had to copy, errors)
leaves no entry.

This module imports nothing heavy (``import aule`` stays torch-free); the Triton launcher offers
what it launched to the call being recorded (:func:`recording`).
"""
from __future__ import annotations

import sys
import threading

from . import device_errors, settings

_ENTRIES: dict = {}
_MAX_ENTRIES = 1024
_local = threading.local()
_hooks = None  # the torch functions a lookup needs, bound once torch is imported


def _torch_hooks():
    global _hooks
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    functorch = getattr(torch._C, "_are_functorch_transforms_active", None)
    _hooks = (torch.Tensor, torch.is_grad_enabled, functorch or (lambda: False))
    return _hooks


def _items_typed(x):
    """A tuple argument (a window ``(left, right)``) with each element's type: ``(True, 0)`` equals
    ``(1, 0)``, and the checks refuse the first."""
    return tuple((e.__class__, e) for e in x)


def _key(op: str, tensors: tuple, scalars: tuple):
    """The cache key of a call of ``op`` on ``tensors`` (the call's torch tensors, the first deciding
    where it runs) and ``scalars`` (every other argument the full path reads), or None: another
    kind of input, a gradient to record, an active functorch transform, no ready launches where
    the data is. What dense and paged calls share; :func:`key` and :func:`paged_key` name the
    arguments. The caller has ruled out tracing. A key holding an unhashable argument (a list) is
    never found nor stored: hashing it once, at the lookup, is what a hit costs."""
    hooks = _hooks or _torch_hooks()
    if hooks is None:
        return None
    tensor, grad_enabled, functorch = hooks
    out = [op]
    grad = grad_enabled()
    try:
        for t in tensors:
            if t.__class__ is not tensor or grad and t.requires_grad:
                return None
            out += (t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % 16)
    except Exception:  # noqa: BLE001 - layouts without strides or pointers (sparse, nested): the full path decides
        return None
    if functorch():
        return None
    device = _launch_device(tensors[0])
    if device is None:
        return None
    ids = list(map(id, tensors))
    types = tuple(map(type, scalars))
    if tuple in types:  # a window (left, right): each element with its type too
        scalars = tuple(_items_typed(s) if s.__class__ is tuple else s for s in scalars)
    # Which arguments are one object (each one's first position; their count when all differ), and
    # each scalar with its type: True == 1 == 1.0, and the checks refuse some of those.
    out += (len(ids) if len(set(ids)) == len(ids) else tuple(map(ids.index, ids)), types, scalars,
            settings.launch_values(), device)
    return tuple(out)


def key(q, k, v, causal, scale, window_size, backend, return_lse, softcap):
    """The cache key of a featureless dense call (:func:`aule.flash_attention`), or None (see :func:`_key`)."""
    return _key("attention", (q, k, v), (causal, scale, window_size, backend, return_lse, softcap))


def paged_key(q, k_cache, v_cache, block_tables, context_lens, scale, window_size, backend, softcap,
              max_context_len, query_start_loc, max_query_len):
    """The cache key of a paged call without ALiBi or sinks (:func:`aule.flash_attention_paged`), or
    None (see :func:`_key`). The tables' contents are not in it: on a GPU the kernels read and check
    them, whichever call launches, so a hit serves new tables (and poisoned ones raise as they do on
    the full path)."""
    if query_start_loc is None:
        tensors = (q, k_cache, v_cache, block_tables, context_lens)
    else:
        tensors = (q, k_cache, v_cache, block_tables, context_lens, query_start_loc)
    return _key("paged_attention", tensors, (scale, window_size, backend, softcap, max_context_len, max_query_len))


def write_kv_key(key, value, k_cache, v_cache, slot_mapping, backend):
    """The cache key of a KV write (:func:`aule.copy_kv_to_paged`), or None (see :func:`_key`)."""
    return _key("write_kv", (key, value, k_cache, v_cache, slot_mapping), (backend,))


def _launch_device(q):
    """The device a ready launch of ``q``'s call runs on (Triton's current device, part of the key
    as it is of the direct launches' own), or None where there are no ready launches (host tensors,
    the interpreter, AMD): then :func:`key` is None at once. The Triton launcher installs the
    reader (:func:`set_launch_device`) when it loads; until then no call is recorded."""
    return None


def set_launch_device(reader) -> None:
    global _launch_device
    _launch_device = reader


def attend(key, *inputs):
    """The outputs (a tuple) of the call ``key`` describes on ``inputs`` (its tensors, as the key
    took them), served by its ready launch, or None (no entry, or fresh outputs that the compiled
    kernels were not specialised for: then the full path)."""
    try:
        ready = _ENTRIES.get(key)
    except TypeError:  # an unhashable argument
        return None
    if ready is None:
        return None
    device_errors.raise_pending()  # as the full path does before it launches anything
    return ready(*inputs)


class _Recorder:
    __slots__ = ("offers",)

    def __init__(self):
        self.offers = []


class recording:
    """``with recording(key) as rec:`` around the full path of a call whose key is ``key`` (None:
    nothing is recorded); :func:`keep` then stores what it launched, if it qualifies."""

    __slots__ = ("key", "rec", "outer")

    def __init__(self, key):
        self.key = key
        self.rec = None

    def __enter__(self):
        if self.key is not None:
            self.outer = getattr(_local, "rec", None)
            self.rec = _local.rec = _Recorder()
        return self

    def __exit__(self, *exc):
        if self.rec is not None:
            _local.rec = self.outer
        return False

    def keep(self, inputs: tuple, outputs: tuple) -> None:
        """Store the ready launch of the recorded call if the call made exactly one offer, of these
        ``inputs`` (the tensors the key took, by identity: a launcher that launched a converted
        copy of one offers other tensors) into these ``outputs`` (None for one the call did not
        return)."""
        rec = self.rec
        if rec is None or len(rec.offers) != 1:
            return
        launched_inputs, launched_outputs, ready = rec.offers[0]
        if len(launched_inputs) != len(inputs) or len(launched_outputs) < len(outputs):
            return
        for a, b in zip(launched_inputs, inputs):
            if a is not b:
                return
        for a, b in zip(launched_outputs, outputs):
            if b is not None and a is not b:
                return
        try:
            hash(self.key)
        except TypeError:
            return
        if len(_ENTRIES) >= _MAX_ENTRIES:
            _ENTRIES.clear()
        _ENTRIES[self.key] = ready


def recorder():
    """The recorder of the call being recorded on this thread, or None (the Triton launcher asks
    before offering a launch)."""
    return getattr(_local, "rec", None)


def offer(rec, inputs: tuple, outputs: tuple, ready) -> None:
    """Launches of ``inputs`` into fresh ``outputs`` that ``ready`` repeats, made by the call ``rec`` records."""
    rec.offers.append((inputs, outputs, ready))


def forget() -> None:
    """Drop every entry: what they launch was dropped or may be decided anew (the launch caches
    were cleared)."""
    _ENTRIES.clear()

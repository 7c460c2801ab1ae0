"""The steady state of a repeated eager call: one cache from the public call to a ready launch.

A small call's host time is aule's own Python (validation, routing, launch building) and Triton's
per-launch argument binding, not the kernel. :func:`aule.flash_attention` on plain torch tensors
(no features, no gradient to record, not traced) first looks its call up here by :func:`key`: every
property the full path's decisions depend on (the tensors' types, shapes, strides, dtypes, devices,
16-byte alignment and which of them are the same object; the scalar arguments with their types,
since ``True == 1 == 1.0`` and the checks tell those apart; the settings that route or configure,
as raw environment values; the device Triton launches on). Where the full path served an equal key
with one launch of a compiled kernel (``ops._direct_launch``) and returned that launch's outputs,
the entry holds that launch ready (:class:`aule.backends.triton.ops.Ready`): a hit allocates fresh
outputs, launches and returns, and a miss takes the full path, which checks everything and raises
as it always did. Anything the full path does besides that one launch (features, autograd, host
backends, the interpreter, the autotuner's first run, errors) leaves no entry.

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


def key(q, k, v, causal, scale, window_size, backend, return_lse, softcap):
    """The cache key of a featureless dense call on plain torch tensors, or None (another kind of
    input, a gradient to record, an active functorch transform, no ready launches where the data
    is): such a call takes the full path and is never recorded. The caller has ruled out tracing.
    A key holding an unhashable argument (a list) is never found nor stored: hashing it once,
    at the lookup, is what a hit costs."""
    hooks = _hooks or _torch_hooks()
    if hooks is None:
        return None
    tensor, grad_enabled, functorch = hooks
    if q.__class__ is not tensor or k.__class__ is not tensor or v.__class__ is not tensor:
        return None
    if (grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)) or functorch():
        return None
    device = _launch_device(q)
    if device is None:
        return None
    try:
        out = (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype, v.dtype,
               q.device, k.device, v.device, q.data_ptr() % 16, k.data_ptr() % 16, v.data_ptr() % 16,
               k is q, v is q, v is k,
               # Each scalar with its type: True == 1 == 1.0, and the checks refuse some of those.
               causal.__class__, causal, scale.__class__, scale, window_size.__class__,
               _items_typed(window_size) if window_size.__class__ is tuple else window_size,
               backend.__class__, backend, return_lse.__class__, return_lse, softcap.__class__, softcap,
               settings.launch_values(), device)
    except Exception:  # noqa: BLE001 - layouts without strides or pointers (sparse, nested): the full path decides
        return None
    return out


def _launch_device(q):
    """The device a ready launch of ``q``'s call runs on (Triton's current device, part of the key
    as it is of the direct launches' own), or None where there are no ready launches (host tensors,
    the interpreter, AMD): then :func:`key` is None at once. The Triton launcher installs the
    reader (:func:`set_launch_device`) when it loads; until then no call is recorded."""
    return None


def set_launch_device(reader) -> None:
    global _launch_device
    _launch_device = reader


def attend(key, q, k, v):
    """``(out, lse)`` of the call ``key`` describes, served by its ready launch, or None (no entry,
    or fresh outputs that the compiled kernel was not specialised for: then the full path)."""
    try:
        ready = _ENTRIES.get(key)
    except TypeError:  # an unhashable argument
        return None
    if ready is None:
        return None
    device_errors.raise_pending()  # as the full path does before it launches anything
    return ready(q, k, v)


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

    def keep(self, q, k, v, out, lse) -> None:
        """Store the ready launch of the recorded call if it was exactly one launch, of these
        inputs, into these outputs (``lse`` None when the call did not return it)."""
        rec = self.rec
        if rec is None or len(rec.offers) != 1:
            return
        tensors, ready = rec.offers[0]
        if (tensors[0] is q and tensors[1] is k and tensors[2] is v and tensors[3] is out
                and (lse is None or tensors[4] is lse)):
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


def offer(rec, tensors: tuple, ready) -> None:
    """A launch of ``tensors`` ``(q, k, v, out, lse)`` that ``ready`` repeats, made by the call ``rec`` records."""
    rec.offers.append((tensors, ready))


def forget() -> None:
    """Drop every entry: what they launch was dropped or may be decided anew (the launch caches
    were cleared)."""
    _ENTRIES.clear()

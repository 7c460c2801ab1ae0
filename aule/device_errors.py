"""Errors that kernels find on the device and the host learns of later.

A kernel that checks its own tables (block ids, lengths, slots) cannot raise: it records what it
found in an error flag and goes on without following the bad entry. Reading that flag at once
would be a host synchronisation, which a serving loop and a CUDA graph cannot afford, so each
backend that keeps such flags registers a *source* here, and every aule call first asks the sources
for what their finished kernels found (:func:`raise_pending`): a bad table raises ``ValueError``
no later than the next aule call after the kernel has finished. ``AULE_CHECK_SYNC=1`` makes the
launching call wait and raise itself (:mod:`aule.settings`).

Nothing here imports torch; a source is any object with ``poll(wait: bool) -> list[str]``, which
returns the messages of the errors its finished kernels recorded and forgets them.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("aule")

_sources: list = []
_lock = threading.Lock()


def register(source) -> None:
    """Ask ``source`` for its errors on every aule call from now on (registering twice is harmless)."""
    with _lock:
        if source not in _sources:
            _sources.append(source)


def raise_pending(wait: bool = False) -> None:
    """Raise ``ValueError`` for the first error a finished kernel recorded; later ones are logged.

    ``wait=True`` first waits for the kernels still running (a host synchronisation).
    """
    if not _sources:
        return
    found = []
    for source in list(_sources):
        found.extend(source.poll(wait))
    if not found:
        return
    for extra in found[1:]:
        log.warning("aule: another table error found on the device: %s", extra)
    raise ValueError(found[0])


def check_device_errors() -> None:
    """Wait for every aule kernel that checks its tables on the device and raise ``ValueError`` for
    the first bad entry one found (block id, context length or slot; the message names the table,
    the index and the value). Without this call the error surfaces at the next aule call after the
    kernel has finished; a serving engine may call it where it synchronises anyway."""
    raise_pending(wait=True)

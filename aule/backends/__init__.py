"""Backend registry: name -> backend, with availability and the reason when unavailable.

One registry for every operation (dense and paged attention, KV writes, KV storage): each
backend declares the operations it serves (:mod:`aule.backends.base`). Backends are imported
lazily so ``import aule`` never pulls in torch, triton or Vulkan.
"""
from __future__ import annotations

import importlib
import threading

from ..errors import UnsupportedError

# name -> (module, class). The order is the order `aule info` lists them in.
_REGISTRY = {
    "triton": ("aule.backends.triton", "TritonBackend"),
    "triton-amd": ("aule.backends.triton", "TritonAMDBackend"),
    "vulkan": ("aule.backends.vulkan", "VulkanBackend"),
    "numpy": ("aule.backends.numpy", "NumpyBackend"),
}
_ALIASES = {"cpu": "numpy"}
_instances: dict = {}
_lock = threading.Lock()


def names() -> list[str]:
    return list(_REGISTRY)


_CANONICAL: dict = {}


def canonical_name(name: str, source: str = "backend") -> str:
    """The registry's name for ``name`` (aliases resolved); errors name ``source``, the argument
    or environment variable the name came from."""
    if type(name) is str:
        known = _CANONICAL.get(name)  # a name once resolved resolves the same (bad names are never kept)
        if known is not None:
            return known
    if not isinstance(name, str):
        raise TypeError(f"{source} must be a string naming a backend, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"{source}={name!r} names no backend; choose one of {names() + list(_ALIASES)}")
    if type(name) is str and len(_CANONICAL) < 256:
        _CANONICAL[name] = key
    return key


class _Missing:
    """Stands in for a backend whose module cannot be imported, keeping the reason."""

    differentiable = False
    ops: tuple = ()

    def __init__(self, name, reason):
        self.name = name
        self.unavailable_reason = reason
        self.available = False

    def why_not(self, op, call, forced):
        return self.unavailable_reason

    def details(self):
        return {}


def get(name: str):
    """The backend registered under ``name`` (``cpu`` is ``numpy``), imported and created on first
    use; a module that cannot be imported gives a stand-in that is unavailable with the reason."""
    if type(name) is str:
        made = _instances.get(name)  # a canonical name of a backend already made: no lock needed
        if made is not None:
            return made
    key = canonical_name(name)
    with _lock:
        if key not in _instances:
            module, cls = _REGISTRY[key]
            try:
                _instances[key] = getattr(importlib.import_module(module), cls)()
            except (ImportError, AttributeError) as exc:
                _instances[key] = _Missing(key, f"cannot import {module}: {exc}")
        return _instances[key]


def require(name: str):
    """The named backend, or ``UnsupportedError`` saying why it is unavailable here."""
    b = get(name)
    if not b.available:
        raise UnsupportedError(f"backend {b.name!r} is unavailable here: {b.unavailable_reason}")
    return b


def get_available_backends() -> list[str]:
    """Names of the backends that work on this machine, in registry order."""
    return [n for n in names() if get(n).available]


def backend_info() -> dict:
    """``{name: {"available": bool, "reason": str | None, "ops": [...], **details}}`` for every backend."""
    info = {}
    for n in names():
        b = get(n)
        entry = {"available": b.available, "reason": b.unavailable_reason, "ops": list(b.ops)}
        if b.available:
            try:
                entry.update(b.details())
            except Exception as exc:  # info must always print
                entry["details_error"] = f"{type(exc).__name__}: {exc}"
        info[n] = entry
    return info

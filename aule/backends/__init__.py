"""Backend registry: name -> backend, with availability and the reason when unavailable.

Backends are imported lazily so ``import aule`` never pulls in torch, triton or Vulkan.
"""
from __future__ import annotations

import importlib
import threading

from ..errors import UnsupportedError

# name -> (module, class). The order is the auto-routing preference.
_REGISTRY = {
    "triton": ("aule.backends.triton", "TritonBackend"),
    "triton-amd": ("aule.backends.triton", "TritonAMDBackend"),
    "vulkan": ("aule.backends.vulkan", "VulkanBackend"),
    "numpy": ("aule.backends.numpy_backend", "NumpyBackend"),
}
_ALIASES = {"cpu": "numpy"}
_instances: dict = {}
_lock = threading.Lock()


def names() -> list[str]:
    return list(_REGISTRY)


def canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string naming a backend, got {type(name).__name__}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        raise ValueError(f"backend={name!r} names no backend; choose one of {names() + list(_ALIASES)}")
    return key


class _Missing:
    """Stands in for a backend whose module cannot be imported, keeping the reason."""

    differentiable = False

    def __init__(self, name, reason):
        self.name = name
        self.unavailable_reason = reason
        self.available = False

    def unsupported(self, call, forced):
        return self.unavailable_reason

    def details(self):
        return {}


def load(name: str, registry: dict, instances: dict):
    """The instance registered under ``name`` in ``registry`` (name -> (module, class)), imported
    and created on first use and kept in ``instances``; a module that cannot be imported gives a
    stand-in that is unavailable with the reason. Paged backends use the same mechanism."""
    key = canonical_name(name)
    with _lock:
        if key not in instances:
            module, cls = registry[key]
            try:
                instances[key] = getattr(importlib.import_module(module), cls)()
            except (ImportError, AttributeError) as exc:
                instances[key] = _Missing(key, f"cannot import {module}: {exc}")
        return instances[key]


def get(name: str):
    return load(name, _REGISTRY, _instances)


def require(name: str):
    """The named backend, or ``UnsupportedError`` saying why it is unavailable here."""
    b = get(name)
    if not b.available:
        raise UnsupportedError(f"backend {b.name!r} is unavailable here: {b.unavailable_reason}")
    return b


def get_available_backends() -> list[str]:
    """Names of the backends that work on this machine, in routing order."""
    return [n for n in names() if get(n).available]


def backend_info() -> dict:
    """``{name: {"available": bool, "reason": str | None, **details}}`` for every backend."""
    info = {}
    for n in names():
        b = get(n)
        entry = {"available": b.available, "reason": b.unavailable_reason}
        if b.available:
            try:
                entry.update(b.details())
            except Exception as exc:  # info must always print
                entry["details_error"] = f"{type(exc).__name__}: {exc}"
        info[n] = entry
    return info

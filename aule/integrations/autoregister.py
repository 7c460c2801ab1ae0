"""``attn_implementation="aule"`` whatever the import order, without ``aule.install()``.

``import aule`` must stay torch-free, so nothing is registered up front. Instead: when transformers
is already loaded, aule registers at once; otherwise a finder on ``sys.meta_path`` waits for
transformers' package to finish importing, registers, and removes itself. Registration imports
transformers' modeling code (and so torch); someone importing transformers is about to use it.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys

log = logging.getLogger("aule")

_TARGET = "transformers"


def _register() -> None:
    try:
        from . import huggingface

        huggingface.register()
    except Exception as exc:  # a transformers without these interfaces, or no torch
        log.warning("aule: cannot register attn_implementation='aule' with transformers: %s", exc)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Lets the normal finders locate transformers, then runs :func:`_register` after its module
    body has executed."""

    _looking = False

    def find_spec(self, name, path=None, target=None):
        if name != _TARGET or self._looking:
            return None
        self._looking = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._looking = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        _remove()
        loader, execute = spec.loader, spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _register()

        loader.exec_module = exec_module
        return spec


_finder = _AfterTransformers()


def _remove() -> None:
    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)


def arm() -> None:
    """Register now if transformers is loaded, else once it is (idempotent)."""
    if _TARGET in sys.modules:
        _register()
    elif _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)

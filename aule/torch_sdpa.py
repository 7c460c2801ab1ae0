"""A drop-in for ``torch.nn.functional.scaled_dot_product_attention`` that keeps SDPA's meaning.

``install()`` swaps the function, ``uninstall()`` puts the exact original object back and
``with installed():`` does both. Calls aule can serve go to aule's backends (validated and routed
once, in :func:`aule.sdpa_core.attend`), ``attn_mask`` calls included; everything else (dropout,
shapes, dtypes or masks no backend takes, a mask with ``is_causal``, which torch refuses, CPU calls
that need gradients) goes to the original SDPA, logged once per reason. SDPA's top-left
``is_causal`` becomes aule's bottom-right window through :func:`aule.sdpa_core.sdpa_window`.

On a CUDA GPU the drop-in never makes a call slower than stock SDPA where that was measured: a call
whose shape class the speed table (:mod:`aule.speed_table`) records torch's own SDPA as faster for
on this GPU model goes to torch's original SDPA, logged once per class; ``AULE_PREFER_TORCH=0`` turns
that off, and a forced backend (``install(backend="triton")``, ``AULE_BACKEND``) always runs aule's.

A row that ``attn_mask`` hides entirely gives zeros, by aule's rule (:mod:`aule.masks`), whatever
torch's kernel would give (torch 2.13's CPU kernels give zeros too; other torch kernels and versions
have given NaN). A float mask's ``-inf`` entries hide their keys even where the score is ``+inf``,
where torch's sum would be NaN.
"""
from __future__ import annotations

import contextlib
import logging
import math

import torch
import torch.nn.functional as F

from . import backends
from .sdpa_core import (_ORIGINAL_SDPA, _compiling, _note, _shape_class, _state, _triton_op, _unservable, attend,
                        gpu_name, original_sdpa, sdpa_window)

log = logging.getLogger("aule")

__all__ = ["install", "uninstall", "installed", "is_installed", "scaled_dot_product_attention",
           "sdpa_window", "original_sdpa"]


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *,
                                 scale=None, enable_gqa=False):
    """``torch.nn.functional.scaled_dot_product_attention`` with aule serving what it can.

    Same signature, same meaning (top-left ``is_causal``, ``attn_mask``, ``scale``, ``enable_gqa``,
    3-D or 4-D inputs); anything else goes to the original function unchanged, so its errors are
    SDPA's own.
    """
    why = _unservable(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal)
    out = None
    if why is None:
        squeeze = query.dim() == 3
        q, k, v = (t.unsqueeze(0) for t in (query, key, value)) if squeeze else (query, key, value)
        keys, left, right = sdpa_window(q.shape[-2], k.shape[-2], bool(is_causal))
        if keys != k.shape[-2]:
            k, v = k[:, :, :keys], v[:, :, :keys]
        s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        label = "" if _compiling() else _shape_class(query, key, is_causal)
        out = attend(q, k, v, s, left, right, label, attn_mask)
        if out is not None and squeeze:
            out = out.squeeze(0)
    else:
        _note(("fallback", why), "aule: torch SDPA serves this call: %s", why)
    if out is None:
        # Looked up per call (not the import-time constant uninstall() restores), so a test can
        # stand a fake in for torch's kernel and see which calls reach it.
        return original_sdpa()(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                               is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out


# --------------------------------------------------------------------------------------------
# install / uninstall

def install(backend=None, verbose=False):
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through aule.

    ``backend`` forces one aule backend (``"vulkan"``, ``"numpy"``, ``"triton"``; calls it cannot
    serve still go to torch's SDPA). Without one, CUDA calls of a shape class torch's SDPA was
    measured faster on, on this GPU model, go to torch (:mod:`aule.speed_table`; ``aule info``
    lists them). ``verbose=True`` logs at INFO, once per distinct
    (backend, shape class), which route a call took. Installing again only updates the options.
    Also registers ``"aule"`` with Hugging Face transformers when it is already imported.
    """
    if backend is not None:
        backend = backends.canonical_name(backend)
    if not isinstance(verbose, bool):
        raise TypeError(f"verbose must be a bool, got {type(verbose).__name__}")
    with _state.lock:
        _state.backend = backend
        _state.verbose = verbose
        # Fallback reasons log once per process; routes again after each install, for verbose.
        _state.logged = {key for key in _state.logged if key[0] != "route"}
        if verbose:
            _ensure_visible_logging()
        F.scaled_dot_product_attention = scaled_dot_product_attention
        _state.installed = True
    if torch.cuda.is_available():
        # Both now: a model compiled before its first eager call needs the op, and the device's
        # name for the speed table (a trace cannot ask the driver).
        _triton_op()
        gpu_name(torch.device("cuda", torch.cuda.current_device()))
    _register_with_loaded_integrations()
    log.debug("aule: installed as torch SDPA (backend=%s)", backend or "auto")


def uninstall():
    """Put torch's own SDPA function object back. Harmless when not installed."""
    with _state.lock:
        if not _state.installed:
            return
        if F.scaled_dot_product_attention is scaled_dot_product_attention:
            F.scaled_dot_product_attention = _ORIGINAL_SDPA
        else:
            # Someone wrapped aule's function after install(); restoring torch's would drop theirs.
            log.warning("aule: torch SDPA was replaced again after aule.install(); leaving %r in place",
                        F.scaled_dot_product_attention)
        _state.installed = False
        _state.backend = None
        _state.verbose = False
        if _state.handler is not None:
            log.removeHandler(_state.handler)
            _state.handler = None
        if _state.saved_level is not None:
            log.setLevel(_state.saved_level)
            _state.saved_level = None


def is_installed() -> bool:
    return _state.installed and F.scaled_dot_product_attention is scaled_dot_product_attention


@contextlib.contextmanager
def installed(backend=None, verbose=False):
    """``with aule.installed():`` runs the block with aule as SDPA, then restores what was before
    (including an outer ``install()`` and its options)."""
    was = (_state.installed, _state.backend, _state.verbose)
    install(backend=backend, verbose=verbose)
    try:
        yield
    finally:
        if was[0]:
            install(backend=was[1], verbose=was[2])
        else:
            uninstall()


def _ensure_visible_logging():
    """verbose=True must show its INFO lines even in a program that never configured logging."""
    if log.getEffectiveLevel() > logging.INFO:
        if _state.saved_level is None:
            _state.saved_level = log.level
        log.setLevel(logging.INFO)
    if not log.handlers and not logging.getLogger().handlers and _state.handler is None:
        _state.handler = logging.StreamHandler()
        _state.handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        log.addHandler(_state.handler)


def _register_with_loaded_integrations():
    import sys

    if "transformers" in sys.modules:
        # The glue imports sdpa_core, never this module, so importing it here makes no loop.
        from .integrations import huggingface

        try:
            huggingface.register()
        except (ImportError, AttributeError) as exc:  # a transformers without these interfaces
            log.warning("aule: cannot register with this transformers version: %s", exc)

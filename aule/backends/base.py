"""What every backend provides. The router in :mod:`aule.api` only talks to this interface."""
from __future__ import annotations

import functools


class Backend:
    """A way to run attention.

    Subclasses set ``name`` and implement :meth:`_probe` (is the backend usable on this machine?),
    :meth:`unsupported` (can it serve this particular call?) and :meth:`forward`.
    """

    name = ""
    aliases: tuple = ()
    #: Whether the backend has a backward pass (the SDPA drop-in routes gradient calls by this).
    differentiable = False

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

    def unsupported(self, call, forced: bool) -> str | None:
        """``None`` if this backend serves ``call``, else the reason. ``forced``: the user named it."""
        return None

    def forward(self, call):
        """Return ``(out, lse)``: ``out`` like ``call.q`` (type, device, dtype, shape); ``lse`` float32
        ``[B, Hq, Sq]`` in the caller's array type when ``call.return_lse``, else ``None``."""
        raise NotImplementedError

    def details(self) -> dict:
        """Extra facts for ``aule info`` (devices, variants); empty by default."""
        return {}

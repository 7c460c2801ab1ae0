"""The two classes every contender builds on: :class:`Contender` (declared once, in the registry
of :mod:`aule.bench.contenders`) and :class:`Bound` (one prepared on a case's inputs)."""
from __future__ import annotations

import contextlib

from . import inputs as _inputs


class Bound:
    """A contender bound to a case's inputs: ``bound(i)`` runs on set ``i`` (its result is what
    the check compares), ``run()`` on the next set in rotation (what the timers call)."""

    def __init__(self, call, n_sets, *, clock="host", sync=None, context=None, grad_to_none=None,
                 causal=None, window=None, variant=None, device_ms=None, device_batch=None, cleanup=None,
                 graphable=False, checked=None, features=None, graph_required=False, note=None, precision=None):
        self.call = call
        self.n = n_sets
        self.i = 0
        self.clock = clock
        self.sync = sync
        self.context = context or contextlib.nullcontext
        self.grad_to_none = grad_to_none
        self.causal, self.window = causal, window  # the visibility computed, for its reference
        self.variant = variant
        self.device_ms = device_ms  # clock 'device': GPU milliseconds of one call on set i
        # clock 'device', optional: (i, n) -> recorded work running n calls on set i back to back
        # in one submission, with ms() (GPU milliseconds per call of a re-submission) and close()
        self.device_batch = device_batch
        self.cleanup = cleanup
        self.graphable = graphable  # no host synchronisation inside: a CUDA graph can capture it
        self.checked = checked or call  # what the correctness check runs on set 0
        self.check_s = None  # wall time of the checked call (it also warmed the path up)
        # The score features the call applies (aule's argument names, host values), for its reference;
        # a padded or packed case's own layout is the inputs' business, not the contender's.
        self.features = features or {}
        self.graph_required = graph_required  # timed only as a CUDA-graph replay: capture must work
        self.note = note  # what the row should say about how it was measured
        # The dtype whose tolerance the check applies, where the call computes in another than the
        # case's (float8 on a bfloat16 case's values); None: the case's.
        self.precision = precision

    def __call__(self, i):
        return self.call(i)

    def run(self):
        self.i = (self.i + 1) % self.n
        return self.call(self.i)


class Contender:
    """One implementation measured in the suites. ``impl`` and ``backend`` are the row fields
    the JSON has always carried; ``serves`` the kind of inputs it takes ('dense' or 'decode')."""

    impl = ""
    serves = ("dense",)
    name = ""  # set by the registry

    def __init__(self, backend=None, *, full_causal=False):
        self.backend = backend
        self.full_causal = full_causal

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def unavailable(self) -> str | None:
        """Why this contender cannot run on this machine at all, or None."""
        if self.backend:
            info = _inputs.backend_info().get(self.backend, {})
            if not info.get("available"):
                return f"unavailable here: {info.get('reason')}"
        return None

    def applies(self, case: dict) -> bool:
        """Whether this contender has a row on ``case`` at all (a padded-batch contender has none on
        a plain case); :meth:`why_skip` is for rows that exist but cannot run here."""
        return "lengths" not in case

    def why_skip(self, case: dict) -> str | None:
        """Why this contender cannot run ``case`` (known before any input is built), or None."""
        return None

    def computes(self, case: dict) -> dict:
        """The case as this contender computes it: a full-causal baseline drops the window, and is
        checked and credited with FLOPs for what it computed."""
        if self.full_causal:
            return {**case, "causal": True, "window": -1}
        return case

    def visibility(self, case: dict):
        c = self.computes(case)
        return c.get("causal", True), c.get("window", -1)

    def prepare(self, case: dict, inputs) -> Bound:
        raise NotImplementedError

    def variant(self, case: dict):
        """The shader variant / kernel the backend reports it uses for this dtype and head_dim."""
        if self.backend is None:
            return None
        info = _inputs.backend_info().get(self.backend, {})
        chosen = info.get("variants_chosen")
        if isinstance(chosen, dict):
            v = chosen.get(f"{'float16' if case['dtype'] == 'float16' else 'float32'} head_dim {case['D']}")
            return v if isinstance(v, str) else None
        for key in ("variant", "kernel", "config"):
            if isinstance(info.get(key), str):
                return info[key]
        return None

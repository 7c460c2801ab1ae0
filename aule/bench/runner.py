"""Runs suites: builds inputs once per case, checks every contender against a reference, then
times it, all in this process on the same inputs. Failures become rows that say why."""
from __future__ import annotations

import datetime as _dt
import functools
import logging
import time
import warnings

import numpy as np

from . import checks, machine, memprobe, timing
from . import inputs as _inputs
from .contenders import CONTENDERS, Sdpa
from .inputs import AttentionInputs, DecodeInputs, PaddedInputs, Skip, VarlenInputs, cuda_ready, first_line
from .train import ModelInputs
from .metrics import attention_flops, brief, cuda_cleanup, err, metrics, ratios, ref_name
from .progress import Progress
from .suites import case_label

__all__ = ["Runner", "Skip", "AttentionInputs", "DecodeInputs", "attention_flops"]

log = logging.getLogger("aule")


class Runner:
    # 250 ms of back-to-back calls before each CUDA timing, not a few: Triton compiles and the
    # float64 checks leave the GPU idle for seconds, and after Vulkan work in the process the H100
    # idled at 420 MHz instead of 1980 (nvidia-smi), ramping up only under sustained load.
    def __init__(self, quick=False, budget_s=None, progress=True, gpu_warmup_ms=250, gpu_rep_ms=50,
                 overhead_calls=None):
        self.quick = quick
        self.overhead_calls = overhead_calls  # calls per round of the overhead suite (None: 50 ms' worth)
        self.budget_s = budget_s
        self.t0 = time.perf_counter()
        self.progress_enabled = progress
        self.gpu_warmup_ms = gpu_warmup_ms
        self.gpu_rep_ms = gpu_rep_ms
        self.cpu_reps = 3 if quick else 7
        self.cpu_max_s = 3.0 if quick else 30.0
        if cuda_ready() is None:
            # A GPU machine's run must fit a short lease: host-clocked rows there are the Vulkan
            # and NumPy ones, each kept to a few seconds.
            self.cpu_max_s = min(self.cpu_max_s, 3.0)
        self.bar = None

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.t0 > self.budget_s

    def run(self, suites, on_progress=None) -> dict:
        """Run ``suites``; returns ``{name: suite result}``.

        Each suite's quick cases (the shapes the issues set targets on) run first, across all
        suites, then the remaining cases, so a run cut short by ``budget_s`` still measured what
        matters most. ``on_progress(results)`` is called after every case (for incremental saves).
        """
        total = sum(len(s.cases) * len(s.contenders) for s in suites)
        self.bar = Progress(total, enabled=self.progress_enabled)
        states = {s.name: self._open_suite(s) for s in suites}
        order = [(0 if i in s.quick else 1, k, i) for k, s in enumerate(suites) for i in range(len(s.cases))]
        if self.quick:  # --quick already trimmed the cases to the quick ones
            order = [(0, k, i) for k, s in enumerate(suites) for i in range(len(s.cases))]
        try:
            for _, k, i in sorted(order):
                suite = suites[k]
                st = states[suite.name]
                if st["res"]["status"] != "ran":
                    continue
                try:
                    st["rows"][i] = self._run_case(suite, suite.cases[i], st)
                except Exception as exc:  # a harness bug in one case must not lose the others
                    log.debug("bench: case failed", exc_info=True)
                    st["res"]["notes"].append(f"{case_label(suite.cases[i])}: harness error: {first_line(exc)}")
                if on_progress:
                    on_progress({n: self._close_suite(states[n]) for n in states})
        finally:
            self.bar.close()
        return {n: self._close_suite(states[n]) for n in states}

    def _open_suite(self, suite) -> dict:
        res = {"name": suite.name, "title": suite.title, "kind": suite.kind, "metric": suite.metric,
               "baseline": suite.baseline, "ceiling": suite.ceiling, "rows": [], "notes": [], "status": "ran",
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": self.quick, "seconds": 0.0}
        if suite.against:
            # Each pair's baseline is its own reference too (its ratio 1), whatever the suite's is.
            res["against"] = {**{b: b for _, b in suite.against}, **dict(suite.against)}
        st = {"res": res, "rows": {}, "active": []}
        n_units = len(suite.cases) * len(suite.contenders)
        why = None
        if suite.needs == "cuda" and cuda_ready():
            why = f"needs a CUDA/ROCm GPU: {cuda_ready()}"
        elif suite.needs == "vulkan":
            info = _inputs.backend_info().get("vulkan", {})
            why = None if info.get("available") else f"needs Vulkan: {info.get('reason')}"
        elif suite.needs == "vulkan-gpu":
            why = _inputs.vulkan_gpu_missing()
        elif suite.needs == "gpu" and cuda_ready() and _inputs.vulkan_gpu_missing():
            why = f"needs a GPU: {cuda_ready()}; {_inputs.vulkan_gpu_missing()}"
        if why:
            res.update(status="skipped", reason=why)
            self.bar.step(f"{suite.name}: skipped", n_units)
            return st
        for name in suite.contenders:
            why = CONTENDERS[name].unavailable()
            if why:
                res["notes"].append(f"{name}: not run: {why}")
            else:
                st["active"].append(name)
        missing = len(suite.contenders) - len(st["active"])
        if missing:
            self.bar.step(f"{suite.name}: {missing} contenders unavailable", missing * len(suite.cases))
        return st

    def _close_suite(self, st) -> dict:
        res = dict(st["res"])
        res["rows"] = [r for i in sorted(st["rows"]) for r in st["rows"][i]]
        res["notes"] = list(res["notes"])
        ratios(res, res["baseline"])
        return res

    def _run_case(self, suite, p, st) -> list:
        started = time.perf_counter()
        label = case_label(p)
        active = st["active"]
        res = st["res"]
        try:
            if self.over_budget():
                note = f"time budget (--budget-s {self.budget_s:g}) spent"
                if not any(note in n for n in res["notes"]):
                    res["notes"].append(f"{note}: later cases not measured")
                self.bar.step(f"{suite.name} {label}: over budget", len(active))
                return [self._row(p, label, c, "skipped", note) for c in active]
            if suite.needs in ("per-case", "gpu") and p["device"] == "cuda" and cuda_ready():
                res["notes"].append(f"{label}: not run: {cuda_ready()}")
                self.bar.step(f"{suite.name} {label}: no GPU", len(active))
                return []
            if suite.kind == "memory":
                return self._memory_case(p, label, active)
            return self._case(suite, p, label, active)
        finally:
            res["seconds"] = round(res["seconds"] + time.perf_counter() - started, 1)

    @staticmethod
    def _row(p, label, contender, status, note=None, **kw):
        c = CONTENDERS[contender]
        row = {"case": label, "params": p, "contender": contender, "impl": c.impl, "backend": c.backend,
               "status": status, "note": note}
        row.update(kw)
        return row

    @staticmethod
    def _inputs_class(suite, p):
        if suite.kind in ("decode", "train"):
            return {"decode": DecodeInputs, "train": ModelInputs}[suite.kind]
        return {"mask": PaddedInputs, "varlen": VarlenInputs}.get(p.get("pack"), AttentionInputs)

    def _case(self, suite, p, label, active):
        rows = []
        here = [c for c in active if CONTENDERS[c].applies(p)]
        if len(here) < len(active):  # contenders with no row on this kind of case
            self.bar.step(f"{suite.name} {label}: {len(active) - len(here)} contenders do not apply",
                          len(active) - len(here))
        active = here
        try:
            inp = self._inputs_class(suite, p)(p)
        except Exception as exc:
            note = f"inputs: {first_line(exc)}"
            self.bar.step(f"{suite.name} {label}: {note}", len(active))
            return [self._row(p, label, c, "error", note) for c in active]
        refs = {}
        for c in active:
            self.bar.show(f"{suite.name} {label}: {c}")
            try:
                rows.append(self._contender(suite, p, label, c, inp, refs))
            except Skip as exc:
                rows.append(self._row(p, label, c, "skipped", str(exc)))
            except Exception as exc:  # one broken contender must not end the run
                log.debug("bench: %s on %s failed", c, label, exc_info=True)
                rows.append(self._row(p, label, c, "error", first_line(exc)))
                cuda_cleanup()
            self.bar.step(f"{suite.name} {label}: {c} {brief(rows[-1], suite.metric)}")
        del inp, refs
        cuda_cleanup()
        return rows

    def _reference(self, suite, p, inp, bound, refs):
        """(reference output, reference grads or None, reference name), cached per visibility and
        features."""
        key = (bound.causal, bound.window, tuple(sorted(bound.features)))
        if key in refs:
            return refs[key]
        if suite.kind == "train":
            refs[key] = (inp.reference(CONTENDERS[suite.baseline]), None, suite.baseline)
            return refs[key]
        if suite.kind == "decode":
            s = inp.sets[0]
            out = checks.blocked_reference(s["q"], s["k"], s["v"], True, -1)
            refs[key] = (out, None, ref_name(s["q"]))
            return refs[key]
        if isinstance(inp, VarlenInputs):
            # Each sequence alone, the outputs packed as the call packs them.
            parts = [self._dense_reference(p, q, k, v, None, bound) for q, k, v in inp.pieces(0)]
            if any(r[0] is None for r in parts):
                refs[key] = (None, None, parts[0][2])
            else:
                refs[key] = (inp.assemble([r[0] for r in parts]), None, parts[0][2])
            return refs[key]
        s0 = inp.sets[0]
        refs[key] = self._dense_reference(p, s0["q"], s0["k"], s0["v"], s0.get("do") if inp.backward else None,
                                          bound, **self._case_features(p))
        return refs[key]

    @staticmethod
    def _case_features(p) -> dict:
        """Features that are the case's, whatever the contender: a padded case's mask."""
        if p.get("pack") == "mask":
            return {"attn_mask": _inputs.padding_mask(p["lengths"], p.get("Sk", p["S"]))}
        return {}

    @staticmethod
    def _dense_reference(p, q, k, v, do, bound, **case_features):
        """The float64 oracle for small problems on the CPU, else the blocked torch reference;
        both with the bound's features and the case's."""
        torch = _inputs.torch_or_none()
        features = {**bound.features, **case_features}
        on_cpu = isinstance(q, np.ndarray) or q.device.type == "cpu"
        if do is None and on_cpu and checks.oracle_fits(q.shape[0], q.shape[1], q.shape[2], k.shape[2]):
            return checks.oracle(q, k, v, bound.causal, bound.window, **features), None, "float64 oracle"
        if torch is None:
            return None, None, "none (too large for the oracle and torch is missing)"
        r = checks.blocked_reference(q, k, v, bound.causal, bound.window, grad_out=do, **features)
        return (r[0], r[1], ref_name(q)) if do is not None else (r, None, ref_name(q))

    def _check(self, suite, p, inp, bound, refs):
        """Run once on set 0 and measure the error against the reference."""
        for t in bound.grad_to_none or ():
            t.grad = None
        bound.i = 0
        t0 = time.perf_counter()
        result = bound.checked(0)
        if bound.sync:
            bound.sync()
        bound.check_s = time.perf_counter() - t0
        ref_out, ref_grads, name = self._reference(suite, p, inp, bound, refs)
        if ref_out is None:
            return None, name
        if suite.kind == "train":
            return inp.error(result, ref_out), name
        if getattr(inp, "backward", False):
            out, (k_used, v_used) = result
            s0 = inp.sets[0]
            g = p["Hq"] // p["Hkv"]

            def fold(grad):  # gradients of expanded K/V summed back over the query-head group
                if grad.shape[1] == p["Hkv"]:
                    return grad
                b, _, sk, d = grad.shape
                return grad.view(b, p["Hkv"], g, sk, d).sum(2)

            grads = (s0["q"].grad, fold(k_used.grad), fold(v_used.grad))
            if any(x is None for x in grads):
                raise Skip("the backward pass left a gradient empty")
            errs = [err(out, ref_out)] + [err(a, b) for a, b in zip(grads, ref_grads)]
            return max(errs), name
        return err(result, ref_out), name

    def _contender(self, suite, p, label, c, inp, refs):
        contender = CONTENDERS[c]
        serves = {"decode": "decode", "train": "model"}.get(suite.kind, "dense")
        if serves not in contender.serves:
            what = {"dense": "attention"}.get(serves, serves)
            raise Skip(f"contender kind {contender.impl!r} does not run {what} cases")
        why = contender.why_skip(p)
        if why:
            raise Skip(why)
        bound = contender.prepare(p, inp)
        backward = p.get("mode") == "fwd+bwd"
        tol = inp.tolerance() if suite.kind == "train" else checks.tolerance(bound.precision or p["dtype"], backward)
        from ..errors import UnsupportedError

        try:
            return self._measure(suite, p, label, c, inp, refs, bound, tol)
        except UnsupportedError as exc:
            raise Skip(str(exc)) from None
        finally:
            if bound.cleanup:
                bound.cleanup()

    def _measure(self, suite, p, label, c, inp, refs, bound, tol):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with bound.context():
                try:
                    err, ref_name = self._check(suite, p, inp, bound, refs)
                except RuntimeError as exc:
                    why = first_line(exc)
                    # torch's warnings say why each SDPA backend declined; keep the one about this one.
                    word = Sdpa.WARNING_WORDS.get(CONTENDERS[c].backend, "\0")
                    hints = [" ".join(str(w.message).split("(Triggered internally")[0].split())
                             for w in caught if word in str(w.message).lower()]
                    if "No available kernel" in str(exc) or "not supported" in str(exc).lower():
                        raise Skip(why + (f" ({hints[0][:200]})" if hints else "")) from None
                    raise
                if err is not None and not err <= tol:
                    return self._row(p, label, c, "wrong", f"error {err:.3g} above tolerance {tol:g}",
                                     err=err, ref=ref_name, tol=tol, variant=bound.variant)
                before = machine.cpu_counters()
                t = self._time(suite, p, bound, lambda out: self._replayed_err(suite, p, inp, bound, refs, out))
                share = machine.others_share(before, machine.cpu_counters())
                if t.get("replayed_err") is not None and not t["replayed_err"] <= tol:
                    return self._row(p, label, c, "wrong", f"graph replay: error {t['replayed_err']:.3g} above "
                                     f"tolerance {tol:g}", err=t["replayed_err"], ref=ref_name, tol=tol)
        row = self._row(p, label, c, "ok", bound.note, err=err, ref=ref_name, tol=tol, variant=bound.variant, **t)
        if share is not None:
            # CPU time other processes took while this row was timed (host-clocked rows suffer most).
            row["others_cpu_share"] = round(share, 2)
        metrics(row, suite.kind, p, inp.bytes_read() if suite.kind == "decode" else None)
        return row

    def _replayed_err(self, suite, p, inp, bound, refs, out):
        """The error of what a captured graph's replay left in its output for set 0."""
        ref_out = self._reference(suite, p, inp, bound, refs)[0]
        return None if ref_out is None else err(out, ref_out)

    def _time(self, suite, p, bound, replay_error=None):
        if bound.graph_required and not (bound.clock == "cuda" and suite.graphs):
            raise Skip("timed as a CUDA-graph replay, which this suite does not time")
        if suite.kind == "overhead":
            t = timing.per_call_us(bound.run, sync=bound.sync, rounds=5 if not self.quick else 3,
                                   calls=self.overhead_calls)
            t["clock"] = "wall clock over calls back to back" + (
                (", then one CUDA synchronisation" if bound.clock == "cuda" else ", then one wait for the device")
                if bound.sync else "")
            return t
        if bound.clock == "cuda" and suite.graphs and bound.graphable:
            outputs = [] if bound.graph_required else None
            try:
                t = timing.cuda_graph_time([functools.partial(bound.call, i) for i in range(bound.n)],
                                           self.gpu_warmup_ms, self.gpu_rep_ms, outputs=outputs)
                t["clock"] = "CUDA graph replay, CUDA events"
                if outputs and replay_error is not None:
                    t["replayed_err"] = replay_error(outputs[0])
                return t
            except Exception as exc:  # not capturable here: plain launches, and say so
                log.debug("bench: graph capture failed: %s", exc)
                cuda_cleanup()
                if bound.graph_required:  # this row is the replay: eager timing would be another row's
                    raise
        if bound.clock == "steps":
            from .train import TIMED_STEPS, WARMUP_STEPS

            t = timing.host_time(bound.run, warmup=WARMUP_STEPS, reps=TIMED_STEPS, max_s=float("inf"),
                                 sync=bound.sync)
            t["clock"] = "wall clock per step, each ended by a CUDA synchronisation"
            return t
        if bound.clock == "cuda":
            t = timing.cuda_time(bound.run, self.gpu_warmup_ms, self.gpu_rep_ms, bound.grad_to_none)
            t["clock"] = "CUDA events"
            return t
        if bound.clock == "device":
            t = self._device_time(bound)
            # The same call's wall time (upload-free, through the public API) beside the GPU time.
            wall = timing.host_time(bound.run, warmup=1, reps=self.cpu_reps, max_s=self.cpu_max_s)
            t["wall_ms"] = wall["ms"]
            return t

        def run():
            for t in bound.grad_to_none or ():
                t.grad = None
            bound.run()

        t = timing.host_time(run, warmup=1, reps=self.cpu_reps, max_s=self.cpu_max_s,
                             warm_call_s=bound.check_s)
        t["clock"] = "wall clock"
        if bound.device_ms is not None:
            # Host-array calls whose dispatches the device can time too: the GPU's share of the wall time.
            g = timing.reported_time(lambda: bound.device_ms(bound.i), max_s=self.cpu_max_s)
            if g is not None:
                t.update(gpu_ms=g["ms"], gpu_ms_p20=g["ms_p20"], gpu_ms_p80=g["ms_p80"])
                t["clock"] = "wall clock (GPU time beside it from Vulkan timestamps around the dispatches)"
        return t

    def _device_time(self, bound) -> dict:
        """GPU time per call from the timestamps the call reports. Where the contender can record
        its call repeated back to back, each sample is one submission of as many calls as fill
        timing.DEVICE_BATCH_MS: the device never waits on the host between calls, so its clocks
        stay up (NVIDIA's drop within the host's gaps between short calls)."""
        one = bound.device_ms(bound.i)
        if one is None:
            raise Skip("the device reports no timestamps on this queue")
        if bound.device_batch is None:
            t = timing.reported_time(lambda: bound.device_ms(bound.i), max_s=self.cpu_max_s)
            t["clock"] = "Vulkan timestamps"
            return t
        n = timing.batch_size(one)
        work = bound.device_batch(bound.i, n)
        try:
            t = timing.reported_time(work.ms, max_s=self.cpu_max_s)
        finally:
            work.close()
        t["calls_per_submission"] = n
        t["clock"] = "Vulkan timestamps around calls recorded back to back in one submission (per call)"
        return t

    def _memory_case(self, p, label, active):
        rows = []
        for c in active:
            self.bar.show(f"memory {label}: {c} (subprocess)")
            try:
                m = memprobe.in_subprocess(p)
                status = "ok" if m["finite"] and not m["torch_imported"] else "wrong"
                note = None if status == "ok" else ("output not finite" if not m["finite"] else "torch was imported")
                rows.append(self._row(p, label, c, status, note, mb=m["peak_extra_mb"],
                                      rss_mb=m["rss_peak_growth_mb"], inputs_mb=m["inputs_mb"],
                                      output_mb=m["output_mb"], ms=m["seconds_traced"] * 1e3))
            except Exception as exc:
                rows.append(self._row(p, label, c, "error", first_line(exc)))
            self.bar.step(f"memory {label}: {c} {brief(rows[-1], 'mb')}")
        return rows



"""Runs suites: builds inputs once per case, checks every contender against a reference, then
times it, all in this process on the same inputs. Failures become rows that say why."""
from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings

import numpy as np

from . import checks, machine, timing
from .progress import Progress
from .suites import CONTENDERS, case_label

log = logging.getLogger("aule")


class Skip(Exception):
    """A contender cannot run this case; the message is the reason shown in the table."""


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def cuda_ready() -> str | None:
    """None when a CUDA/ROCm device is usable through torch, else why not."""
    torch = _torch()
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA/ROCm device (torch.cuda.is_available() is False)"
    return None


def vulkan_gpu_missing() -> str | None:
    """None when aule's Vulkan backend runs on a GPU-type device, else why not."""
    info = backend_info().get("vulkan", {})
    if not info.get("available"):
        return f"needs a Vulkan GPU: the vulkan backend is unavailable: {info.get('reason')}"
    dev = info.get("device")
    if isinstance(dev, dict) and dev.get("type") == "cpu":
        return f"needs a GPU-type Vulkan device; the only one is {dev.get('name')} (a CPU rasteriser)"
    return None


def _first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# --------------------------------------------------------------------------------------------
# Inputs


def _cache_bytes(device: str) -> int:
    torch = _torch()
    if device == "cuda" and torch is not None:
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip()
        return int(txt[:-1]) * 1024 if txt.endswith("K") else int(txt)
    except (OSError, ValueError):
        return 32 * 2**20


def _n_sets(device: str, set_bytes: int) -> int:
    """Enough input sets that rotating them cycles more data than the last-level cache holds."""
    return int(min(3, max(1, math.ceil(4 * _cache_bytes(device) / max(1, set_bytes)))))


def _dtype(torch, name):
    return getattr(torch, name)


def resolve_device(p: dict) -> str:
    """'cuda' or 'cpu'. A case on device 'auto' (the Vulkan suite) uses the CUDA device when torch
    has one, so the SDPA rows beside Vulkan's are on the same GPU, else the CPU."""
    if p.get("device") == "auto":
        return "cpu" if cuda_ready() else "cuda"
    return "cuda" if p.get("device") == "cuda" else "cpu"


class AttentionInputs:
    """Sets of q, k, v (and a gradient for the output) as torch tensors, and NumPy views of the
    same memory for aule's host backends."""

    def __init__(self, p: dict, seed: int = 0):
        torch = _torch()
        self.p = p
        b, hq, hk, sq, d = p["B"], p["Hq"], p["Hkv"], p["S"], p["D"]
        sk = p.get("Sk", sq)
        self.backward = p.get("mode") == "fwd+bwd"
        itemsize = {"float32": 4, "float64": 8}.get(p["dtype"], 2)
        set_bytes = itemsize * d * (b * hq * sq * 2 + 2 * b * hk * sk)
        self.sets = []
        if torch is None:
            rng = np.random.default_rng(seed)
            for _ in range(_n_sets("cpu", set_bytes)):
                self.sets.append({n: rng.standard_normal(shape, dtype=np.float32).astype(p["dtype"])
                                  for n, shape in (("q", (b, hq, sq, d)), ("k", (b, hk, sk, d)),
                                                   ("v", (b, hk, sk, d)), ("do", (b, hq, sq, d)))})
            self.numpy_sets = self.sets
            return
        dev = resolve_device(p)
        gen = torch.Generator(device=dev).manual_seed(seed)
        dt = _dtype(torch, p["dtype"])
        for _ in range(_n_sets(dev, set_bytes)):
            s = {n: torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(dt)
                 for n, shape in (("q", (b, hq, sq, d)), ("k", (b, hk, sk, d)), ("v", (b, hk, sk, d)))}
            if self.backward:
                s["do"] = torch.randn((b, hq, sq, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
                for n in ("q", "k", "v"):
                    s[n].requires_grad_(True)
            self.sets.append(s)
        self.numpy_sets = None
        if dev == "cpu" and p["dtype"] in ("float32", "float64", "float16"):
            self.numpy_sets = [{n: t.detach().numpy() for n, t in s.items()} for s in self.sets]

    def host_sets(self):
        """NumPy arrays with the same values (copies from a GPU), for aule's host backends."""
        if self.numpy_sets is None:
            if self.p["dtype"] == "bfloat16":
                raise Skip("NumPy has no bfloat16: aule's host backends take float16/float32 arrays")
            self.numpy_sets = [{n: t.detach().cpu().numpy() for n, t in s.items()} for s in self.sets]
        return self.numpy_sets

    def leaves(self):
        return [s[n] for s in self.sets for n in ("q", "k", "v")] if self.backward else None


class DecodeInputs:
    """A contiguous KV cache for SDPA and the same values scattered into shuffled paged blocks."""

    def __init__(self, p: dict, seed: int = 0):
        torch = _torch()
        b, hq, hk, ctx, d, blk = p["B"], p["Hq"], p["Hkv"], p["ctx"], p["D"], p["block"]
        if ctx % blk:
            raise ValueError(f"decode case: ctx {ctx} must be a multiple of block {blk}")
        self.p = p
        dev = resolve_device(p)
        dt = _dtype(torch, p["dtype"])
        gen = torch.Generator(device=dev).manual_seed(seed)
        nb = ctx // blk
        set_bytes = 2 * 2 * b * hk * ctx * d * torch.finfo(dt).bits // 8
        self.sets = []
        for _ in range(_n_sets(dev, set_bytes)):
            q = torch.randn((b, hq, 1, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            k = torch.randn((b, hk, ctx, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            v = torch.randn((b, hk, ctx, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            perm = torch.randperm(b * nb, generator=gen, device=dev)

            def paged(x):
                blocks = x.view(b, hk, nb, blk, d).permute(0, 2, 3, 1, 4).reshape(b * nb, blk, hk, d)
                cache = torch.empty_like(blocks)
                cache[perm] = blocks
                return cache

            self.sets.append({
                "q": q, "k": k, "v": v, "k_cache": paged(k), "v_cache": paged(v),
                "block_tables": perm.view(b, nb).to(torch.int32),
                "context_lens": torch.full((b,), ctx, dtype=torch.int32, device=dev),
            })

    def bytes_read(self) -> int:
        p = self.p
        return 2 * p["B"] * p["Hkv"] * p["ctx"] * p["D"] * self.sets[0]["k"].element_size()


# --------------------------------------------------------------------------------------------
# Contenders: each returns a Bound with call(i) (checked output), run() (timed, rotating sets).


class Bound:
    """A contender bound to a case's inputs. ``clock``: 'cuda' (events), 'host' (wall clock) or
    'device' (``device_ms(i)`` reports the GPU time of one call, from Vulkan timestamps)."""

    def __init__(self, call, n_sets, context=None, grad_to_none=None, causal=None, window=None,
                 variant=None, sync=None, clock="host", device_ms=None, cleanup=None, graphable=False):
        self.clock = clock
        self.check_s = None  # wall time of the checked call (it also warmed the path up)
        self.graphable = graphable  # no host synchronisation inside: a CUDA graph can capture it
        self.device_ms = device_ms
        self.cleanup = cleanup
        self.call = call
        self.n = n_sets
        self.i = 0
        self.context = context or contextlib.nullcontext
        self.grad_to_none = grad_to_none
        self.causal = causal
        self.window = window
        self.variant = variant
        self.sync = sync

    def run(self):
        self.i = (self.i + 1) % self.n
        return self.call(self.i)


_INFO_CACHE: dict = {}


def backend_info() -> dict:
    """aule.backend_info(), read once per process (Vulkan's details enumerate devices)."""
    if "info" not in _INFO_CACHE:
        import aule

        try:
            _INFO_CACHE["info"] = aule.backend_info()
        except Exception as exc:  # detection must never stop a benchmark
            log.debug("bench: backend_info failed: %s", exc)
            _INFO_CACHE["info"] = {}
    return _INFO_CACHE["info"]


def _aule_variant(backend: str | None, dtype: str, head_dim: int):
    """The shader variant / kernel the backend reports it uses for this dtype and head_dim."""
    if backend is None:
        return None
    info = backend_info().get(backend, {})
    chosen = info.get("variants_chosen")
    if isinstance(chosen, dict):
        v = chosen.get(f"{'float16' if dtype == 'float16' else 'float32'} head_dim {head_dim}")
        return v if isinstance(v, str) else None
    for key in ("variant", "kernel", "config"):
        if isinstance(info.get(key), str):
            return info[key]
    return None


def machine_skip(spec: dict) -> str | None:
    """Why a contender cannot run on this machine at all (noted once per suite), or None."""
    import aule

    if spec["impl"] in ("aule", "paged", "resident", "paged_resident", "paged_launcher") and spec.get("backend"):
        info = backend_info().get(spec["backend"], {})
        if not info.get("available"):
            return f"unavailable here: {info.get('reason')}"
    if spec["impl"] == "paged" and not hasattr(aule, "flash_attention_paged"):
        return "aule.flash_attention_paged is not in this build of aule"
    if spec["impl"] == "sdpa" and _torch() is None:
        return "torch is not installed"
    return None


def _eff_window(spec, p):
    causal = p.get("causal", True)
    window = -1 if spec.get("full_causal") else p.get("window", -1)
    return (True if spec.get("full_causal") else causal), window


def bind_attention(spec: dict, inp: AttentionInputs) -> Bound:
    import aule

    p = inp.p
    causal, window = _eff_window(spec, p)
    g = p["Hq"] // p["Hkv"]
    limit = spec.get("max_scores")
    if limit and p["B"] * p["Hq"] * p["S"] * p.get("Sk", p["S"]) > limit:
        raise Skip(f"B*H*Sq*Sk above {limit:.3g}: this path materialises the scores")
    torch = _torch()
    dev = resolve_device(p)
    sync = torch.cuda.synchronize if dev == "cuda" else None
    clock = "cuda" if dev == "cuda" else "host"
    variant = _aule_variant(spec.get("backend"), p["dtype"], p["D"])
    if spec["impl"] == "resident":
        return _bind_resident(spec, inp, causal, window, variant)
    if spec["impl"] == "aule":
        backend = spec.get("backend")
        # aule's host backends get NumPy arrays (their natural input) holding the same values.
        host = backend in ("numpy", "vulkan") or (backend is None and dev == "cpu")
        if host and inp.backward:
            raise Skip("NumPy arrays carry no gradients")
        sets = inp.host_sets() if host else inp.sets
        if host:
            clock, sync = "host", None
        kv = [(s["k"], s["v"]) for s in sets]
        if spec.get("expand_kv"):
            def expand(x):
                if isinstance(x, np.ndarray):
                    return np.repeat(x, g, axis=1)
                return x.detach().repeat_interleave(g, dim=1).requires_grad_(inp.backward)
            kv = [(expand(k), expand(v)) for k, v in kv]

        def fwd(i):
            s = sets[i]
            return aule.flash_attention(s["q"], kv[i][0], kv[i][1], causal=causal, window_size=window,
                                        backend=backend)

        if not inp.backward:
            return Bound(fwd, len(sets), causal=causal, window=window, variant=variant, sync=sync, clock=clock)
        leaves = inp.leaves() + [t for pair in kv for t in pair if t.requires_grad]

        def fwd_bwd(i):
            out = fwd(i)
            if not out.requires_grad:
                raise Skip(f"backend {backend or 'auto'} returned no gradient path (forward only)")
            out.backward(sets[i]["do"])
            return out, kv[i]

        return Bound(fwd_bwd, len(sets), grad_to_none=leaves, causal=causal, window=window,
                     variant=variant, sync=sync, clock=clock)

    if spec["impl"] == "sdpa":
        import torch.nn.functional as F

        sq, sk = p["S"], p.get("Sk", p["S"])
        mask = None
        sdpa_causal = causal
        if spec.get("explicit_mask"):
            from .. import masks

            left, right = masks.canonical_window(causal, window)
            mask = torch.from_numpy(masks.mask(sq, sk, left, right)).to(inp.sets[0]["q"].device)
            sdpa_causal = False
        elif window not in (-1, None):
            raise Skip("SDPA has no sliding window")
        elif causal and sq != sk:
            raise Skip("SDPA's is_causal is top-left aligned; aule's is bottom-right (differs when Sq != Sk)")
        kwargs = {"is_causal": sdpa_causal, "attn_mask": mask}
        if g > 1:
            kwargs["enable_gqa"] = True
        sets = inp.sets

        def fwd(i):
            s = sets[i]
            return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], **kwargs)

        call = fwd
        if inp.backward:
            def call(i):
                out = fwd(i)
                out.backward(sets[i]["do"])
                return out, (sets[i]["k"], sets[i]["v"])

        return Bound(call, len(sets), context=_sdpa_context(spec.get("sdpa")),
                     grad_to_none=inp.leaves(), causal=causal, window=window, sync=sync, clock=clock)
    raise Skip(f"contender kind {spec['impl']!r} does not run attention cases")


def _bind_paged_resident(spec, inp) -> Bound:
    """Vulkan paged decode with the KV cache as GpuTensors (uploaded once): the public call for
    the check and wall time, Vulkan timestamps of the attention and merge dispatches for GPU time."""
    import aule

    why = vulkan_gpu_missing()
    if why:
        raise Skip(why)
    try:
        from .. import paged as pg
        from ..backends.vulkan import to_gpu
        from ..backends.vulkan.paged import run_paged
    except ImportError as exc:
        raise Skip(f"aule's Vulkan paged path is missing: {exc}") from None
    backend = pg.get_paged_backend("vulkan")
    hsets = []
    for s in inp.sets:
        hsets.append({"q": s["q"].cpu().numpy(), "k_cache": to_gpu(s["k_cache"].cpu().numpy()),
                      "v_cache": to_gpu(s["v_cache"].cpu().numpy()),
                      "block_tables": s["block_tables"].cpu().numpy(), "context_lens": s["context_lens"].cpu().numpy()})
    names = ("q", "k_cache", "v_cache", "block_tables", "context_lens")
    calls = [pg.canonicalize_paged(*(h[n] for n in names)) for h in hsets]

    def call(i):
        return aule.flash_attention_paged(*(hsets[i][n] for n in names), backend="vulkan")

    def device_ms(i):
        _, ns = run_paged(backend, calls[i], timestamps=True)
        return None if ns is None else ns / 1e6

    def cleanup():
        for h in hsets:
            h["k_cache"].free()
            h["v_cache"].free()

    return Bound(call, len(hsets), clock="device", device_ms=device_ms, cleanup=cleanup)


def _bind_resident(spec, inp, causal, window, variant) -> Bound:
    """Vulkan on GpuTensors: inputs uploaded once, outside the timed region. ``call`` goes through
    the public API (its wall time is the per-call cost a user sees); ``device_ms`` reads the GPU
    time of the dispatches from Vulkan timestamp queries."""
    import aule

    try:
        from ..backends.vulkan import attention as vk_attention
        from ..backends.vulkan import to_gpu
    except ImportError as exc:
        raise Skip(f"aule's Vulkan GpuTensor API is missing: {exc}") from None
    if inp.backward:
        raise Skip("GpuTensors carry no gradients")
    gsets = [{n: to_gpu(s[n]) for n in ("q", "k", "v")} for s in inp.host_sets()]

    def call(i):
        s = gsets[i]
        return aule.flash_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window,
                                    backend=spec.get("backend"))

    def device_ms(i):
        s = gsets[i]
        out, _, ns = vk_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window, timestamps=True)
        out.free()
        return None if ns is None else ns / 1e6

    def cleanup():
        for s in gsets:
            for t in s.values():
                t.free()

    return Bound(call, len(gsets), causal=causal, window=window, variant=variant, clock="device",
                 device_ms=device_ms, cleanup=cleanup)


def _sdpa_context(name):
    if name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name, None)
    if backend is None:
        raise Skip(f"this torch has no SDPBackend.{name}")
    return lambda: sdpa_kernel([backend])


def bind_decode(spec: dict, inp: DecodeInputs) -> Bound:
    import aule

    torch = _torch()
    sets = inp.sets
    sync = torch.cuda.synchronize if resolve_device(inp.p) == "cuda" else None
    if spec["impl"] == "paged":
        backend = spec.get("backend")

        def call(i):
            s = sets[i]
            return aule.flash_attention_paged(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                              s["context_lens"], backend=backend)

        return Bound(call, len(sets), variant=_aule_variant(backend, inp.p["dtype"], inp.p["D"]), sync=sync,
                     clock="cuda" if sync else "host")
    if spec["impl"] == "paged_resident":
        return _bind_paged_resident(spec, inp)
    if spec["impl"] == "paged_launcher":
        # What a serving loop runs after validating its tables once (the public call validates
        # them on every call, which costs a device-to-host copy).
        if sync is None:
            raise Skip("the Triton launcher needs CUDA tensors")
        try:
            from ..backends.triton.paged import paged_attention_triton
        except ImportError as exc:
            raise Skip(f"no Triton paged launcher: {exc}") from None
        p = inp.p
        scale = 1.0 / math.sqrt(p["D"])

        def call(i):
            s = sets[i]
            return paged_attention_triton(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                          s["context_lens"], scale, -1, p["ctx"])

        return Bound(call, len(sets), sync=sync, clock="cuda", graphable=True)
    if spec["impl"] == "sdpa":
        import torch.nn.functional as F

        p = inp.p
        if spec.get("sdpa") == "MATH" and p["Hq"] != p["Hkv"] and p["B"] * p["Hq"] * p["ctx"] > 2**24:
            # math's enable_gqa repeats K/V to every query head: B*Hq*ctx*D elements twice over
            raise Skip("B*Hq*ctx above 2^24: the math path repeats K/V per query head")
        gqa = {"enable_gqa": True} if p["Hq"] != p["Hkv"] else {}

        def call(i):
            s = sets[i]
            # One query row at the end of the context sees every key: SDPA without a mask.
            return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], **gqa)

        return Bound(call, len(sets), context=_sdpa_context(spec.get("sdpa")), sync=sync,
                     clock="cuda" if sync else "host", graphable=True)
    raise Skip(f"contender kind {spec['impl']!r} does not run decode cases")


# --------------------------------------------------------------------------------------------
# Metrics


def attention_flops(p: dict) -> float:
    """4*B*H*Sq*Sk*D, halved for causal; with a window, 4*B*H*D per visible (query, key) pair;
    x3.5 for forward+backward (backward counted as 2.5 forwards)."""
    from .. import masks

    sq, sk = p["S"], p.get("Sk", p["S"])
    window = p.get("window", -1)
    if window in (-1, None):
        pairs = sq * sk / (2 if p["causal"] else 1)
    else:
        left, right = masks.canonical_window(p["causal"], window)
        pairs = 0
        for i in range(sq):
            lo, hi = masks.key_range(i, i + 1, sq, sk, left, right)
            pairs += max(0, hi - lo)
    f = 4.0 * p["B"] * p["Hq"] * p["D"] * pairs
    return f * 3.5 if p.get("mode") == "fwd+bwd" else f


# --------------------------------------------------------------------------------------------
# The run


class Runner:
    # 250 ms of back-to-back calls before each CUDA timing, not a few: Triton compiles and the
    # float64 checks leave the GPU idle for seconds, and after Vulkan work in the process the H100
    # idled at 420 MHz instead of 1980 (nvidia-smi), ramping up only under sustained load.
    def __init__(self, quick=False, budget_s=None, progress=True, gpu_warmup_ms=250, gpu_rep_ms=50):
        self.quick = quick
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
                    st["res"]["notes"].append(f"{case_label(suite.cases[i])}: harness error: {_first_line(exc)}")
                if on_progress:
                    on_progress({n: self._close_suite(states[n]) for n in states})
        finally:
            self.bar.close()
        return {n: self._close_suite(states[n]) for n in states}

    def _open_suite(self, suite) -> dict:
        res = {"name": suite.name, "title": suite.title, "kind": suite.kind, "metric": suite.metric,
               "baseline": suite.baseline, "rows": [], "notes": [], "status": "ran",
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "quick": self.quick, "seconds": 0.0}
        st = {"res": res, "rows": {}, "active": []}
        n_units = len(suite.cases) * len(suite.contenders)
        why = None
        if suite.needs == "cuda" and cuda_ready():
            why = f"needs a CUDA/ROCm GPU: {cuda_ready()}"
        elif suite.needs == "vulkan-gpu":
            why = vulkan_gpu_missing()
        if why:
            res.update(status="skipped", reason=why)
            self.bar.step(f"{suite.name}: skipped", n_units)
            return st
        for name in suite.contenders:
            why = machine_skip(CONTENDERS[name])
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
        _ratios(res, res["baseline"])
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
            if suite.needs == "per-case" and p["device"] == "cuda" and cuda_ready():
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
        spec = CONTENDERS[contender]
        row = {"case": label, "params": p, "contender": contender, "impl": spec["impl"],
               "backend": spec.get("backend") if spec["impl"] != "sdpa" else spec.get("sdpa"),
               "status": status, "note": note}
        row.update(kw)
        return row

    def _case(self, suite, p, label, active):
        rows = []
        try:
            inp = DecodeInputs(p) if suite.kind == "decode" else AttentionInputs(p)
        except Exception as exc:
            note = f"inputs: {_first_line(exc)}"
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
                rows.append(self._row(p, label, c, "error", _first_line(exc)))
                _cuda_cleanup()
            self.bar.step(f"{suite.name} {label}: {c} {_brief(rows[-1], suite.metric)}")
        del inp, refs
        _cuda_cleanup()
        return rows

    def _reference(self, suite, p, inp, bound, refs):
        """(reference output, reference grads or None, reference name), cached per visibility."""
        key = (bound.causal, bound.window)
        if key in refs:
            return refs[key]
        if suite.kind == "decode":
            s = inp.sets[0]
            out = checks.blocked_reference(s["q"], s["k"], s["v"], True, -1)
            refs[key] = (out, None, _ref_name(s["q"]))
            return refs[key]
        s0 = inp.sets[0]
        q, k, v = s0["q"], s0["k"], s0["v"]
        torch = _torch()
        backward = inp.backward
        on_cpu = isinstance(q, np.ndarray) or q.device.type == "cpu"
        if not backward and on_cpu and checks.oracle_fits(p["B"], p["Hq"], p["S"], p.get("Sk", p["S"])):
            refs[key] = (checks.oracle(q, k, v, bound.causal, bound.window), None, "float64 oracle")
        elif torch is None:
            refs[key] = (None, None, "none (too large for the oracle and torch is missing)")
        else:
            r = checks.blocked_reference(q, k, v, bound.causal, bound.window,
                                         grad_out=s0.get("do") if backward else None)
            refs[key] = (r[0], r[1], _ref_name(q)) if backward else (r, None, _ref_name(q))
        return refs[key]

    def _check(self, suite, p, inp, bound, refs):
        """Run once on set 0 and measure the error against the reference."""
        for t in bound.grad_to_none or ():
            t.grad = None
        bound.i = 0
        t0 = time.perf_counter()
        result = bound.call(0)
        if bound.sync:
            bound.sync()
        bound.check_s = time.perf_counter() - t0
        ref_out, ref_grads, ref_name = self._reference(suite, p, inp, bound, refs)
        if ref_out is None:
            return None, ref_name
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
            errs = [_err(out, ref_out)] + [_err(a, b) for a, b in zip(grads, ref_grads)]
            return max(errs), ref_name
        return _err(result, ref_out), ref_name

    def _contender(self, suite, p, label, c, inp, refs):
        spec = CONTENDERS[c]
        if suite.kind == "decode":
            bound = bind_decode(spec, inp)
        else:
            bound = bind_attention(spec, inp)
        backward = p.get("mode") == "fwd+bwd"
        tol = checks.tolerance(p["dtype"], backward)
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
                    why = _first_line(exc)
                    # torch's warnings say why each SDPA backend declined; keep the one about this one.
                    word = _SDPA_WORDS.get(CONTENDERS[c].get("sdpa"), "\0")
                    hints = [" ".join(str(w.message).split("(Triggered internally")[0].split())
                             for w in caught if word in str(w.message).lower()]
                    if "No available kernel" in str(exc) or "not supported" in str(exc).lower():
                        raise Skip(why + (f" ({hints[0][:200]})" if hints else "")) from None
                    raise
                if err is not None and not err <= tol:
                    return self._row(p, label, c, "wrong", f"error {err:.3g} above tolerance {tol:g}",
                                     err=err, ref=ref_name, tol=tol, variant=bound.variant)
                before = machine.cpu_counters()
                t = self._time(suite, p, bound)
                share = machine.others_share(before, machine.cpu_counters())
        row = self._row(p, label, c, "ok", None, err=err, ref=ref_name, tol=tol, variant=bound.variant, **t)
        if share is not None:
            # CPU time other processes took while this row was timed (host-clocked rows suffer most).
            row["others_cpu_share"] = round(share, 2)
        metrics(row, suite.kind, p, inp.bytes_read() if suite.kind == "decode" else None)
        return row

    def _time(self, suite, p, bound):
        if suite.kind == "overhead":
            t = timing.per_call_us(bound.run, sync=bound.sync, rounds=5 if not self.quick else 3)
            t["clock"] = "wall clock over calls back to back" + (", then one CUDA synchronisation" if bound.sync else "")
            return t
        if bound.clock == "cuda" and suite.graphs and bound.graphable:
            try:
                t = timing.cuda_graph_time([functools.partial(bound.call, i) for i in range(bound.n)],
                                           self.gpu_warmup_ms, self.gpu_rep_ms)
                t["clock"] = "CUDA graph replay, CUDA events"
                return t
            except Exception as exc:  # not capturable here: plain launches, and say so
                log.debug("bench: graph capture failed: %s", exc)
                _cuda_cleanup()
        if bound.clock == "cuda":
            t = timing.cuda_time(bound.run, self.gpu_warmup_ms, self.gpu_rep_ms, bound.grad_to_none)
            t["clock"] = "CUDA events"
            return t
        if bound.clock == "device":
            t = timing.reported_time(lambda: bound.device_ms(bound.i), warmup=2, reps=self.cpu_reps * 3,
                                     max_s=self.cpu_max_s)
            if t is None:
                raise Skip("the device reports no timestamps on this queue")
            # The same call's wall time (upload-free, through the public API) beside the GPU time.
            wall = timing.host_time(bound.run, warmup=1, reps=self.cpu_reps, max_s=self.cpu_max_s)
            t["wall_ms"] = wall["ms"]
            t["clock"] = "Vulkan timestamps"
            return t

        def run():
            for t in bound.grad_to_none or ():
                t.grad = None
            bound.run()

        t = timing.host_time(run, warmup=1, reps=self.cpu_reps, max_s=self.cpu_max_s,
                             warm_call_s=bound.check_s)
        t["clock"] = "wall clock"
        return t

    def _memory_case(self, p, label, active):
        rows = []
        for c in active:
            self.bar.show(f"memory {label}: {c} (subprocess)")
            cmd = [sys.executable, "-m", "aule.bench.memprobe", "--batch", str(p["B"]),
                   "--heads-q", str(p["Hq"]), "--heads-kv", str(p["Hkv"]), "--seq", str(p["S"]),
                   "--head-dim", str(p["D"])] + ([] if p["causal"] else ["--no-causal"])
            env = dict(os.environ)
            # The child must find this aule even when it is run from a checkout, not installed.
            pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
            try:
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, check=False)
                if r.returncode != 0:
                    raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1])
                m = json.loads(r.stdout.strip().splitlines()[-1])
                status = "ok" if m["finite"] and not m["torch_imported"] else "wrong"
                note = None if status == "ok" else ("output not finite" if not m["finite"] else "torch was imported")
                rows.append(self._row(p, label, c, status, note, mb=m["peak_extra_mb"],
                                      rss_mb=m["rss_peak_growth_mb"], inputs_mb=m["inputs_mb"],
                                      output_mb=m["output_mb"], ms=m["seconds_traced"] * 1e3))
            except Exception as exc:
                rows.append(self._row(p, label, c, "error", _first_line(exc)))
            self.bar.step(f"memory {label}: {c} {_brief(rows[-1], 'mb')}")
        return rows


_SDPA_WORDS = {"FLASH_ATTENTION": "flash attention", "CUDNN_ATTENTION": "cudnn",
               "EFFICIENT_ATTENTION": "memory efficient"}


def _ref_name(x) -> str:
    if isinstance(x, np.ndarray) or x.device.type == "cpu":
        return "torch float64 (blocked)"
    return "torch float32 (blocked, TF32 off)"


def _err(out, ref) -> float:
    if type(out).__name__ == "GpuTensor":
        out = out.numpy()
    if isinstance(out, np.ndarray) or isinstance(ref, np.ndarray):
        return checks.rel_err(out, ref)
    return checks.rel_err_torch(out, ref)


def _cuda_cleanup():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def metrics(row, kind: str, p: dict, bytes_read: int | None = None):
    """Rates from the row's median time. A contender that computes other attention than the case
    (full causal beside a window) is credited with the FLOPs of what it computed."""
    ms = row["ms"]
    if kind == "overhead":
        row["us_per_call"] = ms * 1e3
    elif kind == "decode":
        row["tbps"] = bytes_read / (ms * 1e-3) / 1e12
        row["tokens_per_s"] = p["B"] / (ms * 1e-3)
    else:
        spec = CONTENDERS.get(row["contender"], {})
        if spec.get("full_causal"):
            p = {**p, "causal": True, "window": -1}
        flops = attention_flops(p)
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        row["gflops"] = row["tflops"] * 1e3


def _ratios(res, baseline):
    """speed-up of each row over the suite's baseline contender on the same case (>1: faster)."""
    if not baseline:
        return
    base = {r["case"]: r["ms"] for r in res["rows"] if r["contender"] == baseline and r["status"] == "ok"}
    for r in res["rows"]:
        if r["status"] == "ok" and r["case"] in base and r.get("ms"):
            r["ratio"] = base[r["case"]] / r["ms"]


def _brief(row, metric) -> str:
    if row["status"] != "ok":
        return row["status"]
    v = row.get(metric)
    return f"{v:.3g} {metric}" if v is not None else "ok"

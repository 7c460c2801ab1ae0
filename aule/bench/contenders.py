"""The contenders: what a row of a suite calls, prepared on a case's inputs and told how to be timed.

A :class:`Contender` is declared once in :data:`CONTENDERS` under the name the tables and JSON
show. ``unavailable()`` says why it cannot run on this machine at all (noted once per suite),
``why_skip(case)`` why it cannot run one case, and ``prepare(case, inputs)`` returns a
:class:`Bound`: a callable ``bound(i)`` on input set ``i`` plus what the runner needs to check
and time it. The clock a bound names decides the timer (see ``Runner._time``):

``cuda``    CUDA events (``triton.testing.do_bench``), or a CUDA-graph replay when ``graphable``
            and the suite asks for graphs;
``device``  times the call reports itself (Vulkan timestamps), the wall time beside them;
``host``    the wall clock around whole calls.

Library entry points are imported inside the methods: the harness imports without torch, Triton
or Vulkan, and a missing piece skips its rows instead of failing the run.
"""
from __future__ import annotations

import contextlib
import math
import os

import numpy as np

from . import inputs as _inputs
from .bound import Bound, Contender
from .inputs import DecodeInputs, Skip, resolve_device, torch_or_none
from .train import HfModel


def _need_vulkan_gpu():
    """Skip a row whose numbers only mean something on a GPU-type Vulkan device."""
    why = _inputs.vulkan_gpu_missing()
    if why:
        raise Skip(why)


def _device_clock(case):
    """(sync, clock) for torch inputs of ``case``: CUDA events on a GPU, the wall clock on a CPU."""
    if resolve_device(case) == "cuda":
        return torch_or_none().cuda.synchronize, "cuda"
    return None, "host"


# The features suite's score modifiers (issue 15): one value each, the same on every backend. The
# cap bites on the unit-variance scores of random inputs; Gemma 2's 30 would change them by less
# than bf16's tolerance, so the check could not tell a cap that was dropped. Speed does not
# depend on the value.
SOFTCAP = 2.0


def feature_values(case: dict, feature: str | None) -> dict:
    """``flash_attention`` keyword arguments (host values) of ``feature`` on ``case``: ``softcap``
    (:data:`SOFTCAP`), ``sinks`` (float32 [Hq] logits of the size of a row's log-sum-exp, so they
    matter), ``alibi`` (the geometric slopes of the ALiBi paper for Hq heads); None or 'padding':
    none (a padding mask comes from the case's lengths)."""
    hq = case["Hq"]
    if feature == "softcap":
        return {"softcap": SOFTCAP}
    if feature == "sinks":
        return {"sinks": (np.random.default_rng(7).standard_normal(hq) + math.log(case["S"])).astype(np.float32)}
    if feature == "alibi":
        return {"alibi_slopes": (2.0 ** (-8.0 * np.arange(1, hq + 1) / hq)).astype(np.float32)}
    return {}


def _like(value, x):
    """A feature's host value where ``x`` lives (a torch tensor's device), as users pass it."""
    if not isinstance(value, np.ndarray) or isinstance(x, np.ndarray):
        return value
    return torch_or_none().from_numpy(value).to(x.device)


def _case_mask(case: dict, x):
    """The key-padding mask of a ``pack='mask'`` case, boolean ``[B, 1, 1, Sk]``, where ``x`` lives."""
    return _like(_inputs.padding_mask(case["lengths"], case.get("Sk", case["S"])), x)


# aule's backends that take NumPy arrays, so their rows get the case's values as NumPy arrays.
_HOST_BACKENDS = ("numpy", "vulkan")


class AuleDense(Contender):
    """``aule.flash_attention(..., backend=...)``: host backends (numpy, vulkan, auto on a CPU) on
    NumPy arrays holding the case's values, Triton on the torch tensors. ``expand_kv`` repeats K/V
    to every query head outside the timed region. ``feature`` adds one of the features suite's
    ('softcap', 'sinks', 'alibi': see :func:`feature_values`, passed on the inputs' device as a
    user would; 'padding': the case's key-padding mask as ``attn_mask``, on padded cases only).
    ``env``: settings held around every timed call (a route turned off, say)."""

    impl = "aule"

    def __init__(self, backend=None, *, expand_kv=False, full_causal=False, feature=None, env=None):
        super().__init__(backend, full_causal=full_causal)
        self.expand_kv = expand_kv
        self.feature = feature
        self.env = env

    def applies(self, case):
        return case.get("pack") == "mask" if self.feature == "padding" else super().applies(case)

    def prepare(self, case, inp):
        import aule

        causal, window = self.visibility(case)
        sync, clock = _device_clock(case)
        backend = self.backend
        # aule's host backends get NumPy arrays (their natural input) holding the same values.
        host = backend in _HOST_BACKENDS or (backend is None and resolve_device(case) == "cpu")
        if host and inp.backward:
            raise Skip("NumPy arrays carry no gradients")
        sets = inp.host_sets() if host else inp.sets
        if host:
            clock, sync = "host", None
        kv = [(s["k"], s["v"]) for s in sets]
        if self.expand_kv:
            g = case["Hq"] // case["Hkv"]

            def expand(x):
                if isinstance(x, np.ndarray):
                    return np.repeat(x, g, axis=1)
                return x.detach().repeat_interleave(g, dim=1).requires_grad_(inp.backward)

            kv = [(expand(k), expand(v)) for k, v in kv]
        values = feature_values(case, self.feature)
        extra = {n: _like(x, sets[0]["q"]) for n, x in values.items()}
        if self.feature == "padding":
            extra["attn_mask"] = _case_mask(case, sets[0]["q"])

        def fwd(i):
            return aule.flash_attention(sets[i]["q"], kv[i][0], kv[i][1], causal=causal, window_size=window,
                                        backend=backend, **extra)

        common = dict(causal=causal, window=window, variant=self.variant(case), sync=sync, clock=clock,
                      features=values, context=(lambda: _environ(self.env)) if self.env else None)
        if not inp.backward:
            return Bound(fwd, len(sets), **common)
        leaves = inp.leaves() + [t for pair in kv for t in pair if t.requires_grad]

        def fwd_bwd(i):
            out = fwd(i)
            if not out.requires_grad:
                raise Skip(f"backend {backend or 'auto'} returned no gradient path (forward only)")
            out.backward(sets[i]["do"])
            return out, kv[i]

        return Bound(fwd_bwd, len(sets), grad_to_none=leaves, **common)


def fp8_quantised(x, heads_kv: int):
    """``x [B, H, S, D]`` (values on the e4m3 grid: a case's ``fp8_grid`` inputs) as float8_e4m3fn
    and its descale, float32 ``[B, heads_kv]`` (flash-attn 3's form; a query head shares its KV
    head's): per (batch, KV head) the power of two that brings the largest magnitude closest under
    e4m3's 448, as a quantiser scaling amax to the format's range would pick, but exact, so the
    dequantised tensor is ``x`` itself."""
    torch = torch_or_none()
    b, h = x.shape[:2]
    amax = x.detach().float().abs().reshape(b, heads_kv, -1).amax(-1).clamp_min(2.0 ** -100)
    descale = torch.exp2(torch.floor(torch.log2(amax / 448.0)) + 1)
    per_head = descale.repeat_interleave(h // heads_kv, dim=1)[:, :, None, None]
    return (x.detach().float() / per_head).to(torch.float8_e4m3fn), descale.contiguous()


class AuleFp8(Contender):
    """``aule.flash_attention`` on float8_e4m3fn q, k, v with per-head ``q_descale``, ``k_descale``,
    ``v_descale`` (issue 16's FP8 forward), bfloat16 out. Quantised once per input set outside the
    timed region, exactly (:func:`fp8_quantised`, on ``fp8_grid`` cases); what the call does with
    V for Hopper's fp8 products (a keys-contiguous copy) is inside it, counted."""

    impl = "aule"

    def why_skip(self, case):
        if case.get("mode") != "fwd":
            return "FP8 is forward only"
        if not case.get("fp8_grid"):
            return "needs a case whose values float8 holds exactly (fp8_grid)"
        return None

    def prepare(self, case, inp):
        import aule

        causal, window = self.visibility(case)
        sync, clock = _device_clock(case)
        sets = []
        for s in inp.sets:
            (q, qd), (k, kd), (v, vd) = (fp8_quantised(s[n], case["Hkv"]) for n in ("q", "k", "v"))
            sets.append((q, k, v, dict(q_descale=qd, k_descale=kd, v_descale=vd)))

        def fwd(i):
            q, k, v, descales = sets[i]
            return aule.flash_attention(q, k, v, causal=causal, window_size=window, backend=self.backend, **descales)

        return Bound(fwd, len(sets), causal=causal, window=window, variant=self.variant(case), sync=sync,
                     clock=clock, precision="float8_e4m3fn")


@contextlib.contextmanager
def _environ(values: dict):
    """Set environment variables for the duration (the Vulkan backend reads its forced variant and
    tiles from them on every call), a value of None unsetting one; restore what was there before."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _recordings(on: bool):
    """Re-submitted recordings on or off for the duration (the context reads AULE_VULKAN_REUSE once,
    when it is made); the recordings kept so far are dropped either way."""
    from ..backends.vulkan import runtime

    ctx = runtime.context()
    was = ctx.reuse
    ctx.reuse = on
    ctx.forget_recordings()
    try:
        yield
    finally:
        ctx.reuse = was


class AuleVulkanResident(Contender):
    """Vulkan on GpuTensors uploaded once, outside the timed region. The call goes through the
    public API (its wall time is the per-call cost a user sees); the GPU time of the dispatches
    comes from ``aule.backends.vulkan.attention(..., timestamps=True)``. With ``variant`` (and
    ``tiles``) the shader is forced through AULE_VULKAN_VARIANT / AULE_VULKAN_TILES, on cases of
    ``dtype`` only: the variant sweep. ``reuse=False``: every call recorded anew, as with
    AULE_VULKAN_REUSE=0 (the per-call cost without re-submitted recordings)."""

    impl = "resident"

    def __init__(self, variant=None, tiles=None, dtype=None, *, padding=False, reuse=True):
        super().__init__("vulkan")
        self.forced, self.tiles, self.dtype = variant, tiles, dtype
        self.padding = padding  # the case's key-padding mask as attn_mask
        self.reuse = reuse

    def applies(self, case):
        return case.get("pack") == "mask" if self.padding else super().applies(case)

    def why_skip(self, case):
        if self.dtype and case["dtype"] != self.dtype:
            return f"variant {self.forced} is measured on {self.dtype} inputs"
        return None

    def variant(self, case):
        if self.forced:
            return self.forced + (f" tiles {self.tiles}" if self.tiles else "")
        return super().variant(case)

    def prepare(self, case, inp):
        import aule

        try:
            from ..backends.vulkan import attention as vk_attention
            from ..backends.vulkan import repeated_attention, to_gpu
        except ImportError as exc:
            raise Skip(f"aule's Vulkan GpuTensor API is missing: {exc}") from None
        if inp.backward:
            raise Skip("GpuTensors carry no gradients")
        causal, window = self.visibility(case)
        if self.padding:
            _need_vulkan_gpu()
        extra = {"attn_mask": _inputs.padding_mask(case["lengths"], case.get("Sk", case["S"]))} if self.padding else {}
        gsets = [{n: to_gpu(s[n]) for n in ("q", "k", "v")} for s in inp.host_sets()]
        # With a mask the variant is not the plain call's (selection passes over those without it).
        chosen = vulkan_variant(*(gsets[0][n] for n in ("q", "k", "v")), causal, window, **extra) if extra else None

        def call(i):
            s = gsets[i]
            return aule.flash_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window,
                                        backend="vulkan", **extra)

        def device_ms(i):
            s = gsets[i]
            if extra:
                ns = vulkan_gpu_ns(s["q"], s["k"], s["v"], causal, window, **extra)
            else:
                out, _, ns = vk_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window, timestamps=True)
                out.free()
            return None if ns is None else ns / 1e6

        def device_batch(i, n):
            s = gsets[i]
            return repeated_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window, repeat=n, **extra)

        def cleanup():
            for s in gsets:
                for t in s.values():
                    t.free()

        context = None
        if self.forced:
            env = {"AULE_VULKAN_VARIANT": self.forced, "AULE_VULKAN_TILES": self.tiles or ""}
            context = lambda: _environ(env)  # noqa: E731
        elif not self.reuse:
            context = lambda: _recordings(False)  # noqa: E731
        # Calls on GpuTensors return before the device has run them: a round of them ends with one
        # wait for everything submitted, as a round of CUDA launches ends with a synchronisation.
        from ..backends.vulkan import runtime

        return Bound(call, len(gsets), clock="device", sync=runtime.context().synchronize, device_ms=device_ms,
                     device_batch=device_batch, cleanup=cleanup, context=context, causal=causal, window=window,
                     variant=chosen or self.variant(case))


def vulkan_variant(q, k, v, causal, window, **features) -> str | None:
    """The shader variant Vulkan plans for this call (None when it plans none)."""
    from ..backends.vulkan import launch, runtime
    from ..call import canonicalize
    from ..errors import UnsupportedError

    try:
        return launch.attention_plan_for(canonicalize(q, k, v, causal, None, window, False, **features),
                                         runtime.context())[0].name
    except UnsupportedError:
        return None


def vulkan_gpu_ns(q, k, v, causal, window, **features):
    """GPU nanoseconds (Vulkan timestamps around the dispatches, uploads and read-backs outside
    them) of one Vulkan attention call with ``features`` (``flash_attention``'s keywords), which
    ``aule.backends.vulkan.attention`` does not take; its output is freed."""
    from ..call import canonicalize

    return _vulkan_call_ns(canonicalize(q, k, v, causal, None, window, False, **features))


def _vulkan_call_ns(call, op: str = "attention"):
    """GPU nanoseconds of one Vulkan ``op`` ("attention" or "varlen_attention", launch's function
    of the same name) on a validated call, timestamps around its one submission."""
    from .. import backends
    from ..backends.vulkan import launch, runtime

    why = backends.get("vulkan").why_not(op, call, True)
    if why:
        raise Skip(f"vulkan cannot serve {call.describe()}: {why}")
    out, _, ns = getattr(launch, op)(call, runtime.context(), timestamps=True)
    if hasattr(out, "free"):
        out.free()
    return ns


class _Summed:
    """Recorded work of several calls (one per sequence), each repeated back to back in a submission
    of its own: ``ms()`` submits each once and gives their GPU milliseconds per call, summed, which
    is what the calls take one after the other."""

    def __init__(self, works):
        self.works = works

    def ms(self) -> float | None:
        times = [w.ms() for w in self.works]
        return None if any(t is None for t in times) else sum(times)

    def close(self) -> None:
        for w in self.works:
            w.close()


def _host_out(x):
    """A result as NumPy when it is a GpuTensor (read back and freed), else as it is."""
    if type(x).__name__ != "GpuTensor":
        return x
    try:
        return x.numpy()
    finally:
        x.free()


class AuleUnpadded(Contender):
    """The visible work of a padded or packed case done unpadded: one plain
    ``aule.flash_attention`` per sequence on contiguous ``[1, H, n, D]`` copies of exactly what it
    sees (:class:`~aule.bench.inputs.PaddedInputs` and :class:`~aule.bench.inputs.VarlenInputs`
    pieces), the calls back to back and timed together, so its FLOP/s (visible pairs only) is
    plain attention's on the same problem. Triton on the torch tensors; Vulkan on NumPy arrays
    (wall clock, uploads included, with the dispatches' GPU time summed beside it) or, ``resident``,
    on GpuTensors (the GPU time, each call recorded back to back in a submission of its own and the
    per-call times summed, is the row's time; the wall time beside it).
    ``packs``: the kinds of case it has rows on. ``mask_variant`` (resident, padded cases): forced to the shader variant Vulkan selects for the
    padded call, which may not be the plain call's (a variant that lacks masks is passed over), so
    the mask's own cost is read apart from the variant's."""

    impl = "unpadded"

    def __init__(self, backend, *, resident=False, mask_variant=False, packs=("mask", "varlen")):
        super().__init__(backend)
        self.resident = resident
        self.mask_variant = mask_variant
        self.packs = packs  # the kinds of case ('pack') it has rows on: those with a row to compare

    def applies(self, case):
        return "lengths" in case and case.get("pack") in self.packs

    def _padded_variant(self, case, inp):
        from ..backends.vulkan import to_gpu

        full = [to_gpu(inp.host_sets()[0][n]) for n in ("q", "k", "v")]
        try:
            mask = _inputs.padding_mask(case["lengths"], case.get("Sk", case["S"]))
            name = vulkan_variant(*full, *self.visibility(case), attn_mask=mask)
        finally:
            for x in full:
                x.free()
        if name is None:
            raise Skip("vulkan plans no variant for the padded call")
        return name

    def variant(self, case):
        return None

    def prepare(self, case, inp):
        import aule

        causal, window = self.visibility(case)
        vulkan = self.backend == "vulkan"
        if vulkan:
            _need_vulkan_gpu()
        host = self.backend in _HOST_BACKENDS
        pieces = [inp.pieces(i, host=host) for i in range(len(inp.sets))]
        context = None
        if self.mask_variant:
            env = {"AULE_VULKAN_VARIANT": self._padded_variant(case, inp), "AULE_VULKAN_TILES": ""}
            context = lambda: _environ(env)  # noqa: E731
        owned = []
        if self.resident:
            from ..backends.vulkan import to_gpu

            pieces = [[tuple(to_gpu(x) for x in qkv) for qkv in ps] for ps in pieces]
            owned = [x for ps in pieces for qkv in ps for x in qkv]
        backend = self.backend

        def call(i):
            return [aule.flash_attention(q, k, v, causal=causal, window_size=window, backend=backend)
                    for q, k, v in pieces[i]]

        def checked(i):
            return inp.assemble([_host_out(o) for o in call(i)])

        def device_ms(i):
            ns = [vulkan_gpu_ns(q, k, v, causal, window) for q, k, v in pieces[i]]
            return None if any(n is None for n in ns) else sum(ns) / 1e6

        def device_batch(i, n):
            from ..backends.vulkan import repeated_attention

            work = _Summed([])
            try:
                for q, k, v in pieces[i]:
                    work.works.append(repeated_attention(q, k, v, causal=causal, window_size=window, repeat=n))
            except BaseException:
                work.close()
                raise
            return work

        def cleanup():
            for x in owned:
                x.free()

        if vulkan:
            with (context or contextlib.nullcontext)():
                chosen = vulkan_variant(*pieces[0][0], causal, window)
            return Bound(call, len(pieces), clock="device" if self.resident else "host", device_ms=device_ms,
                         device_batch=device_batch if self.resident else None, checked=checked, cleanup=cleanup,
                         causal=causal, window=window, variant=chosen, context=context,
                         note="each sequence's calls in a submission of their own, GPU times summed"
                         if self.resident else None)
        sync, clock = (None, "host") if host else _device_clock(case)
        return Bound(call, len(pieces), sync=sync, clock=clock, checked=checked, causal=causal, window=window)


class AuleVarlen(Contender):
    """``aule.flash_attention_varlen`` on a packed case: Triton on the CUDA tensors (cu_seqlens an
    int32 tensor on the device, as flash-attn's callers pass it), Vulkan on NumPy arrays, which is
    what it takes: wall clock, uploads and read-backs included, with the GPU time of its one
    submission (Vulkan timestamps around every sequence's dispatches) beside it."""

    impl = "varlen"

    def applies(self, case):
        return case.get("pack") == "varlen"

    def variant(self, case):
        return None

    def prepare(self, case, inp):
        import aule

        causal, window = self.visibility(case)
        vulkan = self.backend == "vulkan"
        if vulkan:
            _need_vulkan_gpu()
        host = self.backend in _HOST_BACKENDS
        sets = inp.host_sets() if host else inp.sets
        longest = max(case["lengths"])
        backend = self.backend

        def call(i):
            s = sets[i]
            return aule.flash_attention_varlen(s["q"], s["k"], s["v"], s["cu_seqlens"], s["cu_seqlens"], longest,
                                               longest, causal=causal, window_size=window, backend=backend)

        if not vulkan:
            sync, clock = (None, "host") if host else _device_clock(case)
            return Bound(call, len(sets), sync=sync, clock=clock, causal=causal, window=window)
        from ..call import canonicalize_varlen

        calls = [canonicalize_varlen(s["q"], s["k"], s["v"], s["cu_seqlens"], s["cu_seqlens"], longest, longest,
                                     causal, window) for s in sets]

        def device_ms(i):
            ns = _vulkan_call_ns(calls[i], "varlen_attention")
            return None if ns is None else ns / 1e6

        first = calls[0].sequence(0)
        return Bound(call, len(sets), clock="host", device_ms=device_ms, causal=causal, window=window,
                     variant=vulkan_variant(first.q, first.k, first.v, causal, window))


def _sdpa_context(name):
    if name is None:
        return contextlib.nullcontext
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name, None)
    if backend is None:
        raise Skip(f"this torch has no SDPBackend.{name}")
    return lambda: sdpa_kernel([backend])


class Sdpa(Contender):
    """``torch.nn.functional.scaled_dot_product_attention`` under ``sdpa_kernel(<sdpa>)`` (None:
    torch's own choice); on decode cases over the contiguous cache. ``explicit_mask`` passes the
    case's visibility as a boolean mask (SDPA has no window); ``max_scores`` skips problems whose
    B*Hq*Sq*Sk exceeds it (backends that materialise the scores). Causal cases with Sq != Sk
    (chunked prefill) get aule's bottom-right causal as a boolean mask: SDPA's ``is_causal`` is
    top-left there; a backend that takes no mask (flash) declines and its row says so.
    ``installed`` makes the same call with aule installed as SDPA (``aule.installed()``), as a
    model calls it: the guarantee suite compares that with torch's own SDPA on the same inputs."""

    impl = "sdpa"
    serves = ("dense", "decode")
    # The words torch's warnings use for each backend, to keep the one saying why it declined.
    WARNING_WORDS = {"FLASH_ATTENTION": "flash attention", "CUDNN_ATTENTION": "cudnn",
                     "EFFICIENT_ATTENTION": "memory efficient"}

    def __init__(self, sdpa=None, *, full_causal=False, explicit_mask=False, max_scores=None, installed=False):
        super().__init__(sdpa, full_causal=full_causal)
        self.explicit_mask, self.max_scores, self.installed = explicit_mask, max_scores, installed

    def _context(self):
        if not self.installed:
            return _sdpa_context(self.backend)
        import aule

        return aule.installed

    def unavailable(self):
        return "torch is not installed" if torch_or_none() is None else None

    def variant(self, case):
        return None

    def why_skip(self, case):
        if "ctx" in case:
            if (self.backend == "MATH" and case["Hq"] != case["Hkv"]
                    and case["B"] * case["Hq"] * case["ctx"] > 2**24):
                # math's enable_gqa repeats K/V to every query head: B*Hq*ctx*D elements twice over
                return "B*Hq*ctx above 2^24: the math path repeats K/V per query head"
            return None
        limit = self.max_scores
        if limit and case["B"] * case["Hq"] * case["S"] * case.get("Sk", case["S"]) > limit:
            return f"B*H*Sq*Sk above {limit:.3g}: this path materialises the scores"
        return None

    def prepare(self, case, inp):
        import torch.nn.functional as F

        sync, clock = _device_clock(case)
        gqa = {"enable_gqa": True} if case["Hq"] != case["Hkv"] else {}
        sets = inp.sets
        if isinstance(inp, DecodeInputs):
            def call(i):
                s = sets[i]
                # One query row at the end of the context sees every key: SDPA without a mask.
                return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], **gqa)

            return Bound(call, len(sets), context=self._context(), sync=sync, clock=clock,
                         graphable=not self.installed)
        causal, window = self.visibility(case)
        sq, sk = case["S"], case.get("Sk", case["S"])
        kwargs = {"is_causal": causal, "attn_mask": None, **gqa}
        if window not in (-1, None) and not self.explicit_mask:
            raise Skip("SDPA has no sliding window")
        if self.explicit_mask or (causal and sq != sk):
            import torch

            from .. import masks

            left, right = masks.canonical_window(causal, window)
            kwargs["attn_mask"] = torch.from_numpy(masks.mask(sq, sk, left, right)).to(sets[0]["q"].device)
            kwargs["is_causal"] = False

        def call(i):
            s = sets[i]
            return F.scaled_dot_product_attention(s["q"], s["k"], s["v"], **kwargs)

        if inp.backward:
            forward = call

            def call(i):
                out = forward(i)
                out.backward(sets[i]["do"])
                return out, (sets[i]["k"], sets[i]["v"])

        return Bound(call, len(sets), context=self._context(), grad_to_none=inp.leaves(),
                     causal=causal, window=window, sync=sync, clock=clock)


class AulePaged(Contender):
    """``aule.flash_attention_paged``: the public call, which validates the tables every call.
    ``graph``: the same call with ``max_context_len`` (so nothing is read back from the device),
    captured in a CUDA graph after a warm-up on a side stream and timed as ``graph.replay()``
    (CUDA events; the suite must time graphs), as a serving loop that replays decode steps runs it."""

    impl = "paged"
    serves = ("decode",)

    def __init__(self, backend=None, *, graph=False):
        super().__init__(backend)
        self.graph = graph

    def unavailable(self):
        import aule

        why = super().unavailable()
        if why is None and not hasattr(aule, "flash_attention_paged"):
            why = "aule.flash_attention_paged is not in this build of aule"
        return why

    def prepare(self, case, inp):
        import aule

        sets = inp.sets
        sync, clock = _device_clock(case)
        backend = self.backend
        if self.graph and clock != "cuda":
            raise Skip("a CUDA graph needs CUDA tensors")
        extra = {"max_context_len": case["ctx"]} if self.graph else {}

        def call(i):
            s = sets[i]
            return aule.flash_attention_paged(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                              s["context_lens"], backend=backend, **extra)

        return Bound(call, len(sets), variant=self.variant(case), sync=sync, clock=clock,
                     graphable=self.graph, graph_required=self.graph)


class AulePagedLauncher(Contender):
    """``aule.backends.triton.paged.paged_attention_triton``: what a serving loop launches (and
    captures in a CUDA graph) after validating its tables once: its kernel skips the in-kernel
    bounds checks and the error flag that the public call pays for. ``tune`` replaces part of the automatic
    configuration: ``(block_n, warps, stages)`` or ``("splits", factor)`` (factor 0: no split)."""

    impl = "paged_launcher"
    serves = ("decode",)

    def __init__(self, tune=None):
        super().__init__("triton")
        self.tune = tune

    def _config(self, case, tp):
        auto = tp.choose_config(case["B"], case["Hkv"], case["Hq"] // case["Hkv"], 1, case["D"], case["ctx"], 0)
        if self.tune is None:
            return None
        bm, bn, warps, stages, splits, m_tiles = auto
        if self.tune[0] == "splits":
            f = self.tune[1]
            splits = 1 if f == 0 else max(1, min(tp.MAX_SPLITS, int(splits * f)))
        else:
            bn, warps, stages = self.tune
        cfg = (bm, bn, warps, stages, splits, m_tiles)
        if cfg == tuple(auto):
            raise Skip(f"the automatic configuration {tuple(auto)} already")
        return cfg

    def variant(self, case):
        return None

    def prepare(self, case, inp):
        sync, clock = _device_clock(case)
        if sync is None:
            raise Skip("the Triton launcher needs CUDA tensors")
        try:
            from ..backends.triton import paged as tp
        except ImportError as exc:
            raise Skip(f"no Triton paged launcher: {exc}") from None
        sets = inp.sets
        scale = 1.0 / math.sqrt(case["D"])
        cfg = self._config(case, tp)
        extra = {"config": cfg} if cfg is not None else {}

        def call(i):
            s = sets[i]
            return tp.paged_attention_triton(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                             s["context_lens"], scale, -1, case["ctx"], **extra)

        return Bound(call, len(sets), sync=sync, clock="cuda", graphable=True,
                     variant=None if cfg is None else "config " + ",".join(map(str, cfg)))


class AulePagedVulkanResident(Contender):
    """Vulkan paged decode with the KV cache as GpuTensors (uploaded once): the public call for
    the check and the wall time, Vulkan timestamps of the attention and merge dispatches for the
    GPU time, the call recorded back to back in one submission (clocks of sustained work)."""

    impl = "paged_resident"
    serves = ("decode",)

    def __init__(self):
        super().__init__("vulkan")

    def variant(self, case):
        return None

    def prepare(self, case, inp):
        import aule

        _need_vulkan_gpu()
        try:
            from ..backends.vulkan import paged_attention as vk_paged
            from ..backends.vulkan import repeated_paged_attention, to_gpu
        except ImportError as exc:
            raise Skip(f"aule's Vulkan paged path is missing: {exc}") from None
        names = ("q", "k_cache", "v_cache", "block_tables", "context_lens")
        resident = ("k_cache", "v_cache")
        # paged=True: a cache past one device buffer (B64 ctx32k on the H200) is split across several.
        hsets = [{n: (to_gpu(s[n].cpu().numpy(), paged=True) if n in resident else np.asarray(s[n].cpu().numpy()))
                  for n in names} for s in inp.sets]

        def call(i):
            return aule.flash_attention_paged(*(hsets[i][n] for n in names), backend="vulkan")

        def device_ms(i):
            _, ns = vk_paged(*(hsets[i][n] for n in names), timestamps=True)
            return None if ns is None else ns / 1e6

        def device_batch(i, n):
            return repeated_paged_attention(*(hsets[i][m] for m in names), repeat=n)

        def cleanup():
            for h in hsets:
                for n in resident:
                    h[n].free()

        return Bound(call, len(hsets), clock="device", device_ms=device_ms, device_batch=device_batch,
                     cleanup=cleanup)


def _registry(**named):
    for name, c in named.items():
        c.name = name
    return named


# The decode tuning sweep: tile shapes and split counts around the automatic choice.
TUNE_TILES = ((32, 4, 3), (64, 4, 2), (32, 2, 4), (32, 8, 4))
TUNE_SPLITS = ((0.5, "splits x0.5"), (2, "splits x2"), (0, "splits 1"))
# The Vulkan variant sweep: each variant on the input dtype it computes, tiled ones at several tiles.
VULKAN_VARIANTS = (("cpu", "float32"), ("baseline", "float32"), ("fast", "float32"), ("fp16", "float16"),
                   ("fp16_io", "float16"), ("coopmat", "float16"))
VULKAN_TILES = ("64,32,256,16", "32,32,128,16", "64,64,128,8")
VULKAN_TILED = ("fast", "fp16", "fp16_io")

CONTENDERS = _registry(**{
    "aule:triton": AuleDense("triton"),
    "aule:triton-amd": AuleDense("triton-amd"),
    "aule:vulkan": AuleDense("vulkan"),
    "aule:numpy": AuleDense("numpy"),
    "aule:vulkan resident": AuleVulkanResident(),
    "aule:vulkan resident, recorded anew": AuleVulkanResident(reuse=False),
    "aule:auto": AuleDense(None),
    "aule:triton kv-expanded": AuleDense("triton", expand_kv=True),
    # The Hopper forward's routes (hopper.DEFAULT_ROUTES) off: the general kernel on every row, so
    # that each route is checked against what it replaces where it was measured faster.
    "aule:triton general": AuleDense("triton", env={"AULE_TRITON_HOPPER": "0"}),
    "aule:triton full-causal": AuleDense("triton", full_causal=True),
    "aule:numpy full-causal": AuleDense("numpy", full_causal=True),
    "sdpa-flash": Sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": Sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": Sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": Sdpa("MATH", max_scores=2**30),
    "sdpa-flash full-causal": Sdpa("FLASH_ATTENTION", full_causal=True),
    "sdpa-efficient+mask": Sdpa("EFFICIENT_ATTENTION", explicit_mask=True, max_scores=32 * 8192 * 8192),
    "torch-sdpa": Sdpa(None),
    "torch-sdpa installed": Sdpa(None, installed=True),
    "torch-sdpa+mask": Sdpa(None, explicit_mask=True, max_scores=32 * 8192 * 8192),
    "torch-sdpa+mask installed": Sdpa(None, explicit_mask=True, max_scores=32 * 8192 * 8192, installed=True),
    "aule:triton fp8": AuleFp8("triton"),
    "aule:triton softcap": AuleDense("triton", feature="softcap"),
    "aule:triton sinks": AuleDense("triton", feature="sinks"),
    "aule:triton alibi": AuleDense("triton", feature="alibi"),
    "aule:triton padded": AuleDense("triton", feature="padding"),
    "aule:triton unpadded": AuleUnpadded("triton"),
    "aule:triton varlen": AuleVarlen("triton"),
    "aule:vulkan resident padded": AuleVulkanResident(padding=True),
    "aule:vulkan resident unpadded": AuleUnpadded("vulkan", resident=True, packs=("mask",)),
    "aule:vulkan resident unpadded, mask's variant": AuleUnpadded("vulkan", resident=True, mask_variant=True,
                                                                  packs=("mask",)),
    "aule:vulkan varlen": AuleVarlen("vulkan"),
    "aule:vulkan unpadded": AuleUnpadded("vulkan", packs=("varlen",)),
    "aule-paged:triton": AulePaged("triton"),
    "aule-paged:triton graph": AulePaged("triton", graph=True),
    "aule-paged:vulkan": AulePaged("vulkan"),
    "aule-paged:auto": AulePaged(None),
    "aule-paged:triton launcher": AulePagedLauncher(),
    "aule-paged:vulkan resident": AulePagedVulkanResident(),
    "hf:sdpa default": HfModel("default"),
    "hf:sdpa default again": HfModel("default"),  # the drift between identical runs
    "hf:sdpa-flash": HfModel("FLASH_ATTENTION"),
    "hf:aule installed": HfModel(None),
    "hf:sdpa-flash again": HfModel("FLASH_ATTENTION"),  # the drift between identical runs
    **{"aule-paged:triton launcher n{}w{}s{}".format(*t): AulePagedLauncher(t) for t in TUNE_TILES},
    **{f"aule-paged:triton launcher {label}": AulePagedLauncher(("splits", f)) for f, label in TUNE_SPLITS},
    **{f"aule:vulkan {v}": AuleVulkanResident(v, dtype=dt) for v, dt in VULKAN_VARIANTS},
    **{f"aule:vulkan {v} {t}": AuleVulkanResident(v, t, dtype=dt)
       for v, dt in VULKAN_VARIANTS if v in VULKAN_TILED for t in VULKAN_TILES},
})

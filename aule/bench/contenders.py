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


def _device_clock(case):
    """(sync, clock) for torch inputs of ``case``: CUDA events on a GPU, the wall clock on a CPU."""
    if resolve_device(case) == "cuda":
        return torch_or_none().cuda.synchronize, "cuda"
    return None, "host"


class AuleDense(Contender):
    """``aule.flash_attention(..., backend=...)``: host backends (numpy, vulkan, auto on a CPU) on
    NumPy arrays holding the case's values, Triton on the torch tensors. ``expand_kv`` repeats K/V
    to every query head outside the timed region."""

    impl = "aule"

    def __init__(self, backend=None, *, expand_kv=False, full_causal=False):
        super().__init__(backend, full_causal=full_causal)
        self.expand_kv = expand_kv

    def prepare(self, case, inp):
        import aule

        causal, window = self.visibility(case)
        sync, clock = _device_clock(case)
        backend = self.backend
        # aule's host backends get NumPy arrays (their natural input) holding the same values.
        host = backend in ("numpy", "vulkan") or (backend is None and resolve_device(case) == "cpu")
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

        def fwd(i):
            return aule.flash_attention(sets[i]["q"], kv[i][0], kv[i][1], causal=causal, window_size=window,
                                        backend=backend)

        common = dict(causal=causal, window=window, variant=self.variant(case), sync=sync, clock=clock)
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


@contextlib.contextmanager
def _environ(values: dict):
    """Set environment variables for the duration (the Vulkan backend reads its forced variant and
    tiles from them on every call); restore what was there before."""
    old = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            os.environ[k] = v
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class AuleVulkanResident(Contender):
    """Vulkan on GpuTensors uploaded once, outside the timed region. The call goes through the
    public API (its wall time is the per-call cost a user sees); the GPU time of the dispatches
    comes from ``aule.backends.vulkan.attention(..., timestamps=True)``. With ``variant`` (and
    ``tiles``) the shader is forced through AULE_VULKAN_VARIANT / AULE_VULKAN_TILES, on cases of
    ``dtype`` only: the variant sweep."""

    impl = "resident"

    def __init__(self, variant=None, tiles=None, dtype=None):
        super().__init__("vulkan")
        self.forced, self.tiles, self.dtype = variant, tiles, dtype

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
        gsets = [{n: to_gpu(s[n]) for n in ("q", "k", "v")} for s in inp.host_sets()]

        def call(i):
            s = gsets[i]
            return aule.flash_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window,
                                        backend="vulkan")

        def device_ms(i):
            s = gsets[i]
            out, _, ns = vk_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window, timestamps=True)
            out.free()
            return None if ns is None else ns / 1e6

        def device_batch(i, n):
            s = gsets[i]
            return repeated_attention(s["q"], s["k"], s["v"], causal=causal, window_size=window, repeat=n)

        def cleanup():
            for s in gsets:
                for t in s.values():
                    t.free()

        context = None
        if self.forced:
            env = {"AULE_VULKAN_VARIANT": self.forced, "AULE_VULKAN_TILES": self.tiles or ""}
            context = lambda: _environ(env)  # noqa: E731
        return Bound(call, len(gsets), clock="device", device_ms=device_ms, device_batch=device_batch, cleanup=cleanup,
                     context=context, causal=causal, window=window, variant=self.variant(case))


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
    top-left there; a backend that takes no mask (flash) declines and its row says so."""

    impl = "sdpa"
    serves = ("dense", "decode")
    # The words torch's warnings use for each backend, to keep the one saying why it declined.
    WARNING_WORDS = {"FLASH_ATTENTION": "flash attention", "CUDNN_ATTENTION": "cudnn",
                     "EFFICIENT_ATTENTION": "memory efficient"}

    def __init__(self, sdpa=None, *, full_causal=False, explicit_mask=False, max_scores=None):
        super().__init__(sdpa, full_causal=full_causal)
        self.explicit_mask, self.max_scores = explicit_mask, max_scores

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

            return Bound(call, len(sets), context=_sdpa_context(self.backend), sync=sync, clock=clock,
                         graphable=True)
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

        return Bound(call, len(sets), context=_sdpa_context(self.backend), grad_to_none=inp.leaves(),
                     causal=causal, window=window, sync=sync, clock=clock)


class AulePaged(Contender):
    """``aule.flash_attention_paged``: the public call, which validates the tables every call."""

    impl = "paged"
    serves = ("decode",)

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

        def call(i):
            s = sets[i]
            return aule.flash_attention_paged(s["q"], s["k_cache"], s["v_cache"], s["block_tables"],
                                              s["context_lens"], backend=backend)

        return Bound(call, len(sets), variant=self.variant(case), sync=sync, clock=clock)


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
    GPU time."""

    impl = "paged_resident"
    serves = ("decode",)

    def __init__(self):
        super().__init__("vulkan")

    def variant(self, case):
        return None

    def prepare(self, case, inp):
        import aule

        why = _inputs.vulkan_gpu_missing()
        if why:
            raise Skip(why)
        try:
            from ..backends.vulkan import paged_attention as vk_paged
            from ..backends.vulkan import to_gpu
        except ImportError as exc:
            raise Skip(f"aule's Vulkan paged path is missing: {exc}") from None
        names = ("q", "k_cache", "v_cache", "block_tables", "context_lens")
        resident = ("k_cache", "v_cache")
        hsets = [{n: (to_gpu if n in resident else np.asarray)(s[n].cpu().numpy()) for n in names}
                 for s in inp.sets]

        def call(i):
            return aule.flash_attention_paged(*(hsets[i][n] for n in names), backend="vulkan")

        def device_ms(i):
            _, ns = vk_paged(*(hsets[i][n] for n in names), timestamps=True)
            return None if ns is None else ns / 1e6

        def cleanup():
            for h in hsets:
                for n in resident:
                    h[n].free()

        return Bound(call, len(hsets), clock="device", device_ms=device_ms, cleanup=cleanup)


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
    "aule:auto": AuleDense(None),
    "aule:triton kv-expanded": AuleDense("triton", expand_kv=True),
    "aule:triton full-causal": AuleDense("triton", full_causal=True),
    "aule:numpy full-causal": AuleDense("numpy", full_causal=True),
    "sdpa-flash": Sdpa("FLASH_ATTENTION"),
    "sdpa-cudnn": Sdpa("CUDNN_ATTENTION"),
    "sdpa-efficient": Sdpa("EFFICIENT_ATTENTION"),
    "sdpa-math": Sdpa("MATH", max_scores=2**30),
    "sdpa-flash full-causal": Sdpa("FLASH_ATTENTION", full_causal=True),
    "sdpa-efficient+mask": Sdpa("EFFICIENT_ATTENTION", explicit_mask=True, max_scores=32 * 8192 * 8192),
    "torch-sdpa": Sdpa(None),
    "aule-paged:triton": AulePaged("triton"),
    "aule-paged:vulkan": AulePaged("vulkan"),
    "aule-paged:auto": AulePaged(None),
    "aule-paged:triton launcher": AulePagedLauncher(),
    "aule-paged:vulkan resident": AulePagedVulkanResident(),
    "hf:sdpa-flash": HfModel("FLASH_ATTENTION"),
    "hf:aule installed": HfModel(None),
    "hf:sdpa-flash again": HfModel("FLASH_ATTENTION"),  # the drift between identical runs
    **{"aule-paged:triton launcher n{}w{}s{}".format(*t): AulePagedLauncher(t) for t in TUNE_TILES},
    **{f"aule-paged:triton launcher {label}": AulePagedLauncher(("splits", f)) for f, label in TUNE_SPLITS},
    **{f"aule:vulkan {v}": AuleVulkanResident(v, dtype=dt) for v, dt in VULKAN_VARIANTS},
    **{f"aule:vulkan {v} {t}": AuleVulkanResident(v, t, dtype=dt)
       for v, dt in VULKAN_VARIANTS if v in VULKAN_TILED for t in VULKAN_TILES},
})

"""Launching the attention kernels, and the ``torch.library`` custom ops that make them autograd-
and ``torch.compile``-friendly.

``aule::triton_attention_fwd(q, k, v, scale, left, right, softcap, alibi, sinks, kspan, mask,
attn_mask) -> (out, lse)`` and ``aule::triton_attention_bwd(dout, q, k, v, out, lse, dlse, scale, left,
right, softcap, alibi, sinks, kspan, mask, attn_mask) -> (dq, dk, dv, dsinks)``
are real custom operators with fake (meta) implementations, and the forward op has its backward
registered through ``register_autograd``, so ``torch.compile`` traces calls without a graph break.
``attn_mask`` is an SDPA mask as a compiled graph holds it, analysed into ``kspan``/``mask`` when
the op runs (eager calls pass the kernel form, analysed once by ``aule.call``).
"""
from __future__ import annotations

import functools
import itertools
import logging
import operator
import threading
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import triton

from ... import fastcall, settings
from ...call import OnDevice, dtype_name
from ...errors import UnsupportedError
from . import configs as cfg
from . import flags, hopper, hopper_bwd, kernels
from .common import (LOG2E, autotuned, block_d, cdiv, device_arch, interpreting, next_pow2,  # noqa: F401
                     torch_gpu_flavour)

log = logging.getLogger("aule")

# FP8 input dtypes and the log2 of the factor P is scaled by before its cast to them (kernels.py:
# FP8): the largest power of two under the format's maximum, 448 (e4m3fn) and 240 (e4m3fnuz).
FP8_SHIFT = {torch.float8_e4m3fn: 8, torch.float8_e4m3fnuz: 7}

_KERNELS = {"fwd": kernels._attn_fwd, "dkdv": kernels._attn_bwd_dkdv, "dq": kernels._attn_bwd_dq}
# Shape buckets, head_dim, mask sides and features pick the tile; the autotuner adds the dtypes.
_TUNE_KEY = ["Q_BUCKET", "K_BUCKET", "HEAD_DIM", "HAS_LEFT", "HAS_RIGHT", "SOFTCAP", "HAS_ALIBI",
             "HAS_KSPAN", "MASK_KIND", "VARLEN", "TANH"]
# Sinks and the forms of ALiBi change only the forward kernel (the backward's LSE already holds
# the sinks, and it computes ALiBi exactly).
_KERNEL_KEY = {"fwd": ["HAS_SINKS", "ALIBI_MODE"], "dkdv": [], "dq": []}
_PRE_BLOCK_M = 64


_tuned_keys: list = []


@functools.lru_cache(maxsize=None)
def _tuned(kernel: str, target: str, dim_class: int, fp32: bool, fp8: bool = False):
    _tuned_keys.append((kernel, target, dim_class, fp32, fp8))
    return autotuned(_KERNELS[kernel], cfg.configs(target, kernel, dim_class, fp32, fp8),
                     _TUNE_KEY + _KERNEL_KEY[kernel], cfg.prune)


def tuned_choices() -> dict:
    """What the autotuner picked so far: ``{kernel/target/dim: {tuning key: config}}``."""
    out = {}
    for (kernel, target, dim, fp32, fp8), tuner in [(k, _tuned(*k)) for k in _tuned_keys]:
        name = f"{kernel}/{target}/d{dim}{'/fp32' if fp32 else ''}{'/fp8' if fp8 else ''}"
        out[name] = {str(key): str(c) for key, c in tuner.cache.items()}
    return out


def target_of(t: torch.Tensor) -> str:
    """'interpret' (CPU tensors under TRITON_INTERPRET=1), 'cuda', or the AMD arch ('gfx942')."""
    if t.device.type == "cpu":
        if not interpreting():
            raise RuntimeError("Triton kernels need a CUDA/ROCm tensor; CPU tensors run only under "
                               "TRITON_INTERPRET=1 (Triton's interpreter)")
        return "interpret"
    if torch_gpu_flavour() == "hip":
        return device_arch(t.device.index or 0)
    return "cuda"


def _fixed_config_index():
    """None to autotune; else the index of the configuration to use untimed
    (:func:`aule.settings.triton_config`: ``AULE_TRITON_AUTOTUNE=0``, ``AULE_TRITON_CONFIG=i``)."""
    return settings.triton_config()


# What a launch resolves to: the JIT function and the keyword arguments of its tile, by everything
# that decides them (the kernel, its target and configuration rule, a tile asked for, the
# compile-time arguments, the shape buckets and the dtypes of the tensors, which are what Triton's
# autotuner keys its own pick on). A repeated call finds its launch here instead of pruning the
# configurations again or passing through the autotuner's per-launch key computation.
_LAUNCHES: dict = {}
_TUNING = threading.Lock()
_TENSOR = torch.Tensor


def _tensor_dtypes(args: tuple) -> tuple:
    """The dtypes of a launch's tensor arguments: the kernels take their tensors first."""
    out = []
    for a in args:
        if type(a) is not _TENSOR and not isinstance(a, _TENSOR):  # the exact type first: isinstance is slow here
            break
        out.append(a.dtype)
    return tuple(out)


def _launch(kernel: str, grid, args: tuple, meta: dict, like: torch.Tensor, sizes, tile=None):
    """Run ``kernel`` with an explicit tile ``(BLOCK_M, BLOCK_N[, num_warps, num_stages])``, the
    interpreter's tile, or the autotuned choice for this target and shape (``sizes``: seq_q, seq_k,
    the longest sequence's for varlen). Returns what :func:`_direct_launch` returns when the launch
    went through a compiled kernel kept there, else None."""
    target = target_of(like)
    index = _fixed_config_index()
    buckets = (next_pow2(sizes[0]), next_pow2(sizes[1]))
    key = (kernel, target, index, tile, meta.key if type(meta) is _Meta else tuple(meta.items()), buckets,
           _tensor_dtypes(args))
    known = _LAUNCHES.get(key)
    if known is None:
        if len(_LAUNCHES) > 4096:
            _LAUNCHES.clear()
            fastcall.forget()  # a pick may be made anew, and the ready launches must follow it
        known = _first_launch(key, grid, args, meta, like)
        if known is None:  # launched by the autotuner, which has now made its pick
            return
    fn, tile_kwargs, fixed = known
    # A fixed tile sizes the grid here, as before; a tuned one lets Triton size it from the bound
    # arguments, as the autotuner did.
    sized = grid(tile_kwargs) if fixed else grid
    if target == "cuda" and settings.triton_direct():
        return _direct_launch(key, fn, grid, sized, args, meta, tile_kwargs)
    fn.run(*args, grid=sized, warmup=False, **meta, **tile_kwargs)
    return None


# AULE_TRITON_DIRECT (on unless 0): compiled kernels by launch key, the arguments' specialisation
# and the device, with the compile-time values that follow the arguments. JITFunction.run binds and
# specialises every argument on every launch, which for these kernels of some fifty arguments
# cost more host time than all of aule's own path (about 20 us a launch, measured on the CPU).
_DIRECT: dict = {}
_I32, _I64 = (-2 ** 31, 2 ** 31), (-2 ** 63, 2 ** 63)


def _specialization(args: tuple, tensors: int) -> tuple | None:
    """What Triton's NVIDIA backend specialises a launch on, for the arguments these kernels take
    (``tensors`` tensors, then ints and floats): each tensor's 16-byte alignment (its dtype is in
    the launch key), each int's being 1 (then a constant), a multiple of 16, and its width; floats
    are not specialised. None for any other argument: such a launch takes Triton's own path."""
    lo, hi = _I32
    out = [a.data_ptr() % 16 == 0 for a in args[:tensors]]
    out += [(1 if a == 1 else 2 if a % 16 == 0 else 3) if type(a) is int and lo <= a < hi else _rare(a)
            for a in args[tensors:]]
    return None if None in out else tuple(out)


def _rare(a):
    """:func:`_specialization` of a float, a wide int, a tensor past the leading ones, or anything
    else (None)."""
    t = type(a)
    if t is float:
        return 0
    if isinstance(a, _TENSOR):  # one after the scalars (FP8's descales, or their stand-ins)
        return (a.dtype, a.data_ptr() % 16 == 0)
    if t is int:
        return (2 if a % 16 == 0 else 3) + (4 if _I64[0] <= a < _I64[1] else 8)
    return None


def _current_device() -> int:
    """The device Triton compiles and launches for (its current device, as JITFunction.run reads it)."""
    return torch.cuda.current_device()


def _ready_device(q):
    """Where a ready launch of a call on ``q`` would run (aule.fastcall): Triton's current device for
    a CUDA tensor on NVIDIA, whose launches alone go direct; None elsewhere (no ready launches)."""
    if not q.is_cuda or torch_gpu_flavour() != "cuda":
        return None
    return _current_device()


fastcall.set_launch_device(_ready_device)


def _direct_launch(key: tuple, fn, grid, sized, args: tuple, meta: dict, tile_kwargs: dict):
    """Launch through the compiled kernel an earlier launch of the same key, specialisation and
    device returned; the first such launch goes through ``fn.run`` and keeps what it returns.
    Triton's own settings (TRITON_DEBUG and the like) are those of that first launch. Returns
    ``(runner, params)``, the compiled kernel's launcher for this grid and every parameter it was
    given, when the kernel is kept (what :class:`Ready` repeats); else None."""
    spec = _specialization(args, len(key[-1]))
    known = None if spec is None else (key, spec, _current_device())
    hit = _DIRECT.get(known) if known is not None else None
    if hit is not None:
        compiled, tail = hit
        g = tuple(grid(tile_kwargs)) + (1, 1)
        runner, params = compiled[g[:3]], args + tail
        runner(*params)
        return runner, params
    compiled = fn.run(*args, grid=sized, warmup=False, **meta, **tile_kwargs)
    # The compiled kernel takes every parameter in order: the launch's arguments, then the
    # compile-time ones, whose values the key fixes.
    values = {**meta, **tile_kwargs}
    names = fn.arg_names[len(args):]
    if known is not None and compiled is not None and all(n in values for n in names):
        if len(_DIRECT) > 4096:
            _DIRECT.clear()
            fastcall.forget()
        tail = tuple(values[n] for n in names)
        _DIRECT[known] = (compiled, tail)
        return compiled[(tuple(grid(tile_kwargs)) + (1, 1))[:3]], args + tail
    return None


def launch_direct(name: str, fn, grid: tuple, args: tuple, meta: dict, like: torch.Tensor):
    """Launch ``fn`` on a fixed ``grid`` with ``args`` (tensors first) and compile-time ``meta``
    (``num_warps`` and ``num_stages`` included), for launchers that choose their own configuration
    (the paged kernels): on NVIDIA, unless ``AULE_TRITON_DIRECT=0``, through the compiled kernel
    as :func:`_direct_launch` keeps it, by ``name``, ``meta`` and the tensors' dtypes; elsewhere
    through ``JITFunction.run``. Returns what :func:`_direct_launch` returns, or None."""
    if target_of(like) == "cuda" and settings.triton_direct():
        key = (name, tuple(meta.items()), _tensor_dtypes(args))
        return _direct_launch(key, fn, lambda _: grid, grid, args, meta, {})
    fn[grid](*args, **meta)
    return None


_CONSTANTS = (int, float, bool, str, type(None))


class Ready:
    """Direct launches made ready to repeat (:mod:`aule.fastcall`): fresh tensors like the recorded
    call's (its outputs, then any scratch its kernels write), a fresh error-flag row when its
    kernels checked what they read (the row is per launch: it carries that launch's error), then
    each compiled kernel's launcher with its recorded parameters, the call's tensors and the fresh
    ones in their places. Holds no tensor of the recorded call. Calling it with the call's input
    tensors returns its outputs (a tuple), or None when a fresh tensor is not 16-byte aligned (the
    kernels were specialised for aligned ones: Triton's own path decides then)."""

    __slots__ = ("launches", "consts", "fresh", "outputs", "device", "flag_meta", "sync")

    def __init__(self, launches: tuple, consts: tuple, fresh: tuple, outputs: int, flag, device):
        self.launches, self.consts, self.outputs, self.device = launches, consts, outputs, device
        self.fresh = tuple((tuple(t.shape), t.dtype) for t in fresh)
        # The meta that words the flag's error depends only on what the key fixes (sizes, device):
        # one dict, shared by every row this entry takes.
        self.flag_meta = None if flag is None else flag.meta
        self.sync = settings.check_sync()  # AULE_CHECK_SYNC is in the entry's key

    def __call__(self, *inputs):
        device = self.device
        # Every fresh tensor is allocated per call, scratch included: one shared between calls
        # would be written by kernels on other streams (or replays of a graph that captured it)
        # after the allocator had handed a freed or regrown scratch's memory to another tensor;
        # keeping every scratch forever, or record_stream per call, costs what this allocation does.
        empty = torch.empty
        fresh = tuple([empty(shape, dtype=dtype, device=device) for shape, dtype in self.fresh])
        for t in fresh:
            if t.data_ptr() % 16:
                return None
        meta = self.flag_meta
        if meta is None:
            tensors = inputs + fresh + self.consts
            for runner, pick in self.launches:
                runner(*pick(tensors))
            return fresh[:self.outputs]
        errors = flags.error_flags()
        flag = errors.acquire(meta)
        try:
            tensors = inputs + fresh + (flag.err, flag.dirty) + self.consts
            for runner, pick in self.launches:
                runner(*pick(tensors))
        finally:
            errors.launched(flag, device, self.sync)
        return fresh[:self.outputs]


def offer_ready(launches, inputs: tuple, fresh: tuple, outputs: int, flag=None) -> None:
    """Offer the call being recorded (if any) a :class:`Ready` of ``launches``, each what
    :func:`_direct_launch` returned (``(runner, params)``, or None when it kept no compiled kernel):
    launches of ``inputs`` (the tensors the public call was given, unconverted) into ``fresh``
    (tensors allocated for the call, its ``outputs`` first), checked through ``flag`` (or None).
    Each parameter that is one of those tensors or the flag's (by identity) becomes its place, any
    other a constant. Nothing is offered when another tensor takes part (its values would be this
    call's alone) or a fresh tensor is not contiguous and 16-byte aligned, as the repeated launch
    allocates them."""
    rec = fastcall.recorder()
    if rec is None or not launches or None in launches:
        return
    tensors = inputs + fresh + ((flag.err, flag.dirty) if flag is not None else ())
    consts, picks = [], []
    for runner, params in launches:
        places = []
        for p in params:
            if isinstance(p, _TENSOR):
                place = next((i for i, t in enumerate(tensors) if p is t), None)
                if place is None:
                    return
                places.append(place)
            elif type(p) in _CONSTANTS:
                places.append(len(tensors) + len(consts))
                consts.append(p)
            else:
                return
        picks.append((runner, operator.itemgetter(*places)))
    if any(t._base is not None or t.storage_offset() or not t.is_contiguous() or t.data_ptr() % 16 for t in fresh):
        return
    fastcall.offer(rec, inputs, fresh[:outputs], Ready(tuple(picks), tuple(consts), fresh, outputs, flag,
                                                            inputs[0].device))


def _first_launch(key: tuple, grid, args: tuple, meta: dict, like: torch.Tensor):
    """The launch of ``key`` seen for the first time: ``(jit function, tile keyword arguments,
    whether the tile is fixed)``, remembered; or ``None`` once the autotuner has run the kernel
    itself, after which its pick is remembered."""
    kernel, target, index, tile, _, buckets, _ = key
    choice = (kernel, target, cfg.head_dim_class(meta["HEAD_DIM"]), like.dtype == torch.float32,
              like.dtype in FP8_SHIFT)
    if tile is None and target == "interpret":
        tile = cfg.INTERPRET_TILE
    if tile is None and index is not None:
        fits = cfg.prune(cfg.configs(choice[1], kernel, *choice[2:]),
                         {"Q_BUCKET": buckets[0], "K_BUCKET": buckets[1]})
        c = fits[index % len(fits)]
        tile = (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    if tile is not None:
        tile_kwargs = {"BLOCK_M": tile[0], "BLOCK_N": tile[1]}
        if target != "interpret":
            tile_kwargs.update(num_warps=tile[2] if len(tile) > 2 else 4,
                               num_stages=tile[3] if len(tile) > 3 else 2)
        known = _LAUNCHES[key] = (_KERNELS[kernel], tile_kwargs, True)
        return known
    tuner = _tuned(*choice)
    # The tuner's pick for this key is fixed once made: later launches pass its configuration
    # to the kernel directly. The lock keeps another thread's tuning from replacing
    # ``best_config`` between this launch and the read.
    with _TUNING:
        tuner[grid](*args, **meta)
        _LAUNCHES[key] = (_KERNELS[kernel], tuner.best_config.all_kwargs(), False)
    return None


def _dot_precision(q: torch.Tensor) -> str:
    return dot_precision(q.dtype, target_of(q))


def dot_precision(dtype, target: str) -> str:
    """The kernels' DOT_PREC. float32 inputs keep (near-)float32 products: one TF32 pass would cost
    ~3 decimal digits. On NVIDIA, three TF32 passes on the tensor cores (Triton's "ieee" float32
    dot spilled tens of kilobytes per thread on sm_90); AMD and the interpreter multiply in float32
    directly. For 16-bit and fp8 operands the setting is ignored, but it must still be one the
    target accepts: gfx950 refuses "tf32", so only NVIDIA is told it."""
    if dtype == torch.float32:
        return "tf32x3" if target == "cuda" else "ieee"
    return "tf32" if target == "cuda" else "ieee"


def _tanh_kind(q: torch.Tensor, softcap: float) -> int:
    """The kernels' TANH (kernels._tanh), the same for the forward and the backward so that the
    backward's recomputed probabilities are the forward's. ``auto``: on NVIDIA the one-instruction
    ``tanh.approx`` for 16-bit inputs, as FlashAttention-3 and FlashInfer cap scores (capped scores
    within ``softcap * 2^-10.99``: the LSE may move by that much, an output by that much times
    ``sum_j p_j |v_j - out|``), and the two-instruction ``rcp`` form for float32,
    whose tolerance ``tanh.approx`` would break; elsewhere (AMD, the interpreter, which runs no
    inline assembly) Triton's own ops. AULE_TRITON_TANH forces one where the target has it."""
    if softcap <= 0:
        return kernels.TANH_EXP2  # unused: one compiled variant for every call without a cap
    want = settings.triton_scores().tanh
    if target_of(q) != "cuda" or want == "exp2":
        return kernels.TANH_EXP2
    if want == "auto":
        want = "rcp" if q.dtype == torch.float32 else "approx"
    if want == "approx" and int(device_arch(q.device.index or 0)[2:] or 0) < 75:
        want = "rcp"  # tanh.approx.f32 needs sm_75
    return kernels.TANH_APPROX if want == "approx" else kernels.TANH_RCP


def _alibi_kind(alibi, right: int, dtype: torch.dtype) -> int:
    """The forward's ALIBI_MODE (kernels.ALIBI_SPLIT and its neighbours): the left form alone when
    no key right of a row is visible (``right == 0``: causal, and windows ending at the row),
    else the split at the diagonal. ``auto`` keeps the exact ``-slope * |i - j|`` per score for
    float32 inputs: the column forms hold scores up to ``slope * log2(e) * BLOCK_M`` above the true
    ones, whose float32 rounding (``slope * BLOCK_M * 2^-24`` relative in P) is far below what 16-bit
    inputs round P to, but not below float32's tolerance for every slope a caller may pass.
    AULE_TRITON_ALIBI=split or exact forces one."""
    want = settings.triton_scores().alibi
    if alibi is None or want == "exact" or (want == "auto" and dtype == torch.float32):
        return kernels.ALIBI_EXACT
    return kernels.ALIBI_LEFT if right == 0 else kernels.ALIBI_SPLIT


_METAS: dict = {}
_META_IDS = itertools.count()


class _Meta(dict):
    """A shared dict of compile-time arguments with ``key``, a number no other set of them has
    (never reused): the launch cache's key holds it instead of hashing every item on each call."""

    key: int


def _meta(q: torch.Tensor, left: int, right: int, softcap: float, alibi, kspan, mask, packing=None,
          flag=None, **more) -> dict:
    """The kernels' compile-time arguments (CHECK when an error ``flag`` is open, and ``more``, e.g.
    ``HAS_SINKS``), one shared dict per distinct set of them: the launch only reads it."""
    d = q.shape[-1]
    key = (d, left >= 0, right >= 0, softcap > 0, alibi is not None, kspan is not None, _mask_kind(mask),
           packing is not None, _dot_precision(q), flag is not None, _tanh_kind(q, softcap), tuple(more.items()))
    meta = _METAS.get(key)
    if meta is None:
        bd = block_d(d)
        meta = _Meta(HEAD_DIM=d, BLOCK_D=bd, PAD_D=bd != d, HAS_LEFT=key[1], HAS_RIGHT=key[2], DOT_PREC=key[8],
                     SOFTCAP=key[3], HAS_ALIBI=key[4], HAS_KSPAN=key[5], MASK_KIND=key[6], VARLEN=key[7],
                     CHECK=key[9], TANH=key[10], **more)
        meta.key = next(_META_IDS)
        if len(_METAS) > 1024:
            _METAS.clear()
        _METAS[key] = meta
    return meta


@dataclass(frozen=True)
class Packing:
    """Sequences packed along the rows of ``[1, H, total, D]`` views (flash-attn's ``[total, H, D]``
    seen heads first), as the varlen kernels read them: ``cu_q``/``cu_k`` int32 ``[batch + 1]`` on
    the tensors' device, and the longest sequence's lengths, which size the grid."""

    cu_q: torch.Tensor
    cu_k: torch.Tensor
    batch: int
    max_q: int
    max_k: int


def packing(cu_q: np.ndarray, cu_k: np.ndarray, device) -> Packing:
    """A :class:`Packing` of validated cumulative lengths (int64 NumPy, as aule.call.VarlenCall holds
    them): one upload of both as int32, queued from pinned memory on a GPU so the host never waits
    for the device; the lengths that size the grid come from the host copies."""
    n = len(cu_q)
    width = cdiv(n, 4) * 4  # each row 16-byte aligned: Triton specialises pointers by alignment
    host = torch.zeros((2, width), dtype=torch.int32)
    host[0, :n] = torch.from_numpy(cu_q.astype(np.int32))
    host[1, :n] = torch.from_numpy(cu_k.astype(np.int32))
    device = torch.device(device)
    placed = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    return Packing(placed[0, :n], placed[1, :n], n - 1, int(np.diff(cu_q).max(initial=0)),
                   int(np.diff(cu_k).max(initial=0)))


def _offsets(cu: torch.Tensor) -> torch.Tensor:
    """Offsets as the checking kernels read them: int32 or int64 as given (another width is widened,
    never narrowed: a wrapped value could pass the kernels' checks), unit stride."""
    if cu.dtype not in (torch.int32, torch.int64):
        cu = cu.to(torch.int64)
    return cu if cu.stride(0) == 1 else cu.contiguous()


def device_packing(cu_q: torch.Tensor, cu_k: torch.Tensor, max_q: int, max_k: int) -> Packing:
    """A :class:`Packing` of the caller's offsets left on the device, unread: the kernels check them
    (compiled with CHECK) and the caller's ``max_seqlen_q``/``max_seqlen_k`` size the grid, at least
    one tile, so that a sequence longer than a bound of 0 is still some program's to record."""
    return Packing(_offsets(cu_q), _offsets(cu_k), cu_q.shape[0] - 1, max(int(max_q), 1), max(int(max_k), 1))


def _sizes(sq: int, sk: int, packing) -> tuple[int, int]:
    """The query and key lengths one program's tiles cover: the call's, or the longest sequence's."""
    return (sq, sk) if packing is None else (packing.max_q, packing.max_k)


def _grid(rows: int, block: str, heads: int, b: int, packing):
    """One program per tile of ``rows`` (``block``: BLOCK_M or BLOCK_N) per (batch entry, head), or
    per (head, sequence) for varlen, ``rows`` then being the longest sequence's."""
    if packing is None:
        return lambda m: (cdiv(rows, m[block]), b * heads)
    return lambda m: (cdiv(rows, m[block]), heads, packing.batch)


def _cu(packing, stand_in) -> tuple:
    """The kernels' CU_Q and CU_K: the packing's, or stand-ins dense kernels never read."""
    return (stand_in, stand_in) if packing is None else (packing.cu_q, packing.cu_k)


def _alloc_rows(alloc, b: int, h: int, s: int, d: int, like: torch.Tensor, packing, dtype=None):
    """A ``[b, h, s, d]`` result of ``dtype`` (``like``'s by default): contiguous, or for varlen a
    ``[1, h, s, d]`` view of a contiguous ``[s, h, d]`` tensor, the packed layout varlen callers get back."""
    dtype = like.dtype if dtype is None else dtype
    if packing is None:
        return alloc((b, h, s, d), dtype=dtype, device=like.device)
    return alloc((s, h, d), dtype=dtype, device=like.device).transpose(0, 1).unsqueeze(0)


def _mask_kind(mask) -> int:
    """The kernels' MASK_KIND: 0 without a mask tile, 1 boolean (as bytes), 2 additive (float32)."""
    if mask is None:
        return 0
    return 1 if mask.dtype == torch.uint8 else 2


def _mask_strides(mask) -> tuple:
    """A mask's ``[b, h, rows, keys]`` strides, 0 along each dimension it broadcasts (size 1)."""
    if mask is None:
        return (0, 0, 0, 0)
    return tuple(st if n > 1 else 0 for n, st in zip(mask.shape, mask.stride()))


def _check_features(q, b: int, hq: int, sq: int, sk: int, sinks, kspan, mask):
    """The feature tensors in the forms the kernels read, refused otherwise: a wrong shape here
    would be read out of bounds, not raise."""
    if sinks is not None and (tuple(sinks.shape) != (hq,) or sinks.dtype != torch.float32
                              or not sinks.is_contiguous()):
        raise ValueError(f"sinks must be contiguous float32 [heads_q] = [{hq}], got {sinks.dtype} "
                         f"{tuple(sinks.shape)}")
    if kspan is not None and (tuple(kspan.shape) != (b, hq, 2) or kspan.dtype != torch.int32
                              or not kspan.is_contiguous()):
        raise ValueError(f"kspan must be contiguous int32 [batch, heads_q, 2] = [{b}, {hq}, 2], got "
                         f"{kspan.dtype} {tuple(kspan.shape)}")
    if mask is not None:
        if mask.dtype not in (torch.uint8, torch.float32) or mask.dim() != 4 or any(
                m not in (1, n) for m, n in zip(mask.shape, (b, hq, sq, sk))):
            raise ValueError(f"mask must be uint8 (boolean) or float32 broadcastable as [b, h, rows, keys] "
                             f"to {[b, hq, sq, sk]}, got {mask.dtype} {tuple(mask.shape)}")
    for name, t in (("sinks", sinks), ("kspan", kspan), ("mask", mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} must be on {q.device}, got {t.device}")


def _cap(scale: float, softcap: float) -> tuple[float, float]:
    """``(cap_in, cap_out)`` of the kernels' softcap in base 2 (kernels._scores2); unused at 0."""
    return (scale / softcap, softcap * LOG2E) if softcap > 0 else (0.0, 0.0)


def _slopes(alibi, q: torch.Tensor, b: int, hq: int):
    """ALiBi slopes as the kernels read them: float32 ``[B, Hq]`` contiguous on q's device; any
    tensor stands in when there are none (the kernels never read it then)."""
    if alibi is None:
        return q
    if tuple(alibi.shape) != (b, hq):
        raise ValueError(f"alibi must be [batch, heads_q] = [{b}, {hq}], got {tuple(alibi.shape)}")
    return alibi.to(device=q.device, dtype=torch.float32).contiguous()


def mask_tensors(mask, b: int, hq: int, device):
    """``(kspan, mask)`` the kernels read for an :class:`aule.masks.AttnMask` or a mask left on the
    device (:class:`aule.call.OnDevice`; ``(None, None)`` without one). A padding mask becomes the
    span of keys each (batch, query head) sees, int32 ``[B, Hq, 2]`` (its tiles bound the key loops),
    plus its key vector as a boolean mask of one row when the visible keys are not one run; a general
    mask stays as it was broadcast, as bytes (boolean) or float32 (additive)."""
    if mask is None:
        return None, None
    if isinstance(mask, OnDevice):
        return _device_mask_tensors(mask.tensor.to(device), b, hq, mask.args[0][3])
    if not mask.padding:
        vals = mask.values
        vals = vals.view(np.uint8) if vals.dtype == np.bool_ else vals.astype(np.float32, copy=False)
        return None, torch.tensor(vals, device=device)
    span, runs = mask.spans(b, hq)
    kspan = torch.tensor(np.ascontiguousarray(span), device=device)
    if runs:
        return kspan, None
    return kspan, torch.tensor(mask.keys[:, :, None, :].view(np.uint8), device=device)


def _device_mask_tensors(m: torch.Tensor, b: int, hq: int, sk: int):
    """``(kspan, mask)`` of an attn_mask tensor with no host analysis and no host synchronisation:
    the mask itself, read in every visited tile through its broadcast strides, and the hull
    ``[kstart, kend)`` of the keys some row of each (batch, query head) may see (``[0, 0]`` for
    none), computed on the device by :func:`kernels._mask_hull`, which keeps the kernels off the
    tiles no row sees. Right for any mask, as the span is only a bound; for a padding mask
    ``[B, 1, 1, Sk]`` the hull is its visible run, marked as saying all (the forward then reads
    no mask tile). A float mask hides only by ``-inf``."""
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    tile = m.view(torch.uint8) if m.dtype == torch.bool else m.to(torch.float32)
    kspan = torch.empty((b, hq, 2), dtype=torch.int32, device=m.device)
    if sk == 0:
        return kspan.zero_(), tile
    rows = tile.shape[2]
    kernels._mask_hull[(b * hq,)](tile, kspan, hq, rows, sk, *_mask_strides(tile), MASK_KIND=_mask_kind(tile),
                                  BLOCK_M=min(16, next_pow2(rows)), BLOCK_N=min(256, max(16, next_pow2(sk))))
    return kspan, tile


def fp32_refusal(dtype_name: str, head_dim: int, device_type: str) -> str | None:
    """Why a float32 call cannot run on an NVIDIA GPU (None if it can)."""
    if (dtype_name == "float32" and device_type == "cuda" and torch_gpu_flavour() == "cuda"
            and head_dim > cfg.NVIDIA_FP32_MAX_DIM):
        return (f"float32 with head_dim {head_dim} > {cfg.NVIDIA_FP32_MAX_DIM} is refused on NVIDIA: "
                "its tiles spill registers badly; use float16/bfloat16")
    return None


def _check(q, k, v, fp8: bool = False):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) and not (fp8 and q.dtype in FP8_SHIFT):
        raise TypeError(f"query dtype must be float16, bfloat16 or float32{' (or float8 e4m3)' if fp8 else ''} "
                        f"for Triton, got {q.dtype}")
    if q.dtype == torch.bfloat16 and q.device.type == "cpu":
        # Seen with Triton 3.9: the interpreter's tl.dot on bfloat16 operands returns garbage
        # (1e10 errors on a 16x16 product), so refuse rather than return wrong numbers.
        raise UnsupportedError("bfloat16 cannot run under Triton's interpreter (its tl.dot "
                               "miscomputes bfloat16); use float16/float32 on the CPU")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] > 256:
        raise ValueError(f"head_dim must be <= 256 for the Triton kernels, got {q.shape[-1]}")
    reason = fp32_refusal(dtype_name(q), q.shape[-1], q.device.type)
    if reason:
        raise UnsupportedError(reason)


def _check_descale(q, k, descale):
    """FP8's ``(q, k, v)`` descale factors as the kernel reads them (float32 ``[B, Hkv]``, any
    strides, on q's device), refused otherwise: a wrong shape would be read out of bounds."""
    want = (q.shape[0], k.shape[1])
    if descale is None or len(descale) != 3:
        raise ValueError("float8 inputs need their (q, k, v) descale factors (aule.call.check_descales)")
    for name, t in zip(("q_descale", "k_descale", "v_descale"), descale):
        if tuple(t.shape) != want or t.dtype != torch.float32 or t.device != q.device:
            raise ValueError(f"{name} must be float32 [batch, heads_kv] = {list(want)} on {q.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")


def _v_operand(v, target: str):
    """V as FP8's P.V product reads it. Hopper's fp8 tensor-core products take their second operand
    only with the reduced dimension (here the keys) contiguous, so an NVIDIA V (and the
    interpreter's, which tests this path) is copied once into that layout, seen through strides
    as the same ``[B, H, S, D]`` tensor; AMD's matrix cores read V as it is. Its rows are padded to
    a multiple of 16 keys: Triton compiles a stride it can prove divisible by 16 into aligned wide
    loads (without that hint the sm_90 kernel spills), whatever the sequence length."""
    if v.stride(-2) == 1 or target not in ("cuda", "interpret"):
        return v
    b, h, s, d = v.shape
    vt = torch.empty((b, h, d, cdiv(s, 16) * 16), dtype=v.dtype, device=v.device)[..., :s]
    vt.copy_(v.transpose(-1, -2))
    return vt.transpose(-1, -2)


def attention_forward(q, k, v, scale: float, left: int, right: int, tile=None, softcap: float = 0.0,
                      alibi=None, sinks=None, kspan=None, mask=None, packing=None, check: bool = False,
                      descale=None, out_dtype=None):
    """``(out, lse)`` for ``q [B,Hq,Sq,D]``, ``k, v [B,Hkv,Sk,D]`` (any strides). ``out`` is
    contiguous in q's dtype; ``lse`` float32 ``[B,Hq,Sq]``, natural log, ``-inf`` for rows that
    see no key (NaN and ``+inf`` rows by aule.masks' rule). ``softcap > 0`` caps the scores and
    ``alibi`` (slopes ``[B, Hq]``) biases them, as aule.masks defines; ``sinks`` (float32
    ``[Hq]``) join each row's denominator. An attn_mask arrives as ``kspan`` (int32 ``[B, Hq, 2]``,
    the span of keys a padding mask shows) and/or ``mask`` (uint8 for boolean, float32 for
    additive, ``[b, h, rows, keys]`` with 1 for broadcast dimensions). ``tile`` forces a
    configuration (tests exercise the tile-run arithmetic with it).

    With ``packing`` (a :class:`Packing`, no attn_mask) q, k and v are ``[1, H, total, D]`` views of
    packed sequences, each attended alone, all in one launch; ``alibi`` is then ``[batch, Hq]``
    per sequence, ``out`` a view of a contiguous ``[total_q, Hq, D]`` tensor and ``lse``
    ``[1, Hq, total_q]``.

    ``check``: the values were left unread on the device (a call's ``device_values``): the kernel
    checks the sinks, slopes and packing offsets it reads and records a bad one in an error flag,
    which aule raises as ``ValueError`` by the next call (:mod:`.devcheck`).

    FP8 (float8 e4m3 q, k, v; forward only, dense only): ``descale`` is the ``(q, k, v)`` factors,
    float32 ``[B, Hkv]`` each, and ``out`` is ``out_dtype`` (torch.bfloat16 by default)."""
    fp8 = q.dtype in FP8_SHIFT
    _check(q, k, v, fp8)
    if tile is None:  # AULE_TRITON_HOPPER: the sm_90 TMA forward takes plain calls (hopper.variant_for)
        variant = hopper.variant_for(q, k, v, left, right, fp8 or softcap > 0 or packing is not None
                                     or any(x is not None for x in (alibi, sinks, kspan, mask)))
        if variant is not None:
            return hopper.attention_forward(q, k, v, scale, left, right, variant)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    _check_features(q, b, hq, sq, sk, sinks, kspan, mask)
    if fp8:
        if packing is not None:
            raise ValueError("float8 inputs are served dense only, not packed (varlen)")
        _check_descale(q, k, descale)
    elif descale is not None or out_dtype is not None:
        raise ValueError(f"descale and out_dtype are for float8 inputs only, got {q.dtype}")
    out_dtype = (out_dtype or torch.bfloat16) if fp8 else None
    out = _alloc_rows(torch.empty, b, hq, sq, d, q, packing, out_dtype)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if b * hq * sq == 0 or sk == 0:
        lse.fill_(float("-inf"))
        if sinks is not None and lse.numel():
            lse.copy_(sinks[None, :, None].expand_as(lse))
        return out.zero_(), lse
    sizes = _sizes(sq, sk, packing)
    slopes = _slopes(alibi, q, b if packing is None else packing.batch, hq)
    flag, err, dirty = _open_flag(check and (alibi is not None or sinks is not None or packing is not None),
                                  "attention forward", q, sq, sk, packing)
    if fp8:
        v = _v_operand(v, target_of(q))
    descales = descale if fp8 else (lse, lse, lse)  # stand-ins the kernel never reads without FP8
    args = (q, k, v, out, lse, slopes, _or(sinks, q), _or(kspan, q), _or(mask, q), *_cu(packing, q), err, dirty,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *_mask_strides(mask),
            sq, sk, left, right, scale * LOG2E, *_cap(scale, softcap), hq, hq // hkv,
            next_pow2(sizes[0]), next_pow2(sizes[1]), *sizes,
            *descales, *(st for t in descales for st in (t.stride() if fp8 else (0, 0))))
    launched = _launch("fwd", _grid(sizes[0], "BLOCK_M", hq, b, packing), args,
                       _meta(q, left, right, softcap, alibi, kspan, mask, packing, flag, HAS_SINKS=sinks is not None,
                             FP8=FP8_SHIFT.get(q.dtype, 0), ALIBI_MODE=_alibi_kind(alibi, right, q.dtype)),
                       q, sizes, tile)
    flags.close_flag(flag, q.device)
    if flag is None and packing is None and not fp8 and tile is None:
        offer_ready((launched,), (q, k, v), (out, lse), 2)
    return out, lse


def _open_flag(check: bool, kernel: str, q, sq: int, sk: int, packing):
    """The error flag of a launch whose kernels check values left on the device (``(None, q, q)``
    without: the kernels then never write the stand-ins). Its meta words the errors: the packed
    totals and the bounds the caller gave, which the offsets were checked against."""
    bounds = (0, 0) if packing is None else (packing.max_q, packing.max_k)
    return flags.open_flag(check, q, kernel=kernel, device=str(q.device), alibi_ndim=2, total_q=sq, total_k=sk,
                           max_q=bounds[0], max_k=bounds[1])


def _or(t, stand_in):
    """``t``, or a tensor that stands in for a feature the kernels are compiled without (never read)."""
    return stand_in if t is None else t


def attention_backward(dout, q, k, v, out, lse, dlse, scale: float, left: int, right: int,
                       tile_dkdv=None, tile_dq=None, softcap: float = 0.0, alibi=None, sinks=None,
                       kspan=None, mask=None, packing=None, check: bool = False, hopper_bwd_variant=None):
    """``(dq, dk, dv, dsinks)`` (dq/dk/dv contiguous, in the inputs' dtype). ``dlse`` is the
    gradient reaching the LSE output, or None. dK/dV are summed over each GQA group inside the
    kernel. The features as the forward had them; of those only ``sinks`` get a gradient:
    ``dsinks`` float32 ``[Hq]``, or an empty tensor without sinks. With ``packing`` as in
    :func:`attention_forward`: dq, dk and dv are views of packed ``[total, H, D]`` tensors; ``check``
    as there, for the packing's offsets (the forward has checked sinks and slopes).
    ``hopper_bwd_variant``: None lets ``AULE_TRITON_HOPPER_BWD`` hand a plain call on sm_90 without a
    forced tile to :mod:`.hopper_bwd` after the preprocess; a variant name forces it there (the tiles
    then its), False keeps the general kernels."""
    _check(q, k, v)
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    _check_features(q, b, hq, sq, sk, sinks, kspan, mask)
    empty = b * hq * sq == 0 or sk == 0
    # The kernels write every element, so no memset, except when no kernel runs at all.
    alloc = torch.zeros if empty else torch.empty
    # For varlen too: every packed row belongs to one sequence, whose programs write it.
    dq = _alloc_rows(alloc, b, hq, sq, d, q, packing)
    dk = _alloc_rows(alloc, b, hkv, sk, d, k, packing)
    dv = _alloc_rows(alloc, b, hkv, sk, d, v, packing)
    dsinks = torch.zeros((hq if sinks is not None else 0,), dtype=torch.float32, device=q.device)
    if b * hq * sq == 0:
        return dq, dk, dv, dsinks
    lse = lse.contiguous()
    has_dlse = dlse is not None
    if sk == 0:
        if sinks is not None and has_dlse:
            # No key at all: LSE = sink, so the LSE's gradient is the sink's whole gradient.
            dsinks = dlse.to(torch.float32).sum((0, 2))
        return dq, dk, dv, dsinks
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    dlse_arg = dlse.to(torch.float32).contiguous() if has_dlse else delta
    flag, err, dirty = _open_flag(check and packing is not None, "attention backward", q, sq, sk, packing)
    meta = _meta(q, left, right, softcap, alibi, kspan, mask, packing, flag)
    slopes = _slopes(alibi, q, b if packing is None else packing.batch, hq)
    pre_bm = cfg.INTERPRET_TILE[0] if q.device.type == "cpu" else _PRE_BLOCK_M
    target_of(q)  # the CPU/interpreter check before any launch
    sink_parts = torch.empty((b * hq, cdiv(sq, pre_bm)) if sinks is not None else (0,),
                             dtype=torch.float32, device=q.device)
    kernels._attn_bwd_preprocess[(cdiv(sq, pre_bm), b * hq)](
        out, dout, lse, dlse_arg, delta, lse2, _or(sinks, lse), sink_parts,
        *out.stride(), *dout.stride(), sq, hq, HEAD_DIM=d, BLOCK_D=meta["BLOCK_D"],
        HAS_DLSE=has_dlse, HAS_SINKS=sinks is not None, BLOCK_M=pre_bm)
    if sinks is not None:
        dsinks = sink_parts.view(b, hq, -1).sum((0, 2))
    if hopper_bwd_variant is None and (tile_dkdv is not None or tile_dq is not None):
        hopper_bwd_variant = False  # a forced tile is the general kernels', as in the forward
    variant = hopper_bwd.variant_for(q, k, v, softcap > 0 or packing is not None or flag is not None or any(
        x is not None for x in (alibi, sinks, kspan, mask)), hopper_bwd_variant, right)
    if variant is not None:  # the sm_90 TMA kernels take it from here (AULE_TRITON_HOPPER_BWD)
        hopper_bwd.backward(dout, q, k, v, lse2, delta, dq, dk, dv, scale, left, right, variant, tile_dkdv, tile_dq)
        return dq, dk, dv, dsinks
    common = (sq, sk, left, right, scale * LOG2E, scale, *_cap(scale, softcap))
    sizes = _sizes(sq, sk, packing)
    buckets = (next_pow2(sizes[0]), next_pow2(sizes[1]), *sizes)
    features = (slopes, _or(kspan, q), _or(mask, q), *_cu(packing, q), err, dirty)
    _launch("dkdv", _grid(sizes[1], "BLOCK_N", hkv, b, packing),
            (q, k, v, dout, lse2, delta, dk, dv, *features, *q.stride(), *k.stride(), *v.stride(),
             *dout.stride(), *dk.stride(), *dv.stride(), *_mask_strides(mask), *common, hq, hkv,
             hq // hkv, *buckets),
            meta, q, sizes, tile_dkdv)
    _launch("dq", _grid(sizes[0], "BLOCK_M", hq, b, packing),
            (q, k, v, dout, lse2, delta, dq, *features, *q.stride(), *k.stride(), *v.stride(),
             *dout.stride(), *dq.stride(), *_mask_strides(mask), *common, hq, hq // hkv, *buckets),
            meta, q, sizes, tile_dq)
    flags.close_flag(flag, q.device)
    return dq, dk, dv, dsinks


# --- torch.library custom ops -------------------------------------------------------------------

def _sdpa_mask(q, k, kspan, mask, attn_mask):
    """``(kspan, mask)`` for the kernels, from an SDPA ``attn_mask`` passed as the caller gave it.

    A compiled graph cannot read a mask on the host before the op (as eager calls do in
    ``call.check_attn_mask``), so it hands the op the mask itself, which is validated and analysed
    here, when the graph runs (padding becomes key spans); errors name ``attn_mask``."""
    if attn_mask is None:
        return kspan, mask
    if kspan is not None or mask is not None:
        raise ValueError("pass an attn_mask or its kernel form (kspan, mask), not both")
    from ...call import check_attn_mask, checks_on_device

    b, hq, sq = q.shape[:3]
    on_device = checks_on_device("torch", str(q.device))
    return mask_tensors(check_attn_mask(attn_mask, (b, hq, sq, k.shape[2]), on_device), b, hq, q.device)


@torch.library.custom_op("aule::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         left: int, right: int, softcap: float, alibi: Optional[torch.Tensor],
                         sinks: Optional[torch.Tensor] = None, kspan: Optional[torch.Tensor] = None,
                         mask: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    kspan, mask = _sdpa_mask(q, k, kspan, mask, attn_mask)
    # Sinks and slopes reach the op unread (a compiled graph's, or an eager call's left on the
    # device): the kernel checks them. A launch with neither takes no error flag.
    return attention_forward(q, k, v, scale, left, right, softcap=softcap, alibi=alibi, sinks=sinks,
                             kspan=kspan, mask=mask, check=True)


@triton_attention_fwd.register_fake
def _fwd_fake(q, k, v, scale, left, right, softcap, alibi, sinks=None, kspan=None, mask=None, attn_mask=None):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("aule::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, dlse: Optional[torch.Tensor],
                         scale: float, left: int, right: int, softcap: float,
                         alibi: Optional[torch.Tensor], sinks: Optional[torch.Tensor] = None,
                         kspan: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                         attn_mask: Optional[torch.Tensor] = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # An SDPA attn_mask is analysed again here: the forward op's kernel form of it cannot reach
    # the backward of a compiled graph, which saves only the op's inputs and outputs.
    kspan, mask = _sdpa_mask(q, k, kspan, mask, attn_mask)
    return attention_backward(dout, q, k, v, out, lse, dlse, scale, left, right, softcap=softcap,
                              alibi=alibi, sinks=sinks, kspan=kspan, mask=mask)


@triton_attention_bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, dlse, scale, left, right, softcap, alibi, sinks=None, kspan=None,
              mask=None, attn_mask=None):
    dsinks = q.new_empty((q.shape[1] if sinks is not None else 0,), dtype=torch.float32)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dsinks


def _setup_context(ctx, inputs, output):
    q, k, v, scale, left, right, softcap, alibi, sinks, kspan, mask, attn_mask = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, alibi, sinks, kspan, mask, attn_mask)
    ctx.window = (scale, left, right, softcap)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi, sinks, kspan, mask, attn_mask = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dsinks = triton_attention_bwd(dout, q, k, v, out, lse, dlse, *ctx.window, alibi, sinks,
                                              kspan, mask, attn_mask)
    # Only the sinks of the features are learned; slopes, spans and masks get no gradient.
    return dq, dk, dv, None, None, None, None, None, (dsinks if sinks is not None else None), None, None, None


triton_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _eager_inference(*tensors) -> bool:
    """No gradient to record, no graph being traced, no functorch transform, plain tensors."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if torch.compiler.is_compiling() or _functorch_active():
        return False
    return all(type(t) is torch.Tensor for t in tensors)


_FUNCTORCH_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)


def _functorch_active() -> bool:
    return bool(_FUNCTORCH_ACTIVE()) if _FUNCTORCH_ACTIVE is not None else False


def triton_attention(q, k, v, scale: float, left: int = -1, right: int = -1, softcap: float = 0.0,
                     alibi: Optional[torch.Tensor] = None, sinks: Optional[torch.Tensor] = None,
                     kspan: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                     check: bool = False):
    """Differentiable attention through the custom op: ``(out, lse)``. ``left``/``right`` are
    aule.masks' canonical window (``-1`` unbounded; causal is ``right=0``); ``softcap`` (0 for
    none) and ``alibi`` (float32 slopes ``[B, Hq]`` or None) modify the scores as aule.masks says;
    ``sinks`` (float32 ``[Hq]``, differentiable) join the denominators; ``kspan`` and ``mask``
    are an attn_mask as :func:`attention_forward` takes it; ``check`` as there (the custom op always
    checks)."""
    grad_inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    if _eager_inference(*grad_inputs):
        # Inference in eager mode runs the kernels directly: the custom op's autograd wrapper and
        # redispatch add host time that short calls (a decode step, a 1k-token layer) feel.
        return attention_forward(q, k, v, float(scale), int(left), int(right), softcap=float(softcap),
                                 alibi=alibi, sinks=sinks, kspan=kspan, mask=mask, check=check)
    return torch.ops.aule.triton_attention_fwd(q, k, v, float(scale), int(left), int(right),
                                               float(softcap), alibi, sinks, kspan, mask)


# --- varlen: packed sequences in one launch -----------------------------------------------------

class VarlenAttention(torch.autograd.Function):
    """The varlen kernels under autograd, on ``[1, H, total, D]`` views of packed q, k, v:
    ``(out, lse)`` as :func:`attention_forward` gives them with a :class:`Packing`, and dq, dk, dv
    (and d sinks when they require grad) in the packed layout. A plain autograd.Function rather
    than a custom op: varlen calls are refused inside torch.compile before they reach a backend."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, packing, scale, left, right, softcap, alibi, check):
        out, lse = attention_forward(q, k, v, scale, left, right, softcap=softcap, alibi=alibi, sinks=sinks,
                                     packing=packing, check=check)
        ctx.save_for_backward(q, k, v, out, lse, sinks, alibi)
        ctx.spec = (packing, scale, left, right, softcap, check)
        ctx.set_materialize_grads(False)  # an unused output (the LSE, mostly) costs no zeros
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, sinks, alibi = ctx.saved_tensors
        packing, scale, left, right, softcap, check = ctx.spec
        if dout is None:
            dout = torch.zeros_like(out)
        dq, dk, dv, dsinks = attention_backward(dout, q, k, v, out, lse, dlse, scale, left, right, softcap=softcap,
                                                alibi=alibi, sinks=sinks, packing=packing, check=check)
        dsinks = dsinks if sinks is not None and ctx.needs_input_grad[3] else None
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None


def triton_varlen_attention(q, k, v, packing: Packing, scale: float, left: int = -1, right: int = -1,
                            softcap: float = 0.0, alibi: Optional[torch.Tensor] = None,
                            sinks: Optional[torch.Tensor] = None, check: bool = False):
    """Differentiable attention of packed sequences, one launch per kernel: ``q [total_q, Hq, D]``,
    ``k, v [total_k, Hkv, D]`` (any strides), sequence ``i`` being the rows ``packing`` gives it,
    attended alone (``left``/``right`` as in :func:`triton_attention`, bottom-right within each
    sequence). ``alibi``: float32 slopes ``[batch, Hq]`` per sequence; ``sinks`` float32 ``[Hq]``.
    ``check`` as in :func:`attention_forward` (a :func:`device_packing`'s offsets need it).
    Returns ``(out [total_q, Hq, D] contiguous, lse [Hq, total_q] float32)``."""
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    spec = (float(scale), int(left), int(right), float(softcap))
    grad_inputs = (q, k, v) if sinks is None else (q, k, v, sinks)
    if torch.is_grad_enabled() and any(t.requires_grad for t in grad_inputs):
        out, lse = VarlenAttention.apply(q4, k4, v4, sinks, packing, *spec, alibi, check)
    else:
        out, lse = attention_forward(q4, k4, v4, *spec[:3], softcap=spec[3], alibi=alibi, sinks=sinks,
                                     packing=packing, check=check)
    return out[0].transpose(0, 1), lse[0]

"""One canonical, validated description of an attention call, built once and handed to backends.

Backends never re-validate user input: they read an :class:`AttentionCall` and either serve it
or say why not.
"""
from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import masks
from .errors import UnsupportedError

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


def is_torch_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def array_kind(x, name: str) -> str:
    """'numpy' or 'torch'; anything else is a TypeError naming the argument."""
    if isinstance(x, np.ndarray):
        return "numpy"
    if is_torch_tensor(x):
        return "torch"
    if type(x).__name__ == "GpuTensor":
        return "gpu"
    raise TypeError(
        f"{name} must be a NumPy array or a torch tensor, got {type(x).__module__}.{type(x).__name__}")


_DTYPE_NAMES: dict = {}


def dtype_name(x) -> str:
    """Dtype of an array or tensor as a plain string ('float16', 'bfloat16', 'int32', ...)."""
    dt = x.dtype
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        # NumPy builds a dtype's name in Python on every access: remembered, it costs a lookup.
        name = dt.name if isinstance(dt, np.dtype) else str(dt).replace("torch.", "")
        _DTYPE_NAMES[dt] = name
    return name


_DEVICE_NAMES: dict = {}


def torch_device_name(device) -> str:
    """``str(device)`` of a torch device, remembered: torch builds the string on every call."""
    name = _DEVICE_NAMES.get(device)
    if name is None:
        name = _DEVICE_NAMES[device] = str(device)
    return name


def device_of(x) -> str:
    if is_torch_tensor(x):
        return torch_device_name(x.device)
    if type(x).__name__ == "GpuTensor":
        return "vulkan"
    return "cpu"


def place_of(kind: str, device: str) -> str:
    """Where data lives, for routing: 'cuda' (torch tensors on a CUDA/ROCm device, or any torch
    device other than the CPU), 'gpu' (Vulkan GpuTensors), 'host' (NumPy arrays, CPU tensors)."""
    if kind == "gpu":
        return "gpu"
    if kind == "torch" and not device.startswith("cpu"):
        return "cuda"
    return "host"


class Placed:
    """Routing reads ``place`` from every validated call; it follows ``kind`` and ``device``."""

    @property
    def place(self) -> str:
        return place_of(self.kind, self.device)


class Grouped(Placed):
    """A call with query heads sharing KV heads (GQA): ``group`` query heads per KV head."""

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv


_NO_FEATURES: frozenset = frozenset()
_GRAD_SINKS = frozenset({"sinks"})


@dataclass
class AttentionCall(Grouped):
    """A validated attention call. Shapes follow SDPA: q [B, Hq, Sq, D], k/v [B, Hkv, Sk, D]."""

    q: Any
    k: Any
    v: Any
    kind: str  # 'numpy', 'torch' or 'gpu' (a Vulkan GpuTensor)
    device: str  # 'cpu', 'cuda:0', 'vulkan', ...
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    scale: float
    left: int
    right: int
    return_lse: bool
    causal: bool
    softcap: float = 0.0   # > 0: scores become softcap * tanh(score / softcap) (masks.py)
    # ALiBi slopes as float32 [batch, heads_q], or None: score(i, j) -= slope * |i + seq_k - seq_q - j|
    alibi: Any = field(default=None, compare=False, repr=False)
    # Attention sinks as float32 [heads_q], or None: one more softmax term per row (masks.py)
    sinks: Any = field(default=None, compare=False, repr=False)
    # attn_mask as a masks.AttnMask (general, or padding held as keys / key_lengths), or None
    mask: Any = field(default=None, compare=False, repr=False)
    # The caller's torch sinks when they require grad (``sinks`` holds their values), else None
    sinks_grad: Any = field(default=None, compare=False, repr=False)

    @property
    def features(self) -> frozenset:
        """The optional features this call uses; a backend serves it only if it has them all.

        ``mask``: any ``attn_mask``. ``general_mask`` as well where the mask is not a padding mask
        whose visible keys are one run per (batch, query head): a kernel must then read it per
        (row, key), where a padding run is only a bound on each head's keys."""
        m = self.mask
        if m is None and not self.softcap and self.alibi is None and self.sinks is None:
            return _NO_FEATURES  # the plain call, asked by every backend the router considers
        general = m is not None and not (m.padding and m.spans(self.batch, self.heads_q)[1])
        return frozenset(name for name, on in (("softcap", self.softcap), ("alibi", self.alibi is not None),
                                               ("sinks", self.sinks is not None), ("mask", m is not None),
                                               ("general_mask", general))
                         if on)

    @property
    def grad_features(self) -> frozenset:
        """The features whose arrays require grad; only a backend that differentiates them may serve it."""
        return _GRAD_SINKS if self.sinks_grad is not None else _NO_FEATURES

    def describe(self) -> str:
        return (f"q[{self.batch},{self.heads_q},{self.seq_q},{self.head_dim}] "
                f"kv[{self.heads_kv},{self.seq_k}] {self.dtype} on {self.device} "
                f"window=({self.left},{self.right})")


def shape_tuple(x):
    return tuple(map(int, x.shape))


# The kernels compute in float32 and fold log2(e) into the scale for a base-2 softmax: a scale is
# usable only where both stay finite, and nonzero, in float32. Doubles at or above this round to
# +inf as float32 (FLT_MAX plus half its last place); doubles at or below 2**-150 round to 0.
_F32_OVERFLOW = 2.0 ** 128 - 2.0 ** 103
_F32_UNDERFLOW = 2.0 ** -150
_LOG2E = math.log2(math.e)


def scale_problem(scale: float) -> str | None:
    """What is wrong with a real ``scale`` (a sentence for an error or a log), or ``None``."""
    if not math.isfinite(scale) or scale <= 0:
        return "must be finite and > 0"
    if scale * _LOG2E >= _F32_OVERFLOW:
        return (f"must stay finite in float32, the precision the kernels use, times log2(e) too "
                f"(their softmax is base 2): at most {_F32_OVERFLOW / _LOG2E:.4g}")
    if scale <= _F32_UNDERFLOW:
        return "must stay > 0 in float32, the precision the kernels use: above 2**-150"
    return None


def check_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    s = float(scale)
    problem = scale_problem(s)
    if problem:
        raise ValueError(f"scale {problem}, got {scale!r}")
    return s


def check_same_family(named: dict) -> tuple[str, str]:
    """All arrays are of one kind (NumPy or torch) and, for torch, on one device."""
    xs = tuple(named.values())
    first = type(xs[0])
    # The usual call: plain arrays, GpuTensors or tensors, all of one type (and one device).
    if all(type(x) is first for x in xs):
        if first is np.ndarray:
            return "numpy", "cpu"
        if first.__name__ == "GpuTensor":
            return "gpu", "vulkan"
        if is_torch_tensor(xs[0]):
            device = xs[0].device
            if all(x.device == device for x in xs[1:]):
                return "torch", torch_device_name(device)
    kinds = {n: array_kind(x, n) for n, x in named.items()}
    if len(set(kinds.values())) > 1:
        raise TypeError("query, key and value must all be NumPy arrays or all torch tensors, got "
                        + ", ".join(f"{n}: {k}" for n, k in kinds.items()))
    devices = {n: device_of(x) for n, x in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError("query, key and value must be on one device, got "
                         + ", ".join(f"{n}: {d}" for n, d in devices.items()))
    first = next(iter(named))
    return kinds[first], devices[first]


def check_float_dtypes(named: dict) -> str:
    xs = tuple(named.values())
    dt = xs[0].dtype
    if all(x.dtype is dt or x.dtype == dt for x in xs[1:]):  # the usual call: one dtype, named once
        name = dtype_name(xs[0])
        if name in FLOAT_DTYPES:
            return name
    dtypes = {n: dtype_name(x) for n, x in named.items()}
    for n, dt in dtypes.items():
        if dt not in FLOAT_DTYPES:
            raise TypeError(f"{n} must be float16, bfloat16, float32 or float64, got dtype {dt}")
    if len(set(dtypes.values())) > 1:
        raise TypeError("query, key and value must share one dtype, got "
                        + ", ".join(f"{n}: {d}" for n, d in dtypes.items()))
    return next(iter(dtypes.values()))


_INT_DTYPES = ("int32", "int64", "int16", "uint8", "int8", "uint16", "uint32")


def int_table(x, name: str, ndim: int):
    """Check an integer table (NumPy array or torch tensor; lists become int32) of ``ndim`` dimensions."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=np.int32)
    kind = array_kind(x, name)
    if kind == "gpu":
        raise TypeError(f"{name} must be a NumPy array or torch tensor of integers, not a GpuTensor")
    dt = dtype_name(x)
    if dt not in _INT_DTYPES:
        raise TypeError(f"{name} must hold integers (int32 preferred), got dtype {dt}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {shape_tuple(x)}")
    return x


def check_softcap(softcap) -> float:
    if type(softcap) is float and softcap == 0.0:  # the default, without the ABC checks below
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number (0 for none), got {type(softcap).__name__} {softcap!r}")
    c = float(softcap)
    if not (math.isfinite(c) and 0 <= c < _F32_OVERFLOW):  # the kernels divide by it in float32
        raise ValueError(f"softcap must be finite in float32 and >= 0 (0 for none), got {softcap!r}")
    return c


def feature_dtype(x, name: str) -> str:
    """The dtype name of a feature's array; a TypeError naming it when it is no NumPy array or tensor."""
    if not (isinstance(x, np.ndarray) or is_torch_tensor(x)):
        raise TypeError(f"{name} must be a NumPy array or torch tensor, got {type(x).__name__}")
    return dtype_name(x)


def host_feature(x, name: str, float32: bool):
    """A feature's array (NumPy, or a torch tensor on any device) as NumPy, in float32 if asked.
    A torch tensor that needs grad is refused: a gradient must never go missing in silence. Only
    dense attention's sinks have a backward pass (on Triton), and :func:`canonicalize` hands those
    over detached, keeping the learned tensor for the router."""
    if not is_torch_tensor(x):
        return np.asarray(x, dtype=np.float32) if float32 else x
    if needs_grad(x):
        raise UnsupportedError(f"{name} requires grad, and aule has no backward pass for {name} here; "
                               f"pass {name}.detach() or call under torch.no_grad()")
    x = x.detach()
    return (x.float() if float32 else x).cpu().numpy()


def check_alibi(alibi_slopes, batch: int, heads_q: int):
    """``alibi_slopes`` ([heads_q] or [batch, heads_q], NumPy or torch) as float32 [batch, heads_q]."""
    if alibi_slopes is None:
        return None
    feature_dtype(alibi_slopes, "alibi_slopes")
    slopes = np.asarray(host_feature(alibi_slopes, "alibi_slopes", float32=True), dtype=np.float32)
    if slopes.shape == (heads_q,):
        slopes = np.broadcast_to(slopes, (batch, heads_q))
    if slopes.shape != (batch, heads_q):
        raise ValueError(f"alibi_slopes must have shape [heads_q] = [{heads_q}] or [batch, heads_q] = "
                         f"[{batch}, {heads_q}], got {tuple(alibi_slopes.shape)}")
    if not np.isfinite(slopes).all():
        raise ValueError("alibi_slopes must be finite (in float32)")
    return np.ascontiguousarray(slopes)


def check_sinks(sinks, heads_q: int):
    """``sinks`` ([heads_q] floats, NumPy or torch) as float32 [heads_q], or ``None``."""
    if sinks is None:
        return None
    dt = feature_dtype(sinks, "sinks")
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"sinks must hold floats (one logit per query head), got dtype {dt}")
    if shape_tuple(sinks) != (heads_q,):
        raise ValueError(f"sinks must have shape [heads_q] = [{heads_q}], got {shape_tuple(sinks)}")
    with np.errstate(over="ignore"):  # a logit beyond float32 becomes inf, refused next
        host = host_feature(sinks, "sinks", float32=True)
    if not np.isfinite(host).all():
        raise ValueError("sinks must be finite (in float32)")
    return np.ascontiguousarray(host)


def needs_grad(x) -> bool:
    """Whether ``x`` is a torch tensor that autograd would differentiate now."""
    if not is_torch_tensor(x):
        return False
    import torch

    return bool(x.requires_grad and torch.is_grad_enabled())


def check_attn_mask(attn_mask, shape):
    """``attn_mask`` (bool, True = may attend, or float added to the scores; NumPy or torch,
    broadcastable to ``shape`` = ``[batch, heads_q, seq_q, seq_k]``) as a :class:`aule.masks.AttnMask`."""
    if attn_mask is None:
        return None
    dt = feature_dtype(attn_mask, "attn_mask")
    if dt != "bool" and dt not in FLOAT_DTYPES:
        raise TypeError(f"attn_mask must be bool (True = may attend) or float (added to the scores), "
                        f"got dtype {dt}")
    ms = shape_tuple(attn_mask)
    if len(ms) > 4 or any(m not in (1, n) for m, n in zip(ms[::-1], shape[::-1])):
        raise ValueError(f"attn_mask of shape {ms} is not broadcastable to [batch, heads_q, seq_q, seq_k] = "
                         f"{list(shape)}: each of its (at most 4) trailing dimensions must be 1 or the call's")
    return masks.canonical_attn_mask(host_feature(attn_mask, "attn_mask", float32=dt in ("float16", "bfloat16")),
                                     shape)


def canonicalize(query, key, value, causal=True, scale=None, window_size=-1, return_lse=False,
                 softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None) -> AttentionCall:
    """Validate the public arguments once; every error names the argument and the rule."""
    named = {"query": query, "key": key, "value": value}
    kind, device = check_same_family(named)
    for n, x in named.items():
        if len(x.shape) != 4:
            raise ValueError(f"{n} must be 4-D [batch, heads, seq, head_dim], got shape {shape_tuple(x)}")
    dtype = check_float_dtypes(named)
    qs, ks, vs = shape_tuple(query), shape_tuple(key), shape_tuple(value)
    if not (qs[0] == ks[0] == vs[0]):
        raise ValueError(f"batch sizes differ: query {qs}, key {ks}, value {vs} (dimension 0 must match)")
    if ks[:3] != vs[:3]:
        raise ValueError(f"key and value must have the same [batch, heads_kv, seq_k], got key {ks}, value {vs}")
    if not (qs[3] == ks[3] == vs[3]):
        raise ValueError(f"head_dim differs: query {qs}, key {ks}, value {vs} (dimension 3 must match)")
    if ks[1] == 0 or qs[1] % ks[1] != 0:
        raise ValueError(
            f"heads_q ({qs[1]}) must be a multiple of heads_kv ({ks[1]}) for grouped-query attention; "
            f"query {qs}, key {ks}")
    if qs[3] == 0:
        raise ValueError(f"head_dim must be > 0, got query {qs}")
    left, right = masks.canonical_window(causal, window_size)
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    # Learned sinks are checked by value like any others; the router then admits only a backend
    # that differentiates them (Backend.grad_features), so their gradient never goes missing.
    learned = sinks if needs_grad(sinks) else None
    return AttentionCall(
        q=query, k=key, v=value, kind=kind, device=device, dtype=dtype,
        batch=qs[0], heads_q=qs[1], heads_kv=ks[1], seq_q=qs[2], seq_k=ks[2], head_dim=qs[3],
        scale=check_scale(scale, qs[3]), left=left, right=right, return_lse=bool(return_lse),
        causal=bool(causal), softcap=check_softcap(softcap), alibi=check_alibi(alibi_slopes, qs[0], qs[1]),
        sinks=check_sinks(sinks if learned is None else sinks.detach(), qs[1]),
        mask=check_attn_mask(attn_mask, (qs[0], qs[1], qs[2], ks[2])), sinks_grad=learned)


@dataclass
class VarlenCall:
    """A validated variable-length call: sequences packed along dimension 0 of ``q [total_q, Hq, D]``
    and ``k, v [total_k, Hkv, D]``, sequence ``i`` being rows ``cu_q[i]:cu_q[i + 1]`` of q and
    ``cu_k[i]:cu_k[i + 1]`` of k and v, each attended alone.

    ``whole`` is the packed data as one ``[1, H, total, D]`` call, validated once (kinds, dtypes,
    heads, scale, window, features); :meth:`sequence` cuts it into each sequence's own call.
    """

    whole: AttentionCall
    cu_q: np.ndarray  # int64 [batch + 1]
    cu_k: np.ndarray
    alibi: Any = field(default=None, compare=False, repr=False)  # float32 [batch, heads_q], or None

    @property
    def batch(self) -> int:
        return len(self.cu_q) - 1

    @property
    def place(self) -> str:
        return self.whole.place

    def sequence(self, i: int) -> AttentionCall:
        """Sequence ``i`` as a dense call on views ``[1, H, len, D]`` of the packed data (no copy)."""
        q0, q1, k0, k1 = (int(x) for x in (self.cu_q[i], self.cu_q[i + 1], self.cu_k[i], self.cu_k[i + 1]))
        w = self.whole
        return replace(w, q=w.q[:, :, q0:q1], k=w.k[:, :, k0:k1], v=w.v[:, :, k0:k1], seq_q=q1 - q0, seq_k=k1 - k0,
                       alibi=None if self.alibi is None else self.alibi[i:i + 1])

    @property
    def features(self) -> frozenset:
        """The packed call's features, ALiBi included (its slopes are per sequence, so they live here)."""
        return self.whole.features | ({"alibi"} if self.alibi is not None else frozenset())

    @property
    def grad_features(self) -> frozenset:
        return self.whole.grad_features

    def longest(self) -> AttentionCall:
        """The sequence with the most (query, key) pairs: what a backend must serve to serve them all."""
        lens = np.diff(self.cu_q) * np.diff(self.cu_k)
        return self.sequence(int(np.argmax(lens)))

    def describe(self) -> str:
        return f"varlen {self.batch} sequences, packed {self.whole.describe()}"


def _heads_first(x):
    """``[total, H, D]`` as a ``[1, H, total, D]`` view."""
    return x.transpose(1, 0, 2)[None] if isinstance(x, np.ndarray) else x.transpose(0, 1).unsqueeze(0)


def check_cu_seqlens(cu_seqlens, name: str, total: int, total_name: str, max_seqlen, max_name: str) -> np.ndarray:
    """Cumulative sequence starts ``[batch + 1]`` (integers from 0, non-decreasing, ending at ``total``)
    as int64 NumPy, each sequence no longer than ``max_seqlen``. One host read for device tensors."""
    cu = int_table(cu_seqlens, name, 1)
    cu = (cu.cpu().numpy() if is_torch_tensor(cu) else np.asarray(cu)).astype(np.int64)
    if cu.size == 0:
        raise ValueError(f"{name} must hold batch + 1 >= 1 offsets, got none")
    if cu[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(cu[0])}")
    lens = np.diff(cu)
    if (lens < 0).any():
        i = int(np.argmax(lens < 0))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i + 1}] = {int(cu[i + 1])} < "
                         f"{name}[{i}] = {int(cu[i])}")
    if cu[-1] != total:
        raise ValueError(f"{name} must end at {total_name} = {total}, got {name}[-1] = {int(cu[-1])}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if lens.size and lens.max() > max_seqlen:
        i = int(np.argmax(lens))
        raise ValueError(f"{max_name} = {int(max_seqlen)} is smaller than sequence {i}'s length {int(lens[i])} "
                         f"(from {name})")
    return cu


def canonicalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                        window_size=-1, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False,
                        sinks=None) -> VarlenCall:
    """Validate the public arguments of :func:`aule.flash_attention_varlen` once."""
    named = {"q": q, "k": k, "v": v}
    kind, _ = check_same_family(named)
    if kind == "gpu":
        raise TypeError("flash_attention_varlen takes NumPy arrays or torch tensors, not GpuTensors")
    for n, x in named.items():
        if len(x.shape) != 3:
            raise ValueError(f"{n} must be 3-D [total_{'q' if n == 'q' else 'k'}, heads, head_dim] (sequences "
                             f"packed along dimension 0), got shape {shape_tuple(x)}")
    qs, ks, vs = shape_tuple(q), shape_tuple(k), shape_tuple(v)
    if ks != vs:
        raise ValueError(f"k and v must have the same [total_k, heads_kv, head_dim], got k {ks}, v {vs}")
    if qs[2] != ks[2]:
        raise ValueError(f"head_dim differs: q {qs}, k {ks} (dimension 2 must match)")
    if ks[1] == 0 or qs[1] % ks[1] != 0:
        raise ValueError(f"heads_q ({qs[1]}) must be a multiple of heads_kv ({ks[1]}) for grouped-query attention; "
                         f"q {qs}, k {ks}")
    cu_q = check_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", qs[0], "total_q (q.shape[0])", max_seqlen_q, "max_seqlen_q")
    cu_k = check_cu_seqlens(cu_seqlens_k, "cu_seqlens_k", ks[0], "total_k (k.shape[0])", max_seqlen_k, "max_seqlen_k")
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe one batch, got {len(cu_q) - 1} and "
                         f"{len(cu_k) - 1} sequences")
    whole = canonicalize(_heads_first(q), _heads_first(k), _heads_first(v), causal, scale, window_size, return_lse,
                         softcap=softcap, sinks=sinks)
    return VarlenCall(whole=whole, cu_q=cu_q, cu_k=cu_k, alibi=check_alibi(alibi_slopes, len(cu_q) - 1, qs[1]))

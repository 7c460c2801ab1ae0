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
# FP8 inputs (torch only): OCP e4m3 everywhere, AMD's e4m3fnuz where its Triton target has it.
FP8_DTYPES = ("float8_e4m3fn", "float8_e4m3fnuz")
# What FP8 attention may return; flash-attn 3 returns bfloat16, so that is the default.
FP8_OUT_DTYPES = ("bfloat16", "float16")


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
    # True when alibi, sinks or mask are :class:`OnDevice` (their values not read): see on_host
    device_values: bool = False
    # FP8 inputs only: (q, k, v) descale factors as float32 torch tensors [batch, heads_kv] on q's
    # device (stride 0 where broadcast), never read on the host; None for other dtypes
    descale: Any = field(default=None, compare=False, repr=False)
    out_dtype: str | None = None  # the output's dtype where it is not q's (FP8: bfloat16 or float16)

    @property
    def features(self) -> frozenset:
        """The optional features this call uses; a backend serves it only if it has them all.

        ``mask``: any ``attn_mask``. ``general_mask`` as well where the mask is not a padding mask
        whose visible keys are one run per (batch, query head): a kernel must then read it per
        (row, key), where a padding run is only a bound on each head's keys."""
        m = self.mask
        if (m is None and not self.softcap and self.alibi is None and self.sinks is None
                and self.descale is None):
            return _NO_FEATURES  # the plain call, asked by every backend the router considers
        # A mask left on the device is not analysed on the host: a kernel reads it per (row, key).
        general = m is not None and not (isinstance(m, masks.AttnMask) and m.padding
                                         and m.spans(self.batch, self.heads_q)[1])
        return frozenset(name for name, on in (("softcap", self.softcap), ("alibi", self.alibi is not None),
                                               ("sinks", self.sinks is not None), ("mask", m is not None),
                                               ("general_mask", general), ("fp8", self.descale is not None))
                         if on)

    @property
    def grad_features(self) -> frozenset:
        """The features whose arrays require grad; only a backend that differentiates them may serve it."""
        return _GRAD_SINKS if self.sinks_grad is not None else _NO_FEATURES

    def on_host(self) -> "AttentionCall":
        """This call with its features as host data, checked by the rules :func:`canonicalize`
        applies to host arrays (the same errors): what a backend whose kernels do not check device
        values reads (``Backend.run`` asks for it). The call itself when nothing is on the device."""
        if not self.device_values:
            return self
        return replace(self, alibi=on_host(self.alibi), sinks=on_host(self.sinks), mask=on_host(self.mask),
                       device_values=False)

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


def check_float_dtypes(named: dict, fp8: bool = False) -> str:
    """The one dtype of the inputs; with ``fp8`` float8 e4m3 (torch tensors) is allowed too."""
    xs = tuple(named.values())
    dt = xs[0].dtype
    if all(x.dtype is dt or x.dtype == dt for x in xs[1:]):  # the usual call: one dtype, named once
        name = dtype_name(xs[0])
        if name in FLOAT_DTYPES or (fp8 and name in FP8_DTYPES):
            return name
    dtypes = {n: dtype_name(x) for n, x in named.items()}
    allowed = "float16, bfloat16, float32 or float64" + (" (or float8_e4m3fn / float8_e4m3fnuz)" if fp8 else "")
    for n, dt in dtypes.items():
        if dt not in FLOAT_DTYPES and not (fp8 and dt in FP8_DTYPES):
            where = "" if fp8 or not dt.startswith("float8") else "; float8 inputs are served by flash_attention"
            raise TypeError(f"{n} must be {allowed}, got dtype {dt}{where}")
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


def checks_on_device(kind: str, device: str) -> bool:
    """Whether a call's feature values (sinks, slopes, attn_mask, cu_seqlens) stay on the device,
    checked by the kernels that read them rather than read back here: torch tensors off the CPU,
    where a read would be a copy and a host synchronisation per call. Only shapes and dtypes
    (metadata) are checked on the host then. Tests patch it to send CPU tensors the same way under
    Triton's interpreter."""
    return kind == "torch" and not device.startswith("cpu")


class OnDevice:
    """A feature's torch tensor (detached) left where it lives. Its shape and dtype were checked on
    the host; its values are checked by the kernels that read it, which record a bad one in an error
    flag (:mod:`aule.device_errors`). A backend that needs host data calls :meth:`host`, which reads
    it and applies the host check, ``check(tensor, *args)``: one definition of each rule."""

    __slots__ = ("tensor", "_check", "args")

    def __init__(self, tensor, check, *args):
        self.tensor = tensor
        self._check = check
        self.args = args

    def host(self):
        return self._check(self.tensor, *self.args)


def on_host(x):
    """A feature as host data: :meth:`OnDevice.host` of one left on the device, else ``x`` itself."""
    return x.host() if isinstance(x, OnDevice) else x


def _device_tensor(x, name: str):
    """A feature's torch tensor ``x`` detached, for :class:`OnDevice` and :func:`host_feature`. One
    that needs grad is refused: a gradient must never go missing in silence. Only dense attention's
    sinks have a backward pass (on Triton), and :func:`canonicalize` hands those over detached,
    keeping the learned tensor for the router."""
    if needs_grad(x):
        raise UnsupportedError(f"{name} requires grad, and aule has no backward pass for {name} here; "
                               f"pass {name}.detach() or call under torch.no_grad()")
    return x.detach()


def not_finite(name: str, index: tuple, value) -> str:
    """The one wording of a non-finite feature entry, for host checks and device errors alike."""
    return (f"{name} must be finite (in float32), got {name}[{', '.join(str(int(i)) for i in index)}] = "
            f"{float(value)}")


def _first_bad(x: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), x.shape)
        raise ValueError(not_finite(name, at, x[at]))


def host_feature(x, name: str, float32: bool):
    """A feature's array (NumPy, or a torch tensor on any device) as NumPy, in float32 if asked; a
    tensor that needs grad is refused (:func:`_device_tensor`)."""
    if not is_torch_tensor(x):
        return np.asarray(x, dtype=np.float32) if float32 else x
    x = _device_tensor(x, name)
    return (x.float() if float32 else x).cpu().numpy()


def check_alibi(alibi_slopes, batch: int, heads_q: int, on_device: bool = False):
    """``alibi_slopes`` ([heads_q] or [batch, heads_q], NumPy or torch) as float32 [batch, heads_q],
    or, ``on_device`` with a torch tensor, as :class:`OnDevice` (the caller's shape)."""
    if alibi_slopes is None:
        return None
    feature_dtype(alibi_slopes, "alibi_slopes")
    shape = shape_tuple(alibi_slopes)
    if shape not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape [heads_q] = [{heads_q}] or [batch, heads_q] = "
                         f"[{batch}, {heads_q}], got {shape}")
    if on_device and is_torch_tensor(alibi_slopes):
        return OnDevice(_device_tensor(alibi_slopes, "alibi_slopes"), check_alibi, batch, heads_q)
    slopes = np.asarray(host_feature(alibi_slopes, "alibi_slopes", float32=True), dtype=np.float32)
    _first_bad(slopes, "alibi_slopes")
    if slopes.shape == (heads_q,):
        slopes = np.broadcast_to(slopes, (batch, heads_q))
    return np.ascontiguousarray(slopes)


def check_sinks(sinks, heads_q: int, on_device: bool = False):
    """``sinks`` ([heads_q] floats, NumPy or torch) as float32 [heads_q], or ``None``; ``on_device``
    with a torch tensor, as :class:`OnDevice`."""
    if sinks is None:
        return None
    dt = feature_dtype(sinks, "sinks")
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"sinks must hold floats (one logit per query head), got dtype {dt}")
    if shape_tuple(sinks) != (heads_q,):
        raise ValueError(f"sinks must have shape [heads_q] = [{heads_q}], got {shape_tuple(sinks)}")
    if on_device and is_torch_tensor(sinks):
        return OnDevice(_device_tensor(sinks, "sinks"), check_sinks, heads_q)
    with np.errstate(over="ignore"):  # a logit beyond float32 becomes inf, refused next
        host = host_feature(sinks, "sinks", float32=True)
    _first_bad(host, "sinks")
    return np.ascontiguousarray(host)


def needs_grad(x) -> bool:
    """Whether ``x`` is a torch tensor that autograd would differentiate now."""
    if not is_torch_tensor(x):
        return False
    import torch

    return bool(x.requires_grad and torch.is_grad_enabled())


def check_attn_mask(attn_mask, shape, on_device: bool = False):
    """``attn_mask`` (bool, True = may attend, or float added to the scores; NumPy or torch,
    broadcastable to ``shape`` = ``[batch, heads_q, seq_q, seq_k]``) as a :class:`aule.masks.AttnMask`,
    or, ``on_device`` with a torch tensor, as :class:`OnDevice` (no host analysis: the Triton kernels
    take the mask itself and a hull of its visible keys computed on the device)."""
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
    if on_device and is_torch_tensor(attn_mask):
        return OnDevice(_device_tensor(attn_mask, "attn_mask"), check_attn_mask, tuple(shape))
    return masks.canonical_attn_mask(host_feature(attn_mask, "attn_mask", float32=dt in ("float16", "bfloat16")),
                                     shape)


_DESCALES = ("q_descale", "k_descale", "v_descale")


def check_out_dtype(out_dtype, dtype: str) -> str | None:
    """The output dtype of a call on inputs of ``dtype``: for FP8 inputs ``out_dtype`` (a torch
    dtype or its name, bfloat16 by default as in flash-attn 3), for others None (q's own)."""
    if dtype not in FP8_DTYPES:
        if out_dtype is not None:
            raise ValueError(f"out_dtype is for float8 inputs only; the inputs are {dtype}, and the output "
                             f"takes their dtype")
        return None
    if out_dtype is None:
        return "bfloat16"
    name = out_dtype if isinstance(out_dtype, str) else str(out_dtype).replace("torch.", "")
    if name not in FP8_OUT_DTYPES:
        raise ValueError(f"out_dtype must be bfloat16 or float16 (a torch dtype or its name) for float8 inputs, "
                         f"got {out_dtype!r}")
    return name


def check_descales(descales: dict, query, dtype: str, batch: int, heads_kv: int):
    """``(q, k, v)`` descale factors of FP8 inputs as float32 tensors ``[batch, heads_kv]`` on
    query's device (flash-attn 3's shape; a scalar or one-element tensor is broadcast by a
    stride-0 view), or None for other dtypes, which take none. The true inputs are ``x * descale``
    per (batch, KV head); query head ``h`` uses its KV head's factor. A missing factor is 1.

    Tensor values are never read on the host (no device synchronisation): they must be finite
    and > 0, as quantisation scales are, and that is checked for Python numbers only."""
    given = {n: x for n, x in descales.items() if x is not None}
    if dtype not in FP8_DTYPES:
        if given:
            raise ValueError(f"{', '.join(given)} apply to float8 inputs only; the inputs are {dtype}")
        return None
    import torch

    if not is_torch_tensor(query):
        raise TypeError(f"float8 inputs must be torch tensors, got {array_kind(query, 'query')} arrays")
    dev = query.device
    one = None
    out = []
    for name in _DESCALES:
        x = descales.get(name)
        if x is None:
            if one is None:  # one fill on the device serves every missing factor
                one = torch.ones((1, 1), dtype=torch.float32, device=dev)
            t = one
        elif is_torch_tensor(x):
            if x.dtype != torch.float32:
                raise TypeError(f"{name} must be a float32 tensor, got {x.dtype}")
            if x.device != dev:
                raise ValueError(f"{name} must be on the inputs' device {dev}, got {x.device}")
            if needs_grad(x):
                raise UnsupportedError(f"{name} requires grad, and aule's float8 attention has no backward pass; "
                                       f"pass {name}.detach() or call under torch.no_grad()")
            shape = shape_tuple(x)
            if shape not in ((), (1,), (batch, heads_kv)):
                raise ValueError(f"{name} must have shape [batch, heads_kv] = [{batch}, {heads_kv}] (flash-attn 3's "
                                 f"per-head descale), or be a scalar / one-element tensor for the whole tensor, "
                                 f"got {shape}")
            t = x.detach().reshape(1, 1) if shape != (batch, heads_kv) else x.detach()
        elif isinstance(x, numbers.Real) and not isinstance(x, bool):
            if not (math.isfinite(float(x)) and 0 < float(x) < _F32_OVERFLOW):
                raise ValueError(f"{name} must be finite and > 0 (in float32), got {x!r}")
            t = torch.full((1, 1), float(x), dtype=torch.float32, device=dev)
        else:
            raise TypeError(f"{name} must be a float32 torch tensor, a real number or None, got {type(x).__name__}")
        out.append(t.expand(batch, heads_kv))
    return tuple(out)


def check_fp8_grad(named: dict, dtype: str) -> None:
    """FP8 attention is forward only: inputs that require grad are refused, never silently detached."""
    if dtype in FP8_DTYPES:
        needing = [n for n, x in named.items() if needs_grad(x)]
        if needing:
            raise UnsupportedError(f"{', '.join(needing)} require grad, and aule's float8 attention is forward "
                                   f"only (no backward pass); call under torch.no_grad() or pass .detach()")


def canonicalize(query, key, value, causal=True, scale=None, window_size=-1, return_lse=False,
                 softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None, q_descale=None, k_descale=None,
                 v_descale=None, out_dtype=None) -> AttentionCall:
    """Validate the public arguments once; every error names the argument and the rule."""
    named = {"query": query, "key": key, "value": value}
    kind, device = check_same_family(named)
    for n, x in named.items():
        if len(x.shape) != 4:
            raise ValueError(f"{n} must be 4-D [batch, heads, seq, head_dim], got shape {shape_tuple(x)}")
    dtype = check_float_dtypes(named, fp8=True)
    check_fp8_grad({**named, "sinks": sinks}, dtype)
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
    on_device = checks_on_device(kind, device)
    alibi = check_alibi(alibi_slopes, qs[0], qs[1], on_device)
    sinks = check_sinks(sinks if learned is None else sinks.detach(), qs[1], on_device)
    mask = check_attn_mask(attn_mask, (qs[0], qs[1], qs[2], ks[2]), on_device)
    return AttentionCall(
        q=query, k=key, v=value, kind=kind, device=device, dtype=dtype,
        batch=qs[0], heads_q=qs[1], heads_kv=ks[1], seq_q=qs[2], seq_k=ks[2], head_dim=qs[3],
        scale=check_scale(scale, qs[3]), left=left, right=right, return_lse=bool(return_lse),
        causal=bool(causal), softcap=check_softcap(softcap), alibi=alibi, sinks=sinks, mask=mask,
        sinks_grad=learned, device_values=any(isinstance(x, OnDevice) for x in (alibi, sinks, mask)),
        descale=check_descales(dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale), query, dtype,
                               qs[0], ks[1]),
        out_dtype=check_out_dtype(out_dtype, dtype))


@dataclass
class VarlenCall:
    """A validated variable-length call: sequences packed along dimension 0 of ``q [total_q, Hq, D]``
    and ``k, v [total_k, Hkv, D]``, sequence ``i`` being rows ``cu_q[i]:cu_q[i + 1]`` of q and
    ``cu_k[i]:cu_k[i + 1]`` of k and v, each attended alone.

    ``whole`` is the packed data as one ``[1, H, total, D]`` call, validated once (kinds, dtypes,
    heads, scale, window, features); :meth:`sequence` cuts it into each sequence's own call.
    ``device_values``: some values were left on the device, unread: the features (:class:`OnDevice`)
    or ``cu_q``/``cu_k``, then the caller's torch tensors on q's device. The kernels check them;
    :meth:`on_host` reads and checks them for everything else.
    """

    whole: AttentionCall
    cu_q: Any  # int64 NumPy [batch + 1], or the caller's device tensor (device_values)
    cu_k: Any
    alibi: Any = field(default=None, compare=False, repr=False)  # float32 [batch, heads_q], OnDevice, or None
    max_q: int = 0  # the caller's max_seqlen_q / max_seqlen_k: they size a launch without a read
    max_k: int = 0
    device_values: bool = False
    _host: Any = field(default=None, compare=False, repr=False)  # on_host(), made once

    @property
    def batch(self) -> int:
        return len(self.cu_q) - 1

    @property
    def place(self) -> str:
        return self.whole.place

    def on_host(self) -> "VarlenCall":
        """This call with host offsets and features, checked by the host rules (one read of the
        device); the call itself when nothing is on the device."""
        if not self.device_values:
            return self
        if self._host is None:
            w = self.whole
            self._host = replace(self, whole=w.on_host(), cu_q=check_cu_seqlens(self.cu_q, 0, w.seq_q, self.max_q),
                                 cu_k=check_cu_seqlens(self.cu_k, 1, w.seq_k, self.max_k),
                                 alibi=on_host(self.alibi), device_values=False)
        return self._host

    def sequence(self, i: int) -> AttentionCall:
        """Sequence ``i`` as a dense call on views ``[1, H, len, D]`` of the packed data (no copy)."""
        h = self.on_host()
        q0, q1, k0, k1 = (int(x) for x in (h.cu_q[i], h.cu_q[i + 1], h.cu_k[i], h.cu_k[i + 1]))
        w = h.whole
        return replace(w, q=w.q[:, :, q0:q1], k=w.k[:, :, k0:k1], v=w.v[:, :, k0:k1], seq_q=q1 - q0, seq_k=k1 - k0,
                       alibi=None if h.alibi is None else h.alibi[i:i + 1])

    @property
    def features(self) -> frozenset:
        """The packed call's features, ALiBi included (its slopes are per sequence, so they live here)."""
        return self.whole.features | ({"alibi"} if self.alibi is not None else frozenset())

    @property
    def grad_features(self) -> frozenset:
        return self.whole.grad_features

    def longest(self) -> AttentionCall:
        """The sequence with the most (query, key) pairs: what a backend must serve to serve them all."""
        h = self.on_host()
        lens = np.diff(h.cu_q) * np.diff(h.cu_k)
        return h.sequence(int(np.argmax(lens)))

    def describe(self) -> str:
        return f"varlen {self.batch} sequences, packed {self.whole.describe()}"


def _heads_first(x):
    """``[total, H, D]`` as a ``[1, H, total, D]`` view."""
    return x.transpose(1, 0, 2)[None] if isinstance(x, np.ndarray) else x.transpose(0, 1).unsqueeze(0)


# Each side's names, as the messages of host checks and device errors (Triton's flags) word them.
CU_NAMES = (("cu_seqlens_q", "total_q (q.shape[0])", "max_seqlen_q"), ("cu_seqlens_k", "total_k (k.shape[0])", "max_seqlen_k"))


def cu_seqlens_problem(rule: str, side: int, i: int, value: int, other: int, total: int, max_seqlen: int) -> str:
    """The one wording of a broken cu_seqlens rule (``side`` 0 for q, 1 for k): ``start`` (offset 0
    is ``value``), ``order`` (offset ``i`` is ``value`` < offset ``i - 1`` = ``other``), ``past``
    (offset ``i`` is past the total), ``end`` (the last offset is ``value``), ``long`` (sequence
    ``i``'s length ``value`` exceeds ``max_seqlen``)."""
    name, total_name, max_name = CU_NAMES[side]
    if rule == "start":
        return f"{name} must start at 0, got {name}[0] = {value}"
    if rule == "order":
        return f"{name} must be non-decreasing, got {name}[{i}] = {value} < {name}[{i - 1}] = {other}"
    if rule == "past":
        return f"{name} must end at {total_name} = {total} and never pass it, got {name}[{i}] = {value}"
    if rule == "end":
        return f"{name} must end at {total_name} = {total}, got {name}[-1] = {value}"
    return f"{max_name} = {int(max_seqlen)} is smaller than sequence {i}'s length {value} (from {name})"


def check_cu_seqlens(cu_seqlens, side: int, total: int, max_seqlen, on_device: bool = False):
    """Cumulative sequence starts ``[batch + 1]`` (integers from 0, non-decreasing, ending at ``total``)
    as int64 NumPy, each sequence no longer than ``max_seqlen``; ``side`` 0 for q, 1 for k
    (:data:`CU_NAMES`). ``on_device``: a torch tensor is kept as it is, its values left to the
    kernels' checks (:func:`cu_seqlens_problem` words their errors too); else one host read."""
    name, _, max_name = CU_NAMES[side]
    cu = int_table(cu_seqlens, name, 1)
    if cu.shape[0] == 0:
        raise ValueError(f"{name} must hold batch + 1 >= 1 offsets, got none")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) or max_seqlen < 0:
        raise ValueError(f"{max_name} must be a non-negative int, got {max_seqlen!r}")
    if on_device and is_torch_tensor(cu):
        return cu
    cu = (cu.cpu().numpy() if is_torch_tensor(cu) else np.asarray(cu)).astype(np.int64)

    def fail(rule, i=0, value=0, other=0):
        raise ValueError(cu_seqlens_problem(rule, side, i, int(value), int(other), total, max_seqlen))
    if cu[0] != 0:
        fail("start", 0, cu[0])
    lens = np.diff(cu)
    if (lens < 0).any():
        i = int(np.argmax(lens < 0))
        fail("order", i + 1, cu[i + 1], cu[i])
    if cu[-1] != total:
        fail("end", len(cu) - 1, cu[-1])
    if lens.size and lens.max() > max_seqlen:
        i = int(np.argmax(lens))
        fail("long", i, lens[i])
    return cu


def canonicalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                        window_size=-1, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False,
                        sinks=None) -> VarlenCall:
    """Validate the public arguments of :func:`aule.flash_attention_varlen` once."""
    named = {"q": q, "k": k, "v": v}
    kind, device = check_same_family(named)
    if kind == "gpu":
        raise TypeError("flash_attention_varlen takes NumPy arrays or torch tensors, not GpuTensors")
    check_float_dtypes(named)  # float8 (dense only, for now) is refused here, before packing
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
    # Offsets stay on the device only when both are tensors there: a host copy costs no synchronisation.
    on_device = (checks_on_device(kind, device)
                 and all(is_torch_tensor(c) and device_of(c) == device for c in (cu_seqlens_q, cu_seqlens_k)))
    cu_q = check_cu_seqlens(cu_seqlens_q, 0, qs[0], max_seqlen_q, on_device)
    cu_k = check_cu_seqlens(cu_seqlens_k, 1, ks[0], max_seqlen_k, on_device)
    if len(cu_q) != len(cu_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe one batch, got {len(cu_q) - 1} and "
                         f"{len(cu_k) - 1} sequences")
    whole = canonicalize(_heads_first(q), _heads_first(k), _heads_first(v), causal, scale, window_size, return_lse,
                         softcap=softcap, sinks=sinks)
    alibi = check_alibi(alibi_slopes, len(cu_q) - 1, qs[1], checks_on_device(kind, device))
    return VarlenCall(whole=whole, cu_q=cu_q, cu_k=cu_k, alibi=alibi, max_q=int(max_seqlen_q), max_k=int(max_seqlen_k),
                      device_values=on_device or whole.device_values or isinstance(alibi, OnDevice))

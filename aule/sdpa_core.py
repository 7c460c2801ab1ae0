"""The torch side of aule's SDPA service, shared by the drop-in (:mod:`aule.torch_sdpa`) and the
framework glue (:mod:`aule.integrations.huggingface`): what aule can serve of an SDPA-shaped call,
the SDPA <-> aule mask convention, the custom op that carries host attention through
``torch.compile``, and :func:`attend`, which validates and routes each call once.

Both front doors import this module and neither imports the other, so there is no import loop.

Two conventions meet here. SDPA's ``is_causal`` is top-left aligned (row ``i`` sees keys
``j <= i``); aule's ``causal`` is bottom-right aligned (row ``i`` sits at key position
``i + seq_k - seq_q``). :func:`sdpa_window` converts one into the other exactly.

On CPU tensors the aule path is the custom op ``aule::host_attention`` (``aule::host_attention_lse``
with the LSE; fake implementations for both), so ``torch.compile`` traces it as one opaque node
instead of breaking the graph on NumPy or Vulkan code. CUDA tensors go through the Triton backend,
whose own custom op carries the backward pass. Both take aule's features (softcap, ALiBi slopes,
sinks, an SDPA mask); :func:`traced_attention` is the one place a traced call picks its op.
"""
from __future__ import annotations

import logging
import numbers
import threading
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from . import masks, routing, settings, speed_table
from .call import canonicalize, check_scale, check_softcap, feature_dtype, host_feature, needs_grad, scale_problem
from .errors import UnsupportedError

log = logging.getLogger("aule")

_ORIGINAL_SDPA = F.scaled_dot_product_attention
_HOST_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _State:
    """What install() chose (:mod:`aule.torch_sdpa` writes it); read by every call."""

    def __init__(self):
        self.lock = threading.Lock()
        self.installed = False
        self.backend: str | None = None
        self.verbose = False
        self.logged: set = set()
        self.handler: logging.Handler | None = None
        self.saved_level: int | None = None


_state = _State()


def original_sdpa():
    """The SDPA function torch shipped (what ``uninstall()`` restores)."""
    return _ORIGINAL_SDPA


# --------------------------------------------------------------------------------------------
# logging, once per reason

def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _note(key: tuple, message: str, *args, route: bool = False) -> None:
    """Log ``message`` once per ``key``. Fallback reasons always log (INFO); the routes aule itself
    took only with ``verbose=True``. Nothing is logged while Dynamo traces (a logger call there
    would break the graph, and the eager call before compiling has logged it already)."""
    if _compiling():
        return
    if route and not _state.verbose:
        return
    _log_once(key, message, *args)


def _log_once(key: tuple, message: str, *args) -> None:
    if key in _state.logged:
        return
    _state.logged.add(key)
    log.info(message, *args)


def _shape_class(q, k, is_causal) -> str:
    kind = "mha" if q.shape[-3] == k.shape[-3] else f"gqa{q.shape[-3] // max(1, k.shape[-3])}"
    return (f"{q.dim()}-D {str(q.dtype).replace('torch.', '')} {q.device.type} head_dim {q.shape[-1]} "
            f"{kind} {'causal' if is_causal else 'full'}")


# --------------------------------------------------------------------------------------------
# the SDPA <-> aule convention

def sdpa_window(seq_q: int, seq_k: int, is_causal: bool) -> tuple[int, int, int]:
    """Express SDPA's mask as aule's ``(left, right)`` window over the first ``keys`` keys.

    Returns ``(keys, left, right)``. Top-left causal hides keys ``j > i``; with bottom-right
    positions ``pos(i) = i + seq_k - seq_q`` that is ``j <= pos(i) + (seq_q - seq_k)``, a right
    bound of ``seq_q - seq_k``. It is negative when ``seq_k > seq_q``, which aule's window cannot
    say; but then keys at ``j >= seq_q`` are hidden from every row, so dropping them makes
    ``seq_k == seq_q`` and the right bound 0. No row loses all its keys in top-left causal, so
    SDPA never produces an empty row here and neither does aule.
    """
    if not is_causal:
        return seq_k, -1, -1
    keys = min(seq_k, seq_q)
    return keys, -1, seq_q - keys


# --------------------------------------------------------------------------------------------
# the custom op that carries host (Vulkan / NumPy) attention through torch.compile

def _window_mask(seq_q, seq_k, left, right, device):
    """Boolean ``[seq_q, seq_k]`` mask of aule's rule (see aule.masks), built with torch ops so
    it traces under torch.compile."""
    pos = torch.arange(seq_q, device=device)[:, None] + (seq_k - seq_q)
    j = torch.arange(seq_k, device=device)[None, :]
    ok = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if left >= 0:
        ok = ok & (j >= pos - left)
    if right >= 0:
        ok = ok & (j <= pos + right)
    return ok


def sdpa_reference(q, k, v, scale, left, right, attn_mask=None):
    """aule's attention in plain torch ops: the bottom-right ``(left, right)`` window on 4-D inputs
    (GQA allowed) and an SDPA ``attn_mask`` as :func:`aule.masks.apply_attn_mask` reads it, rows by
    aule.masks' rule, differentiable. O(seq_q * seq_k) memory, as torch's math SDPA.

    Not torch's SDPA itself: its CPU flash kernel turns a row with a NaN score into zeros, and its
    math kernel adds the mask as a -inf bias, so a NaN in a hidden key still makes the row NaN.
    Here hidden scores are replaced, and rows whose maximum is -inf (no key seen, or only -inf
    scores) give zeros."""
    sq, sk = q.shape[-2], k.shape[-2]
    if sk == 0:
        return q.new_zeros(q.shape)
    group = q.shape[-3] // k.shape[-3]
    k, v = (t.repeat_interleave(group, dim=-3) if group > 1 else t for t in (k, v))
    # Scores in float32 at least, as every backend computes them.
    wide = torch.promote_types(q.dtype, torch.float32)
    s = torch.matmul(q.to(wide), k.to(wide).transpose(-1, -2)) * scale
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:  # -inf entries hide their keys whatever the score (aule.masks)
            s = (s + attn_mask).masked_fill(attn_mask == float("-inf"), float("-inf"))
    if left >= 0 or right >= 0:
        s = s.masked_fill(~_window_mask(sq, sk, left, right, q.device), float("-inf"))
    empty = s.amax(dim=-1, keepdim=True) == float("-inf")  # amax keeps NaN: NaN rows stay NaN
    out = torch.matmul(torch.softmax(s, dim=-1), v.to(wide)).masked_fill(empty, 0.0)
    return out.to(q.dtype)


class _Handoff(threading.local):
    """The call :func:`attend` validated and routed, handed to the custom op it invokes next, so
    an eager call is not validated and routed a second time inside the op."""

    call = None
    backend = None


_handoff = _Handoff()


def _take_routed(query, key, value):
    """``(call, backend)`` when the op runs on exactly the tensors :func:`attend` just routed."""
    call, b = _handoff.call, _handoff.backend
    _handoff.call = _handoff.backend = None
    if call is not None and call.q is query and call.k is key and call.v is value:
        return call, b
    return None


def _host_run(query, key, value, scale, left, right, backend, return_lse, attn_mask, softcap, alibi_slopes,
              sinks):
    """``(out, lse)`` of the host ops: the call :func:`attend` routed (eager), or validated
    (``call.canonicalize``, so errors name the argument) and routed here, when a compiled graph runs.
    When the backend turns a call down at run time (a compiled graph cannot ask first), plain
    attention and masks are computed in torch ops (:func:`sdpa_reference`); softcap, ALiBi and
    sinks, which those lack, are never dropped: the refusal is raised."""
    routed = _take_routed(query, key, value)
    features = dict(attn_mask=attn_mask, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
    try:
        if routed is not None:
            call, b = routed
            out, lse = b.run("attention", call)
        else:  # a compiled graph: validated and routed here, for the first time
            out, lse = routing.attention(query, key, value, False, scale, (left, right), backend or None,
                                         return_lse, **features)
    except UnsupportedError as exc:
        scored = (routed[0].features - {"mask", "general_mask"}) if routed is not None else (
            softcap or alibi_slopes is not None or sinks is not None)
        if return_lse or scored:
            raise
        _note(("host-op-unsupported", str(exc)), "aule: host attention falls back to torch SDPA: %s", exc)
        out, lse = sdpa_reference(query, key, value, scale, left, right, attn_mask), None
    # A custom op may not return a view of (or the same storage as) its inputs.
    return out.contiguous(), (lse.contiguous() if return_lse else None)


@torch.library.custom_op("aule::host_attention", mutates_args=())
def host_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                   left: int, right: int, backend: str, attn_mask: Optional[torch.Tensor] = None,
                   softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                   sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward-only attention on CPU tensors through aule's host backends (Vulkan or NumPy).

    ``backend`` is a backend name or ``""`` for aule's auto routing; ``attn_mask`` an SDPA mask
    (bool or float), ``softcap`` (0 for none), ``alibi_slopes`` and ``sinks`` aule's features
    (:func:`aule.flash_attention`), each ``None`` when unused. See :func:`_host_run`.
    """
    return _host_run(query, key, value, scale, left, right, backend, False, attn_mask, softcap, alibi_slopes,
                     sinks)[0]


@host_attention.register_fake
def _host_attention_fake(query, key, value, scale, left, right, backend, attn_mask=None, softcap=0.0,
                         alibi_slopes=None, sinks=None):
    return query.new_empty(query.shape)


@torch.library.custom_op("aule::host_attention_lse", mutates_args=())
def host_attention_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                       left: int, right: int, backend: str, attn_mask: Optional[torch.Tensor] = None,
                       softcap: float = 0.0, alibi_slopes: Optional[torch.Tensor] = None,
                       sinks: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`host_attention` with the float32 log-sum-exp, for ``aule.flash_attention(...,
    return_lse=True)`` inside a compiled graph."""
    return _host_run(query, key, value, scale, left, right, backend, True, attn_mask, softcap, alibi_slopes,
                     sinks)


@host_attention_lse.register_fake
def _host_attention_lse_fake(query, key, value, scale, left, right, backend, attn_mask=None, softcap=0.0,
                             alibi_slopes=None, sinks=None):
    return query.new_empty(query.shape), query.new_empty(query.shape[:3], dtype=torch.float32)


_TRITON_NAMES = ("triton", "triton-amd")


def _traced_tensor(x, name: str):
    """A feature's array as a tensor in a traced graph (a NumPy array becomes a constant); anything
    else is call.feature_dtype's TypeError naming it. Any device, as in eager calls."""
    if isinstance(x, np.ndarray):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor):
        feature_dtype(x, name)  # raises
    return x


def _refuse_grad(x, name: str) -> None:
    """call.host_feature's refusal of a feature that requires grad, which a traced call meets here:
    the ops give no gradient for it (only Triton's, for sinks)."""
    if needs_grad(x):
        host_feature(x, name, False)  # raises before reading


def _traced_slopes(alibi_slopes, q):
    """ALiBi slopes (``[heads_q]`` or ``[batch, heads_q]``) as the float32 ``[batch, heads_q]``
    Triton's op reads, in torch ops. Only their shape and dtype are checked here: reading their
    values back (call.check_alibi's finiteness check) would stall the device on every step."""
    s = _traced_tensor(alibi_slopes, "alibi_slopes")
    _refuse_grad(s, "alibi_slopes")
    b, hq = q.shape[0], q.shape[1]
    if tuple(s.shape) not in ((hq,), (b, hq)):
        raise ValueError(f"alibi_slopes must have shape [heads_q] = [{hq}] or [batch, heads_q] = [{b}, {hq}], "
                         f"got {tuple(s.shape)}")
    if not s.dtype.is_floating_point:
        raise TypeError(f"alibi_slopes must hold floats, got dtype {str(s.dtype).replace('torch.', '')}")
    return s.to(q.device, torch.float32).expand(b, hq).contiguous()


def _traced_sinks(sinks, q):
    """Sinks as the float32 ``[heads_q]`` Triton's op reads, in torch ops, so a learned tensor keeps
    its gradient through the op. Shape and dtype are checked here, not values (as for slopes)."""
    s = _traced_tensor(sinks, "sinks")
    hq = q.shape[1]
    if not s.dtype.is_floating_point:
        raise TypeError(f"sinks must hold floats (one logit per query head), got dtype "
                        f"{str(s.dtype).replace('torch.', '')}")
    if tuple(s.shape) != (hq,):
        raise ValueError(f"sinks must have shape [heads_q] = [{hq}], got {tuple(s.shape)}")
    return s.to(q.device, torch.float32).contiguous()


def _triton_traced(q, k, v, scale, left, right, softcap, alibi_slopes, sinks, attn_mask):
    """``(out, lse)`` from Triton's differentiable op in a traced graph: softcap and sinks as they
    are (sinks keep their gradient), slopes and sinks in the op's form, an attn_mask as the caller
    gave it (the op analyses it when the graph runs)."""
    from .backends.triton import ops  # noqa: F401  (registers aule::triton_attention_fwd)

    alibi = None if alibi_slopes is None else _traced_slopes(alibi_slopes, q)
    sinks = None if sinks is None else _traced_sinks(sinks, q)
    if attn_mask is not None:
        attn_mask = _traced_tensor(attn_mask, "attn_mask")
        _refuse_grad(attn_mask, "attn_mask")
    return torch.ops.aule.triton_attention_fwd(q, k, v, scale, left, right, softcap, alibi, sinks, None, None,
                                               attn_mask)


def traced_attention(q, k, v, causal, scale, window_size, backend, return_lse, softcap=0.0, alibi_slopes=None,
                     sinks=None, attn_mask=None):
    """``aule.flash_attention`` on torch tensors inside ``torch.compile``: one custom op in the graph.
    aule's routing (backend probes, locks, caches) cannot be traced, so the window, scale and
    softcap are checked here and the op validates and routes the rest when the graph runs: on CPU
    tensors a host op (Vulkan or NumPy, as eager calls), on CUDA Triton's differentiable op."""
    left, right = masks.canonical_window(causal, window_size)
    scale = check_scale(scale, q.shape[-1])
    softcap = check_softcap(softcap)
    forced = backend or ""
    if q.device.type == "cpu":
        if routing.tensors_need_grad(q, k, v):
            raise UnsupportedError("aule's CPU backends (Vulkan, NumPy) have no backward pass: the inputs "
                                   "require grad (use CUDA tensors for Triton, or torch.no_grad())")
        features = dict(attn_mask=attn_mask, softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks)
        for name, x in features.items():
            if name != "softcap" and x is not None:
                features[name] = _traced_tensor(x, name)
                _refuse_grad(features[name], name)
        if return_lse:
            return host_attention_lse(q, k, v, scale, left, right, forced, **features)
        return host_attention(q, k, v, scale, left, right, forced, **features)
    if forced not in ("",) + _TRITON_NAMES:
        raise UnsupportedError(f"inside torch.compile aule serves {q.device.type} tensors through Triton's "
                               f"custom op only, not backend {backend!r}")
    out, lse = _triton_traced(q, k, v, scale, left, right, softcap, alibi_slopes, sinks, attn_mask)
    return (out, lse) if return_lse else out


# --------------------------------------------------------------------------------------------
# routing

def _routed(q, k, v, scale, left, right, forced, attn_mask, softcap=0.0, sinks=None):
    """The validated call and the backend aule would use for it, or ``(None, None, reason)``."""
    call = canonicalize(q, k, v, False, scale, (left, right), attn_mask=attn_mask, softcap=softcap, sinks=sinks)
    try:
        return call, routing.route(call, "attention", forced), None
    except UnsupportedError as exc:
        return call, None, str(exc)


def _run_on_host(call, b, scale, left, right, attn_mask):
    """Eager host attention through the custom op, which reuses this call and backend (its
    softcap and sinks included)."""
    _handoff.call, _handoff.backend = call, b
    try:
        return host_attention(call.q, call.k, call.v, scale, left, right, b.name, attn_mask=attn_mask)
    finally:
        _handoff.call = _handoff.backend = None


def attend(q, k, v, scale: float, left: int, right: int, label: str, attn_mask=None, softcap: float = 0.0,
           sinks=None):
    """aule attention on 4-D ``q [B,Hq,Sq,D]``, ``k, v [B,Hkv,Sk,D]`` with aule's bottom-right
    ``(left, right)`` window, an SDPA ``attn_mask`` (checked by :func:`_unservable`), ``softcap`` and
    ``sinks`` (aule.masks), or ``None`` (with the reason logged once) when aule cannot serve it
    exactly, gradients included, or where torch's own SDPA was measured faster for the call's
    class on this GPU (:func:`prefers_torch`; without a forced backend, softcap or sinks).
    ``label`` names the caller's shape class for the log. Each call is validated and routed
    once."""
    forced = _state.backend
    needs_grad = routing.tensors_need_grad(q, k, v)
    device = q.device.type
    if device not in ("cpu", "cuda"):
        _note(("fallback", "device", device), "aule: no aule backend for %s tensors; torch SDPA serves them",
              device)
        return None
    if forced is None and not softcap and sinks is None and prefers_torch(q, k, left, right, needs_grad,
                                                                          attn_mask is not None, label):
        return None
    if _compiling():
        # aule's Python routing is not traceable: compiled graphs get one custom op, chosen from
        # what the eager checks below would pick.
        if device == "cpu":
            if needs_grad or (sinks is not None and routing.tensors_need_grad(sinks)):
                return None
            return host_attention(q, k, v, scale, left, right, forced or "", attn_mask=attn_mask, softcap=softcap,
                                  sinks=sinks)
        if not _TRITON_OP or forced not in (None,) + _TRITON_NAMES or q.shape[-1] > _TRITON_MAX_HEAD_DIM:
            return None
        return _triton_traced(q, k, v, scale, left, right, softcap, None, sinks, attn_mask)[0]
    call, b, why = _routed(q, k, v, scale, left, right, forced, attn_mask, softcap, sinks)
    if b is None:
        _note(("fallback", "unsupported", why), "aule: falling back to torch SDPA: %s", why)
        return None
    if device == "cuda" and b.name == "numpy" and forced is None:
        _note(("fallback", "no-gpu-backend"), "aule: no GPU backend serves %s here; torch SDPA is faster "
              "than a round trip through the host", label)
        return None
    if needs_grad:
        if not b.differentiable:
            _note(("fallback", "grad", b.name), "aule: backend %s has no backward pass; torch SDPA serves "
                  "calls that need gradients", b.name)
            return None
        out = b.run("attention", call)[0]
        if out.grad_fn is None:
            # Never hand back a result whose gradient would silently be missing.
            log.warning("aule: backend %s returned no autograd graph for a call that needs gradients; "
                        "recomputing with torch SDPA", b.name)
            return None
    elif device == "cpu":
        out = _run_on_host(call, b, scale, left, right, attn_mask)
    else:
        out = b.run("attention", call)[0]
    _note(("route", b.name, label), "aule: %s -> %s%s", label, b.name, " (with gradients)" if needs_grad else "",
          route=True)
    return out


_GPU_NAMES: dict = {}
_DECISIONS: dict = {}


def gpu_name(device) -> str | None:
    """The model name of a CUDA device as the speed table keys it, or ``None`` for other devices
    (and, inside a trace, for a device no eager call or ``install()`` has named yet). Cached per
    device index: torch asks the driver each time."""
    if device.type != "cuda":
        return None
    index = device.index
    if _compiling():
        return _GPU_NAMES.get(index)
    if index is None:
        index = torch.cuda.current_device()
    name = _GPU_NAMES.get(index)
    if name is None:
        name = _GPU_NAMES[index] = torch.cuda.get_device_name(index)
    return name


def call_class(q, k, left: int, right: int, needs_grad: bool, masked: bool) -> tuple:
    """The fields of the speed table's class of a 4-D call with aule's bottom-right ``(left, right)``
    window (:func:`aule.speed_table.bucketed`; plain values even for symbolic sizes). A call that
    needs gradients is a training step, so its forward+backward class decides."""
    return speed_table.bucketed("fwd+bwd" if needs_grad else "fwd", str(q.dtype).replace("torch.", ""),
                                q.shape[-1], k.shape[-2], right >= 0, q.shape[-3] // max(1, k.shape[-3]),
                                "mask" if masked else ("window" if left >= 0 else "none"))


def decision(gpu: str, fields: tuple) -> speed_table.Decision:
    """The speed table's :class:`~aule.speed_table.Decision` for a class on a GPU (cached)."""
    d = _DECISIONS.get((gpu, fields))
    if d is None:
        d = _DECISIONS[(gpu, fields)] = speed_table.decide(gpu, speed_table.ShapeClass(*fields))
    return d


def _enabled() -> bool:
    return settings.forced_backend() is None and settings.prefer_torch()


def _traced_prefers_torch(gpu: str, fields: tuple) -> bool:
    # Run in plain Python when Dynamo traces, its answer a constant of the graph: the table, the
    # device and the AULE_* settings are fixed for the life of a compiled graph. Logging here is
    # safe (nothing of it is traced), so a model compiled before any eager call still says why.
    if not _enabled():
        return False
    d = decision(gpu, fields)
    if d.use_torch:
        _log_once(("prefer-torch", gpu, fields), "aule: torch SDPA serves %s in compiled graphs: %s", d.cls.key,
                  d.why())
    return d.use_torch


_traced_prefers_torch = getattr(torch.compiler, "assume_constant_result", lambda f: f)(_traced_prefers_torch)


def prefers_torch(q, k, left: int, right: int, needs_grad: bool, masked: bool, label: str = "") -> bool:
    """Whether this call goes to torch's own SDPA because the speed table measured torch faster for
    its class on this GPU (logged once per class, with the ratio and where it was measured).
    Off with AULE_PREFER_TORCH=0 or a forced AULE_BACKEND; the caller leaves out forced backends
    and calls with softcap or sinks, which torch's SDPA lacks. Inside ``torch.compile`` the answer
    is fixed when the graph is traced, over the whole bucket of each size."""
    gpu = gpu_name(q.device)
    if gpu is None:
        return False
    fields = call_class(q, k, left, right, needs_grad, masked)
    if _compiling():
        return _traced_prefers_torch(gpu, fields)
    if not _enabled():
        return False
    d = decision(gpu, fields)
    if d.use_torch:
        _note(("prefer-torch", gpu, fields), "aule: torch SDPA serves %s: %s", label or d.cls.key, d.why())
    return d.use_torch


def _triton_op():
    """Triton's differentiable custom op, loaded outside any trace (``None`` when Triton or a GPU is
    missing)."""
    global _TRITON_OP, _TRITON_MAX_HEAD_DIM
    if _TRITON_OP is None and not _compiling():
        try:
            from .backends.triton import ops  # noqa: F401  (registers the op)
            from .backends.triton.common import MAX_HEAD_DIM

            _TRITON_OP = torch.ops.aule.triton_attention_fwd
            _TRITON_MAX_HEAD_DIM = MAX_HEAD_DIM
        except Exception as exc:  # no triton, no GPU build: the eager route says why
            _TRITON_OP = False
            log.debug("aule: Triton custom op unavailable: %s", exc)
    return _TRITON_OP or None


_TRITON_OP = None
_TRITON_MAX_HEAD_DIM = 0


def _plain(t) -> bool:
    """An ordinary dense tensor: aule reads its storage directly, which tensor subclasses (DTensor,
    NestedTensor), sparse layouts and torch.func's wrapped tensors do not allow."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided or t.is_nested:
        return False
    return not torch._C._functorch.is_functorch_wrapped_tensor(t)


def _unservable(query, key, value, attn_mask, dropout_p, scale, enable_gqa, is_causal=False) -> str | None:
    """Why aule cannot serve this SDPA call (a reason key), or ``None``. Reads metadata only."""
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)):
        return "inputs are not tensors"
    if not _compiling() and not all(_plain(t) for t in (query, key, value)):
        return "nested, sparse, subclassed or functorch-wrapped tensors"
    if dropout_p != 0.0:
        return "dropout_p > 0"
    nd = query.dim()
    if nd not in (3, 4) or key.dim() != nd or value.dim() != nd:
        return "inputs are not all 3-D or all 4-D"
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-1] != value.shape[:-1]:
        return "batch dimensions broadcast or key/value shapes differ"
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        return "value head_dim differs from query/key head_dim"
    hq, hk = query.shape[-3], key.shape[-3]
    if hq != hk and (not enable_gqa or hk == 0 or hq % hk != 0):
        return "heads differ without enable_gqa, or do not divide"
    if query.numel() == 0 or key.numel() == 0:
        return "an empty dimension"
    if not (query.dtype == key.dtype == value.dtype):
        return "mixed dtypes"
    if not (query.device == key.device == value.device):
        return "mixed devices"
    if query.dtype not in (_CUDA_DTYPES if query.device.type == "cuda" else _HOST_DTYPES):
        return f"dtype {query.dtype}"
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
            return "scale is not a real number"
        problem = scale_problem(float(scale))
        if problem:
            return "scale " + problem
    return None if attn_mask is None else _unservable_mask(attn_mask, query, key, is_causal)


def _unservable_mask(attn_mask, query, key, is_causal) -> str | None:
    """Why aule cannot serve this SDPA ``attn_mask`` (a reason key), or ``None``: what torch refuses
    (its errors stay its own) and what aule cannot take without losing a gradient."""
    if not isinstance(attn_mask, torch.Tensor) or (not _compiling() and not _plain(attn_mask)):
        return "attn_mask is not a plain tensor"
    if is_causal:
        return "attn_mask with is_causal"
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        return "attn_mask dtype is neither bool, float32 nor the query's"
    if attn_mask.device != query.device:
        return "attn_mask on another device"
    target = tuple(query.shape[:-1]) + (key.shape[-2],)
    if attn_mask.dim() > len(target) or any(m not in (1, n) for m, n in zip(attn_mask.shape[::-1], target[::-1])):
        return "attn_mask does not broadcast to the scores"
    if attn_mask.requires_grad and torch.is_grad_enabled():
        return "attn_mask requires grad"
    return None



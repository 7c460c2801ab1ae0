"""Correctness before timing: references and the relative error every row reports.

Small problems on the CPU are checked against :func:`aule.reference.attention_reference`, the
float64 oracle. Problems too big for it (it materialises every score in float64) are checked
against a blocked explicit softmax in torch: float64 on the CPU, float32 on a GPU with TF32 off.
Both take visibility from :mod:`aule.masks`, so "correct" means one thing everywhere.
"""
from __future__ import annotations

import math

import numpy as np

from .. import masks

# Relative L2 error allowed per input dtype (forward; backward gets twice as much). float32 leaves
# room for TF32 matrix units, which Triton uses by default for float32 dots.
# float8: the rounding of P to e4m3 for the P.V product (3 mantissa bits, up to 2**-4 relative per
# entry) leaves 1.5-3% relative L2 error on exact inputs (measured in tests/test_triton_fp8.py), whatever
# the sequence length, as the errors average like the output does; twice that.
TOLERANCE = {"float64": 1e-9, "float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2, "float8_e4m3fn": 6e-2}
# Largest B*Hq*Sq*Sk the float64 oracle gets (it holds several float64 arrays of that size).
ORACLE_MAX_SCORES = 2**25
# Scores per block of the blocked reference (float32: 1 GiB).
BLOCK_SCORES = 2**28


def tolerance(dtype: str, backward: bool = False) -> float:
    return TOLERANCE[dtype] * (2 if backward else 1)


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64; inf when ``out`` has a NaN or Inf (never passes)."""
    a = _as_f64(out)
    b = _as_f64(ref)
    if a.shape != b.shape:
        raise ValueError(f"output shape {a.shape} differs from the reference's {b.shape}")
    if not np.isfinite(a).all():
        return math.inf
    den = np.linalg.norm(b)
    num = np.linalg.norm(a - b)
    return float(num / den) if den > 0 else float(num)


def _as_f64(x):
    if isinstance(x, np.ndarray):
        return x.astype(np.float64, copy=False)
    return x.detach().to("cpu").double().numpy()


def rel_err_torch(out, ref) -> float:
    """The same measure computed on the device (big GPU tensors are not copied to the host)."""
    import torch

    a = out.detach().double()
    b = ref.detach().to(a.device).double()
    if not torch.isfinite(a).all():
        return math.inf
    den = torch.linalg.vector_norm(b).item()
    num = torch.linalg.vector_norm(a - b).item()
    return num / den if den > 0 else num


def oracle_fits(b, hq, sq, sk) -> bool:
    return b * hq * sq * sk <= ORACLE_MAX_SCORES


def oracle(q, k, v, causal, window, scale=None, **features):
    """float64 output of the project's oracle on NumPy copies of the inputs; ``features`` are
    :func:`aule.flash_attention`'s (``softcap``, ``alibi_slopes``, ``sinks``, ``attn_mask``)."""
    from ..reference import attention_reference

    return attention_reference(_as_f64(q), _as_f64(k), _as_f64(v), causal=causal,
                               window_size=window, scale=scale, **features)


def blocked_reference(q, k, v, causal, window, scale=None, compute_dtype=None, grad_out=None, *,
                      softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None):
    """Exact attention of torch tensors by blocks of query rows, each over only the keys
    :func:`aule.masks.key_range` lets it see, with softmax over the whole visible range at once.

    Returns ``out`` (and ``(dq, dk, dv)`` when ``grad_out`` is given, by autograd per block, so
    memory stays one block's scores). K/V are indexed per query-head group, never expanded.
    The features mean what they mean in :func:`aule.reference.attention_reference`, in its order
    (softcap, ALiBi, then the masks; sinks join each row's denominator); ``attn_mask`` is boolean.
    """
    import torch

    left, right = masks.canonical_window(causal, window)
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    g = hq // hk
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.device.type == "cpu" else torch.float32
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    dev = q.device
    qc = q.detach().to(compute_dtype).reshape(b, hk, g, sq, d)
    kc = k.detach().to(compute_dtype)
    vc = v.detach().to(compute_dtype)
    out = torch.zeros((b, hk, g, sq, d), dtype=compute_dtype, device=dev)
    want_grad = grad_out is not None
    if want_grad:
        goc = grad_out.detach().to(compute_dtype).reshape(b, hk, g, sq, d)
        dq = torch.zeros_like(qc)
        dk = torch.zeros_like(kc)
        dv = torch.zeros_like(vc)
    feat = _torch_features(torch, dev, compute_dtype, b, hk, g, sq, sk, alibi_slopes, sinks, attn_mask)
    block = max(1, min(sq, BLOCK_SCORES // max(1, b * hq * sk)))
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the reference must be true float32
    try:
        for q0 in range(0, sq, block):
            q1 = min(sq, q0 + block)
            lo, hi = masks.key_range(q0, q1, sq, sk, left, right)
            if lo >= hi:
                continue  # rows that see no key stay zero, as the contract says
            vis = masks.visible(np.arange(q0, q1)[:, None], np.arange(lo, hi)[None, :], sq, sk, left, right)
            hidden = torch.from_numpy(~vis).to(dev)
            with torch.enable_grad() if want_grad else torch.no_grad():
                qb = qc[:, :, :, q0:q1].clone().requires_grad_(want_grad)
                kb = kc[:, :, lo:hi].clone().requires_grad_(want_grad)
                vb = vc[:, :, lo:hi].clone().requires_grad_(want_grad)
                s = torch.matmul(qb, kb.unsqueeze(2).transpose(-1, -2)) * scale  # [b,hk,g,bq,bk]
                if softcap:
                    s = softcap * torch.tanh(s / softcap)
                if feat["slopes"] is not None:
                    pos = torch.arange(q0, q1, device=dev)[:, None] + (sk - sq)
                    dist = (pos - torch.arange(lo, hi, device=dev)[None, :]).abs().to(compute_dtype)
                    s = s - feat["slopes"] * dist
                if feat["mask"] is not None:
                    shown = feat["mask"][:, :, q0:q1, lo:hi].reshape(b, hk, g, q1 - q0, hi - lo)
                    hidden = hidden | ~shown
                s = s.masked_fill(hidden, float("-inf"))
                m = s.amax(dim=-1, keepdim=True)
                if feat["sinks"] is not None:
                    m = torch.maximum(m, feat["sinks"])
                m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
                p = torch.exp(s - m)
                l = p.sum(dim=-1, keepdim=True)
                if feat["sinks"] is not None:
                    l = l + torch.exp(feat["sinks"] - m)  # a key of value zero: the sum only
                ob = torch.matmul(p, vb.unsqueeze(2)) / torch.where(l > 0, l, torch.ones_like(l))
            out[:, :, :, q0:q1] = ob.detach()
            if want_grad:
                gq, gk, gv = torch.autograd.grad(ob, (qb, kb, vb), goc[:, :, :, q0:q1])
                dq[:, :, :, q0:q1] = gq
                dk[:, :, lo:hi] += gk
                dv[:, :, lo:hi] += gv
            del s, p
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    out = out.reshape(b, hq, sq, d)
    if want_grad:
        return out, (dq.reshape(b, hq, sq, d), dk, dv)
    return out


def _torch_features(torch, dev, dtype, b, hk, g, sq, sk, alibi_slopes, sinks, attn_mask) -> dict:
    """The features as tensors shaped to broadcast over ``[b, hk, g, rows, keys]`` score blocks
    (the mask expanded as a view to ``[b, hq, sq, sk]``, never materialised whole)."""

    def tensor(x, dt):
        return torch.as_tensor(np.asarray(_as_f64(x) if dt is not torch.bool else _as_bool(x))).to(dev, dt)

    slopes = None
    if alibi_slopes is not None:
        slopes = tensor(alibi_slopes, dtype).expand(b, hk * g).reshape(b, hk, g, 1, 1)
    sink = None if sinks is None else tensor(sinks, dtype).reshape(1, hk, g, 1, 1)
    mask = None
    if attn_mask is not None:
        mt = tensor(attn_mask, torch.bool)
        mask = mt.reshape((1,) * (4 - mt.dim()) + tuple(mt.shape)).expand(b, hk * g, sq, sk)
    return {"slopes": slopes, "sinks": sink, "mask": mask}


def _as_bool(x):
    if isinstance(x, np.ndarray):
        return x.astype(bool, copy=False)
    return x.detach().to("cpu").numpy().astype(bool, copy=False)

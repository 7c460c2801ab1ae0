"""Rates and comparisons computed from a row's median time, shared by the runner and the tests."""
from __future__ import annotations

import sys

import numpy as np

from . import checks


def attention_flops(p: dict) -> float:
    """4*B*H*Sq*Sk*D, halved for causal (FlashAttention's convention); with a window, or causal over
    more keys than queries (bottom-right: the rows see nearly all keys, not half), 4*B*H*D per
    visible (query, key) pair; x3.5 for forward+backward (backward counted as 2.5 forwards).

    Cases with ``lengths`` count visible pairs only, so a padded or packed batch and the same work
    unpadded are credited alike: ``pack='mask'`` (a key-padding mask) lets batch element b see the
    first ``lengths[b]`` of its keys; ``pack='varlen'`` packs sequences of those lengths, each
    attending to itself."""
    lengths = p.get("lengths")
    causal, window = p["causal"], p.get("window", -1)
    if lengths is None:
        pairs = p["B"] * visible_pairs(p["S"], p.get("Sk", p["S"]), causal, window)
    elif p.get("pack") == "varlen":
        pairs = sum(visible_pairs(n, n, causal, window) for n in lengths)
    else:
        pairs = sum(visible_pairs(p["S"], p.get("Sk", p["S"]), causal, window, n) for n in lengths)
    f = 4.0 * p["Hq"] * p["D"] * pairs
    return f * 3.5 if p.get("mode") == "fwd+bwd" else f


def visible_pairs(sq: int, sk: int, causal: bool, window=-1, key_limit: int | None = None) -> float:
    """(query, key) pairs one head of one sequence computes; ``key_limit``: only keys below it exist
    (a padding mask's prefix)."""
    from .. import masks

    if key_limit is None and window in (-1, None) and (sq == sk or not causal):
        return sq * sk / (2 if causal else 1)
    left, right = masks.canonical_window(causal, window)
    limit = sk if key_limit is None else min(sk, key_limit)
    pairs = 0
    for i in range(sq):
        lo, hi = masks.key_range(i, i + 1, sq, sk, left, right)
        pairs += max(0, min(hi, limit) - lo)
    return pairs


def ref_name(x) -> str:
    if isinstance(x, np.ndarray) or x.device.type == "cpu":
        return "torch float64 (blocked)"
    return "torch float32 (blocked, TF32 off)"


def err(out, ref) -> float:
    if type(out).__name__ == "GpuTensor":
        out = out.numpy()
    if isinstance(out, np.ndarray) or isinstance(ref, np.ndarray):
        return checks.rel_err(out, ref)
    return checks.rel_err_torch(out, ref)


def cuda_cleanup():
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
    elif kind == "train":
        row["tokens_per_s"] = p["B"] * p["S"] / (ms * 1e-3)
    elif kind == "decode":
        row["tbps"] = bytes_read / (ms * 1e-3) / 1e12
        row["tokens_per_s"] = p["B"] / (ms * 1e-3)
    else:
        from .contenders import CONTENDERS

        contender = CONTENDERS.get(row["contender"])
        flops = attention_flops(contender.computes(p) if contender else p)
        row["tflops"] = flops / (ms * 1e-3) / 1e12
        row["gflops"] = row["tflops"] * 1e3


def ratios(res, baseline):
    """Speed-up of each row over its baseline on the same case (>1: faster): the suite's
    ``baseline``, or the one ``res['against']`` names for the row's contender. Rows that also
    carry GPU timestamps beside their wall time (``gpu_ms``) get ``gpu_ratio`` from those."""
    against = res.get("against") or {}
    if not baseline and not against:
        return
    ok = {(r["case"], r["contender"]): r for r in res["rows"] if r["status"] == "ok" and r.get("ms")}
    for (case, contender), r in ok.items():
        base = ok.get((case, against.get(contender, baseline)))
        if base is None:
            continue
        r["ratio"] = base["ms"] / r["ms"]
        if r.get("gpu_ms") and base.get("gpu_ms"):
            r["gpu_ratio"] = base["gpu_ms"] / r["gpu_ms"]


def brief(row, metric) -> str:
    if row["status"] != "ok":
        return row["status"]
    v = row.get(metric)
    return f"{v:.3g} {metric}" if v is not None else "ok"

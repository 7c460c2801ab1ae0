"""Rates and comparisons computed from a row's median time, shared by the runner and the tests."""
from __future__ import annotations

import sys

import numpy as np

from . import checks


def attention_flops(p: dict) -> float:
    """4*B*H*Sq*Sk*D, halved for causal (FlashAttention's convention); with a window, or causal over
    more keys than queries (bottom-right: the rows see nearly all keys, not half), 4*B*H*D per
    visible (query, key) pair; x3.5 for forward+backward (backward counted as 2.5 forwards)."""
    from .. import masks

    sq, sk = p["S"], p.get("Sk", p["S"])
    window = p.get("window", -1)
    if window in (-1, None) and (sq == sk or not p["causal"]):
        pairs = sq * sk / (2 if p["causal"] else 1)
    else:
        left, right = masks.canonical_window(p["causal"], window)
        pairs = 0
        for i in range(sq):
            lo, hi = masks.key_range(i, i + 1, sq, sk, left, right)
            pairs += max(0, hi - lo)
    f = 4.0 * p["B"] * p["Hq"] * p["D"] * pairs
    return f * 3.5 if p.get("mode") == "fwd+bwd" else f



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
    """speed-up of each row over the suite's baseline contender on the same case (>1: faster)."""
    if not baseline:
        return
    base = {r["case"]: r["ms"] for r in res["rows"] if r["contender"] == baseline and r["status"] == "ok"}
    for r in res["rows"]:
        if r["status"] == "ok" and r["case"] in base and r.get("ms"):
            r["ratio"] = base[r["case"]] / r["ms"]


def brief(row, metric) -> str:
    if row["status"] != "ok":
        return row["status"]
    v = row.get(metric)
    return f"{v:.3g} {metric}" if v is not None else "ok"

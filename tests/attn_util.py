"""Shared test helpers: random inputs, tolerances per dtype, comparison against the reference."""
from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

import aule
from aule import backends
from aule.call import canonicalize
from aule.reference import attention_reference

# Max-abs-error tolerances on outputs of O(1) magnitude (softmax-weighted averages of N(0,1) values).
ATOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}
LSE_ATOL = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 2e-2}


def random_qkv(rng, batch, heads_q, heads_kv, seq_q, seq_k, head_dim, dtype=np.float32):
    """Fresh N(0,1) inputs (never zeros: zeros hide unwritten outputs and wrong indexing)."""
    q = rng.standard_normal((batch, heads_q, seq_q, head_dim)).astype(dtype)
    k = rng.standard_normal((batch, heads_kv, seq_k, head_dim)).astype(dtype)
    v = rng.standard_normal((batch, heads_kv, seq_k, head_dim)).astype(dtype)
    return q, k, v


def assert_matches_reference(out, lse, q, k, v, dtype_name, **kw):
    """Compare a backend's (out, lse) with the float64 reference on the same inputs."""
    ref_out, ref_lse = attention_reference(q, k, v, return_lse=True, **kw)
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref_out.shape
    assert not np.isnan(out).any(), "output has NaN"
    err = np.abs(out - ref_out).max() if out.size else 0.0
    assert err <= ATOL[dtype_name], f"max abs error {err:.3g} > {ATOL[dtype_name]} ({dtype_name})"
    if lse is not None:
        lse = np.asarray(lse, dtype=np.float64)
        assert lse.shape == ref_lse.shape
        empty = np.isneginf(ref_lse)
        assert (np.isneginf(lse) == empty).all(), "rows that see no key must have LSE -inf, and only those"
        if (~empty).any():
            lerr = np.abs(lse[~empty] - ref_lse[~empty]).max()
            assert lerr <= LSE_ATOL[dtype_name], f"LSE error {lerr:.3g}"
    return err


def count_calls(monkeypatch, module_name, func_name):
    """Count calls of ``module_name.func_name`` wherever an aule module holds that function."""
    real = getattr(importlib.import_module(module_name), func_name)
    calls = []

    def counting(*args, **kw):
        calls.append(args)
        return real(*args, **kw)

    for name, mod in list(sys.modules.items()):
        if (name == "aule" or name.startswith("aule.")) and getattr(mod, func_name, None) is real:
            monkeypatch.setattr(mod, func_name, counting)
    return calls


def refusal(name, op, call):
    """Why backend ``name`` turns ``call`` down for ``op``, its availability on this machine aside:
    a feature check must hold on machines without the backend's device too."""
    b = backends.get(name)
    b.__dict__["unavailable_reason"] = None  # the cached probe, for this question only
    try:
        return b.why_not(op, call, True)
    finally:
        del b.__dict__["unavailable_reason"]


#: The shape of the inputs :func:`assert_routed_to_numpy` uses: q, k, v [1, 2, 9, 16].
FEATURE_SHAPE = (1, 2, 9, 16)


def assert_routed_to_numpy(feature, refusing=("vulkan", "triton", "triton-amd"), **kw):
    """A call with the keyword features ``kw`` (inputs of :data:`FEATURE_SHAPE`) is served in auto
    mode and matches the reference, while the ``refusing`` backends turn it down naming ``feature``."""
    q = np.random.default_rng(2).standard_normal(FEATURE_SHAPE).astype(np.float32)
    out = aule.flash_attention(q, q, q, **kw)
    assert np.abs(out - attention_reference(q, q, q, **kw)).max() < 2e-5
    call = canonicalize(q, q, q, **kw)
    for name in refusing:
        assert refusal(name, "attention", call) == f"backend {name!r} does not apply {feature} yet"
    if "vulkan" in refusing and backends.get("vulkan").available:
        with pytest.raises(aule.UnsupportedError, match=f"'vulkan' does not apply {feature} yet"):
            aule.flash_attention(q, q, q, backend="vulkan", **kw)

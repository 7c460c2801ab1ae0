"""Helpers for the Vulkan tests: the context or a skip with the reason, and forced variants."""
from __future__ import annotations

import os
from contextlib import contextmanager

import numpy as np
import pytest

# fp16 variants keep Q, K/V and the probabilities in half (fp32 arithmetic from there), so their
# error against the float64 reference is a few half ulps of O(1) outputs.
VARIANT_ATOL = {"baseline": 2e-5, "fast": 2e-5, "fp16": 1e-2, "fp16_amd": 1e-2,
                # fp16 only in memory: the output's own rounding (half ulp of O(1) values) dominates
                "fp16_io": 2e-3,
                # fp16 operands on matrix cores, fp32 accumulation; P rounded to half
                "coopmat": 1e-2,
                "cpu": 2e-5}


def vulkan_context():
    """The process-wide Vulkan context, or skip the test saying why there is none."""
    from aule.backends.vulkan import runtime

    try:
        return runtime.context()
    except Exception as exc:  # no loader, no driver: the machine truly lacks Vulkan
        pytest.skip(f"no usable Vulkan device here: {type(exc).__name__}: {exc}")


@contextmanager
def forced_variant(name):
    old = os.environ.get("AULE_VULKAN_VARIANT")
    os.environ["AULE_VULKAN_VARIANT"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("AULE_VULKAN_VARIANT", None)
        else:
            os.environ["AULE_VULKAN_VARIANT"] = old


def servable_dtype(ctx, variant: str, d: int, seq_q: int, seq_k: int):
    """The NumPy dtype ``variant`` stores (float16 or float32), skipping the test where it cannot run
    head_dim ``d`` and these lengths on the device."""
    from aule.backends.vulkan import VARIANTS

    v = VARIANTS[variant]
    why = v.unfit(d, ctx.info, seq_k, seq_q)
    if why:
        pytest.skip(why)
    return np.float16 if v.elem == "float16" else np.float32


def max_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    assert out.shape == ref.shape
    assert not np.isnan(out).any(), "output has NaN"
    return float(np.abs(out - ref).max()) if out.size else 0.0


@pytest.fixture
def live_buffers(monkeypatch):
    """The set of Vulkan buffers created and not yet destroyed while the test runs (import this
    fixture into a test module to use it)."""
    from aule.backends.vulkan.runtime.memory import Buffer

    live = set()
    init, destroy = Buffer.__init__, Buffer.destroy

    def counting_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        live.add(id(self))

    def counting_destroy(self, *args, **kwargs):
        live.discard(id(self))
        return destroy(self, *args, **kwargs)

    monkeypatch.setattr(Buffer, "__init__", counting_init)
    monkeypatch.setattr(Buffer, "destroy", counting_destroy)
    return live


@pytest.fixture(scope="module")
def ctx():
    """The process-wide Vulkan context (import this fixture into a test module to use it)."""
    return vulkan_context()


@pytest.fixture(autouse=True)
def no_validation_messages(request):
    """Any validation-layer message during a test fails it."""
    if "ctx" not in request.fixturenames:
        yield
        return
    c = request.getfixturevalue("ctx")
    c.take_validation_messages()
    yield
    msgs = c.take_validation_messages()
    assert not msgs, "Vulkan validation messages:\n" + "\n".join(msgs)

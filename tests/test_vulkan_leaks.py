"""Memory-leak checks for the Vulkan runtime: repeated calls must reuse pooled buffers, not grow.

Separate from the correctness tests so a leak shows up as its own failure."""
import gc

import numpy as np
import pytest

import aule

from _vulkan_util import live_buffers, vulkan_context  # noqa: F401 (live_buffers: a fixture)


def _calls(make_inputs, n):
    for _ in range(n):
        q, k, v = make_inputs()
        out = aule.flash_attention(q, k, v, causal=True, backend="vulkan")
        del out, q, k, v
    gc.collect()


@pytest.mark.parametrize("resident", [False, True], ids=["numpy", "gputensor"])
def test_repeated_calls_reuse_buffers(live_buffers, resident):
    ctx = vulkan_context()
    rng = np.random.default_rng(0)
    host = [rng.standard_normal((1, 2, 37, 64)).astype(np.float32) for _ in range(3)]

    def make_inputs():
        return [aule.to_gpu(x) for x in host] if resident else host

    _calls(make_inputs, 5)  # warm-up: the pool gets its buffers
    steady = len(live_buffers)
    cached = sum(p.cached for p in ctx.pools())
    _calls(make_inputs, 60)
    assert len(live_buffers) <= steady, f"{len(live_buffers) - steady} buffers more after 60 calls"
    assert sum(p.cached for p in ctx.pools()) <= cached


def test_freed_gpu_tensors_return_their_memory(live_buffers):
    vulkan_context()
    x = np.ones((4, 256, 1024), np.float32)  # 4 MiB
    for _ in range(30):
        aule.to_gpu(x).free()
    first = len(live_buffers)
    for _ in range(30):
        aule.to_gpu(x).free()
    assert len(live_buffers) <= first

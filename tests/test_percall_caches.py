"""The per-call fast paths (issue 14 item 4) never serve a stale decision: the environment as it is
now, the backend names, the validated call, the feature set, and bad input after good input
raising as it always did. The Triton launch plans and the Vulkan recordings have their own
tests in test_percall_triton.py and beside the Vulkan ones below."""
from __future__ import annotations

import os
from unittest import mock

import numpy as np
import pytest

import aule
from aule import backends, settings
from aule.call import canonicalize

from attn_util import assert_matches_reference, random_qkv


@pytest.fixture
def qkv():
    return random_qkv(np.random.default_rng(3), 1, 2, 1, 7, 9, 16)


def test_getenv_reads_the_environment_as_it_is_now(monkeypatch):
    name = "AULE_TEST_PERCALL_VALUE"
    monkeypatch.delenv(name, raising=False)
    assert settings.getenv(name) is None
    monkeypatch.setenv(name, "first é")
    assert settings.getenv(name) == os.environ.get(name) == "first é"
    with mock.patch.dict(os.environ, {name: "second"}):
        assert settings.getenv(name) == "second"
    assert settings.getenv(name) == "first é"
    monkeypatch.delenv(name)
    assert settings.getenv(name) is None


def test_settings_follow_each_change_of_the_environment(monkeypatch):
    monkeypatch.delenv("AULE_TRITON_CONFIG", raising=False)
    monkeypatch.delenv("AULE_TRITON_AUTOTUNE", raising=False)
    assert settings.triton_config() is None
    monkeypatch.setenv("AULE_TRITON_AUTOTUNE", "0")
    assert settings.triton_config() == 0
    monkeypatch.setenv("AULE_TRITON_CONFIG", "3")
    assert settings.triton_config() == 3
    for _ in range(2):  # a malformed value raises on every call, not only the first
        monkeypatch.setenv("AULE_TRITON_CONFIG", "three")
        with pytest.raises(ValueError):
            settings.triton_config()
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "fast")
    assert settings.kernel_choice().variant == "fast"
    monkeypatch.delenv("AULE_VULKAN_VARIANT")
    assert settings.kernel_choice().variant is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not settings.triton_interpret()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert settings.triton_interpret()


def test_forced_backend_follows_the_environment(qkv, monkeypatch):
    monkeypatch.setenv("AULE_BACKEND", "numpy")
    assert aule.routing.forced_backend() == "numpy"
    monkeypatch.setenv("AULE_BACKEND", "no-such-backend")
    for _ in range(2):
        with pytest.raises(ValueError, match="AULE_BACKEND='no-such-backend' names no backend"):
            aule.flash_attention(*qkv)
    monkeypatch.delenv("AULE_BACKEND")
    assert aule.routing.forced_backend() is None


def test_backend_names_resolve_the_same_and_bad_ones_always_raise(qkv):
    assert backends.canonical_name("CPU") == backends.canonical_name("CPU") == "numpy"
    assert backends.get("cpu") is backends.get("numpy")
    for _ in range(2):
        with pytest.raises(ValueError, match="names no backend"):
            aule.flash_attention(*qkv, backend="tpu")
        with pytest.raises(TypeError, match="backend must be a string"):
            aule.flash_attention(*qkv, backend=["numpy"])
        with pytest.raises(TypeError, match="backend must be a string"):
            backends.get(["numpy"])


def test_bad_input_after_good_input_still_raises(qkv):
    q, k, v = qkv
    out = aule.flash_attention(q, k, v, backend="numpy")
    assert_matches_reference(out, None, q, k, v, "float32")
    for _ in range(2):  # each fast path is taken by the good call before
        aule.flash_attention(q, k, v, backend="numpy")
        with pytest.raises(TypeError, match="share one dtype"):
            aule.flash_attention(q, k.astype(np.float16), v, backend="numpy")
        with pytest.raises(TypeError, match="query must be float16"):
            aule.flash_attention(q.astype(np.int32), k.astype(np.int32), v.astype(np.int32), backend="numpy")
        with pytest.raises(TypeError, match="window_size must be None, an int"):
            aule.flash_attention(q, k, v, window_size=-1.0, backend="numpy")
        with pytest.raises(ValueError, match="window_size must be -1/None"):
            aule.flash_attention(q, k, v, window_size=0, backend="numpy")
        with pytest.raises(TypeError, match="softcap must be a real number"):
            aule.flash_attention(q, k, v, softcap=True, backend="numpy")
        with pytest.raises(ValueError, match="softcap must be finite"):
            aule.flash_attention(q, k, v, softcap=-0.5, backend="numpy")
        with pytest.raises(TypeError, match="return_lse must be a bool"):
            aule.flash_attention(q, k, v, return_lse=1, backend="numpy")
        with pytest.raises(TypeError, match="causal must be a bool"):
            aule.flash_attention(q, k, v, causal=1, backend="numpy")


def test_torch_calls_after_good_ones_still_check_kinds_and_devices(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in qkv)
    call = canonicalize(q, k, v)
    assert (call.kind, call.device, call.dtype) == ("torch", "cpu", "float32")
    for _ in range(2):
        canonicalize(q, k, v)
        with pytest.raises(ValueError, match="one device"):
            canonicalize(q, k, v.to("meta"))
        with pytest.raises(TypeError, match="must all be NumPy arrays or all torch tensors"):
            canonicalize(q, k, qkv[2])
        with pytest.raises(TypeError, match="share one dtype"):
            canonicalize(q, k.double(), v)
    meta = canonicalize(*(x.to("meta") for x in (q, k, v)))
    assert (meta.kind, meta.device) == ("torch", "meta")


def test_a_call_s_features_follow_its_arguments(qkv):
    q, k, v = qkv
    plain = canonicalize(q, k, v)
    assert plain.features == frozenset() and plain.grad_features == frozenset()
    capped = canonicalize(q, k, v, softcap=2.0)
    assert capped.features == {"softcap"}
    sinks = canonicalize(q, k, v, sinks=np.zeros(2, np.float32))
    assert sinks.features == {"sinks"}

    class Plain(backends.base.Backend):
        name = "plain"
        ops = ("attention",)

    b = Plain()
    assert b.why_not("attention", plain, True) is None
    assert "does not apply softcap" in b.why_not("attention", capped, True)
    assert b.why_not("attention", plain, True) is None


# --- Vulkan: recordings re-submitted only for the same bindings and push constants -------------

@pytest.fixture
def vk_ctx():
    from _vulkan_util import vulkan_context

    c = vulkan_context()
    c.take_validation_messages()
    yield c
    msgs = c.take_validation_messages()
    assert not msgs, "Vulkan validation messages:\n" + "\n".join(msgs)


def test_vulkan_recordings_follow_push_constants_shapes_and_buffers(vk_ctx):
    from aule.backends.vulkan import to_gpu

    rng = np.random.default_rng(21)
    vk_ctx.forget_recordings()
    small = random_qkv(rng, 1, 2, 1, 9, 13, 16)
    longer = random_qkv(rng, 1, 2, 1, 21, 13, 16)
    other = random_qkv(rng, 1, 2, 1, 9, 13, 16)
    g_small, g_longer, g_other = ([to_gpu(x) for x in s] for s in (small, longer, other))
    # Each case three times in a row (seen, recorded, re-submitted), then the first again: a stale
    # recording would return the previous case's numbers.
    cases = [(g_small, small, 0.25, False), (g_small, small, 0.5, False), (g_small, small, 0.5, True),
             (g_longer, longer, 0.5, True), (g_other, other, 0.5, True), (g_small, small, 0.25, False)]
    for gpu, host, scale, causal in cases:
        for _ in range(3):
            out = aule.flash_attention(*gpu, causal=causal, scale=scale, backend="vulkan")
            assert_matches_reference(out.numpy(), None, *host, "float32", causal=causal, scale=scale)
            out.free()
    assert vk_ctx.stats["resubmitted"] >= len(cases)
    # A bad call after good ones is refused as before.
    with pytest.raises(ValueError, match="batch sizes differ"):
        aule.flash_attention(g_small[0], to_gpu(np.zeros((2, 1, 13, 16), np.float32)), g_small[2], backend="vulkan")


def test_a_lease_gives_its_buffer_back_once(vk_ctx):
    pool = vk_ctx.pool
    lease = pool.acquire(12345)
    buf = lease.buffer
    lease.release()
    lease.release()  # a second release (and the collection below) must not give it back again
    del lease
    assert sum(b is buf for bucket in pool.free.values() for b in bucket) == 1
    again = pool.acquire(12345)
    assert again.buffer is buf  # last in, first out
    other = pool.acquire(12345)
    assert other.buffer is not buf
    again.release(), other.release()

"""Asynchronous calls on GpuTensors: a call whose inputs and outputs stay on the device returns
before its submission has ended, and the host waits only where it touches the data (issue 14
item 4). Chains of calls, reads, host writes right after a call, frees while in flight, the ring
of submissions in flight, device errors, the setting that turns it off, and the ready launches
of repeated calls (aule/backends/vulkan/fastpath.py)."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import VulkanError, settings
from aule.call import canonicalize
from aule.reference import attention_reference

from _vulkan_util import VARIANT_ATOL, ctx, max_err, no_validation_messages, vulkan_context  # noqa: F401 (fixtures)

# Odd shapes: GQA 4/2, seq_q != seq_k, a head_dim that is no power of two in float32.
SHAPES = [((1, 4, 2, 37, 53, 40), np.float32), ((2, 3, 1, 29, 29, 64), np.float16)]


def _inputs(rng, shape, dtype):
    b, hq, hk, sq, sk, d = shape
    return (rng.standard_normal((b, hq, sq, d)).astype(dtype), rng.standard_normal((b, hk, sk, d)).astype(dtype),
            rng.standard_normal((b, hk, sk, d)).astype(dtype))


def _atol(ctx, q, k, v, causal=True):
    """The tolerance of the variant a call on GpuTensors of these arrays takes."""
    from aule.backends.vulkan import launch
    from aule.backends.vulkan.tensor import GpuTensor

    g = [GpuTensor(ctx, ctx.upload(np.ascontiguousarray(x)), x.shape, x.dtype) for x in (q, k, v)]
    return VARIANT_ATOL[launch.attention_plan_for(canonicalize(*g, causal, None, -1, False), ctx)[0].name]


def _reference(q, k, v, causal=True):
    return attention_reference(*(np.asarray(x, np.float64) for x in (q, k, v)), causal=causal)


@pytest.fixture
def synchronous(ctx):
    """Switch the context to synchronous calls for a block: ``with synchronous(): ...``."""
    from contextlib import contextmanager

    @contextmanager
    def switch():
        ctx.synchronize()
        old, ctx.asynchronous = ctx.asynchronous, False
        try:
            yield
        finally:
            ctx.asynchronous = old

    return switch


@pytest.fixture(autouse=True)
def asynchronous(request):
    """Every test here starts from an asynchronous context with nothing in flight."""
    if "ctx" not in request.fixturenames:
        yield
        return
    c = request.getfixturevalue("ctx")
    old, c.asynchronous = c.asynchronous, True
    try:
        yield
    finally:
        c.synchronize()
        c.asynchronous = old


def _chain(gq, gk, gv, n, **kw):
    x = gq
    for _ in range(n):
        x = aule.flash_attention(x, gk, gv, causal=True, backend="vulkan", **kw)
    return x


@pytest.mark.parametrize("shape,dtype", SHAPES)
def test_a_chain_of_async_calls_is_bit_equal_to_synchronous_calls(ctx, synchronous, shape, dtype):
    """Each output is the next call's query: the submissions order themselves on the queue."""
    rng = np.random.default_rng(1)
    q, k, v = _inputs(rng, shape, dtype)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    before = ctx.stats["asynchronous"]
    first = aule.flash_attention(gq, gk, gv, causal=True, backend="vulkan")
    out = _chain(first, gk, gv, 6)
    assert ctx.stats["asynchronous"] - before == 7, "the calls on GpuTensors were not submitted asynchronously"
    assert out.leases[0].buffer.busy > ctx.retired, "the last call of the chain must still count as in flight"
    got, head = out.numpy(), first.numpy()
    with synchronous():
        before = ctx.stats["asynchronous"]
        want = _chain(aule.flash_attention(gq, gk, gv, causal=True, backend="vulkan"), gk, gv, 6).numpy()
        assert ctx.stats["asynchronous"] == before
    assert np.array_equal(got, want)
    assert max_err(head, _reference(q, k, v)) <= _atol(ctx, q, k, v)


def test_many_calls_in_flight_then_one_read(ctx):
    """More calls than the ring holds, every output kept, then each read: all are right."""
    rng = np.random.default_rng(2)
    q, k, v = _inputs(rng, (1, 2, 2, 31, 47, 64), np.float32)
    gk, gv = aule.to_gpu(k), aule.to_gpu(v)
    qs = [q * (1 + i / 8) for i in range(3 * ctx.INFLIGHT)]
    gqs = [aule.to_gpu(x) for x in qs]
    outs = [aule.flash_attention(g, gk, gv, causal=False, backend="vulkan") for g in gqs]
    assert len(ctx._inflight) <= ctx.INFLIGHT
    last = outs[-1].numpy()
    assert not ctx._inflight, "reading the last result waits for every submission before it"
    tol = _atol(ctx, q, k, v, False)
    assert max_err(last, _reference(qs[-1], k, v, False)) <= tol
    for x, o in zip(qs, outs):
        assert max_err(o.numpy(), _reference(x, k, v, False)) <= tol


def test_the_ring_blocks_on_its_oldest_submission_when_full(ctx, monkeypatch):
    """At most INFLIGHT submissions are in flight: the next one waits for the oldest first."""
    monkeypatch.setattr(ctx, "INFLIGHT", 2)
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, (1, 1, 1, 17, 17, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    seen, waited = [], []
    real_submit, real_wait = ctx._submit_async, ctx.wait_for

    def submit(seq, keep):
        real_submit(seq, keep)
        seen.append(len(ctx._inflight))

    def wait_for(serial):
        waited.append((serial, ctx._inflight[0][0] if ctx._inflight else None))
        real_wait(serial)

    monkeypatch.setattr(ctx, "_submit_async", submit)
    monkeypatch.setattr(ctx, "wait_for", wait_for)
    outs = [aule.flash_attention(gq, gk, gv, backend="vulkan") for _ in range(7)]
    assert max(seen) == 2 and seen[-1] == 2
    assert waited and all(s == oldest for s, oldest in waited[:3]), "a full ring waits for its oldest"
    want = _reference(q, k, v)
    for o in outs:
        assert max_err(o.numpy(), want) <= _atol(ctx, q, k, v)


def test_writing_an_input_from_the_host_waits_for_the_calls_that_read_it(ctx):
    """GpuTensor.write right after a call: the call computes with the old contents (the write
    waits for it), the next call with the new ones."""
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, (1, 4, 4, 131, 131, 64), np.float32)
    q2 = rng.standard_normal(q.shape).astype(np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    out = aule.flash_attention(gq, gk, gv, backend="vulkan")
    assert gq.leases[0].buffer.busy > ctx.retired  # in flight, as far as the host knows
    gq.write(q2)
    assert gq.leases[0].buffer.busy <= ctx.retired
    again = aule.flash_attention(gq, gk, gv, backend="vulkan")
    tol = _atol(ctx, q, k, v)
    assert max_err(out.numpy(), _reference(q, k, v)) <= tol
    assert max_err(again.numpy(), _reference(q2, k, v)) <= tol
    assert np.array_equal(gq.numpy(), q2)


def test_write_checks_its_array(ctx):
    g = aule.to_gpu(np.zeros((1, 1, 4, 8), np.float32))
    with pytest.raises(ValueError, match=r"shape \[1, 1, 4, 8\]"):
        g.write(np.zeros((1, 1, 4, 4), np.float32))
    with pytest.raises(TypeError, match="real numbers"):
        g.write(np.zeros((1, 1, 4, 8), np.complex64))
    g.write(np.ones((1, 1, 4, 8), np.float64))  # converted to the tensor's dtype
    assert g.numpy().dtype == np.float32 and (g.numpy() == 1).all()


def test_freeing_tensors_while_their_call_is_in_flight(ctx):
    """Inputs freed (their memory destroyed, or handed to a new tensor written from the host) and
    outputs dropped right after the call: the call still computes from the old data."""
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, (1, 4, 2, 127, 131, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    out = aule.flash_attention(gq, gk, gv, backend="vulkan")
    dropped = aule.flash_attention(gq, gk, gv, backend="vulkan")
    serial = ctx._serial
    del dropped
    gv.free()
    assert ctx.retired < serial
    ctx.trim_pools()  # destroys the free buffers: v's waits for the calls that bind it
    assert ctx.retired >= serial
    gv = aule.to_gpu(v)
    out2 = aule.flash_attention(gq, gk, gv, backend="vulkan")
    kbuf = gk.leases[0].buffer
    gk.free()
    other = aule.to_gpu(rng.standard_normal(k.shape).astype(np.float32))
    assert other.leases[0].buffer is kbuf, "the pool hands the freed buffer out again"
    tol = _atol(ctx, q, k, v)
    assert max_err(out.numpy(), _reference(q, k, v)) <= tol
    assert max_err(out2.numpy(), _reference(q, k, v)) <= tol
    with pytest.raises(ValueError, match="freed"):
        aule.flash_attention(gq, gk, gv, backend="vulkan")


def test_a_device_error_surfaces_at_the_next_wait(ctx):
    """A lost device reported by the fence of a call in flight is raised, typed, by the host
    access that waits for it; the context goes on serving calls afterwards."""
    rng = np.random.default_rng(6)
    q, k, v = _inputs(rng, (1, 2, 2, 33, 33, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    out = aule.flash_attention(gq, gk, gv, backend="vulkan")
    serial, seq, _ = ctx._inflight[-1]
    real = seq._lib

    class Lost:
        """The binding, with a fence that reports a lost device once the work has really ended."""

        def __getattr__(self, name):
            return getattr(real, name)

        def vkGetFenceStatus(self, device, fence):
            real.vkWaitForFences(device, 1, seq._fence_p, 1, 2**64 - 1)
            return -4  # VK_ERROR_DEVICE_LOST

    seq._lib = Lost()
    try:
        with pytest.raises(VulkanError, match="VK_ERROR_DEVICE_LOST") as info:
            out.numpy()
    finally:
        seq._lib = real
    assert info.value.result == "VK_ERROR_DEVICE_LOST"
    assert ctx.retired >= serial and not any(s == serial for s, _, _ in ctx._inflight)
    assert max_err(aule.flash_attention(gq, gk, gv, backend="vulkan").numpy(), _reference(q, k, v)) \
        <= _atol(ctx, q, k, v)


def test_timed_calls_stay_synchronous(ctx):
    from aule.backends import vulkan

    rng = np.random.default_rng(7)
    gq, gk, gv = (aule.to_gpu(x) for x in _inputs(rng, (1, 2, 2, 19, 19, 64), np.float32))
    aule.flash_attention(gq, gk, gv, backend="vulkan")  # one in flight before the timed call
    before = ctx.stats["asynchronous"]
    out, _, ns = vulkan.attention(gq, gk, gv, timestamps=True)
    assert ctx.stats["asynchronous"] == before and not ctx._inflight
    assert ns is None or ns > 0
    assert out.leases[0].buffer.busy <= ctx.retired


def test_host_calls_after_async_ones_see_their_results(ctx):
    """A call on NumPy arrays (synchronous: it reads back) right after GpuTensor calls in flight,
    and a GpuTensor call whose output's pooled buffer a host call then takes."""
    rng = np.random.default_rng(8)
    q, k, v = _inputs(rng, (1, 2, 2, 41, 41, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    out = aule.flash_attention(gq, gk, gv, backend="vulkan")
    host = aule.flash_attention(q, k, v, backend="vulkan")
    tol = _atol(ctx, q, k, v)
    assert max_err(host, _reference(q, k, v)) <= tol
    assert max_err(out.numpy(), _reference(q, k, v)) <= tol


def test_features_run_asynchronously_and_their_uploads_are_held(ctx):
    """ALiBi and sinks take the full path; their uploaded buffer stays held by the submission
    until it has ended, then goes back to the pool."""
    rng = np.random.default_rng(9)
    q, k, v = _inputs(rng, (1, 4, 2, 23, 37, 64), np.float32)
    slopes = rng.uniform(0.1, 1.0, 4).astype(np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    before = ctx.stats["asynchronous"]
    out = aule.flash_attention(gq, gk, gv, backend="vulkan", alibi_slopes=slopes, sinks=sinks)
    assert ctx.stats["asynchronous"] == before + 1
    assert ctx._inflight[-1][2], "the submission holds the features' upload"
    want = attention_reference(*(x.astype(np.float64) for x in (q, k, v)), causal=True, alibi_slopes=slopes,
                               sinks=sinks)
    assert max_err(out.numpy(), want) <= _atol(ctx, q, k, v)
    assert not ctx._inflight


def test_repeated_calls_take_the_ready_launch(ctx, monkeypatch):
    """The second call of a key skips validation and routing (aule.call.canonicalize is not
    called) and gives what the full path gives; a change of setting or argument type is a new key."""
    from aule import api
    from aule.backends.vulkan import fastpath

    fastpath.forget()
    rng = np.random.default_rng(10)
    q, k, v = _inputs(rng, (1, 2, 1, 45, 59, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    first, lse1 = aule.flash_attention(gq, gk, gv, causal=False, backend="vulkan", return_lse=True)
    calls = []
    real = api.canonicalize
    monkeypatch.setattr(api, "canonicalize", lambda *a, **kw: calls.append(a) or real(*a, **kw))
    second, lse2 = aule.flash_attention(gq, gk, gv, causal=False, backend="vulkan", return_lse=True)
    assert not calls, "a repeated call was validated again"
    assert np.array_equal(first.numpy(), second.numpy()) and np.array_equal(lse1.numpy(), lse2.numpy())
    want, want_lse = attention_reference(*(x.astype(np.float64) for x in (q, k, v)), causal=False, return_lse=True)
    assert max_err(second.numpy(), want) <= _atol(ctx, q, k, v, False)
    assert max_err(lse2.numpy(), want_lse) <= 1e-4
    with pytest.raises(TypeError, match="causal must be a bool"):  # 0 == False, but the key holds types
        aule.flash_attention(gq, gk, gv, causal=0, backend="vulkan")
    assert len(calls) == 1
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "baseline")
    base = aule.flash_attention(gq, gk, gv, causal=False, backend="vulkan")
    assert len(calls) == 2, "a changed kernel setting must be validated and planned anew"
    assert max_err(base.numpy(), want) <= VARIANT_ATOL["baseline"]


def test_the_ready_launch_still_refuses_what_the_full_path_refuses(ctx):
    from aule.backends.vulkan import fastpath

    fastpath.forget()
    rng = np.random.default_rng(11)
    q, k, v = _inputs(rng, (1, 2, 2, 8, 8, 64), np.float32)
    gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
    aule.flash_attention(gq, gk, gv, backend="vulkan")
    with pytest.raises(TypeError):  # host k with a GpuTensor q: the full path's own error
        aule.flash_attention(gq, k, gv, backend="vulkan")
    with pytest.raises(ValueError, match="window"):
        aule.flash_attention(gq, gk, gv, window_size=-5, backend="vulkan")
    aule.flash_attention(gq, gk, gv, window_size=[3, 0], backend="vulkan")  # a list: never cached, still served
    gk.free()
    with pytest.raises(ValueError, match="freed"):
        aule.flash_attention(gq, gk, gv, backend="vulkan")


def test_async_off_setting(monkeypatch):
    from aule.backends.vulkan import launch
    from aule.backends.vulkan.runtime import Context
    from aule.backends.vulkan.tensor import GpuTensor

    vulkan_context()  # skips without Vulkan
    assert settings.vulkan().asynchronous
    monkeypatch.setenv("AULE_VULKAN_ASYNC", "0")
    assert not settings.vulkan().asynchronous
    c = Context()
    try:
        assert not c.asynchronous
        rng = np.random.default_rng(12)
        q, k, v = _inputs(rng, (1, 2, 2, 21, 21, 64), np.float32)
        gq, gk, gv = (GpuTensor(c, c.upload(x), x.shape, x.dtype) for x in (q, k, v))
        out, _, _ = launch.attention(canonicalize(gq, gk, gv, True, None, -1, False), c)
        assert not c._inflight and c.stats["asynchronous"] == 0
        assert max_err(out.numpy(), _reference(q, k, v)) <= _atol(c, q, k, v)
        assert not c.take_validation_messages()
    finally:
        c.close()


@pytest.mark.parametrize("env", [{"AULE_VULKAN_STAGING": "1"}, {"AULE_VULKAN_STAGING": "1", "AULE_VULKAN_REUSE": "0"}],
                         ids=["staging", "staging-no-reuse"])
def test_async_calls_through_staging(monkeypatch, env):
    """The discrete-GPU path (device memory the host cannot map): reads, host writes and chains
    go through DMA in synchronous runs that start once the calls in flight have ended."""
    from aule.backends.vulkan import launch
    from aule.backends.vulkan.runtime import Context
    from aule.backends.vulkan.tensor import GpuTensor

    vulkan_context()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    c = Context()
    try:
        rng = np.random.default_rng(13)
        q, k, v = _inputs(rng, (1, 2, 2, 37, 37, 64), np.float32)
        q2 = rng.standard_normal(q.shape).astype(np.float32)

        def gpu(x):
            return GpuTensor(c, c.upload(x), x.shape, x.dtype)

        def attend(a, b, d):
            return launch.attention(canonicalize(a, b, d, True, None, -1, False), c)[0]

        gq, gk, gv = (gpu(x) for x in (q, k, v))
        out = attend(gq, gk, gv)
        chained = attend(attend(out, gk, gv), gk, gv)
        assert len(c._inflight) == 3
        gq.write(q2)  # its DMA follows the calls on the queue: they read the old contents
        again = attend(gq, gk, gv)
        tol = _atol(c, q, k, v)
        assert max_err(out.numpy(), _reference(q, k, v)) <= tol
        assert max_err(again.numpy(), _reference(q2, k, v)) <= tol
        c.asynchronous = False
        want = attend(attend(gpu(out.numpy()), gk, gv), gk, gv)
        assert np.array_equal(chained.numpy(), want.numpy())
        assert not c.take_validation_messages()
    finally:
        c.close()


def test_close_with_calls_in_flight():
    from aule.backends.vulkan import launch
    from aule.backends.vulkan.runtime import Context
    from aule.backends.vulkan.tensor import GpuTensor

    vulkan_context()
    c = Context()
    rng = np.random.default_rng(14)
    q, k, v = _inputs(rng, (1, 2, 2, 64, 64, 64), np.float32)
    gq, gk, gv = (GpuTensor(c, c.upload(x), x.shape, x.dtype) for x in (q, k, v))
    for _ in range(3):
        launch.attention(canonicalize(gq, gk, gv, True, None, -1, False), c)
    assert c._inflight
    c.close()
    assert not c._inflight and c.retired == c._serial


def test_chains_on_a_gpu_are_bit_equal_to_synchronous_calls(ctx, synchronous):
    """On a real GPU submissions do overlap, so a missing dependency between calls shows: a long
    chain of mid-sized calls (each output the next query), async against sync."""
    if ctx.info.is_cpu:
        pytest.skip(f"needs a GPU: {ctx.info.name} runs submissions one after another")
    rng = np.random.default_rng(15)
    for dtype in (np.float16, np.float32):
        q, k, v = _inputs(rng, (1, 32, 8, 1024, 1024, 128), dtype)
        gq, gk, gv = (aule.to_gpu(x) for x in (q, k, v))
        got = _chain(gq, gk, gv, 24).numpy()
        with synchronous():
            want = _chain(gq, gk, gv, 24).numpy()
        assert np.array_equal(got, want), dtype
        one = aule.flash_attention(gq, gk, gv, causal=True, backend="vulkan").numpy()
        assert max_err(one, _reference(q, k, v)) <= _atol(ctx, q, k, v)


def _decode(ctx, q_rows, keys, values, block_size=4, blocks=16):
    """A decode loop on GpuTensor caches: each step writes its token's K/V rows (from the host)
    and attends over every token so far with a GpuTensor q; returns each step's output."""
    n, hk, d = keys.shape
    kc = aule.to_gpu(np.zeros((blocks, block_size, hk, d), np.float32))
    vc = aule.to_gpu(np.zeros((blocks, block_size, hk, d), np.float32))
    table = np.random.default_rng(0).permutation(blocks)[None, :].astype(np.int32)  # blocks out of order
    outs = []
    for t in range(n):
        slot = table[0, t // block_size] * block_size + t % block_size
        aule.copy_kv_to_paged(keys[t:t + 1], values[t:t + 1], kc, vc, np.array([slot]), backend="vulkan")
        outs.append(aule.flash_attention_paged(aule.to_gpu(q_rows[t][None, :, None, :]), kc, vc, table,
                                               np.array([t + 1], np.int32), backend="vulkan"))
    return outs


def test_a_paged_decode_loop_runs_asynchronously(ctx, synchronous):
    """KV writes and paged attention on GpuTensors are submitted without waiting too: each step
    reads the rows the previous steps wrote, bit-equal to synchronous steps and to the reference."""
    rng = np.random.default_rng(16)
    n, hq, hk, d = 23, 4, 2, 64
    q_rows = rng.standard_normal((n, hq, d)).astype(np.float32)
    keys, values = (rng.standard_normal((n, hk, d)).astype(np.float32) for _ in range(2))
    before = ctx.stats["asynchronous"]
    got = _decode(ctx, q_rows, keys, values)
    assert ctx.stats["asynchronous"] - before >= 2 * n
    got = [o.numpy() for o in got]
    with synchronous():
        want = [o.numpy() for o in _decode(ctx, q_rows, keys, values)]
    for t, (a, b) in enumerate(zip(got, want)):
        assert np.array_equal(a, b), t
        ref = attention_reference(q_rows[t][None, :, None, :].astype(np.float64),
                                  keys[None, :t + 1].transpose(0, 2, 1, 3).astype(np.float64),
                                  values[None, :t + 1].transpose(0, 2, 1, 3).astype(np.float64), causal=True)
        assert max_err(a, ref) <= 1e-4, t

"""Vulkan paged attention and copy_kv_to_paged against the float64 reference, on whatever Vulkan
device exists (Mesa's lavapipe in CI), under the Khronos validation layer when AULE_VALIDATION=1."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule.reference import attention_reference

from _vulkan_util import vulkan_context
from test_paged import check, make_case, reference_paged


@pytest.fixture(scope="module")
def ctx():
    c = vulkan_context()
    from aule.backends.vulkan import shaders

    try:
        shaders.spirv_code("paged")
    except Exception as exc:  # spirv/ predates the paged shaders
        pytest.skip(f"paged shaders not built: {exc}")
    return c


@pytest.fixture(autouse=True)
def no_validation_messages(ctx):
    """Any validation-layer message during a test fails it."""
    ctx.take_validation_messages()
    yield
    msgs = ctx.take_validation_messages()
    assert not msgs, "Vulkan validation messages:\n" + "\n".join(msgs)


def _gpu(case, dtype):
    from aule.backends.vulkan import GpuTensor

    return (GpuTensor.from_numpy(case.k_cache.astype(dtype), dtype),
            GpuTensor.from_numpy(case.v_cache.astype(dtype), dtype))


def _case(rng, lens, hq, hk, d, bs, q_len, dtype=np.float32, window=-1):
    case = make_case(rng, lens, hq, hk, d, bs, q_len, np.float32, window_size=window)
    if dtype != np.float32:  # the reference sees exactly the rounded inputs
        for n in ("q", "k_cache", "v_cache"):
            setattr(case, n, getattr(case, n).astype(dtype))
        case.ks = [k.astype(dtype) for k in case.ks]
        case.vs = [v.astype(dtype) for v in case.vs]
    return case


def _run(case, dtype=np.float32, window=-1, scale=None):
    kc, vc = _gpu(case, dtype)
    out = aule.flash_attention_paged(case.q.astype(dtype), kc, vc, case.block_tables, case.context_lens,
                                     scale=scale, window_size=window)  # auto: a GpuTensor cache goes to Vulkan
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == case.q.shape
    return out


@pytest.mark.parametrize("block_size,q_len,heads", [
    (16, 1, (8, 2)), (1, 1, (4, 4)), (128, 1, (8, 1)), (16, 4, (8, 2)), (128, 4, (4, 4)), (1, 4, (8, 1))])
def test_vulkan_paged_matches_reference(ctx, block_size, q_len, heads):
    rng = np.random.default_rng(block_size * 7 + q_len)
    case = _case(rng, [1, 15, 16, 17, 1000], *heads, 64, block_size, q_len)
    check(_run(case), reference_paged(case), "float32")


@pytest.mark.parametrize("window,q_len", [(8, 1), ((40, 0), 4), (100, 1), (1, 4)])
def test_vulkan_paged_window(ctx, window, q_len):
    rng = np.random.default_rng(5)
    case = _case(rng, [3, 16, 333], 8, 2, 64, 16, q_len, window=window)
    check(_run(case, window=window), reference_paged(case, window_size=window), "float32")


@pytest.mark.parametrize("dtype,head_dim", [(np.float16, 128), (np.float16, 256), (np.float32, 80)])
def test_vulkan_paged_dtypes_head_dims(ctx, dtype, head_dim):
    if dtype == np.float16 and not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage/arithmetic")
    rng = np.random.default_rng(head_dim)
    case = _case(rng, [7, 70, 129], 4, 1, head_dim, 8, 2, dtype)
    check(_run(case, dtype, scale=0.2), reference_paged(case, scale=0.2), np.dtype(dtype).name)


def test_vulkan_gpu_tensor_q_gives_gpu_tensor(ctx):
    from aule.backends.vulkan import GpuTensor

    rng = np.random.default_rng(1)
    case = _case(rng, [20, 5], 4, 2, 64, 16, 1)
    kc, vc = _gpu(case, np.float32)
    out = aule.flash_attention_paged(GpuTensor.from_numpy(case.q), kc, vc, case.block_tables, case.context_lens)
    assert isinstance(out, GpuTensor)
    check(out.numpy(), reference_paged(case), "float32")


def test_vulkan_host_cache_only_when_forced(ctx):
    rng = np.random.default_rng(2)
    case = _case(rng, [9, 40], 4, 2, 64, 16, 1)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                     backend="vulkan")
    check(out, reference_paged(case), "float32")
    from aule import api, paged_call

    call = paged_call.canonicalize_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)
    assert api.route(call, "paged_attention").name == "numpy"  # a host cache is not uploaded on every call


def test_vulkan_cache_append_fork_copy_on_write(ctx):
    rng = np.random.default_rng(3)
    cache = aule.PagedKVCache(10, 4, 2, 64, "float32", backend="vulkan")
    a = cache.allocate()
    k = rng.standard_normal((6, 2, 64)).astype(np.float32)
    v = rng.standard_normal((6, 2, 64)).astype(np.float32)
    cache.append(a, k, v)
    c = cache.fork(a)
    k2 = rng.standard_normal((3, 2, 64)).astype(np.float32)
    cache.append(c, k2, -k2)
    np.testing.assert_array_equal(cache.gather(a)[0], k.transpose(1, 0, 2))
    ck, cv = cache.gather(c)
    np.testing.assert_array_equal(ck, np.concatenate([k, k2]).transpose(1, 0, 2))
    np.testing.assert_array_equal(cv, np.concatenate([v, -k2]).transpose(1, 0, 2))
    assert cache.block_tables([a])[0, 1] != cache.block_tables([c])[0, 1]  # the half block was copied
    q = rng.standard_normal((2, 8, 1, 64)).astype(np.float32)
    out = cache.attention(q, [a, c])
    for i, sid in enumerate((a, c)):
        gk, gv = cache.gather(sid)
        check(out[i:i + 1], attention_reference(q[i:i + 1], gk[None], gv[None]), "float32")


def test_vulkan_copy_kv_slot_mapping(ctx):
    from aule.backends.vulkan import GpuTensor

    rng = np.random.default_rng(4)
    kc = GpuTensor.from_numpy(np.zeros((3, 4, 2, 8), np.float16))
    vc = GpuTensor.from_numpy(np.zeros((3, 4, 2, 8), np.float16))
    key = rng.standard_normal((4, 2, 8)).astype(np.float16)
    aule.copy_kv_to_paged(key, key * 2, kc, vc, np.array([5, -1, 11, 0]))
    k_host, v_host = kc.numpy(), vc.numpy()
    np.testing.assert_array_equal(k_host[1, 1], key[0])
    np.testing.assert_array_equal(k_host[2, 3], key[2])
    np.testing.assert_array_equal(v_host[0, 0], key[3] * 2)
    assert np.count_nonzero(k_host.reshape(12, -1).any(axis=1)) == 3


def test_timed_paged_entry_point_for_benchmarks(ctx):
    from aule.backends.vulkan import paged_attention

    rng = np.random.default_rng(6)
    case = _case(rng, [30, 700], 8, 2, 64, 16, 1)
    kc, vc = _gpu(case, np.float32)
    out, ns = paged_attention(case.q, kc, vc, case.block_tables, case.context_lens, timestamps=True)
    check(out, reference_paged(case), "float32")
    assert ns is None if ctx.query_pool is None else ns > 0
    odd = _case(rng, [5], 4, 2, 62, 16, 1)
    kc, vc = _gpu(odd, np.float32)
    with pytest.raises(aule.UnsupportedError, match="backend 'vulkan' cannot serve.*multiple of 4"):
        paged_attention(odd.q, kc, vc, odd.block_tables, odd.context_lens)


def test_kv_store_is_asked_like_every_other_op(ctx):
    from types import SimpleNamespace

    from aule.backends.vulkan import GpuTensor, VulkanBackend

    b = VulkanBackend()
    assert b.ops == ("attention", "paged_attention", "varlen_attention", "write_kv", "kv_store")

    def spec(dtype="float32", device=None):
        return SimpleNamespace(shape=(3, 4, 2, 8), dtype=dtype, device=device)

    assert "no bfloat16" in b.why_not("kv_store", spec("bfloat16"), forced=True)
    assert "not on 'cuda'" in b.why_not("kv_store", spec(device="cuda"), forced=True)
    auto = b.why_not("kv_store", spec(), forced=False)
    assert (auto is not None and "NumPy" in auto) if ctx.info.is_cpu else auto is None
    assert b.why_not("kv_store", spec(device="vulkan"), forced=True) is None
    kc, vc = b.allocate_cache(spec())
    assert isinstance(kc, GpuTensor) and kc.shape == (3, 4, 2, 8) and not b.to_host(kc).any()
    rows = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)
    kc = GpuTensor.from_numpy(np.broadcast_to(rows, (3, 4, 2, 8)) * np.arange(12).reshape(3, 4, 1, 1))
    b.copy_slots(kc, vc, np.array([1, 2]), np.array([8, 9]))
    got = b.to_host(kc).reshape(12, 2, 8)
    np.testing.assert_array_equal(got[8:10], got[1:3])
    np.testing.assert_array_equal(got[:8], (np.broadcast_to(rows, (12, 2, 8)) * np.arange(12)[:, None, None])[:8])


def test_split_context_merges_in_the_same_submission(ctx, monkeypatch):
    """A context split across workgroups is merged by a second pass recorded behind a barrier in
    the same submission: one queue submission per call, and the merged result is right."""
    from aule.backends.vulkan import plans
    from aule.backends.vulkan.runtime import sequence

    rng = np.random.default_rng(23)
    case = _case(rng, [300], 2, 1, 64, 16, 1)
    kc, vc = _gpu(case, np.float32)
    from aule.paged_call import canonicalize_paged

    call = canonicalize_paged(case.q, kc, vc, case.block_tables, case.context_lens)
    assert plans.paged_plan(call, ctx.info).merge is not None, "the case must split its context"
    events = []
    real_submit, real_dispatch = sequence.Sequence.submit, sequence.Sequence.dispatch

    def counting_submit(self, *a, **kw):
        events.append("s")
        return real_submit(self, *a, **kw)

    def counting_dispatch(self, *a, **kw):
        events.append("d")
        return real_dispatch(self, *a, **kw)

    monkeypatch.setattr(sequence.Sequence, "submit", counting_submit)
    monkeypatch.setattr(sequence.Sequence, "dispatch", counting_dispatch)
    out = aule.flash_attention_paged(case.q, kc, vc, case.block_tables, case.context_lens)
    check(out, reference_paged(case), "float32")
    # Staging copies (uploads, and downloads through host-cached memory on discrete GPUs) are
    # submissions of their own; what matters is the submissions that carry dispatches.
    with_dispatches = [seg for seg in "".join(events).split("s") if "d" in seg]
    assert [len(seg) for seg in with_dispatches] == [2], (
        f"split-K and merge took {len(with_dispatches)} submission(s): {''.join(events)}")

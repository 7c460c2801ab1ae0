"""Hostile but legal calls on the Vulkan front, the settings, the GPU memory pool and the KV cache:
each must give the NumPy backend's answer (empty results of the right shape and type included) or a
clear error naming the argument or the variable, never a crash from deep inside."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import aule
from aule.errors import UnsupportedError

from _vulkan_util import ctx, forced_variant, no_validation_messages  # noqa: F401 (fixtures)

RNG = np.random.default_rng(7)


def _qkv(b, hq, hk, sq, sk, d, dtype=np.float32):
    return (RNG.standard_normal((b, hq, sq, d)).astype(dtype), RNG.standard_normal((b, hk, sk, d)).astype(dtype),
            RNG.standard_normal((b, hk, sk, d)).astype(dtype))


def _gpu(*arrays):
    from aule.backends.vulkan import to_gpu

    return tuple(to_gpu(a) for a in arrays)


def _same_as_numpy(got, want):
    from aule.backends.vulkan import GpuTensor

    if isinstance(want, tuple):
        assert isinstance(got, tuple) and len(got) == len(want)
        for g, w in zip(got, want):
            _same_as_numpy(g, w)
        return
    host = got.numpy() if isinstance(got, GpuTensor) else got
    assert host.shape == want.shape and host.dtype == want.dtype
    np.testing.assert_array_equal(host, want)


# --- empty problems -------------------------------------------------------------------------------

EMPTY_SHAPES = {"heads_q 0": (1, 0, 1, 4, 5), "seq_q 0": (1, 2, 1, 0, 5), "seq_k 0": (2, 2, 1, 3, 0),
                "batch 0": (0, 2, 1, 3, 5)}


@pytest.mark.parametrize("where", ["host", "gpu"])
@pytest.mark.parametrize("name", sorted(EMPTY_SHAPES))
def test_empty_problem_matches_numpy(ctx, name, where):
    b, hq, hk, sq, sk = EMPTY_SHAPES[name]
    q, k, v = _qkv(b, hq, hk, sq, sk, 16)
    want = aule.flash_attention(q, k, v, return_lse=True, backend="numpy")
    if where == "host":
        got = aule.flash_attention(q, k, v, return_lse=True, backend="vulkan")
        assert all(isinstance(x, np.ndarray) for x in got)
    else:
        from aule.backends.vulkan import GpuTensor

        got = aule.flash_attention(*_gpu(q, k, v), return_lse=True)
        assert all(isinstance(x, GpuTensor) for x in got)
        out = aule.flash_attention(*_gpu(q, k, v))  # without the LSE: the output alone
        assert isinstance(out, GpuTensor) and out.shape == q.shape
    _same_as_numpy(got, want)


def test_empty_problem_through_timed_entry(ctx):
    from aule.backends import vulkan

    q, k, v = _qkv(1, 0, 1, 4, 5, 16)
    out, lse, ns = vulkan.attention(q, k, v, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 0, 4) and ns is None


def _paged_cache(num_blocks=4, bs=8, hk=2, d=16):
    from aule.backends.vulkan import to_gpu

    k = RNG.standard_normal((num_blocks, bs, hk, d)).astype(np.float32)
    v = RNG.standard_normal((num_blocks, bs, hk, d)).astype(np.float32)
    return k, v, to_gpu(k), to_gpu(v)


@pytest.mark.parametrize("batch, q_len", [(1, 0), (0, 1)])
def test_paged_gpu_q_without_rows(ctx, batch, q_len):
    from aule.backends.vulkan import GpuTensor, to_gpu

    _, _, kc, vc = _paged_cache()
    q = np.zeros((batch, 2, q_len, 16), np.float32)
    bt, cl = np.zeros((batch, 2), np.int32), np.full(batch, 5, np.int32)
    out = aule.flash_attention_paged(to_gpu(q), kc, vc, bt, cl)
    assert isinstance(out, GpuTensor) and out.shape == q.shape and out.dtype == np.float32
    host = aule.flash_attention_paged(q, kc, vc, bt, cl)
    assert isinstance(host, np.ndarray) and host.shape == q.shape


# --- windows wider than int32 or than the sequence ---------------------------------------------------

BIG_WINDOWS = [(2**31, 0), (2**40, 3), 2**31, 2**40, (5, 2**31), (2**31 - 1, -1), (-1, 2**31 - 1),
               (2**31 - 1, 2**31 - 1), (2**63, 2**63)]


@pytest.mark.parametrize("sq, sk", [(8, 3), (5, 7)])
@pytest.mark.parametrize("window", BIG_WINDOWS, ids=str)
def test_huge_window_is_unbounded(ctx, window, sq, sk):
    q, k, v = _qkv(1, 2, 1, sq, sk, 16)
    want = aule.flash_attention(q, k, v, causal=False, window_size=window, backend="numpy", return_lse=True)
    got = aule.flash_attention(q, k, v, causal=False, window_size=window, backend="vulkan", return_lse=True)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [2**31, 2**40, (2**40, 0), (2**31 - 1, 0)], ids=str)
def test_paged_huge_window_is_unbounded(ctx, window):
    k, v, kc, vc = _paged_cache()
    q = RNG.standard_normal((2, 4, 2, 16)).astype(np.float32)
    bt, cl = np.array([[0, 1], [2, 3]], np.int32), np.array([13, 6], np.int32)
    want = aule.flash_attention_paged(q, k, v, bt, cl, window_size=window, backend="numpy")
    got = aule.flash_attention_paged(q, kc, vc, bt, cl, window_size=window)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


# --- errors that say why ----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", [None, "vulkan"])
@pytest.mark.parametrize("variant", ["fp16", "fp16_io", "coopmat"])
def test_forced_variant_refusing_gpu_tensors_says_so(ctx, variant, backend):
    if variant == "coopmat" and ctx.info.coopmat_f16:
        pytest.skip(f"{ctx.info.name} can run coopmat; the refusal needs a device without it")
    g = _gpu(*_qkv(1, 2, 1, 5, 7, 16))  # float32 GpuTensors: no fp16 module can serve them
    with forced_variant(variant), pytest.raises(UnsupportedError) as err:
        aule.flash_attention(*g, backend=backend)
    msg = str(err.value)
    assert f"AULE_VULKAN_VARIANT={variant}" in msg, msg


def test_aule_backend_bogus_names_the_variable(monkeypatch):
    monkeypatch.setenv("AULE_BACKEND", "bogus")
    q, k, v = _qkv(1, 1, 1, 2, 2, 8)
    with pytest.raises(ValueError, match=r"AULE_BACKEND='bogus'.*numpy"):
        aule.flash_attention(q, k, v)
    with pytest.raises(ValueError, match=r"AULE_BACKEND='bogus'"):  # nothing to compute: still checked
        aule.flash_attention(q[:, :, :0], k, v)
    with pytest.raises(ValueError, match=r"backend='nope'"):  # the argument wins over the variable
        aule.flash_attention(q, k, v, backend="nope")


@pytest.mark.parametrize("raw", ["x,y", "1,2,3", "0,4", "4,-8", "1.5,2", "4,99999999999", "64,16,64,2**40"])
def test_tiles_setting_is_checked(monkeypatch, raw):
    from aule import settings

    monkeypatch.setenv("AULE_VULKAN_TILES", raw)
    with pytest.raises(ValueError, match=r"AULE_VULKAN_TILES=.*(2|4) positive integers") as err:
        settings.kernel_choice()
    assert "invalid literal" not in str(err.value)


def test_to_gpu_refuses_complex(ctx):
    from aule.backends.vulkan import to_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(TypeError, match=r"array .*complex"):
            to_gpu(np.ones((2, 3), np.complex64))
        with pytest.raises(TypeError, match=r"array must hold numbers.*<U1"):
            to_gpu(np.array(["a", "b"]))


@pytest.mark.parametrize("src", [np.arange(-6, 6, dtype=np.int64), np.arange(12, dtype=np.uint8),
                                 np.arange(12) % 3 == 0])
def test_to_gpu_converts_integers_and_bools_to_float32(ctx, src):
    from aule.backends.vulkan import to_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = to_gpu(src.reshape(3, 4))
        half = to_gpu(src.reshape(3, 4), np.float16)
    assert t.dtype == np.float32 and half.dtype == np.float16
    np.testing.assert_array_equal(t.numpy(), src.reshape(3, 4).astype(np.float32))
    np.testing.assert_array_equal(half.numpy(), src.reshape(3, 4).astype(np.float16))


@pytest.mark.parametrize("src, dtype", [(np.array([1e300]), None), (np.array([7e4], np.float32), np.float16),
                                        (np.array([100000]), np.float16)])
def test_to_gpu_refuses_values_the_dtype_cannot_hold(ctx, src, dtype):
    from aule.backends.vulkan import to_gpu

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match=r"array .*range"):
            to_gpu(src, dtype)
        # inf and NaN are values, not overflow: they pass as they are
        kept = to_gpu(np.array([np.inf, -np.inf, np.nan]), dtype).numpy()
    assert np.isposinf(kept[0]) and np.isneginf(kept[1]) and np.isnan(kept[2])


def test_vulkan_cache_beyond_what_a_split_binds_is_refused_at_construction(ctx):
    # A cache past one buffer is split along its blocks (plans.cache_split); past the pieces the
    # shaders can bind it is refused before anything is allocated.
    from aule.backends.vulkan.plans import max_pieces, piece_limit

    bs, hk, d = 16, 8, 128
    limit = ctx.info.max_storage_buffer_range
    blocks = max_pieces(ctx.info) * (piece_limit(ctx.info) // (bs * hk * d * 4)) + 1
    with pytest.raises(UnsupportedError) as err:
        aule.PagedKVCache(blocks, bs, hk, d, dtype="float32", backend="vulkan")
    msg = str(err.value)
    assert str(blocks * bs * hk * d * 4) in msg and str(limit) in msg and "num_blocks" in msg, msg
    assert f"at most {blocks - 1}" in msg, msg
    aule.PagedKVCache(blocks - 1, 1, 1, 4, dtype="float32", backend="vulkan")  # a small one still works


# --- the memory pool ---------------------------------------------------------------------------------

def test_pool_rounding_slack_is_at_most_an_eighth():
    from aule.backends.vulkan.runtime.memory import BufferPool

    sizes = [2**k + e for k in range(11, 34) for e in (1, 2, 3, 2**(k - 3) + 1, 2**(k - 1) - 1)]
    sizes += list(range(2049, 70000, 331))
    for n in sizes:
        got = BufferPool.size_class(n)
        assert n <= got <= n + n // 8, (n, got)
    assert BufferPool.size_class(1) == BufferPool.size_class(256) == 256
    assert all(BufferPool.size_class(n) <= BufferPool.size_class(n + 1) for n in range(1, 5000))


def test_pool_reuses_a_buffer_within_a_size_class(ctx):
    from aule.backends.vulkan.runtime.memory import BufferPool

    n = 3 * 2**20 + 5
    assert BufferPool.size_class(n) == BufferPool.size_class(n + 1000)
    first = ctx.pool.acquire(n)
    buf = first.buffer
    first.release()
    again = ctx.pool.acquire(n + 1000)
    try:
        assert again.buffer is buf and again.nbytes == n + 1000
    finally:
        again.release()


def test_out_of_memory_quotes_the_request(ctx):
    from aule.errors import VulkanOutOfMemoryError

    want = ctx.info.max_allocation + 12345
    with pytest.raises(VulkanOutOfMemoryError) as err:
        ctx.pool.acquire(want)
    msg = str(err.value)
    assert f"{want} bytes" in msg, msg
    assert aule.flash_attention(*_qkv(1, 1, 1, 3, 3, 16), backend="vulkan").shape == (1, 1, 3, 16)


def test_pool_rounding_never_pushes_a_fitting_request_over_the_limit(ctx, monkeypatch):
    import dataclasses

    from aule.backends.vulkan.runtime.memory import BufferPool

    want = 3 * 2**20 + 1000
    assert BufferPool.size_class(want) > want + 4096
    monkeypatch.setattr(ctx, "info", dataclasses.replace(ctx.info, max_allocation=want + 4096))
    lease = ctx.pool.acquire(want)
    try:
        assert want <= lease.buffer.nbytes <= want + 4096
    finally:
        lease.release()


def test_numpy_backend_refuses_gpu_tensors_with_reason():
    vk = pytest.importorskip("aule.backends.vulkan")
    if not aule.backends.get("vulkan").available:
        pytest.skip("no Vulkan device")
    q = vk.to_gpu(np.random.default_rng(0).standard_normal((1, 1, 4, 8)).astype(np.float32))
    with pytest.raises(aule.UnsupportedError, match="GpuTensors.*NumPy backend reads host memory"):
        aule.flash_attention(q, q, q, backend="numpy")


def test_a_tile_override_that_does_not_fit_is_named_once(caplog):
    from aule.backends.vulkan import shaders
    tiled = shaders.VARIANTS["fast"].path
    class Dev:  # the properties pick_tiles reads
        name, is_cpu, max_shared_memory, max_workgroup_size = "a 16 KB device", False, 16384, 1024
    with caplog.at_level("WARNING", logger="aule"):
        t1 = tiled.pick_tiles(64, Dev, (64, 64, 256, 16))
        t2 = tiled.pick_tiles(64, Dev, (64, 64, 256, 16))
    assert t1 == t2 and t1 is not None and t1 != shaders.Tiles(64, 64, 256, 16)
    msgs = [r.getMessage() for r in caplog.records if "AULE_VULKAN_TILES" in r.getMessage()]
    assert len(msgs) == 1 and "64,64,256,16 is ignored for head_dim 64" in msgs[0] and "shared memory" in msgs[0]

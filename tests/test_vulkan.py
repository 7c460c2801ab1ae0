"""The Vulkan backend on whatever Vulkan device exists (Mesa's lavapipe in CI), with the Khronos
validation layer when AULE_VALIDATION=1: every variant forced against the float64 reference,
dtypes, GpuTensors, large buffers, threads, errors and routing."""
from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import pytest

import aule
from aule import VulkanError, VulkanOutOfMemoryError
from aule.call import canonicalize
from aule.reference import attention_reference

from _vulkan_util import VARIANT_ATOL, forced_variant, max_err, vulkan_context


@pytest.fixture(scope="module")
def ctx():
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


def test_validation_layer_active_when_asked(ctx):
    if os.environ.get("AULE_VALIDATION", "") in ("", "0"):
        pytest.skip("AULE_VALIDATION is not set: the validation layer is not requested")
    assert ctx.validation_active, "AULE_VALIDATION=1 but no debug messenger was installed"


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window). head_dim 256 runs for `fast`
# only in CI: lavapipe takes about a minute to compile each other variant's fully unrolled
# head_dim-256 pipeline (all variants at 256 run in the GPU test run).
CASES = [
    (1, 2, 2, 64, 64, 64, False, -1),
    (1, 4, 1, 97, 113, 40, True, -1),        # GQA 4, seq_q < seq_k, causal bottom-right
    (2, 8, 1, 113, 97, 80, True, (16, -1)),  # MQA 8, seq_q > seq_k: leading rows see nothing
    (1, 1, 1, 1, 1025, 128, True, -1),       # decode row over a long context
    (1, 1, 1, 1025, 1025, 64, False, 100),   # Mistral window, long sequence
    (1, 2, 2, 33, 50, 256, False, (5, 3)),   # two-sided window, largest head_dim
    (1, 4, 2, 128, 192, 64, True, -1),       # whole 16-row / 64-key tiles (coopmat's shapes)
    (2, 2, 1, 64, 128, 128, False, (20, 5)),
]


@pytest.mark.parametrize("variant", ["baseline", "fast", "fp16", "fp16_io", "fp16_amd", "coopmat", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}".format(*c))
def test_variant_matches_reference(ctx, variant, case, monkeypatch):
    from aule.backends.vulkan import VARIANTS

    b, hq, hk, sq, sk, d, causal, window = case
    if d == 256 and variant != "fast" and ctx.info.is_cpu:
        pytest.skip("head_dim 256 is checked with `fast` on CPU devices (compile time)")
    v = VARIANTS[variant]
    why = v.unfit(d, ctx.info, sk, sq)
    if why:
        pytest.skip(why)
    dtype = np.float16 if v.elem == "float16" else np.float32
    rng = np.random.default_rng(hash(case) % 2**32)
    q, k, vv = rand(rng, (b, hq, sq, d), dtype), rand(rng, (b, hk, sk, d), dtype), rand(rng, (b, hk, sk, d), dtype)
    # `cpu` JITs for 30-45 s per head_dim at its default rows per invocation on a 2-core machine;
    # head_dims other than 64 (the benchmarked default) run the same code with 4 rows per lane.
    if variant == "cpu" and d != 64:
        monkeypatch.setenv("AULE_VULKAN_TILES", "4,4")
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, vv, causal=causal, window_size=window, backend="vulkan",
                                        return_lse=True)
    assert out.dtype == dtype and lse.dtype == np.float32
    ref, ref_lse = attention_reference(q, k, vv, causal=causal, window_size=window, return_lse=True)
    err = max_err(out, ref)
    assert err <= VARIANT_ATOL[variant], f"{variant}: max abs error {err:.3g}"
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(lse) == empty).all(), "LSE must be -inf exactly for rows that see no key"
    assert (out[empty] == 0).all(), "rows that see no key must be zeros"
    if (~empty).any():
        assert np.abs(lse[~empty] - ref_lse[~empty]).max() <= VARIANT_ATOL[variant]


def test_custom_scale_and_odd_head_dim_uses_baseline(ctx):
    rng = np.random.default_rng(3)
    q, k, v = rand(rng, (1, 2, 17, 33), np.float32), rand(rng, (1, 2, 19, 33), np.float32), rand(rng, (1, 2, 19, 33), np.float32)
    out = aule.flash_attention(q, k, v, causal=False, scale=0.3, backend="vulkan")
    assert max_err(out, attention_reference(q, k, v, causal=False, scale=0.3)) <= 2e-5


def test_auto_selection_never_picks_an_unfit_variant(ctx):
    from aule.backends.vulkan import kernels

    for dt in ("float32", "float16"):
        for d in (16, 33, 40, 64, 80, 96, 128, 192, 256):
            v = kernels.select(dt, d, ctx.info)
            assert v.unfit(d, ctx.info) is None


def test_forced_unknown_variant_is_a_value_error(ctx, monkeypatch):
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "nope")
    q = np.ones((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="AULE_VULKAN_VARIANT"):
        aule.flash_attention(q, q, q, backend="vulkan")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cpu_torch_tensors_come_back_in_their_dtype(ctx, dtype):
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 37, 64, generator=g).to(getattr(torch, dtype)) for _ in range(3))
    out = aule.flash_attention(q, k, v, causal=True, backend="vulkan")
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.shape == q.shape
    ref = attention_reference(*(x.float().numpy() for x in (q, k, v)), causal=True)
    tol = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 2e-2}[dtype]
    assert max_err(out.float().numpy(), ref) <= tol


def test_float64_numpy_forced_returns_float64(ctx):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((1, 2, 20, 32)) for _ in range(3))
    out, lse = aule.flash_attention(q, k, v, backend="vulkan", return_lse=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    assert max_err(out, attention_reference(q, k, v)) <= 2e-5


def test_gpu_tensor_round_trip_and_attention(ctx):
    from aule.backends.vulkan import GpuTensor, to_gpu

    rng = np.random.default_rng(5)
    q, k, v = rand(rng, (2, 8, 45, 64), np.float32), rand(rng, (2, 2, 51, 64), np.float32), rand(rng, (2, 2, 51, 64), np.float32)
    qg, kg, vg = to_gpu(q), to_gpu(k), aule.to_gpu(v)
    assert aule.GpuTensor is GpuTensor and "GpuTensor" in aule.__all__
    assert (qg.numpy() == q).all() and qg.shape == q.shape and qg.dtype == np.float32
    out, lse = aule.flash_attention(qg, kg, vg, causal=True, return_lse=True)
    assert isinstance(out, GpuTensor) and isinstance(lse, GpuTensor)
    ref, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
    assert max_err(out.numpy(), ref) <= 2e-5
    assert np.abs(lse.numpy() - ref_lse).max() <= 2e-5
    h = to_gpu(q.astype(np.float16))
    assert h.dtype == np.float16 and (h.numpy() == q.astype(np.float16)).all()
    out.free()
    with pytest.raises(ValueError, match="freed"):
        out.numpy()


def test_buffer_larger_than_the_storage_range(ctx):
    """q/o over 128 MiB (lavapipe's maxStorageBufferRange): dispatches are split by head."""
    from aule.backends.vulkan import kernels

    b, h, sq, sk, d = 2, 16, 17408, 16, 64
    nbytes = b * h * sq * d * 4
    assert nbytes > 134217728
    rng = np.random.default_rng(6)
    q = rand(rng, (b, h, sq, d), np.float32)
    k, v = rand(rng, (b, h, sk, d), np.float32), rand(rng, (b, h, sk, d), np.float32)
    chunk = kernels.plan_chunks({"query": sq * d * 4}, b * h, ctx.info, ctx.info.max_workgroup_count[1])
    if ctx.info.max_storage_buffer_range < nbytes:
        assert chunk < b * h, "a tensor over the storage range must be split into several dispatches"
    out = aule.flash_attention(q, k, v, causal=False, backend="vulkan")
    for bi, hi in ((0, 0), (0, 7), (1, 15)):  # first, middle and last head
        ref = attention_reference(q[bi:bi + 1, hi:hi + 1], k[bi:bi + 1, hi:hi + 1], v[bi:bi + 1, hi:hi + 1], causal=False)
        assert max_err(out[bi:bi + 1, hi:hi + 1], ref) <= 2e-5


def test_staging_path_of_discrete_gpus(ctx, monkeypatch):
    """Device memory that is not mapped: uploads and downloads go through staging copies."""
    from aule.backends.vulkan import kernels
    from aule.backends.vulkan.runtime import Context

    monkeypatch.setenv("AULE_VULKAN_STAGING", "1")
    c = Context()
    try:
        assert c.upload_pool is not None and c.download_pool is not None
        rng = np.random.default_rng(11)
        q, k, v = rand(rng, (1, 4, 50, 64), np.float32), rand(rng, (1, 2, 60, 64), np.float32), rand(rng, (1, 2, 60, 64), np.float32)
        leases = [c.upload(x) for x in (q, k, v)]
        assert not leases[0].buffer.host_visible
        o, lse = c.pool.acquire(q.nbytes), c.pool.acquire(4 * 4 * 50)
        call = canonicalize(q, k, v, True, None, -1, True)
        variant = kernels.select("float32", 64, c.info)
        shape = kernels.Shape(1, 4, 2, 50, 60, 64)
        c.run(kernels.attention_dispatches(c, variant, shape, [l.buffer for l in leases] + [o.buffer, lse.buffer],
                                           call.scale, call.left, call.right, True))
        out = c.download(o.buffer, np.empty_like(q))
        got_lse = c.download(lse.buffer, np.empty((1, 4, 50), np.float32))
        ref, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
        assert max_err(out, ref) <= 2e-5 and np.abs(got_lse - ref_lse).max() <= 2e-5
        for l in leases + [o, lse]:
            l.release()
        assert not c.take_validation_messages()
    finally:
        c.close()


def test_eight_threads_at_once(ctx):
    rng = np.random.default_rng(7)
    jobs = [tuple(rand(rng, s, np.float32) for s in ((1, 4, 30 + i, 64), (1, 2, 40 + i, 64), (1, 2, 40 + i, 64)))
            for i in range(8)]

    def work(qkv):
        return aule.flash_attention(*qkv, causal=True, backend="vulkan")

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(work, jobs * 2))
    for qkv, out in zip(jobs * 2, outs):
        assert max_err(out, attention_reference(*qkv, causal=True)) <= 2e-5


def test_out_of_memory_is_its_own_error_and_the_context_survives(ctx):
    from aule.backends.vulkan.runtime import Buffer

    with pytest.raises(VulkanOutOfMemoryError) as ei:
        Buffer(ctx, 1 << 50, "device")
    assert isinstance(ei.value, VulkanError) and ei.value.call and "OUT_OF" in ei.value.result
    q = np.random.default_rng(8).standard_normal((1, 1, 8, 32)).astype(np.float32)
    out = aule.flash_attention(q, q, q, backend="vulkan")
    assert max_err(out, attention_reference(q, q, q)) <= 2e-5


def test_vk_result_codes_map_to_errors_with_advice():
    from aule.backends.vulkan.runtime import check

    with pytest.raises(VulkanOutOfMemoryError, match="vkAllocateMemory failed with VK_ERROR_OUT_OF_DEVICE_MEMORY"):
        check("vkAllocateMemory", -2)
    with pytest.raises(VulkanError, match="VK_ERROR_DEVICE_LOST.*restart") as ei:
        check("vkQueueSubmit", -4)
    assert not isinstance(ei.value, VulkanOutOfMemoryError) and ei.value.call == "vkQueueSubmit"


def test_push_constant_mirror_matches_every_shader(ctx):
    from aule.backends.vulkan import kernels

    for v in kernels.VARIANTS.values():
        assert kernels.push_constant_size(kernels.spirv_code(v.module)) == kernels.ATTN_PUSH.itemsize


def test_auto_route_skips_a_cpu_device_and_forced_uses_it(ctx):
    from aule.backends import get

    q = np.zeros((1, 1, 4, 16), np.float32) + 0.5
    call = canonicalize(q, q, q, True, None, -1, False)
    reason = get("vulkan").unsupported(call, forced=False)
    if ctx.info.is_cpu:
        assert reason and "CPU" in reason
    else:
        assert reason is None
    assert get("vulkan").unsupported(call, forced=True) is None


def test_device_choice_by_env(ctx, monkeypatch):
    from aule.backends.vulkan.runtime import Context

    monkeypatch.setenv("AULE_VULKAN_DEVICE", "no-such-device-name")
    with pytest.raises(VulkanError, match="AULE_VULKAN_DEVICE"):
        Context()
    monkeypatch.setenv("AULE_VULKAN_DEVICE", ctx.info.name.split()[0])
    c = Context()
    try:
        assert c.info.name == ctx.info.name
    finally:
        c.close()
    ctx.take_validation_messages()  # the failed Context above left nothing to validate


def test_egl_retry_that_finds_no_gpu_leaves_the_environment_alone(ctx, monkeypatch, tmp_path):
    """The headless-NVIDIA retry runs only when no GPU-type device was found; when it finds none
    either, the first result stands and VK_ICD_FILENAMES/VK_DRIVER_FILES are as before."""
    from aule.backends.vulkan import runtime

    if not ctx.info.is_cpu:
        pytest.skip("a GPU-type device was found, so the retry never runs here")
    monkeypatch.setenv("AULE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VK_ICD_FILENAMES", raising=False)
    monkeypatch.delenv("VK_DRIVER_FILES", raising=False)
    monkeypatch.setattr(runtime, "_nvidia_egl_loadable", lambda: True)
    monkeypatch.setattr(runtime, "NVIDIA_EGL", "libEGL_nvidia_absent_for_this_test.so.0")
    c = runtime.Context()
    try:
        assert c.route == "default loader search" and c.info.name == ctx.info.name
        icd = tmp_path / "icd" / "nvidia_egl_icd.json"
        assert "libEGL_nvidia_absent_for_this_test.so.0" in icd.read_text()
        assert "VK_ICD_FILENAMES" not in os.environ and "VK_DRIVER_FILES" not in os.environ
    finally:
        c.close()
    ctx.take_validation_messages()  # the loader's complaint about the absent library is expected


def test_details_for_aule_info(ctx):
    info = aule.backend_info()["vulkan"]
    assert info["available"]
    assert info["device"]["name"] == ctx.info.name and "route" in info and "variants_chosen" in info


def test_timestamps_give_gpu_time(ctx):
    from aule.backends.vulkan import attention, to_gpu

    if ctx.query_pool is None:
        pytest.skip("the compute queue has no timestamp support")
    q = to_gpu(np.random.default_rng(9).standard_normal((1, 2, 64, 64)).astype(np.float32))
    _, _, ns = attention(q, q, q, timestamps=True)
    assert ns is not None and ns > 0


@pytest.mark.gpu
def test_full_size_on_a_gpu(ctx):
    if ctx.info.is_cpu:
        pytest.skip(f"needs a GPU-type Vulkan device; this one is {ctx.info.name} ({ctx.info.type})")
    rng = np.random.default_rng(10)
    for dtype, tol in ((np.float32, 2e-5), (np.float16, 1e-2)):
        q, k, v = (rand(rng, (1, 8, 2048, 128), dtype) for _ in range(3))
        out = aule.flash_attention(q, k, v, causal=True)
        assert max_err(out, attention_reference(q, k, v, causal=True)) <= tol

"""The Vulkan runtime itself (aule/backends/vulkan/runtime/): memory routes, errors, device
choice, the EGL retry, timestamps, and recorded sequences with barriers between passes. Runs with
the Khronos validation layer when AULE_VALIDATION=1; any validation message fails a test."""
from __future__ import annotations

import os

import numpy as np
import pytest

import aule
from aule import VulkanError, VulkanOutOfMemoryError
from aule.call import canonicalize
from aule.reference import attention_reference

from _vulkan_util import ctx, max_err, no_validation_messages, vulkan_context  # noqa: F401 (fixtures)


def rand(rng, shape, dtype):
    return rng.standard_normal(shape).astype(dtype)


def test_staging_path_of_discrete_gpus(ctx, monkeypatch):
    """Device memory that is not mapped: uploads and downloads go through staging copies."""
    from aule.backends.vulkan import plans, select, shaders
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
        variant = select.select("float32", 64, c.info)
        spec, chunks = plans.attention_plan(variant, plans.Shape(1, 4, 2, 50, 60, 64), call.scale, call.left,
                                            call.right, True, c.info, None)
        c.run(plans.bind(shaders.pipeline(c, variant.name, spec), chunks,
                         [l.buffer for l in leases] + [o.buffer, lse.buffer, lse.buffer, lse.buffer]))  # no extras, no mask
        out = c.download(o.buffer, np.empty_like(q))
        got_lse = c.download(lse.buffer, np.empty((1, 4, 50), np.float32))
        ref, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
        assert max_err(out, ref) <= 2e-5 and np.abs(got_lse - ref_lse).max() <= 2e-5
        for l in leases + [o, lse]:
            l.release()
        assert not c.take_validation_messages()
    finally:
        c.close()


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
    from aule.backends.vulkan.runtime import device

    if not ctx.info.is_cpu:
        pytest.skip("a GPU-type device was found, so the retry never runs here")
    monkeypatch.setenv("AULE_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("VK_ICD_FILENAMES", raising=False)
    monkeypatch.delenv("VK_DRIVER_FILES", raising=False)
    monkeypatch.setattr(device, "_nvidia_egl_loadable", lambda: True)
    monkeypatch.setattr(device, "NVIDIA_EGL", "libEGL_nvidia_absent_for_this_test.so.0")
    c = runtime.Context()
    try:
        assert c.route == "default loader search" and c.info.name == ctx.info.name
        icd = tmp_path / "icd" / "nvidia_egl_icd.json"
        assert "libEGL_nvidia_absent_for_this_test.so.0" in icd.read_text()
        assert "VK_ICD_FILENAMES" not in os.environ and "VK_DRIVER_FILES" not in os.environ
    finally:
        c.close()
    ctx.take_validation_messages()  # the loader's complaint about the absent library is expected


def test_timestamps_give_gpu_time(ctx):
    from aule.backends.vulkan import attention, to_gpu

    if ctx.query_pool is None:
        pytest.skip("the compute queue has no timestamp support")
    q = to_gpu(np.random.default_rng(9).standard_normal((1, 2, 64, 64)).astype(np.float32))
    _, _, ns = attention(q, q, q, timestamps=True)
    assert ns is not None and ns > 0


# --- recorded sequences ----------------------------------------------------------------------------

ROWS, ROW_WORDS = 512, 256  # 512 rows of 1 KiB: enough workgroups that passes would overlap


def _copy_pipeline(ctx):
    from aule.backends.vulkan import shaders

    return shaders.pipeline(ctx, "copy_kv_to_paged", ((0, 64),))


class TwoPass:
    """copy_kv_to_paged twice: pass 1 scatters rows of A into B (B[perm[t]] = A[t]), pass 2
    gathers B into C in reverse (C[t] = B[n-1-t]), so every row of C is one another workgroup of
    pass 1 wrote. C == expected only if pass 2 ran and saw all of pass 1's writes."""

    def __init__(self, ctx, rng):
        self.ctx = ctx
        n = ROWS
        self.perm = rng.permutation(n).astype(np.int32)
        self.a = [rng.integers(0, 2**31, (n, ROW_WORDS), dtype=np.uint32) for _ in range(2)]
        zeros = np.zeros((n, ROW_WORDS), np.uint32)
        self.leases = {name: ctx.upload(x) for name, x in (
            ("ak", self.a[0]), ("av", self.a[1]), ("bk", zeros), ("bv", zeros), ("ck", zeros), ("cv", zeros),
            ("src1", np.arange(n, dtype=np.int32)), ("dst1", self.perm),
            ("src2", np.arange(n, dtype=np.int32)[::-1].copy()), ("dst2", np.arange(n, dtype=np.int32)))}
        self.pipe = _copy_pipeline(ctx)

    def dispatch(self, src, dst, slots):
        from aule.backends.vulkan.runtime import Dispatch

        L, rows = self.leases, ROWS * ROW_WORDS * 4
        bindings = tuple((L[name].buffer, 0, rows) for name in (src + "k", src + "v", dst + "k", dst + "v")) + \
            tuple((L[name].buffer, 0, 4 * ROWS) for name in ("src" + slots, "dst" + slots))
        return Dispatch(self.pipe, bindings, np.array([ROW_WORDS, ROWS, 0], np.uint32).tobytes(), (ROWS, 1, 1))

    def record(self, seq, barrier=True):
        seq.dispatch(self.dispatch("a", "b", "1"))
        if barrier:
            seq.barrier()
        seq.dispatch(self.dispatch("b", "c", "2"))
        return seq

    def expected(self, a):
        b = np.empty_like(a)
        b[self.perm] = a
        return b[::-1]

    def result(self):
        return [self.ctx.download(self.leases[n].buffer, np.empty((ROWS, ROW_WORDS), np.uint32)) for n in ("ck", "cv")]

    def clear(self, *names):
        zeros = np.zeros((ROWS, ROW_WORDS), np.uint32)
        for n in names:
            self.ctx.upload(zeros, self.leases[n])

    def release(self):
        for lease in self.leases.values():
            lease.release()


@pytest.fixture
def work(ctx):
    w = TwoPass(ctx, np.random.default_rng(20))
    yield w
    w.release()


def test_two_passes_in_one_submission_with_a_barrier(ctx, work):
    with ctx.sequence() as seq:
        work.record(seq).submit()
        ck, cv = work.result()
    assert (ck == work.expected(work.a[0])).all() and (cv == work.expected(work.a[1])).all()


def test_without_the_second_pass_c_stays_empty(ctx, work):
    """The check above sees the second pass: recording only the first leaves C zero."""
    with ctx.sequence() as seq:
        seq.dispatch(work.dispatch("a", "b", "1")).submit()
    assert not any(c.any() for c in work.result())


def test_a_recorded_sequence_resubmits_without_rerecording(ctx, work):
    rng = np.random.default_rng(22)
    seq = work.record(ctx.sequence())
    seq.submit()
    first = work.result()
    work.clear("bk", "bv", "ck", "cv")
    seq.submit()
    assert all((x == y).all() for x, y in zip(work.result(), first))
    # New inputs in the same buffers: the recorded commands read them on the next submission.
    work.a = [rng.integers(0, 2**31, (ROWS, ROW_WORDS), dtype=np.uint32) for _ in range(2)]
    ctx.upload(work.a[0], work.leases["ak"])
    ctx.upload(work.a[1], work.leases["av"])
    seq.submit(wait=False).wait()
    ck, cv = work.result()
    assert (ck == work.expected(work.a[0])).all() and (cv == work.expected(work.a[1])).all()
    with pytest.raises(ValueError, match="reset"):
        seq.dispatch(work.dispatch("a", "b", "1"))
    seq.reset()
    work.clear("ck", "cv")
    work.record(seq).submit()  # recorded anew after reset
    assert (work.result()[0] == work.expected(work.a[0])).all()
    seq.close()


def test_sequence_timestamps_give_gpu_time(ctx, work):
    with ctx.sequence() as seq:
        seq.timestamp()
        work.record(seq)
        seq.timestamp()
        seq.submit()
        if ctx.query_pool is None:
            assert seq.gpu_ns() is None
            pytest.skip("the compute queue has no timestamp support")
        assert seq.gpu_ns() > 0
        assert seq.submit().gpu_ns() > 0  # and again on a re-submission


def test_run_records_uploads_dispatches_and_downloads_in_one_submission(ctx, work):
    """Context.run on its per-call sequence: dispatches there have no barrier between them,
    so one pass per run; staging copies around it when device memory is not mapped."""
    assert ctx.run([work.dispatch("a", "b", "1")]) is None
    ctx.run([work.dispatch("b", "c", "2")])
    ck, _ = work.result()
    assert (ck == work.expected(work.a[0])).all()


def test_close_frees_open_sequences(monkeypatch):
    from aule.backends.vulkan.runtime import Context

    ctx = vulkan_context()
    c = Context()
    try:
        seq = c.sequence()
        seq.timestamp()
        seq.submit()
    finally:
        c.close()
    assert seq._h.command_pool is None and seq._h.fence is None
    assert not ctx.take_validation_messages()


def test_checked_call_names_the_call_and_its_result(ctx):
    from aule.backends.vulkan.runtime import call

    with ctx.sequence() as seq:  # a fence never submitted is not signalled
        with pytest.raises(VulkanError, match="vkGetFenceStatus failed with VK_NOT_READY") as ei:
            call("vkGetFenceStatus", ctx.device, seq._fence)
    assert ei.value.call == "vkGetFenceStatus" and ei.value.result == "VK_NOT_READY"


def test_a_corrupted_pipeline_cache_is_ignored(ctx, monkeypatch, tmp_path):
    from aule.backends.vulkan.runtime import Context

    monkeypatch.setenv("AULE_CACHE_DIR", str(tmp_path))
    c = Context()
    c.close()
    c.pipeline_cache_path.write_bytes(b"\x00garbage" * 100)
    c = Context()
    try:
        work = TwoPass(c, np.random.default_rng(25))
        with c.sequence() as seq:
            work.record(seq).submit()
        assert (work.result()[0] == work.expected(work.a[0])).all()
        work.release()
    finally:
        c.close()
    assert c.pipeline_cache_path.stat().st_size != 900  # rewritten by the driver's own data


def test_synchronization_validation_sees_the_barrier(ctx, monkeypatch):
    """With the layer's synchronization validation, the two passes without a barrier are a
    read-after-write hazard (what a real GPU would run concurrently), and with it none is; the
    per-call path's own barriers (staging copies in and out around a dispatch) are clean too."""
    from aule.backends.vulkan.runtime import Context

    if not ctx.validation_active:
        pytest.skip("AULE_VALIDATION is not set: no layer to check synchronization")
    monkeypatch.setenv("VK_LAYER_ENABLES", "VK_VALIDATION_FEATURE_ENABLE_SYNCHRONIZATION_VALIDATION_EXT")
    monkeypatch.setenv("AULE_VULKAN_STAGING", "1")
    c = Context()
    work = None
    try:
        work = TwoPass(c, np.random.default_rng(26))
        for barrier in (False, True):
            c.take_validation_messages()
            with c.sequence() as seq:
                work.record(seq, barrier=barrier).submit()
            hazards = [m for m in c.take_validation_messages() if "SYNC-HAZARD" in m]
            assert bool(hazards) != barrier, hazards
        work.clear("bk")
        c.run([work.dispatch("a", "b", "1")])
        b = c.download(work.leases["bk"].buffer, np.empty((ROWS, ROW_WORDS), np.uint32))
        assert (b[work.perm] == work.a[0]).all()
        assert not c.take_validation_messages()
    finally:
        if work is not None:
            work.release()
        c.close()

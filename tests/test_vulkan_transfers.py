"""Host data through the Vulkan runtime (threaded copies, staging folded into the call's own
submission, host-memory import) and re-submitted recordings of repeated calls.

Counts, never times: speed is measured by scripts/vulkan_transfer_probe.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import aule
from aule import settings
from aule.backends.vulkan import launch
from aule.backends.vulkan.runtime import memory
from aule.backends.vulkan.runtime.sequence import Sequence
from aule.call import canonicalize
from aule.reference import attention_reference

from _vulkan_util import ctx, live_buffers, max_err, no_validation_messages, vulkan_context  # noqa: F401 (fixtures)

TOL = 2e-5  # float32 inputs; the fp16 variants are checked by their own tests


def rand(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.fixture
def counted(monkeypatch):
    """Queue submissions and recorded dispatches while a test runs."""
    seen = {"submit": 0, "dispatch": 0}
    real_submit, real_dispatch = Sequence.submit, Sequence.dispatch

    def submit(self, *a, **kw):
        seen["submit"] += 1
        return real_submit(self, *a, **kw)

    def dispatch(self, *a, **kw):
        seen["dispatch"] += 1
        return real_dispatch(self, *a, **kw)

    monkeypatch.setattr(Sequence, "submit", submit)
    monkeypatch.setattr(Sequence, "dispatch", dispatch)
    return seen


def own_context(monkeypatch, **env):
    """A context of its own made under ``env`` (closed by the caller)."""
    from aule.backends.vulkan.runtime import Context

    vulkan_context()  # skips without Vulkan
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Context()


# --- copies ------------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("n", [0, 1, 4095, 4096 * 5 + 17, 1 << 16])
def test_threaded_copies_copy_every_byte(monkeypatch, threads, n):
    monkeypatch.setattr(memory.Copier, "CHUNK", 4096)  # small cuts, so small arrays split too
    c = memory.Copier(threads)
    try:
        src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n + 8, np.uint8)
        c.copy(dst[3:3 + n], src)  # an unaligned destination
        assert (dst[3:3 + n] == src).all() and not dst[:3].any() and not dst[3 + n:].any()
    finally:
        c.close()


def test_transfer_settings_are_checked(monkeypatch):
    monkeypatch.setenv("AULE_VULKAN_COPY_THREADS", "many")
    with pytest.raises(ValueError, match="AULE_VULKAN_COPY_THREADS"):
        settings.vulkan()
    monkeypatch.setenv("AULE_VULKAN_COPY_THREADS", "4")
    assert settings.vulkan().copy_threads == 4
    for raw, want in (("", set()), ("0", set()), ("1", {"upload", "download"}), ("download", {"download"})):
        monkeypatch.setenv("AULE_VULKAN_HOST_IMPORT", raw)
        assert settings.vulkan().host_import == want
    monkeypatch.setenv("AULE_VULKAN_HOST_IMPORT", "yes")
    with pytest.raises(ValueError, match="AULE_VULKAN_HOST_IMPORT"):
        settings.vulkan()


# --- host calls: one submission ----------------------------------------------------------------

def host_call(c, rng, return_lse=True, causal=True, shape=((1, 4, 37, 64), (1, 2, 53, 64))):
    q = rand(rng, shape[0])
    k, v = rand(rng, shape[1]), rand(rng, shape[1])
    call = canonicalize(q, k, v, causal, None, -1, return_lse)
    out, lse, _ = launch.attention(call, c)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, return_lse=True)
    assert max_err(out, ref) <= TOL
    if return_lse:
        assert np.abs(lse - ref_lse).max() <= TOL
    return out


@pytest.mark.parametrize("threads", ["1", "4"])
def test_staged_call_takes_one_submission(monkeypatch, counted, threads):
    """Through staging (a discrete GPU's path), inputs, dispatches and results share the call's
    one submission: no submission of its own for any upload or download."""
    monkeypatch.setattr(memory.Copier, "CHUNK", 4096)
    c = own_context(monkeypatch, AULE_VULKAN_STAGING="1", AULE_VULKAN_COPY_THREADS=threads)
    try:
        assert c.upload_pool is not None and c.download_pool is not None and c.copier.threads == int(threads)
        rng = np.random.default_rng(3)
        host_call(c, rng)  # pipelines made, buffers pooled
        before = counted["submit"]
        host_call(c, rng)
        assert counted["submit"] - before == 1
        assert not c.take_validation_messages()
    finally:
        c.close()


def test_mapped_call_takes_one_submission(ctx, counted):
    if not ctx.pool.acquire(16).buffer.host_visible or ctx.download_pool is not None:
        pytest.skip("device memory is not mapped and host-cached here")
    rng = np.random.default_rng(4)
    host_call(ctx, rng)
    before = counted["submit"]
    host_call(ctx, rng)
    assert counted["submit"] - before == 1


def test_torch_cpu_inputs_are_staged(ctx):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    q, k, v = rand(rng, (2, 2, 19, 40)), rand(rng, (2, 1, 23, 40)), rand(rng, (2, 1, 23, 40))
    out = aule.flash_attention(*(torch.from_numpy(x) for x in (q, k, v)), causal=False, backend="vulkan")
    assert isinstance(out, torch.Tensor) and max_err(out.numpy(), attention_reference(q, k, v, causal=False)) <= TOL


# --- host-memory import ------------------------------------------------------------------------

@pytest.mark.parametrize("staging", ["0", "1"])
@pytest.mark.parametrize("imports", ["1", "upload", "download"])
def test_host_import_dmas_from_and_to_host_arrays(monkeypatch, live_buffers, staging, imports):
    """With AULE_VULKAN_HOST_IMPORT, host arrays (their enclosing pages) are imported and copied
    by DMA, results land in page-aligned arrays, and every import is freed with its call."""
    monkeypatch.setattr(memory, "IMPORT_MIN_BYTES", 0)
    c = own_context(monkeypatch, AULE_VULKAN_HOST_IMPORT=imports, AULE_VULKAN_STAGING=staging)
    try:
        if not c.host_import_available:
            pytest.skip(f"{c.info.name} lacks VK_EXT_external_memory_host")
        assert c.host_import and c.memory.import_alignment >= 4096
        seen = []
        real = memory._Imported.__init__

        def counting(self, ctx_, array):
            real(self, ctx_, array)
            seen.append(self.offset)

        monkeypatch.setattr(memory._Imported, "__init__", counting)
        rng = np.random.default_rng(6)
        host_call(c, rng, return_lse=True)  # warm: pipelines and pooled buffers
        steady = len(live_buffers)
        seen.clear()
        out = host_call(c, rng, return_lse=True)
        # q, k, v in; out and LSE back unless device memory is host-cached and mapped (then
        # reading it is the one copy, as fast as a DMA would be)
        assert len(seen) == (3 if imports != "download" else 0) + (2 if imports != "upload" and c.download_pool else 0)
        if imports != "upload":
            assert out.__array_interface__["data"][0] % c.memory.import_alignment == 0
        assert len(live_buffers) <= steady, "imported buffers outlived their call"
        assert not c.take_validation_messages()
    finally:
        c.close()


def test_refused_import_falls_back_to_copies(monkeypatch):
    monkeypatch.setattr(memory, "IMPORT_MIN_BYTES", 0)
    c = own_context(monkeypatch, AULE_VULKAN_HOST_IMPORT="1")
    try:
        if not c.host_import_available:
            pytest.skip(f"{c.info.name} lacks VK_EXT_external_memory_host")
        monkeypatch.setattr(c, "host_pointer_types", lambda address: 0)  # no memory type fits
        host_call(c, np.random.default_rng(7))
        assert c._import_refused
        assert not c.take_validation_messages()
    finally:
        c.close()


# --- re-submitted recordings ----------------------------------------------------------------------

def gpu_inputs(rng):
    return [aule.to_gpu(x) for x in (rand(rng, (1, 2, 29, 64)), rand(rng, (1, 1, 31, 64)), rand(rng, (1, 1, 31, 64)))]


def test_a_repeated_call_resubmits_its_recording(ctx, counted):
    rng = np.random.default_rng(8)
    q, k, v = gpu_inputs(rng)
    ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=True)
    ctx.forget_recordings()
    dispatched, recorded, resubmitted = [], 0, 0
    for _ in range(4):
        before, stats = counted["dispatch"], dict(ctx.stats)
        out = aule.flash_attention(q, k, v, causal=True, backend="vulkan")
        dispatched.append(counted["dispatch"] - before)
        recorded += ctx.stats["recorded"] - stats["recorded"]
        resubmitted += ctx.stats["resubmitted"] - stats["resubmitted"]
        assert max_err(out.numpy(), ref) <= TOL  # (through staging, a run of its own: not counted)
        del out  # its buffer goes back to the pool: the next call binds it again
    # Seen once (recorded on the one-time sequence), seen again (recorded to keep), then re-submitted.
    assert dispatched[0] > 0 and dispatched[1] == dispatched[0] and dispatched[2:] == [0, 0]
    assert recorded == 1 and resubmitted == 2


def test_new_data_in_the_same_buffers_is_read_by_the_recording(ctx):
    """Re-submission binds buffers, not contents: a GpuTensor's new data is what the next call reads."""
    rng = np.random.default_rng(9)
    q, k, v = gpu_inputs(rng)
    for _ in range(3):
        aule.flash_attention(q, k, v, causal=False, backend="vulkan")
    hq = rand(rng, q.shape)
    ctx.upload(hq, q.lease)
    out = aule.flash_attention(q, k, v, causal=False, backend="vulkan")
    assert max_err(out.numpy(), attention_reference(hq, k.numpy(), v.numpy(), causal=False)) <= TOL


def test_a_held_output_gets_a_new_buffer_and_the_right_answer(ctx):
    rng = np.random.default_rng(10)
    q, k, v = gpu_inputs(rng)
    ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=True)
    outs = [aule.flash_attention(q, k, v, causal=True, backend="vulkan") for _ in range(5)]
    assert len({o.buffer._id for o in outs}) == 5
    assert all(max_err(o.numpy(), ref) <= TOL for o in outs)


def test_recordings_binding_a_destroyed_buffer_are_dropped(ctx):
    rng = np.random.default_rng(11)
    q, k, v = gpu_inputs(rng)
    ctx.forget_recordings()
    for _ in range(3):
        aule.flash_attention(q, k, v, causal=True, backend="vulkan")
    assert ctx._recordings and q.buffer._id in ctx._recordings_of
    buf = q.buffer
    q.free()
    ctx.trim_pools()  # destroys the freed buffers
    assert buf.handle is None and buf._id not in ctx._recordings_of
    assert set(ctx._ids_of) == set(ctx._recordings)  # every recording knows the buffers it binds
    assert not any(buf._id in ids for ids in ctx._ids_of.values())


def test_recordings_are_bounded(ctx):
    rng = np.random.default_rng(12)
    ctx.forget_recordings()
    for s in range(1, 2 * ctx.RECORDINGS + 5):
        q, k, v = (aule.to_gpu(rand(rng, (1, 1, s, 32))) for _ in range(3))
        for _ in range(2):
            aule.flash_attention(q, k, v, causal=True, backend="vulkan")
    assert len(ctx._recordings) <= ctx.RECORDINGS


def test_reuse_off_records_every_call(monkeypatch, counted):
    c = own_context(monkeypatch, AULE_VULKAN_REUSE="0")
    try:
        rng = np.random.default_rng(13)
        for _ in range(3):
            host_call(c, rng, shape=((1, 2, 16, 32), (1, 2, 16, 32)))
        assert c.stats["recorded"] == c.stats["resubmitted"] == 0 and not c._recordings
    finally:
        c.close()


def test_calls_from_several_threads(ctx):
    """The context's lock serialises recording and submission; each thread gets its own answer."""
    rng = np.random.default_rng(14)
    cases = []
    for i in range(4):
        host = [rand(rng, (1, 2, 20 + i, 64)), rand(rng, (1, 2, 24 + i, 64)), rand(rng, (1, 2, 24 + i, 64))]
        cases.append((host, [aule.to_gpu(x) for x in host], attention_reference(*host, causal=True)))
    errors = []

    def work(host, gpu, ref):
        try:
            for _ in range(6):
                assert max_err(aule.flash_attention(*host, causal=True, backend="vulkan"), ref) <= TOL
                assert max_err(aule.flash_attention(*gpu, causal=True, backend="vulkan").numpy(), ref) <= TOL
        except Exception as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=case) for case in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_result_blocks_are_reused_only_when_nothing_refers_to_them():
    import torch

    pool = memory.ResultPool(limit=1 << 26)
    n = 4 << 20
    addr = lambda a: a.__array_interface__["data"][0]  # noqa: E731
    a = pool.take(n)
    first = addr(a)
    held = pool.take(n)
    assert addr(held) != first, "a block in use is never handed out twice"
    del a
    assert addr(pool.take(n)) == first, "a dropped result's block is reused"
    for keep in (lambda r: r[10:], lambda r: memoryview(r), lambda r: torch.from_numpy(r),
                 lambda r: r.view(np.float32)[4:].reshape(-1, 2)):
        r = pool.take(n)
        ref = keep(r)
        at = addr(r)
        del r
        again = pool.take(n)
        other = addr(again)
        assert other != at, "a view or export of a result keeps its block"
        del ref, again
        assert addr(pool.take(n)) in (at, other), "both blocks are free again"
    big = pool.take(64 << 20)
    del big  # past the limit: not kept
    assert pool.held_bytes() <= 1 << 26
    pool.trim()
    assert pool.held_bytes() == 0


def test_pooled_results_of_calls_never_alias(ctx):
    """Large results come from the result pool: each call's output is its own while held, and
    keeps its values when later calls run."""
    rng = np.random.default_rng(3)
    q, k, v = (rand(rng, (1, 4, 512, 128)) for _ in range(3))
    first = aule.flash_attention(q, k, v, backend="vulkan")
    assert first.nbytes >= memory.RESULT_POOL_MIN_BYTES
    kept = first.copy()
    second = aule.flash_attention(q[:, ::-1].copy(), k, v, backend="vulkan")
    assert not np.shares_memory(first, second)
    assert np.array_equal(first, kept)
    ref = attention_reference(q, k, v)
    assert max_err(first, ref) < TOL
    del first
    third = aule.flash_attention(q, k, v, backend="vulkan")
    assert max_err(third, ref) < TOL and not np.shares_memory(third, second)

"""Chunked, overlapped host transfers (issue 14 item 5): inputs copied into staging chunk by chunk,
each chunk's DMA submitted as its copy ends; results downloaded chunk by chunk and copied out as
each chunk's fence signals.

The chunk size is forced to a few hundred bytes or KiB (AULE_VULKAN_CHUNK_BYTES), so lavapipe
crosses many chunk boundaries at odd offsets. Every chunked result must be bit for bit the
unchunked path's result (same dispatches on the same bytes) and within the dtype's tolerance of
the float64 reference. Counts, never times: speed is measured by scripts/vulkan_transfer_probe.py."""
from __future__ import annotations

import logging
import types

import numpy as np
import pytest

import aule
from aule import settings
from aule.backends.vulkan import launch
from aule.bench.contenders import _environ
from aule.backends.vulkan.runtime import Context, memory
from aule.backends.vulkan.runtime.sequence import Sequence
from aule.call import canonicalize, canonicalize_varlen
from aule.reference import attention_reference

from _vulkan_util import ctx, live_buffers, max_err, vulkan_context  # noqa: F401 (fixtures)

# float16 inputs are served in half storage (or converted to float32 on variants without it): the
# output's rounding and half products bound the error of O(1) outputs.
ATOL = {"float32": 2e-5, "float16": 1e-2, "bfloat16": 1e-2}

# (name, environment): device buffers not mapped (a discrete GPU without resizable BAR), and mapped
# device memory whose uploads are nevertheless staged (what the measurement may choose on a BAR).
ROUTES = {"unmapped": {"AULE_VULKAN_STAGING": "1"}, "staged-uploads": {"AULE_VULKAN_UPLOAD": "staged"}}


def chunked_context(route: str, chunk: int, threads: int = 1) -> Context:
    """A context of its own under ``route`` with chunks of ``chunk`` bytes (closed by the caller)."""
    vulkan_context()  # skips without Vulkan
    env = dict(ROUTES[route], AULE_VULKAN_CHUNK_BYTES=str(chunk), AULE_VULKAN_COPY_THREADS=str(threads))
    with _environ(env):
        return Context()


@pytest.fixture(scope="module")
def chunked():
    """Contexts by (route, chunk bytes, copy threads), made once for the module."""
    made = {}

    def get(route, chunk, threads=1):
        key = (route, chunk, threads)
        if key not in made:
            made[key] = chunked_context(route, chunk, threads)
        return made[key]

    yield get
    for c in made.values():
        assert not c.take_validation_messages()
        c.close()


@pytest.fixture
def counted(monkeypatch):
    seen = {"submit": 0}
    real = Sequence.submit

    def submit(self, *a, **kw):
        seen["submit"] += 1
        return real(self, *a, **kw)

    monkeypatch.setattr(Sequence, "submit", submit)
    return seen


def inputs(rng, dtype, hq=3, hk=1, sq=97, sk=113, d=40):
    q = rng.standard_normal((1, hq, sq, d)).astype(dtype)
    k, v = (rng.standard_normal((1, hk, sk, d)).astype(dtype) for _ in range(2))
    return q, k, v


def call_on(c, q, k, v, **kw):
    out, lse, _ = launch.attention(canonicalize(q, k, v, True, None, -1, True, **kw), c)
    return np.asarray(out), np.asarray(lse)


def n_chunks(nbytes, chunk):
    return -(-nbytes // chunk) if nbytes > chunk else 0


# --- settings ----------------------------------------------------------------------------------------

def test_chunk_settings_are_checked(monkeypatch):
    monkeypatch.setenv("AULE_VULKAN_CHUNK_BYTES", "")
    assert settings.vulkan().chunk_bytes == settings.DEFAULT_CHUNK_BYTES
    for raw, want in (("0", 0), ("256", 256), ("1000003", 1000003)):
        monkeypatch.setenv("AULE_VULKAN_CHUNK_BYTES", raw)
        assert settings.vulkan().chunk_bytes == want
    for raw in ("4M", "-1", "255", "1.5"):
        monkeypatch.setenv("AULE_VULKAN_CHUNK_BYTES", raw)
        with pytest.raises(ValueError, match="AULE_VULKAN_CHUNK_BYTES"):
            settings.vulkan()
    monkeypatch.delenv("AULE_VULKAN_CHUNK_BYTES")
    for raw, want in (("", "auto"), ("Mapped", "mapped"), (" staged ", "staged")):
        monkeypatch.setenv("AULE_VULKAN_UPLOAD", raw)
        assert settings.vulkan().upload == want
    monkeypatch.setenv("AULE_VULKAN_UPLOAD", "dma")
    with pytest.raises(ValueError, match="AULE_VULKAN_UPLOAD.*auto, mapped or staged"):
        settings.vulkan()


# --- the route rule ----------------------------------------------------------------------------------

def test_upload_route_rule(monkeypatch):
    """Unmapped memory is always staged; host-cached mapped memory never (it is host memory); a
    mapped uncached BAR is measured once, for arrays larger than a chunk, and the answer kept."""
    measured = []
    monkeypatch.setattr(memory, "measure_uploads", lambda c: measured.append(c) or True)
    fake = types.SimpleNamespace(upload_setting="auto", chunk_bytes=1 << 20, staged_uploads_faster=None)
    buf = lambda visible, cached: types.SimpleNamespace(host_visible=visible, host_cached=cached)  # noqa: E731
    assert memory.staged_upload(fake, buf(False, False), 10)
    assert not memory.staged_upload(fake, buf(True, True), 64 << 20)
    assert not memory.staged_upload(fake, buf(True, False), 1 << 20), "one chunk is written where mapped"
    assert not measured
    assert memory.staged_upload(fake, buf(True, False), 3 << 20) and memory.staged_upload(fake, buf(True, False), 9 << 20)
    assert len(measured) == 1 and fake.staged_uploads_faster is True
    fake.staged_uploads_faster = False
    assert not memory.staged_upload(fake, buf(True, False), 9 << 20)
    fake.chunk_bytes = 0
    fake.staged_uploads_faster = None
    assert not memory.staged_upload(fake, buf(True, False), 9 << 20), "chunking off: nothing to overlap"
    fake.upload_setting = "staged"
    assert memory.staged_upload(fake, buf(True, True), 10)
    fake.upload_setting = "mapped"
    assert not memory.staged_upload(fake, buf(True, False), 64 << 20)
    assert memory.staged_upload(fake, buf(False, False), 10), "unmapped memory has no other way"
    assert len(measured) == 1


def test_measurement_decides_and_logs(ctx, caplog, live_buffers):
    """The upload measurement runs on any device whose memory is mapped, says what it measured,
    and leaves no buffer behind but pooled ones."""
    if not ctx.pool.acquire(16).buffer.host_visible:
        pytest.skip("device memory is not mapped here: uploads are always staged")
    with caplog.at_level(logging.INFO, logger="aule"):
        faster = memory.measure_uploads(ctx, nbytes=1 << 20, reps=1)
    assert isinstance(faster, bool)
    assert any("through staging with chunked DMA" in r.getMessage() for r in caplog.records)
    ctx.trim_pools()
    assert not live_buffers


# --- chunked calls -----------------------------------------------------------------------------------

@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("chunk,threads", [(256, 1), (1000, 3), (4099, 1), (12288, 4)])
def test_chunked_calls_are_bit_identical(ctx, chunked, counted, route, dtype, chunk, threads):
    """Odd chunk sizes (boundaries inside elements and rows), inputs of many chunks and of
    exactly one, results of many chunks and LSEs under one: the answer is the unchunked path's,
    bit for bit, and the submissions are one per chunk plus the run."""
    c = chunked(route, chunk, threads)
    rng = np.random.default_rng(chunk)
    q, k, v = inputs(rng, np.dtype(dtype))
    want, want_lse = call_on(ctx, q, k, v)  # the shared context: mapped, one submission
    ref, ref_lse = attention_reference(q, k, v, causal=True, return_lse=True)
    assert max_err(want, ref) <= ATOL[dtype]
    for _ in range(2):  # recorded, then re-submitted
        before = counted["submit"]
        out, lse = call_on(c, q, k, v)
        assert out.dtype == want.dtype and np.array_equal(out, want) and np.array_equal(lse, want_lse)
        assert np.abs(lse - ref_lse).max() <= 1e-5
        elem = np.dtype(launch.attention_plan_for(canonicalize(q, k, v, True, None, -1, True), c)[0].elem)
        ins = sum(n_chunks(x.size * elem.itemsize, chunk) for x in (q, k, v))
        outs = n_chunks(out.size * elem.itemsize, chunk) + n_chunks(lse.nbytes, chunk)
        assert ins and outs, "the shapes must cross chunk boundaries"
        if c.download_pool is None:  # mapped host-cached memory: results are read where they lie
            outs = 0
        assert counted["submit"] - before == ins + 1 + outs
    assert not any(s._h.pending for s in c._chunk_seqs), "nothing left in flight"


def test_exact_multiple_of_the_chunk_and_tiny_arrays(ctx, chunked):
    """A tensor of exactly n chunks, and arrays under one chunk beside large ones."""
    c = chunked("unmapped", 2560)
    rng = np.random.default_rng(5)
    q, k, v = inputs(rng, np.float32, hq=2, hk=2, sq=40, sk=3, d=32)  # q: 10240 bytes = 4 chunks; k, v: 384
    assert q.nbytes % 2560 == 0 and k.nbytes < 2560
    want = call_on(ctx, q, k, v)
    got = call_on(c, q, k, v)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))


def test_torch_tensors_of_every_dtype(ctx, chunked):
    torch = pytest.importorskip("torch")
    c = chunked("unmapped", 1000, 2)
    rng = np.random.default_rng(6)
    q, k, v = inputs(rng, np.float32, hq=4, hk=2, sq=33, sk=65, d=64)
    for dt, name in ((torch.float32, "float32"), (torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        tq, tk, tv = (torch.from_numpy(x).to(dt) for x in (q, k, v))
        call = canonicalize(tq, tk, tv, False, None, -1, False)
        out, _, _ = launch.attention(call, c)
        want, _, _ = launch.attention(canonicalize(tq, tk, tv, False, None, -1, False), ctx)
        assert isinstance(out, torch.Tensor) and out.dtype == dt
        assert torch.equal(out, want)
        ref = attention_reference(*(x.float().numpy() for x in (tq, tk, tv)), causal=False)
        assert max_err(out.float().numpy(), ref) <= ATOL[name]


def test_features_mask_and_varlen_through_chunks(ctx, chunked):
    """A general mask (binding 6, staged like the inputs) and a varlen call (its packed tensors
    and its packed output) take the chunked path as dense inputs do."""
    c = chunked("unmapped", 768, 3)
    rng = np.random.default_rng(7)
    q, k, v = inputs(rng, np.float32, hq=2, hk=2, sq=29, sk=37, d=32)
    mask = rng.standard_normal((1, 2, 29, 37)).astype(np.float32)
    slopes = np.array([0.25, 0.5], np.float32)
    want = call_on(ctx, q, k, v, attn_mask=mask, alibi_slopes=slopes)
    got = call_on(c, q, k, v, attn_mask=mask, alibi_slopes=slopes)
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    ref = attention_reference(q, k, v, causal=True, attn_mask=mask, alibi_slopes=slopes)
    assert max_err(got[0], ref) <= ATOL["float32"]

    lens_q, lens_k = [17, 1, 40], [23, 5, 40]
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    pq, pk, pv = (rng.standard_normal((n, h, 48)).astype(np.float32) for n, h in ((cu_q[-1], 4), (cu_k[-1], 2),
                                                                                   (cu_k[-1], 2)))
    vc = lambda: canonicalize_varlen(pq, pk, pv, cu_q, cu_k, 40, 40, causal=True, return_lse=True)  # noqa: E731
    want_o, want_l, _ = launch.varlen_attention(vc(), ctx)
    got_o, got_l, _ = launch.varlen_attention(vc(), c)
    assert np.array_equal(got_o, want_o) and np.array_equal(got_l, want_l)


def test_runtime_upload_and_download_in_chunks(chunked):
    """ctx.upload / ctx.download (the paged path's and GpuTensor's transfers) through chunks."""
    c = chunked("unmapped", 300, 2)
    for n in (1, 299, 300, 301, 4097, 30011):
        src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        lease = c.upload(src)
        try:
            back = c.download(lease.buffer, np.zeros(n, np.uint8))
        finally:
            lease.release()
        assert np.array_equal(back, src)


def test_gpu_tensor_round_trip_through_chunks(monkeypatch):
    c = chunked_context("unmapped", 512, 1)
    try:
        from aule.backends.vulkan.tensor import GpuTensor

        x = np.random.default_rng(9).standard_normal((3, 5, 77)).astype(np.float16)
        t = GpuTensor(c, c.upload(x), x.shape, x.dtype)
        assert np.array_equal(c.download(t.buffer, np.empty_like(x)), x)
    finally:
        c.close()


def test_unmoved_chunks_cannot_be_finished(chunked):
    c = chunked("unmapped", 256)
    lease = c.pool.acquire(4096)
    try:
        t = c.readback(lease.buffer, np.zeros(1024, np.uint8))
        assert len(t.chunks) == 4 and not t.copies
        with pytest.raises(RuntimeError, match="down_chunks"):
            t.finish()
        t.release()
    finally:
        lease.release()


# --- failures part-way ---------------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("where", ["host copy", "upload dma", "download dma", "copy out"])
def test_a_failure_part_way_leaves_nothing_in_flight_or_corrupted(ctx, monkeypatch, live_buffers, threads, where):
    """A failure after some chunks were submitted raises, waits for what was submitted (nothing in
    flight, no lease lost), and the next call gives the right answer bit for bit."""
    c = chunked_context("unmapped", 1024, threads)
    try:
        rng = np.random.default_rng(10)
        q, k, v = inputs(rng, np.float32, hq=2, hk=2, sq=50, sk=70, d=32)
        want = call_on(ctx, q, k, v)
        assert all(np.array_equal(a, b) for a, b in zip(call_on(c, q, k, v), want))
        n_up = sum(n_chunks(x.nbytes, 1024) for x in (q, k, v))
        steady = len(live_buffers)

        class Boom(RuntimeError):
            pass

        count = {"n": 0}
        m = monkeypatch.context().__enter__()  # undone below, leaving live_buffers' own patches
        if where in ("upload dma", "download dma"):
            at = 3 if where == "upload dma" else n_up + 2
            real = Context._chunk_sequence

            def failing(self, i, copy, before):
                if i == at:
                    raise Boom(where)
                return real(self, i, copy, before)

            m.setattr(Context, "_chunk_sequence", failing)
        else:
            at = 4 if where == "host copy" else 2
            real_start = memory.Copier.start

            def start(self, dst, src):
                count["n"] += 1
                if count["n"] == (at if where == "host copy" or threads == 1 else n_up + at):
                    raise Boom(where)
                return real_start(self, dst, src)

            m.setattr(memory.Copier, "start", start)
            if where == "host copy" and threads == 1:
                # one thread copies inline, not through start(): fail a chunk's own copy instead
                real_send = Context._send_chunks

                def send(self, chunks):
                    bad = chunks[at]
                    chunks[at] = types.SimpleNamespace(dst=bad.dst, src=None, copy=bad.copy, done=False)
                    return real_send(self, chunks)

                m.setattr(Context, "_send_chunks", send)
        with pytest.raises((Boom, TypeError, ValueError)):
            call_on(c, q, k, v)
        m.undo()
        assert not any(s._h.pending for s in c._chunk_seqs) and not c._last_run._h.pending
        got = call_on(c, q, k, v)
        assert all(np.array_equal(a, b) for a, b in zip(got, want))
        assert len(live_buffers) <= steady + 1, "no buffer leaked by the failed call"
        assert not c.take_validation_messages()
    finally:
        c.close()


# --- on a discrete GPU ---------------------------------------------------------------------------------

def test_discrete_gpu_call_of_issue_14_takes_the_measured_route(ctx):
    """GPU only (skips elsewhere): the issue's NumPy float16 call (B1 H32 S4096 D128 causal) on a
    discrete GPU is served by the default context's chunked path, its upload route measured once,
    and gives bit for bit what the path before chunking gives (chunking off, mapped uploads)."""
    if ctx.info.type != "discrete-gpu":
        pytest.skip(f"needs a discrete GPU ({ctx.info.name} is {ctx.info.type})")
    rng = np.random.default_rng(14)
    q, k, v = (rng.standard_normal((1, 32, 4096, 128)).astype(np.float16) for _ in range(3))
    new = call_on(ctx, q, k, v)
    assert ctx.download_pool is None or ctx.chunk_bytes > 0
    probe = ctx.pool.acquire(16).buffer
    if probe.host_visible and not probe.host_cached:
        assert ctx.staged_uploads_faster is not None, "a mapped BAR's upload route is measured at the first large call"
    saved = ctx.chunk_bytes, ctx.upload_setting
    try:
        ctx.chunk_bytes, ctx.upload_setting = 0, "mapped"
        old = call_on(ctx, q, k, v)
    finally:
        ctx.chunk_bytes, ctx.upload_setting = saved
    assert all(np.array_equal(a, b) for a, b in zip(new, old))
    ref_rows = attention_reference(q[:, :2, -64:], k[:, :2], v[:, :2], causal=True)  # the last rows of two heads
    assert max_err(new[0][:, :2, -64:], ref_rows) <= ATOL["float16"]


@pytest.mark.parametrize("n", [1, 4096, 8191, 3 * 4096 + 5, 1 << 20])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_spread_copies_copy_every_byte(n, threads):
    c = memory.Copier(threads)
    try:
        src = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
        dst = np.zeros(n + 6, np.uint8)
        for spread in (False, True):
            dst[...] = 0
            c.start(dst[3:3 + n], src, spread).result()
            assert (dst[3:3 + n] == src).all() and not dst[:3].any() and not dst[3 + n:].any()
    finally:
        c.close()

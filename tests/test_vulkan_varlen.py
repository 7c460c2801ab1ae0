"""flash_attention_varlen on the Vulkan backend (launch.varlen_attention): every sequence of a packed
call in one submission (uploads, the repack on the device, the sequences, the unpack, the download),
against the float64 reference per sequence; every variant that can serve, the features, the
device's storage-buffer range and descriptor sets."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import aule
from aule.call import canonicalize_varlen
from aule.reference import attention_reference

from _vulkan_util import VARIANT_ATOL, forced_variant
from _vulkan_util import ctx, no_validation_messages  # noqa: F401

VARIANTS = ["baseline", "fast", "fp16", "fp16_io", "fp16_amd", "cpu", "coopmat"]
# An empty query; keys without rows (4, 0: zeros, no dispatch); seq_q < seq_k and seq_q > seq_k,
# whose first causal rows see no key (64 rows over 20 keys).
LENS_Q = [0, 1, 17, 5, 33, 64]
LENS_K = [3, 0, 9, 40, 33, 20]


def packed(rng, lens_q, lens_k, hq, hk, d, dtype=np.float32, scale=1.0):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q, k, v = ((rng.standard_normal((n, h, d)) * scale).astype(dtype)
               for n, h in ((cu_q[-1], hq), (cu_k[-1], hk), (cu_k[-1], hk)))
    return q, k, v, cu_q, cu_k


def reference(q, k, v, cu_q, cu_k, alibi_slopes=None, **kw):
    """Float64 out [total_q, Hq, D] and LSE [Hq, total_q], one sequence at a time."""
    out = np.full(q.shape, np.nan)
    lse = np.full((q.shape[1], q.shape[0]), np.nan)
    for i in range(len(cu_q) - 1):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        slopes = None if alibi_slopes is None else alibi_slopes[i:i + 1]
        o, l = attention_reference(*(np.asarray(x[lo:hi], np.float64).transpose(1, 0, 2)[None]
                                     for x, lo, hi in ((q, a, b), (k, c, e), (v, c, e))),
                                   return_lse=True, alibi_slopes=slopes, **kw)
        out[a:b], lse[:, a:b] = o[0].transpose(1, 0, 2), l[0]
    return out, lse


def check(got, want, atol):
    (out, lse), (w_out, w_lse) = got, want
    out = np.asarray(out, np.float64)
    assert out.shape == w_out.shape and not np.isnan(out).any()
    err = np.abs(out - w_out).max()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"
    if lse is not None:
        lse = np.asarray(lse, np.float64)
        assert lse.shape == w_lse.shape
        assert (np.isneginf(lse) == np.isneginf(w_lse)).all(), "rows that see no key have LSE -inf, only they"
        fin = np.isfinite(w_lse)
        assert np.abs(lse[fin] - w_lse[fin]).max() <= max(atol, 1e-5)


def features(rng, name, batch, hq):
    return {"plain": {},
            "softcap": dict(softcap=4.0, scale=0.3),
            "alibi": dict(alibi_slopes=rng.uniform(0.05, 0.5, (batch, hq)).astype(np.float32)),
            "sinks": dict(sinks=rng.uniform(-1.0, 2.0, hq).astype(np.float32)),
            "all": dict(softcap=4.0, alibi_slopes=rng.uniform(0.05, 0.5, (batch, hq)).astype(np.float32),
                        sinks=rng.uniform(-1.0, 2.0, hq).astype(np.float32))}[name]


def varlen(q, k, v, cu_q, cu_k, **kw):
    return aule.flash_attention_varlen(q, k, v, cu_q, cu_k, int(np.diff(cu_q).max()), int(np.diff(cu_k).max()),
                                       backend="vulkan", **kw)


@pytest.fixture
def submissions(monkeypatch):
    """What the Vulkan runtime did while a test ran: ``submit`` (queue submissions), ``runs`` (the
    dispatch count of each pass of each Context.run_passes: uploads and downloads through staging
    are runs without dispatches), ``events`` ("d" per dispatch, "b" per barrier, in recording order) and the
    ``bindings`` of every dispatch."""
    from aule.backends.vulkan.runtime.context import Context
    from aule.backends.vulkan.runtime.sequence import Sequence

    seen = {"submit": 0, "runs": [], "events": [], "bindings": []}

    def wrap(cls, name, note):
        real = getattr(cls, name)

        def counting(self, *a, **kw):
            note(*a)
            return real(self, *a, **kw)

        monkeypatch.setattr(cls, name, counting)

    wrap(Sequence, "submit", lambda *a: seen.__setitem__("submit", seen["submit"] + 1))
    wrap(Context, "run_passes", lambda passes, *a: seen["runs"].append(tuple(len(p) for p in passes)))
    wrap(Sequence, "barrier", lambda *a: seen["events"].append("b"))

    def dispatch(d, *a):
        seen["events"].append("d")
        seen["bindings"].append(d.bindings)

    wrap(Sequence, "dispatch", dispatch)
    return seen


def computed(seen) -> list:
    """The attention dispatches of each run that dispatched (not staging copies): a varlen run's
    passes are the repack of q, k and v into blocks, the sequences' attention, and the unpack of
    the output, so its middle pass."""
    return [r[1] for r in seen["runs"] if sum(r)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name,causal,window,heads", [
    ("plain", True, -1, (4, 2)), ("plain", False, (6, 3), (2, 2)), ("softcap", True, 9, (8, 1)),
    ("alibi", False, -1, (4, 2)), ("sinks", True, -1, (4, 1)), ("all", True, (12, 0), (4, 2))])
def test_each_variant_serves_packed_sequences(ctx, variant, name, causal, window, heads):
    from aule.backends.vulkan import VARIANTS as TABLE

    d = 64
    v_ = TABLE[variant]
    why = v_.unfit(d, ctx.info, max(LENS_K), max(LENS_Q))
    if why:
        pytest.skip(why)
    rng = np.random.default_rng(len(name) + 7 * heads[0] + (3 if causal else 0))
    dt = np.float16 if v_.elem == "float16" else np.float32
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, *heads, d, dt, scale=1.5)
    kw = dict(causal=causal, window_size=window, **features(rng, name, len(LENS_Q), heads[0]))
    lacks = {f for f, arg in (("softcap", "softcap"), ("alibi", "alibi_slopes"), ("sinks", "sinks")) if arg in kw}
    if lacks - v_.features:  # refused by name, see test_refusals_name_the_reason
        pytest.skip(f"{variant} does not apply {', '.join(sorted(lacks - v_.features))}")
    with forced_variant(variant):
        got = varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    assert got[0].dtype == dt and got[0].shape == q.shape and got[0].flags["C_CONTIGUOUS"]
    assert got[1].dtype == np.float32
    want = reference(q, k, v, cu_q, cu_k, **kw)
    check(got, want, VARIANT_ATOL[variant])
    if causal:  # 64 rows over 20 keys: the first 44 see none
        rows = slice(cu_q[5], cu_q[5] + 44)
        assert (got[0][rows] == 0).all()
    if name != "plain":
        plain = reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window)[0]
        assert np.abs(plain - want[0]).max() > 10 * VARIANT_ATOL[variant], "the feature must change the result"


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("source", ["numpy", "torch"])
def test_host_dtypes_and_torch_tensors(ctx, dtype, source):
    rng = np.random.default_rng(3)
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, 4, 2, 40, dtype)
    sinks = rng.uniform(-1.0, 1.0, 4).astype(np.float32)
    want = reference(q, k, v, cu_q, cu_k, causal=True, sinks=sinks)
    # float16 within the fp16 variants' tolerance: a GPU computes float16 host data in them.
    atol = VARIANT_ATOL["fp16"] if dtype == np.float16 else 2e-5
    if source == "torch":
        torch = pytest.importorskip("torch")
        args = [torch.from_numpy(x) for x in (q, k, v, cu_q, cu_k)]
        out, lse = varlen(*args, causal=True, sinks=torch.from_numpy(sinks), return_lse=True)
        assert isinstance(out, torch.Tensor) and out.dtype == args[0].dtype and out.is_contiguous()
        assert lse.dtype == torch.float32 and tuple(lse.shape) == (4, q.shape[0])
        out, lse = out.numpy(), lse.numpy()
    else:
        out, lse = varlen(q, k, v, cu_q, cu_k, causal=True, sinks=sinks, return_lse=True)
        assert out.dtype == dtype
    check((out, lse), want, atol)
    # The sequence of one row and no keys: zeros, and the sink as LSE.
    assert (out[cu_q[1]] == 0).all() and np.allclose(lse[:, cu_q[1]], sinks)


def test_bfloat16_tensors(ctx):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(10)
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, 4, 2, 32)
    t = [torch.from_numpy(x).to(torch.bfloat16) for x in (q, k, v)]
    out, lse = varlen(*t, cu_q, cu_k, causal=True, window_size=(7, 0), return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    # Against the bfloat16 values the kernel read (computed in float32), within bfloat16's rounding of the output.
    want = reference(*(x.float().numpy() for x in t), cu_q, cu_k, causal=True, window_size=(7, 0))
    check((out.float().numpy(), lse.numpy()), want, 2e-2)


def test_non_contiguous_inputs_and_no_lse(ctx):
    rng = np.random.default_rng(4)
    q, k, v, cu_q, cu_k = packed(rng, [7, 30, 2], [7, 12, 50], 4, 2, 96)
    wide = np.zeros((q.shape[0], 4, 128), np.float32)
    wide[:, :, 16:112] = q
    out = varlen(wide[:, :, 16:112], k[:, ::-1], v[:, ::-1], cu_q, cu_k, causal=False)
    assert isinstance(out, np.ndarray)
    check((out, None), reference(q, k[:, ::-1], v[:, ::-1], cu_q, cu_k, causal=False), 2e-5)


def test_one_submission_serves_the_whole_call(ctx, submissions):
    rng = np.random.default_rng(5)
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, 4, 2, 64)
    out, lse = varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    served = sum(1 for a, b in zip(np.diff(cu_q), np.diff(cu_k)) if a and b)
    assert computed(submissions) == [served] and served == 4
    assert submissions["runs"] == [(3, 4, 1)], "q, k and v repacked, the sequences, the output unpacked"
    assert submissions["submit"] == 1, "staging copies, where there are any, join the one submission"
    # One dispatch per sequence with rows and keys, recorded back to back: no barrier between them.
    assert "".join(submissions["events"]).count("dddd") == 1
    check((out, lse), reference(q, k, v, cu_q, cu_k, causal=True), 2e-5)


def test_more_sequences_than_the_descriptor_cache_holds(ctx, submissions):
    # Each sequence binds its own ranges, so a batch of more sequences than the context caches
    # descriptor sets must keep every set it recorded alive until the submission ran.
    rng = np.random.default_rng(6)
    n = ctx.DESCRIPTOR_SETS + 44
    lens_q, lens_k = rng.integers(1, 6, n), rng.integers(1, 9, n)
    q, k, v, cu_q, cu_k = packed(rng, lens_q, lens_k, 2, 1, 16)
    want = reference(q, k, v, cu_q, cu_k, causal=False)
    for _ in range(2):  # again: cached sets, then the overflow once more
        check(varlen(q, k, v, cu_q, cu_k, causal=False, return_lse=True), want, 2e-5)
    assert computed(submissions) == [n, n]
    assert len({tuple((id(b), off) for b, off, _ in bs) for bs in submissions["bindings"][3:3 + n]}) == n


def test_nothing_to_dispatch(ctx, submissions):
    q = np.random.default_rng(7).standard_normal((5, 2, 8)).astype(np.float32)
    k = np.zeros((0, 1, 8), np.float32)
    sinks = np.array([0.25, -2.0], np.float32)
    out, lse = varlen(q, k, k, np.array([0, 0, 2, 5]), np.array([0, 0, 0, 0]), sinks=sinks, return_lse=True)
    assert (out == 0).all() and out.shape == q.shape and np.array_equal(lse, np.repeat(sinks[:, None], 5, 1))
    assert submissions["submit"] == 0 and not submissions["runs"]


class _Limited:
    """The context seen through a device whose storage-buffer range is ``limit`` bytes."""

    def __init__(self, real, limit):
        self._real = real
        self.info = dataclasses.replace(real.info, max_storage_buffer_range=limit)

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_bindings_respect_the_storage_buffer_range(ctx, submissions, monkeypatch):
    from aule.backends.vulkan import backend, launch, runtime

    limit = 1 << 15
    small = _Limited(ctx, limit)
    monkeypatch.setattr(runtime, "context", lambda: small)
    rng = np.random.default_rng(8)
    # Two query heads per KV head of 96 rows x 32 x 4 bytes = 24 KiB: one KV head per dispatch. The
    # packed data spans more than the range, each sequence's blocks are bound on their own.
    q, k, v, cu_q, cu_k = packed(rng, [96, 3, 40], [50, 96, 40], 4, 2, 32)
    call = canonicalize_varlen(q, k, v, cu_q, cu_k, 96, 96, causal=True, return_lse=True)
    assert q.nbytes > 2 * limit
    vk = backend.VulkanBackend()
    assert vk.why_not_varlen_attention(call, True) is None
    out, lse, _ = launch.varlen_attention(call, small)
    check((out, lse), reference(q, k, v, cu_q, cu_k, causal=True), 2e-5)
    align = max(16, ctx.info.min_storage_offset_alignment)
    assert len(computed(submissions)) == 1 and computed(submissions)[0] > 3
    for bindings in submissions["bindings"]:
        assert all(rng_ <= limit and off % align == 0 for _, off, rng_ in bindings)
    # A sequence whose one head alone exceeds the range is refused (the router then moves on).
    q2, k2, v2, cu_q2, cu_k2 = packed(rng, [4, 300], [4, 300], 2, 2, 32)
    long = canonicalize_varlen(q2, k2, v2, cu_q2, cu_k2, 300, 300)
    why = vk.why_not_varlen_attention(long, True)
    assert why is not None and "storage-buffer range" in why and str(limit) in why


def test_refusals_name_the_reason(ctx, monkeypatch):
    from aule.backends.vulkan import backend

    rng = np.random.default_rng(9)
    q, k, v, cu_q, cu_k = packed(rng, [3, 5], [3, 5], 2, 2, 64, np.float16)
    call = canonicalize_varlen(q, k, v, cu_q, cu_k, 5, 5, softcap=2.0)
    vk = backend.VulkanBackend()
    if ctx.info.is_cpu:  # auto routing leaves CPU devices to the NumPy backend, forcing overrides it
        assert "CPU rasteriser" in vk.why_not_varlen_attention(call, False)
    assert vk.why_not_varlen_attention(call, True) is None
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "coopmat")
    assert "coopmat" in vk.why_not_varlen_attention(call, True)
    with pytest.raises(aule.UnsupportedError, match="coopmat"):
        varlen(q, k, v, cu_q, cu_k, softcap=2.0)


def test_rows_without_keys_are_zeros_in_reused_result_memory(ctx):
    """Results come from pooled host memory: a sequence without keys must be written as zeros,
    not left holding an earlier call's values."""
    rng = np.random.default_rng(11)
    lens_q, hq, d = [1500, 700], 4, 64  # past the pool's 1 MiB: the result is a pooled block
    q, k, v, cu_q, cu_k = packed(rng, lens_q, [300, 200], hq, hq, d)
    first = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 1500, 300, backend="vulkan")
    assert first.nbytes >= 1 << 20 and np.abs(first).max() > 0
    del first
    q2, k2, v2, cu_q2, cu_k2 = packed(rng, lens_q, [0, 200], hq, hq, d)
    out = aule.flash_attention_varlen(q2, k2, v2, cu_q2, cu_k2, 1500, 200, backend="vulkan")
    assert (out[:1500] == 0).all(), "the sequence with no keys gives zeros"
    ref, _ = reference(q2, k2, v2, cu_q2, cu_k2, causal=False)
    assert np.abs(out[1500:] - ref[1500:]).max() < VARIANT_ATOL.get("fast", 1e-4) * 10


def test_packed_inputs_are_staged_as_they_lie(ctx, monkeypatch):
    """No host repack: q, k and v reach staging in the caller's [total, H, D] layout (the device
    repacks them), one staging copy each, as a dense call's inputs do."""
    from aule.backends.vulkan.runtime import memory

    staged = []
    real = memory.stage

    def recording(ctx_, array, *a, **kw):
        staged.append(array)
        return real(ctx_, array, *a, **kw)

    monkeypatch.setattr(memory, "stage", recording)
    rng = np.random.default_rng(12)
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, 4, 2, 32)
    out, lse = varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True)
    check((out, lse), reference(q, k, v, cu_q, cu_k, causal=True), 2e-5)
    inputs = [a for a in staged if a.ndim == 3]
    assert [a.shape for a in inputs] == [q.shape, k.shape, v.shape]
    assert all(np.shares_memory(a, x) for a, x in zip(inputs, (q, k, v))), "staged without a host copy"


def test_sequences_planned_in_different_element_types(ctx, monkeypatch):
    """Sequences whose lengths pick variants of different storage types (float16 and float32) are
    staged and repacked once per type, in the one submission, and gathered into one output."""
    from aule.backends.vulkan import VARIANTS as TABLE, launch

    if TABLE["fp16"].unfit(64, ctx.info, 64, 64):
        pytest.skip(TABLE["fp16"].unfit(64, ctx.info, 64, 64))
    monkeypatch.setattr(launch, "_PLANS", {})
    monkeypatch.setattr(launch, "variant_for", lambda call, info: TABLE["fast" if call.seq_k >= 30 else "fp16"])
    rng = np.random.default_rng(13)
    q, k, v, cu_q, cu_k = packed(rng, LENS_Q, LENS_K, 4, 2, 64, np.float16)
    sinks = rng.uniform(-1.0, 1.0, 4).astype(np.float32)
    call = canonicalize_varlen(q, k, v, cu_q, cu_k, 64, 40, causal=True, return_lse=True, sinks=sinks)
    layout = launch.varlen_layout(call, ctx)
    assert sorted(g.elem.name for g in layout.groups) == ["float16", "float32"]
    out, lse = varlen(q, k, v, cu_q, cu_k, causal=True, return_lse=True, sinks=sinks)
    assert out.dtype == np.float16
    check((out, lse), reference(q, k, v, cu_q, cu_k, causal=True, sinks=sinks), VARIANT_ATOL["fp16"])
    assert (out[cu_q[1]] == 0).all() and np.allclose(lse[:, cu_q[1]], sinks)


@pytest.mark.parametrize("heads,lengths,dtype,d", [
    ((4, 2), (97, 1, 33, 64), np.float32, 128),
    ((4, 4), (113, 40, 7), np.float16, 128),
    ((3, 1), (9, 30, 1), np.float32, 5),  # rows of 20 bytes: the repack moves 4-byte words, not 16
    # The bench's features case (issue 15), on a GPU only: lavapipe would take minutes.
    ((32, 32), (4096, 3072, 2048, 1024), np.float16, 128)])
def test_varlen_gives_the_dense_calls_results_exactly(ctx, heads, lengths, dtype, d):
    """The packed call runs each sequence's own dense plan on the same values, so its output and LSE
    are those of one dense call per sequence, bit for bit."""
    if max(lengths) > 1024 and ctx.info.is_cpu:
        pytest.skip(f"bench-sized case on a GPU only ({ctx.info.name} is a CPU device)")
    rng = np.random.default_rng(sum(lengths))
    q, k, v, cu, _ = packed(rng, list(lengths), list(lengths), *heads, d, dtype)
    out, lse = varlen(q, k, v, cu, cu, causal=True, return_lse=True)
    for i in range(len(lengths)):
        a, b = cu[i], cu[i + 1]
        o, l = aule.flash_attention(*(np.ascontiguousarray(x[a:b].transpose(1, 0, 2))[None] for x in (q, k, v)),
                                    causal=True, return_lse=True, backend="vulkan")
        assert np.array_equal(out[a:b], o[0].transpose(1, 0, 2)), f"sequence {i}: output differs from its dense call"
        assert np.array_equal(lse[:, a:b], l[0]), f"sequence {i}: LSE differs from its dense call"


def test_repack_word_follows_the_rows(ctx):
    """16-byte moves only where every row is whole 16-byte words (float32 rows of head_dim words)."""
    from aule.backends.vulkan import launch

    rng = np.random.default_rng(14)
    for d, want in ((128, 16), (36, 16), (6, 4), (5, 4)):
        q, k, v, cu_q, cu_k = packed(rng, [3, 4], [3, 4], 2, 1, d)
        call = canonicalize_varlen(q, k, v, cu_q, cu_k, 4, 4)
        (group,) = launch.varlen_layout(call, ctx).groups
        assert group.elem == np.float32 and launch._repack_word(call, group) == want

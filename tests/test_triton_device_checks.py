"""Dense and varlen Triton calls on device tensors read nothing back: sinks, ALiBi slopes, attn_mask
and cu_seqlens stay on the device (``aule.call.OnDevice``), their values checked by the kernels
(CHECK) into the paged path's error flags, raised by the next aule call (at once under
``AULE_CHECK_SYNC=1``), and an attn_mask is served as a key hull computed on the device plus the
mask itself.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` on CPU tensors, which the ``device_path``
fixture sends down the same path (``aule.call.checks_on_device``); the ``gpu_only`` tests check on
a CUDA device that no call reads anything back.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from triton_setup import import_torch_and_triton, run_compile_check

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import call as calls, routing  # noqa: E402
from aule.backends.triton import TritonBackend, ops  # noqa: E402
from aule.reference import attention_reference  # noqa: E402
from attn_util import assert_matches_reference  # noqa: E402

DEV = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device (no read-back is a property of GPU launches)")


@pytest.fixture(autouse=True)
def device_path(monkeypatch):
    """CPU tensors take the device path too (under the interpreter), and every test consumes the
    device errors it provokes: one left pending would fail the next test."""
    monkeypatch.setattr(calls, "checks_on_device", lambda kind, device: kind == "torch")
    yield
    aule.check_device_errors()


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEV)


def _finished():
    """Let the kernels already launched finish, as a later point of a serving loop would find them."""
    if GPU:
        torch.cuda.synchronize()


def _next_call_raises(words):
    """The next aule call (any: here a tiny NumPy one) raises the recorded error, once."""
    _finished()
    x = np.ones((1, 1, 1, 8), np.float32)
    with pytest.raises(ValueError) as info:
        aule.flash_attention(x, x, x, backend="numpy")
    assert str(info.value).startswith(words), str(info.value)
    assert "by the attention forward kernel" in str(info.value)
    aule.flash_attention(x, x, x, backend="numpy")  # reported once, then forgotten


def _dense(q, k, v, backend=None, **kw):
    """``(out, lse)`` of the Triton backend on the device path, as NumPy."""
    call = calls.canonicalize(_t(q), _t(k), _t(v), kw.pop("causal", False), None, kw.pop("window_size", -1), True,
                              **{n: (_t(x) if isinstance(x, np.ndarray) else x) for n, x in kw.items()})
    assert call.device_values == any(x is not None for x in kw.values())
    b = TritonBackend() if backend is None else aule.backends.get(backend)
    out, lse = b.run("attention", call)
    return out.cpu().numpy(), lse.cpu().numpy()


def _qkv(rng, b=2, hq=4, hk=2, sq=13, sk=37, d=16):
    return (rng.standard_normal((b, hq, sq, d)).astype(np.float32),
            rng.standard_normal((b, hk, sk, d)).astype(np.float32),
            rng.standard_normal((b, hk, sk, d)).astype(np.float32))


def _masks(rng, b, hq, sq, sk):
    """Padding masks (the hull is their run), masks with holes and general masks (the hull is a
    bound and the in-tile read decides), with rows and heads that see nothing."""
    prefix = np.arange(sk)[None, None, None, :] < np.array([sk, 11])[:, None, None, None]
    suffix = np.arange(sk)[None, None, None, :] >= np.array([5, 20])[:, None, None, None]
    holes = prefix & (rng.random((b, 1, 1, sk)) > 0.3)
    general = rng.random((b, hq, sq, sk)) > 0.4
    general[0, 1] = False  # a (batch, head) that sees no key: zeros, LSE -inf (or the sink)
    general[1, :, 3] = False  # a row that sees none
    additive = np.where(rng.random((1, hq, 1, sk)) > 0.5, rng.standard_normal((1, hq, 1, sk)), -np.inf)
    return {"prefix": prefix, "suffix": suffix, "holes": holes, "general": general,
            "additive": additive.astype(np.float32), "keys-only": prefix[0, 0, 0]}


@pytest.mark.parametrize("name", ["prefix", "suffix", "holes", "general", "additive", "keys-only"])
@pytest.mark.parametrize("features", ["mask", "sinks+alibi", "window"])
def test_device_hull_matches_the_reference(name, features):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{features}".encode()))
    q, k, v = _qkv(rng)
    mask = _masks(rng, 2, 4, 13, 37)[name]
    kw = dict(attn_mask=mask, causal=False)
    if features == "sinks+alibi":
        kw.update(sinks=rng.uniform(-1, 3, 4).astype(np.float32), alibi_slopes=rng.uniform(0, 0.3, (2, 4)).astype(np.float32))
    if features == "window":
        kw.update(causal=True, window_size=(9, 0))
    out, lse = _dense(q, k, v, **kw)
    assert_matches_reference(out, lse, q, k, v, "float32", **kw)


def _check_hull(m, b, hq, sq, sk):
    """The device hull of mask ``m`` against NumPy's: per (batch, head) the first and last visible
    key of any row, and the mark of a boolean mask that shows that whole span to every row."""
    kspan, tile = ops.mask_tensors(calls.check_attn_mask(_t(m), (b, hq, sq, sk), True), b, hq, torch.device(DEV))
    assert tile is not None and kspan.dtype == torch.int32 and kspan.is_contiguous()
    raw = kspan.cpu().numpy()
    # A start stored as -(start + 1): the boolean mask shows every key of the span to every row.
    whole = raw[..., 0] < 0
    span = np.stack([np.where(whole, -raw[..., 0] - 1, raw[..., 0]), raw[..., 1]], -1)
    full = np.broadcast_to(m if m.dtype == np.bool_ else ~np.isneginf(m), (b, hq, sq, sk))
    seen = full.any(axis=2)
    for i in range(b):
        for h in range(hq):
            js = np.flatnonzero(seen[i, h])
            want = (js[0], js[-1] + 1) if js.size else (0, 0)
            assert tuple(span[i, h]) == want, (i, h)
            shown = bool(full[i, h][:, want[0]:want[1]].all())
            assert whole[i, h] == (m.dtype == np.bool_ and shown), (i, h)
    host = calls.check_attn_mask(m, (b, hq, sq, sk))
    if host.padding:
        assert np.array_equal(span, host.spans(b, hq)[0])


def test_device_hull_is_the_padding_span():
    """For a padding mask the device hull is the span the host analysis finds (the kernels then
    skip the same tiles); for a general mask it bounds every row's visible keys."""
    rng = np.random.default_rng(3)
    for name, m in _masks(rng, 2, 4, 13, 37).items():
        _check_hull(m, 2, 4, 13, 37)


@pytest.mark.parametrize("kind", ["prefix", "one-row-misses", "general", "additive", "none"])
def test_device_hull_across_many_tiles(kind):
    """Masks wider and taller than the hull kernel's tiles (256 keys, 16 rows): the span and the
    whole-span mark gathered across tiles, including a row that alone misses one key."""
    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    b, hq, sq, sk = 2, 3, 37, 601
    if kind == "prefix":
        m = np.arange(sk)[None, None, None, :] < np.array([600, 257])[:, None, None, None]
        m = m & (np.arange(sk) >= 3)
    elif kind == "one-row-misses":
        m = np.broadcast_to(np.arange(sk) < 500, (b, hq, sq, sk)).copy()
        m[1, 2, 35, 300] = False  # only (1, 2) loses the mark
    elif kind == "general":
        m = rng.random((b, 1, sq, sk)) > 0.995
        m[0, 0, :, :] = False
    elif kind == "additive":
        m = np.where(rng.random((b, hq, 1, sk)) > 0.99, rng.standard_normal((b, hq, 1, sk)), -np.inf).astype(np.float32)
    else:
        m = np.zeros((1, 1, 1, sk), dtype=bool)
    _check_hull(m, b, hq, sq, sk)


def test_device_features_stay_unread_and_host_backends_get_them_checked():
    rng = np.random.default_rng(4)
    q, k, v = _qkv(rng)
    sinks, slopes = rng.uniform(-1, 3, 4).astype(np.float32), rng.uniform(0, 0.3, 4).astype(np.float32)
    mask = _masks(rng, 2, 4, 13, 37)["suffix"]  # one run of keys: a host analysis finds the padding
    call = calls.canonicalize(_t(q), _t(k), _t(v), False, None, -1, True, sinks=_t(sinks),
                              alibi_slopes=_t(slopes), attn_mask=_t(mask))
    assert all(isinstance(x, calls.OnDevice) for x in (call.sinks, call.alibi, call.mask))
    assert "general_mask" in call.features  # not analysed on the host
    host = call.on_host()
    assert not host.device_values and host.mask.padding and "general_mask" not in host.features
    assert np.array_equal(host.sinks, sinks) and np.array_equal(host.alibi, np.broadcast_to(slopes, (2, 4)))
    out, lse = _dense(q, k, v, backend="numpy", sinks=sinks, alibi_slopes=slopes, attn_mask=mask)
    assert_matches_reference(out, lse, q, k, v, "float32", causal=False, sinks=sinks, alibi_slopes=slopes,
                             attn_mask=mask)
    # A host backend checks the device values itself, before it runs, with the host's words.
    bad = sinks.copy()
    bad[3] = np.inf
    with pytest.raises(ValueError, match=r"^sinks must be finite \(in float32\), got sinks\[3\] = inf$"):
        _dense(q, k, v, backend="numpy", sinks=bad)


def _poisoned_features(what, rng):
    sinks, slopes = rng.uniform(-1, 3, 4).astype(np.float32), rng.uniform(0, 0.3, 4).astype(np.float32)
    if what == "NaN sink":
        sinks[2] = np.nan
    elif what == "infinite sink":
        sinks[0] = -np.inf
    elif what == "NaN slope":
        slopes[1] = np.nan
    else:
        slopes[3] = np.inf
    return sinks, slopes


FEATURE_POISONS = ["NaN sink", "infinite sink", "NaN slope", "infinite slope"]


def _host_words(what, sinks, slopes, batch=2):
    """The host check's message for the same values: the device error must say the same."""
    with pytest.raises(ValueError) as info:
        if "sink" in what:
            calls.check_sinks(sinks, 4)
        else:
            calls.check_alibi(np.broadcast_to(slopes, (batch, 4)).copy(), batch, 4)
    return str(info.value)


@pytest.mark.parametrize("what", FEATURE_POISONS)
def test_poisoned_features_raise_at_the_next_call(what):
    rng = np.random.default_rng(5)
    q, k, v = _qkv(rng)
    sinks, slopes = _poisoned_features(what, rng)
    _dense(q, k, v, sinks=sinks, alibi_slopes=slopes)  # no read-back: no raise here
    _next_call_raises(_host_words(what, sinks, slopes))


@pytest.mark.parametrize("what", ["NaN sink", "infinite slope"])
def test_check_sync_raises_in_the_launching_call(what, monkeypatch):
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    rng = np.random.default_rng(6)
    q, k, v = _qkv(rng)
    sinks, slopes = _poisoned_features(what, rng)
    with pytest.raises(ValueError, match="must be finite"):
        _dense(q, k, v, sinks=sinks, alibi_slopes=slopes)


def test_learned_sinks_on_the_device_path_keep_their_gradient_and_checks():
    """Sinks that require grad go through the differentiable op, which checks them too."""
    rng = np.random.default_rng(7)
    q, k, v = _qkv(rng, sq=5, sk=9)
    s = _t(rng.uniform(-1, 2, 4).astype(np.float32)).requires_grad_()
    b = TritonBackend()
    call = calls.canonicalize(_t(q), _t(k), _t(v), False, None, -1, True, sinks=s)
    assert call.device_values and call.sinks_grad is s
    out, _ = b.run("attention", call)
    out.sum().backward()
    ref = torch.tensor(s.detach().cpu().numpy(), dtype=torch.float64, requires_grad=True)
    from test_triton import ref_torch

    ro, _ = ref_torch(*(torch.from_numpy(x).double() for x in (q, k, v)), 16 ** -0.5, -1, -1, 0.0, None, ref)
    ro.sum().backward()
    assert np.abs(s.grad.cpu().numpy() - ref.grad.numpy()).max() < 1e-4
    with torch.no_grad():
        s[1] = float("nan")
    b.run("attention", calls.canonicalize(_t(q), _t(k), _t(v), False, None, -1, True, sinks=s))
    _next_call_raises("sinks must be finite (in float32), got sinks[1] = nan")


def test_the_custom_op_takes_the_device_hull_and_checks_its_features():
    """torch.compile's path: ``aule::triton_attention_fwd`` gets an SDPA attn_mask as the caller gave
    it (analysed on the device when the op runs) and unread sinks, which its kernel checks."""
    rng = np.random.default_rng(15)
    q, k, v = _qkv(rng, sq=9, sk=21)
    mask = _masks(rng, 2, 4, 9, 21)["holes"]
    sinks = rng.uniform(-1, 3, 4).astype(np.float32)
    out, lse = torch.ops.aule.triton_attention_fwd(_t(q), _t(k), _t(v), 0.25, -1, 0, 0.0, None, _t(sinks), None,
                                                   None, _t(mask))
    assert_matches_reference(out.cpu().numpy(), lse.cpu().numpy(), q, k, v, "float32", causal=True, scale=0.25,
                             sinks=sinks, attn_mask=mask)
    sinks[0] = np.nan
    torch.ops.aule.triton_attention_fwd(_t(q), _t(k), _t(v), 0.25, -1, 0, 0.0, None, _t(sinks), None, None, _t(mask))
    _next_call_raises("sinks must be finite (in float32), got sinks[0] = nan")


# ---------------------------------------------------------------------------------------------------
# varlen: cu_seqlens checked by the kernels

LQ, LK = [3, 0, 9, 5], [4, 6, 9, 2]  # cu_q [0, 3, 3, 12, 17], cu_k [0, 4, 10, 19, 21]


def _packed(rng, lens_q=LQ, lens_k=LK, hq=4, hk=2, d=16):
    return (rng.standard_normal((sum(lens_q), hq, d)).astype(np.float32),
            rng.standard_normal((sum(lens_k), hk, d)).astype(np.float32),
            rng.standard_normal((sum(lens_k), hk, d)).astype(np.float32))


def _cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _varlen_reference(q, k, v, cu_q, cu_k, causal, **kw):
    """Packed ``(out, lse [Hq, total_q])`` of the float64 reference, one sequence at a time."""
    out = np.zeros(q.shape, np.float64)
    lse = np.zeros((q.shape[1], q.shape[0]), np.float64)
    for i in range(len(cu_q) - 1):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if a == b:
            continue
        slopes = kw.get("alibi_slopes")
        o, l = attention_reference(*(x.transpose(1, 0, 2)[None] for x in (q[a:b], k[c:e], v[c:e])), causal=causal,
                                   return_lse=True, sinks=kw.get("sinks"),
                                   alibi_slopes=None if slopes is None else slopes[i:i + 1])
        out[a:b], lse[:, a:b] = o[0].transpose(1, 0, 2), l[0]
    return out, lse


def _varlen(q, k, v, cu_q, cu_k, max_q=9, max_k=9, backend="triton", causal=True, **kw):
    call = calls.canonicalize_varlen(_t(q), _t(k), _t(v), _t(cu_q), _t(cu_k), max_q, max_k, causal=causal,
                                     return_lse=True, **{n: _t(x) for n, x in kw.items()})
    assert call.device_values and calls.is_torch_tensor(call.cu_q)
    if backend == "triton":
        out, lse = TritonBackend().run("varlen_attention", call)
    else:
        out, lse = routing.attend_varlen(call, backend)
    return out.detach().cpu().numpy(), lse.detach().cpu().numpy()


@pytest.mark.parametrize("features", [{}, {"sinks": True, "alibi_slopes": True}])
@pytest.mark.parametrize("width", [np.int32, np.int64])
def test_device_offsets_match_the_reference(features, width):
    rng = np.random.default_rng(8)
    q, k, v = _packed(rng)
    kw = {}
    if features:
        kw = dict(sinks=rng.uniform(-1, 3, 4).astype(np.float32), alibi_slopes=rng.uniform(0, 0.3, (4, 4)).astype(np.float32))
    cu_q, cu_k = _cu(LQ).astype(width), _cu(LK).astype(width)
    out, lse = _varlen(q, k, v, cu_q, cu_k, **kw)
    ref_out, ref_lse = _varlen_reference(q, k, v, cu_q, cu_k, True, **kw)
    assert np.abs(out - ref_out).max() < 2e-5
    seen = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == seen).all() and np.abs(lse[seen] - ref_lse[seen]).max() < 2e-5
    # Routed to a host backend, the same call is read and checked there, sequence by sequence.
    out_np, _ = _varlen(q, k, v, cu_q, cu_k, backend="numpy", **kw)
    assert np.abs(out_np - ref_out).max() < 2e-5


def _cu_poison(what):
    """``(side, cu_q, cu_k, max_q, max_k, good sequences)``, one bad entry each, so the error the
    kernels record is the one expected whatever order their programs run in."""
    cu_q, cu_k, max_q, max_k = _cu(LQ), _cu(LK), 9, 30
    if what == "not starting at 0":
        cu_q = np.array([2, 3, 3, 12, 17], np.int32)
        return 0, cu_q, cu_k, max_q, max_k, [1, 2, 3]
    if what == "decreasing":
        cu_k = np.array([0, 4, 3, 19, 21], np.int32)
        return 1, cu_q, cu_k, max_q, max_k, [0, 3]
    if what == "negative":
        cu_k = np.array([0, 4, -2, 19, 21], np.int32)
        return 1, cu_q, cu_k, max_q, max_k, [0, 3]
    if what == "not ending at total":
        cu_q = np.array([0, 3, 3, 12, 16], np.int32)
        return 0, cu_q, cu_k, max_q, max_k, [0, 1, 2]
    if what == "past total":
        cu_k = np.array([0, 4, 10, 19, 25], np.int32)
        return 1, cu_q, cu_k, max_q, max_k, [0, 1, 2]
    if what == "int64 offset that int32 would wrap":
        cu_k = _cu(LK).astype(np.int64)
        cu_k[-1] += 2 ** 32  # narrowed to int32 it would be the right total
        return 1, cu_q, cu_k, max_q, max_k, [0, 1, 2]
    if what == "longer than max_seqlen_q":
        return 0, cu_q, cu_k, 5, max_k, [0, 1, 3]
    raise AssertionError(what)


CU_POISONS = ["not starting at 0", "decreasing", "negative", "not ending at total", "past total",
              "int64 offset that int32 would wrap", "longer than max_seqlen_q"]


def _host_cu_words(side, cu_q, cu_k, max_q, max_k):
    total = (17, 21)[side]
    with pytest.raises(ValueError) as info:
        calls.check_cu_seqlens((cu_q, cu_k)[side], side, total, (max_q, max_k)[side])
    return str(info.value)


@pytest.mark.parametrize("what", CU_POISONS)
def test_poisoned_offsets_raise_at_the_next_call_and_are_never_followed_out_of_bounds(what, monkeypatch):
    """q, k and v are views into larger buffers with NaN on both sides: a bad offset must not make
    any program read them (a NaN would reach some row of the output, which starts as a finite
    sentinel, so rows no program writes stay finite too), and the good sequences are still right.
    The error is the host check's, word for word."""
    real = ops._alloc_rows
    monkeypatch.setattr(ops, "_alloc_rows", lambda alloc, *a: real(
        lambda shape, **kw: torch.full(shape, 12345.0, **kw), *a))
    side, cu_q, cu_k, max_q, max_k, good = _cu_poison(what)
    rng = np.random.default_rng(9)
    q, k, v = _packed(rng)
    big = [torch.full((x.shape[0] + 16,) + x.shape[1:], float("nan"), device=DEV) for x in (q, k, v)]
    for b, x in zip(big, (q, k, v)):
        b[8:8 + x.shape[0]] = _t(x)
    views = [b[8:-8] for b in big]
    call = calls.canonicalize_varlen(*views, _t(cu_q), _t(cu_k), max_q, max_k, causal=True, return_lse=True)
    out, _ = TritonBackend().run("varlen_attention", call)
    _next_call_raises(_host_cu_words(side, cu_q, cu_k, max_q, max_k))
    ref, _ = _varlen_reference(q, k, v, _cu(LQ), _cu(LK), True)
    rows = np.concatenate([np.arange(_cu(LQ)[i], _cu(LQ)[i + 1]) for i in good])
    got = out.cpu().numpy()
    assert not np.isnan(got).any()
    assert np.abs(got[rows] - ref[rows]).max() < 2e-5


def test_poisoned_offsets_raise_under_check_sync(monkeypatch):
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    side, cu_q, cu_k, max_q, max_k, _ = _cu_poison("decreasing")
    q, k, v = _packed(np.random.default_rng(10))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[2\] = 3"):
        _varlen(q, k, v, cu_q, cu_k, max_q, max_k)


def test_poisoned_offsets_on_a_host_backend_raise_before_it_runs():
    side, cu_q, cu_k, max_q, max_k, _ = _cu_poison("not starting at 0")
    q, k, v = _packed(np.random.default_rng(11))
    with pytest.raises(ValueError, match=r"^cu_seqlens_q must start at 0, got cu_seqlens_q\[0\] = 2$"):
        _varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend="numpy")


def test_device_offsets_backward_matches_host_offsets():
    """The backward kernels read the same checked offsets: gradients equal the host packing's."""
    rng = np.random.default_rng(12)
    q, k, v = _packed(rng)
    grads = []
    for pack in (ops.packing(_cu(LQ).astype(np.int64), _cu(LK).astype(np.int64), DEV),
                 ops.device_packing(_t(_cu(LQ)), _t(_cu(LK)), 9, 9)):
        leaves = [_t(x).requires_grad_() for x in (q, k, v)]
        out, lse = ops.triton_varlen_attention(*leaves, pack, 0.25, -1, 0, check=isinstance(pack.cu_q, torch.Tensor))
        (out.sum() + lse.sum()).backward()
        grads.append([x.grad.cpu().numpy() for x in leaves])
    for a, b in zip(*grads):
        assert np.abs(a - b).max() < 1e-5


def test_checking_kernels_compile_for_sm90():
    """What the interpreter runs here must also compile for the GPU, flag atomics included."""
    if GPU:
        pytest.skip("on a GPU the other tests compile and run the kernels for real")
    run_compile_check("dense_compile_check.py", timeout=300)


# ---------------------------------------------------------------------------------------------------
# on a GPU: nothing read back


@pytest.fixture
def no_read_back():
    from test_paged_device_checks import NoReadBack

    return NoReadBack()


@gpu_only
def test_dense_call_with_features_reads_nothing_back(no_read_back):
    rng = np.random.default_rng(13)
    q, k, v = (x.astype(np.float16) for x in _qkv(rng, b=2, hq=8, hk=2, sq=200, sk=333, d=128))
    sinks, slopes = rng.uniform(-1, 3, 8).astype(np.float32), rng.uniform(0, 0.1, 8).astype(np.float32)
    pad = np.arange(333)[None, None, None, :] < np.array([333, 150])[:, None, None, None]
    args = [_t(x) for x in (q, k, v)]
    kw = dict(sinks=_t(sinks), alibi_slopes=_t(slopes), attn_mask=_t(pad), backend="triton", return_lse=True)
    aule.flash_attention(*args, **kw)  # warm: flags made, kernels compiled and tuned
    with no_read_back:
        out, lse = aule.flash_attention(*args, **kw)
    assert no_read_back.seen == []
    assert_matches_reference(out.float().cpu().numpy(), lse.cpu().numpy(), q.astype(np.float32), k.astype(np.float32),
                             v.astype(np.float32), "float16", causal=True, sinks=sinks, alibi_slopes=slopes,
                             attn_mask=pad)


@gpu_only
def test_varlen_call_reads_nothing_back(no_read_back):
    rng = np.random.default_rng(14)
    lens_q, lens_k = [100, 1, 0, 257], [130, 64, 5, 257]
    q, k, v = (x.astype(np.float16) for x in _packed(rng, lens_q, lens_k, 8, 2, 128))
    sinks = rng.uniform(-1, 3, 8).astype(np.float32)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    args = [_t(x) for x in (q, k, v, cu_q, cu_k)]
    aule.flash_attention_varlen(*args, 257, 257, causal=True, sinks=_t(sinks))  # warm
    with no_read_back:
        out = aule.flash_attention_varlen(*args, 257, 257, causal=True, sinks=_t(sinks))
    assert no_read_back.seen == []
    ref, _ = _varlen_reference(*(x.astype(np.float32) for x in (q, k, v)), cu_q, cu_k, True, sinks=sinks)
    assert np.abs(out.float().cpu().numpy() - ref).max() < 2e-3

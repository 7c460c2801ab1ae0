"""Packed paged batches (``query_start_loc``, vLLM's layout): decode rows, chunked-prefill chunks,
speculative drafts and sequences without rows in one call, on NumPy, Vulkan (lavapipe here) and
Triton (its interpreter here), against the float64 reference with shuffled block tables; bad
offsets raise on the host for host tables and are recorded by the Triton kernels for device
tables, with nothing read or written out of bounds.

The GPU-only tests (CUDA graph capture and replay with new contents) skip without a CUDA device.
"""
from __future__ import annotations

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

try:  # the Triton part needs torch and triton; the rest of this module does not
    torch, ON_GPU = import_torch_and_triton()
except pytest.skip.Exception as exc:
    torch, ON_GPU, NO_TRITON = None, False, str(exc)
else:
    NO_TRITON = None
    from test_paged_device_checks import no_read_back  # noqa: F401  (a fixture)

import aule  # noqa: E402
from aule import api, paged_call  # noqa: E402, F401
from aule.bench.timing import capture_graph  # noqa: E402
from test_paged import check, make_case, reference_paged  # noqa: E402

# One batch of every kind: decode (1), chunked prefill (17), speculative verification (4), a
# sequence without rows (0), a decode row at the very start of a context (1 of 1).
LENS = [40, 61, 23, 9, 1]
NS = [1, 17, 4, 0, 1]


def _case(seed, lens=LENS, ns=NS, heads=(8, 2), head_dim=64, block_size=8, dtype=np.float32, window=-1):
    ns = ns if isinstance(ns, int) else list(ns)
    return make_case(np.random.default_rng(seed), list(lens), *heads, head_dim, block_size, ns, dtype,
                     window_size=window)


def _args(case):
    return (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)


# ---------------------------------------------------------------------------------------------------
# NumPy backend against the reference


@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [1, 8, 32])
def test_numpy_packed_matches_reference(heads, block_size):
    case = _case(block_size, heads=heads, block_size=block_size)
    out = aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc, backend="numpy")
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    check(out, reference_paged(case), "float32")


@pytest.mark.parametrize("window", [1, 5, 30, (12, 0)])
def test_numpy_packed_window(window):
    case = _case(3, window=window)
    out = aule.flash_attention_paged(*_args(case), window_size=window, query_start_loc=case.query_start_loc,
                                     backend="numpy")
    check(out, reference_paged(case, window_size=window), "float32")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_numpy_packed_dtypes_and_scale(dtype):
    case = _case(4, heads=(4, 1), head_dim=40, dtype=dtype)
    out = aule.flash_attention_paged(*_args(case), scale=0.3, query_start_loc=case.query_start_loc,
                                     max_query_len=17, backend="numpy")
    assert out.dtype == dtype
    check(out, reference_paged(case, scale=0.3), np.dtype(dtype).name)


def test_packed_equals_dense_per_sequence():
    """A packed call is its sequences' dense calls, row for row (one meaning, two layouts)."""
    case = _case(5)
    out = aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc, backend="numpy")
    loc = case.query_start_loc
    for b, n in enumerate(NS):
        if n == 0:
            continue
        q = case.q[loc[b]:loc[b + 1]].transpose(1, 0, 2)[None]
        one = aule.flash_attention_paged(q, case.k_cache, case.v_cache, case.block_tables[b:b + 1],
                                         case.context_lens[b:b + 1], backend="numpy")
        np.testing.assert_allclose(out[loc[b]:loc[b + 1]], one[0].transpose(1, 0, 2), rtol=1e-6, atol=1e-6)


def test_packed_empty_and_all_empty_sequences():
    case = _case(6, lens=[5, 3], ns=[0, 0])
    assert case.q.shape[0] == 0
    out = aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc)
    assert out.shape == (0, 8, 64)


# ---------------------------------------------------------------------------------------------------
# bad query_start_loc and packed shapes: raised on the host, before any kernel runs


@pytest.fixture
def no_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backend was reached with invalid input")
    monkeypatch.setattr(api, "attend_paged", boom)


def _loc_case():
    # lens [40, 61, 23, 9, 1], rows [1, 17, 4, 0, 1]: query_start_loc [0, 1, 18, 22, 22, 23]
    return _case(7)


BAD_LOC = {
    "decreasing": ([0, 1, 18, 12, 22, 23], ValueError,
                   r"non-decreasing, got query_start_loc\[3\] = 12 < query_start_loc\[2\] = 18"),
    "past num_tokens": ([0, 1, 18, 30, 30, 23], ValueError,
                        r"query_start_loc\[3\] = 30 is outside \[0, num_tokens = 23\]"),
    "negative": ([0, -1, 18, 22, 22, 23], ValueError, r"query_start_loc\[1\] = -1 is outside"),
    "not ending at num_tokens": ([0, 1, 18, 22, 22, 22], ValueError,
                                 r"must end at num_tokens = 23 \(q.shape\[0\]\), got query_start_loc\[5\] = 22"),
    "not starting at 0": ([1, 1, 18, 22, 22, 23], ValueError, r"must start at 0, got query_start_loc\[0\] = 1"),
    "too short": ([0, 1, 18, 22, 23], ValueError, r"query_start_loc holds batch \+ 1 offsets"),
    "2-D": ([[0, 1, 18, 22, 22, 23]], ValueError, r"query_start_loc must be 1-D"),
    "float dtype": (np.array([0, 1, 18, 22, 22, 23], np.float32), TypeError, r"query_start_loc must hold integers"),
}


@pytest.mark.parametrize("name", list(BAD_LOC))
def test_bad_query_start_loc_raises_before_kernel(name, no_kernel):
    case = _loc_case()
    loc, exc, words = BAD_LOC[name]
    loc = loc if isinstance(loc, np.ndarray) else np.asarray(loc, np.int32)
    with pytest.raises(exc, match=words):
        aule.flash_attention_paged(*_args(case), query_start_loc=loc)


def test_rows_past_the_context_are_refused(no_kernel):
    case = _case(8, lens=[40, 3, 9], ns=[1, 3, 2])
    loc = np.array([0, 1, 5, 6], np.int32)  # sequence 1: 4 rows over 3 keys
    with pytest.raises(ValueError, match=r"sequence 1 has 4 query rows \(query_start_loc\[2\] - query_start_loc\[1\]\) "
                                         r"but context_lens\[1\] = 3"):
        aule.flash_attention_paged(*_args(case), query_start_loc=loc)


def test_max_query_len_is_a_promise(no_kernel):
    case = _loc_case()
    with pytest.raises(ValueError, match=r"sequence 1 has 17 query rows .* more than max_query_len = 4"):
        aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc, max_query_len=4)
    for bad in (-1, 2.5, True, "4"):
        with pytest.raises(ValueError, match="max_query_len must be None or an int"):
            aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc, max_query_len=bad)
    with pytest.raises(ValueError, match="max_query_len = 0 but q holds num_tokens = 23"):
        aule.flash_attention_paged(*_args(case), query_start_loc=case.query_start_loc, max_query_len=0)
    with pytest.raises(ValueError, match="max_query_len bounds the rows of a packed call"):
        aule.flash_attention_paged(*_args(_case(9, ns=1)), max_query_len=1)


def test_packed_shapes(no_kernel):
    case = _loc_case()
    with pytest.raises(ValueError, match=r"with query_start_loc, q must be 3-D \[num_tokens, heads_q, head_dim\]"):
        aule.flash_attention_paged(case.q[None], *_args(case)[1:], query_start_loc=case.query_start_loc)
    with pytest.raises(ValueError, match=r"a packed 3-D q"):
        aule.flash_attention_paged(*_args(case))
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        aule.flash_attention_paged(case.q[:, :3], *_args(case)[1:], query_start_loc=case.query_start_loc)
    with pytest.raises(ValueError, match="names no sequence, but q holds num_tokens = 23"):
        aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables[:0], case.context_lens[:0],
                                   query_start_loc=np.zeros(1, np.int32))


def test_bad_loc_beside_a_bad_table_names_the_table_first(no_kernel):
    case = _loc_case()
    bt = case.block_tables.copy()
    bt[1, 0] = -5
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = -5"):
        aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, bt, case.context_lens,
                                   query_start_loc=np.array([0, 1, 18, 12, 22, 23], np.int32))


# ---------------------------------------------------------------------------------------------------
# Triton: device tables (under the interpreter here, CPU tensors take the device path)

needs_triton = pytest.mark.skipif(NO_TRITON is not None, reason=f"torch/triton unavailable: {NO_TRITON}")
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (CUDA graphs, full-size shapes)")
DEV = "cuda" if ON_GPU else "cpu"


def _t(a, dtype=None):
    t = torch.from_numpy(np.ascontiguousarray(a)).to(DEV)
    return t if dtype is None else t.to(dtype)


def _round(case, dtype):
    """The case with q, K and V rounded through ``dtype``, so the reference sees the kernel's inputs."""
    dt = getattr(torch, dtype)
    rnd = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dt).float().numpy())
    for n in ("q", "k_cache", "v_cache"):
        setattr(case, n, rnd(getattr(case, n)))
    case.ks, case.vs = [rnd(k) for k in case.ks], [rnd(v) for v in case.vs]
    return case


def _triton(case, dtype="float32", **kw):
    dt = getattr(torch, dtype)
    out = aule.flash_attention_paged(_t(case.q, dt), _t(case.k_cache, dt), _t(case.v_cache, dt),
                                     _t(case.block_tables), _t(case.context_lens),
                                     query_start_loc=_t(case.query_start_loc), backend="triton", **kw)
    assert out.shape == case.q.shape and out.dtype == dt
    return out


@pytest.fixture
def device_errors_consumed():
    """Each test consumes the device errors it provokes: one left pending would fail the next test."""
    yield
    aule.check_device_errors()


@needs_triton
@pytest.mark.parametrize("heads,block_size,max_query_len", [((8, 2), 8, None), ((4, 4), 1, 17), ((8, 1), 32, 20)])
def test_triton_packed_matches_reference(heads, block_size, max_query_len, device_errors_consumed):
    case = _case(11, heads=heads, head_dim=16, block_size=block_size)
    out = _triton(case, max_query_len=max_query_len)
    check(out.cpu().numpy(), reference_paged(case), "float32")


@needs_triton
@pytest.mark.parametrize("window", [3, (20, 0)])
def test_triton_packed_window(window, device_errors_consumed):
    case = _case(12, heads=(4, 2), head_dim=16, window=window)
    out = _triton(case, window_size=window, scale=0.2)
    check(out.cpu().numpy(), reference_paged(case, window_size=window, scale=0.2), "float32")


@needs_triton
def test_triton_packed_float16_split(device_errors_consumed):
    """float16, and a context long enough that both the interpreter's configuration and a GPU's
    split it (split-K partials are kept per packed row)."""
    from aule.backends.triton import paged as tp

    case = _round(_case(13, lens=[300, 5, 33], ns=[4, 1, 17], heads=(4, 2), head_dim=32, block_size=16),
                  "float16")
    assert tp.choose_config(3, 2, 2, 17, 32, 300, 0)[4] > 1
    out = _triton(case, "float16", max_context_len=300)
    check(out.float().cpu().numpy(), reference_paged(case), "float16")


def _device_poison(what):
    """``(case, query_start_loc, max_query_len, bad sequences, message)``: one bad entry each, so the
    error the kernels record is the one expected whatever order their programs run in."""
    case = _case(14, head_dim=16, heads=(4, 2))  # query_start_loc [0, 1, 18, 22, 22, 23]
    loc, bound = case.query_start_loc.copy(), None
    if what == "decreasing":
        loc[3] = 17
        return case, loc, bound, {2}, (r"query_start_loc\[3\] = 17 must be non-decreasing: it is below "
                                       r"query_start_loc\[2\]")
    if what == "negative":
        loc[1] = -1
        return case, loc, bound, {0, 1}, r"query_start_loc\[1\] = -1 must be non-decreasing"
    if what == "past num_tokens":
        loc[5] = 24
        return case, loc, bound, {4}, r"query_start_loc\[5\] = 24 is past num_tokens = 23"
    if what == "int64 offset that int32 would wrap":
        loc = loc.astype(np.int64)
        loc[5] = 2 ** 32 + 23
        return case, loc, bound, {4}, r"query_start_loc\[5\] = %d is past num_tokens = 23" % (2 ** 32 + 23)
    if what == "not ending at num_tokens":
        loc[5] = 22
        return case, loc, bound, {4}, r"query_start_loc\[5\] = 22 must end at num_tokens = 23"
    if what == "not starting at 0":
        loc[0] = 1
        return case, loc, bound, {0}, r"query_start_loc\[0\] = 1 must start at 0"
    if what == "more rows than context":
        case = _case(15, lens=[40, 3, 9], ns=[1, 3, 2], head_dim=16, heads=(4, 2))
        loc = np.array([0, 1, 5, 6], np.int32)
        return case, loc, bound, {1, 2}, (r"sequence 1 has 4 query rows \(query_start_loc\[2\] - "
                                          r"query_start_loc\[1\]\) but context_lens\[1\] = 3")
    if what == "more rows than max_query_len":
        return case, loc, 4, {1}, r"sequence 1 has 17 query rows .* more than max_query_len = 4"
    raise AssertionError(what)


DEVICE_POISONS = ["decreasing", "negative", "past num_tokens", "int64 offset that int32 would wrap",
                  "not ending at num_tokens", "not starting at 0", "more rows than context",
                  "more rows than max_query_len"]


@needs_triton
@pytest.mark.parametrize("what", DEVICE_POISONS)
def test_device_offsets_raise_at_the_next_call(what):
    case, loc, bound, bad, words = _device_poison(what)
    q, kc, vc, bt, cl = (_t(a) for a in _args(case))
    kc0, vc0 = kc.clone(), vc.clone()
    out = aule.flash_attention_paged(q, kc, vc, bt, cl, query_start_loc=_t(loc), max_query_len=bound,
                                     backend="triton")  # nothing read back: no raise here
    if ON_GPU:
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match=words):
        aule.flash_attention_paged(q, kc, vc, bt, cl, query_start_loc=_t(case.query_start_loc), backend="triton")
    aule.check_device_errors()  # reported once, then forgotten
    assert torch.equal(kc.view(torch.uint8), kc0.view(torch.uint8)) and torch.equal(vc.view(torch.uint8),
                                                                                    vc0.view(torch.uint8))
    # The sequences whose offsets are sound are still right; the bad ones are merely meaningless.
    rows = _good_rows(case, loc, bad)
    assert rows
    check(out.cpu().numpy()[rows], reference_paged(case)[rows], "float32")


def _good_rows(case, loc, bad):
    """The rows of q a poisoned ``loc`` leaves as they were: rows of sequences whose offsets are
    unchanged and not named bad, which no other sequence's rows (as ``loc`` has them) overlap."""
    orig = case.query_start_loc
    changed = [b for b in range(len(orig) - 1) if b in bad or loc[b] != orig[b] or loc[b + 1] != orig[b + 1]]
    taken = {r for b in changed for r in range(max(int(loc[b]), 0), min(int(loc[b + 1]), len(case.q)))}
    return [r for b in range(len(orig) - 1) if b not in changed for r in range(orig[b], orig[b + 1])
            if r not in taken]


@needs_triton
@pytest.mark.parametrize("what", ["decreasing", "past num_tokens", "not starting at 0", "negative"])
def test_device_offsets_are_never_followed_out_of_bounds(what, device_errors_consumed):
    """q and the output are views into larger buffers with sentinels on both sides (NaN before and
    after q): a bad offset must not write the output's margins, and the good sequences must read
    none of q's (a NaN would reach their rows). The context is split here, so the merge pass runs
    too."""
    from aule.backends.triton import paged as tp

    case, loc, _, bad, words = _device_poison(what)
    n, (hq, d) = case.q.shape[0], case.q.shape[1:]
    q_big = torch.full((n + 16, hq, d), float("nan"), device=DEV)
    q_big[8:8 + n] = _t(case.q)
    o_big = torch.full((n + 16, hq, d), 12345.0, device=DEV)
    kc, vc, bt, cl = (_t(a) for a in _args(case)[1:])
    tp.paged_attention_triton(q_big[8:8 + n], kc, vc, bt, cl, case.q.shape[-1] ** -0.5, -1, 64,
                              out=o_big[8:8 + n], check=True, query_start_loc=_t(loc))
    with pytest.raises(ValueError, match=words):
        aule.check_device_errors()
    assert bool((o_big[:8] == 12345.0).all()) and bool((o_big[8 + n:] == 12345.0).all())
    rows = _good_rows(case, loc, bad)
    check(o_big[8:8 + n].cpu().numpy()[rows], reference_paged(case)[rows], "float32")


@needs_triton
def test_host_backend_checks_device_offsets_itself():
    """Device offsets routed to a backend without in-kernel checks are checked before it runs."""
    case, loc, _, _, _ = _device_poison("decreasing")
    with pytest.raises(ValueError, match=r"non-decreasing, got query_start_loc\[3\] = 17 < query_start_loc\[2\] = 18"):
        aule.flash_attention_paged(*(_t(a) for a in _args(case)), query_start_loc=_t(loc), backend="numpy")
    out = aule.flash_attention_paged(*(_t(a) for a in _args(case)), query_start_loc=_t(case.query_start_loc),
                                     backend="numpy")
    check(out.cpu().numpy(), reference_paged(case), "float32")


@needs_triton
def test_packed_device_path_reads_nothing_back(no_read_back, device_errors_consumed):
    case = _case(16, head_dim=16, heads=(4, 2))
    args = [_t(a) for a in _args(case)]
    loc = _t(case.query_start_loc)
    aule.flash_attention_paged(*args, query_start_loc=loc, backend="triton")  # warm: flags made, kernels compiled
    with no_read_back:
        out = aule.flash_attention_paged(*args, query_start_loc=loc, max_query_len=17, max_context_len=64,
                                         backend="triton")
    assert no_read_back.seen == []
    check(out.cpu().numpy(), reference_paged(case), "float32")


@needs_triton
def test_packed_bounds_size_the_launch(monkeypatch, device_errors_consumed):
    """max_query_len (else num_tokens) sizes the row tiles; no offset is read to size them."""
    from aule.backends.triton import paged as tp

    seen = []
    real = tp.choose_config

    def spy(*args, **kwargs):
        seen.append(args[3])
        return real(*args, **kwargs)
    monkeypatch.setattr(tp, "choose_config", spy)
    case = _case(17, head_dim=16, heads=(4, 2))
    ref = reference_paged(case)
    for given, sized in ((None, 23), (10 ** 6, 23), (17, 17)):
        out = _triton(case, max_query_len=given)
        assert seen[-1] == sized
        check(out.cpu().numpy(), ref, "float32")


@needs_gpu
def test_packed_graph_replay_with_new_contents():
    """One CUDA graph, captured once for 40 packed rows, replayed with other splits of those rows
    among the sequences (decode, prefill chunks, drafts, none), other lengths, tables and data."""
    num_tokens, bs = 40, 16
    batches = [([100, 3000, 17, 1, 50], [1, 30, 4, 1, 4]), ([2900, 5, 600, 1500, 9], [17, 5, 0, 1, 17]),
               ([64, 64, 64, 64, 64], [8, 8, 8, 8, 8])]
    num_blocks = 2 * sum(-(-n // bs) for lens, _ in batches for n in lens)
    width = max(-(-n // bs) for lens, _ in batches for n in lens)  # the longest sequence's blocks
    cases = []
    for i, (lens, ns) in enumerate(batches):
        spare = num_blocks - sum(-(-n // bs) for n in lens)
        c = make_case(np.random.default_rng(20 + i), lens, 8, 2, 64, bs, ns, np.float16, spare_blocks=spare)
        c.block_tables = np.pad(c.block_tables, ((0, 0), (0, width - c.block_tables.shape[1])), constant_values=10 ** 6)
        cases.append(c)
    static = {n: _t(getattr(cases[0], n)) for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens",
                                                       "query_start_loc")}

    def call():
        return aule.flash_attention_paged(static["q"], static["k_cache"], static["v_cache"], static["block_tables"],
                                          static["context_lens"], query_start_loc=static["query_start_loc"],
                                          max_query_len=30, max_context_len=width * bs)
    graph, out = capture_graph(call, warmups=2)
    assert all(c.q.shape[0] == num_tokens for c in cases)
    for case in cases + cases[:1]:
        for n in static:
            static[n].copy_(_t(getattr(case, n)))
        graph.replay()
        torch.cuda.synchronize()
        check(out.float().cpu().numpy(), reference_paged(case), "float16")
    aule.check_device_errors()
    # A bad offset written between replays is reported by the next aule call.
    static["query_start_loc"][2] = 2
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"query_start_loc\[2\] = 2 must be non-decreasing"):
        aule.check_device_errors()


@needs_gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_packed_full_size(dtype):
    rng = np.random.default_rng(30)
    lens = [int(x) for x in rng.integers(2000, 8000, size=24)]
    ns = [1] * 16 + [512, 256, 4, 4, 5, 0, 1, 7]
    case = _round(make_case(rng, lens, 32, 8, 128, 16, ns, np.float32), dtype)
    out = _triton(case, dtype, max_query_len=512, max_context_len=8000)
    check(out.float().cpu().numpy(), reference_paged(case), dtype)
    aule.check_device_errors()


# ---------------------------------------------------------------------------------------------------
# Vulkan (lavapipe here; under the Khronos validation layer with AULE_VALIDATION=1)


@pytest.fixture
def vk():
    from _vulkan_util import vulkan_context

    ctx = vulkan_context()
    ctx.take_validation_messages()
    yield ctx
    msgs = ctx.take_validation_messages()
    assert not msgs, "Vulkan validation messages:\n" + "\n".join(msgs)


def _vulkan(case, dtype=np.float32, q=None, **kw):
    from aule.backends.vulkan import GpuTensor

    kc, vc = (GpuTensor.from_numpy(c.astype(dtype), dtype) for c in (case.k_cache, case.v_cache))
    q = case.q.astype(dtype) if q is None else q
    return aule.flash_attention_paged(q, kc, vc, case.block_tables, case.context_lens,
                                      query_start_loc=case.query_start_loc, **kw)  # a GpuTensor cache: Vulkan


@pytest.mark.parametrize("heads,block_size", [((8, 2), 8), ((4, 4), 1), ((8, 1), 32)])
def test_vulkan_packed_matches_reference(vk, heads, block_size):
    case = _case(21, heads=heads, block_size=block_size)
    out = _vulkan(case)
    assert isinstance(out, np.ndarray) and out.shape == case.q.shape and out.dtype == np.float32
    check(out, reference_paged(case), "float32")


@pytest.mark.parametrize("window", [1, 6, (25, 0)])
def test_vulkan_packed_window_and_scale(vk, window):
    case = _case(22, window=window)
    check(_vulkan(case, window_size=window, scale=0.3), reference_paged(case, window_size=window, scale=0.3),
          "float32")


def test_vulkan_packed_float16(vk):
    if not vk.info.fp16:
        pytest.skip(f"{vk.info.name} has no float16 storage/arithmetic")
    case = _case(23, heads=(4, 1), head_dim=128)
    for n in ("q", "k_cache", "v_cache"):
        setattr(case, n, getattr(case, n).astype(np.float16))
    case.ks, case.vs = [k.astype(np.float16) for k in case.ks], [v.astype(np.float16) for v in case.vs]
    out = _vulkan(case, np.float16)
    assert out.dtype == np.float16
    check(out, reference_paged(case), "float16")


def test_vulkan_packed_split_context_and_gpu_tensors(vk):
    """Contexts long enough to be split (the merge then runs over the packed rows), with q a
    GpuTensor: the output is a GpuTensor of q's packed shape."""
    from aule.backends.vulkan import GpuTensor, plans

    case = _case(24, lens=[700, 300, 90, 12], ns=[17, 1, 4, 0], heads=(4, 2), block_size=16)
    kc = GpuTensor.from_numpy(case.k_cache)
    call = aule.paged_call.canonicalize_paged(case.q, kc, kc, case.block_tables, case.context_lens,
                                              query_start_loc=case.query_start_loc)
    assert call.q_len == 17 and plans.paged_plan(call, vk.info).merge is not None, "the case must split"
    out = _vulkan(case, q=GpuTensor.from_numpy(case.q))
    assert isinstance(out, GpuTensor) and out.shape == case.q.shape
    check(out.numpy(), reference_paged(case), "float32")


def test_vulkan_packed_equals_numpy_row_for_row(vk):
    from aule.backends.vulkan import GpuTensor, paged_attention

    case = _case(25)
    kc, vc = GpuTensor.from_numpy(case.k_cache), GpuTensor.from_numpy(case.v_cache)
    out, ns = paged_attention(case.q, kc, vc, case.block_tables, case.context_lens, timestamps=True,
                              query_start_loc=case.query_start_loc)  # the benchmarks' entry point
    assert ns is None if vk.query_pool is None else ns > 0
    np.testing.assert_allclose(out, aule.flash_attention_paged(
        *_args(case), query_start_loc=case.query_start_loc, backend="numpy"), rtol=1e-4, atol=1e-5)


def test_vulkan_bad_offsets_raise_before_any_dispatch(vk, monkeypatch):
    """Vulkan's tables are host tables: a bad query_start_loc is refused before anything runs."""
    from aule.backends.vulkan import launch

    def boom(*a, **k):
        raise AssertionError("a dispatch was planned with invalid offsets")
    monkeypatch.setattr(launch, "paged_plan", boom)
    case = _loc_case()
    case.query_start_loc = np.array([0, 1, 18, 12, 22, 23], np.int32)
    with pytest.raises(ValueError, match=r"query_start_loc\[3\] = 12 < query_start_loc\[2\] = 18"):
        _vulkan(case)
    case.query_start_loc = np.array([0, 1, 18, 22, 22, 30], np.int32)
    with pytest.raises(ValueError, match=r"query_start_loc\[5\] = 30 is outside \[0, num_tokens = 23\]"):
        _vulkan(case)


# ---------------------------------------------------------------------------------------------------
# PagedKVCache: packed attention from row counts the cache checks itself


def _filled_cache(backend, lens, rng, device=None, to=np.asarray):
    cache = aule.PagedKVCache(num_blocks=24, block_size=4, heads_kv=2, head_dim=16, dtype="float32",
                              backend=backend, **({} if device is None else {"device": device}))
    ids = [cache.allocate() for _ in lens]
    for sid, n in zip(ids, lens):
        k, v = (rng.standard_normal((n, 2, 16)).astype(np.float32) for _ in range(2))
        cache.append(sid, to(k), to(v))
    return cache, ids


def _cache_reference(cache, ids, q, query_lens, **kw):
    gathered = [cache.gather(s) for s in ids]
    loc = np.concatenate([[0], np.cumsum(query_lens)])
    return aule.reference.paged_reference(q, [g[0] for g in gathered], [g[1] for g in gathered], loc, **kw)


@pytest.mark.parametrize("backend", ["numpy", "vulkan"])
def test_cache_packed_attention(backend):
    if backend == "vulkan":
        from _vulkan_util import vulkan_context

        vulkan_context()
    rng = np.random.default_rng(40)
    cache, ids = _filled_cache(backend, [9, 30, 1, 5], rng)
    query_lens = [1, 17, 1, 0]
    q = rng.standard_normal((19, 8, 16)).astype(np.float32)
    out = cache.attention(q, ids, window_size=12, query_lens=query_lens)
    check(np.asarray(out), _cache_reference(cache, ids, q, query_lens, window_size=12), "float32")
    with pytest.raises(ValueError, match=r"query_lens\[2\] = 2 but the sequence holds 1 tokens"):
        cache.attention(q, ids, query_lens=[1, 16, 2, 0])
    with pytest.raises(ValueError, match=r"q must be \[sum\(query_lens\) = 18, heads_q, head_dim\]"):
        cache.attention(q, ids, query_lens=[1, 16, 1, 0])
    with pytest.raises(ValueError, match="query_lens must hold one int >= 0 per sequence"):
        cache.attention(q, ids, query_lens=[1, 17, 1])


@needs_triton
def test_cache_packed_attention_on_triton_pays_for_no_checks(monkeypatch):
    from aule.backends.triton import flags

    rng = np.random.default_rng(41)
    cache, ids = _filled_cache("triton", [9, 30, 5], rng, device=DEV, to=_t)

    def no_flag(*a, **kw):
        raise AssertionError("the cache's own tables took an error flag")
    monkeypatch.setattr(flags.ErrorFlags, "acquire", no_flag)
    query_lens = [4, 17, 0]
    q = rng.standard_normal((21, 8, 16)).astype(np.float32)
    out = cache.attention(_t(q), ids, query_lens=query_lens)
    check(out.cpu().numpy(), _cache_reference(cache, ids, q, query_lens), "float32")


@needs_triton
def test_triton_takes_host_offsets_beside_device_tables(device_errors_consumed):
    """Offsets as a NumPy array are checked on the host (the call is then host-checked) and copied
    to where the kernel reads them."""
    case = _case(18, heads=(4, 2), head_dim=16)
    args = [_t(a) for a in _args(case)]
    out = aule.flash_attention_paged(*args, query_start_loc=case.query_start_loc, backend="triton")
    check(out.cpu().numpy(), reference_paged(case), "float32")
    bad = case.query_start_loc.copy()
    bad[2] = 0
    with pytest.raises(ValueError, match=r"query_start_loc\[2\] = 0 < query_start_loc\[1\] = 1"):
        aule.flash_attention_paged(*args, query_start_loc=bad, backend="triton")

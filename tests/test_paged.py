"""Paged attention: validation, the NumPy backend, copy_kv_to_paged and PagedKVCache.

The helpers here (``make_case``, ``reference_paged``, ``TOL``) are shared with the Triton and
Vulkan paged tests, which check their kernels on the very same cases.
"""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import api, paged_call
from aule.reference import attention_reference, paged_reference

TOL = {"float32": 2e-4, "float16": 3e-3, "bfloat16": 2.5e-2, "float64": 1e-10}


class Case:
    """A paged cache built from known contiguous K/V, with shuffled block ids and poisoned padding."""

    def __init__(self, q, k_cache, v_cache, block_tables, context_lens, ks, vs):
        self.q, self.k_cache, self.v_cache = q, k_cache, v_cache
        self.block_tables, self.context_lens = block_tables, context_lens
        self.ks, self.vs = ks, vs  # per sequence: contiguous [heads_kv, len, head_dim]


def make_case(rng, lens, heads_q, heads_kv, head_dim, block_size, q_len, dtype=np.float32,
              window_size=-1, spare_blocks=2):
    """Random sequences written into randomly permuted blocks. Every slot no sequence uses, and
    every block that lies wholly before a sequence's window, holds NaN, so a kernel that reads
    (and uses) data it should not fails the comparison. Table padding holds out-of-range ids.
    ``q_len`` a list (one row count per sequence): q is packed ``[num_tokens, heads_q, head_dim]``
    and the case has its ``query_start_loc``; otherwise ``query_start_loc`` is None."""
    left, _ = aule.masks.canonical_window(True, window_size)
    q_lens = list(q_len) if isinstance(q_len, (list, tuple)) else [q_len] * len(lens)
    nblk = [-(-n // block_size) for n in lens]
    num_blocks = sum(nblk) + spare_blocks
    max_blocks = max(nblk + [1]) + 1
    perm = rng.permutation(num_blocks)
    k_cache = np.full((num_blocks, block_size, heads_kv, head_dim), np.nan, dtype=dtype)
    v_cache = np.full_like(k_cache, np.nan)
    block_tables = np.full((len(lens), max_blocks), 10 ** 6, dtype=np.int32)
    ks, vs, used = [], [], 0
    for b, n in enumerate(lens):
        k = rng.standard_normal((heads_kv, n, head_dim)).astype(dtype)
        v = rng.standard_normal((heads_kv, n, head_dim)).astype(dtype)
        ks.append(k)
        vs.append(v)
        ids = perm[used:used + nblk[b]]
        used += nblk[b]
        block_tables[b, :nblk[b]] = ids
        first_visible = 0 if left < 0 else max(0, n - q_lens[b] - left)
        for j in range(n):
            blk, off = ids[j // block_size], j % block_size
            if (j // block_size + 1) * block_size <= first_visible:
                continue  # block wholly outside the window stays NaN: it must not be read
            k_cache[blk, off] = k[:, j]
            v_cache[blk, off] = v[:, j]
    if isinstance(q_len, (list, tuple)):
        q = rng.standard_normal((sum(q_lens), heads_q, head_dim)).astype(dtype)
        loc = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    else:
        q, loc = rng.standard_normal((len(lens), heads_q, q_len, head_dim)).astype(dtype), None
    case = Case(q, k_cache, v_cache, block_tables, np.asarray(lens, dtype=np.int32), ks, vs)
    case.query_start_loc = loc
    return case


def reference_paged(case, scale=None, window_size=-1, **features):
    """Float64 reference on the contiguous copy: q rows are the last q_len (packed: n_b) positions,
    causal (``features``: the reference's keyword features, ``sinks=``)."""
    return paged_reference(case.q, case.ks, case.vs, getattr(case, "query_start_loc", None), scale=scale,
                           window_size=window_size, **features)


def rel_err(out, ref):
    out = np.asarray(out, dtype=np.float64)
    assert np.isfinite(out).all(), "output holds NaN/inf: padding or out-of-window data was used"
    denom = max(np.linalg.norm(ref), 1e-30)
    return np.linalg.norm(out - ref) / denom


def check(out, ref, dtype_name):
    err = rel_err(out, ref)
    assert err < TOL[dtype_name], f"relative error {err:.3g} >= {TOL[dtype_name]} ({dtype_name})"
    # Elementwise too, so one bad row cannot hide inside the norm.
    scale = np.abs(ref).max() + 1e-30
    worst = np.abs(np.asarray(out, np.float64) - ref).max() / scale
    assert worst < 10 * TOL[dtype_name], f"max abs error {worst:.3g} of max |ref|"


# ---------------------------------------------------------------------------------------------------
# NumPy backend against the reference

LENS = [1, 15, 16, 17, 1000]


@pytest.mark.parametrize("block_size", [1, 16, 128])
@pytest.mark.parametrize("q_len", [1, 4])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (8, 1)])
def test_numpy_matches_reference(block_size, q_len, heads):
    rng = np.random.default_rng(block_size * 10 + q_len)
    hq, hk = heads
    case = make_case(rng, LENS, hq, hk, 64, block_size, q_len)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables,
                                     case.context_lens, backend="numpy")
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    check(out, reference_paged(case), "float32")


@pytest.mark.parametrize("window", [1, 8, 100, (31, 0), (0, 5)])
@pytest.mark.parametrize("q_len", [1, 4])
def test_numpy_window(window, q_len):
    rng = np.random.default_rng(7)
    case = make_case(rng, [3, 16, 40, 1000], 8, 2, 80, 16, q_len, window_size=window)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables,
                                     case.context_lens, window_size=window, backend="numpy")
    check(out, reference_paged(case, window_size=window), "float32")


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_numpy_dtypes_and_scale(dtype):
    rng = np.random.default_rng(3)
    case = make_case(rng, [5, 33, 64], 4, 1, 128, 8, 2, dtype=dtype)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables,
                                     case.context_lens, scale=0.3, backend="numpy")
    assert out.dtype == dtype
    check(out, reference_paged(case, scale=0.3), np.dtype(dtype).name)


def test_q_longer_than_context_gives_zero_rows():
    rng = np.random.default_rng(11)
    case = make_case(rng, [2, 0, 6], 2, 2, 64, 4, 4)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables,
                                     case.context_lens, backend="numpy")
    ref = reference_paged(case)
    assert np.all(out[0, :, :2] == 0) and np.all(out[1] == 0)
    check(out, ref, "float32")


def test_torch_cpu_tensors_and_bfloat16():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    case = make_case(rng, [17, 64], 4, 2, 64, 16, 1)
    t = {n: torch.from_numpy(getattr(case, n)) for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens")}
    out = aule.flash_attention_paged(t["q"], t["k_cache"], t["v_cache"], t["block_tables"], t["context_lens"],
                                     backend="numpy")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    check(out.numpy(), reference_paged(case), "float32")
    kb, vb, qb = (t[n].to(torch.bfloat16) for n in ("k_cache", "v_cache", "q"))
    out = aule.flash_attention_paged(qb, kb, vb, t["block_tables"], t["context_lens"], backend="numpy")
    assert out.dtype == torch.bfloat16
    check(out.float().numpy(), reference_paged(case), "bfloat16")


def test_alias_and_empty_batch():
    assert aule.flash_attention_paged_amd is aule.flash_attention_paged
    q = np.zeros((0, 4, 1, 64), np.float32)
    kc = np.zeros((3, 16, 2, 64), np.float32)
    out = aule.flash_attention_paged(q, kc, kc, np.zeros((0, 2), np.int32), np.zeros(0, np.int32))
    assert out.shape == (0, 4, 1, 64)


# ---------------------------------------------------------------------------------------------------
# validation: every bad input raises before any kernel runs


@pytest.fixture
def no_kernel(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a backend was reached with invalid input")
    monkeypatch.setattr(api, "route", boom)


def _good():
    rng = np.random.default_rng(0)
    case = make_case(rng, [5, 20], 4, 2, 64, 8, 1)
    return dict(q=case.q, k_cache=case.k_cache, v_cache=case.v_cache, block_tables=case.block_tables,
                context_lens=case.context_lens)


def _bad(**changes):
    args = _good()
    for k, fn in changes.items():
        args[k] = fn(args[k])
    return args


BAD = {
    "block id too large": (ValueError, "block_tables", dict(block_tables=lambda t: np.where(np.arange(t.shape[1]) == 0, 99, t).astype(np.int32))),
    "negative block id": (ValueError, "block_tables", dict(block_tables=lambda t: np.where(np.arange(t.shape[1]) == 1, -1, t).astype(np.int32))),
    "negative context": (ValueError, "context_lens", dict(context_lens=lambda c: np.array([-1, 20], np.int32))),
    "context too long": (ValueError, "context_lens", dict(context_lens=lambda c: np.array([5, 10_000], np.int32))),
    "float block table": (TypeError, "block_tables", dict(block_tables=lambda t: t.astype(np.float32))),
    "1-D block table": (ValueError, "block_tables", dict(block_tables=lambda t: t[0])),
    "context batch": (ValueError, "batch", dict(context_lens=lambda c: c[:1])),
    "q 3-D": (ValueError, "q must be 4-D", dict(q=lambda q: q[0])),
    "q head_dim": (ValueError, "head_dim", dict(q=lambda q: q[..., :32])),
    "gqa": (ValueError, "multiple of heads_kv", dict(q=lambda q: q[:, :3])),
    "q dtype": (TypeError, "dtype", dict(q=lambda q: q.astype(np.float16))),
    "int cache": (TypeError, "k_cache", dict(k_cache=lambda c: np.zeros(c.shape, np.int32), v_cache=lambda c: np.zeros(c.shape, np.int32))),
    "cache shapes": (ValueError, "one shape", dict(v_cache=lambda c: c[:, :4])),
    "cache 3-D": (ValueError, "k_cache must be 4-D", dict(k_cache=lambda c: c[0], v_cache=lambda c: c[0])),
    "list q": (TypeError, "q must be", dict(q=lambda q: q.tolist())),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_raises_before_kernel(name, no_kernel):
    exc, words, changes = BAD[name]
    with pytest.raises(exc, match=words):
        aule.flash_attention_paged(**_bad(**changes))


def test_bad_scale_window_backend(no_kernel):
    with pytest.raises(ValueError, match="scale"):
        aule.flash_attention_paged(**_good(), scale=-1.0)
    with pytest.raises(ValueError, match="window_size"):
        aule.flash_attention_paged(**_good(), window_size=0)
    with pytest.raises(ValueError, match="names no backend"):
        api.forced_backend("nope")


def test_padding_past_used_blocks_is_not_checked():
    args = _good()  # padding columns hold 10**6, which must be ignored
    assert args["block_tables"].max() == 10 ** 6
    aule.flash_attention_paged(**args, backend="numpy")


def test_torch_tables_checked_too():
    torch = pytest.importorskip("torch")
    args = {k: torch.from_numpy(v) for k, v in _good().items()}
    args["block_tables"][1, 0] = 1000
    with pytest.raises(ValueError, match=r"block_tables\[1, 0\] = 1000"):
        aule.flash_attention_paged(**args, backend="numpy")


# ---------------------------------------------------------------------------------------------------
# copy_kv_to_paged


def test_copy_kv_numpy_slot_mapping():
    rng = np.random.default_rng(1)
    kc = np.zeros((4, 8, 2, 16), np.float32)
    vc = np.zeros_like(kc)
    key = rng.standard_normal((5, 2, 16)).astype(np.float32)
    val = rng.standard_normal((5, 2, 16)).astype(np.float32)
    slots = np.array([0, 9, -1, 31, 17], dtype=np.int64)
    aule.copy_kv_to_paged(key, val, kc, vc, slots)
    for t, s in enumerate(slots):
        if s < 0:
            continue
        np.testing.assert_array_equal(kc[s // 8, s % 8], key[t])
        np.testing.assert_array_equal(vc[s // 8, s % 8], val[t])
    assert np.count_nonzero(kc.reshape(32, -1).any(axis=1)) == 4  # the skipped token wrote nothing


def test_copy_kv_torch_tensors():
    torch = pytest.importorskip("torch")
    kc = torch.zeros(3, 4, 1, 8, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    key = torch.randn(3, 1, 8).to(torch.bfloat16)
    aule.copy_kv_to_paged(key, key * 2, kc, vc, torch.tensor([11, -1, 0], dtype=torch.int32))
    assert torch.equal(kc[2, 3], key[0]) and torch.equal(vc[0, 0], key[2] * 2)


@pytest.mark.parametrize("slots,words", [([0, 32], "outside"), ([3, 3], "more than once"),
                                         ([0], "one slot per token")])
def test_copy_kv_bad_slots(slots, words):
    kc = np.zeros((4, 8, 2, 16), np.float32)
    key = np.ones((2, 2, 16), np.float32)
    with pytest.raises(ValueError, match=words):
        aule.copy_kv_to_paged(key, key, kc, kc.copy(), np.array(slots))
    assert not kc.any()


def test_copy_kv_bad_shapes_and_dtypes():
    kc = np.zeros((4, 8, 2, 16), np.float32)
    with pytest.raises(ValueError, match="heads_kv=2"):
        aule.copy_kv_to_paged(np.ones((1, 3, 16), np.float32), np.ones((1, 3, 16), np.float32), kc, kc.copy(), [0])
    with pytest.raises(TypeError, match="dtype"):
        aule.copy_kv_to_paged(np.ones((1, 2, 16), np.float16), np.ones((1, 2, 16), np.float16), kc, kc.copy(), [0])


# ---------------------------------------------------------------------------------------------------
# PagedKVCache


def _tokens(rng, n, hk=2, d=16, dtype=np.float32):
    return rng.standard_normal((n, hk, d)).astype(dtype), rng.standard_normal((n, hk, d)).astype(dtype)


def test_cache_append_gather_and_attention():
    rng = np.random.default_rng(2)
    cache = aule.PagedKVCache(num_blocks=16, block_size=4, heads_kv=2, head_dim=16, dtype="float32", backend="numpy")
    a, b = cache.allocate(), cache.allocate()
    chunks = {a: [], b: []}
    for sid, n in ((a, 3), (b, 9), (a, 1), (a, 6), (b, 0), (b, 2)):
        k, v = _tokens(rng, n)
        cache.append(sid, k, v)
        chunks[sid].append((k, v))
    for sid in (a, b):
        k_all = np.concatenate([k for k, _ in chunks[sid]]).transpose(1, 0, 2)
        v_all = np.concatenate([v for _, v in chunks[sid]]).transpose(1, 0, 2)
        gk, gv = cache.gather(sid)
        np.testing.assert_array_equal(gk, k_all)
        np.testing.assert_array_equal(gv, v_all)
    assert cache.seq_len(a) == 10 and cache.seq_len(b) == 11
    assert cache.num_free_blocks == 16 - 3 - 3
    bt = cache.block_tables([b, a])
    assert bt.dtype == np.int32 and bt.shape == (2, 3)
    np.testing.assert_array_equal(cache.context_lens([b, a]), [11, 10])
    q = rng.standard_normal((2, 4, 2, 16)).astype(np.float32)
    out = cache.attention(q, [a, b], window_size=5)
    for i, sid in enumerate((a, b)):
        gk, gv = cache.gather(sid)
        ref = attention_reference(q[i:i + 1], gk[None], gv[None], causal=True, window_size=5)
        check(out[i:i + 1], ref, "float32")


def test_cache_fork_shares_and_copies_on_write():
    rng = np.random.default_rng(4)
    cache = aule.PagedKVCache(8, 4, 2, 16, "float32", backend="numpy")
    p = cache.allocate()
    cache.append(p, *_tokens(rng, 6))  # blocks: one full, one half full
    free0 = cache.num_free_blocks
    c = cache.fork(p)
    assert cache.num_free_blocks == free0  # nothing copied yet
    np.testing.assert_array_equal(cache.block_tables([p]), cache.block_tables([c]))
    pk, pv = cache.gather(p)
    ck_new = _tokens(rng, 1)
    cache.append(c, *ck_new)
    assert cache.num_free_blocks == free0 - 1  # the shared half block was copied
    bp, bc = cache.block_tables([p])[0], cache.block_tables([c])[0]
    assert bp[0] == bc[0] and bp[1] != bc[1]  # full block still shared
    np.testing.assert_array_equal(cache.gather(p)[0], pk)  # the parent is untouched
    ck, _ = cache.gather(c)
    np.testing.assert_array_equal(ck[:, :6], pk)
    np.testing.assert_array_equal(ck[:, 6], ck_new[0][0])
    cache.append(p, *_tokens(rng, 2))  # the parent's own half block is no longer shared: no copy
    assert cache.num_free_blocks == free0 - 1
    cache.free(p)
    assert cache.num_free_blocks == free0 - 1 + 1  # only the parent's private block returns
    cache.free(c)
    assert cache.num_free_blocks == 8


def test_cache_exhaustion_leaves_cache_unchanged():
    rng = np.random.default_rng(6)
    cache = aule.PagedKVCache(4, 4, 2, 16, "float32", backend="numpy")
    a = cache.allocate()
    cache.append(a, *_tokens(rng, 10))
    c = cache.fork(a)
    before = (cache.num_free_blocks, cache.block_tables([a, c]).copy(), cache.context_lens([a, c]).copy(),
              cache.k_cache.copy())
    with pytest.raises(aule.CacheFullError, match="full"):
        cache.append(a, *_tokens(rng, 7))  # needs copy-on-write + 2 new blocks, 1 free
    with pytest.raises(MemoryError):
        cache.reserve(c, 100)
    after = (cache.num_free_blocks, cache.block_tables([a, c]), cache.context_lens([a, c]), cache.k_cache)
    assert before[0] == after[0]
    for x, y in zip(before[1:], after[1:]):
        np.testing.assert_array_equal(x, y)
    cache.append(a, *_tokens(rng, 2))  # fits after copy-on-write into the last free block
    assert cache.num_free_blocks == 0


def test_cache_bad_append_rolls_back():
    rng = np.random.default_rng(8)
    cache = aule.PagedKVCache(4, 4, 2, 16, "float32", backend="numpy")
    a = cache.allocate()
    with pytest.raises(TypeError, match="dtype"):
        cache.append(a, *_tokens(rng, 3, dtype=np.float16))
    assert cache.num_free_blocks == 4 and cache.seq_len(a) == 0
    with pytest.raises(KeyError):
        cache.append("missing", *_tokens(rng, 1))
    with pytest.raises(ValueError, match="positive"):
        aule.PagedKVCache(0, 4, 2, 16)
    with pytest.raises(ValueError, match="already exists"):
        cache.allocate(a)


def test_reserve_then_copy_kv_like_vllm():
    rng = np.random.default_rng(9)
    cache = aule.PagedKVCache(32, 16, 2, 64, "float16", backend="numpy")
    ids = [cache.allocate() for _ in range(3)]
    lens = [40, 1, 17]
    ks, vs = {}, {}
    for sid, n in zip(ids, lens):  # a prefill batch: one flat token list, one slot mapping
        ks[sid], vs[sid] = _tokens(rng, n, 2, 64, np.float16)
    slots = np.concatenate([cache.reserve(s, n) for s, n in zip(ids, lens)])
    aule.copy_kv_to_paged(np.concatenate(list(ks.values())), np.concatenate(list(vs.values())),
                          cache.k_cache, cache.v_cache, slots)
    q = rng.standard_normal((3, 8, 1, 64)).astype(np.float16)
    out = cache.attention(q, ids)
    for i, sid in enumerate(ids):
        ref = attention_reference(q[i:i + 1], ks[sid].transpose(1, 0, 2)[None], vs[sid].transpose(1, 0, 2)[None])
        check(out[i:i + 1], ref, "float16")


def test_cache_attention_skips_table_readback_but_checks_q(monkeypatch):
    rng = np.random.default_rng(10)
    cache = aule.PagedKVCache(8, 4, 2, 16, "float32", backend="numpy")
    a = cache.allocate()
    k, v = _tokens(rng, 9)
    cache.append(a, k, v)

    def no_readback(*args, **kw):
        raise AssertionError("the cache's own tables were read back for checking")
    monkeypatch.setattr(paged_call, "check_tables", no_readback)
    q = rng.standard_normal((1, 4, 1, 16)).astype(np.float32)
    out = cache.attention(q, [a])
    check(out, attention_reference(q, k.transpose(1, 0, 2)[None], v.transpose(1, 0, 2)[None]), "float32")
    with pytest.raises(ValueError, match="head_dim"):
        cache.attention(q[..., :8], [a])


def test_cache_storage_is_routed_like_every_other_op():
    from aule.paged_call import CacheSpec

    spec = CacheSpec(shape=(4, 4, 2, 16), dtype="bfloat16")
    assert spec.place == "host"
    with pytest.raises(aule.UnsupportedError, match="no bfloat16"):
        aule.PagedKVCache(4, 4, 2, 16, "bfloat16", backend="numpy")
    with pytest.raises(ValueError, match="host memory"):
        aule.PagedKVCache(4, 4, 2, 16, "float32", backend="numpy", device="cuda")
    cache = aule.PagedKVCache(4, 4, 2, 16, "float32", backend="cpu")
    assert cache.backend == "numpy" and isinstance(cache.block_tables([]), np.ndarray)

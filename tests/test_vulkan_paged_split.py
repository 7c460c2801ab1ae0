"""Vulkan KV caches split across device buffers (plans.cache_split): a cache beyond one allocation
(maxMemoryAllocationSize) or one binding (maxStorageBufferRange) lies in pieces of whole blocks,
which paged.comp and copy_kv_to_paged.comp bind as arrays of buffers.

The split rule is checked on recorded device limits (an H200's 4 GiB allocations) anywhere; on the
device here (lavapipe: 128 MiB per binding in CI) one float16 cache really exceeds the binding
range, and smaller limits seen through the context's DeviceInfo make small caches split into many
pieces, against the float64 reference with tables that cross pieces inside one key tile."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import aule
from aule.reference import attention_reference, paged_reference

from _vulkan_util import ctx, no_validation_messages  # noqa: F401  (fixtures: the context, a clean layer)
from test_paged import check
from test_vulkan import _recorded_device

H200_LIMITS = dict(max_allocation=4292870144, max_storage_buffer_range=4294967295)  # as the H200 reports them


def _h200():
    return dataclasses.replace(_recorded_device("NVIDIA H200", "NVIDIA"), **H200_LIMITS)


# --- the split rule on recorded limits ---------------------------------------------------------------

def test_h200_b64_ctx32k_cache_splits_into_whole_block_pieces():
    from aule.backends.vulkan.plans import cache_split, piece_limit

    info = _h200()
    batch, ctx_len, hk, d, bs = 64, 32768, 8, 128, 16
    shape = (batch * ctx_len // bs, bs, hk, d)   # 4 GiB in float16: just past one allocation
    for itemsize, pieces in ((2, 2), (4, 3)):
        split = cache_split(shape, itemsize, info)
        assert split.pieces == pieces, split
        assert split.block_bytes == bs * hk * d * itemsize
        covered = [split.blocks(i) for i in range(split.pieces)]
        assert covered[0][0] == 0 and covered[-1][1] == shape[0]
        assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), covered
        assert all(0 < split.piece_bytes(i) <= piece_limit(info) for i in range(split.pieces))
        # Shared out evenly: no piece is more than a block larger than another.
        sizes = [e - f for f, e in covered]
        assert max(sizes) - min(sizes) <= pieces, sizes
    assert cache_split((1000, bs, hk, d), 2, info).pieces == 1   # a cache that fits stays whole


def test_split_rule_refuses_what_no_split_fits():
    from aule.backends.vulkan.plans import cache_split, max_pieces
    from aule.errors import UnsupportedError

    lavapipe = dataclasses.replace(_recorded_device("llvmpipe", "Mesa", "cpu"), max_allocation=2**31,
                                   max_storage_buffer_range=2**27, max_stage_storage_buffers=32)
    assert max_pieces(lavapipe) == 7   # copy-on-write binds 4 arrays of pieces and 2 slot lists in 32
    bs, hk, d = 16, 4, 128
    most = 2**27 // (bs * hk * d * 2)
    assert cache_split((7 * most, bs, hk, d), 2, lavapipe).pieces == 7
    with pytest.raises(UnsupportedError) as err:
        cache_split((7 * most + 1, bs, hk, d), 2, lavapipe)
    msg = str(err.value)
    assert "8 buffers" in msg and "maxPerStageDescriptorStorageBuffers 32" in msg and f"at most {7 * most}" in msg, msg
    with pytest.raises(UnsupportedError, match="one block exceeds a buffer"):
        cache_split((2, 2**17, 8, 128), 2, lavapipe)
    no_arrays = dataclasses.replace(lavapipe, storage_array_indexing=False)
    assert cache_split((most, bs, hk, d), 2, no_arrays).pieces == 1
    with pytest.raises(UnsupportedError, match="shaderStorageBufferArrayDynamicIndexing"):
        cache_split((most + 1, bs, hk, d), 2, no_arrays)


def test_descriptor_counts_are_checked():
    from aule.backends.vulkan.runtime.pipelines import MAX_DESCRIPTORS, descriptor_counts

    assert descriptor_counts(3) == (1, 1, 1)
    assert descriptor_counts((1, 5, 5, 1)) == (1, 5, 5, 1)
    with pytest.raises(ValueError, match="descriptors"):
        descriptor_counts((1, MAX_DESCRIPTORS))
    with pytest.raises(ValueError, match="at least one"):
        descriptor_counts((1, 0))


# --- on the device -------------------------------------------------------------------------------

class _Case:
    """Sequences whose block tables name chosen blocks of a NaN-filled cache: a kernel reading any
    other slot, or a slot past a sequence's length, returns NaN."""

    def __init__(self, rng, num_blocks, bs, hq, hk, d, tables, lens, dtype, q_len=1):
        self.k_cache = np.full((num_blocks, bs, hk, d), np.nan, dtype)
        self.v_cache = np.full_like(self.k_cache, np.nan)
        width = max(len(t) for t in tables) + 1
        self.block_tables = np.full((len(tables), width), 10 ** 6, np.int32)
        self.context_lens = np.array(lens, np.int32)
        self.ks, self.vs = [], []
        for b, (ids, n) in enumerate(zip(tables, lens)):
            assert len(ids) == -(-n // bs)
            self.block_tables[b, :len(ids)] = ids
            k = rng.standard_normal((hk, n, d)).astype(dtype)
            v = rng.standard_normal((hk, n, d)).astype(dtype)
            for j in range(n):
                self.k_cache[ids[j // bs], j % bs] = k[:, j]
                self.v_cache[ids[j // bs], j % bs] = v[:, j]
            self.ks.append(k)
            self.vs.append(v)
        self.q = rng.standard_normal((len(tables), hq, q_len, d)).astype(dtype)

    def reference(self, **kw):
        return paged_reference(self.q, self.ks, self.vs, **kw)


def _edges(split) -> list[int]:
    """The first and last block of every piece of a split."""
    return sorted({b for i in range(split.pieces) for b in (split.blocks(i)[0], split.blocks(i)[1] - 1)})


def _gpu_cache(case, dtype):
    from aule.backends.vulkan import GpuTensor

    return (GpuTensor.from_numpy(case.k_cache, dtype, paged=True),
            GpuTensor.from_numpy(case.v_cache, dtype, paged=True))


def test_cache_beyond_the_binding_range_is_split_and_attended(ctx):
    """One float16 cache of 8200 blocks x 16 KiB, past the device's real storage-buffer range."""
    from aule.backends.vulkan import plans

    if not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage")
    bs, hq, hk, d = 16, 8, 4, 128
    block_bytes = bs * hk * d * 2
    num_blocks = ctx.info.max_storage_buffer_range // block_bytes + 8
    if num_blocks * block_bytes > 2**28:
        pytest.skip(f"{ctx.info.name}'s storage-buffer range ({ctx.info.max_storage_buffer_range} bytes) is too "
                    "large to exceed in a quick test")
    split = plans.cache_split((num_blocks, bs, hk, d), 2, ctx.info)
    assert split.pieces == 2
    first, last = split.blocks(0)[1] - 1, split.blocks(1)[0]   # the two sides of the boundary
    # Sequence 0's first key tile (32 keys: two blocks) holds the last block of piece 0 and the first
    # of piece 1, so the invocations of one workgroup read different pieces.
    tables = [[first, last, 0], [num_blocks - 1, 1], [2, num_blocks - 2, last + 1, first - 1]]
    rng = np.random.default_rng(11)
    case = _Case(rng, num_blocks, bs, hq, hk, d, tables, [40, 17, 64], np.float16, q_len=3)
    kc, vc = _gpu_cache(case, np.float16)
    assert len(kc.leases) == len(vc.leases) == 2 and kc.nbytes > ctx.info.max_storage_buffer_range
    out = aule.flash_attention_paged(case.q, kc, vc, case.block_tables, case.context_lens)
    check(out, case.reference(), "float16")

    # New rows into every slot of the first and last block of each piece, then attended there.
    edges = _edges(split)
    order = [edges[i] for i in rng.permutation(len(edges))]
    slots = np.array([blk * bs + o for blk in order for o in range(bs)], np.int32)
    key = rng.standard_normal((len(slots), hk, d)).astype(np.float16)
    value = rng.standard_normal((len(slots), hk, d)).astype(np.float16)
    aule.copy_kv_to_paged(key, value, kc, vc, slots)
    k_back, v_back = (x.numpy().reshape(-1, hk, d) for x in (kc, vc))
    np.testing.assert_array_equal(k_back[slots], key)
    np.testing.assert_array_equal(v_back[slots], value)
    untouched = np.ones(num_blocks * bs, bool)
    untouched[slots] = False
    np.testing.assert_array_equal(k_back[untouched], case.k_cache.reshape(-1, hk, d)[untouched])
    n = len(slots) - 5   # the last block partly used: its last rows are never read
    q = rng.standard_normal((1, hq, 2, d)).astype(np.float16)
    got = aule.flash_attention_paged(q, kc, vc, np.array([order], np.int32), np.array([n], np.int32))
    ref = attention_reference(q, key[:n].transpose(1, 0, 2)[None], value[:n].transpose(1, 0, 2)[None], causal=True)
    check(got, ref, "float16")

    # A poisoned table is refused before any dispatch, as for an unsplit cache.
    for bad in (num_blocks, -1):
        poisoned = case.block_tables.copy()
        poisoned[1, 0] = bad
        with pytest.raises(ValueError, match="block_tables"):
            aule.flash_attention_paged(case.q, kc, vc, poisoned, case.context_lens)
    with pytest.raises(ValueError, match="slot_mapping"):
        aule.copy_kv_to_paged(key[:1], key[:1], kc, vc, np.array([num_blocks * bs], np.int32))

    # Only paged calls read split caches: dense attention and the one-buffer view refuse it.
    with pytest.raises(ValueError, match="split across 2 device buffers"):
        kc.buffer
    q_dense = aule.to_gpu(np.zeros((num_blocks, bs, 1, d), np.float16))
    with pytest.raises(aule.UnsupportedError, match="k is a paged KV cache split across 2 device buffers"):
        aule.flash_attention(q_dense, kc, vc, backend="vulkan")
    for t in (kc, vc, q_dense):
        t.free()


# --- many pieces: limits seen smaller than the device's --------------------------------------------

@pytest.fixture
def small_buffers(ctx, monkeypatch):
    """The context seen through a storage-buffer range of ``limit(block_bytes, pieces)``: a cache of
    that many blocks splits into ``pieces`` buffers. Returns the function that sets it."""
    real = ctx.info

    def limit(num_blocks: int, block_bytes: int, pieces: int):
        per = -(-num_blocks // pieces)
        monkeypatch.setattr(ctx, "info", dataclasses.replace(real, max_storage_buffer_range=per * block_bytes))
        from aule.backends.vulkan import plans

        split = plans.cache_split((num_blocks, 1, 1, block_bytes // 4), 4, ctx.info)
        assert split.pieces == pieces, (split, pieces)
        return split

    return limit


@pytest.mark.parametrize("q_len,window,heads,pieces", [(1, -1, (8, 2), 6), (4, -1, (4, 4), 3), (1, 24, (8, 1), 7),
                                                       (3, (40, 0), (8, 2), 2)])
def test_many_pieces_match_the_reference(ctx, small_buffers, q_len, window, heads, pieces):
    from test_paged import make_case

    rng = np.random.default_rng(q_len * 31 + pieces)
    # 700 keys split the context across workgroups (the split-K merge) as well as across buffers.
    case = make_case(rng, [1, 17, 40, 700], *heads, 64, 16, q_len, window_size=window)
    small_buffers(case.k_cache.shape[0], case.k_cache[0].nbytes, pieces)
    kc, vc = _gpu_cache(case, np.float32)
    assert len(kc.leases) == pieces
    np.testing.assert_array_equal(kc.numpy(), case.k_cache)   # the NaN of unused slots included
    out = aule.flash_attention_paged(case.q, kc, vc, case.block_tables, case.context_lens, window_size=window)
    check(out, paged_reference(case.q, case.ks, case.vs, window_size=window), "float32")
    gpu_out = aule.flash_attention_paged(aule.to_gpu(case.q), kc, vc, case.block_tables, case.context_lens,
                                         window_size=window)
    np.testing.assert_array_equal(gpu_out.numpy(), out)


def test_packed_rows_and_host_cache_over_pieces(ctx, small_buffers):
    from test_paged import make_case

    rng = np.random.default_rng(5)
    case = make_case(rng, [5, 33, 90], 8, 2, 32, 8, [2, 5, 1])
    small_buffers(case.k_cache.shape[0], case.k_cache[0].nbytes, 4)
    ref = paged_reference(case.q, case.ks, case.vs, case.query_start_loc)
    kc, vc = _gpu_cache(case, np.float32)
    out = aule.flash_attention_paged(case.q, kc, vc, case.block_tables, case.context_lens,
                                     query_start_loc=case.query_start_loc)
    check(out, ref, "float32")
    # Host caches past one binding are uploaded for the call in pieces too (when vulkan is forced).
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                     query_start_loc=case.query_start_loc, backend="vulkan")
    check(out, ref, "float32")


def test_paged_kv_cache_appends_forks_and_copies_across_pieces(ctx, small_buffers):
    bs, hk, d, blocks = 4, 2, 16, 30
    small_buffers(blocks, bs * hk * d * 4, 5)
    cache = aule.PagedKVCache(blocks, bs, hk, d, "float32", backend="vulkan")
    assert len(cache.k_cache.leases) == 5 and cache.k_cache.blocks_per_piece == 6
    rng = np.random.default_rng(7)
    # Sequences long enough that their blocks run through every piece.
    seqs = [cache.allocate() for _ in range(3)]
    rows = {}
    for n, s in zip((45, 30, 30), seqs):
        k = rng.standard_normal((n, hk, d)).astype(np.float32)
        v = rng.standard_normal((n, hk, d)).astype(np.float32)
        cache.append(s, k, v)
        rows[s] = (k, v)
    used = np.concatenate([cache.block_tables([s])[0] for s in seqs])
    assert {int(b) // 6 for b in used if b >= 0} == set(range(5))
    child = cache.fork(seqs[0])   # 45 tokens: a shared, partly filled last block
    k2 = rng.standard_normal((3, hk, d)).astype(np.float32)
    cache.append(child, k2, 2 * k2)   # copy-on-write of that block, within the split cache
    assert cache.block_tables([child])[0, 11] != cache.block_tables([seqs[0]])[0, 11]
    for s in seqs:
        np.testing.assert_array_equal(cache.gather(s)[0], rows[s][0].transpose(1, 0, 2))
    ck, cv = cache.gather(child)
    np.testing.assert_array_equal(ck, np.concatenate([rows[seqs[0]][0], k2]).transpose(1, 0, 2))
    np.testing.assert_array_equal(cv, np.concatenate([rows[seqs[0]][1], 2 * k2]).transpose(1, 0, 2))
    q = rng.standard_normal((4, 4, 1, d)).astype(np.float32)
    order = seqs + [child]
    out = cache.attention(q, order)
    for i, s in enumerate(order):
        gk, gv = cache.gather(s)
        check(out[i:i + 1], attention_reference(q[i:i + 1], gk[None], gv[None]), "float32")


def test_caches_that_cannot_be_bound_as_they_lie_are_refused(ctx, small_buffers):
    from aule.backends.vulkan import GpuTensor
    from test_paged import make_case

    rng = np.random.default_rng(9)
    case = make_case(rng, [20, 9], 4, 2, 16, 4, 1)
    small_buffers(case.k_cache.shape[0], case.k_cache[0].nbytes, 3)
    split, whole = GpuTensor.from_numpy(case.k_cache, paged=True), GpuTensor.from_numpy(case.v_cache)
    args = (case.block_tables, case.context_lens)
    with pytest.raises(aule.UnsupportedError, match="k_cache and v_cache must lie alike"):
        aule.flash_attention_paged(case.q, split, whole, *args, backend="vulkan")
    with pytest.raises(aule.UnsupportedError, match=r"single buffers of \d+ bytes, beyond .*paged=True"):
        aule.flash_attention_paged(case.q, whole, whole, *args, backend="vulkan")
    # A split cache read as q [batch = num_blocks, heads_q = block_size, q_len = heads_kv, head_dim].
    n = case.k_cache.shape[0]
    with pytest.raises(aule.UnsupportedError, match="q is a paged KV cache split"):
        aule.flash_attention_paged(split, split, split, np.zeros((n, 1), np.int32), np.full(n, 2, np.int32),
                                   backend="vulkan")
    with pytest.raises(ValueError, match="paged=True takes a cache"):
        GpuTensor.from_numpy(case.q[0], paged=True)
    # Host caches are uploaded for attention, but a write into an upload would be lost.
    rows = np.ones((1, 2, 16), np.float32)
    with pytest.raises(aule.UnsupportedError, match="written in place by the numpy backend"):
        aule.copy_kv_to_paged(rows, rows, case.k_cache, case.v_cache, np.array([0]), backend="vulkan")
    aule.copy_kv_to_paged(rows, rows, case.k_cache, case.v_cache, np.array([0]))
    assert (case.k_cache[0, 0] == 1).all()


# --- on a GPU: the cache of issue 14 ----------------------------------------------------------------

def test_gpu_b64_ctx32k_cache_past_one_allocation(ctx):
    """The cache that failed on the H200 (B64, ctx 32k, 8 KV heads, head_dim 128, float16, block 16:
    4 GiB per K or V, past its 4 GiB - 2 MiB allocation limit), allocated by PagedKVCache, written
    and attended at the boundaries of its pieces. GPU only: lavapipe's 2 GiB heap cannot hold it."""
    from aule.backends.vulkan import plans

    if ctx.info.is_cpu:
        pytest.skip(f"needs a GPU with 9 GiB free; the Vulkan device here is {ctx.info.name}")
    bs, hk, hq, d = 16, 8, 32, 128
    shape = (64 * 32768 // bs, bs, hk, d)
    split = plans.cache_split(shape, 2, ctx.info)
    if split.pieces == 1:
        pytest.skip(f"{ctx.info.name} holds a 4 GiB cache in one buffer")
    if ctx.info.device_local_bytes < 2 * 2**32 + 2**30:
        pytest.skip(f"{ctx.info.name} has {ctx.info.device_local_bytes >> 20} MiB of device memory, too little")
    cache = aule.PagedKVCache(*shape, "float16", backend="vulkan")
    kc, vc = cache.k_cache, cache.v_cache
    assert len(kc.leases) == split.pieces and kc.blocks_per_piece == split.blocks_per_piece
    rng = np.random.default_rng(14)
    # Three sequences on disjoint blocks at the pieces' edges: the first key tile of each (two blocks)
    # reads two pieces.
    b0, b1, last = split.blocks(0)[1] - 1, split.blocks(1)[0], shape[0] - 1
    tables = [[b0, b1, 0], [last, b0 - 1], [b1 + 1, last - 1]]
    lens = [3 * bs - 7, 2 * bs, 2 * bs - 1]
    ks, vs = [], []
    for ids, n in zip(tables, lens):
        slots = np.array([ids[j // bs] * bs + j % bs for j in range(n)], np.int32)
        k = rng.standard_normal((n, hk, d)).astype(np.float16)
        v = rng.standard_normal((n, hk, d)).astype(np.float16)
        aule.copy_kv_to_paged(k, v, kc, vc, slots)
        ks.append(k.transpose(1, 0, 2))
        vs.append(v.transpose(1, 0, 2))
    block_tables = np.full((3, 3), 10 ** 6, np.int32)
    for b, ids in enumerate(tables):
        block_tables[b, :len(ids)] = ids
    q = rng.standard_normal((3, hq, 1, d)).astype(np.float16)
    out = aule.flash_attention_paged(q, kc, vc, block_tables, np.array(lens, np.int32))
    check(out, paged_reference(q, ks, vs), "float16")

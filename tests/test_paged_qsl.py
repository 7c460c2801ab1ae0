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

import aule
from aule import api
from test_paged import TOL, check, make_case, reference_paged

# One batch of every kind: decode (1), chunked prefill (17), speculative verification (4), a
# sequence without rows (0), a decode row at the very start of a context (1 of 1).
LENS = [40, 61, 23, 9, 1]
NS = [1, 17, 4, 0, 1]


def _case(seed, lens=LENS, ns=NS, heads=(8, 2), head_dim=64, block_size=8, dtype=np.float32, window=-1):
    return make_case(np.random.default_rng(seed), list(lens), *heads, head_dim, block_size, ns if isinstance(ns, int) else list(ns), dtype,
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

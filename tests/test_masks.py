import numpy as np
import pytest

from aule import masks


def brute(seq_q, seq_k, left, right):
    m = np.zeros((seq_q, seq_k), bool)
    for i in range(seq_q):
        pos = i + seq_k - seq_q
        for j in range(seq_k):
            m[i, j] = (left < 0 or j >= pos - left) and (right < 0 or j <= pos + right)
    return m


@pytest.mark.parametrize("causal,window,expected", [
    (False, -1, (-1, -1)), (False, None, (-1, -1)), (True, -1, (-1, 0)),
    (False, 1, (0, 0)), (True, 256, (255, 0)), (False, 4, (3, 0)),
    (False, (3, 2), (3, 2)), (True, (3, 2), (3, 0)), (False, (-1, 5), (-1, 5)), (False, (0, 0), (0, 0)),
])
def test_canonical_window(causal, window, expected):
    assert masks.canonical_window(causal, window) == expected


def test_int_window_is_w_keys_ending_at_own_position():
    m = masks.mask(10, 10, *masks.canonical_window(False, 3))
    assert m.sum(axis=1).tolist() == [1, 2] + [3] * 8
    assert m[5].nonzero()[0].tolist() == [3, 4, 5]


def test_bottom_right_causal_alignment():
    # seq_q < seq_k: the last query sees every key (KV-cache decode).
    m = masks.mask(3, 7, *masks.canonical_window(True, -1))
    assert m.sum(axis=1).tolist() == [5, 6, 7]
    # seq_q > seq_k: the first seq_q - seq_k rows see no key.
    m = masks.mask(7, 3, *masks.canonical_window(True, -1))
    assert m.sum(axis=1).tolist() == [0, 0, 0, 0, 1, 2, 3]


@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (1, 97), (97, 113), (113, 97), (64, 64), (5, 300)])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (7, 0), (0, 0), (5, 3), (-1, 4), (20, -1)])
def test_mask_matches_brute_force(seq_q, seq_k, left, right):
    assert (masks.mask(seq_q, seq_k, left, right) == brute(seq_q, seq_k, left, right)).all()


@pytest.mark.parametrize("seq_q,seq_k", [(97, 113), (113, 97), (256, 256), (10, 500)])
@pytest.mark.parametrize("left,right", [(-1, -1), (-1, 0), (7, 0), (5, 3), (40, -1)])
@pytest.mark.parametrize("bq,bk", [(16, 16), (32, 64), (7, 13)])
def test_key_range_and_full_tiles(seq_q, seq_k, left, right, bq, bk):
    full = brute(seq_q, seq_k, left, right)
    for q0 in range(0, seq_q, bq):
        q1 = min(seq_q, q0 + bq)
        lo, hi = masks.key_range(q0, q1, seq_q, seq_k, left, right)
        cols = full[q0:q1].any(axis=0).nonzero()[0]
        if cols.size == 0:
            assert lo >= hi or not full[q0:q1, max(lo, 0):max(hi, 0)].any()
            continue
        # The range covers every visible key, and is tight.
        assert lo == cols.min() and hi == cols.max() + 1
        for k0 in range(0, seq_k, bk):
            k1 = min(seq_k, k0 + bk)
            if masks.tile_fully_visible(q0, q1, k0, k1, seq_q, seq_k, left, right):
                assert full[q0:q1, k0:k1].all()


@pytest.mark.parametrize("bad,exc", [
    (0, ValueError), (-2, ValueError), ((1, 2, 3), ValueError), ((-2, 0), ValueError),
    ((0, -5), ValueError), ("4", TypeError), ((1.5, 0), TypeError), (2.0, TypeError),
])
def test_bad_window(bad, exc):
    with pytest.raises(exc, match="window_size"):
        masks.canonical_window(False, bad)


def test_causal_must_be_bool():
    with pytest.raises(TypeError, match="causal"):
        masks.canonical_window("yes", -1)

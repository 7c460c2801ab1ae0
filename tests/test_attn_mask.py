"""attn_mask (SDPA's convention): bool (True = may attend) or additive float, broadcastable to
[batch, heads_q, seq_q, seq_k], applied together with causal and the window."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import masks
from aule.backends.numpy import attention_numpy
from aule.call import canonicalize
from aule.reference import attention_reference
from attn_util import FEATURE_SHAPE, assert_routed_to_numpy, random_qkv


def _naive(q, k, v, scale, allowed, bias, left, right):
    """The definition written out on one head, float64: a key is seen where the window and the mask
    both allow it; the bias is added to the scores of the keys seen."""
    vis = masks.mask(q.shape[0], k.shape[0], left, right) & allowed
    s = np.where(vis, (q @ k.T) * scale + bias, -np.inf)
    m = s.max(-1, keepdims=True)
    p = np.exp(s - np.where(np.isfinite(m), m, 0))
    with np.errstate(invalid="ignore"):
        out = (p @ v) / p.sum(-1, keepdims=True)
    return np.where(vis.any(-1, keepdims=True), out, 0.0)


def test_reference_follows_the_definition():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 3, n, 16)) for n in (7, 11, 11))
    allowed = rng.random((2, 1, 7, 11)) > 0.4
    allowed[0, 0, 6] = False  # a row the mask hides entirely: zeros
    bias = rng.standard_normal((3, 1, 11))
    got_bool = attention_reference(q, k, v, causal=True, scale=0.5, attn_mask=allowed)
    got_bias = attention_reference(q, k, v, causal=True, scale=0.5, attn_mask=bias)
    for b in range(2):
        for h in range(3):
            want = _naive(q[b, h], k[b, h], v[b, h], 0.5, allowed[b, 0], 0.0, -1, 0)
            assert np.abs(got_bool[b, h] - want).max() < 1e-12
            want = _naive(q[b, h], k[b, h], v[b, h], 0.5, True, bias[h], -1, 0)
            assert np.abs(got_bias[b, h] - want).max() < 1e-12
    assert (got_bool[0, :, 6] == 0).all()


def _masks(rng, b, hq, sq, sk, kind):
    if kind == "bool":  # general, per batch and head
        return rng.random((b, hq, sq, sk)) > 0.3
    if kind == "bool-2d":  # [seq_q, seq_k], shared by every batch element and head
        return rng.random((sq, sk)) > 0.5
    if kind == "float":  # an additive bias per head, with some -inf entries
        m = rng.standard_normal((1, hq, sq, sk)).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        return m
    if kind == "float-keys":  # a float mask broadcast along seq_q that is not only 0 and -inf
        return rng.standard_normal((b, 1, 1, sk)).astype(np.float32)
    if kind == "padding-prefix":  # each batch element's keys end at its own length (0: no key at all)
        lens = rng.integers(1, sk, b)
        lens[1:] = [sk, 0][:b - 1]
        return np.arange(sk)[None, None, None, :] < lens[:, None, None, None]
    if kind == "padding-heads":  # per (batch, head) key vectors with holes, as 0 / -inf floats
        keep = rng.random((b, hq, 1, sk)) > 0.4
        return np.where(keep, 0.0, -np.inf).astype(np.float32)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bool", "bool-2d", "float", "float-keys", "padding-prefix", "padding-heads"])
@pytest.mark.parametrize("shape,causal,window", [((2, 4, 2, 37, 53, 40), True, -1),
                                                 ((1, 2, 2, 97, 45, 64), False, (10, 3)),
                                                 ((3, 8, 1, 1, 700, 32), True, -1),
                                                 ((2, 4, 2, 97, 7, 80), True, -1)])
def test_numpy_backend_matches_reference(kind, shape, causal, window):
    b, hq, hk, sq, sk, d = shape
    rng = np.random.default_rng(1)
    q, k, v = random_qkv(rng, b, hq, hk, sq, sk, d)
    m = _masks(rng, b, hq, sq, sk, kind)
    out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, attn_mask=m, backend="numpy",
                                    return_lse=True)
    want, want_lse = attention_reference(q, k, v, causal=causal, window_size=window, attn_mask=m, return_lse=True)
    assert np.abs(out - want).max() < 2e-5
    assert (np.isneginf(lse) == np.isneginf(want_lse)).all()
    seen = np.isfinite(want_lse)
    assert np.abs(lse[seen] - want_lse[seen]).max() < 2e-5
    assert np.abs(attention_reference(q, k, v, causal=causal, window_size=window) - want).max() > 1e-2


def test_padding_masks_are_recognised_and_held_as_keys():
    q = np.zeros((2, 4, 5, 8), np.float32)
    k = np.zeros((2, 2, 9, 8), np.float32)
    lens = np.array([9, 4])
    prefix = np.arange(9)[None, None, None, :] < lens[:, None, None, None]  # [2, 1, 1, 9]
    held = canonicalize(q, k, k, attn_mask=prefix).mask
    assert held.padding and held.values is None and held.key_lengths.tolist() == [[9], [4]]
    # Repeated along seq_q it is still padding; -inf/0 floats are the same mask.
    rows = np.broadcast_to(prefix, (2, 1, 5, 9)).copy()
    for m in (rows, np.where(rows, 0.0, -np.inf).astype(np.float16)):
        held = canonicalize(q, k, k, attn_mask=m).mask
        assert held.padding and held.key_lengths.tolist() == [[9], [4]]
    holes = prefix.copy()
    holes[0, 0, 0, 3] = False
    held = canonicalize(q, k, k, attn_mask=holes).mask
    assert held.padding and held.key_lengths is None and held.keys[0, 0].tolist() == holes[0, 0, 0].tolist()
    varies = rows.copy()
    varies[1, 0, 2, 0] = False
    held = canonicalize(q, k, k, attn_mask=varies).mask
    assert not held.padding and held.values.shape == (2, 1, 5, 9)
    assert not canonicalize(q, k, k, attn_mask=np.zeros((9,), np.float32) + 0.5).mask.padding


def test_padding_tiles_are_never_computed(monkeypatch):
    """Keys no row sees, in whole tiles, are never read: NaN there cannot reach the output (it would
    through P.V in a computed tile), and no block of the mask is ever built with more than one row."""
    rng = np.random.default_rng(2)
    q, k, v = random_qkv(rng, 2, 4, 2, 29, 91, 16)
    lens = np.array([26, 70])
    m = np.arange(91)[None, None, None, :] < lens[:, None, None, None]
    m[1, :, :, 13:30] = False  # a hole inside the second sequence: one whole tile and a part of the next
    # NaN in every key of the tiles (13 keys from 0) that no row sees.
    for bi, hidden in enumerate((slice(26, None), slice(78, None))):
        k[bi, :, hidden], v[bi, :, hidden] = np.nan, np.nan
    k[1, :, 13:26], v[1, :, 13:26] = np.nan, np.nan
    blocks = []
    real = masks.AttnMask.block

    def spy(self, *args):
        tile = real(self, *args)
        blocks.append(tile.shape)
        return tile

    monkeypatch.setattr(masks.AttnMask, "block", spy)
    call = canonicalize(q, k, v, causal=False, attn_mask=m)
    out, _ = attention_numpy(q, k, v, call.scale, -1, -1, block_q=7, block_k=13, mask=call.mask)
    clean_k, clean_v = (np.nan_to_num(x, nan=0.0) for x in (k, v))
    want = attention_reference(q, clean_k, clean_v, causal=False, attn_mask=m)
    assert np.isfinite(out).all() and np.abs(out - want).max() < 2e-5
    # Only the tile the hole ends in needs its keys masked, one row for all.
    assert blocks and all(shape[1] == 1 for shape in blocks)


def test_rows_the_mask_hides_and_the_numeric_rule():
    q = np.ones((1, 2, 4, 8), np.float32)
    k = np.ones((1, 2, 6, 8), np.float32)
    q[0, 0, 1, 0] = np.inf   # +inf scores, but the mask hides every key of this row: zeros
    q[0, 1, 2, 0] = np.inf   # +inf scores on keys it sees: NaN, LSE +inf
    bias = np.zeros((2, 4, 6), np.float32)
    bias[0, 1] = -np.inf     # -inf entries hide their keys, +inf scores included
    bias[0, 0, 1] = np.nan   # a NaN entry on a key the row sees: NaN, LSE NaN
    bias[1, 0, 5] = np.nan   # a NaN entry on a key the window hides: no effect
    sinks = np.array([0.5, -1.0], np.float32)
    ref = attention_reference(q, k, k, causal=True, attn_mask=bias, return_lse=True)
    got = aule.flash_attention(q, k, k, causal=True, attn_mask=bias, return_lse=True, backend="numpy")
    bool_mask = ~np.isneginf(bias)
    got_bool = aule.flash_attention(q, k, k, causal=True, attn_mask=bool_mask, return_lse=True, backend="numpy")
    for out, lse in (ref, got, got_bool):
        assert (out[0, 0, 1] == 0).all() and lse[0, 0, 1] == -np.inf
        assert np.isnan(out[0, 1, 2]).all() and lse[0, 1, 2] == np.inf
        assert np.isfinite(out[0, 1, 0]).all()
    for out, lse in (ref, got):
        assert np.isnan(out[0, 0, 0]).all() and np.isnan(lse[0, 0, 0])
    out, lse = aule.flash_attention(q, k, k, causal=True, attn_mask=bias, sinks=sinks, return_lse=True)
    assert (out[0, 0, 1] == 0).all() and lse[0, 0, 1] == np.float32(0.5)


def test_torch_masks_and_inputs():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = random_qkv(rng, 2, 4, 2, 11, 13, 16)
    allowed = rng.random((2, 1, 11, 13)) > 0.3
    bias = rng.standard_normal((4, 11, 13)).astype(np.float32)
    t = [torch.from_numpy(x) for x in (q, k, v)]
    got = aule.flash_attention(*t, attn_mask=torch.from_numpy(allowed))
    assert isinstance(got, torch.Tensor)
    assert np.abs(got.numpy() - attention_reference(q, k, v, attn_mask=allowed)).max() < 2e-5
    half = torch.from_numpy(bias).bfloat16()
    got = aule.flash_attention(*t, attn_mask=half)
    assert np.abs(got.numpy() - attention_reference(q, k, v, attn_mask=half.float().numpy())).max() < 2e-5
    with pytest.raises(aule.UnsupportedError, match="attn_mask requires grad"):
        aule.flash_attention(*t, attn_mask=torch.from_numpy(bias).requires_grad_())


def test_empty_calls_with_a_mask():
    q = np.ones((1, 2, 3, 8), np.float32)
    k = np.ones((1, 2, 0, 8), np.float32)
    out, lse = aule.flash_attention(q, k, k, attn_mask=np.ones((3, 0), bool), return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_masks_route_to_a_backend_that_applies_them():
    # Every backend applies both kinds (Vulkan: test_vulkan_masks); auto routing serves them.
    sq = sk = FEATURE_SHAPE[2]
    assert_routed_to_numpy("mask", (), attn_mask=np.random.default_rng(4).random((sq, sk)) > 0.5)
    assert_routed_to_numpy("mask", (), attn_mask=np.arange(sk) < 5)


@pytest.mark.parametrize("bad,err,match", [
    (np.ones((4, 5), bool), ValueError, r"attn_mask of shape \(4, 5\) is not broadcastable to \[batch, heads_q, "
                                        r"seq_q, seq_k\] = \[1, 2, 4, 6\]"),
    (np.ones((3, 1, 1), bool), ValueError, "attn_mask of shape .* is not broadcastable"),
    (np.ones((1, 1, 1, 4, 6), bool), ValueError, "at most 4"),
    (np.ones((4, 6), np.int32), TypeError, r"attn_mask must be bool \(True = may attend\) or float"),
    ([[True] * 6] * 4, TypeError, "attn_mask must be a NumPy array or torch tensor"),
])
def test_bad_masks_are_refused_by_name(bad, err, match):
    q = np.zeros((1, 2, 4, 8), np.float32)
    k = np.zeros((1, 1, 6, 8), np.float32)
    with pytest.raises(err, match=match):
        aule.flash_attention(q, k, k, attn_mask=bad)

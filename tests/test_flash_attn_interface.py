"""aule.flash_attn against the float64 reference, in flash-attn's layout and defaults."""
from __future__ import annotations

import numpy as np
import pytest

import aule
import aule.flash_attn as fa
from aule.reference import attention_reference


def _bshd(rng, b, s, h, d):
    return rng.standard_normal((b, s, h, d)).astype(np.float32)


def _ref(q, k, v, **kw):
    out, lse = attention_reference(*(np.swapaxes(x, 1, 2) for x in (q, k, v)), return_lse=True, **kw)
    return np.swapaxes(out, 1, 2), lse


@pytest.mark.parametrize("causal,window", [(False, (-1, -1)), (True, (-1, -1)), (False, (5, 3)), (True, (7, 0))])
def test_func_matches_reference_in_flash_attn_layout(causal, window):
    rng = np.random.default_rng(0)
    q, k, v = _bshd(rng, 2, 13, 4, 32), _bshd(rng, 2, 21, 2, 32), _bshd(rng, 2, 21, 2, 32)
    out, lse, probs = fa.flash_attn_func(q, k, v, softmax_scale=0.3, causal=causal, window_size=window,
                                         return_attn_probs=True)
    want, want_lse = _ref(q, k, v, causal=causal, scale=0.3, window_size=window)
    assert out.shape == q.shape and out.flags["C_CONTIGUOUS"] and probs is None
    assert np.abs(out - want).max() < 2e-5
    seen = np.isfinite(want_lse)
    assert np.abs(lse[seen] - want_lse[seen]).max() < 2e-5 and np.isneginf(lse[~seen]).all()


def test_default_is_not_causal():
    rng = np.random.default_rng(1)
    q, k, v = (_bshd(rng, 1, 9, 2, 16) for _ in range(3))
    want, _ = _ref(q, k, v, causal=False)
    assert np.abs(fa.flash_attn_func(q, k, v) - want).max() < 2e-5


def test_packed_forms():
    rng = np.random.default_rng(2)
    qkv = rng.standard_normal((2, 11, 3, 4, 16)).astype(np.float32)
    want, _ = _ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert np.abs(fa.flash_attn_qkvpacked_func(qkv, causal=True) - want).max() < 2e-5
    q, kv = _bshd(rng, 2, 5, 4, 16), rng.standard_normal((2, 17, 2, 2, 16)).astype(np.float32)
    want, _ = _ref(q, kv[:, :, 0], kv[:, :, 1], causal=True)
    assert np.abs(fa.flash_attn_kvpacked_func(q, kv, causal=True) - want).max() < 2e-5


def test_torch_tensors_come_back_as_contiguous_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = (torch.from_numpy(_bshd(rng, 1, 8, 2, 16)) for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    want, _ = _ref(q.numpy(), k.numpy(), v.numpy(), causal=True)
    assert isinstance(out, torch.Tensor) and out.is_contiguous() and (out.numpy() - want).__abs__().max() < 2e-5


@pytest.mark.parametrize("kw,match", [
    ({"dropout_p": 0.1}, "dropout_p=0.1"), ({"dropout_p": 1.5}, "dropout_p must be"),
    ({"alibi_slopes": np.ones(3, np.float32)}, "alibi_slopes must have shape"), ({"softcap": -1.0}, "softcap must be"),
    ({"window_size": 4}, "window_size must be a \\(left, right\\) pair"),
])
def test_unserved_arguments_are_refused_by_name(kw, match):
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises((ValueError, aule.UnsupportedError), match=match):
        fa.flash_attn_func(q, q, q, **kw)


def test_layout_errors_name_the_argument():
    with pytest.raises(ValueError, match="q must be 4-D \\[batch, seqlen, heads, head_dim\\]"):
        fa.flash_attn_func(np.zeros((4, 2, 8), np.float32), np.zeros((1, 4, 2, 8)), np.zeros((1, 4, 2, 8)))
    with pytest.raises(ValueError, match="qkv must be 5-D"):
        fa.flash_attn_qkvpacked_func(np.zeros((1, 4, 2, 2, 8), np.float32))


def _decode_reference(q, ks, vs, causal, window=(-1, -1)):
    """Per sequence: q rows are the last positions of its keys (flash-attn's bottom-right)."""
    outs = [_ref(q[b:b + 1], ks[b][None], vs[b][None], causal=causal, window_size=window)[0][0]
            for b in range(q.shape[0])]
    return np.stack(outs)


@pytest.mark.parametrize("s_q,causal", [(1, False), (3, True)])
def test_with_kvcache_contiguous_appends_in_place_and_attends(s_q, causal):
    rng = np.random.default_rng(4)
    lens = np.array([5, 0, 9], np.int32)
    kc, vc = _bshd(rng, 3, 16, 2, 16), _bshd(rng, 3, 16, 2, 16)
    k_new, v_new = _bshd(rng, 3, 2, 2, 16), _bshd(rng, 3, 2, 2, 16)
    q = _bshd(rng, 3, s_q, 4, 16)
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, causal=causal,
                                          return_softmax_lse=True)
    for b, n in enumerate(lens):
        assert (kc[b, n:n + 2] == k_new[b]).all() and (vc[b, n:n + 2] == v_new[b]).all()
    want = _decode_reference(q, [kc[b, :n + 2] for b, n in enumerate(lens)],
                             [vc[b, :n + 2] for b, n in enumerate(lens)], causal)
    assert out.shape == q.shape and lse.shape == (3, 4, s_q) and np.abs(out - want).max() < 2e-5


def test_with_kvcache_paged_appends_through_the_block_table():
    rng = np.random.default_rng(5)
    bs, hk, d = 4, 2, 16
    lens = np.array([6, 1], np.int32)
    kc, vc = (rng.standard_normal((8, bs, hk, d)).astype(np.float32) for _ in range(2))
    table = np.array([[5, 2, 7], [0, 3, 1]], np.int32)
    k_new, v_new = _bshd(rng, 2, 3, hk, d), _bshd(rng, 2, 3, hk, d)
    q = _bshd(rng, 2, 3, 4, d)
    out = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, block_table=table, causal=True,
                                     window_size=(4, 0))

    def seq(cache, b, n):
        return np.concatenate([cache[blk] for blk in table[b]])[:n]

    for b, n in enumerate(lens):
        assert (seq(kc, b, n + 3)[n:] == k_new[b]).all() and (seq(vc, b, n + 3)[n:] == v_new[b]).all()
    want = _decode_reference(q, [seq(kc, b, n + 3) for b, n in enumerate(lens)],
                             [seq(vc, b, n + 3) for b, n in enumerate(lens)], True, (4, 0))
    assert np.abs(out - want).max() < 2e-5


def test_with_kvcache_refuses_what_it_does_not_serve_by_name():
    q = np.zeros((1, 2, 2, 8), np.float32)
    kc = np.zeros((4, 4, 2, 8), np.float32)
    table = np.zeros((1, 4), np.int32)
    with pytest.raises(aule.UnsupportedError, match="causal=False with several query rows"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=3, block_table=table)
    with pytest.raises(aule.UnsupportedError, match="rotary_cos"):
        fa.flash_attn_with_kvcache(q, kc, kc, cache_seqlens=3, rotary_cos=np.zeros(4))
    with pytest.raises(ValueError, match="cache_seqlens is required"):
        fa.flash_attn_with_kvcache(q, kc, kc)
    with pytest.raises(ValueError, match="k and v must be given together"):
        fa.flash_attn_with_kvcache(q, kc, kc, k=q, cache_seqlens=1)


def test_with_kvcache_refuses_a_cache_too_small_for_the_new_tokens():
    q = np.zeros((1, 1, 2, 8), np.float32)
    kc = np.zeros((1, 4, 2, 8), np.float32)
    new = np.zeros((1, 2, 2, 8), np.float32)
    with pytest.raises(ValueError, match="room for cache_seqlens \\+ new tokens"):
        fa.flash_attn_with_kvcache(q, kc, kc, new, new, cache_seqlens=3)
    with pytest.raises(ValueError, match="block_table must be \\[1, max_blocks\\] with room"):
        fa.flash_attn_with_kvcache(q, kc, kc, new, new, cache_seqlens=3, block_table=np.zeros((1, 1), np.int32),
                                   causal=True)


def test_softcap_passes_through():
    rng = np.random.default_rng(6)
    q, k, v = (3 * _bshd(rng, 1, 10, 2, 16) for _ in range(3))
    want, _ = _ref(q, k, v, causal=True, softcap=2.0)
    assert np.abs(fa.flash_attn_func(q, k, v, causal=True, softcap=2.0) - want).max() < 2e-5


def test_alibi_passes_through_and_per_sequence_in_the_cache_path():
    rng = np.random.default_rng(7)
    q, k, v = _bshd(rng, 2, 6, 4, 16), _bshd(rng, 2, 9, 2, 16), _bshd(rng, 2, 9, 2, 16)
    slopes = rng.uniform(0.1, 1.0, (2, 4)).astype(np.float32)
    want, _ = _ref(q, k, v, causal=True, alibi_slopes=slopes)
    assert np.abs(fa.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes) - want).max() < 2e-5
    out = fa.flash_attn_with_kvcache(q, k.copy(), v.copy(), cache_seqlens=9, causal=True, alibi_slopes=slopes)
    assert np.abs(out - want).max() < 2e-5

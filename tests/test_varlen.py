"""flash_attention_varlen and flash_attn_varlen_func: packed sequences, each attended alone."""
from __future__ import annotations

import numpy as np
import pytest

import aule
import aule.flash_attn as fa
from aule import backends
from aule.reference import attention_reference
from attn_util import count_calls


def _packed(rng, lens_q, lens_k, hq, hk, d, dtype=np.float32):
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = rng.standard_normal((cu_q[-1], hq, d)).astype(dtype)
    k = rng.standard_normal((cu_k[-1], hk, d)).astype(dtype)
    v = rng.standard_normal((cu_k[-1], hk, d)).astype(dtype)
    return q, k, v, cu_q, cu_k


def _reference(q, k, v, cu_q, cu_k, alibi_slopes=None, **kw):
    """Float64 reference, one sequence at a time: out [total_q, Hq, D], LSE [Hq, total_q]."""
    out = np.zeros(q.shape)
    lse = np.zeros((q.shape[1], q.shape[0]))
    for i in range(len(cu_q) - 1):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        slopes = None if alibi_slopes is None else (alibi_slopes if alibi_slopes.ndim == 1 else alibi_slopes[i:i + 1])
        o, l = attention_reference(*(x.transpose(1, 0, 2)[None] for x in (q[a:b], k[c:e], v[c:e])), return_lse=True,
                                   alibi_slopes=slopes, **kw)
        out[a:b], lse[:, a:b] = o[0].transpose(1, 0, 2), l[0]
    return out, lse


def _close(got, want, tol=2e-5):
    (out, lse), (w_out, w_lse) = got, want
    assert out.shape == w_out.shape and lse.shape == w_lse.shape
    assert np.abs(out - w_out).max() < tol
    assert (np.isneginf(lse) == np.isneginf(w_lse)).all()
    seen = np.isfinite(w_lse)
    assert np.abs(lse[seen] - w_lse[seen]).max() < tol


LENGTHS = [([1, 7, 0, 97, 3], [1, 9, 4, 113, 0]),   # an empty query, a sequence with no keys
           ([13, 40], [13, 40])]


@pytest.mark.parametrize("lens", LENGTHS)
@pytest.mark.parametrize("heads,d", [((4, 2), 80), ((2, 2), 64), ((8, 1), 32)])
@pytest.mark.parametrize("causal,window", [(False, -1), (True, -1), (True, 5), (False, (6, 2))])
def test_matches_reference_per_sequence(lens, heads, d, causal, window):
    rng = np.random.default_rng(0)
    q, k, v, cu_q, cu_k = _packed(rng, *lens, *heads, d)
    got = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens[0]), max(lens[1]), causal=causal,
                                      window_size=window, return_lse=True)
    assert got[0].dtype == q.dtype and got[0].flags["C_CONTIGUOUS"] and got[1].dtype == np.float32
    _close(got, _reference(q, k, v, cu_q, cu_k, causal=causal, window_size=window))


@pytest.mark.parametrize("per_batch", [False, True])
def test_features_per_sequence(per_batch):
    rng = np.random.default_rng(1)
    lens_q, lens_k = [5, 1, 29], [11, 6, 29]
    q, k, v, cu_q, cu_k = _packed(rng, lens_q, lens_k, 4, 2, 16)
    slopes = rng.uniform(0.05, 0.5, (3, 4) if per_batch else (4,)).astype(np.float32)
    sinks = rng.standard_normal(4).astype(np.float32)
    kw = dict(causal=True, scale=0.3, softcap=3.0, alibi_slopes=slopes)
    got = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 29, 29, return_lse=True, sinks=sinks, **kw)
    want = _reference(q, k, v, cu_q, cu_k, sinks=sinks, **kw)
    _close(got, want)
    assert np.abs(_reference(q, k, v, cu_q, cu_k, causal=True, scale=0.3)[0] - want[0]).max() > 1e-2


def test_each_sequence_alone_and_no_compute_on_padding(monkeypatch):
    rng = np.random.default_rng(2)
    q, k, v, cu_q, cu_k = _packed(rng, [3, 0, 8], [5, 2, 8], 2, 1, 16)
    calls = count_calls(monkeypatch, "aule.routing", "attend")
    out = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 8, 8)
    # One dense call per sequence with query rows, of exactly its own lengths.
    assert [(c[0].seq_q, c[0].seq_k) for c in calls] == [(3, 5), (8, 8)]
    k2, v2 = k.copy(), v.copy()
    k2[5:], v2[5:] = np.nan, np.nan  # every key but the first sequence's
    again = aule.flash_attention_varlen(q, k2, v2, cu_q, cu_k, 8, 8)
    assert np.array_equal(again[:3], out[:3]) and np.isnan(again[3:]).all()


def test_pieces_take_the_normal_route():
    rng = np.random.default_rng(3)
    q, k, v, cu_q, cu_k = _packed(rng, [4, 9], [4, 9], 2, 2, 16)
    sinks = np.array([0.5, 1.0], np.float32)
    if backends.get("vulkan").available:
        got = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True, return_lse=True, backend="vulkan")
        _close(got, _reference(q, k, v, cu_q, cu_k, causal=True), tol=1e-4)
        got = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 9, 9, causal=True, sinks=sinks, return_lse=True,
                                          backend="vulkan")
        _close(got, _reference(q, k, v, cu_q, cu_k, causal=True, sinks=sinks), tol=1e-4)
        dense = [x[None].transpose(0, 2, 1, 3) for x in (q, k, v)]   # [1, H, total, D]
        tril = np.tril(np.ones((13, 13), bool))   # a general mask: Vulkan applies it too
        got = aule.flash_attention(*dense, attn_mask=tril, backend="vulkan")
        assert np.abs(got - attention_reference(*dense, attn_mask=tril)).max() < 1e-4
    with pytest.raises(ValueError, match="backend"):
        aule.flash_attention_varlen(q[:0], k[:0], v[:0], [0], [0], 0, 0, backend="no-such-backend")


def test_no_query_rows_at_all():
    q = np.zeros((0, 4, 8), np.float32)
    k = np.ones((5, 2, 8), np.float32)
    out, lse = aule.flash_attention_varlen(q, k, k, np.array([0, 0, 0]), np.array([0, 2, 5]), 0, 3, return_lse=True)
    assert out.shape == (0, 4, 8) and lse.shape == (4, 0)


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    q, k, v, cu_q, cu_k = _packed(rng, [2, 11], [7, 11], 4, 2, 16)
    t = [torch.from_numpy(x) for x in (q, k, v)]
    out, lse = aule.flash_attention_varlen(*t, torch.from_numpy(cu_q), torch.from_numpy(cu_k), 11, 11, causal=True,
                                           return_lse=True)
    assert isinstance(out, torch.Tensor) and out.is_contiguous() and lse.dtype == torch.float32
    _close((out.numpy(), lse.numpy()), _reference(q, k, v, cu_q, cu_k, causal=True))


def test_flash_attn_varlen_func():
    rng = np.random.default_rng(5)
    q, k, v, cu_q, cu_k = _packed(rng, [6, 1, 17], [9, 4, 17], 4, 2, 32)
    out, lse, probs = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17, softmax_scale=0.2, causal=True,
                                                window_size=(8, 0), return_attn_probs=True)
    assert probs is None
    _close((out, lse), _reference(q, k, v, cu_q, cu_k, causal=True, scale=0.2, window_size=(8, 0)))
    plain = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 17, 17)  # flash-attn's default: not causal
    assert np.abs(plain - _reference(q, k, v, cu_q, cu_k, causal=False)[0]).max() < 2e-5


@pytest.mark.parametrize("kw,err,match", [
    ({"dropout_p": 0.1}, aule.UnsupportedError, "dropout_p=0.1"),
    ({"block_table": np.zeros((2, 1), np.int32)}, aule.UnsupportedError, "block_table"),
    ({"window_size": 4}, ValueError, r"window_size must be a \(left, right\) pair"),
])
def test_flash_attn_varlen_func_refuses_by_name(kw, err, match):
    q, k, v, cu_q, cu_k = _packed(np.random.default_rng(6), [2, 3], [2, 3], 2, 2, 8)
    with pytest.raises(err, match=match):
        fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3, **kw)


@pytest.mark.parametrize("change,err,match", [
    (dict(cu_seqlens_q=[1, 2, 5]), ValueError, r"cu_seqlens_q must start at 0, got cu_seqlens_q\[0\] = 1"),
    (dict(cu_seqlens_k=[0, 4, 3, 5]), ValueError, r"cu_seqlens_k must be non-decreasing, got cu_seqlens_k\[2\] = 3 "
                                                  r"< cu_seqlens_k\[1\] = 4"),
    (dict(cu_seqlens_q=[0, 2, 4]), ValueError, r"cu_seqlens_q must end at total_q \(q.shape\[0\]\) = 5, got "
                                               r"cu_seqlens_q\[-1\] = 4"),
    (dict(cu_seqlens_k=[0, 5], max_seqlen_k=5), ValueError, "cu_seqlens_q and cu_seqlens_k must describe one batch, got 2 and 1"),
    (dict(max_seqlen_q=2), ValueError, r"max_seqlen_q = 2 is smaller than sequence 1's length 3"),
    (dict(max_seqlen_k=-1), ValueError, "max_seqlen_k must be a non-negative int"),
    (dict(max_seqlen_k=3.0), ValueError, "max_seqlen_k must be a non-negative int"),
    (dict(cu_seqlens_q=np.array([0.0, 2.0, 5.0])), TypeError, "cu_seqlens_q must hold integers"),
    (dict(cu_seqlens_q=np.zeros((1, 3), np.int32)), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=np.zeros(0, np.int32)), ValueError, "cu_seqlens_q must hold batch \\+ 1 >= 1 offsets"),
    (dict(q=np.zeros((1, 5, 4, 8), np.float32)), ValueError, r"q must be 3-D \[total_q, heads, head_dim\]"),
    (dict(q=np.zeros((5, 3, 8), np.float32)), ValueError, r"heads_q \(3\) must be a multiple of heads_kv \(2\)"),
    (dict(v=np.zeros((5, 2, 4), np.float32)), ValueError, "k and v must have the same"),
    (dict(q=np.zeros((5, 4, 4), np.float32)), ValueError, "head_dim differs"),
    (dict(alibi_slopes=np.ones((3, 4), np.float32)), ValueError, r"alibi_slopes must have shape .*\[2, 4\]"),
    (dict(window_size=0), ValueError, "window_size must be"),
])
def test_bad_arguments_are_refused_by_name(change, err, match):
    args = dict(q=np.zeros((5, 4, 8), np.float32), k=np.zeros((5, 2, 8), np.float32), v=np.zeros((5, 2, 8), np.float32),
                cu_seqlens_q=np.array([0, 2, 5], np.int32), cu_seqlens_k=np.array([0, 1, 5], np.int32),
                max_seqlen_q=3, max_seqlen_k=4)
    args.update(change)
    with pytest.raises(err, match=match):
        aule.flash_attention_varlen(**args)


def test_gpu_tensors_are_refused():
    if not backends.get("vulkan").available:
        pytest.skip("no Vulkan device")
    q = aule.to_gpu(np.zeros((2, 1, 8), np.float32))
    with pytest.raises(TypeError, match="flash_attention_varlen takes NumPy arrays or torch tensors, not GpuTensors"):
        aule.flash_attention_varlen(q, q, q, [0, 2], [0, 2], 2, 2)


def test_refused_inside_torch_compile(monkeypatch):
    from aule import api

    monkeypatch.setattr(api, "_compiling", lambda x: True)
    q = np.zeros((2, 1, 8), np.float32)
    with pytest.raises(aule.UnsupportedError, match="flash_attention_varlen inside torch.compile"):
        aule.flash_attention_varlen(q, q, q, [0, 2], [0, 2], 2, 2)

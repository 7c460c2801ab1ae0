"""Attention sinks (gpt-oss): one logit per query head joins each row's softmax denominator."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import masks
from aule.backends.numpy import attention_numpy
from aule.paged_call import canonicalize_paged
from aule.reference import attention_reference
from attn_util import assert_routed_to_numpy, refusal
from test_paged import check, make_case, reference_paged


def _naive(q, k, v, scale, sink, left, right):
    """The definition written out on one head, float64: e^sink is one more term of the denominator."""
    s = (q @ k.T) * scale
    vis = masks.mask(q.shape[0], k.shape[0], left, right)
    e = np.where(vis, np.exp(s), 0.0)
    denom = np.exp(sink) + e.sum(-1)
    return (e @ v) / denom[:, None], np.log(denom)


def test_reference_follows_the_definition():
    rng = np.random.default_rng(0)
    # seq_q > seq_k, causal: the first rows see no key and give zeros with LSE = sink.
    q, k, v = (rng.standard_normal((1, 2, n, 16)) for n in (9, 6, 6))
    sinks = np.array([0.7, -1.5], np.float32)
    out, lse = attention_reference(q, k, v, causal=True, scale=0.4, sinks=sinks, return_lse=True)
    for h in range(2):
        want, want_lse = _naive(q[0, h], k[0, h], v[0, h], 0.4, float(sinks[h]), -1, 0)
        assert np.abs(out[0, h] - want).max() < 1e-12 and np.abs(lse[0, h] - want_lse).max() < 1e-12
    assert (out[0, :, :3] == 0).all() and np.allclose(lse[0, :, :3], sinks[:, None].astype(np.float64))


@pytest.mark.parametrize("shape,causal,window", [((2, 4, 2, 37, 53, 40), True, -1),
                                                 ((1, 2, 2, 97, 45, 64), False, (10, 3)),
                                                 ((1, 8, 1, 1, 600, 32), True, -1),
                                                 ((1, 4, 2, 97, 7, 80), True, -1)])
def test_numpy_backend_matches_reference(shape, causal, window):
    b, hq, hk, sq, sk, d = shape
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float32)
    k, v = (rng.standard_normal((b, hk, sk, d)).astype(np.float32) for _ in range(2))
    sinks = rng.uniform(-2, 3, hq).astype(np.float32)
    out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, sinks=sinks, backend="numpy",
                                    return_lse=True)
    want, want_lse = attention_reference(q, k, v, causal=causal, window_size=window, sinks=sinks, return_lse=True)
    assert np.abs(out - want).max() < 2e-5
    # Every row's LSE is finite with a sink, those of rows that see no key included.
    assert np.isfinite(want_lse).all() and np.abs(lse - want_lse).max() < 2e-5
    # The sink's share is e^sink over ~seq_k terms: small beside 600 keys, still 50x the tolerance.
    assert np.abs(attention_reference(q, k, v, causal=causal, window_size=window) - want).max() > 1e-3


def test_the_sink_joins_the_running_statistics_over_many_tiles():
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((2, 6, n, 24)).astype(np.float32) for n in (29, 61, 61))
    k, v = k[:, :3], v[:, :3]
    sinks = np.array([4.0, -3.0, 0.0, 1.0, 8.0, -0.5], np.float32)
    out, lse = attention_numpy(q, k, v, 0.3, 20, 2, return_lse=True, block_q=7, block_k=13, sinks=sinks)
    want, want_lse = attention_reference(q, k, v, causal=False, scale=0.3, window_size=(20, 2), sinks=sinks,
                                         return_lse=True)
    assert np.abs(out - want).max() < 2e-5 and np.abs(lse - want_lse).max() < 2e-5


def test_rows_without_keys_and_the_numeric_rule():
    q = np.zeros((1, 2, 4, 8), np.float32)
    k = np.ones((1, 2, 4, 8), np.float32)
    q[0, 0, 1, 0] = np.nan       # a NaN score: the row is NaN, LSE NaN
    q[0, 0, 2, 0] = np.inf       # +inf scores: NaN, LSE +inf
    q[0, 1, 3, 0] = -np.inf      # every score -inf: as if masked, zeros and LSE = sink
    sinks = np.array([0.5, -1.0], np.float32)
    ref = attention_reference(q, k, k, causal=False, sinks=sinks, return_lse=True)
    for out, lse in (ref, aule.flash_attention(q, k, k, causal=False, sinks=sinks, return_lse=True, backend="numpy")):
        assert np.isnan(out[0, 0, 1]).all() and np.isnan(lse[0, 0, 1])
        assert np.isnan(out[0, 0, 2]).all() and lse[0, 0, 2] == np.inf
        assert (out[0, 1, 3] == 0).all() and lse[0, 1, 3] == np.float32(-1.0)
        # A finite row: the sink takes its share e^sink / (e^sink + 4) of the weight away from the values.
        assert np.allclose(out[0, 0, 0], 4 / (np.exp(0.5) + 4)) and np.isclose(lse[0, 0, 0], np.log(np.exp(0.5) + 4))


def test_no_keys_at_all_give_zeros_and_the_sink_as_lse():
    q = np.ones((1, 3, 5, 8), np.float32)
    k = np.ones((1, 3, 0, 8), np.float32)
    sinks = np.array([1.0, 2.0, -3.0], np.float32)
    out, lse = aule.flash_attention(q, k, k, sinks=sinks, return_lse=True)
    assert (out == 0).all() and (lse == sinks[None, :, None]).all()


def test_torch_tensors():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    q, k, v = (rng.standard_normal((1, 4, 11, 16)).astype(np.float32) for _ in range(3))
    k, v = k[:, :2], v[:, :2]
    sinks = rng.standard_normal(4).astype(np.float32)
    out, lse = aule.flash_attention(*(torch.from_numpy(x) for x in (q, k, v)), sinks=torch.from_numpy(sinks).bfloat16(),
                                    return_lse=True)
    want, want_lse = attention_reference(q, k, v, sinks=torch.from_numpy(sinks).bfloat16().float().numpy(),
                                         return_lse=True)
    assert isinstance(out, torch.Tensor) and np.abs(out.numpy() - want).max() < 2e-5
    assert np.abs(lse.numpy() - want_lse).max() < 2e-5
    learned = torch.from_numpy(sinks).requires_grad_()
    with pytest.raises(aule.UnsupportedError, match="sinks requires grad"):
        aule.flash_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), sinks=learned)
    with torch.no_grad():
        aule.flash_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), sinks=learned)
    from aule.sdpa_core import traced_attention

    # The traced path (torch.compile; tests/test_compile.py compiles it) hands sinks to its op.
    traced = traced_attention(torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v), True, None, -1, None,
                              False, softcap=0.0, alibi_slopes=None, sinks=torch.from_numpy(sinks))
    assert np.abs(traced.numpy() - attention_reference(q, k, v, sinks=sinks)).max() < 2e-5


def test_paged_attention_with_sinks_matches_reference():
    rng = np.random.default_rng(4)
    case = make_case(rng, [1, 7, 97, 40], heads_q=4, heads_kv=2, head_dim=80, block_size=16, q_len=3,
                     window_size=24)
    sinks = rng.uniform(-1, 2, 4).astype(np.float32)
    out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                     window_size=24, sinks=sinks, backend="numpy")
    want = reference_paged(case, window_size=24, sinks=sinks)
    check(out, want, "float32")
    assert np.abs(reference_paged(case, window_size=24) - want).max() > 1e-2
    cache = aule.PagedKVCache(num_blocks=8, block_size=16, heads_kv=2, head_dim=80, dtype="float32",
                              backend="numpy")
    seq = cache.allocate()
    cache.append(seq, case.ks[2].transpose(1, 0, 2)[:20], case.vs[2].transpose(1, 0, 2)[:20])
    got = cache.attention(case.q[2:3], [seq], sinks=sinks)
    want = attention_reference(case.q[2:3], case.ks[2][None, :, :20], case.vs[2][None, :, :20], sinks=sinks)
    assert np.abs(got - want).max() < 2e-5


def test_backends_without_sinks_refuse_them_by_name_and_auto_routes_to_numpy():
    assert_routed_to_numpy("sinks", (), sinks=np.array([0.5, 0.1], np.float32))
    case = make_case(np.random.default_rng(5), [5], heads_q=2, heads_kv=1, head_dim=16, block_size=4, q_len=1)
    paged = canonicalize_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                               sinks=np.array([0.5, 0.1], np.float32))
    for name in ("vulkan", "triton"):
        assert refusal(name, "paged_attention", paged) == f"backend {name!r} does not apply sinks yet"


@pytest.mark.parametrize("bad,err,match", [
    (np.ones(3, np.float32), ValueError, r"sinks must have shape \[heads_q\] = \[2\]"),
    (np.ones((1, 2), np.float32), ValueError, "sinks must have shape"),
    (np.array([np.nan, 1.0], np.float32), ValueError, "sinks must be finite"),
    (np.array([1e39, 1.0]), ValueError, "sinks must be finite"),
    (np.array([1, 2], np.int32), TypeError, "sinks must hold floats"),
    ([0.5, 0.5], TypeError, "sinks must be a NumPy array"),
])
def test_bad_sinks_are_refused_by_name(bad, err, match):
    q = np.zeros((1, 2, 4, 8), np.float32)
    with pytest.raises(err, match=match):
        aule.flash_attention(q, q, q, sinks=bad)
    with pytest.raises(err, match=match):
        case = make_case(np.random.default_rng(0), [5], heads_q=2, heads_kv=1, head_dim=8, block_size=4, q_len=1)
        aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                   sinks=bad)

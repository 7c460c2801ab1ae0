"""Triton paged attention and copy_kv_to_paged against the float64 reference.

On a CPU machine the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) at small
shapes; with a CUDA/ROCm device they run on it, at full size too.
"""
from __future__ import annotations


import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, ON_GPU = import_torch_and_triton()

import aule  # noqa: E402
from test_paged import check, make_case, reference_paged  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
TORCH_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _to_torch(case, dtype):
    dt = TORCH_DT[dtype]
    return (torch.from_numpy(case.q).to(DEV, dt), torch.from_numpy(case.k_cache).to(DEV, dt),
            torch.from_numpy(case.v_cache).to(DEV, dt), torch.from_numpy(case.block_tables).to(DEV),
            torch.from_numpy(case.context_lens).to(DEV))


def _run(case, dtype, window=-1, scale=None):
    q, kc, vc, bt, cl = _to_torch(case, dtype)
    out = aule.flash_attention_paged(q, kc, vc, bt, cl, scale=scale, window_size=window, backend="triton")
    assert out.dtype == q.dtype and out.shape == q.shape and out.device == q.device
    return out.float().cpu().numpy()


def _case(rng, lens, hq, hk, d, bs, q_len, dtype, window=-1):
    # Round through the test dtype first so the reference sees exactly the kernel's inputs.
    case = make_case(rng, lens, hq, hk, d, bs, q_len, np.float32, window_size=window)
    if dtype != "float32":
        rnd = (lambda a: torch.from_numpy(a).to(TORCH_DT[dtype]).float().numpy())
        for n in ("q", "k_cache", "v_cache"):
            setattr(case, n, rnd(getattr(case, n)))
        case.ks = [rnd(k) for k in case.ks]
        case.vs = [rnd(v) for v in case.vs]
    return case


@pytest.mark.parametrize("block_size,q_len,heads", [
    (16, 1, (8, 2)), (1, 1, (4, 4)), (128, 1, (8, 1)), (16, 4, (8, 2)), (128, 4, (4, 4)), (1, 4, (8, 1))])
def test_triton_paged_matches_reference(block_size, q_len, heads):
    rng = np.random.default_rng(block_size + q_len)
    lens = [1, 15, 16, 17, 1000] if ON_GPU or block_size != 1 else [1, 15, 16, 17, 200]
    case = _case(rng, lens, *heads, 64, block_size, q_len, "float32")
    check(_run(case, "float32"), reference_paged(case), "float32")


@pytest.mark.parametrize("window,q_len", [(8, 1), ((40, 0), 4), (100, 1)])
def test_triton_paged_window(window, q_len):
    rng = np.random.default_rng(3)
    case = _case(rng, [3, 16, 333], 8, 2, 64, 16, q_len, "float32", window)
    check(_run(case, "float32", window), reference_paged(case, window_size=window), "float32")


@pytest.mark.parametrize("dtype,head_dim", [("float16", 128), ("bfloat16", 80), ("float16", 256)])
def test_triton_paged_dtypes_head_dims(dtype, head_dim):
    rng = np.random.default_rng(head_dim)
    case = _case(rng, [7, 70], 4, 1, head_dim, 8, 2, dtype)
    check(_run(case, dtype, scale=0.2), reference_paged(case, scale=0.2), dtype)


def test_triton_copy_kv_and_cache():
    rng = np.random.default_rng(12)
    cache = aule.PagedKVCache(12, 8, 2, 64, "float16", backend="triton", device=DEV)
    ids = [cache.allocate(), cache.allocate()]
    ks, vs = {}, {}
    for sid, n in zip(ids, (13, 30)):
        k = torch.from_numpy(rng.standard_normal((n, 2, 64))).to(DEV, torch.float16)
        v = torch.from_numpy(rng.standard_normal((n, 2, 64))).to(DEV, torch.float16)
        cache.append(sid, k, v)
        ks[sid], vs[sid] = k, v
    child = cache.fork(ids[0])
    extra = torch.from_numpy(rng.standard_normal((3, 2, 64))).to(DEV, torch.float16)
    cache.append(child, extra, -extra)
    for sid, k in ks.items():
        np.testing.assert_array_equal(cache.gather(sid)[0], k.cpu().numpy().transpose(1, 0, 2))
    ck, cv = cache.gather(child)
    np.testing.assert_array_equal(ck[:, 13:], extra.cpu().numpy().transpose(1, 0, 2))
    np.testing.assert_array_equal(cv[:, 13:], -extra.cpu().numpy().transpose(1, 0, 2))
    q = torch.from_numpy(rng.standard_normal((3, 8, 1, 64))).to(DEV, torch.float16)
    out = cache.attention(q, ids + [child]).float().cpu().numpy()
    for i, sid in enumerate(ids + [child]):
        gk, gv = cache.gather(sid)
        ref = aule.reference.attention_reference(q[i:i + 1].cpu().numpy(), gk[None], gv[None])
        check(out[i:i + 1], ref, "float16")


def test_triton_copy_kv_skips_negative_slots():
    kc = torch.zeros(3, 4, 2, 16, device=DEV)
    vc = torch.zeros_like(kc)
    key = torch.randn(4, 2, 16, device=DEV)
    aule.copy_kv_to_paged(key, key + 1, kc, vc, torch.tensor([5, -1, 11, 0], device=DEV), backend="triton")
    assert torch.equal(kc[1, 1], key[0]) and torch.equal(kc[2, 3], key[2]) and torch.equal(vc[0, 0], key[3] + 1)
    assert int((kc.reshape(12, -1).abs().sum(1) > 0).sum()) == 3


@pytest.mark.skipif(not ON_GPU, reason="full-size shapes need a CUDA/ROCm device")
@pytest.mark.parametrize("batch,ctx", [(8, 4096), (1, 32768)])
def test_triton_paged_full_size(batch, ctx):
    rng = np.random.default_rng(ctx)
    lens = list(rng.integers(ctx // 2, ctx + 1, size=batch))
    case = _case(rng, lens, 32, 8, 128, 16, 1, "float16")
    check(_run(case, "float16"), reference_paged(case), "float16")


def test_triton_paged_merge_weighs_ties_by_key_not_by_split():
    """Scores near 4e7 (base 2) tied at three keys of the first split and one of the last: the
    merge must weigh the splits 3:1. An fp32 LSE per split (ulp 4 there) loses log2(3) and
    weighed them 1:1 (output 3.0 instead of 2.0)."""
    rng = np.random.default_rng(3)
    bs, ctx, d = 16, 256 if ON_GPU else 64, 16
    kc = rng.standard_normal((ctx // bs, bs, 1, d)).astype(np.float32)
    vc = np.zeros_like(kc)
    q = np.zeros((1, 1, 1, d), np.float32)
    q[..., 0] = 1e4
    ties = (0, 1, 2, ctx - 14)
    for j, value in zip(ties, (1.0, 1.0, 1.0, 5.0)):
        kc[j // bs, j % bs, 0] = 0
        kc[j // bs, j % bs, 0, 0] = 1e4
        vc[j // bs, j % bs, 0] = value
    bt = np.arange(ctx // bs, dtype=np.int32)[None]
    cl = np.array([ctx], np.int32)
    t = lambda a: torch.from_numpy(a).to(DEV)  # noqa: E731
    from aule.backends.triton import paged as tp

    splits = tp.choose_config(1, 1, 1, 1, d, ctx, 0, itemsize=4)[4]
    assert splits > 1 and ties[-1] // bs != 0, "the ties must sit in different splits"
    out = aule.flash_attention_paged(t(q), t(kc), t(vc), t(bt), t(cl), backend="triton").cpu().numpy()
    np.testing.assert_allclose(out, 2.0, rtol=1e-5)

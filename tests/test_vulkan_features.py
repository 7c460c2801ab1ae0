"""softcap, ALiBi and sinks on the Vulkan backend (attn_common.glsl's modified_score and join_sink):
every scalar variant against the float64 reference, GpuTensors, the numeric rule, and the calls
paged attention, which lacks them, refuses by name (coopmat's are checked on the GPU:
test_vulkan_coopmat.py)."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule.reference import attention_reference

from _vulkan_util import VARIANT_ATOL, forced_variant, max_err
from _vulkan_util import ctx, no_validation_messages  # noqa: F401

VARIANTS = ["baseline", "fast", "fp16", "fp16_io", "fp16_amd", "cpu"]
# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window): GQA with seq_q < seq_k;
# seq_q > seq_k, whose first rows see no key (zeros, LSE = sink); a two-sided window.
CASES = [(2, 4, 2, 7, 33, 64, True, -1), (1, 4, 1, 37, 20, 64, True, -1), (1, 2, 2, 33, 50, 40, False, (5, 3))]


def features(rng, name, b, hq):
    slopes = rng.uniform(0.05, 1.0, (b, hq)).astype(np.float32)
    return {"softcap": dict(softcap=5.0),
            "alibi": dict(alibi_slopes=slopes),
            "alibi-per-head": dict(alibi_slopes=slopes[0]),
            "sinks": dict(sinks=rng.uniform(-1.0, 3.0, hq).astype(np.float32)),
            "all": dict(softcap=5.0, alibi_slopes=slopes, sinks=rng.uniform(-1.0, 3.0, hq).astype(np.float32))}[name]


def check(out, lse, q, k, v, causal, window, atol, **kw):
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, return_lse=True, **kw)
    assert max_err(out, ref) <= atol
    assert (np.isfinite(lse) == np.isfinite(ref_lse)).all()
    fin = np.isfinite(ref_lse)
    assert np.abs(lse[fin] - ref_lse[fin]).max() <= max(atol, 1e-5)
    plain = attention_reference(q, k, v, causal=causal, window_size=window)
    assert np.abs(plain - ref).max() > 10 * atol, "the feature must change the result"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ["softcap", "alibi", "alibi-per-head", "sinks", "all"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}".format(*c))
def test_each_variant_applies_the_feature(ctx, variant, name, case):
    from aule.backends.vulkan import VARIANTS as TABLE

    b, hq, hk, sq, sk, d, causal, window = case
    v_ = TABLE[variant]
    why = v_.unfit(d, ctx.info, sk, sq)
    if why:
        pytest.skip(why)
    rng = np.random.default_rng(sum(case[:6]) + len(name))
    dt = np.float16 if v_.elem == "float16" else np.float32
    # Scores of a few units, so the cap at 5 and slopes up to 1 matter.
    q, k, v = ((rng.standard_normal(s) * 2).astype(dt) for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
    kw = features(rng, name, b, hq)
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, backend="vulkan",
                                        return_lse=True, **kw)
    check(out, lse, q, k, v, causal, window, VARIANT_ATOL[variant], **kw)


def test_gpu_tensors_take_the_features(ctx):
    from aule.backends.vulkan import to_gpu

    rng = np.random.default_rng(5)
    b, hq, hk, sq, sk, d = 1, 4, 2, 19, 40, 64
    q, k, v = ((rng.standard_normal(s) * 2).astype(np.float16) for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
    kw = features(rng, "all", b, hq)
    gq, gk, gv = (to_gpu(x) for x in (q, k, v))
    out, lse = aule.flash_attention(gq, gk, gv, causal=True, backend="vulkan", return_lse=True, **kw)
    check(out.numpy(), lse.numpy(), q, k, v, True, -1, VARIANT_ATOL["fp16"], **kw)
    for t in (gq, gk, gv, out, lse):
        t.free()


def test_the_numeric_rule_holds_with_the_features(ctx):
    # +inf scores: capped to +softcap, an ordinary row; NaN: a NaN row; no visible key: zeros, LSE = sink.
    k = np.ones((1, 2, 6, 16), np.float32)
    q = np.zeros((1, 2, 4, 16), np.float32)
    q[0, 0, 1, 0] = np.inf
    q[0, 1, 2, 0] = np.nan
    sinks = np.array([0.5, -1.0], np.float32)
    for kw in (dict(softcap=3.0), dict(sinks=sinks), dict(softcap=3.0, sinks=sinks)):
        out, lse = aule.flash_attention(q, k, k, causal=False, backend="vulkan", return_lse=True, **kw)
        ref, ref_lse = attention_reference(q, k, k, causal=False, return_lse=True, **kw)
        assert np.array_equal(np.isnan(out), np.isnan(ref)) and np.array_equal(np.isnan(lse), np.isnan(ref_lse))
        fin = ~np.isnan(ref)
        assert np.abs(out[fin] - ref[fin]).max() <= 1e-5
        assert np.isfinite(out[0, 0, 1]).all() == ("softcap" in kw)
    # seq_q > seq_k, causal: rows 0..2 see no key.
    q2 = np.random.default_rng(1).standard_normal((1, 2, 5, 16)).astype(np.float32)
    out, lse = aule.flash_attention(q2, k[:, :, :2], k[:, :, :2], backend="vulkan", return_lse=True, sinks=sinks)
    assert (out[0, :, :3] == 0).all() and np.allclose(lse[0, :, :3], sinks[:, None], atol=1e-6)


def test_matrix_core_selection_keeps_the_features(monkeypatch):
    """coopmat applies softcap, ALiBi, sinks, padding spans and general masks, so a call using them
    keeps the matrix cores (before, selection passed over to the scalar fp16 variant)."""
    from aule.backends.vulkan import select
    from test_vulkan import NVIDIA_SHAPES, _recorded_device

    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    h200 = _recorded_device(name="NVIDIA H200", vendor="NVIDIA", shared=49152, coopmat=NVIDIA_SHAPES)
    assert select.select("float16", 128, h200).name == "coopmat"
    for f in ("softcap", "alibi", "sinks", "mask", "mask general_mask", "softcap alibi sinks mask general_mask"):
        assert select.select("float16", 128, h200, features=frozenset(f.split())).name == "coopmat"


def test_paged_vulkan_applies_softcap_alibi_and_sinks():
    """paged.comp applies the three score features; they are no reason to refuse a paged call
    (tests/test_paged_features.py checks the results)."""
    from aule import backends
    from aule.paged_call import canonicalize_paged

    rng = np.random.default_rng(2)
    q = rng.standard_normal((1, 2, 1, 16)).astype(np.float32)
    kc = rng.standard_normal((4, 4, 2, 16)).astype(np.float32)
    call = canonicalize_paged(q, kc, kc, np.array([[0, 1]], np.int32), np.array([6], np.int32), softcap=3.0,
                              alibi_slopes=np.array([0.5, 0.25], np.float32), sinks=np.array([0.1, 0.2], np.float32))
    assert backends.get("vulkan").missing_features(call) is None


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["lengths", "left-padding", "per-head-run", "with-sinks"])
def test_padding_masks_bound_each_heads_keys(ctx, variant, kind):
    from aule.backends.vulkan import VARIANTS as TABLE

    b, hq, hk, sq, sk, d = 3, 4, 2, 9, 45, 64
    v_ = TABLE[variant]
    why = v_.unfit(d, ctx.info, sk, sq)
    if why:
        pytest.skip(why)
    rng = np.random.default_rng(len(kind))
    dt = np.float16 if v_.elem == "float16" else np.float32
    q, k, v = (rng.standard_normal(s).astype(dt) for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
    cols = np.arange(sk)
    if kind in ("lengths", "with-sinks"):
        mask = (cols < np.array([45, 17, 0])[:, None])[:, None, None]        # the last sequence sees nothing
    elif kind == "left-padding":
        mask = (cols >= np.array([0, 30, 44])[:, None])[:, None, None]
    else:
        lo, hi = rng.integers(0, 20, (b, hq)), rng.integers(25, 45, (b, hq))
        mask = ((cols >= lo[..., None]) & (cols < hi[..., None]))[:, :, None]
    kw = dict(sinks=rng.uniform(-1, 2, hq).astype(np.float32)) if kind == "with-sinks" else {}
    # NaN where no query may look: a key outside the spans must never be read into a row.
    hidden = ~np.broadcast_to(mask, (b, hq, 1, sk)).any(axis=(1, 2))
    k[np.broadcast_to(hidden[:, None, :, None], k.shape)] = np.nan
    v[np.broadcast_to(hidden[:, None, :, None], v.shape)] = np.nan
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, causal=False, attn_mask=mask, backend="vulkan", return_lse=True, **kw)
    ref, ref_lse = attention_reference(q, np.nan_to_num(k), np.nan_to_num(v), causal=False, attn_mask=mask,
                                       return_lse=True, **kw)
    assert max_err(out, ref) <= VARIANT_ATOL[variant]
    fin = np.isfinite(ref_lse)
    assert (np.isfinite(lse) == fin).all() and np.abs(lse[fin] - ref_lse[fin]).max() <= 1e-3

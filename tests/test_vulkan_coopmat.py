"""The cooperative-matrix variant: its matrix shape and tiles as a function of recorded device
properties (runs anywhere), and the shader against the float64 reference for every matrix shape the
device offers (runs where VK_KHR_cooperative_matrix exists; lavapipe has none)."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule.reference import attention_reference

from _vulkan_util import ctx, forced_variant, no_validation_messages  # noqa: F401
from test_vulkan import ARC_SHAPES, NVIDIA_SHAPES, RDNA3_SHAPES, _recorded_device
from test_vulkan_numerics import torch_fp16_error

H200 = dict(name="NVIDIA H200", vendor="NVIDIA", shared=49152, coopmat=NVIDIA_SHAPES)
RDNA3 = dict(name="AMD Radeon RX 7900 XTX (RADV NAVI31)", vendor="AMD", subgroup=64, coopmat=RDNA3_SHAPES)
ARC = dict(name="Intel(R) Arc(tm) A770 Graphics (DG2)", vendor="Intel", subgroup=8, coopmat=ARC_SHAPES)


def coopmat():
    from aule.backends.vulkan import VARIANTS

    return VARIANTS["coopmat"]


@pytest.mark.parametrize("props, d, shape, tiles", [
    (H200, 128, (16, 8, 16), (8, 1, 32, 2)),
    (H200, 64, (16, 8, 16), (8, 1, 32, 2)),
    (H200, 256, (16, 8, 16), (4, 1, 16, 2)),
    (H200, 80, (16, 8, 16), (8, 1, 32, 2)),
    (RDNA3, 128, (16, 16, 16), (8, 1, 32, 2)),
    (ARC, 128, (8, 8, 16), (8, 1, 32, 2)),
], ids=["h200-d128", "h200-d64", "h200-d256", "h200-d80", "rdna3-d128", "arc-d128"])
def test_shape_and_tiles_follow_the_recorded_device(props, d, shape, tiles, monkeypatch):
    from aule.backends.vulkan.shaders import CoopTiles

    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    info = _recorded_device(**props)
    fam = coopmat().path
    assert coopmat().unfit(d, info) is None
    assert fam.pick(d, info, None) == (shape, CoopTiles(*tiles))
    spec = dict(coopmat().spec(d, info))
    assert spec[4] == tiles[0] * info.subgroup_size, "invocations are subgroups x the device's subgroup size"
    assert (spec[5], spec[6], spec[7]) == shape
    # The register softmax where the vendor's accumulator layout is known (NVIDIA), else shared memory.
    assert spec[9] == (4 if info.vendor == "NVIDIA" else 0)
    assert fam.shared_bytes(d, info, None) <= info.max_shared_memory


def test_a_forced_shape_is_used_and_an_unoffered_one_refused(monkeypatch):
    from aule.backends.vulkan import select

    info = _recorded_device(**H200)
    spec = dict(coopmat().spec(128, info, ((16, 16, 16),)))
    assert (spec[5], spec[6], spec[7]) == (16, 16, 16)
    spec = dict(coopmat().spec(128, info, ((16, 8, 8), 4, 1, 16, 1, 0)))
    assert (spec[7], spec[1], spec[3], spec[8], spec[9]) == (8, 4, 16, 1, 0), "forced tiles and softmax path"
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "coopmat")
    monkeypatch.setenv("AULE_VULKAN_TILES", "8x8x16")
    with pytest.raises(aule.UnsupportedError, match="8x8x16 matrix shape.*does not offer.*16x8x16"):
        select.select("float16", 128, info)
    monkeypatch.setenv("AULE_VULKAN_TILES", "auto,4,1,64,2")   # 64 keys double-buffered: 70 KB at d128
    with pytest.raises(aule.UnsupportedError, match="bytes of shared memory"):
        select.select("float16", 128, info)


def test_head_dims_off_the_matrix_grid_go_to_the_scalar_variants(monkeypatch):
    from aule.backends.vulkan import select

    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    info = _recorded_device(**H200)
    assert "steps of 16" in coopmat().unfit(40, info)
    assert select.select("float16", 40, info).name == "fp16"
    assert select.select("float16", 128, info).name == "coopmat"
    assert select.select("float32", 128, info).name == "fast"
    # Matrix cores of other vendors are unmeasured here: automatic selection keeps their scalar
    # variants; forcing reaches the shader (its shared-memory softmax there).
    assert select.select("float16", 128, _recorded_device(**RDNA3)).name == "fp16_amd"
    assert select.select("float16", 128, _recorded_device(**ARC), forced="coopmat").name == "coopmat"


def test_bad_override_names_the_setting(monkeypatch):
    from aule import settings

    for raw in ("16x8x16,4", "0x8x8", "16x8"):
        monkeypatch.setenv("AULE_VULKAN_TILES", raw)
        with pytest.raises(ValueError, match="AULE_VULKAN_TILES"):
            settings.kernel_choice()


# --- on a device with cooperative matrices ---------------------------------------------------

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window): seq 1, 97, 1025; head_dim
# 80, 128, 256; GQA 4 and 8; windows; chunked prefill against a longer cache.
CASES = [
    (1, 2, 2, 1, 1, 128, False, -1),
    (2, 4, 1, 97, 97, 80, True, -1),
    (1, 8, 1, 1025, 1025, 128, True, -1),
    (1, 4, 4, 97, 300, 256, False, -1),
    (1, 8, 2, 64, 1000, 128, True, (64, 0)),
    (1, 4, 4, 33, 77, 64, False, (5, 7)),
    (1, 4, 2, 200, 130, 64, True, -1),        # seq_q > seq_k: the first 70 rows see no key
    (1, 8, 2, 512, 4096, 128, True, -1),      # chunked prefill
]


# Every shape the H200 offers, and the shared-memory softmax (the path other vendors take) forced.
@pytest.mark.parametrize("shape", ["16x16x16", "16x8x16", "16x8x8", "16x16x16,4,1,16,1,0"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}".format(*c))
def test_every_offered_shape_matches_the_reference(ctx, shape, case, monkeypatch):
    m = tuple(int(x) for x in shape.split(",")[0].split("x"))
    if m not in ctx.info.coopmat_shapes:
        pytest.skip(f"{ctx.info.name} offers no {shape} fp16 cooperative matrix")
    b, hq, hk, sq, sk, d, causal, window = case
    from aule import settings

    monkeypatch.setenv("AULE_VULKAN_TILES", shape)
    why = coopmat().unfit(d, ctx.info, sk, sq, settings.kernel_choice().tiles)
    assert why is None, why
    rng = np.random.default_rng(sum(case[:6]))
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float16)
    k = rng.standard_normal((b, hk, sk, d)).astype(np.float16)
    v = rng.standard_normal((b, hk, sk, d)).astype(np.float16)
    with forced_variant("coopmat"):
        out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, backend="vulkan",
                                        return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, return_lse=True)
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(lse) == empty).all() and (out[empty] == 0).all(), "rows that see no key: zeros, LSE -inf"
    err = float(np.abs(out.astype(np.float64) - ref).max())
    if window == -1 and (not causal or sq == sk):   # torch's causal is top-left: compare where they agree
        assert err <= 2 * torch_fp16_error(q, k, v, causal, ref) + 1e-6, f"error {err:.3g}"
    else:
        assert err <= 1e-2, f"error {err:.3g}"
    assert np.abs(lse[~empty] - ref_lse[~empty]).max() <= 1e-3


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window) for the score features: GQA,
# seq_q > seq_k (rows that see no key: zeros, LSE = sink), a window, partial tiles.
FEATURE_CASES = [(2, 4, 2, 97, 300, 64, True, -1), (1, 4, 1, 200, 130, 128, True, -1),
                 (1, 2, 2, 77, 77, 64, False, (9, 4))]


def _features(rng, name, b, hq, sk):
    slopes = rng.uniform(0.01, 0.3, (b, hq)).astype(np.float32)
    sinks = rng.uniform(-1.0, 3.0, hq).astype(np.float32)
    # One run of visible keys per batch element (a padding mask: the span path), the second
    # element's starting past key 0 (left padding).
    keep = np.zeros((b, 1, 1, sk), bool)
    for i in range(b):
        keep[i, ..., i * sk // 5: sk - 3 * i] = True
    return {"softcap": dict(softcap=4.0), "alibi": dict(alibi_slopes=slopes), "sinks": dict(sinks=sinks),
            "padding": dict(attn_mask=keep),
            "all": dict(softcap=4.0, alibi_slopes=slopes, sinks=sinks, attn_mask=keep)}[name]


@pytest.mark.parametrize("shape", ["16x8x16", "16x16x16,4,1,16,1,0"], ids=["registers", "shared"])
@pytest.mark.parametrize("name", ["softcap", "alibi", "sinks", "padding", "all"])
@pytest.mark.parametrize("case", FEATURE_CASES, ids=lambda c: "b{}h{}/{}q{}k{}d{}c{}w{}".format(*c))
def test_score_features_on_matrix_cores(ctx, shape, name, case, monkeypatch):
    """softcap, ALiBi, sinks and padding spans on both softmax paths (the register one NVIDIA
    takes, the shared-memory one other vendors take) against the float64 reference."""
    m = tuple(int(x) for x in shape.split(",")[0].split("x"))
    if m not in ctx.info.coopmat_shapes:
        pytest.skip(f"{ctx.info.name} offers no {shape} fp16 cooperative matrix")
    b, hq, hk, sq, sk, d, causal, window = case
    monkeypatch.setenv("AULE_VULKAN_TILES", shape)
    rng = np.random.default_rng(sum(case[:6]) + len(name))
    q = rng.standard_normal((b, hq, sq, d)).astype(np.float16)
    k = rng.standard_normal((b, hk, sk, d)).astype(np.float16)
    v = rng.standard_normal((b, hk, sk, d)).astype(np.float16)
    kw = _features(rng, name, b, hq, sk)
    with forced_variant("coopmat"):
        out, lse = aule.flash_attention(q, k, v, causal=causal, window_size=window, backend="vulkan",
                                        return_lse=True, **kw)
    ref, ref_lse = attention_reference(q, k, v, causal=causal, window_size=window, return_lse=True, **kw)
    empty = ~np.isfinite(ref_lse) | (np.abs(ref).max(axis=-1) == 0)
    assert (out[empty] == 0).all(), "rows that see no key are zeros"
    assert np.abs(out.astype(np.float64) - ref).max() <= 1e-2
    fin = np.isfinite(ref_lse)
    assert (np.isneginf(lse) == np.isneginf(ref_lse)).all()
    assert np.abs(lse[fin] - ref_lse[fin]).max() <= 2e-3


def test_layouts_without_register_ownership_take_the_shared_memory_softmax(monkeypatch):
    """Other vendors' layouts (RDNA3's wave64 here) take the shared-memory softmax unforced, the
    H200 the register one; the shared path is checked on an H200 by forcing it (above)."""
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    fam = coopmat().path
    for props, qg in ((RDNA3, 0), (ARC, 0), (H200, 4)):
        info = _recorded_device(**props)
        assert coopmat().unfit(128, info, 1024, 1024, None) is None
        assert fam.groups(fam.pick(128, info, None)[1], info) == qg

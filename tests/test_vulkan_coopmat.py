"""The cooperative-matrix variant: its matrix shape and tiles as a function of recorded device
properties (runs anywhere), and the shader against the float64 reference for every matrix shape the
device offers, with the score features and general masks on both softmax paths (runs where
VK_KHR_cooperative_matrix exists; lavapipe has none)."""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule.reference import attention_reference

from _vulkan_util import VARIANT_ATOL, ctx, forced_variant, no_validation_messages  # noqa: F401
from test_vulkan import ARC_SHAPES, NVIDIA_SHAPES, RDNA3_SHAPES, _recorded_device
from test_vulkan_masks import check, make_mask
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


# --- general attn_mask (masked_score over binding 6) on both softmax paths ---------------------

# name -> ((batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window), mask kind, the mask's
# broadcast shape from (b, hq, sq, sk), the other features). GQA and MQA, odd lengths, partial tiles
# on both ends, seq_q > seq_k, a window and a chunked-prefill window.
MASK_CASES = {
    "bool-sq,sk-gqa-causal": ((2, 4, 2, 97, 300, 64, True, -1), "bool", lambda b, h, sq, sk: (sq, sk), ()),
    "float-b,1,sq,sk-window-softcap": ((2, 4, 1, 77, 77, 128, False, (9, 4)), "float",
                                       lambda b, h, sq, sk: (b, 1, sq, sk), ("softcap",)),
    # causal with seq_q > seq_k: the first 70 rows see no key (LSE = the sink)
    "float-1,hq,1,sk-alibi-sinks-empty-rows": ((1, 8, 2, 200, 130, 64, True, -1), "float",
                                               lambda b, h, sq, sk: (1, h, 1, sk), ("alibi", "sinks")),
    # rows the mask hides whole, and keys it hides from every row of batch element 1
    "bool-b,1,sq,sk-hidden-rows-sinks": ((2, 4, 4, 113, 97, 80, False, -1), "bool",
                                         lambda b, h, sq, sk: (b, 1, sq, sk), ("sinks",)),
    # a padding mask with holes: each head's span bounds the loops, the mask is read inside it
    "bool-1,hq,1,sk-padding-holes": ((1, 8, 1, 33, 257, 256, True, -1), "bool",
                                     lambda b, h, sq, sk: (1, h, 1, sk), ()),
    "float-sq,sk-everything": ((2, 4, 2, 130, 1025, 128, True, (200, 0)), "float",
                               lambda b, h, sq, sk: (sq, sk), ("softcap", "alibi", "sinks")),
}


def _mask_case(name):
    """``(q, k, v, sinks, kw)`` of a MASK_CASES entry: float16 inputs, the mask and the features."""
    (b, hq, hk, sq, sk, d, causal, window), kind, shape, extras = MASK_CASES[name]
    rng = np.random.default_rng([b, hq, hk, sq, sk, d, len(name)])
    q, k, v = (rng.standard_normal(s).astype(np.float16) for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
    mask = make_mask(rng, shape(b, hq, sq, sk), kind)
    if kind == "float":
        mask[..., 5] = -np.inf   # a key an additive mask hides from every row
    if name.startswith("bool-b,1,sq,sk-hidden-rows"):
        mask[0, 0, [0, 50, sq - 1]] = False
        mask[1, :, :, 60:70] = False
    if "padding" in name:
        mask[0, 3, 0, :40] = False    # head 3's span starts at key 40, head 5's ends at key 200
        mask[0, 5, 0, 200:] = False
    kw = dict(causal=causal, window_size=window, attn_mask=mask)
    if "softcap" in extras:
        kw["softcap"] = 3.0
    if "alibi" in extras:
        kw["alibi_slopes"] = rng.uniform(0.01, 0.1, (b, hq)).astype(np.float32)
    sinks = rng.uniform(-1.0, 3.0, hq).astype(np.float32) if "sinks" in extras else None
    return q, k, v, sinks, kw


def _confusions(mask, group):
    """Masks a shader that indexes ``mask`` wrongly would apply instead: each dimension it varies
    in shifted by one, a square plane transposed, a query head's plane taken from its KV head."""
    m4 = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    for axis, what in enumerate(("batch", "heads", "rows", "keys")):
        if m4.shape[axis] > 1:
            yield f"{what} shifted", np.roll(m4, 1, axis=axis)
    if m4.shape[2] == m4.shape[3] > 1:
        yield "transposed", m4.swapaxes(2, 3)
    if m4.shape[1] > 1 and group > 1:
        yield "the KV head's plane", m4[:, np.arange(m4.shape[1]) // group]


def _distance(a, a_lse, b, b_lse):
    with np.errstate(invalid="ignore"):   # -inf - -inf: rows that see no key either way
        return max(np.abs(a - b).max(), np.abs(np.nan_to_num(a_lse - b_lse, posinf=9, neginf=9)).max())


@pytest.mark.parametrize("name", list(MASK_CASES))
def test_mask_cases_tell_wrong_indexing_apart(name):
    """The GPU cases below are only as good as their masks: every wrong reading of a mask (a shifted
    dimension, a transposed plane, the KV head's plane for a query head) must move the reference by
    far more than coopmat's tolerance. Runs anywhere (the reference only)."""
    q, k, v, sinks, kw = _mask_case(name)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, sinks=sinks, **kw)
    group = q.shape[1] // k.shape[1]
    wrong = dict(_confusions(kw["attn_mask"], group))
    assert len(wrong) >= 2, "each case must be able to catch at least two wrong readings"
    for what, m in wrong.items():
        other, other_lse = attention_reference(q, k, v, return_lse=True, sinks=sinks, **dict(kw, attn_mask=m))
        assert _distance(ref, ref_lse, other, other_lse) > 10 * VARIANT_ATOL["coopmat"], what
    if "empty-rows" in name or "hidden-rows" in name:
        assert np.isneginf(attention_reference(q, k, v, return_lse=True, **kw)[1]).any(), "rows that see no key"


def _hidden_from_every_row(mask, b, hq, hk, sq, sk):
    """``[b, hk, sk]``: the keys the mask hides from every row of every query head of a KV head."""
    dense = np.broadcast_to(mask, (b, hq, sq, sk))
    shown = dense if dense.dtype == np.bool_ else ~np.isneginf(dense)
    return ~shown.reshape(b, hk, hq // hk, sq, sk).any(axis=(2, 3))


@pytest.mark.parametrize("shape", ["16x8x16", "16x16x16,4,1,16,1,0"], ids=["registers", "shared"])
@pytest.mark.parametrize("name", list(MASK_CASES))
def test_general_masks_on_matrix_cores(ctx, shape, name, monkeypatch):
    """Boolean and additive masks of several broadcast shapes, with causal, windows, softcap, ALiBi
    and sinks, on both softmax paths, against the float64 reference; a key the mask hides is
    excluded as a window excludes it: whatever its K holds, not one bit of the result changes."""
    m = tuple(int(x) for x in shape.split(",")[0].split("x"))
    if m not in ctx.info.coopmat_shapes:
        pytest.skip(f"{ctx.info.name} offers no {shape} fp16 cooperative matrix")
    from aule import settings

    monkeypatch.setenv("AULE_VULKAN_TILES", shape)
    q, k, v, sinks, kw = _mask_case(name)
    b, hq, sq, _ = q.shape
    hk, sk = k.shape[1:3]
    why = coopmat().unfit(q.shape[-1], ctx.info, sk, sq, settings.kernel_choice().tiles)
    assert why is None, why
    with forced_variant("coopmat"):
        out, lse = aule.flash_attention(q, k, v, backend="vulkan", return_lse=True, sinks=sinks, **kw)
    check(out, lse, q, k, v, VARIANT_ATOL["coopmat"], sinks=sinks, **kw)
    hidden = _hidden_from_every_row(kw["attn_mask"], b, hq, hk, sq, sk)
    if hidden.any():
        k2 = k.copy()
        k2[hidden] = np.nan
        with forced_variant("coopmat"):
            out2, lse2 = aule.flash_attention(q, k2, v, backend="vulkan", return_lse=True, sinks=sinks, **kw)
        assert np.array_equal(out2, out) and np.array_equal(lse2, lse), "a hidden key's K reached a row"


def test_coopmat_serves_general_masks_where_selected(monkeypatch):
    """Selection and plans on a recorded H200: a general mask no longer sends float16 calls to the
    scalar fp16 variant, the plan binds the mask whole (binding 6) with its row and column strides,
    and a mask past the storage-buffer range is refused, so the router moves on."""
    import dataclasses

    from aule.backends.vulkan import plans, select

    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    h200 = _recorded_device(**H200)
    general = frozenset({"mask", "general_mask"})
    assert "general_mask" in coopmat().features
    assert select.select("float16", 128, h200, features=general, seq_k=300, seq_q=97).name == "coopmat"
    assert select.select("float16", 128, h200, forced="coopmat", features=general | {"alibi", "sinks"}).name \
        == "coopmat"
    shape = plans.Shape(2, 4, 2, 97, 300, 128)
    for mask in ((1, 1, 97, 300), (2, 1, 97, 300), (1, 4, 1, 300)):
        spec, chunks = plans.attention_plan(coopmat(), shape, 0.125, -1, 0, True, h200, None, 0.0,
                                            plans.EXTRAS_MASK, mask)
        assert dict(spec)[9] == 4, "the register softmax on NVIDIA"
        for push, ranges, _ in chunks:
            pc = np.frombuffer(push, plans.ATTN_PUSH)[0]
            assert pc["flags"] & plans.EXTRAS_MASK
            assert (pc["mask_row"], pc["mask_col"]) == plans.mask_strides(mask)[2:]
            assert len(ranges) == coopmat().bindings and ranges[-1] == (0, 4 * int(np.prod(mask)))
    small = dataclasses.replace(h200, max_storage_buffer_range=4 * 97 * 300 - 4)
    with pytest.raises(aule.UnsupportedError, match="the attn_mask takes 116400 bytes"):
        plans.attention_plan(coopmat(), plans.Shape(1, 1, 1, 97, 300, 16), 0.25, -1, 0, False, small, None, 0.0,
                             plans.EXTRAS_MASK, (1, 1, 97, 300))


def test_layouts_without_register_ownership_take_the_shared_memory_softmax(monkeypatch):
    """Other vendors' layouts (RDNA3's wave64 here) take the shared-memory softmax unforced, the
    H200 the register one; the shared path is checked on an H200 by forcing it (above)."""
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    fam = coopmat().path
    for props, qg in ((RDNA3, 0), (ARC, 0), (H200, 4)):
        info = _recorded_device(**props)
        assert coopmat().unfit(128, info, 1024, 1024, None) is None
        assert fam.groups(fam.pick(128, info, None)[1], info) == qg

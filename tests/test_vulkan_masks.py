"""General attn_mask on the Vulkan backend (attn_common.glsl's masked_score over binding 6): boolean
and float masks of every broadcast shape against the float64 reference on each scalar variant, with
causal, windows, GQA, seq_q != seq_k and the other features; the numeric rule (fully masked rows,
NaN entries); NumPy, CPU torch and GpuTensor inputs and the SDPA drop-in; the device's limits
(storage-buffer range, dispatch chunks); the matrix-core variant chosen for masked float16 calls
(its GPU cases on both softmax paths: test_vulkan_coopmat.py)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import aule
from aule.call import canonicalize
from aule.reference import attention_reference

from attn_util import count_calls
from _vulkan_util import VARIANT_ATOL, forced_variant, max_err, servable_dtype
from _vulkan_util import ctx, no_validation_messages  # noqa: F401

# coopmat runs where the device has cooperative matrices (not lavapipe): skipped here, run on a GPU.
VARIANTS = ["baseline", "fast", "fp16", "fp16_io", "fp16_amd", "coopmat", "cpu"]
D = 32
# (batch, heads_q, heads_kv, seq_q, seq_k, causal, window)
CASES = [
    (2, 4, 2, 7, 33, True, -1),        # GQA, seq_q < seq_k
    (2, 2, 1, 97, 33, True, -1),       # seq_q > seq_k: the first 64 rows see no key
    (2, 3, 3, 33, 97, False, (9, 4)),  # a two-sided window
    (2, 2, 2, 1, 7, False, -1),        # one query row
]
# The broadcast shapes of a mask, from (batch, heads_q, seq_q, seq_k).
SHAPES = {
    "sk": lambda b, h, sq, sk: (sk,),
    "sq,sk": lambda b, h, sq, sk: (sq, sk),
    "1,1,sq,sk": lambda b, h, sq, sk: (1, 1, sq, sk),
    "b,1,1,sk": lambda b, h, sq, sk: (b, 1, 1, sk),
    "b,hq,sq,sk": lambda b, h, sq, sk: (b, h, sq, sk),
    "b,1,sq,1": lambda b, h, sq, sk: (b, 1, sq, 1),
}


def case_id(c):
    return "b{}h{}/{}q{}k{}c{}w{}".format(*c)


def make_mask(rng, shape, kind):
    """A boolean mask hiding about 30% of its entries, or float N(0, 1) entries with about 20% -inf.
    Along keys, key 1 is hidden and keys 0 and 2 shown everywhere, so a mask that does not vary
    along seq_q is padding with a hole (not one run, not a prefix); along rows, the last row is
    hidden (bool) or shifted by 3 (float)."""
    if kind == "bool":
        m = rng.random(shape) > 0.3
        if shape[-1] > 1:
            m[..., 0] = m[..., 2] = True
            m[..., 1] = False
        elif len(shape) == 4:
            m[..., -1, :] = False
        return m
    m = rng.standard_normal(shape).astype(np.float32)
    m[rng.random(shape) < 0.2] = -np.inf
    if shape[-1] == 1 and len(shape) == 4:
        m[..., -1, :] = 3.0
    return m


def inputs(rng, b, hq, hk, sq, sk, dtype, scale=1.0, d=D):
    return tuple((rng.standard_normal(s) * scale).astype(dtype)
                 for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))


def check(out, lse, q, k, v, atol, sinks=None, **kw):
    """out and LSE against the reference, rows that see no key exactly (zeros, LSE -inf or the
    sink), and the mask must matter: without it the answer differs."""
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, sinks=sinks, **kw)
    assert max_err(out, ref) <= atol
    lse = np.asarray(lse, np.float64)
    fin = np.isfinite(ref_lse)
    assert np.array_equal(np.isfinite(lse), fin) and (lse[~fin] == ref_lse[~fin]).all()
    if fin.any():
        assert np.abs(lse[fin] - ref_lse[fin]).max() <= max(atol, 1e-5)
    no_key = np.isneginf(attention_reference(q, k, v, return_lse=True, **kw)[1])
    assert (np.asarray(out)[no_key] == 0).all(), "a row that sees no key must be exact zeros"
    if sinks is not None:
        sink = np.broadcast_to(np.asarray(sinks, np.float32)[:, None], no_key.shape)
        assert np.abs(lse[no_key] - sink[no_key]).max(initial=0) <= 1e-6
    plain, plain_lse = attention_reference(q, k, v, return_lse=True, sinks=sinks,
                                           **{n: x for n, x in kw.items() if n != "attn_mask"})
    with np.errstate(invalid="ignore"):   # -inf - -inf: rows that see no key either way
        moved = max(np.abs(plain - ref).max(), np.abs(np.nan_to_num(plain_lse - ref_lse, posinf=9, neginf=9)).max())
    assert moved > 10 * atol, "the mask must change the result"


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_each_variant_applies_general_masks(ctx, variant, kind, shape, case):
    b, hq, hk, sq, sk, causal, window = case
    dt = servable_dtype(ctx, variant, D, sq, sk)
    rng = np.random.default_rng([sum(case[:5]), len(shape), len(kind)])
    q, k, v = inputs(rng, b, hq, hk, sq, sk, dt)
    mask = make_mask(rng, SHAPES[shape](b, hq, sq, sk), kind)
    if shape == "b,1,sq,1" and sq == 1 and kind == "bool":
        mask[0] = False   # one row per batch element: hide the first element's
    kw = dict(causal=causal, window_size=window, attn_mask=mask)
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, backend="vulkan", return_lse=True, **kw)
    check(out, lse, q, k, v, VARIANT_ATOL[variant], **kw)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", ["b,hq,sq,sk", "sk", "b,1,sq,1"])
def test_masks_with_softcap_alibi_and_sinks(ctx, variant, shape):
    b, hq, hk, sq, sk = 2, 4, 2, 37, 45
    dt = servable_dtype(ctx, variant, D, sq, sk)
    rng = np.random.default_rng(len(shape))
    q, k, v = inputs(rng, b, hq, hk, sq, sk, dt, scale=2.0)  # scores of a few units: the cap at 5 matters
    mask = make_mask(rng, SHAPES[shape](b, hq, sq, sk), "float")
    if shape == "b,1,sq,1":
        mask[0, 0, 3:6] = -np.inf   # rows that see no key: zeros, LSE = the sink
    kw = dict(causal=True, attn_mask=mask, softcap=5.0, alibi_slopes=rng.uniform(0.05, 1.0, (b, hq)).astype(np.float32))
    sinks = rng.uniform(-1.0, 3.0, hq).astype(np.float32)
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, backend="vulkan", return_lse=True, sinks=sinks, **kw)
    check(out, lse, q, k, v, VARIANT_ATOL[variant], sinks=sinks, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kind", ["bool", "float", "bool-sinks"])
def test_fully_masked_rows_give_zeros(ctx, variant, kind):
    b, hq, hk, sq, sk = 2, 2, 1, 33, 40
    dt = servable_dtype(ctx, variant, D, sq, sk)
    rng = np.random.default_rng(len(kind))
    q, k, v = inputs(rng, b, hq, hk, sq, sk, dt)
    mask = make_mask(rng, (b, hq, sq, sk), kind[:5] if kind != "bool-sinks" else "bool")
    hidden = (0, 1, [0, 7, 32])   # batch 0, head 1: three rows see no key, the last one included
    mask[hidden] = False if mask.dtype == bool else -np.inf
    mask[1, :, :, 20:] = False if mask.dtype == bool else -np.inf   # keys no row of batch 1 sees
    sinks = rng.uniform(-1.0, 2.0, hq).astype(np.float32) if kind == "bool-sinks" else None
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, causal=False, attn_mask=mask, backend="vulkan",
                                        return_lse=True, sinks=sinks)
    check(out, lse, q, k, v, VARIANT_ATOL[variant], sinks=sinks, causal=False, attn_mask=mask)
    assert (out[hidden] == 0).all()
    assert (lse[hidden] == (-np.inf if sinks is None else sinks[1])).all()
    # Whatever the hidden keys' values hold, a row that sees no key stays zeros.
    v2 = v.copy()
    v2[1, :, 20:] = np.nan
    k2 = k.copy()
    k2[1, :, 20:] = np.inf
    with forced_variant(variant):
        out2 = aule.flash_attention(q, k2, v2, causal=False, attn_mask=mask, backend="vulkan", sinks=sinks)
    assert (out2[hidden] == 0).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_in_a_float_mask(ctx, variant):
    b, hq, hk, sq, sk = 1, 2, 2, 9, 9
    dt = servable_dtype(ctx, variant, D, sq, sk)
    rng = np.random.default_rng(8)
    q, k, v = inputs(rng, b, hq, hk, sq, sk, dt)
    mask = rng.standard_normal((b, hq, sq, sk)).astype(np.float32)
    mask[0, 0, 5, 2] = np.nan   # a key row 5 sees under causal: the row is NaN, LSE NaN
    mask[0, 1, 3, 7] = np.nan   # causal hides key 7 from row 3: no effect
    mask[0, 1, 4, 1] = np.nan   # hidden by -inf? no: NaN wins over a shown key only; -inf elsewhere
    mask[0, 1, 4, 0] = -np.inf
    with forced_variant(variant):
        out, lse = aule.flash_attention(q, k, v, causal=True, attn_mask=mask, backend="vulkan", return_lse=True)
    ref, ref_lse = attention_reference(q, k, v, causal=True, attn_mask=mask, return_lse=True)
    nan_rows = np.isnan(ref).any(-1)
    assert nan_rows[0, 0, 5] and nan_rows[0, 1, 4] and nan_rows.sum() == 2
    assert np.array_equal(np.isnan(out).all(-1), nan_rows) and not np.isnan(out[~nan_rows]).any()
    assert np.array_equal(np.isnan(lse), np.isnan(ref_lse))
    assert np.abs(out[~nan_rows] - ref[~nan_rows]).max() <= VARIANT_ATOL[variant]


def test_float16_inputs_and_masks(ctx):
    # float16 host data on the automatic choice (fp32 modules on a CPU device, fp16 elsewhere),
    # with a float16 mask, taken as float32 when validated.
    rng = np.random.default_rng(12)
    b, hq, hk, sq, sk = 2, 4, 1, 33, 97
    q, k, v = inputs(rng, b, hq, hk, sq, sk, np.float16)
    mask = make_mask(rng, (b, 1, sq, sk), "float").astype(np.float16)
    out, lse = aule.flash_attention(q, k, v, causal=True, attn_mask=mask, backend="vulkan", return_lse=True)
    assert out.dtype == np.float16
    check(out, lse, q, k, v, VARIANT_ATOL["fp16"], causal=True, attn_mask=mask)


def test_gpu_tensors_take_general_masks(ctx):
    from aule.backends.vulkan import to_gpu

    rng = np.random.default_rng(13)
    b, hq, hk, sq, sk = 2, 4, 2, 19, 40
    for dt, atol in ((np.float32, VARIANT_ATOL["cpu"]), (np.float16, VARIANT_ATOL["fp16"])):
        q, k, v = inputs(rng, b, hq, hk, sq, sk, dt, scale=2.0)
        sinks = rng.uniform(-1.0, 2.0, hq).astype(np.float32)
        for mask in (make_mask(rng, (b, hq, sq, sk), "float"), make_mask(rng, (b, 1, 1, sk), "bool")):
            kw = dict(causal=True, attn_mask=mask, softcap=5.0)
            gq, gk, gv = (to_gpu(x) for x in (q, k, v))
            out, lse = aule.flash_attention(gq, gk, gv, backend="vulkan", return_lse=True, sinks=sinks, **kw)
            check(out.numpy(), lse.numpy(), q, k, v, atol, sinks=sinks, **kw)
            for t in (gq, gk, gv, out, lse):
                t.free()


def test_cpu_torch_tensors_take_general_masks(ctx):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(14)
    b, hq, hk, sq, sk = 2, 4, 2, 33, 21
    q, k, v = inputs(rng, b, hq, hk, sq, sk, np.float32)
    t = [torch.from_numpy(x) for x in (q, k, v)]
    allowed = make_mask(rng, (b, 1, sq, sk), "bool")
    bias = torch.from_numpy(make_mask(rng, (hq, sq, sk), "float")).half()
    for mask, host in ((torch.from_numpy(allowed), allowed), (bias, bias.float().numpy())):
        out, lse = aule.flash_attention(*t, causal=True, attn_mask=mask, backend="vulkan", return_lse=True)
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
        check(out.numpy(), lse.numpy(), q, k, v, VARIANT_ATOL["cpu"], causal=True, attn_mask=host)


def test_sdpa_serves_general_masks_through_vulkan(ctx, monkeypatch):
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F
    from aule import torch_sdpa

    original = torch_sdpa.original_sdpa()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 40, generator=g) for n in (11, 23, 23))
    masks = (torch.rand(2, 1, 11, 23, generator=g) > 0.3, torch.randn(4, 11, 23, generator=g),
             (torch.arange(23) % 3 != 1)[None, None, None])   # padding with holes: general for the shaders
    for mask in masks:
        served = count_calls(monkeypatch, "aule.backends.vulkan.launch", "attention")
        with aule.installed(backend="vulkan"):
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        assert len(served) == 1, "Vulkan did not serve the masked call"
        want = original(q.double(), k.double(), v.double(),
                        attn_mask=mask if mask.dtype == torch.bool else mask.double())
        assert (got.double() - want).abs().max() <= 2e-5
        monkeypatch.undo()


def test_which_masks_are_general():
    # A padding mask of one run of keys per head keeps its span path (no mask binding); any other
    # mask is read per (row, key) from binding 6.
    from aule.backends.vulkan import plans

    q = np.zeros((2, 2, 5, 8), np.float32)
    k = np.zeros((2, 2, 9, 8), np.float32)
    cols = np.arange(9)
    run = (cols >= np.array([2, 0])[:, None]) & (cols < np.array([7, 9])[:, None])
    cases = {
        "prefix": (cols < 4, {"mask"}, None),
        "run per batch element": (run[:, None, None], {"mask"}, None),
        "0 / -inf run": (np.where(cols < 4, 0.0, -np.inf).astype(np.float32), {"mask"}, None),
        "hole": (cols % 3 != 1, {"mask", "general_mask"}, (1, 1, 1, 9)),
        "per row": (np.tril(np.ones((5, 9), bool)), {"mask", "general_mask"}, (1, 1, 5, 9)),
        "float keys": (np.linspace(-1, 1, 9, dtype=np.float32), {"mask", "general_mask"}, (1, 1, 1, 9)),
        "rows": (np.ones((2, 1, 5, 1), np.float32), {"mask", "general_mask"}, (2, 1, 5, 1)),
    }
    for name, (m, features, shape) in cases.items():
        call = canonicalize(q, k, k, attn_mask=m)
        assert call.features == features, name
        assert plans.mask_shape(call) == shape, name
        flags = plans.extras_flags(call)
        assert bool(flags & plans.EXTRAS_MASK) == (shape is not None), name
        assert bool(flags & plans.EXTRAS_SPAN) == call.mask.padding, name
        if shape is None:
            assert plans.mask_array(call) is None
        else:
            arr = plans.mask_array(call)
            assert arr.dtype == np.float32 and arr.shape == shape and arr.flags.c_contiguous
            dense = np.broadcast_to(arr, (2, 2, 5, 9))
            want = call.mask.dense((2, 2, 5, 9))
            if want.dtype == bool:
                want = np.where(want, 0, -np.inf)
            assert np.array_equal(dense, want), name
            # Each flat head's plane starts where its (batch, head) block of the broadcast array does.
            offsets = plans.extras_array(call)[4].reshape(2, 2)
            sb, sh, sr, sc = plans.mask_strides(shape)
            for bi in range(2):
                for hi in range(2):
                    assert arr.reshape(-1)[offsets[bi, hi] + 3 * sr + 4 * sc] == dense[bi, hi, 3, 4]


def test_earlier_refused_masks_are_served(ctx):
    q = np.random.default_rng(0).standard_normal((1, 2, 8, D)).astype(np.float32)
    for m in (np.arange(8) % 2 == 0, np.tril(np.ones((8, 8), bool))):
        out = aule.flash_attention(q, q, q, attn_mask=m, backend="vulkan")
        assert max_err(out, attention_reference(q, q, q, attn_mask=m)) <= 2e-5


@pytest.mark.parametrize("variant", ["baseline", "fast", "coopmat", "cpu"])
def test_masks_across_dispatch_chunks(ctx, monkeypatch, variant):
    # One (batch, kv-head) pair per dispatch: every chunk after the first finds its heads' planes
    # of the mask through x_base, the mask bound whole.
    from aule.backends.vulkan import launch

    b, hq, hk, sq, sk = 3, 4, 2, 13, 29
    dt = servable_dtype(ctx, variant, D, sq, sk)
    rng = np.random.default_rng(15)
    q, k, v = inputs(rng, b, hq, hk, sq, sk, dt)
    monkeypatch.setattr(ctx, "info", dataclasses.replace(ctx.info, max_workgroup_count=(
        ctx.info.max_workgroup_count[0], hq // hk, ctx.info.max_workgroup_count[2])))
    for mask in (make_mask(rng, (b, hq, sq, sk), "float"), make_mask(rng, (b, 1, 1, sk), "bool"),
                 make_mask(rng, (1, hq, sq, 1), "float")):
        kw = dict(causal=True, attn_mask=mask)
        with forced_variant(variant):
            assert len(launch.attention_plan_for(canonicalize(q, k, v, return_lse=True, **kw), ctx)[2]) == b * hk
            out, lse = aule.flash_attention(q, k, v, backend="vulkan", return_lse=True, **kw)
        check(out, lse, q, k, v, VARIANT_ATOL[variant], **kw)


def test_a_mask_beyond_the_storage_range_is_refused(ctx, monkeypatch):
    from aule import backends
    from aule.backends.vulkan import plans

    rng = np.random.default_rng(16)
    q, k, v = inputs(rng, 1, 2, 2, 32, 32, np.float32)
    # Room for one head of q, k or v (4 KiB each), not for a [1, 2, 32, 32] float32 mask (8 KiB).
    monkeypatch.setattr(ctx, "info", dataclasses.replace(
        ctx.info, max_storage_buffer_range=4096 + plans.offset_alignment(ctx.info)))
    big = make_mask(rng, (1, 2, 32, 32), "float")
    call = canonicalize(q, k, v, attn_mask=big)
    why = backends.get("vulkan").why_not("attention", call, True)
    assert why.startswith("the attn_mask takes 8192 bytes as float32 in its broadcast shape [1, 2, 32, 32], more "
                          "than the device's storage-buffer range") and "bound whole" in why
    with pytest.raises(aule.UnsupportedError, match="the attn_mask takes 8192 bytes"):
        aule.flash_attention(q, k, v, attn_mask=big, backend="vulkan")
    # The router moves on to a backend that serves it.
    assert max_err(aule.flash_attention(q, k, v, attn_mask=big), attention_reference(q, k, v, attn_mask=big)) <= 2e-5
    # A mask that fits (broadcast over batch and heads: 4 KiB) is served on the same device.
    small = make_mask(rng, (32, 32), "bool")
    out = aule.flash_attention(q, k, v, attn_mask=small, backend="vulkan")
    assert max_err(out, attention_reference(q, k, v, attn_mask=small)) <= 2e-5


def test_every_variant_applies_general_masks_matrix_cores_included(monkeypatch):
    from aule.backends.vulkan import VARIANTS as TABLE
    from aule.backends.vulkan import select
    from test_vulkan import NVIDIA_SHAPES, _recorded_device

    assert set(VARIANTS) == set(TABLE)
    assert all("general_mask" in TABLE[n].features and "mask" in TABLE[n].features for n in VARIANTS)
    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    h200 = _recorded_device(name="NVIDIA H200", vendor="NVIDIA", shared=49152, coopmat=NVIDIA_SHAPES)
    assert select.select("float16", 128, h200).name == "coopmat"
    assert select.select("float16", 128, h200, features=frozenset({"mask", "general_mask"})).name == "coopmat"


def test_float16_masks_on_a_matrix_core_device(ctx, monkeypatch):
    # GPU only: where coopmat is selectable, a masked float16 call goes where a plain one goes (the
    # router's choice on NVIDIA is coopmat), GpuTensors and a mask read per (row, key).
    from aule.backends.vulkan import launch, to_gpu

    if not ctx.info.coopmat_f16:
        pytest.skip(f"{ctx.info.name} has no cooperative matrix: the matrix-core variant cannot be selected")
    monkeypatch.delenv("AULE_VULKAN_VARIANT", raising=False)
    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    rng = np.random.default_rng(17)
    b, hq, hk, sq, sk, d = 2, 8, 2, 129, 257, 128
    q, k, v = inputs(rng, b, hq, hk, sq, sk, np.float16, d=d)
    for mask in (make_mask(rng, (b, 1, sq, sk), "float"), make_mask(rng, (b, hq, sq, sk), "bool")):
        gq, gk, gv = (to_gpu(x) for x in (q, k, v))
        plain = launch.attention_plan_for(canonicalize(gq, gk, gv, causal=True), ctx)[0]
        variant = launch.attention_plan_for(canonicalize(gq, gk, gv, causal=True, attn_mask=mask), ctx)[0]
        assert variant is plain and "general_mask" in variant.features
        if ctx.info.vendor == "NVIDIA":
            assert variant.name == "coopmat"
        out, lse = aule.flash_attention(gq, gk, gv, causal=True, attn_mask=mask, backend="vulkan", return_lse=True)
        check(out.numpy(), lse.numpy(), q, k, v, VARIANT_ATOL[variant.name], causal=True, attn_mask=mask)
        for t in (gq, gk, gv, out, lse):
            t.free()


def test_every_attention_module_binds_the_mask(ctx):
    # The plan's ranges, the module's descriptor layout and the shaders' bindings agree: seven, the
    # mask last, for every attention module (coopmat too, which declares it through attn_common.glsl).
    from aule.backends.vulkan import VARIANTS as TABLE
    from aule.backends.vulkan import plans

    for name, m in TABLE.items():
        assert m.bindings == 7, name
        assert m.push.itemsize <= 128
        if m.unfit(64, ctx.info, 20, 10) is None:
            _, chunks = plans.attention_plan(m, plans.Shape(1, 2, 1, 10, 20, 64), 0.125, -1, 0, True, ctx.info,
                                             None, 0.0, plans.EXTRAS_MASK, (1, 1, 10, 20))
            assert all(len(r) == m.bindings and r[-1] == (0, 4 * 10 * 20) for _, r, _ in chunks)

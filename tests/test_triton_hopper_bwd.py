"""The Hopper backward (aule/backends/triton/hopper_bwd.py) against float64 autograd and against the
general backward kernels, its routing under AULE_TRITON_HOPPER_BWD, and its sm_90 compile.

Without a GPU the kernels run under Triton's interpreter (TMA descriptors included: zero-filled
reads past a tensor's end, clipped writes), float16 at small odd shapes, forced through
``ops.attention_backward(..., hopper_bwd_variant=...)``. The GPU tests need an sm_90 device
(bfloat16, full size) and skip elsewhere.
"""
from __future__ import annotations

import pytest

from triton_setup import import_torch_and_triton, run_compile_check

torch, GPU = import_torch_and_triton()

from aule import masks, settings  # noqa: E402
from aule.backends.triton import hopper_bwd, ops  # noqa: E402
from test_triton import GRAD_TOL, ref_torch, rel_err  # noqa: E402

DEV = "cuda" if GPU else "cpu"
HOPPER = GPU and torch.cuda.get_device_capability()[0] == 9
hopper_only = pytest.mark.skipif(not HOPPER, reason="needs an sm_90 (Hopper) CUDA device")
on_hopper_or_cpu = pytest.mark.skipif(GPU and not HOPPER, reason="the Hopper backward's descriptors are for sm_90")

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window): sequences that are not
# multiples of the tile, GQA 4 and MQA (dK/dV summed over the group), seq_q != seq_k both ways,
# head_dim padded (40, 80, 24), windows one- and two-sided, rows that see no key.
CASES = [
    (1, 2, 2, 97, 97, 64, False, -1),
    (2, 4, 1, 113, 70, 40, True, -1),
    (1, 8, 2, 33, 129, 80, True, -1),
    (1, 4, 4, 70, 33, 24, True, -1),     # more queries than keys: the first rows see no key
    (1, 2, 1, 81, 97, 64, True, 20),     # sliding window (Mistral) on a causal mask
    (1, 2, 2, 65, 65, 16, False, (9, 5)),  # a two-sided window: masked runs on both sides
    (1, 1, 1, 1, 53, 32, False, -1),     # one query row
]
_IDS = ["b{}h{}/{}q{}k{}d{}{}w{}".format(*c[:6], "c" if c[6] else "", c[7]) for c in CASES]


def _inputs(case, seed=0, dtype=torch.float16):
    b, hq, hkv, sq, sk, d = case[:6]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(DEV, dtype)
               for shape in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)))
    dout = torch.randn((b, hq, sq, d), generator=g).to(DEV, dtype)
    return q, k, v, dout


def _grads(case, variant, dtype=torch.float16, tile=None, dlse=False):
    """``(hopper grads, general grads, float64 grads)`` of one case: the Hopper backward ``variant``
    and the general kernels on the same forward's out and LSE, and autograd on the float64 reference."""
    q, k, v, dout = _inputs(case, dtype=dtype)
    left, right = masks.canonical_window(case[6], case[7])
    scale = case[5] ** -0.5
    out, lse = ops.attention_forward(q, k, v, scale, left, right)
    g = torch.Generator().manual_seed(3)
    up = torch.randn(lse.shape, generator=g).to(DEV) if dlse else None
    got = ops.attention_backward(dout, q, k, v, out, lse, up, scale, left, right, tile_dkdv=tile, tile_dq=tile,
                                 hopper_bwd_variant=variant)[:3]
    general = ops.attention_backward(dout, q, k, v, out, lse, up, scale, left, right, hopper_bwd_variant=False)[:3]
    qd, kd, vd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    ro, rl = ref_torch(qd, kd, vd, scale, left, right)
    loss = (ro * dout.double().cpu()).sum()
    if dlse:
        loss = loss + (torch.where(torch.isfinite(rl), rl, torch.zeros_like(rl)) * up.double().cpu()).sum()
    loss.backward()
    return got, general, (qd.grad, kd.grad, vd.grad)


@on_hopper_or_cpu
@pytest.mark.parametrize("variant", list(hopper_bwd.VARIANTS))
@pytest.mark.parametrize("case", CASES, ids=_IDS)
def test_hopper_backward_matches_reference_and_general(variant, case):
    got, general, want = _grads(case, variant)
    for name, g, w, same in zip(("dq", "dk", "dv"), got, want, general):
        assert g.shape == w.shape and g.dtype == torch.float16, name
        e = rel_err(g, w)
        assert e <= GRAD_TOL["float16"], f"{name} relative error {e:.3g} > {GRAD_TOL['float16']}"
        # The general kernels on the interpreter's tile compute in the same order: the tma and fused
        # variants are bit for bit theirs, and the atomic one differs only in how dQ's tiles are summed.
        exact = not GPU and (variant != "atomic" or name != "dq")
        diff = (g.float() - same.float()).abs().max().item()
        assert diff <= (0 if exact else 2e-3 * max(same.float().abs().max().item(), 1.0)), f"{name}: {diff:.3g}"


@on_hopper_or_cpu
@pytest.mark.parametrize("variant", list(hopper_bwd.VARIANTS))
def test_lse_gradient_and_other_tiles(variant):
    """An upstream LSE gradient (it enters through delta, in the shared preprocess) and a tile of
    64 key rows by 16 query rows, which moves every run boundary (the fused kernel's dQ programs:
    16 query rows by 64 keys too)."""
    case = (1, 4, 2, 75, 90, 48, True, -1)
    got, _, want = _grads(case, variant, tile=(16, 64, 16, 64) if variant == "fused" else (16, 64), dlse=True)
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert rel_err(g, w) <= GRAD_TOL["float16"], name


@on_hopper_or_cpu
def test_broadcast_upstream_gradient():
    """``out.sum()``'s gradient arrives with stride 0, which TMA cannot address: it is copied, and
    the gradients are the general kernels'."""
    q, k, v, _ = _inputs((1, 2, 2, 40, 40, 32))
    out, lse = ops.attention_forward(q, k, v, 0.2, -1, 0)
    ones = torch.ones((), dtype=q.dtype, device=DEV).expand_as(out)
    got = ops.attention_backward(ones, q, k, v, out, lse, None, 0.2, -1, 0, hopper_bwd_variant="tma")[:3]
    want = ops.attention_backward(ones, q, k, v, out, lse, None, 0.2, -1, 0, hopper_bwd_variant=False)[:3]
    for g, w in zip(got, want):
        assert torch.allclose(g.float(), w.float(), atol=0 if not GPU else 2e-3, rtol=0)


def test_setting_parses_and_rejects(monkeypatch):
    for raw, want in (("", "auto"), ("auto", "auto"), ("0", None), ("off", None), ("1", "tma"), ("tma", "tma"),
                      (" Atomic ", "atomic"), ("fused", "fused")):
        monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", raw)
        assert settings.triton_hopper_bwd() == want
    monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", "ws")
    with pytest.raises(ValueError, match="AULE_TRITON_HOPPER_BWD='ws'"):
        settings.triton_hopper_bwd()


def test_variant_for_routes_only_plain_sm90_calls(monkeypatch):
    q, k, v, _ = _inputs((1, 2, 2, 16, 16, 64))
    monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", "tma")
    # A CPU tensor (the interpreter) is never routed there by the setting: only CUDA sm_90 is.
    assert hopper_bwd.variant_for(q, k, v, False) == ("tma" if HOPPER else None)
    assert hopper_bwd.variant_for(q, k, v, True) is None           # features stay on the general kernels
    assert hopper_bwd.variant_for(q, k, v, False, False) is None   # forced off
    # Unset: the variant measured faster for the call's class, where one was.
    monkeypatch.delenv("AULE_TRITON_HOPPER_BWD")
    monkeypatch.setattr(hopper_bwd, "MEASURED", {(64, True): "fused"})
    assert hopper_bwd.variant_for(q, k, v, False, right=0) == ("fused" if HOPPER else None)
    assert hopper_bwd.variant_for(q, k, v, False, right=-1) is None
    monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", "0")
    assert hopper_bwd.variant_for(q, k, v, False, right=0) is None
    monkeypatch.setattr(hopper_bwd, "_capability", lambda index: (8, 0))
    if GPU:
        assert hopper_bwd.variant_for(q, k, v, False) is None
    # Forced: served, or refused with the rule named.
    assert hopper_bwd.variant_for(q, k, v, False, "atomic") == "atomic"
    with pytest.raises(ValueError, match="hopper_bwd must be one of"):
        hopper_bwd.variant_for(q, k, v, False, "pingpong")
    with pytest.raises(ValueError, match="features only the general"):
        hopper_bwd.variant_for(q, k, v, True, "tma")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        hopper_bwd.variant_for(q.float(), k.float(), v.float(), False, "tma")
    big = [torch.zeros((1, 1, 8, 192), dtype=q.dtype, device=DEV)] * 3
    with pytest.raises(ValueError, match="head_dim up to 128"):
        hopper_bwd.variant_for(*big, False, "tma")
    with pytest.raises(ValueError, match="strides TMA"):
        hopper_bwd.variant_for(q, k.transpose(-1, -2), v, False, "tma")
    with pytest.raises(ValueError, match="variant must be one of"):
        hopper_bwd.backward(q, q, k, v, None, None, q, k, v, 1.0, -1, -1, "pingpong")


@on_hopper_or_cpu
def test_attention_backward_asks_with_the_calls_features(monkeypatch):
    """ops.attention_backward hands a call to the Hopper backward exactly when variant_for says so,
    telling it whether the call has features (softcap, ALiBi, sinks, masks, packing)."""
    q, k, v, dout = _inputs((1, 2, 1, 37, 45, 32))
    seen, served = [], []

    def variant_for(q_, k_, v_, features, forced=None, right=-1):
        seen.append(features)
        return None if features or forced is False else "tma"

    real = hopper_bwd.backward
    monkeypatch.setattr(hopper_bwd, "variant_for", variant_for)
    monkeypatch.setattr(hopper_bwd, "backward", lambda *a, **kw: served.append(a[12]) or real(*a, **kw))
    out, lse = ops.attention_forward(q, k, v, 0.3, -1, 0)
    ops.attention_backward(dout, q, k, v, out, lse, None, 0.3, -1, 0)
    out2, lse2 = ops.attention_forward(q, k, v, 0.3, -1, 0, softcap=5.0)
    ops.attention_backward(dout, q, k, v, out2, lse2, None, 0.3, -1, 0, softcap=5.0)
    sinks = torch.zeros(2, device=DEV)
    out3, lse3 = ops.attention_forward(q, k, v, 0.3, -1, 0, sinks=sinks)
    *_, dsinks = ops.attention_backward(dout, q, k, v, out3, lse3, None, 0.3, -1, 0, sinks=sinks)
    assert seen == [False, True, True] and served == ["tma"]
    assert dsinks.shape == (2,)
    # A forced tile is the general kernels' (test_triton's tile-run tests keep theirs).
    ops.attention_backward(dout, q, k, v, out, lse, None, 0.3, -1, 0, tile_dkdv=(32, 32), tile_dq=(32, 32))
    assert served == ["tma"]


def test_tiles_and_configs():
    """Every kernel has a tile row per head-dim class; the atomic variant's dK/dV rows are its own
    and its tuner takes the first untimed (timing would add into dQ again)."""
    for kernel in ("dkdv", "dkdv_atomic", "dq", "fused"):
        for d in (32, 64, 80, 128):
            assert hopper_bwd.tiles(kernel, d)
        with pytest.raises(ValueError, match="head_dim up to"):
            hopper_bwd.tiles(kernel, 136)
    assert [c.kwargs["BLOCK_M"] for c in hopper_bwd._configs("dkdv", 128, True)] == \
        [t[0] for t in hopper_bwd.tiles("dkdv_atomic", 128)]
    fused = hopper_bwd._configs("fused", 64)[0]
    assert (fused.kwargs, fused.num_warps, fused.num_stages) == (
        dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_M2", "BLOCK_N2"), hopper_bwd.tiles("fused", 64)[0][:4])),
        *hopper_bwd.tiles("fused", 64)[0][4:])


def test_compiles_for_sm90_with_tma_and_wgmma():
    """Every Hopper backward tile compiles for sm_90 without spills, within shared memory, with TMA
    loads and wgmma products (tests/hopper_bwd_compile_check.py, which also reports the general
    kernels' resources beside them)."""
    run_compile_check("hopper_bwd_compile_check.py", timeout=900)


@hopper_only
@pytest.mark.parametrize("variant", list(hopper_bwd.VARIANTS))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", [(2, 16, 4, 1031, 1031, 128), (1, 32, 32, 2048, 2048, 64),
                                   (1, 8, 8, 777, 1500, 80), (2, 16, 4, 1024, 2048, 128)])
def test_gpu_hopper_backward_matches_general(monkeypatch, variant, causal, shape):
    """On the H200: each variant through aule's routing (AULE_TRITON_HOPPER_BWD) against the general
    kernels, bfloat16 at full size, autotuned, and one head against float64 autograd."""
    q, k, v, dout = _inputs(shape, dtype=torch.bfloat16)
    left, right = masks.canonical_window(causal, -1)
    d = shape[5]
    monkeypatch.delenv("AULE_TRITON_HOPPER", raising=False)
    out, lse = ops.attention_forward(q, k, v, d ** -0.5, left, right)
    monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", "0")
    want = ops.attention_backward(dout, q, k, v, out, lse, None, d ** -0.5, left, right)[:3]
    monkeypatch.setenv("AULE_TRITON_HOPPER_BWD", variant)
    assert hopper_bwd.variant_for(q, k, v, False) == variant
    got = ops.attention_backward(dout, q, k, v, out, lse, None, d ** -0.5, left, right)[:3]
    for name, g, w in zip(("dq", "dk", "dv"), got, want):
        assert torch.isfinite(g).all(), name
        err = (g.float() - w.float()).abs().max().item() / w.float().abs().max().item()
        assert err < 2e-2, f"{name}: {err:.3g}"
    one = (slice(0, 1), slice(0, 1))
    group = shape[1] // shape[2]
    qd, kd, vd = (t[one].detach().double().cpu().requires_grad_() for t in (q, k, v))
    ro, _ = ref_torch(qd, kd, vd, d ** -0.5, left, right)
    (ro * dout[one].double().cpu()).sum().backward()
    assert rel_err(got[0][one], qd.grad) <= GRAD_TOL["bfloat16"]
    if group == 1:  # with GQA the first KV head's gradients sum over its group, not one head
        assert rel_err(got[1][one], kd.grad) <= GRAD_TOL["bfloat16"]
        assert rel_err(got[2][one], vd.grad) <= GRAD_TOL["bfloat16"]


@hopper_only
@pytest.mark.parametrize("variant", ["tma", "fused"])
def test_gpu_deterministic_variants_are(variant):
    """The deterministic variants' gradients are the same bits on every run, and the same bits as
    each other at the same tiles."""
    q, k, v, dout = _inputs((2, 16, 4, 2048, 2048, 128), dtype=torch.bfloat16)
    out, lse = ops.attention_forward(q, k, v, 128 ** -0.5, -1, 0)
    tile = hopper_bwd.tiles("fused", 128)[0]
    tiles = dict(tile_dkdv=tile) if variant == "fused" else dict(tile_dkdv=(*tile[:2], *tile[4:]),
                                                                 tile_dq=(*tile[2:4], *tile[4:]))
    runs = [ops.attention_backward(dout, q, k, v, out, lse, None, 128 ** -0.5, -1, 0, hopper_bwd_variant=variant,
                                   **tiles)[:3] for _ in range(3)]
    for later in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], later))
    if variant == "fused":
        tma = ops.attention_backward(dout, q, k, v, out, lse, None, 128 ** -0.5, -1, 0, hopper_bwd_variant="tma",
                                     tile_dkdv=(*tile[:2], *tile[4:]), tile_dq=(*tile[2:4], *tile[4:]))[:3]
        assert all(torch.equal(a, b) for a, b in zip(runs[0], tma))

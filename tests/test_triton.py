"""The Triton backends against the float64 reference, forward and backward.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (small shapes, float16
and float32; the interpreter's bfloat16 dot is broken). With a CUDA/ROCm device the same tests run
there, plus full-size shapes, bfloat16, ``torch.library.opcheck`` and ``torch.compile``.
Gradients are checked against torch autograd through a float64 reference built on aule.masks.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import masks  # noqa: E402
from aule.backends.triton import TritonBackend  # noqa: E402
from aule.backends.triton import kernels, ops  # noqa: E402
from aule.call import canonicalize, check_alibi  # noqa: E402
from aule.reference import attention_reference  # noqa: E402

DEV = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA/ROCm device (these run at full size)")

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Max abs error on O(1) outputs; gradients are compared relative to their largest element.
OUT_TOL = {"float32": 5e-5, "float16": 3e-3, "bfloat16": 2.5e-2}
GRAD_TOL = {"float32": 1e-4, "float16": 6e-3, "bfloat16": 4e-2}


def ref_torch(q, k, v, scale, left, right, softcap=0.0, slopes=None, sinks=None, attn_mask=None):
    """float64 attention with autograd, GQA by repeat (fine for an oracle); mask, softcap and ALiBi
    (``slopes [B, Hq]``) from aule.masks; ``sinks`` (a float64 ``[Hq]`` tensor, its gradient
    wanted) as one more term of each row's denominator, ``LSE = log(e^sink + sum_j e^s_j)``;
    ``attn_mask`` (NumPy, SDPA's convention) hiding (bool False, float -inf) or adding to scores."""
    sq, sk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    vis = torch.from_numpy(masks.mask(sq, sk, left, right))
    s = (q @ k.repeat_interleave(g, 1).transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        s = s + torch.from_numpy(masks.alibi_bias(np.arange(sq)[:, None], np.arange(sk)[None, :], sq, sk,
                                                  slopes.astype(np.float64)))
    if attn_mask is not None:
        m = torch.from_numpy(np.asarray(attn_mask))
        if m.dtype == torch.bool:
            vis = vis & m
        else:
            s = s + m.double()
            vis = vis & ~torch.isneginf(m)
    s = s.masked_fill(~vis, float("-inf"))
    if sinks is not None:
        terms = torch.cat([s, sinks[None, :, None, None].expand(*s.shape[:3], 1)], -1)
        lse = torch.logsumexp(terms, -1)
    else:
        lse = torch.logsumexp(s, -1)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.where(vis, torch.exp(s - safe[..., None]), torch.zeros_like(s))
    return p @ v.repeat_interleave(g, 1), lse


def make(b, hq, hk, sq, sk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=torch.float32).to(DT[dtype]).to(DEV)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def rel_err(got, want):
    want = want.detach().double().cpu()
    got = got.detach().double().cpu()
    assert not torch.isnan(got).any(), "NaN in result"
    return ((got - want).abs().max() / want.abs().max().clamp_min(0.1)).item()


def check_fwd_bwd(q, k, v, scale, left, right, dtype, tile=None, lse_grad=False, softcap=0.0, alibi=None,
                  sinks=None, attn_mask=None):
    """Forward (out, lse) against aule.reference and backward against float64 autograd; without a
    tile through the backend (as aule's router calls it), with one through the kernels' launcher.
    ``alibi``: NumPy slopes as a caller gives them, ``[Hq]`` or ``[B, Hq]``; ``sinks``: NumPy
    float32 ``[Hq]``, learned (their gradient is checked too); ``attn_mask``: NumPy, as SDPA's."""
    slopes = check_alibi(alibi, q.shape[0], q.shape[1])
    sinks_t = None if sinks is None else torch.from_numpy(sinks).to(DEV).requires_grad_()
    if tile is None:
        qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
        call = canonicalize(qg, kg, vg, causal=False, scale=scale, window_size=(left, right), return_lse=True,
                            softcap=softcap, alibi_slopes=alibi, sinks=sinks_t, attn_mask=attn_mask)
        out, lse = TritonBackend().attention(call)
    else:
        alibi_t = None if slopes is None else torch.from_numpy(slopes).to(DEV)
        held = canonicalize(q, k, v, attn_mask=attn_mask).mask
        kspan, mask_t = ops.mask_tensors(held, q.shape[0], q.shape[1], q.device)
        spec = dict(softcap=softcap, alibi=alibi_t, sinks=None if sinks_t is None else sinks_t.detach(),
                    kspan=kspan, mask=mask_t)
        out, lse = ops.attention_forward(q, k, v, scale, left, right, tile=tile, **spec)
    np_in = [x.detach().float().cpu().numpy() for x in (q, k, v)]
    ref_out, ref_lse = attention_reference(*np_in, causal=False, scale=scale, window_size=(left, right),
                                           return_lse=True, softcap=softcap, alibi_slopes=alibi, sinks=sinks,
                                           attn_mask=attn_mask)
    got = out.detach().double().cpu().numpy()
    assert out.dtype == q.dtype and out.shape == q.shape
    assert not np.isnan(got).any()
    err = np.abs(got - ref_out).max()
    assert err <= OUT_TOL[dtype], f"output error {err:.3g} > {OUT_TOL[dtype]}"
    lse_np = lse.detach().double().cpu().numpy()
    empty = np.isneginf(ref_lse)
    assert (np.isneginf(lse_np) == empty).all(), "LSE -inf exactly for rows that see no key"
    if (~empty).any():
        lse_err, lse_tol = np.abs(lse_np[~empty] - ref_lse[~empty]).max(), 1e-4 if dtype == "float32" else 5e-3
        if softcap and ops._tanh_kind(q, softcap) == kernels.TANH_APPROX:
            # tanh.approx's contract (kernels._tanh): capped scores within softcap * 2^-10.99, and
            # the LSE is a weighted mean of them, so its error may reach that bound, not less.
            lse_tol = max(lse_tol, softcap * 2.0 ** -10.98)
        assert lse_err <= lse_tol, f"LSE error {lse_err:.3g} > {lse_tol}"

    qd, kd, vd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    sd = None if sinks is None else torch.from_numpy(sinks).double().requires_grad_()
    ro, rl = ref_torch(qd, kd, vd, scale, left, right, softcap, slopes, sd, attn_mask)
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(rl.shape, generator=g, dtype=torch.float64) if lse_grad else None
    loss = (ro * dout).sum()
    if lse_grad:
        loss = loss + (torch.where(torch.isfinite(rl), rl, torch.zeros_like(rl)) * dl).sum()
    loss.backward()
    dout_t = dout.to(q.dtype).to(DEV)
    if tile is None:
        loss = (out.float() * dout_t.float()).sum()
        if lse_grad:
            lse_f = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
            loss = loss + (lse_f * dl.float().to(DEV)).sum()
        loss.backward()
        grads = (qg.grad, kg.grad, vg.grad)
        dsinks = None if sinks_t is None else sinks_t.grad
    else:
        *grads, dsinks = ops.attention_backward(dout_t, q, k, v, out, lse,
                                                dl.float().to(DEV) if lse_grad else None,
                                                scale, left, right, tile_dkdv=tile, tile_dq=tile, **spec)
    for name, got_g, want in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        assert got_g.shape == want.shape and got_g.dtype == q.dtype
        e = rel_err(got_g, want)
        assert e <= GRAD_TOL[dtype], f"{name} relative error {e:.3g} > {GRAD_TOL[dtype]}"
    if sinks is not None:
        assert dsinks is not None and dsinks.shape == sd.shape, "no gradient reached the sinks"
        e = rel_err(dsinks, sd.grad)
        assert e <= GRAD_TOL[dtype], f"dsinks relative error {e:.3g} > {GRAD_TOL[dtype]}"


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype)
SMALL = [
    (1, 2, 2, 1, 1, 64, True, -1, "float32"),
    (1, 2, 1, 37, 53, 40, True, -1, "float16"),
    (2, 4, 1, 33, 33, 80, False, -1, "float32"),
    (1, 8, 1, 20, 31, 64, True, -1, "float16"),
    (1, 2, 2, 97, 45, 96, True, -1, "float32"),       # seq_q > seq_k: first rows see no key
    (1, 4, 1, 45, 97, 16, False, (10, 3), "float32"),
    (1, 2, 2, 113, 113, 128, True, 16, "float16"),     # Mistral-style int window
    (1, 2, 1, 40, 64, 192, False, -1, "float32"),
    (1, 1, 1, 30, 50, 256, True, -1, "float16"),
    (1, 2, 2, 50, 70, 24, False, (-1, 5), "float32"),
    (1, 2, 2, 50, 70, 32, False, (7, -1), "float32"),
]

FULL = [
    (2, 8, 8, 1025, 1025, 128, True, -1, "bfloat16"),
    (1, 8, 1, 97, 1025, 64, True, -1, "float16"),
    (1, 16, 2, 1025, 97, 80, True, -1, "bfloat16"),   # empty rows at full size
    (2, 8, 8, 113, 113, 256, False, -1, "float16"),
    (1, 32, 4, 1025, 1025, 192, False, 256, "bfloat16"),
    (1, 4, 4, 1025, 2048, 96, False, (128, 64), "float32"),
    (1, 8, 2, 1025, 1025, 40, True, (300, -1), "float16"),
]


def _run(case, seed, tile=None, lse_grad=False):
    b, hq, hk, sq, sk, d, causal, window, dtype = case
    if GPU and ops.fp32_refusal(dtype, d, "cuda"):
        pytest.skip(ops.fp32_refusal(dtype, d, "cuda"))
    left, right = masks.canonical_window(causal, window)
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, seed)
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=tile, lse_grad=lse_grad)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_small_forward_backward(case):
    _run(case, seed=zlib.crc32(repr(case).encode()) & 0xFFFF)


# Tiles of unequal height and width exercise the three tile runs (masked / full / masked).
# On a GPU each tile and case is a separate compilation: one tile and one case there (the tables'
# tiles run in test_full_size), three of each in the interpreter.
TILE_CASES = [
    (1, 2, 2, 90, 90, 48, True, 33, "float16"),
    (1, 4, 2, 70, 45, 64, True, -1, "float32"),
    (1, 2, 1, 45, 130, 32, False, (20, 9), "float32"),
]


@pytest.mark.parametrize("tile", [(64, 32)] if GPU else [(16, 32), (32, 16), (64, 16)])
@pytest.mark.parametrize("case", TILE_CASES[:1] if GPU else TILE_CASES,
                         ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_tile_runs(case, tile):
    _run(case, seed=3, tile=tile)


# Score modifiers: (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype, softcap,
# alibi), alibi None or the slopes' shape as a caller passes them ("heads" [Hq], "batch" [B, Hq]).
FEATURES = [
    (1, 2, 2, 1, 1, 16, True, -1, "float32", 5.0, None),          # one key: only the LSE sees the cap
    (2, 4, 2, 7, 33, 32, True, -1, "float16", 30.0, "heads"),
    (1, 4, 1, 33, 33, 80, False, -1, "float32", 5.0, "batch"),
    (2, 2, 1, 33, 7, 16, True, -1, "float32", 0.0, "batch"),      # seq_q > seq_k: rows without keys
    (1, 2, 2, 33, 33, 32, False, (5, 3), "float16", 5.0, "heads"),
    (1, 4, 2, 7, 33, 80, False, 9, "float32", 30.0, None),
    (2, 2, 2, 1, 33, 32, False, -1, "float32", 0.0, "heads"),     # decode row
]


def _run_features(case, tile=None):
    b, hq, hk, sq, sk, d, causal, window, dtype, softcap, alibi = case
    left, right = masks.canonical_window(causal, window)
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, zlib.crc32(repr(case).encode()) & 0xFFFF)
    q, k = q * 4, k * 4  # scores of std 16: the cap and the bias both change the softmax (x4 is exact)
    rng = np.random.default_rng(sq * 1000 + sk)
    slopes = None if alibi is None else rng.uniform(0.05, 1.0, (b, hq) if alibi == "batch" else (hq,)).astype(np.float32)
    np_in = [x.float().cpu().numpy() for x in (q, k, v)]
    plain = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True)
    modified = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True, softcap=softcap,
                                   alibi_slopes=slopes)
    seen = np.isfinite(plain[1])
    changed = max(np.abs(plain[0] - modified[0]).max(), np.abs(plain[1][seen] - modified[1][seen]).max())
    assert changed > 0.1, f"the case must be one the features change (by {changed:.3g})"
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=tile, lse_grad=True, softcap=softcap, alibi=slopes)


@pytest.mark.parametrize("case", FEATURES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_softcap_alibi_forward_backward(case):
    _run_features(case)


@pytest.mark.parametrize("tile", [(16, 32), (32, 16)])
def test_softcap_alibi_tile_runs(tile):
    """Masked and fully visible tile runs both apply the modifiers, in the forward, dK/dV and dQ."""
    _run_features((2, 2, 1, 45, 70, 32, False, (40, 20), "float32", 5.0, "batch"), tile=tile)


def test_routing_admits_softcap_and_alibi(monkeypatch):
    """The router's feature check (Backend.why_not) passes Triton for calls with both modifiers."""
    q, k, v = make(1, 2, 1, 8, 8, 16, "float32", 1)
    call = canonicalize(q, k, v, softcap=3.0, alibi_slopes=np.array([0.5, 0.25], np.float32))
    assert call.features == {"softcap", "alibi"}
    b = TritonBackend()
    monkeypatch.setitem(b.__dict__, "unavailable_reason", None)  # as if a GPU were here
    assert b.why_not("attention", call, forced=True) == b.why_not_attention(call, forced=True)
    assert "does not apply" not in (b.why_not("attention", call, forced=True) or "")


def test_lse_gradient_flows():
    _run((1, 4, 2, 37, 50, 32, True, -1, "float32"), seed=11, lse_grad=True)


def test_noncontiguous_inputs_and_custom_scale():
    b, s, h, d = 2, 45, 4, 64
    g = torch.Generator().manual_seed(5)
    # [B, S, H, D] storage seen as [B, H, S, D]; k/v with a head_dim stride of 2.
    q = torch.randn(b, s, h, d, generator=g).to(DEV).transpose(1, 2)
    kv = torch.randn(2, b, 2, 60, 2 * d, generator=g).to(DEV)
    k, v = kv[0, ..., ::2], kv[1, ..., 1::2]
    assert not q.is_contiguous() and not k.is_contiguous()
    check_fwd_bwd(q, k, v, 0.37, -1, 0, "float32")


def test_empty_rows_zero_output_and_grads():
    q, k, v = make(1, 2, 1, 40, 16, 32, "float32", 2)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse = ops.triton_attention(q, k, v, 0.2, -1, 0)  # causal, seq_q > seq_k
    out.sum().backward()
    assert torch.all(out[:, :, :24] == 0) and torch.isneginf(lse[:, :, :24]).all()
    assert torch.all(q.grad[:, :, :24] == 0)
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_backend_forward_returns_lse_and_grads():
    q, k, v = make(1, 4, 2, 30, 30, 32, "float32", 9)
    q.requires_grad_()
    call = canonicalize(q, k, v, causal=True, scale=0.3, window_size=8, return_lse=True)
    b = TritonBackend()
    assert b.why_not_attention(call, forced=True) is None or not GPU and not ops.interpreting()
    out, lse = b.attention(call)
    ref = attention_reference(*(x.detach().cpu().numpy() for x in (q, k, v)), causal=True,
                              scale=0.3, window_size=8)
    assert np.abs(out.detach().cpu().numpy() - ref).max() < OUT_TOL["float32"]
    assert lse.shape == (1, 4, 30) and lse.dtype == torch.float32
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_unsupported_reasons():
    b = TritonBackend()
    npc = canonicalize(*(np.zeros((1, 1, 4, 16), np.float32) for _ in range(3)))
    assert "torch tensors" in b.why_not_attention(npc, forced=True)
    big = canonicalize(*(torch.zeros(1, 1, 4, 512) for _ in range(3)))
    assert "head_dim" in b.why_not_attention(big, forced=True)
    f64 = canonicalize(*(torch.zeros(1, 1, 4, 16, dtype=torch.float64) for _ in range(3)))
    assert "float64" in b.why_not_attention(f64, forced=True)


@pytest.mark.skipif(GPU, reason="checks the refusal on a machine without a GPU")
def test_forced_without_gpu_raises_with_reason():
    from aule.backends import get

    reason = get("triton").unavailable_reason
    assert reason and ("CPU-only" in reason or "no CUDA" in reason or "ROCm" in reason)
    x = torch.randn(1, 1, 8, 16)
    with pytest.raises(aule.UnsupportedError, match="triton"):
        aule.flash_attention(x, x, x, backend="triton")


@pytest.mark.parametrize("modified", [False, True], ids=["plain", "softcap-alibi"])
def test_opcheck(modified):
    q, k, v = make(1, 4, 2, 24, 40, 32, "float32", 4)
    extra = (3.0, torch.rand(1, 4).to(DEV)) if modified else (0.0, None)
    args = tuple(x.requires_grad_() for x in (q, k, v)) + (0.2, -1, 0) + extra
    torch.library.opcheck(torch.ops.aule.triton_attention_fwd.default, args)


def test_only_untraced_inference_skips_the_custom_op(monkeypatch):
    """Eager calls with nothing to record run the kernels directly (less host time per call);
    a call autograd or a tracer must see goes through the custom op."""
    q, k, v = make(1, 2, 1, 24, 24, 32, "float32", 7)
    assert ops._eager_inference(q, k, v)
    q.requires_grad_()
    assert not ops._eager_inference(q, k, v)
    with torch.no_grad():
        assert ops._eager_inference(q, k, v)
    q.requires_grad_(False)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ops._eager_inference(q, k, v)


def test_torch_compile_no_graph_break():
    q, k, v = (x.requires_grad_() for x in make(1, 2, 1, 24, 24, 32, "float32", 6))
    fn = torch.compile(lambda a, b, c: ops.triton_attention(a, b, c, 0.2, -1, 0)[0].sum(),
                       fullgraph=True, backend="inductor" if GPU else "aot_eager")
    y = fn(q, k, v)
    y.backward()
    ref = ops.triton_attention(q.detach(), k.detach(), v.detach(), 0.2, -1, 0)[0].sum()
    assert torch.allclose(y.detach(), ref, atol=1e-4)
    assert q.grad is not None and torch.isfinite(q.grad).all()


@gpu_only
@pytest.mark.parametrize("index", range(len(FULL)), ids=lambda i: "-".join(map(str, FULL[i])).replace(" ", ""))
def test_full_size(index, monkeypatch):
    # Case i runs configuration i (modulo what fits its shape), so the table's later rows, which
    # autotuning may pick in use, are checked too without compiling every row for every case.
    monkeypatch.setenv("AULE_TRITON_CONFIG", str(index))
    case = FULL[index]
    _run(case, seed=zlib.crc32(repr(case).encode()) & 0xFFFF)


@gpu_only
@pytest.mark.parametrize("case", [(2, 8, 2, 1025, 1025, 128, True, -1, "bfloat16", 50.0, "batch"),
                                  (1, 8, 1, 97, 1025, 80, False, (300, 64), "float16", 5.0, "heads")],
                         ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_softcap_alibi_full_size(case, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")  # one compiled tile per kernel, not a tuning sweep
    _run_features(case)


@gpu_only
def test_autotuned_path(monkeypatch):
    monkeypatch.setenv("AULE_TRITON_AUTOTUNE", "1")
    monkeypatch.delenv("AULE_TRITON_CONFIG", raising=False)
    case = (1, 4, 2, 300, 300, 64, True, -1, "float16")
    _run(case, seed=11)
    assert any("fwd/cuda/d64" in name or "fwd/gfx" in name for name in ops.tuned_choices()), ops.tuned_choices()


@gpu_only
@pytest.mark.parametrize("features", [{}, {"softcap": 20.0, "alibi_slopes": np.linspace(0.1, 0.8, 4, dtype=np.float32)}],
                         ids=["plain", "softcap-alibi"])
def test_routing_auto_picks_triton(features):
    from aule import routing

    q, k, v = make(1, 4, 2, 64, 64, 64, "bfloat16", 1)
    assert routing.route(canonicalize(q, k, v, **features), "attention").name.startswith("triton")
    out = aule.flash_attention(q, k, v, causal=True, **features)
    ref = attention_reference(*(x.float().cpu().numpy() for x in (q, k, v)), causal=True, **features)
    assert np.abs(out.float().cpu().numpy() - ref).max() < OUT_TOL["bfloat16"]
    assert "triton" in aule.get_available_backends() or "triton-amd" in aule.get_available_backends()

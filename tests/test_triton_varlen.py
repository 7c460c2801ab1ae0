"""The Triton backend's native varlen kernels: packed sequences in one launch per kernel, forward
and backward, against the float64 reference one sequence at a time.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` at small shapes, served through
``aule.flash_attention_varlen(..., backend="triton")`` with the backend's device probe waived
(the interpreter runs its kernels on CPU tensors); ``routing.attend`` fails in these tests, so a
per-sequence fallback cannot pass them. The ``gpu_only`` cases run at full size in float16 and
bfloat16.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import backends, masks, routing  # noqa: E402
from aule.backends.triton import TritonBackend, kernels, ops  # noqa: E402
from aule.call import canonicalize_varlen  # noqa: E402
from aule.reference import attention_reference  # noqa: E402
from test_triton import DEV, DT, GRAD_TOL, OUT_TOL, gpu_only, ref_torch, rel_err  # noqa: E402

LSE_TOL = {"float32": 1e-4, "float16": 5e-3, "bfloat16": 3e-2}
# Query and key lengths: an empty query with keys, a single row, seq_q > seq_k (with causal the
# first rows see no key), seq_q < seq_k, and a sequence without keys.
LENS_Q = [0, 1, 17, 5, 33]
LENS_K = [3, 4, 9, 12, 40]


@pytest.fixture
def native(monkeypatch):
    """Varlen calls must reach TritonBackend.varlen_attention: the per-sequence fallback fails, and
    under the interpreter the device probe is waived for Triton. Returns the launch log
    (kernel names, in order)."""
    def no_dense(*args, **kw):
        raise AssertionError("a varlen call was cut into dense calls instead of served natively")

    monkeypatch.setattr(routing, "attend", no_dense)
    if not GPU:
        monkeypatch.setitem(backends.get("triton").__dict__, "unavailable_reason", None)
    launched = []
    real_launch = ops._launch

    def counting(kernel, *args, **kw):
        launched.append(kernel)
        return real_launch(kernel, *args, **kw)

    monkeypatch.setattr(ops, "_launch", counting)
    return launched


def _cu(lens):
    return np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)


def _packed(lens_q, lens_k, hq, hk, d, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn((sum(lens_q), hq, d), generator=g) * scale
    k = torch.randn((sum(lens_k), hk, d), generator=g) * scale
    v = torch.randn((sum(lens_k), hk, d), generator=g)
    return [x.to(DT[dtype]).to(DEV) for x in (q, k, v)]


def _reference(q, k, v, lens_q, lens_k, scale, left, right, softcap=0.0, slopes=None, sinks=None):
    """float64 autograd, one sequence at a time: packed ``(out [total_q, Hq, D], lse [Hq, total_q])``
    of the leaf tensors ``q, k, v`` (packed, float64) and ``sinks``."""
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    outs, lses = [], []
    for i in range(len(lens_q)):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if a == b:
            continue
        heads_first = (x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:e], v[c:e]))
        o, lse = ref_torch(*heads_first, scale, left, right, softcap,
                           None if slopes is None else slopes[i:i + 1], sinks)
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


def _check(lens_q, lens_k, hq, hk, d, dtype, causal=False, window=-1, scale=None, softcap=0.0, alibi=False,
           sinks=False, lse_grad=False, seed=None, launched=None):
    """aule.flash_attention_varlen(backend="triton") against :func:`_reference`: out, LSE, and
    the gradients of q, k, v (and of learned sinks)."""
    seed = zlib.crc32(repr((lens_q, lens_k, hq, hk, d, dtype, causal, window)).encode()) & 0xFFFF if seed is None else seed
    rng = np.random.default_rng(seed)
    # Scores of std ~4 where the features are on, so that the cap, the bias and the sinks all matter.
    q, k, v = _packed(lens_q, lens_k, hq, hk, d, dtype, seed, scale=2.0 if softcap or alibi or sinks else 1.0)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    scale = d ** -0.5 if scale is None else scale
    slopes = rng.uniform(0.05, 0.8, (len(lens_q), hq)).astype(np.float32) if alibi else None
    sink_np = rng.uniform(-1.0, 3.0, hq).astype(np.float32) if sinks else None
    sinks_t = None if sink_np is None else torch.from_numpy(sink_np).to(DEV).requires_grad_()
    out, lse = aule.flash_attention_varlen(q, k, v, torch.from_numpy(_cu(lens_q)).to(DEV),
                                           torch.from_numpy(_cu(lens_k)).to(DEV), max(lens_q), max(lens_k),
                                           causal=causal, window_size=window, scale=scale, softcap=softcap,
                                           alibi_slopes=slopes, sinks=sinks_t, return_lse=True, backend="triton")
    if launched is not None:
        assert launched == ["fwd"], launched  # one launch, whatever the number of sequences
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32

    left, right = masks.canonical_window(causal, window)
    qd, kd, vd = (x.detach().double().cpu().requires_grad_() for x in (q, k, v))
    sd = None if sink_np is None else torch.from_numpy(sink_np).double().requires_grad_()
    ro, rl = _reference(qd, kd, vd, lens_q, lens_k, scale, left, right, softcap, slopes, sd)
    err = (out.detach().double().cpu() - ro.detach()).abs().max().item()
    assert err <= OUT_TOL[dtype], f"output error {err:.3g} > {OUT_TOL[dtype]}"
    got_lse = lse.detach().double().cpu()
    empty = torch.isneginf(rl.detach())
    assert torch.equal(torch.isneginf(got_lse), empty), "LSE is -inf exactly for rows that see no key"
    lse_err = (got_lse[~empty] - rl.detach()[~empty]).abs().max().item()
    assert lse_err <= LSE_TOL[dtype], f"LSE error {lse_err:.3g} > {LSE_TOL[dtype]}"

    g = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(ro.shape, generator=g, dtype=torch.float64)
    dl = torch.randn(rl.shape, generator=g, dtype=torch.float64)
    ref_loss = (ro * dout).sum()
    loss = (out.float() * dout.float().to(DEV)).sum()
    if lse_grad:
        ref_loss = ref_loss + (torch.where(empty, 0.0, rl) * dl).sum()
        loss = loss + (torch.where(torch.isneginf(lse), 0.0, lse) * dl.float().to(DEV)).sum()
    ref_loss.backward()
    if launched is not None:
        launched.clear()
    loss.backward()
    if launched is not None:
        assert launched == ["dkdv", "dq"], launched  # one launch each, whatever the number of sequences
    for name, got, want in (("dq", q.grad, qd.grad), ("dk", k.grad, kd.grad), ("dv", v.grad, vd.grad)):
        assert got.shape == want.shape and got.dtype == q.dtype
        e = rel_err(got, want)
        assert e <= GRAD_TOL[dtype], f"{name} relative error {e:.3g} > {GRAD_TOL[dtype]}"
    if sinks:
        e = rel_err(sinks_t.grad, sd.grad)
        assert e <= GRAD_TOL[dtype], f"dsinks relative error {e:.3g} > {GRAD_TOL[dtype]}"
    return out, lse, (q, k, v)


# (heads_q, heads_kv, head_dim, dtype, causal, window)
CASES = [
    (4, 2, 16, "float32", True, -1),        # causal, GQA: sequence 2 has 17 queries for 9 keys
    (2, 2, 40, "float16", False, (5, 3)),   # a two-sided window, head_dim padded to 64
    (4, 1, 32, "float32", True, 8),         # Mistral's window, MQA
    (2, 1, 64, "float16", False, -1),       # unmasked
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_forward_backward(case, native):
    hq, hk, d, dtype, causal, window = case
    _check(LENS_Q, LENS_K, hq, hk, d, dtype, causal=causal, window=window, lse_grad=True, launched=native)


def test_softcap_alibi_sinks(native):
    """Per-sequence ALiBi slopes, softcap and learned sinks together (d sinks checked too)."""
    out, _, (q, k, v) = _check(LENS_Q, LENS_K, 4, 2, 16, "float32", causal=True, scale=0.3, softcap=4.0, alibi=True,
                               sinks=True, lse_grad=True, launched=native)
    plain = aule.flash_attention_varlen(q.detach(), k.detach(), v.detach(), _cu(LENS_Q), _cu(LENS_K), 33, 40,
                                        causal=True, scale=0.3, backend="triton")
    assert (plain - out.detach()).abs().max() > 0.1, "the features must change the result"


def test_one_launch_and_each_sequence_alone(native):
    """The forward is one kernel launch for every sequence; a sequence's rows never reach another's
    (NaN in one sequence stays there), and keys of a sequence without queries get zero gradients."""
    q, k, v = _packed(LENS_Q, LENS_K, 2, 1, 16, "float32", 5)
    cu_q, cu_k = _cu(LENS_Q), _cu(LENS_K)
    q[cu_q[3]:cu_q[4]] = float("nan")
    k[cu_k[3]:cu_k[4]] = float("nan")
    k.requires_grad_()
    out = aule.flash_attention_varlen(q, k, v, cu_q, cu_k, 33, 40, causal=True, backend="triton")
    assert native == ["fwd"]
    nan_rows = torch.isnan(out).any(2).any(1)
    want = torch.zeros(len(q), dtype=torch.bool)
    want[cu_q[3]:cu_q[4]] = True
    assert torch.equal(nan_rows.cpu(), want)
    k.grad = None
    out[:cu_q[3]].sum().backward()
    assert torch.all(k.grad[:cu_k[1]] == 0), "keys of the sequence without queries"
    assert torch.isfinite(k.grad[:cu_k[3]]).all() and (k.grad[cu_k[1]:cu_k[3]] != 0).any()


@pytest.mark.parametrize("tile", [(16, 16), (16, 32), (32, 16)])
def test_tile_runs(tile):
    """Sequences several tiles long, so the masked and fully visible tile runs and the programs past
    a sequence's end all occur, forward and backward, straight through the launcher."""
    lens_q, lens_k = [40, 0, 70, 9], [70, 25, 45, 9]
    hq, hk, d = 2, 1, 32
    q, k, v = _packed(lens_q, lens_k, hq, hk, d, "float32", 9)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    left, right = masks.canonical_window(True, 33)
    pack = ops.packing(cu_q, cu_k, q.device)
    q4, k4, v4 = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))
    out, lse = ops.attention_forward(q4, k4, v4, 0.2, left, right, tile=tile, packing=pack)
    qd, kd, vd = (x.double().cpu().requires_grad_() for x in (q, k, v))
    ro, rl = _reference(qd, kd, vd, lens_q, lens_k, 0.2, left, right)
    assert (out[0].transpose(0, 1).double().cpu() - ro.detach()).abs().max() <= OUT_TOL["float32"]
    dout = torch.randn(ro.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ro * dout).sum().backward()
    grads = ops.attention_backward(dout.float().to(DEV).transpose(0, 1).unsqueeze(0), q4, k4, v4, out, lse, None,
                                   0.2, left, right, tile_dkdv=tile, tile_dq=tile, packing=pack)
    for name, got, want in zip(("dq", "dk", "dv"), grads, (qd.grad, kd.grad, vd.grad)):
        e = rel_err(got[0].transpose(0, 1), want)
        assert e <= GRAD_TOL["float32"], f"{name} relative error {e:.3g}"


def test_no_keys_at_all(native):
    """Every sequence without keys: zeros, LSE = the sink, d sink = the LSE's gradient."""
    q, k, v = _packed([3, 4], [0, 0], 2, 2, 16, "float32", 3)
    sinks = torch.tensor([0.5, -1.0], device=DEV, requires_grad=True)
    out, lse = aule.flash_attention_varlen(q, k, v, _cu([3, 4]), _cu([0, 0]), 4, 0, sinks=sinks, return_lse=True,
                                           backend="triton")
    assert torch.all(out == 0) and torch.equal(lse, sinks.detach()[:, None].expand(2, 7))
    lse.sum().backward()
    assert torch.equal(sinks.grad.cpu(), torch.tensor([7.0, 7.0]))


def test_refusals():
    b = TritonBackend()
    host = canonicalize_varlen(*(np.zeros((4, 2, 16), np.float32) for _ in range(3)), [0, 4], [0, 4], 4, 4)
    assert "torch tensors" in b.why_not_varlen_attention(host, forced=True)
    n = 65536
    many = canonicalize_varlen(*(torch.zeros((n, 1, 8), device=DEV) for _ in range(3)), np.arange(n + 1),
                               np.arange(n + 1), 1, 1)
    assert "65536 sequences > 65535" in b.why_not_varlen_attention(many, forced=True)
    if not GPU:
        b16 = canonicalize_varlen(*(torch.zeros((4, 2, 16), dtype=torch.bfloat16) for _ in range(3)), [0, 4], [0, 4],
                                  4, 4)
        assert "bfloat16" in b.why_not_varlen_attention(b16, forced=True)


def test_packing_uploads_int32_once():
    cu_q, cu_k = np.array([0, 3, 3, 10]), np.array([0, 1, 7, 8])
    p = ops.packing(cu_q, cu_k, DEV)
    assert p.cu_q.dtype == torch.int32 and p.cu_q.tolist() == [0, 3, 3, 10] and p.cu_k.tolist() == [0, 1, 7, 8]
    assert (p.batch, p.max_q, p.max_k) == (3, 7, 6)
    assert p.cu_q.untyped_storage().data_ptr() == p.cu_k.untyped_storage().data_ptr()  # one tensor, one copy
    assert p.cu_k.data_ptr() % 16 == 0


# --- full size, on a GPU -----------------------------------------------------------------------

FULL_LENS = ([1, 1025, 0, 300, 77, 513, 2048], [1, 1025, 50, 700, 20, 513, 1900])
FULL = [
    (16, 2, 128, "bfloat16", True, -1),
    (8, 8, 64, "float16", True, (256, 0)),
    (12, 4, 80, "float16", False, -1),
    (8, 1, 256, "bfloat16", False, (128, 64)),
]


@gpu_only
@pytest.mark.parametrize("case", FULL, ids=lambda c: "-".join(map(str, c)).replace(" ", ""))
def test_full_size(case, native, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")  # one compiled tile per kernel, not a tuning sweep
    hq, hk, d, dtype, causal, window = case
    _check(*FULL_LENS, hq, hk, d, dtype, causal=causal, window=window, lse_grad=True, launched=native)


@gpu_only
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_full_size_features(dtype, native, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")
    _check(*FULL_LENS, 8, 2, 64, dtype, causal=True, softcap=30.0, alibi=True, sinks=True, lse_grad=True,
           launched=native)


@gpu_only
def test_auto_routing_serves_natively(native):
    """Without backend=, CUDA tensors go to Triton's varlen kernels (not one call per sequence),
    and agree with Triton's dense kernels sequence by sequence."""
    lens_q, lens_k = [5, 300, 0, 129], [5, 310, 7, 129]
    q, k, v = _packed(lens_q, lens_k, 8, 2, 128, "bfloat16", 1)
    out = aule.flash_attention_varlen(q, k, v, _cu(lens_q), _cu(lens_k), 300, 310, causal=True)
    assert native == ["fwd"]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    for i in range(len(lens_q)):
        a, b, c, e = cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]
        if a == b:
            continue
        dense, _ = ops.attention_forward(*(x.transpose(0, 1).unsqueeze(0) for x in (q[a:b], k[c:e], v[c:e])),
                                         128 ** -0.5, -1, 0)
        assert (dense[0].transpose(0, 1).float() - out[a:b].float()).abs().max() <= OUT_TOL["bfloat16"]
    last = [x.float().cpu().numpy().transpose(1, 0, 2)[None] for x in (q[cu_q[3]:], k[cu_k[3]:], v[cu_k[3]:])]
    ref = attention_reference(*last, causal=True)[0].transpose(1, 0, 2)
    assert np.abs(out[cu_q[3]:].float().cpu().numpy() - ref).max() <= OUT_TOL["bfloat16"]

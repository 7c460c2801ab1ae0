"""Attention sinks and attn_mask on the Triton dense kernels, forward and backward (d sinks too),
against the float64 reference and torch autograd through ``test_triton.ref_torch``.

Without a GPU the kernels run under ``TRITON_INTERPRET=1`` at small shapes; the ``gpu_only`` cases
run the same checks at full size.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import masks  # noqa: E402
from aule.backends.triton import TritonBackend, ops  # noqa: E402
from aule.call import canonicalize  # noqa: E402
from aule.reference import attention_reference  # noqa: E402
from attn_util import refusal  # noqa: E402
from test_triton import DEV, check_fwd_bwd, gpu_only, make  # noqa: E402


def _ids(c):
    return "-".join(map(str, c)).replace(" ", "")


def _seed(case):
    return zlib.crc32(repr(case).encode()) & 0xFFFF


def _sinks(rng, hq):
    # Logits near the rows' own (scores of std ~1 over a few keys): the sink takes a real share.
    return rng.uniform(-1.0, 3.0, hq).astype(np.float32)


def _changed(np_in, causal, window, **features):
    """How far the features move the reference away from plain attention (out and finite LSE)."""
    plain = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True)
    mod = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True, **features)
    seen = np.isfinite(plain[1]) & np.isfinite(mod[1])
    return max(np.abs(plain[0] - mod[0]).max(), np.abs(plain[1][seen] - mod[1][seen]).max(initial=0.0))


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype)
SINK_CASES = [
    (1, 2, 2, 1, 1, 16, True, -1, "float32"),          # one key: the sink is half the story
    (2, 4, 2, 7, 33, 32, True, -1, "float16"),
    (1, 4, 1, 33, 33, 80, False, -1, "float32"),
    (2, 2, 1, 33, 7, 16, True, -1, "float32"),         # seq_q > seq_k: rows without keys, LSE = sink
    (1, 2, 2, 33, 33, 32, False, (5, 3), "float16"),
    (1, 4, 2, 7, 33, 80, False, 9, "float32"),
]


def _run_sinks(case, tile=None, lse_grad=True):
    b, hq, hk, sq, sk, d, causal, window, dtype = case
    left, right = masks.canonical_window(causal, window)
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, _seed(case))
    sinks = _sinks(np.random.default_rng(_seed(case)), hq)
    np_in = [x.float().cpu().numpy() for x in (q, k, v)]
    # Far above fp16's error: with hundreds of visible keys the sink's share is small, but present.
    assert _changed(np_in, causal, window, sinks=sinks) > 0.01, "the sinks must change the result"
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=tile, lse_grad=lse_grad, sinks=sinks)


@pytest.mark.parametrize("case", SINK_CASES, ids=_ids)
def test_sinks_forward_backward(case):
    _run_sinks(case)


def test_sinks_without_lse_gradient():
    """d sinks from the output alone (delta without dLSE)."""
    _run_sinks((1, 4, 2, 20, 31, 32, True, -1, "float32"), lse_grad=False)


@pytest.mark.parametrize("tile", [(16, 32), (32, 16)])
def test_sinks_tile_runs(tile):
    """Several query tiles per head: each preprocess program's share of d sinks is summed."""
    _run_sinks((2, 2, 1, 45, 70, 32, False, (40, 20), "float32"), tile=tile)


def test_rows_without_keys_give_zeros_and_the_sink_exactly():
    q, k, v = make(1, 3, 1, 9, 4, 16, "float32", 1)  # causal, seq_q > seq_k: 5 rows see nothing
    # Logits whose round trip through base 2 in float32 misses them by an ulp.
    sinks = torch.tensor([12.634142, -3.0925112, -15.028669]).to(DEV)
    out, lse = ops.attention_forward(q, k, v, 0.25, -1, 0, sinks=sinks)
    assert (out[:, :, :5] == 0).all()
    assert (lse[:, :, :5] == sinks[None, :, None]).all(), "the definition's LSE is the sink itself"
    assert torch.isfinite(lse).all()


def test_sinks_and_masks_keep_the_numeric_rule():
    """aule.masks' rule with sinks and a float mask: a NaN score (here from the mask) makes the row
    NaN, a +inf score NaN with LSE +inf, scores all -inf zeros with LSE = sink, as the reference."""
    q = torch.zeros(1, 2, 4, 16)
    k = torch.ones(1, 2, 6, 16)
    q[0, 0, 2, 0] = float("inf")    # +inf scores
    q[0, 1, 3, 0] = float("-inf")   # every score -inf: as if masked
    bias = np.zeros((2, 4, 6), np.float32)
    bias[0, 1, 2] = np.nan          # a NaN entry on a key the row sees
    sinks = np.array([0.5, -1.0], np.float32)
    want, want_lse = attention_reference(q.numpy(), k.numpy(), k.numpy(), causal=False, sinks=sinks,
                                         attn_mask=bias, return_lse=True)
    held = canonicalize(q, k, k, attn_mask=bias).mask
    kspan, mask_t = ops.mask_tensors(held, 1, 2, torch.device(DEV))
    out, lse = ops.attention_forward(q.to(DEV), k.to(DEV), k.to(DEV), 0.25, -1, -1, kspan=kspan, mask=mask_t,
                                     sinks=torch.from_numpy(sinks).to(DEV))
    out, lse = out.cpu().numpy(), lse.cpu().numpy()
    assert np.isnan(out[0, 0, 1]).all() and np.isnan(lse[0, 0, 1]) and np.isnan(want_lse[0, 0, 1])
    assert np.isnan(out[0, 0, 2]).all() and lse[0, 0, 2] == np.inf == want_lse[0, 0, 2]
    assert (out[0, 1, 3] == 0).all() and lse[0, 1, 3] == np.float32(-1.0) == want_lse[0, 1, 3]
    fine = np.isfinite(want_lse)
    assert np.abs(out[fine] - want[fine]).max() < 2e-5 and np.abs(lse[fine] - want_lse[fine]).max() < 2e-5


def test_learned_sinks_are_routed_only_where_they_get_a_gradient():
    q, k, v = make(1, 2, 1, 8, 8, 16, "float32", 2)
    learned = torch.tensor([0.5, -0.5], requires_grad=True)
    call = canonicalize(q, k, v, sinks=learned)
    assert call.features == {"sinks"} and call.grad_features == {"sinks"}
    assert refusal("triton", "attention", call) is None
    reason = refusal("numpy", "attention", call)
    assert reason.startswith("sinks requires grad") and "backend 'numpy' has no backward pass for sinks" in reason
    with pytest.raises(aule.UnsupportedError, match="sinks requires grad"):
        aule.flash_attention(q.cpu(), k.cpu(), v.cpu(), sinks=learned, backend="numpy")
    with torch.no_grad():
        assert canonicalize(q, k, v, sinks=learned).grad_features == frozenset()


# Masks: (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype, kind, sinks)
MASK_CASES = [
    (3, 2, 1, 7, 33, 32, False, -1, "float32", "lengths", False),        # lengths 0, partial, full
    (3, 4, 2, 33, 33, 16, True, -1, "float16", "lengths", True),
    (2, 4, 2, 1, 33, 80, False, -1, "float32", "lengths-heads", False),  # per query head; decode row
    (3, 2, 2, 33, 7, 16, True, -1, "float32", "left-padding", True),     # seq_q > seq_k
    (2, 4, 1, 33, 45, 32, False, (9, 4), "float32", "left-padding", False),
    (2, 2, 1, 7, 33, 32, True, -1, "float32", "holes", False),
    (2, 4, 2, 33, 33, 16, False, (5, 3), "float16", "bool", False),
    (1, 2, 2, 7, 33, 80, True, -1, "float32", "bool-2d", True),
    (2, 4, 2, 33, 7, 32, False, -1, "float32", "float", False),
    (1, 2, 1, 33, 33, 16, True, 9, "float32", "float", True),
]


def _mask(rng, b, hq, sq, sk, kind):
    """An attn_mask of ``kind``, every padding kind with a sequence that sees no key at all."""
    cols = np.arange(sk)
    if kind == "lengths":  # [b, 1, 1, sk] prefixes: 0, partial, full
        lens = np.array([0, max(1, sk // 3), sk][:b])
        return cols[None, None, None, :] < lens[:, None, None, None]
    if kind == "lengths-heads":  # [b, hq, 1, sk]: each query head its own length (GQA: a group differs)
        lens = rng.integers(0, sk + 1, (b, hq))
        lens[0, 0] = 0
        return cols[None, None, None, :] < lens[:, :, None, None]
    if kind == "left-padding":  # visible keys a suffix, as 0 / -inf floats (generation's padding)
        starts = np.array([sk, sk // 2, 1][:b])
        return np.where(cols[None, None, None, :] >= starts[:, None, None, None], 0.0, -np.inf).astype(np.float32)
    if kind == "holes":  # padding with holes: the span plus the key vector
        keep = rng.random((b, hq, 1, sk)) > 0.4
        keep[0, 0] = False
        return keep
    if kind == "bool":
        return rng.random((b, hq, sq, sk)) > 0.3
    if kind == "bool-2d":
        return rng.random((sq, sk)) > 0.5
    if kind == "float":  # additive per head, some -inf
        m = rng.standard_normal((1, hq, sq, sk)).astype(np.float32)
        m[rng.random(m.shape) < 0.2] = -np.inf
        return m
    raise AssertionError(kind)


def _run_mask(case, tile=None):
    b, hq, hk, sq, sk, d, causal, window, dtype, kind, with_sinks = case
    left, right = masks.canonical_window(causal, window)
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, _seed(case))
    rng = np.random.default_rng(_seed(case))
    m = _mask(rng, b, hq, sq, sk, kind)
    held = canonicalize(q, k, v, attn_mask=m).mask
    assert held.padding == (kind in ("lengths", "lengths-heads", "left-padding", "holes")), kind
    sinks = _sinks(rng, hq) if with_sinks else None
    np_in = [x.float().cpu().numpy() for x in (q, k, v)]
    assert _changed(np_in, causal, window, attn_mask=m) > 0.05, "the mask must change the result"
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=tile, lse_grad=True, sinks=sinks, attn_mask=m)


@pytest.mark.parametrize("case", MASK_CASES, ids=_ids)
def test_masks_forward_backward(case):
    _run_mask(case)


@pytest.mark.parametrize("tile", [(16, 32), (32, 16)])
@pytest.mark.parametrize("kind", ["lengths-heads", "left-padding", "float"])
def test_mask_tile_runs(kind, tile):
    """Spans cutting tiles at both ends, fully visible runs in between, several tiles per row."""
    _run_mask((2, 4, 2, 45, 70, 32, False, (40, 20), "float32", kind, True), tile=tile)


def test_padding_spans_become_kernel_bounds():
    q, k, v = make(2, 2, 1, 4, 10, 16, "float32", 3)
    cols = np.arange(10)
    prefix = cols < np.array([3, 0])[:, None, None, None]
    kspan, tile = ops.mask_tensors(canonicalize(q, k, v, attn_mask=prefix).mask, 2, 2, q.device)
    assert tile is None and kspan.tolist() == [[[0, 3]] * 2, [[0, 0]] * 2]
    suffix = cols >= np.array([4, 9])[:, None, None, None]
    kspan, tile = ops.mask_tensors(canonicalize(q, k, v, attn_mask=suffix).mask, 2, 2, q.device)
    assert tile is None and kspan.tolist() == [[[4, 10]] * 2, [[9, 10]] * 2]
    holes = prefix.copy()
    holes[0, 0, 0, :] = [True, False, True] + [False] * 7
    kspan, tile = ops.mask_tensors(canonicalize(q, k, v, attn_mask=holes).mask, 2, 2, q.device)
    assert kspan[0, 0].tolist() == [0, 3] and tile.shape == (2, 1, 1, 10) and tile.dtype == torch.uint8


def test_padding_is_never_read():
    """NaN in every key and value a padding span hides, left and right: neither the output nor a
    gradient sees it (tiles outside a span are skipped, the cut ones load only the span)."""
    b, hq, hk, sq, sk, d = 2, 4, 2, 20, 70, 16
    q, k, v = make(b, hq, hk, sq, sk, d, "float32", 4)
    starts, ends = np.array([5, 33]), np.array([40, 70])
    cols = np.arange(sk)
    m = (cols >= starts[:, None]) & (cols < ends[:, None])
    clean_k, clean_v = k.clone(), v.clone()
    for bi in range(b):
        for x in (k, v):
            x[bi, :, :starts[bi]] = float("nan")
            x[bi, :, ends[bi]:] = float("nan")
    for tile in ((16, 16), (32, 32)):
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        kspan, mask_t = ops.mask_tensors(canonicalize(q, k, v, attn_mask=m[:, None, None]).mask, b, hq, q.device)
        assert mask_t is None
        out, lse = ops.attention_forward(qg, kg, vg, 0.25, -1, -1, tile=tile, kspan=kspan)
        want = attention_reference(*(x.cpu().numpy() for x in (q, clean_k, clean_v)), causal=False, scale=0.25,
                                   attn_mask=m[:, None, None])
        assert torch.isfinite(out).all() and np.abs(out.detach().cpu().numpy() - want).max() < 5e-5
        dq, dk, dv, _ = ops.attention_backward(torch.ones_like(out), qg, kg, vg, out, lse, None, 0.25, -1, -1,
                                               tile_dkdv=tile, tile_dq=tile, kspan=kspan)
        assert torch.isfinite(dq).all()
        for bi in range(b):
            hidden = ~torch.from_numpy(m[bi]).to(dk.device)
            assert (dk[bi][:, hidden] == 0).all() and (dv[bi][:, hidden] == 0).all()
            assert torch.isfinite(dk[bi]).all() and torch.isfinite(dv[bi]).all()


def test_key_tiles_outside_every_span_are_never_visited():
    """dK/dV of a key tile that no head of its group sees are zeros even when dO holds a NaN: a
    visited tile would spread it there as 0 * NaN (the masked probabilities times dO)."""
    b, hq, hk, sq, sk, d = 1, 4, 2, 16, 64, 16
    q, k, v = make(b, hq, hk, sq, sk, d, "float32", 6)
    lens = np.array([[10, 20, 5, 0]])  # KV head 0 sees keys < 20, KV head 1 keys < 5
    m = np.arange(sk)[None, None, None, :] < lens[:, :, None, None]
    kspan, _ = ops.mask_tensors(canonicalize(q, k, v, attn_mask=m).mask, b, hq, q.device)
    out, lse = ops.attention_forward(q, k, v, 0.25, -1, -1, tile=(16, 16), kspan=kspan)
    dout = torch.ones_like(out)
    dout[0, :, 3] = float("nan")
    _, dk, dv, _ = ops.attention_backward(dout, q, k, v, out, lse, None, 0.25, -1, -1, tile_dkdv=(16, 16),
                                          tile_dq=(16, 16), kspan=kspan)
    for kvh, end in ((0, 32), (1, 16)):  # the first key tile past every span of the group
        assert (dk[0, kvh, end:] == 0).all() and (dv[0, kvh, end:] == 0).all()


def test_routing_admits_sinks_and_masks(monkeypatch):
    q, k, v = make(1, 2, 1, 8, 8, 16, "float32", 5)
    b = TritonBackend()
    monkeypatch.setitem(b.__dict__, "unavailable_reason", None)  # as if a GPU were here
    for kw in (dict(sinks=np.array([0.5, 0.25], np.float32)), dict(attn_mask=np.arange(8) < 5),
               dict(attn_mask=np.random.default_rng(0).random((8, 8)) > 0.5)):
        call = canonicalize(q, k, v, **kw)
        assert b.why_not("attention", call, forced=True) == b.why_not_attention(call, forced=True)


@pytest.mark.parametrize("modified", ["sinks", "lengths", "bool", "float"])
def test_opcheck(modified):
    q, k, v = make(1, 4, 2, 24, 40, 32, "float32", 4)
    sinks = kspan = mask = None
    if modified == "sinks":
        sinks = torch.rand(4).to(DEV).requires_grad_()
    elif modified == "lengths":
        kspan = torch.tensor([[[0, 30], [0, 7], [0, 0], [0, 40]]], dtype=torch.int32).to(DEV)
    elif modified == "bool":
        mask = (torch.rand(1, 1, 24, 40) > 0.3).to(torch.uint8).to(DEV)
    else:
        mask = torch.randn(1, 4, 1, 40).to(DEV)
    args = tuple(x.requires_grad_() for x in (q, k, v)) + (0.2, -1, 0, 0.0, None, sinks, kspan, mask)
    torch.library.opcheck(torch.ops.aule.triton_attention_fwd.default, args)


@gpu_only
@pytest.mark.parametrize("case", [(2, 8, 2, 1025, 1025, 128, True, -1, "bfloat16"),
                                  (1, 8, 1, 97, 1025, 80, False, (300, 64), "float16")], ids=_ids)
def test_sinks_full_size(case, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")  # one compiled tile per kernel, not a tuning sweep
    _run_sinks(case)


@gpu_only
@pytest.mark.parametrize("case", [(3, 8, 2, 1025, 1025, 128, True, -1, "bfloat16", "lengths", True),
                                  (3, 8, 8, 257, 2048, 64, False, -1, "float16", "left-padding", False),
                                  (2, 8, 2, 300, 700, 80, True, -1, "float16", "holes", True),
                                  (2, 4, 4, 513, 513, 128, False, (200, 50), "bfloat16", "float", False)],
                         ids=_ids)
def test_masks_full_size(case, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")
    _run_mask(case)


@gpu_only
def test_learned_sinks_through_flash_attention():
    q, k, v = (x.requires_grad_() for x in make(1, 4, 2, 64, 64, 64, "bfloat16", 1))
    sinks = torch.linspace(-1, 2, 4, device=DEV, requires_grad=True)
    m = torch.arange(64, device=DEV) < 50
    out = aule.flash_attention(q, k, v, causal=True, sinks=sinks, attn_mask=m)
    out.float().sum().backward()
    assert sinks.grad is not None and torch.isfinite(sinks.grad).all() and q.grad is not None

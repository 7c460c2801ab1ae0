"""The numeric rule for rows with NaN, infinite or no visible scores (aule.masks' docstring), on the
reference, the NumPy backend and the Triton kernels, dense and paged; ``scale`` checked in float32;
the SDPA drop-in.

Each case states by hand which rows must be NaN, zeros or ordinary, and with which LSE, so the
reference is held to the rule as well as the backends; ordinary rows must also match the
reference. Triton runs under ``TRITON_INTERPRET=1`` on a machine without a GPU (small shapes).
Vulkan's shaders are checked against the same rule by their own tests.
"""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

import aule
from aule.call import canonicalize
from aule.reference import attention_reference

from attn_util import ATOL, LSE_ATOL
from test_paged import make_case, reference_paged

DENSE = ["reference", "numpy", "triton"]
PAGED = ["numpy", "triton"]


def _torch_and_device():
    """``(torch, device)`` for the Triton kernels; skips the test when torch or triton is missing."""
    from triton_setup import import_torch_and_triton

    torch, gpu = import_torch_and_triton()
    return torch, "cuda" if gpu else "cpu"


def dense(backend, q, k, v, **kw):
    """``(out, lse)`` as float64 NumPy arrays from one backend (``kw``: causal, window_size, scale,
    softcap, alibi_slopes)."""
    if backend == "reference":
        return attention_reference(q, k, v, return_lse=True, **kw)
    if backend == "numpy":
        out, lse = aule.flash_attention(q, k, v, backend="numpy", return_lse=True, **kw)
    else:
        torch, dev = _torch_and_device()
        from aule.backends.triton import TritonBackend

        call = canonicalize(*(torch.from_numpy(x).to(dev) for x in (q, k, v)), return_lse=True, **kw)
        out, lse = (t.cpu().numpy() for t in TritonBackend().attention(call))
    return np.asarray(out, np.float64), np.asarray(lse, np.float64)


def inputs(hq=4, hk=2, sq=40, sk=40, d=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, hq, sq, d)).astype(np.float32),
            rng.standard_normal((1, hk, sk, d)).astype(np.float32),
            rng.standard_normal((1, hk, sk, d)).astype(np.float32))


def check_rows(out, lse, ref_args, nan=(), zeros=(), lse_of_nan=math.nan, **kw):
    """Rows in ``nan`` (index tuples into [batch, head, row]) are NaN throughout with LSE
    ``lse_of_nan``; rows in ``zeros`` are zeros with LSE -inf; every other row is finite and
    matches the float64 reference."""
    ref_out, ref_lse = attention_reference(*ref_args, return_lse=True, **kw)
    plain = np.ones(out.shape[:3], dtype=bool)
    for row in nan:
        plain[row] = False
        assert np.isnan(out[row]).all(), f"row {row} must be NaN, got {out[row][:4]}"
        if math.isnan(lse_of_nan):
            assert np.isnan(lse[row]), f"LSE of row {row} must be NaN, got {lse[row]}"
        else:
            assert lse[row] == lse_of_nan, f"LSE of row {row} must be {lse_of_nan}, got {lse[row]}"
    for row in zeros:
        plain[row] = False
        assert (out[row] == 0).all(), f"row {row} must be zeros, got {out[row][:4]}"
        assert np.isneginf(lse[row]), f"LSE of row {row} must be -inf, got {lse[row]}"
    assert np.isfinite(out[plain]).all() and np.isfinite(lse[plain]).all(), "other rows must stay finite"
    assert np.abs(out[plain] - ref_out[plain]).max() <= ATOL["float32"]
    assert np.abs(lse[plain] - ref_lse[plain]).max() <= LSE_ATOL["float32"]


def rows(head_row_pairs):
    return [(0, h, i) for h, i in head_row_pairs]


@pytest.mark.parametrize("backend", DENSE)
def test_nan_in_one_query_row_poisons_only_that_row(backend):
    q, k, v = inputs()
    q[0, 1, 3, 5] = np.nan
    out, lse = dense(backend, q, k, v, causal=False)
    check_rows(out, lse, (q, k, v), nan=rows([(1, 3)]), causal=False)


@pytest.mark.parametrize("backend", DENSE)
def test_nan_in_one_key_reaches_only_rows_that_see_it(backend):
    q, k, v = inputs()
    k[0, 0, 4, 2] = np.nan  # KV head 0 serves query heads 0 and 1
    out, lse = dense(backend, q, k, v, causal=True)
    seeing = rows([(h, i) for h in (0, 1) for i in range(4, 40)])
    check_rows(out, lse, (q, k, v), nan=seeing, causal=True)


@pytest.mark.parametrize("backend", DENSE)
def test_inf_score_gives_nan_row_with_lse_inf(backend):
    q, k, v = inputs()
    q[0, 2, 7, 0] = np.inf
    k[0, 1, :, 0] += np.where(k[0, 1, :, 0] >= 0, 0.1, -0.1)  # no 0 * inf: scores are +inf or -inf
    out, lse = dense(backend, q, k, v, causal=False)
    check_rows(out, lse, (q, k, v), nan=rows([(2, 7)]), lse_of_nan=np.inf, causal=False)


@pytest.mark.parametrize("backend", DENSE)
def test_softcap_bounds_infinite_scores_and_keeps_nan(backend):
    """The cap comes before the rule: a +-inf score becomes +-softcap, so its row is ordinary; a NaN
    stays NaN. ALiBi's finite bias changes neither."""
    q, k, v = inputs()
    q[0, 2, 7, 0] = np.inf
    k[0, 1, :, 0] += np.where(k[0, 1, :, 0] >= 0, 0.1, -0.1)  # no 0 * inf: scores are +inf or -inf
    q[0, 0, 5, 3] = np.nan
    kw = dict(causal=False, softcap=3.0, alibi_slopes=np.linspace(0.1, 0.4, 4, dtype=np.float32))
    out, lse = dense(backend, q, k, v, **kw)
    check_rows(out, lse, (q, k, v), nan=rows([(0, 5)]), **kw)


@pytest.mark.parametrize("backend", DENSE)
def test_rows_hidden_by_the_window_are_zeros_even_with_nan(backend):
    # seq_q > seq_k with a 4-key window: rows 0..3 sit before the first key and see nothing.
    q, k, v = inputs(sq=44, sk=40)
    q[0, 0, 2, 0] = np.nan  # hidden row: masking wins over NaN
    k[0, 1, 10, 0] = np.nan  # visible to rows 14..17 of heads 2, 3 only
    out, lse = dense(backend, q, k, v, causal=True, window_size=4)
    hidden = rows([(h, i) for h in range(4) for i in range(4)])
    seeing = rows([(h, i) for h in (2, 3) for i in range(14, 18)])
    check_rows(out, lse, (q, k, v), nan=seeing, zeros=hidden, causal=True, window_size=4)


@pytest.mark.parametrize("backend", DENSE)
def test_scores_all_minus_inf_from_values_are_treated_as_masked(backend):
    q, k, v = inputs()
    q[0, :2, :, 0] = np.abs(q[0, :2, :, 0]) + 0.1
    k[0, 0, :, 0] = -np.inf  # every score of query heads 0, 1 is -inf, fully visible tiles included
    out, lse = dense(backend, q, k, v, causal=False)
    check_rows(out, lse, (q, k, v), zeros=rows([(h, i) for h in (0, 1) for i in range(40)]), causal=False)


@pytest.mark.parametrize("backend", DENSE)
@pytest.mark.parametrize("causal", [False, True])
def test_keys_at_minus_inf_drop_out_of_the_softmax(backend, causal):
    q, k, v = inputs()
    q[0, :2, :, 0] = np.abs(q[0, :2, :, 0]) + 0.1
    # Keys 0..31 score -inf for query heads 0, 1: a whole key tile of the Triton kernels (fully
    # visible without causal) before keys that score finite. Causal rows 0..31 see only those.
    k[0, 0, :32, 0] = -np.inf
    out, lse = dense(backend, q, k, v, causal=causal)
    hidden = rows([(h, i) for h in (0, 1) for i in range(32)]) if causal else ()
    check_rows(out, lse, (q, k, v), zeros=hidden, causal=causal)


# -- paged ------------------------------------------------------------------------------------

def paged(backend, case):
    arrays = (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)
    if backend == "triton":
        torch, dev = _torch_and_device()
        arrays = tuple(torch.from_numpy(a).to(dev) for a in arrays)
        return aule.flash_attention_paged(*arrays, backend="triton").cpu().numpy().astype(np.float64)
    return np.asarray(aule.flash_attention_paged(*arrays, backend="numpy"), np.float64)


def poison(case, seq, pos, head_kv, block_size):
    """NaN into key ``pos`` of sequence ``seq`` (its cache slot and the reference's copy)."""
    blk = case.block_tables[seq, pos // block_size]
    case.k_cache[blk, pos % block_size, head_kv, 0] = np.nan
    case.ks[seq][head_kv, pos, 0] = np.nan


@pytest.mark.parametrize("backend", PAGED)
@pytest.mark.parametrize("length", [12, 100])  # one context split, and several under the interpreter
def test_paged_nan_and_inf_rows(backend, length):
    rng = np.random.default_rng(length)
    bs, q_len = 8, 4
    case = make_case(rng, [length, length], 4, 2, 16, bs, q_len)
    case.q[0, 1, 2, 3] = np.nan  # one query row of sequence 0
    poison(case, 1, length - 3, 0, bs)  # seen by rows 1..3 of sequence 1, query heads 0 and 1
    # Key 0 of sequence 1, KV head 1, scores +inf for every row of query heads 2 and 3.
    case.q[1, 2:, :, 0] = np.abs(case.q[1, 2:, :, 0]) + 0.1
    case.k_cache[case.block_tables[1, 0], 0, 1, 0] = np.inf
    case.ks[1][1, 0, 0] = np.inf
    out = paged(backend, case)
    ref = reference_paged(case)
    nan_rows = ([(0, 1, 2)] + [(1, h, i) for h in (0, 1) for i in (1, 2, 3)]
                + [(1, h, i) for h in (2, 3) for i in range(q_len)])
    plain = np.ones(out.shape[:3], dtype=bool)
    for row in nan_rows:
        plain[row] = False
        assert np.isnan(out[row]).all(), f"row {row} must be NaN"
        assert np.isnan(ref[row]).all(), f"reference row {row} must be NaN"
    assert np.isfinite(out[plain]).all(), "other rows must stay finite"
    assert np.abs(out[plain] - ref[plain]).max() <= 2e-4


# -- scale in float32 ------------------------------------------------------------------------

@pytest.mark.parametrize("scale,why", [(1e39, "finite in float32"), (3e38, "log2(e)"),
                                       (2.4e38, "log2(e)"), (1e-46, "> 0 in float32")])
def test_scale_must_be_usable_in_float32(scale, why):
    q, k, v = inputs(sq=4, sk=4)
    with pytest.raises(ValueError, match=r"scale .*" + re.escape(why)):
        aule.flash_attention(q, k, v, scale=scale, backend="numpy")
    case = make_case(np.random.default_rng(0), [5], 4, 2, 16, 4, 1)
    with pytest.raises(ValueError, match="scale"):
        aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables,
                                   case.context_lens, scale=scale, backend="numpy")


@pytest.mark.parametrize("scale", [2.35e38, 1e-45, 1e-3])
def test_scale_usable_in_float32_is_accepted(scale):
    q, k, v = inputs(sq=4, sk=4)
    q *= 1e-38 if scale > 1 else 1.0
    out = aule.flash_attention(q, k, v, scale=scale, backend="numpy")
    ref = attention_reference(q, k, v, scale=float(np.float32(scale)))
    assert np.abs(out - ref).max() <= ATOL["float32"]


# -- the SDPA drop-in -------------------------------------------------------------------------

def nan_rows_of(t):
    return t.isnan().any(-1).nonzero().tolist()


def test_sdpa_drop_in_gives_nan_rows():
    """NaN rows as torch's math SDPA gives them, except that a NaN hidden by the causal mask stays
    hidden (torch's math adds the mask as a -inf bias, and NaN - inf is NaN)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 9, 16, generator=g) for _ in range(3))
    q[0, 1, 5, 2] = float("nan")
    k[0, 3, 6, 0] = float("nan")  # top-left causal: rows 6.. of head 3 see it
    math_sdpa = torch.ops.aten._scaled_dot_product_attention_math
    for causal, nan in [(False, [[0, 1, 5]] + [[0, 3, i] for i in range(9)]),
                        (True, [[0, 1, 5], [0, 3, 6], [0, 3, 7], [0, 3, 8]])]:
        want = math_sdpa(q, k, v, None, is_causal=causal)[0]
        with aule.installed():
            got = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert nan_rows_of(got) == nan, causal
        assert got[0, 1, 5].isnan().all()
        ok = ~(want.isnan() | got.isnan())
        assert (got[ok] - want[ok]).abs().max() <= 2e-5


def test_sdpa_fallback_gives_nan_rows():
    """The host op's fallback when a backend refuses at run time (sdpa_core.sdpa_reference)
    follows the rule too: torch's CPU flash kernel would give zeros, its math kernel NaN rows for
    a NaN hidden by the mask."""
    torch = pytest.importorskip("torch")
    from aule import sdpa_core

    q, k, v = (torch.from_numpy(x) for x in inputs(hq=2, hk=1, sq=7, sk=7))
    q[0, 0, 4, 1] = float("nan")
    k[0, 0, 5, 0] = float("nan")  # hidden from rows 0..4 by the causal window
    for left, right, nan in [(-1, -1, [[0, h, i] for h in (0, 1) for i in range(7)]),
                             (-1, 0, [[0, 0, 4], [0, 0, 5], [0, 0, 6], [0, 1, 5], [0, 1, 6]])]:
        out = sdpa_core.sdpa_reference(q, k, v, 0.25, left, right)
        assert nan_rows_of(out) == nan, (left, right)
        ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=False, scale=0.25,
                                  window_size=(left, right))
        ok = ~out.isnan().numpy()
        assert np.isnan(ref[~ok]).all()
        assert not ok.any() or np.abs(out.numpy()[ok] - ref[ok]).max() <= 2e-5


def test_sdpa_scale_outside_float32_goes_to_torch():
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    from aule import torch_sdpa

    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 16, generator=g) for _ in range(3))
    want = torch_sdpa.original_sdpa()(q, k, v, scale=1e39)
    with aule.installed():
        got = F.scaled_dot_product_attention(q, k, v, scale=1e39)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


# -- Triton's backward on such rows -----------------------------------------------------------

def test_triton_backward_runs_on_nan_and_inf_rows():
    """Gradients of NaN/inf rows are undefined, but the backward pass must run, and rows of other
    heads keep finite gradients."""
    torch, dev = _torch_and_device()
    from aule.backends.triton import ops

    q, k, v = (torch.from_numpy(x).to(dev) for x in inputs(hq=2, hk=2, sq=20, sk=20))
    q[0, 0, 3, 1] = float("nan")
    q[0, 0, 5, 0] = float("inf")
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    out, lse = ops.triton_attention(q, k, v, 0.25, -1, 0)
    assert out[0, 0, 3].isnan().all() and lse[0, 0, 3].isnan()
    out.nan_to_num().sum().backward()
    assert q.grad.shape == q.shape and torch.isfinite(q.grad[0, 1]).all()
    assert torch.isfinite(k.grad[0, 1]).all() and torch.isfinite(v.grad[0, 1]).all()

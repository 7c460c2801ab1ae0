"""The Triton forward's faster forms of modified scores, against the float64 reference, forward and
backward: ALiBi as a column bias with its row term kept in the row maximum (kernels.ALIBI_LEFT
and ALIBI_SPLIT, ``AULE_TRITON_ALIBI``), and the softcap's tanh forms (kernels._tanh,
``AULE_TRITON_TANH``).

ALiBi's row term is invisible to the output (softmax is shift-invariant per row) but not to the
LSE, so every case here checks the LSE against the reference: a row term left in, counted twice
or taken from the wrong side of the diagonal moves it by up to ``slope * tile height``, far
beyond its tolerance. Without a GPU the kernels run under ``TRITON_INTERPRET=1`` with small tiles,
so that a block's keys fall left of, across and right of its diagonal; there only the exp2 tanh
runs (the interpreter runs no inline assembly). The ``gpu_only`` cases time nothing: they check
each variant at full size, so that the lead can switch defaults on measurements.
"""
from __future__ import annotations

import inspect
import zlib

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

from aule import masks, settings  # noqa: E402
from aule.backends.triton import kernels, ops  # noqa: E402
from aule.reference import attention_reference  # noqa: E402
from test_triton import DT, check_fwd_bwd, gpu_only, make  # noqa: E402
from test_triton_sinks_masks import _mask as mask_of_kind, _sinks as sink_logits  # noqa: E402
from test_triton_varlen import _check as varlen_check, native  # noqa: E402,F401 (a fixture)


def _ids(c):
    return "-".join(map(str, c)).replace(" ", "")


def _inputs(case):
    """q, k, v (q and k times 4: scores of std ~16, so the bias decides the softmax) and slopes
    large enough that tiles far from the diagonal are visibly down-weighted, small enough that
    they are not all zero."""
    b, hq, hk, sq, sk, d, causal, window, dtype = case[:9]
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, zlib.crc32(repr(case).encode()) & 0xFFFF)
    rng = np.random.default_rng(sq * 131 + sk)
    slopes = rng.uniform(0.02, 0.6, (b, hq)).astype(np.float32)
    return q * 4, k * 4, v, slopes


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype, tile)
ALIBI_CASES = [
    (1, 4, 2, 100, 100, 32, False, -1, "float32", (16, 16)),    # left, across and right of the diagonal
    (2, 4, 1, 70, 97, 40, True, -1, "float16", (16, 32)),       # causal, seq_q < seq_k, head_dim padded
    (1, 2, 2, 60, 37, 16, True, -1, "float32", (16, 16)),       # causal, seq_q > seq_k: rows without keys
    (1, 2, 1, 97, 45, 24, False, -1, "float32", (32, 16)),      # non-causal, rows before every key
    (1, 2, 2, 45, 130, 32, False, (60, 9), "float32", (32, 16)),  # window on both sides: masked runs
    (1, 4, 2, 90, 90, 48, True, 33, "float16", (16, 16)),       # Mistral window: left form everywhere
    (1, 2, 2, 77, 77, 32, False, (-1, 12), "float32", (16, 16)),  # right edge only
    (1, 2, 1, 1, 77, 64, False, -1, "float32", (16, 16)),       # decode row, non-causal
]


def _spy_forms(monkeypatch):
    """Record, for every run of key tiles the forward's program loops over, its ALiBi FORM and
    ROW_TERMS and how many tiles it covers (the interpreter calls the inner function in Python)."""
    real = kernels._attn_fwd_inner
    params = list(inspect.signature(getattr(real, "fn", real)).parameters)
    runs = []

    def spy(*args):
        a = dict(zip(params, args))
        n = len(range(int(a["start"]), int(a["end"]), int(a["BLOCK_N"])))
        runs.append((int(a["FORM"]), int(a["ROW_TERMS"]), n))
        return real(*args)

    monkeypatch.setattr(kernels, "_attn_fwd_inner", spy)
    return runs


# On a GPU every case and tile is a compilation of three kernels: a few of them there (the
# full-size cases below cover the autotuned tiles), all of them in the interpreter.
@pytest.mark.parametrize("mode", ["split", "exact"])
@pytest.mark.parametrize("case", [ALIBI_CASES[i] for i in (0, 1, 4)] if GPU else ALIBI_CASES, ids=_ids)
def test_alibi_forms_forward_backward(case, mode, monkeypatch):
    """Each ALiBi form of the forward gives the definition's output and LSE, and the backward
    (exact scores against that LSE) the definition's gradients."""
    monkeypatch.setenv("AULE_TRITON_ALIBI", mode)
    b, hq, hk, sq, sk, d, causal, window, dtype, tile = case
    left, right = masks.canonical_window(causal, window)
    q, k, v, slopes = _inputs(case)
    np_in = [x.float().cpu().numpy() for x in (q, k, v)]
    plain = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True)
    biased = attention_reference(*np_in, causal=causal, window_size=window, return_lse=True, alibi_slopes=slopes)
    seen = np.isfinite(plain[1])
    assert np.abs(plain[1][seen] - biased[1][seen]).max() > 1.0, "the slopes must move the LSE"
    runs = _spy_forms(monkeypatch) if not GPU else None
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=tile, lse_grad=True, alibi=slopes)
    if runs is not None:
        tiles = {form: sum(n for f, _, n in runs if f == form) for form in (0, 1, 2)}
        if mode == "exact":
            assert tiles[0] == tiles[2] == 0 and all(r == 0 for _, r, _ in runs)
        elif right == 0:
            assert tiles[1] == tiles[2] == 0 and tiles[0] > 0, tiles  # every visible key left of its row
        else:
            assert tiles[0] + tiles[2] > 0, f"the split never ran a column form: {tiles}"


def test_noncausal_split_runs_every_form(monkeypatch):
    """A square non-causal call with 16-row tiles has, for most row blocks, tiles left of, across
    and right of the diagonal: all three forms run, the exact one only across it."""
    if GPU:
        pytest.skip("counts the interpreter's calls of the inner loop")
    monkeypatch.setenv("AULE_TRITON_ALIBI", "split")
    runs = _spy_forms(monkeypatch)
    q, k, v, slopes = _inputs(ALIBI_CASES[0])
    ops.attention_forward(q, k, v, 0.2, -1, -1, tile=(16, 16), alibi=torch.from_numpy(slopes))
    tiles = {(f, r): sum(n for f2, r2, n in runs if (f2, r2) == (f, r)) for f, r, _ in runs}
    programs = 7 * q.shape[1]  # 100 rows in 16-row blocks, per query head
    assert tiles[(0, 0)] > 0 and tiles[(2, 2)] > 0, tiles
    # Across the diagonal: one 16-key tile per 16-row block in the fully visible run (the blocks
    # start on tile boundaries), plus the ragged last tile, a masked run and exact.
    assert tiles[(1, 1)] <= 2 * programs, tiles
    assert sum(tiles.values()) == programs * 7, tiles  # every key tile of every block, once


# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, causal, window, dtype, mask kind, sinks)
WITH_MASKS = [
    (1, 4, 2, 70, 70, 16, False, -1, "float32", "float", True),       # additive mask in the right form
    (2, 2, 1, 50, 83, 32, True, -1, "float32", "bool", False),        # boolean mask, left form
    (3, 2, 2, 40, 64, 16, False, -1, "float32", "left-padding", True),  # padding span bounds the split runs
    (2, 4, 2, 66, 66, 16, False, (30, -1), "float16", "holes", False),
]


@pytest.mark.parametrize("case", WITH_MASKS[:2] if GPU else WITH_MASKS, ids=_ids)
def test_alibi_forms_with_masks_and_sinks(case, monkeypatch):
    """The row frame under an attn_mask (added to frame scores, whose row term is the same for
    every key of a row) and with sinks (joined after the row maximum is true again)."""
    monkeypatch.setenv("AULE_TRITON_ALIBI", "split")
    b, hq, hk, sq, sk, d, causal, window, dtype, kind, with_sinks = case
    left, right = masks.canonical_window(causal, window)
    q, k, v, slopes = _inputs(case[:9])
    rng = np.random.default_rng(sq + sk)
    m = mask_of_kind(rng, b, hq, sq, sk, kind)
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, tile=(16, 16), lse_grad=True, alibi=slopes,
                  sinks=sink_logits(rng, hq) if with_sinks else None, attn_mask=m)


@pytest.mark.parametrize("window", [-1, (40, 20)], ids=["noncausal", "window"])
def test_varlen_noncausal_alibi_split(window, native, monkeypatch):
    """Packed sequences, each with its own slopes and its own diagonal (seq_q != seq_k both ways),
    through the split forms (the interpreter's 32x32 tiles put keys on both sides of it)."""
    monkeypatch.setenv("AULE_TRITON_ALIBI", "split")
    lens_q, lens_k = [5, 70, 40, 1], [80, 70, 9, 33]
    varlen_check(lens_q, lens_k, 4, 2, 16, "float32", causal=False, window=window, scale=0.3, alibi=True,
                 lse_grad=True, launched=native)


def test_alibi_mode_follows_the_window_dtype_and_setting(monkeypatch):
    slopes, half, single = torch.ones(1, 2), torch.float16, torch.float32
    monkeypatch.delenv("AULE_TRITON_ALIBI", raising=False)
    assert ops._alibi_kind(None, 0, half) == kernels.ALIBI_EXACT
    assert ops._alibi_kind(slopes, 0, half) == kernels.ALIBI_LEFT  # causal, and windows ending at the row
    assert ops._alibi_kind(slopes, -1, torch.bfloat16) == kernels.ALIBI_SPLIT
    assert ops._alibi_kind(slopes, 5, half) == kernels.ALIBI_SPLIT
    assert ops._alibi_kind(slopes, 0, single) == kernels.ALIBI_EXACT  # float32 keeps its precision
    monkeypatch.setenv("AULE_TRITON_ALIBI", "split")
    assert ops._alibi_kind(slopes, 0, single) == kernels.ALIBI_LEFT
    assert ops._alibi_kind(slopes, -1, single) == kernels.ALIBI_SPLIT
    monkeypatch.setenv("AULE_TRITON_ALIBI", "exact")
    assert ops._alibi_kind(slopes, 0, half) == kernels.ALIBI_EXACT
    monkeypatch.setenv("AULE_TRITON_ALIBI", "sideways")
    with pytest.raises(ValueError, match="AULE_TRITON_ALIBI='sideways': expected one of auto, split, exact"):
        ops._alibi_kind(slopes, 0, half)


def test_tanh_setting_is_checked_and_the_interpreter_keeps_exp2(monkeypatch):
    q = torch.zeros(1, 1, 4, 16, device="cuda" if GPU else "cpu")
    for value in ("auto", "exp2", "rcp", "approx", " Approx "):
        monkeypatch.setenv("AULE_TRITON_TANH", value)
        assert settings.triton_scores().tanh == value.strip().lower()
        if not GPU:
            assert ops._tanh_kind(q, 5.0) == kernels.TANH_EXP2, "the interpreter runs no inline assembly"
        assert ops._tanh_kind(q, 0.0) == kernels.TANH_EXP2  # no cap: one compiled variant
    monkeypatch.setenv("AULE_TRITON_TANH", "fast")
    with pytest.raises(ValueError, match="AULE_TRITON_TANH='fast': expected one of auto, exp2, rcp, approx"):
        settings.triton_scores()


# --- on a GPU: every variant at full size ----------------------------------------------------------

def _capped(case, tanh, monkeypatch):
    b, hq, hk, sq, sk, d, causal, window, dtype, cap = case
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")
    monkeypatch.setenv("AULE_TRITON_TANH", tanh)
    left, right = masks.canonical_window(causal, window)
    q, k, v = make(b, hq, hk, sq, sk, d, dtype, zlib.crc32(repr(case).encode()) & 0xFFFF)
    return q * 4, k * 4, v, d, left, right, cap


SOFTCAP_FULL = [(2, 8, 2, 1025, 1025, 128, True, -1, "bfloat16", 50.0),
                (1, 8, 8, 513, 1025, 64, False, -1, "float16", 5.0),
                (1, 4, 4, 1025, 1025, 128, True, -1, "float16", 30.0),
                (1, 4, 1, 300, 700, 64, False, (128, 16), "float32", 20.0)]


@gpu_only
@pytest.mark.parametrize("tanh", ["exp2", "rcp", "approx"])
@pytest.mark.parametrize("case", SOFTCAP_FULL, ids=_ids)
def test_softcap_tanh_forms_full_size(case, tanh, monkeypatch):
    """Every tanh form within the dtype's tolerances (approx's LSE within its own bound, see
    check_fwd_bwd), forward and backward, except tanh.approx on float32 (below)."""
    if tanh == "approx" and case[8] == "float32":
        pytest.skip("tanh.approx is not used for float32 (test_approx_tanh_float32_error_is_bounded)")
    q, k, v, d, left, right, cap = _capped(case, tanh, monkeypatch)
    want = {"exp2": kernels.TANH_EXP2, "rcp": kernels.TANH_RCP, "approx": kernels.TANH_APPROX}[tanh]
    if torch.version.hip is None:
        assert ops._tanh_kind(q, cap) == want
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, case[8], lse_grad=True, softcap=cap)


@gpu_only
def test_auto_tanh_is_approx_for_16_bit_and_rcp_for_float32(monkeypatch):
    if torch.version.hip is not None:
        pytest.skip("NVIDIA's inline assembly only")
    monkeypatch.delenv("AULE_TRITON_TANH", raising=False)
    for dtype, want in (("bfloat16", kernels.TANH_APPROX), ("float16", kernels.TANH_APPROX),
                        ("float32", kernels.TANH_RCP)):
        assert ops._tanh_kind(torch.zeros(1, device="cuda", dtype=DT[dtype]), 5.0) == want


@gpu_only
def test_approx_tanh_float32_error_is_bounded(monkeypatch):
    """Why float32 keeps the rcp form: tanh.approx's error (capped scores within softcap *
    2^-10.99) is far above float32's tolerance, but within that bound it is."""
    if torch.version.hip is not None:
        pytest.skip("NVIDIA's inline assembly only")
    case = (1, 4, 4, 513, 513, 64, True, -1, "float32", 20.0)
    q, k, v, d, left, right, cap = _capped(case, "approx", monkeypatch)
    out, lse = ops.attention_forward(q, k, v, d ** -0.5, left, right, softcap=cap)
    ref, ref_lse = attention_reference(*(x.cpu().numpy() for x in (q, k, v)), causal=True, scale=d ** -0.5,
                                       softcap=cap, return_lse=True)
    bound = cap * 2.0 ** -10.98
    lse_err = np.abs(lse.cpu().numpy() - ref_lse).max()
    out_err = np.abs(out.cpu().numpy() - ref).max()
    print(f"tanh.approx float32: LSE error {lse_err:.3g}, output error {out_err:.3g}, bound {bound:.3g}")
    assert lse_err <= bound and out_err <= 4 * bound


ALIBI_FULL = [(2, 8, 2, 1025, 1025, 128, True, -1, "bfloat16"),
              (1, 8, 8, 1025, 1025, 128, False, -1, "bfloat16"),
              (1, 8, 1, 97, 2048, 64, False, -1, "float16"),
              (1, 4, 4, 2048, 1025, 80, False, (300, 64), "float16"),
              (1, 4, 2, 1025, 1025, 64, True, 256, "float32")]


@gpu_only
@pytest.mark.parametrize("mode", ["split", "exact"])
@pytest.mark.parametrize("case", ALIBI_FULL, ids=_ids)
def test_alibi_forms_full_size(case, mode, monkeypatch):
    monkeypatch.setenv("AULE_TRITON_CONFIG", "0")
    monkeypatch.setenv("AULE_TRITON_ALIBI", mode)
    b, hq, hk, sq, sk, d, causal, window, dtype = case
    if ops.fp32_refusal(dtype, d, "cuda"):
        pytest.skip(ops.fp32_refusal(dtype, d, "cuda"))
    left, right = masks.canonical_window(causal, window)
    q, k, v, slopes = _inputs(case)
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, dtype, lse_grad=True, alibi=slopes)


@gpu_only
@pytest.mark.parametrize("tanh", ["rcp", "approx"])
def test_softcap_with_alibi_split_full_size(tanh, monkeypatch):
    """Both modifiers through the column forms, with each NVIDIA tanh."""
    monkeypatch.setenv("AULE_TRITON_ALIBI", "split")
    case = (1, 8, 2, 1025, 1025, 128, False, -1, "bfloat16", 30.0)
    q, k, v, d, left, right, cap = _capped(case, tanh, monkeypatch)
    slopes = np.random.default_rng(3).uniform(0.02, 0.6, (1, 8)).astype(np.float32)
    check_fwd_bwd(q, k, v, d ** -0.5, left, right, "bfloat16", lse_grad=True, softcap=cap, alibi=slopes)


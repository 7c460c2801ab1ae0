"""Triton FlashAttention kernels: forward, backward preprocess (delta), dK/dV and dQ.

One set of kernels for NVIDIA and AMD; targets differ only by the configurations in
:mod:`.configs`. Conventions shared by all kernels:

* Scores are kept in base 2: ``s2 = (q . k) * scale * log2(e)``, so the softmax uses ``exp2``.
  The forward pass stores the natural-log LSE (the public contract); the backward preprocess turns
  it into ``lse2 = lse * log2(e)`` with ``+inf`` for rows that see no key, so that such rows get
  ``p = exp2(s2 - inf) = 0`` and therefore zero gradients without any special case.
* Visibility is aule.masks' rule on the canonical ``(LEFT, RIGHT)`` pair, bottom-right aligned:
  row ``i`` sits at key position ``i + SEQ_K - SEQ_Q`` and sees key ``j`` when
  ``j >= pos - LEFT`` (if HAS_LEFT), ``j <= pos + RIGHT`` (if HAS_RIGHT) and ``j < SEQ_K``.
* Each loop over the other sequence is split into three runs of tiles: masked tiles before the
  fully visible ones (window's left edge), fully visible tiles (no mask arithmetic at all), masked
  tiles after them (causal diagonal, right window edge, ragged end). Tiles that no row of the
  block can see are never visited.
* Rows with NaN or infinite scores follow aule.masks' rule (:func:`_finish_rows`): a NaN score
  makes the row NaN with LSE NaN, a ``+inf`` score makes it NaN with LSE ``+inf``, scores all
  ``-inf`` give zeros like a masked row. The backward pass defines no gradient for such rows.
* Score modifiers are compile-time flags, so kernels without them compile to exactly the plain
  code: SOFTCAP caps the scaled score to ``softcap * tanh(score / softcap)`` and HAS_ALIBI adds
  ``-slope * |pos - j|`` (one slope per batch and query head), both before masking as in
  aule.masks (:func:`_scores2`). The backward differentiates through the cap with
  ``1 - tanh^2``; ALiBi is additive and needs only the biased score. The forward spends as
  little per score on them as it can (:func:`_fwd_scores`): the tanh is one MUFU instruction on
  NVIDIA for 16-bit inputs (TANH, :func:`_tanh`, which the backward shares), a score's scalar
  factor goes into the row maximum and exp2's FMA, and ALiBi (ALIBI_MODE) is a column bias per
  key tile whose row term the row maximum carries, exact only across the diagonal.
* Attention sinks (HAS_SINKS) join each row's statistics after its last key tile as one more term
  of logit ``sink`` and value zero (:func:`_join_sink`); rows that saw no key keep LSE = sink
  exactly. They change neither dQ nor dK/dV (the LSE the backward reads includes them); the
  backward preprocess computes ``d sink = -sum_rows exp(sink - lse) * delta``.
* An ``attn_mask`` comes in two compile-time forms. HAS_KSPAN: per (batch, query head) the span
  ``[kstart, kend)`` of keys a padding mask shows (``KSPAN [B, H_Q, 2]`` int32); key tiles outside
  it are never visited and the tiles it cuts are masked like the window's edges. MASK_KIND (1
  boolean, 2 additive): a tile of ``MASK`` read through its strides (0 along broadcast
  dimensions) and applied to every visited tile's scores (:func:`_apply_mask`), after softcap
  and ALiBi as in aule.masks. A padding mask with holes is both: its span and its key vector as a
  boolean mask of row stride 0.
* head_dim is padded to the power of two BLOCK_D inside the kernel by masked loads (PAD_D).
* Every tensor is addressed through its strides, so non-contiguous inputs need no copy.
* FP8 (a compile-time flag, forward only): float8 e4m3 q, k, v with descale factors per (batch,
  KV head) (``QD``/``KD``/``VD`` read through their strides, 0 where one factor serves all). Q.K^T
  runs on the fp8 operands with fp32 accumulation and ``q_descale * k_descale`` joins the score
  scale; P is cast to V's fp8 type for P.V, and ``v_descale`` multiplies the finished rows. FP8 is
  ``log2`` of the factor P is scaled by before that cast (8 for e4m3fn, whose largest value is 448;
  7 for e4m3fnuz, 240), folded into the softmax's shift, so P's small entries stay normal numbers
  instead of rounding to e4m3's coarse subnormals; the row sums carry the same factor, which
  cancels in the output and is taken out of the LSE. Hopper's fp8 products want V's sequence
  dimension contiguous; the launcher hands V over so, and the kernel reads it through its strides.
* VARLEN (a compile-time flag, so dense kernels compile without it): sequences packed along the
  rows of one batch entry (``[1, H, total, D]`` views of flash-attn's ``[total, H, D]``), one launch
  for all of them. ``CU_Q``/``CU_K`` (int32 cumulative lengths) give each sequence its first rows
  and lengths (:func:`_sequence`), which then stand where SEQ_Q and SEQ_K stand for a dense batch
  entry: each sequence is attended alone, bottom-right aligned within itself. The grid's last
  dimension is the sequence and its first covers the longest one; tiles past a sequence's end
  exit at once, so padding costs one program start, never a key tile. ALiBi slopes are read per
  sequence; LSE, delta and lse2 are ``[H_Q, total_q]``.
* CHECK (a compile-time flag, on for calls whose values the host left unread on the device):
  cu_seqlens are checked as each program reads its sequence's offsets, the forward checks its
  sink and slope, and a bad value is recorded in the launch's error flag (``ERR``, ``DIRTY``;
  :mod:`.devcheck`), which aule raises as ``ValueError`` by the next call. A sequence with bad
  offsets gets no rows, so nothing outside q, k and v is read; ``MAX_Q``/``MAX_K`` are the
  caller's bounds that sized the grid.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .devcheck import SINK, SLOPE, check_finite, checked_sequence
from .common import interpreting

# Triton 3.9's interpreter casts float32 to float8 by cutting the mantissa and adding the rounding
# bit without its carry, so 7.75 becomes 4.0. Under it P is first rounded onto the e4m3 grid in
# float32 (:func:`_e4m3_grid`), which makes the cast exact; compiled kernels cast in hardware.
_ROUND_P_FIRST = tl.constexpr(interpreting())


@triton.jit
def _load(ptrs, ok0, ok1, CHECK0: tl.constexpr, CHECK1: tl.constexpr):
    # Masks only where the tile can cross an edge: interior tiles load without predicates.
    if CHECK0 and CHECK1:
        x = tl.load(ptrs, mask=ok0 & ok1, other=0.0)
    elif CHECK0:
        x = tl.load(ptrs, mask=ok0, other=0.0)
    elif CHECK1:
        x = tl.load(ptrs, mask=ok1, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def _shift(m):
    """What the online softmax subtracts from a row's scores: its maximum where finite, else 0.
    A row that has seen no key (or only -inf) then gets exp2 = 0; at a +inf maximum the shift by 0
    keeps l finite or +inf, never NaN, so NaN in l still means a NaN score (see _finish_rows)."""
    return tl.where(tl.abs(m) < float("inf"), m, 0.0)


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """``(out, lse2)`` of rows by aule.masks' rule, LSE in base 2. ``tl.max`` and ``tl.maximum``
    skip NaN (maxnum), so ``m_i`` never holds one; a NaN score reaches ``l_i`` through exp2
    instead, and ``l_i`` is NaN exactly when the row saw one."""
    saw_nan = l_i != l_i
    ok = (tl.abs(m_i) < float("inf")) & (l_i == l_i)
    l_safe = tl.where(ok, l_i, 1.0)  # a finite maximum is one of the terms: l >= 1 there
    # log2(1) + m is m where m is infinite: -inf for rows that saw nothing, +inf for a +inf score.
    lse2 = tl.where(saw_nan, float("nan"), m_i + tl.math.log2(l_safe))
    poisoned = saw_nan | (m_i == float("inf"))
    out = tl.where(ok[:, None], acc / l_safe[:, None], tl.where(poisoned[:, None], float("nan"), 0.0))
    return out, lse2


# The tanh of the softcap (the kernels' TANH constexpr, chosen by ops._tanh_kind from the target):
TANH_EXP2, TANH_RCP, TANH_APPROX = 0, 1, 2


@triton.jit
def _tanh(x, c, TANH: tl.constexpr):
    """``tanh(x * c)`` (``c`` a scalar, multiplied into the exponent's constant once, not per score),
    exactly +-1 at +-inf, NaN staying NaN, in one of three forms:

    * TANH_EXP2: ``1 - 2 / (2^(2x log2 e) + 1)`` in Triton's own ops, which run on every target and
      in the interpreter (libdevice's tanh is a per-target library). Absolute error ~1e-7, what
      float32 scores carry anyway; on NVIDIA it costs two exp2 fix-ups and a full-range division
      (three MUFU operations per score with the softmax's exp2).
    * TANH_RCP (NVIDIA): the same formula through ``ex2.approx.ftz`` and ``rcp.approx.ftz``: two MUFU
      operations, no range fix-ups, the same accuracy (only results below 2^-126 flush to zero).
    * TANH_APPROX (NVIDIA sm_75+): the one MUFU instruction ``tanh.approx.f32``, relative error up
      to 2^-10.99 (PTX ISA), so capped scores carry up to ``softcap * 2^-10.99`` absolute error: kept
      for 16-bit inputs, whose probabilities are rounded to 2^-8 (bf16) or 2^-11 (fp16) before P.V."""
    if TANH == 2:
        t = tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=r,r", [x * c], dtype=tl.float32,
                                      is_pure=True, pack=1)
    elif TANH == 1:
        e = tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x * (c * 2.8853900817779268)],
                                      dtype=tl.float32, is_pure=True, pack=1)
        r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [e + 1.0], dtype=tl.float32,
                                      is_pure=True, pack=1)
        t = 1.0 - 2.0 * r
    else:
        t = 1.0 - 2.0 / (tl.math.exp2(x * (c * 2.8853900817779268)) + 1.0)
    return t


@triton.jit
def _plus(x, c: tl.constexpr):
    """``x + c`` for a compile-time ``c``; ``x`` itself when ``c`` is 0, so kernels without FP8 keep
    their plain code."""
    if c != 0:
        x = x + c
    return x


@triton.jit
def _e4m3_grid(p, dtype: tl.constexpr):
    """``p >= 0`` rounded to the nearest (ties to even) value of e4m3 ``dtype``, in float32: three
    mantissa bits, so the step is the exponent's power of two over 8, and no finer than the
    format's subnormal step. Adding and taking away ``1.5 * 2**23`` steps rounds in the add."""
    if dtype == tl.float8e4b8:
        min_step = 0.0009765625  # 2**-10
    else:
        min_step = 0.001953125  # 2**-9
    bits = p.to(tl.int32, bitcast=True)
    step = tl.maximum(((bits & 0x7F800000) - (3 << 23)).to(tl.float32, bitcast=True), min_step)
    big = step * 12582912.0
    return (p + big) - big


@triton.jit
def _p_operand(p, dtype: tl.constexpr, FP8: tl.constexpr):
    """Softmax numerators ``p`` as the P.V product's operand of V's ``dtype``."""
    if FP8 and _ROUND_P_FIRST:
        p = _e4m3_grid(p, dtype)
    return p.to(dtype)


@triton.jit
def _descale(PTR, off_b, off_kvh, stride_b, stride_h):
    """The FP8 descale factor of (batch, KV head)."""
    return tl.load(PTR + off_b * stride_b + off_kvh * stride_h)


@triton.jit
def _scores2(qk, pos, offs_k, qk_scale, cap_in, cap_out, slope2,
             SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, TANH: tl.constexpr = 0):
    """Base-2 scores of raw products ``qk`` of rows at key positions ``pos`` and keys ``offs_k``
    (broadcastable to qk), with aule.masks' softcap and ALiBi: ``(s2, t)``, ``t`` the cap's
    ``tanh(score / softcap)`` that the backward needs (``qk`` itself without SOFTCAP, unused).
    ``cap_in = scale / softcap`` and ``cap_out = softcap * log2(e)`` fold the scale and the base
    into the cap's two multiplies; ``slope2`` is the ALiBi slope times log2(e). The backward
    recomputes scores with the forward's TANH, so its probabilities are the forward's."""
    if SOFTCAP:
        t = _tanh(qk, cap_in, TANH)
        s2 = t * cap_out
    else:
        t = qk
        s2 = qk * qk_scale
    if HAS_ALIBI:
        s2 = s2 - slope2 * tl.abs(pos - offs_k).to(tl.float32)
    return s2, t


@triton.jit
def _slope2(ALIBI, off_b, off_h, H_Q, HAS_ALIBI: tl.constexpr):
    """The ALiBi slope of (batch, query head) from ``ALIBI [B, H_Q]`` float32, times log2(e)."""
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + off_b * H_Q + off_h) * 1.4426950408889634
    else:
        slope2 = 0.0
    return slope2


@triton.jit
def _join_sink(acc, l_i, m_i, sink2):
    """The online-softmax step for one more term of base-2 logit ``sink2`` and value 0
    (aule.masks._join_sink). ``tl.maximum`` keeps a ``+inf`` maximum, so rules 2 and 3 still apply."""
    m_new = tl.maximum(m_i, sink2)
    m_use = _shift(m_new)
    alpha = tl.math.exp2(m_i - m_use)  # 0 for rows that saw nothing, whose l and acc are 0
    return acc * alpha[:, None], l_i * alpha + tl.math.exp2(sink2 - m_use), m_new


@triton.jit
def _key_span(KSPAN, off_b, off_h, H_Q, SEQ_K, HAS_KSPAN: tl.constexpr):
    """``(kstart, kend, partial)``: the keys ``[kstart, kend)`` a padding mask shows to (batch,
    query head), all without one. A start stored as ``-(kstart + 1)`` says the boolean mask beside
    the span shows every key of it to every row, so the span says all and the forward need not read
    the mask's tiles (``partial`` False): a device-analysed padding mask (ops._device_mask_tensors)."""
    if HAS_KSPAN:
        at = KSPAN + (off_b * H_Q + off_h) * 2
        raw = tl.load(at)
        kend = tl.load(at + 1)
        partial = raw >= 0
        kstart = tl.where(partial, raw, -raw - 1)
    else:
        kstart = 0
        kend = SEQ_K
        partial = True
    return kstart, kend, partial


@triton.jit
def _mask_hull(MASK, KSPAN, H_Q, ROWS, SEQ_K, stride_mb, stride_mh, stride_mm, stride_mn,
               MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (batch, query head): the hull ``[kstart, kend)`` of the keys some of the
    mask's ``ROWS`` rows may see (``[0, 0)`` for none) into ``KSPAN [B, H_Q, 2]``, read through the
    mask's broadcast strides. A boolean mask whose every row sees the whole hull (its count of
    visible entries is ROWS times the hull's width, as every one lies inside it) has its start
    stored as ``-(kstart + 1)``: :func:`_key_span` then tells the forward it need not read the mask.
    One launch on the device, where the same analysis in torch operations took some fifteen."""
    pid = tl.program_id(0)
    off_b = (pid // H_Q).to(tl.int64)
    off_h = (pid % H_Q).to(tl.int64)
    base = MASK + off_b * stride_mb + off_h * stride_mh
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    kstart = SEQ_K + pid * 0
    kend = pid * 0
    count = (pid * 0).to(tl.int64)
    for n0 in range(0, SEQ_K, BLOCK_N):
        cols = n0 + offs_n
        any_row = tl.zeros([BLOCK_N], dtype=tl.int32)
        for m0 in range(0, ROWS, BLOCK_M):
            rows = m0 + offs_m
            ok = (rows < ROWS)[:, None] & (cols < SEQ_K)[None, :]
            x = tl.load(base + rows[:, None].to(tl.int64) * stride_mm + cols[None, :] * stride_mn, mask=ok)
            if MASK_KIND == 1:
                seen = ok & (x != 0)
            else:
                seen = ok & (x != float("-inf"))  # NaN entries are seen: they reach the scores
            seen = seen.to(tl.int32)
            any_row = tl.maximum(any_row, tl.max(seen, 0))
            count += tl.sum(tl.sum(seen, 1), 0).to(tl.int64)
        kstart = tl.minimum(kstart, tl.min(tl.where(any_row > 0, cols, SEQ_K), 0))
        kend = tl.maximum(kend, tl.max(tl.where(any_row > 0, cols + 1, 0), 0))
    kstart = tl.minimum(kstart, kend)
    if MASK_KIND == 1:
        whole = count == (kend - kstart).to(tl.int64) * ROWS
        kstart = tl.where(whole, -kstart - 1, kstart)
    at = KSPAN + pid.to(tl.int64) * 2
    tl.store(at, kstart)
    tl.store(at + 1, kend)


@triton.jit
def _clamp_runs(lo, lo_end, mid0, mid1, hi, kstart, kend, BLOCK_N: tl.constexpr):
    """Key tile runs of :func:`_key_runs` narrowed to the span ``[kstart, kend)``: the tiles its
    ends cut join the masked runs, tiles outside it disappear. Tile starts stay BLOCK_N-aligned."""
    lo = tl.maximum(lo, (kstart // BLOCK_N) * BLOCK_N)
    mid0 = tl.maximum(mid0, ((kstart + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    hi = tl.minimum(hi, kend)
    mid1 = tl.maximum(tl.minimum(mid1, (kend // BLOCK_N) * BLOCK_N), mid0)
    return lo, tl.minimum(mid0, hi), mid0, mid1, hi


@triton.jit
def _apply_mask(s2, ptrs, ok, MASK_KIND: tl.constexpr):
    """Base-2 scores ``s2`` under an attn_mask tile at ``ptrs`` (``ok``: in bounds). Boolean
    (MASK_KIND 1, stored as bytes): 0 hides. Additive (2, float32): added, its ``-inf`` entries
    hiding whatever the score was (``+inf - inf`` must not make a NaN); a NaN entry stays NaN."""
    if MASK_KIND == 1:
        mk = tl.load(ptrs, mask=ok, other=0)
        s2 = tl.where(mk != 0, s2, float("-inf"))
    elif MASK_KIND == 2:
        mk = tl.load(ptrs, mask=ok, other=float("-inf"))
        s2 = tl.where(mk == float("-inf"), float("-inf"), s2 + mk * 1.4426950408889634)
    return s2


@triton.jit
def _mask_rows(MASK, off_b, off_h, offs_m, stride_mb, stride_mh, stride_mm, MASK_KIND: tl.constexpr):
    """Pointers to rows ``offs_m`` of (batch, query head)'s attn_mask (``offs_m`` unused without one)."""
    if MASK_KIND != 0:
        rows = MASK + off_b * stride_mb + off_h * stride_mh + offs_m * stride_mm
    else:
        rows = offs_m
    return rows


@triton.jit
def _visible(pos, offs_k, SEQ_K, LEFT, RIGHT, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """aule.masks.visible for broadcastable key positions of rows ``pos`` and keys ``offs_k``."""
    ok = (offs_k < SEQ_K) & (pos == pos)
    if HAS_LEFT:
        ok = ok & (offs_k >= pos - LEFT)
    if HAS_RIGHT:
        ok = ok & (offs_k <= pos + RIGHT)
    return ok


@triton.jit
def _key_runs(start_m, SEQ_Q, SEQ_K, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles for query rows ``[start_m, start_m + BLOCK_M)``: masked ``[lo, mid0)``, fully
    visible ``[mid0, mid1)``, masked ``[mid1, hi)``. The same bounds as aule.masks.key_range and
    tile_fully_visible, with tile starts aligned to BLOCK_N (clamped at 0 before dividing, since
    Triton's integer division truncates toward zero)."""
    off = SEQ_K - SEQ_Q
    lo = start_m * 0
    hi = lo + SEQ_K
    mid0 = lo
    mid1 = (hi // BLOCK_N) * BLOCK_N
    if HAS_LEFT:
        lo = (tl.maximum(start_m + off - LEFT, 0) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(start_m + BLOCK_M - 1 + off - LEFT, 0)
        mid0 = tl.maximum(lo, ((first_full + BLOCK_N - 1) // BLOCK_N) * BLOCK_N)
    if HAS_RIGHT:
        hi = tl.minimum(hi, start_m + BLOCK_M + off + RIGHT)
        last_full = tl.maximum(start_m + off + RIGHT + 1, 0)
        mid1 = tl.minimum(mid1, (last_full // BLOCK_N) * BLOCK_N)
    mid1 = tl.maximum(mid1, mid0)
    return lo, tl.minimum(mid0, hi), mid0, mid1, hi


@triton.jit
def _query_runs(start_n, SEQ_Q, SEQ_K, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles that see keys ``[start_n, start_n + BLOCK_N)``: masked ``[lo, mid0)``, fully
    visible ``[mid0, mid1)``, masked ``[mid1, hi)`` (the transpose of _key_runs). Row ``i`` sees
    key ``j`` iff ``j - RIGHT <= i + off <= j + LEFT``. Keys past SEQ_K may sit in a fully visible
    tile: their dK/dV rows are never stored, so they need no mask."""
    off = SEQ_K - SEQ_Q
    lo = start_n * 0
    hi = lo + SEQ_Q
    mid0 = lo
    mid1 = (hi // BLOCK_M) * BLOCK_M
    if HAS_RIGHT:
        lo = (tl.maximum(start_n - RIGHT - off, 0) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(start_n + BLOCK_N - 1 - RIGHT - off, 0)
        mid0 = tl.maximum(lo, ((first_full + BLOCK_M - 1) // BLOCK_M) * BLOCK_M)
    if HAS_LEFT:
        hi = tl.minimum(hi, start_n + BLOCK_N + LEFT - off)
        last_full = tl.maximum(start_n + LEFT - off + 1, 0)
        mid1 = tl.minimum(mid1, (last_full // BLOCK_M) * BLOCK_M)
    mid1 = tl.maximum(mid1, mid0)
    return lo, tl.minimum(mid0, hi), mid0, mid1, hi


@triton.jit
def _run_bounds(run: tl.constexpr, lo, lo_end, mid0, mid1, hi):
    """Start and end of tile run ``run`` (0: masked before, 1: fully visible, 2: masked after)."""
    if run == 0:
        start = lo
        end = lo_end
    elif run == 1:
        start = mid0
        end = mid1
    else:
        start = mid1
        end = hi
    return start, end


@triton.jit
def _sequence(CU_Q, CU_K, ERR, DIRTY, off_b, SEQ_Q, SEQ_K, MAX_Q, MAX_K, VARLEN: tl.constexpr,
              CHECK: tl.constexpr):
    """``(q0, sq, k0, sk)``: where sequence ``off_b``'s rows start in q and in k/v, and its lengths.
    Dense: each batch entry holds one sequence from row 0, of SEQ_Q queries and SEQ_K keys. VARLEN:
    the sequences are packed along the rows of one batch entry, ``CU_Q``/``CU_K`` (int32
    cumulative lengths from 0) say where; q0 and k0 are int64, as ``q0 * stride`` passes 2**31
    in a long pack. With CHECK the offsets are the caller's, unread by the host (int32 or int64),
    checked here against the totals and MAX_Q/MAX_K (devcheck.checked_sequence)."""
    if VARLEN and CHECK:
        q0, sq = checked_sequence(CU_Q, off_b, SEQ_Q, MAX_Q, ERR, DIRTY, 0)
        k0, sk = checked_sequence(CU_K, off_b, SEQ_K, MAX_K, ERR, DIRTY, 1)
    elif VARLEN:
        qa = tl.load(CU_Q + off_b)
        ka = tl.load(CU_K + off_b)
        sq = tl.load(CU_Q + off_b + 1) - qa
        sk = tl.load(CU_K + off_b + 1) - ka
        q0 = qa.to(tl.int64)
        k0 = ka.to(tl.int64)
    else:
        q0 = 0
        sq = SEQ_Q
        k0 = 0
        sk = SEQ_K
    return q0, sq, k0, sk


@triton.jit
def _at(off_b, r0, stride_b, stride_r, VARLEN: tl.constexpr):
    """Where sequence ``off_b`` begins in a tensor of batch stride ``stride_b`` and row stride
    ``stride_r``: at its batch entry, or (VARLEN) at its first packed row ``r0``."""
    if VARLEN:
        at = r0 * stride_r
    else:
        at = off_b * stride_b
    return at


@triton.jit
def _row0(off_b, off_h, q0, H_Q, SEQ_Q, VARLEN: tl.constexpr):
    """The row of sequence ``off_b``'s first query of head ``off_h`` in LSE, delta and lse2:
    ``[B, H_Q, SEQ_Q]``, or (VARLEN) ``[H_Q, total_q]`` with SEQ_Q = total_q."""
    if VARLEN:
        row0 = off_h * SEQ_Q + q0
    else:
        row0 = (off_b * H_Q + off_h) * SEQ_Q
    return row0


@triton.jit
def _query_tile(CU_Q, CU_K, ERR, DIRTY, SEQ_Q, SEQ_K, MAX_Q, MAX_K, H_Q, GROUP, HAS_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr, VARLEN: tl.constexpr, CHECK: tl.constexpr):
    """Program coordinates for kernels with one program per (query tile, sequence, query head):
    the grid is (query tiles, B * H_Q), or with VARLEN (query tiles of the longest sequence, H_Q,
    sequences), where tiles past a sequence's end exit. ``(pid_bh, off_b, off_h, off_kvh,
    start_m, q0, sq, k0, sk)`` (:func:`_sequence`): the sequence's LSE rows start at
    ``pid_bh * SEQ_Q + q0``, as a varlen LSE ``[H_Q, total_q]`` is one batch entry's. The dense
    branch issues exactly the operations it did before VARLEN existed."""
    if VARLEN:
        off_b = tl.program_id(2).to(tl.int64)
    pid_bh = tl.program_id(1)
    pid_m = tl.program_id(0)
    if HAS_RIGHT:
        # Causal-like masks make late query tiles the longest: start those first (less tail).
        pid_m = tl.num_programs(0) - 1 - pid_m
    if VARLEN:
        off_h = pid_bh.to(tl.int64)
    else:
        off_b = (pid_bh // H_Q).to(tl.int64)
        off_h = (pid_bh % H_Q).to(tl.int64)
    off_kvh = off_h // GROUP  # GQA: the query head's KV head, read in place, never expanded
    q0, sq, k0, sk = _sequence(CU_Q, CU_K, ERR, DIRTY, off_b, SEQ_Q, SEQ_K, MAX_Q, MAX_K, VARLEN, CHECK)
    return pid_bh, off_b, off_h, off_kvh, pid_m * BLOCK_M, q0, sq, k0, sk


# How the forward adds ALiBi (its ALIBI_MODE constexpr, chosen by ops._alibi_kind):
# ALIBI_EXACT: -slope * |pos - j| per score, as _scores2 (and the backward) compute it.
# ALIBI_LEFT: every visible key is at or before its row (right == 0: causal and such windows), so
#   the bias is slope * j - slope * pos: a column term per key and a row term that the softmax
#   does not see (it is shift-invariant per row), put back into the row maximum after the last tile.
# ALIBI_SPLIT: as ALIBI_LEFT on the fully visible tiles left of every row of the block, the mirror
#   image (-slope * j + slope * pos) right of them, the exact form on the few tiles across the
#   diagonal and on the masked runs.
ALIBI_EXACT, ALIBI_LEFT, ALIBI_SPLIT = 0, 1, 2


@triton.jit
def _fwd_scores(qk, pos, offs_n, colvec, col0, qk_scale, cap_in, cap_out, slope2,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, FORM: tl.constexpr, TANH: tl.constexpr):
    """The forward's base-2 scores of one tile as ``(x, a, d)``: ``x * a + d`` (``a`` > 0 and ``d``
    scalars) plus the row term FORM leaves out. Keeping ``a`` and ``d`` apart lets the row maximum
    take them once per row and the exp2 take them in its FMA, so no score pays for them.
    FORM (with ALiBi): 0, keys at or before every row: ``+ slope2 * (j - c0)``; 1, the exact
    ``-slope2 * |pos - j|``; 2, keys at or after every row: ``- slope2 * (j - c0)``. Of the column
    term, ``colvec`` is ``slope2`` times the tile's own key offsets (the same for every tile) and
    ``d`` the tile's share, ``slope2 * col0`` with ``col0`` the tile's first key less ``c0``; both
    stay small near the diagonal, where the float precision of scores matters."""
    if HAS_ALIBI and FORM != 1:
        if SOFTCAP:
            s2 = _tanh(qk, cap_in, TANH) * cap_out
        else:
            s2 = qk * qk_scale
        d = slope2 * col0.to(tl.float32)
        if FORM == 0:
            x = s2 + colvec[None, :]
        else:
            x = s2 - colvec[None, :]
            d = -d
        a = 1.0
    else:
        d = 0.0
        if HAS_ALIBI:
            x, _ = _scores2(qk, pos[:, None], offs_n[None, :], qk_scale, cap_in, cap_out, slope2,
                            SOFTCAP, HAS_ALIBI, TANH)
            a = 1.0
        elif SOFTCAP:
            x = _tanh(qk, cap_in, TANH)
            a = cap_out
        else:
            x = qk
            a = qk_scale
    return x, a, d


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                    pos, offs_n0, offs_d, start, end, KEND, LEFT, RIGHT, qk_scale, cap_in, cap_out,
                    slope2, colvec, c0, rowterm, kstart, mask_rows, stride_mn, m_ok,
                    MASKED: tl.constexpr,
                    HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                    HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                    HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr, FORM: tl.constexpr,
                    ROW_TERMS: tl.constexpr, TANH: tl.constexpr, FP8: tl.constexpr = 0):
    """Online softmax (base 2) of one query tile over key tiles ``[start, end)``. Keys end at
    ``KEND`` (SEQ_K, or a padding span's end, which then starts at ``kstart``); ``mask_rows``
    points at the rows of an attn_mask tile (MASK_KIND). FORM is :func:`_fwd_scores`' ALiBi form;
    the statistics are kept for scores ``ROW_TERMS * rowterm`` above those FORM computes, so that
    tiles of every form share one row maximum (see _attn_fwd). With FP8, P is ``2**FP8`` times the
    softmax numerators, and so are ``l_i`` and ``acc``."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < KEND
        if HAS_KSPAN:
            # Keys before the span are never read: what padding holds must not reach P.V.
            n_ok = n_ok & (offs_n >= kstart)
        kt = _load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                   d_ok[:, None], n_ok[None, :], PAD_D, MASKED)
        qk = tl.dot(q, kt, input_precision=DOT_PREC)
        x, a, d = _fwd_scores(qk, pos, offs_n, colvec, start_n - c0, qk_scale, cap_in, cap_out, slope2,
                              SOFTCAP, HAS_ALIBI, FORM, TANH)
        if MASK_KIND == 1:
            # A boolean mask only hides, so it applies to x itself (a > 0).
            x = _apply_mask(x, mask_rows[:, None] + offs_n[None, :] * stride_mn,
                            m_ok[:, None] & n_ok[None, :], MASK_KIND)
        elif MASK_KIND == 2:
            x = _apply_mask(x * a + d, mask_rows[:, None] + offs_n[None, :] * stride_mn,
                            m_ok[:, None] & n_ok[None, :], MASK_KIND)
            a = 1.0
            d = 0.0
        if MASKED:
            vis = _visible(pos[:, None], offs_n[None, :], KEND, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            if HAS_KSPAN:
                vis = vis & (offs_n[None, :] >= kstart)
            x = tl.where(vis, x, float("-inf"))
        # a > 0, so the row maximum of x * a is a times x's: one multiply per row, not per score;
        # what is added per row (the tile's column share, the row terms) is added to it alike.
        m_tile = tl.max(x, 1) * a
        if ROW_TERMS != 0 or (HAS_ALIBI and FORM != 1 and MASK_KIND != 2):
            row_add = rowterm * ROW_TERMS + d
            m_new = tl.maximum(m_i, m_tile + row_add)
            m_use = _shift(m_new)  # visible keys can still score -inf or +inf
            p = tl.math.exp2(x * a - _plus(m_use - row_add, -FP8)[:, None])
        else:
            m_new = tl.maximum(m_i, m_tile)
            m_use = _shift(m_new)
            p = tl.math.exp2(x * a - _plus(m_use, -FP8)[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                  n_ok[:, None], d_ok[None, :], MASKED, PAD_D)
        acc = acc * alpha[:, None]
        acc = tl.dot(_p_operand(p, v.dtype, FP8), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_runs(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
              pos, offs_n0, offs_d, lo, lo_end, mid0, mid1, hi, left_end, right_start, kend,
              LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2, colvec, c0, rowterm, kstart,
              mask_rows, stride_mn, m_ok, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_KSPAN: tl.constexpr,
              MASK_KIND: tl.constexpr, ALIBI_MODE: tl.constexpr, TANH: tl.constexpr, FP8: tl.constexpr):
    """The forward's key loops over one query tile: the masked run before the visible one, the
    visible run (split by ALiBi form under ALIBI_SPLIT) and the masked run after it."""
    for run in tl.static_range(3):
        if run != 0 or HAS_LEFT or HAS_KSPAN:
            start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
            split = ALIBI_MODE == 2 and run == 1
            a_end = tl.minimum(tl.maximum(left_end, start), end)
            b_start = tl.minimum(tl.maximum(right_start, a_end), end)
            for form in tl.static_range(3):
                # A run not split is one loop: the left form for ALIBI_LEFT, else the exact one.
                if split or form == (ALIBI_MODE != 1):
                    if split:
                        f_start, f_end = _run_bounds(form, start, a_end, a_end, b_start, end)
                    else:
                        f_start = start
                        f_end = end
                    acc, l_i, m_i = _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base,
                                                    stride_kn, stride_kd, stride_vn, stride_vd,
                                                    pos, offs_n0, offs_d, f_start, f_end, kend, LEFT, RIGHT,
                                                    qk_scale, cap_in, cap_out, slope2, colvec, c0, rowterm,
                                                    kstart, mask_rows, stride_mn, m_ok, run != 1, HAS_LEFT,
                                                    HAS_RIGHT, HEAD_DIM, PAD_D, BLOCK_N, DOT_PREC,
                                                    SOFTCAP, HAS_ALIBI, HAS_KSPAN, MASK_KIND, form,
                                                    form * (ALIBI_MODE == 2), TANH, FP8)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, ALIBI, SINKS, KSPAN, MASK, CU_Q, CU_K, ERR, DIRTY,
              stride_qb, stride_qh, stride_qm, stride_qd,
              stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd,
              stride_ob, stride_oh, stride_om, stride_od,
              stride_mb, stride_mh, stride_mm, stride_mn,
              SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, cap_in, cap_out, H_Q, GROUP,
              Q_BUCKET, K_BUCKET, MAX_Q, MAX_K,
              QD, KD, VD, stride_qdb, stride_qdh, stride_kdb, stride_kdh, stride_vdb, stride_vdh,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
              HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
              SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINKS: tl.constexpr,
              HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
              TANH: tl.constexpr, ALIBI_MODE: tl.constexpr,
              CHECK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8: tl.constexpr = 0):
    """One program per (query tile, sequence, query head). Writes O and the natural-log LSE.
    With CHECK, values the host did not read (cu_seqlens, sinks, slopes) are checked as they are
    loaded and a bad one recorded in the launch's error flag ``ERR``/``DIRTY`` (:mod:`.devcheck`).
    ``QD``/``KD``/``VD`` and their strides: FP8's descale factors (stand-ins, never read, without).

    With ALIBI_MODE ALIBI_LEFT or ALIBI_SPLIT the row statistics are kept for scores
    ``rowterm = slope2 * (pos - c0)`` above the true ones, ``c0`` the block's first row position:
    the left form computes exactly those, the exact form adds ``rowterm`` and the right form
    ``2 * rowterm`` per row. One subtraction from the row maximum after the last tile makes them
    true again, so the LSE (and the backward, which recomputes exact scores against it) is the
    definition's; the output does not change with a per-row shift."""
    pid_bh, off_b, off_h, off_kvh, start_m, q0, sq, k0, sk = _query_tile(CU_Q, CU_K, ERR, DIRTY, SEQ_Q, SEQ_K,
                                                                         MAX_Q, MAX_K, H_Q, GROUP, HAS_RIGHT,
                                                                         BLOCK_M, VARLEN, CHECK)
    if VARLEN:
        if start_m >= sq:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM

    q = _load(Q + _at(off_b, q0, stride_qb, stride_qm, VARLEN) + off_h * stride_qh
              + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
              m_ok[:, None], d_ok[None, :], True, PAD_D)
    k_base = K + _at(off_b, k0, stride_kb, stride_kn, VARLEN) + off_kvh * stride_kh
    v_base = V + _at(off_b, k0, stride_vb, stride_vn, VARLEN) + off_kvh * stride_vh
    pos = offs_m + (sk - sq)
    slope2 = _slope2(ALIBI, off_b, off_h, H_Q, HAS_ALIBI)
    if HAS_ALIBI and CHECK:
        # The slope itself: one beyond float32 / log2(e) is finite, though slope2 is not.
        check_finite(tl.load(ALIBI + off_b * H_Q + off_h), ERR, DIRTY, SLOPE, off_b, off_h)
    if FP8:
        # The true score is (q * q_descale) . (k * k_descale): both factors scale every product.
        qk_descale = (_descale(QD, off_b, off_kvh, stride_qdb, stride_qdh)
                      * _descale(KD, off_b, off_kvh, stride_kdb, stride_kdh))
        qk_scale = qk_scale * qk_descale
        cap_in = cap_in * qk_descale
    c0 = start_m + (sk - sq)
    rowterm = slope2 * (pos - c0).to(tl.float32)
    colvec = slope2 * offs_n0.to(tl.float32)  # loop-invariant: a tile's own share is one scalar
    # Key tiles of the fully visible run that lie at or before every row of the block end at
    # left_end; those at or after every row start at right_start (tile starts, clamped at 0
    # before dividing, as Triton's division truncates toward zero).
    left_end = (tl.maximum(c0 + 1, 0) // BLOCK_N) * BLOCK_N
    right_start = ((tl.maximum(c0 + BLOCK_M - 1, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mask_rows = _mask_rows(MASK, off_b, off_h, offs_m, stride_mb, stride_mh, stride_mm, MASK_KIND)
    kstart, kend, partial = _key_span(KSPAN, off_b, off_h, H_Q, sk, HAS_KSPAN)
    lo, lo_end, mid0, mid1, hi = _key_runs(start_m, sq, sk, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
    if HAS_KSPAN:
        lo, lo_end, mid0, mid1, hi = _clamp_runs(lo, lo_end, mid0, mid1, hi, kstart, kend, BLOCK_N)
    # A device-analysed boolean mask that shows its whole span to every row (``partial`` False)
    # says no more than the span: such a program's loops never read it. MASK_KIND 1 compiles the
    # loops twice (``read`` 0 without the mask's tiles, 1 with them) and each program takes one,
    # so the test is made once per program, not per tile inside the software-pipelined loop.
    for read in tl.static_range(1 + (MASK_KIND == 1)):
        if MASK_KIND == 1:
            take = partial == (read == 1)
        else:
            take = True
        if take:
            acc, l_i, m_i = _fwd_runs(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd,
                                      pos, offs_n0, offs_d, lo, lo_end, mid0, mid1, hi, left_end, right_start,
                                      kend, LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2, colvec, c0, rowterm,
                                      kstart, mask_rows, stride_mn, m_ok, HAS_LEFT, HAS_RIGHT, HEAD_DIM, PAD_D,
                                      BLOCK_N, DOT_PREC, SOFTCAP, HAS_ALIBI, HAS_KSPAN,
                                      MASK_KIND * (read + (MASK_KIND != 1)), ALIBI_MODE, TANH, FP8)
    if ALIBI_MODE != 0:
        m_i = m_i - rowterm  # the statistics of true scores again (infinite maxima stay as they are)

    if HAS_SINKS:
        sink = tl.load(SINKS + off_h)
        if CHECK:
            check_finite(sink, ERR, DIRTY, SINK, off_h, off_h * 0)
        # Rows that saw no key (or only -inf scores): the definition's LSE is the sink itself,
        # which a round trip through base 2 would miss by an ulp.
        unseen = (m_i == float("-inf")) & (l_i == 0.0)
        # With FP8 the row sums hold 2**FP8 times each term: so must the sink's.
        acc, l_i, m_i = _join_sink(acc, l_i, m_i, _plus(sink * 1.4426950408889634, FP8))
    out, lse2 = _finish_rows(acc, l_i, m_i)
    if FP8:
        lse2 = lse2 - FP8
        out = out * _descale(VD, off_b, off_kvh, stride_vdb, stride_vdh)
    lse = lse2 * 0.6931471805599453
    if HAS_SINKS:
        lse = tl.where(unseen, sink, lse)
    tl.store(LSE + pid_bh.to(tl.int64) * SEQ_Q + q0 + offs_m, lse, mask=m_ok)
    o_ptrs = (O + _at(off_b, q0, stride_ob, stride_om, VARLEN) + off_h * stride_oh
              + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_preprocess(O, DO, LSE, DLSE, DELTA, LSE2, SINKS, DSINKS,
                         stride_ob, stride_oh, stride_om, stride_od,
                         stride_dob, stride_doh, stride_dom, stride_dod,
                         SEQ_Q, H_Q,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DLSE: tl.constexpr,
                         HAS_SINKS: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) - dLSE, and lse2 = LSE * log2(e) (+inf for rows without keys).

    With sinks, this program's share of ``d sink[h]``: ``dO/d sink = -p_sink O`` and ``dLSE/d sink
    = p_sink`` with ``p_sink = exp(sink - lse)``, so each row adds ``-p_sink * delta``. Partial sums
    go to ``DSINKS [B * H_Q, programs along seq_q]`` and are summed by the caller: a fixed order,
    so the gradient is deterministic, which atomics would not make it."""
    pid_bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    off_b = (pid_bh // H_Q).to(tl.int64)
    off_h = (pid_bh % H_Q).to(tl.int64)
    m_ok = offs_m < SEQ_Q
    ok = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
                + offs_d[None, :] * stride_od, mask=ok, other=0.0).to(tl.float32)
    do = tl.load(DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dom
                 + offs_d[None, :] * stride_dod, mask=ok, other=0.0).to(tl.float32)
    row = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        # d lse / d s_ij = p_ij, so an upstream LSE gradient enters dS exactly like -delta.
        delta = delta - tl.load(DLSE + row, mask=m_ok, other=0.0)
    lse = tl.load(LSE + row, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(DELTA + row, delta, mask=m_ok)
    tl.store(LSE2 + row, lse2, mask=m_ok)
    if HAS_SINKS:
        sink2 = tl.load(SINKS + off_h) * 1.4426950408889634
        part = tl.sum(tl.where(m_ok, -tl.math.exp2(sink2 - lse2) * delta, 0.0), 0)
        tl.store(DSINKS + pid_bh.to(tl.int64) * tl.num_programs(0) + tl.program_id(0), part)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, Q, DO, LSE2, DELTA, ALIBI, KSPAN, MASK_B, off_b, first_head,
                         row0, lse_rows, stride_qh, stride_qm, stride_qd, stride_doh, stride_dom, stride_dod,
                         stride_mh, stride_mm, stride_mn,
                         offs_n, offs_m0, offs_d, start, end, GROUP, H_Q, SEQ_Q, SEQ_K, LEFT, RIGHT,
                         qk_scale, cap_in, cap_out, MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                         HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
                         BLOCK_M: tl.constexpr, DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr,
                         HAS_ALIBI: tl.constexpr, HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr,
                         TANH: tl.constexpr):
    """Accumulate dK and dV of one key tile over query tiles ``[start, end)`` of every query head
    of the GQA group (transposed scores). Heads and tiles share one flat loop: a loop nest here
    made the compiler spill the dK/dV accumulators on Hopper. A padding span and an attn_mask
    belong to each query head, so they apply in every run: the runs follow the window only.
    ``Q``/``DO`` point at the sequence's first row; its LSE2/delta rows are ``row0 + g * lse_rows``
    for head ``first_head + g``."""
    d_ok = offs_d < HEAD_DIM
    n_tiles = (tl.maximum(end - start, 0) + BLOCK_M - 1) // BLOCK_M
    for t in range(0, n_tiles * GROUP):
        g = t // n_tiles
        start_m = start + (t - g * n_tiles) * BLOCK_M
        h = first_head + g
        offs_m = start_m + offs_m0
        m_ok = offs_m < SEQ_Q
        qt = _load(Q + h * stride_qh + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_qm,
                   d_ok[:, None], m_ok[None, :], PAD_D, MASKED)
        rows = row0 + g * lse_rows + offs_m
        if MASKED:
            # Padded rows get lse2 = +inf: p = 0, so they add nothing.
            lse2 = tl.load(LSE2 + rows, mask=m_ok, other=float("inf"))
            delta = tl.load(DELTA + rows, mask=m_ok, other=0.0)
        else:
            lse2 = tl.load(LSE2 + rows)
            delta = tl.load(DELTA + rows)
        st = tl.dot(k, qt, input_precision=DOT_PREC)
        pos = offs_m + (SEQ_K - SEQ_Q)
        st, tt = _scores2(st, pos[None, :], offs_n[:, None], qk_scale, cap_in, cap_out,
                          _slope2(ALIBI, off_b, h, H_Q, HAS_ALIBI), SOFTCAP, HAS_ALIBI, TANH)
        if MASK_KIND != 0:
            st = _apply_mask(st, MASK_B + h * stride_mh + offs_n[:, None] * stride_mn
                             + offs_m[None, :] * stride_mm,
                             (offs_n < SEQ_K)[:, None] & m_ok[None, :], MASK_KIND)
        pt = tl.math.exp2(st - lse2[None, :])
        if MASKED:
            vis = _visible(pos[None, :], offs_n[:, None], SEQ_K, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            pt = tl.where(vis, pt, 0.0)
        if HAS_KSPAN:
            kstart, kend, _ = _key_span(KSPAN, off_b, h, H_Q, SEQ_K, HAS_KSPAN)
            in_span = (offs_n[:, None] >= kstart) & (offs_n[:, None] < kend)
            pt = tl.where(in_span, pt, 0.0)
        do = _load(DO + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                   m_ok[:, None], d_ok[None, :], MASKED, PAD_D)
        dv = tl.dot(pt.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpt = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if HAS_KSPAN:
            # Padding keys may hold anything (NaN in unwritten memory): 0 * NaN must not reach dK.
            dst = tl.where(in_span, dst, 0.0)
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)  # d/dx c*tanh(x/c)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, LSE2, DELTA, DK, DV, ALIBI, KSPAN, MASK, CU_Q, CU_K, ERR, DIRTY,
                   stride_qb, stride_qh, stride_qm, stride_qd,
                   stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd,
                   stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd,
                   stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_mb, stride_mh, stride_mm, stride_mn,
                   SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, cap_in, cap_out, H_Q, H_KV, GROUP,
                   Q_BUCKET, K_BUCKET, MAX_Q, MAX_K,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
                   HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                   SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
                   TANH: tl.constexpr, CHECK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (key tile, sequence, KV head): the grid is (key tiles, B * H_KV), or with
    VARLEN (key tiles of the longest sequence, H_KV, sequences), where tiles past a sequence's
    end exit. It walks every query head of its GQA group, so dK/dV are summed over the group in
    registers: no atomics, no expanded K/V."""
    pid_n = tl.program_id(0)
    if VARLEN:
        off_b = tl.program_id(2).to(tl.int64)
        off_kvh = tl.program_id(1).to(tl.int64)
    else:
        pid_bh = tl.program_id(1)
        off_b = (pid_bh // H_KV).to(tl.int64)
        off_kvh = (pid_bh % H_KV).to(tl.int64)
    q0, sq, k0, sk = _sequence(CU_Q, CU_K, ERR, DIRTY, off_b, SEQ_Q, SEQ_K, MAX_Q, MAX_K, VARLEN, CHECK)
    start_n = pid_n * BLOCK_N
    if VARLEN:
        # A sequence without queries still stores its keys' zero gradients: only tiles past its keys exit.
        if start_n >= sk:
            return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < sk
    d_ok = offs_d < HEAD_DIM
    k = _load(K + _at(off_b, k0, stride_kb, stride_kn, VARLEN) + off_kvh * stride_kh + offs_n[:, None] * stride_kn
              + offs_d[None, :] * stride_kd, n_ok[:, None], d_ok[None, :], True, PAD_D)
    v = _load(V + _at(off_b, k0, stride_vb, stride_vn, VARLEN) + off_kvh * stride_vh + offs_n[:, None] * stride_vn
              + offs_d[None, :] * stride_vd, n_ok[:, None], d_ok[None, :], True, PAD_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    lo, lo_end, mid0, mid1, hi = _query_runs(start_n, sq, sk, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                             HAS_LEFT, HAS_RIGHT)
    first_head = off_kvh * GROUP
    if HAS_KSPAN:
        # A key tile outside every span of its group's heads is padding to all of them: no query
        # tile is visited, and its dK/dV are stored as zeros.
        ustart = sk
        uend = sk * 0
        for g in range(0, GROUP):
            kstart, kend, _ = _key_span(KSPAN, off_b, first_head + g, H_Q, sk, HAS_KSPAN)
            ustart = tl.minimum(ustart, kstart)
            uend = tl.maximum(uend, kend)
        gone = (start_n >= uend) | (start_n + BLOCK_N <= ustart)
        lo_end = tl.where(gone, lo, lo_end)
        mid1 = tl.where(gone, mid0, mid1)
        hi = tl.where(gone, mid0, hi)
    q_b = Q + _at(off_b, q0, stride_qb, stride_qm, VARLEN)
    do_b = DO + _at(off_b, q0, stride_dob, stride_dom, VARLEN)
    mask_b = MASK + off_b * stride_mb
    row0 = _row0(off_b, first_head, q0, H_Q, SEQ_Q, VARLEN)
    for run in tl.static_range(3):
        if run != 0 or HAS_RIGHT:
            start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
            dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_b, do_b, LSE2, DELTA, ALIBI, KSPAN, mask_b,
                                          off_b, first_head, row0, SEQ_Q, stride_qh, stride_qm, stride_qd,
                                          stride_doh, stride_dom, stride_dod, stride_mh, stride_mm,
                                          stride_mn, offs_n, offs_m0,
                                          offs_d, start, end, GROUP, H_Q, sq, sk, LEFT, RIGHT,
                                          qk_scale, cap_in, cap_out, run != 1, HAS_LEFT, HAS_RIGHT,
                                          HEAD_DIM, PAD_D, BLOCK_M, DOT_PREC, SOFTCAP, HAS_ALIBI,
                                          HAS_KSPAN, MASK_KIND, TANH)
    dk = dk * sm_scale
    ok = n_ok[:, None] & d_ok[None, :]
    tl.store(DK + _at(off_b, k0, stride_dkb, stride_dkn, VARLEN) + off_kvh * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + _at(off_b, k0, stride_dvb, stride_dvn, VARLEN) + off_kvh * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty), mask=ok)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd,
                       stride_vn, stride_vd, pos, offs_n0, offs_d, start, end, KEND, LEFT, RIGHT,
                       qk_scale, cap_in, cap_out, slope2, kstart, mask_rows, stride_mn, m_ok,
                       MASKED: tl.constexpr, HAS_LEFT: tl.constexpr,
                       HAS_RIGHT: tl.constexpr, HEAD_DIM: tl.constexpr, PAD_D: tl.constexpr,
                       BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr,
                       HAS_ALIBI: tl.constexpr, HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr,
                       TANH: tl.constexpr):
    """Accumulate dQ of one query tile over key tiles ``[start, end)`` (``KEND``, ``kstart`` and
    ``mask_rows`` as in :func:`_attn_fwd_inner`)."""
    d_ok = offs_d < HEAD_DIM
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + offs_n0
        n_ok = offs_n < KEND
        if HAS_KSPAN:
            # Keys before the span are never read: what padding holds must not reach P.V.
            n_ok = n_ok & (offs_n >= kstart)
        kt = _load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                   d_ok[:, None], n_ok[None, :], PAD_D, MASKED)
        vt = _load(v_base + offs_d[:, None] * stride_vd + offs_n[None, :] * stride_vn,
                   d_ok[:, None], n_ok[None, :], PAD_D, MASKED)
        s = tl.dot(q, kt, input_precision=DOT_PREC)
        s, t = _scores2(s, pos[:, None], offs_n[None, :], qk_scale, cap_in, cap_out, slope2,
                        SOFTCAP, HAS_ALIBI, TANH)
        if MASK_KIND != 0:
            s = _apply_mask(s, mask_rows[:, None] + offs_n[None, :] * stride_mn,
                            m_ok[:, None] & n_ok[None, :], MASK_KIND)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            vis = _visible(pos[:, None], offs_n[None, :], KEND, LEFT, RIGHT, HAS_LEFT, HAS_RIGHT)
            if HAS_KSPAN:
                vis = vis & (offs_n[None, :] >= kstart)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d/dx c*tanh(x/c)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, LSE2, DELTA, DQ, ALIBI, KSPAN, MASK, CU_Q, CU_K, ERR, DIRTY,
                 stride_qb, stride_qh, stride_qm, stride_qd,
                 stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd,
                 stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_mb, stride_mh, stride_mm, stride_mn,
                 SEQ_Q, SEQ_K, LEFT, RIGHT, qk_scale, sm_scale, cap_in, cap_out, H_Q, GROUP,
                 Q_BUCKET, K_BUCKET, MAX_Q, MAX_K,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAD_D: tl.constexpr,
                 HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, DOT_PREC: tl.constexpr,
                 SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_KSPAN: tl.constexpr, MASK_KIND: tl.constexpr, VARLEN: tl.constexpr,
                 TANH: tl.constexpr, CHECK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program per (query tile, sequence, query head): dQ = scale * dS K over the visible keys."""
    pid_bh, off_b, off_h, off_kvh, start_m, q0, sq, k0, sk = _query_tile(CU_Q, CU_K, ERR, DIRTY, SEQ_Q, SEQ_K,
                                                                         MAX_Q, MAX_K, H_Q, GROUP, HAS_RIGHT,
                                                                         BLOCK_M, VARLEN, CHECK)
    if VARLEN:
        if start_m >= sq:
            return
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM
    q = _load(Q + _at(off_b, q0, stride_qb, stride_qm, VARLEN) + off_h * stride_qh + offs_m[:, None] * stride_qm
              + offs_d[None, :] * stride_qd, m_ok[:, None], d_ok[None, :], True, PAD_D)
    do = _load(DO + _at(off_b, q0, stride_dob, stride_dom, VARLEN) + off_h * stride_doh
               + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod, m_ok[:, None], d_ok[None, :],
               True, PAD_D)
    row = pid_bh.to(tl.int64) * SEQ_Q + q0 + offs_m
    lse2 = tl.load(LSE2 + row, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row, mask=m_ok, other=0.0)
    k_base = K + _at(off_b, k0, stride_kb, stride_kn, VARLEN) + off_kvh * stride_kh
    v_base = V + _at(off_b, k0, stride_vb, stride_vn, VARLEN) + off_kvh * stride_vh
    pos = offs_m + (sk - sq)
    slope2 = _slope2(ALIBI, off_b, off_h, H_Q, HAS_ALIBI)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    mask_rows = _mask_rows(MASK, off_b, off_h, offs_m, stride_mb, stride_mh, stride_mm, MASK_KIND)
    kstart, kend, partial = _key_span(KSPAN, off_b, off_h, H_Q, sk, HAS_KSPAN)
    lo, lo_end, mid0, mid1, hi = _key_runs(start_m, sq, sk, LEFT, RIGHT, BLOCK_M, BLOCK_N,
                                           HAS_LEFT, HAS_RIGHT)
    if HAS_KSPAN:
        lo, lo_end, mid0, mid1, hi = _clamp_runs(lo, lo_end, mid0, mid1, hi, kstart, kend, BLOCK_N)
    for run in tl.static_range(3):
        if run != 0 or HAS_LEFT or HAS_KSPAN:
            start, end = _run_bounds(run, lo, lo_end, mid0, mid1, hi)
            dq = _attn_bwd_dq_inner(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_kd,
                                    stride_vn, stride_vd, pos, offs_n0, offs_d, start, end, kend,
                                    LEFT, RIGHT, qk_scale, cap_in, cap_out, slope2, kstart,
                                    mask_rows, stride_mn, m_ok, run != 1,
                                    HAS_LEFT, HAS_RIGHT, HEAD_DIM, PAD_D, BLOCK_N, DOT_PREC,
                                    SOFTCAP, HAS_ALIBI, HAS_KSPAN, MASK_KIND, TANH)
    dq = dq * sm_scale
    tl.store(DQ + _at(off_b, q0, stride_dqb, stride_dqm, VARLEN) + off_h * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=m_ok[:, None] & d_ok[None, :])

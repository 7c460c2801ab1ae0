"""The one definition of which (query, key) pairs are visible.

Every backend and the reference follow these rules; shaders and Triton kernels implement the
same arithmetic on the canonical ``(left, right)`` pair returned by :func:`canonical_window`.

Positions are bottom-right aligned (FlashAttention's convention): query row ``i`` of ``seq_q``
sits at key position ``pos(i) = i + seq_k - seq_q``. Key ``j`` is visible from row ``i`` when

    (left  < 0 or j >= pos(i) - left) and
    (right < 0 or j <= pos(i) + right) and
    0 <= j < seq_k

``left``/``right`` of ``-1`` mean unbounded on that side. ``causal`` is ``right = 0``.

An ``attn_mask`` (SDPA's convention, broadcastable to ``[batch, heads_q, seq_q, seq_k]``) hides more:
a boolean mask lets row ``i`` see key ``j`` only where it is True, together with the window (a key
must pass both). A float mask is added to the scores (after softcap and ALiBi, as SDPA adds it to the
scaled scores); its ``-inf`` entries hide their keys exactly as False does, and a NaN entry on a key
the window shows is a NaN score (rule 2 below). A mask that does not vary along ``seq_q`` (a
padding mask: each key is seen by every row of its batch element and head, or by none) is held as
a key vector, and as key lengths when the visible keys are a prefix: :func:`canonical_attn_mask`.

With ``softcap > 0`` a score ``s`` (after ``scale``) becomes ``softcap * tanh(s / softcap)`` before any
masking (Gemma 2; flash-attn's definition): :func:`apply_softcap`. ALiBi then adds
``-slope * |pos(i) - j|`` to the score of query ``i`` and key ``j``, one slope per query head (and
batch): :func:`alibi_bias`.

Attention sinks (gpt-oss): one learned logit ``sink[h]`` per query head joins every row's softmax
denominator, ``out = sum_j e^{s_j} v_j / (e^{sink} + sum_j e^{s_j})`` and ``LSE = log(e^{sink} +
sum_j e^{s_j})``. The sink is a key every row sees, whose value is zero and which no mask hides:
:func:`finish_rows` joins it to the row's statistics.

What a row gives, from the scores (after ``scale``, softcap, ALiBi and a float mask) of the keys it
sees, first rule that applies:

1. no visible key (for example the first ``seq_q - seq_k`` rows of a causal call with
   ``seq_q > seq_k``): zeros, LSE ``-inf``; with sinks zeros too, and LSE ``sink`` (the sink is
   then the only term of the denominator, so the LSE stays what the definition gives);
2. a visible score is NaN: the row is NaN, LSE NaN;
3. a visible score is ``+inf``: the row is NaN (``inf - inf``, as torch's math), LSE ``+inf``;
4. every visible score is ``-inf``: as if masked, zeros and LSE ``-inf`` (``sink`` with sinks; an
   online softmax cannot tell these rows from masked ones);
5. otherwise the softmax (the sink in its denominator), LSE in natural log.

A NaN in a value reaches the output only through the product ``P.V``, as IEEE arithmetic gives it:
a non-finite value of a key hidden from a row may reach that row when the key shares a computed tile
with keys the row sees (``0 * NaN``, as in torch's math and FlashAttention), but a row that sees no key
(cases 1 and 4) is zeros whatever the values hold.
:func:`finish_rows` applies the rule to a row's softmax statistics.
"""
from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass

import numpy as np

UNBOUNDED = -1


def canonical_window(causal: bool, window_size) -> tuple[int, int]:
    """Turn the public ``(causal, window_size)`` pair into ``(left, right)``; -1 is unbounded.

    ``window_size``: ``None`` or ``-1`` (unlimited); an int ``W > 0`` (W keys ending at the
    query's own position: ``pos - W < j <= pos``, Mistral); or FlashAttention's ``(left, right)``
    tuple with ``-1`` for an unbounded side. ``causal=True`` forces ``right = 0``.
    """
    if isinstance(causal, (bool, np.bool_)):
        causal = bool(causal)
    else:
        raise TypeError(f"causal must be a bool, got {type(causal).__name__} {causal!r}")
    if window_size is None or (type(window_size) is int and window_size == -1):  # the defaults, no ABC check
        left, right = UNBOUNDED, UNBOUNDED
    elif isinstance(window_size, numbers.Integral) and not isinstance(window_size, bool):
        w = int(window_size)
        if w == -1:
            left, right = UNBOUNDED, UNBOUNDED
        elif w > 0:
            left, right = w - 1, 0
        else:
            raise ValueError(
                f"window_size must be -1/None (unlimited) or a positive int, got {w}: "
                "a window of 0 keys would hide every key")
    elif isinstance(window_size, (tuple, list)):
        if len(window_size) != 2:
            raise ValueError(
                f"window_size as a tuple must be (left, right), got {len(window_size)} items: {window_size!r}")
        for name, side in zip(("left", "right"), window_size):
            if not isinstance(side, numbers.Integral) or isinstance(side, bool):
                raise TypeError(f"window_size {name} must be an int, got {type(side).__name__} {side!r}")
            if int(side) < -1:
                raise ValueError(
                    f"window_size {name} must be >= 0, or -1 for unbounded, got {int(side)} in {tuple(window_size)!r}")
        left, right = int(window_size[0]), int(window_size[1])
    else:
        raise TypeError(
            f"window_size must be None, an int or a (left, right) tuple, got {type(window_size).__name__}")
    if causal:
        right = 0
    return left, right


def visible(q_idx, k_idx, seq_q: int, seq_k: int, left: int, right: int) -> np.ndarray:
    """Boolean visibility of broadcastable query indices ``q_idx`` and key indices ``k_idx``."""
    q_idx = np.asarray(q_idx, dtype=np.int64)
    k_idx = np.asarray(k_idx, dtype=np.int64)
    pos = q_idx + (seq_k - seq_q)
    ok = (k_idx >= 0) & (k_idx < seq_k)
    if left >= 0:
        ok = ok & (k_idx >= pos - left)
    if right >= 0:
        ok = ok & (k_idx <= pos + right)
    return ok


def mask(seq_q: int, seq_k: int, left: int, right: int) -> np.ndarray:
    """The full ``[seq_q, seq_k]`` boolean mask (for references and tests; O(seq_q*seq_k))."""
    vis = visible(np.arange(seq_q)[:, None], np.arange(seq_k)[None, :], seq_q, seq_k, left, right)
    return np.broadcast_to(vis, (seq_q, seq_k)).copy()


def key_range(q_start: int, q_end: int, seq_q: int, seq_k: int, left: int, right: int) -> tuple[int, int]:
    """Half-open key range ``[k_lo, k_hi)`` that rows ``q_start..q_end-1`` can see together.

    Keys outside it are hidden from every row of the block, so a tiled kernel skips those tiles.
    Returns ``k_lo >= k_hi`` when the whole block sees nothing.
    """
    if q_end <= q_start:
        return 0, 0
    off = seq_k - seq_q
    k_lo = 0 if left < 0 else max(0, q_start + off - left)
    k_hi = seq_k if right < 0 else min(seq_k, q_end - 1 + off + right + 1)
    return k_lo, k_hi


def tile_fully_visible(q_start: int, q_end: int, k_start: int, k_end: int,
                       seq_q: int, seq_k: int, left: int, right: int) -> bool:
    """True when every pair in the tile is visible, so a kernel may skip applying the mask."""
    off = seq_k - seq_q
    if k_start < 0 or k_end > seq_k:
        return False
    if left >= 0 and k_start < (q_end - 1 + off) - left:
        return False
    if right >= 0 and k_end - 1 > q_start + off + right:
        return False
    return True


def finish_rows(m, l, acc, sink=None):
    """``(out, lse)`` of rows from their online-softmax state, by the rule in this module's
    docstring.

    ``m`` is the running maximum of each row's visible scores, combined with ``np.maximum`` so
    that one NaN score leaves it NaN (``-inf`` when the row saw no key or only ``-inf``);
    ``l = sum(exp(s - m))`` and ``acc = sum(exp(s - m) * v)`` were shifted by 0 wherever ``m`` is
    not finite. ``sink`` (finite, broadcastable to ``m``): the rows' sink logits, joined here as
    one more term of value zero. Shapes: ``m, l [...]``, ``acc [..., D]``; results keep ``acc``'s dtype.
    """
    if sink is not None:
        m, l, acc = _join_sink(m, l, acc, sink)
    finite = np.isfinite(m)
    # A finite maximum is itself one of the terms, so l >= 1 there; elsewhere l is not used.
    l_safe = np.where(finite, l, 1)
    out = acc / l_safe[..., None]
    bad = ~finite
    if bad.any():
        out[bad] = np.where(np.isneginf(m[bad]), 0, np.nan)[:, None]
    # log(1) + m is m itself where m is not finite: -inf, +inf or NaN, the rule's LSE.
    lse = np.log(l_safe) + m
    return out, lse


def _join_sink(m, l, acc, sink):
    """The online-softmax step for one more term of logit ``sink`` and value 0."""
    sink = np.asarray(sink, dtype=acc.dtype)
    # np.maximum keeps a NaN maximum, and +inf beats any finite sink: rules 2 and 3 still apply.
    m_new = np.maximum(m, sink)
    shift = np.where(np.isfinite(m_new), m_new, 0)
    # exp(-inf - shift) = 0 for rows that saw nothing, whose l and acc are 0 anyway.
    alpha = np.exp(m - shift)
    return m_new, l * alpha + np.exp(sink - shift), acc * alpha[..., None]


def no_key_lse(shape, sinks, dtype):
    """LSE of rows that see no key, ``[batch, heads_q, seq_q]``: ``-inf``, or each head's sink."""
    if sinks is None:
        return np.full(shape, -np.inf, dtype=dtype)
    return np.broadcast_to(np.asarray(sinks, dtype)[:, None], shape).copy()


def apply_softcap(s, softcap: float):
    """``s <- softcap * tanh(s / softcap)`` in place (``s`` a NumPy float array); returns ``s``."""
    s /= softcap
    np.tanh(s, out=s)
    s *= softcap
    return s


def alibi_bias(rows, cols, seq_q: int, seq_k: int, slopes):
    """``-slope * |pos(i) - j|`` for query rows ``rows [R, 1]`` and keys ``cols [1, C]`` with
    ``slopes [...]`` broadcast in front: shape ``[..., R, C]`` (float64 for float64 slopes)."""
    dist = np.abs(np.asarray(rows) + (seq_k - seq_q) - np.asarray(cols))
    return -np.asarray(slopes)[..., None, None] * dist


def apply_attn_mask(s, m):
    """Scores ``s`` (a float array) masked in place by ``m`` broadcastable to it; returns ``s``.

    Boolean ``m``: False hides (score ``-inf``). Float ``m``: added, and its ``-inf`` entries hide
    whatever the score was (``+inf - inf`` would otherwise be NaN: a mask must never make one)."""
    if m.dtype == np.bool_:
        np.copyto(s, -np.inf, where=~m)
    else:
        s += m
        np.copyto(s, -np.inf, where=np.isneginf(m))
    return s


@dataclass(frozen=True, eq=False)
class AttnMask:
    """A validated ``attn_mask``, canonical: what every backend reads instead of the user's array.

    Dimensions of size 1 stay 1 (broadcast, never expanded): ``b`` is 1 or ``batch``, ``h`` 1 or
    ``heads_q``. ``values [b, h, 1 or seq_q, 1 or seq_k]`` (bool, True = visible, or float32/64
    additive) holds a general mask, ``None`` for a padding mask. A padding mask is ``keys [b, h,
    seq_k]`` (bool, the keys every row of that batch element and head sees) and, when each of those
    is a prefix, ``key_lengths [b, h]`` (int32) as well, the form a kernel can use as a bound.
    """

    values: np.ndarray | None
    keys: np.ndarray | None
    key_lengths: np.ndarray | None
    # Padding masks: prefix counts over the keys seen by some head, and by every head, of each
    # batch element ([b, seq_k + 1]), so a tile's keys are answered in O(1).
    _some: np.ndarray | None = None
    _every: np.ndarray | None = None

    @property
    def padding(self) -> bool:
        return self.keys is not None

    def block(self, b: int, q0: int, q1: int, k0: int, k1: int) -> np.ndarray:
        """The mask of rows ``q0:q1`` and keys ``k0:k1`` of batch element ``b``, as ``[h, rows, keys]``
        where rows and keys may be 1 (broadcast)."""
        if self.keys is not None:
            return self.keys[b if self.keys.shape[0] > 1 else 0, :, None, k0:k1]
        m = self.values[b if self.values.shape[0] > 1 else 0]
        rows = slice(q0, q1) if m.shape[1] > 1 else slice(0, 1)
        return m[:, rows, slice(k0, k1) if m.shape[2] > 1 else slice(0, 1)]

    def spans(self, b: int, hq: int) -> tuple[np.ndarray, bool]:
        """A padding mask as the half-open span of keys each (batch, query head) sees, int32
        ``[b, hq, 2]`` (``[0, 0]`` where it sees none), and whether every span holds exactly the
        visible keys (one run each; else the key vector must still be read inside the span)."""
        span, runs = self._spans
        return np.broadcast_to(span, (b, hq, 2)), runs

    @functools.cached_property
    def _spans(self) -> tuple[np.ndarray, bool]:
        # Once per mask: a backend asks whether the spans are runs, then reads them.
        keys = self.keys  # [b or 1, hq or 1, seq_k] bool
        if self.key_lengths is not None:
            start, end, runs = np.zeros_like(self.key_lengths), self.key_lengths, True
        else:
            sk = keys.shape[-1]
            some = keys.any(axis=-1)
            start = np.where(some, keys.argmax(axis=-1), 0)
            end = np.where(some, sk - keys[..., ::-1].argmax(axis=-1), 0)
            runs = bool((keys.sum(axis=-1) == end - start).all())
        return np.stack([start, end], axis=-1).astype(np.int32), runs

    def key_span(self, b: int, seq_k: int) -> tuple[int, int]:
        """Half-open span of the keys any row of batch element ``b`` may see (all for a general mask)."""
        if self._some is None:
            return 0, seq_k
        some = self._some[b if self._some.shape[0] > 1 else 0]
        if some[-1] == 0:
            return 0, 0
        # The first index where the count rises, and the last: the span's ends.
        return int(np.searchsorted(some, 1)) - 1, int(np.searchsorted(some, some[-1]))

    def keys_in_tile(self, b: int, k0: int, k1: int) -> tuple[bool, bool]:
        """``(some, every)``: whether any key of ``k0:k1`` is seen by some row of batch element ``b``,
        and whether every one is seen by every row (a tile may then skip the mask). A general
        mask answers ``(True, False)``: its rows differ, so a tile must read it."""
        if self._some is None:
            return True, False
        i = b if self._some.shape[0] > 1 else 0
        some = self._some[i, k1] - self._some[i, k0]
        return bool(some), bool(self._every[i, k1] - self._every[i, k0] == k1 - k0)

    def dense(self, shape) -> np.ndarray:
        """The mask broadcast (a view) to ``shape`` ``[batch, heads_q, seq_q, seq_k]``."""
        m = self.values if self.keys is None else self.keys[:, :, None, :]
        return np.broadcast_to(m, shape)


def _prefix_counts(x):
    """``[..., n + 1]`` running counts of a boolean ``[..., n]``, from 0."""
    counts = np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), dtype=np.int64)
    np.cumsum(x, axis=-1, out=counts[..., 1:])
    return counts


def canonical_attn_mask(m: np.ndarray, shape) -> AttnMask:
    """:class:`AttnMask` of a host mask ``m`` (bool or float, shape broadcastable to ``shape`` =
    ``[batch, heads_q, seq_q, seq_k]``, already checked). A float mask of only 0 and ``-inf`` is a
    boolean one (``-inf`` hides, 0 adds nothing), so it can be recognised as padding too."""
    m = m.reshape((1,) * (4 - m.ndim) + m.shape)
    if m.dtype != np.bool_:
        m = m.astype(np.float64 if m.dtype == np.float64 else np.float32, copy=False)
        if ((m == 0) | np.isneginf(m)).all():
            m = m == 0
    if m.dtype != np.bool_ or m.size == 0 or not (m.shape[2] == 1 or (m == m[:, :, :1]).all()):
        return AttnMask(values=np.ascontiguousarray(m), keys=None, key_lengths=None)
    keys = np.ascontiguousarray(np.broadcast_to(m[:, :, 0], m.shape[:2] + (shape[3],)))
    count = keys.sum(axis=-1)
    prefix = (keys == (np.arange(shape[3]) < count[..., None])).all()
    return AttnMask(values=None, keys=keys, key_lengths=count.astype(np.int32) if prefix else None,
                    _some=_prefix_counts(keys.any(axis=1)), _every=_prefix_counts(keys.all(axis=1)))

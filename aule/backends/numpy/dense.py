"""FlashAttention-2's algorithm in NumPy: online softmax over key tiles, O(tile) extra memory.

Query heads that share a KV head are stacked as rows of one matrix product (GQA by indexing,
never by repeating K/V), so each tile is a single batched ``matmul`` over the KV heads. Tiles
that the mask hides entirely are never computed; tiles it covers entirely skip the masking.
"""
from __future__ import annotations

import numpy as np

from ... import masks

# Tile sizes trade Python overhead per tile against the size of the score tile (cache and memory).
BLOCK_Q = 128
BLOCK_K = 512


def attention_numpy(q, k, v, scale, left, right, return_lse=False, block_q=BLOCK_Q, block_k=BLOCK_K, softcap=0.0,
                    alibi=None, sinks=None, mask=None):
    """Attention on C-contiguous NumPy arrays ``q [B,Hq,Sq,D]``, ``k, v [B,Hkv,Sk,D]``.

    Accumulates in float32 (float64 for float64 inputs), with ``scale`` rounded to that dtype.
    Rows with NaN or infinite scores follow the rule in :mod:`aule.masks`, as do ``alibi
    [B, Hq]``, ``sinks [Hq]`` (float32, or ``None``) and ``mask`` (a :class:`aule.masks.AttnMask`:
    a padding mask skips the tiles of keys no row sees, without a per-row mask). Returns
    ``(out, lse)`` in the accumulation dtype; ``lse`` is ``None`` unless asked for.
    """
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    g = hq // hk
    acc_t = np.float64 if q.dtype == np.float64 else np.float32
    out = np.zeros((b, hq, sq, d), dtype=acc_t)
    lse = masks.no_key_lse((b, hq, sq), sinks, acc_t) if return_lse else None
    qg = q.reshape(b, hk, g, sq, d)
    outg = out.reshape(b, hk, g, sq, d)
    lseg = lse.reshape(b, hk, g, sq) if return_lse else None

    def query_block(bi, q0):
        """Rows q0..q0+block_q of batch bi, every KV head in one batched matmul.

        Threads over these tasks were measured slower on 2 cores: NumPy's BLAS threads and the
        task threads then compete for the same cores."""
        q1 = min(sq, q0 + block_q)
        bq, nh = q1 - q0, hk
        k_lo, k_hi = masks.key_range(q0, q1, sq, sk, left, right)
        if mask is not None:
            m_lo, m_hi = mask.key_span(bi, sk)
            k_lo, k_hi = max(k_lo, m_lo), min(k_hi, m_hi)
        if k_lo >= k_hi:
            return  # no row of this block sees a key: zeros and the no-key LSE stay
        # Scale folded into Q once per block instead of into every score tile.
        qt = (qg[bi, :, :, q0:q1, :].astype(acc_t) * acc_t(scale)).reshape(nh, g * bq, d)
        m = np.full((nh, g * bq), -np.inf, dtype=acc_t)
        l = np.zeros((nh, g * bq), dtype=acc_t)
        acc = np.zeros((nh, g * bq, d), dtype=acc_t)
        rows = np.arange(q0, q1)[:, None]
        for k0 in range(k_lo, k_hi, block_k):
            k1 = min(k_hi, k0 + block_k)
            tile = None
            if mask is not None:
                some, every = mask.keys_in_tile(bi, k0, k1)
                if not some:
                    continue  # padding no row of this batch element sees
                if not every:
                    tile = mask.block(bi, q0, q1, k0, k1)
                    if tile.dtype == np.bool_ and not tile.any():
                        continue
                    # [h, rows, keys] with h = 1 or kv head * g + r, as the rows of s are laid out.
                    tile = tile.reshape(((nh, g) if tile.shape[0] > 1 else (1, 1)) + tile.shape[1:])
            kt = k[bi, :, k0:k1, :].astype(acc_t, copy=False)
            vt = v[bi, :, k0:k1, :].astype(acc_t, copy=False)
            s = np.matmul(qt, kt.transpose(0, 2, 1))  # [nh, g*bq, bk]
            if softcap:
                masks.apply_softcap(s, softcap)
            if alibi is not None:
                # Query head h = kv head * g + r: the slopes as [kv head, r] for this batch element.
                slopes = alibi[bi].reshape(nh, g).astype(acc_t)
                s.reshape(nh, g, bq, k1 - k0)[...] += masks.alibi_bias(
                    rows, np.arange(k0, k1)[None, :], sq, sk, slopes).astype(acc_t)
            if tile is not None:
                masks.apply_attn_mask(s.reshape(nh, g, bq, k1 - k0), tile)
            if not masks.tile_fully_visible(q0, q1, k0, k1, sq, sk, left, right):
                hidden = ~masks.visible(rows, np.arange(k0, k1)[None, :], sq, sk, left, right)
                s.reshape(nh, g, bq, k1 - k0)[:, :, hidden] = -np.inf
            # np.maximum keeps a NaN score: m then tells masks.finish_rows which rule applies.
            m_new = np.maximum(m, s.max(axis=-1))
            # Rows whose maximum is not finite (no key seen yet, NaN, +inf) shift by 0: their
            # statistics are not used, and exp then gives 0 for rows that have seen nothing.
            m_shift = np.where(np.isfinite(m_new), m_new, acc_t(0))
            np.subtract(s, m_shift[..., None], out=s)
            np.exp(s, out=s)
            alpha = np.exp(m - m_shift)
            l *= alpha
            l += s.sum(axis=-1)
            acc *= alpha[..., None]
            acc += np.matmul(s, vt)
            m = m_new
        # Query head h = kv head * g + r: each row's sink, laid out as the rows of m.
        sink = None if sinks is None else np.repeat(sinks.reshape(nh, g).astype(acc_t), bq, axis=1)
        out_blk, lse_blk = masks.finish_rows(m, l, acc, sink)
        outg[bi, :, :, q0:q1, :] = out_blk.reshape(nh, g, bq, d)
        if return_lse:
            lseg[bi, :, :, q0:q1] = lse_blk.reshape(nh, g, bq)

    # NaN or infinite inputs are answered by the rule in aule.masks, not by warnings.
    with np.errstate(invalid="ignore", over="ignore"):
        for bi in range(b):
            for q0 in range(0, sq, block_q):
                query_block(bi, q0)
    return out, lse

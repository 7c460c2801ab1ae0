"""Every public entry point: validate once, then route to one backend through one router.

Dense attention (:func:`flash_attention`; :func:`flash_attention_varlen` for packed sequences), paged
attention (:func:`flash_attention_paged`) and KV writes (:func:`copy_kv_to_paged`) build a validated
call (:mod:`aule.call`, :mod:`aule.paged_call`) and hand it to the one router (:mod:`aule.routing`),
which picks the backend for the operation and answers calls with nothing to compute without one. Torch tensors being traced
by ``torch.compile`` take a custom op instead (:func:`aule.sdpa_core.traced_attention`).
"""
from __future__ import annotations

import sys

from . import fastcall
from .call import canonicalize, canonicalize_varlen
from .errors import UnsupportedError
from .paged_call import canonicalize_paged, canonicalize_write_kv
from .routing import (attend, attend_paged, attend_varlen, attention, forced_backend, route,  # noqa: F401
                      tensors_need_grad, write_kv)


_vulkan_fast = sys.modules
_VULKAN_FASTPATH = "aule.backends.vulkan.fastpath"


def _vulkan_call(vk, query, key, value, causal, scale, window_size, backend, return_lse, softcap):
    """``(out, lse)`` of a featureless call on GpuTensors through Vulkan's ready launches
    (:mod:`aule.backends.vulkan.fastpath`), or None for the full path: a call seen for the first
    time is validated and routed here, and kept when the router gives it to Vulkan."""
    ckey = vk.key(query, key, value, causal, scale, window_size, backend, return_lse, softcap)
    if ckey is None:
        return None
    hit = vk.attend(ckey, query, key, value)
    if hit is None:
        call = canonicalize(query, key, value, causal, scale, window_size, return_lse, softcap=softcap)
        vk.prepare(ckey, call, route(call, "attention", backend))
        hit = vk.attend(ckey, query, key, value)
    return hit


def flash_attention(query, key, value, causal=True, scale=None, window_size=-1, *,
                    backend=None, return_lse=False, softcap=0.0, alibi_slopes=None, sinks=None, attn_mask=None,
                    q_descale=None, k_descale=None, v_descale=None, out_dtype=None):
    """Exact attention, memory-efficient, on whichever backend suits the inputs.

    ``query [batch, heads_q, seq_q, head_dim]``, ``key``/``value [batch, heads_kv, seq_k, head_dim]``
    (PyTorch SDPA's layout; ``heads_q`` a multiple of ``heads_kv``). ``causal`` is bottom-right
    aligned; ``window_size`` is ``-1``/``None``, an int ``W`` (W keys ending at the query's
    position) or ``(left, right)``. See :mod:`aule.masks`. Returns an output like ``query``, and
    with ``return_lse=True`` also the float32 log-sum-exp ``[batch, heads_q, seq_q]``.
    ``softcap > 0`` caps each score to ``softcap * tanh(score / softcap)`` before masking (Gemma 2);
    ``alibi_slopes`` (``[heads_q]`` or ``[batch, heads_q]``) adds ``-slope * |i + seq_k - seq_q - j|`` to
    each score (flash-attn's ALiBi). ``sinks [heads_q]`` (gpt-oss' attention sinks) are float logits that
    join each row's softmax denominator, the LSE included (a row that sees no key stays zeros, with
    LSE ``sinks[h]``). ``attn_mask`` (SDPA's convention: bool, True = may attend, or float added to the
    scores; broadcastable to ``[batch, heads_q, seq_q, seq_k]``) hides keys together with ``causal``
    and the window; a padding mask (one that does not vary along ``seq_q``) is served as key
    vectors, without a per-row mask. The NumPy backend, Triton's dense kernels and Vulkan's scalar
    variants apply these features (Triton also differentiates ``sinks`` that require grad); a backend
    or variant that lacks one refuses the call by name, and the router passes it on. On CUDA tensors
    nothing is read back to the host: the kernels check the values of ``sinks`` and
    ``alibi_slopes``, and a non-finite one raises ``ValueError`` by the next aule call (at once with
    ``AULE_CHECK_SYNC=1``, or at :func:`aule.check_device_errors`).

    FP8 (flash-attn 3's interface): ``torch.float8_e4m3fn`` q, k, v (``float8_e4m3fnuz`` on AMD
    targets that have it) with optional ``q_descale``, ``k_descale``, ``v_descale``: float32 tensors
    ``[batch, heads_kv]`` (per KV head; query heads use their KV head's factor), one-element
    tensors or positive numbers for the whole tensor, 1 when omitted. The attention computed is
    that of ``q * q_descale``, ``k * k_descale``, ``v * v_descale``; the output is ``out_dtype``
    (``torch.bfloat16`` by default, or ``torch.float16``), the LSE float32. Served by Triton on
    CUDA (sm_89 and later) and ROCm, forward only; other backends refuse it by name.
    """
    vk = _vulkan_fast.get(_VULKAN_FASTPATH)  # loaded with the Vulkan backend, so before any GpuTensor exists
    if (vk is not None and query.__class__ is vk.GpuTensor and alibi_slopes is None and sinks is None
            and attn_mask is None and q_descale is None and k_descale is None and v_descale is None
            and out_dtype is None):
        hit = _vulkan_call(vk, query, key, value, causal, scale, window_size, backend, return_lse, softcap)
        if hit is not None:
            return hit if return_lse else hit[0]
    compiling = _compiling(query)
    fast = None
    if (not compiling and alibi_slopes is None and sinks is None and attn_mask is None and q_descale is None
            and k_descale is None and v_descale is None and out_dtype is None):
        # A featureless eager call seen before takes its ready launch (aule.fastcall); anything
        # else, a first call included, the full path below, recorded when it may become one.
        fast = fastcall.key(query, key, value, causal, scale, window_size, backend, return_lse, softcap)
        if fast is not None:
            hit = fastcall.attend(fast, query, key, value)
            if hit is not None:
                return hit if return_lse else hit[0]
    features = dict(softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks, attn_mask=attn_mask)
    fp8 = dict(q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, out_dtype=out_dtype)
    if any(x is not None for x in fp8.values()) or "float8" in str(getattr(query, "dtype", "")):
        if compiling:
            raise UnsupportedError("float8 attention inside torch.compile: aule traces no float8 op yet; call it "
                                   "outside the compiled region (torch.compiler.disable)")
        features.update(fp8)
    if compiling:
        from .sdpa_core import traced_attention

        return traced_attention(query, key, value, causal, scale, window_size, backend, return_lse, **features)
    with fastcall.recording(fast) as rec:
        out, lse = attention(query, key, value, causal, scale, window_size, backend, return_lse, **features)
    rec.keep((query, key, value), (out, lse))
    return (out, lse) if return_lse else out


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           window_size=-1, scale=None, softcap=0.0, alibi_slopes=None, return_lse=False, *,
                           sinks=None, backend=None):
    """Attention over variable-length sequences packed along dimension 0 (flash-attn's varlen layout).

    ``q [total_q, heads_q, head_dim]``, ``k, v [total_k, heads_kv, head_dim]``; sequence ``i`` is rows
    ``cu_seqlens_q[i]:cu_seqlens_q[i + 1]`` of q and ``cu_seqlens_k[i]:cu_seqlens_k[i + 1]`` of k and v
    (integer offsets from 0, non-decreasing, ending at ``total``), attended alone: ``causal`` (default
    False, as flash-attn's) is bottom-right within each sequence, and ``window_size``, ``scale``,
    ``softcap``, ``sinks`` and ``backend`` mean what they mean in :func:`flash_attention`;
    ``alibi_slopes`` is ``[heads_q]`` or ``[batch, heads_q]``. ``max_seqlen_q``/``max_seqlen_k`` must
    be at least each sequence's length. Returns ``out [total_q, heads_q, head_dim]`` like ``q`` and,
    with ``return_lse``, the float32 LSE ``[heads_q, total_q]``. ``cu_seqlens`` tensors on q's CUDA
    device are never read back: the Triton kernels check them (and the sinks and slopes) as they read
    them, a sequence with bad offsets is given no rows, and the error is raised as ``ValueError`` by the
    next aule call, as :func:`flash_attention` does for its features.
    """
    if _compiling(q):
        raise UnsupportedError("flash_attention_varlen inside torch.compile: it reads cu_seqlens on the host to "
                               "cut the batch into sequences, which a traced graph cannot")
    call = canonicalize_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, window_size,
                               scale, softcap, alibi_slopes, return_lse, sinks)
    out, lse = attend_varlen(call, backend)
    return (out, lse) if return_lse else out


def _compiling(x) -> bool:
    """Whether ``x`` is a torch tensor being traced by ``torch.compile`` (torch is never imported here)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor) and torch.compiler.is_compiling()


# --------------------------------------------------------------------------------------------
# paged attention and KV writes

def flash_attention_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                          backend=None, softcap=0.0, alibi_slopes=None, sinks=None, max_context_len=None,
                          query_start_loc=None, max_query_len=None):
    """Attention of ``q`` over a paged (block-table) KV cache, vLLM's layout.

    ``q [batch, heads_q, q_len, head_dim]``: the last ``q_len`` positions of each sequence, causal
    among themselves. ``k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]``;
    ``block_tables [batch, max_blocks]`` int32; ``context_lens [batch]`` int32 (new tokens included,
    already written with :func:`copy_kv_to_paged`). ``window_size``, ``softcap``, ``alibi_slopes``
    (``[heads_q]`` or ``[batch, heads_q]``) and ``sinks [heads_q]`` as in :func:`aule.flash_attention`,
    with each row at its position in its sequence: ALiBi adds ``-slope * |pos - j|`` for the row at
    position ``pos`` and key ``j``; a row that sees no key (a 4-D ``q`` with more rows than its
    sequence has keys) is zeros, sinks or not. Every backend's paged kernels apply them. Returns an
    array like ``q``. ``max_context_len`` (vLLM's ``max_seq_len``, optional): the longest context,
    which sizes the launch (split-K) without reading ``context_lens``; longer contexts are still
    attended in full.

    Packed batches (vLLM's layout): with ``query_start_loc [batch + 1]`` (int32, from 0,
    non-decreasing, ending at ``num_tokens``) q is ``[num_tokens, heads_q, head_dim]`` and sequence
    ``b``'s rows are ``q[query_start_loc[b]:query_start_loc[b + 1]]``, its last ``n_b`` positions
    (row ``r`` at position ``context_lens[b] - n_b + r``, ``n_b <= context_lens[b]``), causal among
    themselves: decode rows, chunked-prefill chunks and speculative drafts of any lengths (0
    included) share one call. The output has q's packed shape. ``max_query_len`` (vLLM's, optional)
    bounds every ``n_b`` and sizes the launch without reading ``query_start_loc``; a sequence with
    more rows is an error. Without it ``num_tokens`` is the bound.

    Bad tables raise ``ValueError``: host tables before any kernel runs; CUDA tables
    (``query_start_loc`` included) are checked by the kernel, never read back, and raise at the
    next aule call after it finished (at once with ``AULE_CHECK_SYNC=1``).
    """
    fast = inputs = None
    if alibi_slopes is None and sinks is None and not _compiling(q):
        # A repeated eager call (no ALiBi or sinks, whose tensors the launcher converts) takes its
        # ready launch (aule.fastcall), as flash_attention's does; any other call the full path,
        # recorded when it may become one.
        fast = fastcall.paged_key(q, k_cache, v_cache, block_tables, context_lens, scale, window_size, backend,
                                  softcap, max_context_len, query_start_loc, max_query_len)
        if fast is not None:
            inputs = ((q, k_cache, v_cache, block_tables, context_lens) if query_start_loc is None
                      else (q, k_cache, v_cache, block_tables, context_lens, query_start_loc))
            hit = fastcall.attend(fast, *inputs)
            if hit is not None:
                return hit[0]
    with fastcall.recording(fast) as rec:
        out = attend_paged(canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale, window_size,
                                              softcap=softcap, alibi_slopes=alibi_slopes, sinks=sinks,
                                              max_context_len=max_context_len, query_start_loc=query_start_loc,
                                              max_query_len=max_query_len), backend)
    rec.keep(inputs, (out,))
    return out


#: FlashAttention's ROCm-flavoured name, kept for callers of the system aule replaces.
flash_attention_paged_amd = flash_attention_paged


def copy_kv_to_paged(key, value, k_cache, v_cache, slot_mapping, *, backend=None):
    """Write token rows ``key, value [num_tokens, heads_kv, head_dim]`` into the caches, in place.

    vLLM's ``reshape_and_cache`` convention: token ``t`` goes to block ``slot_mapping[t] // block_size``,
    row ``slot_mapping[t] % block_size``; a negative slot skips the token (padding).
    """
    fast = None
    if not _compiling(key):
        fast = fastcall.write_kv_key(key, value, k_cache, v_cache, slot_mapping, backend)
        if fast is not None and fastcall.attend(fast, key, value, k_cache, v_cache, slot_mapping) is not None:
            return
    with fastcall.recording(fast) as rec:
        write_kv(canonicalize_write_kv(key, value, k_cache, v_cache, slot_mapping), backend)
    rec.keep((key, value, k_cache, v_cache, slot_mapping), ())

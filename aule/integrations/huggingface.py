"""``"aule"`` as a Hugging Face transformers attention implementation.

After :func:`register`, which ``import aule`` arranges whatever the import order
(:mod:`.autoregister`), ``from_pretrained(..., attn_implementation="aule")`` and
``model.set_attn_implementation("aule")`` work without ``aule.install()``. Results equal the ``"sdpa"`` implementation's: whatever aule cannot compute exactly goes
to transformers' own SDPA path with the mask it would have had.

The mask is the single source of truth, as it is for ``"sdpa"``. aule's mask function (registered
under the same name) describes the masks aule can compute without materialising them:

* ``None`` for a plain causal or bidirectional pattern with no padding, where the queries are the
  last ``q_length`` positions of the keys. aule's causal is bottom-right aligned, which is exactly
  what prefill and KV-cache decode need, so the attention applies ``is_causal`` over all keys.
* A sliding-window causal pattern is materialised, checked element by element against aule's
  window of ``W`` keys ending at each query's own position (transformers' rule: ``q - W < kv <= q``,
  the same as aule's int ``W``), and tagged with that window; the attention then ignores the
  tensor and runs aule's window. Hybrid models that pass no ``sliding_window`` argument to the
  attention function are handled too, because the window travels with the mask.

* A padded batch over one of those patterns is materialised too, checked element by element to equal
  the pattern over the keys the padding mask keeps, and tagged with the pattern and those keys; the
  attention then hands aule the pattern as its window and the keys as a ``[B, 1, 1, kv]``
  ``attn_mask``, which aule serves as per-sequence key spans (tiles skipped, no ``[q, kv]`` mask read).

Anything else (packed sequences, overlays, static caches with empty slots) gets the fully
materialised boolean mask, which the attention hands to aule as ``attn_mask``; inside
``torch.compile`` it goes to transformers' SDPA path.
Rows that see no key (padded query positions) give zeros, where torch may give NaN; they are
padding, which no caller reads. Gemma 2's ``softcap`` and gpt-oss's sinks (``s_aux``) are applied by
aule (results then equal the ``"eager"`` implementation's, which transformers' SDPA path cannot
give); a sinks call aule cannot serve raises rather than lose them.
"""
from __future__ import annotations

import logging

import torch

from .. import sdpa_core
from ..errors import UnsupportedError

log = logging.getLogger("aule")

NAME = "aule"
# Attribute set on a materialised mask that aule verified to be a bottom-right window.
_WINDOW_TAG = "_aule_window"
# Attribute set on a materialised mask that aule verified to be a window (causal, sliding or none)
# over the keys a padding mask keeps: ``(left, right, keys)``, ``keys`` bool [B, 1, 1, kv].
_PADDED_TAG = "_aule_padded"


_masking_utils = None


def _masking():
    """transformers' masking module, imported once outside any traced frame: dynamo cannot trace an
    import of transformers' lazy modules (a graph break under torch.compile on some versions)."""
    global _masking_utils
    if _masking_utils is None:
        from transformers import masking_utils

        _masking_utils = masking_utils
    return _masking_utils


def _padding_clear(padding_mask, kv_length, kv_offset) -> bool:
    """True when no key in ``[kv_offset, kv_offset + kv_length)`` is padding. A padding mask that is
    being traced cannot be read, so it counts as not clear (the mask is then materialised)."""
    if padding_mask is None:
        return True
    if torch.compiler.is_compiling() or _masking().is_tracing(padding_mask):
        return False
    m = padding_mask[:, kv_offset:kv_offset + kv_length]
    return m.shape[-1] == kv_length and bool(m.all())


def aule_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, local_size=None, allow_is_causal_skip=True,
              allow_is_bidirectional_skip=False, use_vmap=False, device="cpu", **kwargs):
    """transformers ``AttentionMaskInterface`` entry for ``"aule"`` (same arguments as ``sdpa_mask``)."""
    mu = _masking()
    if mask_function is None:
        mask_function = mu.causal_mask_function
    padding_mask = mu.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    # The queries are the last q_length key positions: aule's bottom-right alignment holds. Static
    # caches give tensor offsets (and padding for their empty slots); those are not described.
    static_offsets = not isinstance(q_offset, torch.Tensor) and not isinstance(kv_offset, torch.Tensor)
    aligned = static_offsets and q_offset + q_length == kv_offset + kv_length
    plain = not use_vmap and local_size is None
    if plain and mask_function is mu.bidirectional_mask_function and allow_is_bidirectional_skip:
        if _padding_clear(padding_mask, kv_length, kv_offset):
            return None
    if plain and aligned and mask_function is mu.causal_mask_function and allow_is_causal_skip:
        if _padding_clear(padding_mask, kv_length, kv_offset):
            return None
    mask = mu.sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                        kv_offset=kv_offset, mask_function=mask_function, attention_mask=attention_mask,
                        local_size=local_size, allow_is_causal_skip=False, allow_is_bidirectional_skip=False,
                        use_vmap=use_vmap, device=device, **kwargs)
    if mask is None or mask.dtype != torch.bool or use_vmap or torch.compiler.is_compiling() or mu.is_tracing(mask):
        return mask
    sliding = local_size is not None and local_size > 0
    if mask_function is mu.bidirectional_mask_function and not sliding:
        left, right = -1, -1
    elif aligned and (mask_function is mu.causal_mask_function or sliding):
        left, right = (int(local_size) - 1 if sliding else -1), 0
    else:
        return mask
    # Checked element by element, so a tag can never describe a mask it does not equal.
    want = sdpa_core._window_mask(q_length, kv_length, left, right, mask.device)
    if _padding_clear(padding_mask, kv_length, kv_offset):
        if sliding and allow_is_causal_skip and bool((mask == want).all()):
            setattr(mask, _WINDOW_TAG, (left, right))
    elif padding_mask is not None and padding_mask.shape[-1] >= kv_offset + kv_length:
        # Padding over a plain pattern (a padded batch): the window plus the keys each sequence
        # keeps, so every layer hands aule [B, 1, 1, kv] instead of the whole [B, 1, q, kv] mask
        # (what aule reads to the host to recognise padding shrinks by a factor of q).
        keys = padding_mask[:, None, None, kv_offset:kv_offset + kv_length].to(torch.bool)
        if bool((mask == (want & keys)).all()):
            setattr(mask, _PADDED_TAG, (left, right, keys))
    return mask


def _window_of(attention_mask, causal: bool):
    """aule's ``(left, right)`` for the mask transformers handed over, or ``None`` if aule cannot
    compute it without the tensor."""
    if attention_mask is None:
        return (-1, 0) if causal else (-1, -1)
    if torch.compiler.is_compiling():
        return None
    return getattr(attention_mask, _WINDOW_TAG, None)


def aule_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers ``AttentionInterface`` entry for ``"aule"``: returns ``(out [B, S, H, D], None)``
    like ``sdpa_attention_forward``, computing through aule when it can do so exactly."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = _window_of(attention_mask, bool(causal))
    reason, mask = None, None
    padded = None if attention_mask is None or torch.compiler.is_compiling() else getattr(
        attention_mask, _PADDED_TAG, None)
    if padded is not None:
        # A padding-only mask for aule: per-sequence key spans, tiles skipped, nothing materialised.
        window, mask = padded[:2], padded[2]
    elif window is None:
        # A materialised mask (padding, packing, overlays, a static cache): aule applies it as SDPA
        # would, its causal part included, and recognises padding-only masks itself.
        reason = sdpa_core._unservable_mask(attention_mask, query, key, False)
        if reason is None and torch.compiler.is_compiling():
            reason = "a materialised attention mask inside torch.compile"
        window, mask = (-1, -1), attention_mask
    if reason is None and dropout and dropout > 0.0:
        reason = "attention dropout in training"
    # Gemma 2's logit softcapping and gpt-oss's sinks (``s_aux``) are aule features.
    softcap = float(kwargs.get("softcap") or 0.0)
    sinks = kwargs.get("s_aux")
    if reason is None and kwargs.get("position_bias") is not None:
        reason = "position_bias"
    if reason is None and kwargs.get("output_attentions", False):
        reason = "output_attentions"
    if reason is None:
        reason = sdpa_core._unservable(query, key, value, None, 0.0, scaling, True)
    out = None
    if reason is None:
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        label = "" if torch.compiler.is_compiling() else "transformers " + sdpa_core._shape_class(query, key, causal)
        out = sdpa_core.attend(query, key, value, scale, window[0], window[1], label, attn_mask=mask,
                               softcap=softcap, sinks=sinks)
    else:
        sdpa_core._note(("hf-fallback", reason), "aule: transformers attention uses sdpa: %s", reason)
    if out is None and sinks is not None:
        raise UnsupportedError(f"aule cannot serve this attention with sinks ({reason or 'see the log'}), and "
                               "transformers' SDPA path would drop them: use attn_implementation='eager'")
    if out is None:
        if padded is not None:
            pass  # the materialised mask itself is what SDPA takes
        elif mask is None and (attention_mask is None or hasattr(attention_mask, _WINDOW_TAG)):
            # The mask tag or None stood for aule's bottom-right window; hand SDPA the explicit mask
            # unless its own reading of None (top-left is_causal) means the same.
            l, r = window
            same_as_none = l < 0 and (r < 0 or query.shape[2] in (1, key.shape[2]))
            if not same_as_none:
                attention_mask = sdpa_core._window_mask(query.shape[2], key.shape[2], l, r, query.device)[None, None]
            else:
                attention_mask = None
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"aule"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface

    mu = _masking()
    AttentionInterface.register(NAME, aule_attention_forward)
    mu.AttentionMaskInterface.register(NAME, aule_mask)
    log.debug("aule: registered %r with transformers' AttentionInterface", NAME)

"""A ComfyUI custom node that routes torch's SDPA through aule.

To use it, put a package in ``ComfyUI/custom_nodes/`` whose ``__init__.py`` says::

    from aule.integrations.comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

The node takes a MODEL, installs (or, with ``enabled`` off, uninstalls) aule as
``torch.nn.functional.scaled_dot_product_attention`` with the chosen backend, and passes the model
through unchanged. It works where ComfyUI's attention calls ``F.scaled_dot_product_attention``
(its "pytorch" attention, the default on most GPUs); xformers or sage attention do not go
through SDPA and are left alone. Calls aule cannot serve (masks, dropout) still run torch's SDPA.
"""
from __future__ import annotations

from .. import backends

_AUTO = "auto"


def _choices() -> list[str]:
    return [_AUTO] + backends.names()


class AuleAttention:
    """ComfyUI node: ``MODEL -> MODEL`` that installs aule as torch SDPA."""

    CATEGORY = "advanced/attention"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = "Route torch scaled_dot_product_attention through aule (Vulkan, Triton or NumPy)."

    @classmethod
    def INPUT_TYPES(cls):  # noqa: N802 - ComfyUI's name
        return {"required": {
            "model": ("MODEL",),
            "backend": (_choices(), {"default": _AUTO}),
            "enabled": ("BOOLEAN", {"default": True}),
        }}

    def apply(self, model, backend=_AUTO, enabled=True):
        from .. import torch_sdpa

        if enabled:
            torch_sdpa.install(backend=None if backend == _AUTO else backend)
        else:
            torch_sdpa.uninstall()
        return (model,)


NODE_CLASS_MAPPINGS = {"AuleAttention": AuleAttention}
NODE_DISPLAY_NAME_MAPPINGS = {"AuleAttention": "aule attention (SDPA drop-in)"}

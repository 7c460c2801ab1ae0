"""aule: FlashAttention for every GPU."""
from .api import (copy_kv_to_paged, flash_attention, flash_attention_paged, flash_attention_paged_amd,
                  flash_attention_varlen)
from .backends import backend_info, get_available_backends
from .device_errors import check_device_errors
from .errors import AuleError, UnsupportedError, VulkanError, VulkanOutOfMemoryError
from .kv_cache import CacheFullError, PagedKVCache

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "flash_attention_varlen",
    "flash_attention_paged",
    "flash_attention_paged_amd",
    "copy_kv_to_paged",
    "check_device_errors",
    "PagedKVCache",
    "CacheFullError",
    "get_available_backends",
    "backend_info",
    "AuleError",
    "UnsupportedError",
    "VulkanError",
    "VulkanOutOfMemoryError",
    "install",
    "uninstall",
    "installed",
    "GpuTensor",
    "to_gpu",
    "__version__",
]

# The SDPA drop-in imports torch; load it on first use so `import aule` stays torch-free.
_TORCH_SDPA_NAMES = ("install", "uninstall", "installed")


# Vulkan device arrays; the backend module is imported on first use (it loads no driver by itself).
_VULKAN_NAMES = ("GpuTensor", "to_gpu")


def _arm_transformers():
    from .integrations import autoregister

    autoregister.arm()


_arm_transformers()


def __getattr__(name):
    if name in _VULKAN_NAMES:
        from .backends import vulkan

        return getattr(vulkan, name)
    if name in _TORCH_SDPA_NAMES:
        from . import torch_sdpa

        return getattr(torch_sdpa, name)
    raise AttributeError(f"module 'aule' has no attribute {name!r}")

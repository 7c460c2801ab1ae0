"""aule: FlashAttention for every GPU."""
from .api import flash_attention
from .backends import backend_info, get_available_backends
from .errors import AuleError, UnsupportedError, VulkanError, VulkanOutOfMemoryError
from .paged import CacheFullError, PagedKVCache, copy_kv_to_paged, flash_attention_paged, flash_attention_paged_amd

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "flash_attention_paged",
    "flash_attention_paged_amd",
    "copy_kv_to_paged",
    "PagedKVCache",
    "CacheFullError",
    "get_available_backends",
    "backend_info",
    "AuleError",
    "UnsupportedError",
    "VulkanError",
    "VulkanOutOfMemoryError",
    "__version__",
]

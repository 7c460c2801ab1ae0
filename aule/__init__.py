"""aule: FlashAttention for every GPU."""
from .api import flash_attention
from .backends import backend_info, get_available_backends
from .errors import AuleError, UnsupportedError, VulkanError, VulkanOutOfMemoryError

__version__ = "0.1.0"

__all__ = [
    "flash_attention",
    "get_available_backends",
    "backend_info",
    "AuleError",
    "UnsupportedError",
    "VulkanError",
    "VulkanOutOfMemoryError",
    "__version__",
]

"""The binding, and every failing Vulkan call turned into :class:`aule.VulkanError`.

:func:`call` is the one way the runtime calls a ``vk*`` entry point whose result matters: it
finds the function on the binding, and a failing VkResult (or the binding's own exception, for
its Python wrappers) becomes a typed error naming the call, the result and what to do about it.
"""
from __future__ import annotations

from ....errors import VulkanError, VulkanOutOfMemoryError

__all__ = ["VulkanError", "VulkanOutOfMemoryError", "binding", "call", "check", "create", "error", "listed", "vkmod",
           "vulkan_error", "result_name", "cstr"]

_vk = None

ADVICE = {
    "VK_ERROR_OUT_OF_DEVICE_MEMORY": "the GPU is out of memory: use smaller inputs or free GpuTensors",
    "VK_ERROR_OUT_OF_HOST_MEMORY": "the host is out of memory for the driver: free memory or use smaller inputs",
    "VK_ERROR_DEVICE_LOST": "the driver lost the device (a hang, a reset or a dispatch that ran too long); "
                            "restart the process, and report it if it repeats",
    "VK_ERROR_INITIALIZATION_FAILED": "the driver failed to initialise: check the GPU driver installation",
    "VK_ERROR_INCOMPATIBLE_DRIVER": "no Vulkan 1.2 driver was found: install your GPU's Vulkan driver, or Mesa's "
                                    "lavapipe (apt install mesa-vulkan-drivers) for a CPU device",
    "VK_ERROR_LAYER_NOT_PRESENT": "the Khronos validation layer is missing: install vulkan-validationlayers or "
                                  "unset AULE_VALIDATION",
    "VK_ERROR_EXTENSION_NOT_PRESENT": "the driver lacks a required extension: update the driver",
    "VK_ERROR_FEATURE_NOT_PRESENT": "the device lacks a required feature: pick another variant or device",
    "VK_ERROR_TOO_MANY_OBJECTS": "too many Vulkan objects are alive: free GpuTensors",
    "VK_ERROR_MEMORY_MAP_FAILED": "the driver could not map memory: free memory and retry",
}
DEFAULT_ADVICE = "check the driver installation; set AULE_VALIDATION=1 for details"
OOM = ("VK_ERROR_OUT_OF_DEVICE_MEMORY", "VK_ERROR_OUT_OF_HOST_MEMORY", "VK_ERROR_OUT_OF_POOL_MEMORY",
       "VK_ERROR_FRAGMENTED_POOL")


def vkmod():
    """The ``vulkan`` module, imported on first use (it loads libvulkan at import)."""
    global _vk
    if _vk is None:
        import vulkan

        _vk = vulkan
    return _vk


def binding():
    """``(vk, ffi, lib)``: the module for constants, cffi for structs, the C entry points."""
    vk = vkmod()
    return vk, vk.ffi, vk.lib


def result_name(code: int) -> str:
    vk = vkmod()
    for name in dir(vk):
        if (name.startswith("VK_ERROR_") or name in ("VK_NOT_READY", "VK_TIMEOUT", "VK_INCOMPLETE")) \
                and not name.endswith(("_BEGIN_RANGE", "_END_RANGE", "_RANGE_SIZE", "_MAX_ENUM")) \
                and getattr(vk, name) == code:
            return name
    return f"VkResult({code})"


def vulkan_error(call_name: str, code: int, detail: str = "") -> VulkanError:
    name = result_name(code)
    advice = ADVICE.get(name, DEFAULT_ADVICE)
    cls = VulkanOutOfMemoryError if name in OOM else VulkanError
    msg = f"{call_name} failed with {name}" + (f" ({detail})" if detail else "") + f": {advice}"
    return cls(msg, call=call_name, result=name)


def error(call_name: str, result: str, message: str) -> VulkanError:
    """A failure the runtime detects itself (no VkResult came back), typed like the driver's."""
    cls = VulkanOutOfMemoryError if result in OOM else VulkanError
    return cls(message, call=call_name, result=result)


def check(call_name: str, code: int, detail: str = "") -> None:
    """Raise for a failing VkResult; for entry points :func:`call` cannot look up by name
    (those fetched through ``vkGetInstanceProcAddr``)."""
    if code != 0:
        raise vulkan_error(call_name, code, detail)


def _binding_code(exc) -> int:
    for code, cls in vkmod().exception_codes.items():
        if type(exc) is cls:
            return code
    return -13  # VK_ERROR_UNKNOWN


def call(name: str, *args, detail: str = ""):
    """Call ``name`` on the binding and raise :class:`VulkanError` if it fails.

    C entry points (``lib``) return their VkResult, which is checked; where only the binding's
    Python wrapper exists its result (a list, a handle) is returned and its exceptions mapped.
    """
    vk = _vk or vkmod()
    fn = getattr(vk.lib, name, None)
    if fn is None:
        try:
            return getattr(vk, name)(*args)
        except (vk.VkError, vk.VkException) as exc:
            raise vulkan_error(name, _binding_code(exc), detail) from None
    code = fn(*args)
    if code != 0:
        raise vulkan_error(name, code, detail)
    return code


def create(name: str, handle_type: str, *args, detail: str = ""):
    """The handle a ``vkCreate*``/``vkAllocate*`` call writes (``args`` up to, not including,
    the allocator and the output pointer)."""
    ffi = (_vk or vkmod()).ffi
    out = ffi.new(f"{handle_type}*")
    call(name, *args, ffi.NULL, out, detail=detail)
    return out[0]


def listed(name: str, ctype: str, *args):
    """The two-call ``vkEnumerate*`` pattern: the count, then the array (a cffi array: keep it
    referenced while its elements are read, they point into it)."""
    vk, ffi, _ = binding()
    count = ffi.new("uint32_t*")
    call(name, *args, count, ffi.NULL)
    items = ffi.new(f"{ctype}[]", count[0])
    if count[0]:
        call(name, *args, count, items)
    return items


def cstr(x) -> str:
    return vkmod().ffi.string(x).decode("utf-8", "replace")

"""Exception types shared by every part of aule."""


class AuleError(Exception):
    """Base class of every error aule raises on purpose."""


class UnsupportedError(AuleError):
    """A backend cannot serve this call (device, dtype, shape or limit); the message says why."""


class VulkanError(AuleError):
    """A Vulkan call failed. Carries the call's name and the VkResult code."""

    def __init__(self, message, call=None, result=None):
        super().__init__(message)
        self.call = call
        self.result = result


class VulkanOutOfMemoryError(VulkanError):
    """The device or host ran out of memory for a Vulkan allocation; the context stays usable."""

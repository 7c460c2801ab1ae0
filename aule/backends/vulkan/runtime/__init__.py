"""A small Vulkan compute runtime on the ``vulkan`` (cffi) binding.

Object model (after Kompute's manager / tensor / algorithm / sequence), reusable by every shader
family:

- :class:`Context` (context.py) - instance, device, one compute queue and its lock, memory
  policy, buffer pools, pipeline and descriptor caches. One per process, from :func:`context`.
- :class:`Buffer`, :class:`Lease`, :class:`BufferPool` (memory.py) - storage buffers (mapped
  where host-visible), loaned from pools and given back.
- :class:`Pipeline` (pipelines.py) - a compute pipeline for (SPIR-V module, specialization
  constants), with the persisted pipeline cache.
- :class:`Sequence` (sequence.py) - copies, dispatches, barriers and timestamps recorded into
  one command buffer, submitted and re-submitted; :class:`Dispatch` is one dispatch of it.
- device.py reads devices and makes the instance (with the headless-NVIDIA EGL retry);
  errors.py turns every failing call into :class:`aule.VulkanError` through :func:`call`.

Hot paths call the C entry points through ``lib`` with prebuilt structs: the binding's
Python wrappers cost tens of microseconds per call.
"""
from .context import Context, context
from .device import NVIDIA_EGL, VENDORS, DeviceInfo
from .errors import binding, call, check, create, result_name, vkmod, vulkan_error
from .files import user_cache_dir
from .memory import Buffer, BufferPool, Lease
from .pipelines import Pipeline
from .sequence import Dispatch, Sequence

__all__ = ["Buffer", "BufferPool", "Context", "DeviceInfo", "Dispatch", "Lease", "NVIDIA_EGL", "Pipeline",
           "Sequence", "VENDORS", "binding", "call", "check", "context", "create", "result_name", "user_cache_dir",
           "vkmod", "vulkan_error"]

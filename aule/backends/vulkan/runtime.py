"""A small Vulkan compute runtime on the ``vulkan`` (cffi) binding.

Object model (Kompute-like, reusable by every shader family):

- :class:`Context` - instance, physical device, logical device, one compute queue and its lock,
  memory policy, buffer pool, pipeline and descriptor caches, timestamp queries. One per process,
  created lazily by :func:`context`.
- :class:`Buffer` - a storage buffer with its memory; host-visible buffers stay mapped.
- :class:`Pipeline` - a compute pipeline for (SPIR-V module, specialization constants).
- :class:`Dispatch` - one recorded dispatch: pipeline, bound buffer ranges, push constants, groups.
  :meth:`Context.run` records a list of them into one command buffer, submits and waits.

Every failing ``vk*`` call raises :class:`aule.VulkanError` (call, result code, advice);
out-of-memory raises :class:`aule.VulkanOutOfMemoryError` and leaves the context usable.
Hot paths call the C entry points through ``lib`` with prebuilt structs: the binding's
Python wrappers cost tens of microseconds per call.
"""
from __future__ import annotations

import collections
import ctypes
import json
import logging
import os
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ...errors import VulkanError, VulkanOutOfMemoryError

log = logging.getLogger("aule")

_vk = None


def vkmod():
    """The ``vulkan`` module, imported on first use (it loads libvulkan at import)."""
    global _vk
    if _vk is None:
        import vulkan

        _vk = vulkan
    return _vk


# --- errors ------------------------------------------------------------------------------------

_ADVICE = {
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
_OOM = ("VK_ERROR_OUT_OF_DEVICE_MEMORY", "VK_ERROR_OUT_OF_HOST_MEMORY", "VK_ERROR_OUT_OF_POOL_MEMORY",
        "VK_ERROR_FRAGMENTED_POOL")


def result_name(code: int) -> str:
    vk = vkmod()
    for name in dir(vk):
        if (name.startswith("VK_ERROR_") or name in ("VK_NOT_READY", "VK_TIMEOUT", "VK_INCOMPLETE")) \
                and not name.endswith(("_BEGIN_RANGE", "_END_RANGE", "_RANGE_SIZE", "_MAX_ENUM")) \
                and getattr(vk, name) == code:
            return name
    return f"VkResult({code})"


def vulkan_error(call: str, code: int, detail: str = "") -> VulkanError:
    name = result_name(code)
    advice = _ADVICE.get(name, "check the driver installation; set AULE_VALIDATION=1 for details")
    cls = VulkanOutOfMemoryError if name in _OOM else VulkanError
    msg = f"{call} failed with {name}" + (f" ({detail})" if detail else "") + f": {advice}"
    return cls(msg, call=call, result=name)


def check(call: str, code: int, detail: str = "") -> None:
    if code != 0:
        raise vulkan_error(call, code, detail)


def _binding_code(exc) -> int:
    vk = vkmod()
    for code, cls in vk.exception_codes.items():
        if type(exc) is cls:
            return code
    return -13  # VK_ERROR_UNKNOWN


def guarded(call: str, fn, *args):
    """Run a binding wrapper, mapping its exception classes to :class:`VulkanError`."""
    vk = vkmod()
    try:
        return fn(*args)
    except (vk.VkError, vk.VkException) as exc:
        raise vulkan_error(call, _binding_code(exc)) from None


# --- helpers -----------------------------------------------------------------------------------

def _cstr(x) -> str:
    vk = vkmod()
    return vk.ffi.string(x).decode("utf-8", "replace")


def user_cache_dir() -> Path:
    """Per-user cache folder for aule (pipeline caches, ICD manifests)."""
    if os.environ.get("AULE_CACHE_DIR"):
        base = Path(os.environ["AULE_CACHE_DIR"])
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "aule"
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches" / "aule"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aule"
    return base


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


DEVICE_TYPES = {0: "other", 1: "integrated-gpu", 2: "discrete-gpu", 3: "virtual-gpu", 4: "cpu"}
# Lower is preferred: a real GPU before a virtual one before a CPU rasteriser.
_TYPE_RANK = {"discrete-gpu": 0, "integrated-gpu": 1, "virtual-gpu": 2, "other": 3, "cpu": 4}
VENDORS = {0x1002: "AMD", 0x10DE: "NVIDIA", 0x8086: "Intel", 0x106B: "Apple", 0x13B5: "ARM",
           0x5143: "Qualcomm", 0x10005: "Mesa"}


@dataclass(eq=False)  # hashed by identity: plans are cached per device
class DeviceInfo:
    """What selection and routing need to know about one physical device, read once."""

    index: int
    name: str
    type: str
    vendor: str
    vendor_id: int
    driver: str
    api_version: str
    max_shared_memory: int
    max_storage_buffer_range: int
    max_workgroup_count: tuple
    max_workgroup_size: int
    max_push_constants: int
    min_storage_offset_alignment: int
    max_allocation: int
    subgroup_size: int
    subgroup_ops: int             # VkSubgroupFeatureFlags supported in compute shaders (0 if none)
    shader_float16: bool
    storage_buffer_16bit: bool
    cooperative_matrix: bool
    coopmat_f16: bool             # a 16x16x16 fp16 x fp16 + fp32 subgroup shape, and the memory model
    timestamp_period: float
    device_local_bytes: int
    extensions: frozenset = field(repr=False, default=frozenset())
    # lavapipe (llvmpipe) ends an invocation after this many loop iterations, all loops together.
    loop_limit: int | None = None

    @property
    def is_cpu(self) -> bool:
        return self.type == "cpu"

    @property
    def fp16(self) -> bool:
        return self.shader_float16 and self.storage_buffer_16bit

    def summary(self) -> dict:
        return {
            "index": self.index, "name": self.name, "type": self.type, "vendor": self.vendor,
            "driver": self.driver, "api": self.api_version,
            "shared_memory": self.max_shared_memory, "subgroup_size": self.subgroup_size,
            "fp16": self.shader_float16, "storage_16bit": self.storage_buffer_16bit,
            "cooperative_matrix": self.cooperative_matrix,
            "max_storage_buffer_range": self.max_storage_buffer_range,
            "device_local_mib": self.device_local_bytes >> 20,
        }


def _version_str(v: int) -> str:
    return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def _has_coopmat_16x16x16(pd, exts) -> bool:
    """Whether the device offers fp16 A/B, fp32 C/result 16x16x16 matrices at subgroup scope."""
    if "VK_KHR_cooperative_matrix" not in exts or _instance_for_coopmat[0] is None:
        return False
    vk = vkmod()
    ffi, lib = vk.ffi, vk.lib
    fn = lib.vkGetInstanceProcAddr(_instance_for_coopmat[0], b"vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")
    if fn == ffi.NULL:
        return False
    get = ffi.cast("PFN_vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR", fn)
    n = ffi.new("uint32_t*")
    if get(pd, n, ffi.NULL) != 0 or not n[0]:
        return False
    props = ffi.new("VkCooperativeMatrixPropertiesKHR[]", n[0])
    for i in range(n[0]):
        props[i].sType = vk.VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR
    if get(pd, n, props) != 0:
        return False
    f16, f32 = vk.VK_COMPONENT_TYPE_FLOAT16_KHR, vk.VK_COMPONENT_TYPE_FLOAT32_KHR
    return any(p.MSize == 16 and p.NSize == 16 and p.KSize == 16 and p.AType == f16 and p.BType == f16
               and p.CType == f32 and p.ResultType == f32 and p.scope == vk.VK_SCOPE_SUBGROUP_KHR
               for p in props)


# The instance whose devices are being read (the coopmat query is an instance-level function).
_instance_for_coopmat = [None]


def _read_device(pd, index: int) -> DeviceInfo:
    vk = vkmod()
    ffi, lib = vk.ffi, vk.lib
    v11p = ffi.new("VkPhysicalDeviceVulkan11Properties*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_PROPERTIES})
    drvp = ffi.new("VkPhysicalDeviceDriverProperties*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES, "pNext": v11p})
    props2 = ffi.new("VkPhysicalDeviceProperties2*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, "pNext": drvp})
    lib.vkGetPhysicalDeviceProperties2(pd, props2)
    p = props2.properties
    f11 = ffi.new("VkPhysicalDeviceVulkan11Features*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES})
    f12 = ffi.new("VkPhysicalDeviceVulkan12Features*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES, "pNext": f11})
    feats2 = ffi.new("VkPhysicalDeviceFeatures2*", {"sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, "pNext": f12})
    if p.apiVersion >= vk.VK_MAKE_VERSION(1, 2, 0):
        lib.vkGetPhysicalDeviceFeatures2(pd, feats2)
    exts = frozenset(e.extensionName for e in guarded(
        "vkEnumerateDeviceExtensionProperties", vk.vkEnumerateDeviceExtensionProperties, pd, None))
    mem = ffi.new("VkPhysicalDeviceMemoryProperties*")
    lib.vkGetPhysicalDeviceMemoryProperties(pd, mem)
    local = max((mem.memoryHeaps[i].size for i in range(mem.memoryHeapCount)
                 if mem.memoryHeaps[i].flags & vk.VK_MEMORY_HEAP_DEVICE_LOCAL_BIT), default=0)
    lim = p.limits
    return DeviceInfo(
        index=index, name=_cstr(p.deviceName), type=DEVICE_TYPES.get(p.deviceType, "other"),
        vendor=VENDORS.get(p.vendorID, hex(p.vendorID)), vendor_id=p.vendorID,
        driver=f"{_cstr(drvp.driverName)} {_cstr(drvp.driverInfo)}".strip(),
        api_version=_version_str(p.apiVersion),
        max_shared_memory=lim.maxComputeSharedMemorySize,
        max_storage_buffer_range=lim.maxStorageBufferRange,
        max_workgroup_count=tuple(lim.maxComputeWorkGroupCount),
        max_workgroup_size=lim.maxComputeWorkGroupInvocations,
        max_push_constants=lim.maxPushConstantsSize,
        min_storage_offset_alignment=max(4, lim.minStorageBufferOffsetAlignment),
        max_allocation=v11p.maxMemoryAllocationSize,
        subgroup_size=v11p.subgroupSize,
        subgroup_ops=(v11p.subgroupSupportedOperations
                      if v11p.subgroupSupportedStages & vk.VK_SHADER_STAGE_COMPUTE_BIT else 0),
        shader_float16=bool(f12.shaderFloat16),
        storage_buffer_16bit=bool(f11.storageBuffer16BitAccess),
        cooperative_matrix="VK_KHR_cooperative_matrix" in exts,
        coopmat_f16=bool(f12.vulkanMemoryModel) and _has_coopmat_16x16x16(pd, exts),
        timestamp_period=lim.timestampPeriod,
        device_local_bytes=local,
        extensions=exts,
        loop_limit=65535 if "llvmpipe" in _cstr(p.deviceName).lower() else None,
    ), p.apiVersion


# --- headless NVIDIA ------------------------------------------------------------------------------

NVIDIA_EGL = "libEGL_nvidia.so.0"


def _nvidia_egl_loadable() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL(NVIDIA_EGL)
        return True
    except OSError:
        return False


def _write_egl_icd() -> Path:
    """An ICD manifest that points the loader at NVIDIA's EGL library (which works headless)."""
    data = json.dumps({"file_format_version": "1.0.1",
                       "ICD": {"library_path": NVIDIA_EGL, "api_version": "1.3.0"}}).encode()
    for folder in (user_cache_dir() / "icd", Path(tempfile.gettempdir()) / f"aule-{os.getuid()}-icd"):
        path = folder / "nvidia_egl_icd.json"
        try:
            if not path.exists() or path.read_bytes() != data:
                _atomic_write(path, data)
            return path
        except OSError:  # a read-only home: the temp folder will do
            continue
    raise OSError("cannot write an ICD manifest for NVIDIA's EGL driver in the cache or temp folder")


# --- objects ---------------------------------------------------------------------------------------

class Buffer:
    """A storage buffer and its memory. Host-visible memory stays mapped: ``view`` is a uint8
    NumPy view of it, so copies in and out are single memcpys."""

    __slots__ = ("ctx", "handle", "memory", "nbytes", "host_visible", "host_cached", "view", "_mapped",
                 "_id", "__weakref__")
    _ids = 0

    def __init__(self, ctx: "Context", nbytes: int, kind: str):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        self.ctx, self.nbytes, self.view, self._mapped = ctx, int(nbytes), None, None
        self.handle = self.memory = None
        Buffer._ids += 1
        self._id = Buffer._ids
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        info = ffi.new("VkBufferCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                               "size": self.nbytes, "usage": usage,
                                               "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
        out = ffi.new("VkBuffer*")
        check("vkCreateBuffer", lib.vkCreateBuffer(ctx.device, info, ffi.NULL, out), f"{nbytes} bytes")
        self.handle = out[0]
        try:
            req = ffi.new("VkMemoryRequirements*")
            lib.vkGetBufferMemoryRequirements(ctx.device, self.handle, req)
            type_index = ctx.memory_type(req.memoryTypeBits, kind)
            flags = ctx.memory_flags[type_index]
            # With staging forced, device buffers are treated as unmapped even where they could be.
            self.host_visible = bool(flags & vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT) and not (
                kind == "device" and ctx.force_staging)
            self.host_cached = bool(flags & vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT)
            if req.size > ctx.info.max_allocation:
                raise VulkanOutOfMemoryError(
                    f"vkAllocateMemory: {req.size} bytes exceed the device's maxMemoryAllocationSize "
                    f"({ctx.info.max_allocation}): split the input", call="vkAllocateMemory",
                    result="VK_ERROR_OUT_OF_DEVICE_MEMORY")
            ai = ffi.new("VkMemoryAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                                   "allocationSize": req.size, "memoryTypeIndex": type_index})
            mem = ffi.new("VkDeviceMemory*")
            check("vkAllocateMemory", lib.vkAllocateMemory(ctx.device, ai, ffi.NULL, mem), f"{req.size} bytes")
            self.memory = mem[0]
            check("vkBindBufferMemory", lib.vkBindBufferMemory(ctx.device, self.handle, self.memory, 0))
            if self.host_visible:
                pp = ffi.new("void**")
                check("vkMapMemory", lib.vkMapMemory(ctx.device, self.memory, 0, self.nbytes, 0, pp))
                self._mapped = ffi.buffer(pp[0], self.nbytes)
                self.view = np.frombuffer(self._mapped, dtype=np.uint8)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        vk = vkmod()
        lib, ffi = vk.lib, vk.ffi
        if self.handle is None and self.memory is None:
            return
        self.ctx._forget_buffer(self)
        self.view = self._mapped = None
        if self.handle is not None:
            lib.vkDestroyBuffer(self.ctx.device, self.handle, ffi.NULL)
        if self.memory is not None:
            lib.vkFreeMemory(self.ctx.device, self.memory, ffi.NULL)
        self.handle = self.memory = None


class Lease:
    """A pooled buffer on loan: ``release()`` (or garbage collection) hands it back to the pool."""

    __slots__ = ("buffer", "nbytes", "_fin", "__weakref__")

    def __init__(self, pool: "BufferPool", buffer: Buffer, nbytes: int):
        self.buffer, self.nbytes = buffer, nbytes
        self._fin = weakref.finalize(self, pool._give_back, buffer)

    def release(self) -> None:
        self._fin()


class BufferPool:
    """Reuses buffers between calls: allocation is the slowest thing a small call could do.

    Sizes round up to an eighth of their power of two (at most 12.5% slack); free buffers are
    kept up to ``limit`` bytes, oldest dropped first.
    """

    def __init__(self, ctx: "Context", kind: str, limit: int):
        self.ctx, self.kind, self.limit = ctx, kind, limit
        self.free: "collections.OrderedDict[int, list]" = collections.OrderedDict()
        self.cached = 0
        self.lock = threading.Lock()

    @staticmethod
    def size_class(n: int) -> int:
        n = max(256, int(n))
        step = max(256, 1 << max(0, (n - 1).bit_length() - 3))
        return (n + step - 1) // step * step

    def acquire(self, nbytes: int) -> Lease:
        size = self.size_class(nbytes)
        with self.lock:
            bucket = self.free.get(size)
            if bucket:
                buf = bucket.pop()
                self.cached -= buf.nbytes
                return Lease(self, buf, nbytes)
        try:
            buf = Buffer(self.ctx, size, self.kind)
        except VulkanOutOfMemoryError:
            self.ctx.trim_pools()  # cached buffers may be what fills the device; free them, retry once
            buf = Buffer(self.ctx, size, self.kind)
        return Lease(self, buf, nbytes)

    def _give_back(self, buf: Buffer) -> None:
        if buf.handle is None or self.ctx._destroyed:
            return
        with self.lock:
            self.free.setdefault(buf.nbytes, []).append(buf)
            self.free.move_to_end(buf.nbytes)
            self.cached += buf.nbytes
        self.trim(self.limit)

    def trim(self, limit: int) -> None:
        drop = []
        with self.lock:
            while self.cached > limit and self.free:
                size, bucket = next(iter(self.free.items()))
                buf = bucket.pop(0)
                if not bucket:
                    del self.free[size]
                self.cached -= buf.nbytes
                drop.append(buf)
        for buf in drop:
            with self.ctx.lock:
                buf.destroy()


class Pipeline:
    """A compute pipeline: module + descriptor-set layout (n storage buffers) + push range."""

    def __init__(self, ctx: "Context", name: str, code: bytes, n_bindings: int, push_size: int,
                 spec: tuple):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        self.ctx, self.name, self.n_bindings, self.push_size, self.spec = ctx, name, n_bindings, push_size, spec
        if len(code) % 4:
            raise VulkanError(f"SPIR-V module {name} is {len(code)} bytes, not a multiple of 4",
                              call="vkCreateShaderModule", result="VK_ERROR_INVALID_SHADER_NV")
        self._code = ffi.new("char[]", code)
        mi = ffi.new("VkShaderModuleCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                                   "codeSize": len(code),
                                                   "pCode": ffi.cast("uint32_t*", self._code)})
        out = ffi.new("VkShaderModule*")
        check("vkCreateShaderModule", lib.vkCreateShaderModule(ctx.device, mi, ffi.NULL, out), name)
        self.module = out[0]
        self.set_layout = ctx.set_layout(n_bindings)
        pcr = ffi.new("VkPushConstantRange*", {"stageFlags": vk.VK_SHADER_STAGE_COMPUTE_BIT,
                                               "offset": 0, "size": push_size})
        sl = ffi.new("VkDescriptorSetLayout[1]", [self.set_layout])
        li = ffi.new("VkPipelineLayoutCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, "setLayoutCount": 1,
            "pSetLayouts": sl, "pushConstantRangeCount": 1 if push_size else 0,
            "pPushConstantRanges": pcr if push_size else ffi.NULL})
        outl = ffi.new("VkPipelineLayout*")
        check("vkCreatePipelineLayout", lib.vkCreatePipelineLayout(ctx.device, li, ffi.NULL, outl))
        self.layout = outl[0]
        # Specialization constants: (id, value) with value an int (uint32/int32) or a float (float32).
        entries = ffi.new("VkSpecializationMapEntry[]", max(1, len(spec)))
        data = np.zeros(max(1, len(spec)), dtype=np.uint32)
        for i, (cid, val) in enumerate(spec):
            entries[i].constantID, entries[i].offset, entries[i].size = cid, 4 * i, 4
            if isinstance(val, float):
                data[i] = np.float32(val).view(np.uint32)
            else:
                data[i] = np.int64(val) & 0xFFFFFFFF
        self._spec_data = ffi.new("char[]", data.tobytes())
        si = ffi.new("VkSpecializationInfo*", {"mapEntryCount": len(spec), "pMapEntries": entries,
                                               "dataSize": 4 * len(spec), "pData": self._spec_data})
        ci = ffi.new("VkComputePipelineCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
            "stage": {"sType": vk.VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                      "stage": vk.VK_SHADER_STAGE_COMPUTE_BIT, "module": self.module,
                      "pName": ctx._main, "pSpecializationInfo": si},
            "layout": self.layout})
        outp = ffi.new("VkPipeline*")
        check("vkCreateComputePipelines",
              lib.vkCreateComputePipelines(ctx.device, ctx.pipeline_cache, 1, ci, ffi.NULL, outp), name)
        self.handle = outp[0]

    def destroy(self):
        vk = vkmod()
        lib, ffi = vk.lib, vk.ffi
        lib.vkDestroyPipeline(self.ctx.device, self.handle, ffi.NULL)
        lib.vkDestroyPipelineLayout(self.ctx.device, self.layout, ffi.NULL)
        lib.vkDestroyShaderModule(self.ctx.device, self.module, ffi.NULL)


@dataclass
class Dispatch:
    """One dispatch to record: ``bindings`` are ``(buffer, offset, range)`` in binding order."""

    pipeline: Pipeline
    bindings: tuple
    push: bytes
    groups: tuple


class Context:
    """Instance, device, queue and caches. Use :func:`context` for the process-wide one."""

    DESCRIPTOR_SETS = 256

    def __init__(self):
        vk = vkmod()
        self.lock = threading.RLock()
        self.validation_messages: list[str] = []
        self.validation = os.environ.get("AULE_VALIDATION", "") not in ("", "0")
        self.validation_active = False
        self.route = "default loader search"
        self._callbacks = []
        self._destroyed = False
        self._main = vk.ffi.new("char[]", b"main")
        self.instance, self.messenger, self.devices = self._instance_with_fallback()
        self.physical, self.info = self._choose_device()
        self._create_device()
        self._init_caches()
        self._init_memory()
        log.info("aule: Vulkan device %s (%s, %s) via %s", self.info.name, self.info.type,
                 self.info.driver, self.route)

    # instance ---------------------------------------------------------------------------------
    def _make_instance(self):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        exts_avail = {e.extensionName for e in guarded(
            "vkEnumerateInstanceExtensionProperties", vk.vkEnumerateInstanceExtensionProperties, None)}
        layers_avail = {l.layerName for l in guarded(
            "vkEnumerateInstanceLayerProperties", vk.vkEnumerateInstanceLayerProperties)}
        exts, layers, flags = [], [], 0
        if "VK_KHR_portability_enumeration" in exts_avail:  # MoltenVK lists itself only with this
            exts.append("VK_KHR_portability_enumeration")
            flags |= vk.VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR
        want_debug = self.validation and "VK_EXT_debug_utils" in exts_avail
        if self.validation:
            if "VK_LAYER_KHRONOS_validation" not in layers_avail:
                raise VulkanError("AULE_VALIDATION=1 but VK_LAYER_KHRONOS_validation is not installed: "
                                  + _ADVICE["VK_ERROR_LAYER_NOT_PRESENT"], call="vkCreateInstance",
                                  result="VK_ERROR_LAYER_NOT_PRESENT")
            layers.append("VK_LAYER_KHRONOS_validation")
        if want_debug:
            exts.append("VK_EXT_debug_utils")
        keep = [ffi.new("char[]", s.encode()) for s in exts + layers]
        ext_p = ffi.new("char*[]", keep[:len(exts)])
        lay_p = ffi.new("char*[]", keep[len(exts):])
        app = ffi.new("VkApplicationInfo*", {"sType": vk.VK_STRUCTURE_TYPE_APPLICATION_INFO,
                                             "pApplicationName": self._main, "pEngineName": self._main,
                                             "apiVersion": vk.VK_MAKE_VERSION(1, 2, 0)})
        dbg = self._debug_info() if want_debug else ffi.NULL
        ci = ffi.new("VkInstanceCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, "pNext": dbg, "flags": flags,
            "pApplicationInfo": app, "enabledLayerCount": len(layers), "ppEnabledLayerNames": lay_p,
            "enabledExtensionCount": len(exts), "ppEnabledExtensionNames": ext_p})
        out = ffi.new("VkInstance*")
        check("vkCreateInstance", lib.vkCreateInstance(ci, ffi.NULL, out))
        instance = out[0]
        messenger = None
        if want_debug:
            fn = lib.vkGetInstanceProcAddr(instance, b"vkCreateDebugUtilsMessengerEXT")
            if fn != ffi.NULL:
                create = ffi.cast("PFN_vkCreateDebugUtilsMessengerEXT", fn)
                outm = ffi.new("VkDebugUtilsMessengerEXT*")
                check("vkCreateDebugUtilsMessengerEXT", create(instance, dbg, ffi.NULL, outm))
                messenger = outm[0]
                self.validation_active = True
        count = ffi.new("uint32_t*")
        check("vkEnumeratePhysicalDevices", lib.vkEnumeratePhysicalDevices(instance, count, ffi.NULL))
        pds = ffi.new("VkPhysicalDevice[]", count[0])
        check("vkEnumeratePhysicalDevices", lib.vkEnumeratePhysicalDevices(instance, count, pds))
        devices = []
        _instance_for_coopmat[0] = instance
        for i in range(count[0]):
            info, api = _read_device(pds[i], i)
            if api >= vk.VK_MAKE_VERSION(1, 2, 0):
                devices.append((pds[i], info))
        return instance, messenger, devices

    def _debug_info(self):
        vk = vkmod()
        ffi = vk.ffi
        if not hasattr(self, "_dbg_info"):
            messages = self.validation_messages

            def on_message(severity, types, data, user):
                msg = _cstr(data.pMessage) if data != ffi.NULL and data.pMessage != ffi.NULL else "?"
                messages.append(msg)
                log.warning("aule: Vulkan validation: %s", msg)
                return 0

            cb = ffi.callback("PFN_vkDebugUtilsMessengerCallbackEXT", on_message)
            self._callbacks.append(cb)
            self._dbg_info = ffi.new("VkDebugUtilsMessengerCreateInfoEXT*", {
                "sType": vk.VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
                "messageSeverity": vk.VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT
                | vk.VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
                "messageType": vk.VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT
                | vk.VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT
                | vk.VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
                "pfnUserCallback": cb})
        return self._dbg_info

    def _destroy_instance(self, instance, messenger):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        if messenger is not None:
            fn = lib.vkGetInstanceProcAddr(instance, b"vkDestroyDebugUtilsMessengerEXT")
            if fn != ffi.NULL:
                ffi.cast("PFN_vkDestroyDebugUtilsMessengerEXT", fn)(instance, messenger, ffi.NULL)
        lib.vkDestroyInstance(instance, ffi.NULL)

    def _instance_with_fallback(self):
        """Default loader search first; on a headless NVIDIA server the GLX-based ICD refuses,
        so when no GPU-type device turned up and NVIDIA's EGL library loads, retry through an
        ICD manifest that names it. The loader reads VK_DRIVER_FILES/VK_ICD_FILENAMES at
        vkCreateInstance, so setting them here (before the retry) is enough."""
        first_error, inst = None, None
        try:
            inst, msgr, devs = self._make_instance()
        except VulkanError as exc:
            first_error, devs = exc, []
        if any(not d.is_cpu for _, d in devs):
            return inst, msgr, devs
        user_set = os.environ.get("VK_ICD_FILENAMES") or os.environ.get("VK_DRIVER_FILES")
        if not user_set and os.environ.get("AULE_VULKAN_NO_EGL_RETRY") != "1" and _nvidia_egl_loadable():
            try:
                icd = _write_egl_icd()
            except OSError as exc:
                log.info("aule: NVIDIA EGL retry skipped: %s", exc)
                icd = None
        else:
            icd = None
        if icd is not None:
            saved = {k: os.environ.get(k) for k in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES")}
            os.environ["VK_ICD_FILENAMES"] = os.environ["VK_DRIVER_FILES"] = str(icd)
            try:
                inst2, msgr2, devs2 = self._make_instance()
            except VulkanError as exc:
                log.info("aule: NVIDIA EGL retry failed: %s", exc)
                inst2, devs2 = None, []
            if any(not d.is_cpu for _, d in devs2):
                if inst is not None:
                    self._destroy_instance(inst, msgr)
                self.route = f"NVIDIA EGL ICD retry ({icd})"
                return inst2, msgr2, devs2
            if inst2 is not None:
                self._destroy_instance(inst2, msgr2)
            for k, v in saved.items():  # the retry found nothing: leave the environment as it was
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        if inst is None:
            raise first_error
        if not devs:
            self._destroy_instance(inst, msgr)
            raise VulkanError("vkEnumeratePhysicalDevices found no Vulkan 1.2 device: "
                              + _ADVICE["VK_ERROR_INCOMPATIBLE_DRIVER"], call="vkEnumeratePhysicalDevices",
                              result="VK_ERROR_INCOMPATIBLE_DRIVER")
        return inst, msgr, devs

    def _choose_device(self):
        want = os.environ.get("AULE_VULKAN_DEVICE", "").strip()
        devs = self.devices
        if want:
            if want.isdigit():
                hits = [d for d in devs if d[1].index == int(want)]
            else:
                hits = [d for d in devs if want.lower() in d[1].name.lower()]
            if not hits:
                raise VulkanError(
                    f"AULE_VULKAN_DEVICE={want!r} matches no device; devices: "
                    + ", ".join(f"{d.index}: {d.name}" for _, d in devs),
                    call="vkEnumeratePhysicalDevices", result="VK_ERROR_INITIALIZATION_FAILED")
            return hits[0]
        return min(devs, key=lambda d: (_TYPE_RANK[d[1].type], -d[1].device_local_bytes, d[1].index))

    # device -----------------------------------------------------------------------------------
    def _create_device(self):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        pd, info = self.physical, self.info
        count = ffi.new("uint32_t*")
        lib.vkGetPhysicalDeviceQueueFamilyProperties(pd, count, ffi.NULL)
        fams = ffi.new("VkQueueFamilyProperties[]", count[0])
        lib.vkGetPhysicalDeviceQueueFamilyProperties(pd, count, fams)
        compute = [i for i in range(count[0]) if fams[i].queueFlags & vk.VK_QUEUE_COMPUTE_BIT]
        if not compute:
            raise VulkanError(f"{info.name} has no compute queue", call="vkGetPhysicalDeviceQueueFamilyProperties",
                              result="VK_ERROR_FEATURE_NOT_PRESENT")
        # A family with timestamps first, so GPU times are available.
        self.queue_family = min(compute, key=lambda i: (fams[i].timestampValidBits == 0, i))
        self.timestamp_bits = fams[self.queue_family].timestampValidBits
        prio = ffi.new("float[1]", [1.0])
        qci = ffi.new("VkDeviceQueueCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                                   "queueFamilyIndex": self.queue_family, "queueCount": 1,
                                                   "pQueuePriorities": prio})
        f11 = ffi.new("VkPhysicalDeviceVulkan11Features*", {
            "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES,
            "storageBuffer16BitAccess": int(info.storage_buffer_16bit)})
        cm = ffi.new("VkPhysicalDeviceCooperativeMatrixFeaturesKHR*", {
            "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR, "pNext": f11,
            "cooperativeMatrix": 1})
        f12 = ffi.new("VkPhysicalDeviceVulkan12Features*", {
            "sType": vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
            "pNext": cm if info.coopmat_f16 else f11,
            "shaderFloat16": int(info.shader_float16), "vulkanMemoryModel": int(info.coopmat_f16)})
        exts = [e for e in ("VK_KHR_portability_subset",) if e in info.extensions]
        if info.coopmat_f16:
            exts.append("VK_KHR_cooperative_matrix")
        keep = [ffi.new("char[]", e.encode()) for e in exts]
        ext_p = ffi.new("char*[]", keep)
        dci = ffi.new("VkDeviceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, "pNext": f12,
                                              "queueCreateInfoCount": 1, "pQueueCreateInfos": qci,
                                              "enabledExtensionCount": len(exts), "ppEnabledExtensionNames": ext_p})
        out = ffi.new("VkDevice*")
        check("vkCreateDevice", lib.vkCreateDevice(pd, dci, ffi.NULL, out), info.name)
        self.device = out[0]
        q = ffi.new("VkQueue*")
        lib.vkGetDeviceQueue(self.device, self.queue_family, 0, q)
        self.queue = q[0]
        cpi = ffi.new("VkCommandPoolCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                                   "flags": vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                                   "queueFamilyIndex": self.queue_family})
        outp = ffi.new("VkCommandPool*")
        check("vkCreateCommandPool", lib.vkCreateCommandPool(self.device, cpi, ffi.NULL, outp))
        self.command_pool = outp[0]
        cai = ffi.new("VkCommandBufferAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                                       "commandPool": self.command_pool,
                                                       "level": vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                                       "commandBufferCount": 1})
        self._cmd_p = ffi.new("VkCommandBuffer[1]")
        check("vkAllocateCommandBuffers", lib.vkAllocateCommandBuffers(self.device, cai, self._cmd_p))
        self.cmd = self._cmd_p[0]
        fci = ffi.new("VkFenceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_FENCE_CREATE_INFO})
        self._fence_p = ffi.new("VkFence[1]")
        check("vkCreateFence", lib.vkCreateFence(self.device, fci, ffi.NULL, self._fence_p))
        self.fence = self._fence_p[0]
        self.query_pool = None
        if self.timestamp_bits:
            qpi = ffi.new("VkQueryPoolCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
                                                     "queryType": vk.VK_QUERY_TYPE_TIMESTAMP, "queryCount": 2})
            outq = ffi.new("VkQueryPool*")
            check("vkCreateQueryPool", lib.vkCreateQueryPool(self.device, qpi, ffi.NULL, outq))
            self.query_pool = outq[0]
        # Prebuilt structs for the per-call path.
        self._begin = ffi.new("VkCommandBufferBeginInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
            "flags": vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT})
        self._submit = ffi.new("VkSubmitInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO,
                                                 "commandBufferCount": 1, "pCommandBuffers": self._cmd_p})
        self._set_p = ffi.new("VkDescriptorSet[1]")
        self._ts = ffi.new("uint64_t[2]")
        self._barrier = ffi.new("VkMemoryBarrier*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER})

    def _init_memory(self):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        mem = ffi.new("VkPhysicalDeviceMemoryProperties*")
        lib.vkGetPhysicalDeviceMemoryProperties(self.physical, mem)
        self.memory_flags = [mem.memoryTypes[i].propertyFlags for i in range(mem.memoryTypeCount)]
        heaps = [mem.memoryHeaps[mem.memoryTypes[i].heapIndex].size for i in range(mem.memoryTypeCount)]
        local = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT
        hv = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        biggest_local = max((heaps[i] for i, f in enumerate(self.memory_flags) if f & local), default=0)
        # Device-local + host-visible counts only when it spans (most of) the device memory:
        # without resizable BAR it is a 256 MiB window that large tensors would exhaust.
        # AULE_VULKAN_STAGING=1 takes the discrete-GPU path (staging copies) on any device.
        self.force_staging = os.environ.get("AULE_VULKAN_STAGING", "") == "1"
        self.direct = not self.force_staging and any(
            (f & (local | hv)) == (local | hv) and heaps[i] >= 0.75 * biggest_local
            for i, f in enumerate(self.memory_flags))
        self.memory_route = ("device-local host-visible (mapped, no staging)" if self.direct
                             else "device-local + staging copies")
        budget = max(64 << 20, min(1 << 30, biggest_local // 8))
        self.pool = BufferPool(self, "device", budget)
        probe = Buffer(self, 256, "device")
        mapped, cached = probe.host_visible, probe.host_cached
        probe.destroy()
        # Reading uncached (write-combined) device memory from the CPU is very slow, so results
        # come back through a host-cached staging buffer unless the device memory itself is cached.
        self.upload_pool = None if mapped else BufferPool(self, "upload", min(256 << 20, budget))
        self.download_pool = None if (mapped and cached) else BufferPool(self, "download", min(256 << 20, budget))

    def pools(self):
        return [p for p in (self.pool, self.upload_pool, self.download_pool) if p is not None]

    def trim_pools(self):
        for p in self.pools():
            p.trim(0)

    def memory_type(self, bits: int, kind: str) -> int:
        vk = vkmod()
        local = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT
        hv = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        cached = vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT
        wants = {"device": [local | hv, local] if self.direct else [local, hv],
                 "upload": [hv],
                 "download": [hv | cached, hv]}[kind]
        for want in wants:
            for i, f in enumerate(self.memory_flags):
                if bits & (1 << i) and (f & want) == want:
                    return i
        raise VulkanError(f"no memory type fits (bits {bits:#x}, {kind})", call="vkAllocateMemory",
                          result="VK_ERROR_FEATURE_NOT_PRESENT")

    def _init_caches(self):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        self.set_layouts: dict = {}
        self.pipelines: dict = {}
        self._sets: "collections.OrderedDict" = collections.OrderedDict()
        self._sets_by_buffer: dict = collections.defaultdict(set)
        n = self.DESCRIPTOR_SETS
        size = ffi.new("VkDescriptorPoolSize*", {"type": vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                 "descriptorCount": n * 8})
        dpi = ffi.new("VkDescriptorPoolCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
            "flags": vk.VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT, "maxSets": n,
            "poolSizeCount": 1, "pPoolSizes": size})
        out = ffi.new("VkDescriptorPool*")
        check("vkCreateDescriptorPool", lib.vkCreateDescriptorPool(self.device, dpi, ffi.NULL, out))
        self.descriptor_pool = out[0]
        self._max_bindings = 8
        # Pipeline cache persisted per device and driver: pipeline creation is the slow part of a
        # first call on most drivers.
        uuid = bytes(self._cache_uuid())
        self.pipeline_cache_path = user_cache_dir() / f"pipelines-{uuid.hex()}.bin"
        data = b""
        if os.environ.get("AULE_VULKAN_PIPELINE_CACHE", "1") != "0":
            try:
                data = self.pipeline_cache_path.read_bytes()
            except OSError:
                pass
        self._cache_data = ffi.new("char[]", data) if data else ffi.NULL
        pci = ffi.new("VkPipelineCacheCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO,
                                                     "initialDataSize": len(data), "pInitialData": self._cache_data})
        outc = ffi.new("VkPipelineCache*")
        check("vkCreatePipelineCache", lib.vkCreatePipelineCache(self.device, pci, ffi.NULL, outc))
        self.pipeline_cache = outc[0]

    def _cache_uuid(self):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        props = ffi.new("VkPhysicalDeviceProperties*")
        lib.vkGetPhysicalDeviceProperties(self.physical, props)
        return ffi.buffer(props.pipelineCacheUUID, 16)[:]

    def _save_pipeline_cache(self):
        if os.environ.get("AULE_VULKAN_PIPELINE_CACHE", "1") == "0":
            return
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        n = ffi.new("size_t*")
        if lib.vkGetPipelineCacheData(self.device, self.pipeline_cache, n, ffi.NULL) != 0 or not n[0]:
            return
        buf = ffi.new("char[]", n[0])
        if lib.vkGetPipelineCacheData(self.device, self.pipeline_cache, n, buf) != 0:
            return
        try:
            _atomic_write(self.pipeline_cache_path, ffi.buffer(buf, n[0])[:])
        except OSError as exc:  # a read-only home must not break attention
            log.info("aule: cannot write the pipeline cache %s: %s", self.pipeline_cache_path, exc)

    # objects ----------------------------------------------------------------------------------
    def set_layout(self, n_bindings: int):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        with self.lock:
            if n_bindings not in self.set_layouts:
                if n_bindings > self._max_bindings:
                    raise ValueError(f"n_bindings={n_bindings} exceeds the runtime's {self._max_bindings}")
                b = ffi.new("VkDescriptorSetLayoutBinding[]", n_bindings)
                for i in range(n_bindings):
                    b[i].binding, b[i].descriptorType = i, vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
                    b[i].descriptorCount, b[i].stageFlags = 1, vk.VK_SHADER_STAGE_COMPUTE_BIT
                li = ffi.new("VkDescriptorSetLayoutCreateInfo*", {
                    "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                    "bindingCount": n_bindings, "pBindings": b})
                out = ffi.new("VkDescriptorSetLayout*")
                check("vkCreateDescriptorSetLayout", lib.vkCreateDescriptorSetLayout(self.device, li, ffi.NULL, out))
                self.set_layouts[n_bindings] = out[0]
            return self.set_layouts[n_bindings]

    def pipeline(self, name: str, code_loader, n_bindings: int, push_size: int, spec: tuple) -> Pipeline:
        """The cached pipeline for (name, specialization); ``code_loader()`` gives the SPIR-V bytes."""
        key = (name, n_bindings, push_size, spec)
        p = self.pipelines.get(key)
        if p is not None:
            return p
        with self.lock:
            p = self.pipelines.get(key)
            if p is None:
                if push_size > self.info.max_push_constants:
                    raise VulkanError(f"{name}: push constants of {push_size} bytes exceed the device's "
                                      f"{self.info.max_push_constants}", call="vkCreatePipelineLayout",
                                      result="VK_ERROR_FEATURE_NOT_PRESENT")
                p = Pipeline(self, name, code_loader(), n_bindings, push_size, spec)
                self.pipelines[key] = p
                self._save_pipeline_cache()
            return p

    def _descriptor_set(self, pipeline: Pipeline, bindings: tuple):
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        key = (pipeline.n_bindings,) + tuple((b._id, off, rng) for b, off, rng in bindings)
        ds = self._sets.get(key)
        if ds is not None:
            self._sets.move_to_end(key)
            return ds
        if len(self._sets) >= self.DESCRIPTOR_SETS:
            old_key, old = self._sets.popitem(last=False)
            self._free_set(old_key, old)
        ai = ffi.new("VkDescriptorSetAllocateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, "descriptorPool": self.descriptor_pool,
            "descriptorSetCount": 1, "pSetLayouts": ffi.new("VkDescriptorSetLayout[1]", [pipeline.set_layout])})
        out = ffi.new("VkDescriptorSet[1]")
        check("vkAllocateDescriptorSets", lib.vkAllocateDescriptorSets(self.device, ai, out))
        ds = out[0]
        n = len(bindings)
        infos = ffi.new("VkDescriptorBufferInfo[]", n)
        writes = ffi.new("VkWriteDescriptorSet[]", n)
        for i, (b, off, rng) in enumerate(bindings):
            infos[i].buffer, infos[i].offset, infos[i].range = b.handle, off, rng
            w = writes[i]
            w.sType, w.dstSet, w.dstBinding, w.descriptorCount = vk.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, ds, i, 1
            w.descriptorType, w.pBufferInfo = vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, infos + i
        lib.vkUpdateDescriptorSets(self.device, n, writes, 0, ffi.NULL)
        self._sets[key] = ds
        for b, _, _ in bindings:
            self._sets_by_buffer[b._id].add(key)
        return ds

    def _free_set(self, key, ds):
        vk = vkmod()
        self._set_p[0] = ds
        vk.lib.vkFreeDescriptorSets(self.device, self.descriptor_pool, 1, self._set_p)
        for part in key[1:]:
            keys = self._sets_by_buffer.get(part[0])
            if keys is not None:
                keys.discard(key)

    def _forget_buffer(self, buf: Buffer) -> None:
        """A destroyed buffer's descriptor sets must never be bound again."""
        if getattr(self, "_destroyed", True):
            return
        with self.lock:
            for key in self._sets_by_buffer.pop(buf._id, ()):
                ds = self._sets.pop(key, None)
                if ds is not None:
                    self._free_set(key, ds)

    # execution --------------------------------------------------------------------------------
    def run(self, dispatches, uploads=(), downloads=(), timestamps: bool = False):
        """Record uploads (staging -> device copies), dispatches and downloads into one command
        buffer, submit, wait. Returns GPU nanoseconds between the first and last dispatch when
        ``timestamps`` and the queue supports them, else ``None``.

        ``uploads``/``downloads``: ``(src_buffer, dst_buffer, nbytes)`` copies.
        """
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        with self.lock:
            cmd = self.cmd
            check("vkResetCommandBuffer", lib.vkResetCommandBuffer(cmd, 0))
            check("vkBeginCommandBuffer", lib.vkBeginCommandBuffer(cmd, self._begin))
            for src, dst, n in uploads:
                self._copy(cmd, src, dst, n)
            if uploads:
                self._memory_barrier(cmd, vk.VK_ACCESS_TRANSFER_WRITE_BIT, vk.VK_ACCESS_SHADER_READ_BIT,
                                     vk.VK_PIPELINE_STAGE_TRANSFER_BIT, vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT)
            timed = timestamps and self.query_pool is not None
            if timed:
                lib.vkCmdResetQueryPool(cmd, self.query_pool, 0, 2)
                lib.vkCmdWriteTimestamp(cmd, vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, self.query_pool, 0)
            bound = None
            for d in dispatches:
                p = d.pipeline
                if p is not bound:
                    lib.vkCmdBindPipeline(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, p.handle)
                    bound = p
                self._set_p[0] = self._descriptor_set(p, d.bindings)
                lib.vkCmdBindDescriptorSets(cmd, vk.VK_PIPELINE_BIND_POINT_COMPUTE, p.layout, 0, 1,
                                            self._set_p, 0, ffi.NULL)
                if d.push:
                    lib.vkCmdPushConstants(cmd, p.layout, vk.VK_SHADER_STAGE_COMPUTE_BIT, 0, len(d.push),
                                           ffi.from_buffer(d.push))
                lib.vkCmdDispatch(cmd, *d.groups)
            if timed:
                lib.vkCmdWriteTimestamp(cmd, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT, self.query_pool, 1)
            if downloads:
                self._memory_barrier(cmd, vk.VK_ACCESS_SHADER_WRITE_BIT, vk.VK_ACCESS_TRANSFER_READ_BIT,
                                     vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, vk.VK_PIPELINE_STAGE_TRANSFER_BIT)
                for src, dst, n in downloads:
                    self._copy(cmd, src, dst, n)
            if downloads or dispatches:
                # Make device writes visible to the host through the mapped pointer.
                self._memory_barrier(cmd, vk.VK_ACCESS_SHADER_WRITE_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT,
                                     vk.VK_ACCESS_HOST_READ_BIT,
                                     vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | vk.VK_PIPELINE_STAGE_TRANSFER_BIT,
                                     vk.VK_PIPELINE_STAGE_HOST_BIT)
            check("vkEndCommandBuffer", lib.vkEndCommandBuffer(cmd))
            check("vkQueueSubmit", lib.vkQueueSubmit(self.queue, 1, self._submit, self.fence))
            try:
                self._wait()
            finally:
                lib.vkResetFences(self.device, 1, self._fence_p)
            if not timed:
                return None
            check("vkGetQueryPoolResults", lib.vkGetQueryPoolResults(
                self.device, self.query_pool, 0, 2, 16, self._ts, 8,
                vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT))
            mask = (1 << self.timestamp_bits) - 1 if self.timestamp_bits < 64 else 2**64 - 1
            ticks = ((self._ts[1] & mask) - (self._ts[0] & mask)) & mask
            return ticks * self.info.timestamp_period

    # Small dispatches finish in microseconds, while a blocking fence wait can sleep far longer
    # before the driver wakes the thread: poll briefly first, then block. Not on a CPU device,
    # where the polling thread would take a core from the driver's workers.
    SPIN_SECONDS = 0.0005

    def _wait(self):
        vk = vkmod()
        lib = vk.lib
        deadline = time.perf_counter() + (0.0 if self.info.is_cpu else self.SPIN_SECONDS)
        while time.perf_counter() < deadline:
            r = lib.vkGetFenceStatus(self.device, self.fence)
            if r == 0:
                return
            if r != vk.VK_NOT_READY:
                check("vkGetFenceStatus", r)
        check("vkWaitForFences", lib.vkWaitForFences(self.device, 1, self._fence_p, 1, 2**64 - 1))

    def _copy(self, cmd, src: Buffer, dst: Buffer, n: int):
        vk = vkmod()
        region = vk.ffi.new("VkBufferCopy*", {"srcOffset": 0, "dstOffset": 0, "size": n})
        vk.lib.vkCmdCopyBuffer(cmd, src.handle, dst.handle, 1, region)

    def _memory_barrier(self, cmd, src_access, dst_access, src_stage, dst_stage):
        vk = vkmod()
        b = self._barrier
        b.srcAccessMask, b.dstAccessMask = src_access, dst_access
        vk.lib.vkCmdPipelineBarrier(cmd, src_stage, dst_stage, 0, 1, b, 0, vk.ffi.NULL, 0, vk.ffi.NULL)

    # host <-> device -------------------------------------------------------------------------
    def upload(self, array: np.ndarray, lease: Lease | None = None) -> Lease:
        """A pooled device buffer (or ``lease``) holding ``array``'s bytes: one memcpy, plus a GPU
        copy when device memory is not mapped."""
        src = np.ascontiguousarray(array)
        raw = src.reshape(-1).view(np.uint8)
        if lease is None:
            lease = self.pool.acquire(raw.nbytes)
        buf = lease.buffer
        if buf.host_visible:
            buf.view[:raw.nbytes] = raw
        elif raw.nbytes:
            stage = self.upload_pool.acquire(raw.nbytes)
            try:
                stage.buffer.view[:raw.nbytes] = raw
                self.run((), uploads=((stage.buffer, buf, raw.nbytes),))
            finally:
                stage.release()
        return lease

    def download(self, buf: Buffer, out: np.ndarray) -> np.ndarray:
        """Copy ``out.nbytes`` from the start of ``buf`` into the C-contiguous array ``out``."""
        raw = out.reshape(-1).view(np.uint8)
        if buf.host_visible and self.download_pool is None:
            raw[:] = buf.view[:raw.nbytes]
        elif raw.nbytes:
            stage = self.download_pool.acquire(raw.nbytes)
            try:
                self.run((), downloads=((buf, stage.buffer, raw.nbytes),))
                raw[:] = stage.buffer.view[:raw.nbytes]
            finally:
                stage.release()
        return out

    def take_validation_messages(self) -> list[str]:
        msgs = list(self.validation_messages)
        self.validation_messages.clear()
        return msgs

    def details(self) -> dict:
        return {
            "device": self.info.summary(),
            "devices": [d.summary() for _, d in self.devices],
            "route": self.route,
            "memory": self.memory_route,
            "validation": self.validation_active,
            "pipeline_cache": str(self.pipeline_cache_path),
        }

    def close(self):
        """Destroy everything (tests use it; the process-wide context lives until exit)."""
        vk = vkmod()
        ffi, lib = vk.ffi, vk.lib
        with self.lock:
            if self._destroyed:
                return
            lib.vkDeviceWaitIdle(self.device)
            self.trim_pools()
            self._destroyed = True
            for p in self.pipelines.values():
                p.destroy()
            for l in self.set_layouts.values():
                lib.vkDestroyDescriptorSetLayout(self.device, l, ffi.NULL)
            lib.vkDestroyDescriptorPool(self.device, self.descriptor_pool, ffi.NULL)
            lib.vkDestroyPipelineCache(self.device, self.pipeline_cache, ffi.NULL)
            if self.query_pool is not None:
                lib.vkDestroyQueryPool(self.device, self.query_pool, ffi.NULL)
            lib.vkDestroyFence(self.device, self.fence, ffi.NULL)
            lib.vkDestroyCommandPool(self.device, self.command_pool, ffi.NULL)
            lib.vkDestroyDevice(self.device, ffi.NULL)
            self._destroy_instance(self.instance, self.messenger)


_context: Context | None = None
_context_error: Exception | None = None
_context_lock = threading.Lock()


def context() -> Context:
    """The process-wide context, created on first use. A failure is remembered and re-raised."""
    global _context, _context_error
    if _context is not None:
        return _context
    with _context_lock:
        if _context is None:
            if _context_error is not None:
                raise _context_error
            try:
                _context = Context()
            except Exception as exc:
                _context_error = exc
                raise
        return _context

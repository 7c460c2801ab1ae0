"""Instance, physical-device facts, device choice, logical device and compute queue.

The instance is made with the loader's default driver search; on a headless NVIDIA server that
search finds no GPU (NVIDIA's GLX-based entry point refuses without a display), so one retry goes
through an ICD manifest naming NVIDIA's EGL library before giving up.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ADVICE, VulkanError, binding, check, create, cstr, error, listed
from .files import atomic_write, user_cache_dir

log = logging.getLogger("aule")

DEVICE_TYPES = {0: "other", 1: "integrated-gpu", 2: "discrete-gpu", 3: "virtual-gpu", 4: "cpu"}
# Lower is preferred: a real GPU before a virtual one before a CPU rasteriser.
_TYPE_RANK = {"discrete-gpu": 0, "integrated-gpu": 1, "virtual-gpu": 2, "other": 3, "cpu": 4}
VENDORS = {0x1002: "AMD", 0x10DE: "NVIDIA", 0x8086: "Intel", 0x106B: "Apple", 0x13B5: "ARM",
           0x5143: "Qualcomm", 0x10005: "Mesa"}
NVIDIA_EGL = "libEGL_nvidia.so.0"


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
    coopmat_f16: bool             # an fp16 x fp16 + fp32 subgroup matrix shape, and the memory model
    timestamp_period: float
    device_local_bytes: int
    extensions: frozenset = field(repr=False, default=frozenset())
    # lavapipe (llvmpipe) ends an invocation after this many loop iterations, all loops together.
    loop_limit: int | None = None
    # Float widths whose signed zeros, Infs and NaNs a shader can ask the driver to keep
    # (shaderSignedZeroInfNanPreserveFloat16/32): the numeric rule's NaN and Inf rows rely on it.
    preserve_inf_nan: tuple = ()
    # (M, N, K) of each fp16 x fp16 + fp32 subgroup cooperative-matrix shape the device lists.
    coopmat_shapes: tuple = ()
    # What a KV cache split across buffers needs (plans.cache_split): arrays of storage buffers
    # indexed by a dynamically uniform value (shaderStorageBufferArrayDynamicIndexing), and room for
    # their descriptors in one stage (maxPerStageDescriptorStorageBuffers). Defaults: a desktop GPU's.
    storage_array_indexing: bool = True
    max_stage_storage_buffers: int = 1 << 20

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
            "coopmat_shapes": ["x".join(map(str, s)) for s in self.coopmat_shapes],
            "preserve_inf_nan": list(self.preserve_inf_nan),
            "max_storage_buffer_range": self.max_storage_buffer_range,
            "device_local_mib": self.device_local_bytes >> 20,
        }


def _version_str(v: int) -> str:
    return f"{v >> 22}.{(v >> 12) & 0x3FF}.{v & 0xFFF}"


def instance_function(instance, name: str, signature: str | None = None):
    """An instance-level extension entry point, or None where the loader lacks it."""
    _, ffi, lib = binding()
    fn = lib.vkGetInstanceProcAddr(instance, name.encode())
    return None if fn == ffi.NULL else ffi.cast(signature or f"PFN_{name}", fn)


def _coopmat_shapes(instance, pd, exts) -> tuple:
    """The (M, N, K) shapes of the device's fp16 A/B, fp32 C/result subgroup-scope cooperative
    matrices, as vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR lists them (sorted)."""
    if "VK_KHR_cooperative_matrix" not in exts:
        return ()
    vk, ffi, _ = binding()
    get = instance_function(instance, "vkGetPhysicalDeviceCooperativeMatrixPropertiesKHR")
    if get is None:
        return ()
    n = ffi.new("uint32_t*")
    if get(pd, n, ffi.NULL) != 0 or not n[0]:
        return ()
    props = ffi.new("VkCooperativeMatrixPropertiesKHR[]", n[0])
    for i in range(n[0]):
        props[i].sType = vk.VK_STRUCTURE_TYPE_COOPERATIVE_MATRIX_PROPERTIES_KHR
    if get(pd, n, props) != 0:
        return ()
    f16, f32 = vk.VK_COMPONENT_TYPE_FLOAT16_KHR, vk.VK_COMPONENT_TYPE_FLOAT32_KHR
    return tuple(sorted({(p.MSize, p.NSize, p.KSize) for p in props
                         if p.AType == f16 and p.BType == f16 and p.CType == f32 and p.ResultType == f32
                         and p.scope == vk.VK_SCOPE_SUBGROUP_KHR}))


def _chain(ffi, ctype: str, stype: int, nxt=None, **fields):
    """A struct of a ``pNext`` chain (``sType`` set, linked to ``nxt``)."""
    return ffi.new(f"{ctype}*", dict(fields, sType=stype, pNext=nxt if nxt is not None else ffi.NULL))


def read_device(instance, pd, index: int):
    """``(DeviceInfo, apiVersion)`` for one physical device of ``instance``."""
    vk, ffi, lib = binding()
    v12p = _chain(ffi, "VkPhysicalDeviceVulkan12Properties", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_PROPERTIES)
    v11p = _chain(ffi, "VkPhysicalDeviceVulkan11Properties", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_PROPERTIES,
                  v12p)
    drvp = _chain(ffi, "VkPhysicalDeviceDriverProperties", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_DRIVER_PROPERTIES, v11p)
    props2 = _chain(ffi, "VkPhysicalDeviceProperties2", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, drvp)
    lib.vkGetPhysicalDeviceProperties2(pd, props2)
    p = props2.properties
    f11 = _chain(ffi, "VkPhysicalDeviceVulkan11Features", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES)
    f12 = _chain(ffi, "VkPhysicalDeviceVulkan12Features", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES, f11)
    feats2 = _chain(ffi, "VkPhysicalDeviceFeatures2", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, f12)
    if p.apiVersion >= vk.VK_MAKE_VERSION(1, 2, 0):
        lib.vkGetPhysicalDeviceFeatures2(pd, feats2)
    exts = frozenset(cstr(e.extensionName) for e in listed(
        "vkEnumerateDeviceExtensionProperties", "VkExtensionProperties", pd, ffi.NULL))
    mem = ffi.new("VkPhysicalDeviceMemoryProperties*")
    lib.vkGetPhysicalDeviceMemoryProperties(pd, mem)
    local = max((mem.memoryHeaps[i].size for i in range(mem.memoryHeapCount)
                 if mem.memoryHeaps[i].flags & vk.VK_MEMORY_HEAP_DEVICE_LOCAL_BIT), default=0)
    lim = p.limits
    name = cstr(p.deviceName)
    shapes = _coopmat_shapes(instance, pd, exts)
    return DeviceInfo(
        index=index, name=name, type=DEVICE_TYPES.get(p.deviceType, "other"),
        vendor=VENDORS.get(p.vendorID, hex(p.vendorID)), vendor_id=p.vendorID,
        driver=f"{cstr(drvp.driverName)} {cstr(drvp.driverInfo)}".strip(),
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
        coopmat_f16=bool(f12.vulkanMemoryModel) and bool(shapes),
        timestamp_period=lim.timestampPeriod,
        device_local_bytes=local,
        extensions=exts,
        loop_limit=65535 if "llvmpipe" in name.lower() else None,
        preserve_inf_nan=tuple(w for w, ok in ((16, v12p.shaderSignedZeroInfNanPreserveFloat16),
                                              (32, v12p.shaderSignedZeroInfNanPreserveFloat32)) if ok),
        coopmat_shapes=shapes,
        storage_array_indexing=bool(feats2.features.shaderStorageBufferArrayDynamicIndexing),
        max_stage_storage_buffers=lim.maxPerStageDescriptorStorageBuffers,
    ), p.apiVersion


# --- instance --------------------------------------------------------------------------------------

class Instance:
    """A VkInstance, its debug messenger when validating, and its Vulkan 1.2 devices.

    Validation messages are appended to ``messages`` (the list the caller passed in), so one list
    collects them across the EGL retry's second instance too.
    """

    def __init__(self, validation: bool, messages: list):
        vk, ffi, lib = binding()
        self.messages = messages
        self.messenger = None
        self.validation_active = False
        self._main = ffi.new("char[]", b"main")
        exts_avail = {cstr(e.extensionName) for e in listed(
            "vkEnumerateInstanceExtensionProperties", "VkExtensionProperties", ffi.NULL)}
        layers_avail = {cstr(l.layerName) for l in listed("vkEnumerateInstanceLayerProperties", "VkLayerProperties")}
        exts, layers, flags = [], [], 0
        if "VK_KHR_portability_enumeration" in exts_avail:  # MoltenVK lists itself only with this
            exts.append("VK_KHR_portability_enumeration")
            flags |= vk.VK_INSTANCE_CREATE_ENUMERATE_PORTABILITY_BIT_KHR
        want_debug = validation and "VK_EXT_debug_utils" in exts_avail
        if validation:
            if "VK_LAYER_KHRONOS_validation" not in layers_avail:
                raise error("vkCreateInstance", "VK_ERROR_LAYER_NOT_PRESENT",
                            "AULE_VALIDATION=1 but VK_LAYER_KHRONOS_validation is not installed: "
                            + ADVICE["VK_ERROR_LAYER_NOT_PRESENT"])
            layers.append("VK_LAYER_KHRONOS_validation")
        if want_debug:
            exts.append("VK_EXT_debug_utils")
        keep = [ffi.new("char[]", s.encode()) for s in exts + layers]
        ext_p = ffi.new("char*[]", keep[:len(exts)])
        lay_p = ffi.new("char*[]", keep[len(exts):])
        app = ffi.new("VkApplicationInfo*", {"sType": vk.VK_STRUCTURE_TYPE_APPLICATION_INFO,
                                             "pApplicationName": self._main, "pEngineName": self._main,
                                             "apiVersion": vk.VK_MAKE_VERSION(1, 2, 0)})
        # The messenger's create info also rides on the instance's pNext, so that messages from
        # vkCreateInstance itself are caught.
        dbg = self._debug_info() if want_debug else ffi.NULL
        ci = ffi.new("VkInstanceCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO, "pNext": dbg, "flags": flags,
            "pApplicationInfo": app, "enabledLayerCount": len(layers), "ppEnabledLayerNames": lay_p,
            "enabledExtensionCount": len(exts), "ppEnabledExtensionNames": ext_p})
        self.handle = create("vkCreateInstance", "VkInstance", ci)
        try:
            if want_debug:
                make_messenger = instance_function(self.handle, "vkCreateDebugUtilsMessengerEXT")
                if make_messenger is not None:
                    outm = ffi.new("VkDebugUtilsMessengerEXT*")
                    check("vkCreateDebugUtilsMessengerEXT", make_messenger(self.handle, dbg, ffi.NULL, outm))
                    self.messenger = outm[0]
                    self.validation_active = True
            self.devices = []
            for i, pd in enumerate(listed("vkEnumeratePhysicalDevices", "VkPhysicalDevice", self.handle)):
                info, api = read_device(self.handle, pd, i)
                if api >= vk.VK_MAKE_VERSION(1, 2, 0):
                    self.devices.append((pd, info))
        except BaseException:
            self.destroy()
            raise

    def _debug_info(self):
        vk, ffi, _ = binding()
        messages = self.messages

        def on_message(severity, types, data, user):
            msg = cstr(data.pMessage) if data != ffi.NULL and data.pMessage != ffi.NULL else "?"
            messages.append(msg)
            log.warning("aule: Vulkan validation: %s", msg)
            return 0

        self._callback = ffi.callback("PFN_vkDebugUtilsMessengerCallbackEXT", on_message)
        self._dbg_info = ffi.new("VkDebugUtilsMessengerCreateInfoEXT*", {
            "sType": vk.VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
            "messageSeverity": vk.VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT
            | vk.VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
            "messageType": vk.VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT
            | vk.VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT
            | vk.VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
            "pfnUserCallback": self._callback})
        return self._dbg_info

    @property
    def has_gpu(self) -> bool:
        return any(not d.is_cpu for _, d in self.devices)

    def destroy(self) -> None:
        _, ffi, lib = binding()
        if self.messenger is not None:
            destroy = instance_function(self.handle, "vkDestroyDebugUtilsMessengerEXT")
            if destroy is not None:
                destroy(self.handle, self.messenger, ffi.NULL)
            self.messenger = None
        lib.vkDestroyInstance(self.handle, ffi.NULL)


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
                atomic_write(path, data)
            return path
        except OSError:  # a read-only home: the temp folder will do
            continue
    raise OSError("cannot write an ICD manifest for NVIDIA's EGL driver in the cache or temp folder")


_LOADER_VARS = ("VK_ICD_FILENAMES", "VK_DRIVER_FILES")


def _egl_manifest(egl_retry: bool) -> Path | None:
    """The manifest to retry with, or None where the retry must not or cannot happen."""
    if any(os.environ.get(k) for k in _LOADER_VARS) or not egl_retry or not _nvidia_egl_loadable():
        return None  # a user-chosen driver is respected as it is
    try:
        return _write_egl_icd()
    except OSError as exc:
        log.info("aule: NVIDIA EGL retry skipped: %s", exc)
        return None


def open_instance(validation: bool, egl_retry: bool, messages: list) -> tuple[Instance, str]:
    """``(instance, route)``: the default loader search, and the NVIDIA EGL retry when that found
    no GPU-type device. The loader reads VK_DRIVER_FILES/VK_ICD_FILENAMES at vkCreateInstance, so
    setting them just before the retry is enough; they are put back if it finds nothing."""
    first_error, inst = None, None
    try:
        inst = Instance(validation, messages)
    except VulkanError as exc:  # kept to re-raise if the retry does no better
        first_error = exc
    if inst is not None and inst.has_gpu:
        return inst, "default loader search"
    icd = _egl_manifest(egl_retry)
    if icd is not None:
        saved = {k: os.environ.get(k) for k in _LOADER_VARS}
        for k in _LOADER_VARS:
            os.environ[k] = str(icd)
        try:
            retry = Instance(validation, messages)
        except VulkanError as exc:
            log.info("aule: NVIDIA EGL retry failed: %s", exc)
            retry = None
        if retry is not None and retry.has_gpu:
            if inst is not None:
                inst.destroy()
            return retry, f"NVIDIA EGL ICD retry ({icd})"
        if retry is not None:
            retry.destroy()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    if inst is None:
        raise first_error
    if not inst.devices:
        inst.destroy()
        raise error("vkEnumeratePhysicalDevices", "VK_ERROR_INCOMPATIBLE_DRIVER",
                    "vkEnumeratePhysicalDevices found no Vulkan 1.2 device: " + ADVICE["VK_ERROR_INCOMPATIBLE_DRIVER"])
    return inst, "default loader search"


def choose_device(devices: list, want: str):
    """``(physical device, DeviceInfo)``: ``want`` (AULE_VULKAN_DEVICE) is an index or part of a
    name; empty picks the best GPU, the largest first among equals."""
    if want:
        if want.isdigit():
            hits = [d for d in devices if d[1].index == int(want)]
        else:
            hits = [d for d in devices if want.lower() in d[1].name.lower()]
        if not hits:
            raise error("vkEnumeratePhysicalDevices", "VK_ERROR_INITIALIZATION_FAILED",
                        f"AULE_VULKAN_DEVICE={want!r} matches no device; devices: "
                        + ", ".join(f"{d.index}: {d.name}" for _, d in devices))
        return hits[0]
    return min(devices, key=lambda d: (_TYPE_RANK[d[1].type], -d[1].device_local_bytes, d[1].index))


def create_device(pd, info: DeviceInfo):
    """``(device, queue, queue family, timestamp bits)`` with the features the shaders use."""
    vk, ffi, lib = binding()
    count = ffi.new("uint32_t*")
    lib.vkGetPhysicalDeviceQueueFamilyProperties(pd, count, ffi.NULL)
    fams = ffi.new("VkQueueFamilyProperties[]", count[0])
    lib.vkGetPhysicalDeviceQueueFamilyProperties(pd, count, fams)
    compute = [i for i in range(count[0]) if fams[i].queueFlags & vk.VK_QUEUE_COMPUTE_BIT]
    if not compute:
        raise error("vkGetPhysicalDeviceQueueFamilyProperties", "VK_ERROR_FEATURE_NOT_PRESENT",
                    f"{info.name} has no compute queue")
    # A family with timestamps first, so GPU times are available.
    family = min(compute, key=lambda i: (fams[i].timestampValidBits == 0, i))
    prio = ffi.new("float[1]", [1.0])
    qci = ffi.new("VkDeviceQueueCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                               "queueFamilyIndex": family, "queueCount": 1,
                                               "pQueuePriorities": prio})
    f11 = _chain(ffi, "VkPhysicalDeviceVulkan11Features", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_1_FEATURES,
                 storageBuffer16BitAccess=int(info.storage_buffer_16bit))
    cm = _chain(ffi, "VkPhysicalDeviceCooperativeMatrixFeaturesKHR",
                vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_COOPERATIVE_MATRIX_FEATURES_KHR, f11, cooperativeMatrix=1)
    f12 = _chain(ffi, "VkPhysicalDeviceVulkan12Features", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
                 cm if info.coopmat_f16 else f11,
                 shaderFloat16=int(info.shader_float16), vulkanMemoryModel=int(info.coopmat_f16))
    # Split KV caches index their array of buffers (paged.comp, copy_kv_to_paged.comp with AULE_SPLIT).
    core = _chain(ffi, "VkPhysicalDeviceFeatures2", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, f12)
    core.features.shaderStorageBufferArrayDynamicIndexing = int(info.storage_array_indexing)
    # VK_EXT_external_memory_host lets transfers DMA straight from and to host arrays (memory.py).
    exts = [e for e in ("VK_KHR_portability_subset", "VK_EXT_external_memory_host") if e in info.extensions]
    if info.coopmat_f16:
        exts.append("VK_KHR_cooperative_matrix")
    keep = [ffi.new("char[]", e.encode()) for e in exts]
    ext_p = ffi.new("char*[]", keep)
    dci = ffi.new("VkDeviceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO, "pNext": core,
                                          "queueCreateInfoCount": 1, "pQueueCreateInfos": qci,
                                          "enabledExtensionCount": len(exts), "ppEnabledExtensionNames": ext_p})
    device = create("vkCreateDevice", "VkDevice", pd, dci, detail=info.name)
    q = ffi.new("VkQueue*")
    lib.vkGetDeviceQueue(device, family, 0, q)
    return device, q[0], family, fams[family].timestampValidBits

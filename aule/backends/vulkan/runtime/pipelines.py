"""Compute pipelines, descriptor-set layouts and sets, and the persisted pipeline cache."""
from __future__ import annotations

import collections
import logging

import numpy as np

from .... import settings
from .errors import VulkanError, binding, call, create, error
from .files import atomic_write, user_cache_dir

log = logging.getLogger("aule")

MAX_BINDINGS = 8
# Descriptors one set may hold: a binding can be an array of storage buffers (a KV cache split across
# buffers, plans.cache_split), so a set holds more descriptors than bindings. Descriptor pools are
# sized for sets this full.
MAX_DESCRIPTORS = 66


def descriptor_counts(n_bindings) -> tuple:
    """The descriptors of each binding of a layout: ``n_bindings`` is a count of single storage
    buffers, or a tuple of per-binding array lengths (1 for a single buffer)."""
    counts = (1,) * n_bindings if isinstance(n_bindings, int) else tuple(int(c) for c in n_bindings)
    if len(counts) > MAX_BINDINGS or sum(counts) > MAX_DESCRIPTORS or min(counts, default=1) < 1:
        raise ValueError(f"a layout of bindings {counts} exceeds the runtime's {MAX_BINDINGS} bindings and "
                         f"{MAX_DESCRIPTORS} descriptors (each binding holds at least one)")
    return counts


class Pipeline:
    """A compute pipeline: module + descriptor-set layout + push range. ``n_bindings``: how many
    storage buffers, or per binding how many (:func:`descriptor_counts`); a dispatch's bindings
    then name each descriptor in order, an array's elements one after the other."""

    def __init__(self, ctx, name: str, code: bytes, n_bindings: int, push_size: int, spec: tuple):
        vk, ffi, _ = binding()
        self.ctx, self.name, self.n_bindings, self.push_size, self.spec = ctx, name, n_bindings, push_size, spec
        self.counts = descriptor_counts(n_bindings)
        self.module = self.layout = self.handle = None
        if len(code) % 4:
            raise error("vkCreateShaderModule", "VK_ERROR_INVALID_SHADER_NV",
                        f"SPIR-V module {name} is {len(code)} bytes, not a multiple of 4")
        self._code = ffi.new("char[]", code)
        mi = ffi.new("VkShaderModuleCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                                   "codeSize": len(code),
                                                   "pCode": ffi.cast("uint32_t*", self._code)})
        self.module = create("vkCreateShaderModule", "VkShaderModule", ctx.device, mi, detail=name)
        try:
            self._create(ctx, vk, ffi)
        except BaseException:
            self.destroy()
            raise

    def _create(self, ctx, vk, ffi):
        self.set_layout = ctx.set_layout(self.n_bindings)
        push_size, spec = self.push_size, self.spec
        pcr = ffi.new("VkPushConstantRange*", {"stageFlags": vk.VK_SHADER_STAGE_COMPUTE_BIT,
                                               "offset": 0, "size": push_size})
        sl = ffi.new("VkDescriptorSetLayout[1]", [self.set_layout])
        li = ffi.new("VkPipelineLayoutCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO, "setLayoutCount": 1,
            "pSetLayouts": sl, "pushConstantRangeCount": 1 if push_size else 0,
            "pPushConstantRanges": pcr if push_size else ffi.NULL})
        self.layout = create("vkCreatePipelineLayout", "VkPipelineLayout", ctx.device, li)
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
        self.handle = create("vkCreateComputePipelines", "VkPipeline", ctx.device, ctx.pipeline_cache, 1, ci, detail=self.name)

    def destroy(self):
        _, ffi, lib = binding()
        device = self.ctx.device
        if self.handle is not None:
            lib.vkDestroyPipeline(device, self.handle, ffi.NULL)
        if self.layout is not None:
            lib.vkDestroyPipelineLayout(device, self.layout, ffi.NULL)
        if self.module is not None:
            lib.vkDestroyShaderModule(device, self.module, ffi.NULL)
        self.handle = self.layout = self.module = None


def _descriptor_pool(device, sets: int, free_sets: bool):
    vk, ffi, _ = binding()
    size = ffi.new("VkDescriptorPoolSize*", {"type": vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                             "descriptorCount": sets * MAX_DESCRIPTORS})
    dpi = ffi.new("VkDescriptorPoolCreateInfo*", {
        "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
        "flags": vk.VK_DESCRIPTOR_POOL_CREATE_FREE_DESCRIPTOR_SET_BIT if free_sets else 0, "maxSets": sets,
        "poolSizeCount": 1, "pPoolSizes": size})
    return create("vkCreateDescriptorPool", "VkDescriptorPool", device, dpi)


def _allocate_set(device, pool, pipeline, bindings):
    """A descriptor set from ``pool`` for ``pipeline``'s layout naming ``bindings`` ((buffer,
    offset, range) per descriptor in order: one write per binding, an array's in one)."""
    vk, ffi, lib = binding()
    ai = ffi.new("VkDescriptorSetAllocateInfo*", {
        "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO, "descriptorPool": pool,
        "descriptorSetCount": 1, "pSetLayouts": ffi.new("VkDescriptorSetLayout[1]", [pipeline.set_layout])})
    out = ffi.new("VkDescriptorSet[1]")
    call("vkAllocateDescriptorSets", device, ai, out)
    ds = out[0]
    counts = pipeline.counts
    if len(bindings) != sum(counts):
        raise ValueError(f"{pipeline.name} takes {sum(counts)} descriptors (bindings {counts}), "
                         f"{len(bindings)} were given")
    infos = ffi.new("VkDescriptorBufferInfo[]", len(bindings))
    for i, (b, off, rng) in enumerate(bindings):
        infos[i].buffer, infos[i].offset, infos[i].range = b.handle, off, rng
    writes = ffi.new("VkWriteDescriptorSet[]", len(counts))
    first = 0
    for i, n in enumerate(counts):
        w = writes[i]
        w.sType, w.dstSet, w.dstBinding, w.descriptorCount = vk.VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET, ds, i, n
        w.descriptorType, w.pBufferInfo = vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER, infos + first
        first += n
    lib.vkUpdateDescriptorSets(device, len(counts), writes, 0, ffi.NULL)
    return ds


class DescriptorCache:
    """Set layouts per binding count, and descriptor sets cached per (pipeline layout, bound
    ranges): a repeated call binds the same set without writing descriptors. Least recently
    used sets are freed past ``capacity``; a destroyed buffer's sets are freed at once.

    A set bound in the recording under way is never freed (its command buffer would be invalid):
    a recording that binds more distinct sets than ``capacity`` (a packed varlen call of many
    sequences) takes the rest from an overflow arena, cleared when the next recording begins."""

    def __init__(self, device, capacity: int, lock):
        self.device, self.capacity, self.lock = device, capacity, lock
        self.layouts: dict = {}
        # key -> (set, recording it was last bound in)
        self._sets: "collections.OrderedDict" = collections.OrderedDict()
        self._by_buffer: dict = collections.defaultdict(set)
        self.pool = _descriptor_pool(device, capacity, free_sets=True)
        self._set_p = binding()[1].new("VkDescriptorSet[1]")
        self._recording = 0
        self._overflow: DescriptorArena | None = None

    def begin(self) -> None:
        """A new recording starts, the last one's submission finished: its sets may be freed again."""
        self._recording += 1
        if self._overflow is not None:
            self._overflow.clear()

    def layout(self, n_bindings):
        """The set layout of ``n_bindings`` storage buffers, or of per-binding array lengths
        (:func:`descriptor_counts`)."""
        vk, ffi, _ = binding()
        counts = descriptor_counts(n_bindings)
        with self.lock:
            if counts not in self.layouts:
                b = ffi.new("VkDescriptorSetLayoutBinding[]", len(counts))
                for i, n in enumerate(counts):
                    b[i].binding, b[i].descriptorType = i, vk.VK_DESCRIPTOR_TYPE_STORAGE_BUFFER
                    b[i].descriptorCount, b[i].stageFlags = n, vk.VK_SHADER_STAGE_COMPUTE_BIT
                li = ffi.new("VkDescriptorSetLayoutCreateInfo*", {
                    "sType": vk.VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                    "bindingCount": len(counts), "pBindings": b})
                self.layouts[counts] = create("vkCreateDescriptorSetLayout", "VkDescriptorSetLayout",
                                              self.device, li)
            return self.layouts[counts]

    def get(self, pipeline: Pipeline, bindings: tuple):
        """The set for ``bindings``; call with the context lock held (the pool is shared)."""
        key = (pipeline.counts,) + tuple((b._id, off, rng) for b, off, rng in bindings)
        hit = self._sets.get(key)
        if hit is not None:
            self._sets[key] = (hit[0], self._recording)
            self._sets.move_to_end(key)
            return hit[0]
        if len(self._sets) >= self.capacity:
            old_key, (old, used) = next(iter(self._sets.items()))
            if used == self._recording:  # least recently used, yet bound now: so is every cached set
                if self._overflow is None:
                    self._overflow = DescriptorArena(self.device)
                return self._overflow.get(pipeline, bindings)
            del self._sets[old_key]
            self._free(old_key, old)
        ds = _allocate_set(self.device, self.pool, pipeline, bindings)
        self._sets[key] = (ds, self._recording)
        for b, _, _ in bindings:
            self._by_buffer[b._id].add(key)
        return ds

    def _free(self, key, ds):
        self._set_p[0] = ds
        binding()[2].vkFreeDescriptorSets(self.device, self.pool, 1, self._set_p)
        for part in key[1:]:
            keys = self._by_buffer.get(part[0])
            if keys is not None:
                keys.discard(key)

    def forget(self, buffer_id: int) -> None:
        """A destroyed buffer's descriptor sets must never be bound again."""
        with self.lock:
            for key in self._by_buffer.pop(buffer_id, ()):
                hit = self._sets.pop(key, None)
                if hit is not None:
                    self._free(key, hit[0])

    def destroy(self):
        _, ffi, lib = binding()
        for layout in self.layouts.values():
            lib.vkDestroyDescriptorSetLayout(self.device, layout, ffi.NULL)
        lib.vkDestroyDescriptorPool(self.device, self.pool, ffi.NULL)
        if self._overflow is not None:
            self._overflow.destroy()
        self._sets.clear()
        self._by_buffer.clear()


class DescriptorArena:
    """Descriptor sets a recorded sequence owns: they must outlive every re-submission, so they
    come from pools of the sequence's own instead of the context's evicting cache."""

    CHUNK = 16

    def __init__(self, device):
        self.device = device
        self.pools: list = []
        self._left = 0

    def get(self, pipeline: Pipeline, bindings: tuple):
        if not self._left:
            self.pools.append(_descriptor_pool(self.device, self.CHUNK, free_sets=False))
            self._left = self.CHUNK
        self._left -= 1
        return _allocate_set(self.device, self.pools[-1], pipeline, bindings)

    def clear(self):
        """Drop every set (the sequence is being re-recorded)."""
        _, ffi, lib = binding()
        for pool in self.pools[1:]:
            lib.vkDestroyDescriptorPool(self.device, pool, ffi.NULL)
        del self.pools[1:]
        if self.pools:
            call("vkResetDescriptorPool", self.device, self.pools[0], 0)
            self._left = self.CHUNK
        else:
            self._left = 0

    def destroy(self):
        _, ffi, lib = binding()
        for pool in self.pools:
            lib.vkDestroyDescriptorPool(self.device, pool, ffi.NULL)
        self.pools, self._left = [], 0


class PipelineCache:
    """A VkPipelineCache persisted per device and driver (its UUID names the file): pipeline
    creation is the slow part of a first call on most drivers. A file the driver rejects as
    corrupt or foreign is ignored; writing needs no permission to succeed."""

    def __init__(self, device, physical):
        _, ffi, lib = binding()
        self.device = device
        props = ffi.new("VkPhysicalDeviceProperties*")
        lib.vkGetPhysicalDeviceProperties(physical, props)
        uuid = ffi.buffer(props.pipelineCacheUUID, 16)[:]
        self.path = user_cache_dir() / f"pipelines-{bytes(uuid).hex()}.bin"
        data = b""
        if settings.vulkan().pipeline_cache:
            try:
                data = self.path.read_bytes()
            except OSError:
                pass
        try:
            self.handle = self._create(data)
        except VulkanError as exc:
            if not data:
                raise
            # Drivers must ignore a foreign header themselves; one that fails on the contents
            # gets an empty cache, and the next save overwrites the file.
            log.info("aule: pipeline cache %s ignored: %s", self.path, exc)
            self.handle = self._create(b"")

    def _create(self, data: bytes):
        vk, ffi, _ = binding()
        self._data = ffi.new("char[]", data) if data else ffi.NULL
        pci = ffi.new("VkPipelineCacheCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_PIPELINE_CACHE_CREATE_INFO,
                                                     "initialDataSize": len(data), "pInitialData": self._data})
        return create("vkCreatePipelineCache", "VkPipelineCache", self.device, pci)

    def save(self):
        if not settings.vulkan().pipeline_cache:
            return
        _, ffi, lib = binding()
        n = ffi.new("size_t*")
        if lib.vkGetPipelineCacheData(self.device, self.handle, n, ffi.NULL) != 0 or not n[0]:
            return
        buf = ffi.new("char[]", n[0])
        if lib.vkGetPipelineCacheData(self.device, self.handle, n, buf) != 0:
            return
        try:
            atomic_write(self.path, ffi.buffer(buf, n[0])[:])
        except OSError as exc:  # a read-only home must not break attention
            log.info("aule: cannot write the pipeline cache %s: %s", self.path, exc)

    def destroy(self):
        _, ffi, lib = binding()
        lib.vkDestroyPipelineCache(self.device, self.handle, ffi.NULL)

"""Storage buffers, the memory policy, pooling, and host <-> device transfers."""
from __future__ import annotations

import collections
import threading
import weakref

import numpy as np

from .errors import VulkanOutOfMemoryError, binding, call, create, error


class MemoryPolicy:
    """Which memory types buffers get on this device.

    Device-local + host-visible memory is used directly (mapped, no copies) only when it spans
    (most of) the device memory: without resizable BAR it is a 256 MiB window that large tensors
    would exhaust. Otherwise buffers are device-local and data moves through staging buffers.
    """

    def __init__(self, physical, force_staging: bool):
        vk, ffi, lib = binding()
        mem = ffi.new("VkPhysicalDeviceMemoryProperties*")
        lib.vkGetPhysicalDeviceMemoryProperties(physical, mem)
        self.flags = [mem.memoryTypes[i].propertyFlags for i in range(mem.memoryTypeCount)]
        heaps = [mem.memoryHeaps[mem.memoryTypes[i].heapIndex].size for i in range(mem.memoryTypeCount)]
        local = vk.VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT
        hv = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | vk.VK_MEMORY_PROPERTY_HOST_COHERENT_BIT
        cached = vk.VK_MEMORY_PROPERTY_HOST_CACHED_BIT
        self.biggest_local = max((heaps[i] for i, f in enumerate(self.flags) if f & local), default=0)
        # AULE_VULKAN_STAGING=1 takes the discrete-GPU path (staging copies) on any device.
        self.force_staging = force_staging
        self.direct = not force_staging and any(
            (f & (local | hv)) == (local | hv) and heaps[i] >= 0.75 * self.biggest_local
            for i, f in enumerate(self.flags))
        self.route = ("device-local host-visible (mapped, no staging)" if self.direct
                      else "device-local + staging copies")
        self._wants = {"device": [local | hv, local] if self.direct else [local, hv],
                       "upload": [hv],
                       "download": [hv | cached, hv]}
        self._host_visible = vk.VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT
        self._host_cached = cached

    def type_for(self, bits: int, kind: str) -> int:
        """The memory type index for a buffer of ``kind`` ("device", "upload", "download")."""
        for want in self._wants[kind]:
            for i, f in enumerate(self.flags):
                if bits & (1 << i) and (f & want) == want:
                    return i
        raise error("vkAllocateMemory", "VK_ERROR_FEATURE_NOT_PRESENT", f"no memory type fits (bits {bits:#x}, {kind})")

    def mapped(self, type_index: int, kind: str) -> tuple[bool, bool]:
        """(host visible, host cached) as buffers of ``kind`` treat that memory type."""
        f = self.flags[type_index]
        # With staging forced, device buffers are treated as unmapped even where they could be.
        visible = bool(f & self._host_visible) and not (kind == "device" and self.force_staging)
        return visible, bool(f & self._host_cached)


class Buffer:
    """A storage buffer and its memory. Host-visible memory stays mapped: ``view`` is a uint8
    NumPy view of it, so copies in and out are single memcpys."""

    __slots__ = ("ctx", "handle", "memory", "nbytes", "host_visible", "host_cached", "view", "_mapped",
                 "_id", "__weakref__")
    _ids = 0

    def __init__(self, ctx, nbytes: int, kind: str):
        vk, ffi, lib = binding()
        self.ctx, self.nbytes, self.view, self._mapped = ctx, int(nbytes), None, None
        self.handle = self.memory = None
        Buffer._ids += 1
        self._id = Buffer._ids  # never reused, unlike id(): descriptor sets are cached by it
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        info = ffi.new("VkBufferCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                                               "size": self.nbytes, "usage": usage,
                                               "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
        self.handle = create("vkCreateBuffer", "VkBuffer", ctx.device, info, detail=f"{nbytes} bytes")
        try:
            req = ffi.new("VkMemoryRequirements*")
            lib.vkGetBufferMemoryRequirements(ctx.device, self.handle, req)
            type_index = ctx.memory.type_for(req.memoryTypeBits, kind)
            self.host_visible, self.host_cached = ctx.memory.mapped(type_index, kind)
            if req.size > ctx.info.max_allocation:
                raise error("vkAllocateMemory", "VK_ERROR_OUT_OF_DEVICE_MEMORY",
                            f"vkAllocateMemory: {req.size} bytes exceed the device's maxMemoryAllocationSize "
                            f"({ctx.info.max_allocation}): split the input")
            ai = ffi.new("VkMemoryAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                                   "allocationSize": req.size, "memoryTypeIndex": type_index})
            self.memory = create("vkAllocateMemory", "VkDeviceMemory", ctx.device, ai, detail=f"{req.size} bytes")
            call("vkBindBufferMemory", ctx.device, self.handle, self.memory, 0)
            if self.host_visible:
                pp = ffi.new("void**")
                call("vkMapMemory", ctx.device, self.memory, 0, self.nbytes, 0, pp)
                self._mapped = ffi.buffer(pp[0], self.nbytes)
                self.view = np.frombuffer(self._mapped, dtype=np.uint8)
        except BaseException:
            self.destroy()
            raise

    def destroy(self) -> None:
        _, ffi, lib = binding()
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

    Sizes round up to a multiple of an eighth of the power of two below them, and of 256 bytes:
    at most 12.5% slack above 2 KiB, at most 255 bytes below. Free buffers are kept up to
    ``limit`` bytes, oldest dropped first.
    """

    def __init__(self, ctx, kind: str, limit: int):
        self.ctx, self.kind, self.limit = ctx, kind, limit
        self.free: "collections.OrderedDict[int, list]" = collections.OrderedDict()
        self.cached = 0
        self.lock = threading.Lock()

    @staticmethod
    def size_class(n: int) -> int:
        n = max(256, int(n))
        # n - 1 lies in [2**k, 2**(k+1)); a step of 2**(k-3) is under n / 8.
        step = max(256, 1 << max(0, (n - 1).bit_length() - 4))
        return (n + step - 1) // step * step

    def acquire(self, nbytes: int) -> Lease:
        size = self.size_class(nbytes)
        if nbytes <= self.ctx.info.max_allocation < size:
            size = int(nbytes)  # the slack must not push a request that fits over the device's limit
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
            try:
                buf = Buffer(self.ctx, size, self.kind)
            except VulkanOutOfMemoryError as exc:
                # The driver saw the pooled size; the caller knows the size it asked for.
                raise type(exc)(f"out of memory for a {self.kind} buffer of {int(nbytes)} bytes (pooled as "
                                f"{size} bytes): {exc}", call=exc.call, result=exc.result) from None
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


def make_pools(ctx, policy: MemoryPolicy):
    """``(device pool, upload pool or None, download pool or None)`` for ``ctx``."""
    budget = max(64 << 20, min(1 << 30, policy.biggest_local // 8))
    pool = BufferPool(ctx, "device", budget)
    probe = Buffer(ctx, 256, "device")
    mapped, cached = probe.host_visible, probe.host_cached
    probe.destroy()
    # Reading uncached (write-combined) device memory from the CPU is very slow, so results
    # come back through a host-cached staging buffer unless the device memory itself is cached.
    upload_pool = None if mapped else BufferPool(ctx, "upload", min(256 << 20, budget))
    download_pool = None if (mapped and cached) else BufferPool(ctx, "download", min(256 << 20, budget))
    return pool, upload_pool, download_pool


def upload(ctx, array: np.ndarray, lease: Lease | None = None) -> Lease:
    """A pooled device buffer (or ``lease``) holding ``array``'s bytes: one memcpy, plus a GPU
    copy when device memory is not mapped."""
    src = np.ascontiguousarray(array)
    raw = src.reshape(-1).view(np.uint8)
    if lease is None:
        lease = ctx.pool.acquire(raw.nbytes)
    buf = lease.buffer
    if buf.host_visible:
        buf.view[:raw.nbytes] = raw
    elif raw.nbytes:
        stage = ctx.upload_pool.acquire(raw.nbytes)
        try:
            stage.buffer.view[:raw.nbytes] = raw
            ctx.run((), uploads=((stage.buffer, buf, raw.nbytes),))
        finally:
            stage.release()
    return lease


def download(ctx, buf: Buffer, out: np.ndarray) -> np.ndarray:
    """Copy ``out.nbytes`` from the start of ``buf`` into the C-contiguous array ``out``."""
    raw = out.reshape(-1).view(np.uint8)
    if buf.host_visible and ctx.download_pool is None:
        raw[:] = buf.view[:raw.nbytes]
    elif raw.nbytes:
        stage = ctx.download_pool.acquire(raw.nbytes)
        try:
            ctx.run((), downloads=((buf, stage.buffer, raw.nbytes),))
            raw[:] = stage.buffer.view[:raw.nbytes]
        finally:
            stage.release()
    return out

"""Storage buffers, the memory policy, pooling, and host <-> device transfers."""
from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import os
import threading
import time
import weakref

import numpy as np

from .... import settings
from .errors import VulkanError, VulkanOutOfMemoryError, binding, call, create, error

log = logging.getLogger("aule")


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
        self.import_alignment = 0  # set by the context when the device imports host memory

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
    NumPy view of it, so copies in and out are single memcpys.

    ``busy``: the serial of the last asynchronous submission that binds or copies it (0: none).
    Work on the queue orders itself after earlier submissions (``Context``), so only the host
    waits for it: before reading or writing the mapping (:func:`await_host`) and before
    destroying the buffer."""

    __slots__ = ("ctx", "handle", "memory", "nbytes", "host_visible", "host_cached", "view", "_mapped",
                 "_id", "busy", "__weakref__")
    _ids = itertools.count(1)  # next() on it is atomic: buffers are made from several threads

    def __init__(self, ctx, nbytes: int, kind: str, host_address: int | None = None):
        """``host_address``: import ``nbytes`` of host memory there (page-aligned, ``kind``
        "host") instead of allocating: transfers then DMA from or to it, with no CPU copy."""
        self.ctx, self.nbytes, self.view, self._mapped = ctx, int(nbytes), None, None
        self.handle = self.memory = None
        self.busy = 0
        self._id = next(Buffer._ids)  # never reused, unlike id(): descriptor sets and recordings are keyed by it
        # Under the context's lock, as every other call on the device: a buffer made on one thread
        # while another allocated descriptor sets crashed the process in CI (lavapipe with the
        # validation layer, eight threads calling at once).
        with ctx.lock:
            self._make(host_address, kind)

    def _make(self, host_address, kind: str) -> None:
        vk, ffi, lib = binding()
        ctx = self.ctx
        usage = (vk.VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | vk.VK_BUFFER_USAGE_TRANSFER_SRC_BIT
                 | vk.VK_BUFFER_USAGE_TRANSFER_DST_BIT)
        host_type = vk.VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT
        external = ffi.NULL if host_address is None else ffi.new("VkExternalMemoryBufferCreateInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_EXTERNAL_MEMORY_BUFFER_CREATE_INFO, "handleTypes": host_type})
        info = ffi.new("VkBufferCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO, "pNext": external,
                                               "size": self.nbytes, "usage": usage,
                                               "sharingMode": vk.VK_SHARING_MODE_EXCLUSIVE})
        self.handle = create("vkCreateBuffer", "VkBuffer", ctx.device, info, detail=f"{self.nbytes} bytes")
        try:
            req = ffi.new("VkMemoryRequirements*")
            lib.vkGetBufferMemoryRequirements(ctx.device, self.handle, req)
            imported = ffi.NULL
            if host_address is None:
                type_index = ctx.memory.type_for(req.memoryTypeBits, kind)
                self.host_visible, self.host_cached = ctx.memory.mapped(type_index, kind)
                size = req.size
            else:
                # The user's array is the data: never mapped here, never pooled.
                bits = ctx.host_pointer_types(host_address) & req.memoryTypeBits
                if not bits or req.size > self.nbytes:
                    raise error("vkAllocateMemory", "VK_ERROR_INVALID_EXTERNAL_HANDLE",
                                f"host memory at {host_address:#x} cannot back this buffer (types {bits:#x}, "
                                f"{req.size} bytes needed of {self.nbytes})")
                type_index = (bits & -bits).bit_length() - 1
                self.host_visible = self.host_cached = False
                size = self.nbytes
                imported = ffi.new("VkImportMemoryHostPointerInfoEXT*", {
                    "sType": vk.VK_STRUCTURE_TYPE_IMPORT_MEMORY_HOST_POINTER_INFO_EXT, "handleType": host_type,
                    "pHostPointer": ffi.cast("void*", host_address)})
            if size > ctx.info.max_allocation:
                raise error("vkAllocateMemory", "VK_ERROR_OUT_OF_DEVICE_MEMORY",
                            f"vkAllocateMemory: {size} bytes exceed the device's maxMemoryAllocationSize "
                            f"({ctx.info.max_allocation}): split the input")
            ai = ffi.new("VkMemoryAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO,
                                                   "pNext": imported, "allocationSize": size,
                                                   "memoryTypeIndex": type_index})
            self.memory = create("vkAllocateMemory", "VkDeviceMemory", ctx.device, ai, detail=f"{size} bytes")
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
        await_host(self)  # never free memory a submission in flight may still touch
        with self.ctx.lock:
            if self.handle is None and self.memory is None:  # destroyed meanwhile on another thread
                return
            self.ctx._forget_buffer(self)
            self.view = self._mapped = None
            if self.handle is not None:
                lib.vkDestroyBuffer(self.ctx.device, self.handle, ffi.NULL)
            if self.memory is not None:
                lib.vkFreeMemory(self.ctx.device, self.memory, ffi.NULL)
            self.handle = self.memory = None


def await_host(buf: Buffer) -> None:
    """Return once no submission in flight binds or copies ``buf``: the host may then read or
    write its memory (or free it). Raises the device's error (device lost) if the wait fails."""
    if buf.busy > buf.ctx.retired:
        buf.ctx.wait_for(buf.busy)


class Lease:
    """A pooled buffer on loan: ``release()`` (or garbage collection) hands it back to the pool.

    Released by ``__del__`` rather than a ``weakref.finalize``, whose registration and call cost
    a small call about two microseconds a buffer; ``_pool`` holds the pool until the one release
    that pops it (``list.pop`` is atomic, so two threads cannot both give the buffer back)."""

    __slots__ = ("buffer", "nbytes", "_pool", "__weakref__")

    def __init__(self, pool: "BufferPool", buffer: Buffer, nbytes: int):
        self.buffer, self.nbytes, self._pool = buffer, nbytes, [pool]

    def release(self) -> None:
        try:
            pool = self._pool.pop()
        except IndexError:  # released already
            return
        pool._give_back(self.buffer)

    __del__ = release


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
        self.made: "weakref.WeakSet[Buffer]" = weakref.WeakSet()  # leased or free, for close()
        self._sizes: dict = {}  # bytes asked for -> the size of buffer that serves them

    @staticmethod
    def size_class(n: int) -> int:
        n = max(256, int(n))
        # n - 1 lies in [2**k, 2**(k+1)); a step of 2**(k-3) is under n / 8.
        step = max(256, 1 << max(0, (n - 1).bit_length() - 4))
        return (n + step - 1) // step * step

    def acquire(self, nbytes: int) -> Lease:
        size = self._sizes.get(nbytes)
        if size is None:  # a repeated call asks for the same sizes: each class worked out once
            size = self.size_class(nbytes)
            if nbytes <= self.ctx.info.max_allocation < size:
                size = int(nbytes)  # the slack must not push a request that fits over the device's limit
            if len(self._sizes) >= 4096:
                self._sizes.clear()
            self._sizes[nbytes] = size
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
        self.made.add(buf)
        return Lease(self, buf, nbytes)

    def _give_back(self, buf: Buffer) -> None:
        if buf.handle is None or self.ctx._destroyed:
            return
        with self.lock:
            self.free.setdefault(buf.nbytes, []).append(buf)
            self.free.move_to_end(buf.nbytes)
            self.cached += buf.nbytes
            over = self.cached > self.limit
        if over:
            self.trim(self.limit)

    def trim(self, limit: int) -> None:
        drop = []
        with self.lock:
            while self.cached > limit and self.free:
                size, bucket = next(iter(self.free.items()))
                if not bucket:  # emptied by acquire
                    del self.free[size]
                    continue
                buf = bucket.pop(0)
                if not bucket:
                    del self.free[size]
                self.cached -= buf.nbytes
                drop.append(buf)
        for buf in drop:
            with self.ctx.lock:
                buf.destroy()


    def destroy_all(self) -> None:
        """Destroy every buffer this pool made, leases still out included (the context is
        closing: nothing may outlive its device)."""
        self.trim(0)
        for buf in list(self.made):
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
    # Inputs may take staging even where device memory is mapped (AULE_VULKAN_UPLOAD=staged, or
    # measured faster there): the pool is made empty and costs nothing until then.
    upload_pool = BufferPool(ctx, "upload", min(256 << 20, budget))
    download_pool = None if (mapped and cached) else BufferPool(ctx, "download", min(256 << 20, budget))
    return pool, upload_pool, download_pool


class Copier:
    """Host copies split across a small persistent thread pool: one core copies at 10 GB/s or
    so, below what a PCIe 5 link moves, and NumPy lets go of the GIL in large copies.

    ``threads`` 1 copies on the calling thread alone. Copies under two chunks stay there too:
    handing work to a thread costs more than a small copy."""

    CHUNK = 4 << 20

    def __init__(self, threads: int | None):
        self.threads = max(1, threads if threads is not None else min(8, (os.cpu_count() or 1) // 2))
        self._pool = None
        self._lock = threading.Lock()

    def copy(self, dst: np.ndarray, src: np.ndarray) -> None:
        """``dst[...] = src`` for 1-D uint8 arrays of equal length."""
        n = src.nbytes
        parts = min(self.threads, n // self.CHUNK)
        if parts < 2:
            dst[...] = src
            return
        pool = self._executor()
        per = -(-n // parts)
        step = -(-per // 4096) * 4096  # cuts of whole 4 KiB multiples, so threads rarely share a page
        cuts = [(a, min(n, a + step)) for a in range(step, n, step)]
        futures = [pool.submit(np.copyto, dst[a:b], src[a:b]) for a, b in cuts]
        dst[:step] = src[:step]
        for f in futures:
            f.result()

    def start(self, dst: np.ndarray, src: np.ndarray, spread: bool = False):
        """Begin ``dst[...] = src`` (1-D uint8) on a copy thread, or with ``spread`` on all of
        them in page-aligned parts (for a copy whose latency matters, not only its rate: the first
        chunk of an upload, the last of a download); the returned handle's ``result()`` waits for
        it. With one thread the copy is done here, before returning."""
        if self.threads < 2:
            dst[...] = src
            return _DONE
        pool = self._executor()
        n = src.nbytes
        if not spread or n < 2 * 4096:
            return pool.submit(np.copyto, dst, src)
        step = -(-(-(-n // self.threads)) // 4096) * 4096
        return Group([pool.submit(np.copyto, dst[a:a + step], src[a:a + step]) for a in range(0, n, step)])

    def _executor(self):
        pool = self._pool
        if pool is None:
            with self._lock:
                if self._pool is None:
                    # One worker per thread: copy() keeps a part for the calling thread and leaves a
                    # worker idle, while a chunked run's calling thread submits DMA and copies nothing.
                    self._pool = concurrent.futures.ThreadPoolExecutor(self.threads, "aule-copy")
                pool = self._pool
        return pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


class _Done:
    """The handle of a copy already made."""

    @staticmethod
    def result():
        return None


_DONE = _Done()


class Group:
    """The handle of copies started on several threads (one copy spread, or many): ``result()``
    waits for every one and raises the first failure."""

    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def result(self):
        failed = None
        for p in self.parts:  # every part waited for, even after one failed
            try:
                p.result()
            except BaseException as exc:  # noqa: BLE001 (re-raised once all have ended)
                failed = failed or exc
        if failed is not None:
            raise failed


def _raw(array: np.ndarray) -> np.ndarray:
    """The bytes of a C-contiguous array as a 1-D uint8 view."""
    return array.reshape(-1).view(np.uint8)


class _Imported:
    """Host memory imported as a buffer for one transfer: the enclosing pages of an array, kept
    alive (and pinned by the driver) until :meth:`release`."""

    __slots__ = ("buffer", "offset", "_array")

    def __init__(self, ctx, array: np.ndarray):
        align = ctx.memory.import_alignment
        address = array.__array_interface__["data"][0]
        start = address // align * align
        end = -(-(address + array.nbytes) // align) * align
        self.buffer = Buffer(ctx, end - start, "host", host_address=start)
        self.offset, self._array = address - start, array

    def release(self) -> None:
        if self.buffer is not None:
            with self.buffer.ctx.lock:
                self.buffer.destroy()
            self.buffer = self._array = None


#: Host arrays under this size are copied rather than imported: pinning pages costs more than
#: copying a few of them.
IMPORT_MIN_BYTES = 1 << 20


def _import(ctx, array: np.ndarray, direction: str):
    """An :class:`_Imported` of ``array`` when the context imports host memory for ``direction``
    ("upload", "download") and ``array`` is worth it, else None (also when the driver refuses this
    memory: logged once)."""
    if direction not in ctx.host_import or array.nbytes < IMPORT_MIN_BYTES:
        return None
    try:
        return _Imported(ctx, array)
    except VulkanError as exc:
        if not ctx._import_refused:
            ctx._import_refused = True
            log.info("aule: Vulkan host-memory import refused (%s); copying instead", exc)
        return None


def host_empty(ctx, shape, dtype) -> np.ndarray:
    """An uninitialised host array for a result: page-aligned where results are DMA'd straight
    into imported host memory, so the import covers no foreign bytes. Large results come from
    :class:`ResultPool`, whose memory the kernel has already mapped."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    align = ctx.memory.import_alignment if "download" in ctx.host_import and n >= IMPORT_MIN_BYTES else 0
    if n >= RESULT_POOL_MIN_BYTES:
        raw = ctx.results.take(n, align)
    elif align:
        raw = _aligned(np.empty(n + align, np.uint8), n, align)
    else:
        return np.empty(shape, dtype)
    return raw.view(dtype).reshape(shape)


def _aligned(raw: np.ndarray, n: int, align: int) -> np.ndarray:
    """The first ``n`` bytes of ``raw`` (uint8, ``n + align`` long) from a multiple of ``align``."""
    at = -raw.__array_interface__["data"][0] % align if align else 0
    return raw[at:at + n]


RESULT_POOL_MIN_BYTES = 1 << 20
RESULT_POOL_BYTES = 1 << 30


class ResultPool:
    """Host memory for large results, reused once the caller has dropped every array on it.

    A fresh result array costs more to write than its copy out of staging: each of its 4 KiB pages
    faults on first touch (13.6 GB/s with 8 threads on the H200's host against 38.8 GB/s into
    memory already mapped). So a result is an array over a pooled block, owned by a small
    :class:`_Lent` object: every view, export (memoryview, torch.from_numpy) and sub-array of the
    result keeps that owner alive, and only its finalizer gives the block back. Free blocks are
    kept up to RESULT_POOL_BYTES in all.
    """

    def __init__(self, limit: int = RESULT_POOL_BYTES):
        self.limit = limit
        self._free: list[np.ndarray] = []
        self._lock = threading.RLock()  # a finalizer may run inside take (a collection there)

    def take(self, n: int, align: int = 0) -> np.ndarray:
        """``n`` bytes (uint8, 1-D), starting at a multiple of ``align`` when it is non-zero."""
        need = n + align
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if need <= b.nbytes <= 2 * need]
            block = self._free.pop(min(fits, key=lambda i: self._free[i].nbytes)) if fits else None
        if block is None:
            block = np.empty(need, np.uint8)
        lent = _Lent(_aligned(block, n, align))
        weakref.finalize(lent, self._give_back, block)
        return np.asarray(lent)

    def _give_back(self, block: np.ndarray) -> None:
        with self._lock:
            self._free.append(block)
            total = sum(b.nbytes for b in self._free)
            while total > self.limit and self._free:
                total -= self._free.pop(0).nbytes

    def trim(self) -> None:
        """Forget the free blocks (a block still in use returns when its result is dropped)."""
        with self._lock:
            self._free.clear()

    def held_bytes(self) -> int:
        """Bytes of free blocks kept for reuse."""
        return sum(b.nbytes for b in self._free)


class _Lent:
    """The owner of one result's bytes: arrays over it keep it (and the block) alive; its
    finalizer returns the block to the pool."""

    __slots__ = ("block", "__array_interface__", "__weakref__")

    def __init__(self, view: np.ndarray):
        self.block = view
        self.__array_interface__ = dict(shape=view.shape, typestr="|u1", version=3,
                                        data=(view.__array_interface__["data"][0], False))


class Chunk:
    """One piece of a chunked transfer: the host copy ``dst[...] = src`` (uint8 views of a
    staging buffer and of the caller's array) and the GPU copy ``copy`` between that staging
    buffer and the device buffer. An upload's host copy comes first, a download's after its DMA;
    ``done`` is set once both ran (:meth:`Context.run_passes` runs them)."""

    __slots__ = ("dst", "src", "copy", "done")

    def __init__(self, dst, src, copy):
        self.dst, self.src, self.copy, self.done = dst, src, copy, False


def _chunks(host: np.ndarray, stage: Buffer, device: Buffer, size: int, up: bool) -> list:
    """The :class:`Chunk` s moving the bytes of ``host`` (1-D uint8) through ``stage`` to or from
    the start of ``device``, cut every ``size`` bytes (the last one shorter)."""
    n, view = host.nbytes, stage.view
    out = []
    for a in range(0, n, size):
        b = min(n, a + size)
        if up:
            out.append(Chunk(view[a:b], host[a:b], (stage, device, b - a, a, a)))
        else:
            out.append(Chunk(host[a:b], view[a:b], (device, stage, b - a, a, a)))
    return out


class Transfer:
    """Host data on its way to or from a device buffer in one submission: ``copies`` are the
    ``(src, dst, nbytes[, src_offset, dst_offset])`` GPU copies to record (none where the device
    memory is mapped), ``chunks`` the :class:`Chunk` s of a transfer cut for overlap (then no
    ``copies``; a run takes them as ``up_chunks`` / ``down_chunks``), :meth:`finish` completes a
    download after they ran, :meth:`release` gives back the staging buffer or host import (always
    call it)."""

    __slots__ = ("copies", "chunks", "_held", "_out", "_src", "_copier")

    def __init__(self, copies=(), held=None, out=None, src=None, copier=None, chunks=()):
        self.copies, self.chunks, self._held, self._out, self._src, self._copier = (
            copies, chunks, held, out, src, copier)

    def finish(self) -> np.ndarray | None:
        if self.chunks:
            if not all(c.done for c in self.chunks):
                raise RuntimeError("a chunked download was finished before a run moved its chunks "
                                   "(pass the transfer's chunks to Context.run_passes as down_chunks)")
        elif self._src is not None:
            raw = _raw(self._out)
            self._copier.copy(raw, self._src[:raw.nbytes])
        return self._out

    def release(self) -> None:
        if self._held is not None:
            self._held.release()
            self._held = None


def staged_upload(ctx, buf: Buffer, n: int) -> bool:
    """Whether ``n`` bytes for device buffer ``buf`` go through staging and DMA rather than being
    written through its mapping. Unmapped memory has no choice. Mapped memory that is host-cached is
    host memory (a CPU device, unified memory): a staging copy could only add a copy. Mapped
    uncached memory (a discrete GPU's BAR, write-combined) is written at what the link and the
    CPU's write-combining allow, which may be under a host memcpy plus DMA: the context measures
    both once, at the first upload large enough to be cut into chunks, and keeps the faster.
    Arrays of one chunk or less are written where they are mapped: a DMA submission of their own
    would cost more than it could save."""
    if not buf.host_visible:
        return True
    route = ctx.upload_setting
    if route == "mapped":
        return False
    if route == "staged":
        return True
    if buf.host_cached or not ctx.chunk_bytes or n <= ctx.chunk_bytes:
        return False
    if ctx.staged_uploads_faster is None:
        ctx.staged_uploads_faster = measure_uploads(ctx)
    return ctx.staged_uploads_faster


#: Bytes the upload measurement moves each way: several chunks, so the staged side overlaps as
#: a call's would, and long enough (about a millisecond on PCIe 5) to outlast timer noise.
MEASURE_BYTES = 32 << 20


def measure_uploads(ctx, nbytes: int = MEASURE_BYTES, reps: int = 3) -> bool:
    """Time ``nbytes`` written through a mapped device buffer against the same bytes copied into
    staging in chunks with overlapped DMA (the best of ``reps`` each); True when staging is faster.
    Logged at INFO with both rates. The numbers decide a route, never a result: both routes move
    the same bytes."""
    chunk = ctx.chunk_bytes or settings.DEFAULT_CHUNK_BYTES
    src = np.ones(nbytes, np.uint8)  # touched, so no page faults are timed
    dev, st = ctx.pool.acquire(nbytes), ctx.upload_pool.acquire(nbytes)
    try:
        if not dev.buffer.host_visible:
            return True
        mapped = staged = float("inf")
        await_host(dev.buffer)
        for _ in range(reps):
            t = time.perf_counter()
            ctx.copier.copy(dev.buffer.view[:nbytes], src)
            mapped = min(mapped, time.perf_counter() - t)
            pieces = _chunks(src, st.buffer, dev.buffer, chunk, True)
            t = time.perf_counter()
            ctx.run_passes((), up_chunks=pieces)
            staged = min(staged, time.perf_counter() - t)
    finally:
        st.release()
        dev.release()
    faster = staged < mapped
    log.info("aule: Vulkan uploads of more than %d bytes go %s: %.1f GB/s written through mapped device memory, "
             "%.1f GB/s through staging with chunked DMA (measured on %d MB; AULE_VULKAN_UPLOAD=mapped or "
             "staged decides instead)", ctx.chunk_bytes, "through staging" if faster else "through the mapping",
             nbytes / mapped / 1e9, nbytes / staged / 1e9, nbytes >> 20)
    return faster


def stage(ctx, array: np.ndarray, lease: Lease | None = None) -> tuple[Lease, Transfer]:
    """A pooled device buffer (or ``lease``) for ``array``'s bytes, and the :class:`Transfer`
    that fills it: written already where device memory is mapped (and that route is taken), else
    copies to record from staging memory (or from the imported array itself). Through staging,
    an array larger than a chunk is not copied here: its transfer's ``chunks`` are, by the run."""
    src = np.ascontiguousarray(array)
    raw = _raw(src)
    n = raw.nbytes
    if lease is None:
        lease = ctx.pool.acquire(n)
    buf = lease.buffer
    if not n:
        return lease, Transfer()
    imported = _import(ctx, src, "upload")
    if imported is not None:
        return lease, Transfer(((imported.buffer, buf, n, imported.offset, 0),), imported)
    if not staged_upload(ctx, buf, n):
        # A pooled buffer (or the caller's GpuTensor) may still be read or written by a call in
        # flight: a write through the mapping waits for it, so that call sees the old bytes.
        # (DMA needs no wait: a synchronous run starts once nothing is in flight.)
        await_host(buf)
        ctx.copier.copy(buf.view[:n], raw)
        return lease, Transfer()
    st = ctx.upload_pool.acquire(n)
    if ctx.chunk_bytes and n > ctx.chunk_bytes:
        # ``raw`` is kept alive by the chunks' views until the run has copied it.
        return lease, Transfer(held=st, chunks=_chunks(raw, st.buffer, buf, ctx.chunk_bytes, True))
    ctx.copier.copy(st.buffer.view[:n], raw)
    return lease, Transfer(((st.buffer, buf, n),), st)


def readback(ctx, buf: Buffer, out: np.ndarray) -> Transfer:
    """The :class:`Transfer` that brings ``out.nbytes`` from the start of ``buf`` into the
    C-contiguous array ``out`` (returned by its ``finish()``). Through staging, a result larger
    than a chunk comes back in ``chunks``, each copied out while the next one's DMA runs."""
    n = out.nbytes
    if not n:
        return Transfer(out=out)
    if buf.host_visible and ctx.download_pool is None:
        await_host(buf)  # read through the mapping: the result of a call in flight once it ended
        return Transfer(out=out, src=buf.view, copier=ctx.copier)
    imported = _import(ctx, out, "download")
    if imported is not None:
        return Transfer(((buf, imported.buffer, n, 0, imported.offset),), imported, out)
    st = ctx.download_pool.acquire(n)
    if ctx.chunk_bytes and n > ctx.chunk_bytes:
        return Transfer(held=st, out=out, chunks=_chunks(_raw(out), st.buffer, buf, ctx.chunk_bytes, False))
    return Transfer(((buf, st.buffer, n),), st, out, st.buffer.view, ctx.copier)


def upload(ctx, array: np.ndarray, lease: Lease | None = None) -> Lease:
    """A pooled device buffer (or ``lease``) holding ``array``'s bytes on return."""
    lease, t = stage(ctx, array, lease)
    try:
        if t.copies or t.chunks:
            ctx.run((), uploads=t.copies, up_chunks=t.chunks)
    finally:
        t.release()
    return lease


def download(ctx, buf: Buffer, out: np.ndarray) -> np.ndarray:
    """Copy ``out.nbytes`` from the start of ``buf`` into the C-contiguous array ``out``."""
    t = readback(ctx, buf, out)
    try:
        if t.copies or t.chunks:
            ctx.run((), downloads=t.copies, down_chunks=t.chunks)
        return t.finish()
    finally:
        t.release()

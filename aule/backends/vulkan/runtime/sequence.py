"""Recorded work: copies, dispatches, barriers and timestamps in one command buffer.

A :class:`Sequence` records as its methods are called, is submitted once or many times without
re-recording, and reports the GPU time between its first and last timestamp::

    seq = ctx.sequence()
    seq.dispatch(first)      # a Dispatch: pipeline, bindings, push constants, groups
    seq.barrier()            # first's shader writes visible to second's reads
    seq.dispatch(second)
    seq.submit()             # one vkQueueSubmit; waits unless wait=False

A sequence is used by one thread at a time; the buffers it binds must stay alive (keep their
leases) while it may be submitted. Only the queue submission takes the context's lock.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass

from .errors import binding, call, check, create
from .pipelines import DescriptorArena, Pipeline

_EMPTY, _RECORDING, _READY = 0, 1, 2


@dataclass
class Dispatch:
    """One dispatch to record: ``bindings`` are ``(buffer, offset, range)`` in binding order.
    Never changed once made: plans share their bound dispatches between calls."""

    pipeline: Pipeline
    bindings: tuple
    push: bytes
    groups: tuple

    def run_key(self) -> tuple:
        """What this dispatch records, as a hashable key: pipeline, push constants, groups and the
        bindings by their buffers' never-reused ids. Made once per dispatch: a repeated call
        re-submits the same bound dispatches, and building the key was a share of its host time."""
        key = self.__dict__.get("_run_key")
        if key is None:
            key = (self.pipeline, self.push, tuple(self.groups),
                   tuple((b._id, at, n) for b, at, n in self.bindings))
            self.__dict__["_run_key"] = key
        return key


_masks: dict = {}


def _barrier_masks(after, before):
    """(src stage, dst stage, src access, dst access) for a barrier between the named kinds of
    work: "compute" (shaders), "transfer" (copies) and "host" (the CPU through mapped memory)."""
    key = (after, before)
    masks = _masks.get(key)
    if masks is None:
        vk = binding()[0]
        writes = {"compute": (vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT, vk.VK_ACCESS_SHADER_WRITE_BIT),
                  "transfer": (vk.VK_PIPELINE_STAGE_TRANSFER_BIT, vk.VK_ACCESS_TRANSFER_WRITE_BIT),
                  "host": (vk.VK_PIPELINE_STAGE_HOST_BIT, vk.VK_ACCESS_HOST_WRITE_BIT)}
        # Later writes are in the destination scope as well: write-after-write needs ordering too.
        accesses = {"compute": (vk.VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT,
                                vk.VK_ACCESS_SHADER_READ_BIT | vk.VK_ACCESS_SHADER_WRITE_BIT),
                    "transfer": (vk.VK_PIPELINE_STAGE_TRANSFER_BIT,
                                 vk.VK_ACCESS_TRANSFER_READ_BIT | vk.VK_ACCESS_TRANSFER_WRITE_BIT),
                    "host": (vk.VK_PIPELINE_STAGE_HOST_BIT, vk.VK_ACCESS_HOST_READ_BIT)}
        src = [writes[k] for k in ((after,) if isinstance(after, str) else after)]
        dst = [accesses[k] for k in ((before,) if isinstance(before, str) else before)]
        masks = (_union(s for s, _ in src), _union(s for s, _ in dst), _union(a for _, a in src),
                 _union(a for _, a in dst))
        _masks[key] = masks
    return masks


def _union(bits) -> int:
    out = 0
    for b in bits:
        out |= b
    return out


class _Handles:
    """The Vulkan objects of one sequence, apart from it so a finalizer can free them."""

    def __init__(self, device):
        self.device = device
        self.command_pool = self.fence = self.query_pool = None
        self.arena = None
        self.pending = False

    def release(self):
        _, ffi, lib = binding()
        if self.pending:  # never free what the GPU may still be executing
            lib.vkWaitForFences(self.device, 1, [self.fence], 1, 2**64 - 1)
            self.pending = False
        if self.query_pool is not None:
            lib.vkDestroyQueryPool(self.device, self.query_pool, ffi.NULL)
        if self.fence is not None:
            lib.vkDestroyFence(self.device, self.fence, ffi.NULL)
        if self.command_pool is not None:
            lib.vkDestroyCommandPool(self.device, self.command_pool, ffi.NULL)
        if self.arena is not None:
            self.arena.destroy()
        self.command_pool = self.fence = self.query_pool = self.arena = None


class Sequence:
    """A command buffer of its own (with its own pool, fence and timestamp queries).

    ``timestamps``: how many :meth:`timestamp` marks it can hold. ``one_time``: recorded anew
    for every submission (the context's own per-call sequence); such a sequence binds
    descriptor sets from the context's cache and must be recorded under the context's lock.
    """

    # Small dispatches finish in microseconds, while a blocking fence wait can sleep far longer
    # before the driver wakes the thread: poll briefly first, then block. Not on a CPU device,
    # where the polling thread would take a core from the driver's workers.
    SPIN_SECONDS = 0.0005

    def __init__(self, ctx, timestamps: int = 32, one_time: bool = False):
        vk, ffi, lib = binding()
        self.ctx, self._lib, self._ffi = ctx, lib, ffi
        device = self._device = ctx.device
        h = self._h = _Handles(device)
        self._fin = weakref.finalize(self, h.release)
        cpi = ffi.new("VkCommandPoolCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                                   "flags": vk.VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                                   "queueFamilyIndex": ctx.queue_family})
        h.command_pool = create("vkCreateCommandPool", "VkCommandPool", device, cpi)
        cai = ffi.new("VkCommandBufferAllocateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                                       "commandPool": h.command_pool,
                                                       "level": vk.VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                                       "commandBufferCount": 1})
        self._cmd_p = ffi.new("VkCommandBuffer[1]")
        call("vkAllocateCommandBuffers", device, cai, self._cmd_p)
        self._cmd = self._cmd_p[0]
        fci = ffi.new("VkFenceCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_FENCE_CREATE_INFO})
        h.fence = self._fence = create("vkCreateFence", "VkFence", device, fci)
        self._fence_p = ffi.new("VkFence[1]", [self._fence])
        self.capacity = timestamps if ctx.timestamp_bits else 0
        if self.capacity:
            qpi = ffi.new("VkQueryPoolCreateInfo*", {"sType": vk.VK_STRUCTURE_TYPE_QUERY_POOL_CREATE_INFO,
                                                     "queryType": vk.VK_QUERY_TYPE_TIMESTAMP,
                                                     "queryCount": self.capacity})
            h.query_pool = create("vkCreateQueryPool", "VkQueryPool", device, qpi)
        self.query_pool = h.query_pool
        self._ts = ffi.new("uint64_t[]", max(1, self.capacity))
        bits = ctx.timestamp_bits
        self._ts_mask = (1 << bits) - 1 if bits < 64 else 2**64 - 1
        self._owned = not one_time
        if one_time:
            self._sets = ctx.descriptors
        else:
            self._sets = h.arena = DescriptorArena(device)
        self._begin = ffi.new("VkCommandBufferBeginInfo*", {
            "sType": vk.VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
            "flags": vk.VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT if one_time else 0})
        self._submit = ffi.new("VkSubmitInfo*", {"sType": vk.VK_STRUCTURE_TYPE_SUBMIT_INFO,
                                                 "commandBufferCount": 1, "pCommandBuffers": self._cmd_p})
        self._set_p = ffi.new("VkDescriptorSet[1]")
        self._barrier = ffi.new("VkMemoryBarrier*", {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_BARRIER})
        self._compute = vk.VK_PIPELINE_BIND_POINT_COMPUTE
        self._stage = vk.VK_SHADER_STAGE_COMPUTE_BIT
        self._query_flags = vk.VK_QUERY_RESULT_64_BIT | vk.VK_QUERY_RESULT_WAIT_BIT
        self._ts_stages = (vk.VK_PIPELINE_STAGE_TOP_OF_PIPE_BIT, vk.VK_PIPELINE_STAGE_BOTTOM_OF_PIPE_BIT)
        self._not_ready = vk.VK_NOT_READY
        self._spin = 0.0 if ctx.info.is_cpu else self.SPIN_SECONDS
        self._state, self._bound, self._writes, self._n_ts = _EMPTY, None, False, 0
        self._buffers: list = []
        self.buffers: tuple = ()  # each buffer an owned recording binds or copies, once (set by end())
        self.serial = 0  # the context's serial of its last asynchronous submission
        # Recorded to follow earlier submissions still running (an opening barrier, the context's
        # _record): others are submitted once every asynchronous submission has ended.
        self.ordered = False

    # recording ------------------------------------------------------------------------------------
    def _start(self):
        if self._state == _READY:
            raise ValueError("this sequence is recorded and ready to submit; reset() it to record anew")
        call("vkBeginCommandBuffer", self._cmd, self._begin)
        self._state = _RECORDING

    def copy(self, src, dst, nbytes: int, src_offset: int = 0, dst_offset: int = 0) -> "Sequence":
        """A buffer-to-buffer copy (staging in or out, or device to device)."""
        if self._state != _RECORDING:
            self._start()
        region = self._ffi.new("VkBufferCopy*", {"srcOffset": src_offset, "dstOffset": dst_offset, "size": nbytes})
        self._lib.vkCmdCopyBuffer(self._cmd, src.handle, dst.handle, 1, region)
        self._writes = True
        if self._owned:
            self._buffers += (src, dst)
        return self

    def dispatch(self, d, bindings=None, push: bytes = b"", groups=None) -> "Sequence":
        """Record a :class:`Dispatch`, or ``dispatch(pipeline, bindings, push, groups)``.

        Dispatches recorded without a :meth:`barrier` between them may run concurrently."""
        if bindings is not None:
            d = Dispatch(d, bindings, push, groups)
        if self._state != _RECORDING:
            self._start()
        lib, cmd, p = self._lib, self._cmd, d.pipeline
        if p is not self._bound:
            lib.vkCmdBindPipeline(cmd, self._compute, p.handle)
            self._bound = p
        self._set_p[0] = self._sets.get(p, d.bindings)
        lib.vkCmdBindDescriptorSets(cmd, self._compute, p.layout, 0, 1, self._set_p, 0, self._ffi.NULL)
        if d.push:
            lib.vkCmdPushConstants(cmd, p.layout, self._stage, 0, len(d.push), self._ffi.from_buffer(d.push))
        lib.vkCmdDispatch(cmd, *d.groups)
        self._writes = True
        if self._owned:
            self._buffers += (b for b, _, _ in d.bindings)
        return self

    def barrier(self, after="compute", before="compute") -> "Sequence":
        """Make the writes of the work before (``after``: "compute", "transfer", "host" or a
        tuple of them) visible to the work after (``before``): e.g. a first pass's shader
        writes to a second pass's reads (the default), copies to shaders ("transfer",
        "compute"), shaders to copies out ("compute", "transfer")."""
        if self._state != _RECORDING:
            self._start()
        src_stage, dst_stage, src_access, dst_access = _barrier_masks(after, before)
        b = self._barrier
        b.srcAccessMask, b.dstAccessMask = src_access, dst_access
        null = self._ffi.NULL
        self._lib.vkCmdPipelineBarrier(self._cmd, src_stage, dst_stage, 0, 1, b, 0, null, 0, null)
        return self

    def timestamp(self) -> "Sequence":
        """Mark a GPU time. The first mark is taken when the GPU reaches it, later ones when all
        work before them has finished, so first-to-last brackets the work between. Nothing is
        recorded where the queue has no timestamps (then :meth:`gpu_ns` is None)."""
        if not self.capacity:
            return self
        if self._n_ts >= self.capacity:
            raise ValueError(f"this sequence holds {self.capacity} timestamps")
        if self._state != _RECORDING:
            self._start()
        lib = self._lib
        if not self._n_ts:
            lib.vkCmdResetQueryPool(self._cmd, self.query_pool, 0, self.capacity)
        lib.vkCmdWriteTimestamp(self._cmd, self._ts_stages[self._n_ts > 0], self.query_pool, self._n_ts)
        self._n_ts += 1
        return self

    def end(self) -> "Sequence":
        """Finish recording (``submit`` does it when needed). Device writes are made visible to
        the host here, so results read through mapped memory after the wait are complete."""
        if self._state == _READY:
            return self
        if self._state == _EMPTY:
            self._start()
        if self._writes:
            self.barrier(("compute", "transfer"), "host")
        call("vkEndCommandBuffer", self._cmd)
        self._state = _READY
        if self._owned:
            self.buffers = tuple(dict.fromkeys(self._buffers))
        return self

    def reset(self) -> "Sequence":
        """Forget what was recorded (waiting for a submission in flight), to record anew."""
        if self._h.pending:
            self.wait()
        call("vkResetCommandBuffer", self._cmd, 0)
        if self._owned:
            self._h.arena.clear()
            self._buffers.clear()
            self.buffers = ()
        else:
            self._sets.begin()
        self.ordered = False
        self._state, self._bound, self._writes, self._n_ts = _EMPTY, None, False, 0
        return self

    # execution ------------------------------------------------------------------------------------
    def submit(self, wait: bool = True) -> "Sequence":
        """Submit what is recorded (again, if it was submitted before); with ``wait``, return
        when the GPU has finished it."""
        if self._state != _READY:
            self.end()
        h = self._h
        if h.pending:
            self.wait()
        if not self.ordered and self.ctx._inflight:
            self.ctx.synchronize()
        if self._owned:
            for b in self.buffers:
                if b.handle is None:
                    raise ValueError("a buffer this sequence binds was destroyed; record it anew")
        with self.ctx.lock:  # the queue is shared by every thread
            r = self._lib.vkQueueSubmit(self.ctx.queue, 1, self._submit, self._fence)
            if r:
                check("vkQueueSubmit", r)
            h.pending = True
        if wait:
            self.wait()
        return self

    def wait(self) -> "Sequence":
        """Block until the last submission has finished (no-op when none is in flight)."""
        if not self._h.pending:
            return self
        lib, device, fence, not_ready = self._lib, self._device, self._fence, self._not_ready
        try:
            # The C entry points directly, checked only when they fail: each Python-level step of
            # this loop is a measurable share of a small call.
            r = lib.vkGetFenceStatus(device, fence)
            if r == not_ready and self._spin:
                clock = time.perf_counter
                deadline = clock() + self._spin
                while r == not_ready and clock() < deadline:
                    r = lib.vkGetFenceStatus(device, fence)
            if r == not_ready:
                r = lib.vkWaitForFences(device, 1, self._fence_p, 1, 2**64 - 1)
            if r:
                check("vkWaitForFences" if r != not_ready else "vkGetFenceStatus", r)
        finally:
            lib.vkResetFences(device, 1, self._fence_p)
            self._h.pending = False
        return self

    def gpu_ns(self) -> float | None:
        """GPU nanoseconds from the first to the last timestamp of the last submission (after it
        finished), or None with fewer than two timestamps."""
        n = self._n_ts
        if n < 2:
            return None
        self.wait()
        call("vkGetQueryPoolResults", self._device, self.query_pool, 0, n, 8 * n, self._ts, 8, self._query_flags)
        mask = self._ts_mask
        return (((self._ts[n - 1] & mask) - (self._ts[0] & mask)) & mask) * self.ctx.info.timestamp_period

    # lifetime -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Free the command buffer, fence, queries and descriptor sets (waiting if in flight)."""
        self._fin()
        self._state = _EMPTY

    def __enter__(self) -> "Sequence":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

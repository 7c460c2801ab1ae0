"""The process-wide Vulkan context: device, queue, memory, pools, caches, and the per-call path."""
from __future__ import annotations

import logging
import threading
import weakref

import numpy as np

from .... import settings
from . import device as _device
from . import memory as _memory
from .errors import binding, error
from .memory import Buffer, Lease
from .pipelines import DescriptorCache, Pipeline, PipelineCache
from .sequence import Sequence

log = logging.getLogger("aule")


class Context:
    """Instance, device, queue and caches. Use :func:`context` for the process-wide one.

    ``lock`` guards the queue and the shared caches, so threads may call concurrently.
    """

    DESCRIPTOR_SETS = 256

    def __init__(self):
        s = settings.vulkan()
        _, ffi, _ = binding()
        self.lock = threading.RLock()
        self.validation_messages: list[str] = []
        self.validation = s.validation
        self._destroyed = True  # until the device exists: nothing to forget or give back before
        self._main = ffi.new("char[]", b"main")
        self._instance, self.route = _device.open_instance(s.validation, s.egl_retry, self.validation_messages)
        self.instance, self.devices = self._instance.handle, self._instance.devices
        self.validation_active = self._instance.validation_active
        try:
            self.physical, self.info = _device.choose_device(self.devices, s.device)
            self.device, self.queue, self.queue_family, self.timestamp_bits = _device.create_device(
                self.physical, self.info)
        except BaseException:
            self._instance.destroy()
            raise
        self._destroyed = False
        self._sequences: "weakref.WeakSet[Sequence]" = weakref.WeakSet()
        self.pipelines: dict = {}
        self.descriptors = DescriptorCache(self.device, self.DESCRIPTOR_SETS, self.lock)
        self._pipeline_store = PipelineCache(self.device, self.physical)
        self.pipeline_cache, self.pipeline_cache_path = self._pipeline_store.handle, self._pipeline_store.path
        self.memory = _memory.MemoryPolicy(self.physical, s.staging)
        self.pool, self.upload_pool, self.download_pool = _memory.make_pools(self, self.memory)
        # The per-call sequence, re-recorded by every run(); its queries are the timing ones.
        self._runner = Sequence(self, timestamps=2, one_time=True)
        self.query_pool = self._runner.query_pool
        log.info("aule: Vulkan device %s (%s, %s) via %s", self.info.name, self.info.type,
                 self.info.driver, self.route)


    def pools(self):
        return [p for p in (self.pool, self.upload_pool, self.download_pool) if p is not None]

    def trim_pools(self):
        for p in self.pools():
            p.trim(0)

    def _forget_buffer(self, buf: Buffer) -> None:
        if not self._destroyed:
            self.descriptors.forget(buf._id)

    # pipelines --------------------------------------------------------------------------------
    def set_layout(self, n_bindings: int):
        return self.descriptors.layout(n_bindings)

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
                    raise error("vkCreatePipelineLayout", "VK_ERROR_FEATURE_NOT_PRESENT",
                                f"{name}: push constants of {push_size} bytes exceed the device's "
                                f"{self.info.max_push_constants}")
                p = Pipeline(self, name, code_loader(), n_bindings, push_size, spec)
                self.pipelines[key] = p
                self._pipeline_store.save()
            return p

    # execution --------------------------------------------------------------------------------
    def sequence(self, timestamps: int = 32) -> Sequence:
        """A new recorded sequence on this context (closed with it at the latest)."""
        seq = Sequence(self, timestamps=timestamps)
        self._sequences.add(seq)
        return seq

    def run(self, dispatches, uploads=(), downloads=(), timestamps: bool = False):
        """Record uploads (staging -> device copies), dispatches and downloads into one command
        buffer, submit, wait. Returns GPU nanoseconds between the first and last dispatch when
        ``timestamps`` and the queue supports them, else ``None``.

        ``uploads``/``downloads``: ``(src_buffer, dst_buffer, nbytes)`` copies. Dispatches of one
        run have no barrier between them (they write disjoint ranges); work whose later dispatches
        read what earlier ones wrote goes through :meth:`run_passes`.
        """
        return self.run_passes((dispatches,), uploads, downloads, timestamps)

    def run_passes(self, passes, uploads=(), downloads=(), timestamps: bool = False):
        """:meth:`run` for several passes in one submission: a compute barrier between
        consecutive passes makes each pass's shader writes visible to the next one's reads.
        Recorded on the context's reusable sequence, so a multi-pass call costs no extra
        command buffer, fence or submission."""
        with self.lock:
            seq = self._runner
            seq.reset()
            for src, dst, n in uploads:
                seq.copy(src, dst, n)
            if uploads:
                seq.barrier("transfer", "compute")
            timed = timestamps and self.query_pool is not None
            if timed:
                seq.timestamp()
            for i, dispatches in enumerate(passes):
                if i:
                    seq.barrier("compute", "compute")
                for d in dispatches:
                    seq.dispatch(d)
            if timed:
                seq.timestamp()
            if downloads:
                seq.barrier("compute", "transfer")
                for src, dst, n in downloads:
                    seq.copy(src, dst, n)
            seq.submit()
            return seq.gpu_ns() if timed else None

    # host <-> device -------------------------------------------------------------------------
    def upload(self, array: np.ndarray, lease: Lease | None = None) -> Lease:
        """A pooled device buffer (or ``lease``) holding ``array``'s bytes."""
        return _memory.upload(self, array, lease)

    def download(self, buf: Buffer, out: np.ndarray) -> np.ndarray:
        """Copy ``out.nbytes`` from the start of ``buf`` into the C-contiguous array ``out``."""
        return _memory.download(self, buf, out)

    # reporting and lifetime -------------------------------------------------------------------
    def take_validation_messages(self) -> list[str]:
        msgs = list(self.validation_messages)
        self.validation_messages.clear()
        return msgs

    def details(self) -> dict:
        return {
            "device": self.info.summary(),
            "devices": [d.summary() for _, d in self.devices],
            "route": self.route,
            "memory": self.memory.route,
            "validation": self.validation_active,
            "pipeline_cache": str(self.pipeline_cache_path),
        }

    def close(self):
        """Destroy everything (tests use it; the process-wide context lives until exit)."""
        _, ffi, lib = binding()
        with self.lock:
            if self._destroyed:
                return
            lib.vkDeviceWaitIdle(self.device)
            for seq in list(self._sequences):
                seq.close()
            self._runner.close()
            self.trim_pools()
            self._destroyed = True
            for p in self.pipelines.values():
                p.destroy()
            self.descriptors.destroy()
            self._pipeline_store.destroy()
            lib.vkDestroyDevice(self.device, ffi.NULL)
            self._instance.destroy()


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

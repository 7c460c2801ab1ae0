"""The process-wide Vulkan context: device, queue, memory, pools, caches, and the per-call path."""
from __future__ import annotations

import collections
import logging
import threading
import weakref

import numpy as np

from .... import settings
from . import device as _device
from . import memory as _memory
from .errors import binding, check, error
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
        # Runs seen again are recorded once into a sequence of their own and re-submitted: a
        # repeated call (the same pooled buffers, pushes and groups) costs no recording.
        self.reuse = s.reuse
        self._recordings: "collections.OrderedDict[tuple, Sequence]" = collections.OrderedDict()
        self._seen: "collections.OrderedDict[tuple, None]" = collections.OrderedDict()
        self._recordings_of: dict = {}  # buffer id -> keys of the recordings that bind it
        self._ids_of: dict = {}  # recording key -> ids of the buffers it binds
        self.stats = {"recorded": 0, "resubmitted": 0, "one_time": 0, "asynchronous": 0}
        # Calls on GpuTensors (nothing to read back) are submitted without waiting (run_passes'
        # ``keep``): each in flight is (serial, sequence, what it holds), oldest first, at most
        # INFLIGHT of them; ``retired`` is the serial up to which every submission has ended.
        self.asynchronous = s.asynchronous
        self._inflight: collections.deque = collections.deque()
        self._serial = 0
        self.retired = 0
        self._ring: list = []  # owned sequences for asynchronous runs seen once, used in turn
        self._ring_next = 0
        self.memory = _memory.MemoryPolicy(self.physical, s.staging)
        self.pool, self.upload_pool, self.download_pool = _memory.make_pools(self, self.memory)
        self.copier = _memory.Copier(s.copy_threads)
        # Transfers through staging larger than a chunk overlap their host copies with their DMA
        # (run_passes' up_chunks / down_chunks); where device memory is mapped, the upload route is
        # the setting's, or measured once (memory.staged_upload).
        self.chunk_bytes = s.chunk_bytes
        self.upload_setting = s.upload
        self.staged_uploads_faster: bool | None = None
        self._chunk_seqs: list = []  # one command buffer per chunk in flight, re-submitted when unchanged
        self._last_run: Sequence | None = None
        self.results = _memory.ResultPool()
        self._host_pointer_fn = None
        # Where the device can import host memory, the setting decides which transfers do
        # ("upload", "download"; the probe script sets ``host_import`` to compare them in one process).
        self.host_import_available = self._enable_host_import()
        self.host_import = s.host_import if self.host_import_available else frozenset()
        self._import_refused = False  # logged once, then copies serve
        # The per-call sequence, re-recorded by a run() seen for the first time; its queries are
        # the timing ones.
        self._runner = Sequence(self, timestamps=2, one_time=True)
        self.query_pool = self._runner.query_pool
        log.info("aule: Vulkan device %s (%s, %s) via %s", self.info.name, self.info.type,
                 self.info.driver, self.route)
        log.info("aule: Vulkan transfers: %s; uploads %s, downloads %s, through staging in chunks of %s; host "
                 "copies on %d thread(s); host-memory import %s; recordings %s; calls on GpuTensors %s",
                 self.memory.route,
                 self.upload_setting if self.upload_setting != "auto" else "staged where unmapped, else measured",
                 "staged" if self.download_pool else "read where mapped",
                 f"{self.chunk_bytes} bytes" if self.chunk_bytes else "one (chunking off)", self.copier.threads,
                 ("for %s (alignment %d)" % (" and ".join(sorted(self.host_import)), self.memory.import_alignment))
                 if self.host_import else
                 ("off (AULE_VULKAN_HOST_IMPORT=1 turns it on)" if self.host_import_available
                  else "unavailable (no VK_EXT_external_memory_host)"),
                 "re-submitted when repeated" if self.reuse else "made anew for every call",
                 f"asynchronous (up to {self.INFLIGHT} in flight)" if self.asynchronous
                 else "synchronous (AULE_VULKAN_ASYNC=0)")

    RECORDINGS = 32
    SEEN = 256
    INFLIGHT = 8

    def _enable_host_import(self) -> bool:
        """Whether host arrays can be imported (VK_EXT_external_memory_host, enabled with the
        device where listed); reads the import alignment into the memory policy."""
        if "VK_EXT_external_memory_host" not in self.info.extensions:
            return False
        vk, ffi, lib = binding()
        hp = _device._chain(ffi, "VkPhysicalDeviceExternalMemoryHostPropertiesEXT",
                            vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_EXTERNAL_MEMORY_HOST_PROPERTIES_EXT)
        props2 = _device._chain(ffi, "VkPhysicalDeviceProperties2", vk.VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, hp)
        lib.vkGetPhysicalDeviceProperties2(self.physical, props2)
        fn = lib.vkGetDeviceProcAddr(self.device, b"vkGetMemoryHostPointerPropertiesEXT")
        if fn == ffi.NULL or not hp.minImportedHostPointerAlignment:
            return False
        self._host_pointer_fn = ffi.cast("PFN_vkGetMemoryHostPointerPropertiesEXT", fn)
        self.memory.import_alignment = max(4096, int(hp.minImportedHostPointerAlignment))
        return True

    def host_pointer_types(self, address: int) -> int:
        """The memory type bits host memory at ``address`` can be imported as."""
        vk, ffi, _ = binding()
        props = ffi.new("VkMemoryHostPointerPropertiesEXT*",
                        {"sType": vk.VK_STRUCTURE_TYPE_MEMORY_HOST_POINTER_PROPERTIES_EXT})
        check("vkGetMemoryHostPointerPropertiesEXT", self._host_pointer_fn(
            self.device, vk.VK_EXTERNAL_MEMORY_HANDLE_TYPE_HOST_ALLOCATION_BIT_EXT, ffi.cast("void*", address), props))
        return props.memoryTypeBits


    def pools(self):
        return [p for p in (self.pool, self.upload_pool, self.download_pool) if p is not None]

    def trim_pools(self):
        for p in self.pools():
            p.trim(0)
        self.results.trim()

    def _forget_buffer(self, buf: Buffer) -> None:
        if not self._destroyed:
            self.descriptors.forget(buf._id)
            with self.lock:
                for key in self._recordings_of.pop(buf._id, ()):
                    seq = self._recordings.pop(key, None)
                    if seq is not None:
                        self._drop_recording(key, seq)

    def _drop_recording(self, key, seq) -> None:
        for part in self._ids_of.pop(key, ()):
            keys = self._recordings_of.get(part)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._recordings_of[part]
        seq.close()

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

    def run(self, dispatches, uploads=(), downloads=(), timestamps: bool = False, up_chunks=(), down_chunks=()):
        """Record uploads (staging -> device copies), dispatches and downloads into one command
        buffer, submit, wait. Returns GPU nanoseconds between the first and last dispatch when
        ``timestamps`` and the queue supports them, else ``None``.

        ``uploads``/``downloads``: ``(src_buffer, dst_buffer, nbytes)`` copies. Dispatches of one
        run have no barrier between them (they write disjoint ranges); work whose later dispatches
        read what earlier ones wrote goes through :meth:`run_passes`.
        """
        return self.run_passes((dispatches,), uploads, downloads, timestamps, up_chunks, down_chunks)

    def run_passes(self, passes, uploads=(), downloads=(), timestamps: bool = False, up_chunks=(), down_chunks=(),
                   keep=None):
        """:meth:`run` for several passes in one submission: a compute barrier between
        consecutive passes makes each pass's shader writes visible to the next one's reads.
        Recorded on the context's reusable sequence, so a multi-pass call costs no extra
        command buffer, fence or submission.

        ``up_chunks`` / ``down_chunks``: the :class:`memory.Chunk` s of transfers cut for overlap.
        Each upload chunk's host copy runs on the copy threads and its DMA is a submission of its
        own, made as soon as that copy is done, so copying chunk i+1 overlaps chunk i's DMA (a
        command buffer may not wait for an event the host sets after its submission). The run
        follows them on the queue. Each download chunk is a submission of its own after the run,
        all submitted at once; its host copy starts when its fence signals, while the next chunk's
        DMA runs. Whatever fails on the way, nothing is left in flight when this returns or raises:
        the caller may hand the buffers back at once.

        ``keep``: a list of what the run's buffers are held by (leases, transfers: anything with
        ``release()``), for a run that may end after this returns. When the context runs
        asynchronously and the run has nothing for the host (no downloads, no timestamps, no
        chunks), it is submitted without waiting: ``keep``'s items move to the submission (the
        list is emptied) and are released once its fence has signalled, and every buffer it binds
        carries its serial (``Buffer.busy``) so that host access waits for it. Returns None then."""
        with self.lock:
            if keep is not None and self.asynchronous and not (timestamps or downloads or up_chunks or down_chunks):
                self._submit_run(passes, uploads, (), False, False, False, keep)
                return None
            if timestamps and self._inflight:  # the first timestamp must not be taken while earlier work runs
                self.synchronize()
            timed = timestamps and self.query_pool is not None
            if not (up_chunks or down_chunks):
                seq = self._submit_run(passes, uploads, downloads, timed, False, True)
                return seq.gpu_ns() if timed else None
            try:
                self._send_chunks(up_chunks)
                seq = self._submit_run(passes, uploads, downloads, timed, bool(up_chunks), not down_chunks)
                self._receive_chunks(down_chunks, len(up_chunks))
            finally:
                self._settle()
            return seq.gpu_ns() if timed else None

    def _submit_run(self, passes, uploads, downloads, timed: bool, after_chunks: bool, wait: bool,
                    keep=None) -> Sequence:
        """Record (or find recorded) and submit one run, returning its sequence (its GPU time is
        read from it); ``after_chunks``: upload chunks submitted before it wrote its inputs (a
        transfer barrier opens it). Without ``wait`` the download chunks follow it on the queue
        before anything waits. With ``keep`` (a list), submitted asynchronously
        (:meth:`_submit_async`)."""
        key = _run_key(passes, uploads, downloads, timed, after_chunks) if self.reuse else None
        seq = self._recordings.get(key) if key is not None else None
        if seq is not None:
            self._recordings.move_to_end(key)
            self.stats["resubmitted"] += 1
        else:
            if key is not None and key in self._seen:
                del self._seen[key]
                seq = self._record_for(key, _buffer_ids(passes, uploads, downloads))
            else:
                if key is not None:
                    self._seen[key] = None
                    if len(self._seen) > self.SEEN:
                        self._seen.popitem(last=False)
                seq = self._runner if keep is None else self._ring_slot()
                seq.reset()
                self.stats["one_time"] += 1
            _record(seq, passes, uploads, downloads, timed, after_chunks, seq is not self._runner)
        if keep is None:
            seq.submit(wait=wait)
            self._last_run = seq
        else:
            self._submit_async(seq, keep)
        return seq

    def _ring_slot(self) -> Sequence:
        """The next sequence of the ring for an asynchronous run seen once (the context's one-time
        sequence binds cached descriptor sets that a later recording may free, so it serves only
        runs that are waited for); its last submission retired first."""
        ring = self._ring
        if len(ring) < self.INFLIGHT:
            ring.append(Sequence(self, timestamps=0))
            return ring[-1]
        seq = ring[self._ring_next]
        self._ring_next = (self._ring_next + 1) % len(ring)
        if seq._h.pending:
            self.wait_for(seq.serial)
        return seq

    def _submit_async(self, seq: Sequence, keep: list) -> None:
        """Submit ``seq`` without waiting: the ring full, its oldest submission is waited for first
        (so is ``seq``'s own last one, a command buffer being submittable once at a time). The
        submission's serial marks every buffer it binds; ``keep``'s items move to it."""
        inflight = self._inflight
        if seq._h.pending:
            self.wait_for(seq.serial)
        if len(inflight) >= self.INFLIGHT:
            self.wait_for(inflight[0][0])
        seq.submit(wait=False)
        serial = self._serial = self._serial + 1
        seq.serial = serial
        for b in seq.buffers:
            b.busy = serial
        held = ()
        if keep:
            held = list(keep)
            keep.clear()
        inflight.append((serial, seq, held))
        self.stats["asynchronous"] += 1

    def wait_for(self, serial: int) -> None:
        """Wait for every asynchronous submission up to ``serial``, oldest first, releasing what
        each held. A failed wait (device lost) raises its typed :class:`VulkanError` here, with that
        submission retired all the same."""
        with self.lock:
            inflight = self._inflight
            while inflight and inflight[0][0] <= serial:
                done, seq, held = inflight.popleft()
                try:
                    seq.wait()
                finally:
                    self.retired = done  # before the releases: a buffer destroyed by one needs no wait
                    for h in reversed(held):
                        h.release()
            if not inflight:
                self.retired = self._serial

    def synchronize(self) -> None:
        """Wait for every submission in flight (the results of every call made so far are ready)."""
        self.wait_for(self._serial)

    def _chunk_sequence(self, i: int, copy, before: str | None) -> Sequence:
        """Chunk ``i``'s command buffer holding the one ``copy``, re-recorded only when the copy
        changed (a repeated call moves the same chunks between the same pooled buffers);
        ``before``: the kind of earlier work its copy must follow ("compute" for a download)."""
        seqs = self._chunk_seqs
        while len(seqs) <= i:
            seqs.append(Sequence(self, timestamps=0))
        seq = seqs[i]
        key = (copy[0]._id, copy[1]._id) + tuple(copy[2:]) + (before,)
        if getattr(seq, "chunk_key", None) != key:
            seq.reset()
            seq.chunk_key = None
            if before is not None:
                seq.barrier(before, "transfer")
            seq.copy(*copy)
            seq.end()
            seq.chunk_key = key
        return seq

    def _send_chunks(self, chunks) -> None:
        """Start every upload chunk's host copy on the copy threads, then submit each chunk's DMA
        in order once its copy is done."""
        copier = self.copier
        threaded = copier.threads > 1
        pending, sent = [], 0
        try:
            if threaded:
                # The first chunk spread over every thread, so the first DMA starts soon; the rest
                # one chunk per thread, taken in order.
                for i, c in enumerate(chunks):
                    pending.append(copier.start(c.dst, c.src, not i))
            for i, c in enumerate(chunks):
                if threaded:
                    pending[i].result()
                else:
                    c.dst[...] = c.src
                self._chunk_sequence(i, c.copy, None).submit(wait=False)
                sent = i + 1
                c.done = True
        finally:  # after a failure, let the copies started end before their buffers go back
            for p in pending[sent:]:
                try:
                    p.result()
                except BaseException:  # noqa: BLE001 (the first failure is the one raised)
                    pass

    def _receive_chunks(self, chunks, first: int) -> None:
        """Submit every download chunk's DMA (chunk command buffers from ``first`` on), then copy
        each out as its fence signals, on the copy threads, while the next ones' DMA runs."""
        seqs = [self._chunk_sequence(first + i, c.copy, "compute") for i, c in enumerate(chunks)]
        for seq in seqs:
            seq.submit(wait=False)
        copier, pending = self.copier, []
        try:
            last = len(chunks) - 1
            for i, (seq, c) in enumerate(zip(seqs, chunks)):
                seq.wait()
                pending.append(copier.start(c.dst, c.src, i == last))  # the last one spread: it ends the call
        finally:
            _memory.Group(pending).result()  # every copy out ended, the first failure raised
        for c in chunks:
            c.done = True

    def _settle(self) -> None:
        """Wait for the run and every chunk command buffer submitted (a wait on one not in flight
        costs nothing): nothing of this run may still be in flight when its buffers go back."""
        for seq in self._chunk_seqs:
            seq.wait()
        if self._last_run is not None:
            self._last_run.wait()

    def _record_for(self, key, ids) -> Sequence:
        """A sequence of its own for a run seen before, kept under ``key`` (the least recently
        used recording makes room); ``ids``: the buffers it binds or copies."""
        if len(self._recordings) >= self.RECORDINGS:
            self._drop_recording(*self._recordings.popitem(last=False))
        seq = Sequence(self, timestamps=2)
        self._recordings[key] = seq
        self._ids_of[key] = ids
        for part in ids:
            self._recordings_of.setdefault(part, set()).add(key)
        self.stats["recorded"] += 1
        return seq

    def forget_recordings(self) -> None:
        """Drop every kept recording (the next runs record anew)."""
        with self.lock:
            while self._recordings:
                self._drop_recording(*self._recordings.popitem(last=False))
            self._seen.clear()

    # host <-> device -------------------------------------------------------------------------
    def stage(self, array: np.ndarray, lease: Lease | None = None):
        """``(lease, transfer)``: a pooled device buffer (or ``lease``) for ``array`` and the
        :class:`memory.Transfer` whose ``copies`` a run records as ``uploads`` to fill it."""
        return _memory.stage(self, array, lease)

    def readback(self, buf: Buffer, out: np.ndarray):
        """The :class:`memory.Transfer` whose ``copies`` a run records as ``downloads``; its
        ``finish()`` then returns ``out`` holding ``buf``'s first ``out.nbytes`` bytes."""
        return _memory.readback(self, buf, out)

    def host_empty(self, shape, dtype) -> np.ndarray:
        """An uninitialised result array (page-aligned where results are DMA'd into host memory)."""
        return _memory.host_empty(self, shape, dtype)

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
            "copy_threads": self.copier.threads,
            "host_import": (", ".join(sorted(self.host_import)) if self.host_import else
                            "off" if self.host_import_available else "unavailable (no VK_EXT_external_memory_host)"),
            "validation": self.validation_active,
            "calls_on_gpu_tensors": (f"asynchronous, up to {self.INFLIGHT} in flight" if self.asynchronous
                                     else "synchronous (AULE_VULKAN_ASYNC=0)"),
            "pipeline_cache": str(self.pipeline_cache_path),
        }

    def close(self):
        """Destroy everything (tests use it; the process-wide context lives until exit)."""
        _, ffi, lib = binding()
        with self.lock:
            if self._destroyed:
                return
            lib.vkDeviceWaitIdle(self.device)
            try:
                self.synchronize()  # every fence has signalled: this only releases what they held
            except Exception:  # noqa: BLE001 (closing regardless: a lost device is going away anyway)
                self._inflight.clear()
            for seq in self._ring:
                seq.close()
            self._ring.clear()
            for seq in list(self._sequences):
                seq.close()
            self.forget_recordings()
            for seq in self._chunk_seqs:
                seq.close()
            self._chunk_seqs.clear()
            self._runner.close()
            self.copier.close()
            for p in self.pools():
                p.destroy_all()
            self._destroyed = True
            for p in self.pipelines.values():
                p.destroy()
            self.descriptors.destroy()
            self._pipeline_store.destroy()
            lib.vkDestroyDevice(self.device, ffi.NULL)
            self._instance.destroy()


def _run_key(passes, uploads, downloads, timed, after_chunks=False) -> tuple:
    """What a run records, as a hashable key: copies by their buffers' never-reused ids, each
    dispatch by its :meth:`Dispatch.run_key`; the ints 0 and -1 separate the parts."""
    key = [timed, after_chunks]
    for c in uploads:
        key += (c[0]._id, c[1]._id, c[2:])
    for dispatches in passes:
        key.append(0)
        key += [d.run_key() for d in dispatches]
    key.append(-1)
    for c in downloads:
        key += (c[0]._id, c[1]._id, c[2:])
    return tuple(key)


def _buffer_ids(passes, uploads, downloads) -> frozenset:
    """The ids of every buffer a run binds or copies, so that destroying one drops its recordings."""
    ids = {c[i]._id for c in (*uploads, *downloads) for i in (0, 1)}
    ids.update(b._id for dispatches in passes for d in dispatches for b, _, _ in d.bindings)
    return frozenset(ids)


def _record(seq, passes, uploads, downloads, timed, after_chunks=False, ordered=False) -> None:
    """Record a run: uploads, a barrier, the passes (a compute barrier between consecutive ones),
    a barrier, downloads; timestamps around the passes when ``timed``. ``after_chunks``: copies
    submitted before it wrote inputs, so the barrier after uploads is there even without any.

    ``ordered``: a recording that may be submitted while earlier submissions still run opens with
    a barrier from every earlier copy and shader to its own. Submissions on one queue start in
    order but may overlap, and this one may read what they write (a chain of calls), write what
    they read (a pooled output buffer) or write what they write. A barrier in the command buffer
    costs no host time per submission, where a timeline semaphore would add a wait and a signal to
    every vkQueueSubmit; the order it gives is the queue's, which is the order of the calls."""
    if ordered:
        seq.barrier(("compute", "transfer"), ("compute", "transfer"))
        seq.ordered = True
    for c in uploads:
        seq.copy(*c)
    if uploads or after_chunks:
        seq.barrier("transfer", "compute")
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
        for c in downloads:
            seq.copy(*c)


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

"""The error flags of the Triton kernels: what a kernel found wrong in the tables and values it was
handed unread (the paged kernels' tables, the dense and varlen kernels' cu_seqlens, sinks and slopes),
read by the host without a synchronisation.

A kernel that meets an out-of-range block id, context length, query offset or slot does not follow it
(a bad sequence offset, likewise; a non-finite sink or slope is only reported) and records ``(code, index, index, value)`` in a *flag*: one row of a small int64 table that lives in
pinned host memory, which a CUDA kernel writes through its unified address and the host reads
as ordinary memory (on the CPU, under Triton's interpreter, it is ordinary memory). The first
error of a launch wins the row (compare-and-swap on the code); the kernel then sets the row's
``done`` word with release semantics at system scope, so a host that sees ``done`` sees the rest.

Every checking kernel also sets its chunk's ``dirty`` word (row 0) after an error, so a poll, which
every aule call makes, reads one word per chunk and scans the chunk's rows only after an error: an
error is raised by the first aule call that finds it written, whatever else is still running. Rows
have two lifetimes:

- an eager launch takes a row and gives it back once its kernels have finished, which an event
  tells: eager rows are given back in batches of :data:`BATCH` launches on one stream, behind one
  event recorded after the last of them (``Event.query``, never a wait), so a launch costs neither
  an event nor a query of its own. A row reported early keeps its code word until it is given back,
  so the launch's later finds lose the race for it, as they would on a row read after the kernel;
- a launch captured into a CUDA graph keeps its row for good (the graph replays into it); the row
  is cleared once reported, ready for the next replay.
"""
from __future__ import annotations

import collections
import logging
import threading

import numpy as np

from ... import device_errors, settings
from ...call import cu_seqlens_problem, not_finite

log = logging.getLogger("aule")

FIELDS = 8  # int64 words per row: code, index 0, index 1, value, done, padding to 64 bytes
CODE, I0, I1, VALUE, DONE = range(5)
BLOCK_ID, CONTEXT_LEN, SLOT = 1, 2, 3  # the kernels' error codes (constexprs in paged.py)
# A packed call's query_start_loc: a bad offset (index 1 says which rule), a sequence with more
# rows than keys (index 1: its context length), or than the launch's bound (index 1: max_query_len).
QUERY_START, QUERY_ROWS, QUERY_BOUND = 4, 5, 6
_QUERY_START_RULES = {0: "must start at 0", 1: "must be non-decreasing: it is below query_start_loc[{p}]",
                      2: "is past num_tokens = {t} (q.shape[0], the packed rows)",
                      3: "must end at num_tokens = {t} (q.shape[0]) as the last offset"}
# Values the dense and varlen kernels check (a call's device_values): a non-finite sink (index 0: the
# head) or ALiBi slope (indices: batch entry, head), the value as its float32 bits; a broken
# cu_seqlens rule, index 0 being 2 * offset index + side (0: q, 1: k), index 1 the offset before
# (CU_ORDER) or max_seqlen (CU_LONG, whose index is the sequence's and whose value its length).
SINK, SLOPE = 7, 8
CU_START, CU_ORDER, CU_PAST, CU_END, CU_LONG = 9, 10, 11, 12, 13
_CU_RULES = {CU_START: "start", CU_ORDER: "order", CU_PAST: "past", CU_END: "end", CU_LONG: "long"}
CHUNK_ROWS = 1024  # row 0 of a chunk is its header: [dirty, ...]
RESERVE = 64  # free rows kept in hand, so a graph capture (which cannot pin memory) finds one
BATCH = 32  # eager rows of one stream given back together, behind one event


class Flag:
    """One launch's row: ``err`` and ``dirty`` are the tensors its kernels write."""

    # A plain class with slots: one is made per checked launch, eager decode steps included.
    __slots__ = ("chunk", "row", "err", "dirty", "meta", "captured")

    def __init__(self, chunk: "_Chunk", row: int, err, dirty, meta: dict, captured: bool):
        self.chunk, self.row, self.err, self.dirty, self.meta, self.captured = chunk, row, err, dirty, meta, captured


class _Chunk:
    def __init__(self, torch, pinned: bool):
        self.t = torch.zeros((CHUNK_ROWS, FIELDS), dtype=torch.int64, pin_memory=pinned)
        self.np = self.t.numpy()  # the same memory, read and cleared without any CUDA call
        self.rows = [None] * CHUNK_ROWS  # row views, made once: a view costs a microsecond per call
        self.dirty = self.t[0]  # 16-byte aligned, as every row: Triton specialises pointers by alignment
        self.free = list(range(CHUNK_ROWS - 1, 0, -1))
        self.captured: dict = {}  # row -> meta of a launch inside a CUDA graph
        self.held: list = [None] * CHUNK_ROWS  # row -> meta of the eager launch holding it

    def view(self, row):
        if self.rows[row] is None:
            self.rows[row] = self.t[row]
        return self.rows[row]


def describe(record, meta: dict) -> str:
    """The ``ValueError`` message for one recorded row."""
    code, i0, i1, value = (int(x) for x in record[:4])
    done = "which did not follow it" if code not in (SINK, SLOPE) else "which cannot raise"
    where = (f". Found on {meta['device']} by the {meta['kernel']} kernel, {done}, and raised "
             "by the first aule call after that kernel finished (AULE_CHECK_SYNC=1 raises in the launching call)")
    if code == BLOCK_ID:
        return (f"block_tables[{i0}, {i1}] = {value} is outside [0, num_blocks={meta['num_blocks']}): "
                f"the first ceil(context_lens[b] / block_size) entries of row b must be block ids{where}")
    if code == CONTEXT_LEN:
        cap = meta["max_blocks"] * meta["block_size"]
        return (f"context_lens[{i0}] = {value} is outside [0, max_blocks * block_size = {meta['max_blocks']} * "
                f"{meta['block_size']} = {cap}], the block table's capacity{where}")
    if code == SLOT:
        return (f"slot_mapping[{i0}] = {value} is outside the cache's num_blocks * block_size = "
                f"{meta['capacity']} slots (negative slots are skipped){where}")
    if code == QUERY_START:
        rule = _QUERY_START_RULES.get(i1, "breaks the offsets' rules").format(p=i0 - 1, t=meta["num_tokens"])
        return (f"query_start_loc[{i0}] = {value} {rule}; query_start_loc runs from 0, never decreasing, to "
                f"num_tokens = {meta['num_tokens']}{where}")
    if code == QUERY_ROWS:
        return (f"sequence {i0} has {value} query rows (query_start_loc[{i0 + 1}] - query_start_loc[{i0}]) but "
                f"context_lens[{i0}] = {i1}: its rows are its last positions, so there may be at most "
                f"context_lens[b] of them{where}")
    if code == QUERY_BOUND:
        return (f"sequence {i0} has {value} query rows (query_start_loc[{i0 + 1}] - query_start_loc[{i0}]), more "
                f"than max_query_len = {i1}, which sized the launch: its rows past the bound were not "
                f"computed{where}")
    if code in (SINK, SLOPE):
        name, at = ("sinks", (i0,)) if code == SINK else ("alibi_slopes", (i0, i1)[-meta["alibi_ndim"]:])
        return not_finite(name, at, np.array([value], np.int64).astype(np.int32).view(np.float32)[0]) + where
    if code in _CU_RULES:
        side = i0 & 1
        total, bound = (meta["total_q"], meta["max_q"]) if side == 0 else (meta["total_k"], meta["max_k"])
        return cu_seqlens_problem(_CU_RULES[code], side, i0 >> 1, value, i1, total, bound) + where
    return f"unknown device error code {code} at ({i0}, {i1}), value {value}{where}"


class ErrorFlags:
    """Every flag row of this process (pinned memory is visible to every device)."""

    def __init__(self, torch, pinned: bool):
        self._torch = torch
        self._pinned = pinned
        self._chunks: list = []
        self._free = 0  # free rows of all chunks
        self._held = 0  # rows of eager launches not given back yet
        self._open: dict = {}  # (device, stream) -> eager launches on it not yet behind an event
        self._inflight: collections.deque = collections.deque()  # (event or None, launches), in order
        self._lock = threading.Lock()
        self._graphs = False  # whether some row was taken inside a CUDA graph capture (kept for good)
        self._found: list = []  # messages found while giving rows back outside a poll
        self._stream = torch._C._cuda_getCurrentRawStream if pinned else None

    def _capturing(self) -> bool:
        return self._pinned and self._torch.cuda.is_current_stream_capturing()

    def acquire(self, meta: dict) -> Flag:
        """A cleared row for one launch; ``meta`` (kernel, device, table sizes) words its error
        (read only when it is reported: one dict may serve many rows)."""
        captured = self._capturing()
        with self._lock:
            chunk = None
            if self._free >= RESERVE or (captured and self._free):
                # Within a capture a new chunk only as a last resort: pinning memory may be refused there.
                for c in self._chunks:
                    if c.free:
                        chunk = c
                        break
            if chunk is None:
                chunk = _Chunk(self._torch, self._pinned)
                self._chunks.append(chunk)
                self._free += CHUNK_ROWS - 1
            row = chunk.free.pop()
            self._free -= 1
            if captured:
                chunk.captured[row] = meta
                self._graphs = True
            else:
                chunk.held[row] = meta
                self._held += 1
        return Flag(chunk, row, chunk.view(row), chunk.dirty, meta, captured)

    def launched(self, flag: Flag, device, sync=None) -> None:
        """After the launch's last kernel: its row joins its stream's batch, given back behind one
        event (:data:`BATCH`). ``sync``: :func:`aule.settings.check_sync` when the caller knows it
        (None: read it)."""
        if flag.captured:
            return  # replays report through the chunk's dirty word; nothing may wait in a capture
        if not self._pinned:  # the interpreter ran the kernels before returning: done already
            with self._lock:
                self._inflight.append((None, (flag,)))
        else:
            index = device.index or 0
            where = (index, self._stream(index))
            with self._lock:
                batch = self._open.get(where)
                if batch is None:
                    batch = self._open[where] = []
                batch.append(flag)
                full = len(batch) >= BATCH
                if full:
                    del self._open[where]
            if full:
                event = self._torch.cuda.Event()
                event.record(self._torch.cuda.current_stream(device))
                with self._lock:
                    self._inflight.append((event, batch))
                found = self._give_back(query=True, finished=False)
                if found:
                    with self._lock:
                        self._found += found  # raised by the next poll, as the dirty words' are
        if settings.check_sync() if sync is None else sync:
            device_errors.raise_pending(wait=True)

    def _give_back(self, query: bool, finished: bool) -> list:
        """Give back the rows of eager launches whose kernels have finished, in the order their
        batches were recorded: batches without an event, those whose event has completed
        (``query``: asked, never waited for) and, ``finished`` (after a synchronisation), all.
        Returns the messages of errors they hold that the dirty words did not show yet."""
        found = []
        capturing = None
        with self._lock:
            if finished:
                self._inflight.extend((None, batch) for batch in self._open.values())
                self._open.clear()
            while self._inflight:
                event, batch = self._inflight[0]
                if event is not None and not finished:
                    if not query:
                        break
                    if capturing is None:
                        # Querying an event is not allowed while a graph is captured (global capture mode).
                        capturing = self._capturing()
                    if capturing or not event.query():
                        break
                self._inflight.popleft()
                for flag in batch:
                    chunk, row = flag.chunk, flag.row
                    table = chunk.np
                    # A row no kernel wrote to (every launch's, but for errors) is still clear:
                    # two words read, nothing written.
                    if table[row, DONE] or table[row, CODE]:
                        if table[row, DONE]:
                            found.append(describe(table[row], flag.meta))
                        table[row] = 0
                    chunk.held[row] = None
                    chunk.free.append(row)
                self._free += len(batch)
                self._held -= len(batch)
        return found

    def poll(self, wait: bool) -> list:
        """Messages of the errors kernels have recorded so far (``wait``: wait for every kernel
        first, and give back every eager row)."""
        if not (wait or self._held or self._graphs or self._found):
            # Every aule call asks: with no eager row held and no graph's rows to read there is
            # nothing to look at. A launch another thread is adding now is read next time.
            return []
        capturing = wait and self._capturing()
        if wait and self._pinned and not capturing:
            for index in range(self._torch.cuda.device_count()):  # graph replays too, which no event follows
                self._torch.cuda.synchronize(index)
        with self._lock:
            found, self._found = self._found, []
            for chunk in self._chunks:
                table = chunk.np
                if table[0, 0]:
                    table[0, 0] = 0  # cleared before the scan: an error set meanwhile is seen next time
                    for row in (np.flatnonzero(table[1:, DONE]) + 1).tolist():
                        meta = chunk.captured.get(row)
                        if meta is not None:
                            found.append(describe(table[row], meta))
                            table[row] = 0
                        elif chunk.held[row] is not None:
                            found.append(describe(table[row], chunk.held[row]))
                            table[row, DONE] = 0  # the code word stays until the row is given back
        return found + self._give_back(query=False, finished=wait and not capturing)


_flags: ErrorFlags | None = None
_flags_lock = threading.Lock()


def error_flags() -> ErrorFlags:
    """The process's flags, made on first use and registered with :mod:`aule.device_errors`."""
    global _flags
    if _flags is None:
        with _flags_lock:
            if _flags is None:
                import torch

                from .common import interpreting

                flags = ErrorFlags(torch, pinned=torch.cuda.is_available() and not interpreting())
                device_errors.register(flags)
                _flags = flags
    return _flags


def open_flag(check: bool, fallback, **meta):
    """``(flag, err, dirty)`` for a launch: a flag row when its kernels check what they read, else
    ``fallback`` (any tensor of the launch, never written) for both pointers."""
    if not check:
        return None, fallback, fallback
    flag = error_flags().acquire(meta)
    return flag, flag.err, flag.dirty


def close_flag(flag, device) -> None:
    """After the launch's last kernel (nothing without a flag)."""
    if flag is not None:
        error_flags().launched(flag, device)

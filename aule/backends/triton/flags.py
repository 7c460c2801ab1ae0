"""The error flags of the Triton kernels: what a kernel found wrong in the tables and values it was
handed unread (the paged kernels' tables, the dense and varlen kernels' cu_seqlens, sinks and slopes),
read by the host without a synchronisation.

A kernel that meets an out-of-range block id, context length, query offset or slot does not follow it
(a bad sequence offset, likewise; a non-finite sink or slope is only reported) and records ``(code, index, index, value)`` in a *flag*: one row of a small int64 table that lives in
pinned host memory, which a CUDA kernel writes through its unified address and the host reads
as ordinary memory (on the CPU, under Triton's interpreter, it is ordinary memory). The first
error of a launch wins the row (compare-and-swap on the code); the kernel then sets the row's
``done`` word with release semantics at system scope, so a host that sees ``done`` sees the rest.

Two lifetimes:

- an eager launch takes a row, records an event after its kernels, and gives the row back once
  :meth:`ErrorFlags.poll` finds the event complete (``Event.query``, never a wait), reporting what
  the row holds;
- a launch captured into a CUDA graph keeps its row for good (the graph replays into it). Such
  kernels also set their chunk's ``dirty`` word, so a poll reads one word per chunk and scans
  the rows only after an error; the row is cleared once reported, ready for the next replay.

The rows of eager launches are handed to kernels with a scratch word in place of ``dirty``:
their errors are reported through their events.
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
CHUNK_ROWS = 1024  # row 0 of a chunk is its header: [dirty, -, scratch]
RESERVE = 64  # free rows kept in hand, so a graph capture (which cannot pin memory) finds one


class Flag:
    """One launch's row: ``err`` and ``dirty`` are the tensors its kernels write."""

    # A plain class with slots: one is made per checked launch, eager decode steps included.
    __slots__ = ("chunk", "row", "err", "dirty", "meta", "captured", "event")

    def __init__(self, chunk: "_Chunk", row: int, err, dirty, meta: dict, captured: bool):
        self.chunk, self.row, self.err, self.dirty, self.meta, self.captured = chunk, row, err, dirty, meta, captured
        self.event = None


class _Chunk:
    def __init__(self, torch, pinned: bool):
        self.t = torch.zeros((CHUNK_ROWS, FIELDS), dtype=torch.int64, pin_memory=pinned)
        self.np = self.t.numpy()  # the same memory, read and cleared without any CUDA call
        self.rows = [None] * CHUNK_ROWS  # row views, made once: a view costs a microsecond per call
        self.events = [None] * CHUNK_ROWS  # one reusable CUDA event per row, made on first use
        # Both 16-byte aligned, as Triton specialises pointers by alignment: a captured launch then
        # reuses the kernel its eager warm-up compiled instead of compiling inside the capture.
        self.dirty, self.scratch = self.t[0, 0:], self.t[0, 2:]
        self.free = list(range(CHUNK_ROWS - 1, 0, -1))
        self.captured: dict = {}  # row -> meta of a launch inside a CUDA graph

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
        self._inflight: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._graphs = False  # whether some row was taken inside a CUDA graph capture (kept for good)

    def _capturing(self) -> bool:
        return self._pinned and self._torch.cuda.is_current_stream_capturing()

    def acquire(self, meta: dict) -> Flag:
        """A cleared row for one launch; ``meta`` (kernel, device, table sizes) words its error
        (read only when it is reported: one dict may serve many rows)."""
        captured = self._capturing()
        with self._lock:
            if self._free == 0 or (self._free < RESERVE and not captured):
                # Within a capture only as a last resort: pinning memory may be refused there.
                self._chunks.append(_Chunk(self._torch, self._pinned))
                self._free += CHUNK_ROWS - 1
            for chunk in self._chunks:
                if chunk.free:
                    break
            row = chunk.free.pop()
            self._free -= 1
            if captured:
                chunk.captured[row] = meta
                self._graphs = True
        return Flag(chunk, row, chunk.view(row), chunk.dirty if captured else chunk.scratch, meta, captured)

    def launched(self, flag: Flag, device, sync=None) -> None:
        """After the launch's last kernel: watch its row (an event, or the graph's dirty word).
        ``sync``: :func:`aule.settings.check_sync` when the caller knows it (None: read it)."""
        if flag.captured:
            return  # replays report through the chunk's dirty word; nothing may wait in a capture
        if self._pinned:
            chunk, row = flag.chunk, flag.row
            event = chunk.events[row]
            if event is None:
                event = chunk.events[row] = self._torch.cuda.Event()
            flag.event = event
            event.record(self._torch.cuda.current_stream(device))
        with self._lock:
            self._inflight.append(flag)
        if settings.check_sync() if sync is None else sync:
            device_errors.raise_pending(wait=True)

    def poll(self, wait: bool) -> list:
        """Messages of the errors in rows whose kernels have finished (``wait``: wait for them)."""
        if not (wait or self._inflight or self._graphs):
            # Every aule call asks: with no eager launch in flight and no graph's rows to read
            # there is nothing to look at. A launch another thread is adding now is read next time.
            return []
        capturing = (wait or bool(self._inflight)) and self._capturing()
        if wait and self._pinned and not capturing:
            for index in range(self._torch.cuda.device_count()):  # graph replays too, which no event follows
                self._torch.cuda.synchronize(index)
        found = []
        with self._lock:
            while self._inflight:
                flag = self._inflight[0]
                # Querying an event is not allowed while a graph is captured (global capture mode);
                # a stream runs its launches in order, so the first unfinished one ends the scan.
                if flag.event is not None and (capturing or not flag.event.query()):
                    break
                self._inflight.popleft()
                table, row = flag.chunk.np, flag.row
                # A row no kernel wrote to (every call's, but for errors) is still clear: two words
                # read, nothing written, on the path each eager launch takes.
                if table[row, DONE] or table[row, CODE]:
                    if table[row, DONE]:
                        found.append(describe(table[row], flag.meta))
                    table[row] = 0
                flag.chunk.free.append(row)
                self._free += 1
            for chunk in self._chunks:
                if chunk.np[0, 0]:
                    chunk.np[0, 0] = 0  # cleared before the scan: an error set meanwhile is seen next time
                    for row, meta in sorted(chunk.captured.items()):
                        record = chunk.np[row]
                        if record[DONE]:
                            found.append(describe(record, meta))
                            record[:] = 0
        return found


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

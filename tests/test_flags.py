"""The error flags' bookkeeping as a GPU runs it (aule.backends.triton.flags with pinned rows):
eager rows given back in batches behind one event per stream, errors read through the chunks'
dirty words while rows are held, each reported once, a capture's rows kept. Without a GPU the CUDA
calls are a stand-in whose events complete when the test says, so the logic that only runs on a
GPU is checked on every machine; the kernels' side of a row is written as devcheck.record does."""
from __future__ import annotations

import types

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from aule.backends.triton import flags  # noqa: E402


class FakeCuda:
    """``torch.cuda`` as ErrorFlags uses it: events that complete when ``done`` is set, streams
    named by the test, counts of the calls that cost a driver round trip."""

    def __init__(self):
        self.stream = 0
        self.capturing = False
        self.calls = {"record": 0, "query": 0, "synchronize": 0}
        self.events = []
        cuda = self

        class Event:
            def __init__(self):
                self.done, self.stream = False, None
                cuda.events.append(self)

            def record(self, stream):
                cuda.calls["record"] += 1
                self.stream = stream

            def query(self):
                cuda.calls["query"] += 1
                return self.done

        self.Event = Event

    def current_stream(self, device):
        return ("stream", device.index, self.stream)

    def is_current_stream_capturing(self):
        return self.capturing

    def device_count(self):
        return 1

    def synchronize(self, index):
        self.calls["synchronize"] += 1
        for e in self.events:
            e.done = True


@pytest.fixture
def gpu():
    """``(ErrorFlags with pinned rows over the stand-in, the stand-in)``."""
    cuda = FakeCuda()
    fake = types.SimpleNamespace(
        cuda=cuda, int64=torch.int64,
        zeros=lambda shape, dtype, pin_memory: torch.zeros(shape, dtype=dtype),
        _C=types.SimpleNamespace(_cuda_getCurrentRawStream=lambda index: 1000 * index + cuda.stream))
    return flags.ErrorFlags(fake, pinned=True), cuda


DEVICE = torch.device("cpu")  # its index (None) is device 0, as for the first GPU
META = {"kernel": "KV write", "device": "cuda:0", "capacity": 64}


def _launch(errors, n=1):
    out = []
    for _ in range(n):
        flag = errors.acquire(META)
        errors.launched(flag, DEVICE, sync=False)
        out.append(flag)
    return out


def _record(flag, value, dirty=True):
    """What devcheck.record does on the device: the first error of the launch wins the row."""
    row = flag.chunk.np[flag.row]
    if row[flags.CODE] == 0:
        row[:4] = (flags.SLOT, 7, 0, value)
        row[flags.DONE] = 1
        if dirty:
            flag.chunk.np[0, 0] = 1


def _free(errors):
    return sum(len(c.free) for c in errors._chunks)


def test_eager_rows_cost_no_event_of_their_own_and_come_back_in_batches(gpu):
    errors, cuda = gpu
    taken = _launch(errors, 2 * flags.BATCH + 5)
    assert cuda.calls["record"] == 2 and len(cuda.events) == 2, "one event per full batch"
    assert errors.poll(False) == [] and cuda.calls["query"] <= 2, "a poll reads words, it asks no event"
    free = _free(errors)
    assert errors._held == len(taken)
    cuda.events[0].done = True
    _launch(errors, flags.BATCH - 5)  # fills the open batch: its event, then the first batch given back
    assert _free(errors) == free - (flags.BATCH - 5) + flags.BATCH
    assert errors._held == len(taken) + flags.BATCH - 5 - flags.BATCH
    assert {f.row for f in taken[:flags.BATCH]} <= set(taken[0].chunk.free)
    errors.poll(True)  # after a synchronisation every row comes back
    assert errors._held == 0 and cuda.calls["synchronize"] == 1


def test_an_error_is_raised_while_its_row_is_held_and_only_once(gpu):
    errors, cuda = gpu
    taken = _launch(errors, 5)
    _record(taken[3], 99)
    found = errors.poll(False)
    assert len(found) == 1 and "slot_mapping[7] = 99" in found[0]
    _record(taken[3], 123)  # a later program of the same launch: it loses the race for the row
    assert errors.poll(False) == []
    errors.poll(True)  # given back: cleared, reported no second time
    assert not taken[3].chunk.np[taken[3].row].any()
    again = _launch(errors, 1)[0]
    assert again.row == taken[3].row or not again.chunk.np[again.row].any()


def test_an_error_the_dirty_word_missed_is_raised_when_its_row_comes_back(gpu):
    errors, cuda = gpu
    taken = _launch(errors, flags.BATCH)
    _record(taken[1], 41, dirty=False)
    assert errors.poll(False) == []
    cuda.events[0].done = True
    _launch(errors, flags.BATCH)  # the next batch's event: the first batch comes back, its error found
    found = errors.poll(False)
    assert len(found) == 1 and "= 41" in found[0]
    errors.poll(True)


def test_each_stream_has_its_batch_and_its_event(gpu):
    errors, cuda = gpu
    _launch(errors, flags.BATCH - 1)
    cuda.stream = 5
    _launch(errors, flags.BATCH)
    assert len(cuda.events) == 1 and cuda.events[0].stream == ("stream", None, 5)
    cuda.stream = 0
    _launch(errors, 1)
    assert len(cuda.events) == 2 and cuda.events[1].stream == ("stream", None, 0)
    cuda.events[1].done = True  # stream 0's batch done, stream 5's (recorded first) not yet
    _launch(errors, flags.BATCH)  # a third event: the scan stops at the first unfinished batch
    assert errors._held == 3 * flags.BATCH
    errors.poll(True)
    assert errors._held == 0


def test_captured_rows_are_kept_and_report_every_replay(gpu):
    errors, cuda = gpu
    cuda.capturing = True
    flag = errors.acquire(META)
    errors.launched(flag, DEVICE, sync=False)
    cuda.capturing = False
    assert flag.captured and errors._held == 0 and cuda.calls["record"] == 0
    for value in (3, 4):  # two replays, each finding an error
        _record(flag, value)
        found = errors.poll(False)
        assert len(found) == 1 and f"= {value}" in found[0]
    errors.poll(True)
    assert flag.row not in flag.chunk.free


def test_no_event_is_asked_while_a_graph_is_captured(gpu):
    errors, cuda = gpu
    _launch(errors, flags.BATCH)
    cuda.events[0].done = True
    cuda.capturing = True
    queries = cuda.calls["query"]
    flag = errors.acquire(META)  # a captured launch: no batch, no event
    errors.launched(flag, DEVICE, sync=False)
    assert errors.poll(True) == [] and cuda.calls["query"] == queries and cuda.calls["synchronize"] == 0
    cuda.capturing = False
    errors.poll(True)
    assert errors._held == 0


def test_rows_are_never_short_and_a_capture_finds_one(gpu):
    errors, cuda = gpu
    _launch(errors, flags.CHUNK_ROWS + 10)  # more launches in flight than a chunk holds
    assert len(errors._chunks) >= 2 and errors._free >= flags.RESERVE - 1
    rows = {(id(c), r) for c in errors._chunks for r in range(1, flags.CHUNK_ROWS) if c.held[r] is not None}
    assert len(rows) == flags.CHUNK_ROWS + 10, "each launch in flight holds a row of its own"
    errors.poll(True)
    assert errors._free == sum(len(c.free) for c in errors._chunks) == len(errors._chunks) * (flags.CHUNK_ROWS - 1)
    assert np.all([c.held[r] is None for c in errors._chunks for r in range(flags.CHUNK_ROWS)])

"""Recorded work that the benchmarks time on the device: one attention call repeated back to back
in one submission, and the matrix-core peak loop (glsl/coopmat_peak.comp).

Each is recorded once into a :class:`~.runtime.Sequence` of its own and re-submitted; every
submission reports the GPU time between the timestamps around its work. How long to warm up and
how many submissions to take is the benchmark's business (aule/bench/timing.py).
"""
from __future__ import annotations

import numpy as np

from ...errors import UnsupportedError
from . import launch
from .shaders import MODULES, PEAK_PUSH, VARIANTS, pipeline


class TimedWork:
    """A recorded sequence whose every submission runs ``calls`` equal calls between two
    timestamps; ``owned`` (GpuTensors, leases) are given back at :meth:`close`."""

    def __init__(self, seq, calls: int, owned=()):
        self.seq, self.calls, self._owned = seq, calls, [x for x in owned if x is not None]

    def ms(self) -> float | None:
        """Submit once more and wait; GPU milliseconds per call (None without timestamps)."""
        ns = self.seq.submit().gpu_ns()
        return None if ns is None else ns / self.calls / 1e6

    def close(self) -> None:
        self.seq.close()
        for x in self._owned:
            (x.free if hasattr(x, "free") else x.release)()
        self._owned = []


def repeated_attention(call, ctx, repeat: int) -> TimedWork:
    """A GpuTensor call's dispatches recorded ``repeat`` times in one command buffer, a compute
    barrier between repeats as between separate calls (each repeat rewrites the same output), so
    the device runs them without the host gaps of separate submissions."""
    if call.kind != "gpu":
        raise TypeError("repeated_attention records GpuTensor calls only (host arrays are uploaded per call)")
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    extras = launch.extras_array(call)
    lease = ctx.upload(extras) if extras is not None else None
    out, lse, dispatches = launch.gpu_dispatches(call, ctx, lease.buffer if lease is not None else None)
    seq = ctx.sequence(timestamps=2)
    seq.timestamp()
    for i in range(repeat):
        if i:
            seq.barrier("compute", "compute")
        for d in dispatches:
            seq.dispatch(d)
    seq.timestamp()
    return TimedWork(seq.end(), repeat, (out, lse, lease))


def repeated_paged_attention(call, ctx, repeat: int) -> TimedWork:
    """A paged call's passes (attention, and the merge of its splits) recorded ``repeat`` times in
    one command buffer, a compute barrier after every pass as between separate calls. The leases
    its dispatches bind stay held until :meth:`TimedWork.close`; ``.out`` is its output buffer (a
    GpuTensor for GpuTensor q)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, got {repeat}")
    held = launch._Held()
    try:
        passes, out, plan = launch.paged_passes(call, ctx, held)
    except BaseException:
        held.__exit__(None, None, None)
        raise
    seq = ctx.sequence(timestamps=2)
    seq.timestamp()
    for i in range(repeat):
        for k, dispatches in enumerate(passes):
            if i or k:
                seq.barrier("compute", "compute")
            for d in dispatches:
                seq.dispatch(d)
    seq.timestamp()
    work = TimedWork(seq.end(), repeat, [out if hasattr(out, "free") else None] + list(reversed(held)))
    work.out, work.plan = out, plan
    return work


# --- the matrix-core ceiling --------------------------------------------------------------------------

PEAK_SUBGROUPS = 4      # subgroups per workgroup
PEAK_ACCUMULATORS = 8   # NACC in glsl/coopmat_peak.comp
# Workgroups per dispatch: more than any current GPU holds at once (an H200 holds at most 2112 of
# 128 invocations), so the device is full; the ones that start late find the work taken.
PEAK_GROUPS = 8192
PEAK_CHUNK_ITERS = 64   # steps per chunk of work: the counter is touched once per ~0.5 M FLOP per lane


def peak_shape(info) -> tuple:
    """The (M, N, K) the cooperative-matrix attention variant uses at head_dim 128 on the device:
    the shape its rows are read against. UnsupportedError says why there is none."""
    # The shape alone: which softmax path the variant could take on this device does not matter here.
    coop = VARIANTS["coopmat"]
    why = MODULES["coopmat_peak"].needs.unfit("coopmat_peak", info) or coop.needs.unfit("coopmat", info)
    picked = None if why else coop.path.pick(128, info, None)
    if picked is None:
        raise UnsupportedError(why or f"coopmat has no matrix shape and tiles for head_dim 128 on {info.name}")
    return picked[0]


class CoopMatPeak(TimedWork):
    """One dispatch of glsl/coopmat_peak.comp handing out ``chunks`` chunks of matrix work,
    recorded with the reset of its work counter; :attr:`flops` is the work of one submission."""

    def __init__(self, ctx, chunks: int, shape: tuple | None = None):
        info = ctx.info
        self.shape = m, n, k = shape or peak_shape(info)
        wg = PEAK_SUBGROUPS * info.subgroup_size
        if wg > info.max_workgroup_size:
            raise UnsupportedError(f"coopmat_peak needs {wg} invocations per workgroup; {info.name} allows "
                                   f"{info.max_workgroup_size}")
        pipe = pipeline(ctx, "coopmat_peak", ((0, m), (1, n), (2, k), (3, wg)))
        self.chunks = int(chunks)
        self.flops = 2.0 * m * n * k * PEAK_ACCUMULATORS * PEAK_CHUNK_ITERS * PEAK_SUBGROUPS * self.chunks
        self._ctx, self._invocations = ctx, PEAK_GROUPS * wg
        push = np.zeros((), PEAK_PUSH)
        push["chunks"], push["chunk_iters"], push["a"], push["b"] = self.chunks, PEAK_CHUNK_ITERS, 1.0, 1.0
        zero = ctx.upload(np.zeros(1, np.uint32))
        counter, partial = ctx.pool.acquire(4), ctx.pool.acquire(4 * self._invocations)
        self._partial = partial.buffer
        seq = ctx.sequence(timestamps=2)
        seq.copy(zero.buffer, counter.buffer, 4)
        seq.barrier("transfer", "compute")
        seq.timestamp()
        seq.dispatch(pipe, ((counter.buffer, 0, 4), (partial.buffer, 0, 4 * self._invocations)), push.tobytes(),
                     (PEAK_GROUPS, 1, 1))
        seq.timestamp()
        super().__init__(seq.end(), 1, (zero, counter, partial))

    def expected_sum(self) -> float:
        """What the stored partial sums add up to when every chunk ran: each multiply-add adds
        K * a * b = K to each of an accumulator's M x N elements."""
        m, n, k = self.shape
        return float(self.chunks) * PEAK_CHUNK_ITERS * PEAK_SUBGROUPS * PEAK_ACCUMULATORS * m * n * k

    def verify(self) -> str | None:
        """After a submission: None when the stored sums account for all the work handed out,
        else what they say instead (the loop was cut short, or not all of it ran)."""
        got = float(self._ctx.download(self._partial, np.empty(self._invocations, np.float32)).sum(dtype=np.float64))
        want = self.expected_sum()
        if abs(got - want) <= 1e-4 * want:
            return None
        return f"the peak loop's results sum to {got:.6g}, the work handed out to {want:.6g}"

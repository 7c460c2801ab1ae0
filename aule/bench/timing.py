"""Timers: CUDA events (through ``triton.testing.do_bench``) on GPUs, the host clock on the CPU.

Every timer warms up first and reports the median with the 20th and 80th percentiles, so one slow
repeat (a page fault, another process on the core) moves the spread, not the number.
"""
from __future__ import annotations

import math
import statistics
import time


def _summary(samples_ms):
    s = sorted(samples_ms)
    n = len(s)

    def q(p):
        return s[min(n - 1, max(0, int(round(p * (n - 1)))))]

    return {"ms": statistics.median(s), "ms_p20": q(0.2), "ms_p80": q(0.8), "reps": n}


def cuda_time(fn, warmup_ms: float = 25, rep_ms: float = 100, grad_to_none=None) -> dict:
    """Median of CUDA-event timings of ``fn``. ``do_bench`` clears L2 between repeats."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events(fn, warmup_ms, rep_ms, grad_to_none)
    p20, p50, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                             quantiles=[0.2, 0.5, 0.8])
    return {"ms": float(p50), "ms_p20": float(p20), "ms_p80": float(p80), "reps": None}


def capture_graph(fn, warmups: int = 1):
    """``(graph, output)``: ``fn`` run ``warmups`` times on a side stream (compilation, autotuning,
    workspaces stay out of the capture), then captured in a ``torch.cuda.CUDAGraph``; ``output`` is
    what the captured call returned, which each replay rewrites."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmups):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def cuda_graph_time(fns, warmup_ms: float = 25, rep_ms: float = 100, outputs: list | None = None) -> dict:
    """Per-call time of ``fns`` (one call each, e.g. one per rotated input set) captured in one
    CUDA graph and replayed: launch gaps from Python leave the measurement, as in a serving loop
    that replays graphs. Raises when the calls cannot be captured (a host synchronisation).
    ``outputs``: a list that receives each call's captured output, as the last replay left it
    (so a check can see what replays compute, not only what the eager warm-up did)."""
    import torch

    graph, captured = capture_graph(lambda: [fn() for fn in fns])
    t = cuda_time(graph.replay, warmup_ms, rep_ms)
    if outputs is not None:
        torch.cuda.synchronize()
        outputs.extend(captured)
    n = len(fns)
    return {"ms": t["ms"] / n, "ms_p20": t["ms_p20"] / n, "ms_p80": t["ms_p80"] / n, "reps": t["reps"]}


def _cuda_events(fn, warmup_ms, rep_ms, grad_to_none):
    """The same measurement without Triton: events around each call, a warm-up by time budget."""
    import torch

    def reset():
        for t in grad_to_none or ():
            t.grad = None

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        reset()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        reset()
        fn()
    samples = []
    for _ in range(max(5, int(rep_ms / est))):
        reset()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        samples.append((s, e))
    torch.cuda.synchronize()
    return _summary([s.elapsed_time(e) for s, e in samples])


def host_time(fn, warmup: int = 1, reps: int = 5, max_s: float = 10.0, sync=None,
              warm_call_s: float | None = None) -> dict:
    """Median wall time of ``fn`` (synchronised by ``sync`` when given). Stops early after ``max_s``
    seconds of repeats, keeping at least three samples; a call that alone takes over a third of
    ``max_s`` (``warm_call_s``: the duration of a call already made, which then also serves as
    the warm-up) is measured once, so a minutes-long call does not hold the run for many minutes."""
    slow = warm_call_s is not None and warm_call_s > max_s / 3
    for _ in range(0 if slow else warmup):
        fn()
        if sync:
            sync()
    samples = []
    begin = time.perf_counter()
    while len(samples) < reps:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3)
        enough = 1 if slow or samples[0] > max_s / 3 * 1e3 else 3
        if len(samples) >= enough and time.perf_counter() - begin > max_s:
            break
    return _summary(samples)


def per_call_us(fn, sync=None, rounds: int = 5, min_round_s: float = 0.05, calls: int | None = None) -> dict:
    """Microseconds per call when calls run back to back (host overhead dominates small shapes).

    Each round runs ``calls`` calls (by default as many as fit in ``min_round_s``) then
    synchronises once; the median round gives the number. With ``calls``, one round of them
    warms up first.
    """
    fn()
    if sync:
        sync()
    if calls:
        for _ in range(calls):
            fn()
    # Size a round from one timed call so every round has the same count.
    t0 = time.perf_counter()
    fn()
    if sync:
        sync()
    one = max(time.perf_counter() - t0, 1e-6)
    n = calls or max(3, min(10000, int(min_round_s / one)))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e3 / n)
    out = _summary(samples)
    out["calls_per_round"] = n
    return out


# NVIDIA's Vulkan driver raises the clocks only under sustained work: on the H100 a decode shader
# ran at 420 MHz, 4.4x slower, until about 300 ms of back-to-back submissions, then at 1980 MHz
# (nvidia-smi's clocks.sm). Self-timed device calls are therefore
# measured after this much continuous work, as a busy server would run them.
DEVICE_WARMUP_S = 0.5


def spin_up(fn, seconds: float = DEVICE_WARMUP_S, min_calls: int = 1):
    """Call ``fn`` back to back for ``seconds`` (at least ``min_calls`` times); returns its last result."""
    t_end = time.perf_counter() + seconds
    n, out = 0, None
    while n < min_calls or time.perf_counter() < t_end:
        out = fn()
        n += 1
    return out


# Self-timed device rows take at least this many repeats and this long, so the median rests on
# enough samples whatever the kernel's length.
DEVICE_MIN_REPS = 20
DEVICE_MIN_S = 0.5
# Calls recorded back to back in one submission: enough that the device stays busy this long per
# submission (the host's gap between submissions is then a small share of it), at most this many.
DEVICE_BATCH_MS = 20.0
DEVICE_MAX_BATCH = 256


def batch_size(one_call_ms: float, target_ms: float = DEVICE_BATCH_MS, most: int = DEVICE_MAX_BATCH) -> int:
    """Calls per submission for a call of ``one_call_ms`` to fill ``target_ms`` (1 to ``most``)."""
    return max(1, min(most, math.ceil(target_ms / max(one_call_ms, 1e-6))))


def reported_time(measure_ms, max_s: float = 10.0, warmup_s: float = DEVICE_WARMUP_S,
                  min_reps: int = DEVICE_MIN_REPS, min_s: float = DEVICE_MIN_S):
    """Median of times that each call reports itself (GPU timestamps, per call); None when it
    reports none. ``warmup_s`` seconds of back-to-back calls come immediately before the repeats,
    which go on until there are ``min_reps`` of them and ``min_s`` seconds have passed, or, for
    long calls, until ``max_s`` seconds with at least three."""
    if measure_ms() is None:
        return None
    spin_up(measure_ms, warmup_s)
    samples = []
    begin = time.perf_counter()
    while True:
        samples.append(measure_ms())
        spent = time.perf_counter() - begin
        if (len(samples) >= min_reps and spent >= min_s) or (len(samples) >= 3 and spent > max_s):
            break
    return _summary(samples)

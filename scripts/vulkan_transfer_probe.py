"""Where the time of a Vulkan call on host data goes, and what each transfer path costs.

Prints tables (medians of --reps) of: the device's memory route and transfer settings; raw copy
rates (one CPU core and the copy threads, into mapped device memory, staging and NumPy; DMA
between staging, imported host memory and device memory); the phases of one NumPy call (staging
its inputs, the run with the folded copies, finishing its result); the whole call under each
transfer path (copy threads, host-memory import) against the issue's bound (bytes moved / the DMA
bandwidth measured here + the call's GPU time); and the per-call cost of a tiny call on
GpuTensors and on NumPy arrays with and without re-submitted recordings.

    python scripts/vulkan_transfer_probe.py                      # B1 H32 S4096 D128 float16 causal
    python scripts/vulkan_transfer_probe.py --shape 1,8,1024,64  # small enough for lavapipe

Every path is switched inside one process (the context's attributes), so the numbers compare.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aule  # noqa: E402
from aule.backends.vulkan import launch, runtime  # noqa: E402
from aule.backends.vulkan.runtime import memory  # noqa: E402
from aule.call import canonicalize  # noqa: E402


def median_s(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def row(name: str, seconds: float, nbytes: int | None = None, note: str = "") -> None:
    rate = f"{nbytes / seconds / 1e9:8.1f} GB/s" if nbytes else " " * 13
    print(f"  {name:58s} {seconds * 1e3:9.3f} ms {rate}  {note}")


def dma_s(ctx, src, dst, nbytes: int, reps: int, src_offset: int = 0) -> float:
    copies = ((src, dst, nbytes, src_offset, 0),)
    ctx.run((), uploads=copies)  # recorded once, then re-submitted
    return median_s(lambda: ctx.run((), uploads=copies), reps)


def raw_rates(ctx, nbytes: int, reps: int, threads: int) -> dict:
    """Copy and DMA rates for ``nbytes``; returns the DMA bandwidths (bytes/s) by direction."""
    print(f"\nraw transfers of {nbytes / 1e6:.1f} MB")
    one, many = memory.Copier(1), memory.Copier(threads)
    src = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8)
    host = np.empty_like(src)
    host[...] = 0
    for name, c in (("1 thread", one), (f"{threads} threads", many)):
        row(f"host -> host np.copyto ({name})", median_s(lambda c=c: c.copy(host, src), reps), nbytes)
        row(f"host -> fresh np.empty ({name}, first touch)",
            median_s(lambda c=c: c.copy(np.empty_like(src), src), reps), nbytes)
    dev = ctx.pool.acquire(nbytes)
    bw = {}
    if dev.buffer.host_visible:
        for name, c in (("1 thread", one), (f"{threads} threads", many)):
            row(f"memcpy -> mapped device buffer ({name})",
                median_s(lambda c=c: c.copy(dev.buffer.view[:nbytes], src), reps), nbytes)
        small = min(nbytes, 1 << 20)
        row("CPU read of mapped device memory (1 MB, never do this)",
            median_s(lambda: host[:small].__setitem__(slice(None), dev.buffer.view[:small]), 1, 0), small,
            "uncached" if not dev.buffer.host_cached else "host-cached")
    for kind in ("upload", "download"):
        stage = memory.Buffer(ctx, nbytes, kind)
        try:
            if stage.view is not None:
                for name, c in (("1 thread", one), (f"{threads} threads", many)):
                    if kind == "upload":
                        row(f"memcpy -> {kind} staging ({name})",
                            median_s(lambda c=c: c.copy(stage.view[:nbytes], src), reps), nbytes)
                    else:
                        row(f"memcpy {kind} staging -> NumPy ({name})",
                            median_s(lambda c=c: c.copy(host, stage.view[:nbytes]), reps), nbytes)
            if kind == "upload":
                t = dma_s(ctx, stage, dev.buffer, nbytes, reps)
                row("DMA upload staging -> device", t, nbytes)
                bw["h2d"] = nbytes / t
            else:
                t = median_s(lambda: ctx.run((), downloads=((dev.buffer, stage, nbytes),)), reps)
                row("DMA device -> download staging", t, nbytes)
                bw["d2h"] = nbytes / t
        finally:
            stage.destroy()
    if ctx.host_import_available:
        ctx.host_import = frozenset(("upload", "download"))
        try:
            row("import (pin) a host array, then release", median_s(
                lambda: memory._Imported(ctx, src).release(), reps), nbytes)
            imp = memory._Imported(ctx, src)
            try:
                t = dma_s(ctx, imp.buffer, dev.buffer, nbytes, reps, imp.offset)
                row("DMA imported host array -> device", t, nbytes)
                bw["h2d_imported"] = nbytes / t
            finally:
                ctx.forget_recordings()
                imp.release()
            out = ctx.host_empty((nbytes,), np.uint8)
            imp = memory._Imported(ctx, out)
            try:
                t = median_s(lambda: ctx.run((), downloads=((dev.buffer, imp.buffer, nbytes, 0, imp.offset),)), reps)
                row("DMA device -> imported host array", t, nbytes)
                bw["d2h_imported"] = nbytes / t
            finally:
                ctx.forget_recordings()
                imp.release()
        finally:
            ctx.host_import = frozenset()
    else:
        print("  (no VK_EXT_external_memory_host: no import rows)")
    dev.release()
    ctx.trim_pools()
    return bw


def call_phases(ctx, q, k, v, causal: bool, reps: int) -> float:
    """The steps of launch.attention's host branch, timed one by one; returns its GPU seconds."""
    call = canonicalize(q, k, v, causal, None, -1, False)
    timers: dict = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timers.setdefault(name, []).append(time.perf_counter() - t)
        return out

    gpu = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        c = timed("canonicalize", lambda: canonicalize(q, k, v, causal, None, -1, False))
        variant, shape, chunks, pipe = timed("plan lookup", lambda: launch.attention_plan_for(c, ctx))
        elem, rows, out_bytes, _ = launch._result_sizes(variant, shape)
        with launch._Held() as held:
            bufs = timed("stage q, k, v (copies into device/staging memory)",
                         lambda: tuple(held.staged(ctx, x, elem) for x in (c.q, c.k, c.v)))
            ob = timed("acquire the output buffer", lambda: held.acquire(ctx, out_bytes))
            rest = (launch._dummy_buffer(ctx),) + launch.feature_buffers(c, ctx, held)  # no LSE, no features
            out = timed("result array + readback transfer",
                        lambda: held.readback(ctx, ob, rows + (shape.head_dim,), elem))
            ns = timed("run: uploads + dispatches + downloads, one submission",
                       lambda: ctx.run(launch.bind(pipe, chunks, bufs + (ob,) + rest), held.uploads,
                                       held.downloads, True))
            res = timed("finish the result (copy out of staging)", out.finish)
            timed("like(out, q)", lambda: launch.like(res, q))
            t1 = time.perf_counter()
        timers.setdefault("release leases and transfers", []).append(time.perf_counter() - t1)
        timers.setdefault("total", []).append(time.perf_counter() - t0)
        if ns is not None:
            gpu.append(ns * 1e-9)
        if i == 0:
            timers.clear()
            gpu.clear()
    for name, ts in timers.items():
        row(name, statistics.median(ts))
    g = statistics.median(gpu) if gpu else float("nan")
    row("GPU time of the dispatches (timestamps)", g)
    return g


def configure(ctx, threads: int, host_import=()) -> None:
    """Copy threads and the directions ("upload", "download") that import host memory."""
    ctx.copier.close()
    ctx.copier = memory.Copier(threads)
    ctx.host_import = frozenset(host_import) if ctx.host_import_available else frozenset()
    ctx.forget_recordings()
    ctx.trim_pools()


def whole_calls(ctx, q, k, v, causal, reps, threads, bw, gpu_s) -> None:
    n_in = q.nbytes + k.nbytes + v.nbytes
    n_out = q.nbytes
    h2d, d2h = bw.get("h2d", float("nan")), bw.get("d2h", float("nan"))
    bound = n_in / h2d + n_out / d2h + gpu_s
    print(f"\nthe whole NumPy call: {(n_in + n_out) / 1e6:.1f} MB moved; bound = in / {h2d / 1e9:.1f} GB/s + out / "
          f"{d2h / 1e9:.1f} GB/s + GPU {gpu_s * 1e3:.3f} ms = {bound * 1e3:.3f} ms (target: within 1.3x)")
    paths = [(1, ()), (threads, ())]
    if ctx.host_import_available:
        paths += [(threads, ("upload",)), (threads, ("download",)), (1, ("upload", "download")),
                  (threads, ("upload", "download"))]
    for t, imp in paths:
        configure(ctx, t, imp)
        s = median_s(lambda: aule.flash_attention(q, k, v, causal=causal, backend="vulkan"), reps, 2)
        row(f"copy threads {t}, host import {' + '.join(imp) or 'off'}", s, n_in + n_out,
            f"{s / bound:5.2f}x bound")
    print("  (settings: AULE_VULKAN_COPY_THREADS=N; AULE_VULKAN_HOST_IMPORT=0, 1, upload or download)")


def repeat(fn, n: int) -> None:
    """``fn()`` n times, each result dropped before the next call (its buffers go back to the
    pool, so the next call binds them again, as a caller's loop would)."""
    for _ in range(n):
        fn()


def per_call(ctx, reps: int) -> None:
    print("\nper-call cost, tiny call B1 H1 S16 D64 float32 causal (microseconds)")
    rng = np.random.default_rng(1)
    host = [rng.standard_normal((1, 1, 16, 64)).astype(np.float32) for _ in range(3)]
    gpu = [aule.to_gpu(x) for x in host]
    n = 1000
    for reuse in (True, False):
        ctx.reuse = reuse
        ctx.forget_recordings()
        for name, args in (("GpuTensors", gpu), ("NumPy arrays", host)):
            s = median_s(lambda: repeat(lambda: aule.flash_attention(*args, causal=True, backend="vulkan"), n),
                         reps) / n
            print(f"  {name:14s} recordings {'re-submitted' if reuse else 'made anew   '}: {s * 1e6:8.1f} us")
    ctx.reuse = True
    c = canonicalize(*gpu, True, None, -1, False)
    o, _, d = launch.gpu_dispatches(c, ctx)
    for name, fn in (("canonicalize", lambda: canonicalize(*gpu, True, None, -1, False)),
                     ("gpu_dispatches (plan, output GpuTensor, bindings)", lambda: launch.gpu_dispatches(c, ctx)),
                     ("ctx.run of those dispatches (re-submitted)", lambda: ctx.run(d)),
                     ("launch.attention", lambda: launch.attention(c, ctx))):
        s = median_s(lambda: repeat(fn, n), reps) / n
        print(f"  {name:52s} {s * 1e6:8.1f} us")
    print(f"  recordings: {ctx.stats}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="1,32,4096,128", help="B,H,S,D of the NumPy call (default %(default)s)")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--no-causal", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="copy threads to compare with one (default: the "
                    "context's own choice, or 8 where it chose 1)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ctx = runtime.context()
    b, h, s, d = (int(x) for x in args.shape.split(","))
    dtype = np.dtype(args.dtype)
    causal = not args.no_causal
    threads = args.threads or (ctx.copier.threads if ctx.copier.threads > 1 else 8)
    print(f"device: {ctx.info.name} ({ctx.info.type}, {ctx.info.driver})")
    print(f"memory route: {ctx.memory.route}; upload pool {'yes' if ctx.upload_pool else 'no'}, "
          f"download pool {'yes' if ctx.download_pool else 'no'}; copy threads {ctx.copier.threads} "
          f"(comparing 1 and {threads}); host import {'available' if ctx.host_import_available else 'unavailable'}"
          f" (alignment {ctx.memory.import_alignment})")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, d)).astype(dtype) for _ in range(3))
    bw = raw_rates(ctx, q.nbytes, args.reps, threads)
    print(f"\nphases of one NumPy call {args.shape} {args.dtype}{' causal' if causal else ''} "
          f"(copy threads {threads}, no host import)")
    configure(ctx, threads)
    gpu_s = call_phases(ctx, q, k, v, causal, args.reps)
    if ctx.host_import_available:
        print("  ... with host import for uploads and downloads")
        configure(ctx, threads, ("upload", "download"))
        call_phases(ctx, q, k, v, causal, args.reps)
    whole_calls(ctx, q, k, v, causal, args.reps, threads, bw, gpu_s)
    configure(ctx, threads)
    per_call(ctx, args.reps)


if __name__ == "__main__":
    main()

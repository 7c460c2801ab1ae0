"""Where the time of a Vulkan call on host data goes, and what each transfer path costs.

Prints tables (medians of --reps) of: the device's memory route and transfer settings; raw copy
rates (one CPU core and the copy threads, into mapped device memory, staging and NumPy; DMA
between staging, imported host memory and device memory); the phases of one NumPy call side by
side for the path before chunking (inputs written where device memory is mapped, every copy in
the call's one submission) and the chunked path (host copies into staging overlapping each
chunk's DMA, results copied out as each chunk lands; its upload route as measured, and forced
mapped and staged); the whole call under each path (copy threads, host-memory import) against
the issue's bound (bytes moved / the DMA bandwidth measured here + the call's GPU time); and the
per-call cost of a tiny call on GpuTensors and on NumPy arrays with and without re-submitted
recordings.

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
from aule import settings  # noqa: E402
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


PHASES = ("canonicalize", "plan lookup", "stage q, k, v", "output buffer + readback transfer",
          "run (all of it)", "  upload chunks: copies + DMA submissions", "  the run's own submission",
          "  download chunks: DMA + copies out", "  wait for everything submitted", "finish the result",
          "like(out, q)", "release leases and transfers", "total", "GPU time (timestamps)")


def call_phases(ctx, q, k, v, causal: bool, reps: int) -> dict:
    """The steps of launch.attention's host branch, timed one by one (medians of ``reps``, in
    seconds, by the names of PHASES). The context's chunk steps are timed from inside its run."""
    timers: dict = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            timers.setdefault(name, []).append(time.perf_counter() - t)

    inner = {"_send_chunks": PHASES[5], "_submit_run": PHASES[6], "_receive_chunks": PHASES[7], "_settle": PHASES[8]}
    for attr, name in inner.items():  # instance attributes shadow the methods until removed below
        setattr(ctx, attr, lambda *a, _f=getattr(ctx, attr), _n=name, **kw: timed(_n, _f, *a, **kw))
    gpu = []
    try:
        for i in range(reps + 1):
            t0 = time.perf_counter()
            c = timed(PHASES[0], lambda: canonicalize(q, k, v, causal, None, -1, False))
            variant, shape, chunks, pipe = timed(PHASES[1], lambda: launch.attention_plan_for(c, ctx))
            elem, rows, out_bytes, _ = launch._result_sizes(variant, shape)
            with launch._Held() as held:
                bufs = timed(PHASES[2], lambda: tuple(held.staged(ctx, x, elem) for x in (c.q, c.k, c.v)))
                ob = held.acquire(ctx, out_bytes)
                rest = (launch._dummy_buffer(ctx),) + launch.feature_buffers(c, ctx, held)  # no LSE, no features
                out = timed(PHASES[3], lambda: held.readback(ctx, ob, rows + (shape.head_dim,), elem))
                ns = timed(PHASES[4], lambda: held.run(ctx, (launch.bind(pipe, chunks, bufs + (ob,) + rest),), True))
                res = timed(PHASES[9], out.finish)
                timed(PHASES[10], lambda: launch.like(res, q))
                t1 = time.perf_counter()
            timers.setdefault(PHASES[11], []).append(time.perf_counter() - t1)
            timers.setdefault(PHASES[12], []).append(time.perf_counter() - t0)
            if ns is not None:
                gpu.append(ns * 1e-9)
            if i == 0:  # pipelines, pooled buffers and recordings made; the measured route chosen
                timers.clear()
                gpu.clear()
    finally:
        for attr in inner:
            delattr(ctx, attr)
    got = {name: statistics.median(ts) for name, ts in timers.items()}
    got[PHASES[13]] = statistics.median(gpu) if gpu else float("nan")
    return got


def configure(ctx, threads: int, host_import=(), chunk_bytes=None, upload="auto") -> None:
    """Copy threads, the directions ("upload", "download") that import host memory, the chunk size
    (None: the setting's) and the upload route ("auto" keeps what the context measured)."""
    ctx.copier.close()
    ctx.copier = memory.Copier(threads)
    ctx.host_import = frozenset(host_import) if ctx.host_import_available else frozenset()
    ctx.chunk_bytes = settings.vulkan().chunk_bytes if chunk_bytes is None else chunk_bytes
    ctx.upload_setting = upload
    ctx.forget_recordings()
    ctx.trim_pools()


def paths(ctx, threads) -> list:
    """(column title, configure() arguments): the path before chunking (mapped writes where device
    memory is mapped, every copy in the call's one submission) and the chunked path, with its upload
    route as measured and forced each way."""
    out = [("old: one submission", dict(chunk_bytes=0, upload="mapped"))]
    out.append(("new: chunked, auto", dict()))
    if ctx.pool.acquire(16).buffer.host_visible:  # else uploads have one route: staging
        out += [("new: uploads mapped", dict(upload="mapped")), ("new: uploads staged", dict(upload="staged"))]
    return [(title, dict(kw, threads=threads)) for title, kw in out]


def phase_tables(ctx, q, k, v, causal, reps, threads) -> dict:
    """The phase table of each path, side by side; returns the GPU seconds by column."""
    cols = []
    for title, kw in paths(ctx, threads):
        configure(ctx, **kw)
        cols.append((title, call_phases(ctx, q, k, v, causal, reps)))
    width = 22
    print(f"  {'phase (ms, median)':44s}" + "".join(f"{t:>{width}s}" for t, _ in cols))
    for name in PHASES:
        cells = [p.get(name) for _, p in cols]
        if all(c is None for c in cells):
            continue
        print(f"  {name:44s}" + "".join(f"{c * 1e3:{width}.3f}" if c is not None else f"{'-':>{width}s}"
                                       for c in cells))
    print("  (with chunks, the run's own submission is not waited for: the download chunks' row holds the GPU's work)")
    route = ctx.staged_uploads_faster
    print(f"  (auto: uploads to mapped device memory {'measured faster through staging' if route else 'measured faster mapped' if route is False else 'not measured (no choice here)'}; "
          f"chunks of {settings.vulkan().chunk_bytes} bytes, AULE_VULKAN_CHUNK_BYTES)")
    return {t: p[PHASES[13]] for t, p in cols}


def whole_calls(ctx, q, k, v, causal, reps, threads, bw, gpu_s) -> None:
    n_in = q.nbytes + k.nbytes + v.nbytes
    n_out = q.nbytes
    h2d, d2h = bw.get("h2d", float("nan")), bw.get("d2h", float("nan"))
    bound = n_in / h2d + n_out / d2h + gpu_s
    print(f"\nthe whole NumPy call: {(n_in + n_out) / 1e6:.1f} MB moved; bound = in / {h2d / 1e9:.1f} GB/s + out / "
          f"{d2h / 1e9:.1f} GB/s + GPU {gpu_s * 1e3:.3f} ms = {bound * 1e3:.3f} ms (target: within 1.3x)")
    runs = [(title, kw) for title, kw in paths(ctx, threads)] + [("old, 1 copy thread", dict(threads=1, chunk_bytes=0, upload="mapped")), ("new, 1 copy thread", dict(threads=1))]
    runs += [(f"new, chunks of {mb} MiB", dict(threads=threads, chunk_bytes=mb << 20)) for mb in (1, 2, 8, 16)]
    if ctx.host_import_available:
        runs += [(f"old, host import {' + '.join(imp)}", dict(threads=threads, host_import=imp, chunk_bytes=0,
                                                              upload="mapped"))
                 for imp in (("upload",), ("download",), ("upload", "download"))]
    for title, kw in runs:
        configure(ctx, **kw)
        s = median_s(lambda: aule.flash_attention(q, k, v, causal=causal, backend="vulkan"), reps, 2)
        row(title, s, n_in + n_out, f"{s / bound:5.2f}x bound")
    print("  (settings: AULE_VULKAN_CHUNK_BYTES=N (0: one submission), AULE_VULKAN_UPLOAD=auto|mapped|staged, "
          "AULE_VULKAN_COPY_THREADS=N, AULE_VULKAN_HOST_IMPORT=0, 1, upload or download)")


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
    print(f"memory route: {ctx.memory.route}; download pool {'yes' if ctx.download_pool else 'no'}; "
          f"chunks of {ctx.chunk_bytes} bytes; uploads {ctx.upload_setting}; copy threads {ctx.copier.threads} "
          f"(comparing 1 and {threads}); host import {'available' if ctx.host_import_available else 'unavailable'}"
          f" (alignment {ctx.memory.import_alignment})")
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, h, s, d)).astype(dtype) for _ in range(3))
    bw = raw_rates(ctx, q.nbytes, args.reps, threads)
    print(f"\nphases of one NumPy call {args.shape} {args.dtype}{' causal' if causal else ''} "
          f"(copy threads {threads}, no host import), the path before chunking beside the chunked one")
    gpu = phase_tables(ctx, q, k, v, causal, args.reps, threads)
    whole_calls(ctx, q, k, v, causal, args.reps, threads, bw, min(gpu.values()))
    configure(ctx, threads)
    per_call(ctx, args.reps)


if __name__ == "__main__":
    main()

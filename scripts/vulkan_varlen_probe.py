"""Where the host time of a Vulkan varlen call on NumPy arrays goes, beside the same sequences as
dense calls (issue 15; issue 14 item 5's transfer bound).

The bench's ``features`` varlen case by default: float16, H32 D128, sequences of 4096/3072/2048/1024
tokens, non-causal, packed ``[total, H, D]`` for ``aule.flash_attention_varlen`` and as four
``[1, H, n, D]`` arrays for ``aule.flash_attention``. Prints one table: wall medians, the GPU time
of each call's submission (timestamps), and each call's phases (medians over the timed calls):

  staging   copies of host data into device or staging memory (``memory.stage``)
  run       the one submission and its wait: DMA uploads, dispatches, DMA downloads
  finish    copies of the results out of staging (``Transfer.finish``)
  other     the rest of the call: validation, planning, tables, result assembly

with the default transfers and, where the device has VK_EXT_external_memory_host, with DMA
straight from and into the host arrays (AULE_VULKAN_HOST_IMPORT=1),
and the bound ``bytes / DMA bandwidth + GPU time`` the call is held to (DMA measured here).
Writes nothing outside $OUT (the pipeline cache is not persisted).

    python3 scripts/vulkan_varlen_probe.py                       # the bench's case
    python3 scripts/vulkan_varlen_probe.py --heads 8 --lengths 1024,768,512,256 --reps 3   # lavapipe
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before aule reads its settings: no file outside $OUT.
os.environ.setdefault("AULE_VULKAN_PIPELINE_CACHE", "0")
os.environ.setdefault("AULE_CACHE_DIR", os.path.join(os.environ.get("OUT") or tempfile.mkdtemp(), "aule-cache"))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aule  # noqa: E402
from aule.backends.vulkan import launch, runtime  # noqa: E402
from aule.backends.vulkan.runtime import memory  # noqa: E402
from aule.backends.vulkan.runtime.context import Context  # noqa: E402
from aule.call import canonicalize, canonicalize_varlen  # noqa: E402

PHASES = ("staging", "run", "finish")


class Phases:
    """Inclusive timers around the runtime's transfer steps, switched on for one call at a time."""

    def __init__(self):
        self.now: dict | None = None
        for owner, name, phase in ((memory, "stage", "staging"), (Context, "run_passes", "run"),
                                   (memory.Transfer, "finish", "finish")):
            self._wrap(owner, name, phase)

    def _wrap(self, owner, name, phase):
        real = getattr(owner, name)

        def timed(*a, **kw):
            if self.now is None:
                return real(*a, **kw)
            t = time.perf_counter()
            try:
                return real(*a, **kw)
            finally:
                self.now[phase] = self.now.get(phase, 0.0) + time.perf_counter() - t

        setattr(owner, name, timed)

    def measure(self, fn, reps: int) -> dict:
        """Medians (seconds) of the wall time and of each phase over ``reps`` calls after a warm-up."""
        fn()
        fn()
        rows = []
        for _ in range(reps):
            self.now = {}
            t = time.perf_counter()
            fn()
            self.now["wall"] = time.perf_counter() - t
            rows.append(self.now)
            self.now = None
        out = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in ("wall",) + PHASES}
        out["other"] = statistics.median(r["wall"] - sum(r.get(p, 0.0) for p in PHASES) for r in rows)
        return out


def dma_rates(ctx, nbytes: int, reps: int) -> tuple[float, float]:
    """(host -> device, device -> host) DMA bytes/s between host-visible staging memory and a
    device buffer, as vulkan_transfer_probe.py measures them (also where device memory is mapped:
    the bound is the link's)."""
    dev = ctx.pool.acquire(nbytes)
    up, down = memory.Buffer(ctx, nbytes, "upload"), memory.Buffer(ctx, nbytes, "download")
    try:
        rates = []
        for copies in (dict(uploads=((up, dev.buffer, nbytes),)), dict(downloads=((dev.buffer, down, nbytes),))):
            ctx.run((), **copies)
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                ctx.run((), **copies)
                ts.append(time.perf_counter() - t)
            rates.append(nbytes / statistics.median(ts))
        return rates[0], rates[1]
    finally:
        ctx.forget_recordings()
        dev.release()
        for b in (up, down):
            b.destroy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--lengths", default="4096,3072,2048,1024")
    ap.add_argument("--dtype", default="float16", choices=("float16", "float32"))
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    lens = [int(x) for x in args.lengths.split(",")]
    h, d, dt = args.heads, args.head_dim, np.dtype(args.dtype)
    ctx = runtime.context()
    print(f"device: {ctx.info.name} ({ctx.info.driver}); transfers: {ctx.memory.route}; copy threads "
          f"{ctx.copier.threads}; host import {', '.join(sorted(ctx.host_import)) or 'off'}")
    rng = np.random.default_rng(0)
    total = sum(lens)
    q, k, v = (rng.standard_normal((total, h, d)).astype(dt) for _ in range(3))
    cu = np.concatenate([[0], np.cumsum(lens)]).astype(np.int32)
    dense = [tuple(np.ascontiguousarray(x[cu[i]:cu[i + 1]].transpose(1, 0, 2))[None] for x in (q, k, v))
             for i in range(len(lens))]
    longest = max(lens)

    def varlen():
        return aule.flash_attention_varlen(q, k, v, cu, cu, longest, longest, causal=args.causal, backend="vulkan")

    def dense_calls():
        return [aule.flash_attention(*x, causal=args.causal, backend="vulkan") for x in dense]

    got, want = varlen(), np.concatenate([o[0].transpose(1, 0, 2) for o in dense_calls()])
    err = float(np.abs(got.astype(np.float32) - want.astype(np.float32)).max())
    vcall = canonicalize_varlen(q, k, v, cu, cu, longest, longest, args.causal)
    dcalls = [canonicalize(*x, args.causal, None, -1, False) for x in dense]

    def gpu_ms(fn, calls):
        ts = []
        for _ in range(max(3, args.reps // 2)):
            ns = [fn(c, ctx, timestamps=True)[2] for c in calls]
            if any(n is None for n in ns):
                return float("nan")
            ts.append(sum(ns) / 1e6)
        return statistics.median(ts)

    phases = Phases()
    # The default transfers, then (where the device can) DMA straight from and into host arrays.
    paths = [frozenset(ctx.host_import)]
    if ctx.host_import_available and paths[0] != {"upload", "download"}:
        paths.append(frozenset(("upload", "download")))
    rows = []
    for imp in paths:
        ctx.host_import = imp
        ctx.forget_recordings()
        ctx.trim_pools()
        note = " +import" if imp else ""
        rows.append((f"varlen{note}", phases.measure(varlen, args.reps), gpu_ms(launch.varlen_attention, [vcall])))
        rows.append((f"dense x{len(lens)}{note}", phases.measure(dense_calls, args.reps),
                     gpu_ms(launch.attention, dcalls)))
    ctx.host_import = paths[0]
    moved_in, moved_out = q.nbytes + k.nbytes + v.nbytes, q.nbytes
    h2d, d2h = dma_rates(ctx, min(moved_in, 256 << 20), args.reps)
    print(f"case: {args.dtype} H{h} D{d} lengths {args.lengths} {'causal' if args.causal else 'non-causal'}; "
          f"{(moved_in + moved_out) / 1e6:.1f} MB moved per call; DMA {h2d / 1e9:.1f} GB/s up, {d2h / 1e9:.1f} GB/s "
          f"down; varlen vs dense max |diff| {err:.3g}")
    print(f"\n{'call':20s} {'wall ms':>9s} {'GPU ms':>8s} {'staging':>8s} {'run':>8s} {'finish':>8s} {'other':>8s} "
          f"{'bound ms':>9s} {'x bound':>8s}")
    for name, m, g in rows:
        bound = moved_in / h2d + moved_out / d2h + g * 1e-3
        print(f"{name:20s} {m['wall'] * 1e3:9.2f} {g:8.2f} " + " ".join(f"{m[p] * 1e3:8.2f}" for p in PHASES)
              + f" {m['other'] * 1e3:8.2f} {bound * 1e3:9.2f} {m['wall'] / bound:8.2f}")
    for i in range(0, len(rows), 2):
        print(f"\n{rows[i][0]}: speed / dense speed {rows[i + 1][1]['wall'] / rows[i][1]['wall']:.2f}x "
              "(issue 15 target: >= 0.9x)", end="")
    print()


if __name__ == "__main__":
    main()

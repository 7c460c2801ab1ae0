"""What a Vulkan call on GpuTensors costs when it returns before the device has run it (issue 14
item 4: at most 25 us a call).

For each case (float16 ``B,H,S,D``; by default the tiny call B1 H1 S16 D64 and a mid one
B1 H32 S1024 D128), non-causal, ``aule.flash_attention`` on GpuTensors, after a check against the
float64 reference and a check that a chain of calls (each output the next query) is bit for bit
the same asynchronous and synchronous. Prints one table, microseconds per call:

  async     N calls back to back (each result dropped as the next is made), then one wait
  sync      the same with AULE_VULKAN_ASYNC=0's behaviour (each call waits for its fence)
            (both after half a second of calls back to back, since NVIDIA's driver raises the
            clocks only under sustained work, and each the better of two rounds, async and sync
            taken in turn)
  host      aule's Python per call with the submission taken out (``Sequence.submit`` stubbed),
            of which key (the ready launch's key and lookup, ``vulkan.fastpath``) and launch
            (``GpuLaunch.run``: output, bindings, the recording's lookup, the ring)
  submit    the bare ``vkQueueSubmit`` of the call's recording (its fence waited outside the timer)
  first     the full path a call takes when its key is new, submission stubbed: canonicalize,
            route and ``VulkanBackend.attention``
  gpu       the device's time for one call (timestamps)

Writes nothing outside $OUT (the pipeline cache is not persisted).

    python3 scripts/vulkan_async_probe.py
    python3 scripts/vulkan_async_probe.py --cases tiny --calls 2000      # lavapipe
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
from aule import backends  # noqa: E402
from aule.backends.vulkan import fastpath, launch, runtime, to_gpu  # noqa: E402
from aule.backends.vulkan.runtime.sequence import Sequence  # noqa: E402
from aule.bench.timing import spin_up  # noqa: E402
from aule.call import canonicalize  # noqa: E402
from aule.reference import attention_reference  # noqa: E402
from aule.routing import route  # noqa: E402

CASES = {"tiny": (1, 1, 16, 64), "mid": (1, 32, 1024, 128)}
FP16_ATOL = 2e-2


def per_call_us(fn, n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean microseconds per call of ``n // rounds`` calls."""
    m = max(1, n // rounds)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(m):
            fn()
        out.append((time.perf_counter() - t0) / m * 1e6)
    return statistics.median(out)


def throughput_us(call, n: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of: ``n // rounds`` calls back to back, then one wait, per call."""
    m = max(1, n // rounds)
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        o = None
        for _ in range(m):
            o = call()
        o.wait()
        out.append((time.perf_counter() - t0) / m * 1e6)
    return statistics.median(out)


def submit_us(seq, n: int) -> float:
    """Median microseconds of ``seq.submit(wait=False)`` alone, each submission waited for untimed."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        seq.submit(wait=False)
        times.append(time.perf_counter() - t0)
        seq.wait()
    return statistics.median(times) * 1e6


def run_case(name: str, shape: tuple, calls: int, ctx) -> dict:
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(shape).astype(np.float16) for _ in range(3)]
    gq, gk, gv = (to_gpu(x, np.float16) for x in host)

    def call():
        return aule.flash_attention(gq, gk, gv, causal=False, backend="vulkan")

    row = {"case": f"{name} {'x'.join(map(str, shape))}"}
    ref = attention_reference(*(x.astype(np.float64) for x in host), causal=False)
    ref = ref[0] if isinstance(ref, tuple) else ref
    row["err"] = float(np.abs(call().numpy().astype(np.float64) - ref).max())

    def chain(asynchronous: bool) -> np.ndarray:
        ctx.asynchronous = asynchronous
        x = gq
        for _ in range(4):
            x = aule.flash_attention(x, gk, gv, causal=False, backend="vulkan")
        return x.numpy()

    try:
        row["chain_equal"] = bool(np.array_equal(chain(True), chain(False)))
        n = calls if name == "tiny" else max(50, calls // 20)
        ctx.asynchronous = True
        spin_up(call)  # recordings made, buffers pooled, the device's clocks up
        row["async"] = row["sync"] = float("inf")
        for _ in range(2):
            ctx.asynchronous = True
            row["async"] = min(row["async"], throughput_us(call, n))
            ctx.asynchronous = False
            row["sync"] = min(row["sync"], throughput_us(call, max(50, n // 4)))
    finally:
        ctx.asynchronous = True
    for _ in range(3):
        call().wait()
    seq = next(reversed(ctx._recordings.values()))
    row["submit"] = submit_us(seq, min(n, 500))
    real = Sequence.submit
    Sequence.submit = lambda self, wait=True: self
    try:
        row["host"] = per_call_us(call, calls)
        ckey = fastpath.key(gq, gk, gv, False, None, -1, "vulkan", False, 0.0)
        ready = fastpath._READY[ckey]
        row["key"] = per_call_us(lambda: fastpath._READY.get(fastpath.key(gq, gk, gv, False, None, -1, "vulkan",
                                                                           False, 0.0)), calls)
        row["launch"] = per_call_us(lambda: ready.run(gq, gk, gv), calls)

        def first():
            c = canonicalize(gq, gk, gv, False, None, -1, False)
            return route(c, "attention", "vulkan").attention(c)

        row["first"] = per_call_us(first, calls // 2)
    finally:
        Sequence.submit = real
    ctx.synchronize()
    gpu = [launch.attention(canonicalize(gq, gk, gv, False, None, -1, False), ctx, timestamps=True)[2]
           for _ in range(20)]
    row["gpu"] = statistics.median(gpu) / 1e3 if gpu[0] is not None else float("nan")
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="tiny,mid", help=f"comma-separated, of {', '.join(CASES)} (default: both)")
    p.add_argument("--calls", type=int, default=5000, help="calls per measurement of the tiny case (default 5000)")
    args = p.parse_args(argv)
    why = backends.get("vulkan").unavailable_reason
    if why:
        print(f"Vulkan unavailable: {why}")
        return 1
    ctx = runtime.context()
    print(f"device: {ctx.info.name} ({ctx.info.driver}); transfers: {ctx.memory.route}; "
          f"async default {'on' if runtime.context().asynchronous else 'off'}; ring {ctx.INFLIGHT}")
    rows = [run_case(n, CASES[n], args.calls, ctx) for n in args.cases.split(",")]
    cols = ("async", "sync", "host", "key", "launch", "submit", "first", "gpu")
    print(f"\n{'case (float16)':22s}" + "".join(f"{c:>9s}" for c in cols) + f"{'max err':>10s}  chain")
    bad = False
    for r in rows:
        ok = r["err"] <= FP16_ATOL and r["chain_equal"]
        bad |= not ok
        print(f"{r['case']:22s}" + "".join(f"{r[c]:9.1f}" for c in cols)
              + f"{r['err']:10.2e}  {'bit-equal' if r['chain_equal'] else 'DIFFERS'}{'' if ok else '  FAIL'}")
    print("\nmicroseconds per call; issue 14 item 4 target: async <= 25 us on the tiny case")
    print("stats:", ctx.stats)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

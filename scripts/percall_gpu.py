"""Per-call cost of tiny eager calls on a GPU machine (issue 14 item 4), as one table.

Runs the bench's ``overhead`` suite (B1 H1 S16 D64: bfloat16 on CUDA, float32 on the host) with
a fixed number of calls per timed round, after a round of warm-up: wall clock over calls back to
back, one ``torch.cuda.synchronize()`` at the end of a round (the Vulkan rows wait on their fence
each call, as a user's call does). Rows: torch SDPA, aule's Triton (forced and auto), Vulkan on
GpuTensors with recordings re-submitted and recorded anew, Vulkan on NumPy arrays, NumPy; then
the issue's targets. Nothing is written to results/.

With a CUDA device it then breaks the Triton call down, each stage timed the same way: the public
call (also with ``AULE_TRITON_DIRECT=1``, compiled kernels launched directly), the backend's
operation without validation and routing, aule's launcher, Triton's ``JITFunction.run`` alone on
the launch's own arguments, the compiled kernel's launcher alone, and the two output allocations.

    python scripts/percall_gpu.py                 # 5 rounds of 2000 calls per row
    python scripts/percall_gpu.py --calls 500 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def table(results: dict) -> None:
    from aule.bench import report
    from aule.bench.suites import case_label

    res = results["suites"].get("overhead")
    if not res or res.get("status") != "ran":
        print(f"overhead suite: {res.get('status') if res else 'not run'} {res.get('reason', '') if res else ''}")
        return
    print(f"\n{'case':34s} {'contender':40s} {'us/call':>9s} {'p20':>8s} {'p80':>8s}  note")
    for r in res["rows"]:
        if r["status"] == "ok":
            print(f"{case_label(r['params']):34s} {r['contender']:40s} {r['us_per_call']:9.1f} "
                  f"{r['ms_p20'] * 1e3:8.1f} {r['ms_p80'] * 1e3:8.1f}  {r.get('calls_per_round', '')} calls/round")
        else:
            print(f"{case_label(r['params']):34s} {r['contender']:40s} {r['status']:>9s}  {r.get('note') or ''}")
    print()
    for t in report.evaluate_targets(results):
        if t["suite"] == "overhead":
            print(f"target: {t['target']}: {t['measured']} -> {t['verdict']}")


def per_call_us(fn, sync, calls: int, rounds: int) -> float:
    from aule.bench import timing

    return timing.per_call_us(fn, sync=sync, rounds=rounds, calls=calls)["ms"] * 1e3


def triton_breakdown(calls: int, rounds: int) -> None:
    import torch

    import aule
    from aule import backends
    from aule.backends.triton import ops
    from aule.call import canonicalize

    if not torch.cuda.is_available() or backends.get("triton").unavailable_reason:
        print("\nTriton breakdown: skipped (no CUDA device with aule's triton backend here)")
        return
    sync = torch.cuda.synchronize
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((1, 1, 16, 64), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = canonicalize(q, k, v, False, None, -1, False)
    b = backends.get("triton")
    def direct(fn):
        """``fn`` with AULE_TRITON_DIRECT=1 (compiled kernels launched directly)."""
        def run():
            os.environ["AULE_TRITON_DIRECT"] = "1"
            try:
                return fn()
            finally:
                os.environ.pop("AULE_TRITON_DIRECT", None)
        return run

    os.environ.pop("AULE_TRITON_DIRECT", None)
    public = lambda: aule.flash_attention(q, k, v, causal=False)  # noqa: E731
    rows = [("torch SDPA", lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)),
            ("aule.flash_attention (auto: Triton)", public),
            ("aule.flash_attention, AULE_TRITON_DIRECT=1 (setting it counted)", direct(public)),
            ("  TritonBackend.attention (validated, routed call)", lambda: b.attention(call)),
            ("    ops.attention_forward (aule's launcher)", lambda: ops.attention_forward(q, k, v, call.scale, -1, -1)),
            ("    ops.attention_forward, AULE_TRITON_DIRECT=1",
             direct(lambda: ops.attention_forward(q, k, v, call.scale, -1, -1)))]

    # The launch's own arguments, caught on their way to Triton, for the rows below.
    seen = {}
    real = ops._KERNELS["fwd"]

    class Catch:
        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, *args, grid, warmup, **kw):
            seen.update(args=args, grid=grid, kw=kw)
            seen["compiled"] = real.run(*args, grid=grid, warmup=warmup, **kw)
            return seen["compiled"]

    ops._KERNELS["fwd"], saved = Catch(), dict(ops._LAUNCHES)
    ops._LAUNCHES.clear()
    try:
        # Twice: a first launch may go through the autotuner, which holds the real kernel; the
        # second goes through the launch cache, which now holds the catcher.
        for _ in range(2):
            ops.attention_forward(q, k, v, call.scale, -1, -1)
    finally:
        ops._KERNELS["fwd"] = real
        ops._LAUNCHES.clear()
        ops._LAUNCHES.update(saved)
    if seen:
        args, grid, kw = seen["args"], seen["grid"], seen["kw"]
        rows.append(("      Triton JITFunction.run alone",
                     lambda: real.run(*args, grid=grid, warmup=False, **kw)))
        compiled = seen["compiled"]
        named = dict(zip(real.arg_names, args), **kw)
        params = [named[n] for n in real.arg_names]
        shape = grid(named) if callable(grid) else grid
        shape = tuple(shape) + (1,) * (3 - len(shape))
        try:
            launcher = compiled[shape]
            launcher(*params)
            rows.append(("      the compiled kernel's launcher alone", lambda: launcher(*params)))
        except Exception as exc:  # a Triton whose CompiledKernel launches otherwise
            print(f"(the compiled kernel's launcher could not be called directly: {type(exc).__name__}: {exc})")
    rows.append(("  torch.empty of out and lse", lambda: (torch.empty((1, 1, 16, 64), dtype=q.dtype, device="cuda"),
                                                          torch.empty((1, 1, 16), dtype=torch.float32, device="cuda"))))
    print(f"\nTriton breakdown, B1 H1 S16 D64 bfloat16 ({rounds} rounds of {calls} calls, median us per call)")
    for name, fn in rows:
        print(f"  {name:60s} {per_call_us(fn, sync, calls, rounds):9.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per timed round (default 2000)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row; the median is shown (default 5)")
    p.add_argument("--no-suite", action="store_true", help="only the Triton breakdown")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if not args.no_suite:
        from aule.bench import run

        table(run(suites=["overhead"], progress=False, overhead_calls=args.calls))
    triton_breakdown(args.calls, args.rounds)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

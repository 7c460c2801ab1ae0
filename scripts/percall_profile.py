"""Where the host time of one tiny eager call goes (issue 14 item 4), measured without a GPU.

Triton: ``aule.flash_attention`` on CPU torch tensors with the Triton launch replaced by a no-op
(``TRITON_INTERPRET=1`` makes the kernels interpreted Python; their ``run`` is what is stubbed, so
everything of aule's up to Triton's launch is timed). ``--target cuda`` also takes the path a GPU
takes (autotuned configurations, the cached launch of a tuned pick, direct launches of a stubbed
compiled kernel and so the steady state of :mod:`aule.fastcall`), still with the no-op launch;
the rows below it break that down and time the full path with ``AULE_TRITON_DIRECT=0``.
Vulkan: the tiny call on GpuTensors with recorded-sequence reuse on and off, against the bare
re-submission of its recording (the floor: vkQueueSubmit and the fence wait, which on lavapipe
run the shader on the CPU), and on NumPy arrays.

Prints microseconds per call of the whole call and of its stages (canonicalize, routing, the
backend's operation, the launcher): the median and best rounds of the wall clock and the median
of the process's CPU time (steadier on a shared machine), then a cProfile breakdown.

    python scripts/percall_profile.py                     # both, B1 H1 S16 D64 float32
    python scripts/percall_profile.py --only vulkan --top 40
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Timing(float):
    """Median wall-clock microseconds per call (the value), with the fastest round (``best``) and
    the median of the process's CPU time per call (``cpu``, every thread of it) beside it: on a
    shared machine other work stretches the wall clock, far less the CPU time the call itself
    takes, which for the host-only rows is the cost being measured."""

    best: float
    cpu: float


def median_us(fn, calls: int, rounds: int = 15) -> Timing:
    """Median over ``rounds`` of the mean microseconds per call of ``calls // rounds`` calls back to back."""
    for _ in range(min(200, calls)):
        fn()
    n = max(1, calls // rounds)
    wall, cpu = [], []
    for _ in range(rounds):
        c0, t0 = time.process_time(), time.perf_counter()
        for _ in range(n):
            fn()
        wall.append((time.perf_counter() - t0) / n * 1e6)
        cpu.append((time.process_time() - c0) / n * 1e6)
    out = Timing(statistics.median(wall))
    out.best, out.cpu = min(wall), statistics.median(cpu)
    return out


def show(rows: list, title: str) -> None:
    print(f"\n{title}")
    print(f"  {'':64s} {'median':>9s} {'best':>9s} {'cpu':>9s}")
    for name, us in rows:
        print(f"  {name:64s} {us:9.2f} {us.best:9.2f} {us.cpu:9.2f}")


def profile(fn, calls: int, top: int, title: str) -> None:
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    pr.disable()
    print(f"\ncProfile of {calls} calls: {title} (times include the profiler's own cost)")
    pstats.Stats(pr, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def triton_part(args, shape) -> None:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: it decides at decoration
    import torch
    from triton.runtime import interpreter

    launches = [0]

    class NoCompiled:
        """What the stubbed launch returns in place of a compiled kernel: launching it does nothing."""

        def __getitem__(self, grid):
            def launch(*params):
                launches[0] += 1
            return launch

    def no_launch(self, *a, grid, warmup, **kw):
        launches[0] += 1
        if callable(grid):
            grid(kw)
        return NoCompiled()

    interpreter.InterpretedFunction.run = no_launch

    import aule
    from aule import backends, fastcall
    from aule.backends.triton import ops
    from aule.call import canonicalize
    from aule.routing import route

    b = backends.get("triton")
    b.__dict__["unavailable_reason"] = None  # as if a GPU were here (the tests do the same)
    if args.target == "cuda":
        # The GPU's path: autotuned configurations (one survives pruning at this size, so no
        # benchmark runs), whatever aule caches of the tuner's pick, and the steady state of
        # aule.fastcall, which takes CUDA tensors on NVIDIA alone.
        ops.target_of = lambda t: "cuda"
        ops._current_device = lambda: 0
        fastcall.set_launch_device(lambda t: 0)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g) for _ in range(3))

    def whole():
        return aule.flash_attention(q, k, v, causal=False, backend="triton")

    call = canonicalize(q, k, v, False, None, -1, False)
    whole()
    before = launches[0]
    whole()
    assert launches[0] == before + 1, "one call must launch one kernel"
    rows = [("aule.flash_attention(backend='triton'), launch stubbed", median_us(whole, args.calls))]
    if args.target == "cuda":
        # The default there: a repeated call takes its ready launch (aule.fastcall), whose
        # compiled kernel is the stub's; then its parts, and the full path without it.
        fk = fastcall.key(q, k, v, False, None, -1, "triton", False, 0.0)
        rows += [("  of which fastcall.key", median_us(lambda: fastcall.key(q, k, v, False, None, -1, "triton", False,
                                                                           0.0), args.calls)),
                 ("  of which fastcall.attend (fresh outputs, the stubbed launch)",
                  median_us(lambda: fastcall.attend(fk, q, k, v), args.calls))]
        key = fastcall.key
        fastcall.key = lambda *a: None
        try:
            rows.append(("  the full path, direct launches (aule.fastcall bypassed)", median_us(whole, args.calls)))
        finally:
            fastcall.key = key
    os.environ["AULE_TRITON_DIRECT"] = "0"  # the stages as they ran before: through JITFunction.run
    try:
        rows += [
            ("  AULE_TRITON_DIRECT=0: the full path, Triton's own launch", median_us(whole, args.calls)),
            ("    call.canonicalize", median_us(lambda: canonicalize(q, k, v, False, None, -1, False), args.calls)),
            ("    routing.route (forced 'triton')", median_us(lambda: route(call, "attention", "triton"), args.calls)),
            ("    TritonBackend.attention(call)", median_us(lambda: b.attention(call), args.calls)),
            ("      ops.attention_forward", median_us(lambda: ops.attention_forward(q, k, v, call.scale, -1, -1),
                                                      args.calls))]
    finally:
        del os.environ["AULE_TRITON_DIRECT"]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows.append(("torch SDPA on the CPU (computes too; for scale)", median_us(lambda: sdpa(q, k, v), args.calls)))
    show(rows, f"Triton, target {args.target}, {tuple(shape)} float32 (median us per call)")
    if args.top:
        profile(whole, args.calls, args.top, "Triton")
    if args.target == "cuda":
        paged_part(args, torch, aule, fastcall)


def paged_part(args, torch, aule, fastcall) -> None:
    """Paged decode, issue 14's b8 ctx 1k row (float16, 32/8 heads, head_dim 128, block 16,
    shuffled tables; split-K, so two launches), launches stubbed: the steady state and its parts,
    then the full path without it."""
    b, hq, hk, d, block, ctx = 8, 32, 8, 128, 16, 1024
    nb = b * ctx // block
    kc = torch.zeros(nb, block, hk, d, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    bt = torch.randperm(nb, generator=torch.Generator().manual_seed(0)).to(torch.int32).view(b, -1)
    cl = torch.full((b,), ctx, dtype=torch.int32)
    q = torch.zeros(b, hq, 1, d, dtype=torch.float16)

    def whole():
        return aule.flash_attention_paged(q, kc, vc, bt, cl, backend="triton")

    for _ in range(3):
        whole()
    key_args = (q, kc, vc, bt, cl, None, -1, "triton", 0.0, None, None, None)
    fk = fastcall.paged_key(*key_args)
    ready = fastcall._ENTRIES.get(fk)
    rows = [("aule.flash_attention_paged, steady state, launches stubbed", median_us(whole, args.calls)),
            ("  of which fastcall.paged_key", median_us(lambda: fastcall.paged_key(*key_args), args.calls))]
    if ready is not None:
        rows += [("  of which fastcall.attend (lookup, error poll, ready launches)",
                  median_us(lambda: fastcall.attend(fk, q, kc, vc, bt, cl), args.calls)),
                 ("    of which torch.empty of the fresh tensors",
                  median_us(lambda: [torch.empty(s, dtype=t, device=ready.device) for s, t in ready.fresh], args.calls))]
    key = fastcall.paged_key
    fastcall.paged_key = lambda *a: None
    try:
        rows.append(("  the full path, direct launches (aule.fastcall bypassed)", median_us(whole, args.calls)))
    finally:
        fastcall.paged_key = key
    show(rows, f"Triton paged, b{b} ctx {ctx} float16, {len(ready.launches) if ready else '?'} launches (median us per call)")
    if args.top:
        profile(whole, args.calls, args.top, "Triton paged, steady state")


def vulkan_part(args, shape) -> None:
    import numpy as np

    import aule
    from aule import backends
    from aule.backends.vulkan import launch, runtime, to_gpu
    from aule.backends.vulkan.runtime.sequence import Sequence
    from aule.call import canonicalize
    from aule.routing import route

    why = backends.get("vulkan").unavailable_reason
    if why:
        print(f"\nVulkan: unavailable here ({why})")
        return
    ctx = runtime.context()
    rng = np.random.default_rng(0)
    host = [rng.standard_normal(shape).astype(np.float32) for _ in range(3)]
    q, k, v = (to_gpu(x) for x in host)

    def whole():
        return aule.flash_attention(q, k, v, causal=False, backend="vulkan")

    call = canonicalize(q, k, v, False, None, -1, False)
    b = backends.get("vulkan")
    rows = []
    reuse = ctx.reuse

    def by_reuse(label):
        for on in (True, False):
            ctx.reuse = on
            ctx.forget_recordings()
            rows.append((f"{label}, reuse {'on' if on else 'off'}", median_us(whole, args.calls)))

    try:
        by_reuse("aule.flash_attention on GpuTensors")
        ctx.reuse = True
        for _ in range(3):  # seen, recorded and kept (each result freed before the next call)
            whole()
        seq = next(reversed(ctx._recordings.values()))
        floor = median_us(seq.submit, args.calls)
        rows.append(("  bare re-submission of its recording (submit + fence wait)", floor))
        # aule's host time alone: the same calls with the submission (and so the driver's work)
        # taken out; lavapipe's own thread hand-offs make the difference of the rows above noisy.
        submit = Sequence.submit
        Sequence.submit = lambda self, wait=True: self
        try:
            by_reuse("  aule's host time alone (submission stubbed)")
        finally:
            Sequence.submit = submit
            ctx.reuse = True
        rows.append(("  call.canonicalize", median_us(lambda: canonicalize(q, k, v, False, None, -1, False),
                                                      args.calls)))
        rows.append(("  routing.route (forced 'vulkan')", median_us(lambda: route(call, "attention", "vulkan"),
                                                                    args.calls)))
        rows.append(("  launch.attention_plan_for (a cached plan)", median_us(lambda: launch.attention_plan_for(
            call, ctx), args.calls)))
        rows.append(("  VulkanBackend.attention(call)", median_us(lambda: b.attention(call), args.calls)))
        hq, hk, hv = host
        rows.append(("aule.flash_attention on NumPy arrays (uploads, download)",
                     median_us(lambda: aule.flash_attention(hq, hk, hv, causal=False, backend="vulkan"), args.calls)))
    finally:
        ctx.reuse = reuse
    show(rows, f"Vulkan on {ctx.info.name}, {tuple(shape)} float32 (median us per call)")
    if args.top:
        profile(whole, args.calls, args.top, "Vulkan on GpuTensors, reuse on")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=("triton", "vulkan"), help="measure one backend (default: both)")
    p.add_argument("--calls", type=int, default=3000, help="calls per measurement (default 3000)")
    p.add_argument("--shape", default="1,1,16,64", help="B,H,S,D of q, k and v (default 1,1,16,64)")
    p.add_argument("--target", choices=("interpret", "cuda"), default="cuda",
                   help="Triton: the interpreter's launch path, or a GPU's (autotuned; the default)")
    p.add_argument("--top", type=int, default=25, help="cProfile rows to print (0: no profile)")
    args = p.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.only in (None, "triton"):
        triton_part(args, shape)
    if args.only in (None, "vulkan"):
        vulkan_part(args, shape)


if __name__ == "__main__":
    main()

"""Per-call cost of tiny eager calls on a GPU machine (issue 14 item 4), as one table.

B1 H1 S16 D64 bfloat16 on CUDA, calls back to back, one ``torch.cuda.synchronize()`` at the end of
each timed round, the median round shown. Rows: torch SDPA; aule's Triton as it runs by default
(a repeated call takes its ready launch, :mod:`aule.fastcall`); the same with
``AULE_TRITON_DIRECT=0`` (the full path through Triton's ``JITFunction.run``, the escape); auto
routing; then the breakdown of both paths down to Triton's own launcher, and a check that the
steady state's outputs equal the full path's. Each setting is made once around its row, never per
call. The issue's target: at most 2x SDPA.

Writes nothing outside ``$OUT``: Triton's compile cache and aule's cache folder go to a folder
there (a temporary one without ``$OUT``), removed at the end. ``--suite`` also runs the bench's
``overhead`` suite (Vulkan and NumPy rows too; slower).

    python3 scripts/percall_gpu.py                 # 5 rounds of 2000 calls per row
    python3 scripts/percall_gpu.py --calls 500 --rounds 3
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
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


def scratch_dir(prefix: str) -> str:
    """A folder of this run's own (under $OUT where it is set) holding Triton's and aule's caches
    unless the caller chose theirs; the caller removes it at the end."""
    out = os.environ.get("OUT")
    scratch = tempfile.mkdtemp(prefix=prefix, dir=out if out and os.path.isdir(out) else None)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(scratch, "triton"))
    os.environ.setdefault("AULE_CACHE_DIR", os.path.join(scratch, "aule"))
    return scratch


def env(name: str, value):
    """``name`` set to ``value`` (None: unset) for the block, then as it was."""
    from aule.bench.contenders import _environ

    return _environ({name: value})


def triton_rows(calls: int, rounds: int) -> None:
    import torch

    import aule
    from aule import backends, fastcall
    from aule.backends.triton import ops
    from aule.bench import timing
    from aule.call import canonicalize

    if not torch.cuda.is_available() or backends.get("triton").unavailable_reason:
        print("\nTriton rows: skipped (no CUDA device with aule's triton backend here)")
        return
    sync = torch.cuda.synchronize

    def us(fn, setting=None):
        with env("AULE_TRITON_DIRECT", setting):
            return timing.per_call_us(fn, sync=sync, rounds=rounds, calls=calls)["ms"] * 1e3

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn((1, 1, 16, 64), generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    forced = lambda: aule.flash_attention(q, k, v, causal=False, backend="triton")  # noqa: E731
    auto = lambda: aule.flash_attention(q, k, v, causal=False)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731

    # Equal outputs first: the steady state against the full path with Triton's own launch.
    with env("AULE_TRITON_DIRECT", "0"):
        want, want_lse = aule.flash_attention(q, k, v, causal=False, backend="triton", return_lse=True)
    for _ in range(3):
        got, got_lse = aule.flash_attention(q, k, v, causal=False, backend="triton", return_lse=True)
    sync()
    same = torch.equal(got, want) and torch.equal(got_lse, want_lse)
    print(f"\nsteady-state outputs equal to the full path's (AULE_TRITON_DIRECT=0): {same}; "
          f"ready launches cached: {len(fastcall._ENTRIES)}")

    t_sdpa = us(sdpa)
    main = [("torch SDPA", t_sdpa),
            ("aule triton (default: steady state, aule.fastcall)", us(forced)),
            ("aule triton, AULE_TRITON_DIRECT=0 (the full path)", us(forced, "0"))]
    key = fastcall.key
    fastcall.key = lambda *a: None
    try:
        main.append(("aule triton, full path with direct launches (no fastcall)", us(forced)))
    finally:
        fastcall.key = key
    main.append(("aule auto routing (default)", us(auto)))
    print(f"\nB1 H1 S16 D64 bfloat16 ({rounds} rounds of {calls} calls; median us per call)")
    for name, t in main:
        print(f"  {name:64s} {t:9.2f}  {t / t_sdpa:5.2f}x SDPA")
    print(f"  target: aule triton <= 2x SDPA = {2 * t_sdpa:.1f} us -> "
          f"{'met' if main[1][1] <= 2 * t_sdpa else 'NOT met'}")

    # The steady state's parts.
    fk = fastcall.key(q, k, v, False, None, -1, "triton", False, 0.0)
    ready = fastcall._ENTRIES.get(fk)
    rows = [("fastcall.key (the cache key)", lambda: fastcall.key(q, k, v, False, None, -1, "triton", False, 0.0))]
    if ready is not None:
        out, lse = ready(q, k, v)
        runner, pick = ready.launches[0]
        params = pick((q, k, v, out, lse) + ready.consts)
        rows += [("fastcall.attend (lookup, error poll, ready launch)", lambda: fastcall.attend(fk, q, k, v)),
                 ("  Ready: torch.empty of out and lse + launch", lambda: ready(q, k, v)),
                 ("  torch.empty of out and lse", lambda: [torch.empty(shape, dtype=dtype, device=ready.device)
                                                           for shape, dtype in ready.fresh]),
                 ("  the compiled kernel's launcher alone (Triton's runner)", lambda: runner(*params))]
    else:
        print("(no ready launch for the forced call: the steady state was not reached)")
    print("\nsteady state, by part")
    for name, fn in rows:
        print(f"  {name:64s} {us(fn):9.2f}")

    # The full path's parts (AULE_TRITON_DIRECT=0 unless said).
    call = canonicalize(q, k, v, False, None, -1, False)
    b = backends.get("triton")
    rows = [("call.canonicalize", lambda: canonicalize(q, k, v, False, None, -1, False), "0"),
            ("TritonBackend.attention (validated, routed call)", lambda: b.attention(call), "0"),
            ("  ops.attention_forward (aule's launcher)", lambda: ops.attention_forward(q, k, v, call.scale, -1, -1),
             "0"),
            ("  ops.attention_forward, direct launch", lambda: ops.attention_forward(q, k, v, call.scale, -1, -1),
             None)]
    seen = {}
    real = ops._KERNELS["fwd"]

    class Catch:
        """The launch's own arguments, caught on their way to Triton."""

        def __getattr__(self, name):
            return getattr(real, name)

        def run(self, *args, grid, warmup, **kw):
            seen.update(args=args, grid=grid, kw=kw)
            return real.run(*args, grid=grid, warmup=warmup, **kw)

    ops._KERNELS["fwd"], saved = Catch(), dict(ops._LAUNCHES)
    ops._LAUNCHES.clear()
    try:
        with env("AULE_TRITON_DIRECT", "0"):
            for _ in range(2):  # the first may go through the autotuner, which holds the real kernel
                ops.attention_forward(q, k, v, call.scale, -1, -1)
    finally:
        ops._KERNELS["fwd"] = real
        ops._LAUNCHES.clear()
        ops._LAUNCHES.update(saved)
        fastcall.forget()
    if seen:
        args, grid, kw = seen["args"], seen["grid"], seen["kw"]
        rows.append(("    Triton JITFunction.run alone", lambda: real.run(*args, grid=grid, warmup=False, **kw), "0"))
    print("\nfull path, by part")
    for name, fn, setting in rows:
        print(f"  {name:64s} {us(fn, setting):9.2f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, default=2000, help="calls per timed round (default 2000)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per row; the median is shown (default 5)")
    p.add_argument("--suite", action="store_true", help="also run the bench's overhead suite (every backend)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    scratch = scratch_dir("percall-")
    try:
        if args.suite:
            from aule.bench import run

            table(run(suites=["overhead"], progress=False, overhead_calls=args.calls))
        triton_rows(args.calls, args.rounds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

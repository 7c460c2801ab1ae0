"""Per-call time of eager paged decode on a GPU (issue 14: the public call at the kernel's speed).

The issue's decode table: float16, 32 query / 8 KV heads, head_dim 128, block 16, shuffled block
tables, one query row per sequence, batch 8, 64 and 1 at contexts 1k to 32k (as many rows as fit
the time limit, most wanted first). Each row checks first that the public call
(``aule.flash_attention_paged``) matches SDPA on a contiguous copy of the cache and that its steady
state (the ready launches of :mod:`aule.fastcall`) gives the full path's bits
(``AULE_TRITON_DIRECT=0``); then times, with CUDA events over back-to-back calls after at least
``--warmup`` seconds of them, the median per call of: the public call (its steady state), the
launcher ``paged_attention_triton`` with ``check=False`` and ``check=True``, and SDPA on the
contiguous cache (``enable_gqa``). TB/s counts K and V read once plus q and the output.

Before the table, host time per call (``time.perf_counter`` around calls back to back, one
synchronisation at the end, at b1 ctx 1k and b8 ctx 1k where the GPU is not the bound): the
public call, its parts (the key, the lookup and ready launches, the ready launches alone, Triton's
compiled launchers alone), the full path without the steady state, Triton's own launch path
(``AULE_TRITON_DIRECT=0``), the launcher and SDPA.

Writes nothing outside ``$OUT``: Triton's compile cache and aule's cache folder go to a folder
there (a temporary one without ``$OUT``), removed at the end. Stops starting rows when
``--budget`` seconds have passed.

    python3 scripts/paged_percall.py
    python3 scripts/paged_percall.py --budget 60 --rows b8:1k,b8:32k
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from percall_gpu import env, scratch_dir  # noqa: E402  (this directory is the script's first path)

ROWS = ["b8:1k", "b8:4k", "b8:8k", "b8:32k", "b64:1k", "b64:4k", "b1:1k", "b1:32k", "b64:8k", "b1:4k", "b1:8k",
        "b64:32k"]
HQ, HKV, D, BLOCK = 32, 8, 128, 16
HOST_ROWS = ((1, 1024), (8, 1024))  # where host time is measured: the GPU is not the bound there


def parse_row(text: str) -> tuple[int, int]:
    b, ctx = text.lower().split(":")
    n = ctx.rstrip("k")
    return int(b.lstrip("b")), int(n) * (1024 if ctx.endswith("k") else 1)


def make(torch, batch: int, ctx: int, seed: int = 0):
    """``(q, k_cache, v_cache, block_tables, context_lens, k, v)``: a decode step over shuffled
    blocks, and the contiguous ``[B, Hkv, ctx, D]`` copies SDPA reads."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    per = ctx // BLOCK
    nb = batch * per
    kc = torch.randn(nb, BLOCK, HKV, D, generator=g, device="cuda", dtype=torch.float16)
    vc = torch.randn(nb, BLOCK, HKV, D, generator=g, device="cuda", dtype=torch.float16)
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed))
    bt = perm.to(device="cuda", dtype=torch.int32).view(batch, per)
    cl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, HQ, 1, D, generator=g, device="cuda", dtype=torch.float16)
    idx = bt.long()
    k = kc[idx].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    v = vc[idx].reshape(batch, ctx, HKV, D).transpose(1, 2).contiguous()
    return q, kc, vc, bt, cl, k, v


def event_us(torch, fn, warmup_s: float, rounds: int = 7, round_ms: float = 20.0) -> float:
    """Median over ``rounds`` of the CUDA-event time per call of calls back to back (each round
    about ``round_ms``), after ``warmup_s`` seconds of them (the clocks of sustained work)."""
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < warmup_s:
        for _ in range(10):
            fn()
        n += 10
        torch.cuda.synchronize()
    per = (time.perf_counter() - t0) / max(n, 1)
    calls = max(10, min(5000, int(round_ms * 1e-3 / max(per, 1e-7))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(rounds):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def host_us(torch, fn, calls: int = 1000, rounds: int = 3) -> float:
    """Median over ``rounds`` of the host time per call of ``calls`` calls back to back, one
    synchronisation after each round (outside the clock)."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(times)


def host_rows(torch, aule, batch: int, ctx: int) -> None:
    from aule import fastcall
    from aule.backends.triton.paged import paged_attention_triton

    q, kc, vc, bt, cl, k, v = make(torch, batch, ctx, seed=1)
    scale = D ** -0.5
    public = lambda: aule.flash_attention_paged(q, kc, vc, bt, cl)  # noqa: E731
    args = (q, kc, vc, bt, cl, None, -1, None, 0.0, None, None, None)
    for _ in range(3):
        public()
    fk = fastcall.paged_key(*args)
    ready = fastcall._ENTRIES.get(fk)
    rows = [("aule.flash_attention_paged (steady state)", public),
            ("  fastcall.paged_key", lambda: fastcall.paged_key(*args)),
            ("  fastcall.attend (lookup, error poll, ready launches)", lambda: fastcall.attend(fk, q, kc, vc, bt, cl))]
    if ready is not None:
        inputs = (q, kc, vc, bt, cl)
        rows.append(("    Ready alone (fresh out/scratch, flag row, launches)", lambda: ready(*inputs)))
        fresh = tuple(torch.empty(s, dtype=d, device=ready.device) for s, d in ready.fresh)
        rows.append(("    torch.empty of the fresh tensors", lambda: [torch.empty(s, dtype=d, device=ready.device)
                                                                     for s, d in ready.fresh]))
        # The flag tensors of a row taken and given back at once (its kernels write nothing here).
        from aule.backends.triton import flags

        errors = flags.error_flags()
        flag = errors.acquire(ready.flag_meta) if ready.flag_meta is not None else None
        tensors = inputs + fresh + ((flag.err, flag.dirty) if flag is not None else ()) + ready.consts
        for i, (runner, pick) in enumerate(ready.launches):
            params = pick(tensors)
            rows.append((f"    Triton's compiled launcher alone, launch {i + 1} of {len(ready.launches)}",
                         lambda runner=runner, params=params: runner(*params)))
    else:
        print("  (no ready launch: the steady state was not reached)")
    real_key = fastcall.paged_key
    rows += [("full path, direct launches (fastcall bypassed)", None),
             ("full path, AULE_TRITON_DIRECT=0 (Triton's own launch)", "direct0"),
             ("paged_attention_triton(check=False)",
              lambda: paged_attention_triton(q, kc, vc, bt, cl, scale, -1, ctx, check=False)),
             ("paged_attention_triton(check=True)",
              lambda: paged_attention_triton(q, kc, vc, bt, cl, scale, -1, ctx, check=True)),
             ("SDPA, contiguous cache",
              lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))]
    print(f"\nhost us per call, b{batch} ctx {ctx} (median of 3 rounds of 1000 calls back to back)")
    for name, fn in rows:
        if fn is None:
            fastcall.paged_key = lambda *a: None
            try:
                t = host_us(torch, public, calls=300)
            finally:
                fastcall.paged_key = real_key
        elif fn == "direct0":
            with env("AULE_TRITON_DIRECT", "0"):
                t = host_us(torch, public, calls=300)
        else:
            t = host_us(torch, fn)
        print(f"  {name:60s} {t:8.1f}", flush=True)
    if ready is not None and flag is not None:
        errors.launched(flag, q.device)  # the row the launcher rows wrote into, given back
    aule.check_device_errors()


def table_rows(torch, aule, rows, warmup_s: float, deadline: float) -> None:
    print(f"\nper-call us (CUDA events, median of 7 rounds after {warmup_s:.1f} s of calls); TB/s = (K + V + q + out) "
          "bytes / time")
    print(f"  {'row':9s} {'check':>22s} {'public':>8s} {'launch':>8s} {'launch+chk':>10s} {'SDPA':>8s}   "
          f"{'TB/s pub':>8s} {'launch':>7s} {'SDPA':>6s}   {'pub/SDPA':>8s} {'pub/launch':>10s}")
    for text in rows:
        if time.perf_counter() > deadline:
            print(f"  {text:9s} skipped: time budget spent")
            continue
        try:
            one_row(torch, aule, text, warmup_s)
        except Exception as e:  # noqa: BLE001 - one row's failure is reported, the others still run
            print(f"  {text:9s} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        torch.cuda.empty_cache()


def one_row(torch, aule, text: str, warmup_s: float) -> None:
    from aule import fastcall
    from aule.backends.triton.paged import paged_attention_triton

    batch, ctx = parse_row(text)
    q, kc, vc, bt, cl, k, v = make(torch, batch, ctx)
    scale = D ** -0.5
    public = lambda: aule.flash_attention_paged(q, kc, vc, bt, cl)  # noqa: E731
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    ref = sdpa().float()  # float16 too: a float32 reference would expand K and V for GQA (68 GB at b64 32k)
    with env("AULE_TRITON_DIRECT", "0"):
        plain = public()
    before = len(fastcall._ENTRIES)
    outs = [public() for _ in range(3)]
    torch.cuda.synchronize()
    err = (outs[-1].float() - ref).abs().max().item()
    same = all(torch.equal(o, plain) for o in outs)
    hit = len(fastcall._ENTRIES) > before or fastcall.paged_key(
        q, kc, vc, bt, cl, None, -1, None, 0.0, None, None, None) in fastcall._ENTRIES
    note = f"err {err:.1e} {'bits=full' if same else 'BITS DIFFER'}{'' if hit else ' NO HIT'}"
    if err > 5e-3:
        note += " WRONG"
    t_pub = event_us(torch, public, warmup_s)
    t_l = event_us(torch, lambda: paged_attention_triton(q, kc, vc, bt, cl, scale, -1, ctx, check=False), warmup_s)
    t_lc = event_us(torch, lambda: paged_attention_triton(q, kc, vc, bt, cl, scale, -1, ctx, check=True), warmup_s)
    t_s = event_us(torch, sdpa, warmup_s)
    nbytes = 2 * batch * ctx * HKV * D * 2 + 2 * batch * HQ * D * 2
    tbs = lambda t: nbytes / (t * 1e-6) / 1e12  # noqa: E731
    print(f"  {text:9s} {note:>22s} {t_pub:8.1f} {t_l:8.1f} {t_lc:10.1f} {t_s:8.1f}   {tbs(t_pub):8.2f} "
          f"{tbs(t_l):7.2f} {tbs(t_s):6.2f}   {t_s / t_pub:7.2f}x {t_l / t_pub:9.2f}x", flush=True)
    aule.check_device_errors()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default=",".join(ROWS), help="rows as bB:CTX, most wanted first (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of back-to-back calls before timing each")
    p.add_argument("--budget", type=float, default=85.0, help="start no row after this many seconds")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    scratch = scratch_dir("paged-percall-")
    try:
        import torch

        import aule
        from aule import backends

        if not torch.cuda.is_available() or backends.get("triton").unavailable_reason:
            print("skipped: no CUDA device with aule's triton backend here")
            return
        print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
              f"{__import__('triton').__version__}, Python {sys.version.split()[0]}")
        for batch, ctx in HOST_ROWS:
            try:
                host_rows(torch, aule, batch, ctx)
            except Exception as e:  # noqa: BLE001 - reported; the table still runs
                print(f"host rows b{batch} ctx {ctx} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
        table_rows(torch, aule, [r.strip() for r in args.rows.split(",") if r.strip()], args.warmup,
                   t0 + args.budget)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()

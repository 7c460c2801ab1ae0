"""aule's Triton attention against PyTorch SDPA (flash and cuDNN backends), same process, same inputs.

    python benchmarks/triton_attention.py [--quick] [--dtype bfloat16] [--out results/triton.json]

Every case is checked before it is timed (aule's output and gradients against SDPA-flash's on the
same inputs, relative L2 error). Times are triton.testing.do_bench medians (CUDA events, warm-up).
FLOPs: 4*B*H*Sq*Sk*D forward, halved for causal; forward+backward counts 3.5x the forward.
Shapes hold 16k tokens per batch at model dim 2048 (heads = 2048 / head_dim).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from aule import masks  # noqa: E402
from aule.backends.triton.ops import triton_attention  # noqa: E402

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None

TOKENS = 16384
MODEL_DIM = 2048


def median_ms(fn, grad_to_none=None):
    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=grad_to_none,
                                   return_mode="median")


def flops(b, h, sq, sk, d, causal, bwd):
    f = 4.0 * b * h * sq * sk * d * (0.5 if causal else 1.0)
    return f * 3.5 if bwd else f


def rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def sdpa_call(backend, q, k, v, causal, gqa=False):
    def run():
        kw = {"enable_gqa": True} if gqa else {}
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)
    return run


def aule_call(q, k, v, left, right):
    scale = q.shape[-1] ** -0.5
    return lambda: triton_attention(q, k, v, scale, left, right)[0]


def time_fwd(fn):
    with torch.no_grad():
        fn()
        return median_ms(fn)


def time_fwd_bwd(fn, inputs, dout):
    def step():
        fn().backward(dout)
    step()
    return median_ms(step, grad_to_none=list(inputs))


def grads_of(fn, inputs, dout):
    for x in inputs:
        x.grad = None
    out = fn()
    out.backward(dout)
    g = [x.grad.clone() for x in inputs]
    for x in inputs:
        x.grad = None
    return out.detach(), g


def try_time(label, thunk, notes):
    try:
        return thunk()
    except Exception as exc:  # a competitor that cannot run this shape is reported, not fatal
        notes.append(f"{label}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
        return None


def dense_case(d, seq, causal, dtype, rows, notes, check_tol):
    b, h = max(1, TOKENS // seq), MODEL_DIM // d
    g = torch.Generator(device="cuda").manual_seed(seq + d)
    q, k, v = (torch.randn(b, h, seq, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
               for _ in range(3))
    dout = torch.randn(b, h, seq, d, device="cuda", dtype=dtype, generator=g)
    right = 0 if causal else -1
    ours = aule_call(q, k, v, -1, right)
    flash = sdpa_call(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
    cudnn = sdpa_call(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)

    o_ours, g_ours = grads_of(ours, (q, k, v), dout)
    o_ref, g_ref = grads_of(flash, (q, k, v), dout)
    errs = [rel(o_ours, o_ref)] + [rel(a, r) for a, r in zip(g_ours, g_ref)]
    ok = all(e < check_tol for e in errs)
    if not ok:
        notes.append(f"d{d} s{seq} causal={causal}: MISMATCH vs SDPA-flash (out,dq,dk,dv rel) "
                     + ", ".join(f"{e:.2e}" for e in errs))
    name = f"hd{d} s{seq} {'causal' if causal else 'full'} B{b} H{h}"
    for bwd in (False, True):
        fl = flops(b, h, seq, seq, d, causal, bwd)
        if bwd:
            t = {n: try_time(f"{name} {n} fwd+bwd", lambda f=f: time_fwd_bwd(f, (q, k, v), dout), notes)
                 for n, f in (("aule", ours), ("flash", flash), ("cudnn", cudnn))}
        else:
            t = {n: try_time(f"{name} {n} fwd", lambda f=f: time_fwd(f), notes)
                 for n, f in (("aule", ours), ("flash", flash), ("cudnn", cudnn))}
        rows.append({"case": name, "pass": "fwd+bwd" if bwd else "fwd", "max_rel_err": max(errs),
                     "correct": ok, **{f"{n}_ms": v for n, v in t.items()},
                     **{f"{n}_tflops": (fl / v / 1e9 if v else None) for n, v in t.items()}})


def gqa_case(dtype, rows, notes):
    b, hq, hkv, seq, d = TOKENS // 4096, 64, 8, 4096, 128
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(b, hq, seq, d, device="cuda", dtype=dtype, generator=g)
    k, v = (torch.randn(b, hkv, seq, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
    kx, vx = (x.repeat_interleave(hq // hkv, 1) for x in (k, v))
    ours = aule_call(q, k, v, -1, 0)
    expanded = aule_call(q, kx, vx, -1, 0)
    flash = sdpa_call(SDPBackend.FLASH_ATTENTION, q, k, v, True, gqa=True)
    with torch.no_grad():
        err = rel(ours(), expanded())
        flash_err = try_time("gqa flash check", lambda: rel(ours(), flash()), notes)
    fl = flops(b, hq, seq, seq, d, True, False)
    t = {"aule": time_fwd(ours), "aule_expanded_kv": time_fwd(expanded),
         "flash": try_time("gqa flash (enable_gqa)", lambda: time_fwd(flash), notes)}
    rows.append({"case": f"GQA {hq}/{hkv} hd{d} s{seq} causal B{b}", "pass": "fwd",
                 "max_rel_err": max(err, flash_err or 0.0), "correct": err < 1e-2,
                 **{f"{n}_ms": v for n, v in t.items()},
                 **{f"{n}_tflops": (fl / v / 1e9 if v else None) for n, v in t.items()}})


def window_case(dtype, rows, notes):
    b, h, seq, d, w = TOKENS // 8192, 32, 8192, 128, 256
    g = torch.Generator(device="cuda").manual_seed(2)
    q, k, v = (torch.randn(b, h, seq, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    left, right = masks.canonical_window(True, w)
    win = aule_call(q, k, v, left, right)
    full = aule_call(q, k, v, -1, 0)
    # Correctness of the window on a slice: SDPA math with the explicit boolean mask.
    qs, ks, vs = q[:1, :2], k[:1, :2], v[:1, :2]
    vis = torch.from_numpy(masks.mask(seq, seq, left, right)).to("cuda")
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(qs.float(), ks.float(), vs.float(), attn_mask=vis)
        err = rel(win()[:1, :2], ref)
    t = {"aule_window": time_fwd(win), "aule_full_causal": time_fwd(full)}
    rows.append({"case": f"window {w} hd{d} s{seq} H{h} B{b}", "pass": "fwd", "max_rel_err": err,
                 "correct": err < 1e-2, **{f"{n}_ms": v for n, v in t.items()},
                 "speedup_vs_full_causal": t["aule_full_causal"] / t["aule_window"]})


def warm(spec, dtype):
    """Compile (into Triton's disk cache) what one benchmark family launches, at the same
    specialization: run in parallel processes, one per configuration (AULE_TRITON_CONFIG)."""
    kind, d, causal = spec.split(",")
    d, causal = int(d), causal == "1"
    seq = 1024
    g = torch.Generator(device="cuda").manual_seed(0)
    if kind == "dense":
        h = MODEL_DIM // d
        q, k, v = (torch.randn(1, h, seq, d, device="cuda", dtype=dtype, generator=g).requires_grad_()
                   for _ in range(3))
        out = aule_call(q, k, v, -1, 0 if causal else -1)()
        out.backward(torch.randn_like(out))
    elif kind == "gqa":
        q = torch.randn(1, 64, seq, d, device="cuda", dtype=dtype, generator=g)
        k, v = (torch.randn(1, 8, seq, d, device="cuda", dtype=dtype, generator=g) for _ in range(2))
        aule_call(q, k, v, -1, 0)()
    else:
        q, k, v = (torch.randn(1, 32, seq, d, device="cuda", dtype=dtype, generator=g) for _ in range(3))
        aule_call(q, k, v, *masks.canonical_window(True, 256))()
    torch.cuda.synchronize()


def prewarm(workers, dtype_name, quick):
    """Compile every candidate configuration of every kernel the run needs, in parallel."""
    import subprocess

    dims = (128,) if quick else (64, 128)
    specs = [f"dense,{d},{int(c)}" for d in dims for c in (False, True)] + ["gqa,128,1", "window,128,1"]
    tasks = [(s, i) for s in specs for i in range(4)]
    running, t0, failed = [], time.time(), []
    for spec, i in tasks:
        while len(running) >= workers:
            still = []
            for p, name in running:
                if p.poll() is None:
                    still.append((p, name))
                elif p.returncode:
                    failed.append(name)
            running = still
            time.sleep(0.2)
        env = dict(os.environ, AULE_TRITON_CONFIG=str(i))
        cmd = [sys.executable, os.path.abspath(__file__), "--warm", spec, "--dtype", dtype_name]
        running.append((subprocess.Popen(cmd, env=env), f"{spec}#{i}"))
    for p, name in running:
        if p.wait():
            failed.append(name)
    print(f"prewarm: {len(tasks)} compilations in {time.time() - t0:.0f}s"
          + (f", failed: {failed}" if failed else ""), flush=True)


def matmul_ceiling(dtype):
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    bmat = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192 ** 3 / median_ms(lambda: a @ bmat) / 1e9


def fmt(x, spec="{:.0f}"):
    return "-" if x is None else spec.format(x)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="head_dim 128, seq 4k only")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "results"), "triton_attention.json"))
    ap.add_argument("--prewarm", type=int, default=0, metavar="N",
                    help="first compile every candidate kernel in N parallel processes")
    ap.add_argument("--prewarm-only", action="store_true", help="compile, then stop")
    ap.add_argument("--warm", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or sdpa_kernel is None:
        print("needs a CUDA/ROCm device and torch >= 2.3")
        return 1
    dtype = getattr(torch, args.dtype)
    if args.warm:
        warm(args.warm, dtype)
        return 0
    if args.prewarm:
        prewarm(args.prewarm, args.dtype, args.quick)
        if args.prewarm_only:
            return 0
    info = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": triton.__version__, "dtype": args.dtype}
    print(" ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    info["matmul_ceiling_tflops"] = matmul_ceiling(dtype)
    print(f"bf16 8192^3 matmul ceiling: {info['matmul_ceiling_tflops']:.0f} TFLOP/s", flush=True)
    rows, notes = [], []
    dims, seqs = ((128,), (4096,)) if args.quick else ((64, 128), (1024, 4096, 16384))
    t0 = time.time()
    for d in dims:
        for seq in seqs:
            for causal in (False, True):
                dense_case(d, seq, causal, dtype, rows, notes, check_tol=2e-2)
                print(f"[{time.time() - t0:6.1f}s] done hd{d} s{seq} causal={causal}", flush=True)
    gqa_case(dtype, rows, notes)
    window_case(dtype, rows, notes)
    from aule.backends.triton.ops import tuned_choices

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"info": info, "rows": rows, "notes": notes, "tuned": tuned_choices()}, fh,
                  indent=1)

    print(f"\n{info['device']}, torch {info['torch']}, triton {info['triton']}, {args.dtype}")
    print("| case | pass | aule TF/s | flash TF/s | cuDNN TF/s | aule/flash | aule/cuDNN | rel err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "speedup_vs_full_causal" in r:
            print(f"| {r['case']} | fwd | window {r['aule_window_ms']:.3f} ms | full causal "
                  f"{r['aule_full_causal_ms']:.3f} ms | | speed-up x{r['speedup_vs_full_causal']:.1f} | "
                  f"| {r['max_rel_err']:.1e} |")
            continue
        a, f_, c = r.get("aule_tflops"), r.get("flash_tflops"), r.get("cudnn_tflops")
        extra = ""
        if "aule_expanded_kv_tflops" in r:
            extra = f" (expanded K/V: {fmt(r['aule_expanded_kv_tflops'])})"
        print(f"| {r['case']} | {r['pass']} | {fmt(a)}{extra} | {fmt(f_)} | {fmt(c)} | "
              f"{fmt(a / f_ if a and f_ else None, '{:.2f}')} | {fmt(a / c if a and c else None, '{:.2f}')} "
              f"| {r['max_rel_err']:.1e} |")
    for n in notes:
        print("note:", n)
    return 0 if all(r["correct"] for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())

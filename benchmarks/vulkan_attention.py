#!/usr/bin/env python3
"""Vulkan attention speed, side by side with PyTorch SDPA in one process on the same inputs.

    python benchmarks/vulkan_attention.py cpu        # lavapipe-class: B1 H8 S1024 D64 causal fp32
    python benchmarks/vulkan_attention.py gpu        # B1 H32 S4096 D64/D128 causal, GPU-resident
    python benchmarks/vulkan_attention.py gpu --json results.json

Correctness is checked against the float64 reference (on a few heads) before anything is timed.
GPU time comes from Vulkan timestamp queries; wall time from perf_counter around whole calls.
FLOPs = 4*B*H*Sq*Sk*D, halved for causal. Prints a markdown table last.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aule  # noqa: E402
from aule.backends.vulkan import GpuTensor, attention, kernels, runtime, to_gpu  # noqa: E402
from aule.bench.timing import spin_up  # noqa: E402
from aule.reference import attention_reference  # noqa: E402


def flops(b, h, sq, sk, d, causal):
    f = 4.0 * b * h * sq * sk * d
    return f / 2 if causal else f


def check(out, q, k, v, causal, heads=(0, -1)):
    """Max abs error against float64 on a few heads (the full reference would not fit)."""
    err = 0.0
    hk = k.shape[1]
    g = q.shape[1] // hk
    for h in heads:
        h = h % q.shape[1]
        ref = attention_reference(q[:1, h:h + 1], k[:1, h // g:h // g + 1], v[:1, h // g:h // g + 1], causal=causal)
        err = max(err, float(np.abs(out[:1, h:h + 1].astype(np.float64) - ref).max()))
    return err


def time_vulkan(qg, kg, vg, causal, reps):
    # Warm up for a while, not a few calls: the driver raises the clocks only under sustained work.
    spin_up(lambda: attention(qg, kg, vg, causal=causal)[0].free())
    walls, gpus = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        out, _, ns = attention(qg, kg, vg, causal=causal, timestamps=True)
        walls.append(time.perf_counter() - t0)
        gpus.append(ns)
        out.free()
    return statistics.median(walls), (statistics.median(gpus) * 1e-9 if gpus[0] is not None else None)


def time_torch(fn, reps, cuda):
    import torch

    for _ in range(3):
        fn()
    if cuda:
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) * 1e-3)
        return statistics.median(times)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_variant(rows, name, v, dt, shape, f, qkv32, kind, reps, info, verify=True):
    b, h, s, d = shape
    q, k, vv = (x.astype(dt) for x in qkv32)
    qg, kg, vg = to_gpu(q), to_gpu(k), to_gpu(vv)
    out, _, _ = attention(qg, kg, vg, causal=True)
    err = check(out.numpy(), q, k, vv, True) if verify else check(out.numpy(), q, k, vv, True, heads=(5,))
    out.free()
    n = reps if not (name == "baseline" and kind == "gpu") else max(2, reps // 5)
    wall, gpu = time_vulkan(qg, kg, vg, True, n)
    row(rows, shape=f"B{b} H{h} S{s} D{d}", impl=f"vulkan {name}", dtype=np.dtype(dt).name,
        spec=dict(v.spec(d, info)), max_err=f"{err:.2e}", wall_ms=round(wall * 1e3, 3),
        gpu_ms=round(gpu * 1e3, 3) if gpu else None,
        tflops_gpu=round(f / gpu / 1e12, 2) if gpu else None, tflops_wall=round(f / wall / 1e12, 3))
    for x in (qg, kg, vg):
        x.free()


def row(rows, **kw):
    rows.append(kw)
    print("  " + ", ".join(f"{k}={v}" for k, v in kw.items()), flush=True)


def run_suite(kind, reps):
    ctx = runtime.context()
    info = ctx.info
    rows = []
    print(f"device: {info.name} ({info.type}), driver {info.driver}, route: {ctx.route}, memory: {ctx.memory_route}")
    try:
        import torch
    except ImportError:
        torch = None
    cuda = torch is not None and torch.cuda.is_available() and kind == "gpu"
    if kind == "cpu":
        shapes = [(1, 8, 1024, 64)]
        variants = [("cpu", np.float32), ("baseline", np.float32), ("fast", np.float32), ("fp16", np.float16),
                    ("fp16_io", np.float16)]
    else:
        shapes = [(1, 32, 4096, 64), (1, 32, 4096, 128)]
        variants = [("coopmat", np.float16), ("fast", np.float32), ("fp16", np.float16), ("fp16_io", np.float16),
                    ("baseline", np.float32)]
    tiles = {"cpu": [""], "gpu": ["", "64,32,256,16", "32,32,128,16", "64,64,128,8"]}[kind]
    rng = np.random.default_rng(0)
    if kind == "gpu":
        # Bring the GPU out of its idle clocks before anything is timed (the first timed shape
        # otherwise ran 5x slow).
        w = to_gpu(rng.standard_normal((1, 32, 2048, 64)).astype(np.float32))
        t_end = time.perf_counter() + 2.0
        while time.perf_counter() < t_end:
            attention(w, w, w, causal=True)[0].free()
        w.free()
    for b, h, s, d in shapes:
        f = flops(b, h, s, s, d, True)
        q32, k32, v32 = (rng.standard_normal((b, h, s, d)).astype(np.float32) for _ in range(3))
        for name, dt in variants:
            v = kernels.VARIANTS[name]
            why = v.unfit(d, info, s, s)
            if why:
                row(rows, shape=f"B{b} H{h} S{s} D{d}", impl=f"vulkan {name}", note=why)
                continue
            os.environ["AULE_VULKAN_VARIANT"] = name
            seen = set()
            for t in (tiles + tiles[:1] if v.tiled else [""]):  # the first shape again: run-to-run spread
                os.environ["AULE_VULKAN_TILES"] = t
                spec = v.spec(d, info)
                if spec in seen and t != tiles[0]:  # that tile shape does not fit: the default was used
                    continue
                seen.add(spec)
                try:
                    measure_variant(rows, name, v, dt, (b, h, s, d), f, (q32, k32, v32), kind, reps, info,
                                    verify=len(seen) == 1)
                except Exception as exc:  # one broken variant must not hide the others' numbers
                    row(rows, shape=f"B{b} H{h} S{s} D{d}", impl=f"vulkan {name}", spec=dict(spec),
                        note=f"{type(exc).__name__}: {exc}")
            os.environ.pop("AULE_VULKAN_TILES", None)
        os.environ.pop("AULE_VULKAN_VARIANT", None)
        if torch is not None:
            dev = "cuda" if cuda else "cpu"
            for dt in ((torch.float32, torch.float16) if cuda else (torch.float32,)):
                tq, tk, tv = (torch.from_numpy(x).to(dev, dt) for x in (q32, k32, v32))
                fn = lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)  # noqa: E731
                t = time_torch(fn, reps, cuda)
                row(rows, shape=f"B{b} H{h} S{s} D{d}", impl=f"torch SDPA {dev}", dtype=str(dt).replace("torch.", ""),
                    wall_ms=round(t * 1e3, 3), tflops_wall=round(f / t / 1e12, 3))
    # Per-call overhead: a tiny problem on GPU-resident tensors, whole call from Python.
    os.environ.pop("AULE_VULKAN_VARIANT", None)
    q = to_gpu(rng.standard_normal((1, 1, 16, 64)).astype(np.float32))
    for _ in range(20):
        aule.flash_attention(q, q, q, causal=True, backend="vulkan").free()
    walls = []
    for _ in range(300):
        t0 = time.perf_counter()
        o = aule.flash_attention(q, q, q, causal=True, backend="vulkan")
        walls.append(time.perf_counter() - t0)
        o.free()
    row(rows, shape="B1 H1 S16 D64", impl="vulkan flash_attention (GpuTensor) per-call", dtype="float32",
        wall_us=round(statistics.median(walls) * 1e6, 1), p10_us=round(np.percentile(walls, 10) * 1e6, 1))
    # Where the per-call time goes: validation + routing in Python, and one submit + fence wait.
    from aule.call import canonicalize

    t0 = time.perf_counter()
    for _ in range(300):
        canonicalize(q, q, q, True, None, -1, False)
    row(rows, shape="B1 H1 S16 D64", impl="  of which aule.call.canonicalize", wall_us=round((time.perf_counter() - t0) / 300 * 1e6, 1))
    walls = []
    for _ in range(300):
        t0 = time.perf_counter()
        ctx.run(())
        walls.append(time.perf_counter() - t0)
    row(rows, shape="(empty)", impl="  of which an empty submit + fence wait", wall_us=round(statistics.median(walls) * 1e6, 1))
    if cuda:
        a = torch.randn(8192, 8192, device="cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        t = time_torch(lambda: a @ a, 10, True)
        row(rows, shape="8192^3 matmul", impl="torch fp32 (no TF32) ceiling", wall_ms=round(t * 1e3, 3),
            tflops_wall=round(2 * 8192**3 / t / 1e12, 2))
        ah = a.half()
        t = time_torch(lambda: ah @ ah, 10, True)
        row(rows, shape="8192^3 matmul", impl="torch fp16 tensor-core ceiling", wall_ms=round(t * 1e3, 3),
            tflops_wall=round(2 * 8192**3 / t / 1e12, 2))
    return ctx, rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=("cpu", "gpu"))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    ctx, rows = run_suite(args.kind, args.reps)
    env = {"device": ctx.info.summary(), "route": ctx.route, "python": platform.python_version(),
           "numpy": np.__version__}
    try:
        import torch

        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
    except ImportError:
        pass
    if args.json:
        args.json.write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print("\n" + json.dumps(env))
    cols = ["shape", "impl", "dtype", "spec", "max_err", "wall_ms", "gpu_ms", "tflops_gpu", "tflops_wall", "wall_us", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()

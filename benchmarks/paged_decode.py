"""Paged decode: aule's Triton kernel (and Vulkan where present) against PyTorch SDPA on the
contiguous cache, same process, same inputs.

    python benchmarks/paged_decode.py                      # batch 8 at 1k/4k/8k/32k, batch 1 at 32k
    python benchmarks/paged_decode.py --tune               # also sweep kernel configurations
    python benchmarks/paged_decode.py --json out.json

Bandwidth counts the bytes of cache a decode step must read: ``2 * sum(context) * heads_kv *
head_dim * itemsize`` (K and V once). GPU times come from CUDA events around CUDA-graph replays of
several calls over rotating input sets (so no call finds its cache in L2), median of repeats.
Correctness against the float64 reference is checked before anything is timed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

L2_BYTES = 50 * 2 ** 20  # H100's L2; rotation keeps the working set well beyond it


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def graph_time_us(torch, fns):
    """Median per-call microseconds of ``fns`` (one call each, in order) replayed as one CUDA graph
    (the harness's timer, so this script and ``aule bench`` measure decode the same way)."""
    from aule.bench.timing import cuda_graph_time

    return cuda_graph_time(fns)["ms"] * 1000


def build_inputs(torch, rng, batch, ctx, heads_q, heads_kv, head_dim, block_size, dtype, copies):
    """``copies`` independent sets of (q, paged cache, tables, contiguous K/V)."""
    nblk = -(-ctx // block_size)
    sets = []
    for _ in range(copies):
        num_blocks = batch * nblk
        kc = torch.randn(num_blocks, block_size, heads_kv, head_dim, device="cuda", dtype=dtype)
        vc = torch.randn_like(kc)
        perm = torch.from_numpy(rng.permutation(num_blocks).astype(np.int32)).cuda()
        bt = perm.view(batch, nblk)
        cl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(batch, heads_q, 1, head_dim, device="cuda", dtype=dtype)
        # The same keys laid out contiguously for SDPA: [B, Hkv, L, D].
        kg = kc[bt.long()].reshape(batch, nblk * block_size, heads_kv, head_dim)[:, :ctx].transpose(1, 2).contiguous()
        vg = vc[bt.long()].reshape(batch, nblk * block_size, heads_kv, head_dim)[:, :ctx].transpose(1, 2).contiguous()
        sets.append(dict(q=q, kc=kc, vc=vc, bt=bt, cl=cl, kg=kg, vg=vg))
    return sets


def reference_first(s):
    """Float64 reference for the first sequence of an input set (enough to catch a wrong kernel)."""
    from aule.reference import attention_reference

    return attention_reference(s["q"][:1].float().cpu().numpy(), s["kg"][:1].float().cpu().numpy(),
                               s["vg"][:1].float().cpu().numpy(), causal=True)


def check_correct(s, ref, fn):
    out = fn(s).float().cpu().numpy()[:1]
    if not np.isfinite(out).all():
        return float("inf")
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def sdpa_variants(torch):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    F = torch.nn.functional
    out = {}
    for name, be in (("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def run(s, be=be):
            if be is None:
                return F.scaled_dot_product_attention(s["q"], s["kg"], s["vg"], enable_gqa=True)
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(s["q"], s["kg"], s["vg"], enable_gqa=True)
        out[name] = run
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096,8192,32768")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--extra", default="1:32768", help="more batch:context pairs")
    ap.add_argument("--heads", default="32,8")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--tune", action="store_true", help="sweep kernel configurations")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-triton", action="store_true", help="skip the CUDA part (Triton and SDPA)")
    ap.add_argument("--vulkan", action="store_true", help="also time the Vulkan paged shader (GpuTensor cache)")
    args = ap.parse_args(argv)
    hq, hk = (int(x) for x in args.heads.split(","))
    d, bs = args.head_dim, args.block_size
    shapes = [(args.batch, int(c)) for c in args.contexts.split(",") if c]
    shapes += [tuple(int(x) for x in e.split(":")) for e in args.extra.split(",") if e]
    result = {}
    if not args.no_triton:
        result.update(run_cuda(args, shapes, hq, hk, d, bs))
    if args.vulkan:
        result["vulkan"] = run_vulkan(shapes, hq, hk, d, bs)
    report(result, hq, hk, d, bs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def run_cuda(args, shapes, hq, hk, d, bs):
    """Triton paged decode and SDPA on the contiguous cache, CUDA graphs, same process."""
    import warnings

    import torch
    import triton

    import aule

    warnings.filterwarnings("ignore", message=".*(kernel not used|runtime disabled|same num_heads).*")
    from aule.backends.triton import paged as tp

    dtype = torch.float16
    props = torch.cuda.get_device_properties(0)
    machine = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                   triton=triton.__version__, cuda=torch.version.cuda, python=platform.python_version())
    log("machine:", machine)

    # Copy ceiling: a large device-to-device copy, bytes read + written.
    big = torch.empty(2 ** 30 // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(big)
    copy_us = graph_time_us(torch, [lambda: dst.copy_(big)])
    copy_tbs = 2 * big.numel() * 2 / copy_us / 1e6
    del big, dst
    log(f"device copy: {copy_tbs:.2f} TB/s")

    rng = np.random.default_rng(0)
    sdpa = sdpa_variants(torch)
    rows = []
    for batch, ctx in shapes:
        cache_bytes = 2 * batch * ctx * hk * d * 2
        copies = max(2, min(8, -(-4 * L2_BYTES // cache_bytes)))
        sets = build_inputs(torch, rng, batch, ctx, hq, hk, d, bs, dtype, copies)
        ref = reference_first(sets[0])
        tb = lambda us: cache_bytes / us / 1e6  # noqa: E731
        row = dict(batch=batch, context=ctx, bytes=cache_bytes, copies=copies)

        def aule_fn(cfg):
            return lambda s: tp.paged_attention_triton(s["q"], s["kc"], s["vc"], s["bt"], s["cl"],
                                                       d ** -0.5, -1, ctx, config=cfg)

        auto = tp.choose_config(batch, hk, hq // hk, 1, d, ctx, 0)
        configs = [("auto", auto)]
        if args.tune:
            bm, bn0, w0, st0, sp, mt = auto
            for bn, w, st in ((32, 4, 3), (64, 4, 2), (32, 2, 4), (32, 8, 4)):
                configs.append((f"n{bn}w{w}s{st}", (bm, bn, w, st, sp, mt)))
            for f in (0.5, 2, 0):
                spf = 1 if f == 0 else max(1, min(tp.MAX_SPLITS, int(sp * f)))
                if spf != sp:
                    configs.append((f"splits {spf}", (bm, bn0, w0, st0, spf, mt)))
        best = None
        for name, cfg in configs:
            fn = aule_fn(cfg)
            try:
                err = check_correct(sets[0], ref, fn)
                if not err < 3e-3:
                    log(f"  {batch}x{ctx} {name}: WRONG rel err {err:.3g}")
                    continue
                us = graph_time_us(torch, [lambda s=s: fn(s) for s in sets])
            except Exception as exc:  # a config that does not compile or fit is skipped, loudly
                log(f"  {batch}x{ctx} {name} {cfg}: failed: {type(exc).__name__}: {str(exc)[:200]}")
                continue
            log(f"  {batch}x{ctx} aule {name} {cfg}: {us:.1f} us {tb(us):.2f} TB/s err {err:.1e}")
            row[f"aule:{name}"] = dict(us=us, tbs=tb(us), err=err, config=list(cfg))
            if best is None or us < best[1]:
                best = (name, us)
        row["aule_best"] = best[0] if best else None
        for name, fn in sdpa.items():
            try:
                err = check_correct(sets[0], ref, fn)
                us = graph_time_us(torch, [lambda s=s: fn(s) for s in sets])
            except Exception as exc:
                log(f"  {batch}x{ctx} sdpa {name}: failed: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            log(f"  {batch}x{ctx} sdpa {name}: {us:.1f} us {tb(us):.2f} TB/s err {err:.1e}")
            row[f"sdpa:{name}"] = dict(us=us, tbs=tb(us), err=err)
        # The public call, validation (one host sync) included, timed on the host.
        s = sets[0]
        for _ in range(3):
            aule.flash_attention_paged(s["q"], s["kc"], s["vc"], s["bt"], s["cl"])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            aule.flash_attention_paged(s["q"], s["kc"], s["vc"], s["bt"], s["cl"])
        torch.cuda.synchronize()
        row["api_us"] = (time.perf_counter() - t0) / 20 * 1e6
        rows.append(row)
        del sets
        torch.cuda.empty_cache()

    return dict(machine=machine, copy_tbs=copy_tbs, rows=rows)


def run_vulkan(shapes, hq, hk, d, bs, reps=20):
    """The Vulkan paged shader on GpuTensor caches: GPU time from timestamp queries (attention and
    merge dispatches), median of ``reps``, rotating cache copies; wall time per call beside it."""
    from aule import paged as pg
    from aule.backends.vulkan import GpuTensor, runtime
    from aule.backends.vulkan.paged import run_paged
    from aule.bench.timing import spin_up
    from aule.reference import attention_reference

    ctx = runtime.context()
    backend = pg.get_paged_backend("vulkan")
    rng = np.random.default_rng(1)
    rows = []
    log("vulkan device:", ctx.info.summary())
    for batch, ctx_len in shapes:
        nblk = -(-ctx_len // bs)
        cache_bytes = 2 * batch * ctx_len * hk * d * 2
        copies = max(2, min(6, -(-4 * L2_BYTES // cache_bytes)))
        sets = []
        for _ in range(copies):
            kc = rng.standard_normal((batch * nblk, bs, hk, d), dtype=np.float32).astype(np.float16)
            vc = rng.standard_normal((batch * nblk, bs, hk, d), dtype=np.float32).astype(np.float16)
            bt = rng.permutation(batch * nblk).astype(np.int32).reshape(batch, nblk)
            cl = np.full(batch, ctx_len, np.int32)
            q = rng.standard_normal((batch, hq, 1, d), dtype=np.float32).astype(np.float16)
            sets.append((q, GpuTensor.from_numpy(kc), GpuTensor.from_numpy(vc), bt, cl, kc, vc))
        q, kg, vg, bt, cl, kc, vc = sets[0]
        k0 = kc[bt[0]].reshape(-1, hk, d)[:ctx_len].transpose(1, 0, 2)[None]
        v0 = vc[bt[0]].reshape(-1, hk, d)[:ctx_len].transpose(1, 0, 2)[None]
        ref = attention_reference(q[:1], k0, v0)
        calls = [pg.canonicalize_paged(s[0], s[1], s[2], s[3], s[4]) for s in sets]
        out, _ = run_paged(backend, calls[0])
        err = float(np.linalg.norm(out[:1].astype(np.float64) - ref) / np.linalg.norm(ref))
        ns, walls = [], []
        spin_up(lambda: run_paged(backend, calls[0]))  # clocks up before timing
        for r in range(reps):
            t0 = time.perf_counter()
            _, t = run_paged(backend, calls[r % copies], timestamps=True)
            walls.append((time.perf_counter() - t0) * 1e6)
            if t is not None:
                ns.append(t)
        us = statistics.median(ns) / 1e3 if ns else float("nan")
        row = dict(batch=batch, context=ctx_len, us=us, tbs=cache_bytes / us / 1e6, wall_us=statistics.median(walls),
                   err=err, device=ctx.info.name)
        log(f"  vulkan {batch}x{ctx_len}: {us:.1f} us GPU ({row['tbs']:.2f} TB/s), {row['wall_us']:.0f} us wall, err {err:.1e}")
        rows.append(row)
        del sets, calls
    return rows


def report(result, hq, hk, d, bs):
    """Tables last, so the tail of the output carries them."""
    if "rows" in result:
        machine, copy_tbs = result["machine"], result["copy_tbs"]
        print(f"\n{machine['gpu']}, torch {machine['torch']}, triton {machine['triton']}, CUDA {machine['cuda']}; "
              f"fp16, {hq}/{hk} heads, head_dim {d}, block {bs}; device copy {copy_tbs:.2f} TB/s")
        print("| batch | context | aule (config) us | aule TB/s | best SDPA (backend) us | SDPA TB/s | aule/SDPA speed | public call us |")
        print("|---|---|---|---|---|---|---|---|")
        for r in result["rows"]:
            a = r.get(f"aule:{r['aule_best']}") if r["aule_best"] else None
            sd = [(k[5:], v) for k, v in r.items() if k.startswith("sdpa:")]
            bsd = min(sd, key=lambda kv: kv[1]["us"]) if sd else None
            a_s = f"{a['us']:.1f} ({r['aule_best']})" if a else "-"
            s_s = f"{bsd[1]['us']:.1f} ({bsd[0]})" if bsd else "-"
            ratio = f"{bsd[1]['us'] / a['us']:.2f}x" if a and bsd else "-"
            print(f"| {r['batch']} | {r['context']} | {a_s} | {a['tbs'] if a else 0:.2f} | {s_s} | "
                  f"{bsd[1]['tbs'] if bsd else 0:.2f} | {ratio} | {r['api_us']:.0f} |")
    if result.get("vulkan"):
        print(f"\nVulkan paged shader on {result['vulkan'][0]['device']} (fp16 GpuTensor cache, GPU time)")
        print("| batch | context | GPU us | TB/s | wall us per call | rel err |")
        print("|---|---|---|---|---|---|")
        for r in result["vulkan"]:
            print(f"| {r['batch']} | {r['context']} | {r['us']:.1f} | {r['tbs']:.2f} | {r['wall_us']:.0f} | {r['err']:.1e} |")


if __name__ == "__main__":
    main()

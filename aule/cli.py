"""Command line: ``aule info``, ``aule demo``, ``aule bench`` (also ``python -m aule``).

This is the one place in the package that prints: it is the user's terminal.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time

import numpy as np

from . import __version__, backends
from .api import flash_attention
from .reference import attention_reference


def _fmt(value) -> str:
    """One line for a detail: dicts as ``key=value`` pairs, the rest as printed."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def _info(args) -> int:
    info = backends.backend_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"aule {__version__}  (python {sys.version.split()[0]}, numpy {np.__version__})")
    for name, entry in info.items():
        state = "available" if entry["available"] else "unavailable"
        print(f"\n{name:<11} {state}" + ("" if entry["available"] else f": {entry['reason']}"))
        print(f"  ops: {', '.join(entry['ops']) or 'none'}")
        for key, value in entry.items():
            if key in ("available", "reason", "ops"):
                continue
            if isinstance(value, list):
                print(f"  {key}:")
                for item in value:
                    print(f"    - {_fmt(item)}")
            else:
                print(f"  {key}: {_fmt(value)}")
    print()
    for line in speed_table_lines(args.gpu if args.gpu is not None else _current_gpu()):
        print(line)
    return 0


def _current_gpu() -> str | None:
    """The CUDA device's model name as torch reports it, or ``None`` without torch or a GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(torch.cuda.current_device())
    except Exception:  # a broken CUDA install reads as no GPU here; the triton entry says why
        pass
    return None


def speed_table_lines(gpu: str | None) -> list:
    """What ``aule info`` says about the speed table for ``gpu``: which shape classes the SDPA
    drop-in hands to torch's own SDPA there and the measured ratios, or that it has no entry."""
    from . import settings, speed_table

    tables = speed_table.load()
    known = ", ".join(sorted(tables)) or "none"
    if gpu is None:
        return [f"speed table: no CUDA GPU here, so no table entry for this machine (measured GPUs: {known})"]
    t = tables.get(gpu)
    if t is None:
        return [f"speed table: no entry for {gpu} (measured GPUs: {known}); the SDPA drop-in keeps aule's "
                "kernel for every call it can serve"]
    try:
        on = settings.prefer_torch()
    except ValueError as exc:
        on, state = False, f"off: {exc}"
    else:
        state = "on" if on else "off (AULE_PREFER_TORCH=0): aule's kernel serves every class"
        if on and settings.forced_backend():
            state = f"off (AULE_BACKEND={settings.forced_backend()} forces aule's backend)"
    entries = sorted(t.entries.values(), key=lambda e: (e.faster, e.cls.direction, e.cls.masking, e.cls.dtype,
                                                        e.cls.head_dim, e.cls.seq, not e.cls.causal, e.cls.gqa))
    width = max(len(e.cls.key) for e in entries) if entries else 0
    lines = [f"speed table for {gpu} ({t.source}); prefer torch where measured faster: {state}",
             f"  {sum(e.faster == 'torch' for e in entries)} of {len(entries)} measured shape classes go to "
             "torch's own SDPA (ratio: torch's time / aule's, under 1 means torch is faster):"]
    for e in entries:
        lines.append(f"    {e.cls.key:<{width}}  -> {e.faster:<5}  {e.ratio:.2f}x vs {e.torch_backend}")
    lines.append(f"  other classes: {speed_table.RULE}")
    lines.append("  applies to the SDPA drop-in (aule.install(), Hugging Face, ComfyUI) on calls without a forced "
                 "backend, softcap or sinks; aule.flash_attention keeps aule's kernels")
    return lines


def _reference_per_head(q, k, v, causal):
    """Float64 reference one KV-head group at a time, so the demo's oracle stays within memory."""
    out = np.empty(q.shape, np.float64)
    g = q.shape[1] // k.shape[1]
    for h in range(k.shape[1]):
        out[:, h * g:(h + 1) * g] = attention_reference(
            q[:, h * g:(h + 1) * g], k[:, h:h + 1], v[:, h:h + 1], causal=causal)
    return out


def _time(fn, repeats):
    fn()  # warm-up: pipeline creation, compilation, allocation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _demo_runs(q, k, v, causal):
    """(label, callable returning a float32 NumPy output, dtype name) for each available backend."""
    runs = []
    for name in backends.get_available_backends():
        if name in ("triton", "triton-amd"):
            import torch

            tq, tk, tv = (torch.from_numpy(x).to("cuda", torch.bfloat16) for x in (q, k, v))

            def run(tq=tq, tk=tk, tv=tv, name=name):
                out = flash_attention(tq, tk, tv, causal=causal, backend=name)
                torch.cuda.synchronize()
                return out.float().cpu().numpy()

            runs.append((f"{name} (bf16, cuda)", run, "bfloat16"))
        else:
            for dtype in (np.float32, np.float16) if name == "vulkan" else (np.float32,):
                qq, kk, vv = (x.astype(dtype) for x in (q, k, v))

                def run(qq=qq, kk=kk, vv=vv, name=name):
                    return np.asarray(flash_attention(qq, kk, vv, causal=causal, backend=name), np.float32)

                runs.append((f"{name} ({np.dtype(dtype).name})", run, np.dtype(dtype).name))
    return runs


def _demo(args) -> int:
    b, hq, hk, s, d = args.batch, args.heads, args.kv_heads, args.seq, args.head_dim
    causal = not args.no_causal
    rng = np.random.default_rng(args.seed)
    q = rng.standard_normal((b, hq, s, d), dtype=np.float32)
    k = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    v = rng.standard_normal((b, hk, s, d), dtype=np.float32)
    flops = 4 * b * hq * s * s * d * (0.5 if causal else 1.0)
    print(f"aule demo: batch {b}, {hq} query heads over {hk} KV heads, seq {s}, head_dim {d}, "
          f"{'causal' if causal else 'full'} ({flops / 1e9:.1f} GFLOP per call)")
    print("computing the float64 reference ...", flush=True)
    ref = _reference_per_head(q, k, v, causal)
    rows = []
    for label, run, dtype in _demo_runs(q, k, v, causal):
        print(f"running {label} ...", flush=True)
        try:
            err = float(np.abs(run().astype(np.float64) - ref).max())
            sec = _time(run, args.repeats)
            rows.append((label, f"{sec * 1e3:.1f}", f"{flops / sec / 1e12:.3f}", f"{err:.2e}"))
        except Exception as exc:  # one backend failing must not hide the others' results
            rows.append((label, "failed", "-", f"{type(exc).__name__}: {exc}"))
    header = ("backend", "time (ms)", "TFLOP/s", "max abs err vs float64")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(4)]
    print()
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    unavailable = {n: e["reason"] for n, e in backends.backend_info().items() if not e["available"]}
    for name, reason in unavailable.items():
        print(f"(not run: {name}: {reason})")
    return 0 if all(r[1] != "failed" for r in rows) else 1


def _bench(args, rest) -> int:
    from . import bench

    return bench.main(rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aule", description="FlashAttention for every GPU")
    parser.add_argument("--version", action="version", version=f"aule {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO (routing decisions)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("info", help="backends, their availability and why, Vulkan devices and variants, and "
                       "which shape classes the SDPA drop-in hands to torch on this GPU")
    p.add_argument("--json", action="store_true")
    p.add_argument("--gpu", default=None, metavar="NAME",
                   help="show the speed table of this GPU model (as torch.cuda.get_device_name says it) "
                        "instead of this machine's")
    p = sub.add_parser("demo", help="one realistic LLM layer on every available backend, checked and timed")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--no-causal", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("bench", help="benchmark suites against PyTorch (see `aule bench --help`)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "bench":
        return _bench(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return {"info": _info, "demo": _demo}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

"""Time the Hopper forward's variants (aule/backends/triton/hopper.py) against aule's general Triton
forward and SDPA's cuDNN and flash backends, bf16, on an sm_90 GPU.

Cases: 16k tokens per batch (B * S = 16384), model dim 2048 (H = 2048 / d), d 64 and 128, S 1k, 4k
and 16k, causal and not. Contenders on the same inputs: ``sdpa-cudnn`` and ``sdpa-flash``
(torch.nn.attention.sdpa_kernel), ``aule`` (ops.attention_forward, the general kernel autotuned,
AULE_TRITON_HOPPER=0) and each Hopper variant at each of its tiles (``tma``, ``persistent``,
``ws``, each tile forced). Every contender is first checked against cuDNN's output (bf16 max abs
error, BAD above 3e-2), then timed twice: eagerly with CUDA events (triton's do_bench) and as the
median per call of a CUDA graph of back-to-back calls (the kernel's own time, host costs out). Prints one row per contender: ms,
TFLOP/s (4 B H S^2 d, halved for causal) and the ratio to cuDNN, of the graph time, then a summary.

Compilation counts against the lead's 120 s: the first two tiles of each variant by default
(``--tiles``), d128 first, the ws variant in a pass of its own after tma (a hang there leaves the
rows before it printed) and persistent last; a contender is skipped once ``--budget`` seconds
have passed. Triton's cache goes to a temporary folder under $OUT
(removed at the end), so nothing is written outside $OUT; a JSON copy of the table goes to
$OUT/time_hopper_fwd.json.

    python3 scripts/time_hopper_fwd.py                      # everything, within the budget
    python3 scripts/time_hopper_fwd.py --only tma,ws --dims 128 --seqs 16384
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="time_hopper_"))
# "aule" rows are the general kernel: left unset, AULE_TRITON_HOPPER is "auto", which hands some
# classes (hopper.DEFAULT_ROUTES) to the Hopper forward.
os.environ["AULE_TRITON_HOPPER"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from aule.backends.triton import hopper, ops  # noqa: E402

TOKENS, MODEL_DIM = 16384, 2048


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def run(q, k, v, causal):
        with sdpa_kernel([kind]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                    enable_gqa=k.shape[1] != q.shape[1])
    return run


def _aule(q, k, v, causal):
    return ops.attention_forward(q, k, v, q.shape[-1] ** -0.5, -1, 0 if causal else -1)[0]


def _hopper(variant, tile):
    def run(q, k, v, causal):
        return hopper.attention_forward(q, k, v, q.shape[-1] ** -0.5, -1, 0 if causal else -1, variant, tile)[0]
    return run


# What each pass over the cases times beside cuDNN (the reference and baseline of every pass):
# SDPA flash, aule's general kernel and the tma variant first; then ws, whose specialised loop
# (Triton's Hopper pass) is the likeliest to fail at run time, so that a hang or a broken context
# there leaves the rows before it printed; the persistent variant last.
PASSES = (("sdpa-flash", "aule", "tma"), ("ws",), ("persistent",))


def contenders(d: int, only: set, tiles: int, phase: int) -> list:
    rows = [("sdpa-cudnn", _sdpa("cudnn"))]
    for kind in PASSES[phase]:
        if kind in hopper.VARIANTS:
            rows += [(f"{kind} {t[0]}x{t[1]}w{t[2]}s{t[3]}", _hopper(kind, t)) for t in hopper.tiles(kind, d)[:tiles]]
        else:
            rows.append((kind, _sdpa("flash") if kind == "sdpa-flash" else _aule))
    return [r for r in rows if not only or r[0].split()[0] in only or r[0] == "sdpa-cudnn"]


def device_banner() -> bool:
    """Print the GPU and the versions timed (a warning off sm_90); False without a CUDA device."""
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return False
    cap = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}  torch {torch.__version__}  triton {triton.__version__}")
    if cap[0] != 9:
        print("warning: the Hopper variants are meant for sm_90")
    return True


def _timed(fn, rep: float):
    """``(eager ms, graph ms or None)``: CUDA events around each eager call (do_bench: they include
    any time the GPU waits for the host's launch), and the median per call of a CUDA graph of
    back-to-back calls replayed, the kernel's own time, which short calls (s1k) need to be read
    right. The graph holds at most 50 calls (each keeps its own output in the graph's pool)."""
    eager = triton.testing.do_bench(fn, warmup=10, rep=rep)
    try:
        n = max(3, min(50, int(10.0 / max(eager, 1e-3))))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=side):
                for _ in range(n):
                    fn()
            graph.replay()
            times = []
            for _ in range(5):
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record(side)
                graph.replay()
                end.record(side)
                end.synchronize()
                times.append(begin.elapsed_time(end) / n)
        torch.cuda.current_stream().wait_stream(side)
        del graph
        return eager, sorted(times)[len(times) // 2]
    except Exception:  # noqa: BLE001 - a call that cannot be captured is timed eagerly
        torch.cuda.synchronize()
        return eager, None


def _case(d: int, s: int, causal: bool, group: int):
    h, b = MODEL_DIM // d, max(1, TOKENS // s)
    gqa = f"/{h // group}" if group > 1 else ""
    return f"d{d} s{s//1024}k B{b} H{h}{gqa} {'causal' if causal else 'full'}", (b, h, h // group, s, d)


def private_cache() -> Path:
    """Point Triton at a cache of this run's own under $OUT (the caller removes it at the end), so
    nothing is written outside $OUT. Done by each script's main, not at import: the scripts that
    import this module for its helpers keep the cache they chose."""
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-", dir=OUT))
    os.environ["TRITON_CACHE_DIR"] = str(cache)
    return cache


def time_rows(name, rows, call, flops, over_budget, rep):
    """Check, then time, each ``(label, fn)`` of ``rows`` on one case, yielding its row as it is
    measured. ``call(fn)`` runs a contender once; the first row's output is the reference of every
    row's ``err`` (max abs) and its time the base of ``vs_cudnn``. ``ms`` is the graph replay's time
    (``graph`` True) or, where the call cannot be captured, the eager one; ``eager_ms`` the eager
    one. Rows after ``over_budget()`` turns true, and rows that raise, carry ``error`` instead."""
    ref = base = None
    for label, fn in rows:
        row = {"case": name, "contender": label}
        if over_budget():
            row["error"] = "skipped (time budget)"
        else:
            try:
                out = call(fn)
                torch.cuda.synchronize()
                if ref is None:
                    ref = out.float()
                err = (out.float() - ref).abs().max().item()
                eager, graph = _timed(lambda: call(fn), rep)
                ms = graph or eager
                base = ms if base is None else base
                row.update(ms=ms, eager_ms=eager, graph=graph is not None, tflops=flops / ms * 1e-9,
                           vs_cudnn=base / ms, err=err)
            except Exception as exc:  # noqa: BLE001 - one failing contender must not stop the table
                text = str(exc).strip()
                row["error"] = f"{type(exc).__name__}: {text.splitlines()[-1][:80] if text else ''}"
        yield row


def _time_case(name, shape, causal, rows, start, a, results):
    torch.manual_seed(0)
    b, h, hkv, s, d = shape
    q = torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn((b, hkv, s, d), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    for row in time_rows(name, rows, lambda fn: fn(q, k, v, causal), flops,
                         lambda: time.time() - start > a.budget, a.rep):
        label = row["contender"]
        if label != "sdpa-cudnn" or not any(r["case"] == name and r["contender"] == label for r in results):
            results.append(row)
        if "error" in row:
            print(f"{name:22s} {label:24s} {row['error']}")
        else:
            bad = " BAD" if row["err"] > 3e-2 else ""
            print(f"{name:22s} {label:24s} {row['ms']:7.3f}{'' if row['graph'] else '*'} {row['eager_ms']:7.3f} "
                  f"{row['tflops']:6.1f} {row['vs_cudnn']:5.2f} {row['err']:7.1e}{bad}")
        sys.stdout.flush()


def _summary(results, cases):
    """One line per case: cuDNN's TFLOP/s, then each kind's best correct row as TFLOP/s and ratio."""
    kinds = ("sdpa-flash", "aule", "tma", "persistent", "ws")
    print(f"\nsummary: TFLOP/s (x cudnn) of each kind's best correct row; tile of the best Hopper row")
    print(f"{'case':22s} {'cudnn':>6s} " + " ".join(f"{k:>13s}" for k in kinds) + "  best tile")
    for name in cases:
        rows = [r for r in results if r["case"] == name and "ms" in r and r["err"] <= 3e-2]
        cudnn = next((r for r in rows if r["contender"] == "sdpa-cudnn"), None)
        cells, best = [], None
        for kind in kinds:
            mine = [r for r in rows if r["contender"].split()[0] == kind]
            top = max(mine, key=lambda r: r["tflops"], default=None)
            cells.append(f"{top['tflops']:6.0f} ({top['vs_cudnn']:4.2f})" if top else f"{'-':>13s}")
            if top and kind in hopper.VARIANTS and (best is None or top["tflops"] > best["tflops"]):
                best = top
        print(f"{name:22s} {cudnn['tflops'] if cudnn else float('nan'):6.0f} " + " ".join(cells)
              + f"  {best['contender'] if best else '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--masks", default="causal,full")
    ap.add_argument("--only", default="", help="contender kinds: sdpa-flash, aule, tma, persistent, ws")
    ap.add_argument("--group", type=int, default=1, help="query heads per KV head (GQA; 8: the issue's 64/8 class)")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds after which contenders are skipped")
    ap.add_argument("--tiles", type=int, default=2, help="tiles per variant, from the top of hopper.TILES")
    ap.add_argument("--rep", type=float, default=30.0, help="ms of timed repeats per row")
    a = ap.parse_args()
    start = time.time()
    if not device_banner():
        return 1
    only = {x for x in a.only.split(",") if x}
    results, cases = [], []
    print("ms: CUDA-graph replay (* where the call could not be captured: eager); eager: CUDA events per call")
    print(f"{'case':22s} {'contender':24s} {'ms':>8s} {'eager':>7s} {'TF/s':>6s} {'xcdnn':>5s} {'err':>7s}")
    for phase in range(len(PASSES)):
        for d in (int(x) for x in a.dims.split(",")):
            for s in (int(x) for x in a.seqs.split(",")):
                for causal in (m == "causal" for m in a.masks.split(",")):
                    name, shape = _case(d, s, causal, a.group)
                    rows = contenders(d, only, a.tiles, phase)
                    if len(rows) > 1:
                        cases += [name] if name not in cases else []
                        _time_case(name, shape, causal, rows, start, a, results)
        (OUT / "time_hopper_fwd.json").write_text(json.dumps(
            {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": results}, indent=1))
    _summary(results, cases)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    _cache = private_cache()
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(_cache, ignore_errors=True)

"""Time the Hopper backward's variants (aule/backends/triton/hopper_bwd.py) against aule's general
backward and SDPA's cuDNN and flash backends, bf16, on an sm_90 GPU.

Cases (issue 16): 16k tokens per batch (B * S = 16384), model dim 2048 (H = 2048 / d), d128 at S 1k,
4k and 16k and d64 at S 4k (``--seqs64`` adds more), causal and not. Contenders on the same inputs:
``sdpa-cudnn`` and ``sdpa-flash`` (torch.nn.attention.sdpa_kernel, forward and backward through
autograd), ``aule`` (ops.attention_forward and ops.attention_backward, the general kernels at their
first fitting tiles, AULE_TRITON_AUTOTUNE=0; ``--tune`` autotunes them and the forward) and each
Hopper variant at each of its first ``--tiles`` tiles, forced, after aule's general forward
(``tma``: dK/dV and dQ kernels, a tile pair; ``fused``: the two in one launch; ``atomic``: dQ added
from the dK/dV kernel), one pass over the cases per tile. Every aule contender's dq, dk and dv are first checked against the general
backward's (max abs error relative to the largest gradient, BAD above 2e-2 or on NaN), and the
general's against cuDNN's. Then each is timed with CUDA events (triton's do_bench, warm-up,
median): forward+backward, and the backward alone (SDPA's by replaying its autograd graph).
TFLOP/s: the forward's 4 B H S^2 d (halved for causal), the backward 2.5x that, forward+backward
3.5x; the ratio is to cuDNN's.

Compilation counts against the lead's 120 s (some 32 kernels in the first pass): d128 first, the
second tiles in a pass of their own after every case's first, contenders past ``--budget`` seconds
skipped. Triton's cache goes to a temporary folder under $OUT (removed at the end), so nothing is
written outside $OUT; a JSON copy of the table goes to $OUT/time_hopper_bwd.json.

    python3 scripts/time_hopper_bwd.py
    python3 scripts/time_hopper_bwd.py --only tma --dims 128 --seqs 16384 --tiles 3
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

OUT = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="time_hopper_bwd_"))
_CACHE = Path(tempfile.mkdtemp(prefix="triton-cache-", dir=OUT))
os.environ["TRITON_CACHE_DIR"] = str(_CACHE)
for _name in ("AULE_TRITON_HOPPER", "AULE_TRITON_HOPPER_BWD"):
    os.environ[_name] = "0"  # every aule row takes the general forward (unset: "auto"); the backward is forced per row
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import triton  # noqa: E402

from aule.backends.triton import hopper_bwd, ops  # noqa: E402
from time_hopper_fwd import device_banner  # noqa: E402  (this directory is the script's first path)

TOKENS, MODEL_DIM = 16384, 2048
BAD = 2e-2


def _sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def prepare(q, k, v, dout, causal):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]

        def forward():
            with sdpa_kernel([kind]):
                return torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)

        def both():
            return torch.autograd.grad(forward(), leaves, dout)

        out = forward()

        def backward():
            return torch.autograd.grad(out, leaves, dout, retain_graph=True)
        return both, backward
    return prepare


def _aule(variant, tile_dkdv=None, tile_dq=None):
    """An aule contender: the general forward, then the backward ``variant`` (False: the general
    kernels) at the tiles given."""
    def prepare(q, k, v, dout, causal):
        scale, right = q.shape[-1] ** -0.5, 0 if causal else -1

        def backward_of(out, lse):
            return ops.attention_backward(dout, q, k, v, out, lse, None, scale, -1, right, tile_dkdv=tile_dkdv,
                                          tile_dq=tile_dq, hopper_bwd_variant=variant)[:3]

        def both():
            return backward_of(*ops.attention_forward(q, k, v, scale, -1, right))

        saved = ops.attention_forward(q, k, v, scale, -1, right)
        return both, (lambda: backward_of(*saved))
    return prepare


def _name(t) -> str:
    return f"{t[0]}x{t[1]}w{t[2]}s{t[3]}"


def contenders(d: int, only: set, tune: bool, phase: int) -> list:
    """Phase 0: SDPA's two backends, aule's general kernels and each Hopper variant's first tile;
    phase ``p``: each variant's tile ``p`` (the tile rows of hopper_bwd.TILES, dK/dV beside dQ for tma)."""
    rows = [("sdpa-cudnn", _sdpa("cudnn")), ("sdpa-flash", _sdpa("flash")),
            ("aule" + ("" if tune else " first tiles"), _aule(False))] if phase == 0 else []
    dkdv, dq = hopper_bwd.tiles("dkdv", d), hopper_bwd.tiles("dq", d)
    if phase < min(len(dkdv), len(dq)):
        rows.append((f"tma {_name(dkdv[phase])}/{_name(dq[phase])}", _aule("tma", dkdv[phase], dq[phase])))
    for t in hopper_bwd.tiles("fused", d)[phase:phase + 1]:
        rows.append((f"fused {_name(t[:2] + t[4:])}/{_name(t[2:])}", _aule("fused", t)))
    for t in hopper_bwd.tiles("dkdv_atomic", d)[phase:phase + 1]:
        rows.append((f"atomic {_name(t)}", _aule("atomic", t)))
    return [r for r in rows if not only or r[0].split()[0] in only | {"sdpa-cudnn", "aule"}]


def _case(d: int, s: int, causal: bool):
    h, b = MODEL_DIM // d, max(1, TOKENS // s)
    return f"d{d} s{s // 1024}k B{b} H{h} {'causal' if causal else 'full'}", (b, h, s, d)


def _ms(fn, rep: float) -> float:
    return triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median")


def _error(grads, ref) -> float:
    """The largest absolute difference of dq, dk and dv from ``ref``'s, over ``ref``'s largest value
    (NaN when either holds one)."""
    worst = 0.0
    for g, r in zip(grads, ref):
        g, r = g.float(), r.float()
        if not (torch.isfinite(g).all() and torch.isfinite(r).all()):
            return float("nan")
        worst = max(worst, (g - r).abs().max().item() / max(r.abs().max().item(), 1e-6))
    return worst


def _time_case(name, shape, causal, rows, start, a, results, refs: dict):
    """Check and time ``rows`` on one case; ``refs[name]`` keeps cuDNN's and the general kernels'
    gradients from phase 0 for the later phases' checks."""
    torch.manual_seed(0)
    b, h, s, d = shape
    q, k, v, dout = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16) for _ in range(4))
    fwd = 4 * b * h * s * s * d / (2 if causal else 1)
    ref = refs.setdefault(name, {})
    for label, prepare in rows:
        row = {"case": name, "contender": label}
        if time.time() - start > a.budget:
            row["error"] = "skipped (time budget)"
        else:
            try:
                both, backward = prepare(q, k, v, dout, causal)
                grads = [g.clone() for g in backward()]
                torch.cuda.synchronize()
                if label == "sdpa-cudnn":
                    ref["cudnn"] = grads
                    err = 0.0
                elif label.startswith("aule"):
                    ref["general"] = grads
                    err = _error(grads, ref["cudnn"]) if "cudnn" in ref else float("nan")
                else:
                    against = ref.get("cudnn" if label.startswith("sdpa") else "general")
                    err = _error(grads, against) if against is not None else float("nan")
                del grads
                total, alone = _ms(both, a.rep), _ms(backward, a.rep)
                row.update(ms=total, bwd_ms=alone, tflops=3.5 * fwd / total * 1e-9, bwd_tflops=2.5 * fwd / alone * 1e-9,
                           err=err)
                if cudnn_row := next((r for r in results if r["case"] == name and r["contender"] == "sdpa-cudnn"
                                      and "ms" in r), None):
                    row.update(vs_cudnn=cudnn_row["ms"] / total, bwd_vs_cudnn=cudnn_row["bwd_ms"] / alone)
                else:
                    row.update(vs_cudnn=1.0, bwd_vs_cudnn=1.0)
            except Exception as exc:  # noqa: BLE001 - one failing contender must not stop the table
                text = str(exc).strip()
                row["error"] = f"{type(exc).__name__}: {text.splitlines()[-1][:80] if text else ''}"
            torch.cuda.synchronize()
        results.append(row)
        if "error" in row:
            print(f"{name:22s} {label:30s} {row['error']}")
        else:
            bad = " BAD" if not row["err"] <= BAD else ""
            print(f"{name:22s} {label:30s} {row['ms']:7.3f} {row['tflops']:6.1f} {row['vs_cudnn']:5.2f} "
                  f"{row['bwd_ms']:7.3f} {row['bwd_tflops']:6.1f} {row['bwd_vs_cudnn']:5.2f} {row['err']:7.1e}{bad}")
        sys.stdout.flush()


def _summary(results, cases):
    """One line per case: cuDNN's fwd+bwd TFLOP/s, then each kind's best correct row."""
    kinds = ("sdpa-flash", "aule", "tma", "fused", "atomic")
    print("\nsummary: fwd+bwd TFLOP/s (x cudnn) of each kind's best correct row; the best Hopper row")
    print(f"{'case':22s} {'cudnn':>6s} " + " ".join(f"{k:>13s}" for k in kinds) + "  best")
    for name in cases:
        rows = [r for r in results if r["case"] == name and "ms" in r and r["err"] <= BAD]
        cudnn = next((r for r in rows if r["contender"] == "sdpa-cudnn"), None)
        cells, best = [], None
        for kind in kinds:
            top = max((r for r in rows if r["contender"].split()[0] == kind), key=lambda r: r["tflops"], default=None)
            cells.append(f"{top['tflops']:6.0f} ({top['vs_cudnn']:4.2f})" if top else f"{'-':>13s}")
            if top and kind in hopper_bwd.VARIANTS and (best is None or top["tflops"] > best["tflops"]):
                best = top
        print(f"{name:22s} {cudnn['tflops'] if cudnn else float('nan'):6.0f} " + " ".join(cells)
              + f"  {best['contender'] if best else '-'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--seqs", default="1024,4096,16384", help="sequence lengths at d128")
    ap.add_argument("--seqs64", default="4096", help="sequence lengths at d64")
    ap.add_argument("--masks", default="causal,full")
    ap.add_argument("--only", default="", help="contender kinds beside cudnn and aule: sdpa-flash, tma, fused, atomic")
    ap.add_argument("--budget", type=float, default=100.0, help="seconds after which contenders are skipped")
    ap.add_argument("--tiles", type=int, default=2, help="tiles per variant, from the top of hopper_bwd.TILES: "
                    "one pass over the cases per tile, the later ones while the budget lasts")
    ap.add_argument("--tune", action="store_true", help="autotune aule's general kernels (compiles every tile)")
    ap.add_argument("--rep", type=float, default=40.0, help="ms of timed repeats per measurement")
    a = ap.parse_args()
    if not a.tune:
        os.environ["AULE_TRITON_AUTOTUNE"] = "0"  # aule's forward and general backward at their first fitting tiles
    start = time.time()
    if not device_banner():
        return 1
    only = {x for x in a.only.split(",") if x}
    results, cases = [], []
    print("CUDA events, median; fwd+bwd, then bwd alone; err: grads vs aule's general (its own row: vs cudnn)")
    print(f"{'case':22s} {'contender':30s} {'ms':>7s} {'TF/s':>6s} {'xcdnn':>5s} {'bwd ms':>7s} {'TF/s':>6s} "
          f"{'xcdnn':>5s} {'err':>7s}")
    refs: dict = {}
    for phase in range(a.tiles):
        for d in (int(x) for x in a.dims.split(",")):
            seqs = a.seqs if d == 128 else a.seqs64
            for s in (int(x) for x in seqs.split(",") if x):
                for causal in (m == "causal" for m in a.masks.split(",")):
                    name, shape = _case(d, s, causal)
                    cases += [name] if name not in cases else []
                    rows = contenders(d, only, a.tune, phase)
                    if rows and time.time() - start <= a.budget:
                        _time_case(name, shape, causal, rows, start, a, results, refs)
                    (OUT / "time_hopper_bwd.json").write_text(json.dumps(
                        {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": results},
                        indent=1))
    refs.clear()
    _summary(results, cases)
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        shutil.rmtree(_CACHE, ignore_errors=True)

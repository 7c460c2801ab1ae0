"""Time every sm_90 tile of aule's general Triton forward (configs._NVIDIA["fwd"]) on the issue-16
grid, beside what its autotuner picks and SDPA cuDNN, bf16.

Cases: 16k tokens per batch, model dim 2048, d 128 and 64, seq 1k/4k/16k, causal and not. Per
case: cuDNN; the autotuner's pick (the first call of the shape bucket in this process tunes it,
right after compiling each tile, so with the GPU's clocks as an idle gap leaves them); each tile
forced (``AULE_TRITON_CONFIG=i``, the i-th tile left by configs.prune). The Hopper routes are off
(time_hopper_fwd sets AULE_TRITON_HOPPER=0), so every aule row is the general kernel.
Each is checked against cuDNN (bf16 max abs error) and timed as the median per call of CUDA-graph
replays (time_hopper_fwd._timed). Prints a row per contender, then per case the best tile, the
pick, and the pick's time as a fraction of the best's; JSON under $OUT.

    python3 scripts/time_general_tiles.py
    python3 scripts/time_general_tiles.py --dims 128 --seqs 16384
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import time_hopper_fwd as thf  # noqa: E402

from aule.backends.triton import ops  # noqa: E402
from aule.bench.contenders import _environ  # noqa: E402

torch = thf.torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--seqs", default="1024,4096,16384")
    ap.add_argument("--rep", type=float, default=10.0)
    a = ap.parse_args()
    if not thf.device_banner():
        return 1
    print("ms of graph replays (* eager), TFLOP/s, x cudnn")
    results, summary = [], []
    os.environ.pop("AULE_TRITON_CONFIG", None)
    for d in (int(x) for x in a.dims.split(",")):
        for s in (int(x) for x in a.seqs.split(",")):
            for causal in (False, True):
                name, (b, h, _, _, _) = thf._case(d, s, causal, 1)
                torch.manual_seed(0)
                q, k, v = (torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16) for _ in range(3))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                rows = [("sdpa-cudnn", thf._sdpa("cudnn"))]
                before = {key for tuned in ops.tuned_choices().values() for key in tuned}
                thf._aule(q, k, v, causal)  # tunes this bucket
                torch.cuda.synchronize()
                picked = [c for tuned in ops.tuned_choices().values() for key, c in tuned.items() if key not in before]
                pick = picked[0].split(", num_ctas")[0] if picked else "(tuned earlier)"
                rows.append(("tuner", thf._aule))
                for i, c in enumerate(ops.cfg.prune(ops.cfg.configs("cuda", "fwd", d), {"Q_BUCKET": s, "K_BUCKET": s})):
                    def forced(q, k, v, causal, i=i):
                        with _environ({"AULE_TRITON_CONFIG": str(i)}):
                            return thf._aule(q, k, v, causal)
                    rows.append((f"tile {c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}w{c.num_warps}s{c.num_stages}",
                                 forced))
                case_rows = []
                for row in thf.time_rows(name, rows, lambda fn: fn(q, k, v, causal), flops, lambda: False, a.rep):
                    case_rows.append(row)
                    if "error" in row:
                        print(f"{name:22s} {row['contender']:22s} {row['error']}", flush=True)
                        continue
                    print(f"{name:22s} {row['contender']:22s} {row['ms']:7.3f}{'' if row['graph'] else '*'} "
                          f"{row['tflops']:6.1f} {row['vs_cudnn']:5.2f} {row['err']:7.1e}"
                          f"{' BAD' if row['err'] > 3e-2 else ''}", flush=True)
                results += case_rows
                timed = {r["contender"]: r for r in case_rows if "ms" in r}
                tiles = [r for label, r in timed.items() if label.startswith("tile") and r["err"] <= 3e-2]
                tuner = timed.get("tuner")
                if not tiles or tuner is None or "sdpa-cudnn" not in timed:
                    summary.append(f"{name:22s} not timed: see the rows above")
                    continue
                best = min(tiles, key=lambda r: r["ms"])
                summary.append(f"{name:22s} best {best['contender'][5:]:13s} {best['tflops']:5.0f} ({best['vs_cudnn']:.2f}) "
                               f"picked {pick:48s} {tuner['tflops']:5.0f} ({tuner['vs_cudnn']:.2f}) "
                               f"= {best['ms'] / tuner['ms']:.2f} of best")
    print("\nsummary: the best forced tile, the tuner's pick, TFLOP/s (x cudnn)")
    print("\n".join(summary))
    (thf.OUT / "time_general_tiles.json").write_text(json.dumps({"rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    _cache = thf.private_cache()
    try:
        sys.exit(main())
    finally:
        thf.shutil.rmtree(_cache, ignore_errors=True)

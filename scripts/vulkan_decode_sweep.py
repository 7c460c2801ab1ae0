"""Vulkan paged decode on GpuTensor caches, each kernel choice against SDPA on a contiguous cache.

For the decode suite's shapes (fp16, 32/8 heads, head_dim 128, block 16, shuffled block tables):
b8 ctx 1k/8k/32k, b1 ctx 32k, b64 ctx 4k. Each AULE_VULKAN_PAGED choice (tiled; the subgroup path
automatic and with forced lanes per key, keys in flight, workgroup size, split count) is checked
against torch's float32 attention on the same values first, then timed from Vulkan timestamps
around calls recorded back to back in one submission (aule.backends.vulkan.repeated_paged_attention),
after half a second of sustained work (NVIDIA's driver idles its clocks until then), the median of
the submissions. TB/s counts the fewest bytes: K and V of the visible context, q and the output.

    python3 scripts/vulkan_decode_sweep.py [--quick]

Prints one table; writes nothing but a JSON copy of it under $OUT when $OUT is set. Needs CUDA
torch (the reference and SDPA) and a GPU-type Vulkan device.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = ((8, 1024), (8, 8192), (8, 32768), (1, 32768), (64, 4096))
HQ, HKV, D, BLOCK = 32, 8, 128, 16
# AULE_VULKAN_PAGED values: kernel[,lanes per key,keys in flight,invocations,splits] (0 = automatic).
CHOICES = ("tiled", "subgroup", "subgroup,16", "subgroup,8,8", "subgroup,16,8", "subgroup,8,2", "subgroup,16,2",
           "subgroup,4,8", "subgroup,8,4,64", "subgroup,8,4,256", "subgroup,16,4,256", "subgroup,8,8,256")
SPLIT_FACTORS = (0.5, 2.0)  # the automatic split count times these, as further rows of these choices:
SPLIT_SWEPT = ("subgroup", "subgroup,16")
BUDGET_S = 105.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the automatic choices only")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny case on CPU torch and any Vulkan device (lavapipe): checks the script, not speed")
    args = ap.parse_args()
    t_start = time.perf_counter()

    import numpy as np
    import torch

    from aule.bench import timing
    from aule.bench.inputs import DecodeInputs
    from aule.backends.vulkan import plans, repeated_paged_attention, runtime, to_gpu

    dev = "cpu" if args.smoke else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the reference and SDPA need one (--smoke runs a tiny case on the CPU)")
        return 1
    cases = ((2, 256),) if args.smoke else CASES
    ctx = runtime.context()
    info = ctx.info
    print(f"Vulkan device: {info.name} (subgroup {info.subgroup_size}, shared {info.max_shared_memory} bytes); "
          f"torch {torch.__version__} on {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    rows = []
    header = f"{'case':<12} {'choice':<22} {'module':<14} {'kernel':<16} {'splits':>6} {'us':>9} {'TB/s':>6} " \
             f"{'xSDPA':>6} {'max err':>8}"
    print(header)
    print("-" * len(header))
    for b, n in cases:
        if time.perf_counter() - t_start > BUDGET_S:
            print(f"b{b} ctx {n}: skipped, past the {BUDGET_S:.0f} s budget")
            continue
        p = dict(B=b, Hq=HQ, Hkv=HKV, ctx=n, D=D, block=BLOCK, dtype="float16", device=dev)
        s = DecodeInputs(p).sets[0]
        q, k, v = s["q"], s["k"], s["v"]
        nbytes = 2 * b * HKV * n * D * 2 + 2 * b * HQ * D * 2
        label = f"b{b} ctx{n // 1024}k"
        with torch.no_grad():
            want = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                    enable_gqa=True).cpu().numpy()
            timer = timing.cuda_time if dev == "cuda" else timing.host_time
            sdpa = timer(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True))
        sdpa_us = sdpa["ms"] * 1e3
        print(f"{label:<12} {'torch sdpa':<22} {'contiguous':<14} {'':<16} {'':>6} {sdpa_us:9.1f} "
              f"{nbytes / sdpa_us / 1e6:6.2f} {1.0:6.2f}")
        rows.append(dict(case=label, B=b, ctx=n, choice="torch-sdpa", us=sdpa_us, tbps=nbytes / sdpa_us / 1e6))
        host = {name: s[name].cpu().numpy() for name in ("q", "block_tables", "context_lens")}
        kc, vc = (to_gpu(s[name].cpu().numpy(), paged=True) for name in ("k_cache", "v_cache"))
        del s
        choices = list(CHOICES[:2] if args.quick else CHOICES)
        warm = False
        i = 0
        while i < len(choices):
            choice = choices[i]
            i += 1
            if time.perf_counter() - t_start > BUDGET_S:
                print(f"{label:<12} {choice:<22} skipped: past the {BUDGET_S:.0f} s budget")
                continue
            os.environ["AULE_VULKAN_PAGED"] = choice
            work = None
            try:
                work = repeated_paged_attention(host["q"], kc, vc, host["block_tables"], host["context_lens"], repeat=1)
                one = work.ms()
                work.close()
                work = None
                reps = timing.batch_size(one)
                work = repeated_paged_attention(host["q"], kc, vc, host["block_tables"], host["context_lens"],
                                                repeat=reps)
                t = timing.reported_time(work.ms, max_s=2.0, warmup_s=0.0 if warm else timing.DEVICE_WARMUP_S,
                                         min_reps=5, min_s=0.15)
                warm = True
                got = ctx.download(work.out, np.empty(host["q"].shape, np.float16)).astype(np.float32)
                err = float(np.abs(got - want).max())
                plan = work.plan
            except Exception as exc:  # one choice failing (refused on this device) leaves the others
                print(f"{label:<12} {choice:<22} failed: {type(exc).__name__}: {exc}")
                rows.append(dict(case=label, B=b, ctx=n, choice=choice, error=f"{type(exc).__name__}: {exc}"))
                continue
            finally:
                if work is not None:
                    work.close()
            us = t["ms"] * 1e3
            k_ = plan.kernel
            kern = f"{k_.kind[:3]} {k_.bm}x{k_.bn}x{k_.wg}" + (f" kt{k_.kt}" if k_.kind == "subgroup" else "")
            ok = err < 2e-2
            print(f"{label:<12} {choice:<22} {plan.module:<14} {kern:<16} {plan.splits:>6} {us:9.1f} "
                  f"{nbytes / us / 1e6:6.2f} {sdpa_us / us:6.2f} {err:8.1e}{'' if ok else '  WRONG'}")
            rows.append(dict(case=label, B=b, ctx=n, choice=choice, module=plan.module, kernel=kern,
                             splits=plan.splits, us=us, us_p20=t["ms_p20"] * 1e3, us_p80=t["ms_p80"] * 1e3,
                             tbps=nbytes / us / 1e6, x_sdpa=sdpa_us / us, max_err=err, ok=ok, calls=reps))
            if choice in SPLIT_SWEPT and not args.quick:
                # The same sizes with fewer and more splits than the automatic count.
                sizes = (choice.split(",", 1)[1:] or ["0"])[0]
                sizes = ",".join((sizes.split(",") + ["0", "0", "0"])[:3])
                for f in SPLIT_FACTORS:
                    sp = max(1, min(plans.MAX_SPLITS, int(round(plan.splits * f))))
                    if sp != plan.splits:
                        choices.insert(i, f"subgroup,{sizes},{sp}")
        os.environ.pop("AULE_VULKAN_PAGED", None)
        timed = [r for r in rows if r["case"] == label and r.get("ok")]
        if timed:
            best = min(timed, key=lambda r: r["us"])
            auto = next((r for r in timed if r["choice"] == "subgroup"), None)
            print(f"{label:<12} best: {best['choice']} ({best['kernel']}, {best['splits']} splits) "
                  f"{best['tbps']:.2f} TB/s = {best['x_sdpa']:.2f}x SDPA"
                  + (f"; automatic subgroup {auto['tbps']:.2f} TB/s" if auto else ""))
        kc.free()
        vc.free()
        del q, k, v
        if dev == "cuda":
            torch.cuda.empty_cache()
    print(f"({time.perf_counter() - t_start:.0f} s)")
    out = os.environ.get("OUT")
    if out:
        Path(out, "vulkan_decode_sweep.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

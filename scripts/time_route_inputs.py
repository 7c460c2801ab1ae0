"""Time aule's bf16 d128 forward through each of its entry points with the inputs the bench uses:
three input sets taken in turn (no call finds its K/V left in L2 by the call before), eager
calls under triton's do_bench (200 ms warm-up, 300 ms of repeats).

Rows per case: ``ops.attention_forward`` (the general kernel, AULE_TRITON_HOPPER=0), the same
through ``aule.flash_attention`` (aule.fastcall and the direct launcher), with
``AULE_TRITON_DIRECT=0`` (Triton's own launcher), with the Hopper routes on (hopper.DEFAULT_ROUTES),
and ``ops.attention_forward`` again (the drift between identical rows). Cases: 16k tokens, 16
heads, s16k full, s4k full, s16k causal.

    python3 scripts/time_route_inputs.py
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ["AULE_TRITON_HOPPER"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402

import aule  # noqa: E402
from aule.backends.triton import ops  # noqa: E402
from aule.bench.contenders import _environ  # noqa: E402


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return 1
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    torch.manual_seed(0)
    d = 128
    for b, h, s, causal in ((1, 16, 16384, False), (4, 16, 4096, False), (1, 16, 16384, True)):
        sets = [tuple(torch.randn((b, h, s, d), device="cuda", dtype=torch.bfloat16) for _ in range(3))
                for _ in range(3)]
        flops = 4 * b * h * s * s * d / (2 if causal else 1)

        def timed(fn, name):
            fn(0)
            torch.cuda.synchronize()
            turn = [0]

            def step():
                turn[0] = (turn[0] + 1) % len(sets)
                fn(turn[0])
            ms = triton.testing.do_bench(step, warmup=200, rep=300)
            print(f"s{s} {'causal' if causal else 'full':6s} {name:34s} {ms:7.3f} ms {flops / ms * 1e-9:6.0f} TFLOP/s",
                  flush=True)

        def general(i):
            return ops.attention_forward(*sets[i], d ** -0.5, -1, 0 if causal else -1)

        def public(i):
            return aule.flash_attention(*sets[i], causal=causal, backend="triton")

        timed(general, "ops.attention_forward")
        timed(public, "aule.flash_attention")
        with _environ({"AULE_TRITON_DIRECT": "0"}):
            timed(public, "flash_attention, DIRECT=0")
        with _environ({"AULE_TRITON_HOPPER": None}):
            timed(public, "flash_attention, routes on")
        timed(general, "ops.attention_forward again")
    return 0


if __name__ == "__main__":
    sys.exit(main())

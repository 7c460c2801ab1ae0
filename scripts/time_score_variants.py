"""Time the Triton forward's variants of modified scores against plain attention on one GPU.

Each row is one call of the forward kernel (``ops.attention_forward``, no routing) on the same
inputs, timed by aule's CUDA timer (``aule.bench.timing.cuda_time``: warm-up, then the median of
CUDA-event repeats with the 20th/80th percentiles), beside plain attention on the same shape and
mask. The variants are the settings the kernels read on every launch:

* ``AULE_TRITON_TANH`` = exp2 | rcp | approx: the softcap's tanh (kernels._tanh),
* ``AULE_TRITON_ALIBI`` = exact | split: ALiBi per score, or as a column bias with its row term
  in the row maximum (kernels.ALIBI_LEFT / ALIBI_SPLIT),

switched inside one process. Before timing, each variant's output is compared with the exact
variant's (exp2 tanh, exact ALiBi) and with a float32 PyTorch reference, so a fast wrong kernel
shows as such. With autotuning on (the default) every variant tunes its own tile first, as its
tuning key includes the variant; ``--config i`` times the i-th configuration of the table instead.

    python scripts/time_score_variants.py                         # B1 H32 S4096 D128 bf16, causal and not
    python scripts/time_score_variants.py --shape 1,32,8192,128 --dtype float16 --backward
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from aule.backends.triton import ops  # noqa: E402
from aule.bench import timing  # noqa: E402

# (name, softcap, alibi, AULE_TRITON_TANH, AULE_TRITON_ALIBI); the first row of each feature is
# the exact form the others are compared with.
VARIANTS = [
    ("plain", 0.0, False, None, None),
    ("softcap exp2", 50.0, False, "exp2", None),
    ("softcap rcp", 50.0, False, "rcp", None),
    ("softcap approx", 50.0, False, "approx", None),
    ("alibi exact", 0.0, True, None, "exact"),
    ("alibi split", 0.0, True, None, "split"),
    ("softcap+alibi exp2 exact", 50.0, True, "exp2", "exact"),
    ("softcap+alibi approx split", 50.0, True, "approx", "split"),
]


def _slopes(heads: int) -> torch.Tensor:
    """ALiBi's standard geometric slopes (2^(-8 i / heads))."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float32)


def _reference(q, k, v, scale, causal, softcap, slopes):
    """float32 attention in PyTorch on one batch entry and up to 4 query heads (enough to catch a
    wrong variant without the memory of a full [S, S] float32 score matrix per head)."""
    g = q.shape[1] // k.shape[1]
    q = q[:1, :4].float()
    k, v = (x[:1].float().repeat_interleave(g, 1)[:, :4] for x in (k, v))
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    if slopes is not None:
        s = s - slopes[0, :4, None, None] * (i - j).abs().float()
    if causal:
        s = s.masked_fill(j > i, float("-inf"))
    return torch.softmax(s, -1) @ v


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="1,32,4096,128", help="batch,heads,seq,head_dim (default %(default)s)")
    ap.add_argument("--kv-heads", type=int, default=None, help="heads of K/V (GQA); default: as q")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--masks", default="causal,noncausal", help="comma-separated: causal, noncausal")
    ap.add_argument("--only", default="", help="comma-separated variant names to time (default: all)")
    ap.add_argument("--backward", action="store_true", help="also time forward + backward")
    ap.add_argument("--config", type=int, default=None, help="AULE_TRITON_CONFIG: one configuration, untuned")
    ap.add_argument("--rep-ms", type=float, default=200.0, help="timing budget per row (ms)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA/ROCm GPU", file=sys.stderr)
        return 2
    if args.config is not None:
        os.environ["AULE_TRITON_CONFIG"] = str(args.config)
    b, h, s, d = (int(x) for x in args.shape.split(","))
    hkv = args.kv_heads or h
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(b, h, s, d, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=dtype, generator=gen)
    scale = d ** -0.5
    slopes = _slopes(h)[None].expand(b, h).contiguous().cuda()
    chosen = [vv for vv in VARIANTS if not args.only or vv[0] in args.only.split(",")]
    saved = {key: os.environ.get(key) for key in ("AULE_TRITON_TANH", "AULE_TRITON_ALIBI")}
    print(f"B{b} H{h}/{hkv} S{s} D{d} {args.dtype}, {torch.cuda.get_device_name()}")
    header = (f"{'mask':<10} {'variant':<28} {'fwd ms':>8} {'p20-p80':>15} {'vs plain':>9} {'err exact':>10} "
              f"{'err ref':>9}")
    if args.backward:
        header += f" {'fwd+bwd ms':>11} {'vs plain':>9}"
    print(header)
    for mask in args.masks.split(","):
        causal = mask == "causal"
        right = 0 if causal else -1
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        plain_ms = plain_fb = None
        exact_out = {}
        for name, cap, alibi, tanh, form in chosen:
            for key, val in (("AULE_TRITON_TANH", tanh), ("AULE_TRITON_ALIBI", form)):
                if val is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = val
            kw = dict(softcap=cap, alibi=slopes if alibi else None)

            def fwd():
                return ops.attention_forward(q, k, v, scale, -1, right, **kw)

            out = fwd()[0]
            feature = (cap > 0, alibi)
            exact = exact_out.setdefault(feature, out)  # the feature's first row is its exact form
            err_exact = (out.float() - exact.float()).abs().max().item()
            ref = _reference(q, k, v, scale, causal, cap, slopes if alibi else None)
            err_ref = (out[:1, :4].float() - ref).abs().max().item()
            t = timing.cuda_time(fwd, rep_ms=args.rep_ms)
            if name == "plain":
                plain_ms = t["ms"]
            ratio = plain_ms / t["ms"] if plain_ms else math.nan
            line = (f"{mask:<10} {name:<28} {t['ms']:8.3f} {t['ms_p20']:7.3f}-{t['ms_p80']:<7.3f} {ratio:8.2f}x "
                    f"{err_exact:10.2e} {err_ref:9.2e}")
            if args.backward:
                qg, kg, vg = (x.detach().clone().requires_grad_() for x in (q, k, v))
                dout = torch.randn_like(q)

                def fwd_bwd():
                    o, _ = ops.triton_attention(qg, kg, vg, scale, -1, right, softcap=cap,
                                                alibi=slopes if alibi else None)
                    o.backward(dout)

                tb = timing.cuda_time(fwd_bwd, rep_ms=args.rep_ms, grad_to_none=[qg, kg, vg])
                if name == "plain":
                    plain_fb = tb["ms"]
                line += f" {tb['ms']:11.3f} {plain_fb / tb['ms'] if plain_fb else math.nan:8.2f}x"
            print(line + f"   ({flops / t['ms'] / 1e9:.0f} TFLOP/s fwd)", flush=True)
    for key, val in saved.items():
        if val is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = val
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A small Llama-style model, forward and training step, with aule installed against plain SDPA.

    python benchmarks/llama_train.py                 # 8 layers, hidden 2048, 32/8 heads, seq 4096, bf16
    python benchmarks/llama_train.py --json out.json

Both variants run in one process on the same model and inputs: torch's SDPA with its flash
backend forced (``sdpa_kernel(FLASH_ATTENTION)``), and ``aule.install()`` (Triton). The model is
Hugging Face's LlamaForCausalLM with ``attn_implementation="sdpa"``, so aule enters exactly as a
user's ``install()`` would. Correctness first (logits, loss and gradients of aule against SDPA),
then CUDA-event timings: warm-up steps (Triton autotuning happens there), then the median of the
timed steps. Tokens/s = batch * seq / median step time.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test of this script")
    return p.parse_args(argv)


class _Routes(logging.Handler):
    """Collects aule's route and fallback messages, to show which path each variant took."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main(argv=None):
    args = parse_args(argv)
    import torch
    import transformers
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import aule
    from aule import torch_sdpa

    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    routes = _Routes()
    logging.getLogger("aule").addHandler(routes)
    logging.getLogger("aule").setLevel(logging.INFO)

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).to(dev, torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator(device=dev).manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch, args.seq), device=dev, generator=gen) for _ in range(3)]
    tokens = args.batch * args.seq

    flash = _flash_supports_gqa(torch, dev, args)
    variants = {
        "sdpa-flash": (lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION])) if flash else contextlib.nullcontext,
        "aule": lambda: aule.installed(verbose=True),
    }
    if not flash:
        print("torch's flash SDPA refuses this GQA shape here: 'sdpa-flash' is SDPA's default dispatch")

    # ---- correctness: logits, loss and gradients, aule against SDPA-flash ----------------------
    def loss_and_grads(ctx, ids):
        model.zero_grad(set_to_none=True)
        with ctx():
            loss = model(ids, labels=ids).loss
            loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                               if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}

    model.eval()
    with torch.no_grad():
        logits = {name: _ctx_logits(model, ctx, batches[0]) for name, ctx in variants.items()}
    model.train()
    ref_loss, ref_grads = loss_and_grads(variants["sdpa-flash"], batches[0])
    aule_loss, aule_grads = loss_and_grads(variants["aule"], batches[0])
    check = {
        "logits_rel_err": _rel(logits["aule"], logits["sdpa-flash"]),
        "loss_sdpa": ref_loss.item(), "loss_aule": aule_loss.item(),
        "grad_rel_err_max": max(_rel(aule_grads[n], ref_grads[n]) for n in ref_grads),
    }
    del logits, ref_grads, aule_grads
    served = [m for m in routes.messages if "-> triton" in m]
    fallbacks = [m for m in routes.messages
                 if ("torch SDPA" in m or "uses sdpa" in m) and not m.startswith("aule: skipping backend")]
    check["aule_routes"] = sorted(set(served))
    check["aule_fallbacks"] = sorted(set(fallbacks))
    print("correctness:", json.dumps(check, indent=1), flush=True)
    ok = check["logits_rel_err"] < 2e-2 and check["grad_rel_err_max"] < 5e-2 and served and not fallbacks

    # ---- timing ----------------------------------------------------------------------------------
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")

    def train_step(ids):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def forward(ids):
        with torch.no_grad():
            model(ids, logits_to_keep=1)  # the attention stack, not the vocabulary projection

    def timed(fn, ctx, train):
        model.train(train)
        times = []
        with ctx():
            for i in range(args.warmup + args.steps):
                ids = batches[i % len(batches)]
                if dev.type == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn(ids)
                    end.record()
                    torch.cuda.synchronize()
                    took = start.elapsed_time(end) / 1e3
                else:
                    t0 = time.perf_counter()
                    fn(ids)
                    took = time.perf_counter() - t0
                if i >= args.warmup:
                    times.append(took)
        return statistics.median(times), times

    results = {}
    # sdpa-flash twice (first and last) shows the drift between identical runs.
    for name in ("sdpa-flash", "aule", "sdpa-flash#2"):
        ctx = variants[name.split("#")[0]]
        fwd_s, fwd_all = timed(forward, ctx, False)
        step_s, step_all = timed(train_step, ctx, True)
        results[name] = {"forward_s": fwd_s, "forward_tok_s": tokens / fwd_s, "train_step_s": step_s,
                         "train_tok_s": tokens / step_s, "forward_all_s": fwd_all, "train_all_s": step_all}
        print(f"{name}: forward {tokens / fwd_s:,.0f} tok/s, train step {tokens / step_s:,.0f} tok/s", flush=True)

    import triton

    meta = {"device": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "params": n_params, "args": vars(args) | {"json": None}}
    report = {"meta": meta, "check": check, "results": results, "ok": bool(ok)}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))

    print(f"\n{meta['device']}, torch {meta['torch']}, triton {meta['triton']}, transformers "
          f"{meta['transformers']}; Llama {args.layers} layers, hidden {args.hidden}, {args.heads}/{args.kv_heads} "
          f"heads, seq {args.seq}, batch {args.batch}, bf16, {n_params / 1e6:.0f}M params")
    print("| variant | forward tok/s | train step tok/s | train step ms |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['forward_tok_s']:,.0f} | {r['train_tok_s']:,.0f} | {r['train_step_s'] * 1e3:.1f} |")
    base = min(results["sdpa-flash"]["train_step_s"], results["sdpa-flash#2"]["train_step_s"])
    print(f"aule train step vs best sdpa-flash: {base / results['aule']['train_step_s']:.3f}x; "
          f"correctness {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


def _flash_supports_gqa(torch, dev, args):
    """Whether torch's flash SDPA takes this GQA shape with enable_gqa (it depends on the version)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if dev.type != "cuda":
        return False
    d = args.hidden // args.heads
    q = torch.randn(1, args.heads, 128, d, device=dev, dtype=torch.bfloat16)
    kv = torch.randn(1, args.kv_heads, 128, d, device=dev, dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        return True
    except RuntimeError:
        return False


def _ctx_logits(model, ctx, ids):
    with ctx():
        return model(ids).logits


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())

"""The ``train`` suite's inputs and contenders: a Hugging Face Llama model run through torch's SDPA
with its flash backend forced, and with ``aule.install()`` (Triton), as a user's model would.

Checked first (logits for the forward case; loss and the gradients of the attention projections
for the training step, against the SDPA-flash row), then timed step by step: warm-up steps (Triton
autotunes there), then the median of the timed steps, each ended by a CUDA synchronisation.
The forward case keeps one logit position (the attention stack, not the vocabulary projection).
"""
from __future__ import annotations

import contextlib
import logging

from .bound import Bound, Contender
from .inputs import Skip, resolve_device

WARMUP_STEPS = 3
TIMED_STEPS = 8
_MODELS: dict = {}  # one model at a time, shared by the forward and training cases


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class ModelInputs:
    """The model of a case and three token batches (rotated, as the attention suites rotate sets)."""

    backward = False

    def __init__(self, p: dict):
        import torch
        import transformers

        key = tuple(sorted((k, v) for k, v in p.items() if k != "mode"))
        if key not in _MODELS:
            _MODELS.clear()
            dev = torch.device(resolve_device(p))
            cfg = transformers.LlamaConfig(
                vocab_size=p["vocab"], hidden_size=p["hidden"], intermediate_size=p["intermediate"],
                num_hidden_layers=p["layers"], num_attention_heads=p["Hq"], num_key_value_heads=p["Hkv"],
                max_position_embeddings=p["S"], attn_implementation="sdpa")
            torch.manual_seed(0)
            model = transformers.LlamaForCausalLM(cfg).to(dev, getattr(torch, p["dtype"]))
            gen = torch.Generator(device=dev).manual_seed(1)
            batches = [torch.randint(0, p["vocab"], (p["B"], p["S"]), device=dev, generator=gen) for _ in range(3)]
            _MODELS[key] = (model, batches)
        self.p = p
        self.model, self.sets = _MODELS[key]
        self.train = p["mode"] == "train"

    def checked(self, context):
        """What the check compares: logits (forward) or loss and projection gradients (train)."""
        import torch

        model, ids = self.model, self.sets[0]
        if not self.train:
            model.eval()
            with torch.no_grad(), context():
                return model(ids).logits
        model.train()
        model.zero_grad(set_to_none=True)
        with context():
            loss = model(ids, labels=ids).loss
            loss.backward()
        grads = {n: q.grad.detach().clone() for n, q in model.named_parameters()
                 if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight"))}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads

    @staticmethod
    def error(result, ref) -> float:
        if isinstance(result, tuple):
            (loss, grads), (ref_loss, ref_grads) = result, ref
            return max([_rel(loss, ref_loss)] + [_rel(grads[n], ref_grads[n]) for n in ref_grads])
        return _rel(result, ref)

    def reference(self, baseline) -> object:
        """The baseline contender's checked result (torch's default SDPA: the reference every row meets)."""
        return self.checked(baseline.context_for(self)[0])

    def tolerance(self) -> float:
        return 5e-2 if self.train else 2e-2


class _Routes(logging.Handler):
    """aule's route and fallback messages: which path the installed SDPA took."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


class HfModel(Contender):
    """The case's model with SDPA under ``sdpa_kernel(<sdpa>)``, with torch's own choice of SDPA
    backend (``sdpa='default'``: what the model gets without aule, cuDNN first on Hopper), or with
    ``aule.installed()`` when ``sdpa`` is None. Timed per step (clock 'steps')."""

    impl = "hf"
    serves = ("model",)

    def __init__(self, sdpa=None):
        super().__init__(sdpa or "aule")
        self.sdpa = sdpa

    def unavailable(self):
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as exc:
            return f"needs torch and transformers: {exc}"
        return None

    def variant(self, case):
        return None

    def context_for(self, inp):
        if self.sdpa is None:
            import aule

            return lambda: aule.installed(verbose=True), None
        if self.sdpa == "default":
            return contextlib.nullcontext, None
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        p = inp.p
        d = p["hidden"] // p["Hq"]
        q = torch.randn(1, p["Hq"], 128, d, device=inp.sets[0].device, dtype=torch.bfloat16)
        kv = torch.randn(1, p["Hkv"], 128, d, device=q.device, dtype=torch.bfloat16)
        backend = getattr(SDPBackend, self.sdpa)
        try:  # whether this torch's flash SDPA takes the GQA shape depends on its version
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
        except RuntimeError:
            return contextlib.nullcontext, f"SDPA's default dispatch ({self.sdpa} refuses this GQA shape)"
        return lambda: sdpa_kernel([backend]), None

    def prepare(self, case, inp):
        import torch

        if resolve_device(case) != "cuda":
            raise Skip("the model suite times CUDA steps")
        model, batches = inp.model, inp.sets
        context, note = self.context_for(inp)
        routes = _Routes()
        logging.getLogger("aule").addHandler(routes)
        level = logging.getLogger("aule").level
        logging.getLogger("aule").setLevel(logging.INFO)
        # lr 0: each step does an optimizer update's whole work without moving the weights, so every
        # contender times and checks the same model (a moving one made identical rows differ by 0.22).
        opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True) if inp.train else None

        def step(i):
            ids = batches[i]
            with context():
                if opt is None:
                    with torch.no_grad():
                        return model(ids, logits_to_keep=1)
                model(ids, labels=ids).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        def checked(i):
            result = inp.checked(context)
            if self.sdpa is None:
                # Every call is aule's kernel or, where aule.speed_table measured torch faster for its
                # class on this GPU, torch's own SDPA by that decision: any other fallback fails the row.
                served = [m for m in routes.messages if "-> triton" in m]
                preferred = [m for m in routes.messages if "so torch SDPA serves it" in m]
                fallbacks = [m for m in routes.messages if ("torch SDPA" in m or "uses sdpa" in m)
                             and not m.startswith("aule: skipping backend") and m not in preferred]
                if fallbacks or not (served or preferred):
                    raise RuntimeError("aule did not serve every attention call through Triton or the speed "
                                       "table's choice: " + "; ".join(sorted(set(fallbacks)) or ["no route logged"]))
            model.train(inp.train)
            return result

        def cleanup():
            logging.getLogger("aule").removeHandler(routes)
            logging.getLogger("aule").setLevel(level)

        return Bound(step, len(batches), clock="steps", sync=torch.cuda.synchronize, cleanup=cleanup,
                     variant=note, checked=checked)

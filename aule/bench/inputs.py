"""What a case runs on: the machine checks a suite needs (CUDA, a Vulkan GPU) and the input sets
built once per case and shared by every contender, so all rows of a case see the same values."""
from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger("aule")


class Skip(Exception):
    """A contender cannot run this case; the message is the reason shown in the table."""


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def cuda_ready() -> str | None:
    """None when a CUDA/ROCm device is usable through torch, else why not."""
    torch = torch_or_none()
    if torch is None:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA/ROCm device (torch.cuda.is_available() is False)"
    return None


_INFO_CACHE: dict = {}


def backend_info() -> dict:
    """aule.backend_info(), read once per process (Vulkan's details enumerate devices)."""
    if "info" not in _INFO_CACHE:
        import aule

        try:
            _INFO_CACHE["info"] = aule.backend_info()
        except Exception as exc:  # detection must never stop a benchmark
            log.debug("bench: backend_info failed: %s", exc)
            _INFO_CACHE["info"] = {}
    return _INFO_CACHE["info"]


def vulkan_gpu_missing() -> str | None:
    """None when aule's Vulkan backend runs on a GPU-type device, else why not."""
    info = backend_info().get("vulkan", {})
    if not info.get("available"):
        return f"needs a Vulkan GPU: the vulkan backend is unavailable: {info.get('reason')}"
    dev = info.get("device")
    if isinstance(dev, dict) and dev.get("type") == "cpu":
        return f"needs a GPU-type Vulkan device; the only one is {dev.get('name')} (a CPU rasteriser)"
    return None


def first_line(exc) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def resolve_device(p: dict) -> str:
    """'cuda' or 'cpu'. A case on device 'auto' (the Vulkan suite) uses the CUDA device when torch
    has one, so the SDPA rows beside Vulkan's are on the same GPU, else the CPU."""
    if p.get("device") == "auto":
        return "cpu" if cuda_ready() else "cuda"
    return "cuda" if p.get("device") == "cuda" else "cpu"


def _cache_bytes(device: str) -> int:
    torch = torch_or_none()
    if device == "cuda" and torch is not None:
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) or 50 * 2**20
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            txt = f.read().strip()
        return int(txt[:-1]) * 1024 if txt.endswith("K") else int(txt)
    except (OSError, ValueError):
        return 32 * 2**20


def _n_sets(device: str, set_bytes: int) -> int:
    """Enough input sets that rotating them cycles more data than the last-level cache holds."""
    return int(min(3, max(1, math.ceil(4 * _cache_bytes(device) / max(1, set_bytes)))))




class AttentionInputs:
    """Sets of q, k, v (and a gradient for the output) as torch tensors, and NumPy views of the
    same memory for aule's host backends."""

    def __init__(self, p: dict, seed: int = 0):
        torch = torch_or_none()
        self.p = p
        b, hq, hk, sq, d = p["B"], p["Hq"], p["Hkv"], p["S"], p["D"]
        sk = p.get("Sk", sq)
        self.backward = p.get("mode") == "fwd+bwd"
        itemsize = {"float32": 4, "float64": 8}.get(p["dtype"], 2)
        set_bytes = itemsize * d * (b * hq * sq * 2 + 2 * b * hk * sk)
        self.sets = []
        if torch is None:
            rng = np.random.default_rng(seed)
            for _ in range(_n_sets("cpu", set_bytes)):
                self.sets.append({n: rng.standard_normal(shape, dtype=np.float32).astype(p["dtype"])
                                  for n, shape in (("q", (b, hq, sq, d)), ("k", (b, hk, sk, d)),
                                                   ("v", (b, hk, sk, d)), ("do", (b, hq, sq, d)))})
            self.numpy_sets = self.sets
            return
        dev = resolve_device(p)
        gen = torch.Generator(device=dev).manual_seed(seed)
        dt = getattr(torch, p["dtype"])
        # ``fp8_grid``: values that float8 e4m3 holds exactly (N(0,1) rounded onto its grid), so a
        # float8 contender's quantised inputs are the very values every other row and the reference
        # get, and its error is its own arithmetic's, not the quantisation's.
        grid = (lambda x: x.to(torch.float8_e4m3fn).float()) if p.get("fp8_grid") else (lambda x: x)
        for _ in range(_n_sets(dev, set_bytes)):
            s = {n: grid(torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)).to(dt)
                 for n, shape in (("q", (b, hq, sq, d)), ("k", (b, hk, sk, d)), ("v", (b, hk, sk, d)))}
            if self.backward:
                s["do"] = torch.randn((b, hq, sq, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
                for n in ("q", "k", "v"):
                    s[n].requires_grad_(True)
            self.sets.append(s)
        self.numpy_sets = None
        if dev == "cpu" and p["dtype"] in ("float32", "float64", "float16"):
            self.numpy_sets = [{n: t.detach().numpy() for n, t in s.items()} for s in self.sets]

    def host_sets(self):
        """NumPy arrays with the same values (copies from a GPU), for aule's host backends."""
        if self.numpy_sets is None:
            if self.p["dtype"] == "bfloat16":
                raise Skip("NumPy has no bfloat16: aule's host backends take float16/float32 arrays")
            self.numpy_sets = [{n: t.detach().cpu().numpy() for n, t in s.items()} for s in self.sets]
        return self.numpy_sets

    def leaves(self):
        return [s[n] for s in self.sets for n in ("q", "k", "v")] if self.backward else None


class DecodeInputs:
    """A contiguous KV cache for SDPA and the same values scattered into shuffled paged blocks."""

    def __init__(self, p: dict, seed: int = 0):
        torch = torch_or_none()
        b, hq, hk, ctx, d, blk = p["B"], p["Hq"], p["Hkv"], p["ctx"], p["D"], p["block"]
        if ctx % blk:
            raise ValueError(f"decode case: ctx {ctx} must be a multiple of block {blk}")
        self.p = p
        dev = resolve_device(p)
        dt = getattr(torch, p["dtype"])
        gen = torch.Generator(device=dev).manual_seed(seed)
        nb = ctx // blk
        set_bytes = 2 * 2 * b * hk * ctx * d * torch.finfo(dt).bits // 8
        self.sets = []
        for _ in range(_n_sets(dev, set_bytes)):
            q = torch.randn((b, hq, 1, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            k = torch.randn((b, hk, ctx, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            v = torch.randn((b, hk, ctx, d), generator=gen, device=dev, dtype=torch.float32).to(dt)
            perm = torch.randperm(b * nb, generator=gen, device=dev)

            def paged(x):
                blocks = x.view(b, hk, nb, blk, d).permute(0, 2, 3, 1, 4).reshape(b * nb, blk, hk, d)
                cache = torch.empty_like(blocks)
                cache[perm] = blocks
                return cache

            self.sets.append({
                "q": q, "k": k, "v": v, "k_cache": paged(k), "v_cache": paged(v),
                "block_tables": perm.view(b, nb).to(torch.int32),
                "context_lens": torch.full((b,), ctx, dtype=torch.int32, device=dev),
            })

    def bytes_read(self) -> int:
        p = self.p
        return 2 * p["B"] * p["Hkv"] * p["ctx"] * p["D"] * self.sets[0]["k"].element_size()



# --------------------------------------------------------------------------------------------
# Padded and packed batches (the features suite): a case with ``lengths`` gives batch element b
# ``lengths[b]`` visible keys (``pack='mask'``) or packs sequences of those lengths (``'varlen'``).
# Either way the same work can be run unpadded, one dense call per sequence: its pieces.


def padding_mask(lengths, seq_k: int) -> np.ndarray:
    """Boolean key-padding mask ``[B, 1, 1, seq_k]``: element b sees its first ``lengths[b]`` keys."""
    return (np.arange(seq_k)[None, :] < np.asarray(lengths)[:, None])[:, None, None, :]


def _dense_copy(x):
    """A contiguous copy (NumPy or torch), so an unpadded piece is plain attention's own layout."""
    return np.ascontiguousarray(x) if isinstance(x, np.ndarray) else x.contiguous()


def _cat(xs, axis: int):
    if isinstance(xs[0], np.ndarray):
        return np.concatenate(xs, axis=axis)
    return torch_or_none().cat(xs, dim=axis)


class _Pieces:
    """What padded and packed inputs share: the unpadded pieces of each set, built once (outside
    any timed region), and the assembly of their outputs into the padded or packed output."""

    def pieces(self, i: int, host: bool = False) -> list:
        key = (i, host)
        if key not in self._pieces:
            s = (self.host_sets() if host else self.sets)[i]
            self._pieces[key] = [tuple(_dense_copy(x) for x in self._piece(s, b))
                                 for b in range(len(self.p["lengths"]))]
        return self._pieces[key]


class PaddedInputs(AttentionInputs, _Pieces):
    """A batch whose element b sees its first ``lengths[b]`` keys; its pieces are the batch
    elements with only those keys, ``[1, H, S, D]`` queries over ``[1, H, lengths[b], D]`` keys."""

    def __init__(self, p: dict, seed: int = 0):
        if len(p["lengths"]) != p["B"] or max(p["lengths"]) > p.get("Sk", p["S"]):
            raise ValueError(f"lengths {p['lengths']} must give each of the {p['B']} batch elements at most "
                             f"Sk = {p.get('Sk', p['S'])} keys")
        super().__init__(p, seed)
        self._pieces = {}

    def _piece(self, s, b):
        n = self.p["lengths"][b]
        return s["q"][b:b + 1], s["k"][b:b + 1, :, :n], s["v"][b:b + 1, :, :n]

    @staticmethod
    def assemble(outs):
        return _cat(list(outs), 0)


class VarlenInputs(_Pieces):
    """Sequences of ``lengths`` packed as flash-attn's varlen layout: ``q [total, Hq, D]``,
    ``k, v [total, Hkv, D]`` and ``cu_seqlens [B + 1]`` (int32, on the tensors' device); each
    sequence attends to itself. Its pieces are the sequences as dense ``[1, H, n, D]`` calls."""

    backward = False

    def __init__(self, p: dict, seed: int = 0):
        if p.get("mode", "fwd") != "fwd" or len(p["lengths"]) != p["B"]:
            raise ValueError(f"a varlen case is forward only with one length per batch element, got {p}")
        self.p = p
        total = int(sum(p["lengths"]))
        # One [1, H, total, D] batch holds every sequence's values; the packed sets are its copies.
        flat = AttentionInputs({**p, "B": 1, "S": total, "Sk": total}, seed)
        self.cu = np.concatenate([[0], np.cumsum(p["lengths"])]).astype(np.int32)
        self.sets = [self._packed(s) for s in flat.sets]
        self._host = None
        self._pieces = {}

    def _packed(self, s) -> dict:
        out = {n: _dense_copy(s[n][0].swapaxes(0, 1) if isinstance(s[n], np.ndarray) else s[n][0].transpose(0, 1))
               for n in ("q", "k", "v")}
        torch = torch_or_none()
        out["cu_seqlens"] = self.cu if torch is None or isinstance(out["q"], np.ndarray) else (
            torch.from_numpy(self.cu).to(out["q"].device))
        return out

    def host_sets(self):
        if self._host is None:
            if self.p["dtype"] == "bfloat16":
                raise Skip("NumPy has no bfloat16: aule's host backends take float16/float32 arrays")
            self._host = [{n: (x if isinstance(x, np.ndarray) else x.detach().cpu().numpy()) for n, x in s.items()}
                          for s in self.sets]
        return self._host

    def _piece(self, s, b):
        a, e = int(self.cu[b]), int(self.cu[b + 1])

        def dense(x):
            x = x[a:e]
            return (x.swapaxes(0, 1) if isinstance(x, np.ndarray) else x.transpose(0, 1))[None]

        return dense(s["q"]), dense(s["k"]), dense(s["v"])

    @staticmethod
    def assemble(outs):
        """Per-sequence outputs ``[1, H, n, D]`` as the packed ``[total, H, D]``."""
        return _cat([o[0].swapaxes(0, 1) if isinstance(o, np.ndarray) else o[0].transpose(0, 1) for o in outs], 0)

    def leaves(self):
        return None

"""Measured speed of aule's kernel against torch's own SDPA, per GPU model and shape class.

The SDPA drop-in (:mod:`aule.torch_sdpa`, and the Hugging Face and ComfyUI glue through
:mod:`aule.sdpa_core`) promises never to make a call slower than stock SDPA on the same GPU. That
promise rests on measurements, not on hope: ``speed_table.json`` beside this module holds, for each
GPU model (``torch.cuda.get_device_name``) the benchmark ran on, which of the two was faster for each
shape class it measured, with the ratio and the result file and commit it came from. The drop-in
sends a call to torch's original SDPA where torch was measured faster (:func:`decide`).

A shape class (:class:`ShapeClass`) is a call's direction (``fwd``; ``fwd+bwd`` for a call that needs
gradients: a training step runs both, so the pair decides), dtype, head_dim and key length rounded
up to a power of two (key lengths of 1024 and under are one bucket), whether the mask is causal, the
GQA ratio rounded up to a power of two, and its masking: ``none``, ``window`` (a sliding window) or
``mask`` (an ``attn_mask`` tensor).

The rule for classes the benchmark did not measure (:data:`RULE`): the nearest measured class on
the same GPU decides, among those with the same direction, masking and precision family
(fp16/bf16 together, float32 apart), distance counted in bucket steps (head_dim, key length, GQA
ratio; a causal mismatch is one step, fp16 against bf16 half a step; ties go to the smaller
ratio, the cautious side). Routing to torch can only cost aule's speed-up, never the promise, so a
near measurement that says torch is enough. Where no class of that kind was measured on this GPU,
or the GPU has no entry at all, aule's kernel is kept: there is nothing to compare with.

The H200 entries are derived from ``results/nvidia-h200.json`` by ``python -m aule.speed_table
results/nvidia-h200.json`` (:func:`derive`): ``aule:triton`` against the SDPA backend torch picks by
default for that call (a measured ``torch-sdpa`` row when there is one; otherwise cuDNN, then flash,
then memory-efficient on compute capability 9.x and 10.x, where torch ranks cuDNN first, and flash,
memory-efficient, cuDNN elsewhere; for masked rows the backend that took the mask).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

TABLE_FILE = Path(__file__).with_name("speed_table.json")
FORMAT = 1

RULE = ("unmeasured classes follow the nearest measured class on the same GPU with the same direction, "
        "masking and precision family (bucket steps of head_dim, key length and GQA ratio; causal mismatch "
        "1 step, fp16 vs bf16 half a step; ties to the smaller ratio); none such, or no entry for the GPU: "
        "aule's kernel")

DIRECTIONS = ("fwd", "fwd+bwd")
MASKINGS = ("none", "window", "mask")
_HALF = ("float16", "bfloat16")


def _pow2_at_least(n, floor: int) -> int:
    # By comparisons, not bit arithmetic: under torch.compile a size may be symbolic, and each
    # comparison becomes a range guard, so a compiled graph serves a whole bucket.
    b = floor
    while n > b:
        b *= 2
    return b


def bucketed(direction: str, dtype: str, head_dim, seq_k, causal: bool, gqa_ratio, masking: str) -> tuple:
    """The fields of a call's :class:`ShapeClass` as plain values (sizes rounded up to their
    bucket), checked; what ``ShapeClass(*fields)`` takes."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if masking not in MASKINGS:
        raise ValueError(f"masking must be one of {MASKINGS}, got {masking!r}")
    if head_dim < 1 or seq_k < 1 or gqa_ratio < 1:
        raise ValueError(f"head_dim, seq_k and gqa_ratio must be >= 1, got {head_dim}, {seq_k}, {gqa_ratio}")
    return (direction, str(dtype), _pow2_at_least(head_dim, 16), _pow2_at_least(seq_k, 1024), bool(causal),
            _pow2_at_least(gqa_ratio, 1), masking)


def _k(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class ShapeClass:
    """One row key of the table. ``head_dim``, ``seq`` and ``gqa`` are bucket upper bounds."""

    direction: str
    dtype: str
    head_dim: int
    seq: int
    causal: bool
    gqa: int
    masking: str

    @classmethod
    def of(cls, *, direction: str, dtype: str, head_dim: int, seq_k: int, causal: bool, gqa_ratio: int,
           masking: str) -> "ShapeClass":
        """The class of a call with these exact sizes."""
        return cls(*bucketed(direction, dtype, head_dim, seq_k, causal, gqa_ratio, masking))

    @property
    def key(self) -> str:
        """E.g. ``'fwd+bwd bfloat16 hd128 s4k causal gqa8 none'`` (the JSON's key)."""
        return (f"{self.direction} {self.dtype} hd{self.head_dim} s{_k(self.seq)} "
                f"{'causal' if self.causal else 'full'} gqa{self.gqa} {self.masking}")

    @classmethod
    def parse(cls, key: str) -> "ShapeClass":
        try:
            direction, dtype, hd, seq, causal, gqa, masking = key.split()
            seq_n = int(seq[1:-1]) * 1024 if seq.endswith("k") else int(seq[1:])
            if not (hd.startswith("hd") and seq.startswith("s") and gqa.startswith("gqa")
                    and causal in ("causal", "full")):
                raise ValueError
            return cls.of(direction=direction, dtype=dtype, head_dim=int(hd[2:]), seq_k=seq_n,
                          causal=causal == "causal", gqa_ratio=int(gqa[3:]), masking=masking)
        except ValueError:
            raise ValueError(f"not a shape-class key: {key!r} (expected e.g. "
                             "'fwd bfloat16 hd128 s4k causal gqa1 none')") from None

    def distance(self, other: "ShapeClass") -> float | None:
        """Bucket steps from ``other``, or ``None`` when it may not stand in for this class
        (another direction, masking or precision family)."""
        if (self.direction, self.masking) != (other.direction, other.masking):
            return None
        if (self.dtype in _HALF) != (other.dtype in _HALF) or (self.dtype not in _HALF and self.dtype != other.dtype):
            return None
        steps = sum(abs(math.log2(a) - math.log2(b)) for a, b in
                    ((self.head_dim, other.head_dim), (self.seq, other.seq), (self.gqa, other.gqa)))
        return steps + (self.causal != other.causal) + (0.5 if self.dtype != other.dtype else 0.0)


@dataclass(frozen=True)
class Entry:
    """One measured class: ``ratio`` is torch's time over aule's (above 1: aule is faster)."""

    cls: ShapeClass
    ratio: float
    aule_ms: float
    torch_ms: float
    torch_backend: str
    cases: tuple

    @property
    def faster(self) -> str:
        return "aule" if self.ratio >= 1.0 else "torch"


@dataclass(frozen=True)
class Decision:
    """What the table says for one call's class on one GPU."""

    cls: ShapeClass
    gpu: str
    use_torch: bool
    how: str  # 'measured' | 'nearest' | 'unmeasured' | 'no entry'
    entry: Entry | None = None
    source: str = ""

    def why(self) -> str:
        if self.entry is None:
            return (f"{self.cls.key}: no measurement of this kind on {self.gpu}" if self.how == "unmeasured"
                    else f"no speed-table entry for {self.gpu}") + "; aule's kernel is kept"
        e = self.entry
        via = "" if self.how == "measured" else f" (nearest measured class {e.cls.key})"
        side = "torch SDPA" if self.use_torch else "aule"
        return (f"{self.cls.key} on {self.gpu}: aule runs at {e.ratio:.2f}x torch's {e.torch_backend}{via}, "
                f"so {side} serves it [{self.source}]")


@dataclass(frozen=True)
class GpuTable:
    gpu: str
    source: str  # result file and commit
    entries: dict  # class key -> Entry

    def decide(self, cls: ShapeClass) -> Decision:
        e = self.entries.get(cls.key)
        if e is not None:
            return Decision(cls, self.gpu, e.faster == "torch", "measured", e, self.source)
        near = [(d, x.ratio, x.cls.key, x) for x in self.entries.values()
                if (d := cls.distance(x.cls)) is not None]
        if not near:
            return Decision(cls, self.gpu, False, "unmeasured", None, self.source)
        e = min(near)[3]
        return Decision(cls, self.gpu, e.faster == "torch", "nearest", e, self.source)


def _entry(key: str, raw: dict) -> Entry:
    return Entry(ShapeClass.parse(key), float(raw["ratio"]), float(raw["aule_ms"]), float(raw["torch_ms"]),
                 str(raw["torch_backend"]), tuple(raw.get("cases", ())))


def parse(data: dict) -> dict:
    """``{gpu name: GpuTable}`` from the JSON's contents (checked: a malformed file is a ValueError)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("gpus"), dict):
        raise ValueError(f"speed table: expected {{'format': {FORMAT}, 'gpus': {{...}}}}")
    tables = {}
    for gpu, t in data["gpus"].items():
        source = f"{t.get('source', '?')} @ {t.get('commit', '?')}"
        tables[gpu] = GpuTable(gpu, source, {k: _entry(k, e) for k, e in t.get("classes", {}).items()})
    return tables


@functools.lru_cache(maxsize=1)
def load() -> dict:
    """The shipped table (read once per process)."""
    return parse(json.loads(TABLE_FILE.read_text()))


def table_for(gpu: str | None, tables: dict | None = None) -> GpuTable | None:
    if gpu is None:
        return None
    return (load() if tables is None else tables).get(gpu)


def decide(gpu: str, cls: ShapeClass, tables: dict | None = None) -> Decision:
    """Whether torch's own SDPA serves ``cls`` on ``gpu``, and why."""
    t = table_for(gpu, tables)
    if t is None:
        return Decision(cls, gpu, False, "no entry")
    return t.decide(cls)


# --------------------------------------------------------------------------------------------
# deriving the table from a benchmark result file

AULE_CONTENDER = "aule:triton"
# Torch's default backend order (torch/csrc/.../sdp_utils.cpp): cuDNN leads on Hopper and Blackwell.
_ORDER_CUDNN_FIRST = ("sdpa-cudnn", "sdpa-flash", "sdpa-efficient", "sdpa-math")
_ORDER_FLASH_FIRST = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math")
_ORDER_MASK = ("sdpa-cudnn+mask", "sdpa-efficient+mask", "sdpa-math+mask")


def stock_order(capability: str | None, masked: bool) -> tuple:
    """The contenders standing for torch's default choice, most faithful first."""
    if masked:
        return ("torch-sdpa+mask",) + _ORDER_MASK
    major = int(str(capability or "0").split(".")[0] or 0)
    return ("torch-sdpa",) + (_ORDER_CUDNN_FIRST if major in (9, 10) else _ORDER_FLASH_FIRST)


def _case_class(p: dict) -> ShapeClass:
    window = p.get("window", -1)
    masking = "window" if window not in (-1, None) else ("mask" if p.get("lengths") else "none")
    return ShapeClass.of(direction=p["mode"], dtype=p["dtype"], head_dim=p["D"], seq_k=p.get("Sk", p["S"]),
                         causal=p["causal"], gqa_ratio=p["Hq"] // p["Hkv"], masking=masking)


def derive(results: dict, source: str, suites=("dense", "dense_bwd", "gqa", "window", "guarantee")) -> dict:
    """``{gpu name: {...}}`` entries of the table from one result file's attention suites.
    Cases of one class combine by the geometric mean of their ratios (and times)."""
    per_gpu: dict = {}
    for name in suites:
        suite = results.get("suites", {}).get(name)
        machine = results.get("suite_machines", {}).get(name) or results.get("machine", {})
        gpu = (machine.get("gpu") or {}).get("name")
        if not suite or not gpu or suite.get("status") == "skipped":
            continue
        rows: dict = {}
        for r in suite.get("rows", ()):
            if r.get("status") == "ok" and r.get("ms") and r.get("params", {}).get("device") == "cuda":
                rows.setdefault(r["case"], {})[r["contender"]] = r
        g = per_gpu.setdefault(gpu, {"machine": machine, "classes": {}})
        for case, by in rows.items():
            a = by.get(AULE_CONTENDER)
            if a is None or "mode" not in a["params"]:
                continue
            cls = _case_class(a["params"])
            stock = next((by[c] for c in stock_order(machine["gpu"].get("capability"), cls.masking != "none")
                          if c in by), None)
            if stock is None:
                continue
            g["classes"].setdefault(cls.key, []).append((case, a["ms"], stock["ms"], stock["contender"]))
    out = {}
    for gpu, g in per_gpu.items():
        m = g["machine"]
        classes = {}
        for key, items in sorted(g["classes"].items()):
            gm = lambda xs: math.exp(sum(math.log(x) for x in xs) / len(xs))  # noqa: E731
            aule_ms, torch_ms = gm([i[1] for i in items]), gm([i[2] for i in items])
            classes[key] = {"faster": "aule" if torch_ms >= aule_ms else "torch",
                            "ratio": round(torch_ms / aule_ms, 4), "aule_ms": round(aule_ms, 5),
                            "torch_ms": round(torch_ms, 5), "torch_backend": "/".join(sorted({i[3] for i in items})),
                            "cases": [i[0] for i in items]}
        versions = m.get("versions", {})
        out[gpu] = {"source": source, "commit": versions.get("aule_commit"), "date": m.get("date"),
                    "torch": versions.get("torch"), "triton": versions.get("triton"),
                    "cudnn": (m.get("gpu") or {}).get("cudnn"), "classes": classes}
    return out


def main(argv=None) -> int:
    """``python -m aule.speed_table RESULT.json [...]``: (re)derive those GPUs' entries in the table."""
    ap = argparse.ArgumentParser(prog="python -m aule.speed_table", description=main.__doc__)
    ap.add_argument("results", nargs="+", help="benchmark result files (results/<machine>.json)")
    ap.add_argument("--out", default=str(TABLE_FILE))
    args = ap.parse_args(argv)
    out = Path(args.out)
    data = json.loads(out.read_text()) if out.exists() else {"format": FORMAT, "rule": RULE, "gpus": {}}
    for path in args.results:
        p = Path(path)
        data["gpus"].update(derive(json.loads(p.read_text()), f"results/{p.name}"))
    data["rule"] = RULE
    parse(data)  # never write a table the loader would refuse
    out.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    for gpu, t in data["gpus"].items():
        torch_side = sum(c["faster"] == "torch" for c in t["classes"].values())
        print(f"{gpu}: {len(t['classes'])} classes, {torch_side} to torch ({t['source']} @ {t['commit']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

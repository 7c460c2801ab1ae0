"""Turning results into a terminal/markdown table, JSON, PNG plots and the README section."""
from __future__ import annotations

import json
import math
import os

from . import machine as machine_mod
from .suites import SUITE_BY_NAME, matches

README_BEGIN = "<!-- perf:begin -->"
README_END = "<!-- perf:end -->"

METRIC_LABEL = {"tflops": "TFLOP/s", "gflops": "GFLOP/s", "tbps": "TB/s", "us_per_call": "µs/call",
                "mb": "MB", "ms": "ms", "us": "µs", "tokens_per_s": "tokens/s"}


def _fmt(v, digits=3):
    if v is None:
        return "—"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if abs(v) >= 100:
        return f"{v:.0f}"
    return f"{v:.{digits}g}"


def _contended(row) -> bool:
    """A wall-clock row timed while other processes took over a fifth of the machine's CPU."""
    return (row.get("clock") or "").startswith("wall") and (row.get("others_cpu_share") or 0) > 0.2


def _cell(row, metric):
    if row["status"] == "ok":
        return _fmt(row.get(metric)) + ("*" if _contended(row) else "")
    if row["status"] == "wrong":
        return "✗ wrong"
    return "skip" if row["status"] == "skipped" else "error"


# Ceilings a suite may name (Suite.ceiling): where the machine record keeps the measurement, the
# field with the rate in the suite's metric, and how the tables name it.
CEILINGS = {"vulkan_coopmat": ("vulkan_ceilings", "coopmat_f16_tflops", "tflops",
                               "the fp16 cooperative-matrix peak measured through Vulkan (glsl/coopmat_peak.comp)")}


def ceiling(res: dict, machine: dict | None):
    """``(value, text)`` of the ceiling the suite's rows are read against: the value in the
    suite's metric and what it is, or None and a sentence saying why there is none (``(None,
    None)`` for a suite that names no ceiling)."""
    name = res.get("ceiling")
    if not name or name not in CEILINGS:
        return None, None
    where, field, metric, words = CEILINGS[name]
    rec = (machine or {}).get(where) or {}
    value = rec.get(field)
    if value is None or metric != res.get("metric"):
        why = rec.get("skipped") or rec.get("error") or "it was not measured in this run"
        return None, f"No fraction of {words}: {why}."
    shape = f" at {rec['shape']}" if rec.get("shape") else ""
    return value, f"{words}, {_fmt(value)} {METRIC_LABEL[metric]}{shape}"


def _fraction(x: float) -> str:
    return f"{100 * x:.1f}%" if x < 0.1 else f"{100 * x:.0f}%"


def suite_table(res: dict, machine: dict | None = None) -> str:
    """One row per (case, contender): error, time, the suite's metric, speed against the baseline
    and, where the suite names a ceiling that ``machine`` recorded, the fraction of it."""
    title = f"### {res['title']}\n\n"
    if res["status"] != "ran":
        return title + f"Skipped: {res.get('reason')}\n"
    metric = res["metric"]
    base = res.get("baseline")
    against = {c: b for c, b in (res.get("against") or {}).items() if c != b}
    peak, peak_note = ceiling(res, machine)
    head = ["case", "implementation", "error", "ms", METRIC_LABEL[metric]]
    if metric == "tbps":
        head.append("tokens/s")
    if metric == "mb":
        head = ["case", "implementation", "peak extra MB (tracemalloc)", "RSS growth MB", "output MB", "ms"]
    if base or against:
        head.append("vs baseline" if against else f"vs {base}")
    if peak:
        head.append("of peak")
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        impl = r["contender"] + (f" [{r['variant']}]" if r.get("variant") else "")
        if metric == "mb":
            cells = [r["case"], impl, _fmt(r.get("mb")), _fmt(r.get("rss_mb")), _fmt(r.get("output_mb")),
                     _fmt(r.get("ms"))]
        else:
            err = _fmt(r.get("err"), 2) if r.get("err") is not None else "—"
            ms = _fmt(r.get("ms")) if r["status"] == "ok" else "—"
            cells = [r["case"], impl, err, ms, _cell(r, metric)]
            if metric == "tbps":
                cells.append(_fmt(r.get("tokens_per_s")) if r["status"] == "ok" else "—")
        if base or against:
            cells.append(f"{r['ratio']:.2f}x" if r.get("ratio") else "—")
        if peak:
            cells.append(_fraction(r[metric] / peak) if r["status"] == "ok" and r.get(metric) else "—")
        note = r.get("note") or ""
        if _contended(r):
            note = (f"other processes took {r['others_cpu_share']:.0%} of the CPU while timed"
                    + (f"; {note}" if note else ""))
        if r.get("reps") == 1:
            note = "one timed call (each takes long)" + (f"; {note}" if note else "")
        if (r.get("calls_per_submission") or 1) > 1:
            note = f"{r['calls_per_submission']} calls per submission" + (f"; {note}" if note else "")
        if r.get("wall_ms") is not None:
            note = f"wall {_fmt(r['wall_ms'])} ms per call" + (f"; {note}" if note else "")
        if r.get("gpu_ms") is not None:
            vs = f", {r['gpu_ratio']:.2f}x by GPU time" if r.get("gpu_ratio") else ""
            note = f"GPU {_fmt(r['gpu_ms'])} ms per call (Vulkan timestamps{vs})" + (f"; {note}" if note else "")
        cells.append(note.replace("|", "/"))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    notes = "".join(f"- {n}\n" for n in res.get("notes", []))
    refs = sorted({r["ref"] for r in res["rows"] if r.get("ref")})
    clocks = sorted({r["clock"] for r in res["rows"] if r.get("clock")})
    foot = f"\nError: relative L2 against {', '.join(refs)}." if refs else ""
    if clocks:
        foot += f" Times: median, {'; '.join(clocks)}."
    if peak_note:
        foot += f" Of peak: fraction of {peak_note}." if peak else " " + peak_note
    if against:
        pairs = "; ".join(f"{c} against {b}" for c, b in against.items())
        foot += (f" Baselines: {base + ' for the other rows; ' if base else ''}{pairs}"
                 " (same case; times, so the same visible work counts alike).")
    foot = "\n" + foot.strip() + "\n" if foot else ""
    return title + "\n".join(lines) + "\n" + foot + ("\n" + notes if notes else "")


def pivot_table(res: dict) -> str:
    """Cases down, contenders across, the suite's metric in each cell (compact, for the README)."""
    metric = res["metric"]
    cols = []
    for r in res["rows"]:
        if r["contender"] not in cols and r["status"] != "skipped":
            cols.append(r["contender"])
    if not cols:
        return "_nothing ran_\n"
    cases = []
    for r in res["rows"]:
        if r["case"] not in cases:
            cases.append(r["case"])
    cell = {(r["case"], r["contender"]): r for r in res["rows"]}
    unmeasured = [c for c in cases if all(r["status"] == "skipped" for r in res["rows"] if r["case"] == c)]
    cases = [c for c in cases if c not in unmeasured]
    head = ["case"] + cols
    lines = [f"{METRIC_LABEL[metric]} (higher is better)" if metric in ("tflops", "gflops", "tbps", "tokens_per_s")
             else f"{METRIC_LABEL[metric]} (lower is better)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        vals = [(_cell(cell[(c, k)], metric) if (c, k) in cell else "—") for k in cols]
        lines.append("| " + " | ".join([c] + vals) + " |")
    if unmeasured:
        lines += ["", f"Not measured in this run ({_skip_reason(res, unmeasured[0])}): " + ", ".join(unmeasured) + "."]
    if any(_contended(r) for r in res["rows"] if r["status"] == "ok"):
        lines += ["", "\\* timed while other processes took over 20% of the machine's CPU (a shared "
                  "machine): read as a lower bound."]
    return "\n".join(lines) + "\n"


def _skip_reason(res, case):
    return next((r.get("note") or "skipped" for r in res["rows"] if r["case"] == case), "skipped")


# What each contender label means, for readers of the README.
LEGEND = {
    "aule:triton": "aule.flash_attention(..., backend='triton') on CUDA tensors",
    "aule:triton kv-expanded": "the same on K/V repeated to every query head beforehand",
    "aule:triton full-causal": "the same inputs with full causal attention (the window's baseline)",
    "aule:vulkan": "aule.flash_attention(..., backend='vulkan') on NumPy arrays (uploads and downloads included)",
    "aule:vulkan resident": "Vulkan on GpuTensors uploaded beforehand; GPU time from Vulkan timestamps, wall time in the full tables",
    "aule:numpy": "aule.flash_attention(..., backend='numpy') on NumPy arrays",
    "aule:auto": "aule.flash_attention with automatic routing",
    "aule-paged:triton": "aule.flash_attention_paged (the public call: the kernel bounds-checks the tables, no read-back)",
    "aule-paged:triton launcher": "the Triton paged kernel launcher a serving loop calls after validating once",
    "aule-paged:vulkan resident": "the Vulkan paged shader on a GpuTensor cache; GPU time from Vulkan timestamps",
    "torch-sdpa": "torch's scaled_dot_product_attention with its own backend choice",
    "sdpa-flash": "SDPA forced to its flash backend (sdpa_kernel); -cudnn, -efficient, -math likewise",
    "sdpa-efficient+mask": "SDPA's efficient backend with the window as an explicit boolean mask",
    "aule-paged:triton graph": "aule.flash_attention_paged with max_context_len, captured in a CUDA graph and "
                               "timed as graph.replay()",
    "aule:triton softcap": "aule:triton with softcap=2 (a cap that bites on these scores); -sinks, -alibi "
                           "likewise with float32 [Hq] sinks or ALiBi slopes on the device",
    "aule:triton padded": "aule:triton with a boolean key-padding attn_mask [B, 1, 1, S] (FLOPs of visible pairs)",
    "aule:triton varlen": "aule.flash_attention_varlen on packed [total, H, D] CUDA tensors",
    "aule:triton unpadded": "the same visible work as one plain aule:triton call per sequence, back to back",
    "aule:vulkan resident padded": "aule:vulkan resident with the key-padding attn_mask",
    "aule:vulkan resident unpadded": "one aule:vulkan resident call per sequence, each timed in batched "
                                     "submissions; GPU times summed",
    "aule:vulkan resident unpadded, mask's variant": "the same, forced to the shader variant the padded call runs",
    "aule:vulkan varlen": "aule.flash_attention_varlen(..., backend='vulkan') on NumPy arrays: wall clock, "
                          "uploads included",
    "aule:vulkan unpadded": "one aule:vulkan call per sequence on NumPy arrays, wall clock",
    "hf:sdpa default": "the Hugging Face model on torch's SDPA with torch's own backend choice (no aule)",
    "hf:aule installed": "the same model inside aule.installed(): SDPA calls go to aule where it was "
                         "measured faster (aule.speed_table), else to torch's own SDPA",
    "hf:sdpa-flash": "the same model with SDPA forced to its flash backend",
}


def evaluate_targets(results: dict, targets: dict | None = None) -> list[dict]:
    """Each issue target with what was measured and whether it was met. ``targets`` maps suite
    names to Target tuples (default: those declared in :mod:`aule.bench.suites`)."""
    if targets is None:
        targets = {n: s.targets for n, s in SUITE_BY_NAME.items()}
    out = []
    m = results.get("machine", {})
    vk_dev = ((m.get("vulkan") or {}).get("device") or {})
    has_gpu = bool(m.get("gpu")) or (isinstance(vk_dev, dict) and vk_dev.get("type") not in (None, "cpu"))
    for name, res in results.get("suites", {}).items():
        if res.get("status") != "ran":
            continue
        for t in targets.get(name, ()):
            if t.gpu_only and not has_gpu:
                continue
            if t.cpu_vulkan_only and vk_dev.get("type") != "cpu":
                continue  # a GPU's Vulkan served these rows: they say nothing about lavapipe
            metric = t.metric or res["metric"]
            rows = [r for r in res["rows"] if r["contender"] == t.contender and matches(r["params"], t.where)]
            checked = []
            for r in rows:
                if r["status"] != "ok":
                    checked.append((r["case"], None, r["status"]))
                    continue
                if t.baseline:
                    base = next((b for b in res["rows"] if b["case"] == r["case"]
                                 and b["contender"] == t.baseline and b["status"] == "ok"), None)
                    val = base["ms"] / r["ms"] if base else None
                elif metric == "us":
                    val = r["ms"] * 1e3
                else:
                    val = r.get(metric)
                checked.append((r["case"], val, "ok"))
            vals = [v for _, v, _ in checked if v is not None]
            if not checked or not vals:
                verdict = "not measured"
            elif len(vals) < len(checked):
                verdict = "partly measured"
            else:
                worst = max(vals) if t.at_most else min(vals)
                ok = worst <= t.value if t.at_most else worst >= t.value
                verdict = "met" if ok else "missed"
            if vals:
                worst = max(vals) if t.at_most else min(vals)
                unit = "x" if t.baseline else f" {METRIC_LABEL.get(metric, metric)}"
                need = f"{'<=' if t.at_most else '>='} {t.value:g}{unit}"
                measured = f"worst {_fmt(worst)}{unit} over {len(vals)} case(s) (need {need})"
            else:
                measured = ", ".join(sorted({s for _, _, s in checked})) or "no rows"
            out.append({"suite": name, "target": t.text, "measured": measured, "verdict": verdict})
    return out


def targets_table(results: dict) -> str:
    ts = evaluate_targets(results)
    if not ts:
        return ""
    lines = ["| target | measured | verdict |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['measured']} | {t['verdict']} |" for t in ts]
    return "\n".join(lines) + "\n"


def full_markdown(results: dict) -> str:
    m = results["machine"]
    parts = [f"## aule benchmark: {m['name']}\n", machine_mod.describe(m) + "\n",
             f"Run {m['date']}; load average at start {m.get('loadavg_start')}.\n"]
    tt = targets_table(results)
    if tt:
        parts += ["### Targets from the issues\n", tt]
    for name, res in results["suites"].items():
        parts.append(suite_table(res, suite_machine(results, name)))
    return "\n".join(parts)


def suite_machine(results: dict, name: str) -> dict:
    """The machine record of the run that measured suite ``name`` (its ceilings are the ones
    its rows were read against)."""
    return (results.get("suite_machines") or {}).get(name) or results.get("machine") or {}


# --------------------------------------------------------------------------------------------
# Files


def merge_results(old: dict, new: dict) -> dict:
    """``new`` with the suites of ``old`` (same machine) that ``new`` did not run; each suite keeps
    the machine description of the run that measured it under ``suite_machines``."""
    suites = dict(old.get("suites", {}))
    suites.update(new["suites"])
    machines = dict(old.get("suite_machines", {}))
    machines.update({n: new["machine"] for n in new["suites"]})
    top = new["machine"]
    # A run of suites that need no GPU ceilings (Vulkan, CPU) keeps the card's measured ones, which
    # the other suites' fractions were computed against.
    old_ceilings = (old.get("machine", {}).get("gpu") or {}).get("ceilings")
    if top.get("gpu") and "ceilings" not in top["gpu"] and old_ceilings:
        top = {**top, "gpu": {**top["gpu"], "ceilings": old_ceilings,
                              "ceilings_date": old["machine"].get("date")}}
    old_vk = old.get("machine", {}).get("vulkan_ceilings")
    if "vulkan_ceilings" not in top and old_vk:
        top = {**top, "vulkan_ceilings": {**old_vk, "date": old_vk.get("date", old["machine"].get("date"))}}
    return {**new, "machine": top, "suites": suites, "suite_machines": machines}


def merge_into(path: str, results: dict) -> dict:
    """Keep suites of an earlier run of the same machine that this run did not repeat."""
    old = None
    if os.path.exists(path):
        try:
            with open(path) as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
    if old and old.get("machine", {}).get("name") == results["machine"]["name"]:
        # A checkpoint of this very run may already be there; its suites are replaced below.
        return merge_results(old, results)
    return {**results, "suite_machines": {n: results["machine"] for n in results["suites"]}}


def write_json(path: str, results: dict):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")


def _json_default(o):
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, tuple):
        return list(o)
    return str(o)


def load(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# --------------------------------------------------------------------------------------------
# Plots


def plots(results: dict, outdir: str, stem: str | None = None) -> list[str]:
    """PNG files for the suites that ran: TFLOP/s against sequence length, decode TB/s against
    context, window speed-up, and the CPU comparison, named ``<stem>-<suite>.png`` (``stem``: the
    results file's name, by default the machine's). Returns their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    name = results["machine"]["name"]
    stem = stem or name
    made = []
    suites = results["suites"]
    for key in ("dense", "dense_bwd"):
        res = suites.get(key)
        if res and res["status"] == "ran" and _any_ok(res):
            made.append(_plot_dense(plt, res, os.path.join(outdir, f"{stem}-{key}.png"), name))
    res = suites.get("vulkan")
    if res and res["status"] == "ran" and _any_ok(res):
        # The lines are causal square problems by sequence length; the other rows are in the tables.
        square = {**res, "rows": [r for r in res["rows"] if r["params"].get("causal")
                                  and r["params"].get("Sk", r["params"]["S"]) == r["params"]["S"]]}
        made.append(_plot_lines(plt, square, os.path.join(outdir, f"{stem}-vulkan.png"), name, "S", "tflops",
                                ("dtype", "D"), lambda k: f"{k[0]}, hd {k[1]}", "sequence length", "TFLOP/s"))
    res = suites.get("decode")
    if res and res["status"] == "ran" and _any_ok(res):
        made.append(_plot_decode(plt, res, os.path.join(outdir, f"{stem}-decode.png"), name))
    res = suites.get("window")
    if res and res["status"] == "ran" and _any_ok(res):
        made.append(_plot_window(plt, res, os.path.join(outdir, f"{stem}-window.png"), name))
    for key in ("cpu", "gqa", "overhead"):
        res = suites.get(key)
        if res and res["status"] == "ran" and _any_ok(res):
            made.append(_plot_bars(plt, res, os.path.join(outdir, f"{stem}-{key}.png"), name))
    return [m for m in made if m]


def _any_ok(res):
    return any(r["status"] == "ok" for r in res["rows"])


def _series(rows, x_key, y_key, group_keys):
    """{(group..., contender): [(x, y)]} over ok rows."""
    out = {}
    for r in rows:
        if r["status"] != "ok" or r.get(y_key) is None:
            continue
        key = tuple(r["params"].get(k) for k in group_keys)
        out.setdefault(key, {}).setdefault(r["contender"], []).append((r["params"][x_key], r[y_key]))
    return out


def _save(plt, fig, path):
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_lines(plt, res, path, name, x_key, y_key, group_keys, panel_title, xlabel, ylabel):
    """One panel per group of cases, one line per contender of ``y_key`` against ``x_key``."""
    groups = _series(res["rows"], x_key, y_key, group_keys)
    keys = sorted(groups, key=lambda k: tuple((v is False, v) for v in k))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for contender, pts in sorted(groups[key].items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=contender,
                    linewidth=2.5 if contender.startswith("aule") else 1.2)
        ax.set_xscale("log", base=2)
        ax.set_title(panel_title(key))
        ax.set_xlabel(xlabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{res['title']} — {name}", fontsize=9)
    return _save(plt, fig, path)


def _plot_dense(plt, res, path, name):
    return _plot_lines(plt, res, path, name, "S", "tflops", ("D", "causal"),
                       lambda k: f"hd {k[0]}, {'causal' if k[1] else 'non-causal'}", "sequence length", "TFLOP/s")


def _plot_decode(plt, res, path, name):
    return _plot_lines(plt, res, path, name, "ctx", "tbps", ("B",), lambda k: f"batch {k[0]}",
                       "context length", "KV cache read, TB/s")


def _plot_window(plt, res, path, name):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    base = res.get("baseline")
    for contender in sorted({r["contender"] for r in res["rows"]} - {base}):
        by_w = {}
        for r in res["rows"]:
            if r["contender"] == contender and r.get("ratio"):
                by_w.setdefault(r["params"]["window"], []).append((r["params"]["S"], r["ratio"]))
        for w, pts in sorted(by_w.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{contender}, window {w}")
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("sequence length")
    ax.set_ylabel(f"speed-up over {base}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{res['name']} — {name}", fontsize=9)
    return _save(plt, fig, path)


def _plot_bars(plt, res, path, name):
    metric = res["metric"]
    cases = []
    for r in res["rows"]:
        if r["case"] not in cases:
            cases.append(r["case"])
    contenders = []
    for r in res["rows"]:
        if r["contender"] not in contenders and r["status"] == "ok":
            contenders.append(r["contender"])
    vals = {(r["case"], r["contender"]): r.get(metric) for r in res["rows"] if r["status"] == "ok"}
    fig, ax = plt.subplots(figsize=(max(5.5, 1.8 * len(cases)), 3.8))
    width = 0.8 / max(1, len(contenders))
    for j, c in enumerate(contenders):
        xs = [i + j * width for i in range(len(cases))]
        ys = [vals.get((case, c)) or 0 for case in cases]
        ax.bar(xs, ys, width, label=c)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels(cases, fontsize=7, rotation=10)
    ax.set_ylabel(METRIC_LABEL[metric])
    if metric == "us_per_call":
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"{res['name']} — {name}", fontsize=9)
    return _save(plt, fig, path)


# --------------------------------------------------------------------------------------------
# README


def readme_section(result_files: list[str], readme_dir: str) -> str:
    """The README's Performance section, generated from results files (GPU machines first)."""
    loaded = []
    for path in result_files:
        try:
            loaded.append((path, load(path)))
        except (OSError, ValueError):
            continue
    loaded.sort(key=lambda pr: (pr[1]["machine"].get("gpu") is None, pr[1]["machine"]["name"]))
    out = [README_BEGIN, "## Performance", "",
           "Generated by `aule bench` from the results files under `results/` "
           "(regenerate with `aule bench --report results/*.json --readme README.md`). "
           "Every number below was measured in one process per machine, aule and PyTorch on the same "
           "inputs, after a correctness check against a reference. FLOPs count 4·B·H·Sq·Sk·D "
           "(halved for causal, visible pairs only for windows, ×3.5 for forward+backward); decode "
           "counts the bytes of K/V cache read.", ""]
    if not loaded:
        out += ["No benchmark results have been recorded yet.", ""]
    for path, res in loaded:
        m = res["machine"]
        rel = os.path.relpath(path, readme_dir)
        md = os.path.splitext(rel)[0] + ".md"
        out += [f"### {m.get('gpu', {}).get('name') if m.get('gpu') else m['cpu']['model'] + ' CPU'}", "",
                machine_mod.describe(m) + f". Run {m['date']}; load average at start "
                f"{(m.get('loadavg_start') or ['?'])[0]}.", "",
                f"Full tables: [{md}]({md}); raw data: [{rel}]({rel}).", ""]
        tt = targets_table(res)
        if tt:
            out += ["Targets from the issues:", "", tt]
        for sname, s in res["suites"].items():
            if s.get("status") != "ran":
                continue
            if not _any_ok(s):
                continue
            out += [f"**{s['title']}**", "", pivot_table(s)]
            peak, peak_note = ceiling(s, suite_machine(res, sname))
            if peak_note:
                out += [f"Measured ceiling: {peak_note}; the full tables give each row's fraction of it."
                        if peak else peak_note, ""]
            img = os.path.join(os.path.dirname(rel), f"{m['name']}-{sname}.png")
            if os.path.exists(os.path.join(readme_dir, img)):
                out += [f"![{sname}]({img})", ""]
        seen = sorted({r["contender"] for s in res["suites"].values() if s.get("status") == "ran"
                       for r in s.get("rows", []) if r["status"] == "ok"})
        legend = [f"- `{c}`: {LEGEND[c]}" for c in seen if c in LEGEND]
        if legend:
            out += ["Rows:", ""] + legend + [""]
        skipped = [f"{s['title']}: {s.get('reason')}" for s in res["suites"].values() if s.get("status") != "ran"]
        if skipped:
            out += ["Not run on this machine:", ""] + [f"- {x}" for x in skipped] + [""]
    out.append(README_END)
    return "\n".join(out) + "\n"


def update_readme(readme_path: str, section: str) -> bool:
    """Replace the text between the perf markers (appending the section when they are absent).
    Returns whether the file changed. Nothing outside the markers is touched."""
    text = open(readme_path).read() if os.path.exists(readme_path) else ""
    if README_BEGIN in text and README_END in text:
        a = text.index(README_BEGIN)
        b = text.index(README_END) + len(README_END)
        tail = text[b:]
        if tail.startswith("\n"):
            tail = tail[1:]
        new = text[:a] + section + tail
    else:
        new = text + ("" if text.endswith("\n") or not text else "\n") + "\n" + section
    if new != text:
        with open(readme_path, "w") as f:
            f.write(new)
        return True
    return False

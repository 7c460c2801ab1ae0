"""``aule bench``: aule against PyTorch SDPA on this machine, checked, timed and written down.

``main(argv)`` is the command (``aule bench`` and ``python benchmarks/run.py`` call it). It
detects the machine, runs the suites of :mod:`aule.bench.suites` that apply, prints a markdown
table and writes ``<out>/<machine>.json``, ``<out>/<machine>.md`` and PNG plots.

A ``--quick`` run writes ``<out>/<machine>-quick.*`` instead: its few cases never replace or drop
the rows of a full run. A full run of some suites merges into the machine's file, replacing those
suites and keeping the others as they were.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

from .suites import SUITES

__all__ = ["main", "run", "save", "results_stem"]

QUICK_SUFFIX = "-quick"


def _parser():
    ap = argparse.ArgumentParser(
        prog="aule bench",
        description="Benchmark aule against PyTorch SDPA on this machine (correctness first, then speed).")
    ap.add_argument("--quick", action="store_true",
                    help="a small subset (under a minute on a CPU), written to <machine>-quick.*")
    ap.add_argument("--suite", action="append", default=[], metavar="NAMES",
                    help="comma-separated suites to run (default: all that apply): "
                         + ", ".join(s.name for s in SUITES))
    ap.add_argument("--out", default="results", help="output folder (default: ./results)")
    ap.add_argument("--name", default=None, help="machine name for the output files (default: detected)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new cases after this many seconds (the rest are marked skipped)")
    ap.add_argument("--fresh", action="store_true",
                    help="replace the machine's results file instead of merging suites into it")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    ap.add_argument("--list", action="store_true", help="list the suites and their cases, then exit")
    ap.add_argument("--report", nargs="+", metavar="JSON", default=None,
                    help="run nothing: re-render tables and plots from these results files")
    ap.add_argument("--readme", metavar="PATH", default=None,
                    help="also regenerate the Performance section of this README from the results files "
                         "in --out (or those given to --report)")
    return ap


def _suite_names(values):
    names = []
    for v in values:
        names += [n.strip() for n in v.split(",") if n.strip()]
    return names


def run(suites=None, quick=False, budget_s=None, progress=True, name=None, checkpoint_dir=None,
        overhead_calls=None) -> dict:
    """Run suites (names; all when None) and return the results dictionary. With
    ``checkpoint_dir``, the machine's JSON there is rewritten after every case, so a run that is
    killed still leaves what it measured. ``overhead_calls``: calls per timed round of the
    overhead suite (default: as many as fill 50 ms)."""
    from . import machine, report, runner
    from .suites import select

    chosen = select(list(suites or []), quick)
    # The Vulkan peak is measured on quick runs too: the Vulkan suite's rows are read against it.
    info = machine.detect(ceilings=any(s.needs == "cuda" for s in chosen) and not quick,
                          vulkan_ceiling=any(s.ceiling == "vulkan_coopmat" for s in chosen))
    if name:
        info["name"] = machine.slug(name)
    on_progress = None
    if checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        path = os.path.join(checkpoint_dir, results_stem(info["name"], quick) + ".json")
        previous = report.load(path) if os.path.exists(path) else None

        def on_progress(partial):
            merged = {"machine": info, "suites": partial}
            if previous and previous.get("machine", {}).get("name") == info["name"]:
                merged = report.merge_results(previous, merged)
            report.write_json(path, merged)

    results = runner.Runner(quick=quick, budget_s=budget_s, progress=progress,
                            overhead_calls=overhead_calls).run(chosen, on_progress)
    info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    ops = sys.modules.get("aule.backends.triton.ops")
    if ops is not None and hasattr(ops, "tuned_choices"):
        try:  # the tiles Triton's autotuner chose, per kernel and shape bucket
            info["triton_tuned"] = ops.tuned_choices()
        except Exception as exc:
            info["triton_tuned"] = {"error": f"{type(exc).__name__}: {exc}"}
    return {"machine": info, "suites": results}


def results_stem(machine_name: str, quick: bool) -> str:
    """The file name (no extension) a run's results go to: quick runs have files of their own."""
    return machine_name + (QUICK_SUFFIX if quick else "")


def is_quick(results: dict) -> bool:
    return any(s.get("quick") for s in results.get("suites", {}).values())


def _render(results, out_dir, plots_wanted, stem):
    from . import report

    return report.plots(results, out_dir, stem) if plots_wanted else []


def save(results: dict, out_dir: str, fresh: bool = False, plots: bool = True) -> str:
    """Print this run's tables; write ``<out>/<machine>.json`` (``<machine>-quick.json`` for a quick
    run; merged with earlier suites of the same file unless ``fresh``), the full markdown beside it
    and the plots. Returns the JSON path."""
    from . import report

    os.makedirs(out_dir, exist_ok=True)
    stem = results_stem(results["machine"]["name"], is_quick(results))
    path = os.path.join(out_dir, stem + ".json")
    merged = results if fresh else report.merge_into(path, results)
    report.write_json(path, merged)
    md_path = os.path.splitext(path)[0] + ".md"
    with open(md_path, "w") as f:
        f.write(report.full_markdown(merged))
    made = _render(merged, out_dir, plots, stem)
    print(report.full_markdown(results))
    print(f"\nwrote {path}, {md_path}" + (f" and {len(made)} plots" if made else ""))
    return path


def main(argv=None) -> int:
    from . import report

    args = _parser().parse_args(argv)
    if args.list:
        from .suites import case_label

        for s in SUITES:
            print(f"{s.name}: {s.title} [{s.kind}, needs {s.needs}, metric {s.metric}]")
            print(f"  contenders: {', '.join(s.contenders)}; baseline {s.baseline}")
            for i, p in enumerate(s.cases):
                print(f"  {'*' if i in s.quick else ' '} {case_label(p)}")
        print("(* = in --quick)")
        return 0
    try:
        names = _suite_names(args.suite)
        from .suites import select

        select(names, args.quick)  # unknown names fail before any work
    except ValueError as exc:
        print(f"aule bench: {exc}", file=sys.stderr)
        return 2
    if args.report:
        files = args.report
        for path in files:
            res = report.load(path)
            md = report.full_markdown(res)
            with open(os.path.splitext(path)[0] + ".md", "w") as f:
                f.write(md)
            print(md)
            stem = os.path.splitext(os.path.basename(path))[0]
            _render(res, os.path.dirname(os.path.abspath(path)), not args.no_plots, stem)
    else:
        results = run(names, quick=args.quick, budget_s=args.budget_s, progress=not args.no_progress,
                      name=args.name, checkpoint_dir=None if args.fresh else args.out)
        save(results, args.out, fresh=args.fresh, plots=not args.no_plots)
        # The README shows full runs only; a quick file enters it only when named to --report.
        files = sorted(f for f in glob.glob(os.path.join(args.out, "*.json"))
                       if not f.endswith(QUICK_SUFFIX + ".json"))
    if args.readme:
        section = report.readme_section(files, os.path.dirname(os.path.abspath(args.readme)))
        changed = report.update_readme(args.readme, section)
        print(f"{'updated' if changed else 'unchanged'}: {args.readme} (Performance section)")
    return 0

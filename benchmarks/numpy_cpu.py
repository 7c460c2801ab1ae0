"""Issue 2's benchmark: the NumPy backend against torch's CPU SDPA, and its peak extra memory.

fp32, batch 1, 8 heads, seq 1024, head_dim 64, causal and batch 1, 32 heads, seq 4096, head_dim
128, causal (target: NumPy within 2x of torch's time); at seq 16384 the NumPy backend's peak extra
memory, measured in a subprocess that never imports torch (target: under 256 MB).

These are the ``cpu`` and ``memory`` suites of ``aule bench`` (the ``cpu`` suite also runs the
Vulkan backend where one is available); this script runs them and prints the verdicts.
``python benchmarks/numpy_cpu.py [--out results] [--no-plots]``
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aule.bench import report, run, save  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    results = run(["cpu", "memory"])
    save(results, args.out, plots=not args.no_plots)
    print("\nIssue 2 targets:")
    for t in report.evaluate_targets(results):
        print(f"  {t['verdict']:>15}: {t['target']} ({t['measured']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

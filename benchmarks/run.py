"""Run aule's benchmark suites from a checkout: ``python benchmarks/run.py [--quick] [--suite ...]``.

The same command as ``aule bench``; see ``--help``. The other scripts here are named entries into
the same suites through :func:`entry`; this file also makes the checkout importable for them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aule.bench import main  # noqa: E402


def entry(suites, argv=None, flag_suites=None):
    """``aule bench --suite <suites>`` with the caller's flags. The scripts' historical ``--json
    FILE`` and ``--out FILE.json`` name the folder the results go to (as ``<machine>.json``);
    ``flag_suites`` maps a historical switch to the suites it adds (``--tune``: the tuning sweep).
    Flags without a meaning here reach ``aule bench``, which refuses them by name."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--json", default=None)
    ap.add_argument("--out", default=None)
    for flag in flag_suites or {}:
        ap.add_argument(flag, action="store_true")
    known, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    chosen = [suites]
    for flag, more in (flag_suites or {}).items():
        if getattr(known, flag.lstrip("-").replace("-", "_")):
            chosen.append(more)
    out = known.out or known.json
    if out and out.endswith(".json"):
        out = os.path.dirname(out) or "."
    return main(["--suite", ",".join(chosen)] + (["--out", out] if out else []) + rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

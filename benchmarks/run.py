"""Run aule's benchmark suites from a checkout: ``python benchmarks/run.py [--quick] [--suite ...]``.

The same command as ``aule bench``; see ``--help``. This file only makes the checkout importable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aule.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

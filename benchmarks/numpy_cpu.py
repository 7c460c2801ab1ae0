"""Issue 2's benchmark: the NumPy backend against torch's CPU SDPA (and Vulkan where present), and
its peak extra memory in a torch-free subprocess: the ``cpu`` and ``memory`` suites of ``aule bench``,
whose output ends with the issue's targets and their verdicts.

    python benchmarks/numpy_cpu.py [--out results] [--no-plots]
"""
import sys

from run import entry

if __name__ == "__main__":
    sys.exit(entry("cpu,memory"))

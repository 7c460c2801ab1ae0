"""Vulkan attention beside PyTorch SDPA, every shader variant forced in turn (tiled ones at several
tile shapes): ``cpu`` runs the ``vulkan_variants_cpu`` suite (B1 H8 S1024 D64, lavapipe-class);
``gpu`` the ``vulkan_variants``, ``vulkan`` and ``overhead`` suites (GpuTensor inputs, Vulkan
timestamps, per-call overhead).

    python benchmarks/vulkan_attention.py cpu|gpu [--out results] [aule bench flags]
"""
import sys

from run import entry

SUITES = {"cpu": "vulkan_variants_cpu", "gpu": "vulkan_variants,vulkan,overhead"}

if __name__ == "__main__":
    args = sys.argv[1:]
    kind = args.pop(0) if args and args[0] in SUITES else "cpu"
    sys.exit(entry(SUITES[kind], args))

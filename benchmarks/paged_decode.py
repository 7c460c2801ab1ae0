"""Paged decode against PyTorch SDPA on the contiguous cache: the ``decode`` suite of ``aule bench``
(Triton launcher and public call, the Vulkan GpuTensor cache, every SDPA backend); ``--tune`` adds
``decode_tune``, the kernel configurations around the automatic choice. Earlier measurements and
the decisions they led to: ``results/notes/paged_decode_NOTES.md``.

    python benchmarks/paged_decode.py [--tune] [--out results] [aule bench flags]
"""
import sys

from run import entry

if __name__ == "__main__":
    sys.exit(entry("decode", flag_suites={"--tune": "decode_tune"}))

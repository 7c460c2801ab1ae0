"""aule's Triton attention against PyTorch SDPA (flash, cuDNN, efficient, math): the ``dense``,
``dense_bwd``, ``gqa`` and ``window`` suites of ``aule bench`` (bf16, 16k tokens per batch, model dim
2048; forward and forward+backward; GQA 64/8 against K/V expanded; window 256 against full causal).

    python benchmarks/triton_attention.py [--quick] [--out results] [aule bench flags]
"""
import sys

from run import entry

if __name__ == "__main__":
    sys.exit(entry("dense,dense_bwd,gqa,window"))

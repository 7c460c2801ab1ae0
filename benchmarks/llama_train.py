"""A Llama-style model (Hugging Face LlamaForCausalLM, 8 layers, hidden 2048, 32/8 heads, seq 4096,
batch 2, bf16), forward and training step, with ``aule.install()`` against SDPA's flash backend:
the ``llama_train`` suite of ``aule bench`` (SDPA-flash first and last, for the drift between
identical runs).

    python benchmarks/llama_train.py [--out results] [aule bench flags]
"""
import sys

from run import entry

if __name__ == "__main__":
    sys.exit(entry("llama_train"))

"""Peak extra memory of the NumPy backend, measured in a process that never imports torch.

Run as ``python -m aule.bench.memprobe --seq 16384`` by the ``memory`` suite; prints one JSON
object. Two measures: tracemalloc's peak of memory allocated during the call (NumPy reports its
buffers to tracemalloc), and the growth of the process's peak RSS over its RSS just before the
call (an upper bound: it also counts allocator slack and pages of the BLAS library's buffers).

The RSS peak is the kernel's VmHWM of this process, reset just before the call through
``/proc/self/clear_refs``; ``getrusage``'s ``ru_maxrss`` would not do, because Linux carries it
over from the parent (a large process with torch loaded) across ``exec``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc


def _status_kb(field: str):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def probe(batch, heads_q, heads_kv, seq, head_dim, causal) -> dict:
    import numpy as np

    import aule

    rng = np.random.default_rng(0)
    # Drawn directly in float32 so no float64 temporary raises the RSS peak before the call.
    q = rng.standard_normal((batch, heads_q, seq, head_dim), dtype=np.float32)
    k = rng.standard_normal((batch, heads_kv, seq, head_dim), dtype=np.float32)
    v = rng.standard_normal((batch, heads_kv, seq, head_dim), dtype=np.float32)
    aule.flash_attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], causal=causal, backend="numpy")
    inputs = q.nbytes + k.nbytes + v.nbytes
    reset = _reset_peak_rss()
    rss_before = _status_kb("VmRSS")
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    t0 = time.perf_counter()
    out = aule.flash_attention(q, k, v, causal=causal, backend="numpy")
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _status_kb("VmHWM")
    result = {
        "seq": seq,
        "inputs_mb": inputs / 2**20,
        "output_mb": out.nbytes / 2**20,
        "peak_extra_mb": (peak - base) / 2**20,
        "rss_peak_growth_mb": (None if rss_before is None or hwm is None or not reset
                               else max(0, hwm - rss_before) / 2**20),
        "seconds_traced": seconds,
        "finite": bool(np.isfinite(out).all()),
        "torch_imported": "torch" in sys.modules,
    }
    return result


def in_subprocess(p: dict) -> dict:
    """Run :func:`probe` on case ``p`` in a fresh interpreter (so torch, loaded by the parent,
    is absent) and return its JSON object."""
    import subprocess

    cmd = [sys.executable, "-m", "aule.bench.memprobe", "--batch", str(p["B"]),
           "--heads-q", str(p["Hq"]), "--heads-kv", str(p["Hkv"]), "--seq", str(p["S"]),
           "--head-dim", str(p["D"])] + ([] if p["causal"] else ["--no-causal"])
    env = dict(os.environ)
    # The child must find this aule even when it is run from a checkout, not installed.
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = pkg_root + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env, check=False)
    if r.returncode != 0:
        raise RuntimeError((r.stderr.strip().splitlines() or ["no output"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads-q", type=int, default=8)
    ap.add_argument("--heads-kv", type=int, default=8)
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--no-causal", action="store_true")
    a = ap.parse_args(argv)
    print(json.dumps(probe(a.batch, a.heads_q, a.heads_kv, a.seq, a.head_dim, not a.no_causal)))


if __name__ == "__main__":
    main()

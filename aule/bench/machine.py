"""What machine a benchmark ran on: CPU, GPU, driver, Vulkan device, library versions."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
import sys


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _run(cmd, timeout=10):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def gpu_info() -> dict | None:
    """The CUDA/ROCm device torch sees, or None. Never initialises CUDA unless torch is importable."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    info = {
        "name": torch.cuda.get_device_name(0),
        "count": torch.cuda.device_count(),
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
    }
    l2 = getattr(props, "L2_cache_size", None)
    if l2:
        info["l2_mib"] = round(l2 / 2**20, 1)
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if smi:
        info["driver"] = smi.splitlines()[0].strip()
    try:
        info["cudnn"] = torch.backends.cudnn.version()
    except Exception:  # cudnn absent on some builds
        info["cudnn"] = None
    return info


def gpu_ceilings() -> dict:
    """The card's two measured ceilings, for reading the rows against: a 1 GiB device-to-device
    copy (bytes read + written per second) and an 8192^3 bf16 matrix product (FLOP/s)."""
    import torch

    from .timing import cuda_time

    out = {}
    src = torch.randn(2**28, device="cuda")  # 1 GiB of float32
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), 10, 50)
    out["copy_tbps"] = 2 * src.numel() * 4 / (t["ms"] * 1e-3) / 1e12
    del src, dst
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = cuda_time(lambda: a @ b, 10, 50)
    out["matmul_bf16_tflops"] = 2 * 8192**3 / (t["ms"] * 1e-3) / 1e12
    del a, b
    torch.cuda.empty_cache()
    return out


# One timed dispatch of the matrix-core peak loop: long against the host's gap between submissions.
PEAK_DISPATCH_MS = 50.0


def vulkan_ceilings() -> dict:
    """The Vulkan device's matrix-core ceiling: glsl/coopmat_peak.comp (fp16 A/B, fp32
    accumulators, registers only) in the matrix shape the coopmat attention variant uses at
    head_dim 128, timed by Vulkan timestamps after at least timing.DEVICE_WARMUP_S of sustained
    work. ``{"skipped": reason}`` where the device cannot run it, ``{"error": ...}`` when the
    loop's results do not account for its work."""
    from ..errors import UnsupportedError
    from .timing import reported_time, spin_up

    try:
        from ..backends.vulkan import runtime
        from ..backends.vulkan.timed import PEAK_ACCUMULATORS, PEAK_GROUPS, PEAK_SUBGROUPS, CoopMatPeak, peak_shape

        ctx = runtime.context()
        shape = peak_shape(ctx.info)
    except UnsupportedError as exc:
        return {"skipped": str(exc)}
    except Exception as exc:  # no binding, no loader, no device: nothing to measure
        return {"skipped": f"no Vulkan device: {type(exc).__name__}: {exc}"}

    def calibrated(chunks, warm_s):
        """Chunks for a PEAK_DISPATCH_MS dispatch, from the rate of a dispatch of ``chunks``
        after ``warm_s`` seconds of them (the clocks rise under sustained work)."""
        probe = CoopMatPeak(ctx, chunks, shape)
        try:
            ms = spin_up(probe.ms, warm_s)
        finally:
            probe.close()
        return None if ms is None else max(chunks, round(chunks * PEAK_DISPATCH_MS / max(ms, 1e-3)))

    first = calibrated(PEAK_GROUPS, 0.0)
    if first is None:
        return {"skipped": f"{ctx.info.name} reports no timestamps on its compute queue"}
    peak = CoopMatPeak(ctx, calibrated(first, 0.25), shape)
    try:
        t = reported_time(peak.ms, max_s=10.0)
        why = peak.verify()
    finally:
        peak.close()
    if why:
        return {"error": why}
    return {"coopmat_f16_tflops": peak.flops / (t["ms"] * 1e-3) / 1e12,
            "coopmat_f16_tflops_p20_p80": [peak.flops / (t["ms_p80"] * 1e-3) / 1e12,
                                           peak.flops / (t["ms_p20"] * 1e-3) / 1e12],
            "shape": "x".join(map(str, shape)), "ms_per_dispatch": t["ms"], "reps": t["reps"],
            "chunks": peak.chunks, "workgroups": PEAK_GROUPS, "subgroups_per_workgroup": PEAK_SUBGROUPS,
            "accumulators_per_subgroup": PEAK_ACCUMULATORS, "device": ctx.info.name}


def vulkan_info() -> dict:
    """What aule's own Vulkan backend reports (available, reason, device details)."""
    import aule

    try:
        return aule.backend_info().get("vulkan", {})
    except Exception as exc:  # detection must never stop a benchmark
        return {"available": False, "reason": f"{type(exc).__name__}: {exc}"}


def _git_commit():
    # A copy of the tree on a remote benchmark machine is told its commit: the copy's own .git, if
    # any, may be older than the files (seen: a run of 00a2657 recorded 664aaef).
    told = os.environ.get("AULE_BENCH_COMMIT")
    if told:
        return told
    here = os.path.dirname(os.path.abspath(__file__))
    out = _run(["git", "-C", here, "rev-parse", "--short", "HEAD"], timeout=5)
    if out:
        dirty = _run(["git", "-C", here, "status", "--porcelain", "--", "."], timeout=5)
        return out + ("+dirty" if dirty else "")
    return None


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def machine_name(info: dict) -> str:
    """A file-name-safe name: the GPU model where torch sees one, else the CPU model and cores."""
    gpu = info.get("gpu")
    if gpu:
        return slug(gpu["name"])
    return slug(f"cpu {info['cpu']['model']} {info['cpu']['cores']}c")


def detect(ceilings: bool = False, vulkan_ceiling: bool = False) -> dict:
    """Everything a results file says about where it was measured. ``ceilings`` also measures
    the GPU's copy bandwidth and matrix rate (about a second), ``vulkan_ceiling`` the Vulkan
    device's matrix-core peak (:func:`vulkan_ceilings`, two or three seconds)."""
    import aule

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": {"model": cpu_model(), "cores": os.cpu_count()},
        "loadavg_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "gpu": gpu_info(),
        "versions": {
            "aule": aule.__version__,
            "aule_commit": _git_commit(),
            "numpy": _version("numpy"),
            "torch": _version("torch"),
            "triton": _version("triton"),
            "vulkan (binding)": _version("vulkan"),
        },
        "backends": {},
    }
    try:
        for name, entry in aule.backend_info().items():
            info["backends"][name] = {k: v for k, v in entry.items()
                                      if isinstance(v, (str, int, float, bool, type(None), list, dict))}
    except Exception as exc:
        info["backends_error"] = f"{type(exc).__name__}: {exc}"
    info["vulkan"] = info["backends"].get("vulkan")
    if ceilings and info["gpu"]:
        try:
            info["gpu"]["ceilings"] = gpu_ceilings()
        except Exception as exc:  # a failed measurement must not stop the benchmark
            info["gpu"]["ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
    if vulkan_ceiling:
        try:
            info["vulkan_ceilings"] = vulkan_ceilings()
        except Exception as exc:  # a failed measurement must not stop the benchmark
            info["vulkan_ceilings"] = {"error": f"{type(exc).__name__}: {exc}"}
    info["name"] = machine_name(info)
    info["argv"] = sys.argv[1:]
    return info


def describe(info: dict) -> str:
    """One line for tables and the README: card, driver, versions."""
    parts = []
    gpu = info.get("gpu")
    if gpu:
        g = gpu["name"]
        if gpu.get("driver"):
            g += f", driver {gpu['driver']}"
        if gpu.get("cuda"):
            g += f", CUDA {gpu['cuda']}"
        c = gpu.get("ceilings") or {}
        if "copy_tbps" in c:
            g += (f" (measured: device copy {c['copy_tbps']:.2f} TB/s, bf16 matmul "
                  f"{c['matmul_bf16_tflops']:.0f} TFLOP/s)")
        parts.append(g)
    cpu = info.get("cpu", {})
    parts.append(f"CPU {cpu.get('model')} ({cpu.get('cores')} cores)")
    vk = info.get("vulkan") or {}
    if vk.get("available"):
        dev = vk.get("device") or "available"
        if isinstance(dev, dict):
            dev = f"{dev.get('name')} ({dev.get('type')}, {dev.get('driver')})"
        peak = (info.get("vulkan_ceilings") or {}).get("coopmat_f16_tflops")
        if peak:
            dev += (f" (measured: fp16 cooperative-matrix peak {peak:.0f} TFLOP/s at "
                    f"{info['vulkan_ceilings'].get('shape')})")
        parts.append(f"Vulkan device {dev}")
    v = info.get("versions", {})
    libs = ", ".join(f"{k} {v[k]}" for k in ("aule", "torch", "triton", "numpy") if v.get(k))
    if v.get("aule_commit"):
        libs += f" (aule {v['aule_commit']})"
    parts.append(libs)
    parts.append(f"Python {info.get('python')}")
    return "; ".join(parts)


def cpu_counters():
    """(busy ticks of the whole machine, total ticks, CPU ticks of this process) or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            mine = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total - idle, total, int(mine[11]) + int(mine[12])


def others_share(before, after):
    """Fraction of the machine's CPU time that other processes used between two
    :func:`cpu_counters` readings (0 on a quiet machine), or None where it cannot be read."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    busy = after[0] - before[0]
    mine = after[2] - before[2]
    return max(0.0, min(1.0, (busy - mine) / (after[1] - before[1])))

"""Check, then time, every warp-specialised candidate of the Hopper forward (aule/backends/triton/
hopper.py: the ws variants of WS_VARIANTS at the tiles of CANDIDATES) on an sm_90 GPU, bf16.

Phase 1, check: each candidate on each class of CLASSES (causal and not, head_dim 64 and 128, GQA
8 and 4 with seq_q != seq_k, ragged lengths, a sliding window) against aule's general forward on
the same inputs (a fixed tile, no autotuning): max abs error of O and of the LSE, NaN reported.
"right" means O within 3e-2 and the LSE within 1e-3 of the general kernel's, no NaN where it has
none. A Triton pass can abort the process or a specialised kernel hang, so the checks run in
worker processes (up to --workers at once, sharing one Triton cache): a job that kills its worker
or prints nothing for --job-timeout seconds is reported as CRASH/HANG and its worker restarted on
the jobs after it. The workers also compile what phase 2 will launch (the candidates and each
configuration of the general kernel at each timed shape class), so its compiles come from the cache.

Phase 2, time: the issue-16 grid (16k tokens, model dim 2048, d 64 and 128, seq 1k/4k/16k, causal
and not; GQA 8 at seq 4k) for SDPA cuDNN and flash, aule's general forward (autotuned), and each
candidate (at most --max-timed, in CANDIDATES' order) that phase 1 found right on the checked
classes like the case (its head_dim and mask, MHA or GQA). Medians of CUDA-graph replays (eager
CUDA events where a call cannot be captured), TFLOP/s (4 B H S^2 d, halved for causal) and the
ratio to cuDNN. Each row is printed as it is measured.

Everything it writes stays under $OUT (Triton's cache, removed at the end; hopper_ws_probe.json).
The lead's budget is 120 s: phase 1 stops starting jobs at --check-budget seconds, phase 2 skips
rows after --budget.

    python3 scripts/hopper_ws_probe.py
    python3 scripts/hopper_ws_probe.py --only ws_two --dims 128
"""
from __future__ import annotations

import argparse
import json
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ["AULE_TRITON_HOPPER"] = "0"  # the general kernel's rows are the general kernel (unset: "auto")

TOKENS, MODEL_DIM = 16384, 2048

# (variant, tile) per head_dim, the likeliest first. The first H200 runs (hopws-1/2, Triton 3.6):
# 64-row tiles (one consumer group, no split of the rows) are right everywhere and half as fast;
# 128-row ones got every row vector the pass split wrong (the mask's positions, the LSE's pointer
# store) and were right where those came through descriptors (ws_table), NaN with three stages;
# the forms with a second loop failed to compile. ws_rows reads its row positions so.
CANDIDATES = {
    128: [("ws_rows", (128, 128, 4, 2)), ("ws", (128, 128, 4, 2)), ("ws_two", (128, 128, 4, 2)),
          ("ws_table", (128, 128, 4, 2))],
    64: [("ws_rows", (128, 128, 4, 2)), ("ws", (128, 128, 4, 2)), ("ws_two", (128, 128, 4, 2)),
         ("ws_table", (128, 128, 4, 2))],
}
# The general kernel's reference tile per head_dim (its first sm_90 configuration).
REF_TILE = {128: (128, 64, 8, 3), 64: (128, 64, 4, 3)}

# name: (batch, heads_q, heads_kv, seq_q, seq_k, left, right). "masked" classes are the ones a
# split variant runs differently from the single loop.
CLASSES = {
    "full": (2, 8, 8, 1024, 1024, -1, -1),
    "causal": (2, 8, 8, 1024, 1024, -1, 0),
    "gqa8-full": (1, 64, 8, 512, 512, -1, -1),
    "gqa8-causal": (1, 64, 8, 512, 512, -1, 0),
    "gqa4-q1k-k2k-full": (2, 16, 4, 1024, 2048, -1, -1),
    "gqa4-q1k-k2k-causal": (2, 16, 4, 1024, 2048, -1, 0),
    "ragged-causal": (1, 8, 8, 1000, 1000, -1, 0),
    "ragged-k-full": (1, 8, 8, 1000, 1100, -1, -1),
    "window256": (1, 8, 8, 1024, 1024, 256, 0),
}


def _masked(cls) -> bool:
    b, hq, hkv, sq, sk, left, right = CLASSES[cls]
    return left >= 0 or right >= 0 or sk % 128 != 0


def check_jobs(dims, only):
    """Phase 1's jobs, by head_dim and class."""
    jobs = []
    for d in dims:
        for cls in CLASSES:
            for variant, tile in CANDIDATES[d]:
                if only and variant not in only:
                    continue
                # Unmasked whole tiles: every split form is the single loop there.
                if not _masked(cls) and variant != "ws":
                    continue
                jobs.append({"kind": "check", "d": d, "cls": cls, "variant": variant, "tile": list(tile)})
    return jobs


def time_cases(dims):
    """``(name, (b, hq, hkv, s, d), (left, right))`` of phase 2: the issue-16 grid, and its sliding
    window (256 keys, causal, seq 8k, B1 H32 at d128), whose first row is aule's general kernel."""
    cases = []
    for d in dims:
        h = MODEL_DIM // d
        for s in (1024, 4096, 16384):
            for causal in (False, True):
                cases.append((f"d{d} s{s // 1024}k B{TOKENS // s} H{h} {'causal' if causal else 'full'}",
                              (TOKENS // s, h, h, s, d), (-1, 0 if causal else -1)))
        for causal in (False, True):
            cases.append((f"d{d} s4k B4 H{h}/{h // 8} {'causal' if causal else 'full'}",
                          (4, h, h // 8, 4096, d), (-1, 0 if causal else -1)))
    if 128 in dims:
        cases.append(("d128 s8k B1 H32 window256 (x aule)", (1, 32, 32, 8192, 128), (256, 0)))
    return cases


def warm_jobs(dims, only):
    """Compile-only jobs for phase 2: each candidate and each general-kernel configuration on a
    small shape that specialises as the timed one does (batch 1 stays 1, lengths multiples of 16)."""
    jobs = []
    for name, (b, hq, hkv, s, d), bounds in time_cases(dims):
        shape = [1 if b == 1 else 2, hq, hkv, min(s, 1024), d]
        masked = bounds != (-1, -1)
        for variant, tile in CANDIDATES[d]:
            if (not only or variant in only) and (masked or variant == "ws"):  # see phase 2's rows
                jobs.append({"kind": "warm", "shape": shape, "bounds": list(bounds), "variant": variant,
                             "tile": list(tile)})
        for index in range(4):  # the general forward has at most 4 sm_90 configurations per head_dim
            jobs.append({"kind": "warm", "shape": shape, "bounds": list(bounds), "variant": "general",
                         "config": index})
    unique = {json.dumps(j, sort_keys=True): j for j in jobs}
    return list(unique.values())


# --- worker side ----------------------------------------------------------------------------------

# AULE_PROBE_DRY=1: phase 1 on the CPU under Triton's interpreter at an eighth of the lengths and
# fp16 (the machinery's own test, tests/test_triton_hopper.py); no phase 2.
DRY = os.environ.get("AULE_PROBE_DRY") == "1"
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"


def _inputs(torch, b, hq, hkv, sq, sk, d, seed=0):
    dev, dtype = ("cpu", torch.float16) if DRY else ("cuda", torch.bfloat16)
    g = torch.Generator(device=dev).manual_seed(seed)
    return tuple(torch.randn(shape, device=dev, dtype=dtype, generator=g)
                 for shape in ((b, hq, sq, d), (b, hkv, sk, d), (b, hkv, sk, d)))


def _run_job(job, refs):
    import torch

    from aule.backends.triton import hopper, ops

    if job["kind"] == "warm":
        b, hq, hkv, s, d = job["shape"]
        q, k, v = _inputs(torch, b, hq, hkv, s, s, d)
        left, right = job["bounds"]
        if job["variant"] == "general":
            os.environ["AULE_TRITON_CONFIG"] = str(job["config"])
            try:
                ops.attention_forward(q, k, v, d ** -0.5, left, right)
            finally:
                os.environ.pop("AULE_TRITON_CONFIG", None)
        else:
            hopper.attention_forward(q, k, v, d ** -0.5, left, right, job["variant"], tuple(job["tile"]))
        torch.cuda.synchronize()
        return {}
    d, cls = job["d"], job["cls"]
    b, hq, hkv, sq, sk, left, right = CLASSES[cls]
    if DRY:
        b, hq, hkv, sq, sk = 1, max(1, hq // hkv), 1, sq // 8, sk // 8
    key = (d, cls)
    if key not in refs:
        q, k, v = _inputs(torch, b, hq, hkv, sq, sk, d)
        want, want_lse = ops.attention_forward(q, k, v, d ** -0.5, left, right, tile=REF_TILE[d])
        refs[key] = (q, k, v, want.float(), want_lse)
    q, k, v, want, want_lse = refs[key]
    out, lse = hopper.attention_forward(q, k, v, d ** -0.5, left, right, job["variant"], tuple(job["tile"]))
    if not DRY:
        torch.cuda.synchronize()
    nan = bool(torch.isnan(out).any().item() or torch.isnan(lse).any().item())
    err = (out.float() - want).abs()
    seen = torch.isfinite(want_lse)
    lse_err = (lse[seen] - want_lse[seen]).abs().max().item() if seen.any() else 0.0
    same_rows = bool(torch.equal(seen, torch.isfinite(lse)))
    err_o = float("nan") if nan else err.max().item()
    return {"err_o": err_o, "err_lse": lse_err, "nan": nan, "same_rows": same_rows,
            "right": (not nan) and err_o <= 3e-2 and lse_err <= 1e-3 and same_rows}


def worker(path: str) -> int:
    """Run the jobs listed in the JSON file ``path``, one ``START i`` and one ``DONE i {json}`` line each."""
    import torch

    if not DRY:
        torch.cuda.init()
    jobs = json.loads(Path(path).read_text())
    refs = {}
    for index, job in jobs:
        print(f"START {index}", flush=True)
        try:
            result = _run_job(job, refs)
        except Exception as exc:  # noqa: BLE001 - a failing candidate is a result of its own
            text = str(exc).strip().splitlines()
            result = {"error": f"{type(exc).__name__}: {(text[-1] if text else '')[:120]}"}
            if "CUDA error" in str(exc) or "illegal" in str(exc).lower():
                # The context is lost after a device fault: the jobs after this one need a new
                # process, which the main side starts when this one exits.
                print(f"DONE {index} {json.dumps(result)}", flush=True)
                os._exit(17)
        print(f"DONE {index} {json.dumps(result)}", flush=True)
    return 0


# --- main side ------------------------------------------------------------------------------------

def run_jobs(jobs, workers: int, job_timeout: float, deadline: float, scratch: Path, on_result):
    """Run ``jobs`` in up to ``workers`` processes; ``on_result(index, result)`` as each finishes.
    A worker that dies or stalls has its current job reported (CRASH / HANG) and restarts on the rest."""
    # Dealt round the workers one by one, the checks first, then the compiles for phase 2: compile
    # time dominates, and a worker keeps the references it made (one per head_dim and class).
    queues = [[] for _ in range(workers)]
    for i in range(len(jobs)):
        queues[i % workers].append(i)
    live = {}
    sel = selectors.DefaultSelector()
    counter = [0]

    def spawn(slot):
        pending = [i for i in queues[slot]]
        if not pending or time.time() > deadline:
            for i in pending:
                on_result(i, {"error": "skipped (check budget)"})
            queues[slot] = []
            return
        counter[0] += 1
        path = scratch / f"jobs-{slot}-{counter[0]}.json"
        path.write_text(json.dumps([[i, jobs[i]] for i in pending]))
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(path)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1, cwd=ROOT)
        live[slot] = {"proc": proc, "current": None, "last": time.time()}
        sel.register(proc.stdout, selectors.EVENT_READ, slot)

    def retire(slot, why):
        state = live.pop(slot)
        sel.unregister(state["proc"].stdout)
        if state["proc"].poll() is None:
            state["proc"].kill()
        state["proc"].wait()
        cur = state["current"]
        if cur is not None and cur in queues[slot]:
            queues[slot].remove(cur)
            on_result(cur, {"error": why})
        spawn(slot)

    for slot in range(workers):
        spawn(slot)
    while live:
        for key, _ in sel.select(timeout=1.0):
            slot = key.data
            state = live.get(slot)
            if state is None:
                continue
            line = key.fileobj.readline()
            if not line:
                rc = state["proc"].wait()
                retire(slot, f"CRASH (worker exit {rc})")
                continue
            state["last"] = time.time()
            word, _, rest = line.strip().partition(" ")
            if word == "START":
                state["current"] = int(rest)
            elif word == "DONE":
                index, _, payload = rest.partition(" ")
                index = int(index)
                if index in queues[slot]:
                    queues[slot].remove(index)
                state["current"] = None
                on_result(index, json.loads(payload))
        now = time.time()
        for slot, state in list(live.items()):
            if now - state["last"] > job_timeout:
                retire(slot, f"HANG (nothing for {job_timeout:.0f} s)")
            elif now > deadline:
                retire(slot, "skipped (check budget)")


def _suggest_rows(torch, dims, checks) -> None:
    """Print, per ws variant at the tile routing launches (its first in hopper.TILES), the largest
    set of hopper.CALL_CLASSES whose every checked class it was right on, each member of it seen
    right on some checked class: MEASURED_RIGHT's row."""
    import itertools

    from aule.backends.triton import hopper

    def classes_of(cls):
        b, hq, hkv, sq, sk, left, right = CLASSES[cls]
        q = torch.empty((b, hq, sq, 8), device="meta")
        k = torch.empty((b, hkv, sk, 8), device="meta")
        return hopper.call_classes(q, k, left, right)

    print("\nsuggested hopper.MEASURED_RIGHT (the largest class sets right on every checked class within them):")
    for variant in hopper.WS_VARIANTS:
        dims_ok, best = [], None
        for d in dims:
            tile = hopper.tiles(variant, d)[0]
            label = f"{variant} {tile[0]}x{tile[1]}w{tile[2]}s{tile[3]}"
            single = "ws " + label.split(" ", 1)[1]

            def right(cls):
                # Unmasked whole tiles: the split forms are the single loop there (not checked apart).
                row = checks.get((d, cls, label)) or checks.get((d, cls, single) if not _masked(cls) else None)
                return bool(row and row.get("right"))

            if not right("full"):
                continue
            for n in range(len(hopper.CALL_CLASSES), -1, -1):
                # Every checked class inside the set right, and each member seen right at least once.
                sets = [frozenset(c) for c in itertools.combinations(hopper.CALL_CLASSES, n)
                        if all(right(cls) for cls in CLASSES if classes_of(cls) <= frozenset(c))
                        and all(any(m in classes_of(cls) <= frozenset(c) and right(cls) for cls in CLASSES)
                                for m in c)]
                if sets:
                    found = max(sets, key=sorted)
                    break
            dims_ok.append(d)
            best = found if best is None else best & found
        if dims_ok:
            print(f'    "{variant}": {{"head_dims": {tuple(sorted(dims_ok))}, "classes": frozenset({sorted(best)})}},')


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dims", default="128,64")
    ap.add_argument("--only", default="", help="variants to check and time (default: every candidate)")
    ap.add_argument("--workers", type=int, default=0, help="check processes (default: CPU cores - 2, at most 12)")
    ap.add_argument("--job-timeout", type=float, default=40.0)
    ap.add_argument("--check-budget", type=float, default=55.0)
    ap.add_argument("--budget", type=float, default=108.0)
    ap.add_argument("--rep", type=float, default=15.0, help="ms of eager repeats per timed row")
    ap.add_argument("--max-timed", type=int, default=4,
                    help="candidates timed per case, the first right ones in CANDIDATES' order")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    start = time.time()
    out_dir = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="hopper_ws_probe_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(tempfile.mkdtemp(prefix="triton-cache-", dir=out_dir))
    scratch = Path(tempfile.mkdtemp(prefix="jobs-", dir=out_dir))
    os.environ["TRITON_CACHE_DIR"] = str(cache)  # workers inherit it: their compiles serve phase 2
    try:
        return _main(a, start, out_dir, scratch)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(scratch, ignore_errors=True)


def _main(a, start, out_dir: Path, scratch: Path) -> int:
    import torch
    import triton

    if DRY:
        print(f"dry run: phase 1 under Triton's interpreter  torch {torch.__version__}  triton {triton.__version__}")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to probe")
        return 1
    else:
        cap = torch.cuda.get_device_capability()
        print(f"{torch.cuda.get_device_name()} sm_{cap[0]}{cap[1]}  torch {torch.__version__}  "
              f"triton {triton.__version__}")
    dims = [int(x) for x in a.dims.split(",")]
    only = {x for x in a.only.split(",") if x}
    jobs = check_jobs(dims, only)
    n_checks = len(jobs)
    jobs += [] if DRY else warm_jobs(dims, only)
    workers = a.workers or max(1, min(12, (os.cpu_count() or 4) - 2))
    print(f"phase 1: {n_checks} checks and {len(jobs) - n_checks} warm compiles in {workers} processes "
          f"(max abs error against the general kernel; right: O <= 3e-2, LSE <= 1e-3, no NaN)")
    print(f"{'head_dim class':26s} {'candidate':24s} {'err O':>8s} {'err LSE':>8s}  verdict", flush=True)
    checks = {}

    def on_result(index, result):
        job = jobs[index]
        if job["kind"] != "check":
            if "error" in result:
                checks.setdefault("warm_errors", []).append(f"{job['variant']} {job.get('tile', job.get('config'))}: "
                                                            f"{result['error']}")
            return
        label = f"{job['variant']} {'x'.join(str(t) for t in job['tile'][:2])}w{job['tile'][2]}s{job['tile'][3]}"
        checks[(job["d"], job["cls"], label)] = result
        if "error" in result:
            verdict, eo, el = result["error"], "", ""
        else:
            eo = "nan" if result["nan"] else f"{result['err_o']:.1e}"
            el = f"{result['err_lse']:.1e}"
            verdict = "right" if result["right"] else ("WRONG (NaN)" if result["nan"] else "WRONG")
        print(f"d{job['d']:<3d} {job['cls']:21s} {label:24s} {eo:>8s} {el:>8s}  {verdict}", flush=True)

    run_jobs(jobs, workers, a.job_timeout, start + a.check_budget, scratch, on_result)
    for line in checks.pop("warm_errors", []):
        print(f"warm compile failed: {line}")
    print(f"phase 1 done at {time.time() - start:.0f} s", flush=True)

    # Which candidates are right on every checked class of a head_dim, unmasked and masked. On
    # unmasked whole tiles every ws form compiles to the single loop: the "ws" row of its tile speaks.
    labels = sorted({key[2] for key in checks})
    print("\nright on every class checked (per head_dim; unmasked classes / masked classes):")
    served = {}
    for d in dims:
        for label in labels:
            rows = {cls: r for (dd, cls, lab), r in checks.items() if dd == d and lab == label}
            if not rows:
                continue
            single = "ws " + label.split(" ", 1)[1]
            unmasked = [r.get("right", False) for (dd, cls, lab), r in checks.items()
                        if dd == d and lab == single and not _masked(cls)]
            masked = [r.get("right", False) for cls, r in rows.items() if _masked(cls)]
            served[(d, label)] = (bool(unmasked) and all(unmasked), bool(masked) and all(masked))
            bad = sorted(cls for cls, r in rows.items() if not r.get("right", False))
            print(f"  d{d} {label:24s} unmasked {'yes' if served[(d, label)][0] else 'no '} "
                  f"masked {'yes' if served[(d, label)][1] else 'no '}{'  wrong on: ' + ', '.join(bad) if bad else ''}")

    _suggest_rows(torch, dims, checks)
    if DRY:
        return 0 if checks else 1
    print("\nphase 2: ms (graph replay; * eager), TFLOP/s, x cudnn")
    results = []
    from aule.backends.triton import hopper, ops
    from torch.nn.attention import SDPBackend, sdpa_kernel
    # Imported only now: that module loads torch, triton and aule's Hopper kernels, which the check
    # phase's parent process leaves to its workers.
    from time_hopper_fwd import time_rows

    def sdpa(kind):
        def run(q, k, v, bounds):
            with sdpa_kernel([kind]):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=bounds[1] == 0,
                                                                        enable_gqa=k.shape[1] != q.shape[1])
        return run

    def general(q, k, v, bounds):
        return ops.attention_forward(q, k, v, q.shape[-1] ** -0.5, *bounds)[0]

    def candidate(variant, tile):
        def run(q, k, v, bounds):
            return hopper.attention_forward(q, k, v, q.shape[-1] ** -0.5, *bounds, variant, tile)[0]
        return run

    for name, (b, hq, hkv, s, d), bounds in time_cases(dims):
        window, causal = bounds[0] >= 0, bounds[1] >= 0
        rows = [("aule", general)] if window else [
            ("sdpa-cudnn", sdpa(SDPBackend.CUDNN_ATTENTION)), ("sdpa-flash", sdpa(SDPBackend.FLASH_ATTENTION)),
            ("aule", general)]
        ws_ok = False
        for variant, tile in CANDIDATES[d]:
            label = f"{variant} {tile[0]}x{tile[1]}w{tile[2]}s{tile[3]}"
            # Timed where right on the checked classes like this case (its mask, MHA or GQA; the
            # summary above says where else it is right). Unmasked, the split forms are the single
            # loop: only the ws row is timed there.
            single = "ws " + label.split(" ", 1)[1]
            like = [("window256" if window else ("causal" if causal else "full"), label if causal else single)]
            if hkv != hq:
                like.append(("gqa8-causal" if causal else "gqa8-full", label if causal else single))
            right = all(checks.get((d, cls, lab), {}).get("right", False) for cls, lab in like)
            timed = sum(1 for lab, _ in rows if lab.split()[0] in hopper.WS_VARIANTS)
            if right and (causal or variant == "ws") and (not only or variant in only) and timed < a.max_timed:
                rows.append((label, candidate(variant, tile)))
                ws_ok = True
        if not ws_ok:
            print(f"{name:26s} no candidate right on this class: skipped", flush=True)
            continue
        q, k, v = _inputs(torch, b, hq, hkv, s, s, d)
        # Visible pairs: a window's rows see at most left + 1 keys, the first rows fewer.
        pairs = (s * (bounds[0] + 1) - bounds[0] * (bounds[0] + 1) / 2) if window else s * s / (2 if causal else 1)
        flops = 4 * b * hq * pairs * d
        for row in time_rows(name, rows, lambda fn: fn(q, k, v, bounds), flops,
                             lambda: time.time() - start > a.budget, a.rep):
            results.append(row)
            label = row["contender"]
            if "error" in row:
                print(f"{name:26s} {label:24s} {row['error']}", flush=True)
            else:
                print(f"{name:26s} {label:24s} {row['ms']:7.3f}{'' if row['graph'] else '*'} {row['tflops']:6.1f} "
                      f"{row['vs_cudnn']:5.2f}  err {row['err']:.1e}", flush=True)
        del q, k, v

    print("\nsummary: TFLOP/s (x cudnn); the best candidate and its ratio to aule's general kernel")
    for name in dict.fromkeys(r["case"] for r in results):
        rows = {r["contender"]: r for r in results if r["case"] == name and "ms" in r}
        cudnn, gen = rows.get("sdpa-cudnn"), rows.get("aule")
        cands = [r for lab, r in rows.items() if lab not in ("sdpa-cudnn", "sdpa-flash", "aule") and r["err"] <= 3e-2]
        best = max(cands, key=lambda r: r["tflops"], default=None)
        cell = lambda r: f"{r['tflops']:6.0f} ({r['vs_cudnn']:4.2f})" if r else f"{'-':>13s}"  # noqa: E731
        vs_gen = f"{best['tflops'] / gen['tflops']:4.2f}x aule" if best and gen else ""
        print(f"{name:26s} cudnn {cell(cudnn)} aule {cell(gen)} best {best['contender'] if best else '-':24s} "
              f"{cell(best)} {vs_gen}")
    (out_dir / "hopper_ws_probe.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "triton": triton.__version__,
         "checks": [{"d": d, "class": c, "candidate": lab, **r} for (d, c, lab), r in checks.items()],
         "rows": results}, indent=1))
    print(f"done in {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

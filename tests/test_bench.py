"""The benchmark harness: the --quick smoke run, and the parts that must be right for its numbers
to mean anything (references, FLOP counts, error detection, budgets, reports)."""
from __future__ import annotations

import io
import json
import math
import os
import time

import numpy as np
import pytest

import aule
from aule import bench, masks
from aule.bench import checks, contenders, inputs, report, runner, suites, timing
from aule.bench.progress import Progress
from aule.reference import attention_reference

torch = pytest.importorskip("torch", reason="the harness's competitors and references use torch")


def _suite(cases, contenders, kind="attention", baseline=None, metric="gflops", targets=()):
    return suites.Suite("t", "test suite", kind, tuple(cases), tuple(contenders), baseline, metric,
                        needs="cpu", targets=tuple(targets))


def _case(**kw):
    p = dict(mode="fwd", B=1, Hq=4, Hkv=2, S=64, D=32, causal=True, window=-1, dtype="float32", device="cpu")
    p.update(kw)
    return p


def _run(suite, **kw):
    return runner.Runner(progress=False, quick=True, **kw).run([suite])["t"]


def _by_contender(res):
    return {r["contender"]: r for r in res["rows"]}


def test_quick_cli_smoke(tmp_path):
    """`aule bench --quick`: runs, checks, writes JSON, markdown and plots. On a GPU machine only the
    CPU-side suites: the others compile and time the GPU contenders (minutes), which the benchmark
    runs themselves exercise."""
    out = tmp_path / "res"
    suites = [] if not torch.cuda.is_available() else ["--suite", "cpu,memory"]
    assert bench.main(["--quick", "--out", str(out), "--no-progress", *suites]) == 0
    files = list(out.glob("*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["machine"]["cpu"]["cores"] == os.cpu_count()
    cpu = data["suites"]["cpu"]
    rows = _by_contender(cpu)
    for name in ("aule:numpy", "torch-sdpa"):
        assert rows[name]["status"] == "ok", rows[name]
        assert rows[name]["err"] < checks.tolerance("float32")
        assert rows[name]["ms"] > 0 and rows[name]["gflops"] > 0
    assert rows["torch-sdpa"]["ratio"] == pytest.approx(1.0)
    mem = data["suites"]["memory"]["rows"][0]
    assert mem["status"] == "ok" and 0 < mem["mb"] < 256
    if not torch.cuda.is_available():
        assert data["suites"]["dense"]["status"] == "skipped"
        assert "CUDA" in data["suites"]["dense"]["reason"]
    assert files[0].with_suffix(".md").exists()
    pytest.importorskip("matplotlib")
    assert list(out.glob("*-cpu.png"))


def test_unknown_suite_is_refused(capsys):
    assert bench.main(["--suite", "nope", "--no-progress"]) == 2
    assert "unknown suite 'nope'" in capsys.readouterr().err


def test_attention_contenders_checked_against_reference(monkeypatch):
    monkeypatch.setitem(suites.CONTENDERS, "sdpa-math+mask", contenders.Sdpa("MATH", explicit_mask=True))
    cases = [_case(), _case(window=16, S=80), _case(S=48, Hq=8, Hkv=1, causal=False)]
    res = _run(_suite(cases, ["aule:numpy", "torch-sdpa", "sdpa-math", "sdpa-math+mask",
                              "aule:numpy full-causal"], baseline="torch-sdpa"))
    rows = {(r["case"], r["contender"]): r for r in res["rows"]}
    for (case, contender), r in rows.items():
        if "w16" in case and contender in ("torch-sdpa", "sdpa-math"):
            assert r["status"] == "skipped" and "window" in r["note"]
        else:
            assert r["status"] == "ok", r
            assert r["err"] < 1e-5
    assert rows[(suites.case_label(cases[0]), "aule:numpy")]["ratio"] > 0


def test_backward_rows_compare_gradients():
    res = _run(_suite([_case(mode="fwd+bwd", S=40, D=16)], ["torch-sdpa", "sdpa-math", "aule:numpy"]))
    rows = _by_contender(res)
    assert rows["torch-sdpa"]["status"] == "ok" and rows["torch-sdpa"]["err"] < 1e-5
    assert rows["sdpa-math"]["status"] == "ok"
    assert rows["aule:numpy"]["status"] == "skipped"  # NumPy arrays carry no gradients


def test_wrong_output_is_flagged_not_timed(monkeypatch):
    real = aule.flash_attention

    def off_by_a_bit(q, k, v, **kw):
        return real(q, k, v, **kw) * 1.01

    monkeypatch.setattr(aule, "flash_attention", off_by_a_bit)
    row = _run(_suite([_case()], ["aule:numpy"]))["rows"][0]
    assert row["status"] == "wrong" and row["err"] == pytest.approx(0.01, rel=1e-3)
    assert "ms" not in row


def test_nan_never_passes():
    assert checks.rel_err(np.array([np.nan, 1.0]), np.array([1.0, 1.0])) == math.inf


def test_decode_inputs_scatter_the_cache_into_its_blocks():
    p = dict(B=3, Hq=4, Hkv=2, ctx=48, D=8, block=16, dtype="float32", device="cpu")
    s = runner.DecodeInputs(p).sets[0]
    tables = s["block_tables"].long()
    for b in range(3):
        rebuilt = s["k_cache"][tables[b]].reshape(48, 2, 8).permute(1, 0, 2)
        assert torch.equal(rebuilt, s["k"][b])
    assert sorted(tables.flatten().tolist()) == list(range(9))
    res = _run(_suite([p], ["torch-sdpa", "sdpa-math", "aule-paged:auto"], kind="decode", metric="tbps"))
    rows = _by_contender(res)
    assert rows["torch-sdpa"]["status"] == "ok" and rows["torch-sdpa"]["err"] < 1e-5
    assert rows["torch-sdpa"]["tbps"] > 0 and rows["torch-sdpa"]["tokens_per_s"] > 0
    if hasattr(aule, "flash_attention_paged"):
        assert rows["aule-paged:auto"]["status"] == "ok" and rows["aule-paged:auto"]["err"] < 1e-5
    else:
        assert any("flash_attention_paged" in n for n in res["notes"])


@pytest.mark.parametrize("sq,sk,causal,window", [(37, 37, True, -1), (20, 53, True, 9), (53, 20, True, -1),
                                                  (31, 45, False, (4, 7)), (16, 16, False, -1)])
def test_blocked_reference_matches_oracle_and_autograd(sq, sk, causal, window, monkeypatch):
    monkeypatch.setattr(checks, "BLOCK_SCORES", 3 * 4 * 16)  # force many small blocks
    rng = np.random.default_rng(1)
    q = rng.standard_normal((2, 4, sq, 8))
    k = rng.standard_normal((2, 2, sk, 8))
    v = rng.standard_normal((2, 2, sk, 8))
    do = rng.standard_normal(q.shape)
    tq, tk, tv, tdo = (torch.from_numpy(x) for x in (q, k, v, do))
    out, (dq, dk, dv) = checks.blocked_reference(tq, tk, tv, causal, window, grad_out=tdo)
    np.testing.assert_allclose(out.numpy(), attention_reference(q, k, v, causal=causal, window_size=window),
                               atol=1e-12)
    # Gradients against autograd through a dense masked softmax on expanded K/V.
    left, right = masks.canonical_window(causal, window)
    vis = torch.from_numpy(masks.mask(sq, sk, left, right))
    lq, lk, lv = (t.clone().requires_grad_(True) for t in (tq, tk, tv))
    s = lq @ lk.repeat_interleave(2, 1).transpose(-1, -2) / math.sqrt(8)
    p = torch.softmax(s.masked_fill(~vis, -math.inf), -1).nan_to_num(0.0)
    (p @ lv.repeat_interleave(2, 1)).backward(tdo)
    for mine, ref in ((dq, lq.grad), (dk, lk.grad), (dv, lv.grad)):
        torch.testing.assert_close(mine, ref, atol=1e-10, rtol=1e-10)


def test_flop_counts():
    p = _case(B=2, Hq=3, S=8, D=4, causal=False)
    assert runner.attention_flops(p) == 4 * 2 * 3 * 8 * 8 * 4
    assert runner.attention_flops({**p, "causal": True}) == 4 * 2 * 3 * 8 * 8 * 4 / 2
    assert runner.attention_flops({**p, "causal": True, "mode": "fwd+bwd"}) == 4 * 2 * 3 * 8 * 8 * 4 / 2 * 3.5
    # window 2 over 8 positions: the first row sees 1 key, the others 2
    assert runner.attention_flops({**p, "causal": True, "window": 2}) == 4 * 2 * 3 * 4 * 15


def test_budget_marks_cases_skipped():
    res = _run(_suite([_case(), _case(S=32)], ["aule:numpy"]), budget_s=0)
    assert [r["status"] for r in res["rows"]] == ["skipped", "skipped"]
    assert any("budget" in n for n in res["notes"])


def test_targets_are_evaluated():
    t = suites.Target("numpy within 2x", "aule:numpy", {"S": 64}, "torch-sdpa", 0.5)
    fake = {"suites": {"cpu": {"status": "ran", "metric": "gflops", "rows": [
        {"case": "a", "contender": "aule:numpy", "params": {"S": 64}, "status": "ok", "ms": 3.0},
        {"case": "a", "contender": "torch-sdpa", "params": {"S": 64}, "status": "ok", "ms": 1.0}]}}}
    verdicts = report.evaluate_targets(fake, {"cpu": (t,)})
    assert verdicts[0]["verdict"] == "missed" and "0.333" in verdicts[0]["measured"]
    fake["suites"]["cpu"]["rows"][0]["ms"] = 1.5
    assert report.evaluate_targets(fake, {"cpu": (t,)})[0]["verdict"] == "met"


def test_lavapipe_target_is_judged_only_on_a_cpu_vulkan_device():
    t = suites.Target("lavapipe <= 50 ms", "aule:vulkan", {"S": 64}, None, 50.0, at_most=True,
                      metric="ms", cpu_vulkan_only=True)
    rows = [{"case": "a", "contender": "aule:vulkan", "params": {"S": 64}, "status": "ok", "ms": 3.0}]

    def on(device_type):
        fake = {"machine": {"vulkan": {"device": {"type": device_type}}},
                "suites": {"cpu": {"status": "ran", "metric": "gflops", "rows": rows}}}
        return report.evaluate_targets(fake, {"cpu": (t,)})

    assert [v["verdict"] for v in on("cpu")] == ["met"]
    assert on("discrete-gpu") == []


def test_commit_told_by_the_caller_wins(monkeypatch):
    from aule.bench import machine

    monkeypatch.setenv("AULE_BENCH_COMMIT", "abc1234")
    assert machine._git_commit() == "abc1234"


def test_readme_section_replaces_only_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# project\n\nintro\n")
    sec1 = report.README_BEGIN + "\none\n" + report.README_END + "\n"
    assert report.update_readme(str(readme), sec1)
    readme.write_text(readme.read_text() + "\n## after\n")
    sec2 = report.README_BEGIN + "\ntwo\n" + report.README_END + "\n"
    assert report.update_readme(str(readme), sec2)
    text = readme.read_text()
    assert text.startswith("# project\n\nintro\n") and text.rstrip().endswith("## after")
    assert "two" in text and "one" not in text
    assert not report.update_readme(str(readme), sec2)


def test_readme_section_from_results(tmp_path):
    res = {"machine": {"name": "cpu-x-2c", "date": "d", "cpu": {"model": "X", "cores": 2}, "gpu": None,
                       "versions": {"aule": "0", "torch": "t"}, "python": "3"},
           "suites": {"cpu": {"status": "ran", "title": "CPU", "metric": "gflops", "baseline": "torch-sdpa",
                              "rows": [{"case": "c", "contender": "aule:numpy", "status": "ok", "gflops": 5.0,
                                        "params": {}, "ms": 1.0}], "notes": []},
                      "dense": {"status": "skipped", "title": "Dense", "reason": "no GPU"}}}
    path = tmp_path / "results" / "cpu-x-2c.json"
    report.write_json(str(path), res)
    sec = report.readme_section([str(path)], str(tmp_path))
    assert sec.startswith(report.README_BEGIN) and sec.rstrip().endswith(report.README_END)
    assert "| c | 5 |" in sec and "Dense: no GPU" in sec and "results/cpu-x-2c.json" in sec


def test_progress_writes_lines_when_not_a_terminal():
    buf = io.StringIO()
    bar = Progress(4, stream=buf)
    bar.step("a")
    bar.step("b", 3)
    bar.close()
    assert buf.getvalue().splitlines()[-1].startswith("[4/4 ")


def test_aule_gradient_rows_and_expanded_kv(monkeypatch):
    """The GPU suites' aule rows (forward+backward, K/V expanded, full-causal baseline) run the
    same code on CPU tensors when aule's entry point is a differentiable stand-in."""
    import torch.nn.functional as F

    calls = []

    def stand_in(q, k, v, causal=True, window_size=-1, backend=None):
        calls.append((backend, k.shape[1], window_size))
        vis = torch.from_numpy(masks.mask(q.shape[2], k.shape[2], *masks.canonical_window(causal, window_size)))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=vis, enable_gqa=q.shape[1] != k.shape[1])

    monkeypatch.setattr(aule, "flash_attention", stand_in)
    monkeypatch.setattr(contenders.AuleDense, "unavailable", lambda self: None)
    cases = [_case(mode="fwd+bwd", Hq=8, Hkv=2, S=48, D=16), _case(S=64, window=8)]
    res = _run(_suite(cases, ["aule:triton", "aule:triton kv-expanded", "aule:triton full-causal"],
                      baseline="aule:triton full-causal"))
    rows = {(r["case"], r["contender"]): r for r in res["rows"]}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["err"] < 1e-5
    assert ("triton", 8, -1) in calls and ("triton", 2, -1) in calls  # expanded and grouped K/V
    assert ("triton", 2, 8) in calls  # the windowed call, and its full-causal baseline below
    windowed = rows[(suites.case_label(cases[1]), "aule:triton")]
    full = rows[(suites.case_label(cases[1]), "aule:triton full-causal")]
    assert windowed["ratio"] == pytest.approx(full["ms"] / windowed["ms"])
    assert windowed["tflops"] == pytest.approx(runner.attention_flops(cases[1]) / windowed["ms"] / 1e9)
    # the full-causal baseline is credited with the full causal FLOPs it computed
    assert full["tflops"] == pytest.approx(runner.attention_flops({**cases[1], "window": -1}) / full["ms"] / 1e9)


def test_vulkan_rows_on_host_arrays_and_gpu_tensors():
    """Vulkan contenders (on lavapipe in CI): NumPy arrays through the public API, and GpuTensors
    timed by Vulkan timestamps with the wall time beside it."""
    if not inputs.backend_info().get("vulkan", {}).get("available"):
        pytest.skip(f"no Vulkan: {inputs.backend_info().get('vulkan', {}).get('reason')}")
    cases = [_case(S=40), _case(S=40, dtype="float16", device="auto")]
    res = _run(_suite(cases, ["aule:vulkan resident", "aule:vulkan"]))
    for r in res["rows"]:
        assert r["status"] == "ok", r
        assert r["err"] < checks.tolerance(r["params"]["dtype"])
        assert r["ms"] > 0
    resident = [r for r in res["rows"] if r["contender"] == "aule:vulkan resident"]
    assert all(r["wall_ms"] > 0 for r in resident)


def test_vulkan_paged_rows_on_a_gpu_tensor_cache(monkeypatch):
    """The decode suite's Vulkan row (a GPU-type device only in real runs; lavapipe here)."""
    if not inputs.backend_info().get("vulkan", {}).get("available"):
        pytest.skip(f"no Vulkan: {inputs.backend_info().get('vulkan', {}).get('reason')}")
    monkeypatch.setattr(inputs, "vulkan_gpu_missing", lambda: None)
    p = dict(B=2, Hq=4, Hkv=2, ctx=64, D=32, block=16, dtype="float16", device="cpu")
    row = _run(_suite([p], ["aule-paged:vulkan resident"], kind="decode", metric="tbps"))["rows"][0]
    assert row["status"] == "ok", row
    assert row["err"] < checks.tolerance("float16") and row["tbps"] > 0 and row["wall_ms"] > 0
    # Recorded back to back in one submission, as the dense rows on GpuTensors are.
    assert row["clock"].startswith("Vulkan timestamps around calls recorded back to back") and row["calls_per_submission"] >= 1


def _full_results(name):
    """A results file as a full run leaves it: two suites, neither quick."""
    def suite(title):
        return {"status": "ran", "title": title, "metric": "gflops", "baseline": None, "quick": False, "notes": [],
                "rows": [{"case": "c", "contender": "aule:numpy", "status": "ok", "gflops": 5.0, "ms": 1.0,
                          "params": {}}]}
    return {"machine": {"name": name, "date": "d", "cpu": {"model": "X", "cores": 2}, "gpu": None,
                        "versions": {}, "python": "3"},
            "suites": {"cpu": suite("CPU"), "memory": suite("Memory")}}


def test_quick_run_leaves_the_full_results_byte_identical(tmp_path):
    """--quick writes <machine>-quick.*; the committed full files (JSON, markdown, plots) stay as they were."""
    report.write_json(str(tmp_path / "m.json"), _full_results("m"))
    (tmp_path / "m.md").write_text("full tables\n")
    (tmp_path / "m-cpu.png").write_bytes(b"not a real plot")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert bench.main(["--quick", "--suite", "cpu", "--out", str(tmp_path), "--name", "m", "--no-progress"]) == 0
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in before} == before
    quick = json.loads((tmp_path / "m-quick.json").read_text())
    assert list(quick["suites"]) == ["cpu"] and quick["suites"]["cpu"]["quick"] is True
    assert (tmp_path / "m-quick.md").exists()


def test_partial_full_run_keeps_the_other_suites(tmp_path):
    full = _full_results("m")
    report.write_json(str(tmp_path / "m.json"), full)
    new = _full_results("m")
    new["suites"] = {"memory": {**new["suites"]["memory"], "rows": []}}
    bench.save(new, str(tmp_path), plots=False)
    merged = json.loads((tmp_path / "m.json").read_text())
    assert merged["suites"]["cpu"] == full["suites"]["cpu"]
    assert merged["suites"]["memory"]["rows"] == []
    # A quick result of the same machine goes beside it, not into it.
    new["suites"]["memory"]["quick"] = True
    assert bench.save(new, str(tmp_path), plots=False).endswith("m-quick.json")
    assert json.loads((tmp_path / "m.json").read_text()) == merged


# The tables as they were when contenders were string-dispatched: names, kinds and case counts,
# so results stay comparable with the committed files.
EXPECTED_SUITES = {
    "dense": (20, ("aule:triton", "aule:triton-amd", "aule:triton general", "sdpa-flash", "sdpa-cudnn",
                   "sdpa-efficient", "sdpa-math")),
    "dense_bwd": (20, ("aule:triton", "aule:triton-amd", "aule:triton general", "sdpa-flash", "sdpa-cudnn",
                       "sdpa-efficient", "sdpa-math")),
    "gqa": (4, ("aule:triton", "aule:triton-amd", "aule:triton kv-expanded", "sdpa-flash", "sdpa-cudnn",
                "sdpa-efficient", "sdpa-math")),
    "window": (6, ("aule:triton", "aule:triton full-causal", "sdpa-flash full-causal", "sdpa-efficient+mask")),
    "decode": (12, ("aule-paged:triton launcher", "aule-paged:triton", "aule-paged:triton graph",
                    "aule-paged:vulkan resident", "torch-sdpa", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient",
                    "sdpa-math")),
    "overhead": (2, ("aule:auto", "aule:triton", "aule:vulkan", "aule:vulkan resident",
                     "aule:vulkan resident, recorded anew", "aule:numpy", "torch-sdpa")),
    "vulkan": (14, ("aule:vulkan resident", "aule:vulkan", "aule:vulkan fp16", "aule:vulkan coopmat", "torch-sdpa",
                    "sdpa-flash", "sdpa-cudnn", "sdpa-efficient")),
    "cpu": (4, ("aule:numpy", "aule:vulkan", "torch-sdpa")),
    "memory": (2, ("aule:numpy",)),
}
EXPECTED_IMPL = {
    "aule:triton": ("AuleDense", "aule", "triton"), "aule:triton-amd": ("AuleDense", "aule", "triton-amd"),
    "aule:vulkan": ("AuleDense", "aule", "vulkan"), "aule:numpy": ("AuleDense", "aule", "numpy"),
    "aule:auto": ("AuleDense", "aule", None),
    "aule:vulkan resident": ("AuleVulkanResident", "resident", "vulkan"),
    "aule:triton kv-expanded": ("AuleDense", "aule", "triton"),
    "aule:triton full-causal": ("AuleDense", "aule", "triton"),
    "aule:numpy full-causal": ("AuleDense", "aule", "numpy"),
    "sdpa-flash": ("Sdpa", "sdpa", "FLASH_ATTENTION"), "sdpa-cudnn": ("Sdpa", "sdpa", "CUDNN_ATTENTION"),
    "sdpa-efficient": ("Sdpa", "sdpa", "EFFICIENT_ATTENTION"), "sdpa-math": ("Sdpa", "sdpa", "MATH"),
    "sdpa-flash full-causal": ("Sdpa", "sdpa", "FLASH_ATTENTION"),
    "sdpa-efficient+mask": ("Sdpa", "sdpa", "EFFICIENT_ATTENTION"), "torch-sdpa": ("Sdpa", "sdpa", None),
    "aule-paged:triton": ("AulePaged", "paged", "triton"), "aule-paged:vulkan": ("AulePaged", "paged", "vulkan"),
    "aule-paged:auto": ("AulePaged", "paged", None),
    "aule-paged:triton launcher": ("AulePagedLauncher", "paged_launcher", "triton"),
    "aule-paged:vulkan resident": ("AulePagedVulkanResident", "paged_resident", "vulkan"),
    "aule-paged:triton graph": ("AulePaged", "paged", "triton"),
}


def test_registry_keeps_the_tables_of_the_committed_results():
    for name, (n_cases, names) in EXPECTED_SUITES.items():
        s = suites.SUITE_BY_NAME[name]
        assert (len(s.cases), s.contenders) == (n_cases, names), name
    for name, (cls, impl, backend) in EXPECTED_IMPL.items():
        c = suites.CONTENDERS[name]
        assert (type(c).__name__, c.impl, c.backend, c.name) == (cls, impl, backend, name)
    assert suites.CONTENDERS["sdpa-math"].max_scores == 2**30
    assert suites.CONTENDERS["sdpa-efficient+mask"].explicit_mask
    assert suites.CONTENDERS["aule:triton kv-expanded"].expand_kv
    assert suites.CONTENDERS["aule:triton general"].env == {"AULE_TRITON_HOPPER": "0"}
    for s in suites.SUITES:  # every name a table uses is one registered instance
        assert all(c in suites.CONTENDERS for c in s.contenders), s.name
        assert s.baseline is None or s.baseline in s.contenders, s.name
    # The sweeps the scripts under benchmarks/ measured are suites, left out of --quick.
    for name in ("decode_tune", "vulkan_variants", "vulkan_variants_cpu", "llama_train"):
        assert not suites.SUITE_BY_NAME[name].quick


def test_launcher_tuning_configurations():
    class FakePaged:
        MAX_SPLITS = 64

        @staticmethod
        def choose_config(*args):
            return (16, 64, 4, 2, 6, 1)

    case = dict(B=8, Hq=32, Hkv=8, ctx=1024, D=128)
    tune = contenders.AulePagedLauncher
    assert tune()._config(case, FakePaged) is None
    assert tune((32, 8, 4))._config(case, FakePaged) == (16, 32, 8, 4, 6, 1)
    assert tune(("splits", 0.5))._config(case, FakePaged) == (16, 64, 4, 2, 3, 1)
    assert tune(("splits", 0))._config(case, FakePaged) == (16, 64, 4, 2, 1, 1)
    with pytest.raises(runner.Skip, match="automatic"):
        tune((64, 4, 2))._config(case, FakePaged)


def test_forced_vulkan_variants_only_on_their_dtype():
    fp16 = suites.CONTENDERS["aule:vulkan fp16 64,32,256,16"]
    assert fp16.why_skip(_case(dtype="float32")) and not fp16.why_skip(_case(dtype="float16"))
    assert fp16.variant(_case()) == "fp16 tiles 64,32,256,16"
    with contenders._environ({"AULE_VULKAN_VARIANT": "fp16"}):
        assert os.environ["AULE_VULKAN_VARIANT"] == "fp16"
    assert os.environ.get("AULE_VULKAN_VARIANT") != "fp16"


def test_merging_a_suite_run_keeps_the_cards_measured_ceilings():
    from aule.bench import report

    ceilings = {"copy_tbps": 4.2, "matmul_bf16_tflops": 769.0}
    old = {"machine": {"name": "m", "date": "d0", "gpu": {"name": "G", "ceilings": ceilings}},
           "suites": {"dense": {"rows": [1]}}}
    new = {"machine": {"name": "m", "date": "d1", "gpu": {"name": "G"}}, "suites": {"vulkan": {"rows": [2]}}}
    merged = report.merge_results(old, new)
    assert merged["machine"]["gpu"]["ceilings"] == ceilings and merged["machine"]["gpu"]["ceilings_date"] == "d0"
    assert set(merged["suites"]) == {"dense", "vulkan"} and merged["machine"]["date"] == "d1"
    assert "ceilings" not in new["machine"]["gpu"]  # the run's own record is left as measured
    fresh = {"machine": {"name": "m", "gpu": {"name": "G", "ceilings": {"copy_tbps": 1.0}}}, "suites": {}}
    assert report.merge_results(old, fresh)["machine"]["gpu"]["ceilings"] == {"copy_tbps": 1.0}


def test_vulkan_suite_has_the_rows_and_targets_of_issue_13():
    s = suites.SUITE_BY_NAME["vulkan"]
    labels = [suites.case_label(p) for p in s.cases]
    assert len(set(labels)) == len(labels), "rows are matched by label: fp32 and fp16 cases need their tags"
    want = {"fwd B1 H32 hd128 s4k causal float16", "fwd B1 H32 hd64 s4k causal float16",
            "fwd B1 H32 hd128 s16k full float16", "fwd B1 H32/8 hd128 s512x16k causal float16",
            "fwd B1 H32 hd128 s4k causal float32", "fwd B1 H32 hd64 s16k causal float32"}
    assert want <= set(labels)
    assert want - {"fwd B1 H32 hd64 s16k causal float32"} <= {labels[i] for i in s.quick}
    assert s.ceiling == "vulkan_coopmat" and s.ceiling in report.CEILINGS
    goals = {}
    for t in s.targets:
        rows = [suites.case_label(p) for p in s.cases if suites.matches(p, t.where)]
        assert rows and t.contender == "aule:vulkan resident" and t.baseline is None, t.text
        goals.update({r: goals.get(r, ()) + (t.value,) for r in rows})
    assert goals["fwd B1 H32 hd128 s4k causal float16"] == (150.0,)  # the old >= 20 is superseded
    assert goals["fwd B1 H32 hd64 s4k causal float16"] == (120.0,)
    assert goals["fwd B1 H32 hd128 s16k full float16"] == (200.0,)
    assert goals["fwd B1 H32/8 hd128 s512x16k causal float16"] == (100.0,)
    assert goals["fwd B1 H32 hd128 s4k causal float32"] == (10.0,)
    assert all(len(v) == 1 for v in goals.values())


def _vulkan_or_skip():
    if not inputs.backend_info().get("vulkan", {}).get("available"):
        pytest.skip(f"no Vulkan: {inputs.backend_info().get('vulkan', {}).get('reason')}")


def test_vulkan_suite_contenders_on_a_chunked_prefill(monkeypatch):
    """The Vulkan suite's contenders (lavapipe here) on a small chunked prefill: causal bottom-right
    over a longer cache, GQA. SDPA gets the bottom-right mask (its is_causal is top-left), the
    resident rows are timed in batched submissions, and what the device lacks skips with a reason."""
    _vulkan_or_skip()
    from aule.backends.vulkan import runtime

    case = _case(S=16, Sk=80, Hq=4, Hkv=2, D=32, dtype="float16", device="auto")
    res = _run(_suite([case], ["aule:vulkan resident", "aule:vulkan fp16", "aule:vulkan coopmat", "torch-sdpa",
                               "sdpa-flash"], baseline="torch-sdpa"))
    rows = _by_contender(res)
    for name in ("aule:vulkan resident", "aule:vulkan fp16", "torch-sdpa"):
        r = rows[name]
        assert r["status"] == "ok", r
        assert r["err"] < checks.tolerance("float16") and r["ms"] > 0
    for name in ("aule:vulkan resident", "aule:vulkan fp16"):
        r = rows[name]
        assert r["calls_per_submission"] >= 1 and r["reps"] >= timing.DEVICE_MIN_REPS and r["wall_ms"] > 0
        assert "back to back in one submission" in r["clock"]
    assert rows["sdpa-flash"]["status"] in ("skipped", "ok")
    coop = rows["aule:vulkan coopmat"]
    if runtime.context().info.coopmat_f16:
        assert coop["status"] == "ok", coop
    else:
        assert coop["status"] == "skipped" and "VK_KHR_cooperative_matrix" in coop["note"]


def test_repeated_attention_reruns_the_call_it_recorded():
    _vulkan_or_skip()
    from aule.backends.vulkan import attention, repeated_attention, to_gpu

    rng = np.random.default_rng(3)
    q = to_gpu(rng.standard_normal((1, 4, 24, 32)).astype(np.float32))
    k, v = (to_gpu(rng.standard_normal((1, 2, 40, 32)).astype(np.float32)) for _ in range(2))
    one, _, ns = attention(q, k, v, causal=True, timestamps=True)
    work = repeated_attention(q, k, v, causal=True, repeat=7)
    try:
        if ns is None:
            assert work.ms() is None
        else:
            assert all(work.ms() > 0 for _ in range(3))
        np.testing.assert_array_equal(work._owned[0].numpy(), one.numpy())
    finally:
        work.close()
    with pytest.raises(TypeError, match="GpuTensor"):
        repeated_attention(q.numpy(), k.numpy(), v.numpy(), repeat=2)
    with pytest.raises(ValueError, match="repeat"):
        repeated_attention(q, k, v, repeat=0)


def test_device_timer_warms_up_right_before_enough_repeats():
    stamps = []

    def measure():
        stamps.append(time.perf_counter())
        return 1.0 + 0.01 * (len(stamps) % 3)

    t = timing.reported_time(measure, warmup_s=0.05, min_reps=20, min_s=0.02)
    assert t["reps"] >= 20 and t["ms_p20"] <= t["ms"] <= t["ms_p80"]
    timed = stamps[-t["reps"]:]
    warm = stamps[1:-t["reps"]]  # the first call only asks whether the device reports times
    # No pause between the warm-up and the repeats: the gap is one call's, far under the warm-up's
    # 50 ms (a loaded machine's scheduler has stretched one such gap to 12 ms).
    assert warm[-1] - warm[0] >= 0.05 * 0.9 and timed[0] - warm[-1] < 0.04
    assert timing.reported_time(lambda: None) is None
    few = timing.reported_time(lambda: (time.sleep(0.02), 2.0)[1], warmup_s=0, min_reps=50, max_s=0.1)
    assert 3 <= few["reps"] < 50  # long calls stop at max_s
    assert timing.batch_size(1.0) == 20 and timing.batch_size(500.0) == 1
    assert timing.batch_size(1e-4) == timing.DEVICE_MAX_BATCH


def _vulkan_results(ceilings):
    rows = [{"case": "c", "contender": "aule:vulkan resident", "status": "ok", "tflops": 150.0, "ms": 2.0,
             "params": {"S": 4096}, "calls_per_submission": 10, "clock": "Vulkan timestamps"},
            {"case": "c", "contender": "sdpa-flash", "status": "skipped", "note": "no kernel", "params": {"S": 4096}}]
    machine = {"name": "m", "date": "d", "cpu": {"model": "X", "cores": 2}, "gpu": None, "versions": {},
               "python": "3", "vulkan": {"available": True, "device": {"name": "G", "type": "discrete-gpu", "driver": "d"}},
               "vulkan_ceilings": ceilings}
    return {"machine": machine,
            "suites": {"vulkan": {"status": "ran", "title": "Vulkan", "metric": "tflops", "baseline": None,
                                  "ceiling": "vulkan_coopmat", "rows": rows, "notes": []}}}


def test_report_gives_each_row_its_fraction_of_the_measured_peak(tmp_path):
    res = _vulkan_results({"coopmat_f16_tflops": 600.0, "shape": "16x16x16"})
    table = report.suite_table(res["suites"]["vulkan"], res["machine"])
    head, _, first, second = table.splitlines()[2:6]
    assert "| of peak |" in head
    assert "| 150 | 25% |" in first and "10 calls per submission" in first
    assert "| skip | — |" in second
    assert "Of peak: fraction of the fp16 cooperative-matrix peak measured through Vulkan" in table
    assert "600 TFLOP/s at 16x16x16" in table
    assert "cooperative-matrix peak 600 TFLOP/s at 16x16x16" in report.full_markdown(res)
    path = tmp_path / "m.json"
    report.write_json(str(path), res)
    assert "Measured ceiling: the fp16 cooperative-matrix peak" in report.readme_section([str(path)], str(tmp_path))
    # A row's fraction is read against the run that measured its suite, whatever a later run merged.
    later = _vulkan_results({"coopmat_f16_tflops": 300.0, "shape": "16x8x16"})
    later["suites"] = {"cpu": {**res["suites"]["vulkan"], "ceiling": None}}
    merged = report.merge_results(dict(res, suite_machines={"vulkan": res["machine"]}), later)
    assert merged["machine"]["vulkan_ceilings"]["coopmat_f16_tflops"] == 300.0
    assert "| 150 | 25% |" in report.full_markdown(merged) and "| 150 | 50% |" not in report.full_markdown(merged)
    # A later run that measured no ceiling keeps the one on record, dated.
    del later["machine"]["vulkan_ceilings"]
    kept = report.merge_results(res, later)["machine"]["vulkan_ceilings"]
    assert kept["coopmat_f16_tflops"] == 600.0 and kept["date"] == "d"
    # No ceiling measured: no column, and the table says why.
    skipped = _vulkan_results({"skipped": "llvmpipe lacks VK_KHR_cooperative_matrix"})
    table = report.suite_table(skipped["suites"]["vulkan"], skipped["machine"])
    assert "of peak" not in table.splitlines()[2]
    assert "No fraction of the fp16 cooperative-matrix peak" in table and "llvmpipe lacks" in table


def test_causal_flops_over_a_longer_cache_count_the_bottom_right_pairs():
    # q_len 512 over 16k keys, causal bottom-right: row i sees 16384 - 512 + i + 1 keys, nearly all
    # of them, not half (the halving holds only for square causal problems).
    from aule.bench.metrics import attention_flops

    p = dict(mode="fwd", B=1, Hq=32, S=512, Sk=16384, D=128, causal=True, window=-1)
    pairs = sum(16384 - 512 + i + 1 for i in range(512))
    assert attention_flops(p) == 4.0 * 32 * 128 * pairs
    square = dict(p, S=4096, Sk=4096)
    assert attention_flops(square) == 4.0 * 32 * 128 * 4096 * 4096 / 2


# --------------------------------------------------------------------------------------------
# The features suite (issue 15) and the decode suite's graph replay (issue 14)

def _features_case(pack, **kw):
    p = dict(mode="fwd", B=3, Hq=4, Hkv=2, S=48, D=32, causal=False, window=-1, dtype="float16", device="cpu",
             lengths=(48, 20, 7), pack=pack, tag="float16")
    p.update(kw)
    return p


def _features_suite(cases, contenders_=None, **kw):
    """The features suite's table on other cases (and contenders), runnable on this machine."""
    base = suites.SUITE_BY_NAME["features"]
    fields = {**base.__dict__, "name": "t", "cases": tuple(cases), "needs": "cpu", **kw}
    if contenders_ is not None:
        fields["contenders"] = tuple(contenders_)
    return suites.Suite(**fields)


def test_features_suite_has_the_checks_of_issue_15():
    s = suites.SUITE_BY_NAME["features"]
    labels = [suites.case_label(p) for p in s.cases]
    assert len(set(labels)) == len(labels)
    assert labels == ["fwd B1 H32 hd128 s4k causal", "fwd B1 H32 hd128 s4k full",
                      "fwd B4 H32 hd128 s4k keys 4k/3k/2k/1k full float16",
                      "fwd B4 H32 hd128 varlen 4k/3k/2k/1k full float16"]
    assert s.needs == "gpu" and s.baseline == "aule:triton" and s.quick == tuple(range(4))
    against = {**{b: b for _, b in s.against}, **dict(s.against)}  # a pair's baseline is its own (as the runner's)
    for name in s.contenders:  # every contender has a row on some case, and its baseline a row there too
        c = suites.CONTENDERS[name]
        on = [p for p in s.cases if c.applies(p)]
        assert on, name
        base = suites.CONTENDERS[against.get(name, s.baseline)]
        assert all(base.applies(p) for p in on), name
    for t in s.targets:
        assert t.contender in s.contenders and t.baseline in s.contenders and t.value == 0.9, t.text
        rows = [p for p in s.cases if suites.matches(p, t.where) and suites.CONTENDERS[t.contender].applies(p)]
        assert rows and all(suites.CONTENDERS[t.baseline].applies(p) for p in rows), t.text
    texts = " ".join(t.text for t in s.targets)
    for word in ("softcap", "sinks", "alibi", "key-padding mask", "varlen", "Vulkan", "Triton"):
        assert word in texts
    padded, varlen = s.cases[2], s.cases[3]
    assert padded["lengths"] == varlen["lengths"] == (4096, 3072, 2048, 1024)
    # FLOPs of visible pairs only: queries see a prefix of keys; packed sequences see themselves.
    assert runner.attention_flops(padded) == 4.0 * 32 * 128 * 4096 * (4096 + 3072 + 2048 + 1024)
    assert runner.attention_flops(varlen) == 4.0 * 32 * 128 * sum(n * n for n in (4096, 3072, 2048, 1024))


def test_visible_pairs_under_padding_and_causal():
    from aule.bench.metrics import visible_pairs

    for sq, sk, causal, window, limit in [(7, 7, True, -1, 4), (5, 9, True, -1, 6), (6, 6, False, (1, 2), 3),
                                          (8, 8, False, -1, None), (4, 10, True, 3, 8)]:
        vis = masks.mask(sq, sk, *masks.canonical_window(causal, window))
        if limit is not None:
            vis = vis & (np.arange(sk) < limit)[None, :]
        assert visible_pairs(sq, sk, causal, window, limit) == vis.sum()


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_reference_applies_every_feature_like_the_oracle(causal, monkeypatch):
    monkeypatch.setattr(checks, "BLOCK_SCORES", 2 * 4 * 16)  # many blocks
    rng = np.random.default_rng(5)
    b, hq, hk, sq, sk, d = 2, 4, 2, 13, 21, 8
    q, k, v = (rng.standard_normal(s) * 2 for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
    padding = inputs.padding_mask((21, 9), sk)
    general = rng.random((b, 1, sq, sk)) > 0.3
    for features in ({"softcap": 1.5}, {"alibi_slopes": rng.random(hq)}, {"alibi_slopes": rng.random((b, hq))},
                     {"sinks": rng.standard_normal(hq) + 2}, {"attn_mask": padding}, {"attn_mask": general},
                     {"softcap": 3.0, "alibi_slopes": rng.random(hq), "sinks": rng.standard_normal(hq),
                      "attn_mask": padding}):
        want = attention_reference(q, k, v, causal=causal, **features)
        got = checks.blocked_reference(*(torch.from_numpy(x) for x in (q, k, v)), causal, -1, **features)
        np.testing.assert_allclose(got.numpy(), want, atol=1e-12, err_msg=str(list(features)))
    # The features change the answer (so a contender that drops one is caught).
    plain = checks.blocked_reference(*(torch.from_numpy(x) for x in (q, k, v)), causal, -1)
    capped = checks.blocked_reference(*(torch.from_numpy(x) for x in (q, k, v)), causal, -1, softcap=1.5)
    assert checks.rel_err(capped, plain) > 1e-2


def test_padded_and_packed_inputs_hold_the_same_work_unpadded():
    p = _features_case("mask", B=3)
    inp = inputs.PaddedInputs(p)
    s = inp.sets[0]
    for b, (q, k, v) in enumerate(inp.pieces(0)):
        n = p["lengths"][b]
        assert q.shape == (1, 4, 48, 32) and k.shape == (1, 2, n, 32) and k.is_contiguous()
        assert torch.equal(k[0], s["k"][b, :, :n]) and torch.equal(q[0], s["q"][b])
    assert torch.equal(inp.assemble([x[0] for x in inp.pieces(0)]), s["q"])
    vp = _features_case("varlen")
    vin = inputs.VarlenInputs(vp)
    vs = vin.sets[0]
    assert vs["q"].shape == (75, 4, 32) and vs["k"].shape == (75, 2, 32) and vs["q"].is_contiguous()
    assert vs["cu_seqlens"].tolist() == [0, 48, 68, 75] and vs["cu_seqlens"].dtype == torch.int32
    pieces = vin.pieces(0)
    assert [x[0].shape[2] for x in pieces] == [48, 20, 7]
    assert torch.equal(pieces[1][1][0, :, 3], vs["k"][48 + 3])
    assert torch.equal(vin.assemble([x[0] for x in pieces]), vs["q"])
    hp = vin.pieces(0, host=True)
    assert isinstance(hp[2][0], np.ndarray) and hp[2][0].flags.c_contiguous
    np.testing.assert_array_equal(vin.assemble([x[0] for x in hp]), vin.host_sets()[0]["q"])
    with pytest.raises(ValueError, match="lengths"):
        inputs.PaddedInputs(_features_case("mask", lengths=(48, 49, 1)))


def _numpy_feature_contenders(monkeypatch):
    """The features suite's contenders on aule's NumPy backend (its Triton rows, the same code)."""
    extra = {"np": contenders.AuleDense("numpy"),
             **{f"np {f}": contenders.AuleDense("numpy", feature=f) for f in ("softcap", "sinks", "alibi", "padding")},
             "np unpadded": contenders.AuleUnpadded("numpy"), "np varlen": contenders.AuleVarlen("numpy")}
    for name, c in extra.items():
        c.name = name
        monkeypatch.setitem(suites.CONTENDERS, name, c)
    return tuple(extra)


def test_feature_rows_are_checked_with_their_features(monkeypatch):
    names = _numpy_feature_contenders(monkeypatch)
    cases = [_case(S=40, causal=c, dtype="float16", Hq=4, Hkv=4) for c in (True, False)]
    cases += [_features_case("mask"), _features_case("varlen")]
    pairs = (("np padding", "np unpadded"), ("np varlen", "np unpadded"))
    res = _run(_features_suite(cases, names, baseline="np", against=pairs, targets=()))
    rows = {(r["case"], r["contender"]): r for r in res["rows"]}
    plain, padded, varlen = (suites.case_label(cases[i]) for i in (0, 2, 3))
    assert {c for case, c in rows if case == plain} == {"np", "np softcap", "np sinks", "np alibi"}
    assert {c for case, c in rows if case == padded} == {"np padding", "np unpadded"}
    assert {c for case, c in rows if case == varlen} == {"np varlen", "np unpadded"}
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["err"] < checks.tolerance("float16") and r["ratio"] > 0
    # Padded and unpadded are credited with the same visible work: the FLOP/s ratio is the time ratio.
    a, b = rows[(padded, "np padding")], rows[(padded, "np unpadded")]
    assert a["ratio"] == pytest.approx(b["ms"] / a["ms"]) and b["ratio"] == 1.0
    assert a["gflops"] / b["gflops"] == pytest.approx(a["ratio"])
    assert rows[(varlen, "np varlen")]["ratio"] == pytest.approx(rows[(varlen, "np unpadded")]["ms"]
                                                                 / rows[(varlen, "np varlen")]["ms"])
    table = report.suite_table(res)
    assert "| vs baseline |" in table and "np padding against np unpadded" in table


def test_a_contender_that_drops_its_feature_is_wrong(monkeypatch):
    names = _numpy_feature_contenders(monkeypatch)
    real = aule.flash_attention

    def without(q, k, v, softcap=0.0, attn_mask=None, **kw):
        return real(q, k, v, **kw)

    monkeypatch.setattr(aule, "flash_attention", without)
    res = _run(_features_suite([_case(S=40, dtype="float16"), _features_case("mask")],
                               [n for n in names if n in ("np softcap", "np padding", "np unpadded")],
                               baseline=None, against=(), targets=()))
    status = {r["contender"]: r["status"] for r in res["rows"]}
    assert status == {"np softcap": "wrong", "np padding": "wrong", "np unpadded": "ok"}


def test_padded_and_varlen_rows_on_vulkan(monkeypatch):
    """The features suite's Vulkan rows (a GPU-type device in real runs; lavapipe here): GpuTensors
    with the padding mask and the same work unpadded timed by Vulkan timestamps; varlen on NumPy
    arrays by the wall clock, the GPU time beside it. Triton rows are noted as not run here."""
    _vulkan_or_skip()
    monkeypatch.setattr(inputs, "vulkan_gpu_missing", lambda: None)
    cases = [_features_case("mask"), _features_case("varlen")]
    res = _run(_features_suite(cases))
    rows = {(r["case"], r["contender"]): r for r in res["rows"]}
    padded, varlen = (suites.case_label(p) for p in cases)
    for key in ((padded, "aule:vulkan resident padded"), (padded, "aule:vulkan resident unpadded"),
                (padded, "aule:vulkan resident unpadded, mask's variant"), (varlen, "aule:vulkan varlen"),
                (varlen, "aule:vulkan unpadded")):
        r = rows[key]
        assert r["status"] == "ok", r
        assert r["err"] < checks.tolerance("float16") and r["ms"] > 0 and r["ratio"] > 0
    for key in ((padded, "aule:vulkan resident padded"), (padded, "aule:vulkan resident unpadded")):
        r = rows[key]  # timed as the vulkan suite's rows: calls recorded back to back, then re-submitted
        assert "back to back in one submission" in r["clock"] and r["calls_per_submission"] >= 1
        assert r["reps"] >= timing.DEVICE_MIN_REPS and r["wall_ms"] > 0
    assert "submission of their own" in rows[(padded, "aule:vulkan resident unpadded")]["note"]
    vulkan_rows = {(case, c) for case, c in rows if c.startswith("aule:vulkan")}
    assert vulkan_rows == {(padded, "aule:vulkan resident padded"), (padded, "aule:vulkan resident unpadded"),
                           (padded, "aule:vulkan resident unpadded, mask's variant"), (varlen, "aule:vulkan varlen"),
                           (varlen, "aule:vulkan unpadded")}  # each with the row it is compared with, no more
    same = rows[(padded, "aule:vulkan resident unpadded, mask's variant")]
    assert same["variant"] == rows[(padded, "aule:vulkan resident padded")]["variant"]
    for key in ((varlen, "aule:vulkan varlen"), (varlen, "aule:vulkan unpadded")):
        r = rows[key]
        assert r["clock"].startswith("wall clock") and 0 < r["gpu_ms"] and r["gpu_ratio"] > 0
    assert "GPU" in report.suite_table(res) and "Vulkan timestamps" in report.suite_table(res)
    if not torch.cuda.is_available():
        assert any(n.startswith("aule:triton padded: not run") for n in res["notes"])


def test_features_suite_skips_cleanly_without_a_gpu(tmp_path):
    if not inputs.cuda_ready() or not inputs.vulkan_gpu_missing():
        pytest.skip("this machine has a GPU: the suite runs (see the GPU tests below)")
    out = tmp_path / "res"
    assert bench.main(["--suite", "features", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    data = json.loads(next(out.glob("*.json")).read_text())
    feat = data["suites"]["features"]
    assert feat["status"] == "skipped" and "needs a GPU" in feat["reason"] and feat["rows"] == []
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert bench.main(["--report", *map(str, out.glob("*.json")), "--no-plots", "--readme", str(readme)]) == 0
    assert "Attention features (issue 15)" in readme.read_text()  # under "Not run on this machine"


def test_report_of_a_suite_that_measured_nothing(tmp_path):
    """A suite that ran but has no row measured (every contender skipped, or no rows at all) still
    renders: its table, the targets (not measured), the README section, and the plots."""
    res = _full_results("m")
    feat = {"status": "ran", "title": "Features", "metric": "tflops", "baseline": "aule:triton", "quick": False,
            "notes": ["aule:triton: not run: no CUDA"], "against": {"aule:triton padded": "aule:triton unpadded"},
            "rows": [{"case": "c", "contender": "aule:triton padded", "status": "skipped", "note": "no GPU",
                      "params": {"pack": "mask"}}]}
    res["suites"]["features"] = feat
    res["suites"]["features_empty"] = {**feat, "rows": []}
    for name, suite in res["suites"].items():
        suite["name"] = name  # as the runner writes them
    md = report.full_markdown(res)
    assert "### Features" in md and "| c | aule:triton padded |" in md
    verdicts = {t["target"]: t["verdict"] for t in report.evaluate_targets(res) if t["suite"] == "features"}
    assert verdicts and set(verdicts.values()) == {"not measured"}
    path = tmp_path / "results" / "m.json"
    report.write_json(str(path), res)
    assert report.readme_section([str(path)], str(tmp_path)).rstrip().endswith(report.README_END)
    assert bench.main(["--report", str(path), "--readme", str(tmp_path / "README.md"), "--no-plots"]) == 0
    pytest.importorskip("matplotlib")
    report.plots(res, str(tmp_path))


def test_ratios_follow_each_contenders_baseline():
    from aule.bench.metrics import ratios

    rows = [{"case": c, "contender": n, "status": "ok", "ms": ms, **({"gpu_ms": g} if g else {})}
            for c, n, ms, g in (("a", "plain", 1.0, None), ("a", "feature", 2.0, None), ("b", "padded", 4.0, 1.0),
                                ("b", "unpadded", 3.0, 2.0), ("b", "plain", 1.0, None))]
    res = {"rows": rows, "against": {"padded": "unpadded", "unpadded": "unpadded"}}
    ratios(res, "plain")
    got = {(r["case"], r["contender"]): (r.get("ratio"), r.get("gpu_ratio")) for r in rows}
    assert got[("a", "feature")] == (0.5, None) and got[("a", "plain")] == (1.0, None)
    assert got[("b", "padded")] == (0.75, 2.0) and got[("b", "unpadded")] == (1.0, 1.0)


def test_graph_replay_row_is_never_timed_eagerly(monkeypatch):
    """The decode suite's graph contender is a CUDA-graph replay or nothing: on CPU tensors it
    skips, and a suite that times no graphs skips it rather than timing eager launches."""
    p = dict(B=2, Hq=4, Hkv=2, ctx=32, D=8, block=16, dtype="float32", device="cpu")
    graph = contenders.AulePaged(None, graph=True)
    graph.name = "paged graph"
    monkeypatch.setitem(suites.CONTENDERS, "paged graph", graph)
    row = _run(_suite([p], ["paged graph"], kind="decode", metric="tbps"))["rows"][0]
    assert row["status"] == "skipped" and "CUDA graph needs CUDA tensors" in row["note"]

    class FakeBound:
        graph_required, clock = True, "cuda"

    with pytest.raises(runner.Skip, match="does not time"):
        runner.Runner(progress=False)._time(_suite([p], [], kind="decode"), p, FakeBound())


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_gpu_decode_graph_replay_rows():
    p = dict(B=2, Hq=8, Hkv=2, ctx=256, D=64, block=16, dtype="float16", device="cuda")
    s = suites.Suite("t", "t", "decode", (p,), ("aule-paged:triton graph", "aule-paged:triton", "torch-sdpa"),
                     "torch-sdpa", "tbps", graphs=True)
    rows = _by_contender(runner.Runner(progress=False, quick=True).run([s])["t"])
    graph, eager = rows["aule-paged:triton graph"], rows["aule-paged:triton"]
    assert graph["status"] == "ok", graph
    assert graph["clock"] == "CUDA graph replay, CUDA events" and graph["replayed_err"] < checks.tolerance("float16")
    assert eager["status"] == "ok" and eager["clock"] == "CUDA events" and graph["tbps"] > 0


@needs_cuda
def test_gpu_features_rows_at_small_shapes(monkeypatch):
    cases = [_case(S=256, Hq=4, Hkv=4, D=64, dtype="bfloat16", device="cuda", causal=c) for c in (True, False)]
    cases += [_features_case(pack, S=256, lengths=(256, 100, 37), D=64, device="auto") for pack in ("mask", "varlen")]
    res = _run(_features_suite(cases, needs="gpu"))
    for r in res["rows"]:
        if r["contender"].startswith("aule:triton"):
            assert r["status"] == "ok", r
            assert r["err"] < checks.tolerance(r["params"]["dtype"]) and r["ratio"] > 0
        else:
            assert r["status"] in ("ok", "skipped"), r


# --------------------------------------------------------------------------------------------
# issue 16's guarantee: install() never slower than torch's own SDPA where measured

def _guarantee_suite(cases, **kw):
    """The guarantee suite's table on other cases, runnable on this machine."""
    base = suites.SUITE_BY_NAME["guarantee"]
    return suites.Suite(**{**base.__dict__, "name": "t", "cases": tuple(cases), "needs": "cpu", **kw})


def test_guarantee_suite_times_install_against_stock_sdpa():
    s = suites.SUITE_BY_NAME["guarantee"]
    assert s.needs == "cuda" and s.baseline == "torch-sdpa" and s.quick
    for name in ("torch-sdpa installed", "torch-sdpa+mask installed"):
        c = suites.CONTENDERS[name]
        assert (type(c).__name__, c.impl, c.backend, c.installed) == ("Sdpa", "sdpa", None, True)
    assert suites.CONTENDERS["torch-sdpa+mask"].explicit_mask and not suites.CONTENDERS["torch-sdpa"].installed
    assert dict(s.against) == {"torch-sdpa+mask installed": "torch-sdpa+mask"}
    labels = [suites.case_label(p) for p in s.cases]
    assert len(set(labels)) == len(labels)
    assert {p["mode"] for p in s.cases} == {"fwd", "fwd+bwd"} and any(p["Hq"] != p["Hkv"] for p in s.cases)
    assert any(p["window"] != -1 for p in s.cases)
    for t in s.targets:  # each target compares install() with stock on the same call, within 3%
        assert t.contender.endswith(" installed") and t.baseline == t.contender[:-len(" installed")], t.text
        assert t.value == suites.GUARANTEE_TOLERANCE == 0.97 and not t.at_most
        rows = [p for p in s.cases if suites.matches(p, t.where)]
        assert rows and all(suites.CONTENDERS[t.contender].why_skip(p) is None for p in rows), t.text
    # The dense cases are classes the H200's speed table hands to torch; hd 80 fp16 was not measured.
    from aule import speed_table

    table = speed_table.load()["NVIDIA H200"]
    dense = speed_table.ShapeClass.of(direction="fwd+bwd", dtype="bfloat16", head_dim=128, seq_k=4096, causal=True,
                                      gqa_ratio=4, masking="none")
    assert table.decide(dense).use_torch
    hd80 = speed_table.ShapeClass.of(direction="fwd", dtype="float16", head_dim=80, seq_k=2048, causal=True,
                                     gqa_ratio=1, masking="none")
    assert table.decide(hd80).how == "nearest"


def test_guarantee_rows_at_tiny_shapes():
    """The installed rows run through aule.install() (aule's CPU backends here), are checked
    against the reference like every row, and leave SDPA uninstalled afterwards."""
    from aule import torch_sdpa

    cases = [_case(S=40), _case(S=40, mode="fwd+bwd", Hq=2, Hkv=2), _case(S=48, window=16)]
    res = _run(_guarantee_suite(cases, contenders=("torch-sdpa", "torch-sdpa installed", "torch-sdpa+mask",
                                                   "torch-sdpa+mask installed")))
    rows = {(r["case"], r["contender"]): r for r in res["rows"]}
    for (case, contender), r in rows.items():
        if "w16" in case and contender in ("torch-sdpa", "torch-sdpa installed"):
            assert r["status"] == "skipped" and "window" in r["note"], r
        elif "fwd+bwd" in case and contender.endswith("installed"):
            assert r["status"] == "ok" and r["err"] < 1e-4, r  # CPU gradients: torch's SDPA serves them
        else:
            assert r["status"] == "ok" and r["err"] < 1e-5, r
    masked = rows[(suites.case_label(cases[2]), "torch-sdpa+mask installed")]
    assert masked["ratio"] > 0  # read against torch-sdpa+mask (the suite's against pair)
    assert not torch_sdpa.is_installed()


def test_installed_contender_calls_through_the_drop_in(monkeypatch):
    from aule import torch_sdpa

    seen = []
    real = torch_sdpa.scaled_dot_product_attention
    monkeypatch.setattr(torch_sdpa, "scaled_dot_product_attention",
                        lambda *a, **kw: seen.append(1) or real(*a, **kw))
    p = _case(S=32)
    inp = inputs.AttentionInputs(p)
    bound = suites.CONTENDERS["torch-sdpa installed"].prepare(p, inp)
    with bound.context():
        bound(0)
    assert seen == [1] and not torch_sdpa.is_installed()


def test_guarantee_suite_skips_cleanly_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the suite runs (test_gpu_guarantee_rows_at_small_shapes)")
    out = tmp_path / "res"
    assert bench.main(["--suite", "guarantee", "--out", str(out), "--no-progress", "--no-plots"]) == 0
    g = json.loads(next(out.glob("*.json")).read_text())["suites"]["guarantee"]
    assert g["status"] == "skipped" and "CUDA" in g["reason"] and g["rows"] == []


@needs_cuda
def test_gpu_guarantee_rows_at_small_shapes():
    cases = [_case(S=256, Hq=4, Hkv=4, D=64, dtype="bfloat16", device="cuda"),
             _case(S=256, Hq=4, Hkv=2, D=64, dtype="bfloat16", device="cuda", mode="fwd+bwd"),
             _case(S=256, Hq=4, Hkv=4, D=64, dtype="bfloat16", device="cuda", window=64)]
    res = runner.Runner(progress=False, quick=True).run([suites.Suite(
        **{**suites.SUITE_BY_NAME["guarantee"].__dict__, "name": "t", "cases": tuple(cases)})])["t"]
    for r in res["rows"]:
        if "w64" in r["case"] and r["contender"] in ("torch-sdpa", "torch-sdpa installed"):
            assert r["status"] == "skipped", r
        else:
            assert r["status"] == "ok", r
            assert r["err"] < checks.tolerance("bfloat16", r["params"]["mode"] == "fwd+bwd")
            # A window's torch-sdpa row is skipped, so only the installed masked row (against the
            # masked one) has a baseline there.
            if "w64" not in r["case"] or r["contender"] == "torch-sdpa+mask installed":
                assert r["ratio"] > 0, r

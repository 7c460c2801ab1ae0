"""The speed table behind the drop-in's guarantee (never slower than stock SDPA where measured):
its classes and lookup, its derivation from the committed benchmark results, the routing it
drives in the SDPA drop-in (a fake GPU name and a fake original SDPA stand in for the H200), the
log-once, the AULE_PREFER_TORCH setting and what ``aule info`` prints."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from aule import settings, speed_table
from aule.cli import main, speed_table_lines
from aule.speed_table import ShapeClass

torch = pytest.importorskip("torch")
F = torch.nn.functional

from aule import sdpa_core, torch_sdpa  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"
H200 = "NVIDIA H200"


def _cls(**kw):
    p = dict(direction="fwd", dtype="bfloat16", head_dim=128, seq_k=4096, causal=True, gqa_ratio=1, masking="none")
    p.update(kw)
    return ShapeClass.of(**p)


# --------------------------------------------------------------------------------------------
# classes and lookup

def test_buckets_round_up_to_powers_of_two():
    c = _cls(head_dim=80, seq_k=3000, gqa_ratio=3)
    assert (c.head_dim, c.seq, c.gqa) == (128, 4096, 4)
    assert _cls(seq_k=1).seq == 1024 and _cls(seq_k=1024).seq == 1024 and _cls(seq_k=1025).seq == 2048
    assert _cls(head_dim=64).head_dim == 64 and _cls(head_dim=65).head_dim == 128
    assert c.key == "fwd bfloat16 hd128 s4k causal gqa4 none"
    assert ShapeClass.parse(c.key) == c
    assert ShapeClass.parse("fwd+bwd float16 hd64 s1k full gqa1 window") == _cls(
        direction="fwd+bwd", dtype="float16", head_dim=64, seq_k=1024, causal=False, masking="window")


@pytest.mark.parametrize("bad", ["fwd bfloat16 hd128 s4k causal gqa1", "bwd bfloat16 hd128 s4k causal gqa1 none",
                                 "fwd bfloat16 x128 s4k causal gqa1 none", "fwd bfloat16 hd128 s4k sideways gqa1 none",
                                 "fwd bfloat16 hd128 s4k causal gqa1 padded"])
def test_malformed_keys_are_refused(bad):
    with pytest.raises(ValueError, match="shape-class key"):
        ShapeClass.parse(bad)


def test_bad_class_arguments_name_the_rule():
    with pytest.raises(ValueError, match="direction"):
        _cls(direction="bwd")
    with pytest.raises(ValueError, match="masking"):
        _cls(masking="padded")
    with pytest.raises(ValueError, match="head_dim"):
        _cls(head_dim=0)


def _table(gpu, classes, source="results/fake.json"):
    raw = {"format": 1, "gpus": {gpu: {"source": source, "commit": "abc1234", "classes": {
        key: {"ratio": r, "aule_ms": 1.0, "torch_ms": r, "torch_backend": "sdpa-cudnn", "cases": ["c"]}
        for key, r in classes.items()}}}}
    return speed_table.parse(raw)


def test_measured_class_decides_and_says_where_it_came_from():
    tables = _table("G", {"fwd bfloat16 hd128 s4k causal gqa1 none": 0.8,
                          "fwd bfloat16 hd128 s4k causal gqa1 window": 5.0})
    d = speed_table.decide("G", _cls(), tables)
    assert d.use_torch and d.how == "measured" and d.entry.ratio == 0.8
    assert "0.80x" in d.why() and "results/fake.json @ abc1234" in d.why() and "torch SDPA" in d.why()
    w = speed_table.decide("G", _cls(masking="window"), tables)
    assert not w.use_torch and w.how == "measured"


def test_unmeasured_classes_follow_the_nearest_of_their_kind():
    tables = _table("G", {"fwd bfloat16 hd128 s4k causal gqa1 none": 0.8,
                          "fwd bfloat16 hd64 s1k causal gqa1 none": 1.2,
                          "fwd+bwd bfloat16 hd64 s1k causal gqa1 none": 0.9})
    near = speed_table.decide("G", _cls(head_dim=96, seq_k=8192), tables)  # 1 step from hd128 s4k
    assert near.use_torch and near.how == "nearest" and near.entry.cls.key.startswith("fwd bfloat16 hd128 s4k")
    assert "nearest measured class" in near.why()
    fp16 = speed_table.decide("G", _cls(dtype="float16", head_dim=64, seq_k=900), tables)  # half a step
    assert not fp16.use_torch and fp16.entry.ratio == 1.2
    # Training calls look at forward+backward measurements only: hd128 s4k has none, hd64 s1k says torch.
    assert speed_table.decide("G", _cls(direction="fwd+bwd"), tables).entry.ratio == 0.9
    # float32, an attn_mask or a window: no measurement of that kind, aule's kernel is kept.
    for cls in (_cls(dtype="float32"), _cls(masking="mask"), _cls(masking="window")):
        d = speed_table.decide("G", cls, tables)
        assert not d.use_torch and d.how == "unmeasured" and "no measurement" in d.why()
    other = speed_table.decide("Other GPU", _cls(), tables)
    assert not other.use_torch and other.how == "no entry" and "no speed-table entry for Other GPU" in other.why()


def test_ties_go_to_the_cautious_side():
    tables = _table("G", {"fwd bfloat16 hd128 s2k causal gqa1 none": 1.1,
                          "fwd bfloat16 hd128 s8k causal gqa1 none": 0.95})
    d = speed_table.decide("G", _cls(seq_k=4096), tables)
    assert d.how == "nearest" and d.use_torch and d.entry.ratio == 0.95


def test_malformed_table_is_refused():
    with pytest.raises(ValueError, match="format"):
        speed_table.parse({"gpus": {}})
    with pytest.raises(ValueError, match="shape-class key"):
        _table("G", {"nonsense": 1.0})


# --------------------------------------------------------------------------------------------
# the shipped table and its derivation

def test_shipped_table_has_the_h200_measurements():
    t = speed_table.load()[H200]
    assert t.source.startswith("results/nvidia-h200.json @ ")
    dense = t.entries["fwd bfloat16 hd128 s4k causal gqa1 none"]
    assert dense.faster == "torch" and dense.torch_backend == "sdpa-cudnn" and 0.5 < dense.ratio < 1.0
    train = t.entries["fwd+bwd bfloat16 hd128 s4k causal gqa8 none"]
    assert train.faster == "torch" and train.ratio < 1.0
    assert t.entries["fwd bfloat16 hd128 s8k causal gqa1 window"].faster == "aule"
    # A Llama-like training call (hd 128, GQA 32/8 = 4, seq 4096, causal) goes to torch.
    assert speed_table.decide(H200, _cls(direction="fwd+bwd", gqa_ratio=4)).use_torch


@pytest.mark.parametrize("name", ["nvidia-h200", "nvidia-h100-80gb-hbm3"])
def test_shipped_table_is_what_the_committed_results_derive(name):
    path = RESULTS / f"{name}.json"
    derived = speed_table.derive(json.loads(path.read_text()), f"results/{path.name}")
    shipped = json.loads(speed_table.TABLE_FILE.read_text())["gpus"]
    for gpu, entry in derived.items():
        assert shipped[gpu] == json.loads(json.dumps(entry)), gpu


def _result(capability, rows, gpu="G"):
    machine = {"gpu": {"name": gpu, "capability": capability, "cudnn": 1}, "versions": {"aule_commit": "c0ffee1"},
               "date": "d"}
    return {"machine": machine, "suite_machines": {"dense": machine}, "suites": {"dense": {"status": "ran", "rows": [
        {"case": case, "contender": c, "status": "ok", "ms": ms,
         "params": dict(mode="fwd", B=1, Hq=8, Hkv=8, S=s, D=128, causal=True, window=-1, dtype="bfloat16",
                        device="cuda")}
        for case, s, c, ms in rows]}}}


def test_derive_compares_with_torchs_default_backend():
    rows = [("a", 1024, "aule:triton", 1.0), ("a", 1024, "sdpa-flash", 1.3), ("a", 1024, "sdpa-cudnn", 0.8),
            ("b", 900, "aule:triton", 4.0), ("b", 900, "sdpa-flash", 5.2), ("b", 900, "sdpa-cudnn", 3.2)]
    hopper = speed_table.derive(_result("9.0", rows), "results/x.json")["G"]
    c = hopper["classes"]["fwd bfloat16 hd128 s1k causal gqa1 none"]
    # cuDNN leads torch's order on 9.x; cases of one class combine by geometric means.
    assert c["torch_backend"] == "sdpa-cudnn" and c["faster"] == "torch" and c["cases"] == ["a", "b"]
    assert c["ratio"] == pytest.approx(0.8, abs=1e-3) and c["aule_ms"] == pytest.approx(2.0)
    assert hopper["commit"] == "c0ffee1" and hopper["source"] == "results/x.json"
    ampere = speed_table.derive(_result("8.0", rows), "results/x.json")["G"]["classes"]
    assert ampere["fwd bfloat16 hd128 s1k causal gqa1 none"]["torch_backend"] == "sdpa-flash"
    assert ampere["fwd bfloat16 hd128 s1k causal gqa1 none"]["faster"] == "aule"
    # A measured row of torch's own choice is the most faithful stand-in.
    own = speed_table.derive(_result("9.0", rows[:3] + [("a", 1024, "torch-sdpa", 1.1)]), "r")["G"]["classes"]
    assert own["fwd bfloat16 hd128 s1k causal gqa1 none"]["torch_backend"] == "torch-sdpa"


def test_derive_script_writes_a_table_the_loader_reads(tmp_path, capsys):
    out = tmp_path / "table.json"
    src = tmp_path / "m.json"
    src.write_text(json.dumps(_result("9.0", [("a", 1024, "aule:triton", 1.0), ("a", 1024, "sdpa-cudnn", 0.8)])))
    assert speed_table.main([str(src), "--out", str(out)]) == 0
    assert "G: 1 classes, 1 to torch" in capsys.readouterr().out
    tables = speed_table.parse(json.loads(out.read_text()))
    assert tables["G"].entries["fwd bfloat16 hd128 s1k causal gqa1 none"].faster == "torch"


def test_table_ships_with_the_package():
    root = Path(__file__).resolve().parent.parent
    assert '"speed_table.json"' in (root / "pyproject.toml").read_text()
    assert "aule/speed_table.json" in (root / "MANIFEST.in").read_text()


# --------------------------------------------------------------------------------------------
# routing in the SDPA drop-in

@pytest.fixture
def fake_gpu(monkeypatch):
    """CPU tensors read as a GPU named 'Fake GPU' whose table says torch is faster for dense
    float32 forward hd 32 and aule faster for the same with gradients; torch's original SDPA is a
    recording stand-in."""
    tables = _table("Fake GPU", {"fwd float32 hd32 s1k causal gqa1 none": 0.5,
                                 "fwd float32 hd32 s1k full gqa1 none": 1.5,
                                 "fwd+bwd float32 hd32 s1k causal gqa1 none": 0.7})
    monkeypatch.setattr(speed_table, "load", lambda: tables)
    monkeypatch.setattr(sdpa_core, "_DECISIONS", {})
    monkeypatch.setattr(sdpa_core, "gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(sdpa_core._state, "logged", set())
    monkeypatch.delenv("AULE_PREFER_TORCH", raising=False)
    monkeypatch.delenv("AULE_BACKEND", raising=False)
    real = sdpa_core._ORIGINAL_SDPA
    calls = []

    def recording(*a, **kw):
        calls.append(kw.get("is_causal"))
        return real(*a, **kw)

    monkeypatch.setattr(sdpa_core, "_ORIGINAL_SDPA", recording)
    yield calls
    torch_sdpa.uninstall()


def _qkv(s=40, d=32, grad=False):
    g = torch.Generator().manual_seed(3)
    return [torch.randn(1, 2, s, d, generator=g).requires_grad_(grad) for _ in range(3)]


def test_measured_faster_class_goes_to_torch(fake_gpu):
    q, k, v = _qkv()
    torch_sdpa.install()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fake_gpu == [True], "the causal class is measured faster on torch"
    expect = torch_sdpa._ORIGINAL_SDPA(q, k, v, is_causal=True)
    torch.testing.assert_close(out, expect)
    F.scaled_dot_product_attention(q, k, v)  # full: aule measured faster, aule serves it
    assert fake_gpu == [True]


def test_aule_serves_the_class_torch_is_not_faster_on(fake_gpu):
    q, k, v = _qkv()
    torch_sdpa.install()
    out = F.scaled_dot_product_attention(q, k, v)
    assert fake_gpu == []
    torch.testing.assert_close(out, torch_sdpa._ORIGINAL_SDPA(q, k, v), atol=1e-5, rtol=1e-5)


def test_a_mask_or_a_forced_backend_keeps_aule(fake_gpu, monkeypatch):
    q, k, v = _qkv()
    mask = torch.ones(40, 40, dtype=torch.bool).tril()
    torch_sdpa.install()
    F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # class 'mask': unmeasured, aule kept
    assert fake_gpu == []
    torch_sdpa.install(backend="numpy")
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fake_gpu == []
    torch_sdpa.install()
    monkeypatch.setenv("AULE_BACKEND", "numpy")
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fake_gpu == []


def test_training_calls_are_decided_by_the_fwd_bwd_class(fake_gpu, caplog):
    q, k, v = _qkv(grad=True)
    d = sdpa_core.decision("Fake GPU", sdpa_core.call_class(q, k, -1, 0, True, False))
    assert d.use_torch and d.cls.direction == "fwd+bwd" and d.entry.ratio == 0.7
    with caplog.at_level(logging.INFO, logger="aule"):
        torch_sdpa.install()
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
    assert fake_gpu == [True] and q.grad is not None
    assert any("fwd+bwd float32 hd32 s1k causal" in r.getMessage() and "0.70x" in r.getMessage()
               for r in caplog.records)


def test_the_reason_is_logged_once_per_class(fake_gpu, caplog):
    q, k, v = _qkv()
    q2, k2, v2 = _qkv(s=60)  # the same class (keys <= 1024)
    with caplog.at_level(logging.INFO, logger="aule"):
        torch_sdpa.install()
        for a in ((q, k, v), (q, k, v), (q2, k2, v2)):
            F.scaled_dot_product_attention(*a, is_causal=True)
    assert fake_gpu == [True, True, True]
    said = [r for r in caplog.records if "torch SDPA serves" in r.getMessage() and "0.50x" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.INFO and said[0].name == "aule"
    assert "results/fake.json @ abc1234" in said[0].getMessage()


def test_prefer_torch_setting_turns_it_off(fake_gpu, monkeypatch):
    monkeypatch.setenv("AULE_PREFER_TORCH", "0")
    q, k, v = _qkv()
    torch_sdpa.install()
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fake_gpu == []
    monkeypatch.setenv("AULE_PREFER_TORCH", "1")
    F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert fake_gpu == [True]


def test_prefer_torch_setting_is_parsed(monkeypatch):
    for raw, want in (("", True), ("1", True), (" on ", True), ("0", False), ("off", False), ("no", False)):
        monkeypatch.setenv("AULE_PREFER_TORCH", raw)
        assert settings.prefer_torch() is want, raw
    monkeypatch.delenv("AULE_PREFER_TORCH")
    assert settings.prefer_torch() is True
    monkeypatch.setenv("AULE_PREFER_TORCH", "maybe")
    with pytest.raises(ValueError, match="AULE_PREFER_TORCH='maybe'"):
        settings.prefer_torch()


def test_flash_attention_keeps_aules_kernel(fake_gpu):
    import aule

    q, k, v = _qkv()
    torch_sdpa.install()
    aule.flash_attention(q, k, v, causal=True)
    assert fake_gpu == []


def test_compiled_calls_follow_the_table(fake_gpu, caplog):
    """Inside torch.compile the decision is a constant of the graph, made for the bucket (and said
    once, while tracing)."""
    torch._dynamo.reset()
    torch_sdpa.install()

    def f(q, k, v, causal: bool):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal) * 2

    g = torch.compile(f, backend="eager")
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="aule"):
        torch.testing.assert_close(g(q, k, v, True), 2 * torch_sdpa._ORIGINAL_SDPA(q, k, v, is_causal=True))
    assert fake_gpu and all(c is True for c in fake_gpu)
    assert [r for r in caplog.records if "in compiled graphs" in r.getMessage() and "0.50x" in r.getMessage()]
    n = len(fake_gpu)
    torch.testing.assert_close(g(q, k, v, False), 2 * torch_sdpa._ORIGINAL_SDPA(q, k, v), atol=1e-5, rtol=1e-5)
    assert len(fake_gpu) == n, "the full class is aule's: its graph holds aule's op"
    torch._dynamo.reset()


def test_cpu_tensors_have_no_gpu_name():
    assert sdpa_core.gpu_name(torch.device("cpu")) is None


# --------------------------------------------------------------------------------------------
# aule info

def test_info_lists_the_classes_torch_serves_on_a_measured_gpu(capsys, monkeypatch):
    monkeypatch.delenv("AULE_PREFER_TORCH", raising=False)
    assert main(["info", "--gpu", H200]) == 0
    out = capsys.readouterr().out
    assert f"speed table for {H200} (results/nvidia-h200.json @ " in out
    line = next(x for x in out.splitlines() if "fwd+bwd bfloat16 hd128 s4k causal gqa8 none" in x)
    ratio = speed_table.load()[H200].entries["fwd+bwd bfloat16 hd128 s4k causal gqa8 none"].ratio
    assert "-> torch" in line and f"{ratio:.2f}x vs sdpa-cudnn" in line
    assert "window" in out and "-> aule" in out and "other classes: unmeasured classes follow the nearest" in out
    assert "prefer torch where measured faster: on" in out


def test_info_says_when_the_preference_is_off(monkeypatch):
    monkeypatch.setenv("AULE_PREFER_TORCH", "0")
    assert "off (AULE_PREFER_TORCH=0)" in speed_table_lines(H200)[0]
    monkeypatch.setenv("AULE_PREFER_TORCH", "1")
    monkeypatch.setenv("AULE_BACKEND", "triton")
    assert "off (AULE_BACKEND=triton" in speed_table_lines(H200)[0]
    monkeypatch.setenv("AULE_PREFER_TORCH", "sometimes")
    assert "off: AULE_PREFER_TORCH='sometimes'" in speed_table_lines(H200)[0]


def test_info_without_a_table_entry(capsys):
    assert speed_table_lines("Some Other GPU")[0].startswith("speed table: no entry for Some Other GPU")
    assert "no CUDA GPU here, so no table entry for this machine" in speed_table_lines(None)[0]
    if not torch.cuda.is_available():
        assert main(["info"]) == 0
        assert "no table entry for this machine" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# on a real GPU: the installed drop-in follows this GPU's table

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_install_follows_this_gpus_table(monkeypatch, caplog):
    gpu = torch.cuda.get_device_name()
    if speed_table.table_for(gpu) is None:
        pytest.skip(f"no speed-table entry for {gpu}")
    monkeypatch.delenv("AULE_PREFER_TORCH", raising=False)
    monkeypatch.setattr(sdpa_core._state, "logged", set())
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    d = sdpa_core.decision(gpu, sdpa_core.call_class(q, k, -1, 0, True, False))
    with caplog.at_level(logging.INFO, logger="aule"), torch_sdpa.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        monkeypatch.setenv("AULE_PREFER_TORCH", "0")
        forced_aule = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert "triton" in forced_aule.grad_fn.name().lower(), forced_aule.grad_fn
    if d.use_torch:
        assert "triton" not in out.grad_fn.name().lower(), out.grad_fn
        torch.testing.assert_close(out, torch_sdpa._ORIGINAL_SDPA(q, k, v, is_causal=True))
        assert any("torch SDPA serves" in r.getMessage() for r in caplog.records)
    else:
        assert "triton" in out.grad_fn.name().lower(), out.grad_fn


def test_hugging_face_hook_follows_the_table(fake_gpu, monkeypatch, caplog):
    """attn_implementation="aule" goes through sdpa_core too: a class the table gives torch is
    served by transformers' own SDPA path, with the same logits."""
    pytest.importorskip("transformers")
    from aule.integrations import huggingface
    from test_hf_models import _llama

    tables = _table("Fake GPU", {"fwd float32 hd32 s1k causal gqa4 none": 0.6})
    monkeypatch.setattr(speed_table, "load", lambda: tables)
    served = []
    real = sdpa_core.host_attention
    monkeypatch.setattr(sdpa_core, "host_attention", lambda *a, **kw: served.append(1) or real(*a, **kw))
    huggingface.register()
    model = _llama()
    ids = torch.randint(0, 96, (1, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        want = model(ids).logits
        model.set_attn_implementation("aule")
        with caplog.at_level(logging.INFO, logger="aule"):
            got = model(ids).logits
    assert served == [], "both layers went to transformers' SDPA path (torch's function, not aule's op)"
    torch.testing.assert_close(got, want)
    assert any("transformers" in r.getMessage() and "0.60x" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("AULE_PREFER_TORCH", "0")
    with torch.no_grad():
        model(ids)
    assert len(served) == 2

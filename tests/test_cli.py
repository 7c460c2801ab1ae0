import json
import subprocess
import sys

from aule.cli import main


def test_info_lists_backends_and_reasons(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("numpy", "vulkan", "triton"):
        assert name in out


def test_info_json_is_machine_readable(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["numpy"]["available"] is True
    assert info["numpy"]["ops"] == ["attention", "paged_attention", "write_kv", "kv_store"]


def test_demo_small_shape_checks_every_backend(capsys, monkeypatch):
    from aule import backends

    monkeypatch.setattr(backends, "get_available_backends", lambda: ["numpy"])
    assert main(["demo", "--seq", "97", "--heads", "4", "--kv-heads", "2", "--head-dim", "40", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| numpy (float32)" in out
    err = float(out.split("| numpy (float32)")[1].split("|")[3])
    assert err < 1e-4


def test_python_dash_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "aule", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and "aule" in r.stdout

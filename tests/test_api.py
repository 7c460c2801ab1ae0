"""Public API: validation (one test per rule), empty inputs, type/device/dtype mirroring, routing."""
from unittest import mock
import numpy as np
import pytest

import aule
from aule import UnsupportedError, flash_attention

from attn_util import random_qkv


@pytest.fixture
def qkv():
    return random_qkv(np.random.default_rng(1), 2, 4, 2, 9, 11, 16)


def test_default_call_matches_reference(qkv):
    from aule.reference import attention_reference

    out = flash_attention(*qkv, backend="numpy")
    assert out.dtype == np.float32 and out.shape == qkv[0].shape
    assert np.abs(out - attention_reference(*qkv)).max() < 2e-5


@pytest.mark.parametrize("which,shape", [("query", (4, 9, 16)), ("key", (2, 2, 11)), ("value", (1, 2, 2, 11, 16))])
def test_wrong_ndim(qkv, which, shape):
    args = dict(zip(("query", "key", "value"), qkv))
    args[which] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError, match=f"{which} must be 4-D"):
        flash_attention(**args)


def test_batch_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="batch"):
        flash_attention(q[:1], k, v)


def test_head_dim_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention(q[..., :8], k, v)


def test_seq_k_mismatch_between_key_and_value(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="key and value"):
        flash_attention(q, k, v[:, :, :5])


def test_heads_not_divisible(qkv):
    q, k, v = qkv
    q3 = np.concatenate([q, q[:, :1]], axis=1)  # 5 heads over 2
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        flash_attention(q3, k, v)


@pytest.mark.parametrize("dtype", [np.int32, np.complex64, np.bool_])
def test_non_float_dtype(qkv, dtype):
    q, k, v = qkv
    with pytest.raises(TypeError, match="query must be float16"):
        flash_attention(q.astype(dtype), k, v)


def test_mixed_dtypes(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="share one dtype"):
        flash_attention(q, k.astype(np.float16), v)


def test_not_an_array(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match="key must be a NumPy array or a torch tensor"):
        flash_attention(q, k.tolist(), v)


def test_mixed_array_types(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = qkv
    with pytest.raises(TypeError, match="must all be NumPy arrays or all torch tensors"):
        flash_attention(torch.from_numpy(q), k, v)


def test_mixed_devices(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x) for x in qkv)
    with pytest.raises(ValueError, match="one device"):
        flash_attention(q, k, v.to("meta"))


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_scale_value(qkv, scale):
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        flash_attention(*qkv, scale=scale)


def test_bad_scale_type(qkv):
    with pytest.raises(TypeError, match="scale"):
        flash_attention(*qkv, scale="0.5")


@pytest.mark.parametrize("window,exc", [(0, ValueError), (-3, ValueError), ((1,), ValueError),
                                        ((2, -4), ValueError), ((1, 2, 3), ValueError), ("x", TypeError)])
def test_bad_window_size(qkv, window, exc):
    with pytest.raises(exc, match="window_size"):
        flash_attention(*qkv, window_size=window)


def test_unknown_backend(qkv):
    with pytest.raises(ValueError, match="names no backend"):
        flash_attention(*qkv, backend="cuda-magic")


def test_unavailable_backend_says_why(qkv, monkeypatch):
    from aule import backends

    b = backends.get("numpy")
    monkeypatch.setitem(b.__dict__, "unavailable_reason", "pretend: switched off for this test")
    with pytest.raises(UnsupportedError, match="pretend: switched off"):
        flash_attention(*qkv, backend="numpy")


def test_forced_backend_from_environment(qkv, monkeypatch):
    monkeypatch.setenv("AULE_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="names no backend"):
        flash_attention(*qkv)


@pytest.mark.parametrize("shape_q,shape_k", [((0, 4, 9, 16), (0, 2, 11, 16)), ((2, 4, 0, 16), (2, 2, 11, 16))])
def test_zero_sized_returns_empty(shape_q, shape_k):
    q = np.ones(shape_q, np.float32)
    k = np.ones(shape_k, np.float32)
    out, lse = flash_attention(q, k, k, return_lse=True)
    assert out.shape == shape_q and lse.shape == shape_q[:3]


def test_no_keys_gives_zeros_and_neg_inf_lse():
    q = np.ones((1, 2, 3, 8), np.float32)
    k = np.ones((1, 2, 0, 8), np.float32)
    out, lse = flash_attention(q, k, k, return_lse=True)
    assert (out == 0).all() and np.isneginf(lse).all()


def test_rows_that_see_no_key_are_zero_not_nan():
    q, k, v = random_qkv(np.random.default_rng(2), 1, 2, 1, 12, 5, 8)
    out, lse = flash_attention(q, k, v, causal=True, return_lse=True, backend="numpy")
    assert not np.isnan(out).any()
    assert (out[:, :, :7] == 0).all() and np.isneginf(lse[:, :, :7]).all()
    assert np.isfinite(lse[:, :, 7:]).all()


def test_non_contiguous_numpy_inputs(qkv):
    from aule.reference import attention_reference

    q, k, v = qkv
    qt = np.swapaxes(np.ascontiguousarray(np.swapaxes(q, 1, 2)), 1, 2)  # same values, strided
    assert not qt.flags.c_contiguous
    assert np.abs(flash_attention(qt, k, v) - attention_reference(q, k, v)).max() < 2e-5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_in_torch_out(qkv, dtype):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in qkv)
    out, lse = flash_attention(q, k, v, return_lse=True, backend="numpy")
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.device == q.device
    assert out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == q.shape[:3]


def test_torch_requiring_grad_never_silently_loses_gradients(qkv):
    torch = pytest.importorskip("torch")
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in qkv)
    with pytest.raises(UnsupportedError, match="backward"):
        flash_attention(q, k, v, backend="numpy")
    with torch.no_grad():
        flash_attention(q, k, v, backend="numpy")  # fine without autograd


def test_backend_info_lists_every_backend_with_reason():
    info = aule.backend_info()
    assert set(info) >= {"numpy", "vulkan", "triton", "triton-amd"}
    assert info["numpy"]["available"] and info["numpy"]["reason"] is None
    for name, entry in info.items():
        assert entry["available"] or entry["reason"], name
    assert "numpy" in aule.get_available_backends()


def test_cpu_alias(qkv):
    np.testing.assert_array_equal(flash_attention(*qkv, backend="cpu"), flash_attention(*qkv, backend="numpy"))


# ---------------------------------------------------------------------------------------------------
# the package's import graph has no loop


def _import_graph(lazy: bool) -> dict:
    """``{module: modules of aule it imports}``, read from the sources with ``ast``. ``lazy``:
    count imports inside functions too (a loop through a deferred import is still a loop between
    the two modules' responsibilities, even when Python happens to resolve it at run time)."""
    import ast
    import pathlib

    root = pathlib.Path(aule.__file__).parent
    files = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        if package:
            parts.pop()
        files[".".join(parts)] = (path, package)

    def resolve(name):
        while name not in files and "." in name:
            name = name.rsplit(".", 1)[0]
        return name if name in files else None

    graph = {}
    for mod, (path, package) in files.items():
        here = mod.split(".") if package else mod.split(".")[:-1]
        targets = set()

        def visit(node, in_function):
            for child in ast.iter_child_nodes(node):
                nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import) and (lazy or not in_function):
                    targets.update(resolve(a.name) for a in child.names if a.name.split(".")[0] == "aule")
                elif isinstance(child, ast.ImportFrom) and (lazy or not in_function):
                    if child.level:
                        base = ".".join(here[:len(here) - child.level + 1] + ([child.module] if child.module else []))
                    else:
                        base = child.module or ""
                    if base.split(".")[0] == "aule":
                        for a in child.names:
                            targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else resolve(base))
                visit(child, nested)

        visit(ast.parse(path.read_text()), False)
        graph[mod] = targets - {mod, None}
    return graph


def _a_cycle(graph: dict):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def walk(mod):
        state[mod] = "open"
        stack.append(mod)
        for nxt in sorted(graph[mod]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        stack.pop()
        state[mod] = "done"
        return None

    for mod in sorted(graph):
        if mod not in state:
            found = walk(mod)
            if found:
                return found
    return None


@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-deferred-imports"])
def test_import_graph_has_no_cycle(lazy):
    graph = _import_graph(lazy)
    assert {"aule.api", "aule.torch_sdpa", "aule.integrations.huggingface"} <= set(graph)
    assert "aule.api" in graph["aule"], "the graph must see relative imports"
    cycle = _a_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_routing_logs_each_reason_once(caplog, monkeypatch):
    from aule import routing

    monkeypatch.setattr(routing, "_logged", set())
    rng = np.random.default_rng(0)
    with caplog.at_level("INFO", logger="aule"):
        for s in (8, 8, 9, 10):   # the same reason on different shapes
            q = rng.standard_normal((1, 2, s, 16)).astype(np.float32)
            with mock.patch.object(aule.backends.get("vulkan"), "why_not", return_value="a test's reason"):
                aule.flash_attention(q, q, q)
    lines = [r.getMessage() for r in caplog.records if "skipping backend vulkan" in r.getMessage()]
    assert len(lines) == 1 and "a test's reason" in lines[0], lines

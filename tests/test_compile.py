"""torch.compile with aule installed: the aule path is one custom op, with no graph break."""
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import aule  # noqa: E402
from aule import torch_sdpa  # noqa: E402

ORIGINAL = torch_sdpa.original_sdpa()
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _clean():
    torch._dynamo.reset()
    yield
    aule.uninstall()
    torch._dynamo.reset()


def _inputs(device="cpu", dtype=torch.float32, hq=8, hk=2, sq=33, sk=40, d=64):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, s, d, generator=g).to(device, dtype) for h, s in ((hq, sq), (hk, sk), (hk, sk)))


def _layer(q, k, v):
    return F.scaled_dot_product_attention(q * 1.0, k, v, is_causal=True, enable_gqa=True) + 1


def _count(explained, name):
    return sum(g.code.count(name) for g in explained.graphs)


def test_cpu_sdpa_traces_to_one_custom_op_and_compiles():
    q, k, v = _inputs()
    aule.install()
    explained = torch._dynamo.explain(_layer)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.host_attention") == 1
    assert _count(explained, "scaled_dot_product_attention") == 0
    # Inductor's CPU code generation around the opaque op is torch's (a minute of C++ compiles on a
    # cold cache); a GPU machine checks inductor on the GPU path and traces the CPU one only.
    got = torch.compile(_layer, fullgraph=True, backend="aot_eager" if HAS_CUDA else "inductor")(q, k, v)
    want = ORIGINAL(q, k, v, is_causal=True, enable_gqa=True) + 1
    assert (got - want).abs().max() <= 2e-5


def test_cpu_fallbacks_trace_too():
    """A call aule hands back to torch (here: a learned bias, which needs a gradient aule cannot
    give) is traced as torch's SDPA, no break."""
    q, k, v = _inputs(hq=2)
    mask = torch.zeros(33, 40, requires_grad=True)

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    aule.install()
    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "host_attention") == 0


def test_cpu_masked_sdpa_traces_to_the_custom_op():
    q, k, v = _inputs(hq=2, hk=2)
    mask = torch.ones(33, 40, dtype=torch.bool).tril()
    mask[5] = False  # a row that sees no key: zeros, as in eager mode

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    aule.install()
    explained = torch._dynamo.explain(f)(q, k, v, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.host_attention") == 1
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    assert (got - ORIGINAL(q, k, v, attn_mask=mask)).abs().max() <= 2e-5 and (got[:, :, 5] == 0).all()


def test_cpu_forced_vulkan_under_compile():
    from aule import backends

    b = backends.get("vulkan")
    if not b.available:
        pytest.skip(f"Vulkan backend unavailable: {b.unavailable_reason}")
    q, k, v = _inputs()
    aule.install(backend="vulkan")
    got = torch.compile(_layer, fullgraph=True, backend="aot_eager")(q, k, v)
    want = ORIGINAL(q, k, v, is_causal=True, enable_gqa=True) + 1
    assert (got - want).abs().max() <= 1e-4


def test_hf_llama_compiles_without_graph_break():
    transformers = pytest.importorskip("transformers")
    from aule.integrations import huggingface

    huggingface.register()
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 96, (2, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = model(ids).logits  # "sdpa" is the default
        model.set_attn_implementation("aule")
        explained = torch._dynamo.explain(model)(ids)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert _count(explained, "aule.host_attention") == 2, "both layers' attention is aule's op"
        got = torch.compile(model, fullgraph=True)(ids).logits
    assert (got - want).abs().max() <= 1e-4


gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
def test_gpu_sdpa_compiles_to_triton_op_with_gradients():
    q, k, v = (t.requires_grad_() for t in _inputs("cuda", torch.bfloat16, sq=256, sk=256))
    aule.install()
    explained = torch._dynamo.explain(_layer)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.triton_attention_fwd") == 1
    got = torch.compile(_layer, fullgraph=True)(q, k, v)
    got.float().square().sum().backward()
    grads = [t.grad.float() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = ORIGINAL(q2, k2, v2, is_causal=True, enable_gqa=True) + 1
    want.square().sum().backward()
    assert (got.float() - want).abs().max() <= 3e-2
    for g, r in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert (g - r).abs().max() <= 3e-2 * max(1.0, r.abs().max().item())


def _direct(q, k, v):
    return aule.flash_attention(q * 1.0, k, v, causal=True) + 1


def _direct_lse(q, k, v):
    return aule.flash_attention(q, k, v, causal=False, window_size=(3, 2), return_lse=True)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if HAS_CUDA else []))
def test_flash_attention_itself_compiles_to_one_custom_op(device):
    """Code calling aule.flash_attention compiles with fullgraph=True (eager routing holds a lock and
    probes backends, which Dynamo cannot trace); results, LSE included, match the eager call."""
    dtype = torch.float32 if device == "cpu" else torch.float16
    q, k, v = _inputs(device, dtype)
    explained = torch._dynamo.explain(_direct)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(_direct, fullgraph=True, backend="aot_eager")(q, k, v)
    assert (got - _direct(q, k, v)).abs().max() <= (0 if device == "cpu" else 2e-3)
    out, lse = torch.compile(_direct_lse, fullgraph=True, backend="aot_eager")(q, k, v)
    want, want_lse = _direct_lse(q, k, v)
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert (out - want).abs().max() <= (0 if device == "cpu" else 2e-3)
    assert (lse - want_lse).abs().max() <= 1e-3


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (Triton's differentiable op)")
def test_compiled_flash_attention_has_gradients_on_cuda():
    q, k, v = (x.requires_grad_() for x in _inputs("cuda", torch.float16))
    y = torch.compile(_direct, fullgraph=True)(q, k, v)
    y.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_compiled_cpu_call_needing_gradients_says_why():
    q, k, v = (x.requires_grad_() for x in _inputs())
    with pytest.raises(aule.UnsupportedError, match="no backward pass"):
        torch.compile(_direct, backend="aot_eager")(q, k, v)


# ---------------------------------------------------------------------------------------------
# aule's features (softcap, ALiBi, sinks, attn_mask) through the compiled path

import numpy as np  # noqa: E402

from aule import sdpa_core  # noqa: E402
from aule.reference import attention_reference  # noqa: E402

B, HQ, HK, SQ, SK, D = 2, 4, 2, 13, 17, 40


def _qkv(device="cpu", dtype=torch.float32, seed=3):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, h, s, D, generator=g).to(device, dtype) for h, s in ((HQ, SQ), (HK, SK), (HK, SK)))


def _features(names, device="cpu", seed=5):
    """Feature arguments of aule.flash_attention, by name: 'softcap', 'alibi' ([Hq]), 'alibi_b'
    ([B, Hq], float16), 'sinks', and masks 'bool' (general), 'padding' (key lengths per batch, one
    row fully hidden for batch 1 by the window below), 'holes' (padding that is not a prefix),
    'float' (additive, with -inf)."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    for name in names:
        if name == "softcap":
            kw["softcap"] = 4.0
        elif name == "alibi":
            kw["alibi_slopes"] = torch.rand(HQ, generator=g).to(device)
        elif name == "alibi_b":
            kw["alibi_slopes"] = torch.rand(B, HQ, generator=g).to(device, torch.float16)
        elif name == "sinks":
            kw["sinks"] = torch.randn(HQ, generator=g).to(device)
        elif name == "bool":
            kw["attn_mask"] = (torch.rand(B, 1, SQ, SK, generator=g) > 0.3).to(device)
        elif name == "padding":
            m = torch.ones(B, 1, 1, SK, dtype=torch.bool)
            m[1, ..., 9:] = False
            kw["attn_mask"] = m.to(device)
        elif name == "holes":
            m = torch.ones(B, HQ, 1, SK, dtype=torch.bool)
            m[0, 1, ..., 3:6] = False
            kw["attn_mask"] = m.to(device)
        elif name == "float":
            m = torch.randn(SQ, SK, generator=g)
            m[2, 5:] = float("-inf")
            kw["attn_mask"] = m.to(device)
        else:
            raise AssertionError(name)
    return kw


def _reference(q, k, v, causal, window_size, kw, return_lse=True):
    host = {n: (x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) and x.dtype != torch.bool
                else x.cpu().numpy() if isinstance(x, torch.Tensor) else x) for n, x in kw.items()}
    return attention_reference(*(t.detach().double().cpu().numpy() for t in (q, k, v)), causal=causal,
                               window_size=window_size, return_lse=return_lse, **host)


def _close(got, want, rel: float) -> bool:
    """Equal infinities (rows that see no key) and NaNs where ``want`` has them; elsewhere within
    ``rel`` times the larger of 1 and ``want``'s largest magnitude."""
    got, want = got.detach().float(), want.detach().float()
    if not torch.equal(got.isnan(), want.isnan()):
        return False
    err = torch.where((got == want) | want.isnan(), 0.0, (got - want).abs())
    scale = want[want.isfinite()].abs().max().item() if want.isfinite().any() else 1.0
    return not err.isnan().any() and err.max().item() <= rel * max(1.0, scale)


def _assert_close(got, want, atol):
    got = got.detach().double().cpu().numpy()
    finite = np.isfinite(want)
    assert (np.isfinite(got) == finite).all() and (got[~finite] == want[~finite]).all()
    assert np.abs(got[finite] - want[finite]).max() <= atol


FEATURE_CASES = [("softcap",), ("alibi",), ("alibi_b",), ("sinks",), ("bool",), ("padding",), ("holes",),
                 ("float",), ("softcap", "alibi", "sinks"), ("softcap", "alibi_b", "sinks", "padding"),
                 ("alibi", "sinks", "float"), ("softcap", "holes")]


@pytest.mark.parametrize("names", FEATURE_CASES, ids="+".join)
@pytest.mark.parametrize("return_lse", [False, True])
def test_features_compile_to_one_host_op(names, return_lse):
    """Each feature and combinations, fullgraph on CPU tensors: one host op in the graph, results
    equal to the eager aule call and the float64 reference (LSE included)."""
    q, k, v = _qkv()
    kw = _features(names)
    window = (6, 2)

    def f(q, k, v, kw):
        return aule.flash_attention(q * 1.0, k, v, causal=False, window_size=window, return_lse=return_lse, **kw)

    explained = torch._dynamo.explain(f)(q, k, v, kw)
    assert explained.graph_break_count == 0, explained.break_reasons
    op = "aule.host_attention_lse" if return_lse else "aule.host_attention"
    assert _count(explained, op + ".") + _count(explained, op + "(") == 1
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kw)
    want = f(q, k, v, kw)
    ref_out, ref_lse = _reference(q, k, v, False, window, kw)
    if return_lse:
        (got, got_lse), (want, want_lse) = got, want
        assert got_lse.dtype == torch.float32 and torch.equal(got_lse, want_lse)
        _assert_close(got_lse, ref_lse, 2e-5)
    assert torch.equal(got, want)
    _assert_close(got, ref_out, 2e-5)


def test_features_compile_with_inductor_on_cpu():
    """The op runs opaquely inside inductor's CPU code too (one case: a cold C++ build is slow)."""
    q, k, v = _qkv()
    kw = _features(("softcap", "alibi", "sinks", "padding"))

    def f(q, k, v):
        return aule.flash_attention(q, k, v, causal=True, **kw) * 2 + 1

    got = torch.compile(f, fullgraph=True, backend="inductor")(q, k, v)
    ref = _reference(q, k, v, True, -1, kw, return_lse=False)
    _assert_close((got - 1) / 2, ref, 2e-5)


def test_numpy_feature_arrays_become_graph_constants():
    q, k, v = _qkv()
    slopes, sinks = np.linspace(0.1, 0.4, HQ, dtype=np.float32), np.full(HQ, 0.5, np.float32)

    def f(q, k, v):
        return aule.flash_attention(q, k, v, alibi_slopes=slopes, sinks=sinks)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(got, f(q, k, v))


@pytest.mark.parametrize("kw, error, match", [
    (dict(softcap=-1.0), ValueError, "softcap must be finite in float32 and >= 0"),
    (dict(softcap="big"), TypeError, "softcap must be a real number"),
    (dict(sinks=torch.zeros(HQ + 1)), ValueError, r"sinks must have shape \[heads_q\] = \[4\]"),
    (dict(sinks=torch.tensor([0.0, float("inf"), 0.0, 0.0])), ValueError, "sinks must be finite"),
    (dict(sinks=torch.zeros(HQ, dtype=torch.int32)), TypeError, "sinks must hold floats"),
    (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.tensor([0.1, float("nan"), 0.1, 0.1])), ValueError, "alibi_slopes must be finite"),
    (dict(attn_mask=torch.ones(SQ, SK + 1, dtype=torch.bool)), ValueError, "attn_mask of shape .* is not broadcast"),
    (dict(attn_mask=torch.ones(SQ, SK, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    (dict(attn_mask=[[True]]), TypeError, "attn_mask must be a NumPy array or torch tensor"),
    (dict(sinks=torch.zeros(HQ, requires_grad=True)), aule.UnsupportedError, "sinks requires grad"),
    (dict(attn_mask=torch.zeros(SQ, SK, requires_grad=True)), aule.UnsupportedError, "attn_mask requires grad"),
])
def test_bad_features_under_compile_raise_naming_the_argument(kw, error, match):
    """The same errors as eager calls: raised while tracing (softcap, the kind of an array, a
    gradient), or when the graph runs for what the op validates with aule.call (shapes, dtypes and
    values). With fullgraph=True Dynamo wraps an error raised while tracing in its Unsupported,
    whose message carries aule's (type and text)."""
    q, k, v = _qkv()

    def f(q, k, v):
        return aule.flash_attention(q, k, v, **kw)

    with pytest.raises(error, match=match):
        f(q, k, v)
    torch._dynamo.reset()
    with pytest.raises(error, match=match):
        torch.compile(f, backend="aot_eager")(q, k, v)
    torch._dynamo.reset()
    with pytest.raises((error, torch._dynamo.exc.Unsupported), match=match) as info:
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    if info.type is not error:
        assert f"raised exception {error.__name__}(" in str(info.value)


def test_host_ops_with_features_pass_opcheck():
    q, k, v = _qkv()
    kw = _features(("softcap", "alibi", "sinks", "float"))
    args = (q, k, v, 0.2, -1, 3, "numpy", kw["attn_mask"], kw["softcap"], kw["alibi_slopes"], kw["sinks"])
    torch.library.opcheck(torch.ops.aule.host_attention.default, args)
    torch.library.opcheck(torch.ops.aule.host_attention_lse.default, args)


def test_forced_backend_that_lacks_a_feature_still_refuses_under_compile(monkeypatch):
    """A refusal at run time is never answered by torch ops without the feature."""
    from aule import backends

    b = backends.get("vulkan")
    if not b.available:
        pytest.skip(f"Vulkan backend unavailable: {b.unavailable_reason}")
    q, k, v = _qkv()
    mask = _features(("bool",))["attn_mask"]  # not one run of keys: a general mask
    # coopmat refuses general masks where it exists, and is missing on lavapipe: a refusal either way.
    monkeypatch.setenv("AULE_VULKAN_VARIANT", "coopmat")

    def f(q, k, v):
        return aule.flash_attention(q, k, v, attn_mask=mask, softcap=3.0, backend="vulkan")

    with pytest.raises(aule.UnsupportedError):
        f(q, k, v)
    with pytest.raises(aule.UnsupportedError):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)


@pytest.mark.parametrize("names", [("padding",), ("float",), ("holes",)], ids="+".join)
def test_sdpa_drop_in_with_masks_compiles_to_the_host_op(names):
    q, k, v = _qkv()
    mask = _features(names)["attn_mask"]

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    aule.install()
    explained = torch._dynamo.explain(f)(q, k, v, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.host_attention") == 1
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, mask)
    _assert_close(got, _reference(q, k, v, False, -1, dict(attn_mask=mask), return_lse=False), 2e-5)


def test_softcap_and_sinks_through_attend_compile():
    """sdpa_core.attend (Hugging Face's path: Gemma 2's softcap, gpt-oss' sinks) under compile."""
    q, k, v = _qkv()
    kw = _features(("softcap", "sinks"))

    def f(q, k, v):
        return sdpa_core.attend(q, k, v, D ** -0.5, -1, 0, "", softcap=kw["softcap"], sinks=kw["sinks"])

    explained = torch._dynamo.explain(f)(q, k, v)
    assert explained.graph_break_count == 0, explained.break_reasons
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    _assert_close(got, _reference(q, k, v, True, -1, kw, return_lse=False), 2e-5)


# ---------------------------------------------------------------------------------------------
# flash-attn's interface under compile

def _seq_first(*ts):
    return tuple(t.transpose(1, 2).contiguous() for t in ts)


def test_flash_attn_funcs_compile_without_graph_breaks():
    from aule import flash_attn as fa

    q, k, v = _seq_first(*_qkv())
    slopes = _features(("alibi",))["alibi_slopes"]
    cases = [
        (lambda q, k, v: fa.flash_attn_func(q, k, v, causal=True, softcap=3.0, alibi_slopes=slopes,
                                            window_size=(5, 0), return_attn_probs=True)[:2], (q, k, v)),
        (lambda qkv: fa.flash_attn_qkvpacked_func(qkv, causal=True, softcap=2.0), (torch.stack((q, q, q), 2),)),
        (lambda q, kv: fa.flash_attn_kvpacked_func(q, kv, alibi_slopes=slopes, return_attn_probs=True)[:2],
         (q, torch.stack((k, v), 2))),
    ]
    for f, args in cases:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(f)(*args)
        assert explained.graph_break_count == 0, explained.break_reasons
        got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(*args), f(*args)
        for a, b in zip(*((got, want) if isinstance(got, tuple) else ((got,), (want,)))):
            assert torch.equal(a, b)
    out, lse = cases[0][0](q, k, v)
    ref, ref_lse = _reference(*_qkv(), True, (5, 0), dict(softcap=3.0, alibi_slopes=slopes))
    _assert_close(out.transpose(1, 2), ref, 2e-5)
    _assert_close(lse, ref_lse, 2e-5)


def _varlen_inputs():
    g = torch.Generator().manual_seed(8)
    lens_q, lens_k = [5, 0, 8], [7, 3, 9]
    q = torch.randn(sum(lens_q), HQ, D, generator=g)
    k, v = (torch.randn(sum(lens_k), HK, D, generator=g) for _ in range(2))
    cu = [torch.tensor(np.concatenate(([0], np.cumsum(n))), dtype=torch.int32) for n in (lens_q, lens_k)]
    return q, k, v, cu[0], cu[1], max(lens_q), max(lens_k)


def test_flash_attn_varlen_breaks_the_graph_cleanly():
    """It reads cu_seqlens on the host: Dynamo runs it eagerly between graphs, and fullgraph=True
    fails at once with that reason (not deep inside the trace)."""
    from aule import flash_attn as fa

    args = _varlen_inputs()

    def f(q, k, v, cu_q, cu_k, mq, mk):
        return fa.flash_attn_varlen_func(q * 1.0, k, v, cu_q, cu_k, mq, mk, causal=True, softcap=3.0) + 1

    with pytest.raises(torch._dynamo.exc.Unsupported, match="flash_attn_varlen_func reads cu_seqlens on the host"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(*args)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(f)(*args)
    assert explained.graph_break_count == 1
    assert torch.equal(torch.compile(f, backend="aot_eager")(*args), f(*args))


def test_flash_attn_with_kvcache_breaks_the_graph_cleanly():
    from aule import flash_attn as fa

    q, k, v = _seq_first(*_qkv())
    lens = torch.tensor([3, 6])

    def f(q, kc, vc, k, v):
        return fa.flash_attn_with_kvcache(q[:, :2] * 1.0, kc, vc, k[:, :2], v[:, :2], cache_seqlens=lens, causal=True)

    caches = [torch.zeros(B, 16, HK, D) for _ in range(4)]
    with pytest.raises(torch._dynamo.exc.Unsupported, match="flash_attn_with_kvcache reads cache_seqlens"):
        torch.compile(f, fullgraph=True, backend="aot_eager")(q, caches[0], caches[1], k, v)
    torch._dynamo.reset()
    got = torch.compile(f, backend="aot_eager")(q, caches[0], caches[1], k, v)
    want = f(q, caches[2], caches[3], k, v)
    assert torch.equal(got, want) and torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
    assert caches[0][1, 6:8].abs().sum() > 0  # the new keys were written in place


# ---------------------------------------------------------------------------------------------
# Triton's op in a compiled graph: under TRITON_INTERPRET=1 on CPU tensors here, on the GPU there

def _triton_device():
    pytest.importorskip("triton")
    from aule.backends.triton.common import interpreting

    if HAS_CUDA:
        return "cuda"
    if not interpreting():
        pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1 (tests/conftest.py sets it)")
    return "cpu"


def _triton_eager(q, k, v, causal, window, kw):
    """The eager Triton call on the same inputs (TritonBackend.attention on a validated call)."""
    from aule.backends.triton import TritonBackend
    from aule.call import canonicalize

    return TritonBackend().attention(canonicalize(q, k, v, causal, None, window, True, **kw))


TRITON_CASES = [("softcap", "alibi", "sinks"), ("bool",), ("padding", "sinks"), ("holes", "alibi_b"),
                ("float", "softcap", "sinks")]


@pytest.mark.parametrize("names", TRITON_CASES, ids="+".join)
def test_triton_op_with_features_compiles_with_gradients(names):
    """The traced path's Triton op with each feature: forward, LSE and the gradients of q, k, v and
    sinks through the compiled function equal the eager Triton call's."""
    device = _triton_device()
    q, k, v = _qkv(device)
    kw = _features(names, device)
    if "sinks" in kw:
        kw["sinks"].requires_grad_()
    leaves = [t.requires_grad_() for t in (q, k, v)] + ([kw["sinks"]] if "sinks" in kw else [])
    scale = D ** -0.5

    def f(q, k, v, kw):
        out, lse = sdpa_core._triton_traced(q, k, v, scale, -1, 0, kw.get("softcap", 0.0), kw.get("alibi_slopes"),
                                            kw.get("sinks"), kw.get("attn_mask"))
        return out, lse

    explained = torch._dynamo.explain(f)(q, k, v, kw)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.triton_attention_fwd") == 1
    got, got_lse = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v, kw)
    (got.square().sum() + got_lse.sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    want, want_lse = _triton_eager(q, k, v, True, -1, kw)
    (want.square().sum() + want_lse.sum()).backward()
    tol = 0 if device == "cpu" else 1e-5
    assert _close(got, want, tol) and _close(got_lse, want_lse, tol)
    for g, t in zip(grads, leaves):
        assert _close(g, t.grad, tol)
    ref, ref_lse = _reference(q, k, v, True, -1, kw)
    _assert_close(got, ref, 2e-5)
    _assert_close(got_lse, ref_lse, 2e-5)


def test_triton_op_with_sdpa_mask_passes_opcheck():
    device = _triton_device()
    q, k, v = (t.requires_grad_() for t in _qkv(device))
    sinks = torch.rand(HQ, device=device).requires_grad_()
    for name in ("bool", "padding"):  # a general mask tile; a padding mask's key spans
        mask = _features((name,), device)["attn_mask"]
        args = (q, k, v, 0.2, -1, 0, 0.0, None, sinks, None, None, mask)
        torch.library.opcheck(torch.ops.aule.triton_attention_fwd.default, args)


def test_triton_op_refuses_a_mask_given_twice():
    device = _triton_device()
    q, k, v = _qkv(device)
    mask = _features(("bool",), device)["attn_mask"]
    with pytest.raises(ValueError, match="not both"):
        torch.ops.aule.triton_attention_fwd(q, k, v, 0.2, -1, 0, 0.0, None, None, None, mask.to(torch.uint8), mask)
    with pytest.raises(ValueError, match="attn_mask of shape"):
        torch.ops.aule.triton_attention_fwd(q, k, v, 0.2, -1, 0, 0.0, None, None, None, None, mask[..., :-1])


# ---------------------------------------------------------------------------------------------
# On a CUDA GPU: aule.flash_attention and the SDPA drop-in with features, compiled (H200 suite)

def _bf16_close(got, want):
    return _close(got, want, 3e-2)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("names", [("softcap", "alibi", "sinks"), ("padding", "sinks"), ("bool", "softcap"),
                                   ("float", "alibi_b", "sinks")], ids="+".join)
def test_gpu_flash_attention_features_compile_with_gradients(names, backend):
    """bf16 on CUDA, fullgraph: output, LSE and the gradients of q, k, v and sinks through the
    compiled function match the eager aule call, and the float64 reference."""
    q, k, v = (t.requires_grad_() for t in _qkv("cuda", torch.bfloat16))
    kw = _features(names, "cuda")
    if "sinks" in kw:
        kw["sinks"].requires_grad_()
    leaves = [q, k, v] + ([kw["sinks"]] if "sinks" in kw else [])

    def f(q, k, v, kw):
        out, lse = aule.flash_attention(q, k, v, causal=True, window_size=(9, 0), return_lse=True, **kw)
        return out, lse

    explained = torch._dynamo.explain(f)(q, k, v, kw)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.triton_attention_fwd") == 1
    got, got_lse = torch.compile(f, fullgraph=True, backend=backend)(q, k, v, kw)
    (got.float().square().sum() + got_lse.sum()).backward()
    grads = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    want, want_lse = f(q, k, v, kw)
    (want.float().square().sum() + want_lse.sum()).backward()
    assert _bf16_close(got, want) and _bf16_close(got_lse, want_lse)
    for g, t in zip(grads, leaves):
        assert _bf16_close(g, t.grad)
    ref, ref_lse = _reference(q, k, v, True, (9, 0), kw)
    _assert_close(got, ref, 2e-2)
    _assert_close(got_lse, ref_lse, 2e-2)


@gpu
@pytest.mark.gpu
def test_gpu_sdpa_drop_in_with_mask_compiles_to_triton_op():
    q, k, v = (t.requires_grad_() for t in _qkv("cuda", torch.bfloat16))
    mask = _features(("padding",), "cuda")["attn_mask"]

    def f(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    aule.install()
    explained = torch._dynamo.explain(f)(q, k, v, mask)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert _count(explained, "aule.triton_attention_fwd") == 1
    got = torch.compile(f, fullgraph=True)(q, k, v, mask)
    got.float().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().float().requires_grad_() for t in (q, k, v))
    want = ORIGINAL(q2, k2, v2, attn_mask=mask, enable_gqa=True)
    want.sum().backward()
    assert _bf16_close(got, want)
    for g, r in zip(grads, (q2.grad, k2.grad, v2.grad)):
        assert _bf16_close(g, r)

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

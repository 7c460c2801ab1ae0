"""The SDPA drop-in: install/uninstall, SDPA's exact meaning, fallbacks, gradients, logging."""
import logging
import math
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import aule  # noqa: E402
from attn_util import count_calls  # noqa: E402
from aule import sdpa_core, torch_sdpa  # noqa: E402
from aule.api import route  # noqa: E402
from aule.call import canonicalize  # noqa: E402

ORIGINAL = torch_sdpa.original_sdpa()
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _clean():
    yield
    aule.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL


@pytest.fixture
def served(monkeypatch):
    """Counts calls that aule's host path served (eager mode)."""
    calls = []
    real = sdpa_core.host_attention

    def spy(*args, **kw):
        calls.append(args[-1])
        return real(*args, **kw)

    monkeypatch.setattr(sdpa_core, "host_attention", spy)
    return calls


def oracle(q, k, v, **kw):
    """torch's own SDPA in float64: an oracle with SDPA's meaning, independent of aule."""
    return ORIGINAL(q.double(), k.double(), v.double(), **kw)


def rand(*shape, dtype=torch.float32, device="cpu", gen=None):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def qkv(b, hq, hk, sq, sk, d, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return (rand(b, hq, sq, d, dtype=dtype, device=device, gen=g),
            rand(b, hk, sk, d, dtype=dtype, device=device, gen=g),
            rand(b, hk, sk, d, dtype=dtype, device=device, gen=g))


# ---------------------------------------------------------------------------------------------
# install / uninstall

def test_import_aule_does_not_import_torch():
    code = "import sys, aule; assert 'torch' not in sys.modules; aule.install; assert 'torch' in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_uninstall_restores_exact_object():
    aule.install()
    assert F.scaled_dot_product_attention is torch_sdpa.scaled_dot_product_attention
    assert torch.nn.functional.scaled_dot_product_attention is not ORIGINAL
    aule.install()  # twice is harmless
    assert F.scaled_dot_product_attention is torch_sdpa.scaled_dot_product_attention
    aule.uninstall()
    assert F.scaled_dot_product_attention is ORIGINAL
    aule.uninstall()  # and so is uninstalling twice
    assert F.scaled_dot_product_attention is ORIGINAL


def test_installed_context_restores_outer_state():
    with aule.installed():
        assert torch_sdpa.is_installed()
    assert F.scaled_dot_product_attention is ORIGINAL
    aule.install(backend="numpy")
    with aule.installed(backend="cpu"):
        assert torch_sdpa._state.backend == "numpy"
    assert torch_sdpa.is_installed() and torch_sdpa._state.backend == "numpy"


def test_installed_context_restores_on_error():
    with pytest.raises(RuntimeError, match="boom"):
        with aule.installed():
            raise RuntimeError("boom")
    assert F.scaled_dot_product_attention is ORIGINAL


def test_install_rejects_bad_arguments():
    with pytest.raises(ValueError, match="names no backend"):
        aule.install(backend="cuda-magic")
    with pytest.raises(TypeError, match="verbose"):
        aule.install(verbose="yes")
    assert F.scaled_dot_product_attention is ORIGINAL


# ---------------------------------------------------------------------------------------------
# SDPA's meaning, served by aule

SHAPES = [
    # b, hq, hk, sq, sk, d
    (1, 4, 4, 1, 1, 64),
    (2, 4, 4, 97, 97, 40),
    (1, 8, 2, 113, 113, 80),
    (1, 8, 1, 33, 97, 128),   # seq_q < seq_k: top-left causal drops keys >= seq_q
    (2, 4, 1, 97, 33, 64),    # seq_q > seq_k: later rows see every key
    (1, 4, 4, 1, 113, 64),    # one query row: causal sees key 0 only (top-left)
    (1, 2, 2, 1025, 1025, 64),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_sdpa_float32(shape, causal, served):
    b, hq, hk, sq, sk, d = shape
    q, k, v = qkv(b, hq, hk, sq, sk, d)
    gqa = hq != hk
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    assert served, "aule did not serve the call"
    assert out.dtype == q.dtype and out.shape == q.shape
    err = (out.double() - oracle(q, k, v, is_causal=causal, enable_gqa=gqa)).abs().max().item()
    assert err <= ATOL[torch.float32], err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matches_sdpa_other_dtypes(dtype, served):
    q, k, v = qkv(2, 8, 2, 57, 70, 64, dtype=dtype)
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert served and out.dtype == dtype
    err = (out.double() - oracle(q, k, v, is_causal=True, enable_gqa=True)).abs().max().item()
    # On a machine with a GPU-type Vulkan device the call goes there, and Vulkan's fp16 variant does
    # its tile arithmetic in half precision (its own tests allow 1e-2 for that variant).
    picked = route(canonicalize(q, k, v), "attention").name  # the choice depends on device and dtype only
    tol = 1e-2 if (picked == "vulkan" and dtype == torch.float16) else ATOL[dtype]
    assert err <= tol, (err, picked)


def test_scale_and_positional_arguments(served):
    q, k, v = qkv(1, 4, 4, 19, 23, 64)
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, None, 0.0, True, scale=0.3)
    assert served
    assert (out.double() - oracle(q, k, v, is_causal=True, scale=0.3)).abs().max() <= 2e-5
    # SDPA's scale is keyword-only: the same call positionally fails as it does without aule.
    with aule.installed():
        with pytest.raises(TypeError):
            F.scaled_dot_product_attention(q, k, v, None, 0.0, True, 0.3)


def test_three_d_inputs(served):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(6, 17, 64, generator=g), torch.randn(6, 29, 64, generator=g),
               torch.randn(6, 29, 64, generator=g))
    for causal in (False, True):
        with aule.installed():
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        assert out.shape == (6, 17, 64)
        assert (out.double() - oracle(q, k, v, is_causal=causal)).abs().max() <= 2e-5
    # 3-D GQA: SDPA treats dim -3 as the heads.
    k2, v2 = k[:2], v[:2]
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k2, v2, enable_gqa=True)
    assert (out.double() - oracle(q, k2, v2, enable_gqa=True)).abs().max() <= 2e-5
    assert len(served) == 3


def test_non_contiguous_inputs(served):
    # [B, S, H, D] projections transposed to SDPA's layout, as most models do.
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 31, 8, 64, generator=g).transpose(1, 2)
    k = torch.randn(2, 31, 2, 64, generator=g).transpose(1, 2)
    v = torch.randn(2, 31, 2, 64, generator=g).transpose(1, 2)
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert served
    assert (out.double() - oracle(q, k, v, is_causal=True, enable_gqa=True)).abs().max() <= 2e-5


def test_sdpa_window_conversion_is_top_left():
    # Row i sees keys j <= i (top-left), whatever the lengths.
    from aule import masks

    for sq, sk in [(1, 1), (1, 9), (9, 1), (5, 12), (12, 5), (7, 7)]:
        keys, left, right = torch_sdpa.sdpa_window(sq, sk, True)
        vis = masks.mask(sq, keys, left, right)
        want = [[j <= i for j in range(keys)] for i in range(sq)]
        assert vis.tolist() == want, (sq, sk)
        assert keys == sk or all(j >= sq for j in range(keys, sk))
    assert torch_sdpa.sdpa_window(5, 12, False) == (12, -1, -1)


# ---------------------------------------------------------------------------------------------
# what goes back to torch's SDPA

def _same_as_original(call):
    """Run ``call`` with aule installed and without; results or errors must be identical."""
    try:
        want = call()
    except Exception as exc:  # noqa: BLE001 - compare whatever SDPA raises
        want = exc
    with aule.installed():
        try:
            got = call()
        except Exception as exc:  # noqa: BLE001
            got = exc
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("case", ["bool", "float", "padding", "3-D", "hidden-row"])
def test_attn_mask_is_served_by_aule(case, served):
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(2, 4, 2, 9, 13, 80)
    masks = {
        "bool": torch.rand(2, 1, 9, 13, generator=gen) > 0.3,
        "float": torch.randn(4, 9, 13, generator=gen),
        "padding": (torch.arange(13) < torch.tensor([13, 6])[:, None])[:, None, None, :],
        "3-D": torch.rand(9, 13, generator=gen) > 0.3,
        "hidden-row": torch.ones(9, 13, dtype=torch.bool),
    }
    mask = masks[case]
    if case == "3-D":
        q, k, v = q[0, :2], k[0, :2], v[0, :2]
    if case == "hidden-row":
        mask[4] = False
    gqa = q.shape[-3] != k.shape[-3]
    with aule.installed():
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    assert served == ["numpy"] or served == ["vulkan"], "aule did not serve the masked call"
    want = oracle(q, k, v, attn_mask=mask if mask.dtype == torch.bool else mask.double(), enable_gqa=gqa)
    assert got.shape == want.shape and (got.double() - want).abs().max() <= 2e-5
    if case == "hidden-row":  # aule's rule: zeros (torch's CPU kernels agree today)
        assert (got[:, :, 4] == 0).all()


def test_masks_aule_cannot_take_fall_back(served, caplog):
    q, k, v = qkv(1, 4, 4, 9, 9, 32)
    bias = torch.randn(9, 9, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.INFO, logger="aule"):
        _same_as_original(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias.half()))  # torch refuses
        _same_as_original(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias[:, :4]))  # no broadcast
        learned = bias.clone().requires_grad_()
        with aule.installed():
            got = F.scaled_dot_product_attention(q, k, v, attn_mask=learned)
            F.scaled_dot_product_attention(q, k, v, attn_mask=learned)
    assert not served and got.grad_fn is not None
    assert sum("attn_mask requires grad" in r.getMessage() for r in caplog.records) == 1, "log once per reason"


def test_dropout_falls_back(served):
    q, k, v = qkv(1, 2, 2, 8, 8, 16)

    def call():
        torch.manual_seed(5)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)

    _same_as_original(call)
    assert not served


@pytest.mark.parametrize("case", ["gqa-without-flag", "gqa-not-dividing", "value-dim", "broadcast-batch",
                                  "negative-scale", "empty-keys", "int-dtype", "mask-and-causal", "5-D"])
def test_unservable_calls_behave_as_sdpa(case, served):
    q, k, v = qkv(2, 4, 2, 6, 7, 16)
    calls = {
        "gqa-without-flag": lambda: F.scaled_dot_product_attention(q, k, v),
        "gqa-not-dividing": lambda: F.scaled_dot_product_attention(q[:, :3], k, v, enable_gqa=True),
        "value-dim": lambda: F.scaled_dot_product_attention(q, k, torch.cat([v, v], -1), enable_gqa=True),
        "broadcast-batch": lambda: F.scaled_dot_product_attention(q, k[:1], v[:1], enable_gqa=True),
        "negative-scale": lambda: F.scaled_dot_product_attention(q, k, v, scale=-0.5, enable_gqa=True),
        "empty-keys": lambda: F.scaled_dot_product_attention(q, k[:, :, :0], v[:, :, :0], enable_gqa=True),
        "int-dtype": lambda: F.scaled_dot_product_attention(q.int(), k.int(), v.int(), enable_gqa=True),
        "mask-and-causal": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=torch.ones(6, 7, dtype=torch.bool), is_causal=True, enable_gqa=True),
        "5-D": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True),
    }
    _same_as_original(calls[case])
    assert not served


def test_vmap_and_nested_tensors_fall_back(served):
    q = torch.randn(3, 2, 4, 5, 16, generator=torch.Generator().manual_seed(0))

    def per_sample(f):
        return torch.vmap(lambda x: f(x, x, x, is_causal=True))(q)

    want = per_sample(ORIGINAL)
    with aule.installed():
        got = per_sample(F.scaled_dot_product_attention)
    assert torch.equal(got, want)
    nt = torch.nested.nested_tensor([torch.randn(2, 5, 16), torch.randn(2, 7, 16)], layout=torch.jagged)
    assert not sdpa_core._plain(nt)
    assert not served


def test_cpu_gradients_use_torch_and_are_correct(served):
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 13, 17, 32))
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert not served and out.grad_fn is not None
    out.square().sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ORIGINAL(q2, k2, v2, is_causal=True, enable_gqa=True).square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def _fake_differentiable(monkeypatch, detach):
    """Put a differentiable backend in the 'triton' slot that computes with torch autograd (or,
    with ``detach``, wrongly drops the graph), so gradient routing is testable without a GPU."""
    from aule import backends

    calls = []

    class Differentiable(backends.base.Backend):
        name = "triton"
        ops = ("attention",)
        differentiable = True

        def attention(self, call):
            calls.append((call.left, call.right))
            out = sdpa_core.sdpa_reference(call.q, call.k, call.v, call.scale, call.left, call.right)
            return (out.detach() if detach else out), None

    monkeypatch.setitem(backends._instances, "triton", Differentiable())
    return calls


def _grads_match_sdpa(q, k, v, causal):
    """Gradients through the installed function against torch's SDPA in float64."""
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    out.backward(dout)
    q2, k2, v2 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ORIGINAL(q2, k2, v2, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    ref.backward(dout.double())
    assert (out.double() - ref).abs().max() <= 2e-5
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert (a.grad.double() - b.grad).abs().max() <= 2e-5


@pytest.mark.parametrize("sq,sk", [(37, 45), (45, 37), (20, 20)])
def test_gradient_calls_go_to_a_differentiable_backend(monkeypatch, sq, sk):
    calls = _fake_differentiable(monkeypatch, detach=False)
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, sq, sk, 32))
    with aule.installed(backend="triton"):
        _grads_match_sdpa(q, k, v, causal=True)
    assert calls == [(-1, max(0, sq - sk))]


def test_backend_that_drops_the_graph_is_never_trusted(monkeypatch, caplog):
    calls = _fake_differentiable(monkeypatch, detach=True)
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 2, 21, 30, 32))
    with caplog.at_level(logging.WARNING, logger="aule"), aule.installed(backend="triton"):
        _grads_match_sdpa(q, k, v, causal=True)
    assert calls and any("no autograd graph" in r.getMessage() for r in caplog.records)


def test_no_grad_inputs_that_require_grad_use_aule(served):
    q, k, v = (t.requires_grad_() for t in qkv(1, 4, 4, 13, 13, 32))
    with aule.installed(), torch.no_grad():
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
    with aule.installed(), torch.inference_mode():
        F.scaled_dot_product_attention(q.detach(), k.detach(), v.detach())
    assert len(served) == 2


def test_verbose_logs_each_route_once(served, caplog):
    q, k, v = qkv(1, 4, 4, 9, 9, 32)
    with caplog.at_level(logging.INFO, logger="aule"):
        with aule.installed(backend="numpy", verbose=True):
            for _ in range(3):
                F.scaled_dot_product_attention(q, k, v, is_causal=True)
            F.scaled_dot_product_attention(q, k, v)
    routes = [r.getMessage() for r in caplog.records if "-> numpy" in r.getMessage()]
    assert len(routes) == 2, routes
    assert served == ["numpy"] * 4


def test_quiet_install_logs_no_routes(served, caplog):
    q, k, v = qkv(1, 4, 4, 9, 9, 32)
    with caplog.at_level(logging.INFO, logger="aule"):
        with aule.installed():
            F.scaled_dot_product_attention(q, k, v)
    assert served and not [r for r in caplog.records if "->" in r.getMessage()]


@pytest.fixture
def refusing_numpy(monkeypatch):
    """The 'numpy' backend replaced by one that turns every call down."""
    from aule import backends

    class Refuses(backends.base.Backend):
        name = "numpy"
        ops = ("attention",)

        def why_not_attention(self, call, forced):
            return "this test's backend refuses every call"

    monkeypatch.setitem(backends._instances, "numpy", Refuses())
    # Where a GPU-type Vulkan device exists, auto routing would send CPU tensors there instead.
    monkeypatch.setitem(backends._instances, "vulkan", Refuses())


def test_forced_unavailable_backend_falls_back(refusing_numpy, served, caplog):
    q, k, v = qkv(1, 2, 2, 5, 5, 16)
    with caplog.at_level(logging.INFO, logger="aule"):
        _same_as_original(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
        with aule.installed(backend="numpy"):
            F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not served
    assert any("refuses every call" in r.getMessage() for r in caplog.records)


def test_host_op_falls_back_exactly_when_backend_refuses_at_run_time(refusing_numpy):
    """Inside a compiled graph the op cannot ask first; a refusal there still gives SDPA's answer."""
    q, k, v = qkv(1, 4, 2, 11, 6, 16)
    for left, right in [(-1, -1), (-1, 0), (2, 0), (-1, 5)]:
        out = torch.ops.aule.host_attention(q, k, v, 0.25, left, right, "numpy")
        from aule.reference import attention_reference

        ref = attention_reference(q.numpy(), k.numpy(), v.numpy(), causal=False, scale=0.25,
                                  window_size=(left, right))
        assert not out.isnan().any()
        assert (out.double() - torch.from_numpy(ref)).abs().max() <= 2e-5, (left, right)


def test_host_op_passes_opcheck():
    q, k, v = qkv(1, 4, 2, 7, 9, 16)
    torch.library.opcheck(torch.ops.aule.host_attention.default, (q, k, v, 0.25, -1, 2, "numpy"))


# ---------------------------------------------------------------------------------------------
# Vulkan (lavapipe in CI) serving SDPA

def _vulkan_or_skip():
    from aule import backends

    b = backends.get("vulkan")
    if not b.available:
        pytest.skip(f"Vulkan backend unavailable: {b.unavailable_reason}")


@pytest.mark.parametrize("shape,causal", [((1, 8, 2, 97, 97, 64), True), ((2, 4, 4, 33, 70, 128), False),
                                          ((1, 4, 1, 40, 17, 80), True)])
def test_vulkan_serves_sdpa(shape, causal, served):
    _vulkan_or_skip()
    b, hq, hk, sq, sk, d = shape
    q, k, v = qkv(b, hq, hk, sq, sk, d)
    with aule.installed(backend="vulkan"):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    assert served == ["vulkan"]
    err = (out.double() - oracle(q, k, v, is_causal=causal, enable_gqa=hq != hk)).abs().max().item()
    assert err <= 1e-4, err


# ---------------------------------------------------------------------------------------------
# a diffusers-style block: non-causal self- and cross-attention through F.scaled_dot_product_attention

class DiffusersStyleAttention(torch.nn.Module):
    """The shape of diffusers' AttnProcessor2_0: project, split heads, SDPA, merge, project."""

    def __init__(self, dim, heads, cross_dim=None):
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(cross_dim or dim, dim, bias=False)
        self.to_v = torch.nn.Linear(cross_dim or dim, dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim)

    def forward(self, x, context=None):
        ctx = x if context is None else context
        b = x.shape[0]
        q, k, v = self.to_q(x), self.to_k(ctx), self.to_v(ctx)
        q, k, v = (t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, self.heads * q.shape[-1]))


@pytest.mark.parametrize("dim,heads", [(320, 5), (640, 10), (512, 4)])  # head_dim 64, 64, 128
def test_diffusers_style_block(dim, heads, served):
    torch.manual_seed(0)
    self_attn = DiffusersStyleAttention(dim, heads).eval()
    cross_attn = DiffusersStyleAttention(dim, heads, cross_dim=96).eval()
    x = torch.randn(2, 64, dim)  # an 8x8 latent, flattened
    context = torch.randn(2, 77, 96)  # text-encoder states
    with torch.no_grad():
        want = cross_attn(self_attn(x), context)
        with aule.installed():
            got = cross_attn(self_attn(x), context)
    assert len(served) == 2
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()


# ---------------------------------------------------------------------------------------------
# ComfyUI entry

def test_comfyui_node_installs_with_backend_choice():
    from aule.integrations import comfyui

    node_cls = comfyui.NODE_CLASS_MAPPINGS["AuleAttention"]
    assert "AuleAttention" in comfyui.NODE_DISPLAY_NAME_MAPPINGS
    spec = node_cls.INPUT_TYPES()
    choices = spec["required"]["backend"][0]
    assert "auto" in choices and "numpy" in choices
    model = object()
    (out,) = getattr(node_cls(), node_cls.FUNCTION)(model, "numpy", True)
    assert out is model and torch_sdpa.is_installed() and torch_sdpa._state.backend == "numpy"
    getattr(node_cls(), node_cls.FUNCTION)(model, "auto", False)
    assert F.scaled_dot_product_attention is ORIGINAL


# ---------------------------------------------------------------------------------------------
# GPU: Triton serving SDPA at full size, gradients against torch's SDPA

gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("shape,causal,dtype", [
    ((2, 32, 8, 1024, 1024, 128), True, torch.bfloat16),
    ((1, 16, 16, 777, 1025, 64), True, torch.float16),   # top-left: keys beyond 777 dropped
    ((2, 8, 8, 1025, 513, 80), True, torch.bfloat16),    # top-left: right bound 512
    ((1, 16, 4, 2048, 2048, 128), False, torch.float16),
])
def test_gpu_forward_and_gradients_match_sdpa(shape, causal, dtype):
    b, hq, hk, sq, sk, d = shape
    q, k, v = (t.requires_grad_() for t in qkv(b, hq, hk, sq, sk, d, dtype=dtype, device="cuda"))
    dout = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    with aule.installed():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    assert out.grad_fn is not None and "triton" in out.grad_fn.name().lower(), out.grad_fn
    out.backward(dout)
    grads = [t.grad.double() for t in (q, k, v)]
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = ORIGINAL(q64, k64, v64, is_causal=causal, enable_gqa=hq != hk)
    ref.backward(dout.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.double() - ref).abs().max() <= tol
    for g, r in zip(grads, (q64.grad, k64.grad, v64.grad)):
        assert (g - r).abs().max() <= tol * max(1.0, r.abs().max().item()), "gradient mismatch"


def test_scale_default_is_sdpa_default():
    q, k, v = qkv(1, 2, 2, 4, 4, 80)
    with aule.installed():
        a = F.scaled_dot_product_attention(q, k, v)
    b = F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(80))
    assert (a - b).abs().max() <= 2e-6


# ---------------------------------------------------------------------------------------------
# each call is validated and routed once

@pytest.mark.parametrize("backend", [None, "numpy"])
def test_drop_in_validates_and_routes_each_call_once(monkeypatch, served, backend):
    canonicalized = count_calls(monkeypatch, "aule.call", "canonicalize")
    routed = count_calls(monkeypatch, "aule.api", "route")
    q, k, v = qkv(1, 4, 2, 9, 9, 32)
    with aule.installed(backend=backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert served, "aule served the call"
    assert len(canonicalized) == 1 and len(routed) == 1, (len(canonicalized), len(routed))
    assert (out.double() - oracle(q, k, v, is_causal=True, enable_gqa=True)).abs().max() <= ATOL[torch.float32]

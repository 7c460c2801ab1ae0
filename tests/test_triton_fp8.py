"""FP8 forward (issue 16 item 3): float8 e4m3 q, k, v with flash-attn 3's descale factors, on the
Triton kernels, against the float64 reference of the dequantised inputs.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1``, whose fp8 dot products
are exact (it widens the operands to float16), so what is left is the one rounding FP8 attention
adds on purpose: P cast to e4m3 for the P.V product. The tolerance is that rounding's bound, not a
fitted number: each entry of P is rounded to 3 mantissa bits, a relative error of at most 2**-4,
or (below e4m3's smallest normal, where the kernel's 2**8 scaling of P rarely leaves anything)
an absolute error of half the subnormal step, 2**-10 of the scaled P, 2**-18 of P itself. So
element ``(i, d)`` of the output is off by at most ``2**-4 * sum_j p_ij |v_jd| + 2**-18 * sum_j
|v_jd|`` (the second sum over the row's visible keys, bounded by all keys), plus the output
dtype's rounding. The reference of ``|v|`` gives the first sum. That bound holds for every
element; the typical error is a small part of it (random signs), which the tests check too,
so an error that stays inside the bound everywhere while being systematically large (a wrong
descale of a few percent) still fails.

GPU-only tests (skipped here) repeat the checks at full size on CUDA, where P is cast by the
hardware (round to nearest even, the same grid). There the scores carry one more error: Hopper's
fp8 tensor-core products do not accumulate in full float32 (about 14 bits are kept, as DeepSeek-V3's
report measured; Triton leaves sm_90's fp8 dots in that accumulator). Each k-32 step of q.k adds at
most ``2**-13 * sum_d |q_d k_d|``, and the LSE moves by at most its row's largest score error, so on
NVIDIA the LSE is held to that bound on random inputs (measured on an H200: 4.6e-3 and 5.9e-3
against the 1e-4 of exact accumulation), and to 1e-4 on inputs whose scores every accumulator holds
exactly (small integers): which still tells an LSE from unrounded P from one from P's e4m3 copy.
"""
from __future__ import annotations

import numpy as np
import pytest

from triton_setup import import_torch_and_triton, run_compile_check

torch, GPU = import_torch_and_triton()

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import aule  # noqa: E402
import aule.flash_attn as fa  # noqa: E402
from aule import backends  # noqa: E402
from aule.backends.triton import TritonBackend  # noqa: E402
from aule.backends.triton import kernels, ops  # noqa: E402
from aule.call import canonicalize  # noqa: E402
from aule.errors import UnsupportedError  # noqa: E402
from aule.reference import attention_reference  # noqa: E402

from attn_util import refusal  # noqa: E402

DEV = "cuda" if GPU else "cpu"
gpu_only = pytest.mark.skipif(not GPU, reason="needs a CUDA device with fp8 tensor cores (sm_89+): full size")
E4M3 = torch.float8_e4m3fn
# Output rounding: float16 rounds to nearest (2**-11 relative); bfloat16 under the interpreter is
# truncated, not rounded (2**-7 relative), and rounded on a GPU (2**-8): the larger one serves both.
OUT_ROUNDING = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def _hip_arch():
    return GPU and getattr(torch.version, "hip", None) is not None


def fp8_dtypes():
    """The e4m3 flavours this machine's Triton runs: both under the interpreter, one on a GPU."""
    if not GPU:
        return (torch.float8_e4m3fn, torch.float8_e4m3fnuz)
    if _hip_arch():
        from aule.backends.triton.common import device_arch

        return (torch.float8_e4m3fnuz,) if device_arch(0).startswith("gfx94") else (E4M3,)
    return (E4M3,)


def make(b, hq, hk, sq, sk, d, seed, dtype=E4M3, spread=1.0):
    """N(0, spread) inputs quantised to ``dtype`` (values, not their scales: the descales are separate)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * spread).to(dtype).to(DEV)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def descales(kind, b, hk, seed):
    """``(q_descale, k_descale, v_descale)`` as a caller passes them: 'none', 'scalar' (a Python
    number, a 0-d and a one-element tensor), 'per-head' (float32 [B, Hkv], all different)."""
    if kind == "none":
        return None, None, None
    if kind == "scalar":
        return 0.7, torch.tensor(1.3, device=DEV), torch.tensor([0.45], device=DEV)
    g = torch.Generator().manual_seed(seed + 1)
    return tuple((torch.rand(b, hk, generator=g) + 0.4).to(DEV) for _ in range(3))


def _host(x):
    if x is None or isinstance(x, float):
        return x
    return x.detach().double().cpu().numpy()


def check(out, lse, q, k, v, scale=None, causal=False, window=-1, descale=(None, None, None), out_dtype=torch.bfloat16,
          exact_scores=None, **features):
    """``out``/``lse`` against the float64 reference of the dequantised inputs, within the bound of
    P's rounding (module docstring); returns the worst error and the error's RMS over the bound's.
    ``exact_scores``: whether the dots accumulate exactly (None: exactly, except on NVIDIA GPUs;
    True for inputs no accumulator rounds), which sets the LSE's tolerance."""
    if exact_scores is None:
        exact_scores = not (q.is_cuda and not _hip_arch())
    qn, kn, vn = (x.float().cpu().numpy() for x in (q, k, v))
    ds = dict(zip(("q_descale", "k_descale", "v_descale"), (_host(x) for x in descale)))
    kw = dict(causal=causal, scale=scale, window_size=window, **features)
    ref, ref_lse = attention_reference(qn, kn, vn, return_lse=True, **kw, **ds)
    # sum_j p_ij |v_jd| / l_i: the reference of |v|; sum_j |v_jd| over every key bounds the visible ones.
    weight = attention_reference(qn, kn, np.abs(vn), **kw, **ds)
    vd = np.abs(np.broadcast_to(1.0 if ds["v_descale"] is None else ds["v_descale"], (q.shape[0], k.shape[1])))
    group = q.shape[1] // k.shape[1]
    col = np.repeat(np.abs(vn.astype(np.float64)).sum(axis=2) * vd[:, :, None], group, axis=1)[:, :, None, :]
    bound = 2.0 ** -4 * weight + 2.0 ** -18 * col + OUT_ROUNDING[out_dtype] * np.abs(ref) + 1e-5
    assert out.dtype == out_dtype and tuple(out.shape) == tuple(q.shape) and out.device == q.device
    got = out.double().cpu().numpy()
    assert not np.isnan(got).any(), "NaN in the output"
    err = np.abs(got - ref)
    worst = float(err.max())
    at = np.unravel_index((err - bound).argmax(), err.shape)
    assert (err <= bound).all(), f"error {worst:.3g} over the rounding bound at {at}"
    ratio = float(np.sqrt(np.mean((err / bound) ** 2)))
    assert ratio < 0.3, f"errors are {ratio:.2f} of their bound on average: too systematic for rounding"
    if lse is not None:
        lse = lse.double().cpu().numpy()
        empty = np.isneginf(ref_lse)
        assert (np.isneginf(lse) == empty).all(), "LSE -inf exactly for rows that see no key"
        tol = 1e-4 + (_accumulation_bound(qn, kn, scale, ds, group) if exact_scores is False else 0.0)
        assert (np.abs(lse - ref_lse)[~empty] <= np.broadcast_to(tol, lse.shape)[~empty]).all(), \
            "the LSE is computed from unrounded P"
    return worst, ratio


def _accumulation_bound(qn, kn, scale, ds, group):
    """Per row ``[B, Hq, Sq]``: the most an NVIDIA fp8 tensor-core accumulation (module docstring)
    moves a score of that row, in natural-log units, and so its LSE: ``ceil(d / 32) * 2**-13``
    times the row's largest ``scale * |q_descale k_descale| * sum_d |q_d k_d|``."""
    d = qn.shape[-1]
    ka = np.repeat(np.abs(kn.astype(np.float64)), group, axis=1)
    mag = (np.abs(qn.astype(np.float64)) @ ka.transpose(0, 1, 3, 2)).max(-1)
    dq, dk = (np.broadcast_to(1.0 if x is None else np.abs(x), (qn.shape[0], kn.shape[1]))
              for x in (ds["q_descale"], ds["k_descale"]))
    factor = np.repeat(dq * dk, group, axis=1)[:, :, None]
    return -(-d // 32) * 2.0 ** -13 * (scale if scale is not None else d ** -0.5) * factor * mag


def _triton_forced(monkeypatch):
    """Route to Triton on this machine even where its probe finds no GPU (the interpreter runs it)."""
    b = backends.get("triton")
    monkeypatch.setitem(b.__dict__, "unavailable_reason", None)
    return b


# -- the kernels against the reference --------------------------------------------------------------

SHAPES = [
    # b, hq, hk, sq, sk, d, causal, window
    (1, 2, 2, 37, 53, 40, False, -1),
    (2, 4, 2, 33, 70, 64, True, -1),      # GQA 2, seq_q != seq_k, bottom-right causal
    (1, 8, 1, 1, 97, 16, False, -1),      # MQA, one query row (decode-like)
    (1, 2, 2, 65, 65, 80, True, (16, 0)),  # window, head_dim 80 (padded lanes)
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}h{}/{}q{}k{}d{}{}{}".format(
    *s[:6], "c" if s[6] else "", "w" if s[7] != -1 else ""))
@pytest.mark.parametrize("kind", ["none", "scalar", "per-head"])
def test_fp8_matches_reference(shape, kind):
    b, hq, hk, sq, sk, d, causal, window = shape
    q, k, v = make(b, hq, hk, sq, sk, d, seed=sq * 7 + sk)
    ds = descales(kind, b, hk, seed=sk)
    call = canonicalize(q, k, v, causal=causal, window_size=window, return_lse=True,
                        **dict(zip(("q_descale", "k_descale", "v_descale"), ds)))
    out, lse = TritonBackend().attention(call)
    check(out, lse, q, k, v, causal=causal, window=window, descale=ds)


@pytest.mark.parametrize("dtype", fp8_dtypes(), ids=str)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp8_flavours_and_out_dtypes(dtype, out_dtype):
    q, k, v = make(1, 4, 2, 41, 77, 32, seed=3, dtype=dtype)
    ds = descales("per-head", 1, 2, seed=4)
    call = canonicalize(q, k, v, causal=True, return_lse=True, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2],
                        out_dtype=out_dtype)
    out, lse = TritonBackend().attention(call)
    check(out, lse, q, k, v, causal=True, descale=ds, out_dtype=out_dtype)


def test_fp8_features():
    """Softcap, ALiBi, sinks and a padding mask act on the dequantised scores (the descales are
    folded into the cap's scale too)."""
    b, hq, hk, sq, sk, d = 2, 4, 2, 29, 61, 32
    q, k, v = make(b, hq, hk, sq, sk, d, seed=11, spread=2.0)
    ds = descales("per-head", b, hk, seed=12)
    keep = np.ones((b, 1, 1, sk), dtype=bool)
    keep[1, ..., 40:] = False
    features = dict(softcap=3.0, alibi_slopes=np.linspace(0.05, 0.4, hq).astype(np.float32),
                    sinks=np.linspace(-1.0, 2.0, hq).astype(np.float32), attn_mask=keep)
    call = canonicalize(q, k, v, causal=False, return_lse=True, q_descale=ds[0], k_descale=ds[1], v_descale=ds[2],
                        **features)
    assert {"fp8", "softcap", "alibi", "sinks", "mask"} <= call.features
    out, lse = TritonBackend().attention(call)
    check(out, lse, q, k, v, descale=ds, **features)


def test_fp8_tiles_and_strided_inputs():
    """Forced tiles (the interpreter's one tile hides the tile-run arithmetic) and non-contiguous
    q/k/v: V's layout for the P.V product is made from any strides."""
    b, hq, hk, sq, sk, d = 1, 4, 2, 70, 90, 64
    g = torch.Generator().manual_seed(5)
    base = torch.randn(b, sq + 3, hq, d, generator=g).to(E4M3).to(DEV)
    q = base[:, 3:].transpose(1, 2)  # [B, H, S, D] seen from a [B, S, H, D] buffer
    kv = torch.randn(b, hk, sk, 2 * d, generator=g).to(E4M3).to(DEV)
    k, v = kv[..., :d], kv[..., d:]
    ds = descales("per-head", b, hk, seed=6)
    keys_first = v.transpose(-1, -2).contiguous().transpose(-1, -2)  # already as the P.V product reads it
    for tile, v_in in (((16, 32), v), ((32, 16), v), ((64, 64), v), ((32, 32), keys_first)):
        out, lse = ops.attention_forward(q, k, v_in, d ** -0.5, -1, 0, tile=tile, descale=ds)
        check(out, lse, q, k, v, causal=True, descale=ds)


def test_fp8_public_entry_points(monkeypatch):
    """aule.flash_attention and flash_attn_func ([B, S, H, D]) with flash-attn 3's descales; bfloat16
    by default, as flash-attn 3 returns."""
    _triton_forced(monkeypatch)
    b, hq, hk, sq, sk, d = 2, 4, 2, 19, 33, 32
    q, k, v = make(b, hq, hk, sq, sk, d, seed=21)
    ds = descales("per-head", b, hk, seed=22)
    names = dict(zip(("q_descale", "k_descale", "v_descale"), ds))
    out, lse = aule.flash_attention(q, k, v, causal=True, backend="triton", return_lse=True, **names)
    check(out, lse, q, k, v, causal=True, descale=ds)
    monkeypatch.setenv("AULE_BACKEND", "triton")
    res = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                             return_attn_probs=True, **names)
    check(res[0].transpose(1, 2), res[1], q, k, v, causal=True, descale=ds)


def test_fp8_without_keys_or_rows():
    """Nothing to compute: zeros of the output dtype, LSE -inf, no kernel."""
    q, k, v = make(1, 2, 2, 5, 0, 16, seed=1)
    out, lse = aule.flash_attention(q, k, v, return_lse=True, q_descale=0.5)
    assert out.dtype == torch.bfloat16 and not out.abs().any() and torch.isneginf(lse).all()


@triton.jit
def _grid_kernel(X, Y, N: tl.constexpr, DT: tl.constexpr):
    x = tl.load(X + tl.arange(0, N))
    tl.store(Y + tl.arange(0, N), kernels._e4m3_grid(x, DT))


def test_e4m3_grid_rounds_as_torch_does():
    """The interpreter's stand-in for the hardware cast (kernels._e4m3_grid) lands on torch's
    round-to-nearest-even e4m3 values over P's range, subnormals included."""
    if GPU:
        pytest.skip("interpreter-only helper: compiled kernels cast in hardware")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.rand(4096, generator=g) * 256, torch.rand(2048, generator=g) * 2.0 ** -5,
                   torch.tensor([0.0, 2.0 ** -10, 3 * 2.0 ** -11, 7.75, 15.5, 240.0, 256.0])])
    x = torch.cat([x, torch.zeros(8192 - len(x))])
    for tt, td in ((tl.float8e4nv, torch.float8_e4m3fn), (tl.float8e4b8, torch.float8_e4m3fnuz)):
        y = torch.empty_like(x)
        _grid_kernel[(1,)](x, y, len(x), tt)
        want = x.to(td).float()
        ok = x <= (448 if td == torch.float8_e4m3fn else 240)
        assert torch.equal(y[ok], want[ok]), f"{td}: {(y[ok] != want[ok]).sum()} values off"


# -- validation: errors name the argument -------------------------------------------------------------

def _qkv(b=2, hq=4, hk=2, s=8, d=16, dtype=E4M3):
    return make(b, hq, hk, s, s, d, seed=0, dtype=dtype)


@pytest.mark.parametrize("bad, err, match", [
    (dict(q_descale=torch.ones(2, 4, device=DEV)), ValueError,
     r"q_descale must have shape \[batch, heads_kv\] = \[2, 2\]"),
    (dict(k_descale=torch.ones(2, device=DEV)), ValueError, "k_descale must have shape"),
    (dict(v_descale=torch.ones(2, 2, dtype=torch.float64, device=DEV)), TypeError, "v_descale must be a float32 tensor"),
    (dict(q_descale=np.ones((2, 2), np.float32)), TypeError, "q_descale must be a float32 torch tensor"),
    (dict(q_descale=-1.0), ValueError, "q_descale must be finite and > 0"),
    (dict(k_descale=float("inf")), ValueError, "k_descale must be finite and > 0"),
    (dict(q_descale=True), TypeError, "q_descale must be"),
    (dict(out_dtype=torch.float32), ValueError, "out_dtype must be bfloat16 or float16"),
    (dict(out_dtype="float8_e4m3fn"), ValueError, "out_dtype must be bfloat16 or float16"),
])
def test_bad_fp8_arguments(bad, err, match):
    q, k, v = _qkv()
    with pytest.raises(err, match=match):
        canonicalize(q, k, v, **bad)


def test_descales_and_out_dtype_need_fp8_inputs():
    q, k, v = _qkv(dtype=torch.float16)
    with pytest.raises(ValueError, match="q_descale, v_descale apply to float8 inputs only; the inputs are float16"):
        aule.flash_attention(q, k, v, q_descale=torch.ones(2, 2), v_descale=1.0)
    with pytest.raises(ValueError, match="out_dtype is for float8 inputs only"):
        aule.flash_attention(q, k, v, out_dtype=torch.bfloat16)
    qn = np.zeros((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="k_descale apply to float8 inputs only; the inputs are float32"):
        aule.flash_attention(qn, qn, qn, k_descale=2.0)


def test_fp8_dtype_rules():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="query, key and value must share one dtype"):
        canonicalize(q, k, v.to(torch.float16))
    with pytest.raises(TypeError, match="float8_e4m3fn / float8_e4m3fnuz"):
        canonicalize(*(x.float().to(torch.float8_e5m2) for x in (q, k, v)))
    with pytest.raises(TypeError, match="float8 inputs are served by flash_attention"):
        aule.flash_attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                    np.array([0, 8]), np.array([0, 8]), 8, 8)


def test_fp8_is_forward_only():
    q, k, v = _qkv()
    with pytest.raises(UnsupportedError, match="query require grad, and aule's float8 attention is forward only"):
        canonicalize(q.clone().requires_grad_(), k, v)
    with pytest.raises(UnsupportedError, match="v_descale requires grad"):
        canonicalize(q, k, v, v_descale=torch.ones(2, 2, device=DEV, requires_grad=True))
    with torch.no_grad():
        assert canonicalize(q.clone().requires_grad_(), k, v).descale is not None


def test_only_triton_serves_fp8():
    """NumPy and Vulkan refuse FP8 by the feature's name; so does auto routing on host tensors,
    where Triton is not in the order."""
    q, k, v = (x.cpu() for x in _qkv())
    call = canonicalize(q, k, v)
    assert call.features == {"fp8"}
    for name in ("numpy", "vulkan"):
        assert refusal(name, "attention", call) == f"backend {name!r} does not apply fp8 yet"
    with pytest.raises(UnsupportedError, match="does not apply fp8 yet"):
        aule.flash_attention(q, k, v)
    if not GPU:
        assert refusal("triton", "attention", call) is None  # the interpreter runs it


def test_fp8_refused_on_gpus_without_fp8_products(monkeypatch):
    """NVIDIA before sm_89, AMD before CDNA3 and the other vendor's e4m3 flavour are refused by name."""
    from aule.backends.triton import TritonAMDBackend, common

    class Q:  # a stand-in query on a CUDA device
        class device:
            index = 0

    def call_on(dtype):
        c = canonicalize(*(x.cpu() for x in _qkv()))
        c.device, c.dtype, c.q = "cuda:0", dtype, Q
        return c

    for arch, backend, dtype, want in (
            ("sm80", TritonBackend(), "float8_e4m3fn", "sm_89 and later"),
            ("sm90", TritonBackend(), "float8_e4m3fnuz", "take float8_e4m3fn"),
            ("sm90", TritonBackend(), "float8_e4m3fn", None),
            ("gfx90a", TritonAMDBackend(), "float8_e4m3fn", "gfx94x, gfx950, gfx12"),
            ("gfx942", TritonAMDBackend(), "float8_e4m3fn", "take float8_e4m3fnuz"),
            ("gfx942", TritonAMDBackend(), "float8_e4m3fnuz", None),
            ("gfx950", TritonAMDBackend(), "float8_e4m3fn", None)):
        monkeypatch.setattr(common, "device_arch", lambda index=0, a=arch: a)
        reason = backend._fp8_refusal(call_on(dtype))
        assert (reason is None) if want is None else (want in reason), (arch, dtype, reason)


# -- GPU: full size ------------------------------------------------------------------------------------

@gpu_only
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_full_size(causal):
    b, hq, hk, s, d = 1, 4, 2, 2048 + 17, 128
    q, k, v = make(b, hq, hk, s, s, d, seed=31, spread=2.0)
    ds = descales("per-head", b, hk, seed=32)
    out, lse = aule.flash_attention(q, k, v, causal=causal, return_lse=True,
                                    **dict(zip(("q_descale", "k_descale", "v_descale"), ds)))
    worst, ratio = check(out, lse, q, k, v, causal=causal, descale=ds)
    print(f"fp8 full size causal={causal}: max error {worst:.3g}, {ratio:.2f} of the rounding bound (rms)")


@gpu_only
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_full_size_lse_from_unrounded_p(causal):
    """Scores no accumulator rounds (q and k small integers: every partial sum below 2**10), so the
    LSE must be the reference's to 1e-4 on the hardware too; one from P's e4m3 copy is not."""
    b, hq, hk, s, d = 1, 4, 2, 2048 + 17, 128
    g = torch.Generator().manual_seed(33)
    q, k = (torch.randint(-2, 3, shape, generator=g).float().to(E4M3).to(DEV)
            for shape in ((b, hq, s, d), (b, hk, s, d)))
    v = (torch.randn((b, hk, s, d), generator=g) * 2.0).to(E4M3).to(DEV)
    ds = descales("per-head", b, hk, seed=34)
    out, lse = aule.flash_attention(q, k, v, causal=causal, return_lse=True,
                                    **dict(zip(("q_descale", "k_descale", "v_descale"), ds)))
    check(out, lse, q, k, v, causal=causal, descale=ds, exact_scores=True)


@gpu_only
def test_fp8_descales_on_another_device():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="k_descale must be on the inputs' device"):
        canonicalize(q, k, v, k_descale=torch.ones(2, 2))


@gpu_only
def test_fp8_under_torch_compile_is_refused():
    q, k, v = _qkv()

    @torch.compile(fullgraph=True)
    def f(q, k, v):
        return aule.flash_attention(q, k, v)

    with pytest.raises(Exception, match="float8 attention inside torch.compile"):
        f(q, k, v)


def test_fp8_kernel_compiles_for_its_gpus():
    """What the interpreter runs must also build for sm_90 (e4m3 wgmma, no spills at hd 128 with
    every configured tile), gfx942 and gfx950 (fp8 MFMA): tests/fp8_compile_check.py, in a process
    of its own without the interpreter."""
    if GPU:
        pytest.skip("on a GPU the other tests compile and run the kernel for real")
    run_compile_check("fp8_compile_check.py", timeout=600)


# -- the benchmark's FP8 rows ----------------------------------------------------------------------------

def test_bench_fp8_inputs_quantise_exactly():
    """The fp8 suite's inputs are on e4m3's grid, and its contender's quantisation (power-of-two
    per-head descales) gives back exactly those values, so every row of a case computes one problem."""
    from aule.bench.contenders import fp8_quantised
    from aule.bench.inputs import AttentionInputs
    from aule.bench.suites import SUITE_BY_NAME

    suite = SUITE_BY_NAME["fp8"]
    assert suite.baseline == "aule:triton" and "aule:triton fp8" in suite.contenders
    assert any(t.contender == "aule:triton fp8" and t.value == 1.5 for t in suite.targets)
    case = dict(suite.cases[0], B=2, Hq=4, Hkv=2, S=24, device="cpu")
    s = AttentionInputs(case).sets[0]
    for name in ("q", "k", "v"):
        x8, descale = fp8_quantised(s[name], case["Hkv"])
        assert x8.dtype == E4M3 and descale.shape == (2, 2) and descale.dtype == torch.float32
        per_head = descale.repeat_interleave(s[name].shape[1] // 2, dim=1)[:, :, None, None]
        assert torch.equal(x8.float() * per_head, s[name].float()), name
        assert x8.float().abs().amax() > 224  # the range used, as a quantiser scaling amax would


def test_device_arch_reads_the_compute_capability_on_cuda_builds(monkeypatch):
    """CUDA builds of torch fill gcnArchName with the card's name: it must not be read as an
    architecture there (it made every H200 look fp8-less and broke the tanh choice)."""
    import types

    from aule.backends.triton import common

    props = types.SimpleNamespace(gcnArchName="NVIDIA H200", major=9, minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    for hip, want in ((None, "sm90"), ("6.2", "NVIDIA H200")):
        monkeypatch.setattr(torch.version, "hip", hip)
        common.device_arch.cache_clear()
        assert common.device_arch(0) == want
    props.gcnArchName = "gfx942:sramecc+:xnack-"
    common.device_arch.cache_clear()
    assert common.device_arch(0) == "gfx942"
    common.device_arch.cache_clear()

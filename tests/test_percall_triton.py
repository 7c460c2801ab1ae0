"""Triton's cached launches (ops._launch, issue 14 item 4): a repeated call reuses its resolved
launch (the JIT function and its tile, or the autotuner's pick) and only that; anything that
decides the launch (shape bucket, dtype, compile-time flags, the configuration settings, a forced
tile) resolves it anew. Runs on the CPU under TRITON_INTERPRET=1 (the kernels' own results) and
with the launch observed through stand-ins (the GPU's autotuned path, without a GPU)."""
from __future__ import annotations

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import triton  # noqa: E402

from aule.backends.triton import TritonBackend  # noqa: E402
from aule.backends.triton import configs as cfg  # noqa: E402
from aule.backends.triton import ops  # noqa: E402
from aule.call import canonicalize  # noqa: E402
from aule.reference import attention_reference  # noqa: E402

DEV = "cuda" if GPU else "cpu"
OUT_TOL = {"float32": 5e-5, "float16": 3e-3}


class _Kernel:
    """Stands in for a JIT function: records each launch's keyword arguments. It has the real
    kernel's parameter names, as the direct launches read them, and returns no compiled kernel, so
    with them on (the default) every launch still comes here."""

    arg_names = list(ops.kernels._attn_fwd.arg_names)

    def __init__(self):
        self.launches = []

    def run(self, *args, grid, warmup, **kw):
        assert not warmup
        self.launches.append((grid if not callable(grid) else grid(kw), kw))


class _Tuner:
    """Stands in for triton.autotune's wrapper: 'tunes' by taking its first configuration."""

    def __init__(self, kernel, configs):
        self.kernel, self.configs, self.tunings = kernel, configs, 0
        self.best_config = None

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.tunings += 1
            self.best_config = self.configs[-1]
            self.kernel.run(*args, grid=grid, warmup=False, **kw, **self.best_config.all_kwargs())
        return launch


@pytest.fixture
def observed(monkeypatch):
    """The forward kernel and its tuner replaced by recorders, on the GPU's path (target 'cuda')."""
    kernel = _Kernel()
    tuners = {}

    def tuned(name, target, dim_class, fp32, fp8=False):
        key = (name, target, dim_class, fp32, fp8)
        if key not in tuners:
            tuners[key] = _Tuner(kernel, [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=2, num_stages=1),
                                          triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=3)])
        return tuners[key]

    monkeypatch.setattr(ops, "target_of", lambda t: "cuda")
    monkeypatch.setattr(ops, "_tuned", tuned)
    monkeypatch.setitem(ops._KERNELS, "fwd", kernel)
    monkeypatch.setattr(ops, "_LAUNCHES", {})
    monkeypatch.setattr(ops, "_DIRECT", {})
    monkeypatch.setattr(ops, "_current_device", lambda: 0)
    monkeypatch.delenv("AULE_TRITON_AUTOTUNE", raising=False)
    monkeypatch.delenv("AULE_TRITON_CONFIG", raising=False)
    return kernel, tuners


def _inputs(sq, sk=None, dtype=torch.float32, d=64):
    g = torch.Generator().manual_seed(sq)
    return [torch.randn(shape, generator=g).to(dtype) for shape in ((1, 2, sq, d), (1, 1, sk or sq, d), (1, 1, sk or sq, d))]


def _tunings(tuners):
    return sum(t.tunings for t in tuners.values())


def test_a_tuned_pick_is_reused_only_where_the_tuner_would_key_it(observed, monkeypatch):
    kernel, tuners = observed
    q, k, v = _inputs(16)
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert _tunings(tuners) == 1
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert _tunings(tuners) == 1, "a repeated call must not pass through the tuner"
    grid, kw = kernel.launches[-1]
    assert (kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]) == (32, 16, 4, 3)
    assert kw["HEAD_DIM"] == 64 and grid == (1, 2)  # the grid sized from the tuned BLOCK_M
    # Each of these decides the tuner's key (or the kernel compiled), so each is tuned anew once.
    changes = [lambda: ops.attention_forward(*_inputs(40), 0.125, -1, -1),                 # shape bucket
               # dtype (float16 against bfloat16 alone, which the CPU refuses, differs in nothing else)
               lambda: ops.attention_forward(*_inputs(16, dtype=torch.float16), 0.125, -1, -1),
               lambda: ops.attention_forward(q, k, v, 0.125, -1, 0),                       # causal flag
               lambda: ops.attention_forward(q, k, v, 0.125, -1, -1, softcap=5.0),         # softcap flag
               lambda: ops.attention_forward(*_inputs(16, d=80), 0.125, -1, -1)]           # head_dim
    for i, change in enumerate(changes):
        change()
        change()
        assert _tunings(tuners) == 2 + i
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert _tunings(tuners) == 1 + len(changes)


def test_fixed_configurations_follow_the_settings_and_a_forced_tile(observed, monkeypatch):
    kernel, tuners = observed
    q, k, v = _inputs(256, dtype=torch.float16)
    fits = cfg.prune(cfg.configs("cuda", "fwd", 64, False), {"Q_BUCKET": 256, "K_BUCKET": 256})
    assert len(fits) > 1, "the test needs two configurations that fit"

    def last_tile():
        kw = kernel.launches[-1][1]
        return kw["BLOCK_M"], kw["BLOCK_N"], kw["num_warps"], kw["num_stages"]

    def tile_of(c):
        return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages

    monkeypatch.setenv("AULE_TRITON_AUTOTUNE", "0")
    for _ in range(2):
        ops.attention_forward(q, k, v, 0.125, -1, -1)
        assert last_tile() == tile_of(fits[0])
    monkeypatch.setenv("AULE_TRITON_CONFIG", "1")
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert last_tile() == tile_of(fits[1])
    ops.attention_forward(q, k, v, 0.125, -1, -1, tile=(16, 32, 8, 2))
    assert last_tile() == (16, 32, 8, 2)
    assert kernel.launches[-1][0] == (256 // 16, 2)  # the grid sized from the forced tile
    monkeypatch.delenv("AULE_TRITON_CONFIG")
    monkeypatch.delenv("AULE_TRITON_AUTOTUNE")
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert _tunings(tuners) == 1 and last_tile() == (32, 16, 4, 3)


def test_tensor_dtypes_are_those_of_the_leading_tensors():
    a, b = torch.zeros(1), torch.zeros(1, dtype=torch.float16)
    assert ops._tensor_dtypes((a, b, 3, a)) == (torch.float32, torch.float16)
    assert ops._tensor_dtypes((torch.nn.Parameter(b), 1)) == (torch.float16,)


@pytest.mark.skipif(not GPU and not ops.interpreting(), reason="needs a GPU or TRITON_INTERPRET=1")
def test_results_stay_right_as_calls_change():
    """The real kernels, calls that differ in what the launch caches are keyed on, each checked
    against the float64 reference, the first again at the end."""
    b = TritonBackend()
    g = torch.Generator().manual_seed(4)

    def run(sq, sk, dtype, causal, softcap, transpose=False):
        shapes = ((1, 2, sq, 32), (1, 1, sk, 32), (1, 1, sk, 32))
        if transpose:  # [B, S, H, D] storage seen as [B, H, S, D]: other strides
            q, k, v = (torch.randn(s[0], s[2], s[1], s[3], generator=g).to(dtype).to(DEV).transpose(1, 2)
                       for s in shapes)
        else:
            q, k, v = (torch.randn(s, generator=g).to(dtype).to(DEV) for s in shapes)
        call = canonicalize(q, k, v, causal=causal, softcap=softcap)
        out, _ = b.attention(call)
        ref = attention_reference(*(x.float().cpu().numpy() for x in (q, k, v)), causal=causal, softcap=softcap)
        name = str(dtype).replace("torch.", "")
        assert np.abs(out.float().cpu().numpy() - ref).max() <= OUT_TOL[name]

    cases = [(16, 16, torch.float32, False, 0.0), (37, 23, torch.float32, True, 0.0),
             (16, 16, torch.float16, False, 0.0), (16, 16, torch.float32, False, 2.0),
             (16, 16, torch.float32, False, 0.0, True), (16, 16, torch.float32, False, 0.0)]
    for case in cases:
        run(*case)


# --- direct launches (AULE_TRITON_DIRECT, on by default): compiled kernels launched directly ---

class _Compiled:
    """Stands in for a CompiledKernel: ``compiled[grid](*params)`` records the launch."""

    def __init__(self, launches):
        self.launches = launches

    def __getitem__(self, grid):
        return lambda *params: self.launches.append((grid, params))


class _CompilingKernel(_Kernel):
    """A JIT function stand-in whose ``run`` returns its compiled kernel, with the real
    kernel's parameter names."""

    def __init__(self, arg_names):
        super().__init__()
        self.arg_names = arg_names
        self.direct = []
        self.compiled = _Compiled(self.direct)

    def run(self, *args, grid, warmup, **kw):
        super().run(*args, grid=grid, warmup=warmup, **kw)
        return self.compiled


@pytest.fixture
def direct(observed, monkeypatch):
    kernel = _CompilingKernel(_Kernel.arg_names)
    monkeypatch.setitem(ops._KERNELS, "fwd", kernel)
    monkeypatch.setenv("AULE_TRITON_AUTOTUNE", "0")
    monkeypatch.setenv("AULE_TRITON_DIRECT", "1")
    return kernel


def test_direct_launches_reuse_a_compiled_kernel_only_for_the_same_specialisation(direct, monkeypatch):
    kernel = direct
    q, k, v = _inputs(16)
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert len(kernel.launches) == 1 and not kernel.direct
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert len(kernel.launches) == 1 and len(kernel.direct) == 1
    grid, params = kernel.direct[-1]
    first_grid, first_kw = kernel.launches[0]
    named = dict(zip(kernel.arg_names, params))
    assert len(params) == len(kernel.arg_names) and grid == tuple(first_grid) + (1,) * (3 - len(first_grid))
    assert all(named[n] == first_kw[n] for n in kernel.arg_names if n in first_kw)  # compile-time values
    assert named["Q"] is q and named["SEQ_Q"] == 16 and named["stride_qd"] == 1
    # Whatever Triton specialises on takes its path again (and is then launched directly).
    data = torch.randn(1 + q.numel())
    misaligned = data[1:].view(q.shape)  # 4 bytes past a 16-byte boundary
    assert misaligned.data_ptr() % 16
    calls = [lambda: ops.attention_forward(misaligned, k, v, 0.125, -1, -1),      # a tensor's alignment
             lambda: ops.attention_forward(*_inputs(17, 16), 0.125, -1, -1),     # SEQ_Q not a multiple of 16
             lambda: ops.attention_forward(q, k, v, 0.125, 4, -1),               # LEFT 4 against -1
             lambda: ops.attention_forward(q[:, :1], k, v, 0.125, -1, -1)]      # H_Q and GROUP become 1
    for i, call in enumerate(calls):
        call()
        call()
        assert len(kernel.launches) == 2 + i and len(kernel.direct) == 2 + i
    ops.attention_forward(q, k, v, 0.3, -1, -1)  # another float: no new specialisation
    assert len(kernel.launches) == 1 + len(calls) and len(kernel.direct) == 2 + len(calls)
    monkeypatch.setenv("AULE_TRITON_DIRECT", "0")  # the escape: Triton's own path
    ops.attention_forward(q, k, v, 0.125, -1, -1)
    assert len(kernel.launches) == 2 + len(calls) and len(kernel.direct) == 2 + len(calls)


def test_specialization_follows_triton_s_rules():
    """Each distinction Triton draws for these arguments (checked against its own specialiser
    where this Triton has it) is one the direct launches draw too."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    t = torch.zeros(8)
    values = [t, t[1:], 0, 1, 2, 16, -16, 17, -1, 2 ** 31 - 1, 2 ** 31, -2 ** 31, -2 ** 31 - 1, 2 ** 63, 0.5, 1e300]
    ours = ops._specialization(tuple(values), 2)
    theirs = [native(BaseBackend, x, False, True, True) for x in values]
    for i in range(len(values)):
        for j in range(len(values)):
            same_type = type(values[i]) is type(values[j]) or (isinstance(values[i], torch.Tensor)
                                                               and isinstance(values[j], torch.Tensor))
            if same_type and theirs[i] != theirs[j]:
                assert ours[i] != ours[j], (values[i], values[j], theirs[i], theirs[j])
    assert ops._specialization((t, True), 1) is None  # an argument of another kind: Triton's own path
    assert ops._specialization((t, 3, None), 1) is None


@pytest.mark.skipif(not GPU or ops.torch_gpu_flavour() != "cuda", reason="needs an NVIDIA GPU (direct launches are NVIDIA's)")
def test_direct_launches_give_what_triton_s_path_gives(monkeypatch):
    """On the GPU: varied calls, each through Triton's path and then twice directly, all equal to
    each other and close to the float64 reference."""
    g = torch.Generator(device="cuda").manual_seed(8)

    def qkv(b, hq, hk, sq, sk, d, dtype, offset=0):
        out = []
        for h, s in ((hq, sq), (hk, sk), (hk, sk)):
            flat = torch.randn(b * h * s * d + offset, generator=g, device="cuda").to(dtype)
            out.append(flat[offset:].view(b, h, s, d))
        return out

    cases = [(qkv(1, 1, 1, 16, 16, 64, torch.bfloat16), -1, -1), (qkv(2, 8, 2, 100, 130, 64, torch.float16), -1, 0),
             (qkv(1, 4, 4, 33, 33, 128, torch.bfloat16, offset=3), 7, 0), (qkv(1, 2, 1, 1, 300, 80, torch.float16), -1, -1)]
    for (q, k, v), left, right in cases:
        monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
        plain, plain_lse = ops.attention_forward(q, k, v, 0.2, left, right)
        monkeypatch.setenv("AULE_TRITON_DIRECT", "1")
        before = len(ops._DIRECT)
        for _ in range(2):
            out, lse = ops.attention_forward(q, k, v, 0.2, left, right)
            assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
        assert len(ops._DIRECT) >= before
        ref = attention_reference(*(x.float().cpu().numpy() for x in (q, k, v)), causal=False, scale=0.2,
                                  window_size=(left, right))
        assert np.abs(out.float().cpu().numpy() - ref).max() < 3e-2
    assert ops._DIRECT, "no launch went through a compiled kernel directly"

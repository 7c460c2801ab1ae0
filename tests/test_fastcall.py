"""The steady state of repeated eager Triton calls (aule.fastcall, issue 14 item 4): a call seen
before takes its ready launch, and only when everything the full path decides on is the same;
every change (shape, stride, alignment, dtype, device, scalar argument and its type, setting,
requires_grad, grad mode, functorch, tracing) takes the full path and gives the right answer; bad
input after good raises what it raises on its own; outputs are fresh tensors on every call.

On an NVIDIA GPU the tests run the real path. Without one the NVIDIA path is taken on CPU tensors
under Triton's interpreter: the target is 'cuda' and the forward kernel is a stand-in whose
"compiled kernel" runs the real interpreted kernel, so every result here is computed by aule's
kernel and checked against the reference either way."""
from __future__ import annotations

import os

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import api, backends, device_errors, fastcall  # noqa: E402
from aule.backends.triton import ops  # noqa: E402
from aule.reference import attention_reference  # noqa: E402

from attn_util import assert_matches_reference  # noqa: E402

DEV = "cuda" if GPU else "cpu"


class _Compiled:
    """A CompiledKernel stand-in: ``compiled[grid](*params)`` runs the real kernel on them."""

    def __init__(self, real, counts):
        self.real, self.counts = real, counts

    def __getitem__(self, grid):
        def launch(*params):
            self.counts["direct"] += 1
            self.real.run(*params, grid=grid, warmup=False)
        return launch


class _Kernel:
    """The forward JIT function as Triton's NVIDIA path sees it: ``run`` launches and returns its
    compiled kernel (here the interpreted one behind a :class:`_Compiled`)."""

    def __init__(self, real, counts):
        self.real, self.counts, self.arg_names = real, counts, real.arg_names
        self.compiled = _Compiled(real, counts)

    def run(self, *args, grid, warmup, **kw):
        self.counts["run"] += 1
        kw.pop("num_warps", None), kw.pop("num_stages", None)
        self.real.run(*args, grid=grid, warmup=warmup, **kw)
        return self.compiled

    def __getitem__(self, grid):  # Triton's own launch, as AULE_TRITON_DIRECT=0 makes it
        return lambda *args, **kw: self.run(*args, grid=grid, warmup=False, **kw)


@pytest.fixture
def nvidia(monkeypatch):
    """The NVIDIA launch path (real on an NVIDIA GPU, else on CPU tensors), with a fresh cache;
    returns the number of full-path calls (``attention`` in aule.api, where canonicalize and
    routing start) and, without a GPU, the forward's launches through ``run`` and direct ones."""
    counts = {"full": 0}
    if GPU:
        if ops.torch_gpu_flavour() != "cuda":
            pytest.skip("ready launches are NVIDIA's (direct launches of compiled kernels)")
    else:
        counts.update(run=0, direct=0)
        monkeypatch.setattr(ops, "target_of", lambda t: "cuda")
        monkeypatch.setattr(ops, "_current_device", lambda: 0)
        monkeypatch.setitem(ops._KERNELS, "fwd", _Kernel(ops.kernels._attn_fwd, counts))
        for name in ("_LAUNCHES", "_DIRECT"):
            monkeypatch.setattr(ops, name, {})
        monkeypatch.setattr(fastcall, "_launch_device", lambda q: 0)  # as for a CUDA tensor on NVIDIA
        monkeypatch.setitem(backends.get("triton").__dict__, "unavailable_reason", None)
        monkeypatch.setenv("AULE_TRITON_TANH", "exp2")  # NVIDIA's default tanh is inline assembly: no interpreter runs it
    monkeypatch.setattr(fastcall, "_ENTRIES", {})
    for name in ("AULE_TRITON_DIRECT", "AULE_TRITON_CONFIG", "AULE_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AULE_TRITON_AUTOTUNE", "0")
    real = api.attention

    def full(*a, **kw):
        counts["full"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(api, "attention", full)
    return counts


def _qkv(seed=0, b=1, hq=2, hk=1, sq=13, sk=21, d=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(DEV)
            for shape in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d))]


def _np(*xs):
    return [x.detach().cpu().double().numpy() for x in xs]


def _check(out, lse, q, k, v, **kw):
    dtype = str(q.dtype).replace("torch.", "")
    assert_matches_reference(out.detach().cpu().float().numpy(), None if lse is None else lse.cpu().numpy(),
                             *_np(q, k, v), dtype, **kw)


def _steady_moves(counts, fn, times=3):
    """Call ``fn`` until it is served by its ready launches: the result of the last call, and how
    far each counter moved in it."""
    for _ in range(times):
        out = fn()
    before = dict(counts)
    out = fn()
    assert counts["full"] == before["full"] and counts.get("run") == before.get("run"), "not the ready launch"
    return out, {n: counts[n] - before[n] for n in counts}


def _steady(counts, fn, times=3):
    """Call ``fn`` until it is served by its ready launch, one direct launch; the last call's result."""
    out, moved = _steady_moves(counts, fn, times)
    if "direct" in counts:
        assert moved["direct"] == 1
    return out


def test_a_repeated_call_takes_its_ready_launch_and_gives_the_full_path_s_result(nvidia, monkeypatch):
    q, k, v = _qkv()
    call = lambda: aule.flash_attention(q, k, v, causal=True, backend="triton", return_lse=True)  # noqa: E731
    out, lse = _steady(nvidia, call)
    assert len(fastcall._ENTRIES) == 1
    _check(out, lse, q, k, v, causal=True)
    monkeypatch.setenv("AULE_TRITON_DIRECT", "0")  # the escape: the full path, Triton's own launch
    before = dict(nvidia)
    plain, plain_lse = call()
    assert nvidia["full"] == before["full"] + 1
    assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
    call()
    assert nvidia["full"] == before["full"] + 2
    if not GPU:
        assert nvidia["run"] == before["run"] + 2 and nvidia["direct"] == before["direct"], "no direct launch at 0"


def test_outputs_are_fresh_tensors_never_shared_between_calls(nvidia):
    q, k, v = _qkv(1)
    first = _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"))
    kept = first.clone()
    q2 = torch.randn_like(q)
    second = aule.flash_attention(q2, k, v, backend="triton")  # the same key: the ready launch
    assert second.data_ptr() != first.data_ptr() and second is not first
    assert torch.equal(first, kept), "a later call wrote into an earlier call's output"
    out, lse = aule.flash_attention(q2, k, v, backend="triton", return_lse=True)
    assert out.data_ptr() != second.data_ptr() and lse.data_ptr() != out.data_ptr()
    _check(second, None, q2, k, v, causal=True)


def _changes(q, k, v):
    """Calls that differ from ``aule.flash_attention(q, k, v, backend='triton')`` in one property
    the full path decides on, each with the reference's arguments (None: compare with the plain call's)."""
    data = torch.randn(q.numel() + 1, device=DEV)
    misaligned = data[1:].view(q.shape)
    misaligned.copy_(q)
    strided = torch.randn(q.shape[0], q.shape[2], q.shape[1], q.shape[3], device=DEV).transpose(1, 2)
    strided.copy_(q)
    half = [x.half() for x in (q, k, v)]
    return [
        ("shape", (q[:, :, :7], k, v), {}, {}),
        ("keys", (q, k[:, :, :9], v[:, :, :9]), {}, {}),
        ("stride", (strided, k, v), {}, {}),
        ("alignment", (misaligned, k, v), {}, {}),
        ("dtype", tuple(half), {}, {}),
        ("one object for k and v", (q, k, k), {}, {}),
        ("causal", (q, k, v), {"causal": False}, {"causal": False}),
        ("scale", (q, k, v), {"scale": 0.3}, {"scale": 0.3}),
        ("scale's type", (q, k, v), {"scale": 1}, {"scale": 1.0}),
        ("window", (q, k, v), {"window_size": 4}, {"window_size": 4}),
        ("window tuple", (q, k, v), {"window_size": (3, 2), "causal": False}, {"window_size": (3, 2), "causal": False}),
        ("softcap", (q, k, v), {"softcap": 2.0}, {"softcap": 2.0}),
        ("return_lse", (q, k, v), {"return_lse": True}, {}),
    ]


def test_every_change_of_what_the_full_path_decides_on_takes_it_and_is_right(nvidia):
    q, k, v = _qkv(2)
    _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"))
    for name, args, kw, ref_kw in _changes(q, k, v):
        before = nvidia["full"]
        res = aule.flash_attention(*args, backend="triton", **kw)
        assert nvidia["full"] == before + 1, f"{name}: a changed call must take the full path"
        out, lse = res if kw.get("return_lse") else (res, None)
        _check(out, lse, *args, **{"causal": True, **ref_kw})
        _steady(nvidia, lambda: aule.flash_attention(*args, backend="triton", **kw), times=2)  # its own entry
    # ...and the first call still has its own, right.
    out = _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"), times=1)
    _check(out, None, q, k, v, causal=True)


def test_settings_are_read_on_every_call(nvidia, monkeypatch):
    q, k, v = _qkv(3)
    call = lambda: aule.flash_attention(q, k, v, backend=None)  # noqa: E731
    monkeypatch.setenv("AULE_BACKEND", "triton")
    _steady(nvidia, call)
    for name, value in (("AULE_TRITON_CONFIG", "1"), ("AULE_TRITON_AUTOTUNE", " 0"), ("AULE_TRITON_TANH", "auto"),
                        ("AULE_TRITON_DIRECT", "1")):
        old = os.environ.get(name)
        monkeypatch.setenv(name, value)
        before = nvidia["full"]
        _check(call(), None, q, k, v, causal=True)
        assert nvidia["full"] == before + 1, name
        monkeypatch.delenv(name) if old is None else monkeypatch.setenv(name, old)
    monkeypatch.setenv("AULE_BACKEND", "numpy")  # another backend: no Triton launch at all
    before = dict(nvidia)
    _check(call(), None, q, k, v, causal=True)
    assert nvidia["full"] == before["full"] + 1 and nvidia.get("direct") == before.get("direct")
    monkeypatch.setenv("AULE_TRITON_CONFIG", "three")  # a malformed setting raises as it always did
    monkeypatch.setenv("AULE_BACKEND", "triton")
    with pytest.raises(ValueError, match="three"):
        call()
    monkeypatch.delenv("AULE_TRITON_CONFIG")
    monkeypatch.setenv("AULE_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        call()


def test_gradients_grad_mode_and_transforms_take_the_full_path(nvidia):
    q, k, v = _qkv(4)
    _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"))
    qg = q.clone().requires_grad_()
    with torch.no_grad():  # requires_grad under no_grad: nothing to record, the steady state serves it
        out = _steady(nvidia, lambda: aule.flash_attention(qg, k, v, backend="triton"), times=1)
    assert not out.requires_grad
    before = nvidia["full"]
    out = aule.flash_attention(qg, k, v, backend="triton")
    assert nvidia["full"] == before + 1 and out.requires_grad and out.grad_fn is not None
    with torch.inference_mode():
        _check(aule.flash_attention(q, k, v, backend="triton"), None, q, k, v, causal=True)
    if hasattr(torch, "func"):
        before = nvidia["full"]
        batched = torch.func.vmap(lambda x: aule.flash_attention(x[None], k, v, backend="triton")[0])(q)
        assert nvidia["full"] > before, "a functorch transform must take the full path"
        _check(batched, None, q, k, v, causal=True)


def test_bad_input_after_good_raises_what_it_raises_alone(nvidia):
    q, k, v = _qkv(5)
    bad = [((q, k[..., :16], v), {}), ((q, k, v), {"scale": True}), ((q, k, v), {"causal": 1}),
           ((q, k, v), {"window_size": (True, 0)}), ((q, k, v), {"return_lse": 1}), ((q, k, v), {"scale": -1.0}),
           ((q, k, v), {"window_size": [0, 0, 0]}), ((q, k.double(), v), {}), ((q[0], k, v), {}),
           ((q, k, v), {"backend": "no-such-backend"}), ((q, k, v), {"softcap": float("nan")})]

    def raised(args, kw):
        with pytest.raises((ValueError, TypeError)) as info:
            aule.flash_attention(*args, **{"backend": "triton", **kw})
        return type(info.value), str(info.value)

    alone = [raised(*b) for b in bad]
    for (args, kw), want in zip(bad, alone):  # each after its good twin (the same kinds of argument) is cached
        good = {"scale": 1.0, "causal": True, "window_size": (3, 0), "return_lse": True}
        twin = {n: good.get(n, x) for n, x in kw.items() if n in good}
        _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton", **twin), times=2)
        assert raised(args, kw) == want


def test_a_pending_device_error_is_raised_by_the_steady_state(nvidia, monkeypatch):
    q, k, v = _qkv(6)
    _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"))

    class Source:
        found = ["a table error some kernel found"]

        def poll(self, wait):
            found, self.found = self.found, []
            return found

    monkeypatch.setattr(device_errors, "_sources", [Source()])
    with pytest.raises(ValueError, match="a table error some kernel found"):
        aule.flash_attention(q, k, v, backend="triton")
    _check(aule.flash_attention(q, k, v, backend="triton"), None, q, k, v, causal=True)


def test_misaligned_fresh_outputs_take_the_full_path(nvidia, monkeypatch):
    q, k, v = _qkv(7)
    _steady(nvidia, lambda: aule.flash_attention(q, k, v, backend="triton"))
    real = torch.empty

    def misaligned(shape, **kw):
        n = int(np.prod(shape))
        return real(n + 1, **kw)[1:].view(shape)

    monkeypatch.setattr(torch, "empty", misaligned)
    before = dict(nvidia)
    out = aule.flash_attention(q, k, v, backend="triton")
    assert nvidia["full"] == before["full"] + 1 and out.data_ptr() % 16
    _check(out, None, q, k, v, causal=True)


def test_calls_that_do_more_than_one_plain_launch_leave_no_entry(nvidia, monkeypatch):
    q, k, v = _qkv(8)
    slopes = torch.rand(2, device=DEV)
    sinks = torch.rand(2, device=DEV)
    mask = torch.ones(1, 1, 1, 21, dtype=torch.bool, device=DEV)
    mask[..., :3] = False
    for kw in ({"alibi_slopes": slopes}, {"sinks": sinks}, {"attn_mask": mask}):
        for _ in range(3):
            aule.flash_attention(q, k, v, backend="triton", **kw)
    assert not fastcall._ENTRIES
    monkeypatch.setattr(api, "_compiling", lambda x: True)  # traced: the custom op, never the cache
    before = nvidia["full"]
    for _ in range(3):
        aule.flash_attention(q, k, v, backend="triton")
    assert nvidia["full"] == before and not fastcall._ENTRIES


def test_host_tensors_have_no_key():
    """CPU tensors (the interpreter, or the host backends) never take or make a ready launch."""
    q, k, v = (x.cpu() for x in _qkv(9))
    assert fastcall.key(q, k, v, True, None, -1, "triton", False, 0.0) is None


def test_the_cache_key_tells_apart_what_the_full_path_does(monkeypatch):
    """Properties no CPU machine can vary in a call (another device) still make other keys."""
    monkeypatch.setattr(fastcall, "_launch_device", lambda q: 0)
    q, k, v = _qkv(9)
    base = fastcall.key(q, k, v, True, None, -1, "triton", False, 0.0)
    assert base is not None and base == fastcall.key(q, k, v, True, None, -1, "triton", False, 0.0)
    meta = [x.to("meta") for x in (q, k, v)]
    assert fastcall.key(*meta, True, None, -1, "triton", False, 0.0) != base
    for other in ((q, k, v, 1, None, -1, "triton", False, 0.0), (q, k, v, True, None, -1, "triton", False, 0),
                  (q, k, v, True, None, -1, "triton", np.bool_(False), 0.0), (q, k, v, True, None, -1, None, False, 0.0)):
        assert fastcall.key(*other) != base
    listed = fastcall.key(q, k, v, True, None, [3, 0], "triton", False, 0.0)  # unhashable: never found
    assert fastcall.attend(listed, q, k, v) is None
    assert fastcall.key(np.zeros(1), k, v, True, None, -1, "triton", False, 0.0) is None
    assert fastcall.key(torch.nn.Parameter(q), k, v, True, None, -1, "triton", False, 0.0) is None


@pytest.mark.skipif(not GPU or ops.torch_gpu_flavour() != "cuda", reason="needs an NVIDIA GPU")
def test_the_steady_state_on_the_gpu_equals_the_full_path(monkeypatch):
    """On the GPU: calls of several shapes, dtypes and windows, each through the full path
    (AULE_TRITON_DIRECT=0) and then in the steady state, equal, and close to the reference."""
    g = torch.Generator(device="cuda").manual_seed(8)
    cases = [((1, 1, 1, 16, 16, 64), torch.bfloat16, True, -1), ((2, 8, 2, 100, 130, 64), torch.float16, False, -1),
             ((1, 4, 4, 33, 33, 128), torch.bfloat16, True, 7), ((1, 2, 1, 1, 300, 80), torch.float32, False, -1)]
    for (b, hq, hk, sq, sk, d), dtype, causal, window in cases:
        q, k, v = (torch.randn(s, generator=g, device="cuda").to(dtype)
                   for s in ((b, hq, sq, d), (b, hk, sk, d), (b, hk, sk, d)))
        kw = dict(causal=causal, window_size=window, return_lse=True, backend="triton")
        monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
        plain, plain_lse = aule.flash_attention(q, k, v, **kw)
        monkeypatch.delenv("AULE_TRITON_DIRECT")
        before = len(fastcall._ENTRIES)
        outs = [aule.flash_attention(q, k, v, **kw) for _ in range(4)]
        assert len(fastcall._ENTRIES) == before + 1, "the repeated call found no ready launch"
        for out, lse in outs:
            assert torch.equal(out, plain) and torch.equal(lse, plain_lse)
        assert len({o.data_ptr() for o, _ in outs}) == len(outs), "outputs must be fresh tensors"
        ref_out, ref_lse = attention_reference(*(x.double().cpu().numpy() for x in (q, k, v)),
                                                              causal=causal, window_size=window, return_lse=True)
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-4}[dtype]
        assert np.abs(outs[-1][0].double().cpu().numpy() - ref_out).max() < tol
        assert np.abs(outs[-1][1].double().cpu().numpy() - ref_lse).max() < tol


@pytest.mark.skipif(not GPU or ops.torch_gpu_flavour() != "cuda" or torch.cuda.device_count() < 2,
                    reason="needs two NVIDIA GPUs")
def test_another_device_takes_the_full_path(nvidia):
    """The same call on a second GPU (Triton's current device following it) is not the first
    GPU's ready launch: its own full path, then its own steady state, both right."""
    q0, k0, v0 = _qkv(10)
    _steady(nvidia, lambda: aule.flash_attention(q0, k0, v0, backend="triton"))
    with torch.cuda.device(1):
        q1, k1, v1 = (x.to("cuda:1") for x in (q0, k0, v0))
        before = nvidia["full"]
        out = aule.flash_attention(q1, k1, v1, backend="triton")
        assert nvidia["full"] == before + 1 and out.device == q1.device
        _check(out, None, q1, k1, v1, causal=True)
        out = _steady(nvidia, lambda: aule.flash_attention(q1, k1, v1, backend="triton"), times=2)
        assert out.device == q1.device
        _check(out, None, q1, k1, v1, causal=True)


def test_every_setting_that_routes_or_launches_a_triton_call_is_in_the_key():
    """A setting read on the way to a Triton launch but missing from the key would let a ready
    launch outlive a change of it: every AULE_TRITON_* (and the router's AULE_BACKEND) that the
    settings module reads, and every AULE_* name the Triton backend reads itself, is in it."""
    import re
    from pathlib import Path

    from aule import settings

    root = Path(settings.__file__).parent
    read = set(re.findall(r'getenv\("((?:AULE_TRITON|TRITON)_\w+|AULE_BACKEND)"\)', (root / "settings.py").read_text()))
    for path in (root / "backends" / "triton").glob("*.py"):
        read |= set(re.findall(r'["\'](AULE_\w+)["\']', path.read_text()))
    assert read and read <= set(settings.LAUNCH_VARS), sorted(read - set(settings.LAUNCH_VARS))

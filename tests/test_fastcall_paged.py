"""The steady state of repeated eager paged calls and KV writes (aule.fastcall for
``flash_attention_paged`` and ``copy_kv_to_paged``, issue 14): a call seen before is served by its
ready launches (the paged kernel, then the split-K merge when the context is split), with a fresh
output, fresh split-K scratch and a fresh error-flag row, and only when everything the full path
decides on is the same; new table contents on a hit are attended (the key holds no contents) and
poisoned ones raise as on the full path; every other change takes the full path.

On an NVIDIA GPU the tests run the real path. Without one the NVIDIA path is taken on CPU tensors
under Triton's interpreter (see tests/test_fastcall.py): the kernels are stand-ins whose "compiled
kernel" runs the real interpreted kernel, so every result is computed by aule's kernels and
checked against the float64 reference, and the steady state against the full path bit for bit."""
from __future__ import annotations

import weakref

import numpy as np
import pytest

from triton_setup import import_torch_and_triton

torch, GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule import api, backends, fastcall  # noqa: E402
from aule.backends.triton import flags, ops, paged as tp  # noqa: E402
from test_fastcall import _Kernel, _steady_moves as _steady  # noqa: E402
from test_paged import check, make_case, reference_paged  # noqa: E402

DEV = "cuda" if GPU else "cpu"
NVIDIA = GPU and ops.torch_gpu_flavour() == "cuda"
_KERNELS = ("_paged_attn_fwd", "_paged_attn_merge", "_copy_kv_to_paged")


@pytest.fixture
def nvidia(monkeypatch):
    """The NVIDIA launch path (real on an NVIDIA GPU, else on CPU tensors), with fresh caches;
    returns the count of full-path calls (``attend_paged`` and ``write_kv`` in aule.api, which
    canonicalize and routing precede) and, without a GPU, the kernels' launches through ``run`` and
    direct ones."""
    counts = {"full": 0}
    if GPU:
        if not NVIDIA:
            pytest.skip("ready launches are NVIDIA's (direct launches of compiled kernels)")
    else:
        counts.update(run=0, direct=0)
        monkeypatch.setattr(ops, "target_of", lambda t: "cuda")
        monkeypatch.setattr(ops, "_current_device", lambda: 0)
        for name in _KERNELS:
            monkeypatch.setattr(tp, name, _Kernel(getattr(tp, name), counts))
        monkeypatch.setattr(fastcall, "_launch_device", lambda q: 0)  # as for a CUDA tensor on NVIDIA
        monkeypatch.setitem(backends.get("triton").__dict__, "unavailable_reason", None)
    for name in ("_LAUNCHES", "_DIRECT"):
        monkeypatch.setattr(ops, name, {})
    monkeypatch.setattr(fastcall, "_ENTRIES", {})
    for name in ("AULE_TRITON_DIRECT", "AULE_BACKEND", "AULE_CHECK_SYNC"):
        monkeypatch.delenv(name, raising=False)
    for name in ("attend_paged", "write_kv"):
        real = getattr(api, name)

        def full(*a, real=real, **kw):
            counts["full"] += 1
            return real(*a, **kw)

        monkeypatch.setattr(api, name, full)
    yield counts
    aule.check_device_errors()  # each test consumes the errors it provokes


def _t(a):
    """A torch copy of ``a`` on the test's device (never sharing the case's NumPy memory)."""
    return torch.from_numpy(np.array(a)).to(DEV)


class Paged:
    """A paged case (shuffled blocks, NaN in every slot no sequence uses) as torch tensors, with
    the call and its float64 reference."""

    def __init__(self, seed=0, lens=(5, 40, 17), q_len=1, heads=(4, 2), head_dim=16, block_size=8,
                 dtype=np.float32):
        self.case = make_case(np.random.default_rng(seed), list(lens), *heads, head_dim, block_size, q_len, dtype=dtype)
        c = self.case
        self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens = (
            _t(a) for a in (c.q, c.k_cache, c.v_cache, c.block_tables, c.context_lens))
        self.qsl = None if c.query_start_loc is None else _t(c.query_start_loc)
        self.dtype = np.dtype(dtype).name

    def args(self):
        return self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens

    def __call__(self, **kw):
        if self.qsl is not None:
            kw.setdefault("query_start_loc", self.qsl)
        return aule.flash_attention_paged(*self.args(), backend="triton", **kw)

    def check(self, out, **kw):
        check(out.detach().cpu().double().numpy(), reference_paged(self.case, **kw), self.dtype)


def _full_path(fn, monkeypatch):
    """What ``fn`` returns through the full path, Triton's own launches (the escape)."""
    monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
    try:
        return fn()
    finally:
        monkeypatch.delenv("AULE_TRITON_DIRECT")


# The interpreter's configuration splits a context of more than 16 keys (up to 4 splits):
# max_context_len=16 keeps the longer contexts unsplit (it sizes the launch, nothing more).
SPLITS = {"split": {}, "unsplit": {"max_context_len": 16}, "split, bound given": {"max_context_len": 40}}


@pytest.mark.parametrize("sizing", list(SPLITS))
@pytest.mark.parametrize("layout", ["4-D", "4-D q_len 3", "packed", "packed, max_query_len"])
def test_repeated_calls_take_the_ready_launches_and_equal_the_full_path(nvidia, monkeypatch, layout, sizing):
    q_len = {"4-D": 1, "4-D q_len 3": 3}.get(layout, [1, 4, 2])
    p = Paged(1, q_len=q_len)
    kw = dict(SPLITS[sizing])
    if layout == "packed, max_query_len":
        kw["max_query_len"] = 4
    out, spent = _steady(nvidia, lambda: p(**kw))
    assert len(fastcall._ENTRIES) == 1
    if not GPU:
        split = "max_context_len" not in kw or kw["max_context_len"] > 16
        assert spent["direct"] == (2 if split else 1), "the paged kernel, then the merge when split"
    p.check(out)
    plain = _full_path(lambda: p(**kw), monkeypatch)
    assert torch.equal(out, plain), "the ready launch must give the full path's bits"
    assert out.shape == p.q.shape and out.dtype == p.q.dtype and out.is_contiguous()


def test_outputs_and_scratch_are_fresh_and_the_entry_holds_no_tensor_of_the_call(nvidia):
    p = Paged(2)
    first, _ = _steady(nvidia, p)
    kept = first.clone()
    p.q = torch.randn_like(p.q)
    p.case.q = p.q.cpu().numpy()
    second = p()
    assert second.data_ptr() != first.data_ptr() and torch.equal(first, kept), "a later call wrote an earlier output"
    p.check(second)
    q = p.q
    gone = weakref.ref(q)
    p.q = q = None
    assert gone() is None, "the ready launch keeps a tensor of the recorded call alive"


def test_new_table_contents_on_a_hit_are_attended(nvidia):
    """The key holds no table contents: a hit with other lengths and other blocks (the same
    shapes) reads them as the full path would."""
    p = Paged(3, lens=(5, 40, 17))
    _steady(nvidia, p)
    other = Paged(4, lens=(9, 12, 33))
    assert other.block_tables.shape == p.block_tables.shape and other.k_cache.shape == p.k_cache.shape
    for name in ("block_tables", "context_lens", "k_cache", "v_cache", "q"):
        getattr(p, name).copy_(getattr(other, name))  # the same tensors, new contents
    before = nvidia["full"]
    out = p()
    assert nvidia["full"] == before
    other.check(out)


def _changes(p: Paged):
    """Calls that differ from ``p()`` in one property the full path decides on: (name, args, kw)."""
    q, kc, vc, bt, cl = p.args()
    strided = torch.empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3], dtype=q.dtype, device=DEV).transpose(1, 2)
    strided.copy_(q)
    data = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEV)
    misaligned = data[1:].view(q.shape)
    misaligned.copy_(q)
    wide = torch.empty(bt.shape[0], bt.shape[1] * 2, dtype=bt.dtype, device=DEV)[:, ::2]
    wide.copy_(bt)
    return [
        ("q's strides", (strided, kc, vc, bt, cl), {}),
        ("q's alignment", (misaligned, kc, vc, bt, cl), {}),
        ("int64 tables", (q, kc, vc, bt.long(), cl.long()), {}),
        ("a strided table (copied by the launcher)", (q, kc, vc, wide, cl), {}),
        ("shape", (q[:2], kc, vc, bt[:2], cl[:2]), {}),
        ("scale", (q, kc, vc, bt, cl), {"scale": 0.3}),
        ("scale's type", (q, kc, vc, bt, cl), {"scale": 1}),
        ("window", (q, kc, vc, bt, cl), {"window_size": 7}),
        ("window tuple", (q, kc, vc, bt, cl), {"window_size": (7, 0)}),
        ("softcap", (q, kc, vc, bt, cl), {"softcap": 3.0}),
        ("max_context_len", (q, kc, vc, bt, cl), {"max_context_len": 16}),
    ]


def test_every_change_of_what_the_full_path_decides_on_takes_it_and_is_right(nvidia):
    p = Paged(5)
    _steady(nvidia, p)
    for name, args, kw in _changes(p):
        before = nvidia["full"]
        out = aule.flash_attention_paged(*args, backend="triton", **kw)
        assert nvidia["full"] == before + 1, f"{name}: a changed call must take the full path"
        case = p.case if args[0].shape == p.q.shape else _sliced(p.case, args[0].shape[0])
        ref = reference_paged(case, **{n: kw[n] for n in ("scale", "window_size") if n in kw},
                              **({"softcap": kw["softcap"]} if "softcap" in kw else {}))
        check(out.cpu().double().numpy(), ref, p.dtype)
        if name != "a strided table (copied by the launcher)":  # that one is never repeated as it is
            again, _ = _steady(nvidia, lambda: aule.flash_attention_paged(*args, backend="triton", **kw), times=2)
            assert torch.equal(again, out), name
    before = len(fastcall._ENTRIES)
    for _ in range(2):
        aule.flash_attention_paged(*_changes(p)[3][1], backend="triton")
    assert len(fastcall._ENTRIES) == before, "a call whose launcher copied a table must leave no entry"


def _misaligned(t):
    """``t``'s values in a tensor 4 bytes off 16-byte alignment."""
    out = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)[1:1 + t.numel()].view(t.shape)
    out.copy_(t)
    return out


def _sliced(case, batch):
    from types import SimpleNamespace

    return SimpleNamespace(q=case.q[:batch], ks=case.ks[:batch], vs=case.vs[:batch], query_start_loc=None)


def test_a_packed_call_and_its_changes(nvidia):
    p = Paged(6, q_len=[2, 1, 3])
    _steady(nvidia, p)
    qsl64 = p.qsl.long()
    for kw in ({"query_start_loc": qsl64}, {"max_query_len": 3}, {"max_query_len": 5}):
        before = nvidia["full"]
        out = p(**kw)
        assert nvidia["full"] == before + 1, kw
        p.check(out)
    before = nvidia["full"]
    p.check(p())
    assert nvidia["full"] == before, "the first call keeps its own entry"


def test_settings_and_the_backend_are_in_the_key(nvidia, monkeypatch):
    p = Paged(7)
    _steady(nvidia, p)
    for name, value in (("AULE_TRITON_DIRECT", "1"), ("AULE_CHECK_SYNC", "1"), ("AULE_BACKEND", "triton")):
        monkeypatch.setenv(name, value)
        before = nvidia["full"]
        p.check(p())
        assert nvidia["full"] == before + 1, name
        monkeypatch.delenv(name)
    monkeypatch.setenv("AULE_BACKEND", "numpy")
    before = dict(nvidia)
    out = aule.flash_attention_paged(*p.args())
    assert nvidia["full"] == before["full"] + 1 and nvidia.get("direct") == before.get("direct")
    p.check(out)
    monkeypatch.delenv("AULE_BACKEND")
    with pytest.raises(ValueError, match="no-such-backend"):
        aule.flash_attention_paged(*p.args(), backend="no-such-backend")


def test_alibi_and_sinks_stay_on_the_full_path(nvidia):
    p = Paged(8)
    slopes = torch.rand(4, device=DEV)
    sinks = torch.rand(4, device=DEV)
    for kw in ({"alibi_slopes": slopes}, {"sinks": sinks}):
        for _ in range(3):
            out = p(**kw)
        p.check(out, **{"alibi_slopes" if "alibi_slopes" in kw else "sinks": next(iter(kw.values())).cpu().numpy()})
    assert not fastcall._ENTRIES


def test_bad_input_after_good_raises_what_it_raises_alone(nvidia):
    p = Paged(9)
    q, kc, vc, bt, cl = p.args()
    bad = [((q[..., :8], kc, vc, bt, cl), {}), ((q, kc, vc, bt, cl), {"scale": True}),
           ((q, kc, vc, bt, cl), {"window_size": (True, 0)}), ((q, kc, vc, bt, cl), {"max_context_len": -1}),
           ((q, kc, vc, bt, cl), {"max_context_len": 1.5}), ((q, kc, vc, bt.float(), cl), {}),
           ((q.double(), kc, vc, bt, cl), {}), ((q, kc, vc, bt, cl), {"softcap": float("nan")}),
           ((q, kc, vc, bt, cl), {"max_query_len": 2})]

    def raised(args, kw):
        with pytest.raises((ValueError, TypeError)) as info:
            aule.flash_attention_paged(*args, backend="triton", **kw)
        return type(info.value), str(info.value)

    alone = [raised(*b) for b in bad]
    _steady(nvidia, p, times=2)
    _steady(nvidia, lambda: p(scale=1.0, window_size=(3, 0), max_context_len=16), times=2)
    for b, want in zip(bad, alone):
        assert raised(*b) == want


POISONS = {
    "block id past num_blocks": lambda bt, cl, nb: bt.__setitem__((1, 2), nb),
    "negative block id": lambda bt, cl, nb: bt.__setitem__((2, 0), -7),
    "length past capacity": lambda bt, cl, nb: cl.__setitem__(1, bt.shape[1] * 8 + 1),
}


@pytest.mark.parametrize("sizing", ["split", "unsplit"])
@pytest.mark.parametrize("what", list(POISONS))
def test_poisoned_tables_on_a_hit_raise_by_the_next_call(nvidia, what, sizing):
    p = Paged(10)
    kw = SPLITS[sizing]
    good = p.block_tables.clone(), p.context_lens.clone()
    _steady(nvidia, lambda: p(**kw))
    POISONS[what](p.block_tables, p.context_lens, p.k_cache.shape[0])
    before = nvidia["full"]
    p(**kw)  # a hit: the kernels find the bad entry, never follow it, and record it
    assert nvidia["full"] == before
    if GPU:
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"block_tables|context_lens"):
        p(**kw)
    p.block_tables.copy_(good[0])
    p.context_lens.copy_(good[1])
    p.check(p(**kw))
    _steady(nvidia, lambda: p(**kw), times=1)  # the entry survived the error


def test_poisoned_tables_on_a_hit_raise_at_once_with_check_sync(nvidia, monkeypatch):
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    p = Paged(11)
    _steady(nvidia, p)
    p.block_tables[0, 0] = -1
    before = nvidia["full"]
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = -1"):
        p()
    assert nvidia["full"] == before, "raised by the ready launch itself"
    p.block_tables[0, 0] = p.case.block_tables[0, 0]
    p.check(p())


def test_a_flag_row_per_hit_given_back(nvidia):
    """Each checked hit takes a row of its own and gives it back once its kernels are done."""
    p = Paged(12)
    _steady(nvidia, p)
    errors = flags.error_flags()
    aule.check_device_errors()
    free = sum(len(c.free) for c in errors._chunks)
    taken = []
    real = errors.acquire

    def spy(meta):
        flag = real(meta)
        taken.append(flag.row)
        return flag

    errors.acquire = spy
    try:
        for _ in range(3):
            p()
    finally:
        del errors.acquire
    assert len(taken) == 3
    aule.check_device_errors()
    assert sum(len(c.free) for c in errors._chunks) == free


def test_kv_writes_take_their_ready_launch(nvidia, monkeypatch):
    kc = torch.zeros(6, 4, 2, 16, device=DEV)
    vc = torch.zeros_like(kc)
    k = torch.randn(3, 2, 16, device=DEV)
    v = torch.randn(3, 2, 16, device=DEV)
    slots = torch.tensor([5, -1, 17], dtype=torch.int32, device=DEV)

    def write():
        aule.copy_kv_to_paged(k, v, kc, vc, slots, backend="triton")

    _steady(nvidia, write)
    assert len(fastcall._ENTRIES) == 1
    k.copy_(torch.randn_like(k))
    slots.copy_(torch.tensor([2, 9, -1], dtype=torch.int32))
    before = nvidia["full"]
    write()
    assert nvidia["full"] == before
    assert torch.equal(kc[0, 2], k[0]) and torch.equal(vc[2, 1], v[1]) and torch.equal(kc.view(-1, 2, 16)[9], k[1])
    slots[0] = 24  # past the cache: skipped, reported by the next call
    write()
    if GPU:
        torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 24"):
        write()
    slots[0] = 3
    # Into fresh caches of the same layout (the same key): the ready launch writes the full path's bits.
    caches = {}
    for direct in ("0", "1"):
        if direct == "0":
            monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
        else:
            monkeypatch.delenv("AULE_TRITON_DIRECT")  # as the entry was made
        kc, vc = torch.zeros_like(kc), torch.zeros_like(vc)
        before = nvidia["full"]
        write()
        assert nvidia["full"] == before + (direct == "0")
        caches[direct] = kc, vc
    assert all(torch.equal(a, b) for a, b in zip(*caches.values())) and caches["1"][0].abs().sum() > 0


def test_paged_keys_tell_apart_what_the_full_path_does(monkeypatch):
    """Properties no CPU machine can vary in a call still make other keys; host data has none."""
    monkeypatch.setattr(fastcall, "_launch_device", lambda q: 0)
    p = Paged(13)
    args = (*p.args(), None, -1, "triton", 0.0, None, None, None)
    base = fastcall.paged_key(*args)
    assert base is not None and base == fastcall.paged_key(*args)
    assert base != fastcall.key(*p.args()[:3], True, None, -1, "triton", False, 0.0)
    q, kc, vc, bt, cl = p.args()
    others = [(q, kc, kc, bt, cl), (q.to("meta"), kc, vc, bt, cl), (q, kc, vc, bt, _misaligned(cl))]
    for tensors in others:
        assert fastcall.paged_key(*tensors, *args[5:]) != base
    for i, value in ((5, 1.0), (6, (-1, 0)), (7, None), (8, 0), (9, 100), (9, np.int64(100)), (11, 1)):
        changed = list(args)
        changed[i] = value
        assert fastcall.paged_key(*changed) != base, (i, value)
    assert fastcall.paged_key(p.case.q, *args[1:]) is None  # a NumPy q
    assert fastcall.paged_key(q, kc, vc, p.case.block_tables, *args[4:]) is None  # a NumPy table
    monkeypatch.setattr(fastcall, "_launch_device", lambda q: None)
    assert fastcall.paged_key(*args) is None  # no ready launches where the data is


# ---------------------------------------------------------------------------------------------------
# on an NVIDIA GPU: the real path at serving sizes

needs_nvidia = pytest.mark.skipif(not NVIDIA, reason="needs an NVIDIA GPU (direct launches of compiled kernels)")


def _decode(batch, ctx, seed=0, heads=(32, 8), head_dim=128, block=16, dtype=torch.float16, packed=False):
    """A decode step of the issue's table on shuffled block tables: (args, kw, contiguous K, V)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hq, hk = heads
    per = ctx // block
    nb = batch * per
    kc = torch.randn(nb, block, hk, head_dim, generator=g, device="cuda").to(dtype)
    vc = torch.randn(nb, block, hk, head_dim, generator=g, device="cuda").to(dtype)
    bt = torch.randperm(nb, generator=g, device="cuda").to(torch.int32).view(batch, per)
    cl = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, 1, head_dim, generator=g, device="cuda").to(dtype)
    kw = {}
    if packed:
        q = q[:, :, 0].contiguous()
        kw = {"query_start_loc": torch.arange(batch + 1, dtype=torch.int32, device="cuda"), "max_query_len": 1}
    k = kc[bt.long()].reshape(batch, ctx, hk, head_dim).transpose(1, 2)
    v = vc[bt.long()].reshape(batch, ctx, hk, head_dim).transpose(1, 2)
    return (q, kc, vc, bt, cl), kw, k, v


@needs_nvidia
@pytest.mark.parametrize("batch,ctx,packed", [(8, 1024, False), (1, 4096, False), (8, 1024, True), (64, 256, False)])
def test_gpu_steady_state_equals_the_full_path_and_sdpa(monkeypatch, batch, ctx, packed):
    args, kw, k, v = _decode(batch, ctx, packed=packed)
    monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
    plain = aule.flash_attention_paged(*args, **kw)
    monkeypatch.delenv("AULE_TRITON_DIRECT")
    outs = [aule.flash_attention_paged(*args, **kw) for _ in range(4)]
    key = fastcall.paged_key(*args, None, -1, None, 0.0, None, kw.get("query_start_loc"), kw.get("max_query_len"))
    assert key in fastcall._ENTRIES, "the repeated call found no ready launch"
    for out in outs:
        assert torch.equal(out, plain)
    assert len({o.data_ptr() for o in outs}) == len(outs), "outputs must be fresh tensors"
    q4 = args[0] if not packed else args[0][:, :, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q4.float(), k.float(), v.float(), enable_gqa=True)
    got = outs[-1] if not packed else outs[-1][:, :, None]
    assert (got.float() - ref).abs().max().item() < 3e-3
    aule.check_device_errors()


@needs_nvidia
def test_gpu_hits_on_another_split_config_and_graph_capture_after_hits(monkeypatch):
    from aule.bench.timing import capture_graph

    for ctx, bound in ((2048, None), (2048, 64)):  # split, then a bound that keeps it one split
        args, _, _, _ = _decode(8, ctx, seed=1)
        kw = {} if bound is None else {"max_context_len": bound}
        for _ in range(3):
            out = aule.flash_attention_paged(*args, **kw)
        monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
        plain = aule.flash_attention_paged(*args, **kw)
        monkeypatch.delenv("AULE_TRITON_DIRECT")
        assert torch.equal(out, plain)
        holder = {}

        def step():
            holder["out"] = aule.flash_attention_paged(*args, **kw)

        graph, _ = capture_graph(step)
        q = args[0]
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        monkeypatch.setenv("AULE_TRITON_DIRECT", "0")
        want = aule.flash_attention_paged(*args, **kw)
        monkeypatch.delenv("AULE_TRITON_DIRECT")
        assert torch.equal(holder["out"], want), "the captured hit must replay with new contents"
    aule.check_device_errors()


@needs_nvidia
def test_gpu_poisoned_tables_on_a_hit(monkeypatch):
    args, _, _, _ = _decode(8, 1024, seed=2)
    for _ in range(3):
        aule.flash_attention_paged(*args)
    args[3][2, 5] = 10 ** 7
    aule.flash_attention_paged(*args)  # the hit: recorded on the device
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"block_tables\[2, 5\] = 10000000"):
        aule.flash_attention_paged(*args)
    args[3][2, 5] = 0
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    for _ in range(3):  # the new setting's own entry
        aule.flash_attention_paged(*args)
    args[3][2, 5] = -3
    with pytest.raises(ValueError, match=r"block_tables\[2, 5\] = -3"):
        aule.flash_attention_paged(*args)  # the hit raises at once
    monkeypatch.delenv("AULE_CHECK_SYNC")
    aule.check_device_errors()

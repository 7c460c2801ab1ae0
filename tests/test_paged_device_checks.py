"""Paged attention and KV writes on torch device tables: bounds checked by the Triton kernels
(error flags, no read-back), ``max_context_len``, and CUDA-graph capture.

On a CPU machine the kernels run under Triton's interpreter, where CPU tables take the device
path (``PagedCall.checks == "device"``) so that the kernels' own checks are what is tested; the
GPU-only tests (sync debug mode, CUDA graphs) skip there.
"""
from __future__ import annotations


import numpy as np
import pytest

from triton_setup import import_torch_and_triton, run_compile_check

torch, ON_GPU = import_torch_and_triton()

import aule  # noqa: E402
from aule.backends.triton import flags, paged as tp  # noqa: E402
from aule.bench.timing import capture_graph  # noqa: E402
from test_paged import check, make_case, reference_paged  # noqa: E402

DEV = "cuda" if ON_GPU else "cpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device (sync debug mode, CUDA graphs)")


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEV)


def _case(seed=0, lens=(5, 40, 17), q_len=1):
    return make_case(np.random.default_rng(seed), list(lens), 4, 2, 16, 8, q_len)


def _same_bits(a, b):
    """Bitwise equality, so the caches' NaN padding compares too."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def _finished():
    """Let the kernels already launched finish, as a later point of a serving loop would find them."""
    if ON_GPU:
        torch.cuda.synchronize()


@pytest.fixture(autouse=True)
def no_error_left_behind():
    """Each test consumes the errors it provokes: one left pending would fail the next test."""
    yield
    aule.check_device_errors()


def _poison(case, what):
    bt, cl = case.block_tables.copy(), case.context_lens.copy()
    if what == "block id past num_blocks":
        bt[1, 2] = case.k_cache.shape[0]
        return bt, cl, r"block_tables\[1, 2\] = %d is outside \[0, num_blocks=" % case.k_cache.shape[0]
    if what == "negative block id":
        bt[2, 0] = -7
        return bt, cl, r"block_tables\[2, 0\] = -7 is outside"
    if what == "negative length":
        cl[0] = -3
        return bt, cl, r"context_lens\[0\] = -3 is outside \[0, max_blocks \* block_size"
    if what == "length past capacity":
        cl[1] = bt.shape[1] * 8 + 1
        return bt, cl, r"context_lens\[1\] = %d is outside" % (bt.shape[1] * 8 + 1)
    if what == "int64 id that int32 would wrap":
        bt = bt.astype(np.int64)
        bt[0, 0] = 2 ** 32 + int(bt[0, 0])  # wrapped to int32 it would be a valid id
        return bt, cl, r"block_tables\[0, 0\] = %d is outside" % bt[0, 0]
    raise AssertionError(what)


POISONS = ["block id past num_blocks", "negative block id", "negative length", "length past capacity",
           "int64 id that int32 would wrap"]


@pytest.mark.parametrize("what", POISONS)
def test_poisoned_tables_raise_at_the_next_call(what):
    case = _case()
    bt, cl, words = _poison(case, what)
    q, kc, vc = _t(case.q), _t(case.k_cache), _t(case.v_cache)
    kc0, vc0 = kc.clone(), vc.clone()
    out = aule.flash_attention_paged(q, kc, vc, _t(bt), _t(cl), backend="triton")  # no read-back: no raise
    _finished()
    with pytest.raises(ValueError, match=words):
        aule.flash_attention_paged(q, kc, vc, _t(case.block_tables), _t(case.context_lens), backend="triton")
    assert _same_bits(kc, kc0) and _same_bits(vc, vc0)  # written nowhere
    # Sequences whose tables are sound are still right; the poisoned one is merely meaningless.
    bad = {int(np.flatnonzero(np.any(bt != case.block_tables, axis=1) | (cl != case.context_lens))[0])}
    good = [b for b in range(len(cl)) if b not in bad]
    ref = reference_paged(case)
    check(out[good].cpu().numpy(), ref[good], "float32")
    aule.check_device_errors()  # reported once, then forgotten


@pytest.mark.parametrize("what", ["block id past num_blocks", "length past capacity"])
def test_check_sync_raises_in_the_launching_call(what, monkeypatch):
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    case = _case(1)
    bt, cl, words = _poison(case, what)
    with pytest.raises(ValueError, match=words):
        aule.flash_attention_paged(_t(case.q), _t(case.k_cache), _t(case.v_cache), _t(bt), _t(cl), backend="triton")


def test_error_names_the_first_bad_entry_and_logs_no_second_raise():
    case = _case(2)
    bt = case.block_tables.copy()
    bt[0, 0] = 10 ** 5
    aule.flash_attention_paged(_t(case.q), _t(case.k_cache), _t(case.v_cache), _t(bt), _t(case.context_lens),
                               backend="triton")
    _finished()
    with pytest.raises(ValueError, match=r"block_tables\[0, 0\] = 100000"):
        aule.check_device_errors()
    aule.check_device_errors()


def test_slot_past_the_cache_is_skipped_and_raised():
    kc = torch.zeros(3, 4, 2, 16, device=DEV)
    vc = torch.zeros_like(kc)
    key = torch.randn(3, 2, 16, device=DEV)
    aule.copy_kv_to_paged(key, key + 1, kc, vc, torch.tensor([5, 12, 2 ** 40], device=DEV), backend="triton")
    _finished()
    # Tokens 1 and 2 are both bad and their programs race to record first: either may be named.
    words = (r"slot_mapping\[(1\] = 12|2\] = 1099511627776) is outside the cache's num_blocks \* block_size = 12")
    with pytest.raises(ValueError, match=words):
        aule.check_device_errors()
    assert torch.equal(kc[1, 1], key[0]) and torch.equal(vc[1, 1], key[0] + 1)
    assert int((kc.reshape(12, -1).abs().sum(1) > 0).sum()) == 1  # the two bad tokens wrote nothing


def test_check_sync_raises_for_slots_in_the_launching_call(monkeypatch):
    monkeypatch.setenv("AULE_CHECK_SYNC", "1")
    kc = torch.zeros(2, 4, 1, 16, device=DEV)
    with pytest.raises(ValueError, match=r"slot_mapping\[0\] = 8 is outside"):
        aule.copy_kv_to_paged(torch.ones(1, 1, 16, device=DEV), torch.ones(1, 1, 16, device=DEV), kc, kc.clone(),
                              torch.tensor([8], device=DEV, dtype=torch.int32), backend="triton")
    assert not kc.any()


def test_host_backend_checks_device_tables_itself():
    """The same tables routed to a backend without in-kernel checks are checked before it runs."""
    case = _case(3)
    bt, cl, _ = _poison(case, "negative block id")
    with pytest.raises(ValueError, match=r"block_tables\[2, 0\] = -7"):
        aule.flash_attention_paged(_t(case.q), _t(case.k_cache), _t(case.v_cache), _t(bt), _t(cl), backend="numpy")


def test_checking_kernels_compile_for_sm90():
    """What the interpreter runs here must also compile for the GPU, flag atomics included."""
    if ON_GPU:
        pytest.skip("on a GPU the other tests compile and run the kernels for real")
    run_compile_check("paged_compile_check.py", timeout=300)


# ---------------------------------------------------------------------------------------------------
# no host read on the device path


_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.cpu, torch.Tensor.__bool__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.__array__}


class NoReadBack(torch.overrides.TorchFunctionMode):
    """Fails on any call that reads tensor data to the host while it is active (kernel launches,
    which the interpreter runs on host copies, pause it: on a GPU they read nothing back)."""

    def __init__(self):
        super().__init__()
        self.paused = False
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.paused:
            to_host = func is torch.Tensor.to and any(
                str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values()) if isinstance(a, (str, torch.device)))
            if func in _READS or to_host:
                self.seen.append(getattr(func, "__name__", str(func)))
                raise AssertionError(f"host read-back on the device path: {func}")
        return func(*args, **kwargs)


@pytest.fixture
def no_read_back(monkeypatch):
    guard = NoReadBack()

    class Paused:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                guard.paused = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    guard.paused = False
            return launch

        def run(self, *args, **kwargs):  # the direct launches' first compile goes through JITFunction.run
            guard.paused = True
            try:
                return self.kernel.run(*args, **kwargs)
            finally:
                guard.paused = False

        def __getattr__(self, name):  # arg_names and the like, which the direct launches read
            return getattr(self.kernel, name)

    for name in ("_paged_attn_fwd", "_paged_attn_merge", "_copy_kv_to_paged"):
        monkeypatch.setattr(tp, name, Paused(getattr(tp, name)))
    return guard


def test_device_path_reads_nothing_back(no_read_back):
    case = _case(4, lens=(5, 200, 17))
    args = [_t(a) for a in (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)]
    slots = torch.tensor([3, -1], device=DEV)
    kc, vc = torch.zeros(2, 4, 2, 16, device=DEV), torch.zeros(2, 4, 2, 16, device=DEV)
    key = torch.ones(2, 2, 16, device=DEV)
    aule.flash_attention_paged(*args, backend="triton")  # warm: flags made, kernels compiled
    with no_read_back:
        out = aule.flash_attention_paged(*args, backend="triton", max_context_len=200)
        out2 = aule.flash_attention_paged(*args, backend="triton")
        aule.copy_kv_to_paged(key, key, kc, vc, slots, backend="triton")
    assert no_read_back.seen == []
    ref = reference_paged(case)
    check(out.cpu().numpy(), ref, "float32")
    check(out2.cpu().numpy(), ref, "float32")
    assert torch.equal(kc[0, 3], key[0])


def test_the_guard_catches_a_read_back(no_read_back):
    """The guard above is no formality: the host check, run on the same tables, trips it."""
    from aule.paged_call import check_tables

    case = _case(5)
    with no_read_back, pytest.raises(AssertionError, match="host read-back"):
        check_tables(_t(case.block_tables), _t(case.context_lens), case.k_cache.shape[0], 8)


def test_cache_path_pays_for_no_checks(monkeypatch):
    cache = aule.PagedKVCache(8, 4, 2, 16, "float32", backend="triton", device=DEV)
    a = cache.allocate()
    k = torch.randn(9, 2, 16, device=DEV)
    checked = []
    real = tp._ops.launch_direct

    def spy(name, fn, grid, args, meta, like):
        # Every paged launch passes here, a compiled kernel's repeat included (it never reaches fn).
        if "CHECK" in meta:  # the split-K merge checks nothing
            checked.append(meta["CHECK"])
        return real(name, fn, grid, args, meta, like)
    monkeypatch.setattr(tp._ops, "launch_direct", spy)

    def no_flag(*a, **kw):
        raise AssertionError("the cache's own tables took an error flag")
    monkeypatch.setattr(flags.ErrorFlags, "acquire", no_flag)
    cache.append(a, k, -k)
    q = torch.randn(1, 4, 1, 16, device=DEV)
    out = cache.attention(q, [a])
    assert checked == [False, False]
    gk, gv = cache.gather(a)
    check(out.cpu().numpy(), aule.reference.attention_reference(q.cpu().numpy(), gk[None], gv[None]), "float32")


# ---------------------------------------------------------------------------------------------------
# max_context_len


def test_max_context_len_sizes_the_launch_without_reading_lengths(monkeypatch):
    case = _case(6, lens=(5, 90, 17))
    seen = []
    real = tp.choose_config

    def spy(*args, **kwargs):
        seen.append(args[5])
        return real(*args, **kwargs)
    monkeypatch.setattr(tp, "choose_config", spy)
    args = [_t(a) for a in (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)]
    capacity = case.block_tables.shape[1] * 8
    ref = reference_paged(case)
    for given, sized in ((None, capacity), (90, 90), (10 ** 9, capacity), (16, 16)):
        out = aule.flash_attention_paged(*args, backend="triton", max_context_len=given)
        assert seen[-1] == sized
        # A hint below the longest context costs speed, never keys: the split covers the real length.
        check(out.cpu().numpy(), ref, "float32")


@pytest.mark.parametrize("bad", [-1, 2.5, True, "64"])
def test_bad_max_context_len(bad):
    case = _case(7)
    with pytest.raises(ValueError, match="max_context_len"):
        aule.flash_attention_paged(_t(case.q), _t(case.k_cache), _t(case.v_cache), _t(case.block_tables),
                                   _t(case.context_lens), max_context_len=bad)


# ---------------------------------------------------------------------------------------------------
# a launch inside a CUDA graph keeps its flag row; simulated on the CPU, real on a GPU


def test_captured_row_reports_each_replay(monkeypatch):
    """A captured launch's row is written by every replay and read through its chunk's dirty word;
    reported once per error, then cleared for the next replay. Simulated on the CPU: a 'capture'
    takes a captured row, and each later launch reuses it, as a replay of the graph would."""
    if ON_GPU:
        pytest.skip("simulates a capture on the CPU; test_graph_replay_reports_poisoned_tables is the real one")
    monkeypatch.setattr(flags.ErrorFlags, "_capturing", lambda self: True)
    real_acquire = flags.ErrorFlags.acquire
    captured = []

    def replayed(self, meta):
        if not captured:
            captured.append(real_acquire(self, meta))
        return captured[0]
    monkeypatch.setattr(flags.ErrorFlags, "acquire", replayed)
    kc = torch.zeros(2, 4, 1, 16)
    one = torch.ones(1, 1, 16)
    try:
        for bad in (9, 12):
            aule.copy_kv_to_paged(one, one, kc, kc.clone(), torch.tensor([bad]), backend="triton")
            with pytest.raises(ValueError, match=rf"slot_mapping\[0\] = {bad} is outside"):
                aule.check_device_errors()
            aule.check_device_errors()  # reported once
        aule.copy_kv_to_paged(one, one, kc, kc.clone(), torch.tensor([3]), backend="triton")
        aule.check_device_errors()  # a sound replay reports nothing
        assert captured[0].captured and torch.equal(kc[0, 3], one[0])
    finally:
        chunk, row = captured[0].chunk, captured[0].row  # forget the simulated graph
        del chunk.captured[row]
        chunk.free.append(row)


@needs_gpu
def test_sync_debug_mode_sees_no_synchronisation():
    case = _case(8, lens=(5, 2000, 17))
    args = [_t(a) for a in (case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens)]
    kc, vc = torch.zeros(4, 8, 2, 16, device=DEV), torch.zeros(4, 8, 2, 16, device=DEV)
    key = torch.ones(3, 2, 16, device=DEV)
    slots = torch.tensor([0, 9, -1], device=DEV)
    aule.flash_attention_paged(*args, backend="triton")
    aule.copy_kv_to_paged(key, key, kc, vc, slots, backend="triton")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):  # later calls poll the earlier launches' events
            out = aule.flash_attention_paged(*args)
            aule.copy_kv_to_paged(key, key, kc, vc, slots)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    check(out.cpu().numpy(), reference_paged(case), "float32")


def _graph_case(seed, lens, q_len, num_blocks):
    """A case whose cache has room to be refilled with other sequences of the same table width."""
    spare = num_blocks - sum(-(-n // 16) for n in lens)
    return make_case(np.random.default_rng(seed), lens, 8, 2, 64, 16, q_len, np.float16, spare_blocks=spare)


@needs_gpu
@pytest.mark.parametrize("q_len", [1, 3])
def test_graph_replay_with_new_tables_matches_reference(q_len):
    lens0, lens1 = [100, 3000, 17, 1], [2900, 5, 600, 1500]
    width = max(-(-n // 16) for n in lens0 + lens1) + 1
    num_blocks = 2 * sum(-(-n // 16) for n in lens0 + lens1)
    cases = [_graph_case(9, lens0, q_len, num_blocks), _graph_case(10, lens1, q_len, num_blocks)]
    pad = lambda t: np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=10 ** 6)  # noqa: E731
    static = {n: _t(getattr(cases[0], n)) for n in ("q", "k_cache", "v_cache", "context_lens")}
    static["block_tables"] = _t(pad(cases[0].block_tables))

    def call():
        return aule.flash_attention_paged(static["q"], static["k_cache"], static["v_cache"], static["block_tables"],
                                          static["context_lens"], max_context_len=width * 16)
    graph, out = capture_graph(call, warmups=2)
    for case in cases + cases[:1]:
        static["q"].copy_(_t(case.q))
        static["k_cache"].copy_(_t(case.k_cache))
        static["v_cache"].copy_(_t(case.v_cache))
        static["block_tables"].copy_(_t(pad(case.block_tables)))
        static["context_lens"].copy_(_t(case.context_lens))
        graph.replay()
        torch.cuda.synchronize()
        check(out.float().cpu().numpy(), reference_paged(case), "float16")
    aule.check_device_errors()


@needs_gpu
def test_graph_replay_of_kv_write():
    kc = torch.zeros(6, 16, 2, 64, device=DEV, dtype=torch.float16)
    vc = torch.zeros_like(kc)
    key = torch.zeros(4, 2, 64, device=DEV, dtype=torch.float16)
    val = torch.zeros_like(key)
    slots = torch.full((4,), -1, device=DEV, dtype=torch.int64)
    graph, _ = capture_graph(lambda: aule.copy_kv_to_paged(key, val, kc, vc, slots))
    rng = np.random.default_rng(11)
    expect_k, expect_v = torch.zeros_like(kc), torch.zeros_like(vc)
    for new_slots in ([0, 17, -1, 95], [5, 6, 40, -1]):
        key.copy_(torch.from_numpy(rng.standard_normal(key.shape)).to(key))
        val.copy_(torch.from_numpy(rng.standard_normal(val.shape)).to(val))
        slots.copy_(torch.tensor(new_slots))
        graph.replay()
        for t, s in enumerate(new_slots):
            if s >= 0:
                expect_k.view(-1, 2, 64)[s], expect_v.view(-1, 2, 64)[s] = key[t], val[t]
    torch.cuda.synchronize()
    assert torch.equal(kc, expect_k) and torch.equal(vc, expect_v)
    aule.check_device_errors()


@needs_gpu
def test_graph_replay_reports_poisoned_tables():
    case = _graph_case(12, [40, 70], 1, 16)
    static = {n: _t(getattr(case, n)) for n in ("q", "k_cache", "v_cache", "block_tables", "context_lens")}
    kc0 = static["k_cache"].clone()

    def call():
        return aule.flash_attention_paged(static["q"], static["k_cache"], static["v_cache"], static["block_tables"],
                                          static["context_lens"])
    graph, out = capture_graph(call)
    graph.replay()
    aule.check_device_errors()  # sound tables: nothing to report
    static["block_tables"][1, 1] = 10 ** 6
    graph.replay()
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = 1000000 is outside"):
        aule.check_device_errors()
    static["block_tables"].copy_(_t(case.block_tables))
    graph.replay()
    aule.check_device_errors()  # the row was cleared for the next replay
    static["context_lens"][0] = -1
    graph.replay()
    torch.cuda.synchronize()
    with pytest.raises(ValueError, match=r"context_lens\[0\] = -1"):
        aule.flash_attention_paged(static["q"], static["k_cache"], static["v_cache"], _t(case.block_tables),
                                   _t(case.context_lens))  # the next aule call, outside the graph
    assert _same_bits(static["k_cache"], kc0)
    static["context_lens"].copy_(_t(case.context_lens))
    graph.replay()
    torch.cuda.synchronize()
    check(out.float().cpu().numpy(), reference_paged(case), "float16")

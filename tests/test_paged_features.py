"""Softcap, ALiBi and sinks in paged attention, on every backend's paged kernels, against the float64
reference (issue 15 item 6).

Each case is tests/test_paged.py's: shuffled block ids, NaN in every slot no sequence uses and in
blocks wholly before a window. ALiBi's distance is each row's position in its sequence minus the
key's (``context_lens[b] - n_b + r - j``), which only a kernel that places packed rows and split
contexts right gets. NumPy runs everywhere, Vulkan on lavapipe (or any device), Triton under
``TRITON_INTERPRET=1`` at small shapes (on a GPU when there is one); ``test_cuda_*`` need CUDA.
"""
from __future__ import annotations

import numpy as np
import pytest

import aule
from aule import flash_attn as fa
from aule.reference import attention_reference

from test_paged import TOL, check, make_case, reference_paged

HQ, HK, D, BS = 4, 2, 16, 8
LENS = [1, 17, 40, 9]
LAYOUTS = {"decode": 1, "chunked": 5, "packed": [1, 0, 6, 3]}
BACKENDS = ["numpy", "vulkan", "triton"]


def _features(rng, which: str, batch: int = len(LENS)) -> dict:
    """Keyword features by name: softcap, alibi (per head), alibi_batch ([batch, heads_q]), sinks, all."""
    out = {}
    if which in ("softcap", "all"):
        out["softcap"] = 1.5  # below the scores' spread, so the cap changes the softmax
    if which in ("alibi", "all"):
        out["alibi_slopes"] = rng.uniform(0.05, 0.6, HQ).astype(np.float32)
    if which == "alibi_batch":
        out["alibi_slopes"] = rng.uniform(0.05, 0.6, (batch, HQ)).astype(np.float32)
    if which in ("sinks", "all"):
        out["sinks"] = rng.uniform(-1.0, 2.5, HQ).astype(np.float32)
    return out


def _round(case, dtype: str):
    """The case with q, the caches and the reference's K/V rounded to ``dtype`` (through torch for
    bfloat16), so the reference sees exactly the kernel's inputs."""
    if dtype == "float32":
        return case
    if dtype == "bfloat16":
        import torch

        rnd = (lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(torch.bfloat16).float().numpy())
    else:
        rnd = (lambda a: a.astype(dtype).astype(np.float32))
    for n in ("q", "k_cache", "v_cache"):
        setattr(case, n, rnd(getattr(case, n)))
    case.ks = [rnd(k) for k in case.ks]
    case.vs = [rnd(v) for v in case.vs]
    return case


# --- how each backend is called ---------------------------------------------------------------------

class Runner:
    """Runs a case's paged call on one backend, inputs in the test dtype, output as float32 NumPy."""

    def __init__(self, name, ctx=None, torch=None, device="cpu"):
        self.name, self.ctx, self.torch, self.device = name, ctx, torch, device

    def dtypes(self):
        return {"numpy": ("float32", "float16"), "vulkan": ("float32", "float16"),
                "triton": ("float32", "float16", "bfloat16")}[self.name]

    def __call__(self, case, dtype="float32", window=-1, **feats):
        qsl = case.query_start_loc
        if self.name == "triton":
            torch = self.torch
            dt = getattr(torch, dtype)

            def t(a, to=None):
                return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(self.device, to)

            feats = {k: (t(v) if isinstance(v, np.ndarray) else v) for k, v in feats.items()}
            out = aule.flash_attention_paged(t(case.q, dt), t(case.k_cache, dt), t(case.v_cache, dt),
                                             t(case.block_tables), t(case.context_lens), window_size=window,
                                             query_start_loc=t(qsl), backend="triton", **feats)
            assert out.dtype == dt and out.shape == case.q.shape
            return out.float().cpu().numpy()
        q = case.q.astype(dtype)
        if self.name == "vulkan":
            from aule.backends.vulkan import GpuTensor

            kc, vc = (GpuTensor.from_numpy(c.astype(dtype), dtype) for c in (case.k_cache, case.v_cache))
        else:
            kc, vc = case.k_cache.astype(dtype), case.v_cache.astype(dtype)
        out = aule.flash_attention_paged(q, kc, vc, case.block_tables, case.context_lens, window_size=window,
                                         query_start_loc=qsl, backend=self.name, **feats)
        assert isinstance(out, np.ndarray) and out.dtype == np.dtype(dtype) and out.shape == case.q.shape
        return out.astype(np.float32)

    def force_splits(self, monkeypatch, splits: int):
        """Make the backend split every context into ``splits`` parts (1: never split). NumPy has no split."""
        if self.name == "vulkan":
            from aule.backends.vulkan import plans

            monkeypatch.setattr(plans, "paged_splits", lambda call, bm, bn, info: splits)
        elif self.name == "triton":
            from aule.backends.triton import paged as tp

            real = tp.choose_config

            def config(*args, **kw):
                return real(*args, **kw)[:4] + (splits,) + real(*args, **kw)[5:]

            monkeypatch.setattr(tp, "choose_config", config)


@pytest.fixture(params=BACKENDS)
def run(request):
    if request.param == "numpy":
        yield Runner("numpy")
        return
    if request.param == "vulkan":
        from _vulkan_util import vulkan_context

        ctx = vulkan_context()
        ctx.take_validation_messages()
        yield Runner("vulkan", ctx=ctx)
        msgs = ctx.take_validation_messages()
        assert not msgs, "Vulkan validation messages:\n" + "\n".join(msgs)
        return
    from triton_setup import import_torch_and_triton

    torch, on_gpu = import_torch_and_triton()
    yield Runner("triton", torch=torch, device="cuda" if on_gpu else "cpu")


# --- the reference itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["softcap", "alibi", "alibi_batch", "sinks"])
def test_each_feature_changes_the_reference(which):
    """Every feature moves the reference well beyond the tolerances, so a kernel ignoring it fails."""
    rng = np.random.default_rng(1)
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS["packed"])
    case.q *= 3  # scores spread wider than the cap
    base = reference_paged(case)
    assert np.abs(reference_paged(case, **_features(rng, which)) - base).max() > 0.05


def test_alibi_distance_is_the_rows_position_in_its_sequence():
    """The reference's ALiBi on a packed call equals dense attention of each sequence alone, whose
    bottom-right rows sit at ``context_len - n + r``, with that sequence's slopes."""
    rng = np.random.default_rng(2)
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS["packed"])
    slopes = rng.uniform(0.1, 1.0, (len(LENS), HQ))
    got = reference_paged(case, alibi_slopes=slopes)
    lo = case.query_start_loc
    b = 2
    rows = case.q[lo[b]:lo[b + 1]].transpose(1, 0, 2)[None].astype(np.float64)
    n, ctx = rows.shape[2], LENS[b]
    qpos = ctx - n + np.arange(n)
    s = np.einsum("hqd,hkd->hqk", rows[0], np.repeat(case.ks[b], HQ // HK, 0).astype(np.float64)) / np.sqrt(D)
    s -= slopes[b][:, None, None] * np.abs(qpos[:, None] - np.arange(ctx)[None, :])
    s = np.where(np.arange(ctx)[None, None, :] <= qpos[None, :, None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("hqk,hkd->hqd", p / p.sum(-1, keepdims=True), np.repeat(case.vs[b], HQ // HK, 0))
    assert np.abs(got[lo[b]:lo[b + 1]] - want.transpose(1, 0, 2)).max() < 1e-12


# --- every backend against the reference --------------------------------------------------------------

@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("which", ["softcap", "alibi", "alibi_batch", "sinks", "all"])
def test_paged_features_match_reference(run, layout, which):
    rng = np.random.default_rng(len(layout) * 10 + len(which))
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS[layout])
    case.q *= 3
    feats = _features(rng, which)
    check(run(case, **feats), reference_paged(case, **feats), "float32")


@pytest.mark.parametrize("window,layout", [(8, "decode"), ((20, 0), "chunked"), (4, "packed")])
def test_paged_features_with_windows(run, window, layout):
    rng = np.random.default_rng(11)
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS[layout], window_size=window)
    feats = _features(rng, "all")
    check(run(case, window=window, **feats), reference_paged(case, window_size=window, **feats), "float32")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_paged_features_in_half_precision(run, dtype):
    if dtype not in run.dtypes():
        pytest.skip(f"{run.name} paged attention takes no {dtype}")
    rng = np.random.default_rng(12)
    case = _round(make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS["packed"]), dtype)
    feats = _features(rng, "all")
    check(run(case, dtype, **feats), reference_paged(case, **feats), dtype)


@pytest.mark.parametrize("heads", [(4, 4), (4, 1)])
def test_paged_features_with_every_grouping(run, heads):
    """MHA and a single KV head (the whole group stacked in one tile's rows, each with its own slope)."""
    rng = np.random.default_rng(13)
    hq, hk = heads
    case = make_case(rng, LENS, hq, hk, D, BS, 3)
    feats = _features(rng, "all")
    check(run(case, **feats), reference_paged(case, **feats), "float32")


@pytest.mark.parametrize("splits", [1, 2, 7])
@pytest.mark.parametrize("layout", ["decode", "packed"])
def test_paged_features_whatever_the_split(run, monkeypatch, splits, layout):
    """Sinks join once per row: in the unsplit finish, or in the merge (7 splits leave some empty),
    never once per split; softcap and ALiBi apply per score in every split."""
    if run.name == "numpy":
        pytest.skip("the NumPy backend does not split contexts")
    run.force_splits(monkeypatch, splits)
    rng = np.random.default_rng(14 + splits)
    case = make_case(rng, [1, 60, 33, 47], HQ, HK, D, BS, LAYOUTS[layout])
    feats = _features(rng, "all")
    check(run(case, **feats), reference_paged(case, **feats), "float32")


def test_split_count_is_really_forced(run, monkeypatch):
    """The split tests above mean what they say: the forced count reaches the launch."""
    if run.name == "numpy":
        pytest.skip("the NumPy backend does not split contexts")
    run.force_splits(monkeypatch, 5)
    case = make_case(np.random.default_rng(3), [60], HQ, HK, D, BS, 1)
    if run.name == "vulkan":
        from aule.backends.vulkan import GpuTensor, plans
        from aule.paged_call import canonicalize_paged

        kc = GpuTensor.from_numpy(case.k_cache, "float32")
        call = canonicalize_paged(case.q, kc, kc, case.block_tables, case.context_lens)
        assert plans.paged_plan(call, run.ctx.info).splits == 5
    else:
        from aule.backends.triton import paged as tp

        assert tp.choose_config(1, HK, 2, 1, D, 60, 0)[4] == 5


@pytest.mark.parametrize("splits", [1, 3])
def test_rows_that_see_no_key_are_zeros_with_sinks(run, monkeypatch, splits):
    """A 4-D q with more rows than its sequence has keys: the rows before the context see no key and
    are zeros, sinks or not (their LSE would be the sink; paged attention returns none), while the
    others take the sink into their denominators. A context of 0 keys is all such rows."""
    run.force_splits(monkeypatch, splits)
    rng = np.random.default_rng(15)
    case = make_case(rng, [0, 2, 30], HQ, HK, D, BS, 4)
    feats = _features(rng, "all", batch=3)
    out = run(case, **feats)
    want = reference_paged(case, **feats)
    check(out, want, "float32")
    assert (out[0] == 0).all() and (out[1][:, :2] == 0).all()
    assert np.abs(out[1][:, 2:]).min() > 0 and np.abs(out[2]).max() > 0.05


@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul")  # the interpreter: 0 * inf in padding rows
def test_softcap_bounds_an_infinite_score(run):
    """Softcap comes before the rules on non-finite scores: a key of +inf product is capped to
    +softcap, not a NaN row (masks.py's order, as the reference)."""
    rng = np.random.default_rng(16)
    case = make_case(rng, [9], HQ, HK, D, BS, 1)
    blk = case.block_tables[0, 0]
    case.k_cache[blk, 3, :, 0] = np.inf
    case.ks[0][:, 3, 0] = np.inf
    case.q[..., 0] = np.abs(case.q[..., 0]) + 0.5  # the product is +inf, never inf - inf
    feats = dict(softcap=2.0, sinks=rng.uniform(-1, 1, HQ).astype(np.float32))
    want = reference_paged(case, **feats)
    assert np.isfinite(want).all()
    check(run(case, **feats), want, "float32")


# --- the front ends ---------------------------------------------------------------------------------

def test_paged_kv_cache_attention_takes_the_features():
    rng = np.random.default_rng(17)
    cache = aule.PagedKVCache(num_blocks=8, block_size=4, heads_kv=HK, head_dim=D, dtype="float32", backend="numpy")
    seqs, ks, vs = [], [], []
    for n in (6, 11):
        s = cache.allocate()
        k, v = (rng.standard_normal((n, HK, D)).astype(np.float32) for _ in range(2))
        cache.append(s, k, v)
        seqs.append(s)
        ks.append(k.transpose(1, 0, 2))
        vs.append(v.transpose(1, 0, 2))
    q = rng.standard_normal((3, HQ, D)).astype(np.float32)
    feats = _features(rng, "all", batch=2)
    got = cache.attention(q, seqs, query_lens=[1, 2], **feats)
    want = aule.reference.paged_reference(q, ks, vs, np.array([0, 1, 3]), **feats)
    assert np.abs(got - want).max() < 2e-5


def _bshd(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("per_batch", [False, True])
def test_flash_attn_with_kvcache_softcap_and_alibi_over_a_paged_cache(per_batch):
    """flash-attn's interface over a paged cache passes softcap and alibi_slopes to paged attention;
    the same call over a contiguous cache (which loops over sequences) agrees, and both match the
    reference at each sequence's positions."""
    rng = np.random.default_rng(18)
    bs, lens, s_new = 4, np.array([6, 1, 9], np.int32), 2
    batch = len(lens)
    kc, vc = _bshd(rng, 12, bs, HK, D), _bshd(rng, 12, bs, HK, D)
    table = rng.permutation(12)[:batch * 4].reshape(batch, 4).astype(np.int32)
    k_new, v_new = _bshd(rng, batch, s_new, HK, D), _bshd(rng, batch, s_new, HK, D)
    q = 3 * _bshd(rng, batch, s_new, HQ, D)
    slopes = rng.uniform(0.1, 0.8, (batch, HQ) if per_batch else HQ).astype(np.float32)
    out = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=lens, block_table=table, causal=True,
                                     softcap=2.0, alibi_slopes=slopes)

    def seq(cache, b):
        return np.concatenate([cache[blk] for blk in table[b]])[:lens[b] + s_new]

    ks = [seq(kc, b).transpose(1, 0, 2) for b in range(batch)]
    vs = [seq(vc, b).transpose(1, 0, 2) for b in range(batch)]
    want = aule.reference.paged_reference(q.transpose(0, 2, 1, 3), ks, vs, softcap=2.0, alibi_slopes=slopes)
    assert out.shape == q.shape
    assert np.abs(out - want.transpose(0, 2, 1, 3)).max() < 2e-5
    assert np.abs(want - aule.reference.paged_reference(q.transpose(0, 2, 1, 3), ks, vs)).max() > 0.05
    width = max(lens) + s_new
    ck = np.stack([np.pad(seq(kc, b), ((0, width - lens[b] - s_new), (0, 0), (0, 0))) for b in range(batch)])
    cv = np.stack([np.pad(seq(vc, b), ((0, width - lens[b] - s_new), (0, 0), (0, 0))) for b in range(batch)])
    dense = fa.flash_attn_with_kvcache(q, ck, cv, cache_seqlens=lens + s_new, causal=True, softcap=2.0,
                                       alibi_slopes=slopes)
    assert np.abs(out - dense).max() < 2e-5


@pytest.mark.parametrize("bad,err,match", [
    (dict(softcap=-1.0), ValueError, "softcap must be finite"),
    (dict(softcap="2"), TypeError, "softcap must be a real number"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes must have shape \[heads_q\] = \[4\]"),
    (dict(alibi_slopes=np.ones((2, 4), np.float32)), ValueError, r"\[batch, heads_q\] = \[4, 4\]"),
    (dict(alibi_slopes=np.array([np.inf, 1, 1, 1], np.float32)), ValueError, "alibi_slopes must be finite"),
    (dict(alibi_slopes=[0.5] * 4), TypeError, "alibi_slopes must be a NumPy array"),
])
def test_bad_features_are_refused_by_name(bad, err, match):
    case = make_case(np.random.default_rng(0), LENS, HQ, HK, D, BS, 1)
    with pytest.raises(err, match=match):
        aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, **bad)


def test_every_paged_backend_declares_the_features():
    """No backend's paged kernels refuse softcap, ALiBi or sinks any more (auto routing keeps them)."""
    from aule import backends
    from aule.paged_call import canonicalize_paged

    rng = np.random.default_rng(19)
    case = make_case(rng, LENS, HQ, HK, D, BS, 1)
    call = canonicalize_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                              **_features(rng, "all"))
    assert call.features == frozenset({"softcap", "alibi", "sinks"})
    for name in ("numpy", "vulkan", "triton", "triton-amd"):
        assert backends.get(name).missing_features(call) is None, name


# --- CUDA only (skip without a GPU) -------------------------------------------------------------------

def _cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["decode", "packed"])
def test_cuda_paged_features_at_full_size(dtype, layout):
    """Real shapes on the GPU: head_dim 128, 8 query heads per KV head, contexts past a few thousand
    keys (split-K as the device chooses), every feature."""
    torch = _cuda()
    rng = np.random.default_rng(20)
    lens = [1, 700, 4097, 2500]
    q_len = 1 if layout == "decode" else [1, 300, 7, 0]
    case = _round(make_case(rng, lens, 32, 4, 128, 16, q_len), dtype)
    feats = _features(rng, "all", batch=len(lens))
    feats["alibi_slopes"] = rng.uniform(0.001, 0.05, (len(lens), 32)).astype(np.float32)
    feats["sinks"] = rng.uniform(-1, 2.5, 32).astype(np.float32)
    dt = getattr(torch, dtype)

    def t(a, to=None):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to("cuda", to)

    out = aule.flash_attention_paged(t(case.q, dt), t(case.k_cache, dt), t(case.v_cache, dt), t(case.block_tables),
                                     t(case.context_lens), query_start_loc=t(case.query_start_loc), backend="triton",
                                     softcap=feats["softcap"], alibi_slopes=t(feats["alibi_slopes"]),
                                     sinks=t(feats["sinks"]))
    check(out.float().cpu().numpy(), reference_paged(case, **feats), dtype)


def test_cuda_flash_attn_with_kvcache_paged_features():
    torch = _cuda()
    rng = np.random.default_rng(21)
    batch, bs, s_new, hq, hk, d = 3, 16, 1, 8, 2, 64
    lens = np.array([100, 1, 900], np.int32)
    nb = batch * 60 + 4
    kc = torch.randn(nb, bs, hk, d, device="cuda", dtype=torch.float16)
    vc = torch.randn(nb, bs, hk, d, device="cuda", dtype=torch.float16)
    table = torch.from_numpy(rng.permutation(nb)[:batch * 60].reshape(batch, 60).astype(np.int32)).cuda()
    q = torch.randn(batch, s_new, hq, d, device="cuda", dtype=torch.float16)
    k_new = torch.randn(batch, s_new, hk, d, device="cuda", dtype=torch.float16)
    v_new = torch.randn(batch, s_new, hk, d, device="cuda", dtype=torch.float16)
    slopes = torch.rand(hq, device="cuda") * 0.1
    out = fa.flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=torch.from_numpy(lens).cuda(),
                                     block_table=table, causal=True, softcap=5.0, alibi_slopes=slopes)
    tab = table.cpu().numpy()
    ks, vs = [], []
    for b in range(batch):
        n = int(lens[b]) + s_new
        ks.append(torch.cat([kc[i] for i in tab[b]])[:n].float().cpu().numpy().transpose(1, 0, 2))
        vs.append(torch.cat([vc[i] for i in tab[b]])[:n].float().cpu().numpy().transpose(1, 0, 2))
    want = aule.reference.paged_reference(q.float().cpu().numpy().transpose(0, 2, 1, 3), ks, vs, softcap=5.0,
                                          alibi_slopes=slopes.cpu().numpy())
    err = np.abs(out.float().cpu().numpy() - want.transpose(0, 2, 1, 3)).max()
    assert err < 10 * TOL["float16"], err


def test_reference_matches_dense_reference_for_one_sequence():
    """paged_reference of one full-length sequence is attention_reference with bottom-right causality."""
    rng = np.random.default_rng(22)
    case = make_case(rng, [13], HQ, HK, D, BS, 13)
    feats = _features(rng, "all", batch=1)
    want = attention_reference(case.q, case.ks[0][None], case.vs[0][None], causal=True, **feats)
    assert np.abs(reference_paged(case, **feats) - want).max() < 1e-12


# --- Triton: slopes and sinks left on the device ------------------------------------------------------

@pytest.fixture
def device_values(monkeypatch):
    """Triton, with CPU tensors sent down the device path too (under the interpreter; on a GPU
    they are CUDA tensors anyway): slopes and sinks unread by the host, checked by the kernel."""
    from triton_setup import import_torch_and_triton

    from aule import call as calls

    torch, on_gpu = import_torch_and_triton()
    monkeypatch.setattr(calls, "checks_on_device", lambda kind, device: kind == "torch")
    yield Runner("triton", torch=torch, device="cuda" if on_gpu else "cpu")
    aule.check_device_errors()


@pytest.mark.parametrize("which", ["alibi", "alibi_batch", "sinks", "all"])
@pytest.mark.parametrize("splits", [1, 3])
def test_device_slopes_and_sinks_match_reference(device_values, monkeypatch, which, splits):
    rng = np.random.default_rng(40 + len(which) + splits)
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS["packed"])
    feats = _features(rng, which)
    device_values.force_splits(monkeypatch, splits)
    check(device_values(case, **feats), reference_paged(case, **feats), "float32")


@pytest.mark.parametrize("what", ["NaN sink", "infinite sink", "NaN slope", "infinite slope"])
@pytest.mark.parametrize("sync", [False, True])
def test_bad_device_slopes_and_sinks_raise(device_values, monkeypatch, what, sync):
    """Not read by the host, a bad value is found by the kernel and raised by the next aule call
    (at once under AULE_CHECK_SYNC=1), in the host check's words."""
    rng = np.random.default_rng(7)
    case = make_case(rng, LENS, HQ, HK, D, BS, LAYOUTS["decode"])
    feats = {**_features(rng, "alibi_batch"), **_features(rng, "sinks")}
    bad = np.nan if what.startswith("NaN") else np.inf
    if "sink" in what:
        feats["sinks"][3] = bad
        words = r"sinks must be finite \(in float32\), got sinks\[3\]"
    else:
        feats["alibi_slopes"][2, 1] = bad
        words = r"alibi_slopes must be finite \(in float32\), got alibi_slopes\[2, 1\]"
    if sync:
        monkeypatch.setenv("AULE_CHECK_SYNC", "1")
        with pytest.raises(ValueError, match=words):
            device_values(case, **feats)
        return
    device_values(case, **feats)  # no read-back: nothing raised here
    with pytest.raises(ValueError, match=words):
        aule.check_device_errors()

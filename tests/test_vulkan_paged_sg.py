"""The subgroup path of Vulkan paged attention (glsl/paged.comp with AULE_PAGED_SG) against the
float64 reference, forced through AULE_VULKAN_PAGED on whatever Vulkan device exists (lavapipe at
subgroup 8, and 4 under LP_NATIVE_VECTOR_WIDTH=128 in CI), and its selection on recorded devices."""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

import aule
from aule.reference import paged_reference

from _vulkan_util import ctx, no_validation_messages  # noqa: F401  (fixtures: the context, a clean layer)
from test_paged import check, make_case, reference_paged
from test_vulkan import _recorded_device
from test_vulkan_paged_split import small_buffers  # noqa: F401  (fixture: cache pieces of a few blocks)


def _cast(case, dtype):
    """The case's q and caches in ``dtype``, its reference inputs rounded the same way."""
    if dtype != np.float32:
        for n in ("q", "k_cache", "v_cache"):
            setattr(case, n, getattr(case, n).astype(dtype))
        case.ks = [k.astype(dtype) for k in case.ks]
        case.vs = [v.astype(dtype) for v in case.vs]
    return case


def _gpu_caches(case, dtype):
    from aule.backends.vulkan import GpuTensor

    return tuple(GpuTensor.from_numpy(c.astype(dtype), dtype, paged=True) for c in (case.k_cache, case.v_cache))


def _plan(case, dtype=np.float32, **kw):
    from aule.backends.vulkan import plans, runtime
    from aule.paged_call import canonicalize_paged

    kc, vc = _gpu_caches(case, dtype)
    call = canonicalize_paged(case.q.astype(dtype), kc, vc, case.block_tables, case.context_lens, **kw)
    return plans.paged_plan(call, runtime.context().info, kc.split)


def _run(case, dtype=np.float32, **kw):
    kc, vc = _gpu_caches(case, dtype)
    out = aule.flash_attention_paged(case.q.astype(dtype), kc, vc, case.block_tables, case.context_lens,
                                     backend="vulkan", **kw)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == case.q.shape
    return out


@pytest.fixture
def subgroup(ctx, monkeypatch):
    """Force the subgroup path; ``subgroup(lanes, keys, invocations, splits)`` forces its sizes too."""
    from aule.backends.vulkan.shaders import SUBGROUP_SHUFFLE_OPS

    if ctx.info.subgroup_ops & SUBGROUP_SHUFFLE_OPS != SUBGROUP_SHUFFLE_OPS:
        pytest.skip(f"{ctx.info.name} has no subgroup shuffles")

    def force(lanes=0, keys=0, invocations=0, splits=0):
        monkeypatch.setenv("AULE_VULKAN_PAGED", f"subgroup,{lanes},{keys},{invocations},{splits}")

    force()
    return force


# (lens, heads, head_dim, block size, q_len): odd lengths, GQA 1/4/8, rows per KV head 1 to 8.
SHAPES = [([1, 15, 16, 17, 1000], (8, 2), 64, 16, 1), ([3, 97, 113], (8, 1), 80, 1, 1),
          ([1025, 40], (4, 4), 40, 128, 2), ([257, 6], (8, 2), 128, 16, 2), ([500], (32, 8), 128, 16, 1),
          ([77, 130], (6, 3), 256, 8, 1)]


@pytest.mark.parametrize("lens,heads,d,bs,q_len", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_subgroup_matches_reference(ctx, subgroup, lens, heads, d, bs, q_len, dtype):
    if dtype == np.float16 and not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage/arithmetic")
    rng = np.random.default_rng(d * 3 + bs + q_len)
    case = _cast(make_case(rng, lens, *heads, d, bs, q_len), dtype)
    plan = _plan(case, dtype)
    assert plan.kernel.kind == "subgroup" and plan.module.startswith("paged_sg")
    check(_run(case, dtype), reference_paged(case), np.dtype(dtype).name)


# Every size the path takes, odd ones included: lanes per key 1 to the subgroup (a lane owning
# several chunks, chunks past the row), 1 or 3 keys in flight, one subgroup or several, splits.
@pytest.mark.parametrize("lanes,keys,subgroups,splits", [(1, 1, 1, 1), (2, 3, 2, 3), (4, 1, 4, 7), (0, 3, 1, 2),
                                                         (-1, 2, 2, 5)])
def test_subgroup_sizes(ctx, subgroup, lanes, keys, subgroups, splits):
    sg = ctx.info.subgroup_size
    lanes = sg if lanes < 0 else min(lanes, sg)
    subgroup(lanes, keys, subgroups * sg, splits)
    rng = np.random.default_rng(lanes * 7 + keys)
    case = make_case(rng, [1, 33, 400], 8, 2, 80, 16, 1)
    plan = _plan(case)
    assert (plan.kernel.bn, plan.kernel.kt, plan.kernel.wg) == (lanes or plan.kernel.bn, keys, subgroups * sg)
    assert plan.splits == splits and (plan.merge is not None) == (splits > 1)
    check(_run(case), reference_paged(case), "float32")


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("window,q_len", [(8, 1), ((40, 0), 2), (1, 2), (100, 1)])
def test_subgroup_window(ctx, subgroup, window, q_len, splits):
    subgroup(splits=splits)
    rng = np.random.default_rng(q_len * 5 + splits)
    case = make_case(rng, [3, 16, 333], 8, 2, 64, 16, q_len, window_size=window)
    check(_run(case, window_size=window), reference_paged(case, window_size=window), "float32")


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("feature", ["softcap", "alibi", "alibi_batch", "sinks", "all"])
def test_subgroup_features(ctx, subgroup, feature, splits):
    subgroup(splits=splits)
    rng = np.random.default_rng(len(feature) + splits)
    hq, hk, lens = 8, 2, [1, 40, 301]
    case = make_case(rng, lens, hq, hk, 64, 16, 2, window_size=50)
    feats = {}
    if feature in ("softcap", "all"):
        feats["softcap"] = 1.5
    if feature in ("alibi", "all"):
        feats["alibi_slopes"] = (2.0 ** -np.arange(1, hq + 1)).astype(np.float32)
    if feature == "alibi_batch":
        feats["alibi_slopes"] = rng.uniform(0.01, 0.5, (len(lens), hq)).astype(np.float32)
    if feature in ("sinks", "all"):
        feats["sinks"] = rng.standard_normal(hq).astype(np.float32) * 2
    out = _run(case, window_size=50, **feats)
    check(out, reference_paged(case, window_size=50, **feats), "float32")


@pytest.mark.parametrize("splits", [1, 3])
def test_subgroup_packed_rows(ctx, subgroup, splits):
    """vLLM's packed layout: decode rows and two-row sequences (rows of up to 8 per KV head) in one call."""
    subgroup(splits=splits)
    rng = np.random.default_rng(11 + splits)
    case = make_case(rng, [5, 1, 90, 33], 8, 2, 32, 8, [2, 1, 1, 2])
    ref = paged_reference(case.q, case.ks, case.vs, case.query_start_loc)
    check(_run(case, query_start_loc=case.query_start_loc), ref, "float32")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_subgroup_over_cache_pieces(ctx, subgroup, small_buffers, dtype):  # noqa: F811
    """A cache split across buffers (AULE_SPLIT): each key's piece read under its own branch."""
    if dtype == np.float16 and not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage/arithmetic")
    subgroup(splits=3)
    rng = np.random.default_rng(3)
    case = _cast(make_case(rng, [1, 17, 40, 700], 8, 2, 64, 16, 1), dtype)
    small_buffers(case.k_cache.shape[0], case.k_cache[0].astype(dtype).nbytes, 5)
    assert _plan(case, dtype).module == "paged_split_sg" + ("_fp16" if dtype == np.float16 else "")
    check(_run(case, dtype), reference_paged(case), np.dtype(dtype).name)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_subgroup_follows_the_numeric_rule(ctx, subgroup, dtype):
    """NaN, +-inf and huge scores (and an fp16 cache's inf) give what NumPy gives (aule's numeric rule)."""
    if dtype == np.float16 and not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage/arithmetic")
    rng = np.random.default_rng(9)
    case = _cast(make_case(rng, [20, 50, 7], 4, 1, 16, 4, 1), dtype)
    case.q[0, 1, 0, 0] = np.nan      # one row's every score NaN
    case.q[1, 2, 0, :] = 6e4 if dtype == np.float16 else 1e30   # scores of +-inf
    case.q[2, 3, 0, :] = 30.0        # large finite scores
    if dtype == np.float16:
        blk = case.block_tables[2, 0]
        case.k_cache[blk, 3, 0, 0] = np.inf   # an inf key: +-inf or NaN scores
    want = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                      backend="numpy").astype(np.float32)
    for splits in (1, 4):
        subgroup(splits=splits)
        got = _run(case, dtype).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        ok = ~np.isnan(want)
        tol = 2e-3 if dtype == np.float16 else 1e-4
        np.testing.assert_allclose(got[ok], want[ok], rtol=tol, atol=tol)


def test_subgroup_longest_split_is_right_and_one_more_key_is_refused(ctx, subgroup, monkeypatch):
    """lavapipe ends every loop after 65535 passes: with the merge held to one split, the longest
    context is what one split's key loop may walk, and one key more is refused, not cut short."""
    from aule.backends.vulkan import plans
    from test_vulkan_limits import canonical_paged, paged_needle, run_paged

    if not ctx.info.loop_limit:
        pytest.skip(f"{ctx.info.name} has no loop limit")
    monkeypatch.setattr(plans, "MAX_SPLITS", 1)
    rng = np.random.default_rng(1)
    probe = canonical_paged(*paged_needle(rng, 1000)[:5])
    most = (ctx.info.loop_limit - plans.PAGED_LOOP_PASSES) * plans.paged_kernel(probe, ctx.info).keys_per_step
    q, kc, vc, tables, lens, ref = paged_needle(rng, most)
    call = canonical_paged(q, kc, vc, tables, lens)
    assert plans.paged_unfit(call, ctx.info) is None and plans.paged_plan(call, ctx.info).splits == 1
    out = run_paged(q, kc, vc, tables, lens)
    assert np.abs(out - ref).max() < 0.05, f"got {out.ravel()[:3]}, expected {ref.ravel()[:3]}: keys were lost"
    why = plans.paged_unfit(canonical_paged(*paged_needle(rng, most + 1)[:5]), ctx.info)
    assert why and f"{most + 1} keys" in why and str(ctx.info.loop_limit) in why


def test_forced_subgroup_path_that_cannot_run_says_why(ctx, subgroup):
    rng = np.random.default_rng(2)
    case = make_case(rng, [30], 8, 1, 64, 16, 2)   # 16 stacked rows per KV head
    with pytest.raises(aule.UnsupportedError, match="16 stacked rows per KV head exceed"):
        _run(case)


# --- selection on recorded devices -----------------------------------------------------------------

def _decode_call(b, ctx_len, hq=32, hk=8, d=128, q_len=1, dtype="float16"):
    return SimpleNamespace(batch=b, heads_kv=hk, group=hq // hk, q_len=q_len, head_dim=d, dtype=dtype,
                           max_context=ctx_len)


def test_h200_decode_takes_the_subgroup_path(monkeypatch):
    from aule.backends.vulkan import plans

    monkeypatch.delenv("AULE_VULKAN_PAGED", raising=False)
    h200 = _recorded_device("NVIDIA H200", "NVIDIA", shared=49152)
    k = plans.paged_kernel(_decode_call(8, 8192), h200)
    # 16-byte chunks: a 256-byte fp16 row is 16 chunks, two a lane over 8 lanes; 4 subgroups of 32.
    assert (k.kind, k.bm, k.bn, k.wg, k.kt, k.sg) == ("subgroup", 4, 8, 128, plans.PAGED_SG_KEYS, 32)
    splits = {(b, n): plans.paged_kernel_splits(_decode_call(b, n), k, h200)
              for b, n in ((8, 1024), (8, 8192), (8, 32768), (1, 32768), (64, 4096))}
    assert splits == {(8, 1024): 4, (8, 8192): 8, (8, 32768): 8, (1, 32768): 64, (64, 4096): 1}
    # fp32 rows of 512 bytes: 32 chunks over 16 lanes.
    assert plans.paged_kernel(_decode_call(8, 8192, dtype="float32"), h200).bn == 16


@pytest.mark.parametrize("change,kind", [
    (dict(q_len=3), "tiled"),                     # 12 stacked rows per KV head
    (dict(hq=64, hk=8), "subgroup"),             # GQA 8: 8 rows
    (dict(d=36), "tiled"),                       # a 72-byte fp16 row is not whole 16-byte chunks
    (dict(d=36, dtype="float32"), "subgroup"),   # 144 bytes: 9 chunks
])
def test_subgroup_path_only_where_it_fits(monkeypatch, change, kind):
    from aule.backends.vulkan import plans

    monkeypatch.delenv("AULE_VULKAN_PAGED", raising=False)
    h200 = _recorded_device("NVIDIA H200", "NVIDIA", shared=49152)
    assert plans.paged_kernel(_decode_call(8, 4096, **change), h200).kind == kind


def test_no_shuffles_or_a_cpu_driver_keeps_the_tiled_path(monkeypatch):
    from aule.backends.vulkan import plans

    monkeypatch.delenv("AULE_VULKAN_PAGED", raising=False)
    plain = dataclasses.replace(_recorded_device("Some GPU", "Intel"), subgroup_ops=0x1)
    assert plans.paged_kernel(_decode_call(8, 4096), plain).kind == "tiled"
    cpu = _recorded_device("llvmpipe (LLVM 15)", "Mesa", type_="cpu", shared=32768, subgroup=8, loop_limit=65535)
    assert plans.paged_kernel(_decode_call(8, 4096), cpu).kind == "tiled"
    monkeypatch.setenv("AULE_VULKAN_PAGED", "subgroup")
    k = plans.paged_kernel(_decode_call(8, 4096), cpu)
    assert (k.kind, k.bn, k.wg) == ("subgroup", 8, 32)
    with pytest.raises(aule.UnsupportedError, match="subgroup basic and shuffle"):
        plans.paged_kernel(_decode_call(8, 4096), plain)


def test_subgroup_combine_shrinks_to_fit_shared_memory(monkeypatch):
    from aule.backends.vulkan import plans

    monkeypatch.setenv("AULE_VULKAN_PAGED", "subgroup")
    small = _recorded_device("Small GPU", "ARM", shared=16384, subgroup=16)
    k = plans.paged_kernel(_decode_call(8, 4096, hq=64, hk=8, d=256), small)
    assert k.wg == 16 and plans.paged_sg_shared_bytes(k.bm, 256, k.wg // 16) <= 16384
    monkeypatch.setenv("AULE_VULKAN_PAGED", "subgroup,0,0,64")
    with pytest.raises(aule.UnsupportedError, match="shared memory"):
        plans.paged_kernel(_decode_call(8, 4096, hq=64, hk=8, d=256), small)


@pytest.mark.parametrize("raw,match", [("fast", "expected auto, tiled or subgroup"), ("subgroup,3", "power of two"),
                                       ("subgroup,1,2,3,4,5", "expected auto"), ("tiled,x", "expected auto"),
                                       ("subgroup,-1", "expected auto")])
def test_bad_paged_setting_names_the_variable(monkeypatch, raw, match):
    from aule import settings

    monkeypatch.setenv("AULE_VULKAN_PAGED", raw)
    with pytest.raises(ValueError, match=match) as err:
        settings.paged_choice()
    assert "AULE_VULKAN_PAGED" in str(err.value)


# --- on a GPU: the decode suite's shape (run on the H200) -------------------------------------------

def test_gpu_decode_shape_both_paths(ctx, monkeypatch):
    """fp16, 32/8 heads, head_dim 128, block 16, shuffled tables, a context split many ways: the
    automatic choice (the subgroup path where the GPU has shuffles) and the tiled path agree with
    the reference. Skipped on CPU drivers, where the same code runs at smaller shapes above."""
    from aule.backends.vulkan import plans

    if ctx.info.is_cpu:
        pytest.skip(f"{ctx.info.name} is a CPU driver: the GPU-sized decode case runs on GPUs only")
    if not ctx.info.fp16:
        pytest.skip(f"{ctx.info.name} has no float16 storage/arithmetic")
    rng = np.random.default_rng(14)
    case = _cast(make_case(rng, [8191, 4096, 1, 6000], 32, 8, 128, 16, 1), np.float16)
    ref = reference_paged(case)
    monkeypatch.delenv("AULE_VULKAN_PAGED", raising=False)
    plan = _plan(case, np.float16)
    assert plan.splits > 1
    if ctx.info.subgroup_ops & 0x11 == 0x11:
        assert plan.kernel.kind == "subgroup"
    check(_run(case, np.float16), ref, "float16")
    monkeypatch.setenv("AULE_VULKAN_PAGED", "tiled")
    check(_run(case, np.float16), ref, "float16")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_subgroup_shared_bytes_match_the_spirv(dtype):
    """plans.paged_sg_shared_bytes (what the plan fits to the device) is what the SPIR-V declares."""
    from aule.backends.vulkan import plans
    from test_portability import spirv

    module = "paged_sg_fp16" if dtype == "float16" else "paged_sg"
    for d, rows, sg, wg in ((128, 4, 32, 128), (40, 1, 8, 32), (256, 8, 4, 16), (80, 3, 64, 256)):
        k = plans.PagedKernel("subgroup", rows, 8, wg, 4, sg)
        declared = spirv(module).shared_bytes(((0, d),) + k.spec)
        assert plans.paged_sg_shared_bytes(rows, d, wg // sg) == sum(declared.values()), (d, rows, declared)

"""Lavapipe's loop limit: llvmpipe ends every loop of an invocation, silently, once all its loops
together have taken 65535 back-edges (DeviceInfo.loop_limit). The shaders unroll every loop but the
key loop and the kernel families in shaders.py count what is left; these tests show the count is
not too loose: a needle (the only key that matters) in the very last key position is found at the
longest seq_k the guard accepts, and one key more is refused with the reason.

Tile overrides (AULE_VULKAN_TILES) shrink the keys per step so the longest accepted sequence fits
lavapipe's 128 MiB storage-buffer range and runs in seconds. At head_dim 256 that range binds
before the loop limit for every variant but `baseline`, whose head_dim-256 pipeline takes lavapipe
about half a minute to compile; head_dim 256 is covered by the reproducers below.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

import aule
from aule.reference import attention_reference

from _vulkan_util import forced_variant
from _vulkan_util import ctx, no_validation_messages  # noqa: F401  (fixtures: the context, a clean layer)


@pytest.fixture(scope="module")
def limited(ctx):
    if not ctx.info.loop_limit:
        pytest.skip(f"{ctx.info.name} has no loop limit")
    return ctx


def needle(rng, n, d, dtype=np.float32, weight=30.0):
    """One query row over n keys whose last key has score ``weight`` (about) and value 100; every
    other score is about N(0, 1), so the answer is close to 100 and 0 when the last key is lost."""
    q = rng.standard_normal((1, 1, 1, d), dtype=np.float32)
    k = rng.standard_normal((1, 1, n, d), dtype=np.float32)
    v = rng.standard_normal((1, 1, n, d), dtype=np.float32)
    k[0, 0, -1] = q[0, 0, 0] * (weight * np.sqrt(d) / float(q[0, 0, 0] @ q[0, 0, 0]))
    v[0, 0, -1] = 100.0
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_needle_found(out, q, k, v):
    ref = attention_reference(q, k, v, causal=False)
    assert ref[0, 0, 0, 0] > 90, "the needle does not dominate the reference: a weak test"
    got = np.asarray(out, np.float64)
    assert np.abs(got - ref).max() < 0.05, f"got {got.ravel()[:4]}, expected {ref.ravel()[:4]}: keys were lost"


# (seq_k, head_dim, input dtype, GpuTensors, forced variant): each lost its last key before the
# loops inside the key loop were unrolled (the first is fast's d256 tile loads, 19 back-edges a tile).
REPRODUCERS = [
    (28000, 256, np.float32, False, None),
    (28000, 256, np.float32, False, "fast"),
    (28000, 256, np.float32, False, "fp16"),
    (100000, 64, np.float32, False, "fast"),
    (60000, 128, np.float16, True, None),
    (30000, 256, np.float16, False, None),
]


@pytest.mark.parametrize("n,d,dtype,gpu,variant", REPRODUCERS,
                         ids=lambda x: getattr(x, "__name__", str(x)))
def test_long_key_sequences_keep_their_last_key(limited, n, d, dtype, gpu, variant):
    q, k, v = needle(np.random.default_rng(n + d), n, d, dtype)
    args = tuple(aule.to_gpu(x) for x in (q, k, v)) if gpu else (q, k, v)
    if variant:
        with forced_variant(variant):
            out = aule.flash_attention(*args, causal=False, backend="vulkan")
    else:
        out = aule.flash_attention(*args, causal=False, backend="vulkan")
    assert_needle_found(out.numpy() if gpu else out, q, k, v)


# (variant, AULE_VULKAN_TILES or None): every variant lavapipe selects, at head_dim 64.
BOUNDARY = [("baseline", None), ("cpu", None), ("fast", "16,4,16,4"), ("fp16", "16,4,16,4"),
            ("fp16_io", "16,4,16,4")]


@pytest.mark.parametrize("variant,tiles", BOUNDARY)
def test_longest_accepted_sequence_is_right_and_one_more_is_refused(limited, variant, tiles, monkeypatch):
    from aule.backends.vulkan import VARIANTS

    d = 64
    if tiles:
        monkeypatch.setenv("AULE_VULKAN_TILES", tiles)
    v = VARIANTS[variant]
    tt = tuple(int(x) for x in tiles.split(",")) if tiles else None
    if v.unfit(d, limited.info, tiles=tt):
        pytest.skip(v.unfit(d, limited.info, tiles=tt))
    most = v.max_seq_k(d, limited.info, tt)
    assert v.unfit(d, limited.info, most, 1, tt) is None
    dtype = np.float16 if v.elem == "float16" else np.float32
    assert most * d * np.dtype(dtype).itemsize < limited.info.max_storage_buffer_range, \
        "the storage range, not the loop limit, would bind: pick smaller tiles"
    q, k, vv = needle(np.random.default_rng(most), most, d, dtype)
    with forced_variant(variant):
        out = aule.flash_attention(q, k, vv, causal=False, backend="vulkan")
    assert_needle_found(out, q, k, vv)
    del k, vv
    zeros = np.zeros((1, 1, most + 1, d), dtype)  # refused before any upload: no data is touched
    with forced_variant(variant), pytest.raises(aule.UnsupportedError) as err:
        aule.flash_attention(q, zeros, zeros, causal=False, backend="vulkan")
    msg = str(err.value)
    assert f"seq_k={most + 1}" in msg and str(limited.info.loop_limit) in msg and f"at most seq_k={most}" in msg


def test_auto_selection_moves_past_a_variant_the_loop_limit_refuses(limited):
    from aule.backends.vulkan import VARIANTS, select

    info = limited.info
    cpu_most = VARIANTS["cpu"].max_seq_k(64, info)
    assert select.host_variant("float32", 64, info, cpu_most, 1).name == "cpu"
    nxt = select.host_variant("float32", 64, info, cpu_most + 1, 1)
    assert nxt.name != "cpu" and nxt.unfit(64, info, cpu_most + 1, 1) is None


def test_loop_guard_follows_the_device_limit():
    """Recorded devices: no limit, no guard; a limit counts the key steps of each family."""
    from aule.backends.vulkan import VARIANTS
    from test_vulkan import _recorded_device

    gpu = _recorded_device(name="GPU", vendor="NVIDIA")
    small = _recorded_device(name="llvmpipe", vendor="Mesa", type_="cpu", shared=32768, subgroup=8,
                             loop_limit=1000)
    assert VARIANTS["fast"].unfit(64, gpu, 10 ** 9, 1) is None and VARIANTS["fast"].max_seq_k(64, gpu) is None
    # baseline walks one key per step: 999 steps and the pass that ends the loop
    assert VARIANTS["baseline"].max_seq_k(64, small) == 999
    assert "seq_k=1000" in VARIANTS["baseline"].unfit(64, small, 1000, 1)
    bn = VARIANTS["fast"].path.pick_tiles(64, small, None).bn
    assert VARIANTS["fast"].max_seq_k(64, small) == 999 * bn


# --- paged ------------------------------------------------------------------------------------------

def paged_needle(rng, n, d=8, bs=256):
    """One decode row over a context of n keys held in two reused blocks (block 0 repeated, then
    block 1 with the needle in the context's last slot): long contexts in a small cache."""
    q = np.ones((1, 1, 1, d), np.float32)
    kc = rng.standard_normal((2, bs, 1, d), dtype=np.float32)
    vc = rng.standard_normal((2, bs, 1, d), dtype=np.float32)
    nb = -(-n // bs)
    kc[1, (n - 1) % bs, 0] = 30.0 * np.sqrt(d) / d
    vc[1, (n - 1) % bs, 0] = 100.0
    tables = np.zeros((1, nb), np.int32)
    tables[0, -1] = 1
    ks = kc[tables[0], :, 0].reshape(nb * bs, d)[:n]
    vs = vc[tables[0], :, 0].reshape(nb * bs, d)[:n]
    ref = attention_reference(q, ks[None, None], vs[None, None], causal=True)
    return q, kc, vc, tables, np.array([n], np.int32), ref


def run_paged(q, kc, vc, tables, lens):
    from aule.backends.vulkan import GpuTensor

    return aule.flash_attention_paged(q, GpuTensor.from_numpy(kc), GpuTensor.from_numpy(vc), tables, lens)


def canonical_paged(q, kc, vc, tables, lens):
    from aule.backends.vulkan import GpuTensor
    from aule.paged_call import canonicalize_paged

    return canonicalize_paged(q, GpuTensor.from_numpy(kc), GpuTensor.from_numpy(vc), tables, lens)


def test_paged_context_longer_than_one_split_can_walk(limited, monkeypatch):
    """2,162,688 keys in one split lost the last key; the plan now splits the context further even
    where the device's target of workgroups in flight (here made 1) asks for one split."""
    from aule.backends.vulkan import plans

    monkeypatch.setattr(plans, "TARGET_GROUPS", {"gpu": 1, "cpu": 1})
    q, kc, vc, tables, lens, ref = paged_needle(np.random.default_rng(0), 2_162_688)
    assert ref[0, 0, 0, 0] > 90
    assert plans.paged_plan(canonical_paged(q, kc, vc, tables, lens), limited.info).splits == 2
    out = run_paged(q, kc, vc, tables, lens)
    assert np.abs(out - ref).max() < 0.05, f"got {out.ravel()[:3]}, expected {ref.ravel()[:3]}"


def test_paged_longest_accepted_split_is_right_and_one_more_key_is_refused(limited, monkeypatch):
    """With the merge held to one split, the longest context is what one split may walk."""
    from aule.backends.vulkan import plans

    monkeypatch.setattr(plans, "MAX_SPLITS", 1)
    bn = plans.paged_tiles(1, 8, limited.info, 4)[1]
    most = (limited.info.loop_limit - plans.PAGED_LOOP_PASSES) * bn
    rng = np.random.default_rng(1)
    q, kc, vc, tables, lens, ref = paged_needle(rng, most)
    call = canonical_paged(q, kc, vc, tables, lens)
    assert plans.paged_unfit(call, limited.info) is None and plans.paged_plan(call, limited.info).splits == 1
    out = run_paged(q, kc, vc, tables, lens)
    assert np.abs(out - ref).max() < 0.05, f"got {out.ravel()[:3]}, expected {ref.ravel()[:3]}"
    q, kc, vc, tables, lens, _ = paged_needle(rng, most + 1)
    why = plans.paged_unfit(canonical_paged(q, kc, vc, tables, lens), limited.info)
    assert why and f"{most + 1} keys" in why and str(limited.info.loop_limit) in why
    with pytest.raises(aule.UnsupportedError, match="silently ends every loop"):
        run_paged(q, kc, vc, tables, lens)


def test_paged_refuses_past_the_merge_and_splits_for_the_limit(limited):
    from aule.backends.vulkan import plans

    info = limited.info
    bs, d = 256, 8
    bn = plans.paged_tiles(1, d, info, 4)[1]
    most = plans.MAX_SPLITS * (info.loop_limit - plans.PAGED_LOOP_PASSES) * bn
    for n, ok in ((most, True), (most + 1, False)):
        tables = np.zeros((1, -(-n // bs)), np.int32)
        call = canonical_paged(np.ones((1, 1, 1, d), np.float32), np.zeros((1, bs, 1, d), np.float32),
                          np.zeros((1, bs, 1, d), np.float32), tables, np.array([n], np.int32))
        why = plans.paged_unfit(call, info)
        assert (why is None) == ok, why
    assert f"at most {most} keys" in why
    # Enough programs that the device's target wants one split: the limit still asks for two.
    call = SimpleNamespace(batch=64, heads_kv=8, group=1, q_len=1, max_context=(info.loop_limit - 2) * bn)
    assert plans.paged_splits(call, 4, bn, dataclasses.replace(info, loop_limit=None)) == 1
    assert plans.paged_splits(call, 4, bn, info) == 2

"""The matrix-core ceiling aule bench measures through Vulkan (glsl/coopmat_peak.comp): which
matrix shape it runs on recorded devices, and its refusal where the device has no cooperative
matrices (lavapipe: the shader itself runs only on the GPU machine's benchmark)."""
from __future__ import annotations

import pytest

import aule
from test_vulkan import ARC_SHAPES, NVIDIA_SHAPES, RDNA3_SHAPES, _recorded_device


@pytest.mark.parametrize("props", [
    dict(name="NVIDIA H200", vendor="NVIDIA", shared=49152, coopmat=NVIDIA_SHAPES),
    dict(name="AMD Radeon RX 7900 XTX (RADV NAVI31)", vendor="AMD", subgroup=64, coopmat=RDNA3_SHAPES),
    dict(name="Intel(R) Arc(tm) A770 Graphics (DG2)", vendor="Intel", subgroup=8, coopmat=ARC_SHAPES),
], ids=["h200", "rdna3", "arc"])
def test_peak_runs_the_shape_of_the_coopmat_variant(props, monkeypatch):
    from aule.backends.vulkan import VARIANTS, timed

    monkeypatch.delenv("AULE_VULKAN_TILES", raising=False)
    info = _recorded_device(**props)
    shape = timed.peak_shape(info)
    assert shape == VARIANTS["coopmat"].path.pick(128, info, None)[0]
    assert shape in info.coopmat_shapes
    assert timed.PEAK_SUBGROUPS * info.subgroup_size <= info.max_workgroup_size


@pytest.mark.parametrize("props, words", [
    (dict(name="Mesa lavapipe", vendor="Mesa", type_="cpu", subgroup=8), "VK_KHR_cooperative_matrix"),
    (dict(name="old card", vendor="NVIDIA", fp16=False, coopmat=NVIDIA_SHAPES), "shaderFloat16"),
])
def test_peak_is_refused_with_the_reason(props, words):
    from aule.backends.vulkan import timed

    with pytest.raises(aule.UnsupportedError, match=words):
        timed.peak_shape(_recorded_device(**props))


def test_the_module_is_in_the_table_and_built():
    from aule.backends.vulkan import shaders

    m = shaders.MODULES["coopmat_peak"]
    assert m.needs.coopmat and m.needs.fp16 and m.path is None  # not an attention variant
    assert "coopmat_peak" not in shaders.VARIANTS
    assert shaders.push_constant_size(shaders.spirv_code("coopmat_peak")) == shaders.PEAK_PUSH.itemsize == 16


def test_bench_records_why_the_ceiling_was_not_measured():
    """Here (lavapipe, or no Vulkan at all) the bench's measurement is skipped with a reason."""
    from aule.backends.vulkan import runtime
    from aule.bench import machine

    try:
        info = runtime.context().info
    except Exception as exc:
        info = None
        reason = str(exc)
    got = machine.vulkan_ceilings()
    if info is not None and info.coopmat_f16:
        pytest.skip(f"{info.name} has cooperative matrices: the GPU benchmark measures the peak")
    assert set(got) == {"skipped"}
    if info is not None:
        assert "VK_KHR_cooperative_matrix" in got["skipped"] and info.name in got["skipped"]
    else:
        assert reason.split(":")[0] in got["skipped"]

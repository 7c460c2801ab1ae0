"""The oracle itself, checked against torch's SDPA with an explicit boolean mask from aule.masks."""
import numpy as np
import pytest

from aule import masks
from aule.reference import attention_reference

from attn_util import random_qkv

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("shape", [(1, 4, 4, 97, 97, 40), (2, 8, 2, 113, 97, 64), (1, 8, 1, 1, 1025, 80),
                                   (1, 4, 4, 97, 113, 128), (1, 2, 1, 20, 33, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal,window", [(False, -1), (True, -1), (False, 7), (True, (10, 3)), (False, (4, 6))],
                         ids=str)
def test_reference_matches_torch_sdpa_with_bool_mask(shape, causal, window):
    b, hq, hk, sq, sk, d = shape
    q, k, v = random_qkv(np.random.default_rng(11), *shape, dtype=np.float64)
    left, right = masks.canonical_window(causal, window)
    vis = masks.mask(sq, sk, left, right)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    g = hq // hk
    expected = torch.nn.functional.scaled_dot_product_attention(
        tq, tk.repeat_interleave(g, 1), tv.repeat_interleave(g, 1), attn_mask=torch.from_numpy(vis)).numpy()
    got = attention_reference(q, k, v, causal=causal, window_size=window)
    seen = vis.any(axis=1)  # SDPA gives NaN for rows with no visible key; aule defines them as zeros
    assert np.abs(got[:, :, seen] - expected[:, :, seen]).max() < 1e-10
    assert (got[:, :, ~seen] == 0).all()


def test_reference_lse_is_natural_log_sum_exp():
    q, k, v = random_qkv(np.random.default_rng(3), 1, 2, 2, 5, 6, 8, dtype=np.float64)
    _, lse = attention_reference(q, k, v, causal=False, return_lse=True)
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(8)
    np.testing.assert_allclose(lse, np.log(np.exp(s).sum(-1)), rtol=1e-12)

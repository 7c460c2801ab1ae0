"""The NumPy backend against the float64 reference on odd shapes, every mask, GQA and dtype."""
import numpy as np
import pytest

from aule import flash_attention
from aule.backends.numpy import attention_numpy

from attn_util import assert_matches_reference, random_qkv

WINDOWS = [(False, -1), (True, -1), (True, 16), (False, 33), (False, (8, 5)), (True, (40, 7)), (False, (-1, 3))]
SHAPES = [  # batch, heads_q, heads_kv, seq_q, seq_k, head_dim
    (1, 1, 1, 1, 1, 64),
    (2, 4, 4, 97, 97, 40),
    (1, 8, 2, 113, 97, 80),   # seq_q > seq_k
    (1, 8, 1, 97, 113, 128),  # MQA, seq_q < seq_k
    (1, 4, 1, 1, 1025, 64),   # decode
    (1, 2, 2, 1025, 1025, 64),
    (1, 2, 1, 33, 257, 256),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal,window", WINDOWS, ids=str)
def test_numpy_matches_reference_fp32(shape, causal, window):
    rng = np.random.default_rng(hash((shape, causal, str(window))) & 0xFFFF)
    q, k, v = random_qkv(rng, *shape)
    out, lse = flash_attention(q, k, v, causal=causal, window_size=window, return_lse=True, backend="numpy")
    assert_matches_reference(out, lse, q, k, v, "float32", causal=causal, window_size=window)


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
@pytest.mark.parametrize("causal,window", [(True, -1), (False, (9, 4))], ids=str)
def test_numpy_other_dtypes(dtype, causal, window):
    q, k, v = random_qkv(np.random.default_rng(5), 1, 8, 2, 97, 113, 64, dtype)
    out, lse = flash_attention(q, k, v, causal=causal, window_size=window, return_lse=True, backend="numpy")
    assert out.dtype == dtype
    assert_matches_reference(out, lse, q, k, v, np.dtype(dtype).name, causal=causal, window_size=window)


def test_custom_scale():
    q, k, v = random_qkv(np.random.default_rng(6), 1, 4, 2, 50, 70, 32)
    out, lse = flash_attention(q, k, v, scale=0.37, return_lse=True, backend="numpy")
    assert_matches_reference(out, lse, q, k, v, "float32", scale=0.37)


@pytest.mark.parametrize("block_q,block_k", [(1, 1), (7, 5), (16, 1000)])
def test_tile_sizes_do_not_change_the_answer(block_q, block_k):
    q, k, v = random_qkv(np.random.default_rng(7), 1, 4, 2, 41, 37, 16)
    ref, _ = attention_numpy(q, k, v, 0.25, 9, 0, block_q=64, block_k=64)
    out, _ = attention_numpy(q, k, v, 0.25, 9, 0, block_q=block_q, block_k=block_k)
    assert np.abs(out - ref).max() < 1e-5


def test_hidden_tiles_are_skipped(monkeypatch):
    """A narrow window must touch only the key tiles near the diagonal, never the rest."""
    import aule.backends.numpy.dense as nb

    calls = []
    real = np.matmul

    def counting_matmul(a, b, *args, **kw):
        calls.append(b.shape)
        return real(a, b, *args, **kw)

    monkeypatch.setattr(nb.np, "matmul", counting_matmul)
    q, k, v = random_qkv(np.random.default_rng(8), 1, 1, 1, 1024, 1024, 16)
    attention_numpy(q, k, v, 0.25, 15, 0, block_q=64, block_k=64)
    # 16 query blocks x (at most 2 key tiles each) x 2 matmuls (QK^T and PV), not 16 x 16 x 2.
    assert len(calls) <= 16 * 2 * 2

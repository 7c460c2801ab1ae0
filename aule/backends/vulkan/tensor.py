"""GpuTensor: an array that lives in Vulkan device memory between calls."""
from __future__ import annotations

import numpy as np

from .runtime import Context, Lease, context

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class GpuTensor:
    """Data kept on the Vulkan device (a layer's K/V, a KV cache). Attention on GpuTensors
    returns a GpuTensor; :meth:`numpy` reads it back. Memory returns to the pool when the
    tensor is garbage collected (or at :meth:`free`)."""

    __slots__ = ("ctx", "lease", "shape", "dtype", "__weakref__")

    def __init__(self, ctx: Context, lease: Lease, shape: tuple, dtype):
        self.ctx, self.lease = ctx, lease
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)

    @classmethod
    def from_numpy(cls, array, dtype=None) -> "GpuTensor":
        """Copy a NumPy array (or anything ``np.asarray`` takes) to the device.
        float64 becomes float32; float16 stays float16."""
        a = np.asarray(array)
        if dtype is None:
            dtype = np.float16 if a.dtype == np.float16 else np.float32
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"GpuTensor dtype must be float32 or float16, got {dtype}")
        a = np.ascontiguousarray(a, dtype=dtype)
        ctx = context()
        return cls(ctx, ctx.upload(a), a.shape, dtype)

    @classmethod
    def empty(cls, shape, dtype=np.float32) -> "GpuTensor":
        dtype = np.dtype(dtype)
        ctx = context()
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return cls(ctx, ctx.pool.acquire(max(n, 4)), shape, dtype)

    @property
    def buffer(self):
        if self.lease is None:
            raise ValueError("this GpuTensor was freed")
        return self.lease.buffer

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def device(self) -> str:
        return "vulkan"

    def numpy(self) -> np.ndarray:
        out = np.empty(self.shape, dtype=self.dtype)
        return self.ctx.download(self.buffer, out)

    def free(self) -> None:
        """Give the memory back now instead of at garbage collection."""
        if self.lease is not None:
            self.lease.release()
            self.lease = None

    def __repr__(self) -> str:
        return f"GpuTensor(shape={self.shape}, dtype={self.dtype.name}, device={self.ctx.info.name!r})"


def to_gpu(array, dtype=None) -> GpuTensor:
    """Shorthand for :meth:`GpuTensor.from_numpy`."""
    return GpuTensor.from_numpy(array, dtype)

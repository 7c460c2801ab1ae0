"""GpuTensor: an array that lives in Vulkan device memory between calls."""
from __future__ import annotations

import numpy as np

from ...arrays import to_numpy
from ...call import is_torch_tensor
from .runtime import Context, Lease, context

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class GpuTensor:
    """Data kept on the Vulkan device (a layer's K/V, a KV cache). Attention on GpuTensors
    returns a GpuTensor; :meth:`numpy` reads it back. Memory returns to the pool when the
    tensor is garbage collected (or at :meth:`free`)."""

    __slots__ = ("ctx", "lease", "shape", "dtype", "__weakref__")

    def __init__(self, ctx: Context, lease: Lease, shape: tuple, dtype):
        self.ctx, self.lease = ctx, lease
        self.shape = tuple(map(int, shape))
        self.dtype = np.dtype(dtype)

    @classmethod
    def from_numpy(cls, array, dtype=None) -> "GpuTensor":
        """Copy a NumPy array, a torch tensor or anything ``np.asarray`` takes to the device.

        ``dtype`` (float32 or float16) defaults to float16 for float16 data and float32 for
        everything else: float64 is rounded to float32, and integers and bools are converted to
        float32 (exact up to 2**24 in magnitude; False/True become 0/1). Complex data is refused
        (``TypeError``: taking the real part is the caller's decision), as is anything not
        numeric. A finite value that the dtype cannot hold (beyond float16's 65504, say) is a
        ``ValueError`` rather than an inf; inf and NaN pass as they are."""
        a = to_numpy(array) if is_torch_tensor(array) else np.asarray(array)
        if a.dtype.kind == "c":
            raise TypeError(f"array must be real, got complex data ({a.dtype}): pass its .real or abs() "
                            "explicitly")
        if a.dtype.kind not in "biuf":
            raise TypeError(f"array must hold numbers (float, int or bool), got dtype {a.dtype}")
        if dtype is None:
            dtype = np.float16 if a.dtype == np.float16 else np.float32
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"GpuTensor dtype must be float32 or float16, got {dtype}")
        try:
            with np.errstate(over="raise"):
                a = np.ascontiguousarray(a, dtype=dtype)
        except FloatingPointError:
            raise ValueError(f"array holds {a.dtype} values outside {dtype}'s range (largest "
                             f"{np.finfo(dtype).max:g}); scale them or choose dtype=float32") from None
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

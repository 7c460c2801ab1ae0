"""GpuTensor: an array that lives in Vulkan device memory between calls."""
from __future__ import annotations

import numpy as np

from ...arrays import to_numpy
from ...call import is_torch_tensor
from .plans import CacheSplit, cache_split
from .runtime import Context, context
from .runtime.memory import await_host

_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))


class GpuTensor:
    """Data kept on the Vulkan device (a layer's K/V, a KV cache). Attention on GpuTensors
    returns a GpuTensor; :meth:`numpy` reads it back. Memory returns to the pool when the
    tensor is garbage collected (or at :meth:`free`).

    Attention on GpuTensors returns before the device has run it (``AULE_VULKAN_ASYNC=0``: after).
    The host waits only where it must: :meth:`numpy` waits for the call that writes the tensor,
    :meth:`write` (and :meth:`wait`) for every call in flight that reads or writes it (so such a
    call sees the old contents). Calls that use a result order themselves after the
    call that makes it on the device, with no wait, and memory freed while a call in flight uses
    it is reused or destroyed only once that call has ended. A device error of a call in flight
    (a lost device) is raised as :class:`aule.VulkanError` by the first of these that waits for it.

    A paged KV cache ``[num_blocks, block_size, heads_kv, head_dim]`` too large for one device
    buffer (maxMemoryAllocationSize, maxStorageBufferRange) is split along its blocks: ``leases``
    holds one buffer per piece of ``blocks_per_piece`` whole blocks (``plans.cache_split``), which
    only paged attention and KV writes read. Every other tensor, and a cache that fits, is one
    buffer (``blocks_per_piece`` None)."""

    __slots__ = ("ctx", "leases", "blocks_per_piece", "shape", "dtype", "__weakref__")

    def __init__(self, ctx: Context, lease, shape: tuple, dtype, blocks_per_piece: int | None = None):
        """``lease``: the tensor's one Lease, or the tuple of its pieces' leases with
        ``blocks_per_piece``."""
        self.ctx = ctx
        self.leases = tuple(lease) if isinstance(lease, (tuple, list)) else (lease,)
        self.shape = tuple(map(int, shape))
        self.dtype = np.dtype(dtype)
        if len(self.leases) > 1 and (blocks_per_piece is None or len(self.shape) != 4
                                     or -(-self.shape[0] // blocks_per_piece) != len(self.leases)):
            raise ValueError(f"a GpuTensor split into {len(self.leases)} pieces must be a 4-D cache whose "
                             f"num_blocks ({self.shape[0] if self.shape else None}) the pieces of "
                             f"blocks_per_piece={blocks_per_piece} blocks cover exactly")
        self.blocks_per_piece = blocks_per_piece if len(self.leases) > 1 else None

    @classmethod
    def wrap(cls, ctx: Context, lease, shape: tuple, dtype: np.dtype) -> "GpuTensor":
        """A tensor of one ``lease`` whose ``shape`` (a tuple of ints) and ``dtype`` (a NumPy dtype)
        the caller vouches for: a repeated call's outputs, made without the constructor's checks."""
        t = cls.__new__(cls)
        t.ctx, t.leases, t.shape, t.dtype, t.blocks_per_piece = ctx, (lease,), shape, dtype, None
        return t

    @classmethod
    def from_numpy(cls, array, dtype=None, *, paged: bool = False) -> "GpuTensor":
        """Copy a NumPy array, a torch tensor or anything ``np.asarray`` takes to the device.

        ``dtype`` (float32 or float16) defaults to float16 for float16 data and float32 for
        everything else: float64 is rounded to float32, and integers and bools are converted to
        float32 (exact up to 2**24 in magnitude; False/True become 0/1). Complex data is refused
        (``TypeError``: taking the real part is the caller's decision), as is anything not
        numeric. A finite value that the dtype cannot hold (beyond float16's 65504, say) is a
        ``ValueError`` rather than an inf; inf and NaN pass as they are.

        ``paged=True``: ``array`` is a paged KV cache ``[num_blocks, block_size, heads_kv,
        head_dim]``, split across device buffers where one cannot hold it (``UnsupportedError``
        when no split fits the device)."""
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
        if paged and a.ndim != 4:
            raise ValueError(f"paged=True takes a cache [num_blocks, block_size, heads_kv, head_dim], got shape "
                             f"{list(a.shape)}")
        try:
            with np.errstate(over="raise"):
                a = np.ascontiguousarray(a, dtype=dtype)
        except FloatingPointError:
            raise ValueError(f"array holds {a.dtype} values outside {dtype}'s range (largest "
                             f"{np.finfo(dtype).max:g}); scale them or choose dtype=float32") from None
        ctx = context()
        split = cache_split(a.shape, dtype.itemsize, ctx.info) if paged else None
        if split is None or split.pieces == 1:
            return cls(ctx, ctx.upload(a), a.shape, dtype)
        leases = []
        for i in range(split.pieces):
            first, end = split.blocks(i)
            leases.append(ctx.upload(a[first:end]))  # a slice of whole blocks: contiguous
        return cls(ctx, tuple(leases), a.shape, dtype, split.blocks_per_piece)

    @classmethod
    def zeros_cache(cls, shape, dtype) -> "GpuTensor":
        """A paged KV cache ``[num_blocks, block_size, heads_kv, head_dim]`` of zeros (pooled memory
        may hold another call's data), split where one buffer cannot hold it: each piece is filled
        from one host array of a piece's size, never one of the whole cache."""
        dtype = np.dtype(dtype)
        ctx = context()
        split = cache_split(shape, dtype.itemsize, ctx.info)
        if split.pieces == 1:
            return cls(ctx, ctx.upload(np.zeros(shape, dtype)), shape, dtype)
        zeros = np.zeros((split.blocks_per_piece,) + tuple(shape[1:]), dtype)
        leases = tuple(ctx.upload(zeros[:end - first]) for first, end in map(split.blocks, range(split.pieces)))
        return cls(ctx, leases, shape, dtype, split.blocks_per_piece)

    @classmethod
    def empty(cls, shape, dtype=np.float32) -> "GpuTensor":
        dtype = np.dtype(dtype)
        ctx = context()
        n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        return cls(ctx, ctx.pool.acquire(max(n, 4)), shape, dtype)

    @property
    def split(self) -> CacheSplit | None:
        """How a cache split across buffers lies in them, None for a tensor in one buffer."""
        if self.blocks_per_piece is None:
            return None
        n, bs, hk, d = self.shape
        return CacheSplit(n, self.blocks_per_piece, bs * hk * d * self.dtype.itemsize)

    @property
    def lease(self):
        """The one lease of an unsplit tensor (None once freed)."""
        if len(self.leases) > 1:
            raise ValueError(self._split_message())
        return self.leases[0] if self.leases else None

    @property
    def buffer(self):
        if not self.leases:
            raise ValueError("this GpuTensor was freed")
        if len(self.leases) > 1:
            raise ValueError(self._split_message())
        return self.leases[0].buffer

    @property
    def buffers(self) -> tuple:
        """The device buffer of each piece (one for an unsplit tensor)."""
        if not self.leases:
            raise ValueError("this GpuTensor was freed")
        return tuple(lease.buffer for lease in self.leases)

    def _split_message(self) -> str:
        return (f"this GpuTensor {list(self.shape)} is a paged KV cache split across {len(self.leases)} device "
                f"buffers of {self.blocks_per_piece} blocks each (one buffer cannot hold it on {self.ctx.info.name}); "
                "only paged attention (flash_attention_paged) and KV writes (copy_kv_to_paged) read split caches")

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
        if len(self.leases) == 1:
            return self.ctx.download(self.buffer, out)
        split = self.split
        for i, buf in enumerate(self.buffers):
            first, end = split.blocks(i)
            self.ctx.download(buf, out[first:end])  # whole blocks: a contiguous slice of out
        return out

    def write(self, array) -> None:
        """Overwrite this tensor with ``array`` (its shape; converted to its dtype), from the host.
        Waits for every call in flight that reads or writes the tensor: those calls see the old
        contents, later calls the new."""
        a = to_numpy(array) if is_torch_tensor(array) else np.asarray(array)
        if tuple(a.shape) != self.shape:
            raise ValueError(f"array must have this GpuTensor's shape {list(self.shape)}, got {list(a.shape)}")
        if a.dtype.kind not in "biuf":
            raise TypeError(f"array must hold real numbers (float, int or bool), got dtype {a.dtype}")
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if len(self.leases) == 1:
            self.ctx.upload(a, self.lease)
            return
        split = self.split
        for i, lease in enumerate(self.leases):
            first, end = split.blocks(i)
            self.ctx.upload(a[first:end], lease)

    def wait(self) -> "GpuTensor":
        """Return once no call in flight reads or writes this tensor (its contents are final; the
        device error of a call waited for is raised here)."""
        for buf in self.buffers:
            await_host(buf)
        return self

    def free(self) -> None:
        """Give the memory back now instead of at garbage collection."""
        for lease in self.leases:
            lease.release()
        self.leases = ()

    def __repr__(self) -> str:
        pieces = f", pieces={len(self.leases)}" if len(self.leases) > 1 else ""
        return f"GpuTensor(shape={self.shape}, dtype={self.dtype.name}{pieces}, device={self.ctx.info.name!r})"


def to_gpu(array, dtype=None, *, paged: bool = False) -> GpuTensor:
    """Shorthand for :meth:`GpuTensor.from_numpy` (``paged=True``: a KV cache, split where one
    buffer cannot hold it)."""
    return GpuTensor.from_numpy(array, dtype, paged=paged)

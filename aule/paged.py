"""Paged attention over vLLM's block-table KV cache: validation, routing, writes, and the cache manager.

Layout (vLLM's): ``k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]``,
``block_tables [batch, max_blocks]`` (integer block ids), ``context_lens [batch]`` (tokens of each
sequence, the new ones included), ``q [batch, heads_q, q_len, head_dim]``.

Meaning: the ``q_len`` query rows of sequence ``b`` are its LAST ``q_len`` positions, so row ``i``
sits at key position ``context_lens[b] - q_len + i`` and is causal with respect to the others
(decode when ``q_len == 1``; chunked prefill and speculative verification otherwise). Windows
follow :mod:`aule.masks` with ``seq_q = q_len`` and ``seq_k = context_lens[b]``. Key ``j`` of
sequence ``b`` lives in block ``block_tables[b, j // block_size]`` at row ``j % block_size``.

Every integer a kernel would use as an address (block ids, lengths, slots) is checked here before
any kernel runs, so a bad table raises ``ValueError`` instead of reading out of bounds (tables a
:class:`PagedKVCache` builds from its own bookkeeping are valid by construction and not re-read).
"""
from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import backends, masks
from .api import _AUTO_ORDER, _forced_backend, _place
from .call import array_kind, check_float_dtypes, check_scale, device_of, dtype_name, is_torch_tensor, shape_tuple
from .errors import AuleError, UnsupportedError

log = logging.getLogger("aule")

# Paged backends live in their own modules (the dense ones do not know the block-table layout).
_PAGED_MODULES = {
    "triton": ("aule.backends.triton.paged", "TritonPagedBackend"),
    "triton-amd": ("aule.backends.triton.paged", "TritonAMDPagedBackend"),
    "vulkan": ("aule.backends.vulkan.paged", "VulkanPagedBackend"),
    "numpy": ("aule.backends.numpy_paged", "NumpyPagedBackend"),
}
_instances: dict = {}


class CacheFullError(AuleError, MemoryError):
    """The paged cache has too few free blocks for a request; the cache is left unchanged."""


def get_paged_backend(name: str):
    """The paged backend registered under ``name`` (``cpu`` is ``numpy``), imported on first use."""
    return backends.load(name, _PAGED_MODULES, _instances)


# ---------------------------------------------------------------------------------------------------
# validation


@dataclass
class PagedCall:
    """A validated paged-attention call. Backends read it and never re-validate user input."""

    q: Any
    k_cache: Any
    v_cache: Any
    block_tables: Any
    context_lens: Any
    kind: str  # family of the caches ('numpy', 'torch' or 'gpu'): routing follows the cache
    q_kind: str  # family of q, which the output mirrors
    device: str
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    q_len: int
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int
    scale: float
    left: int
    right: int
    max_context: int  # longest context in the batch, read during validation

    @property
    def group(self) -> int:
        return self.heads_q // self.heads_kv

    def describe(self) -> str:
        return (f"paged q[{self.batch},{self.heads_q},{self.q_len},{self.head_dim}] "
                f"cache[{self.num_blocks},{self.block_size},{self.heads_kv},{self.head_dim}] "
                f"{self.dtype} on {self.device} window=({self.left},{self.right}) "
                f"max_context={self.max_context}")


def _int_array(x, name: str, ndim: int):
    """Check an integer table (NumPy array or torch tensor) of ``ndim`` dimensions."""
    if isinstance(x, (list, tuple)):
        x = np.asarray(x, dtype=np.int32)
    kind = array_kind(x, name)
    if kind == "gpu":
        raise TypeError(f"{name} must be a NumPy array or torch tensor of integers, not a GpuTensor")
    dt = dtype_name(x)
    if dt not in ("int32", "int64", "int16", "uint8", "int8", "uint16", "uint32"):
        raise TypeError(f"{name} must hold integers (int32 preferred), got dtype {dt}")
    if len(x.shape) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {shape_tuple(x)}")
    return x


def check_tables(block_tables, context_lens, num_blocks: int, block_size: int) -> int:
    """Bounds-check the tables a kernel would follow; returns the longest context.

    ``context_lens[b]`` must lie in ``[0, max_blocks * block_size]``; the first
    ``ceil(context_lens[b] / block_size)`` entries of row ``b`` of ``block_tables`` must be block
    ids in ``[0, num_blocks)``. Entries past a sequence's last block are padding and never read.
    One host synchronisation for device tensors.
    """
    batch, max_blocks = shape_tuple(block_tables)
    if batch == 0:
        return 0
    if is_torch_tensor(block_tables) or is_torch_tensor(context_lens):
        import torch

        dev = block_tables.device if is_torch_tensor(block_tables) else context_lens.device
        bt = torch.as_tensor(block_tables, device=dev)
        cl = torch.as_tensor(context_lens, device=dev)
        if cl.dtype != bt.dtype:  # widen, never narrow: a wrapped length would pass the checks
            bt, cl = bt.to(torch.int64), cl.to(torch.int64)
        # One copy to the host (one synchronisation) and the checks in NumPy: cheaper than a
        # handful of reductions launched on the device, and the tables are small.
        flat = torch.cat([cl, bt.reshape(-1)]).cpu().numpy()
        cl, bt = flat[:batch], flat[batch:].reshape(batch, max_blocks)
    else:
        bt, cl = np.asarray(block_tables), np.asarray(context_lens)
    cl = cl.astype(np.int64, copy=False)
    used = np.arange(max_blocks)[None, :] < (cl[:, None] + block_size - 1) // block_size
    bad = ((bt < 0) | (bt >= num_blocks)) & used
    lo, hi, nbad = int(cl.min()), int(cl.max()), int(np.count_nonzero(bad))
    if lo < 0:
        raise ValueError(f"context_lens must be >= 0, got a minimum of {lo}")
    if hi > max_blocks * block_size:
        raise ValueError(
            f"context_lens must be <= max_blocks * block_size = {max_blocks} * {block_size} = "
            f"{max_blocks * block_size} (the block table's capacity), got {hi}")
    if nbad:
        b, j = divmod(int(np.argmax(bad.ravel())), max_blocks)
        val = int(bt[b, j])
        raise ValueError(
            f"block_tables holds {nbad} block id(s) outside [0, num_blocks={num_blocks}) within the "
            f"sequences' used blocks; first at block_tables[{b}, {j}] = {val}")
    return hi


def check_cache_pair(k_cache, v_cache):
    """Shapes and dtype of a K/V cache pair; returns ``(kind, device, dtype, shape)``."""
    kk, vk = array_kind(k_cache, "k_cache"), array_kind(v_cache, "v_cache")
    if kk != vk or device_of(k_cache) != device_of(v_cache):
        raise TypeError(f"k_cache and v_cache must be the same kind of array on one device, got "
                        f"{kk} on {device_of(k_cache)} and {vk} on {device_of(v_cache)}")
    ks, vs = shape_tuple(k_cache), shape_tuple(v_cache)
    if len(ks) != 4:
        raise ValueError(f"k_cache must be 4-D [num_blocks, block_size, heads_kv, head_dim], got shape {ks}")
    if ks != vs:
        raise ValueError(f"k_cache and v_cache must have one shape, got {ks} and {vs}")
    if ks[1] == 0 or ks[2] == 0 or ks[3] == 0:
        raise ValueError(f"block_size, heads_kv and head_dim of the cache must be > 0, got shape {ks}")
    dtype = check_float_dtypes({"k_cache": k_cache, "v_cache": v_cache})
    return kk, device_of(k_cache), dtype, ks


def canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None,
                       window_size=-1, *, _tables_from_cache: int | None = None) -> PagedCall:
    """Validate the public arguments of :func:`flash_attention_paged` once.

    ``_tables_from_cache`` is for :class:`PagedKVCache` only: tables it built itself are valid by
    construction, so it passes their longest context and the contents are not read back (on a
    GPU that read-back is a synchronisation). Shapes, dtypes and devices are checked regardless.
    """
    qk = array_kind(q, "q")
    cache_kind, cache_dev, dtype, cs = check_cache_pair(k_cache, v_cache)
    qdev = device_of(q)
    if qk == "gpu" or cache_kind == "gpu":
        # Vulkan: the cache stays on the GPU; q may be host data or a GpuTensor.
        if cache_kind != "gpu" or qk == "torch" and qdev != "cpu":
            raise TypeError(f"q ({qk} on {qdev}) and the caches ({cache_kind} on {cache_dev}) cannot be "
                            "mixed: a GpuTensor cache takes q as a NumPy array, CPU tensor or GpuTensor")
    elif qk != cache_kind or qdev != cache_dev:
        raise TypeError(f"q and the caches must be the same kind of array on one device, got q: {qk} on "
                        f"{qdev}, caches: {cache_kind} on {cache_dev}")
    qs = shape_tuple(q)
    if len(qs) != 4:
        raise ValueError(f"q must be 4-D [batch, heads_q, q_len, head_dim], got shape {qs}")
    qdt = dtype_name(q)
    if qdt != dtype:
        raise TypeError(f"q and the caches must share one dtype, got q: {qdt}, caches: {dtype}")
    num_blocks, block_size, heads_kv, head_dim = cs
    if qs[3] != head_dim:
        raise ValueError(f"head_dim differs: q {qs}, k_cache {cs} (q dimension 3 must equal cache dimension 3)")
    if qs[1] == 0 or qs[1] % heads_kv:
        raise ValueError(f"heads_q ({qs[1]}) must be a positive multiple of heads_kv ({heads_kv}) for "
                         f"grouped-query attention; q {qs}, k_cache {cs}")
    block_tables = _int_array(block_tables, "block_tables", 2)
    context_lens = _int_array(context_lens, "context_lens", 1)
    bts, cls = shape_tuple(block_tables), shape_tuple(context_lens)
    if bts[0] != qs[0] or cls[0] != qs[0]:
        raise ValueError(f"batch sizes differ: q {qs}, block_tables {bts}, context_lens {cls} "
                         "(dimension 0 must match)")
    if cache_kind == "torch":
        for n, t in (("block_tables", block_tables), ("context_lens", context_lens)):
            if is_torch_tensor(t) and str(t.device) != cache_dev:
                raise ValueError(f"{n} is on {t.device} but the caches are on {cache_dev}")
    left, right = masks.canonical_window(True, window_size)
    if _tables_from_cache is None:
        max_context = check_tables(block_tables, context_lens, num_blocks, block_size)
    else:
        max_context = int(_tables_from_cache)
    return PagedCall(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens,
        kind=cache_kind, q_kind=qk, device=cache_dev, dtype=dtype, batch=qs[0], heads_q=qs[1],
        heads_kv=heads_kv, q_len=qs[2], head_dim=head_dim, num_blocks=num_blocks,
        block_size=block_size, max_blocks=bts[1], scale=check_scale(scale, head_dim), left=left,
        right=right, max_context=max_context)


# ---------------------------------------------------------------------------------------------------
# routing


# Same environment override and same preference by where the data (here: the cache) lives.
_forced = _forced_backend


def route_paged(call, backend=None, op: str = "attention"):
    """The paged backend for ``call`` (a :class:`PagedCall` or :class:`CopyKVCall`)."""
    forced = _forced(backend)
    if forced is not None:
        b = get_paged_backend(forced)
        reason = b.unavailable_reason or b.unsupported(call, forced=True)
        if reason:
            raise UnsupportedError(f"backend {forced!r} cannot serve {op} {call.describe()}: {reason}")
        return b
    for name in _AUTO_ORDER[_place(call)]:
        b = get_paged_backend(name)
        reason = b.unavailable_reason or b.unsupported(call, forced=False)
        if reason is None:
            return b
        log.info("aule: skipping paged backend %s for %s %s: %s", name, op, call.describe(), reason)
    raise UnsupportedError(f"no paged backend can serve {op} {call.describe()}")


def _zeros_like_q(call: PagedCall):
    q = call.q
    if call.q_kind == "numpy":
        return np.zeros(shape_tuple(q), dtype=q.dtype)
    if call.q_kind == "torch":
        import torch

        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    return None


def flash_attention_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                          backend=None):
    """Attention of ``q`` over a paged (block-table) KV cache, vLLM's layout.

    ``q [batch, heads_q, q_len, head_dim]``: the last ``q_len`` positions of each sequence, causal
    among themselves. ``k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]``;
    ``block_tables [batch, max_blocks]`` int32; ``context_lens [batch]`` int32 (new tokens included,
    already written with :func:`copy_kv_to_paged`). ``window_size`` as in
    :func:`aule.flash_attention`. Returns an array like ``q``. Bad tables raise ``ValueError``
    before any kernel runs.
    """
    call = canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale, window_size)
    return _attend(call, backend)


def _attend(call: PagedCall, backend):
    if call.batch == 0 or call.q_len == 0:
        if backend is not None:
            _forced(backend)  # still reject a name that is no backend
        out = _zeros_like_q(call)
        if out is not None:
            return out
    return route_paged(call, backend).forward(call)


#: FlashAttention's ROCm-flavoured name, kept for callers of the system aule replaces.
flash_attention_paged_amd = flash_attention_paged


# ---------------------------------------------------------------------------------------------------
# writing new K/V rows into their slots


@dataclass
class CopyKVCall:
    key: Any
    value: Any
    k_cache: Any
    v_cache: Any
    slot_mapping: Any
    kind: str  # family of the caches
    device: str
    dtype: str
    num_tokens: int
    num_blocks: int
    block_size: int
    heads_kv: int
    head_dim: int

    def describe(self) -> str:
        return (f"copy_kv {self.num_tokens} tokens into cache[{self.num_blocks},{self.block_size},"
                f"{self.heads_kv},{self.head_dim}] {self.dtype} on {self.device}")


def _check_slots(slot_mapping, capacity: int):
    """Non-negative slots must be < capacity and distinct (two writes to one slot race)."""
    n = shape_tuple(slot_mapping)[0]
    if n == 0:
        return
    if is_torch_tensor(slot_mapping):
        import torch

        s = torch.sort(slot_mapping.to(torch.int64)).values
        # Sorted, a repeated non-negative slot shows as two equal neighbours; no data-dependent shapes,
        # so the check stays one read-back on a GPU.
        dups = ((s[1:] == s[:-1]) & (s[1:] >= 0)).sum()
        hi, dups = (int(x) for x in torch.stack([s[-1], dups]).tolist())
    else:
        s = np.sort(np.asarray(slot_mapping).astype(np.int64, copy=False))
        hi, dups = int(s[-1]), int(((s[1:] == s[:-1]) & (s[1:] >= 0)).sum())
    if hi >= capacity:
        raise ValueError(f"slot_mapping holds slot {hi}, outside the cache's num_blocks * block_size = "
                         f"{capacity} slots (negative slots are skipped)")
    if dups:
        raise ValueError(f"slot_mapping writes {dups} slot(s) more than once; each non-negative slot "
                         "must appear at most once")


def canonicalize_copy_kv(key, value, k_cache, v_cache, slot_mapping) -> CopyKVCall:
    cache_kind, dev, dtype, cs = check_cache_pair(k_cache, v_cache)
    num_blocks, block_size, heads_kv, head_dim = cs
    for n, x in (("key", key), ("value", value)):
        kind = array_kind(x, n)
        if cache_kind == "gpu":
            ok = kind == "gpu" or kind == "numpy" or (kind == "torch" and device_of(x) == "cpu")
        else:
            ok = kind == cache_kind and device_of(x) == dev
        if not ok:
            raise TypeError(f"{n} ({kind} on {device_of(x)}) does not match the caches ({cache_kind} on {dev})")
        if shape_tuple(x) != shape_tuple(key) or len(shape_tuple(x)) != 3 or shape_tuple(x)[1:] != (heads_kv, head_dim):
            raise ValueError(f"key and value must both be [num_tokens, heads_kv={heads_kv}, head_dim={head_dim}], "
                             f"got key {shape_tuple(key)}, value {shape_tuple(value)}")
        if dtype_name(x) != dtype:
            raise TypeError(f"{n} has dtype {dtype_name(x)} but the caches hold {dtype}")
    slot_mapping = _int_array(slot_mapping, "slot_mapping", 1)
    if shape_tuple(slot_mapping)[0] != shape_tuple(key)[0]:
        raise ValueError(f"slot_mapping has {shape_tuple(slot_mapping)[0]} entries for {shape_tuple(key)[0]} tokens "
                         "(one slot per token)")
    if cache_kind == "torch" and is_torch_tensor(slot_mapping) and str(slot_mapping.device) != dev:
        raise ValueError(f"slot_mapping is on {slot_mapping.device} but the caches are on {dev}")
    _check_slots(slot_mapping, num_blocks * block_size)
    return CopyKVCall(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                      kind=cache_kind, device=dev, dtype=dtype, num_tokens=shape_tuple(key)[0],
                      num_blocks=num_blocks, block_size=block_size, heads_kv=heads_kv, head_dim=head_dim)


def copy_kv_to_paged(key, value, k_cache, v_cache, slot_mapping, *, backend=None):
    """Write token rows ``key, value [num_tokens, heads_kv, head_dim]`` into the caches, in place.

    vLLM's ``reshape_and_cache`` convention: token ``t`` goes to block ``slot_mapping[t] // block_size``,
    row ``slot_mapping[t] % block_size``; a negative slot skips the token (padding).
    """
    call = canonicalize_copy_kv(key, value, k_cache, v_cache, slot_mapping)
    if call.num_tokens:
        route_paged(call, backend, op="copy_kv_to_paged").copy_kv(call)


# ---------------------------------------------------------------------------------------------------
# the cache manager


class PagedKVCache:
    """Owns a paged K/V cache: hands out blocks to sequences, appends tokens, frees, forks.

    ``backend`` decides where the blocks live: ``"numpy"`` (NumPy arrays), ``"triton"`` /
    ``"triton-amd"`` (torch tensors on ``device``, default ``"cuda"``), ``"vulkan"`` (GpuTensors, so
    decode never copies the cache), or ``None`` (Vulkan when a GPU-type device exists, else NumPy).
    Blocks are reference-counted: :meth:`fork` shares the parent's blocks, and the first append
    into a shared, partly filled last block copies it (copy-on-write). Requests that need more
    blocks than are free raise :class:`CacheFullError` and change nothing.
    """

    def __init__(self, num_blocks, block_size, heads_kv, head_dim, dtype="float16", backend=None, *,
                 device=None):
        for n, val in (("num_blocks", num_blocks), ("block_size", block_size), ("heads_kv", heads_kv),
                       ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
                raise ValueError(f"{n} must be a positive int, got {val!r}")
        self.num_blocks, self.block_size = int(num_blocks), int(block_size)
        self.heads_kv, self.head_dim = int(heads_kv), int(head_dim)
        self.dtype = str(dtype).replace("torch.", "")
        if self.dtype not in ("float16", "bfloat16", "float32", "float64"):
            raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
        self.backend = self._pick_backend(backend)
        shape = (self.num_blocks, self.block_size, self.heads_kv, self.head_dim)
        self.k_cache, self.v_cache = get_paged_backend(self.backend).allocate_cache(shape, self.dtype, device)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = np.zeros(self.num_blocks, dtype=np.int64)
        self._tables: dict = {}  # seq id -> list of block ids
        self._lens: dict = {}
        self._ids = itertools.count()

    def _pick_backend(self, backend):
        name = _forced(backend)
        if name is None:
            vk = get_paged_backend("vulkan")
            name = "vulkan" if vk.unavailable_reason is None and getattr(vk, "is_gpu", False) else "numpy"
        b = get_paged_backend(name)
        if b.unavailable_reason:
            raise UnsupportedError(f"backend {name!r} cannot hold a paged cache here: {b.unavailable_reason}")
        if self.dtype == "bfloat16" and name in ("numpy", "vulkan"):
            raise UnsupportedError(f"backend {name!r} stores NumPy data, which has no bfloat16")
        return name

    # -- bookkeeping ------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def sequences(self) -> list:
        return list(self._tables)

    def __len__(self):
        return len(self._tables)

    def seq_len(self, seq_id) -> int:
        return self._lens[self._known(seq_id)]

    def _known(self, seq_id):
        if seq_id not in self._tables:
            raise KeyError(f"sequence {seq_id!r} is not in this cache (allocate it first)")
        return seq_id

    def allocate(self, seq_id=None):
        """Start an empty sequence; returns its id (a fresh int unless ``seq_id`` is given)."""
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._tables:
                seq_id = next(self._ids)
        elif seq_id in self._tables:
            raise ValueError(f"sequence {seq_id!r} already exists")
        self._tables[seq_id], self._lens[seq_id] = [], 0
        return seq_id

    def free(self, seq_id) -> None:
        """Drop a sequence; blocks no other sequence shares go back to the free list."""
        for blk in self._tables.pop(self._known(seq_id)):
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)
        del self._lens[seq_id]

    def fork(self, seq_id, new_id=None):
        """A new sequence with the same tokens, sharing every block (no copy until a write)."""
        table = self._tables[self._known(seq_id)]
        new_id = self.allocate(new_id)
        self._tables[new_id] = list(table)
        self._lens[new_id] = self._lens[seq_id]
        for blk in table:
            self._refs[blk] += 1
        return new_id

    def reserve(self, seq_id, num_tokens: int):
        """Make room for ``num_tokens`` more tokens; returns their slots (int64 array) for
        :func:`copy_kv_to_paged`. Raises :class:`CacheFullError` (nothing changed) when blocks run out.
        """
        table = self._tables[self._known(seq_id)]
        n = int(num_tokens)
        if n < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        length, bs = self._lens[seq_id], self.block_size
        new_blocks = -(-(length + n) // bs) - len(table)
        cow = n > 0 and length % bs != 0 and self._refs[table[-1]] > 1
        needed = new_blocks + int(cow)
        if needed > len(self._free):
            raise CacheFullError(
                f"paged KV cache is full: sequence {seq_id!r} needs {needed} more block(s) of "
                f"{bs} tokens for {n} token(s), {len(self._free)} of {self.num_blocks} are free; "
                "free finished sequences or build a larger cache")
        if cow:
            # The last block is shared with a fork and is about to be written: give this sequence its own copy.
            src, dst = table[-1], self._free.pop()
            self._copy_block(src, dst)
            self._refs[src] -= 1
            self._refs[dst] = 1
            table[-1] = dst
        for _ in range(new_blocks):
            blk = self._free.pop()
            self._refs[blk] = 1
            table.append(blk)
        pos = np.arange(length, length + n, dtype=np.int64)
        slots = np.asarray(table, dtype=np.int64)[pos // bs] * bs + pos % bs
        self._lens[seq_id] = length + n
        return slots

    def _copy_block(self, src: int, dst: int) -> None:
        slots_src = np.arange(src * self.block_size, (src + 1) * self.block_size)
        slots_dst = np.arange(dst * self.block_size, (dst + 1) * self.block_size)
        get_paged_backend(self.backend).copy_slots(self.k_cache, self.v_cache, slots_src, slots_dst)

    def append(self, seq_id, key, value):
        """Append tokens ``key, value [num_tokens, heads_kv, head_dim]`` to a sequence; returns the slots."""
        n = shape_tuple(key)[0] if len(shape_tuple(key)) == 3 else None
        if n is None:
            raise ValueError(f"key must be [num_tokens, heads_kv, head_dim], got shape {shape_tuple(key)}")
        table_before = list(self._tables[self._known(seq_id)])
        len_before = self._lens[seq_id]
        # Validate the data before taking blocks, so a bad write cannot leave half-grown tables.
        probe = canonicalize_copy_kv(key, value, self.k_cache, self.v_cache, np.full(n, -1, np.int64))
        del probe
        slots = self.reserve(seq_id, n)
        try:
            copy_kv_to_paged(key, value, self.k_cache, self.v_cache, self._slots_for(slots),
                             backend=self.backend)
        except Exception:
            self._rollback(seq_id, table_before, len_before)
            raise
        return slots

    def _rollback(self, seq_id, table_before, len_before):
        table = self._tables[seq_id]
        for blk in table:
            if blk not in table_before:
                self._refs[blk] -= 1
                if self._refs[blk] == 0:
                    self._free.append(blk)
        for blk in table_before:
            if blk not in table:
                self._refs[blk] += 1
        self._tables[seq_id], self._lens[seq_id] = table_before, len_before

    def _slots_for(self, slots):
        if self.backend in ("triton", "triton-amd"):
            import torch

            return torch.as_tensor(slots, device=self.k_cache.device)
        return slots

    def block_tables(self, seq_ids, max_blocks=None):
        """``[len(seq_ids), max_blocks]`` int32 block table (padded with 0, never read), on the
        cache's device for Triton, NumPy otherwise."""
        tables = [self._tables[self._known(s)] for s in seq_ids]
        width = max([len(t) for t in tables] + [1]) if max_blocks is None else int(max_blocks)
        if any(len(t) > width for t in tables):
            raise ValueError(f"max_blocks={width} is smaller than a sequence's {max(len(t) for t in tables)} blocks")
        out = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            out[i, :len(t)] = t
        return self._on_device(out)

    def context_lens(self, seq_ids):
        """``[len(seq_ids)]`` int32 token counts, on the cache's device for Triton."""
        return self._on_device(np.asarray([self._lens[self._known(s)] for s in seq_ids], dtype=np.int32))

    def _on_device(self, arr):
        if self.backend in ("triton", "triton-amd"):
            import torch

            t = torch.from_numpy(arr)
            if self.k_cache.device.type == "cuda":
                # From pinned memory the copy is queued behind earlier work instead of waiting for it.
                return t.pin_memory().to(self.k_cache.device, non_blocking=True)
            return t.to(self.k_cache.device)
        return arr

    def attention(self, q, seq_ids, scale=None, window_size=-1):
        """:func:`flash_attention_paged` of ``q [len(seq_ids), heads_q, q_len, head_dim]`` over this
        cache. The tables come from this cache's own bookkeeping, so they are not read back to be
        checked (no host synchronisation on a GPU); ``q`` is validated as usual."""
        seq_ids = list(seq_ids)
        longest = max([self._lens[self._known(s)] for s in seq_ids] + [0])
        call = canonicalize_paged(q, self.k_cache, self.v_cache, self.block_tables(seq_ids),
                                  self.context_lens(seq_ids), scale, window_size, _tables_from_cache=longest)
        return _attend(call, self.backend)

    def gather(self, seq_id):
        """The sequence's keys and values as contiguous NumPy arrays ``[heads_kv, len, head_dim]``
        (for tests and debugging; copies from the device)."""
        table, length = self._tables[self._known(seq_id)], self._lens[seq_id]
        k, v = (get_paged_backend(self.backend).to_host(c) for c in (self.k_cache, self.v_cache))
        idx = np.asarray(table, dtype=np.int64)
        kk = k[idx].reshape(-1, self.heads_kv, self.head_dim)[:length]
        vv = v[idx].reshape(-1, self.heads_kv, self.head_dim)[:length]
        return np.ascontiguousarray(kk.transpose(1, 0, 2)), np.ascontiguousarray(vv.transpose(1, 0, 2))

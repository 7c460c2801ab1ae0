"""Validated descriptions of the paged calls: attention over a block-table cache, KV writes, and
the storage a :class:`aule.kv_cache.PagedKVCache` asks a backend for.

Layout (vLLM's): ``k_cache, v_cache [num_blocks, block_size, heads_kv, head_dim]``,
``block_tables [batch, max_blocks]`` (integer block ids), ``context_lens [batch]`` (tokens of each
sequence, the new ones included), ``q [batch, heads_q, q_len, head_dim]``; or, packed (vLLM's
layout, with ``query_start_loc [batch + 1]``), ``q [num_tokens, heads_q, head_dim]`` where
sequence ``b``'s ``n_b = query_start_loc[b + 1] - query_start_loc[b]`` rows are
``q[query_start_loc[b]:query_start_loc[b + 1]]``.

Meaning: the ``q_len`` (packed: ``n_b``) query rows of sequence ``b`` are its LAST positions, so
row ``i`` sits at key position ``context_lens[b] - q_len + i`` and is causal with respect to the
others (decode when ``q_len == 1``; chunked prefill and speculative verification otherwise; packed,
all of them in one batch). Windows follow :mod:`aule.masks` with ``seq_q = q_len`` and ``seq_k =
context_lens[b]``. Key ``j`` of sequence ``b`` lives in block ``block_tables[b, j // block_size]``
at row ``j % block_size``. ``query_start_loc`` starts at 0, never decreases and ends at
``num_tokens``, and no sequence has more rows than keys (``n_b <= context_lens[b]``).

Every integer a kernel would use as an address (block ids, lengths, query offsets, slots) is checked before it
is followed, so a bad table raises ``ValueError`` instead of reading out of bounds. Where depends
on where the tables live (``checks`` on the call):

- ``"host"``: host tables (NumPy, CPU tensors) are checked here, before any kernel runs;
- ``"device"``: torch tables on a GPU (and on the CPU under Triton's interpreter, which runs the
  same kernels there) are not read back, which would synchronise with the device: a backend with
  ``checks_tables`` checks them in its kernels and reports through an error flag
  (:mod:`aule.device_errors`); for any other backend the router checks them on the host first;
- ``"trusted"``: tables a :class:`PagedKVCache` builds from its own bookkeeping are valid by
  construction and not checked at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from . import call as _call, masks, settings
from .call import (FLOAT_DTYPES, Grouped, OnDevice, Placed, array_kind, check_alibi, check_float_dtypes,
                   check_scale, check_sinks, on_host, check_softcap, device_of, dtype_name, int_table, is_torch_tensor, shape_tuple)


@dataclass
class PagedCall(Grouped):
    """A validated paged-attention call. Backends read it and never re-validate user input."""

    q: Any
    k_cache: Any
    v_cache: Any
    block_tables: Any
    context_lens: Any
    kind: str  # family of the caches ('numpy', 'torch' or 'gpu'): routing follows the cache
    q_kind: str  # family of q, which the output mirrors
    device: str  # the caches' device
    dtype: str
    batch: int
    heads_q: int
    heads_kv: int
    q_len: int  # rows per sequence; packed: the most any sequence has (host-checked), else a bound
    head_dim: int
    num_blocks: int
    block_size: int
    max_blocks: int
    scale: float
    left: int
    right: int
    max_context: int  # longest context when the host checked the tables, else an upper bound (sizing only)
    checks: str = "host"  # where the tables are bounds-checked: "host", "device" or "trusted" (module doc)
    softcap: float = 0.0  # > 0: scores become softcap * tanh(score / softcap) (aule.masks)
    # ALiBi slopes as float32 [batch, heads_q], or None: score -= slope * |pos(row) - j|, the row's
    # position in its sequence (context_lens[b] - n_b + r) as the key's
    alibi: Any = field(default=None, compare=False, repr=False)
    # Attention sinks as float32 [heads_q], or None (aule.masks)
    sinks: Any = field(default=None, compare=False, repr=False)
    # Packed calls (vLLM's layout): the [batch + 1] row offsets into q [num_tokens, heads_q, head_dim]
    query_start_loc: Any = field(default=None, compare=False, repr=False)
    num_tokens: int = 0  # rows of a packed q (batch * q_len for the 4-D layout)
    # True when alibi or sinks are :class:`aule.call.OnDevice` (values unread; the kernels check them)
    device_values: bool = False

    def on_host(self) -> "PagedCall":
        """This call with its slopes and sinks as checked host data, for a backend whose kernels do
        not check device values (``Backend.run`` asks for it); itself when nothing is on the device."""
        if not self.device_values:
            return self
        return replace(self, alibi=on_host(self.alibi), sinks=on_host(self.sinks), device_values=False)

    @property
    def packed(self) -> bool:
        return self.query_start_loc is not None

    @property
    def rows(self) -> int:
        """Query rows of the call (per head): what the output holds."""
        return self.num_tokens if self.packed else self.batch * self.q_len

    def check_on_host(self) -> None:
        """Check tables left to the device on the host instead (one read-back), for a backend whose
        kernels do not check them; the call is then ``"host"``-checked and exactly sized."""
        self.max_context = check_tables(self.block_tables, self.context_lens, self.num_blocks, self.block_size)
        if self.packed:
            self.q_len = check_query_start_loc(self.query_start_loc, self.num_tokens, self.context_lens, self.q_len)
        self.checks = "host"

    @property
    def features(self) -> frozenset:
        """The optional features this call uses (see :attr:`aule.call.AttentionCall.features`)."""
        return frozenset(name for name, on in (("softcap", self.softcap), ("alibi", self.alibi is not None),
                                               ("sinks", self.sinks is not None)) if on)

    def describe(self) -> str:
        q = (f"packed q[{self.num_tokens},{self.heads_q},{self.head_dim}] of {self.batch} sequences (at most "
             f"{self.q_len} rows each)" if self.packed else f"paged q[{self.batch},{self.heads_q},{self.q_len},"
             f"{self.head_dim}]")
        return (f"{q} "
                f"cache[{self.num_blocks},{self.block_size},{self.heads_kv},{self.head_dim}] "
                f"{self.dtype} on {self.device} window=({self.left},{self.right}) "
                f"max_context={self.max_context}")


@dataclass
class KVWriteCall(Placed):
    """A validated write of token rows into their cache slots (``copy_kv_to_paged``)."""

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
    checks: str = "host"  # where slot_mapping is bounds-checked, as PagedCall.checks

    def describe(self) -> str:
        return (f"copy_kv {self.num_tokens} tokens into cache[{self.num_blocks},{self.block_size},"
                f"{self.heads_kv},{self.head_dim}] {self.dtype} on {self.device}")


@dataclass(frozen=True)
class CacheSpec:
    """What :class:`aule.kv_cache.PagedKVCache` asks a backend to store: a K and a V cache of
    ``shape`` ``[num_blocks, block_size, heads_kv, head_dim]`` and ``dtype`` (a name such as
    'float16'), on ``device`` (``None``: the backend's default). ``place`` steers auto routing;
    a cache's auto choice is always made among host-side stores (Vulkan GpuTensors or NumPy)."""

    shape: tuple
    dtype: str
    device: Any = None
    place: str = "host"

    def describe(self) -> str:
        where = "" if self.device is None else f" on {self.device}"
        return f"a paged KV cache [{','.join(map(str, self.shape))}] {self.dtype}{where}"


def check_cache_spec(num_blocks, block_size, heads_kv, head_dim, dtype, device=None) -> CacheSpec:
    """The sizes of a new cache: positive ints, and a float dtype (torch names accepted)."""
    for n, val in (("num_blocks", num_blocks), ("block_size", block_size), ("heads_kv", heads_kv),
                   ("head_dim", head_dim)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val <= 0:
            raise ValueError(f"{n} must be a positive int, got {val!r}")
    name = str(dtype).replace("torch.", "")
    if name not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")
    shape = (int(num_blocks), int(block_size), int(heads_kv), int(head_dim))
    return CacheSpec(shape=shape, dtype=name, device=device)


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


def device_checked(cache_kind: str, *tables) -> bool:
    """Whether these tables are left for the kernels to check (``checks == "device"``): torch
    tables beside torch caches, on a GPU (reading them would synchronise) or under Triton's
    interpreter (so that the kernels' own checks are what runs, as on a GPU)."""
    if cache_kind != "torch" or not all(is_torch_tensor(t) for t in tables):
        return False
    return any(t.device.type != "cpu" for t in tables) or settings.triton_interpret()


def check_max_context_len(max_context_len, capacity: int) -> int:
    """``max_context_len`` (vLLM's ``max_seq_len``): ``None`` or an int >= 0; the split-K sizing
    bound, never above the table's capacity. ``None`` sizes from the capacity itself."""
    if max_context_len is None:
        return capacity
    if isinstance(max_context_len, bool) or not isinstance(max_context_len, (int, np.integer)) or max_context_len < 0:
        raise ValueError(f"max_context_len must be None or an int >= 0 (the longest context_lens entry, "
                         f"which sizes the launch), got {max_context_len!r}")
    return min(int(max_context_len), capacity)


def check_max_query_len(max_query_len, num_tokens: int) -> int:
    """``max_query_len`` (vLLM's): ``None`` or an int >= 0, at least 1 when there are rows; the bound on
    any sequence's rows that sizes the launch, never above ``num_tokens``. ``None`` sizes from
    ``num_tokens`` itself. Unlike ``max_context_len`` it is a promise: a sequence with more rows is an
    error (its rows past the bound would have no program to compute them)."""
    if max_query_len is None:
        return num_tokens
    if isinstance(max_query_len, bool) or not isinstance(max_query_len, (int, np.integer)) or max_query_len < 0:
        raise ValueError(f"max_query_len must be None or an int >= 0 (the most query rows any sequence has in "
                         f"query_start_loc, which sizes the launch), got {max_query_len!r}")
    if max_query_len == 0 and num_tokens > 0:
        raise ValueError(f"max_query_len = 0 but q holds num_tokens = {num_tokens} rows, so some sequence has at "
                         "least one (query_start_loc runs from 0 to num_tokens)")
    return min(int(max_query_len), num_tokens)


def _host_ints(t) -> np.ndarray:
    """A NumPy or torch integer table as int64 NumPy (one read-back for device tensors)."""
    if is_torch_tensor(t):
        t = t.cpu().numpy()
    return np.asarray(t).astype(np.int64, copy=False)


def check_query_start_loc(query_start_loc, num_tokens: int, context_lens, max_query_len: int) -> int:
    """Check a packed call's row offsets; returns the most rows any sequence has.

    ``query_start_loc [batch + 1]`` must start at 0, stay within ``[0, num_tokens]``, never
    decrease and end at ``num_tokens``; sequence ``b``'s ``n_b`` rows may number at most
    ``max_query_len`` and at most ``context_lens[b]`` (they are its last positions). The
    messages name the rule, the index and the value; the device kernels' are worded alike
    (:mod:`aule.backends.triton.flags`).
    """
    loc = _host_ints(query_start_loc)
    if loc[0] != 0:
        raise ValueError(f"query_start_loc must start at 0, got query_start_loc[0] = {int(loc[0])}")
    out = (loc < 0) | (loc > num_tokens)
    if out.any():
        i = int(np.argmax(out))
        raise ValueError(f"query_start_loc[{i}] = {int(loc[i])} is outside [0, num_tokens = {num_tokens}] "
                         "(q.shape[0], the packed rows)")
    n = np.diff(loc)
    if (n < 0).any():
        i = int(np.argmax(n < 0)) + 1
        raise ValueError(f"query_start_loc must be non-decreasing, got query_start_loc[{i}] = {int(loc[i])} < "
                         f"query_start_loc[{i - 1}] = {int(loc[i - 1])}")
    if loc[-1] != num_tokens:
        raise ValueError(f"query_start_loc must end at num_tokens = {num_tokens} (q.shape[0]), got "
                         f"query_start_loc[{len(loc) - 1}] = {int(loc[-1])}")
    if not n.size:
        return 0
    if n.max() > max_query_len:
        b = int(np.argmax(n))
        raise ValueError(f"sequence {b} has {int(n[b])} query rows (query_start_loc[{b + 1}] - query_start_loc[{b}]), "
                         f"more than max_query_len = {max_query_len}")
    over = n > _host_ints(context_lens)
    if over.any():
        b = int(np.argmax(over))
        raise ValueError(f"sequence {b} has {int(n[b])} query rows (query_start_loc[{b + 1}] - query_start_loc[{b}]) "
                         f"but context_lens[{b}] = {int(_host_ints(context_lens)[b])}: its rows are its last "
                         "positions, so there may be at most context_lens[b] of them")
    return int(n.max())


def _check_on_cache_device(cache_kind: str, cache_dev: str, named: dict) -> None:
    """Torch tables must sit on the caches' device (a kernel would read them there)."""
    if cache_kind != "torch":
        return
    for n, t in named.items():
        if is_torch_tensor(t) and str(t.device) != cache_dev:
            raise ValueError(f"{n} is on {t.device} but the caches are on {cache_dev}")


def _q_layout(q, packed: bool) -> tuple:
    """``(rows per batch entry or None, heads_q, q_len or None, head_dim, num_tokens)`` of q."""
    qs = shape_tuple(q)
    if not packed:
        if len(qs) != 4:
            raise ValueError(f"q must be 4-D [batch, heads_q, q_len, head_dim], got shape {qs} (a packed 3-D q "
                             "[num_tokens, heads_q, head_dim] takes query_start_loc)")
        return qs[0], qs[1], qs[2], qs[3], qs[0] * qs[2]
    if len(qs) != 3:
        raise ValueError(f"with query_start_loc, q must be 3-D [num_tokens, heads_q, head_dim] (vLLM's packed "
                         f"layout), got shape {qs}")
    return None, qs[1], None, qs[2], qs[0]


def canonicalize_paged(q, k_cache, v_cache, block_tables, context_lens, scale=None, window_size=-1, *,
                       softcap=0.0, alibi_slopes=None, sinks=None, max_context_len=None, query_start_loc=None, max_query_len=None,
                       tables_checked_max: int | None = None) -> PagedCall:
    """Validate the public arguments of :func:`aule.flash_attention_paged` once.

    ``tables_checked_max`` is for :class:`aule.kv_cache.PagedKVCache` only: tables it built itself
    are valid by construction, so it passes their longest context and the contents are not read
    back (on a GPU that read-back is a synchronisation); its ``query_start_loc`` too, built from
    row counts it checked, with ``max_query_len`` their maximum. Shapes, dtypes and devices are
    checked regardless. Device tables are left to the kernels (module doc).
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
    packed = query_start_loc is not None
    if max_query_len is not None and not packed:
        raise ValueError("max_query_len bounds the rows of a packed call; it takes query_start_loc (a 4-D q "
                         "has q_len rows per sequence)")
    qs = shape_tuple(q)
    q_batch, heads_q, q_len, q_dim, num_tokens = _q_layout(q, packed)
    qdt = dtype_name(q)
    if qdt != dtype:
        raise TypeError(f"q and the caches must share one dtype, got q: {qdt}, caches: {dtype}")
    num_blocks, block_size, heads_kv, head_dim = cs
    if q_dim != head_dim:
        raise ValueError(f"head_dim differs: q {qs}, k_cache {cs} (q's last dimension must equal cache dimension 3)")
    if heads_q == 0 or heads_q % heads_kv:
        raise ValueError(f"heads_q ({heads_q}) must be a positive multiple of heads_kv ({heads_kv}) for "
                         f"grouped-query attention; q {qs}, k_cache {cs}")
    block_tables = int_table(block_tables, "block_tables", 2)
    context_lens = int_table(context_lens, "context_lens", 1)
    bts, cls = shape_tuple(block_tables), shape_tuple(context_lens)
    tables = {"block_tables": block_tables, "context_lens": context_lens}
    if packed:
        query_start_loc = int_table(query_start_loc, "query_start_loc", 1)
        qsl = shape_tuple(query_start_loc)
        if cls[0] != bts[0] or qsl[0] != bts[0] + 1:
            raise ValueError(f"batch sizes differ: block_tables {bts}, context_lens {cls}, query_start_loc {qsl} "
                             "(query_start_loc holds batch + 1 offsets)")
        if bts[0] == 0 and num_tokens:
            raise ValueError(f"query_start_loc {qsl} names no sequence, but q holds num_tokens = {num_tokens} rows")
        tables["query_start_loc"] = query_start_loc
    elif bts[0] != q_batch or cls[0] != q_batch:
        raise ValueError(f"batch sizes differ: q {qs}, block_tables {bts}, context_lens {cls} "
                         "(dimension 0 must match)")
    _check_on_cache_device(cache_kind, cache_dev, tables)
    left, right = masks.canonical_window(True, window_size)
    bound = check_max_context_len(max_context_len, bts[1] * block_size)
    if packed:
        q_len = check_max_query_len(max_query_len, num_tokens)
    if tables_checked_max is not None:
        checks, max_context = "trusted", int(tables_checked_max)
    elif device_checked(cache_kind, *tables.values()):
        checks, max_context = "device", bound
    else:
        checks, max_context = "host", check_tables(block_tables, context_lens, num_blocks, block_size)
        if packed:
            q_len = check_query_start_loc(query_start_loc, num_tokens, context_lens, q_len)
    # Slopes and sinks on an accelerator stay there, checked by the kernels (a read would stall the
    # queue on every decode step), as for dense calls.
    on_device = _call.checks_on_device(cache_kind, cache_dev)
    alibi = check_alibi(alibi_slopes, bts[0], heads_q, on_device)
    sinks = check_sinks(sinks, heads_q, on_device)
    return PagedCall(
        q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens,
        kind=cache_kind, q_kind=qk, device=cache_dev, dtype=dtype, batch=bts[0], heads_q=heads_q,
        heads_kv=heads_kv, q_len=q_len, head_dim=head_dim, num_blocks=num_blocks,
        block_size=block_size, max_blocks=bts[1], scale=check_scale(scale, head_dim), left=left,
        right=right, max_context=max_context, checks=checks, softcap=check_softcap(softcap),
        alibi=alibi, sinks=sinks, query_start_loc=query_start_loc, num_tokens=num_tokens,
        device_values=isinstance(alibi, OnDevice) or isinstance(sinks, OnDevice))


def check_slots(slot_mapping, capacity: int) -> None:
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


def canonicalize_write_kv(key, value, k_cache, v_cache, slot_mapping, *, slots_trusted=False) -> KVWriteCall:
    """Validate the public arguments of :func:`aule.copy_kv_to_paged` once. ``slots_trusted`` is for
    :class:`aule.kv_cache.PagedKVCache`, whose slots are valid by construction (not checked)."""
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
    slot_mapping = int_table(slot_mapping, "slot_mapping", 1)
    if shape_tuple(slot_mapping)[0] != shape_tuple(key)[0]:
        raise ValueError(f"slot_mapping has {shape_tuple(slot_mapping)[0]} entries for {shape_tuple(key)[0]} tokens "
                         "(one slot per token)")
    _check_on_cache_device(cache_kind, dev, {"slot_mapping": slot_mapping})
    if slots_trusted:
        checks = "trusted"
    elif device_checked(cache_kind, slot_mapping):
        checks = "device"
    else:
        checks = "host"
        check_slots(slot_mapping, num_blocks * block_size)
    return KVWriteCall(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping,
                       kind=cache_kind, device=dev, dtype=dtype, num_tokens=shape_tuple(key)[0],
                       num_blocks=num_blocks, block_size=block_size, heads_kv=heads_kv, head_dim=head_dim,
                       checks=checks)

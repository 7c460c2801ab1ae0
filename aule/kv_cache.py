"""The paged KV cache manager: block bookkeeping, fork and copy-on-write; storage through a backend.

:class:`PagedKVCache` owns only the bookkeeping (free list, reference counts, each sequence's
blocks and length). Where the blocks live is the business of the backend that the router picks
for the ``kv_store`` operation (:meth:`aule.backends.base.Backend.allocate_cache` and the rest of
the KV-store protocol); writes and attention go through the public entry points in :mod:`aule.api`.
"""
from __future__ import annotations

import itertools

import numpy as np

from . import api
from .call import shape_tuple
from .errors import AuleError
from .paged_call import canonicalize_paged, canonicalize_write_kv, check_cache_spec


class CacheFullError(AuleError, MemoryError):
    """The paged cache has too few free blocks for a request; the cache is left unchanged."""


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
        spec = check_cache_spec(num_blocks, block_size, heads_kv, head_dim, dtype, device)
        self.num_blocks, self.block_size, self.heads_kv, self.head_dim = spec.shape
        self.dtype = spec.dtype
        self._store = api.route(spec, "kv_store", backend)
        self.backend = self._store.name
        self.k_cache, self.v_cache = self._store.allocate_cache(spec)
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = np.zeros(self.num_blocks, dtype=np.int64)
        self._tables: dict = {}  # seq id -> list of block ids
        self._lens: dict = {}
        self._ids = itertools.count()

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

    def _release(self, blocks) -> None:
        """Drop one reference to each block; a block nobody holds goes back to the free list."""
        for blk in blocks:
            self._refs[blk] -= 1
            if self._refs[blk] == 0:
                self._free.append(blk)

    def free(self, seq_id) -> None:
        """Drop a sequence; blocks no other sequence shares go back to the free list."""
        self._release(self._tables.pop(self._known(seq_id)))
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
        :func:`aule.copy_kv_to_paged`. Raises :class:`CacheFullError` (nothing changed) when blocks
        run out.
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
        self._store.copy_slots(self.k_cache, self.v_cache, slots_src, slots_dst)

    def append(self, seq_id, key, value):
        """Append tokens ``key, value [num_tokens, heads_kv, head_dim]`` to a sequence; returns the slots."""
        n = shape_tuple(key)[0] if len(shape_tuple(key)) == 3 else None
        if n is None:
            raise ValueError(f"key must be [num_tokens, heads_kv, head_dim], got shape {shape_tuple(key)}")
        table_before = list(self._tables[self._known(seq_id)])
        len_before = self._lens[seq_id]
        # Validate the data before taking blocks, so a bad write cannot leave half-grown tables.
        canonicalize_write_kv(key, value, self.k_cache, self.v_cache, np.full(n, -1, np.int64))
        slots = self.reserve(seq_id, n)
        try:
            # The slots come from this cache's own bookkeeping: valid by construction, not checked.
            call = canonicalize_write_kv(key, value, self.k_cache, self.v_cache,
                                         self._store.place_tables(slots, self.k_cache), slots_trusted=True)
            api.write_kv(call, self.backend)
        except Exception:
            self._rollback(seq_id, table_before, len_before)
            raise
        return slots

    def _rollback(self, seq_id, table_before, len_before):
        table = self._tables[seq_id]
        self._release(blk for blk in table if blk not in table_before)
        for blk in table_before:
            if blk not in table:
                self._refs[blk] += 1
        self._tables[seq_id], self._lens[seq_id] = table_before, len_before

    def block_tables(self, seq_ids, max_blocks=None):
        """``[len(seq_ids), max_blocks]`` int32 block table (padded with 0, never read), where the
        backend's kernels read it (the cache's device for Triton, NumPy otherwise)."""
        tables = [self._tables[self._known(s)] for s in seq_ids]
        width = max([len(t) for t in tables] + [1]) if max_blocks is None else int(max_blocks)
        if any(len(t) > width for t in tables):
            raise ValueError(f"max_blocks={width} is smaller than a sequence's {max(len(t) for t in tables)} blocks")
        out = np.zeros((len(tables), width), dtype=np.int32)
        for i, t in enumerate(tables):
            out[i, :len(t)] = t
        return self._store.place_tables(out, self.k_cache)

    def context_lens(self, seq_ids):
        """``[len(seq_ids)]`` int32 token counts, where the backend's kernels read them."""
        lens = np.asarray([self._lens[self._known(s)] for s in seq_ids], dtype=np.int32)
        return self._store.place_tables(lens, self.k_cache)

    def attention(self, q, seq_ids, scale=None, window_size=-1, *, sinks=None, query_lens=None):
        """:func:`aule.flash_attention_paged` of ``q [len(seq_ids), heads_q, q_len, head_dim]`` over
        this cache. The tables come from this cache's own bookkeeping, so they are not read back to
        be checked (no host synchronisation on a GPU); ``q`` is validated as usual.

        ``query_lens`` (one row count per sequence, host ints): q is packed ``[sum(query_lens),
        heads_q, head_dim]``, sequence ``i``'s rows its last ``query_lens[i]`` positions (decode,
        prefill chunks and drafts in one call); the cache builds ``query_start_loc`` itself from
        counts it checks against its own lengths, so that is not read back either."""
        seq_ids = list(seq_ids)
        lens = [self._lens[self._known(s)] for s in seq_ids]
        packed = {}
        if query_lens is not None:
            loc, most = self._query_start_loc(query_lens, lens, q)
            packed = dict(query_start_loc=self._store.place_tables(loc, self.k_cache), max_query_len=most)
        call = canonicalize_paged(q, self.k_cache, self.v_cache, self.block_tables(seq_ids),
                                  self.context_lens(seq_ids), scale, window_size, sinks=sinks,
                                  tables_checked_max=max(lens + [0]), **packed)
        return api.attend_paged(call, self.backend)

    @staticmethod
    def _query_start_loc(query_lens, lens, q):
        """``(query_start_loc int32 [n + 1], longest)`` of checked row counts for sequences of
        ``lens`` tokens and a packed ``q``."""
        counts = list(query_lens)
        if len(counts) != len(lens) or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0
                                           for n in counts):
            raise ValueError(f"query_lens must hold one int >= 0 per sequence ({len(lens)}), got {query_lens!r}")
        for i, (n, length) in enumerate(zip(counts, lens)):
            if n > length:
                raise ValueError(f"query_lens[{i}] = {n} but the sequence holds {length} tokens: its query rows "
                                 "are its last positions, so there may be at most that many (append first)")
        total = int(sum(counts))
        rows = shape_tuple(q)
        if len(rows) != 3 or rows[0] != total:
            raise ValueError(f"with query_lens, q must be [sum(query_lens) = {total}, heads_q, head_dim], "
                             f"got shape {rows}")
        loc = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int32)
        return loc, max(counts + [0])

    def gather(self, seq_id):
        """The sequence's keys and values as contiguous NumPy arrays ``[heads_kv, len, head_dim]``
        (for tests and debugging; copies from the device)."""
        table, length = self._tables[self._known(seq_id)], self._lens[seq_id]
        k, v = (self._store.to_host(c) for c in (self.k_cache, self.v_cache))
        idx = np.asarray(table, dtype=np.int64)
        kk = k[idx].reshape(-1, self.heads_kv, self.head_dim)[:length]
        vv = v[idx].reshape(-1, self.heads_kv, self.head_dim)[:length]
        return np.ascontiguousarray(kk.transpose(1, 0, 2)), np.ascontiguousarray(vv.transpose(1, 0, 2))

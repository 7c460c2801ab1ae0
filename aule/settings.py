"""Every `AULE_*` setting of the router, the Vulkan backend and the device checks (and
`TRITON_INTERPRET`), read and checked in one place.

The environment is looked at on each call (tests and benchmarks change it within one process),
but each distinct set of values is parsed once: a repeated call costs one tuple of lookups
(:func:`getenv`, a dictionary lookup each). A malformed value is a ``ValueError`` naming the
variable and what it accepts.
"""
from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass

_VULKAN_VARS = ("AULE_VULKAN_DEVICE", "AULE_VULKAN_STAGING", "AULE_VULKAN_PIPELINE_CACHE",
                "AULE_VULKAN_NO_EGL_RETRY", "AULE_VALIDATION", "AULE_CACHE_DIR", "AULE_VULKAN_COPY_THREADS",
                "AULE_VULKAN_HOST_IMPORT", "AULE_VULKAN_REUSE", "AULE_VULKAN_UPLOAD", "AULE_VULKAN_CHUNK_BYTES",
                "AULE_VULKAN_ASYNC")


_ENCODED: dict = {}


def getenv(name: str) -> str | None:
    """``os.environ.get(name)``, read from the mapping's own store. ``os.environ.get`` encodes the
    name and decodes the value in Python, about a microsecond a variable, and a tiny call reads
    several; ``os.environ`` keeps that store current on every change made through it (``setenv``
    and ``patch.dict`` in tests included), so what is read is the same."""
    env = os.environ
    data = getattr(env, "_data", None)
    if data is None:  # not CPython's os._Environ: its plain get
        return env.get(name)
    key = _ENCODED.get(name)
    if key is None:
        key = _ENCODED[name] = env.encodekey(name)
    raw = data.get(key)
    return None if raw is None else env.decodevalue(raw)


@dataclass(frozen=True)
class VulkanSettings:
    """How the runtime finds and uses the device (read when a context is made, and by the
    pipeline cache). The kernel choice, read on every call, is :class:`KernelChoice`."""

    device: str                 # AULE_VULKAN_DEVICE: index or part of a name; "" picks the best GPU
    staging: bool               # AULE_VULKAN_STAGING=1: stage through host memory even where mapping works
    pipeline_cache: bool        # AULE_VULKAN_PIPELINE_CACHE=0: do not persist the pipeline cache
    egl_retry: bool             # AULE_VULKAN_NO_EGL_RETRY=1: never retry through NVIDIA's EGL entry point
    validation: bool            # AULE_VALIDATION=1: the Khronos validation layer, messages collected
    cache_dir: str | None       # AULE_CACHE_DIR: where the pipeline cache and the EGL manifest live
    copy_threads: int | None    # AULE_VULKAN_COPY_THREADS: threads for host copies (1: the caller's alone;
                                #   unset: chosen from the CPU count)
    host_import: frozenset      # AULE_VULKAN_HOST_IMPORT=1 (or upload, download): DMA straight from/to host
                                #   arrays where the device imports host memory (VK_EXT_external_memory_host)
    reuse: bool                 # AULE_VULKAN_REUSE=0: record every call anew (no re-submitted recordings)
    upload: str                 # AULE_VULKAN_UPLOAD=auto|mapped|staged: how inputs reach device memory the host can map
                                #   (auto: staged where the device has no mapped memory, else measured once)
    chunk_bytes: int            # AULE_VULKAN_CHUNK_BYTES: transfers through staging larger than this are cut into
                                #   chunks whose host copies and DMA overlap (0: one copy each, in the call's submission)
    asynchronous: bool          # AULE_VULKAN_ASYNC=0: calls on GpuTensors wait for their submission before returning


def _flag(raw: str | None) -> bool:
    return (raw or "").strip() not in ("", "0")


#: The largest tile field AULE_VULKAN_TILES takes: no device runs a workgroup wider than this, and
#: far larger values (they become specialization constants) made the CPU driver's compiler run
#: out of memory.
MAX_TILE = 1024


_SHAPE = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def _parse_tiles(raw: str) -> tuple | None:
    text = raw.strip()
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    # The cooperative-matrix variant's form leads with its matrix shape: MxNxK (or "auto", the
    # device's best), then nothing, its 4 tile fields, or those and a 0/1 for the register softmax.
    head = ()
    shape = _SHAPE.match(parts[0].lower())
    if shape or parts[0].lower() == "auto":
        head = (tuple(int(g) for g in shape.groups()) if shape else "auto",)
        parts = parts[1:]
    try:
        values = tuple(int(p) for p in parts)
    except ValueError:
        values = None
    counts = (0, 4, 5) if head else (2, 4)
    if (values is None or len(values) not in counts
            or any(not 0 < v <= MAX_TILE for v in values[:4]) or any(v not in (0, 1) for v in values[4:])
            or (head and head[0] != "auto" and any(not 0 < v <= 64 for v in head[0]))):
        raise ValueError(f"AULE_VULKAN_TILES={raw!r}: expected 2 positive integers (rows,keys for the cpu "
                         "variant), 4 (bm,bn,wg,tc for the tiled variants), or for coopmat a matrix shape "
                         "MxNxK or 'auto' optionally followed by 4 (subgroups,row_tiles,keys,buffers) and a 0/1 "
                         f"(softmax in registers); comma-separated, each at most {MAX_TILE} (matrix sides at "
                         "most 64)")
    return head + values


#: Staged transfers are cut into chunks of this many bytes by default: each chunk is one copy task
#: and one DMA submission, small enough that copies and DMA overlap over most of a call's bytes,
#: large enough that a submission's host cost (tens of microseconds) stays under its DMA time.
DEFAULT_CHUNK_BYTES = 4 << 20
#: Smaller chunks only multiply submissions (tests force a few KiB to cross many boundaries).
MIN_CHUNK_BYTES = 256


@functools.lru_cache(maxsize=64)
def _vulkan(raw: tuple) -> VulkanSettings:
    device, staging, pcache, no_egl, validation, cache_dir, threads, host_import, reuse, upload, chunk, asynchronous = raw
    threads = (threads or "").strip()
    imports = (host_import or "").strip().lower()
    directions = {"": (), "0": (), "1": ("upload", "download"), "all": ("upload", "download"),
                  "upload": ("upload",), "download": ("download",)}
    if imports not in directions:
        raise ValueError(f"AULE_VULKAN_HOST_IMPORT={host_import!r}: expected 0, 1 (or all), upload or download")
    if threads and (not threads.isdigit() or not 1 <= int(threads) <= 256):
        raise ValueError(f"AULE_VULKAN_COPY_THREADS={threads!r}: expected a whole number from 1 to 256 "
                         "(1 copies on the calling thread alone), or unset")
    upload = (upload or "auto").strip().lower()
    if upload not in ("auto", "mapped", "staged"):
        raise ValueError(f"AULE_VULKAN_UPLOAD={upload!r}: expected auto, mapped or staged")
    chunk = (chunk or "").strip()
    if chunk and (not chunk.isdigit() or 0 < int(chunk) < MIN_CHUNK_BYTES):
        raise ValueError(f"AULE_VULKAN_CHUNK_BYTES={chunk!r}: expected 0 (no chunks) or a whole number of bytes "
                         f"of at least {MIN_CHUNK_BYTES}, or unset ({DEFAULT_CHUNK_BYTES})")
    return VulkanSettings(
        device=(device or "").strip(), staging=(staging or "").strip() == "1",
        pipeline_cache=(pcache or "1").strip() != "0", egl_retry=(no_egl or "").strip() != "1",
        validation=_flag(validation), cache_dir=cache_dir or None,
        copy_threads=int(threads) if threads else None, host_import=frozenset(directions[imports]),
        reuse=(reuse or "1").strip() != "0", upload=upload,
        chunk_bytes=int(chunk) if chunk else DEFAULT_CHUNK_BYTES, asynchronous=(asynchronous or "1").strip() != "0")


def vulkan() -> VulkanSettings:
    """The Vulkan settings as the environment holds them now."""
    return _vulkan(tuple(getenv(k) for k in _VULKAN_VARS))


@dataclass(frozen=True)
class KernelChoice:
    variant: str | None  # AULE_VULKAN_VARIANT: force a shader variant (checked by the variant table)
    tiles: tuple | None  # AULE_VULKAN_TILES: (rows, keys) for `cpu`, (bm, bn, wg, tc) for tiled variants,
                         # ((M, N, K) or 'auto', [subgroups, row_tiles, keys, buffers[, registers]]) for coopmat
    tiles_key: str       # the tile override as a cache key ("" when unset)


@functools.lru_cache(maxsize=64)
def _kernel_choice(variant: str | None, tiles: str | None) -> KernelChoice:
    parsed = _parse_tiles(tiles or "")
    key = ",".join("x".join(map(str, t)) if isinstance(t, tuple) else str(t) for t in parsed) if parsed else ""
    return KernelChoice((variant or "").strip() or None, parsed, key)


def kernel_choice() -> KernelChoice:
    """The two settings every Vulkan call consults (forced variant and tiles): the per-call path
    reads these two rather than all of :func:`vulkan`'s nine."""
    return _kernel_choice(getenv("AULE_VULKAN_VARIANT"), getenv("AULE_VULKAN_TILES"))


@dataclass(frozen=True)
class PagedChoice:
    """AULE_VULKAN_PAGED: how Vulkan paged attention is run (benchmarks and tests force each way;
    0 or a missing field leaves that choice automatic)."""

    kernel: str | None   # "tiled" (shared-memory key tiles) or "subgroup" (decode rows in registers)
    lanes: int           # subgroup: lanes sharing one key row (a power of two)
    keys: int            # subgroup: keys each lane group has in flight per step
    invocations: int     # subgroup: workgroup size (a multiple of the subgroup size)
    splits: int          # either: split-K count


_PAGED_KINDS = ("auto", "tiled", "subgroup")


@functools.lru_cache(maxsize=64)
def _paged_choice(raw: str | None) -> PagedChoice:
    parts = [p.strip() for p in (raw or "").split(",")] if (raw or "").strip() else ["auto"]
    kind = parts[0].lower() or "auto"
    try:
        values = tuple(int(p or 0) for p in parts[1:])
    except ValueError:
        values = None
    if kind not in _PAGED_KINDS or values is None or len(values) > 4 or any(not 0 <= v <= MAX_TILE for v in values):
        raise ValueError(f"AULE_VULKAN_PAGED={raw!r}: expected auto, tiled or subgroup, optionally followed by "
                         "lanes,keys,invocations,splits (comma-separated whole numbers, 0 = automatic, each at "
                         f"most {MAX_TILE})")
    lanes, keys, wg, splits = values + (0,) * (4 - len(values))
    if lanes & (lanes - 1):
        raise ValueError(f"AULE_VULKAN_PAGED={raw!r}: lanes per key must be a power of two, got {lanes}")
    return PagedChoice(None if kind == "auto" else kind, lanes, keys, wg, splits)


def paged_choice() -> PagedChoice:
    """The forced way of running Vulkan paged attention, as the environment holds it now."""
    return _paged_choice(getenv("AULE_VULKAN_PAGED"))


def forced_backend() -> str | None:
    """AULE_BACKEND: a backend name the router must use, or None (names are checked by the registry)."""
    return (getenv("AULE_BACKEND") or "").strip() or None


def check_sync() -> bool:
    """AULE_CHECK_SYNC=1: a table error found by a kernel on the device is raised by the call that
    launched it (aule waits for the kernel), not by a later call. For tests and debugging: the wait
    is a host synchronisation, and it cannot happen while a CUDA graph is being captured."""
    return _flag(getenv("AULE_CHECK_SYNC"))


def triton_interpret() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run on CPU tensors through Triton's interpreter."""
    return _truthy(getenv("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=16)
def _truthy(raw: str | None) -> bool:
    return (raw or "0").strip().lower() in ("1", "true", "yes", "on")


@functools.lru_cache(maxsize=16)
def _triton_config(forced: str | None, autotune: str | None) -> int | None:
    forced = (forced or "").strip()
    if forced:
        return int(forced)
    return 0 if (autotune or "1").strip() == "0" else None


def triton_config() -> int | None:
    """None to autotune the Triton kernels; else the index of the configuration to use untimed.

    ``AULE_TRITON_AUTOTUNE=0`` takes the first configuration that fits the shape (tests, and
    workloads whose shapes change too often to amortise tuning); ``AULE_TRITON_CONFIG=i`` takes
    the i-th (benchmarks compile every candidate in parallel processes with it)."""
    return _triton_config(getenv("AULE_TRITON_CONFIG"), getenv("AULE_TRITON_AUTOTUNE"))


def triton_direct() -> bool:
    """AULE_TRITON_DIRECT (NVIDIA; default 1, measured equal to Triton's own path on the H200): a
    Triton launch whose arguments specialise as an earlier launch's did goes straight to that
    launch's compiled kernel, past Triton's per-launch argument binding
    (:func:`aule.backends.triton.ops._launch`), and repeated eager calls take :mod:`aule.fastcall`.
    ``0`` is the escape: every launch through ``JITFunction.run``, every call through the full path."""
    return (getenv("AULE_TRITON_DIRECT") or "1").strip() != "0"


# What routes or configures an eager Triton call (the backend forced, the configuration rule, the
# direct launch, the forms of modified scores, the interpreter): aule.fastcall keys its entries on
# their raw values, so a change of any sends the next call through the full path, which parses them.
# A new setting that changes how an eager dense call is routed or launched belongs here too.
LAUNCH_VARS = ("AULE_BACKEND", "AULE_TRITON_CONFIG", "AULE_TRITON_AUTOTUNE", "AULE_TRITON_DIRECT",
               "AULE_TRITON_TANH", "AULE_TRITON_ALIBI", "AULE_TRITON_HOPPER", "AULE_TRITON_HOPPER_BWD",
               "AULE_CHECK_SYNC", "TRITON_INTERPRET")
_LAUNCH_KEYS = tuple(map(os.environ.encodekey, LAUNCH_VARS)) if hasattr(os.environ, "encodekey") else None


def launch_values() -> tuple:
    """The raw values of :data:`LAUNCH_VARS` as the environment holds them now, undecoded and
    unparsed (equal tuples mean equal settings): one C-level pass over os.environ's own store,
    as :func:`getenv` reads it."""
    return _raw_values(LAUNCH_VARS, _LAUNCH_KEYS)


#: What a Vulkan call on GpuTensors reads of the environment: the forced backend and the kernel
#: choice (:func:`kernel_choice`); the runtime's own settings are read when its context is made.
VULKAN_CALL_VARS = ("AULE_BACKEND", "AULE_VULKAN_VARIANT", "AULE_VULKAN_TILES")
_VULKAN_CALL_KEYS = tuple(map(os.environ.encodekey, VULKAN_CALL_VARS)) if hasattr(os.environ, "encodekey") else None


def vulkan_call_values() -> tuple:
    """The raw values of :data:`VULKAN_CALL_VARS`, as :func:`launch_values` reads its own."""
    return _raw_values(VULKAN_CALL_VARS, _VULKAN_CALL_KEYS)


def _raw_values(names: tuple, keys: tuple | None) -> tuple:
    data = getattr(os.environ, "_data", None)
    if data is None or keys is None:
        return tuple(map(getenv, names))
    return tuple(map(data.get, keys))


def prefer_torch() -> bool:
    """AULE_PREFER_TORCH (default 1): the SDPA drop-in hands a call to torch's own SDPA where the
    speed table (:mod:`aule.speed_table`) measured torch faster for its class on this GPU; 0 keeps
    aule's kernel for every call it can serve (to measure it, or where the table is out of date)."""
    raw = getenv("AULE_PREFER_TORCH")
    text = (raw or "").strip().lower()
    if text in ("", "1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"AULE_PREFER_TORCH={raw!r}: expected 1 (the default: torch serves the classes it was "
                     "measured faster on) or 0 (aule serves every call it can)")


@dataclass(frozen=True)
class TritonScores:
    """How the Triton forward computes modified scores (for timing the variants against each other;
    ``auto`` is what aule chooses). Read on every launch, parsed once per distinct value; the
    backward reads the tanh again, so keep a setting from a forward through its backward."""

    tanh: str   # AULE_TRITON_TANH: auto | exp2 | rcp | approx (the softcap's tanh, see kernels._tanh)
    alibi: str  # AULE_TRITON_ALIBI: auto | split | exact (ALiBi's bias, see kernels.ALIBI_SPLIT)


_TANH_CHOICES = ("auto", "exp2", "rcp", "approx")
_ALIBI_CHOICES = ("auto", "split", "exact")


@functools.lru_cache(maxsize=16)
def _triton_scores(tanh: str | None, alibi: str | None) -> TritonScores:
    t = (tanh or "auto").strip().lower()
    a = (alibi or "auto").strip().lower()
    if t not in _TANH_CHOICES:
        raise ValueError(f"AULE_TRITON_TANH={tanh!r}: expected one of {', '.join(_TANH_CHOICES)} (auto: the "
                         "one-instruction tanh.approx for 16-bit inputs on NVIDIA, rcp for float32 there, "
                         "exp2 elsewhere)")
    if a not in _ALIBI_CHOICES:
        raise ValueError(f"AULE_TRITON_ALIBI={alibi!r}: expected one of {', '.join(_ALIBI_CHOICES)} (split: a "
                         "column bias per key tile with the row term in the row maximum; exact: -slope * |i - j| "
                         "per score; auto: split for 16-bit inputs, exact for float32)")
    return TritonScores(t, a)


def triton_scores() -> TritonScores:
    """AULE_TRITON_TANH and AULE_TRITON_ALIBI as the environment holds them now."""
    return _triton_scores(getenv("AULE_TRITON_TANH"), getenv("AULE_TRITON_ALIBI"))


# The Hopper forward's variants (aule.backends.triton.hopper): TMA descriptors made on the host
# with one program per query tile, the same persistent over the SMs, and descriptors made on the
# device with the key loop warp-specialised (Triton's Hopper pass wants device descriptors), in
# the forms hopper.WS_VARIANTS lists (one loop; the unmasked run alone specialised, the masked
# ones in a second launch; one loop whose bounds are read from a table; one loop whose row
# positions are read through a descriptor).
HOPPER_VARIANTS = ("tma", "persistent", "ws", "ws_two", "ws_table", "ws_rows")


@functools.lru_cache(maxsize=16)
def _triton_hopper(raw: str | None) -> str | None:
    text = (raw or "").strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text in ("0", "off", "no", "false"):
        return None
    if text in HOPPER_VARIANTS:
        return text
    raise ValueError(f"AULE_TRITON_HOPPER={raw!r}: expected auto (the default: the variant measured faster "
                     f"for the call's class, hopper.DEFAULT_ROUTES), 0 (off) or one of "
                     f"{', '.join(HOPPER_VARIANTS)} (the sm_90 forward for 16-bit calls without features)")


def triton_hopper() -> str | None:
    """AULE_TRITON_HOPPER: which Hopper forward variant serves plain 16-bit calls on an sm_90 GPU;
    "auto" (unset, the default) for the one measured right and faster than the general kernel on
    the call's class (hopper.DEFAULT_ROUTES, the general kernel elsewhere), None (0) to keep the
    general forward kernel for all of them."""
    return _triton_hopper(getenv("AULE_TRITON_HOPPER"))


# The Hopper backward's variants (aule.backends.triton.hopper_bwd): dK/dV and dQ in kernels of
# their own (deterministic), dQ added atomically from the dK/dV kernel (not deterministic), or
# the two kernels in one launch (deterministic).
HOPPER_BWD_VARIANTS = ("tma", "atomic", "fused")


@functools.lru_cache(maxsize=16)
def _triton_hopper_bwd(raw: str | None) -> str | None:
    text = (raw or "").strip().lower()
    if text in ("", "auto"):
        return "auto"
    if text in ("0", "off", "no", "false"):
        return None
    if text in ("1", "on", "yes", "true"):
        return HOPPER_BWD_VARIANTS[0]
    if text in HOPPER_BWD_VARIANTS:
        return text
    raise ValueError(f"AULE_TRITON_HOPPER_BWD={raw!r}: expected auto (the default: where measured faster), 0 (off), "
                     f"1 (tma) or one of {', '.join(HOPPER_BWD_VARIANTS)} (the sm_90 backward for 16-bit calls "
                     f"without features; atomic is not deterministic)")


def triton_hopper_bwd() -> str | None:
    """AULE_TRITON_HOPPER_BWD: which Hopper backward variant serves plain 16-bit calls on an sm_90
    GPU; ``"auto"`` (unset) for the variant measured faster for the call's class
    (``hopper_bwd.MEASURED``), None (``0``) to keep the general backward kernels for all of them."""
    return _triton_hopper_bwd(getenv("AULE_TRITON_HOPPER_BWD"))

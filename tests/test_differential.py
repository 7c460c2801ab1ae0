"""Property-based differential test: every backend present against the float64 reference, on
random shapes with tails and hostile values, under the numeric rule every backend follows.

For one query row, over the keys its mask lets it see (scores after ``scale``):

1. no visible key: zeros, LSE -inf;
2. a NaN score: the row is NaN, LSE NaN (a NaN in V reaches the output through P.V, column by column);
3. else a +inf score: the row is NaN, LSE +inf;
4. else all scores -inf (from values): zeros, LSE -inf;
5. else the softmax; LSE natural log, float32.

Rows of cases 1, 4 and 5 are compared with :func:`aule.reference.attention_reference`; rows of cases
2 and 3 are checked by their structure (which rows are NaN, which LSE is NaN or +inf), classified
here from float64 scores, so the test does not lean on the reference's handling of them.

Tolerances. Error is measured per output element relative to the value scale of its column
(``max(1, max |V|)`` over the row's visible keys), because fp16 and fp32 errors are relative.
Scores carry a rounding error ``delta <= head_dim * u32 * scale * sum|q||k|`` (fp32 dot products),
which moves the softmax by up to ``expm1(2 * delta)``: rows with huge scores are ill-conditioned
in any fp32 arithmetic, so their bound grows honestly, and a convex-hull check (every output lies
between the smallest and largest visible V of its column) still holds them. float32 adds 2e-5;
float16 adds twice torch's own fp16 SDPA error on the same inputs (measured per example) plus a
quarter of an fp16 ulp at 1.

Backends: ``numpy`` always, ``vulkan`` when present (lavapipe in CI), ``triton``/``triton-amd``
only where they are available (a CUDA/ROCm device). Triton's CPU interpreter is left out: at the
shapes drawn here it needs seconds per example, and tests/test_triton.py covers it at fixed shapes.
On a CPU Vulkan device the ``cpu`` variant runs 4 rows per lane for head_dims other than 8, 16, 32
and 64, as tests/test_vulkan.py does: the pipelines are shared with that file and lavapipe's JIT
stays within the budget.
"""
from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import dataclass
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import aule
from aule import masks
from aule.reference import attention_reference

from _vulkan_util import vulkan_context
from test_paged_vulkan import _case as paged_case

try:
    import torch
except ImportError:  # the fp16 tolerance then uses fp16's rounding of the output instead
    torch = None

U32 = 2.0 ** -24                      # float32 unit roundoff
F32_BASE = 2e-5                       # float32 output error, per unit of the column's value scale
F16_FLOOR = 2.0 ** -12                # a quarter of an fp16 ulp at 1
LSE_BASE = {"float32": 2e-5, "float16": 1e-3}
HULL_SLACK = {"float32": 2.0 ** -20, "float16": 2.0 ** -10}  # fp16 outputs round by up to half an ulp

VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf, "+1e4": 1e4, "-1e4": -1e4,
          "+65504": 65504.0, "-65504": -65504.0}

# A fixed, derandomized budget (the same examples on every run and backend). The ``present``
# fixture only skips an absent backend, so sharing it across examples is harmless.
BUDGET = settings(max_examples=40, deadline=None, derandomize=True, database=None, print_blob=False,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                         HealthCheck.function_scoped_fixture])
PAGED_BUDGET = settings(BUDGET, max_examples=max(1, BUDGET.max_examples // 2))

TRITON_BUDGET = settings(BUDGET, max_examples=10)

HOST_BACKENDS = ["numpy", "vulkan"]
TRITON_BACKENDS = ["triton", "triton-amd"]
PAGED_BACKENDS = ["numpy", "vulkan"]


def require(backend):
    if backend not in aule.get_available_backends():
        reason = aule.backends.backend_info()[backend]["reason"]
        if backend.startswith("triton"):
            reason += " (Triton's CPU interpreter is too slow for this test's shapes)"
        pytest.skip(f"backend {backend} is not available here: {reason}")


# --- what the rule expects, and the comparison -------------------------------------------------------


def _torch_fp16_error(q, k, v, vis, scale, ok, ref, colscale):
    """Largest error of torch's own fp16 SDPA on these inputs, per unit of value scale, over the
    elements ``ok`` (case-5 rows, finite columns)."""
    if not ok.any():
        return 0.0
    if torch is None:
        return 2.0 ** -11  # the rounding of an fp16 output, per unit of its scale
    group = q.shape[1] // k.shape[1]
    t = [torch.from_numpy(np.ascontiguousarray(x)) for x in (q, np.repeat(k, group, 1), np.repeat(v, group, 1))]
    got = torch.nn.functional.scaled_dot_product_attention(
        *t, attn_mask=torch.from_numpy(vis), scale=scale).double().numpy()
    fine = ok & np.isfinite(got)
    return float((np.abs(got - ref) / colscale)[fine].max()) if fine.any() else 0.0


def check_rule(out, lse, q, k, v, *, causal, window, scale, dtype):
    """Problems (strings) of ``out`` / ``lse`` (None when not returned) under the numeric rule."""
    b, hq, sq, d = q.shape
    sk = k.shape[2]
    group = hq // k.shape[1]
    sc = 1.0 / math.sqrt(d) if scale is None else scale
    left, right = masks.canonical_window(causal, window)
    vis = masks.mask(sq, sk, left, right)
    q64, kx, vx = (np.asarray(x, np.float64) for x in (q, np.repeat(k, group, 1), np.repeat(v, group, 1)))
    with np.errstate(all="ignore"):
        s = np.einsum("bhqd,bhkd->bhqk", q64, kx) * sc
        mag = np.einsum("bhqd,bhkd->bhqk", np.abs(q64), np.abs(kx)) * sc
    nan_row = (np.isnan(s) & vis).any(-1)
    inf_row = ~nan_row & (np.isposinf(s) & vis).any(-1)
    fin = np.isfinite(s) & vis
    normal = ~nan_row & ~inf_row & fin.any(-1)
    empty = ~(nan_row | inf_row | normal)
    delta = d * U32 * np.where(fin, mag, 0.0).max(-1, initial=0.0)
    spread = 2.0 * np.expm1(2.0 * delta)[..., None]

    # Per row and column: the visible V's NaN/inf, scale and range.
    v_nan = np.zeros((b, hq, sq, d), bool)
    v_bad = np.zeros_like(v_nan)
    colscale = np.ones((b, hq, sq, d))
    lo, hi = np.zeros_like(colscale), np.zeros_like(colscale)
    for i in range(sq):
        seen = vx[:, :, vis[i], :]
        if not seen.shape[2]:
            continue
        v_nan[:, :, i] = np.isnan(seen).any(2)
        v_bad[:, :, i] = ~np.isfinite(seen).all(2)
        finite = np.where(np.isfinite(seen), seen, np.nan)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: the scale stays 1
            colscale[:, :, i] = np.fmax(1.0, np.nanmax(np.abs(finite), 2))
            lo[:, :, i], hi[:, :, i] = np.nanmin(finite, 2), np.nanmax(finite, 2)

    ref, ref_lse = attention_reference(q, k, np.where(np.isfinite(v), v, 0), causal=causal, scale=scale,
                                       window_size=window, return_lse=True)
    # A non-finite V at a key hidden from a row may still reach it through P.V (0 * NaN, when the key
    # shares a computed tile with keys the row sees: torch's math and FlashAttention do the same), so
    # such columns are held only to the rules that do not depend on it (zeros for empty rows).
    hidden_bad = (~np.isfinite(vx)).any(2)[:, :, None, :]
    ok = normal[..., None] & ~v_bad & ~hidden_bad
    if dtype == "float16":
        base = 2.0 * _torch_fp16_error(q, k, v, vis, sc, ok, ref, colscale) + F16_FLOOR
    else:
        base = F32_BASE
    tol = colscale * (base + spread)

    got = np.asarray(out, np.float64)
    problems = []

    def flag(what, where, expect):
        idx = np.argwhere(where)
        if len(idx):
            first = tuple(int(x) for x in idx[0])
            problems.append(f"{what} at {len(idx)} place(s), first {first}: got {got[first]!r}, expected "
                            f"{expect(first)}")

    row = lambda m: m[..., None] & np.ones(d, bool)  # noqa: E731  (a row mask over its columns)
    flag("case 2/3 row not NaN (a NaN or +inf score makes the row NaN)", row(nan_row | inf_row) & ~np.isnan(got),
         lambda i: "NaN")
    flag("row with no visible key (or only -inf scores) not zero", row(empty) & (got != 0), lambda i: 0.0)
    flag("NaN in a visible V did not reach the output", normal[..., None] & v_nan & ~np.isnan(got),
         lambda i: "NaN")
    flag("inf in a visible V gave a finite output", normal[..., None] & v_bad & ~v_nan & np.isfinite(got),
         lambda i: "inf or NaN")
    err = np.abs(got - ref)
    flag("error above tolerance", ok & ~(err <= tol),
         lambda i: f"{ref[i]!r} within {tol[i]:.3g} (column scale {colscale[i]:.3g}, delta {delta[i[:3]]:.3g})")
    slack = colscale * HULL_SLACK[dtype]
    flag("output outside the visible V's range", ok & ((got < lo - slack) | (got > hi + slack)),
         lambda i: f"within [{lo[i]!r}, {hi[i]!r}]")
    if lse is not None:
        lg = np.asarray(lse, np.float64)
        with np.errstate(invalid="ignore"):
            lerr = np.abs(lg - ref_lse)
        ltol = delta + 4 * U32 * np.abs(ref_lse) + LSE_BASE[dtype]
        for what, where, expect in (
                ("LSE of a row with a NaN score not NaN", nan_row & ~np.isnan(lg), "NaN"),
                ("LSE of a row with a +inf score not +inf", inf_row & ~np.isposinf(lg), "+inf"),
                ("LSE of a row with no visible key not -inf", empty & ~np.isneginf(lg), "-inf")):
            idx = np.argwhere(where)
            if len(idx):
                first = tuple(int(x) for x in idx[0])
                problems.append(f"{what} at {len(idx)} row(s), first {first}: got {lg[first]!r}, expected {expect}")
        idx = np.argwhere(normal & ~(lerr <= ltol))
        if len(idx):
            first = tuple(int(x) for x in idx[0])
            problems.append(f"LSE error above tolerance at {len(idx)} row(s), first {first}: got {lg[first]!r}, "
                            f"expected {ref_lse[first]!r} within {ltol[first]:.3g}")
    return problems


# --- dense calls -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dense:
    """One dense call, rebuilt from a seed: N(0,1) inputs, then the hostile edits.

    ``hostile``: (tensor, position, value name): that element (position modulo the tensor's size)
    is set to ``VALUES[name]``. ``rows``: (sign, row, column): q[0, 0, row, column] = sign * inf with
    K's column made positive, so that row's every visible score is sign * inf (rule case 4 or 3)."""

    dtype: str
    batch: int
    heads_kv: int
    group: int
    seq_q: int
    seq_k: int
    head_dim: int
    causal: bool
    window: object
    scale: float | None
    return_lse: bool
    seed: int
    amplitude: float = 1.0
    hostile: tuple = ()
    rows: tuple = ()

    def arrays(self):
        rng = np.random.default_rng(self.seed)
        hq = self.heads_kv * self.group
        q = rng.standard_normal((self.batch, hq, self.seq_q, self.head_dim)) * self.amplitude
        k = rng.standard_normal((self.batch, self.heads_kv, self.seq_k, self.head_dim))
        v = rng.standard_normal((self.batch, self.heads_kv, self.seq_k, self.head_dim))
        arrays = {"q": q, "k": k, "v": v}
        for sign, r, c in self.rows:
            if self.seq_q:
                c %= self.head_dim
                k[..., c] = np.abs(k[..., c]) + 0.5
                q[0, 0, r % self.seq_q, c] = math.inf if sign == "+" else -math.inf
        for name, pos, val in self.hostile:
            a = arrays[name]
            if a.size:
                a.reshape(-1)[pos % a.size] = VALUES[val]
        return tuple(x.astype(self.dtype) for x in (q, k, v))


def windows():
    return st.one_of(st.just(-1), st.none(), st.integers(1, 80),
                     st.tuples(st.integers(-1, 80), st.integers(-1, 80)))


def scales():
    return st.one_of(st.none(), st.floats(0.01, 4.0, allow_nan=False, allow_infinity=False))


def hostile(tensors="qkv", max_size=4):
    return st.lists(st.tuples(st.sampled_from(tensors), st.integers(0, 2 ** 20), st.sampled_from(sorted(VALUES))),
                    max_size=max_size).map(tuple)


@st.composite
def dense_calls(draw):
    return Dense(
        dtype=draw(st.sampled_from(["float32", "float16"])),
        batch=draw(st.integers(1, 2)), heads_kv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 4])),
        # A few empty sequences; the api answers them itself, still by the rule.
        seq_q=max(0, draw(st.integers(-2, 70))), seq_k=max(0, draw(st.integers(-2, 70))),
        head_dim=draw(st.sampled_from([16, 8, 32, 64, 33, 16, 32, 64, 40, 80, 128, 256])),
        causal=draw(st.booleans()), window=draw(windows()), scale=draw(scales()),
        return_lse=draw(st.booleans()), seed=draw(st.integers(0, 2 ** 32 - 1)),
        amplitude=draw(st.sampled_from([1.0, 1.0, 8.0])),
        hostile=draw(hostile()),
        rows=draw(st.lists(st.tuples(st.sampled_from("+-"), st.integers(0, 70), st.integers(0, 255)),
                           max_size=2).map(tuple)))


def _host(x):
    return x.detach().cpu().numpy() if torch is not None and isinstance(x, torch.Tensor) else x


def _on(backend, arrays):
    if backend.startswith("triton"):
        return tuple(torch.from_numpy(x).cuda() for x in arrays)
    return arrays


@pytest.fixture
def present(backend):
    require(backend)
    return backend


@contextlib.contextmanager
def served_by(backend, head_dim, problems):
    """Run one example on ``backend``; on Vulkan, any validation-layer message is a problem."""
    if backend != "vulkan":
        yield
        return
    ctx = vulkan_context()
    ctx.take_validation_messages()
    env = {}
    if ctx.info.is_cpu and head_dim not in (8, 16, 32, 64) and "AULE_VULKAN_TILES" not in os.environ:
        env["AULE_VULKAN_TILES"] = "4,4"
    with mock.patch.dict(os.environ, env):
        yield
    problems.extend(f"Vulkan validation: {m}" for m in ctx.take_validation_messages())


def _report(call, backend, problems):
    assert not problems, f"{backend} on {call}:\n  " + "\n  ".join(problems)


# Every case of the rule in one call: NaN in q (row NaN), +inf in K (rows seeing that key: +inf
# scores), a NaN in V (its column), a row of -inf scores (zeros), and causal rows that see nothing.
# Then fp16 at its largest magnitude (q.k must not overflow), a +inf row, a two-sided window, GQA 4.
DENSE_EXAMPLES = (
    Dense("float32", 1, 1, 2, 9, 6, 16, True, -1, None, True, 7,
          hostile=(("q", 5, "nan"), ("k", 70, "+inf"), ("v", 20, "nan")), rows=(("-", 4, 2),)),
    Dense("float16", 2, 1, 4, 33, 50, 64, False, (5, 3), None, True, 11,
          hostile=(("q", 3, "+65504"), ("k", 1000, "-65504"), ("v", 77, "+65504"), ("k", 9, "-1e4")),
          rows=(("+", 20, 7),)),
)


def dense_property(budget):
    """A dense test under ``budget``: generated calls plus DENSE_EXAMPLES."""
    def wrap(fn):
        for call in DENSE_EXAMPLES:
            fn = example(call=call)(fn)
        return budget(given(call=dense_calls())(fn))
    return wrap


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@dense_property(BUDGET)
def test_dense_follows_the_rule(present, call):
    _report(call, present, dense_problems(present, call))


# Each Triton example JIT-compiles its own kernels (seconds apiece on a GPU): a smaller budget.
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@dense_property(TRITON_BUDGET)
def test_dense_follows_the_rule_on_triton(present, call):
    _report(call, present, dense_problems(present, call))


def dense_problems(backend, call):
    q, k, v = call.arrays()
    problems = []
    with served_by(backend, call.head_dim, problems):
        res = aule.flash_attention(*_on(backend, (q, k, v)), causal=call.causal, scale=call.scale,
                                   window_size=call.window, backend=backend, return_lse=call.return_lse)
    out, lse = (res if call.return_lse else (res, None))
    out, lse = _host(out), _host(lse)
    if out.shape != q.shape or out.dtype != q.dtype:
        problems.append(f"output {out.dtype}{list(out.shape)} for q {q.dtype}{list(q.shape)}")
    elif lse is not None and (lse.shape != q.shape[:3] or lse.dtype != np.float32):
        problems.append(f"LSE {lse.dtype}{list(lse.shape)}, expected float32{list(q.shape[:3])}")
    else:
        problems += check_rule(out, lse, q, k, v, causal=call.causal, window=call.window, scale=call.scale,
                               dtype=call.dtype)
    return problems


# --- paged calls -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Paged:
    """A paged call over raw block tables (tests/test_paged.py's cases: shuffled blocks, NaN in every
    slot no sequence uses). ``hostile``: (tensor, position, value name); for K/V the position picks
    a sequence, token, head and column, written to both the cache and the contiguous copy."""

    dtype: str
    lens: tuple
    heads_kv: int
    group: int
    q_len: int
    head_dim: int
    block_size: int
    window: object
    scale: float | None
    seed: int
    hostile: tuple = ()

    def build(self):
        case = paged_case(np.random.default_rng(self.seed), list(self.lens), self.heads_kv * self.group,
                          self.heads_kv, self.head_dim, self.block_size, self.q_len, np.dtype(self.dtype).type,
                          self.window)
        for name, pos, val in self.hostile:
            if name == "q":
                case.q.reshape(-1)[pos % case.q.size] = VALUES[val]
                continue
            b = pos % len(self.lens)
            n = self.lens[b]
            if not n:
                continue
            j, h, c = (pos // 3) % n, (pos // 7) % self.heads_kv, (pos // 11) % self.head_dim
            seqs, cache = (case.ks, case.k_cache) if name == "k" else (case.vs, case.v_cache)
            seqs[b][h, j, c] = VALUES[val]
            cache[case.block_tables[b, j // self.block_size], j % self.block_size, h, c] = VALUES[val]
        return case


@st.composite
def paged_calls(draw):
    return Paged(
        dtype=draw(st.sampled_from(["float32", "float16"])),
        lens=tuple(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))),
        heads_kv=draw(st.integers(1, 2)), group=draw(st.sampled_from([1, 2, 4])), q_len=draw(st.integers(1, 4)),
        head_dim=draw(st.sampled_from([64, 16, 32, 64, 80, 128])), block_size=draw(st.sampled_from([1, 4, 16])),
        window=draw(st.one_of(st.just(-1), st.none(), st.integers(1, 50),
                              st.tuples(st.integers(-1, 50), st.integers(0, 5)))),
        scale=draw(scales()), seed=draw(st.integers(0, 2 ** 32 - 1)), hostile=draw(hostile(max_size=3)))


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@PAGED_BUDGET
@given(call=paged_calls())
# Decode over an empty, a one-token and a three-block sequence; a NaN in q and in a visible V.
@example(call=Paged("float32", (0, 1, 40), 2, 2, 1, 64, 16, -1, None, 5, hostile=(("q", 600, "nan"), ("v", 2, "nan"))))
# Chunked prefill longer than a context (leading rows see nothing), fp16 at its largest magnitude.
@example(call=Paged("float16", (3, 17), 1, 4, 4, 64, 4, 8, None, 6, hostile=(("k", 4, "+65504"), ("q", 1, "-65504"))))
def test_paged_follows_the_rule(present, call):
    _report(call, present, paged_problems(present, call))


def paged_problems(backend, call):
    case = call.build()
    problems = []
    with served_by(backend, call.head_dim, problems):
        out = aule.flash_attention_paged(case.q, case.k_cache, case.v_cache, case.block_tables, case.context_lens,
                                         scale=call.scale, window_size=call.window, backend=backend)
    if out.shape != case.q.shape or out.dtype != case.q.dtype:
        problems.append(f"output {out.dtype}{list(out.shape)} for q {case.q.dtype}{list(case.q.shape)}")
        return problems
    for b in range(len(call.lens)):
        problems += [f"sequence {b}: {p}" for p in check_rule(
            out[b:b + 1], None, case.q[b:b + 1], case.ks[b][None], case.vs[b][None], causal=True,
            window=call.window, scale=call.scale, dtype=call.dtype)]
    return problems


# --- scale, validated in the precision it is used in ---------------------------------------------------


@pytest.mark.parametrize("backend", PAGED_BACKENDS)
@pytest.mark.parametrize("scale", [1e39, 3e38], ids=["float32-inf", "times-log2e-inf"])
def test_scale_not_finite_in_float32_is_refused(present, scale):
    q = np.ones((1, 1, 4, 16), np.float32)
    with pytest.raises(ValueError, match="scale"):
        aule.flash_attention(q, q, q, scale=scale, backend=present)
    cache = np.ones((2, 4, 1, 16), np.float32)
    with pytest.raises(ValueError, match="scale"):
        aule.flash_attention_paged(q[:, :, :1], cache, cache, np.zeros((1, 2), np.int32), np.array([3], np.int32),
                                   scale=scale, backend=present)

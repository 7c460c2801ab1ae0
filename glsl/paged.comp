#version 450
// paged / paged_fp16: attention over vLLM's block-table KV cache, split-K over the context.
//
// mode 0: workgroup (x = batch * heads_kv + kv head, y = row tile, z = split) owns BM stacked rows
//   (row r = query position r / group of query head kv_head * group + r % group: the whole GQA
//   group reads each K/V tile once) and the key tiles of its split. Keys are gathered through the
//   block table one tile at a time; keys outside the context or the window are never loaded.
//   With one split it writes the output; otherwise a normalised partial output and its base-2
//   log-sum-exp.
// mode 1: workgroup (x = batch * heads_q + head, y = query position; packed: x = row of q, y = head)
//   merges the splits of one row.
//
// Rows are the last n positions of their sequence (row position ctx - n + qi), causal among
// themselves: n = q_len rows of q [B, Hq, q_len, D], or packed (vLLM's layout, q [num_tokens, Hq, D])
// n_b = query_start_loc[b + 1] - query_start_loc[b] rows from row query_start_loc[b], the offsets
// checked on the host (n_b <= ctx; the grid is sized for the longest, a row tile past a sequence's
// rows walks no key). The window follows aule/masks.py (keys j >= pos - left), through mask.glsl.
// A split that saw a NaN (or +inf) score writes a NaN (+inf) log-sum-exp, which makes the merged
// row NaN, as one split would.
// Softcap and ALiBi (flags bits 1 and 2) modify every score, each row with its own head's slope and
// its position in the sequence (aule/masks.py). Sinks (bit 3) are one more term of a row's whole
// softmax, so they join once: at the end with one split, else in the merge, never in a partial.
// Every loop but the key-tile loop (and the merge's loops over the splits) runs a number of times
// fixed by the specialization constants and is unrolled: lavapipe ends an invocation after 65535
// loop iterations in total (plans.paged_loop_iterations counts them).
// AULE_SPLIT (paged_split*): the K and V caches are arrays of buffers, each a run of whole blocks.
// AULE_PAGED_SG (paged_sg*): mode 0 for decode-sized row tiles (BM <= plans.PAGED_SG_ROWS), without
//   shared-memory tiles or a barrier per key: BN lanes of a subgroup share one key row, each owning
//   16-byte chunks of it, K and V of KT keys in flight per lane; each lane group keeps its own online
//   softmax over its keys (scores summed across its lanes by subgroup shuffles), and the lane groups
//   are combined once at the end (shuffles within a subgroup, shared memory across subgroups).
//   Every load of K and V is 16 bytes; the per-key cost is registers and shuffles, not shared memory.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifdef AULE_PAGED_SG
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#endif
#ifdef AULE_FP16
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#define ELEM4 f16vec4
#else
#define ELEM4 vec4
#endif
#include "mask.glsl"

layout(constant_id = 0) const uint D = 128;   // head_dim, a multiple of 4
layout(constant_id = 1) const uint BM = 16;   // stacked rows per workgroup
layout(constant_id = 2) const uint BN = 32;   // keys per tile; AULE_PAGED_SG: lanes per key row
layout(constant_id = 3) const uint WG = 128;  // invocations
layout(local_size_x_id = 3) in;

const uint D4 = D / 4;
const uint KP4 = D4 + 1;          // padded K row: score-loop neighbours read different banks
const uint SP = BN + 1;           // padded score row
const uint NA = (BM * D4 + WG - 1) / WG;  // output vec4s per invocation
const uint NS = (BM * BN + WG - 1) / WG;  // (row, key) scores per invocation
const uint NQ = (BM * D4 + WG - 1) / WG;  // Q vec4s each invocation loads
const uint NR = (BM + WG - 1) / WG;       // rows each invocation initialises
const uint NM = (D4 + WG - 1) / WG;       // output vec4s per invocation in the merge

// Mirrored in aule/backends/vulkan/shaders.py (PAGED_PUSH); 4-byte fields only, order matters.
layout(push_constant) uniform PagedParams {
    uint heads_kv;
    uint group;        // heads_q / heads_kv
    uint q_len;
    uint block_size;
    uint max_blocks;   // row stride of the block table
    int left;          // window: keys j >= pos - left; -1 = unbounded
    float scale_log2;  // softmax scale * log2(e)
    uint num_splits;
    uint mode;         // 0 attention, 1 merge splits
    uint packed;       // 1: q and the output are [num_tokens, Hq, D], rows from query_start_loc
    uint batch;        // sequences; packed, query_start_loc follows their lengths in binding 4
    float softcap2;    // softcap * log2(e) where flags bit 1 is set: the cap of base-2 scores
    uint flags;        // bit 1 softcap, bit 2 ALiBi, bit 3 sinks (attn_common.glsl's bits)
    uint slopes_at;    // binding 4: ALiBi slopes [B, Hq] from here, sinks [Hq] from sinks_at
    uint sinks_at;     //   (float32 bits, natural units), after the lengths and offsets
} pc;

// K and V are read as KV_T: ELEM4 for the tiled path; AULE_PAGED_SG reads 16-byte chunks (an fp16
// cache as uvec4 of 8 halves, unpacked in registers; fp32 as vec4), CV vec4s of values each.
#if defined(AULE_PAGED_SG) && defined(AULE_FP16)
#define KV_T uvec4
const uint CV = 2;
vec4 chunk_part(uvec4 x, uint h) {
    return h == 0u ? vec4(unpackHalf2x16(x.x), unpackHalf2x16(x.y)) : vec4(unpackHalf2x16(x.z), unpackHalf2x16(x.w));
}
#else
#define KV_T ELEM4
const uint CV = 1;
vec4 chunk_part(ELEM4 x, uint h) { return vec4(x); }
#endif

layout(std430, binding = 0) readonly buffer QB { ELEM4 q[]; };        // [B, Hq, q_len, D] or [tokens, Hq, D]
#ifdef AULE_SPLIT
// A cache split across device buffers (aule/backends/vulkan/plans.py cache_split): PIECES buffers
// of BLOCKS_PER_PIECE whole blocks each (the last may hold fewer), bound as arrays.
// Constants 4 and 5 are the subgroup path's own where it is compiled (its SG and KT), these follow them.
#ifdef AULE_PAGED_SG
layout(constant_id = 6) const uint PIECES = 2;
layout(constant_id = 7) const uint BLOCKS_PER_PIECE = 1;
#else
layout(constant_id = 4) const uint PIECES = 2;
layout(constant_id = 5) const uint BLOCKS_PER_PIECE = 1;
#endif
layout(std430, binding = 1) readonly buffer KB { KV_T d[]; } kc[PIECES];   // [blocks of the piece, bs, Hkv, D]
layout(std430, binding = 2) readonly buffer VB { KV_T d[]; } vc[PIECES];
#else
layout(std430, binding = 1) readonly buffer KB { KV_T kc[]; };        // [blocks, bs, Hkv, D]
layout(std430, binding = 2) readonly buffer VB { KV_T vc[]; };
#endif
layout(std430, binding = 3) readonly buffer TB { int block_tables[]; };
// context_lens [B], then, packed, query_start_loc [B + 1], then the features' slopes and sinks: one
// upload, within the runtime's bindings.
layout(std430, binding = 4) readonly buffer CB { int context_lens[]; };
layout(std430, binding = 5) buffer OB { ELEM4 o[]; };                 // q's layout
layout(std430, binding = 6) buffer POB { vec4 part_o[]; };            // [rows of o, splits, D]
// Each split's (maximum, sum) in base 2, kept apart rather than as one log-sum-exp: at logits of
// 1e7 and more an fp32 LSE has no bits left for log2(sum), and ties across splits would be weighted
// by split instead of by key.
layout(std430, binding = 7) buffer PLB { vec2 part_ml[]; };           // [rows of o, splits]

#ifndef AULE_PAGED_SG
shared vec4 Qs[BM * D4];
// K/V tiles stay in their storage type: half the footprint for fp16 caches, so more workgroups
// share a multiprocessor.
shared ELEM4 Ks[BN * KP4];
shared ELEM4 Vs[BN * D4];
shared float Ss[BM * SP];     // scores of the tile
shared float Ps[BM * SP];     // their probabilities (a second array: Ss is still read for row maxima)
shared float row_a[BM];       // per-row rescale factor of the tile, then the final l
shared float row_m[2 * BM];   // running row maxima, double-buffered by tile parity
shared uint row_bad[BM];      // 1: the row saw a NaN score (GLSL's max() is undefined for NaN)
shared float row_slope2[BM];  // the row's ALiBi slope in base 2 (read once, used per score)

#endif

float feature(uint at) { return intBitsToFloat(context_lens[at]); }

// Score s2 (base 2) of the row at position pos and key j after softcap, then ALiBi, as masks.py
// orders them; masking comes after: mask.glsl's arithmetic, as attn_common.glsl's modified_score
// applies it, over this shader's push constants.
float paged_score(float s2, int pos, int j, float slope2) {
    if ((pc.flags & 2u) != 0u) s2 = AULE_SOFTCAP2(s2, pc.softcap2);
    if ((pc.flags & 4u) != 0u) s2 = AULE_ALIBI2(s2, slope2, pos, j);
    return s2;
}

// The head's sink in base 2 (its natural-log logit in binding 4).
float sink2_of(uint head) { return feature(pc.sinks_at + head) * LOG2E; }

// The row of q (and of the output, and of the splits' partials) that is row qi of query head
// `head` of sequence b, whose rows start at row `start` of a packed q.
uint q_row(uint b, uint head, int start, uint qi) {
    const uint heads_q = pc.heads_kv * pc.group;
    return pc.packed != 0u ? (uint(start) + qi) * heads_q + head : (b * heads_q + head) * pc.q_len + qi;
}

void merge_splits() {
    const uint row = pc.packed != 0u ? gl_WorkGroupID.x * pc.heads_kv * pc.group + gl_WorkGroupID.y
                                     : gl_WorkGroupID.x * pc.q_len + gl_WorkGroupID.y;
    const uint S = pc.num_splits;
    float m = NEG_INF;
    bool bad = false;   // a split saw a NaN or +inf score
    for (uint s = 0; s < S; ++s) {
        const float x = part_ml[row * S + s].x;
        bad = bad || isnan(x) || x == POS_INF;
        m = max(m, x);
    }
    // The sink joins the merged row as one more term of value 0 (masks._join_sink); a row that saw no
    // key then has total 1 and a zero accumulator: zeros.
    const bool sink = (pc.flags & 8u) != 0u && !bad;
    const uint heads_q = pc.heads_kv * pc.group;
    const float sink2 = sink ? sink2_of(pc.packed != 0u ? gl_WorkGroupID.y : gl_WorkGroupID.x % heads_q) : 0.0;
    if (sink) m = max(m, sink2);
    float m_safe = AULE_SOFTMAX_SHIFT(m);
    const float extra = sink ? exp2(sink2 - m_safe) : 0.0;
    [[unroll]] for (uint a = 0; a < NM; ++a) {
        const uint c = gl_LocalInvocationID.x + a * WG;
        if (c < D4) {
            vec4 acc = vec4(0);
            float total = extra;
            for (uint s = 0; s < S; ++s) {
                const vec2 ml = part_ml[row * S + s];
                float w = ml.y * exp2(ml.x - m_safe);   // 0 for empty splits (l = 0, m = -inf)
                total += w;
                acc += w * part_o[(row * S + s) * D4 + c];
            }
            o[row * D4 + c] = ELEM4(bad ? vec4(AULE_NAN) : (total > 0.0 ? acc / total : vec4(0)));
        }
    }
}

// The row tile of a mode-0 workgroup: its sequence, KV head, rows [r0, r1) of the stacked group and
// the keys [k_lo, k_hi) any of them can see: up to the last row's position (causal), from the first
// row's window edge; none for a tile past the sequence's rows.
struct RowTile {
    uint b, hk;
    int ctx, start, ql, r0, r1, k_lo, k_hi;
};

RowTile row_tile() {
    RowTile w;
    w.b = gl_WorkGroupID.x / pc.heads_kv;
    w.hk = gl_WorkGroupID.x % pc.heads_kv;
    w.ctx = context_lens[w.b];
    w.start = pc.packed != 0u ? context_lens[pc.batch + w.b] : 0;
    w.ql = pc.packed != 0u ? context_lens[pc.batch + w.b + 1u] - w.start : int(pc.q_len);
    const int rows_total = int(pc.group) * w.ql;
    w.r0 = int(gl_WorkGroupID.y * BM);
    w.r1 = min(w.r0 + int(BM), rows_total);
    const int first_pos = w.ctx - w.ql + w.r0 / int(pc.group);
    const int last_pos = w.ctx - w.ql + (max(w.r1, w.r0 + 1) - 1) / int(pc.group);
    w.k_hi = w.r1 <= w.r0 ? 0 : max(min(w.ctx, last_pos + 1), 0);
    w.k_lo = pc.left < 0 ? 0 : max(first_pos - pc.left, 0);
    return w;
}

// Query position of stacked row r of the tile, and its head.
int row_pos(RowTile w, uint r) { return w.ctx - w.ql + (w.r0 + int(r)) / int(pc.group); }
uint row_head(RowTile w, uint r) { return w.hk * pc.group + uint(w.r0 + int(r)) % pc.group; }

// The row's ALiBi slope in base 2 (0 without ALiBi or past the tile's rows).
float row_slope2_of(RowTile w, uint r) {
    return (pc.flags & 4u) != 0u && w.r0 + int(r) < w.r1
        ? feature(pc.slopes_at + w.b * pc.heads_kv * pc.group + row_head(w, r)) * LOG2E : 0.0;
}

// Columns [4c, 4c + 4) of stacked row r, finished from its accumulator and its (m, l, bad) in base 2:
// the output with one split, else this split's normalised share and its (m, l).
void write_row(RowTile w, uint split, uint r, uint c, vec4 acc, float m, float l, bool bad) {
    const int row = w.r0 + int(r);
    if (row >= w.r1) return;
    const uint head = row_head(w, r);
    const uint orow = q_row(w.b, head, w.start, uint(row) / pc.group);
    // One split: the sink joins here (factor a on the accumulator; 0 for a row that saw no key,
    // which AULE_ROW_OUT then writes as exact zeros). NaN and +inf rows keep their rule.
    float a_sink = 1.0;
    if (pc.num_splits == 1u && (pc.flags & 8u) != 0u && !bad && m != POS_INF) {
        const float sink2 = sink2_of(head);
        AULE_JOIN_SINK(m, l, sink2, a_sink)
    }
    // aule's numeric rule (mask.glsl) on the row, or on this split's share of it.
    const vec4 out_v = AULE_ROW_OUT(vec4, acc, a_sink * AULE_ROW_INV(m, l, bad));
    if (pc.num_splits == 1u) {
        o[orow * D4 + c] = ELEM4(out_v);
    } else {
        const uint prow = orow * pc.num_splits + split;
        part_o[prow * D4 + c] = out_v;
        // The rule's LSE says whether the split is NaN (NaN), +inf or empty (-inf); a finite one is
        // carried as (m, l).
        if (c == 0u) {
            const float lse2 = AULE_ROW_LSE2(m, l, bad);
            part_ml[prow] = isinf(lse2) || isnan(lse2) ? vec2(lse2, lse2 == NEG_INF ? 0.0 : 1.0) : vec2(m, l);
        }
    }
}

#ifndef AULE_PAGED_SG
// The next key tile, fetched into registers while the current one is computed. The loads are
// unconditional (keys outside the tile's range read slot 0 and are zeroed when stored), so none sits
// under a branch and the compiler can issue all of a tile's loads before any result is needed.
const uint NL = (BN * D4 + WG - 1) / WG;  // K (and V) vec4s each invocation fetches per tile
ELEM4 k_next[NL];
ELEM4 v_next[NL];

bool key_in_tile(int t, uint i, int k_lo, int k_hi) {
    const int j = t * int(BN) + int(i / D4);
    return i < BN * D4 && j >= k_lo && j < k_hi;
}

void fetch_tile(int t, uint b, uint hk, int k_lo, int k_hi) {
    const uint row_stride = pc.heads_kv * D4;   // vec4s between consecutive slots of a block
    [[unroll]] for (uint a = 0; a < NL; ++a) {
        const uint i = gl_LocalInvocationID.x + a * WG;
        const bool ok = key_in_tile(t, i, k_lo, k_hi);
        const uint j = uint(t * int(BN)) + i / D4;
        const uint blk = uint(block_tables[ok ? b * pc.max_blocks + j / pc.block_size : 0u]);
#ifdef AULE_SPLIT
        // The invocations of one tile read different blocks, so different pieces: the index is not
        // uniform, and lavapipe (like other Vulkan 1.2 devices) lacks non-uniform indexing of buffer
        // arrays. Each piece is read under its own branch, where the index is the (uniform,
        // unrolled) loop counter; a key outside the range reads slot 0 of piece 0, as unsplit.
        const uint piece = ok ? blk / BLOCKS_PER_PIECE : 0u;
        const uint at = ok ? ((blk - piece * BLOCKS_PER_PIECE) * pc.block_size + j % pc.block_size) * row_stride
                             + hk * D4 + i % D4 : 0u;
        k_next[a] = ELEM4(0);
        v_next[a] = ELEM4(0);
        [[unroll]] for (uint p = 0; p < PIECES; ++p) {
            if (piece == p) {
                k_next[a] = kc[p].d[at];
                v_next[a] = vc[p].d[at];
            }
        }
#else
        const uint at = ok ? (blk * pc.block_size + j % pc.block_size) * row_stride + hk * D4 + i % D4 : 0u;
        k_next[a] = kc[at];
        v_next[a] = vc[at];
#endif
    }
}

void attend_tiles() {
    const uint tid = gl_LocalInvocationID.x;
    const RowTile w = row_tile();
    const uint b = w.b, hk = w.hk, split = gl_WorkGroupID.z;
    const int ctx = w.ctx, start = w.start, ql = w.ql, r0 = w.r0, r1 = w.r1, k_lo = w.k_lo, k_hi = w.k_hi;
    const int t_lo = k_lo / int(BN);
    const int t_hi = max((k_hi + int(BN) - 1) / int(BN), t_lo);
    const int per = (t_hi - t_lo + int(pc.num_splits) - 1) / int(pc.num_splits);
    const int t_start = t_lo + int(split) * per;
    const int t_end = min(t_start + per, t_hi);

    // Q in fp32 (a half cache's q too), unscaled: the fp32 score is scaled, as in the attention
    // shaders (attn_common.glsl's SCORE); rows past the group stay zero.
    [[unroll]] for (uint a = 0; a < NQ; ++a) {
        const uint i = tid + a * WG;
        if (i < BM * D4) {
            uint r = i / D4, c = i % D4;
            int row = r0 + int(r);
            vec4 x = vec4(0);
            if (row < r1) x = vec4(q[q_row(b, row_head(w, r), start, uint(row) / pc.group) * D4 + c]);
            Qs[i] = x;
        }
    }
    vec4 acc[NA];
    [[unroll]] for (uint a = 0; a < NA; ++a) acc[a] = vec4(0);
    // Each invocation owns NS (row, key) slots of every tile: its score, and its share of the row's
    // sum l (rescaled with the row, summed over the row's slots once at the end).
    float s_own[NS];
    float l_own[NS];
    [[unroll]] for (uint k = 0; k < NS; ++k) l_own[k] = 0.0;
    [[unroll]] for (uint a = 0; a < NR; ++a) {
        const uint r = tid + a * WG;
        if (r < BM) {
            row_m[r] = NEG_INF;
            row_bad[r] = 0u;
            row_slope2[r] = row_slope2_of(w, r);
        }
    }

    if (t_start < t_end) fetch_tile(t_start, b, hk, k_lo, k_hi);
    for (int t = t_start; t < t_end; ++t) {
        const int k0 = t * int(BN);
        const uint cur = uint(t - t_start) & 1u, nxt = cur ^ 1u;
        barrier();   // the previous tile is no longer read
        [[unroll]] for (uint a = 0; a < NL; ++a) {
            const uint i = tid + a * WG;
            // Zeros, not whatever slot 0 holds, for keys outside the range: a NaN would survive p = 0.
            const bool ok = key_in_tile(t, i, k_lo, k_hi);
            if (i < BN * D4) {
                Ks[(i / D4) * KP4 + i % D4] = ok ? k_next[a] : ELEM4(0);
                Vs[i] = ok ? v_next[a] : ELEM4(0);
            }
        }
        barrier();
        if (t + 1 < t_end) fetch_tile(t + 1, b, hk, k_lo, k_hi);
        [[unroll]] for (uint k = 0; k < NS; ++k) {
            const uint i = tid + k * WG;
            if (i < BM * BN) {
                uint r = i / BN, n = i % BN;
                float s = 0.0;
                [[unroll]] for (uint c = 0; c < D4; ++c) s += dot(Qs[r * D4 + c], vec4(Ks[n * KP4 + c]));
                int j = k0 + int(n);
                int pos = row_pos(w, r);
                // Causal among the rows (right = 0) over the context's keys; that also keeps the key
                // inside [k_lo, k_hi), the tile range this workgroup loaded.
                bool ok = AULE_VISIBLE(pos, j, ctx, pc.left, 0);
                s_own[k] = ok ? paged_score(s * pc.scale_log2, pos, j, row_slope2[r]) : NEG_INF;
                Ss[r * SP + n] = s_own[k];
                if (isnan(s_own[k])) row_bad[r] = 1u;   // every writer stores the same value
            }
        }
        barrier();
        // Online softmax, every slot at once: each reads its row's scores for the maximum.
        [[unroll]] for (uint k = 0; k < NS; ++k) {
            const uint i = tid + k * WG;
            if (i < BM * BN) {
                uint r = i / BN, n = i % BN;
                float mx = NEG_INF;
                [[unroll]] for (uint c = 0; c < BN; ++c) mx = max(mx, Ss[r * SP + c]);
                float m_old = row_m[cur * BM + r];
                float m_new = max(m_old, mx);
                float m_safe = AULE_SOFTMAX_SHIFT(m_new);
                float alpha = exp2(m_old - m_safe);
                float p = exp2(s_own[k] - m_safe);
                Ps[r * SP + n] = p;
                l_own[k] = l_own[k] * alpha + p;
                if (n == 0u) {
                    row_a[r] = alpha;
                    row_m[nxt * BM + r] = m_new;
                }
            }
        }
        barrier();
        [[unroll]] for (uint a = 0; a < NA; ++a) {
            uint i = tid + a * WG;
            if (i < BM * D4) {
                uint r = i / D4, c = i % D4;
                vec4 x = acc[a] * row_a[r];
                [[unroll]] for (uint n = 0; n < BN; ++n) x += Ps[r * SP + n] * vec4(Vs[n * D4 + c]);
                acc[a] = x;
            }
        }
    }

    // Row sums from the slots' shares; the final maxima sit in the buffer the last tile wrote.
    const uint fin = uint(max(t_end - t_start, 0)) & 1u;
    barrier();
    [[unroll]] for (uint k = 0; k < NS; ++k) {
        const uint i = tid + k * WG;
        if (i < BM * BN) Ps[(i / BN) * SP + i % BN] = l_own[k];
    }
    barrier();
    if (tid < BM) {
        float l = 0.0;
        [[unroll]] for (uint n = 0; n < BN; ++n) l += Ps[tid * SP + n];
        row_a[tid] = l;
    }
    barrier();
    // No `continue` here: a loop with one might not be unrolled, and after a long key loop it would
    // be cut short.
    [[unroll]] for (uint a = 0; a < NA; ++a) {
        const uint i = tid + a * WG;
        const uint r = i / D4;
        if (i < BM * D4) write_row(w, split, r, i % D4, acc[a], row_m[fin * BM + r], row_a[r], row_bad[r] != 0u);
    }
}
#else  // AULE_PAGED_SG

layout(constant_id = 4) const uint SG = 32;   // the device's subgroup size (plans: info.subgroup_size)
layout(constant_id = 5) const uint KT = 4;    // keys each lane group has in flight per step
const uint LPK = BN;                          // lanes sharing one key row, a power of two <= SG
const uint C = D4 / CV;                       // 16-byte chunks of a K or V row
const uint CPL = (C + LPK - 1) / LPK;         // chunks each lane owns (lane + i * LPK)
const uint AV = CPL * CV;                     // vec4s of a row each lane holds
const uint NSG = WG / SG;                     // subgroups of the workgroup
const uint KPS = SG / LPK;                    // key rows one subgroup reads at once
const uint U = WG / LPK;                      // lane groups of the workgroup

// Each subgroup's combined lane groups: accumulators and (m, l) per row.
shared vec4 Cacc[NSG * BM * D4];
shared vec2 Cml[NSG * BM];

// Chunks (lane + i * LPK) of key j's K and V rows, zeros where !ok or past the row.
void load_key(bool ok, RowTile w, int j, uint lane, out KV_T kr[CPL], out KV_T vr[CPL]) {
    const uint blk = uint(block_tables[ok ? w.b * pc.max_blocks + uint(j) / pc.block_size : 0u]);
    const uint slot = ok ? uint(j) % pc.block_size : 0u;
#ifdef AULE_SPLIT
    // A key's piece is uniform across its lane group only: each piece is read under its own branch,
    // where the array index is the unrolled loop counter (see fetch_tile).
    const uint piece = ok ? blk / BLOCKS_PER_PIECE : 0u;
    const uint base = (((ok ? blk - piece * BLOCKS_PER_PIECE : 0u) * pc.block_size + slot) * pc.heads_kv + w.hk) * C;
#else
    const uint base = ((blk * pc.block_size + slot) * pc.heads_kv + w.hk) * C;
#endif
    [[unroll]] for (uint i = 0; i < CPL; ++i) {
        const uint c = lane + i * LPK;
        const bool cok = ok && (C % LPK == 0u || c < C);   // a constant where the chunks divide evenly
        const uint at = cok ? base + c : 0u;
#ifdef AULE_SPLIT
        KV_T k = KV_T(0), v = KV_T(0);
        [[unroll]] for (uint p = 0; p < PIECES; ++p) {
            if (piece == p) {
                k = kc[p].d[at];
                v = vc[p].d[at];
            }
        }
#else
        const KV_T k = kc[at], v = vc[at];
#endif
        // Zeros, not whatever slot 0 holds, outside the range: a NaN would survive p = 0.
        kr[i] = cok ? k : KV_T(0);
        vr[i] = cok ? v : KV_T(0);
    }
}

// (m, l, acc) of two parts of a row merged into the first, base 2. A part that saw no key
// has m = -inf and weight 0.
void combine(inout float m, inout float l, inout vec4 acc[AV], float m2, float l2, vec4 acc2[AV]) {
    const float mn = max(m, m2);
    const float sh = AULE_SOFTMAX_SHIFT(mn);
    const float a = exp2(m - sh), a2 = exp2(m2 - sh);
    l = l * a + l2 * a2;
    [[unroll]] for (uint h = 0; h < AV; ++h) acc[h] = acc[h] * a + acc2[h] * a2;
    m = mn;
}

// One step of the key loop: KT keys of each lane group from `base`. `full` (a constant at each call,
// folded once the driver inlines the function): every key of the step is in the split's range and
// visible from every row, so no key's range, visibility or zeroing is checked. A NaN score needs no
// check of its own: it makes p, and so l, NaN, which the end reads as the row's `bad`.
void key_step(const bool full, int base, int ke, RowTile w, uint u, uint lane, vec4 qv[BM][AV], float slope2[BM],
              int pos[BM], bool live[BM], inout float m[BM], inout float l[BM], inout vec4 acc[BM][AV]) {
    KV_T kr[KT][CPL], vr[KT][CPL];
    int j[KT];
    [[unroll]] for (uint t = 0; t < KT; ++t) {
        j[t] = base + int(t * U + u);
        load_key(full || j[t] < ke, w, j[t], lane, kr[t], vr[t]);
    }
    float s[KT][BM];
    [[unroll]] for (uint t = 0; t < KT; ++t) {
        // Each K value converted once, then used by every row.
        vec4 kf[AV];
        [[unroll]] for (uint i = 0; i < CPL; ++i)
            [[unroll]] for (uint h = 0; h < CV; ++h) kf[i * CV + h] = chunk_part(kr[t][i], h);
        [[unroll]] for (uint r = 0; r < BM; ++r) {
            float x = 0.0;
            [[unroll]] for (uint h = 0; h < AV; ++h) x += dot(qv[r][h], kf[h]);
            // Literal trip counts (bits 1 .. 32): a loop counted by a shift is not unrolled by every
            // driver, and lavapipe would count its passes against the loop limit on every key.
            [[unroll]] for (uint e = 0; e < 6; ++e) {
                if ((1u << e) < LPK) x += subgroupShuffleXor(x, 1u << e);
            }
            // Causal among the rows (right = 0) over the context's keys; keys past the split's range
            // (j >= ke) are hidden too. Rows past the tile's are never written.
            const bool ok = full || (live[r] && j[t] < ke && AULE_VISIBLE(pos[r], j[t], w.ctx, pc.left, 0));
            s[t][r] = ok ? paged_score(x * pc.scale_log2, pos[r], j[t], slope2[r]) : NEG_INF;
        }
    }
    // The step's probabilities (s becomes p) and each row's rescale.
    [[unroll]] for (uint r = 0; r < BM; ++r) {
        float mx = NEG_INF;
        [[unroll]] for (uint t = 0; t < KT; ++t) mx = max(mx, s[t][r]);
        const float mn = max(m[r], mx);
        const float sh = AULE_SOFTMAX_SHIFT(mn);
        const float a = exp2(m[r] - sh);
        l[r] *= a;
        [[unroll]] for (uint h = 0; h < AV; ++h) acc[r][h] *= a;
        [[unroll]] for (uint t = 0; t < KT; ++t) {
            s[t][r] = exp2(s[t][r] - sh);
            l[r] += s[t][r];
        }
        m[r] = mn;
    }
    [[unroll]] for (uint t = 0; t < KT; ++t) {
        vec4 vf[AV];   // each V value converted once, then used by every row
        [[unroll]] for (uint i = 0; i < CPL; ++i)
            [[unroll]] for (uint h = 0; h < CV; ++h) vf[i * CV + h] = chunk_part(vr[t][i], h);
        [[unroll]] for (uint r = 0; r < BM; ++r)
            [[unroll]] for (uint h = 0; h < AV; ++h) acc[r][h] += s[t][r] * vf[h];
    }
}

void attend_subgroups() {
    const RowTile w = row_tile();
    const uint split = gl_WorkGroupID.z;
    const uint lane = gl_SubgroupInvocationID % LPK;
    const uint slot_in_sg = gl_SubgroupInvocationID / LPK;
    const uint u = gl_SubgroupID * KPS + slot_in_sg;
    // The split's keys: an even share of the tile's range.
    const int n = max(w.k_hi - w.k_lo, 0);
    const int per = (n + int(pc.num_splits) - 1) / int(pc.num_splits);
    const int ks = w.k_lo + int(split) * per;
    const int ke = min(ks + per, w.k_hi);

    // The lane's chunks of each row of q in fp32, unscaled (as the tiled path); zeros past the rows.
    vec4 qv[BM][AV];
    float slope2[BM];
    int pos[BM];
    bool live[BM];
    [[unroll]] for (uint r = 0; r < BM; ++r) {
        live[r] = w.r0 + int(r) < w.r1;
        pos[r] = row_pos(w, r);
        slope2[r] = row_slope2_of(w, r);
        const uint qbase = live[r] ? q_row(w.b, row_head(w, r), w.start, uint(w.r0 + int(r)) / pc.group) * D4 : 0u;
        [[unroll]] for (uint i = 0; i < CPL; ++i) {
            const uint c = lane + i * LPK;
            [[unroll]] for (uint h = 0; h < CV; ++h)
                qv[r][i * CV + h] = live[r] && c < C ? vec4(q[qbase + c * CV + h]) : vec4(0);
        }
    }
    // The lane group's own online softmax over its keys: every lane of the group holds the same
    // (m, l) and its chunks of the accumulators.
    float m[BM], l[BM];
    vec4 acc[BM][AV];
    [[unroll]] for (uint r = 0; r < BM; ++r) {
        m[r] = NEG_INF;
        l[r] = 0.0;
        [[unroll]] for (uint h = 0; h < AV; ++h) acc[r][h] = vec4(0);
    }

    // ks, ke are uniform: every lane of a subgroup runs the same steps, so the shuffles see them all.
    // A step is full where all its keys lie in the split and every row of the tile sees them: below
    // the first row's position (causal) and inside the last row's window.
    const int first_pos = pos[0], last_pos = row_pos(w, uint(max(w.r1 - w.r0, 1) - 1));
    for (int base = ks; base < ke; base += int(U * KT)) {
        const int top = base + int(U * KT);
        if (top <= ke && top - 1 <= first_pos && (pc.left < 0 || base >= last_pos - pc.left)) {
            key_step(true, base, ke, w, u, lane, qv, slope2, pos, live, m, l, acc);
        } else {
            key_step(false, base, ke, w, u, lane, qv, slope2, pos, live, m, l, acc);
        }
    }

    // The subgroup's lane groups into its first (butterfly over the lane bits above LPK).
    [[unroll]] for (uint e = 0; e < 7; ++e) {
        const uint bit = 1u << e;
        if (bit >= LPK && bit < SG) {
            [[unroll]] for (uint r = 0; r < BM; ++r) {
                vec4 acc2[AV];
                [[unroll]] for (uint h = 0; h < AV; ++h) acc2[h] = subgroupShuffleXor(acc[r][h], bit);
                const float m2 = subgroupShuffleXor(m[r], bit), l2 = subgroupShuffleXor(l[r], bit);
                combine(m[r], l[r], acc[r], m2, l2, acc2);
            }
        }
    }
    if (slot_in_sg == 0u) {
        [[unroll]] for (uint r = 0; r < BM; ++r) {
            const uint at = gl_SubgroupID * BM + r;
            [[unroll]] for (uint i = 0; i < CPL; ++i) {
                const uint c = lane + i * LPK;
                if (c < C) {
                    [[unroll]] for (uint h = 0; h < CV; ++h) Cacc[at * D4 + c * CV + h] = acc[r][i * CV + h];
                }
            }
            if (lane == 0u) Cml[at] = vec2(m[r], l[r]);
        }
    }
    barrier();
    // The subgroups' parts of each row, combined per output vec4.
    [[unroll]] for (uint a = 0; a < NA; ++a) {
        const uint i = gl_LocalInvocationID.x + a * WG;
        if (i < BM * D4) {
            const uint r = i / D4, c = i % D4;
            float mt = NEG_INF;
            [[unroll]] for (uint g = 0; g < NSG; ++g) mt = max(mt, Cml[g * BM + r].x);
            const float sh = AULE_SOFTMAX_SHIFT(mt);
            float lt = 0.0;
            vec4 at = vec4(0);
            [[unroll]] for (uint g = 0; g < NSG; ++g) {
                const vec2 ml = Cml[g * BM + r];
                const float a2 = exp2(ml.x - sh);
                lt += ml.y * a2;
                at += Cacc[(g * BM + r) * D4 + c] * a2;
            }
            // A NaN score made its lane group's l NaN, and so this sum (a +inf one too: inf - inf);
            // the rule gives both rows NaN, and the merge reads either partial as NaN.
            write_row(w, split, r, c, at, mt, lt, isnan(lt));
        }
    }
}
#endif  // AULE_PAGED_SG

void main() {
    if (pc.mode == 1u) {
        merge_splits();
        return;
    }
#ifdef AULE_PAGED_SG
    attend_subgroups();
#else
    attend_tiles();
#endif
}

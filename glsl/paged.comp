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
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
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
layout(constant_id = 2) const uint BN = 32;   // keys per tile
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

layout(std430, binding = 0) readonly buffer QB { ELEM4 q[]; };        // [B, Hq, q_len, D] or [tokens, Hq, D]
#ifdef AULE_SPLIT
// A cache split across device buffers (aule/backends/vulkan/plans.py cache_split): PIECES buffers
// of BLOCKS_PER_PIECE whole blocks each (the last may hold fewer), bound as arrays.
layout(constant_id = 4) const uint PIECES = 2;
layout(constant_id = 5) const uint BLOCKS_PER_PIECE = 1;
layout(std430, binding = 1) readonly buffer KB { ELEM4 d[]; } kc[PIECES];   // [blocks of the piece, bs, Hkv, D]
layout(std430, binding = 2) readonly buffer VB { ELEM4 d[]; } vc[PIECES];
#else
layout(std430, binding = 1) readonly buffer KB { ELEM4 kc[]; };       // [blocks, bs, Hkv, D]
layout(std430, binding = 2) readonly buffer VB { ELEM4 vc[]; };
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

void main() {
    if (pc.mode == 1u) {
        merge_splits();
        return;
    }
    const uint tid = gl_LocalInvocationID.x;
    const uint b = gl_WorkGroupID.x / pc.heads_kv;
    const uint hk = gl_WorkGroupID.x % pc.heads_kv;
    const uint split = gl_WorkGroupID.z;
    const int ctx = context_lens[b];
    const int start = pc.packed != 0u ? context_lens[pc.batch + b] : 0;
    const int ql = pc.packed != 0u ? context_lens[pc.batch + b + 1u] - start : int(pc.q_len);
    const int rows_total = int(pc.group) * ql;
    const int r0 = int(gl_WorkGroupID.y * BM);
    const int r1 = min(r0 + int(BM), rows_total);

    // Keys any row of the tile can see: up to the last row's position (causal), from the first
    // row's window edge; none for a tile past the sequence's rows.
    const int first_pos = ctx - ql + r0 / int(pc.group);
    const int last_pos = ctx - ql + (max(r1, r0 + 1) - 1) / int(pc.group);
    const int k_hi = r1 <= r0 ? 0 : max(min(ctx, last_pos + 1), 0);
    const int k_lo = pc.left < 0 ? 0 : max(first_pos - pc.left, 0);
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
            if (row < r1) {
                uint qi = uint(row) / pc.group, head = hk * pc.group + uint(row) % pc.group;
                x = vec4(q[q_row(b, head, start, qi) * D4 + c]);
            }
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
            const int row = r0 + int(r);
            const uint head = hk * pc.group + uint(row) % pc.group;
            row_slope2[r] = (pc.flags & 4u) != 0u && row < r1
                ? feature(pc.slopes_at + b * pc.heads_kv * pc.group + head) * LOG2E : 0.0;
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
                int pos = ctx - ql + (r0 + int(r)) / int(pc.group);
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
        uint i = tid + a * WG;
        uint r = i / D4, c = i % D4;
        int row = r0 + int(r);
        if (i < BM * D4 && row < r1) {
            uint qi = uint(row) / pc.group, head = hk * pc.group + uint(row) % pc.group;
            uint orow = q_row(b, head, start, qi);
            // aule's numeric rule (mask.glsl) on the row, or on this split's share of it.
            float l = row_a[r], m = row_m[fin * BM + r];
            const bool bad = row_bad[r] != 0u;
            // One split: the sink joins here (factor a on the accumulator; 0 for a row that saw no key,
            // which AULE_ROW_OUT then writes as exact zeros). NaN and +inf rows keep their rule.
            float a_sink = 1.0;
            if (pc.num_splits == 1u && (pc.flags & 8u) != 0u && !bad && m != POS_INF) {
                const float sink2 = sink2_of(head);
                AULE_JOIN_SINK(m, l, sink2, a_sink)
            }
            vec4 out_v = AULE_ROW_OUT(vec4, acc[a], a_sink * AULE_ROW_INV(m, l, bad));
            if (pc.num_splits == 1u) {
                o[orow * D4 + c] = ELEM4(out_v);
            } else {
                uint prow = orow * pc.num_splits + split;
                part_o[prow * D4 + c] = out_v;
                // The rule's LSE says whether the split is NaN (NaN), +inf or empty (-inf); a finite
                // one is carried as (m, l).
                if (c == 0u) {
                    const float lse2 = AULE_ROW_LSE2(m, l, bad);
                    part_ml[prow] = isinf(lse2) || isnan(lse2) ? vec2(lse2, lse2 == NEG_INF ? 0.0 : 1.0) : vec2(m, l);
                }
            }
        }
    }
}

#version 450
// paged / paged_fp16: attention over vLLM's block-table KV cache, split-K over the context.
//
// mode 0: workgroup (x = batch * heads_kv + kv head, y = row tile, z = split) owns BM stacked rows
//   (row r = query position r / group of query head kv_head * group + r % group: the whole GQA
//   group reads each K/V tile once) and the key tiles of its split. Keys are gathered through the
//   block table one tile at a time; keys outside the context or the window are never loaded.
//   With one split it writes the output; otherwise a normalised partial output and its base-2
//   log-sum-exp.
// mode 1: workgroup (x = batch * heads_q + head, y = query position) merges the splits of one row.
//
// Rows are the last q_len positions of their sequence (row position ctx - q_len + qi), causal
// among themselves; the window follows aule/masks.py (keys j >= pos - left).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#ifdef AULE_FP16
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#define ELEM4 f16vec4
#else
#define ELEM4 vec4
#endif

layout(constant_id = 0) const uint D = 128;   // head_dim, a multiple of 4
layout(constant_id = 1) const uint BM = 16;   // stacked rows per workgroup
layout(constant_id = 2) const uint BN = 32;   // keys per tile
layout(constant_id = 3) const uint WG = 128;  // invocations
layout(local_size_x_id = 3) in;

const uint D4 = D / 4;
const uint KP4 = D4 + 1;          // padded K row: score-loop neighbours read different banks
const uint SP = BN + 1;           // padded score row
const uint NA = (BM * D4 + WG - 1) / WG;  // output vec4s per invocation
const uint NO_KEY = 0xFFFFFFFFu;
const float NEG_INF = -1.0 / 0.0;

// Mirrored in aule/backends/vulkan/paged.py (PAGED_PUSH); 4-byte fields only, order matters.
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
} pc;

layout(std430, binding = 0) readonly buffer QB { ELEM4 q[]; };        // [B, Hq, q_len, D]
layout(std430, binding = 1) readonly buffer KB { ELEM4 kc[]; };       // [blocks, bs, Hkv, D]
layout(std430, binding = 2) readonly buffer VB { ELEM4 vc[]; };
layout(std430, binding = 3) readonly buffer TB { int block_tables[]; };
layout(std430, binding = 4) readonly buffer CB { int context_lens[]; };
layout(std430, binding = 5) buffer OB { ELEM4 o[]; };                 // [B, Hq, q_len, D]
layout(std430, binding = 6) buffer POB { vec4 part_o[]; };            // [B, Hq, q_len, splits, D]
layout(std430, binding = 7) buffer PLB { float part_lse[]; };         // [B, Hq, q_len, splits]

shared vec4 Qs[BM * D4];
shared vec4 Ks[BN * KP4];
shared vec4 Vs[BN * D4];
shared float Ss[BM * SP];
shared float row_a[BM];   // per-row rescale factor, then the final l
shared float row_m[BM];
shared uint key_base[BN]; // vec4 index of each key's row in the cache, NO_KEY when not loaded

void merge_splits() {
    const uint row = gl_WorkGroupID.x * pc.q_len + gl_WorkGroupID.y;
    const uint S = pc.num_splits;
    float m = NEG_INF;
    for (uint s = 0; s < S; ++s) m = max(m, part_lse[row * S + s]);
    float m_safe = m == NEG_INF ? 0.0 : m;
    for (uint c = gl_LocalInvocationID.x; c < D4; c += WG) {
        vec4 acc = vec4(0);
        float total = 0.0;
        for (uint s = 0; s < S; ++s) {
            float w = exp2(part_lse[row * S + s] - m_safe);   // 0 for empty splits
            total += w;
            acc += w * part_o[(row * S + s) * D4 + c];
        }
        o[row * D4 + c] = ELEM4(total > 0.0 ? acc / total : vec4(0));
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
    const int rows_total = int(pc.group * pc.q_len);
    const int r0 = int(gl_WorkGroupID.y * BM);
    const int r1 = min(r0 + int(BM), rows_total);
    const int ctx = context_lens[b];
    const int ql = int(pc.q_len);
    const uint heads_q = pc.heads_kv * pc.group;
    const uint row_stride = pc.heads_kv * D4;          // vec4s between consecutive slots of a block

    // Keys any row of the tile can see: up to the last row's position (causal), from the first
    // row's window edge.
    const int first_pos = ctx - ql + r0 / int(pc.group);
    const int last_pos = ctx - ql + (r1 - 1) / int(pc.group);
    const int k_hi = max(min(ctx, last_pos + 1), 0);
    const int k_lo = pc.left < 0 ? 0 : max(first_pos - pc.left, 0);
    const int t_lo = k_lo / int(BN);
    const int t_hi = max((k_hi + int(BN) - 1) / int(BN), t_lo);
    const int per = (t_hi - t_lo + int(pc.num_splits) - 1) / int(pc.num_splits);
    const int t_start = t_lo + int(split) * per;
    const int t_end = min(t_start + per, t_hi);

    // Q pre-scaled into base 2; rows past the group stay zero.
    for (uint i = tid; i < BM * D4; i += WG) {
        uint r = i / D4, c = i % D4;
        int row = r0 + int(r);
        vec4 x = vec4(0);
        if (row < r1) {
            uint qi = uint(row) / pc.group, head = hk * pc.group + uint(row) % pc.group;
            x = vec4(q[((b * heads_q + head) * pc.q_len + qi) * D4 + c]) * pc.scale_log2;
        }
        Qs[i] = x;
    }
    vec4 acc[NA];
    [[unroll]] for (uint a = 0; a < NA; ++a) acc[a] = vec4(0);
    float m_i = NEG_INF, l_i = 0.0;   // statistics of row `tid` (tid < BM)

    for (int t = t_start; t < t_end; ++t) {
        const int k0 = t * int(BN);
        barrier();   // the previous tile is no longer read
        for (uint n = tid; n < BN; n += WG) {
            int j = k0 + int(n);
            uint base = NO_KEY;
            if (j >= k_lo && j < k_hi) {
                uint blk = uint(block_tables[b * pc.max_blocks + uint(j) / pc.block_size]);
                base = (blk * pc.block_size + uint(j) % pc.block_size) * row_stride + hk * D4;
            }
            key_base[n] = base;
        }
        barrier();
        // K and V of the tile together: twice the loads in flight per barrier.
        for (uint i = tid; i < BN * D4; i += WG) {
            uint n = i / D4, c = i % D4;
            uint base = key_base[n];
            vec4 kx = vec4(0), vx = vec4(0);
            if (base != NO_KEY) {   // zeros, not stale cache contents: a NaN would survive p = 0
                kx = vec4(kc[base + c]);
                vx = vec4(vc[base + c]);
            }
            Ks[n * KP4 + c] = kx;
            Vs[n * D4 + c] = vx;
        }
        barrier();
        for (uint i = tid; i < BM * BN; i += WG) {
            uint r = i / BN, n = i % BN;
            float s = 0.0;
            for (uint c = 0; c < D4; ++c) s += dot(Qs[r * D4 + c], Ks[n * KP4 + c]);
            int j = k0 + int(n);
            int pos = ctx - ql + (r0 + int(r)) / int(pc.group);
            bool ok = key_base[n] != NO_KEY && j <= pos && (pc.left < 0 || j >= pos - pc.left);
            Ss[r * SP + n] = ok ? s : NEG_INF;
        }
        barrier();
        if (tid < BM) {
            float mx = NEG_INF;
            for (uint n = 0; n < BN; ++n) mx = max(mx, Ss[tid * SP + n]);
            float m_new = max(m_i, mx);
            // A row that has seen no key keeps m = -inf; shifting by 0 keeps exp2 at 0, not NaN.
            float m_safe = m_new == NEG_INF ? 0.0 : m_new;
            float sum = 0.0;
            for (uint n = 0; n < BN; ++n) {
                float p = exp2(Ss[tid * SP + n] - m_safe);
                Ss[tid * SP + n] = p;
                sum += p;
            }
            float alpha = exp2(m_i - m_safe);
            l_i = l_i * alpha + sum;
            m_i = m_new;
            row_a[tid] = alpha;
        }
        barrier();
        [[unroll]] for (uint a = 0; a < NA; ++a) {
            uint i = tid + a * WG;
            if (i < BM * D4) {
                uint r = i / D4, c = i % D4;
                vec4 x = acc[a] * row_a[r];
                for (uint n = 0; n < BN; ++n) x += Ss[r * SP + n] * Vs[n * D4 + c];
                acc[a] = x;
            }
        }
    }

    barrier();
    if (tid < BM) {
        row_a[tid] = l_i;
        row_m[tid] = m_i;
    }
    barrier();
    [[unroll]] for (uint a = 0; a < NA; ++a) {
        uint i = tid + a * WG;
        if (i >= BM * D4) continue;
        uint r = i / D4, c = i % D4;
        int row = r0 + int(r);
        if (row >= r1) continue;
        uint qi = uint(row) / pc.group, head = hk * pc.group + uint(row) % pc.group;
        uint orow = (b * heads_q + head) * pc.q_len + qi;
        float l = row_a[r];
        vec4 out_v = l > 0.0 ? acc[a] / l : vec4(0);
        if (pc.num_splits == 1u) {
            o[orow * D4 + c] = ELEM4(out_v);
        } else {
            uint prow = orow * pc.num_splits + split;
            part_o[prow * D4 + c] = out_v;
            if (c == 0u) part_lse[prow] = l > 0.0 ? row_m[r] + log2(l) : NEG_INF;
        }
    }
}

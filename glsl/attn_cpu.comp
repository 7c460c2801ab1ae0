#version 450
// cpu: for CPU Vulkan drivers (Mesa lavapipe / llvmpipe), which run the invocations of a subgroup
// as the lanes of one SIMD register. Arithmetic across lanes is then cheap, but every buffer or
// shared-memory load is a scalar loop over the lanes (per component), whatever its address.
// So this shader minimises loads per FLOP instead of using shared memory:
// - one workgroup is one subgroup (WG = subgroup size); each invocation owns R query rows, with
//   q and the output accumulators in registers;
// - keys are walked in blocks of BK; per key the K and V rows are loaded once per workgroup,
//   each lane fetching a different vec4 of the row (every lane of a load does useful work), and
//   handed to all lanes with subgroupBroadcast (a register permute on a CPU);
// - the online softmax rescale happens once per block of BK keys, not per key.
// Loops over head_dim, rows and the keys of a block are unrolled: lavapipe ends an invocation
// after 65535 loop iterations in total, so the key-block loop is the only loop (CpuLanes in
// shaders.py counts its iterations).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_ballot : require
#include "attn_common.glsl"

layout(constant_id = 0) const uint D = 64;   // head_dim, a multiple of 4
layout(constant_id = 1) const uint R = 4;    // query rows per invocation, a multiple of 4
layout(constant_id = 2) const uint BK = 4;   // keys per block (one softmax rescale per block)
layout(constant_id = 3) const uint WG = 8;   // invocations = the device's subgroup size
layout(local_size_x_id = 3) in;

const uint D4 = D / 4;
const uint NL = (D4 + WG - 1) / WG;   // vec4s of a K/V row each lane loads

layout(std430, binding = 0) readonly buffer QB { vec4 q[]; };
layout(std430, binding = 1) readonly buffer KB { vec4 k[]; };
layout(std430, binding = 2) readonly buffer VB { vec4 v[]; };
layout(std430, binding = 3) writeonly buffer OB { vec4 o[]; };
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

// Row `kj` of K or V into every lane: lane l loads vec4s l, l + WG, ... of the row (so each lane
// of a load fetches something useful) and subgroupBroadcast hands vec4 d to all lanes. Measured
// on lavapipe against every lane loading the same address: 98 against 107 ms.
#define FETCH_ROW(dst, buf, base, kj)                                                  \
    {                                                                                  \
        vec4 mine[NL];                                                                 \
        [[unroll]] for (uint t = 0; t < NL; ++t)                                       \
            mine[t] = buf[(base) + (kj) * D4 + min(lane + t * WG, D4 - 1u)];           \
        [[unroll]] for (uint d = 0; d < D4; ++d) dst[d] = subgroupBroadcast(mine[d / WG], d % WG); \
    }

void main() {
    const uint lane = gl_LocalInvocationID.x;
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;
    set_head(head);
    const float slope2 = head_slope2(head);
    const int q0 = int(query_block() * WG * R);
    const int q1 = min(q0 + int(WG * R), int(pc.seq_q));
    const uint kvh = head / pc.group;
    const uint qbase = pc.q_base / 4u + head * pc.seq_q * D4;
    const uint kbase = pc.k_base / 4u + kvh * pc.seq_k * D4;
    const uint vbase = pc.v_base / 4u + kvh * pc.seq_k * D4;
    // Slot r of lane l is row q0 + r*WG + l: the lanes of one slot are neighbouring rows, so a
    // causal or window mask cuts them at nearly the same key.
    int row[R];
    vec4 qv[R][D4];
    vec4 acc[R][D4];
    float m_i[R], l_i[R], alpha[R];
    bool bad[R];   // a visible score of the row was NaN
    [[unroll]] for (uint r = 0; r < R; ++r) {
        row[r] = q0 + int(r * WG + lane);
        // Rows past seq_q compute on a clamped copy and are never written.
        uint qr = uint(min(row[r], q1 - 1));
        [[unroll]] for (uint d = 0; d < D4; ++d) {
            qv[r][d] = q[qbase + qr * D4 + d];
            acc[r][d] = vec4(0);
        }
        m_i[r] = NEG_INF;
        l_i[r] = 0.0;
        bad[r] = false;
    }

    const ivec2 kr = key_range(q0, q1);
    for (int k0 = kr.x; k0 < kr.y; k0 += int(BK)) {
        const bool full = tile_fully_visible(q0, q1, k0, k0 + int(BK));
        vec4 kv[BK][D4];
        [[unroll]] for (uint j = 0; j < BK; ++j) {
            // Past the last key: load a real row (clamped) and mask it to -inf below.
            const uint kj = uint(readable_key(k0 + int(j)));
            FETCH_ROW(kv[j], k, kbase, kj);
        }
        float p[R][BK];
        // Scores in 4-row register tiles, head_dim outermost: independent fma chains, and each
        // q and k component is read once per tile instead of once per product.
        [[unroll]] for (uint r0 = 0; r0 < R; r0 += 4) {
            [[unroll]] for (uint rr = 0; rr < 4; ++rr)
                [[unroll]] for (uint j = 0; j < BK; ++j) p[r0 + rr][j] = 0.0;
            [[unroll]] for (uint d = 0; d < D4; ++d)
                [[unroll]] for (uint c = 0; c < 4; ++c)
                    [[unroll]] for (uint rr = 0; rr < 4; ++rr)
                        [[unroll]] for (uint j = 0; j < BK; ++j)
                            p[r0 + rr][j] = fma(qv[r0 + rr][d][c], kv[j][d][c], p[r0 + rr][j]);
        }
        [[unroll]] for (uint r = 0; r < R; ++r) {
            float mx = m_i[r];
            [[unroll]] for (uint j = 0; j < BK; ++j) {
                // Branch-free mask: on a CPU both sides of an `if` run under a lane mask anyway.
                const int kj = k0 + int(j);
                const bool vis = visible(row[r], kj);
                const float s = masked_score(modified_score(SCORE(p[r][j]), row[r], kj, slope2), row[r], kj);
                p[r][j] = (full || vis) ? s : NEG_INF;
                bad[r] = bad[r] || isnan(p[r][j]);
                mx = max(mx, p[r][j]);
            }
            const float m_use = AULE_SOFTMAX_SHIFT(mx);
            const float a = exp2(m_i[r] - m_use);
            float sum = 0.0;
            [[unroll]] for (uint j = 0; j < BK; ++j) {
                p[r][j] = exp2(p[r][j] - m_use);
                sum += p[r][j];
            }
            l_i[r] = l_i[r] * a + sum;
            m_i[r] = mx;
            alpha[r] = a;
        }
        [[unroll]] for (uint j = 0; j < BK; ++j) {
            const uint kj = uint(readable_key(k0 + int(j)));
            FETCH_ROW(kv[j], v, vbase, kj);
        }
        // Rescale and accumulate in one pass: each accumulator is read and written once per block.
        [[unroll]] for (uint r = 0; r < R; ++r)
            [[unroll]] for (uint d = 0; d < D4; ++d) {
                vec4 x = acc[r][d] * alpha[r];
                [[unroll]] for (uint j = 0; j < BK; ++j) x = fma(vec4(p[r][j]), kv[j][d], x);
                acc[r][d] = x;
            }
    }

    const uint obase = pc.o_base / 4u + head * pc.seq_q * D4;
    // No `continue` here: a loop with one might not be unrolled, and after a long key loop it would
    // be cut short.
    [[unroll]] for (uint r = 0; r < R; ++r) {
        if (row[r] < q1) {
            const float a = join_sink(m_i[r], l_i[r], bad[r], head);
            const float inv = AULE_ROW_INV(m_i[r], l_i[r], bad[r]) * a;
            [[unroll]] for (uint d = 0; d < D4; ++d)
                o[obase + uint(row[r]) * D4 + d] = AULE_ROW_OUT(vec4, acc[r][d], inv);
            if ((pc.flags & 1u) != 0u)
                lse[pc.lse_base + head * pc.seq_q + uint(row[r])] = AULE_ROW_LSE2(m_i[r], l_i[r], bad[r]) * LN2;
        }
    }
}

#version 450
// baseline: one invocation per query row, no shared memory, one key at a time with the online
// softmax update. The workgroup walks the keys its rows can see together with the same key
// index in every invocation, so K and V loads are uniform. Any head_dim, any Vulkan 1.2 device.
// Loops over head_dim are unrolled: the key loop is then the only loop, which matters on
// lavapipe, where an invocation stops after 65535 loop iterations in total (RowPerInvocation in
// shaders.py counts them).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#include "attn_common.glsl"

layout(constant_id = 0) const uint D = 64;    // head_dim
layout(constant_id = 1) const uint WG = 64;   // rows per workgroup
layout(local_size_x_id = 1) in;

layout(std430, binding = 0) readonly buffer QB { float q[]; };
layout(std430, binding = 1) readonly buffer KB { float k[]; };
layout(std430, binding = 2) readonly buffer VB { float v[]; };
layout(std430, binding = 3) writeonly buffer OB { float o[]; };
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

void main() {
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;
    set_head(head);
    const int q0 = int(query_block() * WG);
    const int q1 = min(q0 + int(WG), int(pc.seq_q));
    const int row = q0 + int(gl_LocalInvocationID.x);
    const bool live = row < q1;
    const uint kvh = head / pc.group;
    const float slope2 = head_slope2(head);
    const uint kb = pc.k_base + kvh * pc.seq_k * D;
    const uint vb = pc.v_base + kvh * pc.seq_k * D;

    float qv[D];
    float acc[D];
    const uint qo = pc.q_base + (head * pc.seq_q + uint(live ? row : q0)) * D;
    [[unroll]] for (uint d = 0; d < D; ++d) { qv[d] = q[qo + d]; acc[d] = 0.0; }

    const ivec2 kr = key_range(q0, q1);
    const bool full = tile_fully_visible(q0, q1, kr.x, kr.y);
    float m = NEG_INF, l = 0.0;
    bool bad = false;   // a visible score was NaN
    for (int j = kr.x; j < kr.y; ++j) {
        const uint ko = kb + uint(j) * D;
        float s = 0.0;
        [[unroll]] for (uint d = 0; d < D; ++d) s += qv[d] * k[ko + d];
        s = masked_score(modified_score(SCORE(s), row, j, slope2), row, j);
        if (!full && !visible(row, j)) s = NEG_INF;
        bad = bad || isnan(s);
        const float m_new = max(m, s);
        const float m_use = AULE_SOFTMAX_SHIFT(m_new);
        const float a = exp2(m - m_use);
        const float p = exp2(s - m_use);
        l = l * a + p;
        const uint vo = vb + uint(j) * D;
        [[unroll]] for (uint d = 0; d < D; ++d) acc[d] = acc[d] * a + p * v[vo + d];
        m = m_new;
    }
    if (!live) return;
    const uint oo = pc.o_base + (head * pc.seq_q + uint(row)) * D;
    const float sa = join_sink(m, l, bad, head);
    const float inv = AULE_ROW_INV(m, l, bad) * sa;
    [[unroll]] for (uint d = 0; d < D; ++d) o[oo + d] = AULE_ROW_OUT(float, acc[d], inv);
    if ((pc.flags & 1u) != 0u)
        lse[pc.lse_base + head * pc.seq_q + uint(row)] = AULE_ROW_LSE2(m, l, bad) * LN2;
}

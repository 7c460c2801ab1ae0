#version 450
// fast / fp16 / fp16_amd / fp16_io: FlashAttention-2 forward over BM x BN tiles staged in shared memory.
// A workgroup owns BM query rows of one head; its TR x TC invocation grid gives each invocation
// R rows x (BN/TC) keys of the score tile and R rows x (D/4/TC) vec4 columns of the output.
// Every loop but the key-tile loop runs a number of times fixed by the specialization constants and
// is unrolled: besides giving the compiler constant indices into the register arrays, lavapipe ends
// an invocation after 65535 loop iterations in total (Tiled in shaders.py counts the key tiles).
// Defines (build_shaders.py): AULE_FP16 -> half in memory and in shared memory (Q, K/V tiles, P),
// the half read there converted to fp32 for every product and sum, so |q|, |k|, |v| up to 65504
// never overflow; AULE_HALF_IO -> half in memory only (fp32 shared memory).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#if defined(AULE_FP16) || defined(AULE_HALF_IO)
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#define IO4 f16vec4
#else
#define IO4 vec4
#endif
#ifdef AULE_FP16
#define ELEM4 f16vec4
#else
#define ELEM4 vec4
#endif
#include "attn_common.glsl"

#ifndef AULE_DEFAULT_WG
#define AULE_DEFAULT_WG 128
#endif

layout(constant_id = 0) const uint D = 64;     // head_dim, a multiple of 4
layout(constant_id = 1) const uint BM = 64;    // query rows per workgroup
layout(constant_id = 2) const uint BN = 32;    // keys per tile, a multiple of 4
layout(constant_id = 3) const uint WG = AULE_DEFAULT_WG;  // invocations (>= BM)
layout(constant_id = 4) const uint TC = 8;     // invocations sharing one row group
layout(local_size_x_id = 3) in;

const uint D4 = D / 4;
const uint DP4 = D4 + 1;                 // padded row stride: rows land on different banks
const uint TR = WG / TC;
const uint R = BM / TR;                  // rows per invocation
const uint NC = BN / TC;                 // keys per invocation in the score tile
const uint NV = (D4 + TC - 1) / TC;      // output vec4 columns per invocation
const uint SP4 = BN / 4 + 1;             // score row stride in vec4 (padded): P is read 4 keys at once
const uint NQ = (BM * D4 + WG - 1) / WG;   // Q vec4s each invocation loads
const uint NKV = (BN * D4 + WG - 1) / WG;  // K (or V) vec4s of a tile each invocation loads

layout(std430, binding = 0) readonly buffer QB { IO4 q[]; };
layout(std430, binding = 1) readonly buffer KB { IO4 k[]; };
layout(std430, binding = 2) readonly buffer VB { IO4 v[]; };
layout(std430, binding = 3) writeonly buffer OB { IO4 o[]; };
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

shared ELEM4 Qs[BM * DP4];
shared ELEM4 KVs[BN * DP4];   // K for the score phase, then V for the output phase
shared vec4 Ss[BM * SP4];
#ifdef AULE_FP16
shared f16vec4 Ps[BM * SP4];  // probabilities (<= 1) in half: half the shared-memory traffic of P.V
#define PS Ps
#else
#define PS Ss
#endif
shared float alpha_s[BM];

void load_tile(uint base, int k0, bool is_v) {
    [[unroll]] for (uint a = 0; a < NKV; ++a) {
        const uint i = gl_LocalInvocationID.x + a * WG;
        if (i < BN * D4) {
            uint r = i / D4, c = i % D4;
            int j = k0 + int(r);
            // Rows past seq_k are zero: a NaN from unwritten memory would survive P = 0.
            ELEM4 x = ELEM4(0);
            if (key_in_memory(j)) x = ELEM4(is_v ? v[base + uint(j) * D4 + c] : k[base + uint(j) * D4 + c]);
            KVs[r * DP4 + c] = x;
        }
    }
}

void main() {
    const uint tid = gl_LocalInvocationID.x;
    const uint tr = tid / TC, tc = tid % TC;
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;
    set_head(head);
    const int q0 = int(query_block() * BM);
    const int q1 = min(q0 + int(BM), int(pc.seq_q));
    const uint kvh = head / pc.group;
    const float slope2 = head_slope2(head);
    const uint qbase = pc.q_base / 4u + head * pc.seq_q * D4;
    const uint kbase = pc.k_base / 4u + kvh * pc.seq_k * D4;
    const uint vbase = pc.v_base / 4u + kvh * pc.seq_k * D4;

    // Q once per workgroup, unscaled: the fp32 score is scaled (SCORE in attn_common.glsl).
    [[unroll]] for (uint a = 0; a < NQ; ++a) {
        const uint i = tid + a * WG;
        if (i < BM * D4) {
            uint r = i / D4, c = i % D4;
            int row = q0 + int(r);
            ELEM4 x = ELEM4(0);
            if (row < q1) x = ELEM4(q[qbase + uint(row) * D4 + c]);
            Qs[r * DP4 + c] = x;
        }
    }

    vec4 acc[R][NV];
    [[unroll]] for (uint r = 0; r < R; ++r)
        [[unroll]] for (uint n = 0; n < NV; ++n) acc[r][n] = vec4(0);
    float m_i = NEG_INF, l_i = 0.0;   // statistics of row `tid` (only tid < BM uses them)
    bool bad = false;                  // row `tid` saw a NaN score

    ivec2 kr = key_range(q0, q1);
    // Whole tiles outside [kr.x, kr.y) are never visited: causal and window skipping.
    int k_start = (kr.x / int(BN)) * int(BN);
    for (int k0 = k_start; k0 < kr.y; k0 += int(BN)) {
        barrier();   // the previous tile's P.V phase is done with KVs
        load_tile(kbase, k0, false);
        barrier();

        bool full = tile_fully_visible(q0, q1, k0, k0 + int(BN));
        float s4[R][NC];
        [[unroll]] for (uint r = 0; r < R; ++r)
            [[unroll]] for (uint c = 0; c < NC; ++c) s4[r][c] = 0.0;
        [[unroll]] for (uint d = 0; d < D4; ++d) {
            vec4 kk[NC];
            [[unroll]] for (uint c = 0; c < NC; ++c) kk[c] = vec4(KVs[(tc + c * TC) * DP4 + d]);
            [[unroll]] for (uint r = 0; r < R; ++r) {
                vec4 qq = vec4(Qs[(tr * R + r) * DP4 + d]);
                [[unroll]] for (uint c = 0; c < NC; ++c) s4[r][c] += dot(qq, kk[c]);
            }
        }
        [[unroll]] for (uint r = 0; r < R; ++r) {
            uint lr = tr * R + r;
            [[unroll]] for (uint c = 0; c < NC; ++c) {
                uint lc = tc + c * TC;
                const int qi = q0 + int(lr), kj = k0 + int(lc);
                float s = masked_score(modified_score(SCORE(s4[r][c]), qi, kj, slope2), qi, kj);
                if (!full && !visible(qi, kj)) s = NEG_INF;
                Ss[lr * SP4 + lc / 4][lc % 4] = s;
            }
        }
        barrier();   // scores complete; K no longer needed

        // Online softmax, one invocation per row; the others bring V in meanwhile.
        if (tid < BM) {
            float mx = m_i;
            [[unroll]] for (uint j = 0; j < BN / 4; ++j) {
                vec4 x = Ss[tid * SP4 + j];
                bad = bad || any(isnan(x));
                mx = max(mx, max(max(x.x, x.y), max(x.z, x.w)));
            }
            float m_use = AULE_SOFTMAX_SHIFT(mx);
            float a = exp2(m_i - m_use);
            float sum = 0.0;
            [[unroll]] for (uint j = 0; j < BN / 4; ++j) {
                vec4 p = exp2(Ss[tid * SP4 + j] - m_use);
                sum += (p.x + p.y) + (p.z + p.w);
                PS[tid * SP4 + j] = ELEM4(p);
            }
            l_i = l_i * a + sum;
            m_i = mx;
            alpha_s[tid] = a;
        }
        load_tile(vbase, k0, true);
        barrier();

        [[unroll]] for (uint r = 0; r < R; ++r) {
            float a = alpha_s[tr * R + r];
            [[unroll]] for (uint n = 0; n < NV; ++n) acc[r][n] *= a;
        }
        [[unroll]] for (uint j4 = 0; j4 < BN / 4; ++j4) {
            vec4 pr[R];
            [[unroll]] for (uint r = 0; r < R; ++r) pr[r] = vec4(PS[(tr * R + r) * SP4 + j4]);
            [[unroll]] for (uint jj = 0; jj < 4; ++jj) {
                vec4 vv[NV];
                [[unroll]] for (uint n = 0; n < NV; ++n) {
                    uint c = tc + n * TC;
                    vv[n] = c < D4 ? vec4(KVs[(j4 * 4 + jj) * DP4 + c]) : vec4(0);
                }
                [[unroll]] for (uint r = 0; r < R; ++r)
                    [[unroll]] for (uint n = 0; n < NV; ++n) acc[r][n] += pr[r][jj] * vv[n];
            }
        }
    }

    // The row's factor (aule's numeric rule, mask.glsl) through shared memory.
    barrier();
    if (tid < BM) {
        const float sa = join_sink(m_i, l_i, bad, head);
        alpha_s[tid] = AULE_ROW_INV(m_i, l_i, bad) * sa;
        int row = q0 + int(tid);
        if ((pc.flags & 1u) != 0u && row < q1)
            lse[pc.lse_base + head * pc.seq_q + uint(row)] = AULE_ROW_LSE2(m_i, l_i, bad) * LN2;
    }
    barrier();
    const uint obase = pc.o_base / 4u + head * pc.seq_q * D4;
    // No `continue` here: a loop with one might not be unrolled, and after a long key loop it would
    // be cut short.
    [[unroll]] for (uint r = 0; r < R; ++r) {
        uint lr = tr * R + r;
        int row = q0 + int(lr);
        if (row < q1) {
            float inv = alpha_s[lr];
            [[unroll]] for (uint n = 0; n < NV; ++n) {
                uint c = tc + n * TC;
                if (c < D4) o[obase + uint(row) * D4 + c] = IO4(AULE_ROW_OUT(vec4, acc[r][n], inv));
            }
        }
    }
}

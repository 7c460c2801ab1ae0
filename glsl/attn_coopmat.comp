#version 450
// coopmat: fp16 FlashAttention forward on matrix cores through VK_KHR_cooperative_matrix
// (16x16x16, fp16 operands, fp32 accumulators). Each subgroup owns 16 query rows and walks its
// own key range independently: Q, K and V fragments load straight from the buffers, scores and
// probabilities pass through a per-subgroup shared-memory block for the row-wise online softmax.
// Whole tiles only: seq_q % 16 == 0, seq_k % BN == 0, head_dim % 16 == 0 (the CoopMat family in shaders.py checks).
// Measured on an H100: correct, but 9-14 TFLOP/s, below the fp16 variant; the serial row softmax
// (16 lanes x BN keys) and the per-tile shared-memory round trip of the accumulators (to scale
// rows) are the costs to remove next.
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#include "attn_common.glsl"

layout(constant_id = 0) const uint D = 64;      // head_dim, a multiple of 16
layout(constant_id = 1) const uint NSG = 4;     // subgroups per workgroup (16 rows each)
layout(constant_id = 2) const uint BN = 64;     // keys per step, a multiple of 16
layout(constant_id = 3) const uint WG = 128;    // invocations = NSG * subgroup size
layout(local_size_x_id = 3) in;

const uint BM = 16 * NSG;
const uint DT = D / 16;      // 16-wide column tiles of the head
const uint NT = BN / 16;     // 16-wide column tiles of a key step
const uint LANES = WG / NSG; // the subgroup size (the CoopMat family sets WG = NSG * subgroup size)
const uint NE = (256 + LANES - 1) / LANES;   // elements of a 16x16 tile per lane

layout(std430, binding = 0) readonly buffer QB { float16_t q[]; };
layout(std430, binding = 1) readonly buffer KB { float16_t k[]; };
layout(std430, binding = 2) readonly buffer VB { float16_t v[]; };
layout(std430, binding = 3) writeonly buffer OB { float16_t o[]; };
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

shared float Ss[NSG * 16 * BN];       // scores of each subgroup's 16 rows
shared float16_t Ps[NSG * 16 * BN];   // their probabilities, the A operand of P.V
shared float Xs[NSG * 16 * 16];       // one accumulator tile, for row-wise scaling
shared float row_s[NSG * 16];         // per-row factor (alpha, then 1/l)

#define ACC coopmat<float, gl_ScopeSubgroup, 16, 16, gl_MatrixUseAccumulator>
#define MATA coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseA>
#define MATB coopmat<float16_t, gl_ScopeSubgroup, 16, 16, gl_MatrixUseB>

void sync() {
    subgroupMemoryBarrierShared();
    subgroupBarrier();
}

// Multiply each row of accumulator tile `t` by row_s of its row (through shared memory: the
// element-to-lane mapping of a cooperative matrix is opaque). Loops have constant trip counts and
// are unrolled, as in every attention shader (lavapipe counts every loop iteration).
ACC scale_rows(ACC t, uint sg, uint lane) {
    coopMatStore(t, Xs, sg * 256, 16, gl_CooperativeMatrixLayoutRowMajor);
    sync();
    [[unroll]] for (uint it = 0; it < NE; ++it) {
        const uint e = lane + it * LANES;
        if (e < 256) Xs[sg * 256 + e] *= row_s[sg * 16 + e / 16];
    }
    sync();
    ACC r;
    coopMatLoad(r, Xs, sg * 256, 16, gl_CooperativeMatrixLayoutRowMajor);
    sync();
    return r;
}

void main() {
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;
    const uint sg = gl_SubgroupID, lane = gl_SubgroupInvocationID;
    const int r0 = int(query_block() * BM + sg * 16);   // this subgroup's first row
    if (r0 >= int(pc.seq_q)) return;                   // whole subgroup: no workgroup barriers below
    const uint kvh = head / pc.group;
    const uint qbase = pc.q_base + (head * pc.seq_q + uint(r0)) * D;
    const uint kbase = pc.k_base + kvh * pc.seq_k * D;
    const uint vbase = pc.v_base + kvh * pc.seq_k * D;

    MATA qa[DT];
    [[unroll]] for (uint t = 0; t < DT; ++t)
        coopMatLoad(qa[t], q, qbase + t * 16, D, gl_CooperativeMatrixLayoutRowMajor);
    ACC oacc[DT];
    [[unroll]] for (uint t = 0; t < DT; ++t) oacc[t] = ACC(0.0);
    float m = NEG_INF, l = 0.0;   // statistics of row `lane` (lanes 0..15)
    bool bad = false;             // row `lane` saw a NaN score
    const int my_row = r0 + int(lane);

    const ivec2 kr = key_range(r0, r0 + 16);
    for (int k0 = (kr.x / int(BN)) * int(BN); k0 < kr.y; k0 += int(BN)) {
        ACC s[NT];
        [[unroll]] for (uint n = 0; n < NT; ++n) s[n] = ACC(0.0);
        [[unroll]] for (uint t = 0; t < DT; ++t) {
            [[unroll]] for (uint n = 0; n < NT; ++n) {
                MATB kb;   // K^T tile: element (d, key) of row-major K is column-major B
                coopMatLoad(kb, k, kbase + uint(k0 + int(n) * 16) * D + t * 16, D,
                            gl_CooperativeMatrixLayoutColumnMajor);
                s[n] = coopMatMulAdd(qa[t], kb, s[n]);
            }
        }
        [[unroll]] for (uint n = 0; n < NT; ++n)
            coopMatStore(s[n], Ss, sg * 16 * BN + n * 16, BN, gl_CooperativeMatrixLayoutRowMajor);
        sync();
        if (lane < 16) {
            const bool full = tile_fully_visible(r0, r0 + 16, k0, k0 + int(BN));
            const uint base = sg * 16 * BN + lane * BN;
            float mx = m;
            [[unroll]] for (uint j = 0; j < BN; ++j) {
                float x = SCORE(Ss[base + j]);
                if (!full && !visible(my_row, k0 + int(j))) x = NEG_INF;
                Ss[base + j] = x;
                bad = bad || isnan(x);
                mx = max(mx, x);
            }
            const float m_use = AULE_SOFTMAX_SHIFT(mx);
            const float a = exp2(m - m_use);
            float sum = 0.0;
            [[unroll]] for (uint j = 0; j < BN; ++j) {
                const float p = exp2(Ss[base + j] - m_use);
                sum += p;
                Ps[base + j] = float16_t(p);
            }
            l = l * a + sum;
            m = mx;
            row_s[sg * 16 + lane] = a;
        }
        sync();
        [[unroll]] for (uint t = 0; t < DT; ++t) oacc[t] = scale_rows(oacc[t], sg, lane);
        [[unroll]] for (uint n = 0; n < NT; ++n) {
            MATA pa;
            coopMatLoad(pa, Ps, sg * 16 * BN + n * 16, BN, gl_CooperativeMatrixLayoutRowMajor);
            [[unroll]] for (uint t = 0; t < DT; ++t) {
                MATB vb;
                coopMatLoad(vb, v, vbase + uint(k0 + int(n) * 16) * D + t * 16, D,
                            gl_CooperativeMatrixLayoutRowMajor);
                oacc[t] = coopMatMulAdd(pa, vb, oacc[t]);
            }
        }
        sync();
    }

    // The row's factor (aule's numeric rule, mask.glsl).
    if (lane < 16) {
        row_s[sg * 16 + lane] = AULE_ROW_INV(m, l, bad);
        if ((pc.flags & 1u) != 0u)
            lse[pc.lse_base + head * pc.seq_q + uint(my_row)] = AULE_ROW_LSE2(m, l, bad) * LN2;
    }
    sync();
    const uint obase = pc.o_base + (head * pc.seq_q + uint(r0)) * D;
    [[unroll]] for (uint t = 0; t < DT; ++t) {
        coopMatStore(oacc[t], Xs, sg * 256, 16, gl_CooperativeMatrixLayoutRowMajor);
        sync();
        [[unroll]] for (uint it = 0; it < NE; ++it) {
            const uint e = lane + it * LANES;
            if (e < 256)
                o[obase + (e / 16) * D + t * 16 + e % 16] =
                    float16_t(AULE_ROW_OUT(float, Xs[sg * 256 + e], row_s[sg * 16 + e / 16]));
        }
        sync();
    }
}

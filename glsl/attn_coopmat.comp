#version 450
// coopmat: FlashAttention-2 forward on matrix cores through VK_KHR_cooperative_matrix, fp16 operands
// and fp32 accumulators for Q.K^T and P.V alike.
//
// A workgroup owns BR = NSG * RT * MM query rows of one head: each of its NSG subgroups holds RT
// row tiles of MM rows, their Q fragments in registers for the whole key loop. Every step all
// invocations stage one tile of BN keys (K and V, fp16) in shared memory; with NBUF = 2 the next
// tile's global loads are issued before the current tile's math and land in the other buffer after
// it, so their latency hides behind the matrix work. Per step a subgroup:
//   S = Q.K^T on matrix cores, stored to its shared score block (fp32);
//   the online softmax on every lane: TPR lanes per row, vec4 reads, shuffles for the row max/sum;
//   P (fp16) back to shared memory, the A operand of P.V;
//   O *= alpha only when some row's running maximum moved: a row keeps its maximum until a score
//       exceeds it by RESCALE (log2 units), so p <= 2^RESCALE and after the first tiles the
//       rescale is rare. The factor is a matrix whose rows are constant, loaded from shared memory
//       and multiplied element by element (same type, so same element-to-lane mapping): O never
//       leaves the registers;
//   O += P.V on matrix cores.
// The matrix shape MM x NN x KK is the device's (specialization constants: one SPIR-V serves
// 16x16x16, 16x8x16, 8x8x16, ...), and so is the subgroup size (LANES = WG / NSG). Partial tiles are
// masked (rows past seq_q are zero and never written, keys past seq_k are zero and invisible), so
// any seq_q and seq_k run; whole key tiles a subgroup cannot see are skipped. head_dim is a
// multiple of 16 (CoopMat in shaders.py checks this and the shared-memory fit).
#extension GL_GOOGLE_include_directive : require
#extension GL_EXT_control_flow_attributes : require
#extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
#extension GL_EXT_shader_16bit_storage : require
#extension GL_KHR_cooperative_matrix : require
#extension GL_KHR_memory_scope_semantics : require
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_shuffle : require
#extension GL_KHR_shader_subgroup_vote : require
#include "attn_common.glsl"

layout(constant_id = 0) const uint D = 128;   // head_dim, a multiple of 16
layout(constant_id = 1) const uint NSG = 4;   // subgroups per workgroup
layout(constant_id = 2) const uint RT = 1;    // row tiles (of MM rows) per subgroup
layout(constant_id = 3) const uint BN = 32;   // keys per step, a multiple of NN, KK and 4 * TPR
layout(constant_id = 4) const uint WG = 128;  // invocations: NSG * the subgroup size
layout(constant_id = 5) const uint MM = 16;   // the matrix shape: A is MM x KK, B KK x NN
layout(constant_id = 6) const uint NN = 16;
layout(constant_id = 7) const uint KK = 16;
layout(constant_id = 8) const uint NBUF = 2;  // K/V tile buffers: 2 overlaps the next tile's loads
layout(local_size_x_id = 4) in;

const uint LANES = WG / NSG;
const uint SR = RT * MM;                          // rows per subgroup
const uint BR = NSG * SR;                         // rows per workgroup
const uint D8 = D / 8;                            // uvec4 (8 halves) per row in memory
const uint DP4 = D / 4 + 2;                       // f16vec4 per K/V/Q row in shared memory (8 halves of
                                                  // padding: matrix loads of 8 rows hit distinct banks)
const uint DK = D / KK, DN = D / NN, NT = BN / NN, BK = BN / KK;
const uint TPR = LANES >= SR ? LANES / SR : 1;    // lanes sharing one softmax row
const uint RPL = SR > LANES ? SR / LANES : 1;     // softmax rows per lane
const uint RSTEP = LANES / TPR;                   // distance between a lane's rows
const uint CPL4 = BN / TPR / 4;                   // vec4 of its row each lane handles
const uint SP4 = BN / 4 + 1;                      // vec4 per score row (padded)
const uint PP4 = BN / 4 + 2;                      // f16vec4 per probability row (padded by 8 halves)
const uint ST4 = SR * SP4;                        // vec4 of a subgroup's score block
const uint TILE4 = MM * NN / 4;                   // vec4 of one accumulator tile
const uint KV4 = BN * DP4;                        // f16vec4 of one K (or V) tile
const uint NL = (BN * D8 + WG - 1) / WG;          // uvec4 loads per invocation per K (or V) tile
const uint NQ = (BR * D8 + WG - 1) / WG;          // uvec4 loads per invocation of the Q block
const uint KVN = NBUF * 2 * KV4, QN = BR * DP4;   // the Q block is staged where the K/V tiles go
const float RESCALE = 8.0;

layout(std430, binding = 0) readonly buffer QB { uvec4 q[]; };
layout(std430, binding = 1) readonly buffer KB { uvec4 k[]; };
layout(std430, binding = 2) readonly buffer VB { uvec4 v[]; };
layout(std430, binding = 3) writeonly buffer OB { f16vec4 o[]; };
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

shared f16vec4 KVs[KVN > QN ? KVN : QN];
// Per subgroup: scores; then the rescale factors; at the end the output tiles and the row factors.
shared vec4 Ss[NSG * ST4];
shared f16vec4 Ps[NSG * SR * PP4];

#define ACC coopmat<float, gl_ScopeSubgroup, MM, NN, gl_MatrixUseAccumulator>
#define MATA coopmat<float16_t, gl_ScopeSubgroup, MM, KK, gl_MatrixUseA>
#define MATB coopmat<float16_t, gl_ScopeSubgroup, KK, NN, gl_MatrixUseB>

void sync() {
    subgroupMemoryBarrierShared();
    subgroupBarrier();
}

// Eight halves (one uvec4 from memory) into shared f16vec4 slot i and i + 1.
void put8(uint i, uvec4 x) {
    KVs[i] = f16vec4(unpackFloat2x16(x.x), unpackFloat2x16(x.y));
    KVs[i + 1] = f16vec4(unpackFloat2x16(x.z), unpackFloat2x16(x.w));
}

// This invocation's share of key tile k0 (K and V): keys past seq_k are zero, never memory, since
// 0 * NaN would survive P = 0.
void fetch(inout uvec4 kx[NL], inout uvec4 vx[NL], int k0, uint kb, uint vb) {
    [[unroll]] for (uint a = 0; a < NL; ++a) {
        const uint i = gl_LocalInvocationID.x + a * WG;
        const uint r = i / D8, c = i % D8;
        kx[a] = uvec4(0);
        vx[a] = uvec4(0);
        if (i < BN * D8 && k0 + int(r) < int(pc.seq_k)) {
            kx[a] = k[kb + uint(k0 + int(r)) * D8 + c];
            vx[a] = v[vb + uint(k0 + int(r)) * D8 + c];
        }
    }
}

void deposit(uvec4 kx[NL], uvec4 vx[NL], uint buf) {
    [[unroll]] for (uint a = 0; a < NL; ++a) {
        const uint i = gl_LocalInvocationID.x + a * WG;
        if (i < BN * D8) {
            const uint at = buf * 2 * KV4 + (i / D8) * DP4 + 2 * (i % D8);
            put8(at, kx[a]);
            put8(at + KV4, vx[a]);
        }
    }
}

// The combination of a row's partial value over the TPR consecutive lanes that share it.
float row_max(float x) {
    [[unroll]] for (uint s = 1; s < TPR; s *= 2) x = max(x, subgroupShuffleXor(x, s));
    return x;
}

float row_sum(float x) {
    [[unroll]] for (uint s = 1; s < TPR; s *= 2) x += subgroupShuffleXor(x, s);
    return x;
}

bool row_any(bool b) {
    uint x = b ? 1u : 0u;
    [[unroll]] for (uint s = 1; s < TPR; s *= 2) x |= subgroupShuffleXor(x, s);
    return x != 0u;
}

void main() {
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;   // the whole workgroup: no barrier is skipped by part of it
    const uint tid = gl_LocalInvocationID.x, sg = gl_SubgroupID, lane = gl_SubgroupInvocationID;
    const int wr0 = int(query_block() * BR);      // the workgroup's first row
    const int sr0 = wr0 + int(sg * SR);           // this subgroup's first row
    const uint kvh = head / pc.group;
    const uint qb = pc.q_base / 8 + head * pc.seq_q * D8;
    const uint kb = pc.k_base / 8 + kvh * pc.seq_k * D8;
    const uint vb = pc.v_base / 8 + kvh * pc.seq_k * D8;

    // Q through shared memory (rows past seq_q zero) into registers.
    [[unroll]] for (uint a = 0; a < NQ; ++a) {
        const uint i = tid + a * WG;
        if (i < BR * D8) {
            const uint r = i / D8, c = i % D8;
            uvec4 x = uvec4(0);
            if (wr0 + int(r) < int(pc.seq_q)) x = q[qb + (uint(wr0) + r) * D8 + c];
            put8(r * DP4 + 2 * c, x);
        }
    }
    barrier();
    MATA qa[RT * DK];
    [[unroll]] for (uint rt = 0; rt < RT; ++rt)
        [[unroll]] for (uint c = 0; c < DK; ++c)
            coopMatLoad(qa[rt * DK + c], KVs, (sg * SR + rt * MM) * DP4 + c * KK / 4, DP4,
                        gl_CooperativeMatrixLayoutRowMajor);
    barrier();   // the key tiles overwrite the staged Q

    ACC oacc[RT * DN];
    [[unroll]] for (uint t = 0; t < RT * DN; ++t) oacc[t] = ACC(0.0);
    float m[RPL], l[RPL];
    bool bad[RPL];   // the row saw a NaN score
    [[unroll]] for (uint rr = 0; rr < RPL; ++rr) {
        m[rr] = NEG_INF;
        l[rr] = 0.0;
        bad[rr] = false;
    }
    const uint h = lane % TPR;   // which part of its row(s) this lane handles

    const ivec2 kr = key_range(wr0, min(wr0 + int(BR), int(pc.seq_q)));
    const int sr1 = min(sr0 + int(SR), int(pc.seq_q));
    const ivec2 skr = sr0 < sr1 ? key_range(sr0, sr1) : ivec2(0, 0);
    const int kstart = (kr.x / int(BN)) * int(BN);
    const int steps = kr.y > kstart ? (kr.y - kstart + int(BN) - 1) / int(BN) : 0;

    uvec4 kx[NL], vx[NL];
    if (steps > 0) {
        fetch(kx, vx, kstart, kb, vb);
        deposit(kx, vx, 0);
    }
    barrier();
    for (int s = 0; s < steps; ++s) {
        const int k0 = kstart + s * int(BN);
        const uint cur = NBUF == 2 ? uint(s) & 1u : 0u;
        const bool more = s + 1 < steps;
        if (NBUF == 2 && more) fetch(kx, vx, k0 + int(BN), kb, vb);
        if (k0 < skr.y && k0 + int(BN) > skr.x) {   // whole subgroup: the tile meets its rows' keys
            const uint kt = cur * 2 * KV4, vt = kt + KV4;
            ACC sacc[RT * NT];
            [[unroll]] for (uint t = 0; t < RT * NT; ++t) sacc[t] = ACC(0.0);
            [[unroll]] for (uint n = 0; n < NT; ++n) {
                [[unroll]] for (uint c = 0; c < DK; ++c) {
                    MATB kbm;   // K^T: element (d, key) of the row-major K tile is column-major B
                    coopMatLoad(kbm, KVs, kt + n * NN * DP4 + c * KK / 4, DP4, gl_CooperativeMatrixLayoutColumnMajor);
                    [[unroll]] for (uint rt = 0; rt < RT; ++rt)
                        sacc[rt * NT + n] = coopMatMulAdd(qa[rt * DK + c], kbm, sacc[rt * NT + n]);
                }
            }
            [[unroll]] for (uint rt = 0; rt < RT; ++rt)
                [[unroll]] for (uint n = 0; n < NT; ++n)
                    coopMatStore(sacc[rt * NT + n], Ss, sg * ST4 + rt * MM * SP4 + n * NN / 4, SP4,
                                 gl_CooperativeMatrixLayoutRowMajor);
            sync();

            const bool full = tile_fully_visible(sr0, sr0 + int(SR), k0, k0 + int(BN));
            float alpha[RPL];
            bool moved = false;
            [[unroll]] for (uint rr = 0; rr < RPL; ++rr) {
                const uint row = lane / TPR + rr * RSTEP;
                const int qi = sr0 + int(row);
                const int j0 = k0 + int(h * CPL4 * 4);
                vec4 x[CPL4];
                float mx = NEG_INF;
                bool nan = false;
                [[unroll]] for (uint c = 0; c < CPL4; ++c) {
                    x[c] = SCORE(Ss[sg * ST4 + row * SP4 + h * CPL4 + c]);
                    if (!full) {
                        [[unroll]] for (uint e = 0; e < 4; ++e)
                            if (!visible(qi, j0 + int(c * 4 + e))) x[c][e] = NEG_INF;
                    }
                    nan = nan || any(isnan(x[c]));
                    mx = max(mx, max(max(x[c].x, x[c].y), max(x[c].z, x[c].w)));
                }
                mx = row_max(mx);
                bad[rr] = bad[rr] || row_any(nan);
                const float mnew = mx > m[rr] + RESCALE ? mx : m[rr];
                const float shift = AULE_SOFTMAX_SHIFT(mnew);
                alpha[rr] = exp2(m[rr] - shift);
                moved = moved || (m[rr] != mnew && m[rr] != NEG_INF);
                float sum = 0.0;
                [[unroll]] for (uint c = 0; c < CPL4; ++c) {
                    const vec4 p = exp2(x[c] - shift);
                    sum += (p.x + p.y) + (p.z + p.w);
                    Ps[(sg * SR + row) * PP4 + h * CPL4 + c] = f16vec4(p);
                }
                l[rr] = l[rr] * alpha[rr] + row_sum(sum);
                m[rr] = mnew;
            }
            // A row that had no visible key yet has O = 0 (or 0 * a hidden key's NaN, which the
            // factor would keep): it needs no rescale.
            if (subgroupAny(moved)) {
                sync();   // every lane has read its scores: the block now holds the factors
                [[unroll]] for (uint rr = 0; rr < RPL; ++rr) {
                    const uint row = lane / TPR + rr * RSTEP;
                    const uint at = sg * ST4 + (row / MM) * TILE4 + (row % MM) * (NN / 4);
                    [[unroll]] for (uint c0 = 0; c0 < NN / 4; c0 += TPR)
                        if (c0 + h < NN / 4) Ss[at + c0 + h] = vec4(alpha[rr]);
                }
                sync();
                [[unroll]] for (uint rt = 0; rt < RT; ++rt) {
                    ACC f;
                    coopMatLoad(f, Ss, sg * ST4 + rt * TILE4, NN / 4, gl_CooperativeMatrixLayoutRowMajor);
                    [[unroll]] for (uint t = 0; t < DN; ++t) oacc[rt * DN + t] = oacc[rt * DN + t] * f;
                }
            }
            sync();   // P is in shared memory
            [[unroll]] for (uint c = 0; c < BK; ++c) {
                MATA pa[RT];
                [[unroll]] for (uint rt = 0; rt < RT; ++rt)
                    coopMatLoad(pa[rt], Ps, (sg * SR + rt * MM) * PP4 + c * KK / 4, PP4,
                                gl_CooperativeMatrixLayoutRowMajor);
                [[unroll]] for (uint t = 0; t < DN; ++t) {
                    MATB vbm;
                    coopMatLoad(vbm, KVs, vt + c * KK * DP4 + t * NN / 4, DP4, gl_CooperativeMatrixLayoutRowMajor);
                    [[unroll]] for (uint rt = 0; rt < RT; ++rt)
                        oacc[rt * DN + t] = coopMatMulAdd(pa[rt], vbm, oacc[rt * DN + t]);
                }
            }
        }
        if (NBUF == 2) {
            if (more) deposit(kx, vx, cur ^ 1u);
            barrier();
        } else {
            barrier();   // every subgroup is done with the tile
            if (more) {
                fetch(kx, vx, k0 + int(BN), kb, vb);
                deposit(kx, vx, 0);
            }
            barrier();
        }
    }

    // The row factors (aule's numeric rule, mask.glsl) go beside the output staging tile.
    [[unroll]] for (uint rr = 0; rr < RPL; ++rr) {
        const uint row = lane / TPR + rr * RSTEP;
        const int qi = sr0 + int(row);
        if (h == 0) {
            Ss[sg * ST4 + TILE4 + row / 4][row % 4] = AULE_ROW_INV(m[rr], l[rr], bad[rr]);
            if ((pc.flags & 1u) != 0u && qi < int(pc.seq_q))
                lse[pc.lse_base + head * pc.seq_q + uint(qi)] = AULE_ROW_LSE2(m[rr], l[rr], bad[rr]) * LN2;
        }
    }
    const uint ob = pc.o_base / 4 + head * pc.seq_q * (D / 4);
    [[unroll]] for (uint rt = 0; rt < RT; ++rt) {
        [[unroll]] for (uint t = 0; t < DN; ++t) {
            sync();
            coopMatStore(oacc[rt * DN + t], Ss, sg * ST4, NN / 4, gl_CooperativeMatrixLayoutRowMajor);
            sync();
            [[unroll]] for (uint e0 = 0; e0 < TILE4; e0 += LANES) {
                const uint e = e0 + lane;
                const uint row = rt * MM + e / (NN / 4);
                const int qi = sr0 + int(row);
                if (e < TILE4 && qi < int(pc.seq_q)) {
                    const float inv = Ss[sg * ST4 + TILE4 + row / 4][row % 4];
                    o[ob + uint(qi) * (D / 4) + t * (NN / 4) + e % (NN / 4)] =
                        f16vec4(AULE_ROW_OUT(vec4, Ss[sg * ST4 + e], inv));
                }
            }
        }
    }
}

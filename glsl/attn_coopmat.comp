#version 450
// coopmat: FlashAttention-2 forward on matrix cores through VK_KHR_cooperative_matrix, fp16 operands
// and fp32 accumulators for Q.K^T and P.V alike.
//
// A workgroup owns BR = NSG * RT * MM query rows of one head: each of its NSG subgroups holds RT
// row tiles of MM rows, their Q fragments in registers for the whole key loop. Every step all
// invocations stage one tile of BN keys (K and V, fp16) in shared memory; with NBUF = 2 the next
// tile's global loads are issued before the current tile's math and land in the other buffer after
// it, so their latency hides behind the matrix work. Per step a subgroup computes S = Q.K^T on
// matrix cores, then the online softmax on one of two paths (QG, chosen per vendor):
//   registers (QG > 0): scale, mask and exp2 on the accumulator elements where they are, each
//       element's place known from index tiles loaded as accumulators of the same type; a row's
//       maximum is reduced (within the lane, then across the QG lanes holding the row) only when
//       some score passes it by RESCALE, so p <= 2^RESCALE and after the first tiles the reduction
//       and the rescale of O are rare; the row sums come from P times a matrix of ones on the
//       matrix cores, so they sum the very halves P.V uses;
//   shared memory (QG = 0, any element-to-lane mapping): S stored to a per-subgroup block and read
//       back by every lane (TPR lanes per row, vec4 reads, shuffles for the row max and sum), O
//       rescaled by an element-wise factor matrix loaded from shared memory when a maximum moved;
// then P (fp16) goes through shared memory, where it becomes the A operand of O += P.V. O never
// leaves the registers until the end.
// The matrix shape MM x NN x KK is the device's (specialization constants: one SPIR-V serves
// 16x16x16, 16x8x16, 8x8x16, ...), and so is the subgroup size (LANES = WG / NSG). Partial tiles are
// masked (rows past seq_q are zero and never written, keys past seq_k are zero and invisible), so
// any seq_q and seq_k run; whole key tiles a subgroup cannot see are skipped. head_dim is a
// multiple of 16 (CoopMat in shaders.py checks this and the shared-memory fit). Softcap, ALiBi,
// sinks, padding spans and general masks come from attn_common.glsl as in the scalar variants: the
// score of each element is modified and masked (masked_score, the mask read from binding 6 at the
// element's row and key) where its row and column are known (the index tiles on the register path),
// before the row maximum sees it, and a padding span bounds the key range and the tile loads.
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
// 0: the softmax reads the scores back from shared memory (any element-to-lane mapping). QG > 0:
// the softmax runs on the accumulators in registers, for mappings where every row of a tile lives
// in one group of QG lanes whose indices differ only in their low bits (NVIDIA's); the shader
// checks this at run time and answers NaN rather than a wrong result where it does not hold.
layout(constant_id = 9) const uint QG = 0;
// The lengths of the shared arrays, from the host (CoopMat.arrays in shaders.py, which also checks
// their bytes against the device's shared memory). The shared-memory path gave wrong rows on the
// H200 (NVIDIA 580) while its index-tile array had one element, though it never reads it.
layout(constant_id = 10) const uint KVS = 1;  // f16vec4: the K/V tiles, or the staged Q block if larger
layout(constant_id = 11) const uint SS4 = 1;  // vec4: the score blocks (1 on the register path)
layout(constant_id = 12) const uint IX4 = 1;  // f16vec4: the two index tiles
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
const float RESCALE = 8.0;
const bool REG = QG != 0;

layout(std430, binding = 0) readonly buffer QB { uvec4 q[]; };
layout(std430, binding = 1) readonly buffer KB { uvec4 k[]; };
layout(std430, binding = 2) readonly buffer VB { uvec4 v[]; };
layout(std430, binding = 3) writeonly buffer OB { f16vec4 o[]; };
layout(std430, binding = 3) writeonly buffer OH { float16_t oh[]; };   // the register path's element stores
layout(std430, binding = 4) writeonly buffer LB { float lse[]; };

shared f16vec4 KVs[KVS];
// Per subgroup: scores; then the rescale factors; at the end the output tiles and the row factors.
// The register path needs none of it.
shared vec4 Ss[SS4];
shared f16vec4 Ps[NSG * SR * PP4];
// Register path: the row and the column of each element of an MM x NN tile, as two tiles whose
// element (r, c) is r and c. Loaded as accumulators they give each lane its elements' places (the
// same type has the same element-to-lane mapping), read only where a place matters (masks, the
// rare row reductions, the output), so no register holds them through the key loop.
shared f16vec4 Ix[IX4];

#define ACC coopmat<float, gl_ScopeSubgroup, MM, NN, gl_MatrixUseAccumulator>
#define MATA coopmat<float16_t, gl_ScopeSubgroup, MM, KK, gl_MatrixUseA>
#define MATB coopmat<float16_t, gl_ScopeSubgroup, KK, NN, gl_MatrixUseB>
#define ACC16 coopmat<float16_t, gl_ScopeSubgroup, MM, NN, gl_MatrixUseAccumulator>

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
        if (i < BN * D8 && key_in_memory(k0 + int(r))) {
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

ACC index_tile(uint which) {
    ACC16 t;
    coopMatLoad(t, Ix, which * TILE4, NN / 4, gl_CooperativeMatrixLayoutRowMajor);
    return ACC(t);
}

// Register path: each element of an accumulator tile combined with every element of its row,
// given `ridx`, the row of each element (an accumulator of the same type: the same mapping).
// Within the lane first, then across the QG lanes that hold the rest of the row.
ACC tile_row_max(ACC x, ACC ridx) {
    ACC y = x;
    [[unroll]] for (int i = 0; i < x.length(); ++i)
        [[unroll]] for (int j = 0; j < x.length(); ++j)
            if (j != i && ridx[j] == ridx[i]) y[i] = max(y[i], x[j]);
    [[unroll]] for (uint s = 1; s < QG; s *= 2)
        [[unroll]] for (int i = 0; i < x.length(); ++i) y[i] = max(y[i], subgroupShuffleXor(y[i], s));
    return y;
}

ACC tile_row_sum(ACC x, ACC ridx) {
    ACC y = x;
    [[unroll]] for (int i = 0; i < x.length(); ++i)
        [[unroll]] for (int j = 0; j < x.length(); ++j)
            if (j != i && ridx[j] == ridx[i]) y[i] += x[j];
    [[unroll]] for (uint s = 1; s < QG; s *= 2)
        [[unroll]] for (int i = 0; i < x.length(); ++i) y[i] += subgroupShuffleXor(y[i], s);
    return y;
}

void main() {
    const uint head = gl_WorkGroupID.y;
    if (head >= pc.heads) return;   // the whole workgroup: no barrier is skipped by part of it
    set_head(head);
    const float slope2 = head_slope2(head);
    // Softcap, ALiBi or a general mask: every score changes, even in tiles the window shows whole.
    const bool modify = (pc.flags & 6u) != 0u || has_mask();
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
    if (REG) {
        [[unroll]] for (uint e0 = 0; e0 < TILE4; e0 += WG) {
            const uint e = e0 + tid;
            if (e < TILE4) {
                const float r = float(e / (NN / 4)), c = float((e % (NN / 4)) * 4);
                Ix[e] = f16vec4(r);
                Ix[TILE4 + e] = f16vec4(c, c + 1.0, c + 2.0, c + 3.0);
            }
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

    // Register path: per element of each row tile, the running maximum of its row (NaN once the
    // row has seen a NaN score) and the row's sum (from P times a matrix of ones, so it sums the
    // very halves P.V uses), accumulators of the tiles' type, so element i of one is element i of
    // the others. The path relies on each row of a tile living in one group of QG lanes.
    ACC mrow[RT];
    ACC lrow[RT];
    bool layout_ok = true;
    if (REG) {
        const ACC ridx = index_tile(0);
        const ACC count = tile_row_sum(ACC(1.0), ridx);
        bool ok = true;
        [[unroll]] for (int i = 0; i < ridx.length(); ++i) {
            ok = ok && count[i] == float(NN);
            [[unroll]] for (uint s = 1; s < QG; s *= 2) ok = ok && subgroupShuffleXor(ridx[i], s) == ridx[i];
        }
        layout_ok = subgroupAll(ok);
        [[unroll]] for (uint rt = 0; rt < RT; ++rt) {
            mrow[rt] = ACC(NEG_INF);
            lrow[rt] = ACC(0.0);
        }
    }
    const MATB ones = MATB(1.0);

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
            if (REG) {
                [[unroll]] for (uint rt = 0; rt < RT; ++rt) {
                    const int r0 = sr0 + int(rt * MM);
                    const bool full = tile_fully_visible(r0, r0 + int(MM), k0, k0 + int(BN));
                    bool grows = false;   // a score passes its row's maximum by RESCALE or more
                    [[unroll]] for (uint n = 0; n < NT; ++n)
                        [[unroll]] for (int i = 0; i < sacc[0].length(); ++i)
                            sacc[rt * NT + n][i] = SCORE(sacc[rt * NT + n][i]);
                    // The window, ALiBi and a general mask need each score's place.
                    if (!full || (pc.flags & 4u) != 0u || has_mask()) {
                        const ACC ri = index_tile(0);
                        const ACC ci = index_tile(1);
                        [[unroll]] for (uint n = 0; n < NT; ++n)
                            [[unroll]] for (int i = 0; i < ri.length(); ++i) {
                                const int qi = r0 + int(ri[i]), kj = k0 + int(n * NN) + int(ci[i]);
                                float x = masked_score(modified_score(sacc[rt * NT + n][i], qi, kj, slope2), qi, kj);
                                if (!full && !visible(qi, kj)) x = NEG_INF;
                                sacc[rt * NT + n][i] = x;
                            }
                    } else if (modify) {   // softcap alone: no index tiles to load
                        [[unroll]] for (uint n = 0; n < NT; ++n)
                            [[unroll]] for (int i = 0; i < sacc[0].length(); ++i)
                                sacc[rt * NT + n][i] = modified_score(sacc[rt * NT + n][i], 0, 0, 0.0);
                    }
                    [[unroll]] for (uint n = 0; n < NT; ++n) {
                        [[unroll]] for (int i = 0; i < sacc[0].length(); ++i) {
                            const float x = sacc[rt * NT + n][i];
                            if (isnan(x)) mrow[rt][i] = AULE_NAN;
                            grows = grows || x > mrow[rt][i] + RESCALE;
                        }
                    }
                    if (subgroupAny(grows)) {
                        ACC mx = sacc[rt * NT];
                        [[unroll]] for (uint n = 1; n < NT; ++n)
                            [[unroll]] for (int i = 0; i < mx.length(); ++i) mx[i] = max(mx[i], sacc[rt * NT + n][i]);
                        mx = tile_row_max(mx, index_tile(0));
                        ACC alpha;
                        bool moved = false;
                        [[unroll]] for (int i = 0; i < mx.length(); ++i) {
                            const float mo = mrow[rt][i], mn = mx[i] > mo + RESCALE ? mx[i] : mo;
                            alpha[i] = exp2(mo - AULE_SOFTMAX_SHIFT(mn));
                            moved = moved || (mn != mo && mo != NEG_INF);
                            mrow[rt][i] = mn;
                        }
                        if (subgroupAny(moved)) {
                            [[unroll]] for (uint t = 0; t < DN; ++t) oacc[rt * DN + t] = oacc[rt * DN + t] * alpha;
                            lrow[rt] = lrow[rt] * alpha;
                        }
                    }
                    [[unroll]] for (uint n = 0; n < NT; ++n) {
                        [[unroll]] for (int i = 0; i < sacc[0].length(); ++i)
                            sacc[rt * NT + n][i] = exp2(sacc[rt * NT + n][i] - AULE_SOFTMAX_SHIFT(mrow[rt][i]));
                        coopMatStore(ACC16(sacc[rt * NT + n]), Ps, (sg * SR + rt * MM) * PP4 + n * NN / 4, PP4,
                                     gl_CooperativeMatrixLayoutRowMajor);
                    }
                }
            } else {
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
                        if (!full || modify) {
                            [[unroll]] for (uint e = 0; e < 4; ++e) {
                                const int kj = j0 + int(c * 4 + e);
                                x[c][e] = masked_score(modified_score(x[c][e], qi, kj, slope2), qi, kj);
                                if (!full && !visible(qi, kj)) x[c][e] = NEG_INF;
                            }
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
            }
            sync();   // P is in shared memory
            [[unroll]] for (uint c = 0; c < BK; ++c) {
                MATA pa[RT];
                [[unroll]] for (uint rt = 0; rt < RT; ++rt)
                    coopMatLoad(pa[rt], Ps, (sg * SR + rt * MM) * PP4 + c * KK / 4, PP4,
                                gl_CooperativeMatrixLayoutRowMajor);
                if (REG)
                    [[unroll]] for (uint rt = 0; rt < RT; ++rt) lrow[rt] = coopMatMulAdd(pa[rt], ones, lrow[rt]);
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

    if (REG) {
        // Each element writes itself: its row's factor from whether the row saw a NaN, its maximum
        // and its sum (aule's numeric rule, mask.glsl); the column-0 element writes the row's LSE.
        const uint ob = pc.o_base + head * pc.seq_q * D;
        const ACC ridx = index_tile(0);
        const ACC cidx = index_tile(1);
        [[unroll]] for (uint rt = 0; rt < RT; ++rt) {
            ACC nan;
            [[unroll]] for (int i = 0; i < nan.length(); ++i) nan[i] = isnan(mrow[rt][i]) ? 1.0 : 0.0;
            nan = tile_row_sum(nan, ridx);
            const int r0 = sr0 + int(rt * MM);
            [[unroll]] for (int i = 0; i < ridx.length(); ++i) {
                const int qi = r0 + int(ridx[i]);
                const bool bad = nan[i] > 0.0 || !layout_ok;
                float mi = mrow[rt][i], li = lrow[rt][i];
                const float sa = join_sink(mi, li, bad, head);
                const float inv = AULE_ROW_INV(mi, li, bad) * sa;
                if (qi < int(pc.seq_q)) {
                    [[unroll]] for (uint t = 0; t < DN; ++t)
                        oh[ob + uint(qi) * D + t * NN + uint(cidx[i])] =
                            float16_t(AULE_ROW_OUT(float, oacc[rt * DN + t][i], inv));
                    if ((pc.flags & 1u) != 0u && cidx[i] == 0.0)
                        lse[pc.lse_base + head * pc.seq_q + uint(qi)] = AULE_ROW_LSE2(mi, li, bad) * LN2;
                }
            }
        }
    } else {
        // The row factors (aule's numeric rule, mask.glsl) go beside the output staging tile.
        [[unroll]] for (uint rr = 0; rr < RPL; ++rr) {
            const uint row = lane / TPR + rr * RSTEP;
            const int qi = sr0 + int(row);
            const float sa = join_sink(m[rr], l[rr], bad[rr], head);
            if (h == 0) {
                Ss[sg * ST4 + TILE4 + row / 4][row % 4] = AULE_ROW_INV(m[rr], l[rr], bad[rr]) * sa;
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
}

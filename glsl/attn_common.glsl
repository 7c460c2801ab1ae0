// Shared by every attention entry point: push constants and the visibility rule over them.
// The mask arithmetic mirrors aule/masks.py exactly (bottom-right alignment, canonical left/right).
#ifndef AULE_ATTN_COMMON
#define AULE_ATTN_COMMON

#include "mask.glsl"

const float LN2 = 0.69314718055994530942;   // log-sum-exp: base 2 inside, natural log out

// A score in base 2 from the fp32 dot product q.k: scaled after the product, never folded into q,
// so half q needs no room for the scale and equal products (exact for integer-valued inputs such
// as +-1e4) stay equal scores, as in the reference.
#define SCORE(qk) ((qk) * pc.scale_log2)

// Mirrored in aule/backends/vulkan/shaders.py (ATTN_PUSH); 4-byte fields only, order matters.
layout(push_constant) uniform Params {
    uint seq_q;       // rows per head
    uint seq_k;       // keys per head
    uint group;       // heads_q / heads_kv (GQA): query head h reads KV head h / group
    uint heads;       // flat (batch*head_q) heads covered by this dispatch
    int left;         // keys j >= pos - left are visible; -1 = unbounded
    int right;        // keys j <= pos + right are visible; -1 = unbounded
    float scale_log2; // softmax scale * log2(e): exp2 replaces exp
    uint flags;       // bit 0: write the log-sum-exp
    uint q_base;      // element offsets (in the binding's element type) of this dispatch's
    uint k_base;      // first head; the rest of the offset is in the descriptor, which must
    uint v_base;      // be aligned to minStorageBufferOffsetAlignment
    uint o_base;
    uint lse_base;
    uint reverse;     // 1: hand out query blocks last-first (causal: the longest rows start first)
} pc;

int key_offset() { return int(pc.seq_k) - int(pc.seq_q); }

// masks.key_range: keys [lo, hi) that rows [q0, q1) can see together.
ivec2 key_range(int q0, int q1) {
    int off = key_offset();
    int lo = pc.left < 0 ? 0 : max(0, q0 + off - pc.left);
    int hi = pc.right < 0 ? int(pc.seq_k) : min(int(pc.seq_k), q1 - 1 + off + pc.right + 1);
    return ivec2(lo, hi);
}

// masks.visible for one (row, key) pair.
bool visible(int i, int j) {
    int pos = i + key_offset();
    return AULE_VISIBLE(pos, j, int(pc.seq_k), pc.left, pc.right);
}

// masks.tile_fully_visible: true when no pair of the tile needs the mask.
bool tile_fully_visible(int q0, int q1, int k0, int k1) {
    int off = key_offset();
    if (k0 < 0 || k1 > int(pc.seq_k)) return false;
    if (pc.left >= 0 && k0 < (q1 - 1 + off) - pc.left) return false;
    if (pc.right >= 0 && k1 - 1 > q0 + off + pc.right) return false;
    return true;
}

// The query block this workgroup owns; causal work grows with the block index, so handing the
// last blocks out first keeps the tail of the dispatch short.
uint query_block() {
    return pc.reverse != 0u ? gl_NumWorkGroups.x - 1u - gl_WorkGroupID.x : gl_WorkGroupID.x;
}

#endif

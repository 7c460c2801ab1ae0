// Shared by every attention entry point: push constants and the visibility rule over them.
// The mask arithmetic mirrors aule/masks.py exactly (bottom-right alignment, canonical left/right).
#ifndef AULE_ATTN_COMMON
#define AULE_ATTN_COMMON

#include "mask.glsl"

const float LN2 = 0.69314718055994530942;   // log-sum-exp: base 2 inside, natural log out
const float LOG2E = 1.44269504088896340736;

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
    float softcap2;   // softcap * log2(e) where flags bit 1 is set: the cap of base-2 scores
    uint x_base;      // flat head of this dispatch's first head in `extras` (binding 5)
    uint x_stride;    // flat heads of the whole call: the sinks follow the slopes
    uint mask_row;    // element strides of a general mask (binding 6) along seq_q and seq_k:
    uint mask_col;    // 0 where the mask broadcasts that dimension
} pc;

int key_offset() { return int(pc.seq_k) - int(pc.seq_q); }

// Optional score modifiers, sinks and masks (aule/masks.py), switched by flags: bit 1 softcap,
// bit 2 ALiBi, bit 3 sinks, bit 4 a span of visible keys per head (a padding mask), bit 5 a general
// mask in binding 6. Five rows of 32-bit words per flat (batch, query head) h: its slope and its
// sink (float bits, natural units) at extras[x_base + h] and extras[x_base + x_stride + h], its
// span [start, end) at rows 2 and 3, the element offset of its [seq_q, seq_k] plane of the general
// mask at row 4. Calls without them bind any buffer here; nothing reads it.
layout(std430, binding = 5) readonly buffer XB { uint extras[]; };

// A general attn_mask as float32 in its broadcast shape (booleans as 0 / -inf), natural units,
// added to the scores; bound whole. Row i, key j of flat head h is element
// extras[x_base + 4 x_stride + h] + i * mask_row + j * mask_col.
layout(std430, binding = 6) readonly buffer MB { float attn_mask[]; };

// The span of the flat head this invocation works on, read once (set_head): it bounds every key
// range, visibility test and tile load, which run per key.
int aule_span_lo = 0;
int aule_span_hi = 0;
uint aule_mask_base = 0u;   // the head's plane of the general mask

bool has_span() { return (pc.flags & 16u) != 0u; }
bool has_mask() { return (pc.flags & 32u) != 0u; }
int span_lo() { return aule_span_lo; }
int span_hi() { return aule_span_hi; }

void set_head(uint head) {
    if (has_span()) {
        aule_span_lo = int(extras[pc.x_base + 2u * pc.x_stride + head]);
        aule_span_hi = int(extras[pc.x_base + 3u * pc.x_stride + head]);
    }
    if (has_mask()) aule_mask_base = extras[pc.x_base + 4u * pc.x_stride + head];
}

// The general mask's entry for query row i and key j of the head (natural units; 0 without one).
// Rows and keys past the ends are clamped to the last ones: shaders score whole blocks, and those
// slots are never visible, so only the read must stay inside the buffer.
float mask_term(int i, int j) {
    if (!has_mask()) return 0.0;
    const uint r = uint(clamp(i, 0, int(pc.seq_q) - 1));
    const uint c = uint(clamp(j, 0, int(pc.seq_k) - 1));
    return attn_mask[aule_mask_base + r * pc.mask_row + c * pc.mask_col];
}

// Base-2 score s2 of row i and key j with the general mask applied, after modified_score, as
// masks.apply_attn_mask orders it: the entry is added, and -inf hides the key whatever s2 was
// (+inf - inf would be NaN). A NaN entry makes the score NaN, which the visibility test then
// leaves to the window: only a key the window shows makes its row NaN.
float masked_score(float s2, int i, int j) {
    if (!has_mask()) return s2;
    const float t = mask_term(i, j);
    return t == NEG_INF ? NEG_INF : s2 + t * LOG2E;
}

// Whether key j of a tile may be read from memory: within the keys and, under a padding mask, its
// head's span. Keys outside are never loaded (a padding key's NaN must not reach a row as 0 * NaN).
bool key_in_memory(int j) {
    return j < int(pc.seq_k) && (!has_span() || (j >= span_lo() && j < span_hi()));
}

// The key a tile's slot j loads instead, for shaders that fill whole blocks: j itself where it may
// be read, else the nearest key that may (invisible to every row of the slot, so only its value's
// finiteness matters). Only called on blocks that hold at least one readable key.
int readable_key(int j) {
    const int hi = has_span() ? min(int(pc.seq_k), span_hi()) : int(pc.seq_k);
    const int lo = has_span() ? span_lo() : 0;
    return clamp(j, lo, hi - 1);
}

// A head's ALiBi slope for base-2 scores (0 without ALiBi).
float head_slope2(uint head) {
    return (pc.flags & 4u) != 0u ? uintBitsToFloat(extras[pc.x_base + head]) * LOG2E : 0.0;
}

// Score s2 (base 2) of query row i and key j after softcap, then ALiBi, as masks.py orders them;
// masking comes after. tanh from exp2 keeps +-inf at +-1 and NaN NaN, which GLSL's tanh leaves
// undefined.
float modified_score(float s2, int i, int j, float slope2) {
    if ((pc.flags & 2u) != 0u) {
        const float t = s2 / pc.softcap2;
        s2 = pc.softcap2 * (1.0 - 2.0 / (exp2(2.0 * LOG2E * t) + 1.0));
    }
    if ((pc.flags & 4u) != 0u) s2 -= slope2 * abs(float(i + key_offset() - j));
    return s2;
}

// The head's sink joined to a finished row's (m, l) as one more term of value 0 (masks._join_sink);
// returns the factor its accumulators take. NaN and +inf rows keep their rule; a row that saw no
// key gets m = sink, l = 1 and factor 0: zeros, LSE = sink.
float join_sink(inout float m, inout float l, bool bad, uint head) {
    if ((pc.flags & 8u) == 0u || bad || m == POS_INF) return 1.0;
    const float sink2 = uintBitsToFloat(extras[pc.x_base + pc.x_stride + head]) * LOG2E;
    const float mn = max(m, sink2);
    const float a = exp2(m - mn);
    l = l * a + exp2(sink2 - mn);
    m = mn;
    return a;
}


// masks.key_range: keys [lo, hi) that rows [q0, q1) can see together.
ivec2 key_range(int q0, int q1) {
    int off = key_offset();
    int lo = pc.left < 0 ? 0 : max(0, q0 + off - pc.left);
    int hi = pc.right < 0 ? int(pc.seq_k) : min(int(pc.seq_k), q1 - 1 + off + pc.right + 1);
    if (has_span()) {
        lo = max(lo, span_lo());
        hi = max(lo, min(hi, span_hi()));
    }
    return ivec2(lo, hi);
}

// masks.visible for one (row, key) pair.
bool visible(int i, int j) {
    int pos = i + key_offset();
    return AULE_VISIBLE(pos, j, int(pc.seq_k), pc.left, pc.right)
        && (!has_span() || (j >= span_lo() && j < span_hi()));
}

// masks.tile_fully_visible: true when no pair of the tile needs the mask.
bool tile_fully_visible(int q0, int q1, int k0, int k1) {
    int off = key_offset();
    if (k0 < 0 || k1 > int(pc.seq_k)) return false;
    if (has_span() && (k0 < span_lo() || k1 > span_hi())) return false;
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

#version 450
// copy_kv_to_paged: token t's K and V rows (heads_kv * head_dim elements, moved as 32-bit words,
// so one module serves every storage type) go from slot src_slots[t] of the sources to slot
// dst_slots[t] of the cache; a negative destination slot skips the token (vLLM's
// reshape_and_cache convention). Appends use src_slots[t] = t; copy-on-write of a shared block
// uses the cache itself as source, with disjoint slots.
layout(constant_id = 0) const uint WG = 64;
layout(local_size_x_id = 0) in;

// Mirrored in aule/backends/vulkan/shaders.py (COPY_PUSH).
layout(push_constant) uniform CopyParams {
    uint row_words;   // 32-bit words per slot (heads_kv * head_dim * itemsize / 4)
    uint num_tokens;
    uint token_base;  // first token of this dispatch (the grid is limited to 65535 groups)
} pc;

#ifdef AULE_SPLIT
// A cache split across device buffers (aule/backends/vulkan/plans.py cache_split) as arrays of its
// pieces, SLOTS_PER_PIECE slots each (the last may hold fewer); the source is the new rows (one
// piece) or, for copy-on-write, the cache itself. A token's slots, so its pieces, are the same for
// the whole workgroup: the arrays are indexed by a dynamically uniform value.
layout(constant_id = 1) const uint SRC_PIECES = 1;
layout(constant_id = 2) const uint DST_PIECES = 2;
layout(constant_id = 3) const uint SLOTS_PER_PIECE = 1;
layout(std430, binding = 0) readonly buffer SK { uint d[]; } src_k[SRC_PIECES];
layout(std430, binding = 1) readonly buffer SV { uint d[]; } src_v[SRC_PIECES];
layout(std430, binding = 2) buffer DK { uint d[]; } dst_k[DST_PIECES];
layout(std430, binding = 3) buffer DV { uint d[]; } dst_v[DST_PIECES];
#define SRC_K(i) src_k[sp].d[i]
#define SRC_V(i) src_v[sp].d[i]
#define DST_K(i) dst_k[dp].d[i]
#define DST_V(i) dst_v[dp].d[i]
#else
layout(std430, binding = 0) readonly buffer SK { uint src_k[]; };
layout(std430, binding = 1) readonly buffer SV { uint src_v[]; };
layout(std430, binding = 2) buffer DK { uint dst_k[]; };
layout(std430, binding = 3) buffer DV { uint dst_v[]; };
#define SRC_K(i) src_k[i]
#define SRC_V(i) src_v[i]
#define DST_K(i) dst_k[i]
#define DST_V(i) dst_v[i]
#endif
layout(std430, binding = 4) readonly buffer SS { int src_slots[]; };
layout(std430, binding = 5) readonly buffer DS { int dst_slots[]; };

void main() {
    uint t = pc.token_base + gl_WorkGroupID.x;
    if (t >= pc.num_tokens) return;
    int dst = dst_slots[t];
    if (dst < 0) return;
    uint src = uint(src_slots[t]), to = uint(dst);
#ifdef AULE_SPLIT
    const uint sp = SRC_PIECES == 1u ? 0u : src / SLOTS_PER_PIECE;
    const uint dp = to / SLOTS_PER_PIECE;
    src -= sp * SLOTS_PER_PIECE;
    to -= dp * SLOTS_PER_PIECE;
#endif
    uint s = src * pc.row_words, d = to * pc.row_words;
    for (uint i = gl_LocalInvocationID.x; i < pc.row_words; i += WG) {
        DST_K(d + i) = SRC_K(s + i);
        DST_V(d + i) = SRC_V(s + i);
    }
}

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

layout(std430, binding = 0) readonly buffer SK { uint src_k[]; };
layout(std430, binding = 1) readonly buffer SV { uint src_v[]; };
layout(std430, binding = 2) buffer DK { uint dst_k[]; };
layout(std430, binding = 3) buffer DV { uint dst_v[]; };
layout(std430, binding = 4) readonly buffer SS { int src_slots[]; };
layout(std430, binding = 5) readonly buffer DS { int dst_slots[]; };

void main() {
    uint t = pc.token_base + gl_WorkGroupID.x;
    if (t >= pc.num_tokens) return;
    int dst = dst_slots[t];
    if (dst < 0) return;
    uint s = uint(src_slots[t]) * pc.row_words, d = uint(dst) * pc.row_words;
    for (uint i = gl_LocalInvocationID.x; i < pc.row_words; i += WG) {
        dst_k[d + i] = src_k[s + i];
        dst_v[d + i] = src_v[s + i];
    }
}

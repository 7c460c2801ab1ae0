#version 450
// varlen_repack: a varlen call's rows between the caller's packed, tokens-first layout
// ([total, heads, head_dim]) and the heads-first block of each sequence ([heads, len, head_dim])
// that the attention shaders read, on the device: on the host this transposing copy cost more
// than the upload itself. Rows move as 32-bit words, so one module serves every storage type, or
// as 16-byte words with AULE_VEC4 where every row is whole 16-byte words (fewer, wider accesses).
// One workgroup per token, moving its heads' rows (contiguous on the packed side; one row per head
// on the block side); `tables` (aule/backends/vulkan/launch.py, varlen_tables) map each token to
// its sequence's record, and the record to its block. A dispatch binds a window of both buffers
// (the storage-buffer range bounds a binding): consecutive whole sequences, or one head and some
// tokens of a sequence too large for that; the windows' first words are given as origins.
layout(constant_id = 0) const uint WG = 128;
layout(local_size_x_id = 0) in;

// Mirrored in aule/backends/vulkan/shaders.py (REPACK_PUSH).
layout(push_constant) uniform RepackParams {
    uint row_words;     // head_dim * itemsize / sizeof(WORD); every offset here counts WORDs
    uint heads;
    uint head_base;     // heads [head_base, head_end) are moved (a sequence too large for one
    uint head_end;      // binding is cut, one head at a time)
    uint token_base;    // first token of this dispatch (the grid is limited to 65535 groups)
    uint token_end;     // one past its last token
    uint packed_origin; // word of the packed tensor where the packed binding starts
    uint block_origin;  // word of the blocks buffer where the block binding starts
    uint piece_of;      // word of `tables` where the token -> record column starts
    uint record_base;   // word of `tables` of record 0's (first token, length, first word) fields
    uint unpack;        // 0: packed -> blocks (inputs); 1: blocks -> packed (the output)
} pc;

// A record is RECORD words: (first query token, query rows, first word of its q and output
// blocks, first key token, keys, first word of its k and v blocks); record_base picks the triple.
const uint RECORD = 6u;
const uint NONE = 0xFFFFFFFFu;  // a token no dispatch of this module moves (no keys, no rows)

#ifdef AULE_VEC4
#define WORD uvec4
const uint TABLE_WORDS = 4u;  // 32-bit words per moved word: the tables count 32-bit words
#else
#define WORD uint
const uint TABLE_WORDS = 1u;
#endif
layout(std430, binding = 0) buffer PB { WORD packed_rows[]; };
layout(std430, binding = 1) buffer BB { WORD block_rows[]; };
layout(std430, binding = 2) readonly buffer TB { uint tables[]; };

void main() {
    const uint t = pc.token_base + gl_WorkGroupID.x;
    if (t >= pc.token_end) return;
    const uint piece = tables[pc.piece_of + t];
    if (piece == NONE) return;
    const uint r = pc.record_base + RECORD * piece;
    const uint first = tables[r], len = tables[r + 1u], base = tables[r + 2u] / TABLE_WORDS;
    const uint w = pc.row_words;
    // Word i of head h: packed at (t * heads + h) * w + i, in the block at base + (h * len + t -
    // first) * w + i. The uint arithmetic wraps; within a window every offset is below 2**32.
    const uint p0 = t * pc.heads * w - pc.packed_origin;
    const uint b0 = base + (t - first) * w - pc.block_origin;
    // Consecutive lanes take consecutive words of a row; a workgroup wider than a row takes
    // several heads' rows at once. The lane's place is divided out once, not per word.
    const uint lanes = min(w, WG), rows = WG / lanes;
    const uint lane = gl_LocalInvocationID.x % lanes, row = gl_LocalInvocationID.x / lanes;
    if (row >= rows) return;
    for (uint h = pc.head_base + row; h < pc.head_end; h += rows) {
        for (uint i = lane; i < w; i += lanes) {
            const uint p = p0 + h * w + i, b = b0 + h * len * w + i;
            if (pc.unpack != 0u) packed_rows[p] = block_rows[b]; else block_rows[b] = packed_rows[p];
        }
    }
}

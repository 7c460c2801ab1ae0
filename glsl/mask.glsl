// The visibility rule and the online-softmax shift, shared by every attention entry point (through
// attn_common.glsl) and by paged.comp, which has bindings and push constants of its own. They follow
// aule/masks.py exactly.
//
// Macros, not functions: glslang emits one SPIR-V function per GLSL function and leaves inlining to
// the driver, so a macro keeps each user's code what it was when the rule was written in place.
#ifndef AULE_MASK
#define AULE_MASK

const float NEG_INF = -1.0 / 0.0;

// masks.visible: key j of n is visible from query position pos under the window (left, right),
// where -1 leaves that side unbounded.
#define AULE_VISIBLE(pos, j, n, left, right) \
    ((j) >= 0 && (j) < (n) && ((left) < 0 || (j) >= (pos) - (left)) && ((right) < 0 || (j) <= (pos) + (right)))

// The shift of a row's exp2 once its running maximum is m. A row that has seen no visible key keeps
// m = -inf; shifting it by 0 keeps every p at 0 instead of NaN.
#define AULE_SOFTMAX_SHIFT(m) ((m) == NEG_INF ? 0.0 : (m))

#endif

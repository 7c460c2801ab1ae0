// The visibility rule, the online-softmax shift and the numeric rule of a finished row, shared by
// every attention entry point (through attn_common.glsl) and by paged.comp, which has bindings and
// push constants of its own. They follow aule/masks.py exactly.
//
// Macros, not functions: glslang emits one SPIR-V function per GLSL function and leaves inlining to
// the driver, so a macro keeps each user's code what it was when the rule was written in place.
#ifndef AULE_MASK
#define AULE_MASK

const float NEG_INF = -1.0 / 0.0;
const float POS_INF = 1.0 / 0.0;
// A quiet NaN, built from its bits: glslang would fold 0.0 / 0.0 with a warning.
#define AULE_NAN uintBitsToFloat(0x7fc00000u)

// masks.visible: key j of n is visible from query position pos under the window (left, right),
// where -1 leaves that side unbounded.
#define AULE_VISIBLE(pos, j, n, left, right) \
    ((j) >= 0 && (j) < (n) && ((left) < 0 || (j) >= (pos) - (left)) && ((right) < 0 || (j) <= (pos) + (right)))

// The shift of a row's exp2 once its running maximum is m. A row that has seen no visible key keeps
// m = -inf; shifting it by 0 keeps every p at 0 instead of NaN.
#define AULE_SOFTMAX_SHIFT(m) ((m) == NEG_INF ? 0.0 : (m))

// A finished row, from its running maximum m (base 2), its sum l and `bad`: whether a visible score
// was NaN. GLSL's max() is undefined for NaN, so m means nothing once bad is set; the rule (aule's
// numeric rule, torch's math) then decides from bad and m alone:
//   bad            -> output NaN, LSE NaN
//   m == +inf      -> output NaN (torch's inf - inf), LSE +inf
//   m == -inf      -> no visible key, or every visible score -inf: zeros, LSE -inf
//   else           -> acc / l, LSE m + log2(l)
// AULE_ROW_INV is the factor of the accumulators: NaN, 0 (empty row) or 1/l (l >= 1 once m is finite).
#define AULE_ROW_INV(m, l, bad) ((bad) || (m) == POS_INF ? AULE_NAN : ((m) == NEG_INF ? 0.0 : 1.0 / (l)))
// The output of an accumulator of type T: exact zeros for an empty row, even where a masked key's
// value was Inf or NaN (0 * Inf is NaN).
#define AULE_ROW_OUT(T, acc, inv) ((inv) == 0.0 ? T(0.0) : (acc) * (inv))
// The base-2 log-sum-exp (multiply by LN2 for the natural log).
#define AULE_ROW_LSE2(m, l, bad) \
    ((bad) ? AULE_NAN : ((m) == NEG_INF || (m) == POS_INF ? (m) : (m) + log2(l)))

#endif

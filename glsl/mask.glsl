// The visibility rule, the online-softmax shift and the numeric rule of a finished row, shared by
// every attention entry point (through attn_common.glsl) and by paged.comp, which has bindings and
// push constants of its own. They follow aule/masks.py exactly.
//
// Macros, not functions: glslang emits one SPIR-V function per GLSL function and leaves inlining to
// the driver, so a macro keeps each user's code what it was when the rule was written in place.
#ifndef AULE_MASK
#define AULE_MASK

const float LN2 = 0.69314718055994530942;   // log-sum-exp: base 2 inside, natural log out
const float LOG2E = 1.44269504088896340736;
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

// softcap (aule/masks.py) on a base-2 score s2 with the cap c2 = softcap * log2(e): c2 * tanh(s2 / c2),
// the tanh from exp2, so +-inf gives +-c2 and NaN stays NaN (GLSL's tanh leaves both undefined).
#define AULE_SOFTCAP2(s2, c2) ((c2) * (1.0 - 2.0 / (exp2(2.0 * LOG2E * ((s2) / (c2))) + 1.0)))

// ALiBi on a base-2 score: the slope (base 2) times the distance between query position and key.
#define AULE_ALIBI2(s2, slope2, pos, j) ((s2) - (slope2) * abs(float((pos) - (j))))

// A finished row's (m, l), both base 2, joined by a sink of base-2 logit sink2 as one more term of
// value 0 (masks._join_sink): the factor its accumulators take, 0 for a row that saw no key (m = -inf).
// Callers keep NaN and +inf rows out (their rule stands).
#define AULE_JOIN_SINK(m, l, sink2, a) { \
    const float aule_mn = max((m), (sink2)); \
    (a) = exp2((m) - aule_mn); \
    (l) = (l) * (a) + exp2((sink2) - aule_mn); \
    (m) = aule_mn; }

#endif

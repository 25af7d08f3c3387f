// The gradient terms of a unique winner, g * dcx(x, w) and g * dcw(x, w), for the winner
// backwards' per-output routing (kernel_winner.h's pass 1, kernel_dense_backward.h's pass B).
//
// max_min / min_max's partials are 1 for the operand that won, 0 for the other and 1/2 on a
// tie x == w. Written as the selects of kernel_ops.h, the compiler turns "1" into a branch
// that skips the multiply, and which operand wins is a coin flip on real data: perf on layer
// A's backward (Zen 4, one thread) put a fifth of pass 1's time on that branch and its
// neighbours. Here the select is a blend of SSE registers on x86 (no branch), with the same
// bits: g where the partial is 1 (what the branch gave), g * 0.5 or g * 0 otherwise.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_ops.h, never on its own.
#pragma once

// g * (a < b ? 1 : a == b ? 0.5 : 0), with g itself for the 1.
inline float win_term(float g, float a, float b) {
#if defined(__SSE4_1__) && (defined(__x86_64__) || defined(_M_X64))
  const __m128 gv = _mm_set_ss(g), av = _mm_set_ss(a), bv = _mm_set_ss(b);
  const __m128 half = _mm_and_ps(_mm_cmpeq_ss(av, bv), _mm_set_ss(0.5f));
  return _mm_cvtss_f32(_mm_blendv_ps(_mm_mul_ss(gv, half), gv, _mm_cmplt_ss(av, bv)));
#else
  return a < b ? g : g * (a == b ? 0.5f : 0.0f);
#endif
}

// WinTerms<Op>::x(g, x, w) = g * dcx(x, w) and ::w(g, x, w) = g * dcw(x, w), bit for bit.
template <class Op>
struct WinTerms {
  static float x(float g, float xv, float wv) { return g * Op::template dcx<Sc>(xv, wv); }
  static float w(float g, float xv, float wv) { return g * Op::template dcw<Sc>(xv, wv); }
};
// min(x, w): x's partial is 1 where x < w.
template <>
struct WinTerms<MaxMin> {
  static float x(float g, float xv, float wv) { return win_term(g, xv, wv); }
  static float w(float g, float xv, float wv) { return win_term(g, wv, xv); }
};
// max(x, w): x's partial is 1 where w < x.
template <>
struct WinTerms<MinMax> {
  static float x(float g, float xv, float wv) { return win_term(g, wv, xv); }
  static float w(float g, float xv, float wv) { return win_term(g, xv, wv); }
};

// The low-precision winner scan's products (kernel_wide_lowwin.h, low_scan_rows) with the
// input value read as an AVX-512 embedded broadcast ({1to16}), as kernel_bcast.h does for the
// float32 forward and winner scan: the combine's own instruction reads x from memory, instead
// of one vbroadcastss per position and row shared by the row's vectors (2 per 8 vector terms
// in this 2 x 4 scan, more per term than the forward's 6 x 4 tile, where the separate
// broadcasts cost ~20% on Zen 4).
//
// The built-in max/min ops only (their products are one instruction): x + w under max / min,
// issued alternately on the FMA ports (fma(x, 1, w)) and the add ports as low_pass does;
// min(x, w) under max and max(x, w) under min as one vminps / vmaxps, then compared with the
// bound. The same matches as low_pass's: x + w rounds once in either form; min(x, w) >= y
// exactly when x >= y and w >= y, for numbers (either zero of a tie compares equal to y); a
// NaN operand in a window makes its y NaN, whose bound is NaN and matches nothing, so which
// operand vminps returns for a NaN does not matter (and a missing tap's bound is NaN too).
//
// The assembly names the pointer, not the float it reads (a memory operand made GCC spill
// the accumulators in kernel_bcast.h's loop): nothing writes x or the pad row while the scan
// runs (XLA's input, the fill vector written before the parallel region).
//
// Included by kernel_wide_lowwin.h (same namespace and vector width).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "kernel_wide.h"

namespace JAXCONV_WIDE_NS {

// LowBc<Op, Max>::kOn: the scan's product of Op has an embedded-broadcast form here;
// LowBc<Op, Max>::comb(x, w, j) is that product for lane block j (x read from *x).
template <class Op, bool Max>
struct LowBc {
  static constexpr bool kOn = false;
};
inline void lowbc_keep(VecOf<float>&);

#if JAXCONV_WIDE_BYTES == 64 && defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
// fma(x, 1, w) = x + w. The copy of w is made inside the assembly: with w as the read-write
// operand the compiler reloads w from the panel for each fma instead (a load more per
// product, on ports this scan already loads with the broadcasts).
inline VecOf<float> lowbc_fma(const float* x, VecOf<float> w) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __m512 s;
  __asm__("vmovaps %[w], %[s]\n\tvfmadd231ps (%[x])%{1to16%}, %[one], %[s]"
          : [s] "=&v"(s) : [w] "v"((__m512)w), [one] "v"(one), [x] "r"(x));
  return (VecOf<float>)s;
}
inline VecOf<float> lowbc_add(const float* x, VecOf<float> w) {  // w + x
  __m512 s;
  __asm__("vaddps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"((__m512)w), [x] "r"(x));
  return (VecOf<float>)s;
}
inline VecOf<float> lowbc_min(const float* x, VecOf<float> w) {  // min(w, x)
  __m512 s;
  __asm__("vminps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"((__m512)w), [x] "r"(x));
  return (VecOf<float>)s;
}
inline VecOf<float> lowbc_max(const float* x, VecOf<float> w) {  // max(w, x)
  __m512 s;
  __asm__("vmaxps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"((__m512)w), [x] "r"(x));
  return (VecOf<float>)s;
}

// Makes v's value opaque, so the compiler keeps it in a register instead of reloading it.
inline void lowbc_keep(VecOf<float>& v) { __asm__("" : "+v"(v)); }

// x + w under max or min.
template <int Red>
struct LowBc<WideOp<0, Red>, Red == 0> {
  static constexpr bool kOn = true;
  static VecOf<float> comb(const float* x, VecOf<float> w, int j) {
    return (j & 1) ? lowbc_add(x, w) : lowbc_fma(x, w);
  }
};
// min(x, w) under max, max(x, w) under min.
template <>
struct LowBc<WideOp<1, 0>, true> {
  static constexpr bool kOn = true;
  static VecOf<float> comb(const float* x, VecOf<float> w, int) { return lowbc_min(x, w); }
};
template <>
struct LowBc<WideOp<2, 1>, false> {
  static constexpr bool kOn = true;
  static VecOf<float> comb(const float* x, VecOf<float> w, int) { return lowbc_max(x, w); }
};
#endif

}  // namespace JAXCONV_WIDE_NS

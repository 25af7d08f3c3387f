// The dense sums backward's term (kernel_sumbwd_dense.h) with the cotangent read by the
// instructions themselves: on AVX-512 the two fused multiply-adds of adder's and l1's term
// take g[p, o] as an embedded broadcast ({1to16}) instead of one vbroadcastss per position
// and output channel shared by the tile's V vectors. The separate broadcast of a 512-bit
// register takes an issue slot of the vector ports (kernel_bcast.h measured it on the
// forward): adder's term is two add-port operations (x - w, the clip) and two on the FMA
// ports, so on Zen 4 each broadcast costs the loop time; the embedded one is a load only.
// Zen 4, one thread, E (256 x 1024 @ 1024 x 1024), the tile loop alone: adder 13.5 -> 11.6
// ms, the same bits.
//
// l1's term (x - w on the add ports; its sign, the two fused multiply-adds on the FMA ports)
// leaves the add ports two thirds idle. With `split`, two terms in three take the product
// form instead: gh = g sign(x - w) (exact: the sign is -1, 0 or 1), dx -= gh, dw += gh on the
// add ports, the same bits as the fused forms (each rounds dx - g h and dw + g h once, with g
// h exact). Three terms then cost 7 operations on each kind of port instead of 9 on the FMA
// ports: the tile loop 16.1 -> 13.5-13.9 ms. On a CPU whose 512-bit add and FMA share ports
// (Intel) the product form is one operation more per term: kernel_params.h's `l1_split`
// turns it off.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once
// per instruction set), after kernel_sums_paired.h, never on its own.
#pragma once

// MemCot<Op>::kOn: Op's pair term has the memory-cotangent form on this instruction set;
// MemCot<Op>::term(g, x, w, dx, dw, prod) is PairRule<Op>::term(set1(*g), x, w, dx, dw) (the
// product form where `prod` and Op is l1), bit for bit.
template <class Op>
struct MemCot {
  static constexpr bool kOn = false;
};

#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
// Inline assembly, as in kernel_bcast.h: with intrinsics the compiler shares one broadcast
// register between the uses of g (the form this avoids). The asm names the pointer, not the
// float it reads (nothing writes the cotangent during the backward).
inline __m512 mc_fma(const float* g, __m512 a, __m512 acc) {  // acc + g a
  __asm__("vfmadd231ps (%[g])%{1to16%}, %[a], %[s]" : [s] "+v"(acc) : [a] "v"(a), [g] "r"(g));
  return acc;
}
inline __m512 mc_fnma(const float* g, __m512 a, __m512 acc) {  // acc - g a
  __asm__("vfnmadd231ps (%[g])%{1to16%}, %[a], %[s]" : [s] "+v"(acc) : [a] "v"(a), [g] "r"(g));
  return acc;
}
inline __m512 mc_mul(const float* g, __m512 a) {  // g a
  __m512 s;
  __asm__("vmulps (%[g])%{1to16%}, %[a], %[s]" : [s] "=v"(s) : [a] "v"(a), [g] "r"(g));
  return s;
}

template <class Clip>
struct MemCot<AdderOf<Clip>> {
  static constexpr bool kOn = true;
  static void term(const float* g, S::V x, S::V w, S::V& dx, S::V& dw, bool) {
    const S::V d = S::sub(x, w);
    dx = mc_fnma(g, AdderOf<Clip>::template clip<S>(d), dx);
    dw = mc_fma(g, d, dw);
  }
};
template <>
struct MemCot<L1> {
  static constexpr bool kOn = true;
  static void term(const float* g, S::V x, S::V w, S::V& dx, S::V& dw, bool prod) {
    const S::V h = L1::hw<S>(x, w);
    if (prod) {
      const S::V gh = mc_mul(g, h);
      dx = S::sub(dx, gh);
      dw = S::add(dw, gh);
    } else {
      dx = mc_fnma(g, h, dx);
      dw = mc_fma(g, h, dw);
    }
  }
};
#endif

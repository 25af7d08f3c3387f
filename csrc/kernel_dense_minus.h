// x - w under max / min ("max_minus", "min_minus"): the kernels of a user op whose combine's
// traced program is the difference of the operands (jaxconv/_src/engines/native/twins.py), so
// that `tanh(x - w)` under a max runs the built-in loops -- the recording forward and the
// blocked backward of dense products included -- without a negated copy of the kernel.
//
// Why not the negation folded into the packing: the kernel is read unpacked in several places
// (the zero-sign fix, the backward's transposed columns, the general rescan), each of which
// would have to negate too. The difference as the functor's combine costs what x + w costs:
// fma(x, 1, -w) = fmsub(x, 1, w) on the FMA ports (x + (-w) rounded once, which is x - w in
// IEEE arithmetic: NaN, infinities and zero signs included), or a subtract on the add ports
// (`fma_add` = 0). The embedded broadcast form (`bcast`) is vfmsub231ps with x read as
// {1to16}: one * x - w, one instruction as x + w's vfmadd231ps. Its partials are 1 and -1: the
// kernel gradient of a winner is -g, of a tie's share -share (exact negations).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_bcast.h, never on its own.
#pragma once

template <class R>
struct Minus : R {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::subf(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) { return T::subf(x, w); }
  template <class T> static VT<T> dcx(VT<T>, VT<T>) { return T::set1(1.0f); }
  template <class T> static VT<T> dcw(VT<T>, VT<T>) { return T::set1(-1.0f); }
};
using MaxMinus = Minus<MaxR>;
using MinMinus = Minus<MinR>;

// x - w on the add ports (`fma_add` = 0): the same rounding.
template <class R>
struct MinusAdd : Minus<R> {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::sub(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) { return T::sub(x, w); }
};
template <class R>
struct AddOf<Minus<R>> {
  using type = MinusAdd<R>;
};

#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
// fmsub(x, 1, w) with x read as {1to16}: vfmsub231ps s = one * x - s, s starting as w.
inline __m512 bc_subf(const float* x, __m512 w) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __asm__("vfmsub231ps (%[x])%{1to16%}, %[one], %[s]" : [s] "+v"(w) : [one] "v"(one), [x] "r"(x));
  return w;
}
template <class R>
struct Bc<Minus<R>> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    return R::template red<S>(acc, bc_subf(x, w));
  }
};
// (MinusAdd has no one-instruction broadcast form: vsubps's memory operand is the subtrahend.)
template <class R>
struct ScanBc<Minus<R>> {
  static constexpr bool kOn = true;
  static S::V comb(const float* x, S::V w, int) { return bc_subf(x, w); }
};
#endif

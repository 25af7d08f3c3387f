// The forward's inner step with the input value read as an embedded broadcast: on AVX-512 the
// combine's first instruction takes x straight from memory ({1to16}), instead of one
// vbroadcastss per tile row shared by the row's vectors. On Zen 4 the loop with the separate
// broadcasts (6 per 24 terms of the 6 x 4 tile) runs at ~72% of the add+max peak and the
// embedded form at ~90% (by their rates, the separate broadcast of a 512-bit register takes
// issue slots the combine and the reduce need; the VM has no counters to name the pipe):
// layer A's forward, single-threaded, 40-44 -> 48-53 G terms/s for the seven built-in ops.
// The `bcast` tuning parameter picks it (kernel_params.h) for the forward tile, the dense
// recording forward's block reduce and the winner backward's scan. Each step gives the bits
// of the op's own step (the combines below are the same operations with the operands swapped
// where that is exact: x + w, integer min / max, min of the min form, |w - x| and (w - x)^2;
// a NaN input of a sum may come out with another NaN payload).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once
// per instruction set), after kernel_variants.h, never on its own.
#pragma once

// Bc<Op>::kOn: Op has a broadcast step on this instruction set; Bc<Op>::step(acc, x, w) is
// step<Op, false, S>(acc, S::set1(*x), w) with *x read by the combine itself.
template <class Op>
struct Bc {
  static constexpr bool kOn = false;
  static S::V step(S::V acc, const float* x, S::V w) {
    return ::step<Op, false, S>(acc, S::set1(*x), w);
  }
};

// ScanBc<Op>::kOn: the winner scan's combine (kernel_winner.h's scan_comb, term j of a row)
// has an embedded-broadcast form: ScanBc<Op>::comb(x, w, j).
template <class Op>
struct ScanBc {
  static constexpr bool kOn = false;
};

#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
// The instruction forms: each reads x once with {1to16}. Inline assembly, because with
// intrinsics the compiler shares one vbroadcastss between a row's vectors (the form this
// avoids). The asm names the pointer, not the float it reads: nothing writes the input while
// a forward runs, and a memory operand made GCC store every accumulator on each step.
// fma(x, 1, w): vfmadd231ps s = one * x + s, s starting as w.
inline __m512 bc_addf(const float* x, __m512 w) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __asm__("vfmadd231ps (%[x])%{1to16%}, %[one], %[s]" : [s] "+v"(w) : [one] "v"(one), [x] "r"(x));
  return w;
}
inline __m512 bc_add(const float* x, __m512 w) {  // w + x
  __m512 s;
  __asm__("vaddps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"(w), [x] "r"(x));
  return s;
}
inline __m512 bc_sub(const float* x, __m512 w) {  // w - x
  __m512 s;
  __asm__("vsubps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"(w), [x] "r"(x));
  return s;
}
inline __m512 bc_min(const float* x, __m512 w) {  // min(w, x): x where equal
  __m512 s;
  __asm__("vminps (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"(w), [x] "r"(x));
  return s;
}
inline __m512 bc_imin(const float* x, __m512 w) {  // signed 32-bit min of the bits
  __m512 s;
  __asm__("vpminsd (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"(w), [x] "r"(x));
  return s;
}
inline __m512 bc_imax(const float* x, __m512 w) {
  __m512 s;
  __asm__("vpmaxsd (%[x])%{1to16%}, %[w], %[s]" : [s] "=v"(s) : [w] "v"(w), [x] "r"(x));
  return s;
}

// x + w under max / min, the add on the FMA ports or on the add ports (the same bits: one
// rounding of the same sum).
template <class R>
struct Bc<Plus<R>> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    return R::template red<S>(acc, bc_addf(x, w));
  }
};
template <class R>
struct Bc<PlusAdd<R>> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    return R::template red<S>(acc, bc_add(x, w));
  }
};
// max_min / min_max on integer keys: the integer min / max is symmetric.
template <bool Max>
struct Bc<KeyMinMax<Max>> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    return Max ? S::imax(acc, bc_imin(x, w)) : S::imin(acc, bc_imax(x, w));
  }
};
// The min form: min(w, x) differs from min(x, w) only in the sign of a zero that both are,
// and the sum never holds -0 (it starts at +0, and +0 + -0 = +0), so the sums are the same.
template <>
struct Bc<AbsViaMin> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) { return S::addf(bc_min(x, w), acc); }
};
template <>
struct Bc<AbsViaMinAdd> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) { return S::add(bc_min(x, w), acc); }
};
// -|x - w| and -(x - w)^2 from w - x = -(x - w), exactly (round to nearest is symmetric).
template <>
struct Bc<Adder> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    return S::fma(S::abs(bc_sub(x, w)), S::set1(-1.0f), acc);
  }
};
template <>
struct Bc<L1> : Bc<Adder> {};
// The scan alternates the FMA and the add form of x + w as scan_comb does (the same bits).
template <class R>
struct ScanBc<Plus<R>> {
  static constexpr bool kOn = true;
  static S::V comb(const float* x, S::V w, int j) { return j & 1 ? bc_add(x, w) : bc_addf(x, w); }
};
template <bool Max>
struct ScanBc<KeyMinMax<Max>> {
  static constexpr bool kOn = true;
  static S::V comb(const float* x, S::V w, int) { return Max ? bc_imin(x, w) : bc_imax(x, w); }
};
template <>
struct Bc<L2> {
  static constexpr bool kOn = true;
  static S::V step(S::V acc, const float* x, S::V w) {
    const S::V d = bc_sub(x, w);
    return S::fnma(d, d, acc);
  }
};
#endif

// One row of the register tile (the forward tile's, the dense recording forward's block
// reduce): acc[v] = step(acc[v], x, w[v]) over a kernel row's NV vectors for the input value
// at x, which the combine reads itself (Bx: Bc<Op>::step, the `bcast` parameter) or which one
// set1 broadcasts for the whole row. Masked: where `keep` is clear, acc keeps its value (a
// blend, not a branch, keeps the tile unrolled). Always inlined, so that acc stays in
// registers as in the loop it serves.
template <class Op, bool Safe, bool Bx, bool Masked = false, int NV>
__attribute__((always_inline)) inline void row_step(S::V (&acc)[NV], const float* x,
                                                    const S::V (&w)[NV], S::M keep = S::M()) {
  [[maybe_unused]] S::V xv;
  if constexpr (!Bx) xv = S::set1(*x);
  for (int v = 0; v < NV; ++v) {
    S::V s;
    if constexpr (Bx) s = Bc<Op>::step(acc[v], x, w[v]);
    else s = step<Op, Safe, S>(acc[v], xv, w[v]);
    if constexpr (Masked) s = S::select(keep, s, acc[v]);
    acc[v] = s;
  }
}

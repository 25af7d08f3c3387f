// Instruction variants of the forward's ops that a tuning parameter picks at run time
// (csrc/kernel_params.h): each gives the same bits as the op it stands for.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_ops.h, never on its own.
#pragma once

// x + w on the add ports (`fma_add` = 0) where Plus issues it as fma(x, 1, w) on the FMA
// ports: one rounding either way.
template <class R>
struct PlusAdd : Plus<R> {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::add(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) { return T::add(x, w); }
};
// The min form's step with its sum on the add ports.
struct AbsViaMinAdd : AbsViaMin {
  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
    return T::add(T::min(x, w), acc);
  }
};

// The op that `fma_add` = 0 runs in place of Op (Op itself where the choice does not apply).
template <class Op>
struct AddOf {
  using type = Op;
};
template <class R>
struct AddOf<Plus<R>> {
  using type = PlusAdd<R>;
};
template <>
struct AddOf<AbsViaMin> {
  using type = AbsViaMinAdd;
};

// The alternative register tile (`tile` = 1): rows x vectors of the vector width, as many
// accumulators as the default's (AVX-512 6 x 4 -> 8 x 3, AVX2 4 x 3 -> 6 x 2, NEON 6 x 4 ->
// 8 x 3, SSE2 4 x 2 -> 2 x 4).
constexpr int kAltMR = S::W == 4 && S::MR == 4 ? 2 : S::W == 8 ? 6 : 8;
constexpr int kAltNV = S::W == 4 && S::MR == 4 ? 4 : S::W == 8 ? 2 : 3;

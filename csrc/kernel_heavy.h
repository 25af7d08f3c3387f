// The forward tile of a heavy user combine (an exp, log, tanh or division per product): the
// generated functor declares kCombOps, the vector operations one combine costs (counted by
// jaxconv/_src/engines/native/codegen.py `comb_ops` from its traced program, never from its
// name); at or above kHeavyOps the forward runs the tile below instead of the instruction
// set's.
//
// Why: the default 6 x 4 tile needs its 24 accumulators, 4 kernel vectors and a broadcast in
// registers before any temporary of the combine. With a heavy combine GCC does not unroll the
// tile's rows and keeps the accumulators on the stack (a load and a store per product: seen in
// gauss_sum's compiled loop). The heavy tile is 2 x 4 (8 accumulators, fully unrolled, no
// stack traffic), and its products are computed two at a time on Pair<S> (simd_pair.h): the
// instructions of two independent products interleaved, so that the out-of-order core finds
// ready work beside a division's or a polynomial's long chain. The same operations per lane:
// the same bits as the default tile. Zen 4, one thread, layer A forward: tanh(x - w) under sum
// ~20% less CPU time (the pairs), exp(-(x - w)^2) under sum ~3% (the tile; it is bound by its
// 11 FMA-port operations per product, which no tile changes). The backward's loops with pairs
// measured no faster and are unchanged.
//
// Measured on AVX-512 only, so only AVX-512 copies take it; elsewhere kCombOps changes nothing.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after simd_pair.h and kernel_ops.h, never on its own.
#pragma once

// Vector operations per combine from which a combine is heavy (an exp alone is ~15).
constexpr int kHeavyOps = 12;

template <class Op, class = void>
struct CombOps {
  static constexpr int value = 0;  // built-in ops declare none
};
template <class Op>
struct CombOps<Op, std::void_t<decltype(Op::kCombOps)>> {
  static constexpr int value = Op::kCombOps;
};

// Whether Op's forward runs the heavy tile in this instruction set's copy.
template <class Op>
constexpr bool heavy() {
#if defined(__AVX512F__)
  return CombOps<Op>::value >= kHeavyOps;
#else
  return false;
#endif
}
// The heavy tile: rows x vectors.
constexpr int kHeavyMR = 2, kHeavyNV = 4;

// One row of a heavy tile: acc[v] = step(acc[v], x, w[v]) for the NV vectors, two products at
// a time on Pair<S>.
template <class Op, bool Safe, int NV>
inline void paired_steps(S::V* acc, S::V xv, const S::V* wv) {
  for (int v = 0; v + 1 < NV; v += 2) {
    const S2::V s = step<Op, Safe, S2>(S2::V{acc[v], acc[v + 1]}, S2::two(xv),
                                       S2::V{wv[v], wv[v + 1]});
    acc[v] = s.a;
    acc[v + 1] = s.b;
  }
  if constexpr (NV % 2 == 1) acc[NV - 1] = step<Op, Safe, S>(acc[NV - 1], xv, wv[NV - 1]);
}

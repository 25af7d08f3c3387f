// The embedded broadcast of kernel_bcast.h for a generated user combine whose first
// instruction that reads x is a sum, a difference or a product (x * w under max, clip(x * w)
// once its monotone tail is split off, min(x - w, 2 * w), ...).
//
// Why: a light user combine's forward ran the 6 x 4 tile with one vbroadcastss per row, the
// form the built-ins left last (kernel_bcast.h: on Zen 4 the separate broadcast takes issue
// slots the combine and the reduce need). The code generator (jaxconv/_src/engines/native/
// bcast.py) finds, in the traced program, the one node that reads x, and declares:
//   kBcX        which instruction computes it from x in memory (below; 0: none, or x is read
//               more than once),
//   bv<T>(w)    that node's other operand (a function of w and constants only),
//   bpost<T>(t, w)  the rest of comb, with the node's value t.
// So comb(x, w) == bpost(first(x, bv(w)), w) bit for bit: `first` computes the node's own
// operation on the same two numbers (a sum or product with the operands swapped, exact;
// x - v as one fused 1 * x - v, one rounding of the same difference, signed zeros included).
// The generated source specializes Bc<UserOp> as UserBc<UserOp> (max / min reduces: the
// generator leaves sums out, measured slower); heavy combines (kernel_heavy.h) keep their
// own tile. Zen 4, one thread, layer A forward, CPU time under load: x * w under max 7.46 ->
// 6.06 ms, clip(x * w) under max 7.81 -> 6.41 ms (lax 6.6).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once
// per instruction set), after kernel_bcast.h and kernel_heavy.h, never on its own.
#pragma once

// The forms of kBcX.
enum UserBcForm : int { kBcNone = 0, kBcAddF = 1, kBcAdd = 2, kBcSubXV = 3, kBcSubVX = 4,
                        kBcMul = 5 };

// Without AVX-512 (or a declared form): no broadcast step; `step` is the plain one.
template <class Op, bool On = false>
struct UserBcStep {
  static constexpr bool kOn = false;
  static S::V step(S::V acc, const float* x, S::V w) {
    return ::step<Op, false, S>(acc, S::set1(*x), w);
  }
};

#if defined(__AVX512F__) && (defined(__GNUC__) || defined(__clang__))
inline __m512 bc_mul(const float* x, __m512 v) {  // v * x
  __m512 s;
  __asm__("vmulps (%[x])%{1to16%}, %[v], %[s]" : [s] "=v"(s) : [v] "v"(v), [x] "r"(x));
  return s;
}
// x - v as fma(x, 1, -v): vfmsub231ps s = one * x - s, s starting as v.
inline __m512 bc_rsubf(const float* x, __m512 v) {
  const __m512 one = _mm512_set1_ps(1.0f);
  __asm__("vfmsub231ps (%[x])%{1to16%}, %[one], %[s]" : [s] "+v"(v) : [one] "v"(one), [x] "r"(x));
  return v;
}

template <class Op>
struct UserBcStep<Op, true> {
  static constexpr bool kOn = true;
  static S::V first(const float* x, S::V v) {
    if constexpr (Op::kBcX == kBcAddF) return bc_addf(x, v);
    else if constexpr (Op::kBcX == kBcAdd) return bc_add(x, v);
    else if constexpr (Op::kBcX == kBcSubXV) return bc_rsubf(x, v);
    else if constexpr (Op::kBcX == kBcSubVX) return bc_sub(x, v);
    else return bc_mul(x, v);
  }
  // The generated step of a sum (acc + comb) or the reduce of comb (the fast loop's).
  static S::V step(S::V acc, const float* x, S::V w) {
    const S::V c = Op::template bpost<S>(first(x, Op::template bv<S>(w)), w);
    if constexpr (Op::kReduce == 0) return S::add(acc, c);
    else return Op::template red<S>(acc, c);
  }
};
template <class Op>
using UserBc = UserBcStep<Op, Op::kBcX != kBcNone && !heavy<Op>()>;
#else
template <class Op>
using UserBc = UserBcStep<Op, false>;
#endif

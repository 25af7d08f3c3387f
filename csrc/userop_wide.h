// User ops on the wide kernels: a generated functor (jaxconv/_src/engines/native/codegen.py,
// the same code generator as the float32 kernels') run by kernel_wide.h's forward and
// kernel_wide_backward.h's backward on float64, int32 or int64 operands.
//
// The generated source writes the combine and its partials over a vector struct T with the
// interface of simd.h's (set1, add, mul, maxp, eq, select, ...), through userop.h's u_*
// functions. WideT<E> is that struct on the wide kernels' GCC vectors of E, with lax's
// semantics: floats NaN in, NaN out, -0 below +0 in max / min; integers wrap (two's
// complement) in add, subtract, multiply, negate and abs, as XLA's. Booleans are 0 / 1 in E.
// Functions outside IEEE's basic operations (exp, log, tanh, ...) run lane by lane with libm
// in the element type (correct, not vectorized).
//
// A generated wide source defines JAXCONV_WIDE_NS and JAXCONV_WIDE_BYTES, includes this file,
// then defines in that namespace
//   struct UserOp { using E = ...; static constexpr int kReduce = 0 (max) | 1 (min) | 2 (sum);
//                   static constexpr bool kNanFree (finite operands make no NaN product);
//                   optionally static constexpr bool kLowCodes (float: the dense low record
//                   holds exact winner codes, kernel_lowdense_backward.h) and
//                   kFinitePartials (float: dcx and dcw are finite wherever x and w are);
//                   static E ident(); comb / dcx / dcw (templates over T) };
// and exports `jaxconv_user_run(const jaxconv::WideCall*, int backward)` calling
// run_wide_user<UserOp>.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "kernel_wide.h"
#include "kernel_wide_backward.h"

namespace JAXCONV_WIDE_NS {

template <class T>
using VT = typename T::V;

template <class E>
struct WideT {
  using V = VecOf<E>;
  using Elem = E;
  typedef typename Bits<E>::I M __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
  static constexpr int W = Vt<E>::L;
  static constexpr bool kFloat = std::is_floating_point_v<E>;
  typedef std::make_unsigned_t<typename Bits<E>::I> VU __attribute__((vector_size(JAXCONV_WIDE_BYTES)));

  static V load(const E* p) {
    V v;
    std::memcpy(&v, p, sizeof(V));
    return v;
  }
  static void store(E* p, V v) { std::memcpy(p, &v, sizeof(V)); }
  static V set1(E a) { return splat<E>(a); }
  static V zero() { return V{}; }
  static E lane(V a, int l) { return a[l]; }
  static V add(V a, V b) {
    if constexpr (kFloat) return a + b;
    else return JAXCONV_WIDE_NS::add<E>(a, b);
  }
  static V addf(V a, V b) { return JAXCONV_WIDE_NS::add<E>(a, b); }  // same bits as add
  static V sub(V a, V b) { return JAXCONV_WIDE_NS::sub<E>(a, b); }
  static V subf(V a, V b) { return JAXCONV_WIDE_NS::sub<E>(a, b); }
  static V mul(V a, V b) {
    if constexpr (kFloat) return a * b;
    else return (V)((VU)a * (VU)b);  // wraps
  }
  static V div(V a, V b) { return a / b; }  // floats only (codegen refuses integer division)
  static V neg(V a) {
    if constexpr (kFloat) return -a;
    else return (V)((VU){} - (VU)a);  // wraps: -iinfo.min is iinfo.min
  }
  static V abs(V a) {
    if constexpr (kFloat) {
      return (V)((M)a & ~(M)(-V{}));  // the sign bit cleared (NaN stays NaN)
    } else {
      return a < V{} ? neg(a) : a;
    }
  }
  static V maxp(V a, V b) { return pick<E, true, true>(a, b); }   // lax.max
  static V minp(V a, V b) { return pick<E, true, false>(a, b); }  // lax.min
  static V max(V a, V b) { return pick<E, false, true>(a, b); }   // on 0 / 1 values
  static V min(V a, V b) { return pick<E, false, false>(a, b); }
  static V sign(V a) {  // lax.sign: NaN and +-0 are kept
    const V one = set1(E(1)), z = {};
    if constexpr (kFloat) return a > z ? one : (a < z ? -one : a);
    else return a > z ? one : (a < z ? neg(one) : z);
  }
  static M eq(V a, V b) { return (M)(a == b); }
  static M ne(V a, V b) { return (M)(a != b); }  // true for NaN
  static M lt(V a, V b) { return (M)(a < b); }
  static M le(V a, V b) { return (M)(a <= b); }
  static M gt(V a, V b) { return (M)(a > b); }
  static M ge(V a, V b) { return (M)(a >= b); }
  static V from_mask(M m) { return m ? set1(E(1)) : V{}; }
  static V select(M m, V t, V f) { return m ? t : f; }
  static M isfinite_m(V a) {
    if constexpr (kFloat) return (M)((a - a) == (a - a));  // inf - inf and NaN are NaN
    else return (M)(a == a);
  }
  template <class F>
  static V lanes(V a, F f) {
    for (int l = 0; l < W; ++l) a[l] = f(a[l]);
    return a;
  }
  static V sqrt(V a) { return lanes(a, [](E v) { return E(std::sqrt(v)); }); }
  static V rsqrt(V a) { return set1(E(1)) / sqrt(a); }
  static V floor(V a) { return lanes(a, [](E v) { return E(std::floor(v)); }); }
  static V ceil(V a) { return lanes(a, [](E v) { return E(std::ceil(v)); }); }
  static V round_away(V a) { return lanes(a, [](E v) { return E(std::round(v)); }); }
  static V round_even(V a) { return lanes(a, [](E v) { return E(std::nearbyint(v)); }); }
};

// The vectorized math of the float32 kernels (vmath.h), here libm lane by lane.
#define JAXCONV_WIDE_LIBM(name, fn)                                         \
  template <class T>                                                        \
  inline VT<T> name(VT<T> a) {                                              \
    using E = typename T::Elem;                                             \
    return T::lanes(a, [](E v) { return E(fn(v)); });                       \
  }
JAXCONV_WIDE_LIBM(exp_, std::exp)
JAXCONV_WIDE_LIBM(exp2_, std::exp2)
JAXCONV_WIDE_LIBM(log_, std::log)
JAXCONV_WIDE_LIBM(log1p_, std::log1p)
JAXCONV_WIDE_LIBM(expm1_, std::expm1)
JAXCONV_WIDE_LIBM(tanh_, std::tanh)
JAXCONV_WIDE_LIBM(sin_, std::sin)
JAXCONV_WIDE_LIBM(cos_, std::cos)
JAXCONV_WIDE_LIBM(erf_, std::erf)
#undef JAXCONV_WIDE_LIBM
template <class T>
inline VT<T> logistic_(VT<T> a) {
  using E = typename T::Elem;
  return T::lanes(a, [](E v) { return E(1) / (E(1) + std::exp(-v)); });
}
template <class T>
inline VT<T> pow_(VT<T> a, VT<T> b) {
  for (int l = 0; l < T::W; ++l) a[l] = std::pow(a[l], b[l]);
  return a;
}

#include "userop.h"

// A generated UserOp as an op of the wide kernels (kernel_wide.h's WideOp interface).
template <class U>
struct WideUser {
  // No built-in combine (kernel_wide.h's plain_ok): -1 when finite operands make no NaN.
  static constexpr int kComb = U::kNanFree ? -1 : -2;
  static constexpr bool kSum = U::kReduce == 2;
  // The dense low record's codes (kernel_lowdense_backward.h): as the user op declares.
  static constexpr bool kLowCodes = LowCodesDeclared<U>::value;
  template <class E, bool Exact>
  static VecOf<E> comb(VecOf<E> x, VecOf<E> w) {
    return U::template comb<WideT<E>>(x, w);
  }
  template <class E, bool Exact>
  static VecOf<E> red(VecOf<E> acc, VecOf<E> t) {
    if constexpr (kSum) return WideT<E>::add(acc, t);
    else return pick<E, Exact, U::kReduce == 0>(acc, t);
  }
  template <class E>
  static E ident() {
    return U::ident();
  }
};

// Whether a generated UserOp declares kFinitePartials (codegen.py: its partials are finite
// wherever the operands are).
template <class U, class = void>
struct FinitePartialsDeclared : std::false_type {};
template <class U>
struct FinitePartialsDeclared<U, std::enable_if_t<U::kFinitePartials>> : std::true_type {};

// Its partial derivatives as kernel_wide_backward.h's gradient rule (per product).
template <class U>
struct WideUserGrad {
  static constexpr bool kFinite = FinitePartialsDeclared<U>::value;  // FiniteRule
  template <class E>
  static VecOf<E> dx(VecOf<E> x, VecOf<E> w) {
    return U::template dcx<WideT<E>>(x, w);
  }
  template <class E>
  static VecOf<E> dw(VecOf<E> x, VecOf<E> w) {
    return U::template dcw<WideT<E>>(x, w);
  }
};

template <class E>
constexpr int wide_type() {
  if constexpr (std::is_same_v<E, double>) return jaxconv::kWideF64;
  else if constexpr (std::is_same_v<E, int32_t>) return jaxconv::kWideS32;
  else if constexpr (std::is_same_v<E, int64_t>) return jaxconv::kWideS64;
  else return jaxconv::kWideF32;
}

// The entry point of a generated wide library: 0, or 1 (a call it was not built for), 2 (out
// of memory). float64, int32, int64: the forward, and float64's backward (integers have no
// gradient); float: only the backward of a max / min op on float32 copies of bfloat16 /
// float16 operands, each product rounded to their dtype (call.round) before the winner match
// (the forward runs the float32 kernels).
template <class U>
int run_wide_user(const jaxconv::WideCall& call, bool backward) {
  using E = typename U::E;
  using Op = WideUser<U>;
  using Gr = WideUserGrad<U>;
  if (call.type != wide_type<E>()) return 1;
  if constexpr (std::is_same_v<E, float>) {
    if (!backward || Op::kSum) return 1;
    constexpr bool Max = U::kReduce == 0;
    if (call.round == jaxconv::kRoundBF16)
      return low_any_backward<Op, Gr, Max, jaxconv::kRoundBF16>(call);
    if (call.round == jaxconv::kRoundF16)
      return low_any_backward<Op, Gr, Max, jaxconv::kRoundF16>(call);
    return 1;
  } else {
    if (!backward) return run_typed<E, Op>(call);
    if constexpr (std::is_floating_point_v<E>) return backward_typed<E, Op, Gr>(call);
    return 1;
  }
}

}  // namespace JAXCONV_WIDE_NS

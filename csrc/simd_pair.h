// Two vectors of an instruction set's struct (simd.h) as one: every operation is applied to
// both halves back to back, so that a generated combine called on a Pair issues the
// instructions of two independent products interleaved (each op of product A next to the same
// op of product B). A heavy combine (an exp, log or tanh per product: a chain of 20-60 cycles
// of dependent operations) then keeps the out-of-order core's scheduler fed with ready work
// instead of a queue of one product's waiting operations. The bits are those of B, lane by
// lane: every operation is B's own.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace, after
// simd.h and vmath.h (the AVX-512 power-of-two scaling below specializes vmath's), never on
// its own.
#pragma once

template <class B>
struct Pair {
  using BV = typename B::V;
  using BM = typename B::M;
  struct V {
    BV a, b;
  };
  struct M {
    BM a, b;
  };
  static constexpr int W = 2 * B::W;
  static constexpr int ND = 2 * B::ND;
  using D = typename B::D;
  using DU = typename B::DU;

#define JAXCONV_PAIR_V1(n) \
  static V n(V x) { return {B::n(x.a), B::n(x.b)}; }
#define JAXCONV_PAIR_V2(n) \
  static V n(V x, V y) { return {B::n(x.a, y.a), B::n(x.b, y.b)}; }
#define JAXCONV_PAIR_V3(n) \
  static V n(V x, V y, V z) { return {B::n(x.a, y.a, z.a), B::n(x.b, y.b, z.b)}; }
#define JAXCONV_PAIR_M1(n) \
  static M n(V x) { return {B::n(x.a), B::n(x.b)}; }
#define JAXCONV_PAIR_M2(n) \
  static M n(V x, V y) { return {B::n(x.a, y.a), B::n(x.b, y.b)}; }
  JAXCONV_PAIR_V1(neg)
  JAXCONV_PAIR_V1(abs)
  JAXCONV_PAIR_V1(sqrt)
  JAXCONV_PAIR_V1(rsqrt)
  JAXCONV_PAIR_V1(floor)
  JAXCONV_PAIR_V1(ceil)
  JAXCONV_PAIR_V1(trunc)
  JAXCONV_PAIR_V1(round_even)
  JAXCONV_PAIR_V1(round_away)
  JAXCONV_PAIR_V1(sign)
  JAXCONV_PAIR_V1(sign0)
  JAXCONV_PAIR_V1(clip1)
  JAXCONV_PAIR_V1(itof)
  JAXCONV_PAIR_V1(ftoi)
  JAXCONV_PAIR_V1(key)
  JAXCONV_PAIR_V2(add)
  JAXCONV_PAIR_V2(addf)
  JAXCONV_PAIR_V2(sub)
  JAXCONV_PAIR_V2(subf)
  JAXCONV_PAIR_V2(mul)
  JAXCONV_PAIR_V2(div)
  JAXCONV_PAIR_V2(max)
  JAXCONV_PAIR_V2(min)
  JAXCONV_PAIR_V2(maxp)
  JAXCONV_PAIR_V2(minp)
  JAXCONV_PAIR_V2(imax)
  JAXCONV_PAIR_V2(imin)
  JAXCONV_PAIR_V2(copysign)
  JAXCONV_PAIR_V2(band)
  JAXCONV_PAIR_V2(bor)
  JAXCONV_PAIR_V2(bxor)
  JAXCONV_PAIR_V2(bandn)
  JAXCONV_PAIR_V2(iadd)
  JAXCONV_PAIR_V2(isub)
  JAXCONV_PAIR_V3(fma)
  JAXCONV_PAIR_V3(fnma)
  JAXCONV_PAIR_V3(mad)
  JAXCONV_PAIR_M1(unord)
  JAXCONV_PAIR_M1(isnan_m)
  JAXCONV_PAIR_M1(isfinite_m)
  JAXCONV_PAIR_M2(eq)
  JAXCONV_PAIR_M2(ne)
  JAXCONV_PAIR_M2(lt)
  JAXCONV_PAIR_M2(le)
  JAXCONV_PAIR_M2(gt)
  JAXCONV_PAIR_M2(ge)
  JAXCONV_PAIR_M2(ieq)
#undef JAXCONV_PAIR_V1
#undef JAXCONV_PAIR_V2
#undef JAXCONV_PAIR_V3
#undef JAXCONV_PAIR_M1
#undef JAXCONV_PAIR_M2

  static V two(BV x) { return {x, x}; }
  static V set1(float c) { return two(B::set1(c)); }
  static V zero() { return two(B::zero()); }
  static V from_bits(uint32_t u) { return two(B::from_bits(u)); }
  static V load(const float* p) { return {B::load(p), B::load(p + B::W)}; }
  static void store(float* p, V v) {
    B::store(p, v.a);
    B::store(p + B::W, v.b);
  }
  static V select(M m, V x, V y) { return {B::select(m.a, x.a, y.a), B::select(m.b, x.b, y.b)}; }
  static V madd(M m, V x, V y) { return {B::madd(m.a, x.a, y.a), B::madd(m.b, x.b, y.b)}; }
  static V from_mask(M m) { return {B::from_mask(m.a), B::from_mask(m.b)}; }
  template <int n> static V shl(V x) { return {B::template shl<n>(x.a), B::template shl<n>(x.b)}; }
  template <int n> static V shr(V x) { return {B::template shr<n>(x.a), B::template shr<n>(x.b)}; }
  template <int n> static V sar(V x) { return {B::template sar<n>(x.a), B::template sar<n>(x.b)}; }
  static M mask(bool t) { return {B::mask(t), B::mask(t)}; }
  static M mtrue() { return {B::mtrue(), B::mtrue()}; }
  static M mfalse() { return {B::mfalse(), B::mfalse()}; }
  static M mand(M x, M y) { return {B::mand(x.a, y.a), B::mand(x.b, y.b)}; }
  static M mor(M x, M y) { return {B::mor(x.a, y.a), B::mor(x.b, y.b)}; }
  static M mxor(M x, M y) { return {B::mxor(x.a, y.a), B::mxor(x.b, y.b)}; }
  static M mnot(M x) { return {B::mnot(x.a), B::mnot(x.b)}; }
  static bool any(M m) { return B::any(m.a) || B::any(m.b); }
  static D dmad(D x, D y, D z) { return B::dmad(x, y, z); }
  static void to_d(V v, D* d) {
    B::to_d(v.a, d);
    B::to_d(v.b, d + B::ND);
  }
  static V from_d(const D* d) { return {B::from_d(d), B::from_d(d + B::ND)}; }
  static float lane(V v, int l) { return l < B::W ? B::lane(v.a, l) : B::lane(v.b, l - B::W); }
  static float hsum(V v) { return B::hsum(v.a) + B::hsum(v.b); }
};
using S2 = Pair<S>;

#if defined(__AVX512F__)
// vmath_scalef.h's one-instruction scaling, per half (the generic vm_scale would build the
// powers of two from their bits).
template <>
inline VmV<S2> vm_scale<S2>(VmV<S2> p, VmV<S2> k) {
  return {vm_scale<S>(p.a, k.a), vm_scale<S>(p.b, k.b)};
}
#endif

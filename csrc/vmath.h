// Elementwise transcendental functions over the structs of simd.h (S of any instruction set,
// and Sc): exp_, exp2_, expm1_, log_, log1p_, log2_, tanh_, logistic_, pow_, sin_, cos_, erf_.
// Branch-free across lanes (sin_ / cos_ take one branch for the whole vector when a lane is
// >= 2^23), IEEE special values as lax / C powf. Included right after simd.h, inside the same
// anonymous namespace. S and Sc of one translation unit give the same bits.
//
// Float: range reduction to a small interval (x = k ln2 + r for the exponentials, x = 2^e m
// with m in [sqrt(1/2), sqrt(2)) for the logarithms), polynomials fitted (near-minimax, for
// relative error) on that interval, and the exponent put back by building 2^k from its bits.
// Double (the lanes split into vectors of doubles by T::to_d): pow, whose log(x) must be good
// to ~2^-34 (its error is amplified by |y log x| up to ~104), sin / cos (an exact reduction
// for every float) and erf. Max errors measured over all floats (every 7th bit pattern, every
// 61st for sin, cos, erf; pow on 2e7 random pairs), in ulps (without FMA): exp2 0.86 (1.07),
// expm1 1.44, log 0.85 (0.92), log1p 0.87 (1.0), log2 1.62 (1.85), pow / sin / cos / erf 0.51;
// exp, tanh and logistic with exp's Horner polynomial (vm_exp_r), on tests/test_vmath.py's
// inputs: exp 0.79 (1.09), tanh 1.16, logistic 1.98 (2.00) (before it, over every 7th float:
// exp 0.97 (0.95), tanh 1.32, logistic 2.33).

template <class T>
using VmV = typename T::V;

// c[0] + x (c[1] + x (c[2] + ...)), coefficients in increasing order.
template <class T>
VmV<T> vm_poly(VmV<T>, float c) {
  return T::set1(c);
}
template <class T, class... R>
VmV<T> vm_poly(VmV<T> x, float c, R... r) {
  return T::mad(vm_poly<T>(x, r...), x, T::set1(c));
}

// 2^k for integer-valued k in [-126, 127].
template <class T>
VmV<T> vm_pow2i(VmV<T> k) {
  return T::template shl<23>(T::iadd(T::ftoi(k), T::from_bits(127)));
}

// p * 2^k for integer-valued k in [-152, 129]: two factors, each a normal power of two, so
// that only the last product rounds (once, also into the denormals).
template <class T>
VmV<T> vm_scale(VmV<T> p, VmV<T> k) {
  const VmV<T> ki = T::ftoi(k), k1 = T::template sar<1>(ki), b = T::from_bits(127);
  const VmV<T> s1 = T::template shl<23>(T::iadd(k1, b));
  return T::mul(T::mul(p, s1), T::template shl<23>(T::iadd(T::isub(ki, k1), b)));
}
#include "vmath_scalef.h"

// NaN-preserving clamp: T::min / T::max return their second operand when one is NaN.
template <class T>
VmV<T> vm_clamp(VmV<T> x, float lo, float hi) {
  return T::max(T::set1(lo), T::min(T::set1(hi), x));
}

// x = k ln2 + r, |r| <= ln2 / 2 (ln2 split so that k * kLn2Hi is exact even without FMA).
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
template <class T>
VmV<T> vm_reduce(VmV<T> x, VmV<T>* k) {
  *k = T::round_even(T::mul(x, T::set1(1.44269504f)));
  return T::mad(*k, T::set1(-kLn2Lo), T::mad(*k, T::set1(-kLn2Hi), x));
}

// e^r - 1 on |r| <= ln2 / 2: r + r^2 P(r), relative error 2^-28.6.
template <class T>
VmV<T> vm_expm1_r(VmV<T> r) {
  const VmV<T> p = vm_poly<T>(r, 5.000000000e-01f, 1.666666567e-01f, 4.166634753e-02f,
                              8.333391510e-03f, 1.394165331e-03f, 1.984595729e-04f);
  return T::mad(T::mul(r, r), p, r);
}

// e^r on |r| <= ln2 / 2: 1 + r (1 + r Q(r)), Q of degree 4, by Horner: six FMAs (relative
// error 2^-28.0 with the float coefficients). exp_ takes it in place of 1 + vm_expm1_r's
// r + r^2 P(r) (five FMAs, a multiply, an FMA and an add for the same interval, kept for
// expm1, where the 1 is not added): one FMA-port operation and one add fewer per
// exponential, what the Gaussian user op's forward and backward are bound by.
template <class T>
VmV<T> vm_exp_r(VmV<T> r) {
  return vm_poly<T>(r, 1.0f, 1.0f, 4.999999404e-01f, 1.666652113e-01f, 4.166838899e-02f,
                    8.368716575e-03f, 1.381459879e-03f);
}

template <class T>
VmV<T> exp_(VmV<T> x) {
  VmV<T> k;
  const VmV<T> r = vm_reduce<T>(vm_clamp<T>(x, -104.0f, 89.0f), &k);
  return vm_scale<T>(vm_exp_r<T>(r), k);
}

template <class T>
VmV<T> exp2_(VmV<T> x) {
  x = vm_clamp<T>(x, -152.0f, 129.0f);
  const VmV<T> k = T::round_even(x), r = T::sub(x, k);
  // 2^r = 1 + r Q(r) on |r| <= 1/2, relative error 2^-28.7.
  const VmV<T> q = vm_poly<T>(r, 6.931471825e-01f, 2.402265072e-01f, 5.550410226e-02f,
                              9.618038312e-03f, 1.333393506e-03f, 1.546675630e-04f,
                              1.519615489e-05f);
  return vm_scale<T>(T::mad(r, q, T::set1(1.0f)), k);
}

// expm1 = 2^k (e^r - 1) + (2^k - 1). For k = 128 (x in (88.38, 88.73)) 2^k would overflow: the
// sum is then formed with 2^127 and h = 1/2 and doubled at the end.
template <class T>
VmV<T> expm1_(VmV<T> x) {
  VmV<T> k;
  const VmV<T> r = vm_reduce<T>(vm_clamp<T>(x, -30.0f, 89.0f), &k);
  const auto top = T::gt(k, T::set1(127.0f));
  const VmV<T> s = vm_pow2i<T>(T::select(top, T::set1(127.0f), k));
  const VmV<T> h = T::select(top, T::set1(0.5f), T::set1(1.0f));
  const VmV<T> y = T::mad(s, vm_expm1_r<T>(r), T::sub(s, h));
  // expm1 has the sign of x: this keeps -0.0 (the reduction loses it).
  return T::copysign(T::select(top, T::add(y, y), y), x);
}

// log(1 + f) on f in [sqrt(1/2) - 1, sqrt(2) - 1] plus a small `extra`:
// f + (f^2 (-1/2 + f R(f)) + extra), relative error 2^-27.2.
template <class T>
VmV<T> vm_log1p_f(VmV<T> f, VmV<T> extra) {
  const VmV<T> r = vm_poly<T>(f, -0.5f, 3.333333135e-01f, -2.500081956e-01f, 2.000122666e-01f,
                              -1.662335694e-01f, 1.420176029e-01f, -1.316018999e-01f,
                              1.276156306e-01f, -7.634460181e-02f);
  return T::add(f, T::mad(T::mul(f, f), r, extra));
}

// u = 2^e m with m in [sqrt(1/2), sqrt(2)) for positive normal u; returns m - 1 (exact).
template <class T>
VmV<T> vm_split(VmV<T> u, VmV<T>* e) {
  const VmV<T> c = T::from_bits(0x3f3504f3u);  // sqrt(1/2)
  const VmV<T> d = T::isub(u, c);
  *e = T::itof(T::template sar<23>(d));
  return T::sub(T::iadd(T::band(d, T::from_bits(0x7fffffu)), c), T::set1(1.0f));
}

// vm_split of any positive x, a denormal one first scaled by 2^23 (its e corrected).
template <class T>
VmV<T> vm_split_any(VmV<T> x, VmV<T>* e) {
  const auto tiny = T::lt(x, T::set1(1.17549435e-38f));
  const VmV<T> u = T::select(tiny, T::mul(x, T::set1(8388608.0f)), x);
  const VmV<T> f = vm_split<T>(u, e);
  *e = T::sub(*e, T::select(tiny, T::set1(23.0f), T::zero()));
  return f;
}

// y, a logarithm of finite positive u, with the special values of a logarithm at u: +inf and
// NaN kept, NaN below zero, -inf at zero.
template <class T>
VmV<T> vm_log_specials(VmV<T> u, VmV<T> y) {
  const float inf = __builtin_inff();
  y = T::select(T::lt(u, T::set1(inf)), y, u);  // +inf, NaN
  y = T::select(T::lt(u, T::zero()), T::set1(__builtin_nanf("")), y);
  return T::select(T::eq(u, T::zero()), T::set1(-inf), y);
}

// log(u) = e ln2 + log1p(f) + extra; then the special values of log at u.
template <class T>
VmV<T> vm_log_finish(VmV<T> u, VmV<T> e, VmV<T> f, VmV<T> extra) {
  const VmV<T> lo = T::mad(e, T::set1(kLn2Lo), extra);
  return vm_log_specials<T>(u, T::mad(e, T::set1(kLn2Hi), vm_log1p_f<T>(f, lo)));
}

template <class T>
VmV<T> log_(VmV<T> x) {
  VmV<T> e;
  const VmV<T> f = vm_split_any<T>(x, &e);
  return vm_log_finish<T>(x, e, f, T::zero());
}

// u = 1 + x rounded, c its rounding error (two-sum, exact): log1p(x) = log(u + c)
// = log(u) + c / u to far below an ulp.
template <class T>
VmV<T> log1p_(VmV<T> x) {
  const VmV<T> one = T::set1(1.0f);
  const VmV<T> u = T::add(one, x), z = T::sub(u, x);
  const VmV<T> c = T::add(T::sub(one, z), T::sub(x, T::sub(u, z)));
  VmV<T> e;
  const VmV<T> f = vm_split<T>(u, &e);
  // log1p has the sign of x (keeps -0.0).
  return T::copysign(vm_log_finish<T>(u, e, f, T::div(c, u)), x);
}

template <class T>
VmV<T> log2_(VmV<T> x) {
  VmV<T> e;
  const VmV<T> f = vm_split_any<T>(x, &e);
  // log2 = e + log1p(f) log2(e), log2(e) split in two so the product keeps ~30 bits.
  const VmV<T> l = vm_log1p_f<T>(f, T::zero());
  return vm_log_specials<T>(
      x, T::mad(l, T::set1(1.44269502f), T::mad(l, T::set1(1.92596299e-8f), e)));
}

// |x| < 0.625: x + x^3 P(x^2) (relative error 2^-27.7); above, 1 - 2 / (e^2|x| + 1), which
// is 1 once e^2|x| overflows.
template <class T>
VmV<T> tanh_(VmV<T> x) {
  const VmV<T> a = T::abs(x), a2 = T::mul(a, a), one = T::set1(1.0f);
  const VmV<T> p = vm_poly<T>(a2, -3.333333135e-01f, 1.333326101e-01f, -5.395322293e-02f,
                              2.173379064e-02f, -8.254393004e-03f, 2.209657105e-03f);
  const VmV<T> small = T::mad(T::mul(a, a2), p, a);
  const VmV<T> big = T::sub(one, T::div(T::set1(2.0f), T::add(exp_<T>(T::add(a, a)), one)));
  return T::copysign(T::select(T::lt(a, T::set1(0.625f)), small, big), x);
}

// With t = e^-|x| <= 1 (never overflows): 1 / (1 + t) for x >= 0, t / (1 + t) below.
template <class T>
VmV<T> logistic_(VmV<T> x) {
  const VmV<T> t = exp_<T>(T::neg(T::abs(x))), one = T::set1(1.0f);
  return T::div(T::select(T::lt(x, T::zero()), t, one), T::add(one, t));
}

// ---- double precision, for pow ----------------------------------------------------------
template <class D>
D vm_dsplat(double c) {
  D r{};
  return r + c;
}
template <class T, class D = typename T::D>
D vm_dpoly(D, double c) {
  return vm_dsplat<D>(c);
}
template <class T, class D = typename T::D, class... R>
D vm_dpoly(D x, double c, R... r) {
  return T::dmad(vm_dpoly<T>(x, r...), x, vm_dsplat<D>(c));
}

// log(a) for positive normal a (every float is normal as a double); garbage otherwise.
// a = 2^e m, m in [sqrt(1/2), sqrt(2)); log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172.
template <class T, class D = typename T::D, class U = typename T::DU>
D vm_dlog(D a) {
  const U c = U{} + 0x3FE6A09E667F3BCDull;  // sqrt(1/2)
  const U d = __builtin_bit_cast(U, a) - c;
  // e + 1024 from the top bits, turned into a double through the 2^52 trick.
  const U eb = ((d + (0x400ull << 52)) >> 52) | 0x4330000000000000ull;
  const D e = __builtin_bit_cast(D, eb) - 4503599627371520.0;  // 2^52 + 1024
  const D f = __builtin_bit_cast(D, (d & 0x000FFFFFFFFFFFFFull) + c) - 1.0;
  const D s = f / (f + 2.0), s2 = s * s;
  // The series' first omitted term, s^15 / 15, is below 2^-39 of the sum.
  const D t = vm_dpoly<T>(s2, 1.0, 1.0 / 3, 1.0 / 5, 1.0 / 7, 1.0 / 9, 1.0 / 11, 1.0 / 13);
  return T::dmad(e, vm_dsplat<D>(0.6931471805599453), (s + s) * t);
}

// e^z for any z (NaN in, NaN out); results beyond +-200 are clamped (far outside float).
template <class T, class D = typename T::D, class U = typename T::DU>
D vm_dexp(D z) {
  const D lo = vm_dsplat<D>(-200.0), hi = vm_dsplat<D>(200.0);
  z = z < lo ? lo : z;
  z = z > hi ? hi : z;
  const double magic = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const D kd = z * 1.4426950408889634 + magic;
  const D k = kd - magic;
  // ln2 = 0x1.62e42p-1 + 4.7493250390316726e-07; k * the first part is exact.
  const D r = (z - k * 0.6931467056274414) - k * 4.7493250390316726e-07;
  // Taylor to degree 8: |r| <= 0.347 leaves a relative error below 2^-31.
  const D p = vm_dpoly<T>(r, 1.0, 1.0, 0.5, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720,
                         1.0 / 5040, 1.0 / 40320);
  const U sb = (__builtin_bit_cast(U, kd) - 0x4338000000000000ull + 1023) << 52;
  return p * __builtin_bit_cast(D, sb);
}

// C powf: |x|^y = e^(y log|x|) in double, then the sign and the special cases in float.
template <class T>
VmV<T> pow_(VmV<T> x, VmV<T> y) {
  using V = VmV<T>;
  using D = typename T::D;
  const V ax = T::abs(x), zero = T::zero(), one = T::set1(1.0f);
  const float inf = __builtin_inff();
  D xd[T::ND], yd[T::ND];
  T::to_d(ax, xd);
  T::to_d(y, yd);
  for (int i = 0; i < T::ND; ++i) xd[i] = vm_dexp<T>(yd[i] * vm_dlog<T>(xd[i]));
  V r = T::from_d(xd);
  // |x| = 0 or inf: 0 or inf by the sign of y.
  const auto y_neg = T::lt(y, zero), ax_inf = T::eq(ax, T::set1(inf));
  r = T::select(T::mor(T::eq(ax, zero), ax_inf),
                T::select(T::mxor(y_neg, ax_inf), T::set1(inf), zero), r);
  r = T::select(T::mor(T::unord(x), T::unord(y)), T::add(x, y), r);
  // y an integer (every float beyond 2^24 is even, as inf counts), odd: the sign of x.
  const V ty = T::trunc(y), h = T::mul(y, T::set1(0.5f));
  const auto y_int = T::eq(y, ty), odd = T::mand(y_int, T::ne(h, T::trunc(h)));
  r = T::select(odd, T::bor(r, T::band(x, T::from_bits(0x80000000u))), r);
  const auto neg_finite = T::mand(T::lt(x, zero), T::lt(ax, T::set1(inf)));
  r = T::select(T::mand(neg_finite, T::mnot(y_int)), T::set1(__builtin_nanf("")), r);
  // pow(x, +-0) = 1, pow(1, y) = 1, pow(-1, +-inf) = 1, NaN operands included.
  const auto is_one = T::mor(T::mor(T::eq(y, zero), T::eq(x, one)),
                             T::mand(T::eq(ax, one), T::eq(T::abs(y), T::set1(inf))));
  return T::select(is_one, one, r);
}

// ---- sin, cos ------------------------------------------------------------------------------
// In double: a = |x| = k pi/2 + r, |r| <= pi/4, then a polynomial for sin r or cos r chosen by
// the quadrant k mod 4. Below 2^23 (k < 2^24) a three-part pi/2 (28 + 28 bits + a double)
// keeps r exact to ~2^-80. From 2^23 on, a (2/pi) mod 4 is summed from the products of a with
// 28-bit pieces of 2/pi (each exact, a having 24 bits), each taken mod 4 exactly; pieces whose
// product is a multiple of 4 drop out, so the magnitude of a never matters.

// The nearest integer of |v| < 2^51 (round to nearest even).
template <class D>
D vm_drint(D v) {
  const double magic = 6755399441055744.0;
  return (v + magic) - magic;
}

// r and the quadrant (in the low two bits of *q) of a = |x| < 2^23.
template <class T, class D = typename T::D, class U = typename T::DU>
D vm_dreduce_small(D a, U* q) {
  const double magic = 6755399441055744.0;
  const D kd = a * 0.6366197723675814 + magic, k = kd - magic;
  *q = __builtin_bit_cast(U, kd);
  return ((a - k * 0x1.921fb54p+0) - k * 0x1.10b461p-30) - k * 0x1.a62633145c06ep-58;
}

// The same for any finite a (exact for every float; slower).
template <class T, class D = typename T::D, class U = typename T::DU>
D vm_dreduce_big(D a, U* q) {
  const D zero{}, big = vm_dsplat<D>(9007199254740992.0);  // 2^53
  D hi = zero, lo = zero;
  static constexpr double kPieces[] = {
      0x1.45f306cp-1,   0x1.c9c882ap-29,  0x1.4fe13a8p-59,  0x1.f47d4d0p-86, 0x1.bb81b6cp-113,
      0x1.4acc9e0p-143, 0x1.0e4107cp-170, 0x1.ca2c756p-197, 0x1.bd778acp-225};
  for (const double c : kPieces) {
    D t = a * c;
    // t < 2^53 has its last bit at 2 or below: t - 4 rint(t / 4) is exact, in [-2, 2].
    // Otherwise t is a multiple of 4.
    t = t < big ? t - 4.0 * vm_drint(t * 0.25) : zero;
    const D s = hi + t, b = s - hi;
    lo = lo + ((hi - (s - b)) + (t - b));
    hi = s - 4.0 * vm_drint(s * 0.25);
  }
  const D k = vm_drint(hi);
  *q = __builtin_bit_cast(U, k + 6755399441055744.0);
  return ((hi - k) + lo) * 1.5707963267948966;
}

template <class T, bool kCos>
VmV<T> vm_sincos(VmV<T> x) {
  using D = typename T::D;
  using U = typename T::DU;
  const VmV<T> ax = T::abs(x);
  D a[T::ND], r[T::ND];
  U q[T::ND];
  T::to_d(ax, a);
  if (T::any(T::ge(ax, T::set1(8388608.0f)))) {
    for (int i = 0; i < T::ND; ++i) r[i] = vm_dreduce_big<T>(a[i], &q[i]);
  } else {
    for (int i = 0; i < T::ND; ++i) r[i] = vm_dreduce_small<T>(a[i], &q[i]);
  }
  for (int i = 0; i < T::ND; ++i) {
    const D z = r[i] * r[i];
    // Taylor on |r| <= pi/4: relative errors below 2^-36 (sin) and 2^-33 (cos).
    const D s = T::dmad(r[i] * z, vm_dpoly<T>(z, -1.0 / 6, 1.0 / 120, -1.0 / 5040,
                                             1.0 / 362880, -1.0 / 39916800), r[i]);
    const D c = vm_dpoly<T>(z, 1.0, -0.5, 1.0 / 24, -1.0 / 720, 1.0 / 40320, -1.0 / 3628800);
    const U k = q[i] + (kCos ? 1 : 0), zu{};
    const D v = (k & 1) != zu ? c : s;
    a[i] = (k & 2) != zu ? -v : v;
  }
  VmV<T> y = T::from_d(a);
  if (!kCos) y = T::bxor(y, T::band(x, T::from_bits(0x80000000u)));  // sin is odd
  return T::select(T::isfinite_m(x), y, T::set1(__builtin_nanf("")));
}

template <class T>
VmV<T> sin_(VmV<T> x) {
  return vm_sincos<T, false>(x);
}
template <class T>
VmV<T> cos_(VmV<T> x) {
  return vm_sincos<T, true>(x);
}

// ---- erf -----------------------------------------------------------------------------------
// In double, on a = min(|x|, 4) (erf rounds to 1 beyond 3.9): below 1, a P(a^2); above,
// 1 - e^-a^2 G(1/a) with G ~ erfcx (a^2 is exact in double). Fits' relative errors 2^-34.
template <class T>
VmV<T> erf_(VmV<T> x) {
  using D = typename T::D;
  D a[T::ND];
  T::to_d(T::min(T::set1(4.0f), T::abs(x)), a);  // NaN passes
  for (int i = 0; i < T::ND; ++i) {
    const D z = a[i] * a[i];
    const D small = a[i] * vm_dpoly<T>(z, 1.1283791670580217, -0.37612638434654233,
                                       0.11283781974155789, -0.026865400045107537,
                                       0.00522094544116698, -0.0008482828966248797,
                                       0.00011256948779421893, -9.641518547020083e-06);
    const D g = vm_dpoly<T>(1.0 / a[i], -2.122262597756992e-05, 0.5648067967590302,
                            -0.008136146058405102, -0.21797910269695497, -0.33419969877485367,
                            1.6185141552612723, -2.900232781720867, 3.292725428513898,
                            -2.593331362978824, 1.425669907099218, -0.5252452640549902,
                            0.11691849995236574, -0.011905632508304316);
    const D big = 1.0 - vm_dexp<T>(-z) * g;
    a[i] = a[i] < 1.0 ? small : big;
  }
  return T::copysign(T::from_d(a), x);
}

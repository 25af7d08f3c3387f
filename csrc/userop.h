// The operations a generated user-op functor is written in
// (jaxconv/_src/engines/native/codegen.py), for every vector struct T of simd.h and the scalar
// Sc, with lax's semantics: NaN in, NaN out. Booleans are 0.0f / 1.0f floats, so a functor
// needs no mask type. The wide kernels' WideT<E> (userop_wide.h) has the same interface on
// float64 / int32 / int64 lanes (its booleans are 0 / 1 in E).
//
// Included by a generated source inside the anonymous namespace, after kernels.inc (and
// <cmath>, included at file scope), or inside the wide kernels' namespace (userop_wide.h).

// The lanes' scalar type: T::Elem where T names one (WideT), else float.
template <class T> auto u_elem(int) -> typename T::Elem;
template <class T> auto u_elem(long) -> float;
template <class T> using UE = decltype(u_elem<T>(0));

template <class T, class F>
inline VT<T> u_lanes(VT<T> a, F f) {
  alignas(64) UE<T> t[T::W];
  T::store(t, a);
  for (int l = 0; l < T::W; ++l) t[l] = f(t[l]);
  return T::load(t);
}
template <class T, class F>
inline VT<T> u_lanes2(VT<T> a, VT<T> b, F f) {
  alignas(64) UE<T> s[T::W], t[T::W];
  T::store(s, a);
  T::store(t, b);
  for (int l = 0; l < T::W; ++l) s[l] = f(s[l], t[l]);
  return T::load(s);
}

template <class T> inline VT<T> u_bool(typename T::M m) { return T::from_mask(m); }
template <class T> inline typename T::M u_true(VT<T> b) { return T::eq(b, T::set1(1.0f)); }

// a + b and a - b issued on the FMA ports (bit-identical), leaving the add ports (which run
// max / min) to the reduce: the built-in max_plus does the same.
template <class T> inline VT<T> u_add(VT<T> a, VT<T> b) { return T::addf(a, b); }
template <class T> inline VT<T> u_sub(VT<T> a, VT<T> b) { return T::subf(a, b); }
template <class T> inline VT<T> u_mul(VT<T> a, VT<T> b) { return T::mul(a, b); }
template <class T> inline VT<T> u_div(VT<T> a, VT<T> b) { return T::div(a, b); }
template <class T> inline VT<T> u_neg(VT<T> a) { return T::neg(a); }
template <class T> inline VT<T> u_abs(VT<T> a) { return T::abs(a); }
template <class T> inline VT<T> u_max(VT<T> a, VT<T> b) { return T::maxp(a, b); }
template <class T> inline VT<T> u_min(VT<T> a, VT<T> b) { return T::minp(a, b); }
template <class T> inline VT<T> u_clamp(VT<T> lo, VT<T> x, VT<T> hi) {
  return u_min<T>(u_max<T>(x, lo), hi);
}
template <class T> inline VT<T> u_sign(VT<T> a) { return T::sign(a); }
template <class T> inline VT<T> u_square(VT<T> a) { return T::mul(a, a); }

// Comparisons (ordered, false for NaN, except ne) and logic on 0/1 floats.
template <class T> inline VT<T> u_eq(VT<T> a, VT<T> b) { return u_bool<T>(T::eq(a, b)); }
template <class T> inline VT<T> u_lt(VT<T> a, VT<T> b) { return u_bool<T>(T::lt(a, b)); }
template <class T> inline VT<T> u_gt(VT<T> a, VT<T> b) { return u_bool<T>(T::gt(a, b)); }
template <class T> inline VT<T> u_le(VT<T> a, VT<T> b) { return u_bool<T>(T::le(a, b)); }
template <class T> inline VT<T> u_ge(VT<T> a, VT<T> b) { return u_bool<T>(T::ge(a, b)); }
template <class T> inline VT<T> u_ne(VT<T> a, VT<T> b) { return u_bool<T>(T::ne(a, b)); }
template <class T> inline VT<T> u_and(VT<T> a, VT<T> b) { return T::mul(a, b); }
template <class T> inline VT<T> u_or(VT<T> a, VT<T> b) { return T::max(a, b); }
template <class T> inline VT<T> u_xor(VT<T> a, VT<T> b) { return T::abs(T::sub(a, b)); }
template <class T> inline VT<T> u_not(VT<T> a) { return T::sub(T::set1(1.0f), a); }
template <class T> inline VT<T> u_is_finite(VT<T> a) { return u_bool<T>(T::isfinite_m(a)); }
// select_n(p, on_false, on_true)
template <class T> inline VT<T> u_select(VT<T> p, VT<T> f, VT<T> t) {
  return T::select(u_true<T>(p), t, f);
}

// Vectorized (simd.h, vmath.h).
#define JAXCONV_U_VEC(name, expr) \
  template <class T> inline VT<T> u_##name(VT<T> a) { return expr; }
JAXCONV_U_VEC(exp, exp_<T>(a))
JAXCONV_U_VEC(exp2, exp2_<T>(a))
JAXCONV_U_VEC(log, log_<T>(a))
JAXCONV_U_VEC(log1p, log1p_<T>(a))
JAXCONV_U_VEC(expm1, expm1_<T>(a))
JAXCONV_U_VEC(tanh, tanh_<T>(a))
JAXCONV_U_VEC(logistic, logistic_<T>(a))
JAXCONV_U_VEC(sqrt, T::sqrt(a))
JAXCONV_U_VEC(rsqrt, T::rsqrt(a))
JAXCONV_U_VEC(floor, T::floor(a))
JAXCONV_U_VEC(ceil, T::ceil(a))
JAXCONV_U_VEC(round_away, T::round_away(a))
JAXCONV_U_VEC(round_even, T::round_even(a))
JAXCONV_U_VEC(sin, sin_<T>(a))
JAXCONV_U_VEC(cos, cos_<T>(a))
JAXCONV_U_VEC(erf, erf_<T>(a))
#undef JAXCONV_U_VEC

// Functions of libm, lane by lane (correct, not vectorized).
#define JAXCONV_U_LIBM(name, expr)                                      \
  template <class T> inline VT<T> u_##name(VT<T> a) {                  \
    return u_lanes<T>(a, [](auto x) { return static_cast<decltype(x)>(expr); }); \
  }
JAXCONV_U_LIBM(cbrt, std::cbrt(x))
JAXCONV_U_LIBM(tan, std::tan(x))
JAXCONV_U_LIBM(atan, std::atan(x))
JAXCONV_U_LIBM(sinh, std::sinh(x))
JAXCONV_U_LIBM(cosh, std::cosh(x))
JAXCONV_U_LIBM(asinh, std::asinh(x))
JAXCONV_U_LIBM(acosh, std::acosh(x))
JAXCONV_U_LIBM(atanh, std::atanh(x))
JAXCONV_U_LIBM(erfc, std::erfc(x))
#undef JAXCONV_U_LIBM
template <class T> inline VT<T> u_pow(VT<T> a, VT<T> b) { return pow_<T>(a, b); }
template <class T> inline VT<T> u_atan2(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](auto x, auto y) { return std::atan2(x, y); });
}
template <class T> inline VT<T> u_rem(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](auto x, auto y) { return std::fmod(x, y); });
}
template <class T> inline VT<T> u_nextafter(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](auto x, auto y) { return std::nextafter(x, y); });
}

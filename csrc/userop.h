// The operations a generated user-op functor is written in (jaxconv/_src/engines/codegen.py),
// for every vector struct T of simd.h and the scalar Sc, with lax's semantics: NaN in, NaN
// out. Booleans are 0.0f / 1.0f floats, so a functor needs no mask type.
//
// Included by a generated source inside the anonymous namespace, after kernels.inc (and
// <cmath>, included at file scope).

template <class T>
inline VT<T> u_lanes(VT<T> a, float (*f)(float)) {
  alignas(64) float t[T::W];
  T::store(t, a);
  for (int l = 0; l < T::W; ++l) t[l] = f(t[l]);
  return T::load(t);
}
template <class T>
inline VT<T> u_lanes2(VT<T> a, VT<T> b, float (*f)(float, float)) {
  alignas(64) float s[T::W], t[T::W];
  T::store(s, a);
  T::store(t, b);
  for (int l = 0; l < T::W; ++l) s[l] = f(s[l], t[l]);
  return T::load(s);
}

template <class T> inline VT<T> u_bool(typename T::M m) {
  return T::select(m, T::set1(1.0f), T::zero());
}
template <class T> inline typename T::M u_true(VT<T> b) { return T::eq(b, T::set1(1.0f)); }

template <class T> inline VT<T> u_add(VT<T> a, VT<T> b) { return T::add(a, b); }
template <class T> inline VT<T> u_sub(VT<T> a, VT<T> b) { return T::sub(a, b); }
template <class T> inline VT<T> u_mul(VT<T> a, VT<T> b) { return T::mul(a, b); }
template <class T> inline VT<T> u_div(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return x / y; });
}
template <class T> inline VT<T> u_neg(VT<T> a) { return T::mul(a, T::set1(-1.0f)); }
template <class T> inline VT<T> u_abs(VT<T> a) { return T::abs(a); }
// T::max(a, b) is b when either is NaN: a NaN a is kept explicitly.
template <class T> inline VT<T> u_max(VT<T> a, VT<T> b) {
  return T::select(T::unord(a), a, T::max(a, b));
}
template <class T> inline VT<T> u_min(VT<T> a, VT<T> b) {
  return T::select(T::unord(a), a, T::min(a, b));
}
template <class T> inline VT<T> u_clamp(VT<T> lo, VT<T> x, VT<T> hi) {
  return u_min<T>(u_max<T>(x, lo), hi);
}
template <class T> inline VT<T> u_sign(VT<T> a) {
  return u_lanes<T>(a, [](float x) {
    return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : x);  // +-0 and NaN are kept
  });
}
template <class T> inline VT<T> u_square(VT<T> a) { return T::mul(a, a); }

// Comparisons (ordered, false for NaN, except ne) and logic on 0/1 floats.
template <class T> inline VT<T> u_eq(VT<T> a, VT<T> b) { return u_bool<T>(T::eq(a, b)); }
template <class T> inline VT<T> u_lt(VT<T> a, VT<T> b) { return u_bool<T>(T::lt(a, b)); }
template <class T> inline VT<T> u_gt(VT<T> a, VT<T> b) { return u_bool<T>(T::lt(b, a)); }
template <class T> inline VT<T> u_le(VT<T> a, VT<T> b) {
  return T::max(u_lt<T>(a, b), u_eq<T>(a, b));
}
template <class T> inline VT<T> u_ge(VT<T> a, VT<T> b) { return u_le<T>(b, a); }
template <class T> inline VT<T> u_ne(VT<T> a, VT<T> b) {
  return T::sub(T::set1(1.0f), u_eq<T>(a, b));
}
template <class T> inline VT<T> u_and(VT<T> a, VT<T> b) { return T::mul(a, b); }
template <class T> inline VT<T> u_or(VT<T> a, VT<T> b) { return T::max(a, b); }
template <class T> inline VT<T> u_xor(VT<T> a, VT<T> b) { return T::abs(T::sub(a, b)); }
template <class T> inline VT<T> u_not(VT<T> a) { return T::sub(T::set1(1.0f), a); }
template <class T> inline VT<T> u_is_finite(VT<T> a) {
  return u_bool<T>(T::lt(T::abs(a), T::set1(__builtin_inff())));
}
// select_n(p, on_false, on_true)
template <class T> inline VT<T> u_select(VT<T> p, VT<T> f, VT<T> t) {
  return T::select(u_true<T>(p), t, f);
}

// Functions of libm, lane by lane.
#define JAXCONV_U_LIBM(name, expr)                                      \
  template <class T> inline VT<T> u_##name(VT<T> a) {                  \
    return u_lanes<T>(a, [](float x) { return static_cast<float>(expr); }); \
  }
JAXCONV_U_LIBM(exp, std::exp(x))
JAXCONV_U_LIBM(exp2, std::exp2(x))
JAXCONV_U_LIBM(log, std::log(x))
JAXCONV_U_LIBM(log1p, std::log1p(x))
JAXCONV_U_LIBM(expm1, std::expm1(x))
JAXCONV_U_LIBM(tanh, std::tanh(x))
JAXCONV_U_LIBM(logistic, 1.0f / (1.0f + std::exp(-x)))
JAXCONV_U_LIBM(sqrt, std::sqrt(x))
JAXCONV_U_LIBM(rsqrt, 1.0f / std::sqrt(x))
JAXCONV_U_LIBM(cbrt, std::cbrt(x))
JAXCONV_U_LIBM(floor, std::floor(x))
JAXCONV_U_LIBM(ceil, std::ceil(x))
JAXCONV_U_LIBM(round_away, std::round(x))
JAXCONV_U_LIBM(round_even, std::nearbyint(x))
JAXCONV_U_LIBM(sin, std::sin(x))
JAXCONV_U_LIBM(cos, std::cos(x))
JAXCONV_U_LIBM(tan, std::tan(x))
JAXCONV_U_LIBM(atan, std::atan(x))
JAXCONV_U_LIBM(sinh, std::sinh(x))
JAXCONV_U_LIBM(cosh, std::cosh(x))
JAXCONV_U_LIBM(asinh, std::asinh(x))
JAXCONV_U_LIBM(acosh, std::acosh(x))
JAXCONV_U_LIBM(atanh, std::atanh(x))
JAXCONV_U_LIBM(erf, std::erf(x))
JAXCONV_U_LIBM(erfc, std::erfc(x))
#undef JAXCONV_U_LIBM
template <class T> inline VT<T> u_pow(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return std::pow(x, y); });
}
template <class T> inline VT<T> u_atan2(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return std::atan2(x, y); });
}
template <class T> inline VT<T> u_rem(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return std::fmod(x, y); });
}
template <class T> inline VT<T> u_copysign(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return std::copysign(x, y); });
}
template <class T> inline VT<T> u_nextafter(VT<T> a, VT<T> b) {
  return u_lanes2<T>(a, b, [](float x, float y) { return std::nextafter(x, y); });
}

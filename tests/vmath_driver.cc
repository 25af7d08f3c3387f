// Test driver for csrc/simd.h + csrc/vmath.h: applies the named functions to float32 inputs.
//   vmath_driver vec|scalar XFILE YFILE OUTDIR NAME...
// XFILE / YFILE hold n raw float32 each (n a multiple of 16); OUTDIR/NAME.bin gets n floats.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {
#include "simd.h"
#include "vmath.h"
#include "simd_exp.h"

template <class T>
using V = typename T::V;
template <class T>
using Fn = V<T> (*)(V<T>, V<T>);

#define F1(name, e) {#name, [](V<T> x, V<T>) -> V<T> { (void)x; return e; }}
#define F2(name, e) {#name, [](V<T> x, V<T> y) -> V<T> { return e; }}
#define FM(name, e) \
  {#name, [](V<T> x, V<T> y) -> V<T> { (void)x, (void)y; return T::from_mask(e); }}

// x * y + x in double (exact before the rounding to float).
template <class T>
V<T> dmad(V<T> x, V<T> y) {
  typename T::D dx[T::ND], dy[T::ND];
  T::to_d(x, dx);
  T::to_d(y, dy);
  for (int i = 0; i < T::ND; ++i) dx[i] = T::dmad(dx[i], dy[i], dx[i]);
  return T::from_d(dx);
}

template <class T>
Fn<T> lookup(const std::string& name) {
  struct Entry {
    const char* name;
    Fn<T> f;
  };
  const Entry table[] = {
      F1(exp, exp_<T>(x)), F1(exp2, exp2_<T>(x)), F1(expm1, expm1_<T>(x)),
      F1(log, log_<T>(x)), F1(log1p, log1p_<T>(x)), F1(log2, log2_<T>(x)),
      F1(tanh, tanh_<T>(x)), F1(logistic, logistic_<T>(x)), F2(pow, pow_<T>(x, y)),
      F1(sin, sin_<T>(x)), F1(cos, cos_<T>(x)), F1(erf, erf_<T>(x)),
      F1(lse_exp2, lse_exp2<T>(x)), F1(lse_exp2z, lse_exp2z<T>(x)),
      F1(neg, T::neg(x)), F1(sqrt, T::sqrt(x)), F1(rsqrt, T::rsqrt(x)),
      F1(floor, T::floor(x)), F1(ceil, T::ceil(x)), F1(trunc, T::trunc(x)),
      F1(round_even, T::round_even(x)), F1(round_away, T::round_away(x)),
      F1(sign, T::sign(x)), F2(div, T::div(x, y)), F2(maxp, T::maxp(x, y)),
      F2(minp, T::minp(x, y)), F2(copysign, T::copysign(x, y)),
      FM(le, T::le(x, y)), FM(gt, T::gt(x, y)), FM(ge, T::ge(x, y)), FM(ne, T::ne(x, y)),
      FM(isnan, T::isnan_m(x)), FM(isfinite, T::isfinite_m(x)),
      FM(mand, T::mand(T::lt(x, y), T::gt(x, T::zero()))),
      FM(mor, T::mor(T::lt(x, y), T::gt(x, T::zero()))),
      FM(mxor, T::mxor(T::lt(x, y), T::gt(x, T::zero()))),
      FM(mnot, T::mnot(T::le(x, y))),
      FM(mtrue, T::mand(T::mtrue(), T::mnot(T::mfalse()))),
      F2(band, T::band(x, y)), F2(bor, T::bor(x, y)), F2(bxor, T::bxor(x, y)),
      F2(bandn, T::bandn(x, y)), F2(iadd, T::iadd(x, y)), F2(isub, T::isub(x, y)),
      F1(shl, T::template shl<3>(x)), F1(shr, T::template shr<3>(x)),
      F1(sar, T::template sar<3>(x)), F1(itof, T::itof(x)),
      F1(ftoi, T::ftoi(T::select(T::lt(T::abs(x), T::set1(2147483520.0f)), x, T::zero()))),
      F1(from_bits, T::from_bits(0x80800001u)), F2(dmad, dmad<T>(x, y)),
  };
  for (const Entry& e : table)
    if (name == e.name) return e.f;
  return nullptr;
}

template <class T>
bool run(const std::vector<float>& x, const std::vector<float>& y, const std::string& name,
         std::vector<float>* out) {
  const Fn<T> f = lookup<T>(name);
  if (!f) return false;
  for (size_t i = 0; i < x.size(); i += T::W)
    T::store(&(*out)[i], f(T::load(&x[i]), T::load(&y[i])));
  return true;
}

std::vector<float> read(const char* path) {
  std::vector<float> v;
  if (FILE* fp = std::fopen(path, "rb")) {
    float buf[4096];
    size_t k;
    while ((k = std::fread(buf, sizeof(float), 4096, fp)) > 0) v.insert(v.end(), buf, buf + k);
    std::fclose(fp);
  }
  return v;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 5) return 2;
  const bool vec = std::strcmp(argv[1], "vec") == 0;
  const std::vector<float> x = read(argv[2]), y = read(argv[3]);
  if (x.size() != y.size() || x.size() % 16) return 2;
  std::vector<float> out(x.size());
  for (int a = 5; a < argc; ++a) {
    if (!(vec ? run<S>(x, y, argv[a], &out) : run<Sc>(x, y, argv[a], &out))) {
      std::fprintf(stderr, "unknown function %s\n", argv[a]);
      return 2;
    }
    const std::string path = std::string(argv[4]) + "/" + argv[a] + ".bin";
    FILE* fp = std::fopen(path.c_str(), "wb");
    if (!fp || std::fwrite(out.data(), sizeof(float), out.size(), fp) != out.size()) return 3;
    std::fclose(fp);
  }
  return 0;
}

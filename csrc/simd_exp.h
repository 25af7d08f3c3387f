// The exponential of the logsumexp kernels: 2^u in 11 vector operations, with no conversion
// and no multiply by the power of two, for the exponents a logsumexp forms (u <= ~64 after
// its maximum is subtracted). Included by kernel_logsum.h (inside the kernel's anonymous
// namespace, after simd.h and vmath.h), for S of any instruction set and for Sc.
//
// Why base 2: a logsumexp needs e^(t - m) for every term t. Writing it 2^(t L - mL), with
// L = log2(e) and mL = m L rounded once per output lane, the exponent is one FMA per term
// (t L - mL, exact before its one rounding), and the rounding of mL is one factor
// 2^(m L - mL) common to every term of the lane, which `lse_bias` returns and the caller
// takes out of the result. The range reduction is exact (u - rint(u)), unlike e^x's
// Cody-Waite split, and the power of two is added to the exponent bits: rint(u) comes out
// of the magic-number rounding already in the low bits of a float.
//
// Accuracy: on AVX-512, 2^r on |r| <= 1/2 is 1 + r P(r), P of degree 4 fitted for relative
// error (9.1e-8, 0.8 ulp at 1); measured against numpy's exp2 over 2^20 floats in [-125, 128)
// at most 2.2 ulp. On AVX2 and the base instruction set, 2^(k/8) from a table times a cubic
// on |r| <= 1/16 (below): at most 1.25 ulp (AVX2) and 1.5 ulp (base, no FMA) on
// [-125, 128 - 1/16) (tests/test_simd_exp.py).
// Special values: NaN gives NaN; u below -125 (-inf included) gives 2^-125 times a number in
// [0.7, 1.5], never zero and never a denormal: a logsumexp whose largest term is 2^0 = 1
// cannot see it (it is 2^-101 of an ulp of 1), and `lse_exp2z` gives exact zeros where a
// term is used on its own (the gradients). u above 64 is the caller's to avoid (up to 127 the
// value is right; beyond, garbage).
#pragma once

// log2(e) and ln(2) as floats.
constexpr float kLog2e = 1.44269504f, kLn2f = 0.693147181f;

#if defined(__AVX512F__)
template <class T>
inline VmV<T> lse_exp2(VmV<T> u) {
  const VmV<T> magic = T::set1(12582912.0f);  // 1.5 * 2^23: u + magic rounds u to an integer
  u = T::max(T::set1(-125.0f), u);           // max returns u when u is NaN
  const VmV<T> kf = T::add(u, magic);
  const VmV<T> r = T::sub(u, T::sub(kf, magic));  // exact, |r| <= 1/2
  VmV<T> p = T::mad(T::set1(1.326472615e-3f), r, T::set1(9.671512991e-3f));
  p = T::mad(p, r, T::set1(5.550733581e-2f));
  p = T::mad(p, r, T::set1(2.402224243e-1f));
  p = T::mad(p, r, T::set1(6.931470037e-1f));
  p = T::mad(p, r, T::set1(1.0f));
  // kf's bits are those of 1.5 * 2^23 plus k = rint(u) in the low bits; shifted left by 23,
  // 1.5 * 2^23's bits leave the word and k lands on the exponent field.
  return T::iadd(p, T::template shl<23>(kf));
}

#else
// AVX2 and the base instruction set: 2^u = 2^(k/8) 2^r, k = rint(8u), |r| <= 1/16, with
// 2^(j/8) (j = k mod 8) from a table of eight and a cubic: 4 FMA-port operations in place of
// 5 (the degree-5 polynomial on |r| <= 1/2), and the same count of vector operations (the
// table look-up is one vpermps). The power of two goes into the entry's exponent bits: the
// table holds the bits of 2^(j/8) (rounded to float, relative errors below 3.2e-8) less
// j << 20, and kf's bits << 20 add back k << 20 = ((k >> 3) << 23) + (j << 20).
alignas(32) constexpr uint32_t kLseExp2Eighths[8] = {
    0x3f800000u, 0x3f8b95c2u - (1u << 20), 0x3f9837f0u - (2u << 20), 0x3fa5fed7u - (3u << 20),
    0x3fb504f3u - (4u << 20), 0x3fc5672au - (5u << 20), 0x3fd744fdu - (6u << 20),
    0x3feac0c7u - (7u << 20)};

// kLseExp2Eighths[b & 7] per lane (as a float's bits), b the lane's bits taken as an integer:
// lane by lane in the portable form, one vpermps (which reads each lane's low 3 bits) on AVX2.
template <class T>
inline VmV<T> lse_eighth(VmV<T> b) {
  float in[T::W], out[T::W];
  T::store(in, b);
  for (int l = 0; l < T::W; ++l) {
    const uint32_t j = __builtin_bit_cast(uint32_t, in[l]) & 7u;
    out[l] = __builtin_bit_cast(float, kLseExp2Eighths[j]);
  }
  return T::load(out);
}
#if defined(__AVX2__) && defined(__FMA__)
template <>
inline VmV<S> lse_eighth<S>(VmV<S> b) {
  const __m256 t = _mm256_load_ps(reinterpret_cast<const float*>(kLseExp2Eighths));
  return _mm256_permutevar8x32_ps(t, _mm256_castps_si256(b));
}
#endif

template <class T>
inline VmV<T> lse_exp2(VmV<T> u) {
  const VmV<T> magic = T::set1(1572864.0f);  // 1.5 * 2^20: u + magic rounds u to k / 8
  u = T::max(T::set1(-125.0f), u);          // max returns u when u is NaN
  const VmV<T> kf = T::add(u, magic);
  const VmV<T> r = T::sub(u, T::sub(kf, magic));  // exact, |r| <= 1/16
  // 1.5 * 2^20's bits shifted left by 20 leave the word: k << 20 remains. u >= -125 keeps
  // k >> 3 >= -125 (a normal s); u < 128 - 1/16 keeps it below 128.
  const VmV<T> s = T::iadd(lse_eighth<T>(kf), T::template shl<20>(kf));
  // 2^r = 1 + r q(r), q = c1 + r (c2 + r c3): relative error 2^-25.1; s + (s r) q rounds once.
  const VmV<T> q = vm_poly<T>(r, 6.931472421e-01f, 2.402576357e-01f, 5.549622327e-02f);
  return T::mad(T::mul(s, r), q, s);
}
#endif

#if defined(__AVX512F__)
// AVX-512: rint(u) by one rounding instruction and the power of two by vscalefps (exact for
// the normal results that u in [-125, 128) gives, like the exponent-bits addition): 9 vector
// operations in place of 11, the same bits.
template <>
inline VmV<S> lse_exp2<S>(VmV<S> u) {
  u = S::max(S::set1(-125.0f), u);  // max returns u when u is NaN
  const VmV<S> k = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VmV<S> r = S::sub(u, k);  // exact, |r| <= 1/2
  VmV<S> p = S::mad(S::set1(1.326472615e-3f), r, S::set1(9.671512991e-3f));
  p = S::mad(p, r, S::set1(5.550733581e-2f));
  p = S::mad(p, r, S::set1(2.402224243e-1f));
  p = S::mad(p, r, S::set1(6.931470037e-1f));
  p = S::mad(p, r, S::set1(1.0f));
  return _mm512_scalef_ps(p, k);
}
#endif

// lse_exp2 with an exact zero below -125 (-inf included) and NaN kept.
template <class T>
inline VmV<T> lse_exp2z(VmV<T> u) {
  return T::select(T::lt(u, T::set1(-125.0f)), T::zero(), lse_exp2<T>(u));
}

#if defined(__AVX512F__)
// AVX-512: the zero by the scaling's zero-masking, and no clamp at -125 (the lanes it guarded
// are the zeroed ones; a NaN u still gives NaN): 9 vector operations in place of 11, the
// same bits. The logsumexp backward's exponential.
template <>
inline VmV<S> lse_exp2z<S>(VmV<S> u) {
  const __mmask16 keep = _mm512_cmp_ps_mask(u, S::set1(-125.0f), _CMP_NLT_UQ);  // NaN kept
  const VmV<S> k = _mm512_roundscale_ps(u, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const VmV<S> r = S::sub(u, k);  // exact, |r| <= 1/2 where kept
  VmV<S> p = S::mad(S::set1(1.326472615e-3f), r, S::set1(9.671512991e-3f));
  p = S::mad(p, r, S::set1(5.550733581e-2f));
  p = S::mad(p, r, S::set1(2.402224243e-1f));
  p = S::mad(p, r, S::set1(6.931470037e-1f));
  p = S::mad(p, r, S::set1(1.0f));
  return _mm512_maskz_scalef_ps(keep, p, k);
}
#endif

// mL = m L rounded, and the part of m L it lost (m L - mL, exact: computed in double, where the
// product of two floats is exact, so also on targets without FMA): every term of the lane
// computed as 2^(t L - mL) is 2^(bias) times its true e^(t - m).
template <class T>
inline VmV<T> lse_scaled(VmV<T> m, VmV<T>* bias) {
  const VmV<T> ml = T::mul(m, T::set1(kLog2e));
  typename T::D md[T::ND], mld[T::ND];
  T::to_d(m, md);
  T::to_d(ml, mld);
  for (int i = 0; i < T::ND; ++i) md[i] = md[i] * double(kLog2e) - mld[i];
  *bias = T::from_d(md);
  return ml;
}

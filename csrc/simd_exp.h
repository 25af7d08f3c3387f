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
// Accuracy: 2^r on |r| <= 1/2 is 1 + r P(r), P of degree 4 fitted for relative error
// (9.1e-8, 0.8 ulp at 1); measured against numpy's exp2 over 2^20 floats in [-125, 128) at
// most 2.2 ulp (tests/test_simd_exp.py).
// Special values: NaN gives NaN; u below -125 (-inf included) gives 2^-125 times a number in
// [0.7, 1.5], never zero and never a denormal: a logsumexp whose largest term is 2^0 = 1
// cannot see it (it is 2^-101 of an ulp of 1), and `lse_exp2z` gives exact zeros where a
// term is used on its own (the gradients). u above 64 is the caller's to avoid (up to 127 the
// value is right; beyond, garbage).
#pragma once

// log2(e) and ln(2) as floats.
constexpr float kLog2e = 1.44269504f, kLn2f = 0.693147181f;

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

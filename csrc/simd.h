// A few vector operations for the instruction set this translation unit is compiled for.
// Included only inside an anonymous namespace of a kernel TU (internal linkage).
//
// `max(a, b)` and `min(a, b)` return `b` when either operand is NaN (the x86 semantics);
// the kernels' NaN-safe paths rely on exactly that.
//
// Besides the kernels' operations every struct has the elementwise operations of lax that the
// generated ops (and vmath.h) use: `maxp` / `minp` are lax.max / lax.min (NaN if either is
// NaN, -0.0 < +0.0), comparisons other than `ne` are false for NaN, `round_away` is
// lax.round's default. The bit operations (`band` .. `ftoi`) act on the lanes' 32-bit
// patterns; `ftoi` truncates and is defined only for values that fit in int32. `mad` is
// a * b + c fused where the target has FMA, two roundings where it would be a libm call.
// `any(m)`: whether any lane of m is set (for a branch taken by the whole vector).
// `to_d` / `from_d` split the lanes into ND vectors of doubles and back (GCC vector types, so
// that vmath.h can compute on them with operators); `dmad` is `mad` on them.

// The operations defined once in terms of each struct's primitives. (`U = T` defers the use of
// T, incomplete while it derives from Derived<T>; U is never deduced, so arguments convert.)
template <class T>
struct Derived {
  template <class U> using V_ = typename U::V;
  template <class U> using M_ = typename U::M;
  template <class U = T> static V_<U> neg(V_<U> a) { return U::bxor(a, U::from_bits(0x80000000u)); }
  template <class U = T> static V_<U> rsqrt(V_<U> a) { return U::div(U::set1(1.0f), U::sqrt(a)); }
  template <class U = T> static V_<U> copysign(V_<U> a, V_<U> b) {
    return U::bor(U::band(a, U::from_bits(0x7fffffffu)), U::band(b, U::from_bits(0x80000000u)));
  }
  // The result always has the sign of `a` (so -0.4 -> -0.0); a - trunc(a) is exact.
  template <class U = T> static V_<U> round_away(V_<U> a) {
    const V_<U> t = U::trunc(a);
    const V_<U> r = U::select(U::ge(U::abs(U::sub(a, t)), U::set1(0.5f)),
                              U::add(t, U::copysign(U::set1(1.0f), a)), t);
    return U::copysign(r, a);
  }
  template <class U = T> static V_<U> sign(V_<U> a) {
    return U::select(U::mor(U::eq(a, U::zero()), U::unord(a)), a,
                     U::copysign(U::set1(1.0f), a));
  }
  template <class U = T> static V_<U> maxp(V_<U> a, V_<U> b) {
    return U::select(U::mor(U::unord(a), U::unord(b)), U::add(a, b),
                     U::select(U::eq(a, b), U::band(a, b), U::max(a, b)));
  }
  template <class U = T> static V_<U> minp(V_<U> a, V_<U> b) {
    return U::select(U::mor(U::unord(a), U::unord(b)), U::add(a, b),
                     U::select(U::eq(a, b), U::bor(a, b), U::min(a, b)));
  }
  template <class U = T> static M_<U> isnan_m(V_<U> a) { return U::unord(a); }
  template <class U = T> static M_<U> isfinite_m(V_<U> a) {
    return U::lt(U::abs(a), U::set1(__builtin_inff()));
  }
  template <class U = T> static V_<U> from_mask(M_<U> m) {
    return U::select(m, U::set1(1.0f), U::zero());
  }
  // 1, -1 or 0 by the sign of a (0 for +-0 and NaN).
  template <class U = T> static V_<U> sign0(V_<U> a) {
    return U::select(U::lt(U::zero(), a), U::set1(1.0f),
                     U::select(U::lt(a, U::zero()), U::set1(-1.0f), U::zero()));
  }
  // a clipped to [-1, 1], NaN kept (max / min return their second operand on a NaN).
  template <class U = T> static V_<U> clip1(V_<U> a) {
    return U::min(U::set1(1.0f), U::max(U::set1(-1.0f), a));
  }
  // clip1 for an `a` that is not NaN (+-inf clip to +-1): where it may return +-1 for a NaN,
  // the struct says so with kClipNoNanDropsNan (AVX-512's one-instruction form).
  static constexpr bool kClipNoNanDropsNan = false;
  template <class U = T> static V_<U> clip1_nonan(V_<U> a) { return U::clip1(a); }
};
#if defined(__AVX512F__)
struct S : Derived<S> {
  static constexpr int W = 16, MR = 6, NV = 4;
  using V = __m512;
  using M = __mmask16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float a) { return _mm512_set1_ps(a); }
  static V zero() { return _mm512_setzero_ps(); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  // a + b issued on the FMA ports (bit-identical): leaves the add/max ports to the reduce.
  static V addf(V a, V b) { return _mm512_fmadd_ps(a, _mm512_set1_ps(1.0f), b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V subf(V a, V b) { return _mm512_fmsub_ps(a, _mm512_set1_ps(1.0f), b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }  // c - a * b
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  // One instruction (clip1's two): the operand of smaller magnitude of (a, 1), with a's sign;
  // +-1 for a NaN `a` on Zen 4 (a probe: vrangeps(NaN, 1, 2) = 1, of -NaN -1).
  static constexpr bool kClipNoNanDropsNan = true;
  static V clip1_nonan(V a) { return _mm512_range_ps(a, _mm512_set1_ps(1.0f), 0x02); }
  // One instruction: a's class (NaN, zero, +1, -inf, +inf, negative, positive) picks
  // +0, +0, +1, -1, +1, -1, +1 from the table.
  static V sign0(V a) {
    return _mm512_fixupimm_ps(a, a, _mm512_set1_epi32(int32_t(0xA9A9A888u)), 0);
  }
  static M eq(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_EQ_OQ); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M unord(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static M ieq(V a, V b) {
    return _mm512_cmpeq_epi32_mask(_mm512_castps_si512(a), _mm512_castps_si512(b));
  }
  static V select(M m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
  static M mask(bool b) { return b ? M(0xffff) : M(0); }
  static V madd(M m, V a, V b) { return _mm512_mask_add_ps(a, m, a, b); }  // m ? a + b : a
  static float lane(V a, int l) { alignas(64) float t[16]; _mm512_store_ps(t, a); return t[l]; }
  static float hsum(V a) { return _mm512_reduce_add_ps(a); }
  // The order-preserving integer key of each float (an involution): b ^ ((b >> 31) >>> 1).
  static V key(V a) {
    const __m512i b = _mm512_castps_si512(a);
    return _mm512_castsi512_ps(_mm512_xor_si512(
        b, _mm512_srli_epi32(_mm512_srai_epi32(b, 31), 1)));
  }
  // Signed 32-bit min / max of the lanes' bits (the integer ports).
  static V imin(V a, V b) {
    return _mm512_castsi512_ps(_mm512_min_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static V imax(V a, V b) {
    return _mm512_castsi512_ps(_mm512_max_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
  }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V sqrt(V a) { return _mm512_sqrt_ps(a); }
  static V floor(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static V ceil(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC); }
  static V trunc(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
  static V round_even(V a) {
    return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static M le(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M ne(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_NEQ_UQ); }
  static M mand(M a, M b) { return M(a & b); }
  static M mor(M a, M b) { return M(a | b); }
  static M mxor(M a, M b) { return M(a ^ b); }
  static M mnot(M a) { return M(~a); }
  static M mtrue() { return M(0xffff); }
  static M mfalse() { return M(0); }
  static bool any(M a) { return a != 0; }
  static V from_mask(M m) { return _mm512_maskz_mov_ps(m, _mm512_set1_ps(1.0f)); }
  static V mad(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V from_bits(uint32_t b) { return _mm512_castsi512_ps(_mm512_set1_epi32(int32_t(b))); }
  static V band(V a, V b) { return _mm512_and_ps(a, b); }
  static V bor(V a, V b) { return _mm512_or_ps(a, b); }
  static V bxor(V a, V b) { return _mm512_xor_ps(a, b); }
  static V bandn(V a, V b) { return _mm512_andnot_ps(b, a); }  // a & ~b
  static V iadd(V a, V b) { return I2V(_mm512_add_epi32(V2I(a), V2I(b))); }
  static V isub(V a, V b) { return I2V(_mm512_sub_epi32(V2I(a), V2I(b))); }
  template <int n> static V shl(V a) { return I2V(_mm512_slli_epi32(V2I(a), n)); }
  template <int n> static V shr(V a) { return I2V(_mm512_srli_epi32(V2I(a), n)); }
  template <int n> static V sar(V a) { return I2V(_mm512_srai_epi32(V2I(a), n)); }
  static V itof(V a) { return _mm512_cvtepi32_ps(V2I(a)); }
  static V ftoi(V a) { return I2V(_mm512_cvttps_epi32(a)); }
  static __m512i V2I(V a) { return _mm512_castps_si512(a); }
  static V I2V(__m512i a) { return _mm512_castsi512_ps(a); }
  static constexpr int ND = 2;
  using D = __m512d;
  static D dmad(D a, D b, D c) { return _mm512_fmadd_pd(a, b, c); }
  typedef unsigned long long DU __attribute__((vector_size(64)));
  static void to_d(V a, D* d) {
    d[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(a));
    d[1] = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
  }
  static V from_d(const D* d) {
    const __m512d lo = _mm512_castpd256_pd512(_mm256_castps_pd(_mm512_cvtpd_ps(d[0])));
    return _mm512_castpd_ps(_mm512_insertf64x4(lo, _mm256_castps_pd(_mm512_cvtpd_ps(d[1])), 1));
  }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct S : Derived<S> {
  static constexpr int W = 8, MR = 4, NV = 3;
  using V = __m256;
  using M = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float a) { return _mm256_set1_ps(a); }
  static V zero() { return _mm256_setzero_ps(); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V addf(V a, V b) { return _mm256_fmadd_ps(a, _mm256_set1_ps(1.0f), b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V subf(V a, V b) { return _mm256_fmsub_ps(a, _mm256_set1_ps(1.0f), b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.0f), a); }
  static M eq(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_EQ_OQ); }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M unord(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static M ieq(V a, V b) {
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
  }
  static V select(M m, V a, V b) { return _mm256_blendv_ps(b, a, m); }
  static M mask(bool b) { return _mm256_castsi256_ps(_mm256_set1_epi32(b ? -1 : 0)); }
  static V madd(M m, V a, V b) { return _mm256_add_ps(a, _mm256_and_ps(m, b)); }
  static float lane(V a, int l) { alignas(32) float t[8]; _mm256_store_ps(t, a); return t[l]; }
  static float hsum(V a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static V key(V a) {
    const __m256i b = _mm256_castps_si256(a);
    return _mm256_castsi256_ps(_mm256_xor_si256(
        b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1)));
  }
  static V imin(V a, V b) {
    return _mm256_castsi256_ps(_mm256_min_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
  }
  static V imax(V a, V b) {
    return _mm256_castsi256_ps(_mm256_max_epi32(_mm256_castps_si256(a), _mm256_castps_si256(b)));
  }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  static V sqrt(V a) { return _mm256_sqrt_ps(a); }
  static V floor(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
  static V ceil(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC); }
  static V trunc(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC); }
  static V round_even(V a) {
    return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static M le(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LE_OQ); }
  static M gt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M ne(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_NEQ_UQ); }
  static M mand(M a, M b) { return _mm256_and_ps(a, b); }
  static M mor(M a, M b) { return _mm256_or_ps(a, b); }
  static M mxor(M a, M b) { return _mm256_xor_ps(a, b); }
  static M mnot(M a) { return _mm256_xor_ps(a, mtrue()); }
  static M mtrue() { return _mm256_castsi256_ps(_mm256_set1_epi32(-1)); }
  static M mfalse() { return _mm256_setzero_ps(); }
  static bool any(M a) { return _mm256_movemask_ps(a) != 0; }
  static V from_mask(M m) { return _mm256_and_ps(m, _mm256_set1_ps(1.0f)); }
  static V mad(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V from_bits(uint32_t b) { return _mm256_castsi256_ps(_mm256_set1_epi32(int32_t(b))); }
  static V band(V a, V b) { return _mm256_and_ps(a, b); }
  static V bor(V a, V b) { return _mm256_or_ps(a, b); }
  static V bxor(V a, V b) { return _mm256_xor_ps(a, b); }
  static V bandn(V a, V b) { return _mm256_andnot_ps(b, a); }
  static V iadd(V a, V b) { return I2V(_mm256_add_epi32(V2I(a), V2I(b))); }
  static V isub(V a, V b) { return I2V(_mm256_sub_epi32(V2I(a), V2I(b))); }
  template <int n> static V shl(V a) { return I2V(_mm256_slli_epi32(V2I(a), n)); }
  template <int n> static V shr(V a) { return I2V(_mm256_srli_epi32(V2I(a), n)); }
  template <int n> static V sar(V a) { return I2V(_mm256_srai_epi32(V2I(a), n)); }
  static V itof(V a) { return _mm256_cvtepi32_ps(V2I(a)); }
  static V ftoi(V a) { return I2V(_mm256_cvttps_epi32(a)); }
  static __m256i V2I(V a) { return _mm256_castps_si256(a); }
  static V I2V(__m256i a) { return _mm256_castsi256_ps(a); }
  static constexpr int ND = 2;
  using D = __m256d;
  static D dmad(D a, D b, D c) { return _mm256_fmadd_pd(a, b, c); }
  typedef unsigned long long DU __attribute__((vector_size(32)));
  static void to_d(V a, D* d) {
    d[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(a));
    d[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1));
  }
  static V from_d(const D* d) {
    return _mm256_set_m128(_mm256_cvtpd_ps(d[1]), _mm256_cvtpd_ps(d[0]));
  }
};
#else
// Portable 4-lane vectors (GCC/Clang vector extensions: SSE2 on x86-64, NEON on arm64).
struct S : Derived<S> {
#if defined(__aarch64__)
  static constexpr int W = 4, MR = 6, NV = 4;
#else
  static constexpr int W = 4, MR = 4, NV = 2;
#endif
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t M __attribute__((vector_size(16)));
  static V load(const float* p) { V v; __builtin_memcpy(&v, p, sizeof v); return v; }
  static void store(float* p, V v) { __builtin_memcpy(p, &v, sizeof v); }
  static V set1(float a) { return V{a, a, a, a}; }
  static V zero() { return set1(0.0f); }
  static V add(V a, V b) { return a + b; }
  static V addf(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V subf(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) {
    return V{__builtin_fmaf(a[0], b[0], c[0]), __builtin_fmaf(a[1], b[1], c[1]),
             __builtin_fmaf(a[2], b[2], c[2]), __builtin_fmaf(a[3], b[3], c[3])};
  }
  static V fnma(V a, V b, V c) { return fma(-a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V abs(V a) { return (V)((M)a & 0x7fffffff); }
  static M eq(V a, V b) { return a == b; }
  static M lt(V a, V b) { return a < b; }
  static M unord(V a) { return a != a; }
  static M ieq(V a, V b) { return (M)a == (M)b; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static M mask(bool b) { const int32_t v = b ? -1 : 0; return M{v, v, v, v}; }
  static V madd(M m, V a, V b) { return m ? a + b : a; }
  static float lane(V a, int l) { return a[l]; }
  static float hsum(V a) { return (a[0] + a[1]) + (a[2] + a[3]); }
  static V key(V a) {
    M b = (M)a;
    typedef uint32_t U __attribute__((vector_size(16)));
    return (V)(b ^ (M)((U)(b >> 31) >> 1));
  }
  static V imin(V a, V b) { M x = (M)a, y = (M)b; return (V)(x < y ? x : y); }
  static V imax(V a, V b) { M x = (M)a, y = (M)b; return (V)(x > y ? x : y); }
  static V div(V a, V b) { return a / b; }
  static V sqrt(V a) {
    return V{__builtin_sqrtf(a[0]), __builtin_sqrtf(a[1]), __builtin_sqrtf(a[2]),
             __builtin_sqrtf(a[3])};
  }
  // |a| < 2^23: (|a| + 2^23) - 2^23 rounds to an integer in the current (nearest) mode.
  static V round_even(V a) {
    const V b = abs(a), big = set1(8388608.0f);
    return b < big ? copysign((b + big) - big, a) : a;
  }
  static V floor(V a) { const V r = round_even(a); return copysign(r > a ? r - 1.0f : r, a); }
  static V ceil(V a) { const V r = round_even(a); return copysign(r < a ? r + 1.0f : r, a); }
  static V trunc(V a) {
    const V b = abs(a), r = round_even(b);
    return copysign(r > b ? r - 1.0f : r, a);
  }
  static M le(V a, V b) { return a <= b; }
  static M gt(V a, V b) { return a > b; }
  static M ge(V a, V b) { return a >= b; }
  static M ne(V a, V b) { return a != b; }
  static M mand(M a, M b) { return a & b; }
  static M mor(M a, M b) { return a | b; }
  static M mxor(M a, M b) { return a ^ b; }
  static M mnot(M a) { return ~a; }
  static M mtrue() { return mask(true); }
  static M mfalse() { return mask(false); }
  static bool any(M a) { return (a[0] | a[1] | a[2] | a[3]) != 0; }
  static V mad(V a, V b, V c) {
#if defined(__FP_FAST_FMAF)
    return fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  static V from_bits(uint32_t b) { return (V)(M{} + int32_t(b)); }
  static V band(V a, V b) { return (V)((M)a & (M)b); }
  static V bor(V a, V b) { return (V)((M)a | (M)b); }
  static V bxor(V a, V b) { return (V)((M)a ^ (M)b); }
  static V bandn(V a, V b) { return (V)((M)a & ~(M)b); }
  static V iadd(V a, V b) { return (V)((M)a + (M)b); }
  static V isub(V a, V b) { return (V)((M)a - (M)b); }
  typedef uint32_t U __attribute__((vector_size(16)));
  template <int n> static V shl(V a) { return (V)((U)a << n); }
  template <int n> static V shr(V a) { return (V)((U)a >> n); }
  template <int n> static V sar(V a) { return (V)((M)a >> n); }
  static V itof(V a) { return __builtin_convertvector((M)a, V); }
  static V ftoi(V a) { return (V)__builtin_convertvector(a, M); }
  static V copysign(V a, V b) { return (V)(((M)a & 0x7fffffff) | ((M)b & int32_t(0x80000000u))); }
  static constexpr int ND = 2;
  typedef double D __attribute__((vector_size(16)));
  static D dmad(D a, D b, D c) { return a * b + c; }
  typedef unsigned long long DU __attribute__((vector_size(16)));
  static void to_d(V a, D* d) {
    d[0] = D{a[0], a[1]};
    d[1] = D{a[2], a[3]};
  }
  static V from_d(const D* d) {
    return V{float(d[0][0]), float(d[0][1]), float(d[1][0]), float(d[1][1])};
  }
};
#endif

// The same operations on one float: tails of vector loops and the scalar tie paths.
struct Sc : Derived<Sc> {
  static constexpr int W = 1;
  using V = float;
  using M = bool;
  static V load(const float* p) { return *p; }
  static void store(float* p, V v) { *p = v; }
  static V set1(float a) { return a; }
  static V zero() { return 0.0f; }
  static V add(V a, V b) { return a + b; }
  static V addf(V a, V b) { return a + b; }
  static V sub(V a, V b) { return a - b; }
  static V subf(V a, V b) { return a - b; }
  static V mul(V a, V b) { return a * b; }
  static V fma(V a, V b, V c) { return __builtin_fmaf(a, b, c); }
  static V fnma(V a, V b, V c) { return __builtin_fmaf(-a, b, c); }
  static V max(V a, V b) { return a > b ? a : b; }
  static V min(V a, V b) { return a < b ? a : b; }
  static V abs(V a) { return __builtin_fabsf(a); }
  static M eq(V a, V b) { return a == b; }
  static M lt(V a, V b) { return a < b; }
  static M unord(V a) { return a != a; }
  static V select(M m, V a, V b) { return m ? a : b; }
  static V madd(M m, V a, V b) { return m ? a + b : a; }
  static V div(V a, V b) { return a / b; }
  static V sqrt(V a) { return __builtin_sqrtf(a); }
  static V floor(V a) { return __builtin_floorf(a); }
  static V ceil(V a) { return __builtin_ceilf(a); }
  static V trunc(V a) { return __builtin_truncf(a); }
  static V round_even(V a) { return __builtin_rintf(a); }
  static M le(V a, V b) { return a <= b; }
  static M gt(V a, V b) { return a > b; }
  static M ge(V a, V b) { return a >= b; }
  static M ne(V a, V b) { return a != b; }
  static M mand(M a, M b) { return a && b; }
  static M mor(M a, M b) { return a || b; }
  static M mxor(M a, M b) { return a != b; }
  static M mnot(M a) { return !a; }
  static M mtrue() { return true; }
  static M mfalse() { return false; }
  static bool any(M a) { return a; }
  static V mad(V a, V b, V c) {
#if defined(__FP_FAST_FMAF)
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
  }
  static V from_bits(uint32_t b) { return __builtin_bit_cast(float, b); }
  static uint32_t B(V a) { return __builtin_bit_cast(uint32_t, a); }
  static V band(V a, V b) { return from_bits(B(a) & B(b)); }
  static V bor(V a, V b) { return from_bits(B(a) | B(b)); }
  static V bxor(V a, V b) { return from_bits(B(a) ^ B(b)); }
  static V bandn(V a, V b) { return from_bits(B(a) & ~B(b)); }
  static V iadd(V a, V b) { return from_bits(B(a) + B(b)); }
  static V isub(V a, V b) { return from_bits(B(a) - B(b)); }
  template <int n> static V shl(V a) { return from_bits(B(a) << n); }
  template <int n> static V shr(V a) { return from_bits(B(a) >> n); }
  template <int n> static V sar(V a) { return from_bits(uint32_t(int32_t(B(a)) >> n)); }
  static V itof(V a) { return float(int32_t(B(a))); }
  static V ftoi(V a) { return from_bits(uint32_t(int32_t(a))); }
  static constexpr int ND = 1;
  using D = double;
  static D dmad(D a, D b, D c) {
#if defined(__FP_FAST_FMA)
    return __builtin_fma(a, b, c);
#else
    return a * b + c;
#endif
  }
  using DU = uint64_t;
  static void to_d(V a, D* d) { d[0] = a; }
  static V from_d(const D* d) { return float(d[0]); }
};

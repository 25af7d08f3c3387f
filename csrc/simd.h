// A few vector operations for the instruction set this translation unit is compiled for.
// Included only inside an anonymous namespace of a kernel TU (internal linkage).
//
// `max(a, b)` and `min(a, b)` return `b` when either operand is NaN (the x86 semantics);
// the kernels' NaN-safe paths rely on exactly that.
#if defined(__AVX512F__)
struct S {
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
};
#elif defined(__AVX2__) && defined(__FMA__)
struct S {
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
};
#else
// Portable 4-lane vectors (GCC/Clang vector extensions: SSE2 on x86-64, NEON on arm64).
struct S {
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
};
#endif

// The same operations on one float: tails of vector loops and the scalar tie paths.
struct Sc {
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
};

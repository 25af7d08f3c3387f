// Conversions between bfloat16 / float16 and float32, bit for bit as XLA converts (nearest,
// ties to even; bfloat16 NaN -> the quiet NaN with its sign; float16 NaN keeps its top payload,
// quietened), and the finite-value scans that come with them: the low forward's
// (kernel_bf16fuse_low.h) and the low recorded backward's (kernel_lowrec_backward.h).
//
// No namespace of its own and no dependency on the kernels' vector types: included inside the
// float32 kernels' anonymous namespace (kernels.inc, through kernel_bf16fuse_low.h) and inside
// the wide kernels' namespace (kernel_lowrec_backward.h), once per instruction set.
#pragma once

inline uint32_t low_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}
inline float low_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// The float32 bits of a bfloat16 (Kind 1) or float16 (Kind 2) value, exactly; a float16 NaN
// comes back quiet (vcvtph2ps's and XLA's widening), a bfloat16 NaN unchanged (XLA's shift).
template <int Kind>
inline uint32_t widen_bits(uint16_t h) {
  if constexpr (Kind == 1) {
    return uint32_t(h) << 16;
  } else {
    const uint32_t s = uint32_t(h & 0x8000u) << 16, e = h & 0x7c00u, m = h & 0x3ffu;
    if (e == 0x7c00u) return s | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u);
    if (e != 0) return s | ((uint32_t(h & 0x7fffu) << 13) + 0x38000000u);
    // Zero or subnormal: m * 2^-24, a normal float32 (exact whatever the MXCSR says).
    return s | low_bits(float(m) * 5.9604644775390625e-8f);
  }
}

// A float32 rounded to bfloat16 (Kind 1) or float16 (Kind 2), bit for bit as XLA converts.
template <int Kind>
inline uint16_t narrow_bits(float f) {
  const uint32_t u = low_bits(f), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
  if constexpr (Kind == 1) {
    const uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return uint16_t(a > 0x7f800000u ? (s | 0x7fc0u) : r);
  } else {
    if (a > 0x7f800000u) return uint16_t(s | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return uint16_t(s | 0x7c00u);  // 65520 and up round to infinity
    if (a >= 0x38800000u) {                               // a normal float16 (2^-14 and up)
      const uint32_t r = a - 0x38000000u;
      return uint16_t(s | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    // Subnormal or zero: adding 0.5 leaves the rounded multiple of 2^-24 in the low bits (the
    // addition rounds to nearest even; a float32 subnormal, zero under DAZ, rounds to 0 either
    // way).
    return uint16_t(s | (low_bits(low_float(a) + 0.5f) - 0x3f000000u));
  }
}

// n values at src widened to float32 at dst; false when one of them is not finite.
template <int Kind>
bool widen_run(const uint16_t* __restrict src, float* __restrict dst, int64_t n) {
  constexpr uint16_t kExp = Kind == 1 ? 0x7f80u : 0x7c00u;
  int64_t j = 0;
  uint32_t bad = 0;
#if defined(__AVX512F__)
  if constexpr (Kind == 2) {
    for (; j + 16 <= n; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j));
      const __m256i e = _mm256_and_si256(h, _mm256_set1_epi16(int16_t(kExp)));
      bad |= uint32_t(_mm256_movemask_epi8(_mm256_cmpeq_epi16(e, _mm256_set1_epi16(int16_t(kExp)))));
      _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(h));
    }
  }
#endif
  for (; j < n; ++j) {
    const uint16_t h = src[j];
    bad |= uint32_t((h & kExp) == kExp);
    dst[j] = low_float(widen_bits<Kind>(h));
  }
  return bad == 0;
}

// Whether the n values at src are all finite (a scan that writes nothing).
template <int Kind>
bool finite_run(const uint16_t* src, int64_t n) {
  constexpr uint16_t kExp = Kind == 1 ? 0x7f80u : 0x7c00u;
  uint32_t bad = 0;
  for (int64_t j = 0; j < n; ++j) bad |= uint32_t((src[j] & kExp) == kExp);
  return bad == 0;
}

// n float32 values at src rounded to the low dtype at dst. The vector loop's end is computed
// before it (not `j + 16 <= n`): with that test GCC could not bound the scalar tail of a clone
// whose n is constant (lowrec_mark's N) and warned of an iteration 2^62 (a false alarm: the
// tail runs n % 16 times).
template <int Kind>
void narrow_run(const float* __restrict src, uint16_t* __restrict dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (Kind == 2) {
    for (const int64_t whole = n - n % 16; j < whole; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                          _mm512_cvtps_ph(_mm512_loadu_ps(src + j),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; j < n; ++j) dst[j] = narrow_bits<Kind>(src[j]);
}

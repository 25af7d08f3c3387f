// transpose16: a 16 x 16 block of floats transposed in registers (AVX-512), for the dense
// backward's kernel columns (kernel_dense_backward.h) and the low dense backward's
// (kernel_lowdense_backward.h).
//
// No namespace of its own: included inside the float32 kernels' anonymous namespace and inside
// the wide kernels' namespace, once per instruction set (nothing where AVX-512 is off).
#pragma once

#if defined(__AVX512F__)
// The 16 x 16 block at `src` (row stride ss) transposed to `dst` (row stride sd), in
// registers: pairs of floats, then of pairs, then of 128-bit lanes.
inline void transpose16(const float* src, int64_t ss, float* dst, int64_t sd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  // u[4g + c], lane q: column 4q + c of rows 4g .. 4g + 3.
  for (int g = 0; g < 16; g += 4)
    for (int h = 0; h < 2; ++h) {
      const __m512d a = _mm512_castps_pd(t[g + h]), b = _mm512_castps_pd(t[g + h + 2]);
      r[g + 2 * h] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
      r[g + 2 * h + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    }
  for (int c = 0; c < 4; ++c) {
    const __m512 s0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x44);
    const __m512 s1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xEE);
    const __m512 s2 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x44);
    const __m512 s3 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xEE);
    _mm512_storeu_ps(dst + (0 + c) * sd, _mm512_shuffle_f32x4(s0, s2, 0x88));
    _mm512_storeu_ps(dst + (4 + c) * sd, _mm512_shuffle_f32x4(s0, s2, 0xDD));
    _mm512_storeu_ps(dst + (8 + c) * sd, _mm512_shuffle_f32x4(s1, s3, 0x88));
    _mm512_storeu_ps(dst + (12 + c) * sd, _mm512_shuffle_f32x4(s1, s3, 0xDD));
  }
}
#endif

// The recording forward's block masks for bfloat16 / float16 operands (run_low with a record,
// kernel_bf16fuse_low.h): a block is marked when it may hold a product that rounds to the
// output's result, so that the low recorded backward (kernel_lowrec_backward.h), whose
// winners are the products rounding to y (kernel_wide_lowwin.h), scans only marked blocks.
//
// The products of max_min / min_max are values of the operands' dtype: the float32 marks
// (block result == y) are already those. A sum x + w rounds: under max the low winners are
// the products >= the bound of y's rounding interval (the scan's own compare), so a block
// holds one exactly when its maximum passes the same compare (every product is at most the
// block's maximum); under min, <= the upper bound. bfloat16 takes the scan's bound formula
// (bf16_bound, the same bits; a zero y's bound is subnormal and reads as zero under DAZ in
// both compares, a +-2^-126 y's is 2^-126: bf16_inner);
// float16 marks the blocks whose result rounds to y's float16 value (every float16 bound is
// a normal float32 and no product is subnormal under FTZ, so this is the same set).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_bf16fuse_low.h, never on its own.
#pragma once

// Whether the op's float32 products round in the low dtype (x + w; not min / max of values
// that are the dtype's already, nor their integer keys).
template <class Op>
constexpr bool lowrec_rounds() {
  return !Op::kKeyed && !std::is_same_v<Op, MaxMin> && !std::is_same_v<Op, MinMax>;
}

// kernel_wide_lowwin.h's bf16_inner (another namespace): a normal bfloat16 magnitude's inner
// rounding end, mag - half, never below 2^-126 (a subnormal bound reads as zero under DAZ).
inline uint32_t lowrec_bf16_inner(uint32_t mag, uint32_t half) {
  const uint32_t a = mag == 0 ? 0 : mag - half;
  return mag >= 0x00800000u && a < 0x00800000u ? 0x00800000u : a;
}

// The bound kernel_wide_lowwin.h's scan compares products with for the result y32 rounded to
// bfloat16 (y32 not NaN): bf16_bound<Max>(bfloat16(y32)).
template <bool Max>
inline uint32_t lowrec_bf16_bound(uint32_t u0) {
  const uint32_t u = ((u0 + 0x7fffu + ((u0 >> 16) & 1u)) >> 16) << 16;
  const uint32_t mag = u & 0x7fffffffu;
  const uint32_t half = 0x8000u - ((mag >> 16) & 1u);
  const uint32_t a = lowrec_bf16_inner(mag, half);
  const uint32_t z = mag == 0x7f800000u ? mag : mag + half;
  const bool neg = (u >> 31) != 0;
  return Max ? (neg || mag == 0 ? z | 0x80000000u : a) : (neg && mag != 0 ? a | 0x80000000u : z);
}

// The masks of n outputs (lanes of ys: their float32 results, finite data) from their nb
// blocks' results blk[j]: cd[q] = the bits of the blocks that may hold a low winner (floats,
// as record_tile_end keeps them). kind: 1 bfloat16, 2 float16.
template <bool Max, int N>
void lowrec_mark(int64_t kind, const float (*blk)[N], int64_t nb, const float* ys, float* cd) {
  alignas(64) uint32_t m[N];
  for (int q = 0; q < N; ++q) m[q] = 0;
  if (kind == 1) {
    alignas(64) float bd[N];
    for (int q = 0; q < N; ++q) bd[q] = low_float(lowrec_bf16_bound<Max>(low_bits(ys[q])));
    for (int64_t j = 0; j < nb; ++j)
      for (int q = 0; q < N; ++q)
        m[q] |= uint32_t(Max ? blk[j][q] >= bd[q] : blk[j][q] <= bd[q]) << j;
  } else {
    alignas(64) uint16_t hy[N], hb[N];
    narrow_run<2>(ys, hy, N);
    for (int q = 0; q < N; ++q) hy[q] = (hy[q] & 0x7fffu) ? hy[q] : 0;  // -0 rounds as +0
    for (int64_t j = 0; j < nb; ++j) {
      narrow_run<2>(blk[j], hb, N);
      for (int q = 0; q < N; ++q) {
        const uint16_t h = (hb[q] & 0x7fffu) ? hb[q] : 0;
        m[q] |= uint32_t(h == hy[q]) << j;
      }
    }
  }
  for (int q = 0; q < N; ++q) cd[q] = float(m[q]);
}

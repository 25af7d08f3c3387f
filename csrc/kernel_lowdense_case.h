// Whether a bfloat16 / float16 max / min call is the dense case whose recording forward keeps
// exact winner codes instead of block masks (kernel_lowdense_record.h) and whose backward is
// their scatter (kernel_lowdense_backward.h): one tap, one output position per image, no
// offset and no padding value (the float32 kernels' dense_winner_case, kernel_dense_backward.h,
// on the geometry alone), not depthwise, more than one block of kernel rows. Both sides read the
// record by this one test: the float32 forward writes codes only where it holds (and the data
// are finite: else "not recorded", -1), the wide backward reads codes only where it holds.
//
// No namespace of its own and nothing but the geometry: included inside the float32 kernels'
// anonymous namespace (kernels.inc) and inside the wide kernels' namespace
// (kernel_lowrec_backward.h), once per instruction set.
#pragma once

inline bool lowdense_case(const jaxconv::Geom& g) {
  bool one = !g.has_pad;
  for (int d = 0; d < 3; ++d) one = one && g.k[d] == 1 && g.os[d] == 1 && g.lo[d] == 0;
  const bool depthwise = g.i == 1 && g.g > 0 && g.o / g.g == 1;
  return one && !depthwise && g.i > jaxconv::kRecordBlockRows;
}

// The codes of that record, read by both sides: k >= 0, the one winner's kernel row; -2, no
// winner; -2 - mask (mask < 2^24, kRecordMaxBlocks bits), a tie whose winners the backward finds
// again in the blocks of the mask; for K <= 2^15, a tie of exactly two winners k1 < k2 is
// kLowPair - (k1 * 2^15 + k2) instead (below every mask's code), so that the backward needs no
// rescan for it.
static_assert(jaxconv::kRecordMaxBlocks <= 24, "a tie's mask fits below kLowPair");
constexpr int32_t kLowPair = -2 - (int32_t(1) << 24);
inline bool lowdense_pairs(int64_t K) { return K <= (int64_t(1) << 15); }
inline int32_t lowdense_pair(int64_t k1, int64_t k2) {
  return kLowPair - int32_t((k1 << 15) | k2);
}

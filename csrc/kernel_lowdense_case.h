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
// again in the blocks of the mask; a tie of two winners k1 < k2 (three, k1 < k2 < k3, where K <=
// 2^10) is kLowList - v instead (below every mask's code), v holding the winners in fields of
// F bits (k < 2^F): k1 + k2 * 2^F (two fields, 2F <= 30), or k1 + k2 * 2^F + k3 * 2^2F (three,
// 3F <= 30; two winners repeat k2 as k3), so that the backward needs no rescan for them.
static_assert(jaxconv::kRecordMaxBlocks <= 24, "a tie's mask fits above kLowList");
constexpr int32_t kLowList = -2 - (int32_t(1) << 24);

// F, the field width (the least f >= 1 with 2^f >= K), and how many winners a code lists (0:
// none; K > 2^15). Without a loop: both run per listed output (two or three winners) in the
// record and in the backward, twice per code.
inline int lowdense_field(int64_t K) {
  return K <= 2 ? 1 : 64 - __builtin_clzll(uint64_t(K - 1));
}
inline int lowdense_listed(int64_t K) {
  const int f = lowdense_field(K);
  return 3 * f <= 30 ? 3 : 2 * f <= 30 ? 2 : 0;
}

// The code of c winners (2 <= c <= lowdense_listed(K)) at k[0] < k[1] (< k[2]).
inline int32_t lowdense_list(const int64_t* k, int64_t c, int64_t K) {
  const int f = lowdense_field(K);
  int64_t v = k[0] | (k[1] << f);
  if (lowdense_listed(K) == 3) v |= k[c - 1] << (2 * f);
  return kLowList - int32_t(v);
}

// The winners of a code <= kLowList, into k[]; returns their count.
inline int lowdense_unlist(int32_t code, int64_t K, int64_t* k) {
  const int f = lowdense_field(K);
  const int64_t v = int64_t(kLowList) - code, m = (int64_t(1) << f) - 1;
  k[0] = v & m;
  k[1] = (v >> f) & m;
  if (lowdense_listed(K) < 3) return 2;
  k[2] = v >> (2 * f);
  return k[2] == k[1] ? 2 : 3;
}

// Exact winner codes for the dense recording forward on bfloat16 / float16 operands
// (kernel_dense_record.h with call.low; the ops of LowCodes), so that their backward is a scatter
// (kernel_lowdense_backward.h) rather than the low recorded scan of marked blocks.
//
// The winners of a low max / min are the float32 products that round to the output's result y
// (its dtype's value), found by the low backward's compare (kernel_wide_lowwin.h): under max a
// product wins when it is >= the lower end of y's rounding interval, under min when it is <= the
// upper end. At a tile's end the masks (kernel_lowrec_mark.h: the blocks that may hold such a
// product) are turned into codes as exact_codes does for float32 (kernel_densebwd_exact.h), the
// marked blocks scanned along k in x's row (in L1 from the tile's loop) against the block's
// transposed kernel columns, with that compare:
// - bfloat16: the product against the bound lowrec_bf16_bound gives (the scan's bound, the same
//   bits; a zero y's bound is subnormal and reads as zero under DAZ in both compares);
// - float16: the product rounded to float16 against y rounded (every float16 bound is a normal
//   float32 and the products are below y's float32 maximum under max, above it under min: a
//   product passes the bound exactly when it rounds to y).
// An output's code is then the winner's k when it has exactly one, its winners when it has two
// (or three), -2 - mask when it has more (a tie: the backward rescans the marked blocks), -2 when
// it has none (kernel_lowdense_case.h) -- the counts of the low scan, which rescans the same blocks with
// the same compare.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace (once per
// instruction set), after kernel_lowrec_mark.h and before kernel_dense_record.h, never on its
// own.
#pragma once

#include "kernel_lowdense_case.h"

// The ops whose low dense record holds codes, and how a product is matched: 0, the product
// (x + w, or a user combine) rounded to the dtype (its bound, or its rounded value, against
// y's); 1, min(x, w) under max; 2, max(x, w) under min (values of the dtype: a product equals
// y exactly when both operands pass y, the low scan's compare; on integer keys, those of the
// float forward's keyed loop, they are compared as the floats they stand for).
//
// A functor says so itself with `static constexpr bool kLowCodes` (a generated user op,
// jaxconv/_src/engines/native/codegen.py: a max / min whose products the wide kernels compute
// bit for bit and whose finite operands make no NaN, so the backward's compare of its products
// against y's bound finds the winners found here); the built-in ops below by their type. Both
// sides must agree: the user op's wide library declares the same (kernel_lowdense_backward.h).
template <class Op, class = void>
struct LowCodes : std::false_type {};
template <class Op>
struct LowCodes<Op, std::enable_if_t<Op::kLowCodes>> : std::true_type {
  static constexpr int kPick = 0;
};
template <class R>
struct LowCodes<Plus<R>> : std::true_type {
  static constexpr int kPick = 0;
};
template <>
struct LowCodes<MaxMin> : std::true_type {
  static constexpr int kPick = 1;
};
template <>
struct LowCodes<MinMax> : std::true_type {
  static constexpr int kPick = 2;
};
template <bool Max>
struct LowCodes<KeyMinMax<Max>> : std::true_type {
  static constexpr int kPick = Max ? 1 : 2;
};

// Whether a low call's dense record holds codes (else the block masks).
template <class Op>
bool lowdense_records(const Ctx& c) {
  return LowCodes<Op>::value && lowdense_case(c.g);
}

// W products rounded to float16 and widened back (exact), as XLA's convert rounds them.
inline S::V lowdense_f16(S::V p) {
#if defined(__AVX512F__)
  return _mm512_cvtph_ps(_mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  alignas(64) float a[W];
  S::store(a, p);
  for (int l = 0; l < W; ++l) a[l] = low_float(widen_bits<2>(narrow_bits<2>(a[l])));
  return S::load(a);
#endif
}

// The lanes of W pairs of operands (x, w: keys for a keyed Op) whose product is an output's
// winner, as bits. bd: for x + w the bound (bfloat16) or y rounded (float16), else y.
template <class Op, int Kind>
inline uint32_t lowdense_hits(S::V x, S::V w, S::V bd) {
  constexpr int kPick = LowCodes<Op>::kPick;
  if constexpr (kPick == 0) {
    const S::V p = Op::template comb<S>(x, w);
    if constexpr (Kind == 2) return mask_bits(S::eq(lowdense_f16(p), bd));
    else return mask_bits(Op::kReduce == 1 ? S::ge(p, bd) : S::le(p, bd));
  } else {
    if constexpr (Op::kKeyed) x = S::key(x), w = S::key(w);
    if constexpr (kPick == 1) return mask_bits(S::ge(x, bd)) & mask_bits(S::ge(w, bd));
    else return mask_bits(S::le(x, bd)) & mask_bits(S::le(w, bd));
  }
}

// The same for one pair.
template <class Op, int Kind>
inline bool lowdense_hit(float x, float w, float bd) {
  constexpr int kPick = LowCodes<Op>::kPick;
  if constexpr (kPick == 0) {
    const float p = Op::template comb<Sc>(x, w);
    if constexpr (Kind == 2) return low_float(widen_bits<2>(narrow_bits<2>(p))) == bd;
    else return Op::kReduce == 1 ? p >= bd : p <= bd;
  } else {
    if constexpr (Op::kKeyed) x = key_of(x), w = key_of(w);
    return kPick == 1 ? x >= bd && w >= bd : x <= bd && w <= bd;
  }
}

// The number of winners of x's row `xp` against kernel column `wo` (both along k) in the blocks
// of `mask`, and the first three's k in pos[] (in the order of k).
template <class Op, int Kind>
int64_t lowdense_count(const float* xp, const float* wo, int64_t K, int64_t kb, uint32_t mask,
                       float bd, int64_t* pos) {
  const S::V bv = S::set1(bd);
  int64_t cnt = 0;
  for (; mask; mask &= mask - 1) {
    const int64_t k0 = int64_t(__builtin_ctz(mask)) * kb, k1 = k0 + kb < K ? k0 + kb : K;
    int64_t k = k0;
    for (; k + W <= k1; k += W) {
      uint32_t bits = lowdense_hits<Op, Kind>(S::load(xp + k), S::load(wo + k), bv);
      for (; bits; bits &= bits - 1, ++cnt)
        if (cnt < 3) pos[cnt] = k + __builtin_ctz(bits);
    }
    for (; k < k1; ++k)
      if (lowdense_hit<Op, Kind>(xp[k], wo[k], bd)) {
        if (cnt < 3) pos[cnt] = k;
        ++cnt;
      }
  }
  return cnt;
}

// An output's code (kernel_lowdense_case.h) from its winners' count c, the first three's k and
// its block mask; `listed`: lowdense_listed(K).
inline int32_t lowdense_code(int64_t c, const int64_t* pos, uint32_t mask, int listed,
                             int64_t K) {
  if (c == 1) return int32_t(pos[0]);
  if (c == 0) return -2;
  return c <= listed ? lowdense_list(pos, c, K) : -2 - int32_t(mask);
}

// The codes of `rows` output rows of one tile (as exact_codes: row r's x in xr[r], its nvalid
// float32 results and masks at yr + r * O and cr + r * O, each mask replaced by its code; the
// transposed kernel columns `cols`, rows cs apart). Out of line, as exact_codes.
template <class Op, int Kind>
__attribute__((noinline)) void lowdense_codes(const float* const* xr, int rows,
                                              const float* cols, int64_t cs, int64_t K,
                                              int64_t kb, const float* yr, int32_t* cr,
                                              int64_t O, int64_t nvalid) {
  constexpr bool kMax = Op::kReduce == 1;
  const int64_t whole = kb == 64 ? K / 64 : 0;
  const int listed = lowdense_listed(K);
  alignas(64) float bd[NR];
  alignas(64) uint16_t h[NR];
  for (int r = 0; r < rows; ++r, yr += O, cr += O) {
    // Each output's bound (bfloat16) or result rounded to float16 (x + w), else its result.
    if constexpr (LowCodes<Op>::kPick != 0) {
      for (int64_t l = 0; l < nvalid; ++l) bd[l] = yr[l];
    } else if constexpr (Kind == 2) {
      narrow_run<2>(yr, h, nvalid);
      for (int64_t l = 0; l < nvalid; ++l) bd[l] = low_float(widen_bits<2>(h[l]));
    } else {
      for (int64_t l = 0; l < nvalid; ++l)
        bd[l] = low_float(lowrec_bf16_bound<kMax>(low_bits(yr[l])));
    }
    const float* xp = xr[r];
    for (int64_t l = 0; l < nvalid; ++l) {
      const uint32_t mask = uint32_t(cr[l]);
      const float* wo = cols + l * cs;
      int64_t pos[3] = {0, 0, 0};
      if (mask != 0 && 32 - __builtin_clz(mask) <= whole) {
        // Whole blocks of 64 rows (the usual output has one): each block's compares in one word.
        const S::V bv = S::set1(bd[l]);
        int64_t c = 0;
        for (uint32_t m = mask; m; m &= m - 1) {
          const int64_t k0 = int64_t(__builtin_ctz(m)) * 64;
          uint64_t word = 0;
          for (int j = 0; j < 64 / W; ++j)
            word |= uint64_t(lowdense_hits<Op, Kind>(S::load(xp + k0 + j * W),
                                                      S::load(wo + k0 + j * W), bv))
                    << (j * W);
          for (; word; word &= word - 1, ++c)
            if (c < 3) pos[c] = k0 + __builtin_ctzll(word);
        }
        cr[l] = lowdense_code(c, pos, mask, listed, K);
        continue;
      }
      const int64_t c = mask ? lowdense_count<Op, Kind>(xp, wo, K, kb, mask, bd[l], pos) : 0;
      cr[l] = lowdense_code(c, pos, mask, listed, K);
    }
  }
}

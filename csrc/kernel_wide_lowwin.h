// The backward of the max / min ops on bfloat16 / float16 operands (float32 copies, each
// product rounded to the operands' dtype before it is matched against y), of the built-in ops
// and of user ops (csrc/userop_wide.h: their products go through low_pass's generic Op::comb
// compare): one interval scan that lists every output's winners as it finds them, so no
// output rescans its window.
//
// A float32 product rounds (to nearest even) to y exactly when it lies in y's rounding
// interval [lo, hi]. Every product is at most the forward's float32 maximum, which rounds to
// y (rounding is monotone), so under max the winners are the products >= lo, under min those
// <= hi: one compare per product (a NaN y gets a NaN bound and matches nothing).
//
// The scan (2 output positions x kLV vectors of output channels, panels of kLK kernel rows
// that stay in L1 over a run of kLPos positions) adds kLBig + the row's offset in the panel
// to each matching lane: one float then holds the panel's count and, for a single match, its
// row. After each panel the lanes with a match record their winners (an output's first, alone
// in its panel, in vector form; any other one by one); a panel holding two or more of one
// output's winners is rescanned for that output only (kLK products). The products of the
// built-in ops read x as an embedded broadcast (kernel_wide_lowbcast.h). The winners
// come out in kernel-row order, each output's count gives its share g / count.
//
// The gradients are then routed as kernel_wide_backward.h's rescan routes them (dx: per its
// blocks of NB columns, rows, columns, winners in kernel-row order; dw: per column, rows in
// order), so every float32 sum adds the same terms in the same order: the same bits.
//
// Included at the end of kernel_wide_backward.h (same namespace and vector width).
#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

#include "kernel_wide.h"
#include "kernel_wide_lowbcast.h"

namespace JAXCONV_WIDE_NS {

constexpr int kLV = JAXCONV_WIDE_BYTES == 64 ? 4 : 2;  // vectors of output channels
constexpr int64_t kLK = 64;                            // kernel rows per panel
constexpr int64_t kLPos = 32;                          // positions per run of the scan
constexpr float kLBig = 4096.0f;
static_assert(kLK * kLK <= 4096, "a panel's row offsets must sum below kLBig");

// The smallest normal float32 magnitude (2^-126), as bits.
constexpr uint32_t kMinNormalBits = 0x00800000u;

// The inner end (toward zero) of a normal bfloat16 magnitude's rounding interval, as bits:
// mag - half, but never below 2^-126. The kernels run under DAZ / FTZ (csrc/denormals.h):
// no product is a float32 subnormal and every compare reads a subnormal bound as zero, so the
// interval of +-2^-126 (whose inner end, 2^-126 less half a bfloat16 step, is subnormal) must
// end at 2^-126 itself; a zero bound there made every zero product a winner of a +-2^-126
// result (fuzz seed 7100015). A zero or subnormal y keeps mag - half.
inline uint32_t bf16_inner(uint32_t mag, uint32_t half) {
  const uint32_t a = mag == 0 ? 0 : mag - half;
  return mag >= kMinNormalBits && a < kMinNormalBits ? kMinNormalBits : a;
}

// The bfloat16 rounding interval [lo, hi] of a bfloat16 value y (not NaN), in float32: the
// float32 values that round (to nearest even) to y, less the subnormals (bf16_inner); both
// signs of zero for a zero y.
inline void bf16_bounds(float y, float& lo, float& hi) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof(u));
  const uint32_t mag = u & 0x7FFFFFFFu;
  const uint32_t half = (mag >> 16) & 1u ? 0x7FFFu : 0x8000u;  // odd y: ties go away
  const uint32_t a = bf16_inner(mag, half);
  const uint32_t z = mag == 0x7F800000u ? mag : mag + half;  // up to infinity itself
  float fa, fz;
  std::memcpy(&fa, &a, sizeof(fa));
  std::memcpy(&fz, &z, sizeof(fz));
  if (mag == 0) lo = -fz, hi = fz;
  else if (u >> 31) lo = -fz, hi = -fa;
  else lo = fa, hi = fz;
}

// The float16 rounding interval [lo, hi] of a float16 value y (not NaN), in float32.
inline void f16_bounds(float y, float& lo, float& hi) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof(u));
  const uint32_t m32 = u & 0x7FFFFFFFu;
  if (m32 > 0x38800000u && m32 < 0x7F800000u) {
    // Finite and above 2^-14 (the smallest normal): float16 steps are 2^13 float32 units on
    // both sides, so the halfway points are 0x1000 units away (kept for an even y, where
    // halfway rounds to it), as bf16_bounds does for bfloat16.
    const uint32_t half = (m32 >> 13) & 1u ? 0xFFFu : 0x1000u;
    const uint32_t a = m32 - half, z = m32 + half;
    float fa, fz;
    std::memcpy(&fa, &a, sizeof(fa));
    std::memcpy(&fz, &z, sizeof(fz));
    if (u >> 31) lo = -fz, hi = -fa;
    else lo = fa, hi = fz;
    return;
  }
  const _Float16 h = static_cast<_Float16>(y);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof(bits));
  const uint32_t mag = bits & 0x7FFFu;
  auto value = [](uint32_t m) {  // a float16 magnitude's value (m < 0x7C00), exactly
    if (m < 0x400u) return std::ldexp(float(m), -24);
    return std::ldexp(float(1024u + (m & 0x3FFu)), int(m >> 10) - 25);
  };
  float a, z;
  if (mag == 0) {  // both zeros: the halfway 2^-25 rounds to the even 0
    lo = -std::ldexp(1.0f, -25);
    hi = -lo;
    return;
  }
  if (mag == 0x7C00u) {  // infinity: from halfway past the largest finite value (65520)
    a = 65520.0f;
    z = std::numeric_limits<float>::infinity();
  } else {
    const float v = value(mag);
    const float up = mag == 0x7BFFu ? 65536.0f : value(mag + 1), down = value(mag - 1);
    const float mu = (v + up) * 0.5f, md = (v + down) * 0.5f;  // exact in float32
    const bool even = (mag & 1u) == 0;  // halfway rounds to the even neighbour
    z = even ? mu : std::nextafter(mu, 0.0f);
    a = even ? md : std::nextafter(md, std::numeric_limits<float>::infinity());
  }
  if (bits >> 15) lo = -z, hi = -a;
  else lo = a, hi = z;
}

// The one bound a product is compared with: lo under max, hi under min; NaN for a NaN y.
template <int Rnd, bool Max>
inline float low_bound(float y) {
  if (y != y) return y;
  float lo, hi;
  if constexpr (Rnd == jaxconv::kRoundF16) f16_bounds(y, lo, hi);
  else bf16_bounds(y, lo, hi);
  return Max ? lo : hi;
}

// low_bound for bfloat16 without branches (the bounds of a run are filled in one vector loop):
// the same value as bf16_bounds' lo (Max) / hi.
template <bool Max>
inline float bf16_bound(float y) {
  uint32_t u;
  std::memcpy(&u, &y, sizeof(u));
  const uint32_t mag = u & 0x7FFFFFFFu;
  const uint32_t half = 0x8000u - ((mag >> 16) & 1u);
  const uint32_t a = bf16_inner(mag, half);
  const uint32_t z = mag == 0x7F800000u ? mag : mag + half;
  const bool neg = (u >> 31) != 0;
  const uint32_t r = Max ? (neg || mag == 0 ? z | 0x80000000u : a)
                         : (neg && mag != 0 ? a | 0x80000000u : z);
  float f;
  std::memcpy(&f, &r, sizeof(f));
  return y != y ? y : f;
}

// The bound the scan compares an output's products with. A min(x, w) under max or a max(x, w)
// under min is one of its operands, a value of their dtype: it passes y's bound exactly when
// it passes y itself (the dtype's values in y's rounding interval are y alone; -0 == +0), so
// y is the bound and no interval is computed.
template <class Op, int Rnd, bool Max>
inline float scan_bound(float y) {
  if constexpr ((Op::kComb == 1 && Max) || (Op::kComb == 2 && !Max)) return y;
  else if constexpr (Rnd == jaxconv::kRoundBF16) return bf16_bound<Max>(y);
  else return low_bound<Rnd, Max>(y);
}

// The lanes of v that are not zero, as bits.
//
// AVX-512: the 16-bit mask is widened in a general register by kmovw in an asm statement.
// Left to GCC 12 at -O1 (user ops), the widening of a mask that is spilled became a kmovw
// *store* of 2 bytes into the 4-byte stack slot of low_scan_run's `bits`, which was then read
// back with 32-bit loads: bits 16..31 held stale stack bytes, phantom winners in lanes
// 16..31 (another output's) and reads past a[16] (UBSan), so the bf16 gradients of a user op
// changed from run to run (tests/test_native_low_user.py's MIN_GATE ties case, -O1 only).
inline uint32_t lane_bits(VecOf<float> v) {
#if JAXCONV_WIDE_BYTES == 64 && defined(__AVX512F__)
  const __mmask16 k = _mm512_cmp_ps_mask((__m512)v, _mm512_setzero_ps(), _CMP_NEQ_UQ);
  uint32_t bits;
  __asm__("kmovw %1, %0" : "=r"(bits) : "k"(k));  // zero-extends into the register
  return bits;
#elif JAXCONV_WIDE_BYTES == 32 && defined(__AVX__)
  return uint32_t(_mm256_movemask_ps(_mm256_cmp_ps((__m256)v, _mm256_setzero_ps(),
                                                   _CMP_NEQ_UQ)));
#elif JAXCONV_WIDE_BYTES == 16 && defined(__SSE2__)
  return uint32_t(_mm_movemask_ps(_mm_cmpneq_ps((__m128)v, _mm_setzero_ps())));
#else
  constexpr int L = Vt<float>::L;
  alignas(64) float a[L];
  std::memcpy(a, &v, sizeof(v));
  uint32_t bits = 0;
  for (int l = 0; l < L; ++l) bits |= uint32_t(a[l] != 0.0f) << l;
  return bits;
#endif
}

struct LowWin {
  const Plan<float>* f;
  const float* y;
  const float* gy;
  const float* w;        // this batch element's kernel (K, O)
  float* scale;          // per output: g / count (one winner: after pass 1, its dw term)
  int32_t* code;         // per output: its one winner's row, -2 (none), or -3 - its list
  float* dx;
  float* dw;
  const float* panels;   // [G][lblocks][K][LNB]
  const int32_t* tab;    // [P][T]: the input row's offset in its image, -1 in the padding
  const int32_t* kt;     // [K][2]: a kernel row's tap and channel
  std::vector<int32_t>* lists;  // per pass-1 item: n, then n rows in order, per tied output
                                // (recorded: then their n dw terms, float bits)
  ImageRuns runs;        // pass 1's items (kernel_wide_backward.h)
  int64_t lblocks, img, b;
  bool plain;
  const int32_t* rec;    // the low recording forward's block masks, or null (a full scan)
  const float* wt;       // rec: this batch element's kernel columns along k, (O, K)
  const int32_t* btab;   // rec: per block, its tap and first channel (-1: not 64 of one tap)
  int64_t kb;            // rec: kernel rows per block
  const uint16_t* y16;   // rec: y in the low dtype (then y is null), or null
  const uint16_t* g16;   // rec: g likewise
  bool skip0;            // rec: skip the outputs whose g is zero (FiniteRule)
};

// An output's code for its list at `at` in its item's lists: -3 - at. Codes are 32 bits (a
// kernel row is below 2^30; half the bytes of 64-bit codes, which pass 1 writes and pass 2
// reads for every output); a list past 2^31 entries (8 GiB of them) fails the call.
inline int32_t low_list_code(size_t at) {
  if (at > size_t(std::numeric_limits<int32_t>::max()) - 3) throw std::length_error("lists");
  return -3 - int32_t(at);
}

template <class Op, bool Exact, bool Max>
inline bool low_hit(float x, float w, float bound) {
  const VecOf<float> p = Op::template comb<float, Exact>(splat<float>(x), splat<float>(w));
  return (Max ? p >= splat<float>(bound) : p <= splat<float>(bound))[0] != 0;
}

// x + w rounded once, on the FMA ports (fma(x, 1, w)): the same bits as x + w.
inline VecOf<float> add_on_fma(VecOf<float> x, VecOf<float> w) {
#if JAXCONV_WIDE_BYTES == 64 && defined(__AVX512F__)
  return (VecOf<float>)_mm512_fmadd_ps((__m512)x, _mm512_set1_ps(1.0f), (__m512)w);
#elif JAXCONV_WIDE_BYTES == 32 && defined(__FMA__)
  return (VecOf<float>)_mm256_fmadd_ps((__m256)x, _mm256_set1_ps(1.0f), (__m256)w);
#else
  return x + w;
#endif
}

// Whether each lane's product of x and w passes its bound (as low_hit decides it). A
// min(x, w) is >= lo exactly when x and w both are (a NaN fails both), a max(x, w) <= hi
// when both are: two compares, no combine. A sum x + w goes alternately (lane block j) to
// the FMA ports and the add ports: the compare and the masked add load the latter (on Zen 4
// a scan with plain adds waits on them, as kernel_winner.h measured).
template <class Op, bool Exact, bool Max>
inline auto low_pass(VecOf<float> x, VecOf<float> w, VecOf<float> bd, int j) {
  if constexpr (Op::kComb == 1 && Max) {
    return (x >= bd) & (w >= bd);
  } else if constexpr (Op::kComb == 2 && !Max) {
    return (x <= bd) & (w <= bd);
  } else {
    VecOf<float> p;
    if constexpr (Op::kComb == 0) p = (j & 1) ? x + w : add_on_fma(x, w);
    else p = Op::template comb<float, Exact>(x, w);
    return Max ? p >= bd : p <= bd;
  }
}

// Rows [0, n) of a panel segment for two positions (x0, x1): each product's lane adds kv
// (kLBig + its row's offset in the panel) where it passes the bound.
template <class Op, bool Exact, bool Max>
inline void low_scan_rows(const float* x0, const float* x1, const float* wr, int64_t n,
                          float kv0, const VecOf<float> (&bd)[2][kLV],
                          VecOf<float> (&acc)[2][kLV]) {
  using V = VecOf<float>;
  constexpr int L = Vt<float>::L;
  constexpr int LNB = kLV * L;
  const V one = splat<float>(1.0f);
  V kv = splat<float>(kv0);
  for (int64_t i = 0; i < n; ++i, wr += LNB) {
    V wv[kLV];
    for (int v = 0; v < kLV; ++v) std::memcpy(&wv[v], wr + v * L, sizeof(V));
    if constexpr (LowBc<Op, Max>::kOn) {  // x read by the product's instruction
      // The row's kernel vectors stay in registers (opaque to the compiler, which otherwise
      // reloads each for every product: twice the loads, beside the broadcasts' own).
      for (int v = 0; v < kLV; ++v) lowbc_keep(wv[v]);
      for (int r = 0; r < 2; ++r)
        for (int v = 0; v < kLV; ++v) {
          const V p = LowBc<Op, Max>::comb((r ? x1 : x0) + i, wv[v], r * kLV + v);
          const auto e = Max ? p >= bd[r][v] : p <= bd[r][v];
          acc[r][v] = e ? acc[r][v] + kv : acc[r][v];
        }
      kv += one;
      continue;
    }
    const V xa = splat<float>(x0[i]), xb = splat<float>(x1[i]);
    for (int v = 0; v < kLV; ++v) {
      const auto e = low_pass<Op, Exact, Max>(xa, wv[v], bd[0][v], v);
      acc[0][v] = e ? acc[0][v] + kv : acc[0][v];
    }
    for (int v = 0; v < kLV; ++v) {
      const auto e = low_pass<Op, Exact, Max>(xb, wv[v], bd[1][v], kLV + v);
      acc[1][v] = e ? acc[1][v] + kv : acc[1][v];
    }
    kv += one;
  }
}

// Per run of positions: each output's bound, count, first winner and further winners.
struct LowRun {
  alignas(64) float bnd[kLPos][kLV * Vt<float>::L];
  int32_t cnt[kLPos * kLV * Vt<float>::L];
  int32_t first[kLPos * kLV * Vt<float>::L];
  std::vector<int64_t> xo;                 // [kLPos][T]: input row offsets, -1 padding
  std::vector<std::pair<int32_t, int32_t>> more, sorted;  // (output, row) after the first
  std::vector<int32_t> start;
};

// Pass 1's scan of positions q0 .. q0 + nq (rows of batch element lw.b) against one block
// of LNB output channels: records the winners, then each output's code, scale and list.
template <class Op, bool Exact, bool Max, int Rnd>
void low_scan_run(const LowWin& lw, LowRun& st, std::vector<int32_t>& list, int64_t grp,
                  int64_t lblk, int64_t q0, int64_t nq) {
  using V = VecOf<float>;
  constexpr int L = Vt<float>::L;
  constexpr int LNB = kLV * L;
  const Plan<float>& pl = *lw.f;
  const Geom& g = *pl.g;
  const int64_t I = g.i, T = pl.T, K = pl.K, O = g.o;
  const float* xb = pl.x + lw.b * pl.xs;
  const float* panel = lw.panels + (grp * lw.lblocks + lblk) * K * LNB;
  const int64_t o0 = lblk * LNB, col0 = grp * pl.og + o0;
  const int64_t cols = pl.og - o0 < LNB ? pl.og - o0 : LNB;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float* yb = lw.y + lw.b * pl.ys;
  for (int64_t q = 0; q < kLPos; ++q) {
    float* bq = st.bnd[q];
    if (q >= nq) {
      for (int64_t l = 0; l < LNB; ++l) bq[l] = nan;
      continue;
    }
    const float* yq = yb + (q0 + q) * O + col0;
    for (int64_t l = 0; l < cols; ++l) bq[l] = scan_bound<Op, Rnd, Max>(yq[l]);
    for (int64_t l = cols; l < LNB; ++l) bq[l] = nan;
  }
  for (int64_t q = 0; q < nq; ++q) {
    const int64_t r = q0 + q, n = r / pl.P, p = r % pl.P;
    for (int64_t t = 0; t < T; ++t) {
      const int32_t off = lw.tab[p * T + t];
      st.xo[q * T + t] = off < 0 ? -1 : n * lw.img + off + grp * I;
    }
  }
  std::memset(st.cnt, 0, sizeof(st.cnt));
  st.more.clear();
  auto record = [&](int32_t o, int64_t k) {
    if (st.cnt[o]++ == 0) st.first[o] = int32_t(k);
    else st.more.emplace_back(o, int32_t(k));
  };
  for (int64_t k0 = 0; k0 < K; k0 += kLK) {
    const int64_t k1 = k0 + kLK < K ? k0 + kLK : K;
    for (int64_t j = 0; j < nq; j += 2) {
      const int nr = j + 1 < nq ? 2 : 1;
      V acc[2][kLV] = {};
      for (int64_t t = k0 / I; t * I < k1; ++t) {
        const int64_t ia = k0 > t * I ? k0 - t * I : 0;
        const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
        const float* xr[2];
        V bd[2][kLV];
        bool any = false;
        for (int r = 0; r < 2; ++r) {
          const int64_t off = r < nr ? st.xo[(j + r) * T + t] : -1;
          const bool on = r < nr && (off >= 0 || g.has_pad);
          any = any || on;
          xr[r] = (off >= 0 ? xb + off : pl.fill) + ia;
          for (int v = 0; v < kLV; ++v) {
            if (on) std::memcpy(&bd[r][v], &st.bnd[j + r][v * L], sizeof(V));
            else bd[r][v] = splat<float>(nan);  // a missing tap matches nothing
          }
        }
        if (!any) continue;
        low_scan_rows<Op, Exact, Max>(xr[0], xr[1], panel + (t * I + ia) * LNB, ie - ia,
                                      kLBig + float(t * I + ia - k0), bd, acc);
      }
      for (int r = 0; r < nr; ++r)
        for (int v = 0; v < kLV; ++v) {
          if (!lane_bits(acc[r][v])) continue;
          // The usual lane (an output's first winner, alone in the panel) is recorded in
          // vector form; the others (a second winner, or two in one panel) one by one below,
          // in the same panel order: the same counts, first rows and lists.
          typedef int32_t VI __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
          const int64_t qv = (j + r) * LNB + v * L;
          const V mf = acc[r][v] * splat<float>(1.0f / kLBig);
          const VI m = __builtin_convertvector(mf, VI);  // exact: each lane is m * kLBig + row
          const VI row = __builtin_convertvector(acc[r][v] - splat<float>(kLBig), VI);
          VI prev, first;
          std::memcpy(&prev, st.cnt + qv, sizeof(VI));
          std::memcpy(&first, st.first + qv, sizeof(VI));
          const VI one = m == 1, fresh = prev == 0;
          const VI usual = one & fresh;
          const VI k0v = VI{} + int32_t(k0);
          prev = usual ? VI{} + 1 : prev;
          first = usual ? row + k0v : first;
          std::memcpy(st.cnt + qv, &prev, sizeof(VI));
          std::memcpy(st.first + qv, &first, sizeof(VI));
          uint32_t bits = lane_bits((V)((m != 0) & ~usual));
          if (!bits) continue;
          alignas(64) float a[L];
          std::memcpy(a, &acc[r][v], sizeof(V));
          while (bits) {
            const int l = __builtin_ctz(bits);
            bits &= bits - 1;
            const int64_t col = v * L + l, q = j + r;
            const int32_t o = int32_t(q * LNB + col);
            const int64_t m = int64_t(a[l] * (1.0f / kLBig));
            if (m == 1) {
              record(o, k0 + int64_t(a[l] - kLBig));
              continue;
            }
            for (int64_t k = k0; k < k1; ++k) {  // two or more here: this output's rows
              const int64_t t = lw.kt[2 * k], i = lw.kt[2 * k + 1];
              const int64_t off = st.xo[q * T + t];
              if (off < 0 && !g.has_pad) continue;
              const float xs = off >= 0 ? xb[off + i] : pl.fill[i];
              if (low_hit<Op, Exact, Max>(xs, panel[k * LNB + col], st.bnd[q][col]))
                record(o, k);
            }
          }
        }
    }
  }
  // The further winners grouped per output, in the order found (kernel-row order).
  const int32_t outs = int32_t(nq * LNB);
  st.start.assign(size_t(outs) + 1, 0);
  for (const auto& e : st.more) ++st.start[size_t(e.first) + 1];
  for (int32_t o = 0; o < outs; ++o) st.start[size_t(o) + 1] += st.start[size_t(o)];
  st.sorted.resize(st.more.size());
  {
    std::vector<int32_t>& at = st.start;  // advanced while placing, rebuilt below
    for (const auto& e : st.more) st.sorted[size_t(at[size_t(e.first)]++)] = e;
    for (int32_t o = outs; o > 0; --o) at[size_t(o)] = at[size_t(o) - 1];
    at[0] = 0;
  }
  const float* gb = lw.gy + lw.b * pl.ys;
  for (int64_t q = 0; q < nq; ++q) {
    const int64_t at0 = lw.b * pl.ys + (q0 + q) * O + col0;
    for (int64_t l = 0; l < cols; ++l) {
      const int32_t o = int32_t(q * LNB + l);
      const int32_t c = st.cnt[o];
      lw.scale[at0 + l] = c > 0 ? gb[(q0 + q) * O + col0 + l] / float(c) : 0.0f;
      if (c <= 1) {
        lw.code[at0 + l] = c == 0 ? -2 : st.first[o];
        continue;
      }
      lw.code[at0 + l] = low_list_code(list.size());
      list.push_back(c);
      list.push_back(st.first[o]);
      for (int32_t e = st.start[size_t(o)]; e < st.start[size_t(o) + 1]; ++e)
        list.push_back(st.sorted[size_t(e)].second);
    }
  }
}

#include "kernel_lowrec_backward.h"

// One output's winners: f(k) for each, in kernel-row order.
template <class F>
inline void low_each(const LowWin& lw, int64_t item, int64_t code, F&& f) {
  if (code >= 0) {
    f(code);
  } else if (code <= -3) {
    const int32_t* e = lw.lists[item].data() + (-3 - code);
    for (int32_t s = 1; s <= e[0]; ++s) f(int64_t(e[s]));
  }
}

// Gr: the gradient rule (WideGrad<Id> of a built-in op, WideUserGrad of a user op); Max:
// whether the op reduces with max.
template <class Op, class Gr, bool Max, int Rnd>
int low_win_backward(const WideCall& call, bool skip0) {
  using E = float;
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L, LNB = kLV * L;
  const Geom& g = call.geom;
  Plan<E> pl = make_plan<E>(call, static_cast<E*>(nullptr));
  LowWin lw{};
  lw.f = &pl;
  lw.y = static_cast<const E*>(call.y);
  lw.gy = static_cast<const E*>(call.g);
  lw.dx = static_cast<E*>(call.out);
  lw.dw = static_cast<E*>(call.out2);
  if (no_terms<E>(call, pl)) return 0;
  if (pl.K > (int64_t(1) << 30)) return 1;
  lw.runs = ImageRuns(g, pl.P);
  lw.lblocks = (pl.og + LNB - 1) / LNB;
  lw.img = g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  const int64_t wsize = pl.K * g.o;
  std::vector<E> panels, scale, fill;
  std::vector<int32_t> code;
  // Recorded masks (kernel_lowrec_mark.h; identity padding): the scan of marked blocks only,
  // which writes every output's scale and code itself (reused buffers, no fill).
  const bool recorded = call.rec && call.rec[0] >= 0 && !g.has_pad;
  std::unique_ptr<LowBuf> scale_buf, code_buf;
  std::vector<int32_t> tab, kt;
  std::vector<std::vector<int32_t>> lists;
  try {
    panels.assign(size_t(g.g * lw.lblocks * pl.K * LNB), E(0));
    if (recorded) {
      scale_buf.reset(new LowBuf(sizeof(E) * size_t(call.batch * pl.ys)));
      code_buf.reset(new LowBuf(sizeof(int32_t) * size_t(call.batch * pl.ys)));
    } else {
      scale.assign(size_t(pl.ys), E(0));
      code.assign(size_t(pl.ys), -2);
    }
    fill.assign(size_t(g.i), g.has_pad ? pl.pad : E(0));
    tab.assign(size_t(pl.P * pl.T), -1);
    kt.assign(size_t(2 * pl.K), 0);
    lists.resize(size_t(lw.runs.items(g)));
  } catch (...) {
    return 2;
  }
  pl.fill = fill.data();
  for (int64_t p = 0; p < pl.P; ++p)  // image 0's rows: their offsets hold for every image
    for (int64_t t = 0; t < pl.T; ++t) {
      const E* row = row_at(pl, pl.x, p, t);
      if (row && row - pl.x > std::numeric_limits<int32_t>::max()) return 1;
      tab[size_t(p * pl.T + t)] = row ? int32_t(row - pl.x) : -1;
    }
  for (int64_t k = 0; k < pl.K; ++k) {
    kt[size_t(2 * k)] = int32_t(k / g.i);
    kt[size_t(2 * k + 1)] = int32_t(k % g.i);
  }
  lw.panels = panels.data();
  lw.scale = recorded ? scale_buf->template get<E>() : scale.data();
  lw.code = recorded ? code_buf->template get<int32_t>() : code.data();
  lw.tab = tab.data();
  lw.kt = kt.data();
  lw.lists = lists.data();
  std::vector<E> wt;
  std::vector<int32_t> btab;
  if (recorded) {
    lw.kb = jaxconv::record_block_rows(pl.K);
    const int64_t nb = (pl.K + lw.kb - 1) / lw.kb;
    try {
      wt.assign(size_t(pl.K * g.o), E(0));
      btab.assign(size_t(2 * nb), -1);
    } catch (...) {
      return 2;
    }
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t k0 = j * lw.kb, t = k0 / g.i, ia = k0 - t * g.i;
      btab[size_t(2 * j)] = int32_t(t);
      btab[size_t(2 * j + 1)] = lw.kb == 64 && ia + 64 <= g.i ? int32_t(ia) : -1;
    }
    lw.rec = call.rec;
    lw.skip0 = skip0;
    lw.wt = wt.data();
    lw.btab = btab.data();
    if (call.low_y) lw.y16 = static_cast<const uint16_t*>(call.y), lw.y = nullptr;
    if (call.low_g) lw.g16 = static_cast<const uint16_t*>(call.g), lw.gy = nullptr;
  }
  const E* w = static_cast<const E*>(call.w);
  for (int64_t b = 0; b < call.batch; ++b) {
    const E* wb = w + b * wsize;
    for (int64_t grp = 0; grp < g.g; ++grp)
      for (int64_t blk = 0; blk < lw.lblocks; ++blk) {
        E* dst = panels.data() + (grp * lw.lblocks + blk) * pl.K * LNB;
        const int64_t o0 = blk * LNB, cols = pl.og - o0 < LNB ? pl.og - o0 : LNB;
        for (int64_t k = 0; k < pl.K; ++k)
          std::memcpy(dst + k * LNB, wb + k * g.o + grp * pl.og + o0, sizeof(E) * size_t(cols));
      }
    lw.b = b;
    lw.w = wb;
    if (lw.rec)
      for (int64_t k = 0; k < pl.K; ++k)
        for (int64_t o = 0; o < g.o; ++o) wt[size_t(o * pl.K + k)] = wb[k * g.o + o];
    lw.plain = plain_ok<E, Op::kComb, Op::kSum>(pl.x + b * pl.xs, pl.xs, wb, wsize, g, pl.pad);
    std::atomic<bool> failed{false};
    struct Job {
      LowWin* lw;
      std::atomic<bool>* failed;
      const WideCall* call;
    } job{&lw, &failed, &call};
    // Pass 1, per run of whole images and group (they own their dx and lists): the scan,
    // then dx routed block by block of NB columns, row by row (kernel_wide_backward.h's
    // order).
    auto pass1 = [](void* arg, int64_t item) {
      const Job& j = *static_cast<const Job*>(arg);
      const LowWin& lw = *j.lw;
      const Plan<E>& f = *lw.f;
      const Geom& g = *f.g;
      int64_t grp, n0, n1;
      lw.runs.at(g, item, grp, n0, n1);
      const int64_t rb = n0 * f.P, re = n1 * f.P;
      zero_dx_images<E>(*j.call, g, lw.dx + lw.b * f.xs, n0, n1, grp);
      std::vector<int32_t>& list = lw.lists[item];
      list.clear();
      try {
        if (lw.rec) {  // the recorded scan routes dx itself, in the order below
          std::vector<int32_t> rows;
          E* dxr = lw.dx + lw.b * f.xs;
          if (lw.plain) low_rec_run<Op, Gr, false, Max, Rnd>(lw, list, rows, grp, rb, re, NB, dxr);
          else low_rec_run<Op, Gr, true, Max, Rnd>(lw, list, rows, grp, rb, re, NB, dxr);
          return;
        }
        LowRun st;
        st.xo.assign(size_t(kLPos * f.T), -1);
        for (int64_t lblk = 0; lblk < (lw.rec ? 0 : lw.lblocks); ++lblk)
          for (int64_t q0 = rb; q0 < re; q0 += kLPos) {
            const int64_t nq = re - q0 < kLPos ? re - q0 : kLPos;
            if (lw.plain) low_scan_run<Op, false, Max, Rnd>(lw, st, list, grp, lblk, q0, nq);
            else low_scan_run<Op, true, Max, Rnd>(lw, st, list, grp, lblk, q0, nq);
          }
      } catch (...) {
        j.failed->store(true);
        return;
      }
      const E* xb = f.x + lw.b * f.xs;
      E* dxb = lw.dx + lw.b * f.xs;
      for (int64_t blk = 0; blk < f.blocks; ++blk) {
        const int64_t o0 = blk * NB, cols = f.og - o0 < NB ? f.og - o0 : NB;
        const int64_t col0 = grp * f.og + o0;
        for (int64_t r = rb; r < re; ++r) {
          const int64_t n = r / f.P, p = r % f.P;
          const int64_t at0 = lw.b * f.ys + r * g.o + col0;
          for (int64_t l = 0; l < cols; ++l) {
            const E sc = lw.scale[at0 + l];
            const int64_t code = lw.code[at0 + l];
            if (code >= 0) {
              // One winner: its input gradient, and its kernel gradient's term (the product
              // pass 2 would form, the same rounding) in place of its scale, while its x
              // and w are in cache: pass 2 then adds it without reading them again.
              const int64_t i = lw.kt[2 * code + 1];
              const int32_t off = lw.tab[p * f.T + lw.kt[2 * code]];
              const int64_t at = n * lw.img + off + grp * g.i + i;
              const E ws = lw.w[code * g.o + col0 + l];
              const E xs = off >= 0 ? xb[at] : f.fill[i];
              if (off >= 0)  // a winner in the padding has no input gradient
                dxb[at] += sc * Gr::template dx<E>(splat<E>(xs), splat<E>(ws))[0];
              lw.scale[at0 + l] = sc * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
              continue;
            }
            low_each(lw, item, code, [&](int64_t k) {
              const int32_t off = lw.tab[p * f.T + lw.kt[2 * k]];
              if (off < 0) return;  // a winner in the padding: no input gradient
              const int64_t at = n * lw.img + off + grp * g.i + lw.kt[2 * k + 1];
              const E ws = lw.w[k * g.o + col0 + l];
              dxb[at] += sc * Gr::template dx<E>(splat<E>(xb[at]), splat<E>(ws))[0];
            });
          }
        }
      }
    };
    call.par.run(call.par.ctx, lw.runs.items(g), pass1, &job);
    if (failed.load()) return 2;
    // Pass 2, per group and 16 columns (they own those kernel columns): dw, rows in order.
    constexpr int64_t kCols = 16;
    const int64_t chunks = (pl.og + kCols - 1) / kCols;
    auto pass2 = [](void* arg, int64_t item) {
      const Job& j = *static_cast<const Job*>(arg);
      const LowWin& lw = *j.lw;
      const Plan<E>& f = *lw.f;
      const Geom& g = *f.g;
      const int64_t ch = (f.og + kCols - 1) / kCols;
      const int64_t grp = item / ch, o0 = (item % ch) * kCols;
      const int64_t cols = f.og - o0 < kCols ? f.og - o0 : kCols, col0 = grp * f.og + o0;
      std::vector<E> acc;
      try {
        acc.assign(size_t(f.K * kCols), E(0));
      } catch (...) {
        j.failed->store(true);
        return;
      }
      const E* xb = f.x + lw.b * f.xs;
      for (int64_t r = 0; r < f.R; ++r) {
        const int64_t n = r / f.P, p = r % f.P;
        const int64_t owner = lw.runs.owner(g, n, grp);
        const int64_t at0 = lw.b * f.ys + r * g.o + col0;
        for (int64_t l = 0; l < cols; ++l) {
          const E sr = lw.scale[at0 + l];
          const int64_t code = lw.code[at0 + l];
          if (code >= 0) {  // one winner: pass 1 left its term in its scale
            acc[size_t(code * kCols + l)] += sr;
            continue;
          }
          if (lw.rec && code <= -3) {  // a recorded list: its rows, then their terms
            const int32_t* e = lw.lists[owner].data() + (-3 - code);
            for (int32_t s = 1; s <= e[0]; ++s)
              acc[size_t(int64_t(e[s]) * kCols + l)] += low_float(uint32_t(e[e[0] + s]));
            continue;
          }
          low_each(lw, owner, code, [&](int64_t k) {
            const int64_t i = lw.kt[2 * k + 1];
            const int32_t off = lw.tab[p * f.T + lw.kt[2 * k]];
            const E xs = off >= 0 ? xb[n * lw.img + off + grp * g.i + i] : f.fill[i];
            const E ws = lw.w[k * g.o + col0 + l];
            acc[size_t(k * kCols + l)] +=
                sr * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
          });
        }
      }
      E* dwb = lw.dw + lw.b * f.K * g.o;
      for (int64_t k = 0; k < f.K; ++k)
        std::memcpy(dwb + k * g.o + col0, acc.data() + k * kCols, sizeof(E) * size_t(cols));
    };
    call.par.run(call.par.ctx, g.g * chunks, pass2, &job);
    if (failed.load()) return 2;
  }
  return 0;
}

}  // namespace JAXCONV_WIDE_NS

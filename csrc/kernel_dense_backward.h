// The backward pass of a dense max / min product (one tap, no padding, finite inputs): a
// blocked rescan that finds, per output, the kernel-row blocks holding its winners, then
// scans only those blocks. Same bits as win_backward (kernel_winner.h): every product is
// compared with the forward result y, ties split equally, the gradients summed in the same
// order.
//
// Pass A reruns the forward's register tile over the packed kernel panels, but restarts the
// reduce every kB kernel rows and compares each block's result with y: block j's bit joins the
// output's mask when the block holds a product equal to y. That is the forward's inner loop
// (combine, reduce: two operations per term) plus a few per block, where the full rescan needs
// three per term on a two-row tile (combine, compare, masked add). Pass B, in the same item
// (a block of NR output channels), scans each output's masked blocks along k (x's row and the
// block's transposed kernel column are contiguous there), keeps the winner and its dx term
// and adds its dw term to the block's columns of dw (the item owns them and walks the rows in
// order); pass C then sums dx per run of rows, each term in the order of the full rescan. With
// the recording forward's masks (kernel_dense_record.h) pass A and its packed panel are skipped;
// with its exact codes (x + w, x - w) passes A and B are (kernel_densebwd_exact.h).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// The lanes of a mask as bits (lane l: bit l).
inline uint32_t mask_bits(S::M m) {
#if defined(__AVX512F__)
  return uint32_t(m);
#elif defined(__AVX2__) && defined(__FMA__)
  return uint32_t(_mm256_movemask_ps(m));
#else
  uint32_t b = 0;
  for (int l = 0; l < W; ++l) b |= uint32_t(m[l] != 0) << l;
  return b;
#endif
}

// A block mask is a sum of distinct powers of two in a float lane: exact up to 2^23.
constexpr int64_t kMaxBlocks = jaxconv::kRecordMaxBlocks;

// Kernel rows per block: kRecordBlockRows (64), or more where K would need more than kMaxBlocks blocks (problem.h,
// shared with the low recorded backward of the wide kernels).
inline int64_t dense_block_rows(int64_t K) { return jaxconv::record_block_rows(K); }

// Whether the call is a dense product that dense_win_backward serves: at least two blocks of
// kernel rows (with one, pass A would only repeat pass B's scan).
inline bool dense_winner_case(const Ctx& c) {
  return c.T == 1 && c.OS == 1 && c.tab[0] == 0 && !c.g.has_pad && c.finite &&
         !depthwise(c) && c.K > jaxconv::kRecordBlockRows;
}

// One block's reduce, the forward's register tile restarted at kernel row k0: acc[r] the
// reduce over rows k0 .. k1 - 1 of the panel against input row xr[r] (always inlined, so
// that acc stays in registers as in the loop it came from). Bx: the forward tile's `bcast`
// step (kernel_bcast.h).
template <class Op, bool Bx = false>
__attribute__((always_inline)) inline void block_reduce(const float* panel,
                                                        const float* const* xr, int64_t k0,
                                                        int64_t k1, S::V (&acc)[MR][NV]) {
  using V = S::V;
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(Op::ident());
  for (int64_t i = k0; i < k1; ++i) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = S::load(panel + i * NR + v * W);
    for (int r = 0; r < MR; ++r) row_step<Op, false, Bx>(acc[r], xr[r] + i, wv);  // kernel_bcast.h
  }
}

// Pass A for MR rows p .. p + MR - 1 of block (b, grp, jb): each output's mask of the kernel
// row blocks whose reduce equals y, stored to `code` as an int32.
template <class Op>
void dense_block_masks(const Ctx& c, const float* xb, const float* panel, const float* yb,
                       int32_t* cb, int64_t p, int64_t grp, int64_t jb, int64_t kb) {
  using V = S::V;
  const TileRows<MR> rows(c, p);
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  alignas(64) float ys[MR * NR], cd[MR * NR];
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) {
    xr[r] = xb + (rows.live[r] ? p + r : 0) * c.img + grp * c.I;
    // Lanes past the block, and dead rows, match nothing: NaN.
    for (int64_t l = 0; l < NR; ++l)
      ys[r * NR + l] = rows.live[r] && l < nvalid ? yb[(p + r) * c.O + o0 + l]
                                                   : __builtin_nanf("");
  }
  std::memset(cd, 0, sizeof(cd));
  float bit = 1.0f;
  for (int64_t k0 = 0; k0 < c.K; k0 += kb, bit *= 2.0f) {
    const int64_t k1 = k0 + kb < c.K ? k0 + kb : c.K;
    V acc[MR][NV];
    block_reduce<Op>(panel, xr, k0, k1, acc);
    const V bv = S::set1(bit);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) {
        float* cp = cd + r * NR + v * W;
        const S::M e = S::eq(acc[r][v], S::load(ys + r * NR + v * W));
        S::store(cp, S::madd(e, S::load(cp), bv));
      }
  }
  for (int r = 0; r < MR; ++r) {
    if (!rows.live[r]) continue;
    for (int64_t l = 0; l < nvalid; ++l) cb[(p + r) * c.O + o0 + l] = int32_t(cd[r * NR + l]);
  }
}

// The products of x's row `xp` and kernel column `wo` (both along k) in the blocks of `mask`
// that equal y: their number, and the last one's k in *last. Branch-free within a block: the
// compares of 64 rows at a time gather into one word (a winner's position is unpredictable).
template <class Op>
int64_t dense_matches(const float* xp, const float* wo, int64_t K, int64_t kb, uint32_t mask,
                      float y, int64_t* last) {
  static_assert(64 % W == 0, "64 rows are whole vectors");
  const S::V yv = S::set1(y);
  int64_t cnt = 0, at = *last;
  for (; mask; mask &= mask - 1) {
    const int64_t k0 = int64_t(__builtin_ctz(mask)) * kb, k1 = k0 + kb < K ? k0 + kb : K;
    int64_t k = k0;
    while (k + W <= k1) {
      const int64_t base = k;
      uint64_t word = 0;
      for (int j = 0; j < 64 / W && k + W <= k1; ++j, k += W) {
        const S::M e = S::eq(Op::template comb<S>(S::load(xp + k), S::load(wo + k)), yv);
        word |= uint64_t(mask_bits(e)) << (j * W);
      }
      cnt += __builtin_popcountll(word);
      const int64_t top = base + 63 - __builtin_clzll(word | 1);
      at = word ? top : at;
    }
    for (; k < k1; ++k)
      if (Op::template comb<Sc>(xp[k], wo[k]) == y) {
        ++cnt;
        at = k;
      }
  }
  *last = at;
  return cnt;
}

// The products of one whole 64-row block (x's row `xp` and kernel column `wo`, both along k)
// that equal y, as the bits of one word (always inlined: the backward's per-output scan).
static_assert(jaxconv::kRecordBlockRows == 64, "a whole block's compares fill one 64-bit word");
template <class Op>
__attribute__((always_inline)) inline uint64_t dense_block_word(const float* xp,
                                                                const float* wo, float y) {
  const S::V yv = S::set1(y);
  uint64_t word = 0;
  for (int j = 0; j < 64 / W; ++j) {
    const S::M e = S::eq(Op::template comb<S>(S::load(xp + j * W), S::load(wo + j * W)), yv);
    word |= uint64_t(mask_bits(e)) << (j * W);
  }
  return word;
}

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

// Copies the (rows, cols) block at `src` (row stride ss) transposed to `dst` (row stride sd),
// 16 x 16 at a time (in registers on AVX-512, else through a small buffer), so that each line
// of both is touched in one burst (a column walk of rows 4 KiB apart thrashes one cache set).
inline void transpose(const float* src, int64_t ss, float* dst, int64_t sd, int64_t rows,
                      int64_t cols) {
  constexpr int64_t kT = 16;
  alignas(64) float tb[kT][kT];
  for (int64_t r0 = 0; r0 < rows; r0 += kT) {
    const int64_t nr = rows - r0 < kT ? rows - r0 : kT;
    for (int64_t c0 = 0; c0 < cols; c0 += kT) {
      const int64_t nc = cols - c0 < kT ? cols - c0 : kT;
#if defined(__AVX512F__)
      if (nr == kT && nc == kT) {
        transpose16(src + r0 * ss + c0, ss, dst + c0 * sd + r0, sd);
        continue;
      }
#endif
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t q = 0; q < nc; ++q) tb[r][q] = src[(r0 + r) * ss + c0 + q];
      for (int64_t q = 0; q < nc; ++q)
        for (int64_t r = 0; r < nr; ++r) dst[(c0 + q) * sd + r0 + r] = tb[r][q];
    }
  }
}

// Pass B for one row of positions `xp` against the block's transposed kernel columns `tp`
// (nvalid of them, K apart): each output's winners in its masked blocks. A unique winner's
// code is its k and `dx` its dx term; a tie (or no match) is coded -2 - mask and `dx` holds the
// share of the cotangent. Every term of dw is added to `acc` (K, NR) at once: the caller walks
// the rows in order, so each entry of dw sums its terms in the order of the rows. Returns
// whether a row held a tie.
template <class Op>
bool dense_row_winners(const float* xp, const float* tp, int64_t K, int64_t kb, int64_t nvalid,
                       const int32_t* rr, const float* yr, const float* gr, int32_t* cr,
                       float* dx, float* acc) {
  bool tied = false;
  // The unique winners' dw terms wait here and are added after the scan, in a loop of their
  // own: added inside it, each read-add-write of `acc` (an L1 miss) stalled the scan.
  alignas(64) float dw[NR];
  for (int64_t l = 0; l < nvalid; ++l) {
    const uint32_t mask = uint32_t(rr[l]);
    const float* wo = tp + l * K;
    const float yv = yr[l], gv = gr[l];
    const int64_t k0 = int64_t(__builtin_ctz(mask | 0x80000000u)) * 64;
    if (kb == 64 && mask != 0 && mask == (mask & -mask) && k0 + 64 <= K) {
      // One whole block of 64 rows (the usual case): its compares in one word, inline.
      const uint64_t word = dense_block_word<Op>(xp + k0, wo + k0, yv);
      if (__builtin_popcountll(word) == 1) {
        const int64_t k = k0 + __builtin_ctzll(word);
        cr[l] = int32_t(k);
        dx[l] = WinTerms<Op>::x(gv, xp[k], wo[k]);
        dw[l] = WinTerms<Op>::w(gv, xp[k], wo[k]);
        continue;
      }
    }
    int64_t last = -1;
    const int64_t cnt = mask ? dense_matches<Op>(xp, wo, K, kb, mask, yv, &last) : 0;
    if (cnt == 1) {
      cr[l] = int32_t(last);
      dx[l] = WinTerms<Op>::x(gv, xp[last], wo[last]);
      dw[l] = WinTerms<Op>::w(gv, xp[last], wo[last]);
      continue;
    }
    cr[l] = -2 - int32_t(cnt == 0 ? 0 : mask);
    const float share = cnt == 0 ? 0.0f : gv / float(cnt);
    dx[l] = share;
    if (cnt == 0) continue;
    tied = true;
    for (uint32_t m = mask; m; m &= m - 1) {
      const int64_t a = int64_t(__builtin_ctz(m)) * kb, e = a + kb < K ? a + kb : K;
      for (int64_t k = a; k < e; ++k)
        if (Op::template comb<Sc>(xp[k], wo[k]) == yv)
          acc[k * NR + l] += share * Op::template dcw<Sc>(xp[k], wo[k]);
    }
  }
  for (int64_t l = 0; l < nvalid; ++l)
    if (cr[l] >= 0) acc[cr[l] * NR + l] += dw[l];
  return tied;
}

// A tie's matches (code -2 - mask) of x's row `xp` and kernel column `wo`: fn(k) per match,
// in the order of k; returns their count.
template <class Op, class Fn>
int64_t tie_matches(const float* xp, const float* wo, int64_t K, int64_t kb, int32_t code,
                    float y, Fn&& fn) {
  int64_t cnt = 0;
  for (uint32_t m = uint32_t(-2 - code); m; m &= m - 1) {
    const int64_t a = int64_t(__builtin_ctz(m)) * kb, e = a + kb < K ? a + kb : K;
    for (int64_t k = a; k < e; ++k)
      if (Op::template comb<Sc>(xp[k], wo[k]) == y) fn(k), ++cnt;
  }
  return cnt;
}

// The dense backward's last pass, for the block-mask record and the exact one alike (after
// their per-block passes; `failed`: one of those could not allocate): with any tie, the whole
// kernel transposed per (batch, group) to (Og, K), then dx per run of rows (they own their
// dx), summed over the outputs in order. An output's code k >= 0 adds unique(at) at k; a tie
// (-2 - mask) adds share(at) times dcx of each product equal to y in its masked blocks; -2 (no
// product equal to y) adds nothing. Returns true (the call is served).
template <class Op, class Unique, class Share>
bool dense_route_dx(Ctx& c, bool failed, bool tied, int64_t kb, const int32_t* codes,
                    Unique&& unique, Share&& share) {
  if (failed) {
    c.failed = true;
    return true;
  }
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, K = c.K, P = c.P, G = c.G, B = call.batch;
  // Ties (rare on real-valued data, common on quantized data) read the kernel along k.
  Owned<float> wt_owned;
  if (tied) {
    wt_owned = allocate<float>(B * G * Og * K);
    if (!wt_owned) {
      c.failed = true;
      return true;
    }
    auto transpose_cols = [&](int64_t it) {
      const int64_t jb = it % c.nJB, grp = (it / c.nJB) % G, b = it / (c.nJB * G);
      const int64_t nvalid = Og - jb * NR < NR ? Og - jb * NR : NR;
      transpose(call.w + b * c.w_bs + grp * Og + jb * NR, O,
                wt_owned.get() + ((b * G + grp) * Og + jb * NR) * K, K, K, nvalid);
    };
    parallel(c, B * G * c.nJB, transpose_cols);
  }
  const float* wt = wt_owned.get();
  constexpr int64_t kRowsPerItem = 8;
  const int64_t nrb = (P + kRowsPerItem - 1) / kRowsPerItem;
  auto route_dx = [&](int64_t it) {
    const int64_t rb = it % nrb, b = it / nrb;
    const int64_t p1 = (rb + 1) * kRowsPerItem < P ? (rb + 1) * kRowsPerItem : P;
    for (int64_t p = rb * kRowsPerItem; p < p1; ++p)
      for (int64_t grp = 0; grp < G; ++grp) {
        const int64_t row = b * c.y_bs + p * O;
        float* dxp = call.out + b * c.x_bs + p * c.img + grp * I;
        for (int64_t o = grp * Og; o < (grp + 1) * Og; ++o) {
          const int32_t code = codes[row + o];
          if (code >= 0) {
            dxp[code] += unique(row + o);
            continue;
          }
          if (code == -2) continue;
          const float sh = share(row + o);
          const float* xp = call.x + b * c.x_bs + p * c.img + grp * I;
          const float* wo = wt + ((b * G + grp) * Og + o - grp * Og) * K;
          tie_matches<Op>(xp, wo, K, kb, code, call.y[row + o], [&](int64_t k) {
            dxp[k] += sh * Op::template dcx<Sc>(xp[k], wo[k]);
          });
        }
      }
  };
  parallel(c, B * nrb, route_dx);
  return true;
}

// The dense backward (see the top of this file); false when the call is not a dense product
// on finite data (win_backward's rescan serves it).
template <class Op>
bool dense_exact_backward(Ctx& c);  // kernel_densebwd_exact.h

template <class Op>
bool dense_win_backward(Ctx& c) {
  if (!dense_winner_case(c)) return false;
  if (dense_exact_backward<Op>(c)) return true;  // an exact record's scatter
  const jaxconv::Call& call = *c.call;
  const bool recorded = call.rec != nullptr && call.rec[0] >= 0;
  // max_min / min_max unrecorded: the general rescan runs on integer keys, faster than pass
  // A's float min and max (measured on Zen 4, dense E: 16.4 against 20.2 ms of CPU).
  if constexpr (!std::is_same_v<typename KeyOf<Op>::type, Op>) {
    if (!recorded) return false;
  }
  const int64_t I = c.I, O = c.O, Og = c.Og, K = c.K, P = c.P, G = c.G, B = call.batch;
  const int64_t kb = dense_block_rows(K);
  const int64_t tiles = (P + MR - 1) / MR;
  std::atomic<bool> failed{false}, tied{false};
  // dxv: a unique winner's dx term, or a tie's share of the cotangent. A code is the unique
  // winner's k (>= 0) or -2 - mask (a tie, or none: mask 0).
  Owned<float> dxv_owned = allocate<float>(B * c.y_bs);
  float* dxv = dxv_owned.get();
  if (!dxv) {
    c.failed = true;
    return true;
  }
  // Passes A, B and D per block of NR output channels: its transposed kernel columns (NR, K)
  // (and, for pass A, its packed panel (K, NR)); the block masks of every row tile (unless
  // recorded); then each output's winners, scanned along k in its masked blocks, their dw
  // terms summed into the block's (K, NR) columns of dw, row after row. The block owns its
  // outputs' codes and terms and its columns of dw.
  auto block = [&](int64_t blk) {
    const int64_t jb = blk % c.nJB, grp = (blk / c.nJB) % G, b = blk / (c.nJB * G);
    const int64_t nvalid = Og - jb * NR < NR ? Og - jb * NR : NR;
    const int64_t o0 = grp * Og + jb * NR;
    Owned<float> owned = allocate<float>((recorded ? 2 : 3) * K * NR);
    float* tp = owned.get();
    if (!tp) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    float* acc = tp + K * NR;
    float* panel = acc + K * NR;
    const float* wb = call.w + b * c.w_bs;
    if (!recorded) pack_panel(c, wb, grp, jb, 0, K, false, panel);
    transpose(wb + o0, O, tp, K, K, nvalid);
    std::memset(acc, 0, sizeof(float) * size_t(K) * NR);
    const float* xb = call.x + b * c.x_bs;
    const float* yb = call.y + b * c.y_bs;
    const float* gb = call.g + b * c.y_bs;
    int32_t* cb = c.code + b * c.y_bs;
    // The masks the recording forward kept (kernel_dense_record.h), else pass A.
    const int32_t* rb = recorded ? call.rec + b * c.y_bs : cb;
    if (!recorded)
      for (int64_t tl = 0; tl < tiles; ++tl)
        dense_block_masks<Op>(c, xb, panel, yb, cb, tl * MR, grp, jb, kb);
    float* dxvb = dxv + b * c.y_bs;
    bool any_tie = false;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t at = p * O + o0;
      any_tie |= dense_row_winners<Op>(xb + p * c.img + grp * I, tp, K, kb, nvalid, rb + at,
                                       yb + at, gb + at, cb + at, dxvb + at, acc);
    }
    if (any_tie) tied.store(true, std::memory_order_relaxed);
    float* dwb = call.out2 + b * c.w_bs;
    for (int64_t k = 0; k < K; ++k)
      std::memcpy(dwb + k * O + o0, acc + k * NR, sizeof(float) * nvalid);
  };
  parallel(c, B * G * c.nJB, block);
  // Pass C.
  return dense_route_dx<Op>(
      c, failed.load(), tied.load(), kb, c.code, [&](int64_t at) { return dxv[at]; },
      [&](int64_t at) { return dxv[at]; });
}

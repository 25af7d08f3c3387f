// The exact winner record of a dense max / min product whose partials are constants (x + w,
// x - w: dx = g, dw = +-g), and its backward: a scatter of the cotangent, with no product
// computed again where an output has one winner.
//
// The recording forward (kernel_dense_record.h) finds each output's mask of winning kernel-row
// blocks at its tile's end; for these ops it then scans the masked blocks of the output's x row
// (still in L1 from the tile's loop) against the block's transposed kernel columns, as the
// blocked backward's pass B (kernel_dense_backward.h) did, and keeps the code that pass B would
// have found: the winner's kernel row k (>= 0) when the output has exactly one product equal
// to y, else -2 - mask (a tie: the mask of its blocks; -2 alone: no product equal to y). A
// record of -1 everywhere still means "not recorded". The backward adds each unique winner's
// terms straight from its k: dw's (one item per block of NR output channels, its (K, NR)
// columns summed row after row) and dx's (one item per run of rows, over the outputs in
// order), the order of the blocked backward's sums, so the gradients are its bits. Ties are
// rescanned as there (their products compared with y, the share g / count added per match).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_dense_backward.h and before kernel_dense_record.h,
// never on its own.
#pragma once

// Whether Op's partials are constants (they ignore the operands): its winners' terms are the
// cotangent times them, so a recorded winner needs no product computed again.
template <class Op>
struct ConstTerms : std::false_type {};
template <class R>
struct ConstTerms<Plus<R>> : std::true_type {};
template <class R>
struct ConstTerms<Minus<R>> : std::true_type {};

// The code of one output (x's row `xp`, its transposed kernel column `wo`, both along k; its
// block `mask` and result y): the unique winner's k, or -2 - mask for a tie (-2: no match), as
// the blocked backward's pass B (dense_row_winners) decides. Out of line: the usual case, one
// whole 64-row block, is exact_codes' (kernel_dense_record.h) own loop.
template <class Op>
__attribute__((noinline)) int32_t winner_code_general(const float* xp, const float* wo,
                                                      int64_t K, int64_t kb, uint32_t mask,
                                                      float y) {
  int64_t last = -1;
  const int64_t cnt = mask ? dense_matches<Op>(xp, wo, K, kb, mask, y, &last) : 0;
  if (cnt == 1) return int32_t(last);
  return -2 - int32_t(cnt == 0 ? 0 : mask);
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

// The backward of an exact record (see the top of this file); false when the call has none
// (not a constant-partial op, not the dense case, or not recorded).
template <class Op>
bool dense_exact_backward(Ctx& c) {
  if constexpr (!ConstTerms<Op>::value) {
    return false;
  } else {
    const jaxconv::Call& call = *c.call;
    if (!dense_winner_case(c) || call.rec == nullptr || call.rec[0] == -1) return false;
    const int64_t I = c.I, O = c.O, Og = c.Og, K = c.K, P = c.P, G = c.G, B = call.batch;
    const int64_t kb = dense_block_rows(K);
    std::atomic<bool> failed{false}, tied{false};
    // dw per block of NR output channels: its (K, NR) columns, each winner's term added at its
    // k, row after row; a tie's matches from the block's transposed kernel columns, made at its
    // first tie.
    auto block = [&](int64_t blk) {
      const int64_t jb = blk % c.nJB, grp = (blk / c.nJB) % G, b = blk / (c.nJB * G);
      const int64_t nvalid = Og - jb * NR < NR ? Og - jb * NR : NR;
      const int64_t o0 = grp * Og + jb * NR;
      Owned<float> owned = allocate<float>(K * NR);
      Owned<float> cols;
      float* acc = owned.get();
      if (!acc) {
        failed.store(true, std::memory_order_relaxed);
        return;
      }
      std::memset(acc, 0, sizeof(float) * size_t(K) * NR);
      const float* wb = call.w + b * c.w_bs;
      const float* xb = call.x + b * c.x_bs;
      for (int64_t p = 0; p < P; ++p) {
        const int64_t at = b * c.y_bs + p * O + o0;
        const int32_t* rr = call.rec + at;
        const float* gr = call.g + at;
        for (int64_t l = 0; l < nvalid; ++l) {
          const int32_t code = rr[l];
          if (code >= 0) {
            acc[code * NR + l] += WinTerms<Op>::w(gr[l], 0.0f, 0.0f);
            continue;
          }
          if (code == -2) continue;
          if (!cols) {
            if (!(cols = allocate<float>(NR * K))) {
              failed.store(true, std::memory_order_relaxed);
              return;
            }
            transpose(wb + o0, O, cols.get(), K, K, nvalid);
          }
          // The share (g / count, as the blocked backward) of each match; kept for dx's pass.
          const float* xp = xb + p * c.img + grp * I;
          const float* wo = cols.get() + l * K;
          const float yv = call.y[at + l];
          int64_t last = -1;
          const float share =
              gr[l] / float(dense_matches<Op>(xp, wo, K, kb, uint32_t(-2 - code), yv, &last));
          c.dwv[at + l] = share;
          tie_matches<Op>(xp, wo, K, kb, code, yv, [&](int64_t k) {
            acc[k * NR + l] += share * Op::template dcw<Sc>(xp[k], wo[k]);
          });
        }
      }
      if (cols) tied.store(true, std::memory_order_relaxed);
      float* dwb = call.out2 + b * c.w_bs;
      for (int64_t k = 0; k < K; ++k)
        std::memcpy(dwb + k * O + o0, acc + k * NR, sizeof(float) * nvalid);
    };
    parallel(c, B * G * c.nJB, block);
    if (failed.load()) {
      c.failed = true;
      return true;
    }
    // Ties are routed to dx from the whole kernel transposed per (batch, group) to (Og, K),
    // built only when there is one.
    Owned<float> wt_owned;
    if (tied.load()) {
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
    // dx per run of rows (they own their dx): summed over the outputs in order.
    constexpr int64_t kRowsPerItem = 8;
    const int64_t nrb = (P + kRowsPerItem - 1) / kRowsPerItem;
    auto route_dx = [&](int64_t it) {
      const int64_t rb = it % nrb, b = it / nrb;
      const int64_t p1 = (rb + 1) * kRowsPerItem < P ? (rb + 1) * kRowsPerItem : P;
      for (int64_t p = rb * kRowsPerItem; p < p1; ++p)
        for (int64_t grp = 0; grp < G; ++grp) {
          const int64_t row = b * c.y_bs + p * O;
          float* dxp = call.out + b * c.x_bs + p * c.img + grp * I;
          const int32_t* rr = call.rec + row;
          const float* gr = call.g + row;
          for (int64_t o = grp * Og; o < (grp + 1) * Og; ++o) {
            const int32_t code = rr[o];
            if (code >= 0) {
              dxp[code] += WinTerms<Op>::x(gr[o], 0.0f, 0.0f);
              continue;
            }
            if (code == -2) continue;
            const float* xp = call.x + b * c.x_bs + p * c.img + grp * I;
            const float* wo = wt + ((b * G + grp) * Og + o - grp * Og) * K;
            const float share = c.dwv[row + o];
            tie_matches<Op>(xp, wo, K, kb, code, call.y[row + o], [&](int64_t k) {
              dxp[k] += share * Op::template dcx<Sc>(xp[k], wo[k]);
            });
          }
        }
    };
    parallel(c, B * nrb, route_dx);
    return true;
  }
}

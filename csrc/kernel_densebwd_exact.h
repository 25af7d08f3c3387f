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
    const float* g = call.g;
    const float* dwv = c.dwv;
    return dense_route_dx<Op>(
        c, failed.load(), tied.load(), kb, call.rec,
        [&](int64_t at) { return WinTerms<Op>::x(g[at], 0.0f, 0.0f); },
        [&](int64_t at) { return dwv[at]; });
  }
}

// The backward of a dense bfloat16 / float16 max / min product from the exact winner codes of
// its recording forward (kernel_lowdense_record.h): a scatter of the cotangent straight from
// the low operands, with no product computed again where an output has one winner.
//
// An output's code (kernel_lowdense_case.h) is its one winner's kernel row k (>= 0), its two or
// three winners, -2 - mask for a tie of more (the blocks that hold its winners), or -2 (none). Pass W, per block of kCB output channels (the item owns those
// columns of dw): each output's terms added to the block's float32 columns (K, kCB), rows in
// order; a tie of three winners or more found again in its marked blocks with the low scan's
// compare (low_pass against scan_bound, kernel_wide_lowwin.h) and listed for pass X. Pass X, per run of rows (they own their dx): each
// row's terms in the order of its outputs, a tie's in kernel-row order from its list. Every
// float32 sum so adds the terms of the low recorded backward (kernel_lowrec_backward.h, the
// route it replaces) in its order -- dx over the outputs in order, dw over the rows in order, a
// tie's share g / count -- and each sum is rounded once to the dtype: the same bits.
//
// Included by kernel_lowrec_backward.h (the wide kernels' namespace and vector width), after
// LowBuf and low_at.
#pragma once

#include "kernel_lowdense_case.h"

// Whether an op declares `static constexpr bool kLowCodes` true (a generated user op's
// WideUser, csrc/userop_wide.h, from the same declaration as its float32 functor's).
template <class Op, class = void>
struct LowCodesDeclared : std::false_type {};
template <class Op>
struct LowCodesDeclared<Op, std::enable_if_t<Op::kLowCodes>> : std::true_type {};

// The ops whose dense low record holds codes (kernel_lowdense_record.h's LowCodes): the
// built-in max_plus, min_plus, max_min and min_max, and the ops that declare kLowCodes (their
// products matched by low_pass's generic compare against scan_bound's bound, as the forward
// matched them).
template <class Op>
constexpr bool lowdense_op() {
  return std::is_same_v<Op, WideOp<0, 0>> || std::is_same_v<Op, WideOp<0, 1>> ||
         std::is_same_v<Op, WideOp<1, 0>> || std::is_same_v<Op, WideOp<2, 1>> ||
         LowCodesDeclared<Op>::value;
}

// f(item) for items [0, n), in parallel.
template <class F>
void lowdense_items(const WideCall& call, int64_t n, F& f) {
  auto run = [](void* arg, int64_t it) { (*static_cast<F*>(arg))(it); };
  call.par.run(call.par.ctx, n, run, &f);
}

// A winner's term: the share s (g / count) times the partial (a constant 1 for x + w: s itself,
// the same bits as s * 1 whatever s is, DAZ and NaN included).
template <class Op, class Gr, bool OnX>
inline float lowdense_term(float s, float x, float w) {
  if constexpr (Op::kComb == 0) {
    return s;
  } else {
    const VecOf<float> d = OnX ? Gr::template dx<float>(splat<float>(x), splat<float>(w))
                               : Gr::template dw<float>(splat<float>(x), splat<float>(w));
    return s * d[0];
  }
}

// One call's operands and record (batch element b's at b * (N * C), b * (K * O), b * (N * O)).
struct LowDense {
  const uint16_t* x16;
  const uint16_t* w16;
  const float* yf;        // y in float32, or null (y16)
  const uint16_t* y16;
  const float* gf;        // g in float32, or null (g16)
  const uint16_t* g16;
  const int32_t* rec;
  // Per output, a side slot: a rescanned tie's place in its pass-W item's list (-1: none); one
  // winner's dx term where it depends on the operands (dxt: the same slots, as floats).
  int32_t* tie_at;
  float* dxt;
  int64_t N, K, O, G, Og, C, kb, nblk;
};

// n values of g (or y) from `at` as float32 into dst.
template <int Kind>
inline void lowdense_row(const float* f, const uint16_t* h, int64_t at, int64_t n, float* dst) {
  if (h) widen_run<Kind>(h + at, dst, n);
  else std::memcpy(dst, f + at, sizeof(float) * size_t(n));
}

// A pass-W item's scratch for its ties of three winners or more: a widened block of x's row and
// of a kernel column, the winners of one output, and the item's list (per tied output: its
// count, then its winners in kernel-row order).
// Once the item's ties have marked kBuild blocks (tie-heavy data: small integers), its kernel
// columns are widened and transposed once (wt, column l at l * ldt, along k) and each row of x
// widened once (xr_n: the row in xw), so that a tie reads both along k instead of gathering its
// column a page per element.
struct LowTies {
  static constexpr int64_t kBuild = 256;  // blocks gathered: about the build's cost
  std::vector<float> xw, ww;
  std::vector<int32_t> win;
  std::vector<int32_t>* list;
  int64_t seen = 0;    // marked blocks of the ties met so far
  int64_t ldt = 0;     // wt's column stride (0: not built)
  int64_t xr_n = -1;   // the row of x widened whole in xw (-1: none)
  std::unique_ptr<LowBuf> wt;
};

// A tie of pass W (output `at`, row n of batch element b, column col of group grp; share
// numerator gv; l: its column in the item's `acc`): its winners in the marked blocks of its
// code, listed, their dw terms added to acc. Its kernel column is read along k (a gather: such
// ties are rare) unless the item's columns are built (ts.ldt: x's row and the column widened
// whole, read in place). Out of line: the scatter's loop keeps its registers.
template <class Op, class Gr, bool Max, int Rnd, int64_t kCB>
__attribute__((noinline)) void lowdense_tie(const LowDense& d, LowTies& ts, int64_t b,
                                            int64_t grp, int64_t n, int64_t col, int64_t l,
                                            int32_t code, float gv, float* acc) {
  using V = VecOf<float>;
  constexpr int L = Vt<float>::L;
  constexpr int Kind = Rnd == jaxconv::kRoundBF16 ? 1 : 2;
  const int64_t K = d.K, O = d.O, at = (b * d.N + n) * O + col;
  const uint16_t* xr = d.x16 + (b * d.N + n) * d.C + grp * K;
  const uint16_t* wc = d.w16 + b * K * O + col;
  const bool built = ts.ldt != 0;
  const float* wt = built ? ts.wt->template get<float>() + l * ts.ldt : nullptr;
  if (built && ts.xr_n != n) {
    ts.xw.resize(size_t(K));
    widen_run<Kind>(xr, ts.xw.data(), K);
    ts.xr_n = n;
  }
  const float bd = scan_bound<Op, Rnd, Max>(low_at<Rnd>(d.yf, d.y16, at));
  const V bv = splat<float>(bd);
  // The winners gather in win (room for all K: no growth checks in the scan), then the list.
  if (ts.win.size() < size_t(K)) ts.win.resize(size_t(K));
  int32_t* win = ts.win.data();
  int64_t nw = 0;
  for (uint32_t m = uint32_t(-2 - code); m; m &= m - 1) {
    const int64_t k0 = int64_t(__builtin_ctz(m)) * d.kb, k1 = k0 + d.kb < K ? k0 + d.kb : K;
    const float* xw;
    const float* ww;
    if (built) {
      xw = ts.xw.data() + k0;
      ww = wt + k0;
    } else {
      ts.xw.resize(size_t(d.kb));
      ts.ww.resize(size_t(d.kb));
      widen_run<Kind>(xr + k0, ts.xw.data(), k1 - k0);
      for (int64_t k = k0; k < k1; ++k) ts.ww[k - k0] = low_float(widen_bits<Kind>(wc[k * O]));
      xw = ts.xw.data();
      ww = ts.ww.data();
    }
    int64_t k = k0;
    for (; k + L <= k1; k += L) {
      V xv, wv;
      std::memcpy(&xv, xw + (k - k0), sizeof(V));
      std::memcpy(&wv, ww + (k - k0), sizeof(V));
      for (uint32_t bits = lane_bits((V)low_pass<Op, false, Max>(xv, wv, bv, 0)); bits;
           bits &= bits - 1)
        win[nw++] = int32_t(k + __builtin_ctz(bits));
    }
    for (; k < k1; ++k)
      if (low_hit<Op, false, Max>(xw[k - k0], ww[k - k0], bd)) win[nw++] = int32_t(k);
  }
  const int32_t c = int32_t(nw);
  if (c == 0) {
    d.tie_at[at] = -1;
    return;
  }
  const size_t start = ts.list->size();
  ts.list->push_back(c);
  ts.list->insert(ts.list->end(), win, win + nw);
  d.tie_at[at] = int32_t(start);
  const float s = gv / float(c);
  for (int32_t q = 1; q <= c; ++q) {
    const int64_t k = win[q - 1];
    if constexpr (Op::kComb == 0) {
      acc[k * kCB + l] += s;
    } else {
      const float xs = built ? ts.xw[size_t(k)] : low_float(widen_bits<Kind>(xr[k]));
      const float ws = built ? wt[k] : low_float(widen_bits<Kind>(wc[k * O]));
      acc[k * kCB + l] += lowdense_term<Op, Gr, false>(s, xs, ws);
    }
  }
}

// The item's kernel columns col0 .. col0 + cols - 1 widened and transposed into ts.wt (column l
// at l * ldt along k; ldt a multiple of 16 plus 16, so that the columns' stores of one row fall
// in different cache sets). Out of line, as lowdense_tie.
template <int Kind, int64_t kCB>
__attribute__((noinline)) void lowdense_build(const LowDense& d, LowTies& ts, int64_t b,
                                              int64_t col0, int64_t cols) {
  const int64_t K = d.K, ldt = (K + 15) / 16 * 16 + 16;
  ts.wt.reset(new LowBuf(sizeof(float) * size_t(ldt * kCB)));
  float* wt = ts.wt->template get<float>();
  alignas(64) float row[16][kCB];
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    const int64_t rows = K - k0 < 16 ? K - k0 : 16;
    for (int64_t r = 0; r < rows; ++r)
      widen_run<Kind>(d.w16 + (b * K + k0 + r) * d.O + col0, row[r], cols);
    for (int64_t l = 0; l < cols; ++l)
      for (int64_t r = 0; r < rows; ++r) wt[l * ldt + k0 + r] = row[r][l];
  }
  ts.ldt = ldt;
}

// Pass W's item (b, grp, blk): dw's columns col0 .. col0 + cols - 1, rows in order.
template <class Op, class Gr, bool Max, int Rnd, int64_t kCB>
void lowdense_dw(const LowDense& d, int64_t item, std::vector<int32_t>& list, uint16_t* dw) {
  constexpr int Kind = Rnd == jaxconv::kRoundBF16 ? 1 : 2;
  constexpr int64_t kAhead = 24;  // rows fetched ahead: they are a page apart (no hardware
                                 // prefetch across pages)
  const int64_t blk = item % d.nblk, grp = (item / d.nblk) % d.G, b = item / (d.nblk * d.G);
  const int64_t K = d.K, O = d.O, col0 = grp * d.Og + blk * kCB;
  const int64_t cols = d.Og - blk * kCB < kCB ? d.Og - blk * kCB : kCB;
  LowBuf acc_buf((sizeof(float) + sizeof(uint16_t)) * size_t(K * kCB));
  float* acc = acc_buf.template get<float>();
  std::memset(acc, 0, sizeof(float) * size_t(K * kCB));
  LowTies ts;
  ts.list = &list;
  alignas(64) float gr[kCB];
  for (int64_t n = 0; n < d.N; ++n) {
    const int64_t at = (b * d.N + n) * O + col0;
    if (n + kAhead < d.N) {
      const int64_t ahead = at + kAhead * O;
      for (int64_t q = 0; q < cols; q += 16) __builtin_prefetch(d.rec + ahead + q);
      if (d.g16) __builtin_prefetch(d.g16 + ahead);
      else
        for (int64_t q = 0; q < cols; q += 16) __builtin_prefetch(d.gf + ahead + q);
    }
    if constexpr (Op::kComb != 0) {
      // The operands a winner's terms read (kernel rows in the order of the codes: a gather),
      // fetched kOperands rows ahead from the codes fetched above.
      constexpr int64_t kOperands = 8;
      if (n + kOperands < d.N) {
        const int32_t* ra = d.rec + at + kOperands * O;
        const uint16_t* xa = d.x16 + (b * d.N + n + kOperands) * d.C + grp * K;
        for (int64_t l = 0; l < cols; ++l) {
          const int32_t code = ra[l];
          if (code >= 0) {
            __builtin_prefetch(d.w16 + (b * K + code) * O + col0 + l);
            __builtin_prefetch(xa + code);
          }
        }
      }
    }
    lowdense_row<Kind>(d.gf, d.g16, at, cols, gr);
    const int32_t* rr = d.rec + at;
    for (int64_t l = 0; l < cols; ++l) {
      const int32_t code = rr[l];
      if (code >= 0) {
        if constexpr (Op::kComb == 0) {
          acc[code * kCB + l] += gr[l];
        } else {
          // Both terms while x and w are at hand; dx's waits in the output's side slot.
          const float xs = low_float(widen_bits<Kind>(d.x16[(b * d.N + n) * d.C + grp * K + code]));
          const float ws = low_float(widen_bits<Kind>(d.w16[(b * K + code) * O + col0 + l]));
          acc[code * kCB + l] += lowdense_term<Op, Gr, false>(gr[l] / 1.0f, xs, ws);
          d.dxt[at + l] = lowdense_term<Op, Gr, true>(gr[l] / 1.0f, xs, ws);
        }
      } else if (code <= kLowList) {  // two or three winners, in kernel-row order
        int64_t ks[3];
        const int c = lowdense_unlist(code, K, ks);
        const float s = gr[l] / float(c);
        for (int q = 0; q < c; ++q) {
          if constexpr (Op::kComb == 0) {
            acc[ks[q] * kCB + l] += s;
          } else {
            const float xs =
                low_float(widen_bits<Kind>(d.x16[(b * d.N + n) * d.C + grp * K + ks[q]]));
            const float ws = low_float(widen_bits<Kind>(d.w16[(b * K + ks[q]) * O + col0 + l]));
            acc[ks[q] * kCB + l] += lowdense_term<Op, Gr, false>(s, xs, ws);
          }
        }
      } else if (code <= -3) {
        ts.seen += __builtin_popcount(uint32_t(-2 - code));
        if (ts.ldt == 0 && ts.seen >= LowTies::kBuild)
          lowdense_build<Kind, kCB>(d, ts, b, col0, cols);
        lowdense_tie<Op, Gr, Max, Rnd, kCB>(d, ts, b, grp, n, col0 + l, l, code, gr[l], acc);
      }
    }
  }
  // Rounded in one run (the columns' runs are short), then copied to dw's rows.
  uint16_t* h = reinterpret_cast<uint16_t*>(acc + K * kCB);
  narrow_run<Kind>(acc, h, K * kCB);
  for (int64_t k = 0; k < K; ++k)
    std::memcpy(dw + (b * K + k) * O + col0, h + k * kCB, sizeof(uint16_t) * size_t(cols));
}

// Pass X's item (b, rows n0 .. n1 - 1): dx's rows, each output's terms in order.
template <class Op, class Gr, bool Max, int Rnd, int64_t kCB>
void lowdense_dx(const LowDense& d, const std::vector<std::vector<int32_t>>& lists, int64_t b,
                 int64_t n0, int64_t n1, float* dx, float* gr, uint16_t* out) {
  constexpr int Kind = Rnd == jaxconv::kRoundBF16 ? 1 : 2;
  const int64_t K = d.K, O = d.O;
  auto wide = [](uint16_t h) { return low_float(widen_bits<Kind>(h)); };
  for (int64_t n = n0; n < n1; ++n) {
    std::memset(dx, 0, sizeof(float) * size_t(d.C));
    const int64_t at = (b * d.N + n) * O;
    const uint16_t* xr = d.x16 + (b * d.N + n) * d.C;
    lowdense_row<Kind>(d.gf, d.g16, at, O, gr);
    for (int64_t grp = 0; grp < d.G; ++grp) {
      float* dg = dx + grp * K;
      for (int64_t o = grp * d.Og; o < (grp + 1) * d.Og; ++o) {
        const int32_t code = d.rec[at + o];
        if (code >= 0) {
          if constexpr (Op::kComb == 0) dg[code] += gr[o];
          else dg[code] += d.dxt[at + o];  // pass W's term
          continue;
        }
        if (code <= kLowList) {  // two or three winners, in kernel-row order
          int64_t ks[3];
          const int c = lowdense_unlist(code, K, ks);
          const float s = gr[o] / float(c);
          for (int q = 0; q < c; ++q)
            dg[ks[q]] += lowdense_term<Op, Gr, true>(s, wide(xr[grp * K + ks[q]]),
                                                     wide(d.w16[(b * K + ks[q]) * O + o]));
          continue;
        }
        if (code > -3 || d.tie_at[at + o] < 0) continue;
        const int64_t owner = (b * d.G + grp) * d.nblk + (o - grp * d.Og) / kCB;
        const int32_t* e = lists[size_t(owner)].data() + d.tie_at[at + o];
        const float s = gr[o] / float(e[0]);
        for (int32_t q = 1; q <= e[0]; ++q) {
          const int64_t k = e[q];
          dg[k] += lowdense_term<Op, Gr, true>(s, wide(xr[grp * K + k]),
                                               wide(d.w16[(b * K + k) * O + o]));
        }
      }
    }
    narrow_run<Kind>(dx, out + (b * d.N + n) * d.C, d.C);
  }
}

// The backward (see the top of this file): 0, 2 (out of memory), or -1 when the call is not its
// case (another op, not the dense case, or not recorded).
template <class Op, class Gr, bool Max, int Rnd>
int lowdense_backward(const WideCall& call) {
  if constexpr (!lowdense_op<Op>()) {
    return -1;
  } else {
    constexpr int64_t kCB = 64;   // output channels per pass-W item: two lines of the low dw
    constexpr int64_t kRows = 8;  // rows per pass-X item
    const Geom& g = call.geom;
    if (!call.rec || !lowdense_case(g) || call.rec[0] == -1) return -1;
    LowDense d{};
    d.x16 = static_cast<const uint16_t*>(call.x);
    d.w16 = static_cast<const uint16_t*>(call.w);
    d.yf = call.low_y ? nullptr : static_cast<const float*>(call.y);
    d.y16 = call.low_y ? static_cast<const uint16_t*>(call.y) : nullptr;
    d.gf = call.low_g ? nullptr : static_cast<const float*>(call.g);
    d.g16 = call.low_g ? static_cast<const uint16_t*>(call.g) : nullptr;
    d.rec = call.rec;
    d.N = g.n, d.K = g.i, d.O = g.o, d.G = g.g, d.Og = g.o / g.g, d.C = g.c;
    d.kb = jaxconv::record_block_rows(d.K);
    d.nblk = (d.Og + kCB - 1) / kCB;
    const int64_t B = call.batch;
    std::vector<std::vector<int32_t>> lists;
    std::unique_ptr<LowBuf> tie_buf;
    try {
      lists.resize(size_t(B * d.G * d.nblk));
      tie_buf.reset(new LowBuf(sizeof(int32_t) * size_t(B * d.N * d.O)));
    } catch (...) {
      return 2;
    }
    d.tie_at = tie_buf->template get<int32_t>();
    d.dxt = tie_buf->template get<float>();
    std::atomic<bool> failed{false};
    auto pass_w = [&](int64_t item) {
      try {
        lowdense_dw<Op, Gr, Max, Rnd, kCB>(d, item, lists[size_t(item)],
                                           static_cast<uint16_t*>(call.out2));
      } catch (...) {
        failed.store(true, std::memory_order_relaxed);
      }
    };
    lowdense_items(call, B * d.G * d.nblk, pass_w);
    if (failed.load()) return 2;
    const int64_t runs = (d.N + kRows - 1) / kRows;
    auto pass_x = [&](int64_t item) {
      const int64_t b = item / runs, n0 = (item % runs) * kRows;
      try {
        std::vector<float> buf(size_t(d.C + d.O));
        lowdense_dx<Op, Gr, Max, Rnd, kCB>(d, lists, b, n0, n0 + kRows < d.N ? n0 + kRows : d.N,
                                           buf.data(), buf.data() + d.C,
                                           static_cast<uint16_t*>(call.out));
      } catch (...) {
        failed.store(true, std::memory_order_relaxed);
      }
    };
    lowdense_items(call, B * runs, pass_x);
    return failed.load() ? 2 : 0;
  }
}

// The logsumexp backward with vectors over input channels: both gradients of every term from
// one exponential, dx summed in registers and dw in L1, for input channels in whole vectors.
//
// Why: lse_backward's general loop (kernel_logsum.h) runs vectors over output channels, so
// each (position, tap, input channel) ends in a horizontal sum and a scalar add into dx, and
// its dw rows (taps x 16 input channels x Og) and kernel rows, read once per term, outgrow L1.
// Here a vector holds W input channels, as the heavy sums' one-pass loop does
// (kernel_sums_heavy.h): a term's exponent reads its output's -y L and masked cotangent as
// broadcasts, dx of an input cell is one vector added once per (position, tap), and the kernel
// slice and dw of one tap (Og x W each) stay in L1. Rows of R positions share each kernel
// vector and each dw load and store.
//
// Sums: each dx element adds, per (position block, tap, position) in ascending order, its sum
// over the output channels in ascending order (one FMA chain from zero); each dw element sums
// the positions in ascending order, per image split, and the splits in ascending order.
//
// Work items: (batch entry, group, vector of W input channels, run of images); an item owns
// those channels' dx in its images and its own dw partial. Images are split so that there
// are at least kLseItems items where there are images to split.
//
// Part of the kernel template: included by kernel_logsum.h inside the kernels' anonymous
// namespace (once per instruction set), never on its own.
#pragma once

// The fewest work items the loop aims at (splitting images); with fewer (a single image and
// few input channels) it still runs.
constexpr int64_t kLseItems = 8;
// Output rows per register tile (one kernel vector and one dw vector serve R terms).
// (1, 3 and 4 rows measured the same as 2 on the seed op, layer A, one thread.)
constexpr int kLseRows = 2;

// Whether the generated functor Op declares bterms (codegen.py `terms_function`: a term's
// value and both partials at once, sums and differences on the add ports; kTermNeg: its value
// is the negated term, as comb_neg's).
template <class Op>
constexpr auto has_bterms(int)
    -> decltype(Op::template bterms<S>(S::V{}, S::V{}, nullptr, nullptr, nullptr), true) {
  return true;
}
template <class Op>
constexpr bool has_bterms(long) {
  return false;
}

// One term's exponent u (t L + n, or (t + n) L where kUnscaled) and partials cx, cw.
template <class Op, bool kUnscaled>
inline void lse_bterm(S::V xv, S::V wv, S::V L, S::V n, S::V* u, S::V* cx, S::V* cw) {
  if constexpr (has_bterms<Op>(0)) {
    S::V t;
    Op::template bterms<S>(xv, wv, &t, cx, cw);
    if constexpr (kUnscaled) *u = S::mul(Op::kTermNeg ? S::sub(n, t) : S::add(t, n), L);
    else *u = Op::kTermNeg ? S::fnma(t, L, n) : S::fma(t, L, n);
  } else {
    if constexpr (kUnscaled) *u = S::mul(S::add(Op::template comb<S>(xv, wv), n), L);
    else *u = lse_u<Op>(xv, wv, L, n);
    *cx = Op::template dcx<S>(xv, wv);
    *cw = Op::template dcw<S>(xv, wv);
  }
}

// R positions' terms against the kernel slice of one tap: for each output channel o, the
// kernel vector wt[o] (W input channels) and dt[o] (its dw) against each row's input vector
// xr[r] with that row's cotangent gq[r][o] and exponent offset yq[r][o]; each row's dx sum is
// added to dxr[r] (skipped where null: a pad row, or no dx asked).
template <class Op, bool kUnscaled, int R>
inline void lse_ivec_rows(const float* const* xr, const float* const* gq,
                          const float* const* yq, float* const* dxr, const float* wt, float* dt,
                          int64_t Og) {
  using V = S::V;
  V xv[R], acc[R];
  for (int r = 0; r < R; ++r) {
    xv[r] = S::load(xr[r]);
    acc[r] = S::zero();
  }
  const V L = S::set1(kLog2e);
  for (int64_t o = 0; o < Og; ++o) {
    const V wv = S::load(wt + o * W);
    V dw = S::load(dt + o * W);
    for (int r = 0; r < R; ++r) {
      V u, cx, cw;
      lse_bterm<Op, kUnscaled>(xv[r], wv, L, S::set1(yq[r][o]), &u, &cx, &cw);
      const V h = S::mul(S::set1(gq[r][o]), lse_exp2z<S>(u));
      acc[r] = S::fma(h, cx, acc[r]);
      dw = S::fma(h, cw, dw);
    }
    S::store(dt + o * W, dw);
  }
  for (int r = 0; r < R; ++r)
    if (dxr[r]) S::store(dxr[r], S::add(S::load(dxr[r]), acc[r]));
}

// Both gradients (call.parts: what is written) of a logsumexp op, from the per-output masked
// cotangent gm and exponent offset ym that lse_backward prepared (g e^(t - y) = gm 2^(t L +
// ym), or gm 2^((t + ym) L) where kUnscaled). Returns false, having done nothing, where the
// input channels are not whole vectors (lse_backward's general loop runs instead).
template <class Op, bool kUnscaled>
bool lse_backward_ivec(Ctx& c, const float* gm, const float* ym) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  if (I % W != 0) return false;
  const int64_t nvi = I / W, N = c.g.n;
  const int64_t base = call.batch * c.G * nvi;
  int64_t nsplit = 1;
  while (nsplit < N && base * nsplit < kLseItems) ++nsplit;
  const int64_t slice = T * Og * W;  // one item's kernel slice, and its dw partial
  const int64_t items = base * nsplit;
  float* dwp = c.scratch.get<float>(items * slice);  // (batch, group, vector, split, slice)
  if (!dwp) {
    c.failed = true;
    return true;
  }
  const bool want_dx = (call.parts & 1) != 0, want_dw = (call.parts & 2) != 0;
  const bool has_pad = c.g.has_pad != 0;
  // Positions per block: their gm and ym rows stay in L1 across the taps.
  int64_t pb = 2048 / (Og > 0 ? Og : 1);
  pb = pb < 4 * kLseRows ? 4 * kLseRows : pb > 64 ? 64 : pb;
  std::atomic<bool> failed{false};
  auto item = [&](int64_t it) {
    const int64_t sp = it % nsplit, iv = (it / nsplit) % nvi, grp = (it / (nsplit * nvi)) % c.G;
    const int64_t b = it / (nsplit * nvi * c.G);
    const int64_t i0 = iv * W;
    const int64_t n0 = N * sp / nsplit, n1 = N * (sp + 1) / nsplit;
    const Owned<float> owned = allocate<float>(slice);
    float* wp = owned.get();  // (T, Og, W): this item's kernel slice
    if (!wp) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    const float* wb = call.w + b * c.w_bs + grp * Og;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t l = 0; l < W; ++l)
        for (int64_t o = 0; o < Og; ++o)
          wp[(t * Og + o) * W + l] = wb[(t * I + i0 + l) * O + o];
    float* dwt = dwp + it * slice;  // (T, Og, W): this item's dw partial
    std::memset(dwt, 0, sizeof(float) * size_t(slice));
    const float* xb = call.x + b * c.x_bs;
    float* dxb = call.out + b * c.x_bs + grp * I + i0;
    const float* pad = c.padrow + grp * I + i0;
    const int64_t p_end = n1 * c.OS;
    for (int64_t p0 = n0 * c.OS; p0 < p_end; p0 += pb) {
      const int64_t p1 = p0 + pb < p_end ? p0 + pb : p_end;
      for (int64_t t = 0; t < T; ++t) {
        const float* wt = wp + t * Og * W;
        float* dt = dwt + t * Og * W;
        const float* xr[kLseRows];
        const float* gq[kLseRows];
        const float* yq[kLseRows];
        float* dxr[kLseRows];
        int nr = 0;
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / c.OS, osi = p % c.OS;
          const int32_t off = c.tab[osi * T + t];
          if (off < 0 && !has_pad) continue;  // identity padding: not a term
          // A pad value is a term of dw; its dx is dropped.
          xr[nr] = off < 0 ? pad : xb + n * c.img + off + grp * I + i0;
          dxr[nr] = want_dx && off >= 0 ? dxb + n * c.img + off : nullptr;
          const int64_t q = b * c.y_bs + p * O + grp * Og;
          gq[nr] = gm + q;
          yq[nr] = ym + q;
          if (++nr == kLseRows) {
            lse_ivec_rows<Op, kUnscaled, kLseRows>(xr, gq, yq, dxr, wt, dt, Og);
            nr = 0;
          }
        }
        for (int r = 0; r < nr; ++r)
          lse_ivec_rows<Op, kUnscaled, 1>(xr + r, gq + r, yq + r, dxr + r, wt, dt, Og);
      }
    }
  };
  parallel(c, items, item);
  if (failed.load()) {
    c.failed = true;
    return true;
  }
  if (!want_dw) return true;
  // dw: each item's splits summed in ascending order, transposed into (T, I, O).
  auto gather = [&](int64_t it) {
    const int64_t iv = it % nvi, grp = (it / nvi) % c.G, b = it / (nvi * c.G);
    const float* src = dwp + it * nsplit * slice;
    float* dwb = call.out2 + b * c.w_bs + grp * Og;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t o = 0; o < Og; ++o) {
        const int64_t k = (t * Og + o) * W;
        S::V s = S::load(src + k);
        for (int64_t sp = 1; sp < nsplit; ++sp) s = S::add(s, S::load(src + sp * slice + k));
        alignas(64) float lanes[W];
        S::store(lanes, s);
        for (int64_t l = 0; l < W; ++l) dwb[(t * I + iv * W + l) * O + o] = lanes[l];
      }
  };
  parallel(c, base, gather);
  return true;
}

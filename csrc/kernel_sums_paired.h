// Both gradients of adder and l1 (and l2_exact under JAXCONV_NATIVE_L2=native) on a
// convolution in one pass over the terms: each term's difference d = x - w (and for l1 its
// sign) feeds the input gradient and the kernel gradient at once, instead of one pass per
// gradient (or, for adder, a standard product for the kernel gradient). l2_exact's pass: one
// thread, layer A, benchmarks/sumbwd_1t.cc: 23.8 ms for the two passes -> 13.7 ms.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// The two updates of one term, on the vector ports each op leaves free. Both ops' input rule
// is odd in w - x, so it is computed from x - w and subtracted (bit for bit the same sum):
//   adder: dx -= g clip(x - w, -1, 1), dw += g (x - w)  (sub and range on the add ports,
//          the two fused multiply-adds on the FMA ports: two cycles per pair on Zen 4,
//          where the passes took ~2 (dx) plus a standard product (dw));
//   l1:    dx -= g sign(x - w),        dw += g sign(x - w)  (the sign computed once).
//   l2:    dx -= 2g (x - w),            dw += 2g (x - w)  (2g formed once per cotangent:
//          exact, so the bits of g (-2 (x - w)) and g (2 (x - w)), the rules hx and hw).
// `cot` is the cotangent as the terms take it (2g for l2, g itself otherwise).
template <class Op>
struct PairRule {
  static constexpr bool kHas = false;
};
template <class Clip>
struct PairRule<AdderOf<Clip>> {
  static constexpr bool kHas = true;
  static S::V cot(S::V g) { return g; }
  static void term(S::V gs, S::V x, S::V w, S::V& dx, S::V& dw) {
    const S::V d = S::sub(x, w);
    dx = S::fnma(gs, AdderOf<Clip>::template clip<S>(d), dx);
    dw = S::fma(gs, d, dw);
  }
};
template <>
struct PairRule<L1> {
  static constexpr bool kHas = true;
  static S::V cot(S::V g) { return g; }
  static void term(S::V gs, S::V x, S::V w, S::V& dx, S::V& dw) {
    const S::V h = L1::hw<S>(x, w);
    dx = S::fnma(gs, h, dx);
    dw = S::fma(gs, h, dw);
  }
};
template <>
struct PairRule<L2> {
  static constexpr bool kHas = true;
  static S::V cot(S::V g) { return S::add(g, g); }
  static void term(S::V gs, S::V x, S::V w, S::V& dx, S::V& dw) {
    const S::V d = S::sub(x, w);
    dx = S::fnma(gs, d, dx);
    dw = S::fma(gs, d, dw);
  }
};

// One chunk of positions x R output channels x V vectors of input channels: the kernel
// gradient's R x V sums stay in registers over the chunk (resumed from `dwp`), each
// position's V input-gradient sums continue over o in `part` (its row) and, after the last
// o, are added to dx (`last`). `grow[q] + go` are its R cotangents, `rows[q]` its input row
// (nullptr: padded, no term), `dxr[q]` where its dx goes (nullptr: a pad row, dropped).
template <class Op, int R, int V>
void pair_tile(const float* const* rows, float* const* dxr, const float* const* grow, int64_t go,
               int64_t n, const float* wt, float* part, float* dwp, bool first_o, bool last_o,
               bool first_p) {
  S::V dw[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) dw[r][v] = first_p ? S::zero() : S::load(dwp + r * NR + v * W);
  for (int64_t q = 0; q < n; ++q) {
    const float* xr = rows[q];
    if (!xr) continue;
    float* pr = part + q * NR;
    S::V acc[V], xv[V];
    for (int v = 0; v < V; ++v) {
      xv[v] = S::load(xr + v * W);
      acc[v] = first_o ? S::zero() : S::load(pr + v * W);
    }
    const float* gg = grow[q] + go;
    for (int r = 0; r < R; ++r) {
      const S::V gs = PairRule<Op>::cot(S::set1(gg[r]));
      const float* wr = wt + r * NR;
      // Row r's loads after row r - 1's dw updates (no instruction: only the compiler's
      // order). GCC otherwise computed the R x V differences early, sank the dw updates
      // below the dx stores and spilled 9 to 12 of the 16 dw sums.
#if defined(__x86_64__)
      if (r > 0)
        for (int v = 0; v < V; ++v) __asm__("" : "+v"(dw[r - 1][v]), "+r"(wr));
#endif
      for (int v = 0; v < V; ++v)
        PairRule<Op>::term(gs, xv[v], S::load(wr + v * W), acc[v], dw[r][v]);
    }
    if (!last_o) {
      for (int v = 0; v < V; ++v) S::store(pr + v * W, acc[v]);
    } else if (float* d = dxr[q]) {
      for (int v = 0; v < V; ++v) S::store(d + v * W, S::add(S::load(d + v * W), acc[v]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) S::store(dwp + r * NR + v * W, dw[r][v]);
}

// dx's sums over o run kDxRun channels at a time, each run's sum then added to dx: over E's
// 1024 output channels one running sum had lost 5x the accuracy of a product (l1 dx max
// error 1.8e-4 -> 3.7e-5 at |dx| <= 155, with no measured cost). At most kDxRun output
// channels (layer A's 64) keep one sum, and the same bits.
constexpr int64_t kDxRun = 64;

// Input and kernel gradient of adder / l1 on a convolution whose input channels are whole
// vectors (c.wpack holds the kernel transposed per tap, group and block of NR input channels,
// as sum_backward packs it). Items are (batch, group, block of input channels, run of
// images); an item sums its terms into its own dw partial ((T, Og, NR) floats of its run's
// (T, nIB, Og, NR)), and a second pass adds the runs' partials in order and transposes them
// into dw. dx keeps the bits of the separate pass (each (position, tap) sums its o
// ascending in runs of kDxRun, taps ascending per cell); dw sums each item's
// positions in order, then the items in order: the same bits whatever the threads.
// Returns false (nothing written) when the scratch cannot be had.
static_assert(jaxconv::kPairChannels % W == 0, "kPairChannels is whole vectors (problem.h)");
template <class Op>
bool pair_backward(Ctx& c) {
  constexpr int R = 4;
  constexpr int64_t kChunk = 64;  // positions whose x rows and dx sums stay in L1
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T, OS = c.OS, N = c.g.n;
  const int64_t nIB = (I + NR - 1) / NR;
  // An item owns the dx columns and dw rows of one block of input channels; with fewer than
  // 8 such blocks in all, the images are cut into runs too (at most 16 per (batch, group,
  // block)), each summing into its own dw partial. The runs depend on the shape only.
  // The partials stay within 64 MiB (16 runs of a large kernel would be 16 kernels' worth).
  const int64_t pstride = T * nIB * Og * NR;  // one run's dw partial, every block
  const int64_t fit = (int64_t(1) << 24) / (call.batch * c.G * pstride);
  const int64_t most = fit < 1 ? 1 : fit < 16 ? fit : 16;
  const bool cut = call.batch * c.G * nIB < 8;
  const int64_t per = cut ? (N + most - 1) / most : N;
  const int64_t runs = (N + per - 1) / per;
  const int64_t nit = call.batch * c.G * nIB * runs;
  float* dwp = c.scratch.get<float>(call.batch * c.G * runs * pstride);
  float* parts = c.scratch.get<float>(nit * kChunk * NR);
  if (!dwp || !parts) return false;
  auto item = [&](int64_t it) {
    const int64_t run = it % runs, ib = (it / runs) % nIB, bg = it / (runs * nIB);
    const int64_t grp = bg % c.G, b = bg / c.G;
    const int64_t n0 = run * per, n1 = n0 + per < N ? n0 + per : N;
    const float* xb = call.x + b * c.x_bs;
    const float* gb = call.g + b * c.y_bs;
    float* dxb = call.out + b * c.x_bs;
    float* mine = dwp + (bg * runs + run) * pstride;
    float* part = parts + it * kChunk * NR;
    const float* rows[kChunk];
    float* dxr[kChunk];
    const float* grow[kChunk];
    for (int64_t t = 0; t < T; ++t) {
      const float* wt = c.wpack + (((b * T + t) * c.G + grp) * nIB + ib) * Og * NR;
      const int64_t nvi = ((I - ib * NR < NR) ? I - ib * NR : NR) / W;
      float* dwt = mine + (t * nIB + ib) * Og * NR;
      bool first_p = true;
      for (int64_t p0 = n0 * OS; p0 < n1 * OS; p0 += kChunk) {
        const int64_t pn = n1 * OS - p0 < kChunk ? n1 * OS - p0 : kChunk;
        for (int64_t q = 0; q < pn; ++q) {
          const int64_t p = p0 + q, n = p / OS, osi = p % OS;
          const int32_t off = c.tab[osi * T + t];
          const int64_t col = grp * I + ib * NR;
          if (off >= 0) {
            rows[q] = xb + n * c.img + off + col;
            dxr[q] = dxb + n * c.img + off + col;
          } else {
            rows[q] = c.g.has_pad ? c.padrow + col : nullptr;
            dxr[q] = nullptr;
          }
          grow[q] = gb + p * O + grp * Og;
        }
        for (int64_t o0 = 0; o0 < Og; o0 += R) {
          const int64_t rn = Og - o0 < R ? Og - o0 : R;
          // dx adds its sum of each kDxRun output channels (kDxRun % R == 0) to dx.
          const bool fo = o0 % kDxRun == 0, lo = o0 + R >= Og || (o0 + R) % kDxRun == 0;
          const float* w0 = wt + o0 * NR;
          float* d0 = dwt + o0 * NR;
          if (rn == R && nvi == NV) {
            pair_tile<Op, R, NV>(rows, dxr, grow, o0, pn, w0, part, d0, fo, lo, first_p);
          } else {
            // A ragged tile: one output channel and one vector at a time (same order).
            for (int64_t r = 0; r < rn; ++r)
              for (int64_t v = 0; v < nvi; ++v) {
                const float* rv[kChunk];
                float* dv[kChunk];
                const float* gv[kChunk];
                for (int64_t q = 0; q < pn; ++q) {
                  rv[q] = rows[q] ? rows[q] + v * W : nullptr;
                  dv[q] = dxr[q] ? dxr[q] + v * W : nullptr;
                  gv[q] = grow[q] + o0 + r;
                }
                pair_tile<Op, 1, 1>(rv, dv, gv, 0, pn, w0 + r * NR + v * W, part + v * W,
                                    d0 + r * NR + v * W, fo && r == 0, lo && r == rn - 1,
                                    first_p);
              }
          }
        }
        first_p = false;
      }
    }
  };
  parallel(c, nit, item);
  // dw[t, i, grp * Og + o] = the items' partials in item order, transposed.
  auto reduce = [&](int64_t it) {
    const int64_t ib = it % nIB, t = (it / nIB) % T, grp = (it / (nIB * T)) % c.G;
    const int64_t b = it / (nIB * T * c.G);
    const int64_t nl = I - ib * NR < NR ? I - ib * NR : NR;
    float* first = dwp + ((b * c.G + grp) * runs) * pstride + (t * nIB + ib) * Og * NR;
    for (int64_t k = 1; k < runs; ++k) {
      const float* src = first + k * pstride;
      for (int64_t j = 0; j < Og * NR; j += W) S::store(first + j, S::add(S::load(first + j),
                                                                          S::load(src + j)));
    }
    float* dst = call.out2 + b * c.w_bs + (t * I + ib * NR) * O + grp * Og;
    transpose(first, NR, dst, O, Og, nl);
  };
  parallel(c, call.batch * c.G * T * nIB, reduce);
  return true;
}

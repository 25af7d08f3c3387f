// The logsumexp reduce: y = log(sum_taps exp(comb(x, w))), stable for any range of values,
// forward and backward, for the built-in log op (x + w) and every user combine under it.
//
// Forward: two passes over a tile's taps, the first for the maximum m of the terms (NaN if
// one is NaN), the second for s = sum exp(term - m); y = m + log(s) where m is finite, else
// m itself (-inf: an all -inf window; +inf; NaN). No term overflows: the largest is exp(0).
// Backward: d y / d term = exp(term - y), so dx and dw are the sums backward of the rule
// g exp(comb - y) dcx (resp. dcw), with an all -inf window's cotangent zeroed and its output
// read as 0 (no inf - inf), as the XLA engine's rule.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

struct LseR {
  static constexpr int kReduce = 3;
  static constexpr bool kKeyed = false;
  static constexpr bool kDominated = false;
  static constexpr bool kNanFree = false;
  static float ident() { return -__builtin_inff(); }
};
// x + w under logsumexp (the log semiring).
struct LogPlus : LseR {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::add(x, w); }
  template <class T> static VT<T> dcx(VT<T>, VT<T>) { return T::set1(1.0f); }
  template <class T> static VT<T> dcw(VT<T>, VT<T>) { return T::set1(1.0f); }
};

// Rows per forward tile: the maxima and the sums of LR x NV vectors stay in registers.
constexpr int LR = 2;

// e^x for the exponents of a logsumexp, x <= ~0 (x = -inf and NaN included): vmath's exp_
// with one scaling instead of two and no upper clamp. Below -88 the result is 0 (the values
// it leaves out are below float's smallest normal number, which the calls flush to zero).
template <class T>
inline VT<T> lse_exp(VT<T> x) {
  VT<T> k;
  const VT<T> r = vm_reduce<T>(T::max(T::set1(-88.0f), x), &k);  // NaN stays NaN
  return T::mul(T::add(T::set1(1.0f), vm_expm1_r<T>(r)), vm_pow2i<T>(k));
}

// One tile of LR output positions x NR output channels over the packed (K, NR) kernel block.
template <class Op>
void lse_tile(const Ctx& c, const float* xb, const float* panel, float* yb, int64_t p,
              int64_t grp, int64_t jb) {
  using V = S::V;
  const TileRows<LR> rows(c, p);
  const int64_t (&nimg)[LR] = rows.nimg;
  const int64_t (&osi)[LR] = rows.osi;
  const bool (&live)[LR] = rows.live;
  const int64_t I = c.I;
  const bool has_pad = c.g.has_pad != 0;
  // Each row's input row per tap (the pad row where padded) and whether it is combined.
  auto row = [&](int r, int64_t t, bool* keep) -> const float* {
    const int32_t off = live[r] ? c.tab[osi[r] * c.T + t] : -1;
    *keep = off >= 0 || (has_pad && live[r]);
    if (off < 0) return c.padrow + grp * I;
    return xb + nimg[r] * c.img + off + grp * I;
  };
  // Visits every combined term of the tile in tap order: f(r, v, mask of row r, comb value).
  auto sweep = [&](auto&& f) {
    for (int64_t t = 0; t < c.T; ++t) {
      const float* ptr[LR];
      S::M km[LR];
      for (int r = 0; r < LR; ++r) {
        bool k;
        ptr[r] = row(r, t, &k);
        km[r] = S::mask(k);
      }
      const float* wt = panel + t * I * NR;
      for (int64_t i = 0; i < I; ++i) {
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = S::load(wt + i * NR + v * W);
        for (int r = 0; r < LR; ++r) {
          const V xv = S::set1(ptr[r][i]);
          for (int v = 0; v < NV; ++v) f(r, v, km[r], Op::template comb<S>(xv, wv[v]));
        }
      }
    }
  };
  V m[LR][NV], s[LR][NV];
  for (int r = 0; r < LR; ++r)
    for (int v = 0; v < NV; ++v) m[r][v] = S::set1(-__builtin_inff());
  // Pass 1: the maximum, NaN once a term is NaN.
  sweep([&](int r, int v, S::M km, V term) {
    m[r][v] = S::select(km, MaxR::red_safe<S>(m[r][v], term), m[r][v]);
  });
  for (int r = 0; r < LR; ++r)
    for (int v = 0; v < NV; ++v) s[r][v] = S::zero();
  // Pass 2: the shifted sum of exponentials, each at most exp(0) (lanes whose maximum is not
  // finite compute garbage here: their result is the maximum itself).
  sweep([&](int r, int v, S::M km, V term) {
    s[r][v] = S::madd(km, s[r][v], lse_exp<S>(S::sub(term, m[r][v])));
  });
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  for (int r = 0; r < LR; ++r) {
    if (!live[r]) continue;
    alignas(64) float tmp[NR];
    for (int v = 0; v < NV; ++v) {
      const V y = S::add(m[r][v], log_<S>(s[r][v]));
      S::store(tmp + v * W, S::select(S::isfinite_m(m[r][v]), y, m[r][v]));
    }
    std::memcpy(yb + (p + r) * c.O + o0, tmp, sizeof(float) * nvalid);
  }
}

template <class Op>
void lse_forward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t tiles = (c.P + LR - 1) / LR;
  const int64_t blocks = call.batch * c.G * c.nJB;
  int64_t tpi = 128;
  while (tpi > 8 && blocks * ((tiles + tpi - 1) / tpi) < 16) tpi /= 2;
  const int64_t chunks = (tiles + tpi - 1) / tpi;
  std::atomic<bool> failed{false};
  auto item = [&](int64_t it) {
    const int64_t ch = it % chunks, blk = it / chunks;
    const int64_t jb = blk % c.nJB, grp = (blk / c.nJB) % c.G, b = blk / (c.nJB * c.G);
    const Owned<float> panel = allocate<float>(c.K * NR);
    if (!panel) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    pack_panel(c, call.w + b * c.w_bs, grp, jb, 0, c.K, false, panel.get());
    const int64_t t1 = (ch + 1) * tpi < tiles ? (ch + 1) * tpi : tiles;
    for (int64_t tl = ch * tpi; tl < t1; ++tl)
      lse_tile<Op>(c, call.x + b * c.x_bs, panel.get(), call.out + b * c.y_bs, tl * LR, grp,
                   jb);
  };
  parallel(c, blocks * chunks, item);
  if (failed.load()) c.failed = true;
}

// ---- backward ------------------------------------------------------------------------------
template <class Op>
void lse_backward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const int64_t n_out = call.batch * c.y_bs;
  // The masked cotangent and output: an all -inf window's g is 0 and its y 0.
  float* gm = c.scratch.get<float>(n_out);
  float* ym = c.scratch.get<float>(n_out);
  if (!gm || !ym) {
    c.failed = true;
    return;
  }
  constexpr int64_t kChunk = 1 << 14;
  auto mask = [&](int64_t it) {
    const int64_t a = it * kChunk, e = a + kChunk < n_out ? a + kChunk : n_out;
    for (int64_t j = a; j < e; ++j) {
      const bool empty = call.y[j] == -__builtin_inff();
      gm[j] = empty ? 0.0f : call.g[j];
      ym[j] = empty ? 0.0f : call.y[j];
    }
  };
  parallel(c, (n_out + kChunk - 1) / kChunk, mask);
  // Both gradients in one pass over the terms (each exp once): an item owns a block of kIB
  // input channels of one group and batch entry, so it alone writes their dx (every cell)
  // and their dw rows (every tap and output channel, summed in L1 scratch), and loops over
  // all positions and taps. The block's size leaves at least 8 items where I allows.
  int64_t kIB = 16;
  while (kIB > 1 && call.batch * c.G * ((I + kIB - 1) / kIB) < 8) kIB /= 2;
  const int64_t nib = (I + kIB - 1) / kIB;
  const bool want_dx = (call.parts & 1) != 0, want_dw = (call.parts & 2) != 0;
  std::atomic<bool> failed{false};
  auto item = [&](int64_t it) {
    const int64_t ib = it % nib, grp = (it / nib) % c.G, b = it / (nib * c.G);
    const int64_t i0 = ib * kIB, ni = I - i0 < kIB ? I - i0 : kIB;
    const float* xb = call.x + b * c.x_bs;
    const float* wb = call.w + b * c.w_bs + grp * Og;
    float* dxb = call.out + b * c.x_bs;
    const Owned<float> owned = allocate<float>(T * ni * Og);
    float* dwl = owned.get();  // (T, ni, Og)
    if (!dwl) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    std::memset(dwl, 0, sizeof(float) * size_t(T * ni * Og));
    for (int64_t p = 0; p < c.P; ++p) {
      const int64_t n = p / c.OS, osi = p % c.OS;
      const int64_t q = b * c.y_bs + p * O + grp * Og;
      const float* gg = gm + q;
      const float* yy = ym + q;
      for (int64_t t = 0; t < T; ++t) {
        const int32_t off = c.tab[osi * T + t];
        if (off < 0 && !c.g.has_pad) continue;  // identity padding: not a term
        // A pad value is a term of dw; its dx is dropped.
        const float* xr = off < 0 ? c.padrow + grp * I : xb + n * c.img + off + grp * I;
        for (int64_t ii = 0; ii < ni; ++ii) {
          const float xv = xr[i0 + ii];
          const float* wr = wb + (t * I + i0 + ii) * O;
          float* dwr = dwl + (t * ni + ii) * Og;
          const S::V xs = S::set1(xv);
          S::V acc = S::zero();
          int64_t o = 0;
          for (; o + W <= Og; o += W) {
            const S::V wv = S::load(wr + o);
            const S::V e = lse_exp<S>(S::sub(Op::template comb<S>(xs, wv), S::load(yy + o)));
            const S::V h = S::mul(S::load(gg + o), e);
            acc = S::fma(h, Op::template dcx<S>(xs, wv), acc);
            S::store(dwr + o, S::fma(h, Op::template dcw<S>(xs, wv), S::load(dwr + o)));
          }
          float sum = S::hsum(acc);
          for (; o < Og; ++o) {
            const float e = lse_exp<Sc>(Op::template comb<Sc>(xv, wr[o]) - yy[o]);
            const float h = gg[o] * e;
            sum += h * Op::template dcx<Sc>(xv, wr[o]);
            dwr[o] += h * Op::template dcw<Sc>(xv, wr[o]);
          }
          if (want_dx && off >= 0) dxb[n * c.img + off + grp * I + i0 + ii] += sum;
        }
      }
    }
    if (!want_dw) return;
    float* dwb = call.out2 + b * c.w_bs + grp * Og;
    for (int64_t t = 0; t < T; ++t)
      for (int64_t ii = 0; ii < ni; ++ii)
        std::memcpy(dwb + (t * I + i0 + ii) * O, dwl + (t * ni + ii) * Og,
                    sizeof(float) * size_t(Og));
  };
  parallel(c, call.batch * c.G * nib, item);
  if (failed.load()) c.failed = true;
}

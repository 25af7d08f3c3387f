// The logsumexp reduce: y = log(sum_taps exp(comb(x, w))), stable for any range of values,
// forward and backward, for the built-in log op (x + w) and every user combine under it.
//
// Forward (lse_tile): one pass per tile with a running reference maximum per output lane,
// rescaled only when a term exceeds it by a wide margin (once per tile on usual data); tiles
// with an exceptional lane (all -inf, +inf, no term) take the exact two-pass lse_tile_exact.
// Exponentials are 2^(t L - mL) (simd_exp.h): one FMA per term for the exponent, 11 vector
// operations for the power. No term overflows. The exponent's FMA must be fused (its product
// is exact): the base build, without FMA instructions, pays a libm fmaf per lane for it.
// Backward: d y / d term = exp(term - y) = 2^(term L - yL) times a per-output factor, so dx and
// dw are the sums backward of the rule g exp(comb - y) dcx (resp. dcw), with an all -inf
// window's cotangent zeroed and its output read as 0 (no inf - inf), as the XLA engine's rule.
// Each term's exponential serves both gradients: input channels in whole vectors take the loop
// with vectors over them (kernel_lsebwd_ivec.h), others lse_backward's loop over output
// channels.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

#include "simd_exp.h"

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

// The exponent t L + n of a term t = comb(x, w). A generated functor whose combine ends in a
// negation, t = -z, also gives comb_neg = z (codegen.py): then n - z L, one FMA with the
// negation folded in (one vector operation fewer per term, forward and backward; the same
// bits). (Tested by overload, not a class specialization: a vector type in a template
// argument drops its attributes, which GCC warns about at every user kernel's compile.)
template <class Op>
constexpr auto has_comb_neg(int) -> decltype(Op::template comb_neg<S>(S::V{}, S::V{}), true) {
  return true;
}
template <class Op>
constexpr bool has_comb_neg(long) {
  return false;
}
template <class Op>
inline S::V lse_u(S::V xv, S::V wv, S::V L, S::V n) {
  if constexpr (has_comb_neg<Op>(0)) return S::fnma(Op::template comb_neg<S>(xv, wv), L, n);
  else return S::fma(Op::template comb<S>(xv, wv), L, n);
}

// Rows per forward tile: the maxima and the sums of LR x NV vectors stay in registers.
constexpr int LR = 2;

// Below this bound (in base 2, relative to the lane's reference maximum) a term is below the
// sum's rounding; above kLseSlack the reference moves (2^64 per term leaves room for 2^60
// terms before a sum could overflow).
constexpr float kLseSlack = 64.0f;
// The one-pass forward's initial reference: below it, a tile takes the two-pass path.
constexpr float kLseInit = -1e30f;
// At or above this magnitude of the reference m (or of y, backward), m L loses up to half an
// ulp of itself when rounded (4 at 2^25, 256 at 3e9), and that part, 2^(m L - mL) in every
// term, would overflow (or underflow) the sum. Such a lane's exponents are (t - m) L
// instead (a subtraction and a product, exact enough at any magnitude: its terms are 2^0 at
// t = m), in the two-pass tile forward and in the backward's second loop.
constexpr float kLseBig = 0x1p24f;

// The two-pass tile, exact for every input (the fallback of lse_tile, which sends here any
// tile with a non-finite maximum or none above kLseInit): one pass for the maximum m of the
// terms (NaN if one is NaN), one for s = sum 2^(t L - mL); y = m + log(s) - bias ln2 where m is
// finite, else m itself (-inf: an all -inf window; +inf; NaN). No term overflows.
template <class Op>
void lse_tile_exact(const Ctx& c, const float* xb, const float* panel, float* yb, int64_t p,
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
  V m[LR][NV], s[LR][NV], nml[LR][NV], bias[LR][NV];
  for (int r = 0; r < LR; ++r)
    for (int v = 0; v < NV; ++v) m[r][v] = S::set1(-__builtin_inff());
  // Pass 1: the maximum, NaN once a term is NaN.
  sweep([&](int r, int v, S::M km, V term) {
    m[r][v] = S::select(km, MaxR::red_safe<S>(m[r][v], term), m[r][v]);
  });
  S::M big[LR][NV];  // lanes with |m| >= kLseBig: exponents (t - m) L, no bias
  for (int r = 0; r < LR; ++r)
    for (int v = 0; v < NV; ++v) {
      s[r][v] = S::zero();
      big[r][v] = S::ge(S::abs(m[r][v]), S::set1(kLseBig));
      const V nml_small = S::neg(lse_scaled<S>(m[r][v], &bias[r][v]));
      nml[r][v] = S::select(big[r][v], S::neg(m[r][v]), nml_small);
      bias[r][v] = S::select(big[r][v], S::zero(), bias[r][v]);
    }
  // Pass 2: the shifted sum, each term at most about 2^0 (lanes whose maximum is not finite
  // compute garbage here: their result is the maximum itself).
  const V L = S::set1(kLog2e);
  sweep([&](int r, int v, S::M km, V term) {
    const V u = S::select(big[r][v], S::mul(S::add(term, nml[r][v]), L),
                          S::fma(term, L, nml[r][v]));
    s[r][v] = S::madd(km, s[r][v], lse_exp2<S>(u));
  });
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  for (int r = 0; r < LR; ++r) {
    if (!live[r]) continue;
    alignas(64) float tmp[NR];
    for (int v = 0; v < NV; ++v) {
      const V lg = S::fnma(bias[r][v], S::set1(kLn2f), log_<S>(s[r][v]));
      const V y = S::add(m[r][v], lg);
      S::store(tmp + v * W, S::select(S::isfinite_m(m[r][v]), y, m[r][v]));
    }
    std::memcpy(yb + (p + r) * c.O + o0, tmp, sizeof(float) * nvalid);
  }
}

// One tile of LR output positions x NR output channels over the packed (K, NR) kernel block,
// in one pass: each lane keeps a reference m (a term of its window; kLseInit at first) and
// s = sum 2^(t L - mL). A term more than kLseSlack above the reference (in base 2) moves it,
// and s is rescaled: with data of any usual spread that happens once, at the first tap. NaN
// terms make s NaN (and so y). A lane whose reference is still kLseInit or not finite at the
// end (all -inf, +inf, NaN only, no term) sends the tile to lse_tile_exact.
template <class Op>
void lse_tile(const Ctx& c, const float* xb, const float* panel, float* yb, int64_t p,
              int64_t grp, int64_t jb) {
  using V = S::V;
  const TileRows<LR> rows(c, p);
  const int64_t I = c.I;
  const bool has_pad = c.g.has_pad != 0;
  V s[LR][NV], nml[LR][NV], m[LR][NV];
  for (int r = 0; r < LR; ++r)
    for (int v = 0; v < NV; ++v) {
      s[r][v] = S::zero();
      m[r][v] = S::set1(kLseInit);
      nml[r][v] = S::set1(-kLseInit * kLog2e);
    }
  const V L = S::set1(kLog2e), slack = S::set1(kLseSlack);
  // The largest magnitude a reference took (any lane): one that reached kLseBig left m L's
  // rounding in its terms (garbage in s, which a later rescale does not clear), and the tile
  // goes to the two-pass path. Kept where the reference moves, off the terms' loop, in one
  // vector (a flag there took a stack slot in the loop).
  V ref_mag = S::zero();
  for (int64_t t = 0; t < c.T; ++t) {
    const float* wt = panel + t * I * NR;
    for (int r = 0; r < LR; ++r) {
      const int32_t off = rows.live[r] ? c.tab[rows.osi[r] * c.T + t] : -1;
      if (off < 0 && !(has_pad && rows.live[r])) continue;  // not a term
      const float* xr = off < 0 ? c.padrow + grp * I : xb + rows.nimg[r] * c.img + off + grp * I;
      for (int64_t i = 0; i < I; ++i) {
        const V xv = S::set1(xr[i]);
        V u[NV];
        S::M up = S::mfalse();
        for (int v = 0; v < NV; ++v) {
          u[v] = lse_u<Op>(xv, S::load(wt + i * NR + v * W), L, nml[r][v]);
          up = S::mor(up, S::gt(u[v], slack));
        }
        if (__builtin_expect(S::any(up), 0)) {
          for (int v = 0; v < NV; ++v) {
            const V term = Op::template comb<S>(xv, S::load(wt + i * NR + v * W));
            m[r][v] = S::max(term, m[r][v]);  // a NaN term leaves m
            ref_mag = S::max(ref_mag, S::abs(m[r][v]));
            V unused;
            const V nml2 = S::neg(lse_scaled<S>(m[r][v], &unused));
            s[r][v] = S::mul(s[r][v], lse_exp2<S>(S::sub(nml2, nml[r][v])));
            nml[r][v] = nml2;
            u[v] = S::fma(term, L, nml2);
          }
        }
        for (int v = 0; v < NV; ++v) s[r][v] = S::add(s[r][v], lse_exp2<S>(u[v]));
      }
    }
  }
  const bool big_ref = S::any(S::ge(ref_mag, S::set1(kLseBig)));
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  // Only the output's lanes count (the block's columns beyond Og and dead rows do not).
  for (int r = 0; r < LR; ++r) {
    if (!rows.live[r]) continue;
    alignas(64) float mt[NR];
    for (int v = 0; v < NV; ++v) S::store(mt + v * W, m[r][v]);
    // (a reference of magnitude kLseBig or more: the two-pass tile, whose exponents there
    // carry no rounding of m L)
    bool bad = big_ref;
    for (int64_t l = 0; l < nvalid; ++l) bad |= !(mt[l] > kLseInit && mt[l] < __builtin_inff());
    if (bad) {
      lse_tile_exact<Op>(c, xb, panel, yb, p, grp, jb);
      return;
    }
  }
  for (int r = 0; r < LR; ++r) {
    if (!rows.live[r]) continue;
    alignas(64) float tmp[NR];
    for (int v = 0; v < NV; ++v) {
      V bias;
      lse_scaled<S>(m[r][v], &bias);
      const V lg = S::fnma(bias, S::set1(kLn2f), log_<S>(s[r][v]));
      S::store(tmp + v * W, S::add(m[r][v], lg));
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
// 2^-lost for |lost| <= 1 (the part of y L that yL = y L rounded lost, y finite and below
// kLseBig), in double: e^z at z = -lost ln2 by its Taylor polynomial of degree 11 (error
// below 5e-11 relative on |z| <= ln 2: exact for the float product it scales).
template <class D>  // double, or a vector of doubles
inline D lse_lost_factor(D lost) {
  constexpr double kInvFact[10] = {1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
                                   1.0 / 5040.0,    1.0 / 720.0,    1.0 / 120.0,
                                   1.0 / 24.0,      1.0 / 6.0,      0.5,
                                   1.0};  // 1 / k! for k = 10 .. 1
  const D z = lost * -0.6931471805599453;
  D f = z * (1.0 / 39916800.0);
  for (double k : kInvFact) f = (f + k) * z;
  return f + 1.0;
}

// Per output: the masked cotangent gm and -y L in ym (an all -inf window's g is 0 and its y
// 0), so that g e^(t - y) = gm 2^(t L + ym). yL is y L rounded; the factor it lost, 2^-(y L -
// yL), is in gm (1 where y is not finite), the product rounded once. Returns whether a finite
// y has magnitude kLseBig or more: its y L lost up to half an ulp of itself, and 2^(lost)
// overflows or underflows; then gm = g and ym = -y (the terms are g 2^((t - y) L), one
// operation more per term, only on such data).
inline bool lse_prepare(Ctx& c, float* gm, float* ym) {
  using V = S::V;
  using D = S::D;
  const jaxconv::Call& call = *c.call;
  const int64_t n_out = call.batch * c.y_bs;
  constexpr int64_t kChunk = 1 << 14;
  std::atomic<bool> big{false};
  auto mask = [&](int64_t it) {
    const int64_t a = it * kChunk, e = a + kChunk < n_out ? a + kChunk : n_out;
    const V L = S::set1(kLog2e), inf = S::set1(__builtin_inff());
    S::M huge = S::mfalse();
    int64_t j = a;
    for (; j + W <= e; j += W) {
      const V y = S::load(call.y + j), g = S::load(call.g + j);
      const V yl = S::mul(y, L);
      D yd[S::ND], yld[S::ND], gd[S::ND];
      S::to_d(y, yd);
      S::to_d(yl, yld);
      S::to_d(g, gd);
      // y L - yL is exact in double (a product of two floats, less its rounding: a float).
      for (int i = 0; i < S::ND; ++i)
        gd[i] = gd[i] * lse_lost_factor<D>(yd[i] * double(kLog2e) - yld[i]);
      const S::M empty = S::eq(y, S::neg(inf)), finite = S::lt(S::abs(y), inf);
      huge = S::mor(huge, S::mand(finite, S::ge(S::abs(y), S::set1(kLseBig))));
      S::store(gm + j, S::select(empty, S::zero(), S::select(finite, S::from_d(gd), g)));
      S::store(ym + j, S::select(empty, S::zero(), S::neg(yl)));
    }
    bool any = S::any(huge);
    for (; j < e; ++j) {
      const float y = call.y[j];
      const bool empty = y == -__builtin_inff();
      const float yl = y * kLog2e;
      const bool finite = __builtin_fabsf(y) < __builtin_inff();
      any |= finite && __builtin_fabsf(y) >= kLseBig;
      const double f = lse_lost_factor<double>(double(y) * double(kLog2e) - double(yl));
      gm[j] = empty ? 0.0f : finite ? float(call.g[j] * f) : call.g[j];
      ym[j] = empty ? 0.0f : -yl;
    }
    if (any) big.store(true, std::memory_order_relaxed);
  };
  parallel(c, (n_out + kChunk - 1) / kChunk, mask);
  if (!big.load()) return false;
  for (int64_t j = 0; j < n_out; ++j) {
    const bool empty = call.y[j] == -__builtin_inff();
    gm[j] = empty ? 0.0f : call.g[j];
    ym[j] = empty ? 0.0f : -call.y[j];
  }
  return true;
}

#include "kernel_lsebwd_ivec.h"  // the loop for input channels in whole vectors

template <class Op>
void lse_backward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const int64_t n_out = call.batch * c.y_bs;
  // Per output: the masked cotangent and -y L (lse_prepare).
  float* gm = c.scratch.get<float>(n_out);
  float* ym = c.scratch.get<float>(n_out);
  if (!gm || !ym) {
    c.failed = true;
    return;
  }
  const bool big = lse_prepare(c, gm, ym);
  // Input channels in whole vectors: the loop with vectors over them (kernel_lsebwd_ivec.h).
  if (big ? lse_backward_ivec<Op, true>(c, gm, ym) : lse_backward_ivec<Op, false>(c, gm, ym))
    return;
  // Both gradients in one pass over the terms (each exp once): an item owns a block of kIB
  // input channels of one group and batch entry, so it alone writes their dx (every cell)
  // and their dw rows (every tap and output channel, summed in L1 scratch), and loops over
  // all positions and taps. The block's size leaves at least 8 items where I allows.
  int64_t kIB = 16;
  while (kIB > 1 && call.batch * c.G * ((I + kIB - 1) / kIB) < 8) kIB /= 2;
  const int64_t nib = (I + kIB - 1) / kIB;
  const bool want_dx = (call.parts & 1) != 0, want_dw = (call.parts & 2) != 0;
  std::atomic<bool> failed{false};
  auto item_for = [&](auto unscaled) { return [&, unscaled](int64_t it) {
    constexpr bool kUnscaled = decltype(unscaled)::value;
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
          const S::V xs = S::set1(xv), L = S::set1(kLog2e);
          S::V acc = S::zero();
          int64_t o = 0;
          for (; o + W <= Og; o += W) {
            const S::V wv = S::load(wr + o);
            S::V u;
            if constexpr (kUnscaled)
              u = S::mul(S::add(Op::template comb<S>(xs, wv), S::load(yy + o)), L);
            else
              u = lse_u<Op>(xs, wv, L, S::load(yy + o));
            const S::V e = lse_exp2z<S>(u);
            const S::V h = S::mul(S::load(gg + o), e);
            acc = S::fma(h, Op::template dcx<S>(xs, wv), acc);
            S::store(dwr + o, S::fma(h, Op::template dcw<S>(xs, wv), S::load(dwr + o)));
          }
          float sum = S::hsum(acc);
          for (; o < Og; ++o) {
            const float tv = Op::template comb<Sc>(xv, wr[o]);
            const float e = lse_exp2z<Sc>(kUnscaled ? (tv + yy[o]) * kLog2e
                                                    : Sc::fma(tv, kLog2e, yy[o]));
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
  }; };
  if (big) {
    auto item = item_for(std::true_type{});
    parallel(c, call.batch * c.G * nib, item);
  } else {
    auto item = item_for(std::false_type{});
    parallel(c, call.batch * c.G * nib, item);
  }
  if (failed.load()) c.failed = true;
}

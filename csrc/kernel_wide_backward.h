// The wide kernels' backward: the input and kernel gradients of the built-in ops whose forward
// kernel_wide.h computes (float64). The max/min ops on bfloat16 / float16 operands (float32
// copies, each product rounded to the operands' dtype before the winner compare, as the XLA
// engine computes it), built-in and user (csrc/userop_wide.h), run kernel_wide_lowwin.h's
// interval scan, which routes the gradients as the rescan below does; run_wide_backward
// dispatches the built-in ops.
//
// Max / min ops: each window's winners are the products equal to the forward's y, compared
// exactly as the forward computed them (the same comb, so NaN matches nothing and -0 == +0);
// the cotangent is split equally among them and goes through the combine's derivative (1 for
// x + w; 1, or 1/2 at x == w, for min(x, w) / max(x, w)), as the XLA engine's rule does. Sums:
// the op's gradient rule per term (AdderNet's for adder, the exact subgradient for l1, exact
// for l2), padded cells holding the pad value counting for the kernel gradient only.
//
// Two passes, each item owning what it writes (no atomics; the result does not depend on the
// thread count): pass 1, per run of whole images and group, counts each output's winners in a
// vector scan of MR positions x NB output channels (the forward's tile), keeping the last
// matching kernel row, stores the per-output scale (g / count, or g for a sum) and routes the
// input gradient; pass 2, per group and block of NB output channels, routes the kernel
// gradient into a (K, NB) accumulator. The split is per output: one with a single winner
// routes it directly (one term, as an argmax backward); a tied one rescans its own window
// in kernel-row order, stopping at its last winner (one tie does not cost its whole tile a
// rescan); every sum rescans the tile.
//
// Included by wide_<isa>.cc after kernel_wide.h (same namespace, same vector width).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "kernel_wide.h"

namespace JAXCONV_WIDE_NS {

// The combine's derivatives (Comb as in WideOp) and the sums' rules, per op id: the gradient
// rule (Gr) of the built-in ops; a user op's is userop_wide.h's WideUserGrad.
template <int Id>
struct WideGrad {
  template <class E>
  static VecOf<E> dx(VecOf<E> x, VecOf<E> w) {
    using V = VecOf<E>;
    const V one = splat<E>(E(1)), zero = {};
    if constexpr (Id == jaxconv::kMaxPlus || Id == jaxconv::kMinPlus) {
      return one;
    } else if constexpr (Id == jaxconv::kMaxMin) {  // min(x, w): 1 where x wins, 1/2 at a tie
      return x < w ? one : (x == w ? splat<E>(E(0.5)) : zero);
    } else if constexpr (Id == jaxconv::kMinMax) {  // max(x, w)
      return x > w ? one : (x == w ? splat<E>(E(0.5)) : zero);
    } else if constexpr (Id == jaxconv::kAdder) {  // clip(w - x, -1, 1), NaN stays NaN
      const V d = w - x;
      return d > one ? one : (d < -one ? -one : d);
    } else if constexpr (Id == jaxconv::kL1) {
      // sign(w - x), 0 at x == w and where w - x is NaN: l1's combine is written with max and
      // min of x - w and 0, whose derivatives are 0 at a NaN (as on the XLA engine).
      const V d = w - x;
      return d > zero ? one : (d < zero ? -one : zero);
    } else {  // l2: -2 (x - w)
      return splat<E>(E(-2)) * (x - w);
    }
  }
  template <class E>
  static VecOf<E> dw(VecOf<E> x, VecOf<E> w) {
    if constexpr (Id == jaxconv::kAdder) return x - w;
    else if constexpr (Id == jaxconv::kL2) return splat<E>(E(2)) * (x - w);
    else return dx<E>(w, x);  // symmetric in (x, w)
  }
};

// Pass 1's items (this backward's and kernel_wide_lowwin.h's): runs of whole images, at
// least 32 output positions each, per group (groups fastest). An item owns the input gradient
// of its images in its group's channels (no atomics; the result does not depend on the thread
// count) and zeroes it first (zero_dx_images).
struct ImageRuns {
  int64_t ipi = 0;   // images per run
  int64_t runs = 0;  // runs per batch element
  ImageRuns() = default;
  ImageRuns(const Geom& g, int64_t P)
      : ipi(P >= 32 ? 1 : (32 + P - 1) / P), runs((g.n + ipi - 1) / ipi) {}
  int64_t items(const Geom& g) const { return runs * g.g; }
  // Item `item`'s group and images [n0, n1).
  void at(const Geom& g, int64_t item, int64_t& grp, int64_t& n0, int64_t& n1) const {
    grp = item % g.g;
    n0 = item / g.g * ipi;
    n1 = std::min(n0 + ipi, g.n);
  }
  // The item that owns image n's outputs in group grp.
  int64_t owner(const Geom& g, int64_t n, int64_t grp) const { return n / ipi * g.g + grp; }
};

template <class E>
struct BPlan {
  Plan<E> f;        // the forward's plan (geometry, packed kernel, pad row)
  const E* y;       // forward output
  const E* gy;      // its cotangent
  E* scale;         // per output: g / count (max / min) or g (sums)
  int64_t* code;    // max / min, per output: its one winner's kernel row, -2 (none), or
                    // -1 - count (a tie of count >= 2 winners)
  E* dx;
  E* dw;
  ImageRuns runs;     // pass 1's items
  bool plain;
};

// The zeroing rule of WideCall::zero_dx / zero_dw (problem.h's Call): pass 1's items add into
// the input gradient of their own images' group channels, so each zeroes that part first;
// pass 2 writes every entry of dw (its blocks' columns, every kernel row), so dw is zeroed
// only where no pass runs.

// The input gradient dxb (one batch element's) of images [n0, n1), group grp's channels
// (a pass-1 item's, ImageRuns), zeroed where the caller left that to the kernel.
template <class E>
inline void zero_dx_images(const WideCall& call, const Geom& g, E* dxb, int64_t n0, int64_t n1,
                           int64_t grp) {
  if (!call.zero_dx) return;
  const int64_t cells = g.sp[0] * g.sp[1] * g.sp[2];
  if (g.g == 1) {
    std::memset(dxb + n0 * cells * g.c, 0, sizeof(E) * size_t((n1 - n0) * cells * g.c));
    return;
  }
  for (int64_t q = n0 * cells; q < n1 * cells; ++q)
    std::memset(dxb + q * g.c + grp * g.i, 0, sizeof(E) * size_t(g.i));
}

// Whether the problem has no term (no output, kernel or channel: no pass runs); its
// gradients are then zero, zeroed here where the caller left that to the kernel.
template <class E>
inline bool no_terms(const WideCall& call, const Plan<E>& pl) {
  const Geom& g = *pl.g;
  if (pl.R != 0 && g.o != 0 && pl.K != 0 && g.i != 0) return false;
  if (call.zero_dx) std::memset(call.out, 0, sizeof(E) * size_t(call.batch * pl.xs));
  if (call.zero_dw) std::memset(call.out2, 0, sizeof(E) * size_t(call.batch * pl.K * g.o));
  return true;
}

template <class E>
inline E hsum(VecOf<E> v) {
  constexpr int L = Vt<E>::L;
  alignas(64) E a[L];
  std::memcpy(a, &v, sizeof(v));
  E s = a[0];
  for (int l = 1; l < L; ++l) s += a[l];
  return s;
}

// One tile's y and scale (or g) rows, NB columns from o0; lanes past the block's columns get
// a y that matches no product (NaN) and a zero scale.
template <class E>
inline void load_rows(const E* src, const BPlan<E>& bp, int64_t r0, int nm, int64_t col0,
                      int64_t cols, E tail, VecOf<E> (&out)[kMR][kNV]) {
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  const int64_t O = bp.f.g->o;
  for (int m = 0; m < kMR; ++m) {
    alignas(64) E t[NB];
    for (int l = 0; l < NB; ++l)
      t[l] = m < nm && l < cols ? src[(r0 + m) * O + col0 + l] : tail;
    for (int v = 0; v < kNV; ++v) std::memcpy(&out[m][v], t + v * L, sizeof(VecOf<E>));
  }
}

// The input rows of a tile's nm live output rows (from r0) at tap t, this group's channels:
// xr[m] (the pad row for a padded tap) and whether the row takes part (on[m]: live, and not
// a padded tap when there is no pad value).
template <class E>
inline void tile_rows(const Plan<E>& pl, const E* xb, int64_t r0, int nm, int64_t t,
                      int64_t grp, const E* xr[kMR], bool on[kMR]) {
  const Geom& g = *pl.g;
  for (int m = 0; m < kMR; ++m) {
    const E* p = m < nm ? row_at(pl, xb, r0 + m, t) : nullptr;
    on[m] = m < nm && (p || g.has_pad);
    xr[m] = p ? p + grp * g.i : pl.fill;
  }
}

// A tied output's winners (row r of batch element b's image, column l of the block whose
// panel is given), found again by one exact scan of its own window in kernel-row order: f(k,
// p, i, x, w) for each of its n winners, p the input row (nullptr for a padded tap).
template <class E, class Op, bool Exact, class F>
inline void each_winner(const Plan<E>& pl, const E* xb, const E* panel, int64_t r,
                        int64_t grp, int64_t l, E y, int64_t n, F&& f) {
  const VecOf<E> yv = splat<E>(y);
  constexpr int NB = kNV * Vt<E>::L;
  const Geom& g = *pl.g;
  for (int64_t t = 0; t < pl.T; ++t) {
    const E* p = row_at(pl, xb, r, t);
    if (!p && !g.has_pad) continue;
    const E* xr = p ? p + grp * g.i : pl.fill;
    const E* wp = panel + t * g.i * NB + l;
    for (int64_t i = 0; i < g.i; ++i) {
      const E xs = xr[i], ws = wp[i * NB];
      if (!(Op::template comb<E, Exact>(splat<E>(xs), splat<E>(ws)) == yv)[0]) continue;
      f(t * g.i + i, p, grp * g.i + i, xs, ws);
      if (--n == 0) return;
    }
  }
}

// Pass 1 on one tile (rows r0 .. r0 + nm of batch element b, one group, one block).
template <class E, class Op, class Gr, bool Win, bool Exact>
void dx_tile(const BPlan<E>& bp, int64_t b, int64_t grp, int64_t blk, int64_t r0, int nm) {
  using V = VecOf<E>;
  using I = typename Bits<E>::I;
  typedef I VI __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  const Plan<E>& pl = bp.f;
  const Geom& g = *pl.g;
  const E* xb = pl.x + b * pl.xs;
  E* dxb = bp.dx + b * pl.xs;
  const E* panel = pl.panels + (grp * pl.blocks + blk) * pl.K * NB;
  const int64_t o0 = blk * NB, col0 = grp * pl.og + o0;
  const int64_t cols = pl.og - o0 < NB ? pl.og - o0 : NB;
  const E nan = std::numeric_limits<E>::quiet_NaN();
  V yv[kMR][kNV], sv[kMR][kNV], live[kNV];
  {
    alignas(64) E t[NB];
    for (int l = 0; l < NB; ++l) t[l] = l < cols ? E(1) : E(0);
    for (int v = 0; v < kNV; ++v) std::memcpy(&live[v], t + v * L, sizeof(V));
  }
  load_rows<E>(bp.gy + b * pl.ys, bp, r0, nm, col0, cols, E(0), sv);
  if constexpr (Win) {
    load_rows<E>(bp.y + b * pl.ys, bp, r0, nm, col0, cols, nan, yv);
    VI cnt[kMR][kNV] = {}, idx[kMR][kNV] = {};
    for (int64_t t = 0; t < pl.T; ++t) {
      const E* xr[kMR];
      bool on[kMR];
      tile_rows(pl, xb, r0, nm, t, grp, xr, on);
      const E* wp = panel + t * g.i * NB;
      for (int64_t i = 0; i < g.i; ++i, wp += NB) {
        V wv[kNV];
        for (int v = 0; v < kNV; ++v) std::memcpy(&wv[v], wp + v * L, sizeof(V));
        const VI kv = splat<I>(I(t * g.i + i));
        for (int m = 0; m < kMR; ++m) {
          if (!on[m]) continue;
          const V xv = splat<E>(xr[m][i]);
          for (int v = 0; v < kNV; ++v) {
            const VI e = (VI)(Op::template comb<E, Exact>(xv, wv[v]) == yv[m][v]);
            cnt[m][v] -= e;
            idx[m][v] = e ? kv : idx[m][v];  // the last matching row
          }
        }
      }
    }
    const V zero = {};
    for (int m = 0; m < kMR; ++m)
      for (int v = 0; v < kNV; ++v) {
        const V c = __builtin_convertvector(cnt[m][v], V);
        sv[m][v] = c > zero ? sv[m][v] / c : zero;
      }
    // Each output's code and scale; a one-winner output routes its one term (as an argmax
    // backward), a tied one rescans its own window only.
    const E* yb = bp.y + b * pl.ys;
    for (int m = 0; m < nm; ++m) {
      alignas(64) I cn[NB], ix[NB];
      alignas(64) E sc[NB];
      for (int v = 0; v < kNV; ++v) {
        std::memcpy(cn + v * L, &cnt[m][v], sizeof(VI));
        std::memcpy(ix + v * L, &idx[m][v], sizeof(VI));
        std::memcpy(sc + v * L, &sv[m][v], sizeof(V));
      }
      const int64_t at0 = b * pl.ys + (r0 + m) * g.o + col0;
      int64_t* cr = bp.code + at0;
      std::memcpy(bp.scale + at0, sc, sizeof(E) * size_t(cols));
      for (int64_t l = 0; l < cols; ++l) {
        cr[l] = cn[l] == 0 ? -2 : cn[l] == 1 ? int64_t(ix[l]) : -1 - int64_t(cn[l]);
        const int64_t k = cr[l];
        if (k >= 0) {
          const E* p = row_at(pl, xb, r0 + m, k / g.i);
          if (!p) continue;  // a winner in the padding: no input gradient
          const int64_t at = (p - xb) + grp * g.i + k % g.i;
          const E ws = panel[k * NB + l];
          dxb[at] += sc[l] * Gr::template dx<E>(splat<E>(xb[at]), splat<E>(ws))[0];
        } else if (k < -2) {
          each_winner<E, Op, Exact>(pl, xb, panel, r0 + m, grp, l, yb[(r0 + m) * g.o +
              col0 + l], -1 - k, [&](int64_t, const E* p, int64_t i, E xs, E ws) {
            if (p) dxb[(p - xb) + i] += sc[l] * Gr::template dx<E>(
                splat<E>(xs), splat<E>(ws))[0];
          });
        }
      }
    }
    return;
  }
  for (int m = 0; m < nm; ++m) {
    alignas(64) E t[NB];
    for (int v = 0; v < kNV; ++v) std::memcpy(t + v * L, &sv[m][v], sizeof(V));
    std::memcpy(bp.scale + b * pl.ys + (r0 + m) * g.o + col0, t, sizeof(E) * size_t(cols));
  }
  for (int64_t t = 0; t < pl.T; ++t) {
    const E* xr[kMR];
    for (int m = 0; m < kMR; ++m) {
      const E* p = m < nm ? row_at(pl, xb, r0 + m, t) : nullptr;
      xr[m] = p ? p + grp * g.i : nullptr;  // a padded cell has no input gradient
    }
    const E* wp = panel + t * g.i * NB;
    for (int64_t i = 0; i < g.i; ++i, wp += NB) {
      V wv[kNV];
      for (int v = 0; v < kNV; ++v) std::memcpy(&wv[v], wp + v * L, sizeof(V));
      for (int m = 0; m < kMR; ++m) {
        if (!xr[m]) continue;
        const V xv = splat<E>(xr[m][i]);
        V a = {};
        for (int v = 0; v < kNV; ++v) {
          const V d = sv[m][v] * Gr::template dx<E>(xv, wv[v]);
          const V zero = {};
          a += live[v] != zero ? d : zero;  // zero-padded columns: their rule may be NaN
        }
        dxb[(xr[m] - xb) + i] += hsum<E>(a);
      }
    }
  }
}

// Pass 2: the kernel gradient of one group's block of NB output channels, every position.
template <class E, class Op, class Gr, bool Win, bool Exact>
void dw_block(const BPlan<E>& bp, int64_t b, int64_t grp, int64_t blk, E* acc) {
  using V = VecOf<E>;
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  const Plan<E>& pl = bp.f;
  const Geom& g = *pl.g;
  const E* xb = pl.x + b * pl.xs;
  const E* panel = pl.panels + (grp * pl.blocks + blk) * pl.K * NB;
  const int64_t o0 = blk * NB, col0 = grp * pl.og + o0;
  const int64_t cols = pl.og - o0 < NB ? pl.og - o0 : NB;
  std::memset(acc, 0, sizeof(E) * size_t(pl.K * NB));
  V sv[kMR][kNV];
  for (int64_t r0 = 0; r0 < pl.R; r0 += kMR) {
    const int nm = int(pl.R - r0 < kMR ? pl.R - r0 : kMR);
    if constexpr (Win) {  // each output's one winner, or its own rescan where it ties
      for (int m = 0; m < nm; ++m) {
        const int64_t at0 = b * pl.ys + (r0 + m) * g.o + col0;
        const int64_t* cr = bp.code + at0;
        const E* sr = bp.scale + at0;
        for (int64_t l = 0; l < cols; ++l) {
          const int64_t k = cr[l];
          if (k >= 0) {
            const int64_t i = k % g.i;
            const E* p = row_at(pl, xb, r0 + m, k / g.i);
            const E xs = p ? p[grp * g.i + i] : pl.fill[i];
            const E ws = panel[k * NB + l];
            acc[k * NB + l] +=
                sr[l] * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
          } else if (k < -2) {
            each_winner<E, Op, Exact>(pl, xb, panel, r0 + m, grp, l, bp.y[at0 + l], -1 - k,
                [&](int64_t kk, const E*, int64_t, E xs, E ws) {
              acc[kk * NB + l] +=
                  sr[l] * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
            });
          }
        }
      }
      continue;
    }
    load_rows<E>(bp.scale + b * pl.ys, bp, r0, nm, col0, cols, E(0), sv);
    for (int64_t t = 0; t < pl.T; ++t) {
      const E* xr[kMR];
      bool on[kMR];
      tile_rows(pl, xb, r0, nm, t, grp, xr, on);
      const E* wp = panel + t * g.i * NB;
      E* ap = acc + t * g.i * NB;
      for (int64_t i = 0; i < g.i; ++i, wp += NB, ap += NB) {
        V wv[kNV], a[kNV];
        for (int v = 0; v < kNV; ++v) {
          std::memcpy(&wv[v], wp + v * L, sizeof(V));
          std::memcpy(&a[v], ap + v * L, sizeof(V));
        }
        for (int m = 0; m < kMR; ++m) {
          if (!on[m]) continue;
          const V xv = splat<E>(xr[m][i]);
          for (int v = 0; v < kNV; ++v) {
            // lanes past the block are never written out
            a[v] += sv[m][v] * Gr::template dw<E>(xv, wv[v]);
          }
        }
        for (int v = 0; v < kNV; ++v) std::memcpy(ap + v * L, &a[v], sizeof(V));
      }
    }
  }
  E* dwb = bp.dw + b * pl.K * g.o;
  for (int64_t k = 0; k < pl.K; ++k)
    std::memcpy(dwb + k * g.o + col0, acc + k * NB, sizeof(E) * size_t(cols));
}

template <class E, class Op, class Gr>
int backward_typed(const WideCall& call) {
  constexpr bool Win = !Op::kSum;
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  const Geom& g = call.geom;
  BPlan<E> bp;
  bp.f = make_plan<E>(call, static_cast<E*>(nullptr));
  Plan<E>& pl = bp.f;
  bp.y = static_cast<const E*>(call.y);
  bp.gy = static_cast<const E*>(call.g);
  bp.dx = static_cast<E*>(call.out);
  bp.dw = static_cast<E*>(call.out2);
  if (no_terms<E>(call, pl)) return 0;
  bp.runs = ImageRuns(g, pl.P);
  const int64_t wsize = pl.K * g.o;
  std::vector<E> panels, scale;
  std::vector<int64_t> code;
  try {
    panels.assign(size_t(g.g * pl.blocks * pl.K * NB), E(0));
    scale.assign(size_t(pl.ys), E(0));
    if (Win) code.assign(size_t(pl.ys), -2);
  } catch (...) {
    return 2;
  }
  pl.panels = panels.data();
  bp.scale = scale.data();
  bp.code = code.data();
  std::vector<E> fill(size_t(g.i), g.has_pad ? pl.pad : E(0));
  pl.fill = fill.data();
  const E* w = static_cast<const E*>(call.w);
  for (int64_t b = 0; b < call.batch; ++b) {
    const E* wb = w + b * wsize;
    pack_panels(pl, wb, panels.data());
    bp.plain = plain_ok<E, Op::kComb, Op::kSum>(pl.x + b * pl.xs, pl.xs, wb, wsize, g, pl.pad);
    struct Job {
      const BPlan<E>* bp;
      int64_t b;
      const WideCall* call;
    } job{&bp, b, &call};
    auto pass1 = [](void* arg, int64_t item) {
      const Job& j = *static_cast<const Job*>(arg);
      const BPlan<E>& p = *j.bp;
      const Plan<E>& f = p.f;
      int64_t grp, n0, n1;
      p.runs.at(*f.g, item, grp, n0, n1);
      const int64_t rend = n1 * f.P;
      zero_dx_images<E>(*j.call, *f.g, p.dx + j.b * f.xs, n0, n1, grp);
      for (int64_t blk = 0; blk < f.blocks; ++blk)
        for (int64_t r0 = n0 * f.P; r0 < rend; r0 += kMR) {
          const int nm = int(rend - r0 < kMR ? rend - r0 : kMR);
          if (p.plain) dx_tile<E, Op, Gr, Win, false>(p, j.b, grp, blk, r0, nm);
          else dx_tile<E, Op, Gr, Win, true>(p, j.b, grp, blk, r0, nm);
        }
    };
    call.par.run(call.par.ctx, bp.runs.items(g), pass1, &job);
    auto pass2 = [](void* arg, int64_t item) {
      const Job& j = *static_cast<const Job*>(arg);
      const BPlan<E>& p = *j.bp;
      const int64_t blk = item % p.f.blocks, grp = item / p.f.blocks;
      std::vector<E> acc(size_t(p.f.K * NB));
      if (p.plain) dw_block<E, Op, Gr, Win, false>(p, j.b, grp, blk, acc.data());
      else dw_block<E, Op, Gr, Win, true>(p, j.b, grp, blk, acc.data());
    };
    call.par.run(call.par.ctx, g.g * pl.blocks, pass2, &job);
  }
  return 0;
}

// The max/min ops' backward on float32 copies of bfloat16 / float16 operands: the interval
// scan of kernel_wide_lowwin.h (included below). skip0: the recorded scan skips the outputs
// whose cotangent is zero where Gr's partials are finite (kernel_lowrec_backward.h's
// FiniteRule; low_io_backward checks the result).
template <class Op, class Gr, bool Max, int Rnd>
int low_win_backward(const WideCall& call, bool skip0 = false);

// The same, its operands and gradients in the low dtype (kernel_lowrec_backward.h).
template <class Op, class Gr, bool Max, int Rnd>
int low_io_backward(const WideCall& call);

template <class Op, class Gr, bool Max, int Rnd>
int low_any_backward(const WideCall& call) {
  return call.low_x ? low_io_backward<Op, Gr, Max, Rnd>(call)
                    : low_win_backward<Op, Gr, Max, Rnd>(call);
}

template <int Rnd>
int low_backward(const WideCall& call) {
  switch (call.op) {
    case jaxconv::kMaxPlus:
      return low_any_backward<WideOp<0, 0>, WideGrad<jaxconv::kMaxPlus>, true, Rnd>(call);
    case jaxconv::kMinPlus:
      return low_any_backward<WideOp<0, 1>, WideGrad<jaxconv::kMinPlus>, false, Rnd>(call);
    case jaxconv::kMaxMin:
      return low_any_backward<WideOp<1, 0>, WideGrad<jaxconv::kMaxMin>, true, Rnd>(call);
    case jaxconv::kMinMax:
      return low_any_backward<WideOp<2, 1>, WideGrad<jaxconv::kMinMax>, false, Rnd>(call);
    default: return 1;
  }
}

// The backward of the wide kernels: float64, and the low-precision max/min ops (integer
// operands have no gradient).
inline int run_wide_backward(const WideCall& call) {
  if (call.type == jaxconv::kWideF32) {
    if (call.round == jaxconv::kRoundBF16) return low_backward<jaxconv::kRoundBF16>(call);
    if (call.round == jaxconv::kRoundF16) return low_backward<jaxconv::kRoundF16>(call);
    return 1;
  }
  if (call.type != jaxconv::kWideF64) return 1;
  using E = double;
  switch (call.op) {
    case jaxconv::kMaxPlus: return backward_typed<E, WideOp<0, 0>, WideGrad<jaxconv::kMaxPlus>>(call);
    case jaxconv::kMinPlus: return backward_typed<E, WideOp<0, 1>, WideGrad<jaxconv::kMinPlus>>(call);
    case jaxconv::kMaxMin: return backward_typed<E, WideOp<1, 0>, WideGrad<jaxconv::kMaxMin>>(call);
    case jaxconv::kMinMax: return backward_typed<E, WideOp<2, 1>, WideGrad<jaxconv::kMinMax>>(call);
    case jaxconv::kAdder: return backward_typed<E, WideOp<3, 2>, WideGrad<jaxconv::kAdder>>(call);
    case jaxconv::kL1: return backward_typed<E, WideOp<3, 2>, WideGrad<jaxconv::kL1>>(call);
    case jaxconv::kL2: return backward_typed<E, WideOp<4, 2>, WideGrad<jaxconv::kL2>>(call);
    default: return 1;
  }
}

}  // namespace JAXCONV_WIDE_NS

#include "kernel_wide_lowwin.h"

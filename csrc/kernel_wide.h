// The wide kernels: the built-in ops (max_plus, min_plus, max_min, min_max, and the sums
// adder, l1, l2_exact) on float64, int32 and int64 operands, forward only. One small register-tiled implicit GEMM
// over GCC vector types (the instruction set's width, set by the including file), one
// template over the element type and the op.
//
// Tiling: MR output positions x NV vectors of output channels held in registers; the kernel
// is packed once per call into panels of NB = NV * L columns, zero-padded at the tail.
// Floats follow lax.max / lax.min exactly (NaN in, NaN out; -0 below +0): a call whose
// operands hold no NaN, no infinity and no -0 where it could decide a tie takes the plain
// compare-select loop, which then gives the same bits; any other call takes the exact loop.
// Integers: every add, subtract and multiply wraps (two's complement), as XLA's. Float sums
// add the terms in channel order (the XLA engine's order may differ: within rounding).
//
// Included by wide_<isa>.cc inside namespace JAXCONV_WIDE_NS with JAXCONV_WIDE_BYTES set.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "wide.h"

namespace JAXCONV_WIDE_NS {

using jaxconv::Geom;
using jaxconv::WideCall;

template <class E>
struct Vt {
  typedef E V __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
  static constexpr int L = JAXCONV_WIDE_BYTES / sizeof(E);
};

template <class E> using VecOf = typename Vt<E>::V;

// A broadcast: scalar + vector widens the scalar, and adding -0 is the identity on every
// float (so the compiler folds it away); +0 for integers.
template <class E>
inline VecOf<E> splat(E s) {
  const VecOf<E> zero = {};
  if constexpr (std::is_floating_point_v<E>) return s + (-zero);
  else return s + zero;
}

// Same-width integer vector of a float vector, for bit operations.
template <class E> struct Bits { using I = E; };
template <> struct Bits<double> { using I = int64_t; };
template <> struct Bits<float> { using I = int32_t; };

// max / min: `Exact` follows lax for floats (NaN wins, -0 < +0); the plain form is a
// compare-select, equal to it on operands without NaN and without a deciding -0.
template <class E, bool Exact, bool Max>
inline VecOf<E> pick(VecOf<E> a, VecOf<E> b) {
  using V = VecOf<E>;
  V r = Max ? (a > b ? a : b) : (a < b ? a : b);
  if constexpr (Exact && std::is_floating_point_v<E>) {
    using I = typename Bits<E>::I;
    typedef I VI __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    const VI ai = (VI)a, bi = (VI)b;  // a vector cast keeps the bits
    const VI tie = Max ? (ai & bi) : (ai | bi);  // +0 & -0 = +0, +0 | -0 = -0
    r = a == b ? (V)tie : r;
    r = b != b ? b : r;
    r = a != a ? a : r;
  }
  return r;
}

template <class E>
inline VecOf<E> add(VecOf<E> a, VecOf<E> b) {
  if constexpr (std::is_integral_v<E>) {
    using U = std::make_unsigned_t<E>;
    typedef U VU __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    return (VecOf<E>)((VU)a + (VU)b);  // wraps
  } else {
#if defined(__AVX512F__)
    // a * 1 + b rounds as a + b: issued on the FMA ports, leaving the add ports (which run
    // max / min) to the reduce, as the float32 kernels do.
    if constexpr (sizeof(VecOf<E>) == 64 && std::is_same_v<E, double>)
      return _mm512_fmadd_pd(a, _mm512_set1_pd(1.0), b);
#endif
#if defined(__FMA__)
    if constexpr (sizeof(VecOf<E>) == 32 && std::is_same_v<E, double>)
      return _mm256_fmadd_pd(a, _mm256_set1_pd(1.0), b);
#endif
    return a + b;
  }
}

template <class E>
inline VecOf<E> sub(VecOf<E> a, VecOf<E> b) {
  if constexpr (std::is_integral_v<E>) {
    typedef std::make_unsigned_t<E> VU __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    return (VecOf<E>)((VU)a - (VU)b);  // wraps
  } else {
    return a - b;
  }
}

template <class E>
inline VecOf<E> neg_square(VecOf<E> d) {
  if constexpr (std::is_integral_v<E>) {
    typedef std::make_unsigned_t<E> VU __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    return (VecOf<E>)((VU){} - (VU)d * (VU)d);  // wraps
  } else {
    return -(d * d);
  }
}

template <class E>
inline VecOf<E> neg_abs(VecOf<E> d) {
  if constexpr (std::is_integral_v<E>) {
    typedef std::make_unsigned_t<E> VU __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    const VecOf<E> zero = {};
    const VecOf<E> neg = (VecOf<E>)((VU){} - (VU)d);  // wraps: -iinfo.min is iinfo.min
    return d < zero ? d : neg;
  } else {
    using I = typename Bits<E>::I;
    typedef I VI __attribute__((vector_size(JAXCONV_WIDE_BYTES)));
    const VI sign = (VI)(-VecOf<E>{});  // -0: the sign bit
    return (VecOf<E>)((VI)d | sign);    // -|d|, NaN stays NaN
  }
}

// The ops. Comb: 0 x + w, 1 min(x, w), 2 max(x, w), 3 -|x - w|, 4 -(x - w)^2.
// Red: 0 max, 1 min, 2 sum (an integer sum wraps).
template <int Comb, int Red>
struct WideOp {
  static constexpr int kComb = Comb;
  static constexpr bool kSum = Red == 2;
  template <class E, bool Exact>
  static VecOf<E> comb(VecOf<E> x, VecOf<E> w) {
    if constexpr (Comb == 0) return add<E>(x, w);
    else if constexpr (Comb == 3) return neg_abs<E>(sub<E>(x, w));
    else if constexpr (Comb == 4) return neg_square<E>(sub<E>(x, w));
    else return pick<E, Exact, Comb == 2>(x, w);
  }
  template <class E, bool Exact>
  static VecOf<E> red(VecOf<E> acc, VecOf<E> t) {
    if constexpr (Red == 2) {
      if constexpr (std::is_integral_v<E>) return add<E>(acc, t);
      else return acc + t;  // the add ports: the terms' subtractions are on them too
    } else {
      return pick<E, Exact, Red == 0>(acc, t);
    }
  }
  template <class E> static E ident() {
    if constexpr (Red == 2)
      return E(0);
    else if constexpr (std::is_floating_point_v<E>)
      return Red == 0 ? -std::numeric_limits<E>::infinity()
                      : std::numeric_limits<E>::infinity();
    else
      return Red == 0 ? std::numeric_limits<E>::min() : std::numeric_limits<E>::max();
  }
};

// Accumulators in registers: 24 of AVX-512's 32, 12 of AVX2's / SSE's 16.
constexpr int kMR = JAXCONV_WIDE_BYTES == 64 ? 8 : 6;
constexpr int kNV = JAXCONV_WIDE_BYTES == 64 ? 3 : 2;

template <class E>
struct Plan {
  const Geom* g;
  const E* x;
  E* y;
  const E* panels;  // [G][blocks][K][NB]
  const E* fill;    // I values: the pad value (or zeros) for a padded tap
  E pad;
  int64_t P, R, T, K, blocks, tiles, og, nb;
  int64_t xs, ys;  // per-batch strides of x and y
};

// A call's plan: its sizes and strides, its input and output (the panels and the pad row
// are the caller's).
template <class E>
inline Plan<E> make_plan(const WideCall& call, E* y) {
  constexpr int NB = kNV * Vt<E>::L;
  const Geom& g = call.geom;
  Plan<E> pl{};
  pl.g = &g;
  pl.x = static_cast<const E*>(call.x);
  pl.y = y;
  pl.pad = E(g.pad);
  pl.P = g.os[0] * g.os[1] * g.os[2];
  pl.R = g.n * pl.P;
  pl.T = g.k[0] * g.k[1] * g.k[2];
  pl.K = pl.T * g.i;
  pl.og = g.g > 0 ? g.o / g.g : 0;
  pl.nb = NB;
  pl.blocks = (pl.og + NB - 1) / NB;
  pl.tiles = (pl.R + kMR - 1) / kMR;
  pl.xs = g.n * g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  pl.ys = pl.R * g.o;
  return pl;
}

// One batch element's kernel `wb` (K, O) packed into panels [G][blocks][K][NB] at `dst`
// (a block's columns past the group's output channels keep what `dst` held).
template <class E>
inline void pack_panels(const Plan<E>& pl, const E* wb, E* panels) {
  constexpr int NB = kNV * Vt<E>::L;
  const Geom& g = *pl.g;
  for (int64_t grp = 0; grp < g.g; ++grp)
    for (int64_t blk = 0; blk < pl.blocks; ++blk) {
      E* dst = panels + (grp * pl.blocks + blk) * pl.K * NB;
      const int64_t o0 = blk * NB, cols = pl.og - o0 < NB ? pl.og - o0 : NB;
      for (int64_t k = 0; k < pl.K; ++k)
        std::memcpy(dst + k * NB, wb + k * g.o + grp * pl.og + o0, sizeof(E) * size_t(cols));
    }
}

// The input row of output row r (n * P + p) at tap t, or nullptr (padding / a hole).
template <class E>
inline const E* row_at(const Plan<E>& pl, const E* xb, int64_t r, int64_t t) {
  const Geom& g = *pl.g;
  const int64_t n = r / pl.P, p = r % pl.P;
  const int64_t o[3] = {p / (g.os[1] * g.os[2]), (p / g.os[2]) % g.os[1], p % g.os[2]};
  const int64_t k[3] = {t / (g.k[1] * g.k[2]), (t / g.k[2]) % g.k[1], t % g.k[2]};
  int64_t at = n;
  for (int d = 0; d < 3; ++d) {
    int64_t q = o[d] * g.stride[d] - g.lo[d] + k[d] * g.rd[d];
    if (q < 0 || q % g.ld[d] != 0) return nullptr;
    q /= g.ld[d];
    if (q >= g.sp[d]) return nullptr;
    at = at * g.sp[d] + q;
  }
  return xb + at * g.c;
}

template <class E, class Op, bool Exact>
void tile(const Plan<E>& pl, int64_t b, int64_t grp, int64_t blk, int64_t rt) {
  using V = VecOf<E>;
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  const Geom& g = *pl.g;
  const E* xb = pl.x + b * pl.xs;
  const E* panel = pl.panels + (grp * pl.blocks + blk) * pl.K * NB;
  const int64_t r0 = rt * kMR;
  V acc[kMR][kNV];
  for (int m = 0; m < kMR; ++m)
    for (int v = 0; v < kNV; ++v) acc[m][v] = splat<E>(Op::template ident<E>());
  for (int64_t t = 0; t < pl.T; ++t) {
    const E* xr[kMR];
    bool skip[kMR];
    bool any = false;
    for (int m = 0; m < kMR; ++m) {
      const int64_t r = r0 + m < pl.R ? r0 + m : pl.R - 1;
      const E* p = row_at(pl, xb, r, t);
      // A padded tap reads the pad row (the pad value, or zeros whose terms are dropped).
      skip[m] = !p && !g.has_pad;
      any = any || skip[m];
      xr[m] = p ? p + grp * g.i : pl.fill;
    }
    V saved[kMR][kNV];
    if (any)
      for (int m = 0; m < kMR; ++m)
        for (int v = 0; v < kNV; ++v) saved[m][v] = acc[m][v];
    const E* wp = panel + t * g.i * NB;
    for (int64_t i = 0; i < g.i; ++i, wp += NB) {
      V wv[kNV];
      for (int v = 0; v < kNV; ++v) std::memcpy(&wv[v], wp + v * L, sizeof(V));
      for (int m = 0; m < kMR; ++m) {
        const V xv = splat<E>(xr[m][i]);
        for (int v = 0; v < kNV; ++v)
          acc[m][v] = Op::template red<E, Exact>(acc[m][v],
                                                 Op::template comb<E, Exact>(xv, wv[v]));
      }
    }
    if (any)
      for (int m = 0; m < kMR; ++m)
        if (skip[m])
          for (int v = 0; v < kNV; ++v) acc[m][v] = saved[m][v];
  }
  E* yb = pl.y + b * pl.ys;
  const int64_t o0 = blk * NB;
  const int64_t cols = pl.og - o0 < NB ? pl.og - o0 : NB;
  for (int m = 0; m < kMR && r0 + m < pl.R; ++m) {
    E* yr = yb + (r0 + m) * g.o + grp * pl.og + o0;
    alignas(64) E out[NB];
    for (int v = 0; v < kNV; ++v) std::memcpy(out + v * L, &acc[m][v], sizeof(V));
    std::memcpy(yr, out, sizeof(E) * size_t(cols));
  }
}

// Whether the plain compare-select loop gives lax's bits: no NaN or infinity anywhere (no
// NaN product), and no -0 that could decide a tie (a sum is -0 only from two -0 operands;
// a min / max product is -0 from one). A user combine (userop_wide.h, Comb < 0): -2 may make
// NaN from finite operands (never plain); -1 makes none, so finite operands suffice, its -0
// products being handled by `rezero` (a tile with a zero result is recomputed exactly).
template <class E, int Comb, bool Sum>
bool plain_ok(const E* x, int64_t nx, const E* w, int64_t nw, const Geom& g, E pad) {
  if constexpr (!std::is_floating_point_v<E> || Sum) {
    return true;  // a sum has no tie to decide: NaN and infinities propagate by themselves
  } else if constexpr (Comb == -2) {
    return false;
  } else {
    // A negative zero: -0 or a negative denormal (which compares equal to 0 under the DAZ
    // mode every call runs in). Pieces of 1024 values, each scanned without a branch, on the
    // bits, so that GCC vectorizes it: the loop that returned at the first infinity stayed
    // scalar (0.7 ms of layer A's bfloat16 max_plus backward, one thread on Zen 4).
    auto scan = [](const E* p, int64_t n, bool* negzero) {
      using U = std::conditional_t<sizeof(E) == 8, uint64_t, uint32_t>;
      constexpr bool kBits = (sizeof(E) == 4 || sizeof(E) == 8) &&
                             std::numeric_limits<E>::is_iec559 && sizeof(E) == sizeof(U);
      constexpr U kSign = U(1) << (8 * sizeof(U) - 1);
      constexpr U kExp = sizeof(E) == 8 ? U(0x7ff0000000000000ull) : U(0x7f800000u);
      constexpr int64_t kPiece = 1024;
      for (int64_t a = 0; a < n; a += kPiece) {
        const int64_t e = a + kPiece < n ? a + kPiece : n;
        bool bad = false, nz = false;
        if constexpr (kBits) {
          U any_inf = 0, any_nz = 0;
          for (int64_t k = a; k < e; ++k) {
            U u;
            std::memcpy(&u, p + k, sizeof(U));
            any_inf |= U((u & kExp) == kExp);
            any_nz |= U((u & (kSign | kExp)) == kSign);  // -0, or a -denormal (== 0 under DAZ)
          }
          bad = any_inf != 0;
          nz = any_nz != 0;
        } else {
          for (int64_t k = a; k < e; ++k) {
            bad = bad || !std::isfinite(p[k]);
            nz = nz || (p[k] == 0 && std::signbit(p[k]));
          }
        }
        if (bad) return false;
        if (nz) *negzero = true;
      }
      return true;
    };
    bool zx = false, zw = false;
    if (!scan(x, nx, &zx) || !scan(w, nw, &zw)) return false;
    if (g.has_pad && !scan(&pad, 1, &zx)) return false;
    if constexpr (Comb < 0) return true;
    else return Comb == 0 ? !(zx && zw) : !(zx || zw);
  }
}

// Whether a tile's outputs hold a zero: with a user combine, the plain loop's zero may have
// the wrong sign (-0 and +0 tie in its compare); every other result is exact.
template <class E>
bool tile_has_zero(const Plan<E>& pl, int64_t b, int64_t grp, int64_t blk, int64_t rt) {
  const Geom& g = *pl.g;
  const int64_t o0 = blk * pl.nb, cols = pl.og - o0 < pl.nb ? pl.og - o0 : pl.nb;
  const E* yb = pl.y + b * pl.ys;
  for (int64_t r = rt * kMR; r < (rt + 1) * kMR && r < pl.R; ++r) {
    const E* yr = yb + r * g.o + grp * pl.og + o0;
    for (int64_t c = 0; c < cols; ++c)
      if (yr[c] == E(0)) return true;
  }
  return false;
}

template <class E, class Op>
int run_typed(const WideCall& call) {
  const Geom& g = call.geom;
  constexpr int L = Vt<E>::L;
  constexpr int NB = kNV * L;
  Plan<E> pl = make_plan<E>(call, static_cast<E*>(call.out));
  if (pl.R == 0 || g.o == 0) return 0;
  const E* w = static_cast<const E*>(call.w);
  if (pl.K == 0 || g.i == 0) {  // an empty contraction: the identity
    for (int64_t k = 0; k < call.batch * pl.ys; ++k) pl.y[k] = Op::template ident<E>();
    return 0;
  }
  // One batch element's kernel is packed at a time (a vmapped kernel is part of the batch).
  const int64_t wsize = pl.K * g.o;
  std::vector<E> panels;
  try {
    panels.assign(size_t(g.g * pl.blocks * pl.K * NB), E(0));
  } catch (...) {
    return 2;
  }
  pl.panels = panels.data();
  std::vector<E> fill(size_t(g.i), g.has_pad ? pl.pad : E(0));
  pl.fill = fill.data();
  for (int64_t b = 0; b < call.batch; ++b) {
    const E* wb = w + b * wsize;
    pack_panels(pl, wb, panels.data());
    const bool plain = plain_ok<E, Op::kComb, Op::kSum>(pl.x + b * pl.xs, pl.xs, wb, wsize, g, pl.pad);
    struct Job {
      const Plan<E>* pl;
      int64_t b;
      bool plain;
    } job{&pl, b, plain};
    auto fn = [](void* arg, int64_t item) {
      const Job& j = *static_cast<const Job*>(arg);
      const Plan<E>& p = *j.pl;
      const int64_t rt = item % p.tiles, rest = item / p.tiles;
      const int64_t blk = rest % p.blocks, grp = rest / p.blocks;
      if (j.plain) {
        tile<E, Op, false>(p, j.b, grp, blk, rt);
        if constexpr (Op::kComb < 0 && !Op::kSum && std::is_floating_point_v<E>)
          if (tile_has_zero(p, j.b, grp, blk, rt)) tile<E, Op, true>(p, j.b, grp, blk, rt);
      } else {
        tile<E, Op, true>(p, j.b, grp, blk, rt);
      }
    };
    call.par.run(call.par.ctx, g.g * pl.blocks * pl.tiles, fn, &job);
  }
  return 0;
}

template <class E>
int run_type(const WideCall& call) {
  switch (call.op) {
    case jaxconv::kMaxPlus: return run_typed<E, WideOp<0, 0>>(call);
    case jaxconv::kMinPlus: return run_typed<E, WideOp<0, 1>>(call);
    case jaxconv::kMaxMin: return run_typed<E, WideOp<1, 0>>(call);
    case jaxconv::kMinMax: return run_typed<E, WideOp<2, 1>>(call);
    case jaxconv::kAdder:  // adder and l1 have one forward (adder pads with 0)
    case jaxconv::kL1: return run_typed<E, WideOp<3, 2>>(call);
    case jaxconv::kL2: return run_typed<E, WideOp<4, 2>>(call);
    default: return 1;
  }
}

inline int run_wide(const WideCall& call) {
  switch (call.type) {
    case jaxconv::kWideF64: return run_type<double>(call);
    case jaxconv::kWideS32: return run_type<int32_t>(call);
    case jaxconv::kWideS64: return run_type<int64_t>(call);
    default: return 1;
  }
}

}  // namespace JAXCONV_WIDE_NS

// The one-pass backward of a sum whose partial derivatives are heavy (an exp, log, tanh or a
// division per product): both gradients from one visit of each term.
//
// Why: sum_backward (kernel_sums.h) runs one pass per partial, the input gradient through hx
// and the kernel gradient through hw, each recomputing its partial for every term. For
// exp(-(x - w)^2) under sum both partials are one exponential times a factor, so the two
// passes evaluate every term's exponential twice and the backward cost twice the forward.
// Here the generated functor's dcxw (codegen.py `both_function`: the two outputs of JAX's
// derivative program, their common subexpressions computed once) gives both partials of a
// term at once, and the term feeds dx and dw in the same step. A functor that declares
// dparts (codegen.py `signed_function`) gives the same partials with their negations left to
// this loop's multiply-adds (kNegCx / kNegCw: an FNMA in place of an FMA, the same bits) and
// its sums and doublings on the add ports: for the Gaussian, its difference moves off the FMA
// ports and two of its three sign flips go (FMA-port operations and sign flips per term, from
// the compiled loops: AVX-512 16 -> 13, its forward 11; AVX2 19 -> 16, its forward 13). Rows of kFusedRows positions share each kernel vector load and each dw load and
// store (fused_rows).
//
// The same sums in the same order as sum_backward's two passes, so the same bits: vectors run
// over W input channels (as dx_block's); each dx element adds, tap by tap in ascending order,
// its sums over runs of 64 output channels o = 0, 1, ... (fma from zero); each dw element is
// the sum over the positions in ascending order (fma from zero, as dw_block's), kept transposed
// (Og, W) per tap in L1 and written once per tap. (Rows of two positions
// keep both orders: a tap's positions are distinct input cells, and each dw vector takes the
// rows' terms in ascending position order.)
//
// Work items: (batch entry, group, vector of W input channels); each owns those channels' dx
// (every cell) and dw rows (every tap), so items write disjoint outputs. The pass is taken only
// when there are at least kFusedItems of them (and I is a multiple of W, both gradients are
// wanted); otherwise the two passes, which split finer, run.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_sums.h and kernel_heavy.h, never on its own.
#pragma once

// Vector operations of a functor's two partials together (codegen.py `comb_ops` of its
// partials' program): 0 for the built-in ops, which declare none.
template <class Op, class = void>
struct GradOps {
  static constexpr int value = 0;
};
template <class Op>
struct GradOps<Op, std::void_t<decltype(Op::kGradOps)>> {
  static constexpr int value = Op::kGradOps;
};

// Whether the generated functor Op declares dparts (codegen.py `signed_function`: both partials
// with their negations left to the caller: kNegCx / kNegCw say which it stores negated).
template <class Op>
constexpr auto has_dparts(int)
    -> decltype(Op::template dparts<S>(S::V{}, S::V{}, nullptr, nullptr), true) {
  return true;
}
template <class Op>
constexpr bool has_dparts(long) {
  return false;
}

// acc + g c where the functor's partial was stored as c, or acc - g c where it stored -c
// (the same bits: the fused multiply-add rounds g (-c) + acc once either way).
template <bool kNeg>
inline S::V fused_step(S::V g, S::V c, S::V acc) {
  if constexpr (kNeg) return S::fnma(g, c, acc);
  else return S::fma(g, c, acc);
}

// One term's partials: cx, cw, and whether each is stored negated.
template <class Op>
struct FusedParts {
  static constexpr bool kSigned = has_dparts<Op>(0);
  static constexpr bool kNegX = [] {
    if constexpr (kSigned) return Op::kNegCx;
    else return false;
  }();
  static constexpr bool kNegW = [] {
    if constexpr (kSigned) return Op::kNegCw;
    else return false;
  }();
  static void get(S::V x, S::V w, S::V* cx, S::V* cw) {
    if constexpr (kSigned) Op::template dparts<S>(x, w, cx, cw);
    else Op::template dcxw<S>(x, w, cx, cw);
  }
};

// Whether Op's sum backward takes the one-pass loop (its partials cost at least as much as
// a heavy combine: below, the two passes' lighter loops are as fast).
template <class Op>
constexpr bool fused_sums() {
  return Op::kReduce == 0 && GradOps<Op>::value >= kHeavyOps;
}

// Positions per register tile: one kernel vector load and one dw load and store serve R terms.
constexpr int kFusedRows = 2;

// R positions' terms against one tap's kernel slice (wt: row o at o * NR; dt: its dw, (Og,
// W)): for each output channel o in ascending order, each row r's input vector xr[r] with its
// cotangent gq[r][o]. Each row's dx sum runs over 64 output channels at a time (dx_block's
// runs) and is added to dxr[r] (skipped where null: a pad value's dx).
template <class Op, int R>
inline void fused_rows(const float* const* xr, const float* const* gq, float* const* dxr,
                       const float* wt, float* dt, int64_t Og) {
  using V = S::V;
  using Parts = FusedParts<Op>;
  V xv[R], acc[R];
  for (int r = 0; r < R; ++r) {
    xv[r] = S::load(xr[r]);
    acc[r] = S::zero();
  }
  for (int64_t o = 0; o < Og; ++o) {
    const V wv = S::load(wt + o * NR);
    V dw = S::load(dt + o * W);
    for (int r = 0; r < R; ++r) {
      const V gs = S::set1(gq[r][o]);
      V cx, cw;
      Parts::get(xv[r], wv, &cx, &cw);
      acc[r] = fused_step<Parts::kNegX>(gs, cx, acc[r]);
      dw = fused_step<Parts::kNegW>(gs, cw, dw);
    }
    S::store(dt + o * W, dw);
    if ((o + 1) % 64 == 0 || o + 1 == Og) {  // dx_block's runs of 64 channels
      for (int r = 0; r < R; ++r) {
        if (dxr[r]) S::store(dxr[r], S::add(S::load(dxr[r]), acc[r]));
        acc[r] = S::zero();
      }
    }
  }
}

// The fewest work items the one-pass loop runs with.
constexpr int64_t kFusedItems = 4;

// Both gradients of a sum op in one pass. Returns false, having done nothing, where the
// two-pass sum_backward must run instead.
template <class Op>
bool fused_sum_backward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  if (call.parts != 3 || I % W != 0 || !c.wpack) return false;
  const int64_t nvi = I / W;
  if (call.batch * c.G * nvi < kFusedItems) return false;
  pack_kernel_blocks(c);  // kernel_sums.h: (batch, tap, group, block of NR input rows)
  const int64_t nIB = (I + NR - 1) / NR;
  const int64_t blk = Og * NR;
  std::atomic<bool> failed{false};
  auto item = [&](int64_t it) {
    const int64_t iv = it % nvi, grp = (it / nvi) % c.G, b = it / (nvi * c.G);
    const int64_t i0 = iv * W, ib = i0 / NR, l0 = i0 % NR;
    const size_t bytes = (sizeof(float) * size_t(Og * W) + 63) / 64 * 64;
    const Owned<float> hold(static_cast<float*>(std::aligned_alloc(64, bytes)));
    float* dwt = hold.get();  // (Og, W): this tap's dw, transposed
    if (!dwt) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    const float* xb = call.x + b * c.x_bs;
    const float* gb = call.g + b * c.y_bs + grp * Og;
    float* dxb = call.out + b * c.x_bs + grp * I + i0;
    float* dwb = call.out2 + b * c.w_bs + grp * Og;
    for (int64_t t = 0; t < T; ++t) {
      const float* wt = c.wpack + (((b * T + t) * c.G + grp) * nIB + ib) * blk + l0;
      for (int64_t k = 0; k < Og * W; k += W) S::store(dwt + k, S::zero());
      const float* xr[kFusedRows];
      const float* gq[kFusedRows];
      float* dxr[kFusedRows];
      int nr = 0;
      for (int64_t p = 0; p < c.P; ++p) {
        const int64_t n = p / c.OS, osi = p % c.OS;
        const int32_t off = c.tab[osi * T + t];
        const float* x = cell(c, xb, n, osi, t, grp);
        if (!x) continue;  // identity padding: not a term
        xr[nr] = x + i0;
        gq[nr] = gb + p * O;
        dxr[nr] = off >= 0 ? dxb + n * c.img + off : nullptr;  // a pad value's dx is dropped
        if (++nr == kFusedRows) {
          fused_rows<Op, kFusedRows>(xr, gq, dxr, wt, dwt, Og);
          nr = 0;
        }
      }
      for (int r = 0; r < nr; ++r) fused_rows<Op, 1>(xr + r, gq + r, dxr + r, wt, dwt, Og);
      for (int64_t l = 0; l < W; ++l) {
        float* d = dwb + (t * I + i0 + l) * O;
        for (int64_t o = 0; o < Og; ++o) d[o] = dwt[o * W + l];
      }
    }
  };
  parallel(c, call.batch * c.G * nvi, item);
  if (failed.load()) c.failed = true;
  return true;
}

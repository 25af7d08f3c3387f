// The one-pass backward of a sum whose partial derivatives are heavy (an exp, log, tanh or a
// division per product): both gradients from one visit of each term.
//
// Why: sum_backward (kernel_sums.h) runs one pass per partial, the input gradient through hx
// and the kernel gradient through hw, each recomputing its partial for every term. For
// exp(-(x - w)^2) under sum both partials are one exponential times a factor, so the two
// passes evaluate every term's exponential twice and the backward cost twice the forward.
// Here the generated functor's dcxw (codegen.py `both_function`: the two outputs of JAX's
// derivative program, their common subexpressions computed once) gives both partials of a
// term at once, and the term feeds dx and dw in the same step.
//
// The same sums in the same order as sum_backward's two passes, so the same bits: vectors run
// over W input channels (as dx_block's); each dx element adds, tap by tap in ascending order,
// its sums over runs of 64 output channels o = 0, 1, ... (fma from zero); each dw element is
// the sum over the positions in ascending order (fma from zero, as dw_block's), kept transposed
// (Og, W) per tap in L1 and written once per tap.
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

// Whether Op's sum backward takes the one-pass loop (its partials cost at least as much as
// a heavy combine: below, the two passes' lighter loops are as fast).
template <class Op>
constexpr bool fused_sums() {
  return Op::kReduce == 0 && GradOps<Op>::value >= kHeavyOps;
}

// The fewest work items the one-pass loop runs with.
constexpr int64_t kFusedItems = 4;

// Both gradients of a sum op in one pass. Returns false, having done nothing, where the
// two-pass sum_backward must run instead.
template <class Op>
bool fused_sum_backward(Ctx& c) {
  using V = S::V;
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
      for (int64_t p = 0; p < c.P; ++p) {
        const int64_t n = p / c.OS, osi = p % c.OS;
        const int32_t off = c.tab[osi * T + t];
        const float* xr = cell(c, xb, n, osi, t, grp);
        if (!xr) continue;  // identity padding: not a term
        const V xv = S::load(xr + i0);
        const float* gg = gb + p * O;
        V acc = S::zero();
        for (int64_t o = 0; o < Og; ++o) {
          const V gs = S::set1(gg[o]);
          V cx, cw;
          Op::template dcxw<S>(xv, S::load(wt + o * NR), &cx, &cw);
          acc = S::fma(gs, cx, acc);
          S::store(dwt + o * W, S::fma(gs, cw, S::load(dwt + o * W)));
          if ((o + 1) % 64 == 0 || o + 1 == Og) {  // dx_block's runs of 64 channels
            if (off >= 0) {  // a pad value's dx is dropped
              float* d = dxb + n * c.img + off;
              S::store(d, S::add(S::load(d), acc));
            }
            acc = S::zero();
          }
        }
      }
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

// The min form (adder / l1 forward, kernel_centre.h) on bfloat16 / float16 x without a float32
// copy of x: run_low (kernel_bf16fuse_low.h) leaves Call::x null and LowIO::x16 set, centre()
// widens x a cell at a time as it shifts it (the shifted copy is the only float32 x the tiles
// read), and the exact loop, where the min form does not apply (unbounded or non-finite data,
// min_form off), widens x first (forward_wide_x). The widened values are those of run_low's
// copy: the same bits.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), before kernel_centre.h, never on its own.
#pragma once

#include "kernel_lowrec_convert.h"

// n low values at src widened to float32 at dst (kind 1: bfloat16, 2: float16).
inline void lowtile_widen(int64_t kind, const uint16_t* src, float* dst, int64_t n) {
  if (kind == 1) widen_run<1>(src, dst, n);
  else widen_run<2>(src, dst, n);
}

// Whether run_low may leave x in the low dtype for Op's forward: the min form's ops, where
// the call runs the tiles (not depthwise) and the min form is on.
template <class Op>
constexpr bool lowtile_lazy_x() {
  if constexpr (Op::kReduce == 0) return Op::kMinForm;  // (only the sums declare kMinForm)
  else return false;
}

template <class Op, bool Safe>
void forward(Ctx& c);

// forward<Op, false> with a float32 x: where Call::x is null (run_low left x in the low dtype),
// on a widened copy of it, made here. Sets c.failed when the copy cannot be allocated.
template <class Op>
void forward_wide_x(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  if (call.x || !call.low || !call.low->x16) {
    forward<Op, false>(c);
    return;
  }
  const int64_t nx = call.batch * c.x_bs;
  Owned<float> x32 = allocate<float>(nx + W);
  if (!x32) {
    c.failed = true;
    return;
  }
  constexpr int64_t kChunk = 1 << 15;
  const jaxconv::LowIO& io = *call.low;
  auto widen = [&](int64_t it) {
    const int64_t a = it * kChunk, len = a + kChunk < nx ? kChunk : nx - a;
    lowtile_widen(io.kind, io.x16 + a, x32.get() + a, len);
  };
  parallel(c, (nx + kChunk - 1) / kChunk, widen);
  jaxconv::Call wide = call;
  wide.x = x32.get();
  c.call = &wide;
  forward<Op, false>(c);
  c.call = &call;
}

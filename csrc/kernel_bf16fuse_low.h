// bfloat16 / float16 operands in the float32 forward without XLA's conversions around the call
// (jaxconv::LowIO): the input and kernel are widened in the pass that checks them for finite
// values (a pass the max/min ops make anyway), and the register tiles store their results
// straight to the operands' dtype, rounded as XLA's convert rounds (nearest, ties to even;
// bfloat16 NaN -> the quiet NaN with its sign; float16 NaN keeps its top payload, quietened).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

#include "kernel_lowrec_convert.h"

// key_copy's chunk from low values: the n values at src widened into dst, then made keys in
// place while they are in L1 (data_key: the same keys as from the float32 copy).
inline void low_keys(int64_t kind, const uint16_t* src, float* dst, int64_t n) {
  constexpr int64_t kPiece = 512;
  for (int64_t a = 0; a < n; a += kPiece) {
    const int64_t len = a + kPiece < n ? kPiece : n - a;
    if (kind == 1) widen_run<1>(src + a, dst + a, len);
    else widen_run<2>(src + a, dst + a, len);
    int64_t j = a;
    for (; j + W <= a + len; j += W) S::store(dst + j, data_key(S::load(dst + j)));
    for (; j < a + len; ++j) dst[j] = data_key(dst[j]);
  }
}

// n floats at t rounded to the low dtype at dst (the register tiles' bf16 / f16 results: a
// tile stores its row to a float buffer first). Out of line, and handed a copy rather than the
// accumulators: with a pointer to them, GCC kept every accumulator in memory too, one store per
// accumulator and tap in the tile's inner loop (2.3x the forward's time, measured on Zen 4).
__attribute__((noinline)) void narrow_row(int kind, const float* t, uint16_t* dst, int64_t n) {
  if (kind == 1) narrow_run<1>(t, dst, n);
  else narrow_run<2>(t, dst, n);
}

template <class Op>
int run_op(const jaxconv::Call& call, bool backward);

// The forward of a call whose operands are bfloat16 / float16 (call.low): float32 copies of x
// and w made in one parallel pass that also finds whether they are finite (the max/min ops'
// scan, so run_op skips its own), then the float32 kernels; the register tiles store y in the
// low dtype, except in the loops that have no tiles (depthwise, logsumexp) and the recording
// forward (call.rec: record_tile_end's y and masks, kernel_lowrec_mark.h), which write a
// float32 y that is rounded afterwards. Where the forward will run on integer keys (finite
// max_min / min_max), x is only scanned: key_copy makes its keys from the low values; where it
// will run the min form (adder, l1), x is left as it is: centre() widens it as it shifts it
// (kernel_lowtile_minform.h).
template <class Op>
int run_low(const jaxconv::Call& call) {
  const jaxconv::LowIO& io = *call.low;
  const jaxconv::Geom& g = call.geom;
  const int64_t T = g.k[0] * g.k[1] * g.k[2];
  const int64_t nx = call.batch * g.n * g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  const int64_t nw = call.batch * T * g.i * g.o;
  const int64_t ny = call.batch * g.n * g.os[0] * g.os[1] * g.os[2] * g.o;
  Ctx c{};  // for parallel() only
  c.call = &call;
  const bool tiles = Op::kReduce != 3 && !(g.i == 1 && g.o == g.g);
  // forward()'s and dispatch()'s choice of the keyed loop, finite data assumed.
  const jaxconv::Params prm = call.params ? *call.params : jaxconv::Params{};
  bool keys = !std::is_same_v<typename KeyOf<Op>::type, Op> && Op::kNanFree && prm.keyed &&
              tiles && !(g.has_pad && !finite(g.pad));
  // The min form's ops widen x themselves (kernel_lowtile_minform.h): x is neither copied
  // nor scanned here (their forward needs no finite scan).
  const bool lazy = lowtile_lazy_x<Op>() && prm.min_form && tiles;
  Owned<float> x32, w32 = allocate<float>(nw + W);
  if (!keys && !lazy) x32 = allocate<float>(nx + W);
  if (!w32 || (!keys && !lazy && !x32)) return 2;
  constexpr int64_t kChunk = 1 << 15;
  const int64_t cx = lazy ? 0 : (nx + kChunk - 1) / kChunk, cw = (nw + kChunk - 1) / kChunk;
  std::atomic<int> bad{0};
  auto widen = [&](int64_t it) {
    const bool onx = it < cx;
    const int64_t n = onx ? nx : nw, a = (onx ? it : it - cx) * kChunk;
    const int64_t len = a + kChunk < n ? kChunk : n - a;
    const uint16_t* src = (onx ? io.x16 : io.w16) + a;
    bool fin;
    if (onx && !x32) {
      fin = io.kind == 1 ? finite_run<1>(src, len) : finite_run<2>(src, len);
    } else {
      float* dst = (onx ? x32.get() : w32.get()) + a;
      fin = io.kind == 1 ? widen_run<1>(src, dst, len) : widen_run<2>(src, dst, len);
    }
    if (!fin) bad.store(1, std::memory_order_relaxed);
  };
  parallel(c, cx + cw, widen);
  if (keys && bad.load()) {  // a NaN or infinity: the float loop, on a float32 copy of x
    keys = false;
    if (!(x32 = allocate<float>(nx + W))) return 2;
    auto widen_x = [&](int64_t it) {
      const int64_t a = it * kChunk, len = a + kChunk < nx ? kChunk : nx - a;
      if (io.kind == 1) widen_run<1>(io.x16 + a, x32.get() + a, len);
      else widen_run<2>(io.x16 + a, x32.get() + a, len);
    };
    parallel(c, cx, widen_x);
  }
  constexpr bool kMinMax = Op::kReduce == 1 || Op::kReduce == 2;
  jaxconv::LowIO io2{io.kind, 0, keys || lazy ? io.x16 : nullptr, nullptr, nullptr,
                     kMinMax ? (bad.load() ? 0 : 1) : -1};
  jaxconv::Call c2 = call;
  c2.x = keys || lazy ? nullptr : x32.get();
  c2.w = w32.get();
  c2.low = &io2;
  Owned<float> y32;
  if (io.y16 && tiles && !call.rec) {  // a record: y from record_tile_end, in float32
    io2.y16 = io.y16;
    c2.out = nullptr;
  } else if (io.y16) {
    y32 = allocate<float>(ny);
    if (!y32) return 2;
    c2.out = y32.get();
  }
  const int rc = run_op<Op>(c2, false);
  if (rc != 0 || !y32) return rc;
  const int64_t cy = (ny + kChunk - 1) / kChunk;
  auto narrow = [&](int64_t it) {
    const int64_t a = it * kChunk, len = a + kChunk < ny ? kChunk : ny - a;
    if (io.kind == 1) narrow_run<1>(y32.get() + a, io.y16 + a, len);
    else narrow_run<2>(y32.get() + a, io.y16 + a, len);
  };
  parallel(c, cy, narrow);
  return 0;
}

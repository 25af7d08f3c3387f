// Plain data shared by ffi.cc and the per-ISA translation units of the wide kernels
// (kernel_wide.h, kernel_wide_backward.h): the built-in ops on float64, int32 and int64
// operands.
#pragma once
#include <cstdint>

#include "problem.h"

namespace jaxconv {

// The element types of the wide kernels.
// kWideF32: the backward of bfloat16 / float16 max/min ops on float32 copies of the operands,
// each product rounded to `round` before it is compared with y.
enum WideType : int { kWideF64 = 0, kWideS32 = 1, kWideS64 = 2, kWideF32 = 3 };
// The dtype a float32 product is rounded to before the winner compare.
enum WideRound : int { kRoundNone = 0, kRoundBF16 = 1, kRoundF16 = 2 };

struct WideCall {
  int64_t op;       // a built-in op id
  int type;         // WideType
  Geom geom;        // geom.pad read as the element type (an exact float32 value)
  int64_t batch;    // leading (vmap) batch
  const void* x;
  const void* w;
  void* out;         // forward: y; backward: dx
  const void* y;     // backward: the forward output
  const void* g;     // backward: the output cotangent
  void* out2;        // backward: dw
  int round;         // backward, kWideF32: a WideRound
  Parallel par;
  // The low recorded backward (kernel_lowrec_backward.h), kWideF32 with a `round`: x, w, dx
  // and dw are in that dtype (low_x), y and g too where low_y / low_g, else float32; rec: the
  // low recording forward's block masks (rec[0] < 0: not recorded), or null.
  int low_x, low_y, low_g;
  const int32_t* rec;
  // Backward: Call's zeroing rule (problem.h). Pass 1's items zero the part of dx they add
  // into; pass 2 writes every entry of dw, so dw is zeroed only where no pass runs
  // (kernel_wide_backward.h's zero_dx_images, no_terms). False: the caller zeroed them.
  bool zero_dx;
  bool zero_dw;
};

}  // namespace jaxconv

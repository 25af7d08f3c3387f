// Plain data shared by ffi.cc and the per-ISA translation units of the wide kernels
// (kernel_wide.h, kernel_wide_backward.h): the built-in ops on float64, int32 and int64
// operands.
#pragma once
#include <cstdint>

#include "problem.h"

namespace jaxconv {

// The element types of the wide kernels.
enum WideType : int { kWideF64 = 0, kWideS32 = 1, kWideS64 = 2 };

struct WideCall {
  int64_t op;       // a built-in op id
  int type;         // WideType
  Geom geom;        // geom.pad read as the element type (an exact float32 value)
  int64_t batch;    // leading (vmap) batch
  const void* x;
  const void* w;
  void* out;         // forward: y; backward: dx (zeroed by the caller)
  const void* y;     // backward: the forward output
  const void* g;     // backward: the output cotangent
  void* out2;        // backward: dw (zeroed by the caller)
  Parallel par;
};

}  // namespace jaxconv

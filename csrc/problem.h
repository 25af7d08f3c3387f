// Plain data shared by ffi.cc and the per-ISA kernel translation units. No inline functions
// here: the kernel TUs are compiled with different instruction sets and must not share code.
#pragma once
#include <cstdint>

#include "kernel_params.h"

namespace jaxconv {

// One canonical problem, always 3 spatial dims (missing ones have size 1): x (N, D, H, W, C),
// w (KD, KH, KW, I, O), out (N, OD, OH, OW, O), C = G * I, O = G * Og.
struct Geom {
  int64_t n, sp[3], c, k[3], i, o, g, os[3], stride[3], lo[3], ld[3], rd[3];
  int64_t has_pad;  // 0: identity padding (padded taps and lhs_dilation holes are skipped)
  float pad;        // the pad value when has_pad
};

// The built-in ops, listed once: X(enumerator, kernel functor, name, reduce). Their ids are
// their positions. The kernel switch (kernels.inc), the FFI's range check and the table that
// `jaxconv._native.kernels()` hands to Python (checked against native.KERNELS) expand it.
#define JAXCONV_BUILTIN_OPS(X)             \
  X(kMaxPlus, MaxPlus, "max_plus", "max")  \
  X(kMinPlus, MinPlus, "min_plus", "min")  \
  X(kMaxMin, MaxMin, "max_min", "max")     \
  X(kMinMax, MinMax, "min_max", "min")     \
  X(kAdder, Adder, "adder", "sum")         \
  X(kL1, L1, "l1", "sum")                  \
  X(kL2, L2, "l2_exact", "sum")            \
  X(kLog, LogPlus, "log", "logsumexp")     \
  X(kMaxMinus, MaxMinus, "max_minus", "max") \
  X(kMinMinus, MinMinus, "min_minus", "min")

#define JAXCONV_OP_ENUMERATOR(e, functor, name, reduce) e,
enum OpId : int64_t { JAXCONV_BUILTIN_OPS(JAXCONV_OP_ENUMERATOR) kNumBuiltinOps };
#undef JAXCONV_OP_ENUMERATOR

// Op ids from kUserBase up name user ops compiled at run time (registered by key in ffi.cc).
constexpr int64_t kUserBase = int64_t(1) << 40;

// The paired sums backward (kernel_sums_paired.h) needs a kernel's input channels in whole
// vectors; a multiple of this count is that on every instruction set. The native engine reads
// it (`_native.pair_channels`) to decide where adder's kernel gradient comes from that pass.
constexpr int64_t kPairChannels = 16;

// The winner record of a max / min product marks blocks of this many kernel rows (more where K
// would need more than kMaxBlocks: kernel_dense_backward.h's dense_block_rows); a kernel of one
// block records nothing (kernel_dense_record.h, kernel_convrec_forward.h). The native engine
// reads it (`_native.record_block_rows`) to ask for a record only where one is kept.
constexpr int64_t kRecordBlockRows = 64;

// The layout of Call, Geom and WideCall (wide.h): a compiled user op is loaded only if it was
// built against the same version (3: WideCall's zero_dx / zero_dw).
constexpr int kAbiVersion = 3;

// A fork-join over `n` independent items, implemented on XLA's intra-op pool in ffi.cc.
struct Parallel {
  void (*run)(void* ctx, int64_t n, void (*fn)(void* arg, int64_t item), void* arg);
  void* ctx;
};

// bfloat16 / float16 operands of a built-in op's forward (csrc/kernel_bf16fuse_low.h): x16
// and w16 stand in for Call::x and Call::w, y16 (when not null) for Call::out. The kernels'
// own call on the widened operands keeps x16 only where Call::x is null (integer keys made
// from the low values).
struct LowIO {
  int64_t kind;     // 1: bfloat16, 2: float16
  int64_t widen;    // 1: from the FFI, x and w not yet widened (run_low); 0: widened
  const uint16_t* x16;
  const uint16_t* w16;
  uint16_t* y16;    // null: the result is float32, in Call::out
  int64_t finite;   // -1: not known; else whether every x and w is finite (the kernels' scan)
};

struct Call {
  int64_t op;
  Geom geom;
  int64_t batch;  // leading (vmap) batch: every operand holds `batch` problems
  const float* x;
  const float* w;
  const float* y;  // backward: the forward output
  const float* g;  // backward: the output cotangent
  float* out;      // forward: y; backward: dx
  float* out2;     // backward: dw
  int64_t parts;   // backward: bit 0 computes dx, bit 1 dw
  Parallel par;
  const Params* params;  // the tuning parameters (never null from ffi.cc; null: the defaults)
  // Dense max/min winner records (kernel_dense_record.h), (batch, P, O): block masks, or for
  // x + w / x - w exact codes (kernel_densebwd_exact.h: k, or -2 - mask for a tie); the
  // recording forward writes them (-1 everywhere: not recorded), the backward reads them;
  // null in every other call.
  int32_t* rec;
  // bfloat16 / float16 operands (the built-in ops' forward only), else null.
  const LowIO* low;
  // Backward, the one zeroing rule (WideCall's too): where zero_dx (zero_dw) is set, dx (dw)
  // is not yet zeroed and the kernel zeroes whatever of it its passes do not write (an empty
  // problem's gradients; kernels.inc's run_op zeroes both except where the dense sums backward,
  // kernel_sumbwd_dense.h, writes every entry; kernel_fold.h's passes write every entry of the
  // parts asked for). The FFI sets both for built-in and user ops alike (a user op's library
  // is built from these headers). False: the caller zeroed them (the harnesses).
  bool zero_dx;
  bool zero_dw;
};

// The recording forwards' blocks of kernel rows (kernel_dense_record.h, kernel_convrec_*.h,
// and the low recorded backward, kernel_lowrec_backward.h): 64 rows, doubled while K would
// need more than kRecordMaxBlocks (a block mask is a sum of distinct powers of two in a float
// lane: exact up to 2^23).
constexpr int64_t kRecordMaxBlocks = 24;
inline int64_t record_block_rows(int64_t K) {
  int64_t kb = kRecordBlockRows;
  while ((K + kb - 1) / kb > kRecordMaxBlocks) kb *= 2;
  return kb;
}

}  // namespace jaxconv

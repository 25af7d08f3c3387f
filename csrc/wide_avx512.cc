// The wide kernels (kernel_wide.h) for the avx512 instruction set (flags per file in CMakeLists.txt).
#define JAXCONV_WIDE_NS jaxconv_wide_avx512
#define JAXCONV_WIDE_BYTES 64
#include "kernel_wide.h"
#include "kernel_wide_backward.h"

namespace jaxconv_wide_avx512 {
int run(const jaxconv::WideCall& call) { return run_wide(call); }
int run_backward(const jaxconv::WideCall& call) { return run_wide_backward(call); }
}  // namespace jaxconv_wide_avx512

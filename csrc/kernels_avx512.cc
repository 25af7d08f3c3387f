// The kernels for the avx512 instruction set (flags set per file in CMakeLists.txt).
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#define JAXCONV_NS jaxconv_avx512
#include "kernels.inc"

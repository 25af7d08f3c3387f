// p * 2^k in one instruction where the target has it (AVX-512's vscalefps), in place of
// vmath.h's vm_scale (two power-of-two factors built from their bits, two multiplies: nine
// vector operations). Both round once, also into the denormals, and honour the flush-to-zero
// mode the kernels run in: the same bits. Every exponential of vmath.h (exp, exp2, and tanh,
// logistic through exp) scales its result by vm_scale: on AVX-512 exp_ goes from about 23
// vector operations to 15 (layer A's Gaussian user op spends most of its time there).
//
// Included by vmath.h right after vm_scale's definition (inside the anonymous namespace of
// the translation unit, after simd.h), never on its own.
#pragma once

#if defined(__AVX512F__)
// k is integer-valued (vm_scale's contract), so scalef's floor(k) is k.
template <>
inline VmV<S> vm_scale<S>(VmV<S> p, VmV<S> k) {
  return _mm512_scalef_ps(p, k);
}
#endif

// The op functors: the reduces, the built-in ops (combine, its NaN-propagating form and its
// partial derivatives; sums: one fused step and the gradient rule), the integer keys of
// max_min / min_max, and the one step every loop takes.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

template <class T>
using VT = typename T::V;

// ---- reduces -----------------------------------------------------------------------------
struct MaxR {
  static constexpr int kReduce = 1;
  static constexpr bool kKeyed = false;
  // kDominated: the product of the identity with any finite w loses to every product, so a
  // finite call may combine padded taps with the identity instead of masking them.
  // kNanFree: finite inputs never make a NaN product (the fast loop may drop NaN).
  static constexpr bool kDominated = true;
  static constexpr bool kNanFree = true;
  static float ident() { return -__builtin_inff(); }
  template <class T> static VT<T> red(VT<T> a, VT<T> c) { return T::max(a, c); }
  // T::max(a, c) is c when either is NaN: keep a NaN accumulator (NaN in, NaN out).
  template <class T> static VT<T> red_safe(VT<T> a, VT<T> c) {
    return T::select(T::unord(a), a, T::max(a, c));
  }
};
struct MinR {
  static constexpr int kReduce = 2;
  static constexpr bool kKeyed = false;
  static constexpr bool kDominated = true;
  static constexpr bool kNanFree = true;
  static float ident() { return __builtin_inff(); }
  template <class T> static VT<T> red(VT<T> a, VT<T> c) { return T::min(a, c); }
  template <class T> static VT<T> red_safe(VT<T> a, VT<T> c) {
    return T::select(T::unord(a), a, T::min(a, c));
  }
};

// ---- ops: combine (fast and NaN-propagating), partials for the winner backward -----------
template <class R>
struct Plus : R {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::addf(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) { return T::addf(x, w); }
  template <class T> static VT<T> dcx(VT<T>, VT<T>) { return T::set1(1.0f); }
  template <class T> static VT<T> dcw(VT<T>, VT<T>) { return T::set1(1.0f); }
};
// x + w under max / min.
using MaxPlus = Plus<MaxR>;
using MinPlus = Plus<MinR>;

// min(x, w) under max; the partials split a tie x == w equally, as jnp.minimum's gradient.
struct MaxMin : MaxR {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::min(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) {
    return T::select(T::unord(x), x, T::min(x, w));
  }
  template <class T> static VT<T> dcx(VT<T> x, VT<T> w) {
    return T::select(T::lt(x, w), T::set1(1.0f),
                     T::select(T::eq(x, w), T::set1(0.5f), T::zero()));
  }
  template <class T> static VT<T> dcw(VT<T> x, VT<T> w) { return dcx<T>(w, x); }
  // min(x, w) with -0 below +0 (IEEE minimum, as lax.min): the sign of a zero result.
  template <class T> static VT<T> combx(VT<T> x, VT<T> w) { return T::minp(x, w); }
};
// max(x, w) under min.
struct MinMax : MinR {
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) { return T::max(x, w); }
  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) {
    return T::select(T::unord(x), x, T::max(x, w));
  }
  template <class T> static VT<T> dcx(VT<T> x, VT<T> w) {
    return T::select(T::lt(w, x), T::set1(1.0f),
                     T::select(T::eq(x, w), T::set1(0.5f), T::zero()));
  }
  template <class T> static VT<T> dcw(VT<T> x, VT<T> w) { return dcx<T>(w, x); }
  template <class T> static VT<T> combx(VT<T> x, VT<T> w) { return T::maxp(x, w); }
};

// max_min / min_max on order-preserving integer keys of the floats (finite inputs only):
// the same result bit for bit, but integer min/max run on more ports than float min/max.
inline int32_t key_bits(float f) {
  int32_t b;
  std::memcpy(&b, &f, 4);
  return b ^ ((b >> 31) & 0x7fffffff);
}
inline float key_of(float f) {
  const int32_t k = key_bits(f);
  float r;
  std::memcpy(&r, &k, 4);
  return r;
}
// Denormals read as zero of their sign, as the float instructions read them (ffi.cc sets
// DAZ / FTZ for every call): the keys of data go through these, so that the integer-key path
// and the float path give the same bits.
inline float flush_denormal(float f) {
  return __builtin_fabsf(f) < 1.17549435e-38f ? __builtin_copysignf(0.0f, f) : f;
}
inline S::V flush_denormal(S::V v) {
  return S::select(S::lt(S::abs(v), S::set1(1.17549435e-38f)),
                   S::band(v, S::from_bits(0x80000000u)), v);
}
// The key of a data value (the inverse of a key is key_of).
inline float data_key(float f) { return key_of(flush_denormal(f)); }
inline S::V data_key(S::V v) { return S::key(flush_denormal(v)); }
template <bool Max>
struct KeyMinMax {
  static constexpr int kReduce = Max ? 1 : 2;
  static constexpr bool kKeyed = true;
  static constexpr bool kDominated = true;
  static constexpr bool kNanFree = true;
  static float ident() { return key_of(Max ? -__builtin_inff() : __builtin_inff()); }
  template <class T> static VT<T> red(VT<T> a, VT<T> c) {
    return Max ? S::imax(a, c) : S::imin(a, c);
  }
  template <class T> static VT<T> comb(VT<T> x, VT<T> w) {
    return Max ? S::imin(x, w) : S::imax(x, w);
  }
};

// Sums: `step` is acc + combine(x, w) in one fused operation; hx / hw the op's gradient rule
// for x and w (AdderNet's surrogate for adder, the exact ones otherwise).
struct SumR {
  static constexpr int kReduce = 0;
  static constexpr bool kKeyed = false;
  static constexpr bool kDominated = false;
  static constexpr bool kNanFree = true;
  // kMinForm: the forward of -|x - w| may run as AbsViaMin (below) on finite inputs.
  static constexpr bool kMinForm = false;
  static constexpr bool kCentred = false;
  // kOddRule: hw(x, w) == -hx(x, w), so a dense backward computes the rule once per term.
  static constexpr bool kOddRule = false;
  static float ident() { return 0.0f; }
};
// The clips of adder's input rule clip(w - x, -1, 1) (simd.h): ClipKeepNan keeps a NaN
// difference NaN on every instruction set; ClipNoNan may give +-1 for one (AVX-512's one
// vrangeps, where ClipKeepNan takes a max and a min on the add ports), so it serves operands
// whose differences are never NaN: no NaN and no infinity among them.
struct ClipKeepNan {
  template <class T> static VT<T> clip(VT<T> d) { return T::clip1(d); }
};
struct ClipNoNan {
  template <class T> static VT<T> clip(VT<T> d) { return T::clip1_nonan(d); }
};
// -|x - w|, AdderNet: dX = clip(w - x, -1, 1), dW = x - w, the clip by `Clip`. The table's op
// is `Adder`, ClipNoNan's; its backward takes AdderOf<ClipKeepNan> (NanTwin, kernel_sums.h)
// where the instruction set's ClipNoNan drops NaN and an operand is not finite.
template <class Clip>
struct AdderOf : SumR {
  static constexpr bool kMinForm = true;
  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
    return T::fma(T::abs(T::sub(x, w)), T::set1(-1.0f), acc);
  }
  template <class T> static VT<T> clip(VT<T> d) { return Clip::template clip<T>(d); }
  // w - x issued on the FMA ports (exact), leaving the add ports to the clip.
  template <class T> static VT<T> hx(VT<T> x, VT<T> w) { return clip<T>(T::subf(w, x)); }
  template <class T> static VT<T> hw(VT<T> x, VT<T> w) { return T::sub(x, w); }
};
using Adder = AdderOf<ClipNoNan>;
template <class Op>
constexpr bool kIsAdder = false;
template <class Clip>
constexpr bool kIsAdder<AdderOf<Clip>> = true;
// -|x - w| with its exact subgradient: d/dx = -sign(x - w), d/dw = sign(x - w), 0 at x == w.
struct L1 : SumR {
  static constexpr bool kMinForm = true;
  static constexpr bool kOddRule = true;
  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
    return Adder::step<T>(acc, x, w);
  }
  // sign(w - x) is 0 exactly at x == w: the difference of two distinct floats is never 0.
  // w - x on the add ports: the sign (fixupimm) and the backward's fma share the FMA ports
  // (Zen 4, layer A: input and kernel gradients 1.3x faster than with subf; the same bits).
  template <class T> static VT<T> hx(VT<T> x, VT<T> w) { return T::sign0(T::sub(w, x)); }
  template <class T> static VT<T> hw(VT<T> x, VT<T> w) { return hx<T>(w, x); }
};
// The forward of adder and l1 on finite inputs: -|x - w| = 2 min(x, w) - x - w, so the loop
// sums min(x, w) in two vector operations per term (min, add) instead of three, and the tile
// subtracts the window's sums of x and w at the end. Both operands are first shifted by a
// per-(batch, input channel) constant s, the mean of the channel's weights (min(x - s, w - s)
// + s = min(x, w)), so that the three sums cancel only what the data's spread makes them
// cancel: the error is that of a product's sum, eps * sum(|x - s| + |w - s|), not
// eps * sum(|x| + |w|) (data at 100 +- 1 would lose ~1% unshifted).
struct AbsViaMin : SumR {
  static constexpr bool kCentred = true;
  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
    return T::addf(T::min(x, w), acc);
  }
};
// -(x - w)^2, exact; hw(x, w) == -hx(x, w) exactly (both scale x - w by a power of two).
struct L2 : SumR {
  static constexpr bool kOddRule = true;
  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
    const VT<T> d = T::sub(x, w);
    return T::fnma(d, d, acc);
  }
  template <class T> static VT<T> hx(VT<T> x, VT<T> w) {
    return T::mul(T::set1(-2.0f), T::sub(x, w));
  }
  template <class T> static VT<T> hw(VT<T> x, VT<T> w) {
    return T::mul(T::set1(2.0f), T::sub(x, w));
  }
};

template <class Op, bool Safe, class T>
inline VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {
  if constexpr (Op::kReduce == 0) {
    return Op::template step<T>(acc, x, w);
  } else if constexpr (Safe) {
    return Op::template red_safe<T>(acc, Op::template comb_safe<T>(x, w));
  } else {
    return Op::template red<T>(acc, Op::template comb<T>(x, w));
  }
}

template <class Op>
struct KeyOf {
  using type = Op;
};
template <>
struct KeyOf<MaxMin> {
  using type = KeyMinMax<true>;
};
template <>
struct KeyOf<MinMax> {
  using type = KeyMinMax<false>;
};

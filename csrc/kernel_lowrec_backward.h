// The built-in max / min ops' backward on bfloat16 / float16 operands, in one call: the
// operands, y and the cotangent are widened inside the call (no XLA conversions around it),
// kernel_wide_lowwin.h's backward runs on the copies, and dx and dw are rounded to the dtype
// on the way out (as XLA's convert rounds: the same bits as the conversions it replaces).
//
// With the low recording forward's block masks (kernel_lowrec_mark.h: per output, the blocks
// of kernel rows that may hold a product rounding to y), pass 1's scan (low_rec_run) looks
// for each output's winners only in its marked blocks, in kernel-row order, with the scan's
// own compare (low_pass against scan_bound): every winner lies in a marked block, so the
// counts, rows and lists are those of the full scan (low_scan_run), and the routing that
// follows adds the same terms in the same order: the same bits.
//
// Included by kernel_wide_lowwin.h (same namespace and vector width).
#pragma once

#include "kernel_lowrec_convert.h"

// y or g at `at` as float32: widened from the low dtype where the call has it so (y16 / g16).
template <int Rnd>
inline float low_at(const float* f, const uint16_t* h, int64_t at) {
  return h ? low_float(widen_bits<Rnd == jaxconv::kRoundBF16 ? 1 : 2>(h[at])) : f[at];
}

// Whether the gradient rule Gr declares (kFinite) that its partials are finite wherever x and
// w are: a user op's where codegen.py's analysis finds so (kFinitePartials). Not the built-ins
// (constants, finite): in their low_rec_usual loops the check took registers that GCC 12 then
// spilled (AVX-512: 2-5 more stack stores, benchmarks/spill_check.py), so they keep the scan. An output whose cotangent g is zero (or a subnormal, zero under
// DAZ) then has the share g / count = +-0 and adds only +-0 terms to dx and dw, which change a
// sum's bits only where it is -0 (a sum flushed to zero under FTZ): the recorded scan
// (LowWin::skip0) marks such an output as winnerless (-2) without scanning its blocks, and
// low_io_backward runs the scan again without skipping where a gradient ends -0 (a skipped
// +0 term after a -0 sum leaves the sum -0 to the end: no -0 at the end, the same bits).
// A clip under max whose clip runs after the max (factoring.py) on layer A's normal data:
// every output saturates, every cotangent of the product is zero.
template <class Gr, class = void>
struct FiniteRule : std::false_type {};
template <class Gr>
struct FiniteRule<Gr, std::enable_if_t<Gr::kFinite>> : std::true_type {};

// Whether scan_bound<Op, Rnd, Max> is y itself (a min(x, w) under max, a max(x, w) under min).
template <class Op, bool Max>
constexpr bool scan_bound_is_y() {
  return (Op::kComb == 1 && Max) || (Op::kComb == 2 && !Max);
}

// Whether a float16 value y (widened) is finite and above 2^-14, where f16_bounds takes its
// first branch: the bound without its library calls (ldexp, nextafter, the conversion).
inline bool f16_bound_plain(float y) {
  const uint32_t m32 = low_bits(y) & 0x7fffffffu;
  return m32 > 0x38800000u && m32 < 0x7f800000u;
}

// low_bound<kRoundF16, Max>(y) for such a y (f16_bound_plain): f16_bounds' first branch, the
// same bits.
template <bool Max>
inline float f16_bound_normal(float y) {
  const uint32_t u = low_bits(y), m32 = u & 0x7fffffffu;
  const uint32_t half = (m32 >> 13) & 1u ? 0xfffu : 0x1000u;
  const uint32_t a = m32 - half, z = m32 + half;
  const bool neg = (u >> 31) != 0;
  return low_float(Max ? (neg ? z | 0x80000000u : a) : (neg ? a | 0x80000000u : z));
}

// The lanes where a compare of low_pass holds (all bits set there), as bits: one instruction on
// the compare's result, where lane_bits((V)m) read it back as floats and compared them with
// zero (a vector move and a compare per vector more in low_rec_usual's loop).
template <class M>
inline uint32_t true_bits(M m) {
#if JAXCONV_WIDE_BYTES == 64 && defined(__AVX512DQ__)
  return uint32_t(_mm512_movepi32_mask((__m512i)m));
#elif JAXCONV_WIDE_BYTES == 32 && defined(__AVX__)
  return uint32_t(_mm256_movemask_ps((__m256)m));
#elif JAXCONV_WIDE_BYTES == 16 && defined(__SSE2__)
  return uint32_t(_mm_movemask_ps((__m128)m));
#else
  return lane_bits((VecOf<float>)m);
#endif
}

// true_bits(low_pass<Op, Exact, Max>(x, w, bd, 0)): on AVX-512 the compares write mask
// registers straight away (GCC turned the vector of lanes back into a mask: two instructions
// more per vector).
template <class Op, bool Exact, bool Max>
inline uint32_t low_pass_bits(VecOf<float> x, VecOf<float> w, VecOf<float> bd) {
#if JAXCONV_WIDE_BYTES == 64 && defined(__AVX512F__)
  constexpr int kCmp = Max ? _CMP_GE_OS : _CMP_LE_OS;  // as GCC compiles >= and <=
  if constexpr ((Op::kComb == 1 && Max) || (Op::kComb == 2 && !Max)) {
    const __mmask16 mx = _mm512_cmp_ps_mask((__m512)x, (__m512)bd, kCmp);
    return _mm512_mask_cmp_ps_mask(mx, (__m512)w, (__m512)bd, kCmp);
  } else {
    VecOf<float> p;
    if constexpr (Op::kComb == 0) p = add_on_fma(x, w);  // low_pass's block 0
    else p = Op::template comb<float, Exact>(x, w);
    return _mm512_cmp_ps_mask((__m512)p, (__m512)bd, kCmp);
  }
#else
  return true_bits(low_pass<Op, Exact, Max>(x, w, bd, 0));
#endif
}

// Where pass 1's walk over one item's outputs stands: the block of output channels o0, the
// row r and the channel l (pass 1's routing order: blocks of nbw channels, rows, channels).
struct LowRecAt {
  int64_t o0, r, l;
};

// Pass 1's recorded scan of the usual outputs (one marked block, 64 rows of one tap: lw.btab;
// at most one winner), from `at` on, in pass 1's order, up to the first other one (left in
// `at`: true) or the end of rows [r0, r1) (false). A block's products are compared in one
// word of match bits; the output's count, code and scale are written as low_scan_run leaves
// them, and its one winner's input gradient is routed into `dxb`, as pass 1 routes it (the
// same terms in the same order) while its kernel gradient's term takes its scale's place.
// The term waits in a register while the next ones are the same input element (a large x
// wins for many output channels): dx[pend] = ((dx[pend] + t1) + t2) ..., without a
// store-to-load round trip per term. This loop calls nothing: in the loop that also walked
// the other outputs (whose lists' push_back may call operator new, which clobbers every
// vector register) GCC kept that term on the stack, a store and a load per output (and
// 1.4x the float32 pass 1's time on layer A, perf on Zen 4).
//
// A float16 bound that needs f16_bounds' library calls (y zero, below 2^-14, infinite or NaN)
// makes the output one of the others: no call in this loop.
//
// One winner's share g / 1 is g: the same bits wherever it is used (each use is a product or
// a sum, which reads a denormal g as zero under DAZ as the quotient flushes it). Out of line
// (a call per run of usual outputs), so that benchmarks/spill_check.py reads its loop.
template <class Op, class Gr, bool Exact, bool Max, int Rnd>
__attribute__((noinline)) bool low_rec_usual(const LowWin& lw, int64_t grp, int64_t r0, int64_t r1, int64_t nbw,
                   float* dxb, LowRecAt& at) {
  using E = float;
  using V = VecOf<float>;
  constexpr int L = Vt<float>::L;
  const Plan<float>& pl = *lw.f;
  const Geom& g = *pl.g;
  const int64_t I = g.i, T = pl.T, K = pl.K, O = g.o;
  const float* xb = pl.x + lw.b * pl.xs;
  const int64_t yo = lw.b * pl.ys;
  const int32_t* rb = lw.rec + yo;
  // The call's tables and outputs in locals: stores through lw.code and lw.scale would make
  // GCC reload lw's fields for every output.
  const int32_t* const btab = lw.btab;
  const int32_t* const tab = lw.tab;
  const float* const wt = lw.wt;
  const float* const yf = lw.y;
  const float* const gf = lw.gy;
  const uint16_t* const y16 = lw.y16;
  const uint16_t* const g16 = lw.g16;
  float* const scale = lw.scale;
  int32_t* const code = lw.code;
  const bool skip0 = FiniteRule<Gr>::value && lw.skip0;
  const int64_t img = lw.img, P = pl.P, og = pl.og;
  int64_t pend = -1;
  E pval = 0.0f;
  int64_t o0 = at.o0, r = at.r, l = at.l;
  for (; o0 < og; o0 += nbw, r = r0, l = o0) {
    const int64_t le = o0 + nbw < og ? o0 + nbw : og;
    for (; r < r1; ++r, l = o0) {
      const int64_t n = r / P, p = r % P;
      const int32_t* tabp = tab + p * T;
      const float* xn = xb + n * img + grp * I;
      for (; l < le; ++l) {
        const int64_t col = grp * og + l, a = r * O + col, at0 = yo + a;
        E sc = 0.0f;  // its share (one winner: g / 1 is g)
        if constexpr (FiniteRule<Gr>::value) {
          sc = low_at<Rnd>(gf, g16, at0);
          if (skip0 && sc == 0.0f) {  // only +-0 terms
            code[at0] = -2;
            continue;
          }
        }
        const uint32_t mask = uint32_t(rb[a]);
        const int j = __builtin_ctz(mask | 0x80000000u);
        if (mask == 0 || (mask & (mask - 1)) != 0 || btab[2 * j + 1] < 0) {
          if (pend >= 0) dxb[pend] = pval;
          at = LowRecAt{o0, r, l};
          return true;
        }
        const int64_t t = btab[2 * j], i0 = btab[2 * j + 1];
        const int32_t off = tabp[t];
        const float* wo = wt + col * K;
        uint64_t word = 0;
        if (off >= 0) {  // identity padding: never a winner
          const float yv = low_at<Rnd>(yf, y16, at0);
          float bd;
          if constexpr (Rnd == jaxconv::kRoundF16 && !scan_bound_is_y<Op, Max>()) {
            if (!f16_bound_plain(yv)) {  // zero, tiny, infinite or NaN: low_bound's calls
              if (pend >= 0) dxb[pend] = pval;
              at = LowRecAt{o0, r, l};
              return true;
            }
            bd = f16_bound_normal<Max>(yv);
          } else {
            bd = scan_bound<Op, Rnd, Max>(yv);
          }
          const V bv = splat<float>(bd);
          const float* xr = xn + off + i0;
          const float* wr = wo + t * I + i0;
          for (int v = 0; v < 64 / L; ++v) {
            V xv, wv;
            std::memcpy(&xv, xr + v * L, sizeof(V));
            std::memcpy(&wv, wr + v * L, sizeof(V));
            word |= uint64_t(low_pass_bits<Op, Exact, Max>(xv, wv, bv)) << (v * L);
          }
        }
        if (word & (word - 1)) {  // a tie: its list
          if (pend >= 0) dxb[pend] = pval;
          at = LowRecAt{o0, r, l};
          return true;
        }
        if (word == 0) {
          scale[at0] = 0.0f;
          code[at0] = -2;
          continue;
        }
        const int64_t i = i0 + __builtin_ctzll(word);
        code[at0] = int32_t(t * I + i);
        if constexpr (!FiniteRule<Gr>::value) sc = low_at<Rnd>(gf, g16, at0);
        const int64_t xa = n * img + off + grp * I + i;
        const E ws = wo[t * I + i];
        const E xs = xb[xa];
        if (xa != pend) {
          if (pend >= 0) dxb[pend] = pval;
          pend = xa;
          pval = dxb[xa];
        }
        pval += sc * Gr::template dx<E>(splat<E>(xs), splat<E>(ws))[0];
        scale[at0] = sc * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
      }
    }
  }
  if (pend >= 0) dxb[pend] = pval;
  at = LowRecAt{o0, r, l};
  return false;
}

// Pass 1's recorded scan of one output that low_rec_usual leaves (several marked blocks, a
// block that is not 64 rows of one tap, a tie): its blocks walked tap by tap, its winners'
// rows in kernel-row order, its count, code and scale (and its list of rows where it has
// several winners), its input gradient's terms straight to `dxb`, as pass 1 routes them.
// Out of line: its push_back calls stay out of low_rec_usual's loop.
template <class Op, class Gr, bool Exact, bool Max, int Rnd>
__attribute__((noinline)) void low_rec_other(const LowWin& lw, std::vector<int32_t>& list,
                                             std::vector<int32_t>& rows, int64_t grp,
                                             int64_t r, int64_t l, float* dxb) {
  using E = float;
  using V = VecOf<float>;
  constexpr int L = Vt<float>::L;
  const Plan<float>& pl = *lw.f;
  const Geom& g = *pl.g;
  const int64_t I = g.i, T = pl.T, K = pl.K, O = g.o, kb = lw.kb;
  const float* xb = pl.x + lw.b * pl.xs;
  const int64_t yo = lw.b * pl.ys;
  const int64_t n = r / pl.P, p = r % pl.P;
  const int32_t* tabp = lw.tab + p * T;
  const float* xn = xb + n * lw.img + grp * I;
  const int64_t col = grp * pl.og + l, at0 = yo + r * O + col;
  if (FiniteRule<Gr>::value && lw.skip0 && low_at<Rnd>(lw.gy, lw.g16, at0) == 0.0f) {
    lw.code[at0] = -2;  // only +-0 terms (FiniteRule)
    return;
  }
  const float bd = scan_bound<Op, Rnd, Max>(low_at<Rnd>(lw.y, lw.y16, at0));
  const V bv = splat<float>(bd);
  const float* wo = lw.wt + col * K;
  const uint32_t mask = uint32_t(lw.rec[at0]);
  rows.clear();
  for (uint32_t m = mask; m; m &= m - 1) {
    const int64_t k0 = int64_t(__builtin_ctz(m)) * kb, k1 = k0 + kb < K ? k0 + kb : K;
    for (int64_t t = k0 / I; t * I < k1; ++t) {
      const int32_t off = tabp[t];
      if (off < 0) continue;  // identity padding: never a winner
      const float* xr = xn + off;
      const float* wr = wo + t * I;
      const int64_t ia = k0 > t * I ? k0 - t * I : 0;
      const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
      int64_t i = ia;
      for (; i + L <= ie; i += L) {
        V xv, wv;
        std::memcpy(&xv, xr + i, sizeof(V));
        std::memcpy(&wv, wr + i, sizeof(V));
        for (uint32_t bits = low_pass_bits<Op, Exact, Max>(xv, wv, bv); bits;
             bits &= bits - 1)
          rows.push_back(int32_t(t * I + i + __builtin_ctz(bits)));
      }
      for (; i < ie; ++i)
        if (low_hit<Op, Exact, Max>(xr[i], wr[i], bd)) rows.push_back(int32_t(t * I + i));
    }
  }
  const int64_t c = int64_t(rows.size());
  const E sc = c > 0 ? low_at<Rnd>(lw.gy, lw.g16, at0) / float(c) : 0.0f;
  lw.scale[at0] = sc;
  for (const int32_t k : rows) {
    const int64_t t = lw.kt[2 * k], i = lw.kt[2 * k + 1];
    const int64_t at = n * lw.img + tabp[t] + grp * I + i;
    const E ws = wo[k];
    if (c == 1) {
      const E xs = xb[at];
      dxb[at] += sc * Gr::template dx<E>(splat<E>(xs), splat<E>(ws))[0];
      lw.scale[at0] = sc * Gr::template dw<E>(splat<E>(xs), splat<E>(ws))[0];
    } else {
      dxb[at] += sc * Gr::template dx<E>(splat<E>(xb[at]), splat<E>(ws))[0];
    }
  }
  if (c <= 1) {
    lw.code[at0] = c == 0 ? -2 : rows[0];
    return;
  }
  lw.code[at0] = low_list_code(list.size());
  list.push_back(int32_t(c));
  list.insert(list.end(), rows.begin(), rows.end());
  // Then each winner's kernel gradient term, as pass 2 would form it (its scale sc, the same
  // x and w; float bits): pass 2 adds them without reading x, w and the row tables again (a
  // chain of dependent loads per winner, out of cache by then; a bfloat16 min_max of layer A
  // ties at 1.5% of its outputs, and those loads were a quarter of its pass 2).
  for (const int32_t k : rows) {
    const int64_t t = lw.kt[2 * k], i = lw.kt[2 * k + 1];
    const E xs = xb[n * lw.img + tabp[t] + grp * I + i];
    list.push_back(int32_t(low_bits(sc * Gr::template dw<E>(splat<E>(xs), splat<E>(wo[k]))[0])));
  }
}

// Pass 1's recorded scan of rows [r0, r1) of batch element lw.b, the group's columns: each
// output's count, code and scale (and list of rows where it has several winners), as
// low_scan_run leaves them, and each output's input gradient routed into `dxb` as pass 1
// routes it (the same terms in the same order). The outputs go in pass 1's routing order
// (blocks of nbw output channels, rows, channels): runs of usual ones (low_rec_usual), each
// other one on its own (low_rec_other), whose terms go straight to dx.
template <class Op, class Gr, bool Exact, bool Max, int Rnd>
void low_rec_run(const LowWin& lw, std::vector<int32_t>& list, std::vector<int32_t>& rows,
                 int64_t grp, int64_t r0, int64_t r1, int64_t nbw, float* dxb) {
  LowRecAt at{0, r0, 0};
  while (low_rec_usual<Op, Gr, Exact, Max, Rnd>(lw, grp, r0, r1, nbw, dxb, at)) {
    low_rec_other<Op, Gr, Exact, Max, Rnd>(lw, list, rows, grp, at.r, at.l, dxb);
    ++at.l;
  }
}

// Buffers reused from call to call (the low backward's float32 copies, gradients, scales and
// codes; sizes in bytes): fresh ones of layer A's size cost thousands of page faults per call.
// A call takes a free buffer large enough (or allocates one) and gives it back when it ends;
// at most kLowKeep are kept.
class LowBuf {
 public:
  explicit LowBuf(size_t n) : n_(n) {
    {
      std::lock_guard<std::mutex> lock(mu());
      auto& fr = free_list();
      for (size_t i = 0; i < fr.size(); ++i)
        if (fr[i].second >= n) {
          buf_ = std::move(fr[i].first);
          n_ = fr[i].second;
          fr.erase(fr.begin() + std::ptrdiff_t(i));
          return;
        }
    }
    buf_.reset(new unsigned char[n > 0 ? n : 1]);
  }
  ~LowBuf() {
    if (!buf_) return;
    std::lock_guard<std::mutex> lock(mu());
    auto& fr = free_list();
    if (fr.size() < kLowKeep) fr.emplace_back(std::move(buf_), n_);
  }
  LowBuf(const LowBuf&) = delete;
  LowBuf& operator=(const LowBuf&) = delete;
  template <class T = float>
  T* get() {
    return reinterpret_cast<T*>(buf_.get());
  }

 private:
  static constexpr size_t kLowKeep = 12;
  static std::mutex& mu() {
    static std::mutex m;
    return m;
  }
  static std::vector<std::pair<std::unique_ptr<unsigned char[]>, size_t>>& free_list() {
    static std::vector<std::pair<std::unique_ptr<unsigned char[]>, size_t>> f;
    return f;
  }
  std::unique_ptr<unsigned char[]> buf_;
  size_t n_;
};

// n values in parallel chunks: f(a, len) for each chunk.
template <class F>
void low_chunks(const WideCall& call, int64_t n, F&& f) {
  constexpr int64_t kChunk = 1 << 15;
  struct Job {
    F* f;
    int64_t n;
  } job{&f, n};
  auto run = [](void* arg, int64_t it) {
    const Job& j = *static_cast<const Job*>(arg);
    const int64_t a = it * kChunk, len = a + kChunk < j.n ? kChunk : j.n - a;
    (*j.f)(a, len);
  };
  call.par.run(call.par.ctx, (n + kChunk - 1) / kChunk, run, &job);
}

// Whether one of the n float32 values at v is -0 (in parallel chunks).
inline bool low_neg_zero(const WideCall& call, const float* v, int64_t n) {
  std::atomic<bool> any{false};
  low_chunks(call, n, [v, &any](int64_t a, int64_t len) {
    uint32_t hit = 0;
    for (int64_t j = a; j < a + len; ++j) hit |= uint32_t(low_bits(v[j]) == 0x80000000u);
    if (hit) any.store(true, std::memory_order_relaxed);
  });
  return any.load();
}

template <class Op, class Gr, bool Max, int Rnd>
int low_win_backward(const WideCall& call, bool skip0);

#include "kernel_lowdense_backward.h"

// The backward of a call whose x, w, dx and dw are in the low dtype (call.low_x; y and g in
// it or in float32): float32 copies in, kernel_wide_lowwin.h's backward (recorded where
// call.rec has masks), dx and dw rounded out.
template <class Op, class Gr, bool Max, int Rnd>
int low_io_backward(const WideCall& call) {
  // A dense x + w whose record holds exact winner codes: their scatter.
  if (const int rc = lowdense_backward<Op, Gr, Max, Rnd>(call); rc >= 0) return rc;
  constexpr int Kind = Rnd == jaxconv::kRoundBF16 ? 1 : 2;
  const Geom& g = call.geom;
  const int64_t nx = call.batch * g.n * g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  const int64_t nw = call.batch * g.k[0] * g.k[1] * g.k[2] * g.i * g.o;
  const int64_t ny = call.batch * g.n * g.os[0] * g.os[1] * g.os[2] * g.o;
  // The recorded scan reads y and g in the low dtype itself (low_at); the full scan's bounds
  // and shares read float32 copies.
  const bool recorded = call.rec && call.rec[0] >= 0 && !g.has_pad;
  const bool wide_y = call.low_y && !recorded, wide_g = call.low_g && !recorded;
  std::unique_ptr<LowBuf> x32, w32, y32, g32, dx32, dw32;
  try {
    x32.reset(new LowBuf(sizeof(float) * size_t(nx)));
    w32.reset(new LowBuf(sizeof(float) * size_t(nw)));
    if (wide_y) y32.reset(new LowBuf(sizeof(float) * size_t(ny)));
    if (wide_g) g32.reset(new LowBuf(sizeof(float) * size_t(ny)));
    dx32.reset(new LowBuf(sizeof(float) * size_t(nx)));
    dw32.reset(new LowBuf(sizeof(float) * size_t(nw)));
  } catch (...) {
    return 2;
  }
  auto widen = [](const void* src, float* dst) {
    return [src, dst](int64_t a, int64_t len) {
      widen_run<Kind>(static_cast<const uint16_t*>(src) + a, dst + a, len);
    };
  };
  low_chunks(call, nx, widen(call.x, x32->get()));
  low_chunks(call, nw, widen(call.w, w32->get()));
  if (y32) low_chunks(call, ny, widen(call.y, y32->get()));
  if (g32) low_chunks(call, ny, widen(call.g, g32->get()));
  float* dx = dx32->get();
  float* dw = dw32->get();
  WideCall c32 = call;
  c32.x = x32->get();
  c32.w = w32->get();
  c32.y = y32 ? y32->get() : call.y;
  c32.g = g32 ? g32->get() : call.g;
  c32.out = dx;
  c32.out2 = dw;
  c32.low_x = 0;
  c32.low_y = y32 ? 0 : call.low_y;
  c32.low_g = g32 ? 0 : call.low_g;
  c32.zero_dx = c32.zero_dw = true;  // the scratch gradients, zeroed by the pass (wide.h)
  const bool skip0 = FiniteRule<Gr>::value && recorded;
  int rc = low_win_backward<Op, Gr, Max, Rnd>(c32, skip0);
  if (rc != 0) return rc;
  if (skip0 && (low_neg_zero(call, dx, nx) || low_neg_zero(call, dw, nw))) {
    // A -0 gradient: a skipped +0 term may have made it +0 (FiniteRule). Rare (a sum flushed
    // to zero under FTZ): the scan again, every output's terms added (the pass zeroes dx
    // itself and writes every dw entry: zero_dx above).
    rc = low_win_backward<Op, Gr, Max, Rnd>(c32, false);
    if (rc != 0) return rc;
  }
  auto narrow = [](const float* src, void* dst) {
    return [src, dst](int64_t a, int64_t len) {
      narrow_run<Kind>(src + a, static_cast<uint16_t*>(dst) + a, len);
    };
  };
  low_chunks(call, nx, narrow(dx, call.out));
  low_chunks(call, nw, narrow(dw, call.out2));
  return 0;
}

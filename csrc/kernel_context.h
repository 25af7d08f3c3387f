// The per-call context: the canonical sizes, the tap table, the scratch the passes share (owned
// by the context), the fork-join over XLA's pool and the predicates that pick a loop.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// Register tile and panel sizes of the instruction set.
constexpr int MR = S::MR, NV = S::NV, W = S::W, NR = NV * W;
constexpr int64_t kTilesPerItem = 16;  // depthwise

// A kernel block too large for L2 is cut into KC-row panels (NR wide, packed, in L1); between
// panels a tile's accumulators wait in `accs`. Each output still combines its taps in
// ascending k.
constexpr int64_t KC = 4096 / NR;

// ---- scratch memory --------------------------------------------------------------------------
// Owned scratch: freed by its owner's destructor on every path (no manual free).
struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};
template <class T>
using Owned = std::unique_ptr<T[], FreeDeleter>;

// n elements of uninitialised scratch (at least one, so that empty problems allocate too);
// empty on failure.
template <class T>
Owned<T> allocate(int64_t n) {
  return Owned<T>(static_cast<T*>(std::malloc(sizeof(T) * size_t(n > 0 ? n : 1))));
}

// The scratch of one call: `get` hands out views of buffers it owns until the call ends.
class Scratch {
 public:
  template <class T>
  T* get(int64_t n) {
    if (used_ == kSlots) return nullptr;
    Owned<unsigned char> b(static_cast<unsigned char*>(
        std::malloc(sizeof(T) * size_t(n > 0 ? n : 1))));
    T* p = reinterpret_cast<T*>(b.get());
    if (p) slots_[used_++] = std::move(b);
    return p;
  }

 private:
  static constexpr int kSlots = 16;
  Owned<unsigned char> slots_[kSlots];
  int used_ = 0;
};

// ---- per-call context ----------------------------------------------------------------------
struct Ctx {
  const jaxconv::Call* call;
  jaxconv::Geom g;
  int64_t T, I, O, G, Og, C, OS, P, img, K, NR, nJB;
  int64_t x_bs, w_bs, y_bs;
  int32_t* tab;   // (OS, T): offset of each tap's input row in its image, -1 where padded
  float* padrow;  // C + W floats: the pad value (or 0, never combined, with identity padding)
  float* wpack;   // backward: packed weights (winner scan, sums' input gradient)
  int32_t* code;  // winner backward: (batch, P, O) the winning tap, -1 tied, -2 none
  float* dwv;     // winner backward: (batch, P, O) a unique winner's dw term g * dcw(x, w)
  // The min form's centring (see centre()): per (batch, channel) shifts, the shifted x and pad
  // rows, and the sums of each input cell's (and the pad row's) shifted channels per group.
  float* shift;   // (batch, C)
  float* xsh;     // like x
  float* padsh;   // (batch, C + NR)
  float* csum;    // (batch, cells, G)
  float* padsum;  // (batch, G)
  int32_t* ctab;  // like tab: the input cell (tab / C), -1 where padded
  float* xkey;    // a keyed forward: the integer keys of x (kernel_afwd_keys.h), or null
  int64_t cells;  // input cells per batch entry: N * D * H * W
  bool safe;      // max/min with a non-finite input or pad value: NaN-propagating loop
  bool finite;    // !safe
  bool failed;    // a scratch allocation failed: the call reports out of memory
  bool unbounded;  // the min form packed a weight beyond kCentreBound: run the exact loop
  bool w_nonfinite;  // the forward packed a NaN or an infinity (kernel_densefwd_wcheck.h)
  jaxconv::Params prm;  // the tuning parameters of this call (kernel_params.h)
  Scratch scratch;  // owns every buffer above (the pointers are views)
};

// The image and the output position of rows p .. p + R - 1 of a tile (`live`: the row is
// inside the problem; a dead row reads image 0, position 0 and is never stored).
template <int R>
struct TileRows {
  int64_t nimg[R], osi[R];
  bool live[R];
  TileRows(const Ctx& c, int64_t p) {
    for (int r = 0; r < R; ++r) {
      live[r] = p + r < c.P;
      nimg[r] = live[r] ? (p + r) / c.OS : 0;
      osi[r] = live[r] ? (p + r) % c.OS : 0;
    }
  }
};

void build_table(Ctx& c) {
  const jaxconv::Geom& g = c.g;
  int64_t t = 0;
  for (int64_t k0 = 0; k0 < g.k[0]; ++k0)
    for (int64_t k1 = 0; k1 < g.k[1]; ++k1)
      for (int64_t k2 = 0; k2 < g.k[2]; ++k2, ++t) {
        const int64_t kk[3] = {k0, k1, k2};
        int64_t s = 0;
        for (int64_t o0 = 0; o0 < g.os[0]; ++o0)
          for (int64_t o1 = 0; o1 < g.os[1]; ++o1)
            for (int64_t o2 = 0; o2 < g.os[2]; ++o2, ++s) {
              const int64_t oo[3] = {o0, o1, o2};
              int64_t idx[3];
              bool ok = true;
              for (int d = 0; d < 3; ++d) {
                int64_t q = oo[d] * g.stride[d] + kk[d] * g.rd[d] - g.lo[d];
                if (q < 0 || q > (g.sp[d] - 1) * g.ld[d] || q % g.ld[d] != 0) ok = false;
                idx[d] = ok ? q / g.ld[d] : 0;
              }
              c.tab[s * c.T + t] =
                  ok ? int32_t(((idx[0] * g.sp[1] + idx[1]) * g.sp[2] + idx[2]) * g.c) : -1;
            }
      }
}

template <class F>
void parallel(const Ctx& c, int64_t n, F& f) {
#ifdef JAXCONV_PROFILE
  timespec t0, t1, u0, u1;
  clock_gettime(CLOCK_MONOTONIC, &t0);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &u0);
#endif
  c.call->par.run(
      c.call->par.ctx, n, [](void* a, int64_t i) { (*static_cast<F*>(a))(i); }, &f);
#ifdef JAXCONV_PROFILE
  clock_gettime(CLOCK_MONOTONIC, &t1);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &u1);
  fprintf(stderr, "parallel n=%ld %.3f ms (caller cpu %.3f ms)\n", (long)n,
          (t1.tv_sec - t0.tv_sec) * 1e3 + (t1.tv_nsec - t0.tv_nsec) * 1e-6,
          (u1.tv_sec - u0.tv_sec) * 1e3 + (u1.tv_nsec - u0.tv_nsec) * 1e-6);
#endif
}

template <class Op>
constexpr bool keyed() { return Op::kKeyed; }

inline bool finite(float v) { return __builtin_fabsf(v) <= 3.4028234663852886e38f; }
// One input and one output channel per group: the depthwise loop (vectors over channels).
inline bool depthwise(const Ctx& c) { return c.I == 1 && c.Og == 1; }
template <class Op>
constexpr bool centred() {
  if constexpr (Op::kReduce == 0) return Op::kCentred;
  else return false;
}

// The input cell (or pad row) that tap t reads for output position (n, osi), group grp.
inline const float* cell(const Ctx& c, const float* xb, int64_t n, int64_t osi, int64_t t,
                         int64_t grp) {
  const int32_t off = c.tab[osi * c.T + t];
  if (off < 0) return c.g.has_pad ? c.padrow + grp * c.I : nullptr;
  return xb + n * c.img + off + grp * c.I;
}

// Whether all n floats at p and all m at q are finite: one vector scan of both, shared
// between the threads (one fork-join, not one per operand).
bool all_finite(const Ctx& c, const float* p, int64_t n, const float* q, int64_t m) {
  constexpr int64_t kChunk = 1 << 15;
  const int64_t np = (n + kChunk - 1) / kChunk;
  std::atomic<int> bad{0};
  auto scan = [&](int64_t it) {
    const float* src = it < np ? p : q;
    const int64_t len = it < np ? n : m;
    const int64_t a = (it < np ? it : it - np) * kChunk, e = a + kChunk < len ? a + kChunk : len;
    S::M ok = S::mtrue();
    int64_t j = a;
    for (; j + W <= e; j += W) ok = S::mand(ok, S::isfinite_m(S::load(src + j)));
    bool fin = !S::any(S::mnot(ok));
    for (; j < e; ++j) fin &= finite(src[j]);
    if (!fin) bad.store(1, std::memory_order_relaxed);
  };
  parallel(c, np + (m + kChunk - 1) / kChunk, scan);
  return bad.load(std::memory_order_relaxed) == 0;
}

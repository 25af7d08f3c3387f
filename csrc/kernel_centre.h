// The min form's centring (adder / l1 forward on bounded finite data): per-channel shifts and
// the window sums, in fixed lanes so that every instruction set gives the same bits.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// A sum in 16 fixed lanes, the same bits on every instruction set (the compiler vectorizes
// the lane loop but may not reorder it), so that the min form's result does not depend on it.
struct Lanes {
  float l[16] = {};
  void add(const float* p, int64_t n) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
      for (int k = 0; k < 16; ++k) l[k] += p[j + k];
    for (int k = 0; j < n; ++j, ++k) l[k] += p[j];
  }
  // Adds p - sub over [0, n), storing the differences to dst.
  void add_diff(const float* __restrict p, const float* __restrict sub, float* __restrict dst,
                int64_t n) {
    float a[16];
    for (int k = 0; k < 16; ++k) a[k] = l[k];
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
      for (int k = 0; k < 16; ++k) {
        const float d = p[j + k] - sub[j + k];
        dst[j + k] = d;
        a[k] += d;
      }
    for (int k = 0; j < n; ++j, ++k) {
      const float d = p[j] - sub[j];
      dst[j] = d;
      a[k] += d;
    }
    for (int k = 0; k < 16; ++k) l[k] = a[k];
  }
  float total() const {
    float t[8];
    for (int k = 0; k < 8; ++k) t[k] = l[k] + l[k + 8];
    for (int k = 0; k < 4; ++k) t[k] += t[k + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
  }
};

// The min form runs only on data of magnitude at most kCentreBound = 2^96: then every shifted
// value is below 2^97, and 2 sum min(x, w) - sum x - sum w over up to 2^29 terms stays below
// 2^128 (finite), so no step can overflow where the direct loop would not (3e38 - (-3e38)
// must give -inf only where |x - w| itself overflows). Larger data, NaN and infinities take
// the direct loop.
constexpr float kCentreBound = 7.9228163e28f;  // 2^96

// Whether all n floats at p have magnitude at most kCentreBound (false for NaN).
inline bool bounded(const float* p, int64_t n) {
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) ok &= __builtin_fabsf(p[j]) <= kCentreBound;
  return ok;
}
// bounded() a vector at a time (the compiler keeps the scalar loop scalar).
inline bool bounded_v(const float* p, int64_t n) {
  S::M ok = S::mtrue();
  int64_t j = 0;
  for (; j + W <= n; j += W) ok = S::mand(ok, S::le(S::abs(S::load(p + j)), S::set1(kCentreBound)));
  return !S::any(S::mnot(ok)) && bounded(p + j, n - j);
}

// The shift of an input channel is the mean of its weights over every tap and the first
// kShiftCols output channels of its group: any shift is exact algebra (min(x - s, w - s) + s =
// min(x, w)), and a sample's mean centres the data as well as the full mean, without a pass over
// a large kernel (dense 1024 x 1024: a 4 MiB read, 6% of the forward). Up to 64 output channels
// per group (every layer with Og <= 64) the sample is the whole kernel.
constexpr int64_t kShiftCols = 64;

// The min form's centring (see AbsViaMin): fills c.shift, c.xsh, c.padsh, c.csum and c.padsum.
// Returns false (the exact loop runs) when an input, a sampled weight or the pad value is not
// finite or larger than kCentreBound, or when scratch cannot be allocated. The rest of the
// kernel is checked as the forward packs it (pack_panel; c.unbounded sends the call back to
// the exact loop).
bool centre(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t B = call.batch, C = c.C, I = c.I, G = c.G, Og = c.Og, O = c.O;
  if (c.g.has_pad && !(__builtin_fabsf(c.g.pad) <= kCentreBound)) return false;
  if (c.K >= (int64_t(1) << 29)) return false;
  c.cells = c.x_bs / C;
  c.shift = c.scratch.get<float>(B * C);
  c.xsh = c.scratch.get<float>(B * c.x_bs + W);
  c.padsh = c.scratch.get<float>(B * (C + NR));
  c.csum = c.scratch.get<float>(B * c.cells * G);
  c.padsum = c.scratch.get<float>(B * G);
  c.ctab = c.scratch.get<int32_t>(c.OS * c.T);
  if (!c.shift || !c.xsh || !c.padsh || !c.csum || !c.padsum || !c.ctab) return false;
  for (int64_t j = 0; j < c.OS * c.T; ++j) c.ctab[j] = c.tab[j] < 0 ? -1 : int32_t(c.tab[j] / C);
  std::atomic<int> bad{0};
  // Shifts: the mean over taps and the group's first kShiftCols output channels, per
  // (batch, channel).
  const int64_t ns = Og < kShiftCols ? Og : kShiftCols;
  constexpr int64_t kRows = 16;
  const int64_t nib = (I + kRows - 1) / kRows;
  auto mean = [&](int64_t it) {
    const int64_t ib = it % nib, grp = (it / nib) % G, b = it / (nib * G);
    const float* wb = call.w + b * c.w_bs + grp * Og;
    const int64_t i1 = (ib + 1) * kRows < I ? (ib + 1) * kRows : I;
    // Rows far apart (dense 1024 x 1024: one 256-byte strip per 4 KiB page, which the
    // prefetchers do not follow): ask for the item's strips first, so that their reads overlap.
    if (O > 2 * NR)
      for (int64_t i = ib * kRows; i < i1; ++i)
        for (int64_t t = 0; t < c.T; ++t)
          for (int64_t l = 0; l < ns; l += 64 / int64_t(sizeof(float)))
            __builtin_prefetch(wb + (t * I + i) * O + l);
    for (int64_t i = ib * kRows; i < i1; ++i) {
      Lanes acc;
      bool ok = true;
      for (int64_t t = 0; t < c.T; ++t) {
        acc.add(wb + (t * I + i) * O, ns);
        ok &= bounded_v(wb + (t * I + i) * O, ns);
      }
      const float m = acc.total() / float(c.T * ns);
      if (!ok) bad.store(1, std::memory_order_relaxed);
      c.shift[b * C + grp * I + i] = m;
    }
  };
  // A small kernel (layer A's: 37K floats, some microseconds) is averaged by the caller alone:
  // a fork-join for it costs more than it saves, and waits on a descheduled helper.
  if (B * c.w_bs <= (int64_t(1) << 16)) {
    for (int64_t it = 0; it < B * G * nib; ++it) mean(it);
  } else {
    parallel(c, B * G * nib, mean);
  }
  if (bad.load()) return false;
  // The shifted input and each cell's sums per group.
  const int64_t kCells = C >= (1 << 14) ? 1 : (1 << 14) / C;  // ~64 KB of x per item
  const int64_t ncb = (c.cells + kCells - 1) / kCells;
  // A bfloat16 / float16 x (run_low leaves call.x null, kernel_lowtile_minform.h) is widened
  // a cell at a time into `row`, in L1: no float32 copy of x is made.
  const jaxconv::LowIO* low = call.x ? nullptr : call.low;
  auto shift_x = [&](int64_t it) {
    const int64_t b = it / ncb, q0 = (it % ncb) * kCells;
    const int64_t q1 = q0 + kCells < c.cells ? q0 + kCells : c.cells;
    const float* sh = c.shift + b * C;
    bool fin = true;
    Owned<float> row = low ? allocate<float>(C) : Owned<float>();
    if (low && !row) {
      bad.store(1, std::memory_order_relaxed);
      return;
    }
    for (int64_t q = q0; q < q1; ++q) {
      const float* src = low ? row.get() : call.x + b * c.x_bs + q * C;
      if (low) lowtile_widen(low->kind, low->x16 + b * c.x_bs + q * C, row.get(), C);
      float* dst = c.xsh + b * c.x_bs + q * C;
      fin &= bounded_v(src, C);
      for (int64_t grp = 0; grp < G; ++grp) {
        Lanes acc;
        acc.add_diff(src + grp * I, sh + grp * I, dst + grp * I, I);
        const float sum = acc.total();
        fin &= finite(sum);
        c.csum[(b * c.cells + q) * G + grp] = sum;
      }
    }
    if (!fin) bad.store(1, std::memory_order_relaxed);
  };
  parallel(c, B * ncb, shift_x);
  if (bad.load()) return false;
  for (int64_t b = 0; b < B; ++b) {
    float* pr = c.padsh + b * (C + NR);
    for (int64_t j = 0; j < C + NR; ++j) pr[j] = c.padrow[j] - (j < C ? c.shift[b * C + j] : 0.0f);
    for (int64_t grp = 0; grp < G; ++grp) {
      Lanes acc;
      acc.add(pr + grp * I, I);
      c.padsum[b * G + grp] = acc.total();
    }
  }
  return true;
}

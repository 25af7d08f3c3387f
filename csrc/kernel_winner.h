// The backward pass of max / min ops: each output's winning tap found by a vector scan that
// matches the forward bit for bit, the cotangent routed to it (ties split equally).
//
// Why a rescan and not an index recorded by the forward (as tropical-gemm does): ties must
// be split, so a forward that identifies the winner tracks the first and the last maximal
// tap (compare >, compare >=, three blends per term, and three registers per output vector,
// so a 2-row tile). Measured on Zen 4 (AVX-512, per output vector and tap): plain forward
// 0.37 ns, this scan 0.54 ns, forward with first + last index 1.03 ns: recording costs as
// much as the forward plus the scan, and adds an int32 output. (First index only, ties
// ignored: 0.66 ns.)
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// ---- backward: max / min (the cotangent goes to the winning taps, ties split equally) ------

// Kernel column o of the packed block, as col[k * NR] (an integer key when keyed).
inline float wcol_at(const float* col, int64_t k, bool keys) {
  return keys ? key_of(col[k * NR]) : col[k * NR];
}

// Scalar pass over one output's window: the number of taps whose product equals y. `col` is
// the output's kernel column in the packed weights (see wcol_at).
template <class Op>
int64_t count_ties(const Ctx& c, const float* xb, const float* col, bool keys, int64_t n,
                   int64_t osi, int64_t grp, float yv) {
  int64_t cnt = 0;
  for (int64_t t = 0; t < c.T; ++t) {
    const float* xr = cell(c, xb, n, osi, t, grp);
    if (!xr) continue;
    for (int64_t i = 0; i < c.I; ++i)
      cnt += Op::template comb<Sc>(xr[i], wcol_at(col, t * c.I + i, keys)) == yv;
  }
  return cnt;
}

// count_ties, and the last matching kernel row in *last.
template <class Op>
int64_t float_ties(const Ctx& c, const float* xb, const float* col, bool keys, int64_t n,
                   int64_t osi, int64_t grp, float yv, int64_t* last) {
  int64_t cnt = 0;
  for (int64_t t = 0; t < c.T; ++t) {
    const float* xr = cell(c, xb, n, osi, t, grp);
    if (!xr) continue;
    for (int64_t i = 0; i < c.I; ++i)
      if (Op::template comb<Sc>(xr[i], wcol_at(col, t * c.I + i, keys)) == yv) {
        ++cnt;
        *last = t * c.I + i;
      }
  }
  return cnt;
}

// Vector scan of R output positions' windows, kernel rows k0..k1 (at most KS: a panel of the
// packed block of NR output channels): how many products equal y (the forward result, bit for
// bit) and the last tap that does, accumulated into cnt / idx (R rows of NR). Matching with the
// fast combine is exact: a NaN anywhere in the window makes y NaN, matching nothing. Keyed ops
// (max_min, min_max) scan on the integer keys of x, w, y and the pad value.
// Within the panel one sum holds both: each match adds kBig + (k - k0), so the sum is
// m * kBig + (less than kBig) for m matches and names the tap when m == 1 (all exact in f32).
constexpr float kBig = 4096.0f;
constexpr int64_t KS = 64;  // kernel rows per scanned panel
static_assert(KS * KS <= 4096, "a panel's tap offsets must sum below kBig");

// The combine of scanned lane block `j`. A sum `x + w` is issued alternately on the FMA ports
// (fma(x, 1, w), the forward's form) and the add ports: the compare and the masked add of the
// scan already load the ports the forward leaves free, so one form alone makes the scan wait on
// its ports (measured on Zen 4: 1.9x the forward's time per tap, 1.5x alternated). Both forms
// round once: the same bits.
template <class Op>
inline S::V scan_comb(S::V x, S::V w, int j) {
  if constexpr (std::is_same_v<Op, MaxPlus> || std::is_same_v<Op, MinPlus>) {
    if (j & 1) return S::add(x, w);
  }
  return Op::template comb<S>(x, w);
}

template <class Op, int R, bool Masked>
inline void win_scan_taps(const float* const* xr, const S::M* km, const float* wr, int64_t ni,
                          float kv0, const S::V (&yv)[R][NV], S::V (&acc)[R][NV]) {
  using V = S::V;
  const V one = S::set1(1.0f);
  V kv = S::set1(kv0);
  for (int64_t i = 0; i < ni; ++i) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = S::load(wr + i * NR + v * W);
    for (int r = 0; r < R; ++r) {
      const V xs = S::set1(xr[r][i]);
      for (int v = 0; v < NV; ++v) {
        const V cv = scan_comb<Op>(xs, wv[v], r * NV + v);
        S::M e = keyed<Op>() ? S::ieq(cv, yv[r][v]) : S::eq(cv, yv[r][v]);
        if constexpr (Masked) e = S::mand(e, km[r]);
        acc[r][v] = S::madd(e, acc[r][v], kv);
      }
    }
    kv = S::add(kv, one);
  }
}

template <class Op, int R>
void win_scan(const Ctx& c, const float* xb, const float* pad, const float* panel, int64_t k0,
              int64_t k1, const int64_t* n, const int64_t* osi, int64_t grp, const float* ys,
              float* cs, float* is) {
  using V = S::V;
  const int64_t I = c.I;
  V yv[R][NV], acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      yv[r][v] = S::load(ys + r * NR + v * W);
      acc[r][v] = S::zero();
    }
  for (int64_t t = k0 / I; t * I < k1; ++t) {
    const int64_t ia = k0 > t * I ? k0 - t * I : 0;
    const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
    const float* xr[R];
    S::M km[R];
    bool all = true, none = true;
    for (int r = 0; r < R; ++r) {
      const int32_t off = c.tab[osi[r] * c.T + t];
      const bool on = off >= 0 || c.g.has_pad;
      xr[r] = (off < 0 ? pad + grp * I : xb + n[r] * c.img + off + grp * I) + ia;
      km[r] = S::mask(on);
      all &= on;
      none &= !on;
    }
    if (none) continue;
    const float* wr = panel + (t * I + ia - k0) * NR;
    const float kv0 = kBig + float(t * I + ia - k0);
    if (all)
      win_scan_taps<Op, R, false>(xr, km, wr, ie - ia, kv0, yv, acc);
    else
      win_scan_taps<Op, R, true>(xr, km, wr, ie - ia, kv0, yv, acc);
  }
  const V inv = S::set1(1.0f / kBig), one = S::set1(1.0f);
  const V base = S::set1(float(k0) - kBig);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) {
      const V m = S::floor(S::mul(acc[r][v], inv));
      const S::M uniq = S::eq(m, one);
      S::store(cs + r * NR + v * W, S::add(S::load(cs + r * NR + v * W), m));
      S::store(is + r * NR + v * W,
               S::select(uniq, S::add(acc[r][v], base), S::load(is + r * NR + v * W)));
    }
}

// ---- the work split ----------------------------------------------------------------------
// Pass 1 (scan) writes, per output: `code` (the winning kernel row, -1 tied, -2 none) and
// `dwv` (a unique winner's dw term), which pass 3 reads; `dxo` and `dxv`, which pass 2 reads:
// where the output's dx term lands in its image (or one of the codes below) and the term (a
// tie's share of the cotangent). Every output is scanned independently, so pass 1 is shared
// in small items of kScanPos positions; passes 2 and 3 own disjoint outputs (dx bands, dw
// column blocks) and run in one fork-join. Each dx and dw element sums its terms in one fixed
// order whatever the split: the results do not depend on the thread count.
constexpr int64_t kScanPos = 32;  // positions per scan item (their state waits between panels)
constexpr int32_t kNoDx = -1;     // no winner, or a unique winner in the padding
constexpr int32_t kTiedDx = -2;   // tied: pass 2 rescans the window (ties are rare)
// The dx pass has at least this many items: bands of input cells when images are few.
constexpr int64_t kMinDxItems = 32;

// The scratch of one max / min backward beyond the context's.
struct WinScratch {
  const float* xscan;   // x, or its integer keys (keyed scan)
  const float* padscan; // the pad row, or its keys
  bool keys;            // the scan, and the packed weights, are on integer keys
  const int32_t* kti;   // (K, 2): each kernel row's tap and input channel
  int32_t* dxo;         // (batch, P, O)
  float* dxv;           // (batch, P, O)
  const int32_t* span;  // (OS, 2): the lowest and highest input cell offset of each window
};

// Pass 1 for positions q0 .. q1 (at most kScanPos) of batch entry b, group grp, output block
// jb: the vector scan over the packed kernel block, then each output's codes.
template <class Op>
void win_scan_item(const Ctx& c, const WinScratch& s, int64_t b, int64_t grp, int64_t jb,
                   int64_t q0, int64_t q1) {
  using ScanOp = typename KeyOf<Op>::type;
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og;
  const float* xb = call.x + b * c.x_bs;
  const float* xs = s.xscan + b * c.x_bs;
  const float* yb = call.y + b * c.y_bs;
  const float* gb = call.g + b * c.y_bs;
  int32_t* cb = c.code + b * c.y_bs;
  float* vb = c.dwv + b * c.y_bs;
  int32_t* db = s.dxo + b * c.y_bs;
  float* eb = s.dxv + b * c.y_bs;
  const float* wp = c.wpack + ((b * c.G + grp) * c.nJB + jb) * c.K * NR;
  const int64_t o0 = jb * NR;
  const int64_t nl = Og - o0 < NR ? Og - o0 : NR;
  const int64_t ob = grp * Og + o0;
  const int64_t np = q1 - q0;
  alignas(64) float ys[kScanPos * NR], cs[kScanPos * NR], is[kScanPos * NR];
  int64_t pn[kScanPos], posi[kScanPos];
  for (int64_t p = q0; p < q1; ++p) {
    const float* yr = yb + p * O + ob;
    float* yt = ys + (p - q0) * NR;
    // Lanes past the block match nothing: NaN, whose key no finite product has.
    for (int64_t l = 0; l < NR; ++l)
      yt[l] = l < nl ? (s.keys ? data_key(yr[l]) : yr[l]) : __builtin_nanf("");
    pn[p - q0] = p / c.OS;
    posi[p - q0] = p % c.OS;
  }
  std::memset(cs, 0, sizeof(float) * np * NR);
  std::memset(is, 0, sizeof(float) * np * NR);
  // R rows from row j, kernel rows k0..k1: on the keys (keyed) or on the floats.
  auto scan = [&](auto rows, int64_t j, int64_t k0, int64_t k1) {
    constexpr int R = decltype(rows)::value;
    const float* panel = wp + k0 * NR;
    if (s.keys)
      win_scan<ScanOp, R>(c, xs, s.padscan, panel, k0, k1, pn + j, posi + j, grp, ys + j * NR,
                          cs + j * NR, is + j * NR);
    else
      win_scan<Op, R>(c, xs, s.padscan, panel, k0, k1, pn + j, posi + j, grp, ys + j * NR,
                      cs + j * NR, is + j * NR);
  };
  for (int64_t k0 = 0; k0 < c.K; k0 += KS) {
    const int64_t k1 = k0 + KS < c.K ? k0 + KS : c.K;
    int64_t j = 0;
    for (; j + 2 <= np; j += 2) scan(std::integral_constant<int, 2>{}, j, k0, k1);
    if (j < np) scan(std::integral_constant<int, 1>{}, j, k0, k1);
  }
  for (int64_t p = q0; p < q1; ++p) {
    const int64_t n = p / c.OS, osi = p % c.OS;
    const float* cnt_l = cs + (p - q0) * NR;
    const float* idx_l = is + (p - q0) * NR;
    for (int64_t l = 0; l < nl; ++l) {
      const int64_t e = p * O + ob + l;
      const float gv = gb[e], yv = yb[e];
      int64_t cnt = int64_t(cnt_l[l]), kw = int64_t(idx_l[l]);
      // Keys tell -0 from +0, a tie does not (jax.grad of jnp.max splits between equal
      // floats): a zero result is recounted with the float compare, the one the tie split
      // and passes 2 and 3 use.
      if (s.keys && yv == 0.0f) cnt = float_ties<Op>(c, xb, wp + l, true, n, osi, grp, yv, &kw);
      if (cnt == 0) {
        cb[e] = -2;
        db[e] = kNoDx;
      } else if (cnt == 1) {
        cb[e] = int32_t(kw);
        const int64_t t = s.kti[2 * kw], i = s.kti[2 * kw + 1];
        const int32_t toff = c.tab[osi * c.T + t];
        const float wk = wcol_at(wp + l, kw, s.keys);
        float xv;
        if (toff >= 0) {
          const int64_t d = toff + grp * I + i;
          xv = xb[n * c.img + d];
          db[e] = int32_t(d);
          eb[e] = gv * Op::template dcx<Sc>(xv, wk);
        } else {
          xv = c.padrow[grp * I + i];  // a winner in the padding (cell()'s pad row)
          db[e] = kNoDx;
        }
        vb[e] = gv * Op::template dcw<Sc>(xv, wk);
      } else {
        cb[e] = -1;
        db[e] = kTiedDx;
        eb[e] = gv / float(cnt);
      }
    }
  }
}

// Pass 2 for images n0 .. n1 of batch entry b, group grp: the dx terms that land in input
// cells [lo, hi) (as offsets in an image), in the order output block, position, channel.
template <class Op>
void win_dx_item(const Ctx& c, const WinScratch& s, int64_t b, int64_t grp, int64_t n0,
                 int64_t n1, int64_t lo, int64_t hi) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const float* xb = call.x + b * c.x_bs;
  const float* yb = call.y + b * c.y_bs;
  float* dxb = call.out + b * c.x_bs;
  const int32_t* db = s.dxo + b * c.y_bs;
  const float* eb = s.dxv + b * c.y_bs;
  for (int64_t jb = 0; jb < c.nJB; ++jb) {
    const float* wp = c.wpack + ((b * c.G + grp) * c.nJB + jb) * c.K * NR;
    const int64_t o0 = jb * NR;
    const int64_t nl = Og - o0 < NR ? Og - o0 : NR;
    const int64_t ob = grp * Og + o0;
    for (int64_t n = n0; n < n1; ++n) {
      float* dxn = dxb + n * c.img;
      for (int64_t osi = 0; osi < c.OS; ++osi) {
        if (s.span[2 * osi + 1] < lo || s.span[2 * osi] >= hi) continue;  // another band's
        const int64_t p = n * c.OS + osi;
        for (int64_t l = 0; l < nl; ++l) {
          const int64_t e = p * O + ob + l;
          const int32_t d = db[e];
          if (d >= 0) {
            if (d >= lo && d < hi) dxn[d] += eb[e];
            continue;
          }
          if (d != kTiedDx) continue;
          const float share = eb[e], yv = yb[e];
          for (int64_t t = 0; t < T; ++t) {
            const int32_t toff = c.tab[osi * T + t];
            if (toff < lo || toff >= hi) continue;  // another band's, or padded (dropped)
            const int64_t off = n * c.img + toff + grp * I;
            for (int64_t i = 0; i < I; ++i) {
              const float xv = xb[off + i], wv = wcol_at(wp + l, t * I + i, s.keys);
              if (Op::template comb<Sc>(xv, wv) == yv)
                dxb[off + i] += share * Op::template dcx<Sc>(xv, wv);
            }
          }
        }
      }
    }
  }
}

// Pass 3 for output channels o0 .. o1 (at most kMaxCols) of batch entry b: route dw, summed in
// a contiguous (K, kCols) block (the kernel's rows are O apart: a column walk thrashes the
// caches) and copied out. Kernel values come from the packed blocks for the same reason.
// Returns false when its scratch cannot be allocated.
constexpr int64_t kMaxCols = 64;
template <class Op>
bool win_dw_item(const Ctx& c, const WinScratch& s, int64_t b, int64_t o0, int64_t o1,
                 int64_t kCols) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const float* xb = call.x + b * c.x_bs;
  const float* yb = call.y + b * c.y_bs;
  const float* gb = call.g + b * c.y_bs;
  float* dwb = call.out2 + b * c.w_bs;
  const int32_t* cb = c.code + b * c.y_bs;
  const float* vb = c.dwv + b * c.y_bs;
  const Owned<float> owned = allocate<float>(c.K * kCols);
  float* acc = owned.get();
  if (!acc) return false;
  std::memset(acc, 0, sizeof(float) * size_t(c.K) * kCols);
  const float* cols[kMaxCols];
  for (int64_t o = o0; o < o1; ++o) {
    const int64_t og = o % Og;
    cols[o - o0] = c.wpack + ((b * c.G + o / Og) * c.nJB + og / NR) * c.K * NR + og % NR;
  }
  for (int64_t p = 0; p < c.P; ++p) {
    const int64_t n = p / c.OS, osi = p % c.OS;
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t k = cb[p * O + o];
      if (k == -2) continue;
      float* ac = acc + (o - o0);
      if (k >= 0) {
        ac[k * kCols] += vb[p * O + o];
        continue;
      }
      const int64_t grp = o / Og;
      const float gv = gb[p * O + o];
      const float* col = cols[o - o0];
      const float yv = yb[p * O + o];
      const float share = gv / float(count_ties<Op>(c, xb, col, s.keys, n, osi, grp, yv));
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = cell(c, xb, n, osi, t, grp);
        if (!xr) continue;
        for (int64_t i = 0; i < I; ++i) {
          const int64_t kk = t * I + i;
          const float wv = wcol_at(col, kk, s.keys);
          if (Op::template comb<Sc>(xr[i], wv) == yv)
            ac[kk * kCols] += share * Op::template dcw<Sc>(xr[i], wv);
        }
      }
    }
  }
  for (int64_t k = 0; k < c.K; ++k)
    std::memcpy(dwb + k * O + o0, acc + k * kCols, sizeof(float) * (o1 - o0));
  return true;
}

template <class Op>
void win_backward(Ctx& c) {
  if (dense_win_backward<Op>(c)) return;  // dense products: kernel_dense_backward.h
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, T = c.T;
  // The keyed scan matches the keyed forward (finite inputs, not depthwise) bit for bit.
  using ScanOp = typename KeyOf<Op>::type;
  WinScratch s{};
  s.keys = keyed<ScanOp>() && !depthwise(c) && c.finite;
  pack_weights(c, s.keys);
  Owned<float> xkey, padkey;
  s.xscan = call.x;
  s.padscan = c.padrow;
  if (s.keys) {
    xkey = key_copy(c);
    padkey = allocate<float>(c.C + NR);
    if (!xkey || !padkey) {
      c.failed = true;
      return;
    }
    for (int64_t j = 0; j < c.C + NR; ++j) padkey[j] = data_key(c.padrow[j]);
    s.xscan = xkey.get();
    s.padscan = padkey.get();
  }
  // Each kernel row's tap and input channel, (t, i) = (k / I, k % I): a winner's cell is found
  // by two loads instead of a 64-bit division per output (measured: a fifth of pass 1).
  const Owned<int32_t> kti = allocate<int32_t>(2 * c.K);
  const Owned<int32_t> dxo = allocate<int32_t>(call.batch * c.y_bs);
  const Owned<float> dxv = allocate<float>(call.batch * c.y_bs);
  const Owned<int32_t> span = allocate<int32_t>(2 * c.OS);
  if (!kti || !dxo || !dxv || !span) {
    c.failed = true;
    return;
  }
  for (int64_t k = 0; k < c.K; ++k) {
    kti[2 * k] = int32_t(k / I);
    kti[2 * k + 1] = int32_t(k % I);
  }
  for (int64_t osi = 0; osi < c.OS; ++osi) {
    int32_t lo = INT32_MAX, hi = -1;
    for (int64_t t = 0; t < T; ++t) {
      const int32_t off = c.tab[osi * T + t];
      if (off < 0) continue;
      lo = off < lo ? off : lo;
      hi = off > hi ? off : hi;
    }
    span[2 * osi] = lo;
    span[2 * osi + 1] = hi;
  }
  s.kti = kti.get();
  s.dxo = dxo.get();
  s.dxv = dxv.get();
  s.span = span.get();
  // Pass 1: items (batch, group, output block, kScanPos positions), the positions fastest so
  // that consecutive items scan the same packed block.
  const int64_t nq = (c.P + kScanPos - 1) / kScanPos;
  auto scan = [&](int64_t it) {
    const int64_t q = it % nq, jb = (it / nq) % c.nJB, grp = (it / (nq * c.nJB)) % c.G;
    const int64_t q1 = (q + 1) * kScanPos < c.P ? (q + 1) * kScanPos : c.P;
    win_scan_item<Op>(c, s, it / (nq * c.nJB * c.G), grp, jb, q * kScanPos, q1);
  };
  parallel(c, call.batch * c.G * c.nJB * nq, scan);
  xkey.reset();
  padkey.reset();
  // Pass 2: items (batch, run of whole images, group, band of input cells), as the sums'
  // input gradient (kernel_sums.h) cuts them.
  const int64_t ipi = c.OS >= 32 ? 1 : (32 + c.OS - 1) / c.OS;
  const int64_t runs = (c.g.n + ipi - 1) / ipi;
  const int64_t cells = c.img / (c.C > 0 ? c.C : 1);
  const int64_t units = call.batch * runs * c.G;
  const int64_t want = (kMinDxItems + units - 1) / units;
  const int64_t nband = want < cells ? want : (cells > 0 ? cells : 1);
  const int64_t band = (cells + nband - 1) / nband;
  // Pass 3: items (batch, block of output channels, each owning those kernel columns). With
  // many output channels a block is 64 wide: the code, term and dw rows are O apart, and
  // 16-wide blocks read and write one 64-byte piece per row (a page apart at O = 1024).
  // Each item is a pass over all positions: with few channels the blocks narrow (down to 4)
  // until there are 8 items, so that a thread descheduled in one holds back little.
  int64_t kCols = O >= 256 ? kMaxCols : 16;
  while (kCols > 4 && call.batch * ((O + kCols - 1) / kCols) < 8) kCols /= 2;
  const int64_t ncb = (O + kCols - 1) / kCols;
  const int64_t ndw = call.batch * ncb, ndx = units * nband;
  std::atomic<bool> failed{false};
  // Passes 3 and 2 in one fork-join: the coarser dw items first, the dx bands after, so that
  // the finer items even out the threads' finishing times.
  auto route = [&](int64_t it) {
    if (it < ndw) {
      const int64_t b = it / ncb, o0 = (it % ncb) * kCols;
      if (!win_dw_item<Op>(c, s, b, o0, o0 + kCols < O ? o0 + kCols : O, kCols))
        failed.store(true, std::memory_order_relaxed);
      return;
    }
    it -= ndw;
    const int64_t bnd = it % nband, grp = (it / nband) % c.G, bi = it / (nband * c.G);
    const int64_t n0 = (bi % runs) * ipi, n1 = n0 + ipi < c.g.n ? n0 + ipi : c.g.n;
    win_dx_item<Op>(c, s, bi / runs, grp, n0, n1, bnd * band * c.C, (bnd + 1) * band * c.C);
  };
  parallel(c, ndw + ndx, route);
  if (failed.load()) c.failed = true;
}

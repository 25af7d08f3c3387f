// The backward pass of max / min ops: each output's winning tap found by a vector scan that
// matches the forward bit for bit, the cotangent routed to it (ties split equally).
//
// Why a rescan and not an index recorded by the forward (as tropical-gemm does): ties must
// be split, so a forward that identifies the winner tracks the first and the last maximal
// tap (compare >, compare >=, three blends per term, and three registers per output vector,
// so a 2-row tile). Measured on Zen 4 (AVX-512, per output vector and tap): plain forward
// 0.37 ns, this scan 0.54 ns, forward with first + last index 1.03 ns: recording costs as
// much as the forward plus the scan, and adds an int32 output. (First index only, ties
// ignored: 0.66 ns.) What the forward can afford is a mask of blocks of 64 taps: under a
// derivative, float32 max_plus / min_plus / max_min / min_max record one (one store per
// accumulator and block) and their backward scans only the marked blocks
// (kernel_convrec_*.h, kernel_dense_*.h); this scan serves the rest (other ops, non-finite
// data, small windows, no derivative recorded).
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

// Bx: the combine reads x itself (kernel_bcast.h's ScanBc, the `bcast` parameter).
template <class Op, int R, bool Masked, bool Bx = false>
inline void win_scan_taps(const float* const* xr, const S::M* km, const float* wr, int64_t ni,
                          float kv0, const S::V (&yv)[R][NV], S::V (&acc)[R][NV]) {
  using V = S::V;
  const V one = S::set1(1.0f);
  V kv = S::set1(kv0);
  for (int64_t i = 0; i < ni; ++i) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = S::load(wr + i * NR + v * W);
    for (int r = 0; r < R; ++r) {
      V xs;
      if constexpr (!Bx) xs = S::set1(xr[r][i]);
      for (int v = 0; v < NV; ++v) {
        V cv;
        if constexpr (Bx) cv = ScanBc<Op>::comb(xr[r] + i, wv[v], r * NV + v);
        else cv = scan_comb<Op>(xs, wv[v], r * NV + v);
        S::M e = keyed<Op>() ? S::ieq(cv, yv[r][v]) : S::eq(cv, yv[r][v]);
        if constexpr (Masked) e = S::mand(e, km[r]);
        acc[r][v] = S::madd(e, acc[r][v], kv);
      }
    }
    kv = S::add(kv, one);
  }
}

template <class Op, int R, bool Bx>
void win_scan_rows(const Ctx& c, const float* xb, const float* pad, const float* panel,
                   int64_t k0, int64_t k1, const int64_t* n, const int64_t* osi, int64_t grp,
                   const float* ys, float* cs, float* is) {
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
      win_scan_taps<Op, R, false, Bx>(xr, km, wr, ie - ia, kv0, yv, acc);
    else
      win_scan_taps<Op, R, true, Bx>(xr, km, wr, ie - ia, kv0, yv, acc);
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

// win_scan with the combine the `bcast` parameter picks (kernel_bcast.h).
template <class Op, int R, class... A>
void win_scan(const Ctx& c, A... a) {
  if constexpr (ScanBc<Op>::kOn) {
    if (c.prm.bcast != 0) return win_scan_rows<Op, R, true>(c, a...);
  }
  win_scan_rows<Op, R, false>(c, a...);
}

// Pass 2 of the winner backward, per block of output channels (it owns those kernel columns):
// route dw from each output's code and term (c.code, c.dwv), ties recounted over the window
// (`keys`: c.wpack holds integer keys), summed in a contiguous (K, kCols) block (the kernel's
// rows are O apart: a column walk thrashes the caches) and copied out. Kernel values come
// from the packed blocks for the same reason.
template <class Op>
void win_route_dw(Ctx& c, bool keys) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  // With many output channels a block is 64 wide: the code, term and dw rows are O apart, and
  // 16-wide blocks read and write one 64-byte piece per row (a page apart at O = 1024).
  constexpr int64_t kMaxCols = 64;
  const int64_t kCols = O >= 256 ? kMaxCols : 16;
  const int64_t ncb = (O + kCols - 1) / kCols;
  std::atomic<bool> failed{false};
  auto pass2 = [&](int64_t it) {
    const int64_t b = it / ncb, o0 = (it % ncb) * kCols;
    const int64_t o1 = o0 + kCols < O ? o0 + kCols : O;
    const float* xb = call.x + b * c.x_bs;
    const float* yb = call.y + b * c.y_bs;
    const float* gb = call.g + b * c.y_bs;
    float* dwb = call.out2 + b * c.w_bs;
    const int32_t* cb = c.code + b * c.y_bs;
    const float* vb = c.dwv + b * c.y_bs;
    const Owned<float> owned = allocate<float>(c.K * kCols);
    float* acc = owned.get();
    if (acc) std::memset(acc, 0, sizeof(float) * size_t(c.K) * kCols);
    if (!acc) {
      failed.store(true, std::memory_order_relaxed);
      return;
    }
    const float* cols[kMaxCols];
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t og = o % Og;
      cols[o - o0] =
          c.wpack + ((b * c.G + o / Og) * c.nJB + og / NR) * c.K * NR + og % NR;
    }
    for (int64_t p = 0; p < c.P; ++p) {
      const int64_t n = p / c.OS, osi = p % c.OS;
      for (int64_t o = o0; o < o1; ++o) {
        const int32_t k = cb[p * O + o];
        if (k == -2) continue;
        float* ac = acc + (o - o0);
        if (k >= 0) {
          ac[k * kCols] += vb[p * O + o];
        } else {
          const int64_t grp = o / Og;
          const float gv = gb[p * O + o];
          const float* col = cols[o - o0];
          const float yv = yb[p * O + o];
          const float share =
              gv / float(count_ties<Op>(c, xb, col, keys, n, osi, grp, yv));
          for (int64_t t = 0; t < T; ++t) {
            const float* xr = cell(c, xb, n, osi, t, grp);
            if (!xr) continue;
            for (int64_t i = 0; i < I; ++i) {
              const int64_t kk = t * I + i;
              const float wv = wcol_at(col, kk, keys);
              if (Op::template comb<Sc>(xr[i], wv) == yv)
                ac[kk * kCols] += share * Op::template dcw<Sc>(xr[i], wv);
            }
          }
        }
      }
    }
    for (int64_t k = 0; k < c.K; ++k)
      std::memcpy(dwb + k * O + o0, acc + k * kCols, sizeof(float) * (o1 - o0));
  };
  parallel(c, call.batch * ncb, pass2);
  if (failed.load()) c.failed = true;
}

template <class Op>
void win_backward(Ctx& c) {
  if (dense_win_backward<Op>(c)) return;  // dense products: kernel_dense_backward.h
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  // Pass 1, per run of whole images (they own their input gradient): find each output's
  // winner by a scan of the packed kernel block (reused over the run's positions), route dx.
  // The keyed scan matches the keyed forward (finite inputs, not depthwise) bit for bit.
  using ScanOp = typename KeyOf<Op>::type;
  const bool kKey = keyed<ScanOp>() && !depthwise(c) && c.finite;
  pack_weights(c, kKey);
  Owned<float> xkey, padkey_owned;
  float* padkey = c.padrow;
  if (kKey) {
    xkey = key_copy(c);
    padkey_owned = allocate<float>(c.C + NR);
    padkey = padkey_owned.get();
    if (!xkey || !padkey) {
      c.failed = true;
      return;
    }
    for (int64_t j = 0; j < c.C + NR; ++j) padkey[j] = data_key(c.padrow[j]);
  }
  const float* xscan = kKey ? xkey.get() : call.x;
  // Each kernel row's tap and input channel, (t, i) = (k / I, k % I): a winner's cell is found
  // by two loads instead of a 64-bit division per output (measured: a fifth of pass 1).
  const Owned<int32_t> kti = allocate<int32_t>(2 * c.K);
  if (!kti) {
    c.failed = true;
    return;
  }
  for (int64_t k = 0; k < c.K; ++k) {
    kti[2 * k] = int32_t(k / I);
    kti[2 * k + 1] = int32_t(k % I);
  }
  const int64_t ipi = c.OS >= 32 ? 1 : (32 + c.OS - 1) / c.OS;
  const int64_t runs = (c.g.n + ipi - 1) / ipi;
  // Items are (batch, run, group): groups own disjoint channels of dx, codes and dw terms,
  // so one image's groups (per-example gradients fold the examples into groups) run in
  // parallel, bit for bit as in one item.
  auto pass1 = [&](int64_t it) {
    const int64_t grp = it % c.G, bi = it / c.G;
    const int64_t b = bi / runs, n0 = (bi % runs) * ipi;
    const int64_t n1 = n0 + ipi < c.g.n ? n0 + ipi : c.g.n;
    const float* xb = call.x + b * c.x_bs;
    const float* yb = call.y + b * c.y_bs;
    const float* gb = call.g + b * c.y_bs;
    float* dxb = call.out + b * c.x_bs;
    int32_t* cb = c.code + b * c.y_bs;
    float* vb = c.dwv + b * c.y_bs;
    // Runs of kPos positions: their scan state waits in these buffers between kernel panels.
    constexpr int64_t kPos = 32;
    alignas(64) float ys[kPos * NR], cs[kPos * NR], is[kPos * NR];
    {
      for (int64_t jb = 0; jb < c.nJB; ++jb) {
        const float* wp = c.wpack + ((b * c.G + grp) * c.nJB + jb) * c.K * NR;
        const int64_t o0 = jb * NR;
        const int64_t nl = Og - o0 < NR ? Og - o0 : NR;
        const int64_t ob = grp * Og + o0;
        for (int64_t q0 = n0 * c.OS; q0 < n1 * c.OS; q0 += kPos) {
          const int64_t q1 = q0 + kPos < n1 * c.OS ? q0 + kPos : n1 * c.OS;
          int64_t pn[kPos], posi[kPos];
          for (int64_t p = q0; p < q1; ++p) {
            const float* yr = yb + p * O + ob;
            float* yt = ys + (p - q0) * NR;
            // Lanes past the block match nothing: NaN, whose key no finite product has.
            for (int64_t l = 0; l < NR; ++l)
              yt[l] = l < nl ? (kKey ? data_key(yr[l]) : yr[l]) : __builtin_nanf("");
            pn[p - q0] = p / c.OS;
            posi[p - q0] = p % c.OS;
          }
          std::memset(cs, 0, sizeof(float) * (q1 - q0) * NR);
          std::memset(is, 0, sizeof(float) * (q1 - q0) * NR);
          for (int64_t k0 = 0; k0 < c.K; k0 += KS) {
            const int64_t k1 = k0 + KS < c.K ? k0 + KS : c.K;
            const float* panel = wp + k0 * NR;
            int64_t j = 0;
            for (; j + 2 <= q1 - q0; j += 2) {
              if (kKey)
                win_scan<ScanOp, 2>(c, xscan + b * c.x_bs, padkey, panel, k0, k1, pn + j,
                                    posi + j, grp, ys + j * NR, cs + j * NR, is + j * NR);
              else
                win_scan<Op, 2>(c, xb, c.padrow, panel, k0, k1, pn + j, posi + j, grp,
                                ys + j * NR, cs + j * NR, is + j * NR);
            }
            if (j < q1 - q0) {
              if (kKey)
                win_scan<ScanOp, 1>(c, xscan + b * c.x_bs, padkey, panel, k0, k1, pn + j,
                                    posi + j, grp, ys + j * NR, cs + j * NR, is + j * NR);
              else
                win_scan<Op, 1>(c, xb, c.padrow, panel, k0, k1, pn + j, posi + j, grp,
                                ys + j * NR, cs + j * NR, is + j * NR);
            }
          }
          for (int64_t p = q0; p < q1; ++p) {
            const int64_t n = p / c.OS, osi = p % c.OS;
            const float* cnt_l = cs + (p - q0) * NR;
            const float* idx_l = is + (p - q0) * NR;
            for (int64_t l = 0; l < nl; ++l) {
              const int64_t o = ob + l;
              const float gv = gb[p * O + o];
              int64_t cnt = int64_t(cnt_l[l]), kw = int64_t(idx_l[l]);
              // Keys tell -0 from +0, a tie does not (jax.grad of jnp.max splits between
              // equal floats): a zero result is recounted with the float compare, the one
              // the tie split and pass 2 use.
              if (kKey && yb[p * O + o] == 0.0f)
                cnt = float_ties<Op>(c, xb, wp + l, kKey, n, osi, grp, yb[p * O + o], &kw);
              if (cnt == 0) {
                cb[p * O + o] = -2;
              } else if (cnt == 1) {
                const int64_t k = kw;
                cb[p * O + o] = int32_t(k);
                const int64_t t = kti[2 * k], i = kti[2 * k + 1];
                const int32_t toff = c.tab[osi * T + t];
                const float wk = wcol_at(wp + l, k, kKey);
                float xv;
                if (toff >= 0) {
                  const int64_t off = n * c.img + toff + grp * I + i;
                  xv = xb[off];
                  dxb[off] += WinTerms<Op>::x(gv, xv, wk);
                } else {
                  xv = c.padrow[grp * I + i];  // a winner in the padding (cell()'s pad row)
                }
                vb[p * O + o] = WinTerms<Op>::w(gv, xv, wk);  // kernel_winner_terms.h
              } else {
                cb[p * O + o] = -1;
                const float share = gv / float(cnt);
                const float yv = yb[p * O + o];
                for (int64_t t = 0; t < T; ++t) {
                  if (c.tab[osi * T + t] < 0) continue;
                  const int64_t off = n * c.img + c.tab[osi * T + t] + grp * I;
                  for (int64_t i = 0; i < I; ++i) {
                    const float xv = xb[off + i], wv = wcol_at(wp + l, t * I + i, kKey);
                    if (Op::template comb<Sc>(xv, wv) == yv)
                      dxb[off + i] += share * Op::template dcx<Sc>(xv, wv);
                  }
                }
              }
            }
          }
        }
      }
    }
  };
  parallel(c, call.batch * runs * c.G, pass1);
  xkey.reset();
  padkey_owned.reset();
  win_route_dw<Op>(c, kKey);
}

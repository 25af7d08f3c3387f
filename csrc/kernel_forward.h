// The forward pass: the register-tiled implicit GEMM over packed kernel panels, the depthwise
// loop, the integer-key and the min-form variants, and the sign of a zero max / min.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// ---- the sign of a zero max / min --------------------------------------------------------
// The vector max / min return one operand of a +0 / -0 tie by position, so a zero result may
// carry either sign. The rule (lax.max / lax.min, the XLA engine) orders -0 below +0: a max is
// +0 when some product is +0, a min -0 when some product is -0. A tile whose result is a zero
// recomputes that sign from the window (rare: only zero results pay).
template <class Op, class = void>
struct HasCombx : std::false_type {};
template <class Op>
struct HasCombx<Op, std::void_t<decltype(Op::template combx<Sc>(0.0f, 0.0f))>> : std::true_type {};

template <class Op>
inline float comb_exact(float x, float w) {
  if constexpr (HasCombx<Op>::value) return Op::template combx<Sc>(x, w);
  else return Op::template comb<Sc>(x, w);
}

// The zero that output (image n, position osi, channel o) is under the rule. `xb` is the
// batch entry's input, `wb` its kernel (KD, KH, KW, I, O).
template <class Op>
float zero_sign(const Ctx& c, const float* xb, const float* wb, int64_t n, int64_t osi,
                int64_t o) {
  const int64_t grp = o / c.Og;
  const bool want_neg = Op::kReduce == 2;  // min: -0 if any product is -0
  for (int64_t t = 0; t < c.T; ++t) {
    const int32_t off = c.tab[osi * c.T + t];
    if (off < 0 && !c.g.has_pad) continue;
    const float* xr = off < 0 ? nullptr : xb + n * c.img + off + grp * c.I;
    for (int64_t i = 0; i < c.I; ++i) {
      const float xv = xr ? xr[i] : c.g.pad;
      const float p = comb_exact<Op>(xv, wb[(t * c.I + i) * c.O + o]);
      if (p == 0.0f && (__builtin_signbit(p) != 0) == want_neg) return want_neg ? -0.0f : 0.0f;
    }
  }
  return want_neg ? 0.0f : -0.0f;
}

// Applies zero_sign to the lanes of one row's vector `a` that hold a zero; lane l is output
// channel o0 + l (lanes at or past `nl` are not outputs).
template <class Op>
inline S::V fix_zero_sign(const Ctx& c, S::V a, const float* xb, const float* wb, int64_t n,
                          int64_t osi, int64_t o0, int64_t nl) {
  if (!S::any(S::eq(a, S::zero()))) return a;
  alignas(64) float t[W];
  S::store(t, a);
  for (int l = 0; l < W && l < nl; ++l)
    if (t[l] == 0.0f) t[l] = zero_sign<Op>(c, xb, wb, n, osi, o0 + l);
  return S::load(t);
}

// A work item's column sums of its packed, shifted kernel block, per tap (the min form).
struct Centring {
  const float* wsum;  // (T + 1, NR): per tap, then over all taps
  const float* csum;  // this batch entry's (cells, G)
  float padsum;       // this batch entry's and group's pad row
};

// Kernel rows k0 .. k1 - 1 of the tile's rows combined into acc (the forward tile's loop over
// taps; `wk0` is the packed panel's row k0). Always inlined, so that acc stays in registers as
// in the tile it serves (fwd_tile's, the recording forward's blocks: kernel_convrec_forward.h).
template <class Op, bool Safe, int TM, int TV, bool Bx>
__attribute__((always_inline)) inline void tile_taps(const Ctx& c, const float* xb,
                                                     const float* pad, const float* wk0,
                                                     int64_t k0, int64_t k1,
                                                     const TileRows<TM>& rows, int64_t grp,
                                                     S::V (&acc)[TM][TV]) {
  constexpr int MR = TM, NV = TV, NR = TV * W;  // this tile's, in place of the default's
  using V = S::V;
  const int64_t (&nimg)[MR] = rows.nimg;
  const int64_t (&osi)[MR] = rows.osi;
  const bool (&live)[MR] = rows.live;
  const int64_t I = c.I;
  // Finite max/min: the pad row holds the reduce's identity, whose products are dominated.
  const bool has_pad = c.g.has_pad != 0 || (Op::kReduce != 0 && Op::kDominated && !Safe);
  for (int64_t t = k0 / I; t * I < k1; ++t) {
    const int64_t ia = k0 > t * I ? k0 - t * I : 0;
    const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
    const int64_t ni = ie - ia;
    const float* ptr[MR];
    bool keep[MR];
    bool skip_any = false;
    for (int r = 0; r < MR; ++r) {
      const int32_t off = live[r] ? c.tab[osi[r] * c.T + t] : -1;
      if (off < 0) {
        ptr[r] = pad + grp * I + ia;
        keep[r] = has_pad || !live[r];
      } else {
        ptr[r] = xb + nimg[r] * c.img + off + grp * I + ia;
        keep[r] = true;
      }
      skip_any |= !keep[r];
    }
    const float* wt = wk0 + (t * I + ia - k0) * NR;
    if (!skip_any) {
      for (int64_t i = 0; i < ni; ++i) {
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = S::load(wt + i * NR + v * W);
        for (int r = 0; r < MR; ++r) {
          if constexpr (heavy<Op>() && !Bx)  // kernel_heavy.h
            paired_steps<Op, Safe, NV>(acc[r], S::set1(ptr[r][i]), wv);
          else row_step<Op, Safe, Bx>(acc[r], ptr[r] + i, wv);  // kernel_bcast.h
        }
      }
    } else {
      // Skipped rows keep their accumulator: a blend, not a branch, keeps the tile unrolled.
      S::M km[MR];
      for (int r = 0; r < MR; ++r) km[r] = S::mask(keep[r]);
      for (int64_t i = 0; i < ni; ++i) {
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = S::load(wt + i * NR + v * W);
        for (int r = 0; r < MR; ++r) row_step<Op, Safe, Bx, true>(acc[r], ptr[r] + i, wv, km[r]);
      }
    }
  }
}

// TM x TV: the register tile (rows x vectors), the instruction set's or kernel_variants.h's.
// Bx: the combine reads x itself (kernel_bcast.h's row_step, the `bcast` parameter).
template <class Op, bool Safe, int TM = MR, int TV = NV, bool Bx = false>
void fwd_tile(const Ctx& c, const float* xb, const float* wb, const float* pad,
              const float* panel, int64_t k0, int64_t k1, float* accs, float* yb, int64_t p,
              int64_t grp, int64_t jb, const Centring* cen, uint16_t* y16b = nullptr) {
  constexpr int MR = TM, NV = TV, NR = TV * W;  // this tile's, in place of the default's
  using V = S::V;
  V acc[MR][NV];
  if (k0 == 0) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(Op::ident());
  } else {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = S::load(accs + (r * NV + v) * W);
  }
  const TileRows<MR> rows(c, p);
  const int64_t (&nimg)[MR] = rows.nimg;
  const int64_t (&osi)[MR] = rows.osi;
  const bool (&live)[MR] = rows.live;
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  // The output rows' lines, asked for now (kernel_afwd_outfetch.h).
  if (k1 == c.K && yb) prefetch_rows<MR>(yb + p * c.O + o0, c.O, nvalid, live);
  tile_taps<Op, Safe, TM, TV, Bx>(c, xb, pad, panel, k0, k1, rows, grp, acc);
  if (k1 < c.K) {
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) S::store(accs + (r * NV + v) * W, acc[r][v]);
    return;
  }
  if constexpr (keyed<Op>()) {
    // The key map is its own inverse.
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = S::key(acc[r][v]);
  }
  if constexpr (centred<Op>()) {
    // y = 2 sum min(x, w) - sum x - sum w over the taps the row combined.
    for (int r = 0; r < MR; ++r) {
      if (!live[r]) continue;
      float sx = 0.0f;
      V sw[NV];
      for (int v = 0; v < NV; ++v) sw[v] = S::zero();
      const int64_t cell0 = nimg[r] * (c.img / c.C);
      const int32_t* ct = c.ctab + osi[r] * c.T;
      bool all = true;
      for (int64_t t = 0; t < c.T; ++t) {
        if (ct[t] >= 0) sx += cen->csum[(cell0 + ct[t]) * c.G + grp];
        else if (c.g.has_pad) sx += cen->padsum;
        else all = false;
      }
      if (all) {  // the block's column sums over every tap, summed in the same order
        for (int v = 0; v < NV; ++v) sw[v] = S::load(cen->wsum + c.T * NR + v * W);
      } else {
        for (int64_t t = 0; t < c.T; ++t) {
          if (ct[t] < 0) continue;
          for (int v = 0; v < NV; ++v)
            sw[v] = S::add(sw[v], S::load(cen->wsum + t * NR + v * W));
        }
      }
      const V sxv = S::set1(sx);
      for (int v = 0; v < NV; ++v)
        acc[r][v] = S::sub(S::add(acc[r][v], acc[r][v]), S::add(sxv, sw[v]));
    }
  }
  if constexpr (Op::kReduce != 0 && !keyed<Op>()) {  // keys order -0 below +0 already
    for (int r = 0; r < MR; ++r) {
      if (!live[r]) continue;
      for (int v = 0; v < NV; ++v)
        acc[r][v] = fix_zero_sign<Op>(c, acc[r][v], xb, wb, nimg[r], osi[r], o0 + v * W,
                                      nvalid - v * W);
    }
  }
  for (int r = 0; r < MR; ++r) {
    if (!live[r]) continue;
    if (y16b) {  // bfloat16 / float16 results (kernel_bf16fuse_low.h)
      alignas(64) float t[NR];
      for (int v = 0; v < NV; ++v) S::store(t + v * W, acc[r][v]);
      narrow_row(c.call->low->kind, t, y16b + (p + r) * c.O + o0, nvalid);
      continue;
    }
    float* dst = yb + (p + r) * c.O + o0;
    if (nvalid == NR) {
      for (int v = 0; v < NV; ++v) S::store(dst + v * W, acc[r][v]);
    } else {
      alignas(64) float tmp[NR];
      for (int v = 0; v < NV; ++v) S::store(tmp + v * W, acc[r][v]);
      std::memcpy(dst, tmp, sizeof(float) * nvalid);
    }
  }
}

// Depthwise (one input and one output channel per group): vectors run over the channels.
template <class Op, bool Safe>
void dw_tile(const Ctx& c, const float* xb, const float* wb, float* yb, int64_t p) {
  using V = S::V;
  const TileRows<MR> rows(c, p);
  const int64_t (&nimg)[MR] = rows.nimg;
  const int64_t (&osi)[MR] = rows.osi;
  const bool (&live)[MR] = rows.live;
  const bool has_pad = c.g.has_pad != 0;
  const int64_t C = c.C;
  for (int64_t c0 = 0; c0 < C; c0 += NR) {
    const int64_t nc = C - c0 < NR ? C - c0 : NR;
    const int64_t nvec = nc / W;
    V acc[MR][NV];
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(Op::ident());
    float tail[MR][NR];
    for (int r = 0; r < MR; ++r)
      for (int l = 0; l < NR; ++l) tail[r][l] = Op::ident();
    for (int64_t t = 0; t < c.T; ++t) {
      const float* wt = wb + t * C + c0;
      for (int r = 0; r < MR; ++r) {
        const int32_t off = live[r] ? c.tab[osi[r] * c.T + t] : -1;
        if (off < 0 && !has_pad) continue;
        const float* xr = (off < 0 ? c.padrow : xb + nimg[r] * c.img + off) + c0;
        if (nvec == NV) {
          for (int v = 0; v < NV; ++v)
            acc[r][v] = step<Op, Safe, S>(acc[r][v], S::load(xr + v * W), S::load(wt + v * W));
        } else {
          for (int v = 0; v < nvec; ++v)
            acc[r][v] = step<Op, Safe, S>(acc[r][v], S::load(xr + v * W), S::load(wt + v * W));
          for (int64_t l = nvec * W; l < nc; ++l)
            tail[r][l] = step<Op, Safe, Sc>(tail[r][l], xr[l], wt[l]);
        }
      }
    }
    for (int r = 0; r < MR; ++r) {
      if (!live[r]) continue;
      float* dst = yb + (p + r) * c.O + c0;
      for (int v = 0; v < nvec; ++v) {
        if constexpr (Op::kReduce != 0)
          acc[r][v] = fix_zero_sign<Op>(c, acc[r][v], xb, wb, nimg[r], osi[r], c0 + v * W, W);
        S::store(dst + v * W, acc[r][v]);
      }
      for (int64_t l = nvec * W; l < nc; ++l) {
        if constexpr (Op::kReduce != 0)
          if (tail[r][l] == 0.0f)
            tail[r][l] = zero_sign<Op>(c, xb, wb, nimg[r], osi[r], c0 + l);
        dst[l] = tail[r][l];
      }
    }
  }
}

// A copy of x as integer keys (empty on failure).
Owned<float> key_copy(const Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t total = call.batch * c.x_bs;
  Owned<float> owned = allocate<float>(total + W);
  float* xkey = owned.get();
  if (!xkey) return owned;
  constexpr int64_t kChunk = 1 << 16;
  auto conv = [&](int64_t it) {
    const int64_t a = it * kChunk, e = a + kChunk < total ? a + kChunk : total;
    if (!call.x) {  // bfloat16 / float16 x (run_low, kernel_bf16fuse_low.h)
      low_keys(call.low->kind, call.low->x16 + a, xkey + a, e - a);
      return;
    }
    int64_t j = a;
    for (; j + W <= e; j += W) S::store(xkey + j, data_key(S::load(call.x + j)));
    for (; j < e; ++j) xkey[j] = data_key(call.x[j]);
  };
  parallel(c, (total + kChunk - 1) / kChunk, conv);
  return owned;
}

// Kernel rows k0..k1 of the block of NR output channels jb of group grp, as (k1 - k0, NR),
// zero-padded (integer keys for keyed ops).
// With `check`, returns false when a packed weight is NaN or infinite (a max / min forward:
// kernel_densefwd_wcheck.h).
// With `shift` (the batch entry's and group's per-channel shifts, the min form) each row is
// shifted by its channel's and its NR sums are added to its tap's row of `wsum` (T, NR); the
// result is then false when a packed weight is NaN or larger than kCentreBound (centre()).
template <int TV = NV>
bool pack_panel(const Ctx& c, const float* wb, int64_t grp, int64_t jb, int64_t k0, int64_t k1,
                bool keys, float* dst, const float* shift = nullptr, float* wsum = nullptr,
                bool check = false) {
  constexpr int NV = TV, NR = TV * W;  // TV vectors wide (the tile's)
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  S::M ok = S::mtrue();
  bool ok_tail = true;
  int64_t tap = k0 / c.I, ch = k0 % c.I;  // row k's (the min form; no division per row)
  for (int64_t k = k0; k < k1; ++k, dst += NR) {
    const float* src = wb + k * c.O + o0;
    if (shift) {
      const float sh = shift[ch];
      if (nvalid == NR) {
        for (int v = 0; v < NV; ++v) {
          const S::V wv = S::load(src + v * W);
          ok = S::mand(ok, S::le(S::abs(wv), S::set1(kCentreBound)));
          S::store(dst + v * W, S::sub(wv, S::set1(sh)));
        }
      } else {
        for (int64_t l = 0; l < NR; ++l) dst[l] = l < nvalid ? src[l] - sh : 0.0f;
        ok_tail &= bounded(src, nvalid);
      }
      float* ws = wsum + tap * NR;
      for (int v = 0; v < NV; ++v)
        S::store(ws + v * W, S::add(S::load(ws + v * W), S::load(dst + v * W)));
      if (++ch == c.I) ch = 0, ++tap;
      continue;
    }
    if (nvalid == NR) {
      for (int v = 0; v < NV; ++v) {
        const S::V wv = S::load(src + v * W);
        if (check) ok = S::mand(ok, S::isfinite_m(wv));
        S::store(dst + v * W, keys ? data_key(wv) : wv);
      }
      continue;
    }
    for (int64_t l = 0; l < nvalid; ++l) {
      ok_tail &= !check || finite(src[l]);
      dst[l] = keys ? data_key(src[l]) : src[l];
    }
    for (int64_t l = nvalid; l < NR; ++l) dst[l] = 0.0f;
  }
  return ok_tail && !S::any(S::mnot(ok));
}

// Packs each (batch, group, block of NR output channels) of w as (K, NR), zero-padded.
void pack_weights(Ctx& c, bool keys) {
  const jaxconv::Call& call = *c.call;
  auto pack = [&](int64_t it) {
    const int64_t jb = it % c.nJB, grp = (it / c.nJB) % c.G, b = it / (c.nJB * c.G);
    pack_panel(c, call.w + b * c.w_bs, grp, jb, 0, c.K, keys, c.wpack + it * c.K * NR);
  };
  parallel(c, call.batch * c.G * c.nJB, pack);
}

// The packed implicit GEMM: runs of tiles x one block of output channels, each packing the
// panels of its kernel block and sweeping its tiles over them. A block that is one panel is
// shared out in claims (below); a larger one in fixed items (the `items` parameter). Keyed ops
// run on the integer keys of x, w and the pad value.
template <class Op, bool Safe, int TM = MR, int TV = NV>
void forward_packed(Ctx& c) {
  constexpr int MR = TM, NV = TV, NR = TV * W;  // the register tile (`tile` parameter)
  const jaxconv::Call& call = *c.call;
  const int64_t nJB = (c.Og + NR - 1) / NR;
  const int64_t tiles = (c.P + MR - 1) / MR;
  // Each item packs its kernel block once: as many tiles per item (up to 64) as leave at
  // least `items` items to share out.
  const int64_t blocks = call.batch * c.G * nJB;
  int64_t tpi = 64;
  while (tpi > 8 && blocks * ((tiles + tpi - 1) / tpi) < c.prm.items) tpi /= 2;
  const int64_t chunks = (tiles + tpi - 1) / tpi;
  constexpr bool kKey = keyed<Op>();
  constexpr bool kCen = centred<Op>();
  const float* xsrc = kCen ? c.xsh : call.x;
  Owned<float> xkey;
  if constexpr (kKey) {
    if (!c.xkey && !(xkey = key_copy(c))) {  // c.xkey: finite_keys made them (kernel_afwd_keys.h)
      c.failed = true;
      return;
    }
    for (int64_t j = 0; j < c.C + c.NR; ++j) c.padrow[j] = data_key(c.padrow[j]);
    xsrc = c.xkey ? c.xkey : xkey.get();
  }
  // A kernel block that stays in L2 is one panel (the taps of a tile run back to back); a
  // larger one is cut into panels that stay in L1 (both sizes: the tuning parameters).
  const int64_t rows = c.prm.panel_kib * 256 / NR;  // panel_kib KiB of NR-wide rows
  // (A panel of at least K rows is the whole block: the one-panel case below.)
  const int64_t kc = c.K * NR * int64_t(sizeof(float)) <= (c.prm.block_kib << 10) ? c.K
                     : rows >= c.K                                                ? c.K
                     : rows > 0                                                   ? rows
                                                                                  : 1;
  std::atomic<bool> failed{false}, unbounded{false}, nonfinite{false};
  // A NaN-free max / min forward that packed a non-finite weight runs again on the
  // NaN-propagating loop (kernel_densefwd_wcheck.h): its remaining tiles are not worth running.
  constexpr bool kStop = !Safe && Op::kReduce != 0;
  auto stopped = [&] { return kStop && nonfinite.load(std::memory_order_relaxed); };
  const size_t nws = kCen ? size_t(c.T + 1) * NR : 0;
  // The panel, then (a panel boundary within an output's taps) the tiles' partial sums,
  // then the min form's column sums.
  const size_t nacc = kc < c.K ? size_t(tpi) * MR * NR : 0;
  // Packs block blk's kernel panels into `panel` and runs tiles tl0..tl1 of it over them;
  // with `packed` (one panel holding the whole block, already packed for blk) only the tiles.
  auto block_tiles = [&](float* panel, int64_t blk, int64_t tl0, int64_t tl1, bool packed) {
    const int64_t jb = blk % nJB, grp = (blk / nJB) % c.G, b = blk / (nJB * c.G);
    const float* xb = xsrc + b * c.x_bs;
    const float* wb = call.w + b * c.w_bs;
    uint16_t* y16b = call.low && call.low->y16 ? call.low->y16 + b * c.y_bs : nullptr;
    float* yb = y16b ? nullptr : call.out + b * c.y_bs;
    Centring cen{};
    const float* pad = c.padrow;
    const float* shift = nullptr;
    float* wsum = nullptr;
    float* accs = panel + kc * NR;
    if constexpr (kCen) {
      wsum = accs + nacc;
      if (!packed) std::memset(wsum, 0, sizeof(float) * nws);
      shift = c.shift + b * c.C + grp * c.I;
      pad = c.padsh + b * (c.C + c.NR);  // centre()'s rows: the default tile's NR
      cen = Centring{wsum, c.csum + b * c.cells * c.G, c.padsum[b * c.G + grp]};
    }
    for (int64_t k0 = 0; k0 < c.K; k0 += kc) {
      const int64_t k1 = k0 + kc < c.K ? k0 + kc : c.K;
      // The min form's weight beyond kCentreBound (centre()); else a NaN or an infinity.
      if (!packed && !pack_panel<TV>(c, wb, grp, jb, k0, k1, kKey, panel, shift, wsum,
                                     Op::kReduce != 0))
        (kCen ? unbounded : nonfinite).store(true, std::memory_order_relaxed);
      if (stopped()) return;
      if (kCen && k1 == c.K && !packed) {
        float* tot = wsum + c.T * NR;
        for (int v = 0; v < NV; ++v) {
          S::V a = S::zero();
          for (int64_t t = 0; t < c.T; ++t) a = S::add(a, S::load(wsum + t * NR + v * W));
          S::store(tot + v * W, a);
        }
      }
      for (int64_t tl = tl0; tl < tl1; ++tl) {
        float* acct = accs + (tl - tl0) * MR * NR;
        if constexpr (Bc<Op>::kOn && !Safe) {
          if (c.prm.bcast != 0) {
            fwd_tile<Op, Safe, TM, TV, true>(c, xb, wb, pad, panel, k0, k1, acct, yb, tl * MR,
                                             grp, jb, &cen, y16b);
            continue;
          }
        }
        fwd_tile<Op, Safe, TM, TV>(c, xb, wb, pad, panel, k0, k1, acct, yb, tl * MR, grp, jb,
                                   &cen, y16b);
      }
    }
  };
  auto scratch = [&]() {
    Owned<float> owned = allocate<float>(int64_t(kc * NR + nacc + nws));
    if (!owned) failed.store(true, std::memory_order_relaxed);
    return owned;
  };
  if (kc == c.K) {
    // One panel per block: fine claims of a few tiles (about 2^20 terms, a few microseconds)
    // handed out dynamically, so that a thread the OS deschedules holds back little; a
    // worker keeps its packed panel while its claims stay in one block. A worker that
    // starts late finds no claim left. Each tile's result does not depend on the split.
    const int64_t per = (int64_t(1) << 20) / (int64_t(MR) * NR * (c.K > 0 ? c.K : 1));
    const int64_t tpc = per < 1 ? 1 : per > 64 ? 64 : per;
    const int64_t cpb = (tiles + tpc - 1) / tpc;
    const int64_t claims = blocks * cpb;
    // The blocks in `lanes` runs (the parameter), each with its own claim counter: worker i
    // starts in run i % lanes, then helps the others in turn (kernel_lanes.h).
    ClaimLanes lanes(c.prm.lanes, blocks, cpb);
    auto worker = [&](int64_t i) {
      Owned<float> owned;
      int64_t held = -1;
      for (int64_t u; !stopped() && (u = lanes.claim(i)) >= 0;) {
        const int64_t blk = u / cpb, tl0 = (u % cpb) * tpc;
        JAXCONV_TRACE(blk == held ? kTraceClaim : kTracePack, u);
        if (!owned && !(owned = scratch())) return;
        block_tiles(owned.get(), blk, tl0, tl0 + tpc < tiles ? tl0 + tpc : tiles, blk == held);
        held = blk;
      }
    };
    parallel(c, claims < 256 ? claims : 256, worker);
  } else {
    auto item = [&](int64_t it) {
      const int64_t ch = it % chunks, tl0 = ch * tpi;
      if (stopped()) return;
      const Owned<float> owned = scratch();
      if (owned) block_tiles(owned.get(), it / chunks, tl0, tl0 + tpi < tiles ? tl0 + tpi : tiles,
                             false);
    };
    parallel(c, blocks * chunks, item);
  }
  if (failed.load()) c.failed = true;
  if (unbounded.load()) c.unbounded = true;
  if (nonfinite.load()) c.w_nonfinite = true;
}

// forward_packed on the register tile that the call's `tile` parameter names (a heavy user
// combine's own: kernel_heavy.h).
template <class Op, bool Safe>
void forward_tiled(Ctx& c) {
  if constexpr (heavy<Op>()) forward_packed<Op, Safe, kHeavyMR, kHeavyNV>(c);  // kernel_heavy.h
  else if (c.prm.tile) forward_packed<Op, Safe, kAltMR, kAltNV>(c);
  else forward_packed<Op, Safe>(c);
}

template <class Op, bool Safe>
void forward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  if (depthwise(c)) {
    const int64_t tiles = (c.P + MR - 1) / MR;
    const int64_t chunks = (tiles + kTilesPerItem - 1) / kTilesPerItem;
    auto item = [&](int64_t it) {
      const int64_t b = it / chunks, ch = it % chunks;
      const float* xb = call.x + b * c.x_bs;
      const float* wb = call.w + b * c.w_bs;
      float* yb = call.out + b * c.y_bs;
      const int64_t t1 = (ch + 1) * kTilesPerItem < tiles ? (ch + 1) * kTilesPerItem : tiles;
      for (int64_t tl = ch * kTilesPerItem; tl < t1; ++tl) dw_tile<Op, Safe>(c, xb, wb, yb, tl * MR);
    };
    parallel(c, call.batch * chunks, item);
    return;
  }
  if constexpr (Safe) {
    forward_tiled<Op, true>(c);
  } else if (!std::is_same_v<typename KeyOf<Op>::type, Op> && c.prm.keyed) {
    forward_tiled<typename KeyOf<Op>::type, false>(c);
  } else if (!c.prm.fma_add) {
    forward_tiled<typename AddOf<Op>::type, false>(c);  // the same bits
  } else {
    forward_tiled<Op, false>(c);  // keyed = 0: the same bits (zero signs fixed at the end)
  }
}

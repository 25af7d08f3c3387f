// The recording forward of a dense max / min product: y, and per output the mask of the
// kernel-row blocks whose reduce equals y -- the masks that the blocked backward
// (kernel_dense_backward.h, pass A) would otherwise find by running the forward again.
//
// Python asks for it only when a gradient will be taken (the core's recording primitive); the
// plain forward never runs it. The register tile is pass A's: the reduce restarts every kb
// kernel rows and each block's result is kept; y is their reduce and the mask the blocks
// equal to it. Max and min are exact, so y is the forward's bit for bit (a zero's sign is
// fixed by the same rule) and the mask is pass A's: the blocks whose reduce equals y.
// max_min / min_max run it on integer keys when the forward would (the `keyed` parameter).
//
// Calls that are not the blocked backward's case (dense_winner_case: one tap, finite data,
// more than one block) record nothing: the forward runs as usual and every mask is written
// -1, which the backward reads as "not recorded".
//
// Ops whose partials are constants (x + w, x - w: ConstTerms) then turn each mask into the
// output's exact code at the tile's end (exact_codes; kernel_densebwd_exact.h), so that their
// backward needs no product computed again.
//
// The block loop, the tile's end and the work sharing (record_blocks, record_tile_end,
// record_claims) serve the convolution's recording forward too (kernel_convrec_forward.h).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_dense_backward.h, never on its own.
#pragma once

// The end of a recording tile (rows p .. p + MR - 1, output channels o0 .. o0 + nvalid - 1):
// y, the reduce of the nb block results in `blk`, and the mask of the blocks equal to it,
// written to yb and rb (`xb`: the floats of x, for the sign of a zero when Op is not keyed).
template <class Op>
void record_tile_end(const Ctx& c, const float (*blk)[MR * NR], int64_t nb,
                     const TileRows<MR>& rows, const float* xb, const float* wb, float* yb,
                     int32_t* rb, int64_t p, int64_t o0, int64_t nvalid) {
  using V = S::V;
  constexpr bool kKey = keyed<Op>();
  alignas(64) float ys[MR * NR], cd[MR * NR];
  // Finite inputs: no NaN, so "equal to y" is exact. (The key map is its own inverse.)
  for (int64_t q = 0; q < MR * NR; q += W) {
    V t = S::load(blk[0] + q);
    for (int64_t j = 1; j < nb; ++j) t = Op::template red<S>(t, S::load(blk[j] + q));
    if constexpr (kKey) t = S::key(t);
    V m = S::zero();
    float bit = 1.0f;
    for (int64_t j = 0; j < nb; ++j, bit *= 2.0f) {
      V bj = S::load(blk[j] + q);
      if constexpr (kKey) bj = S::key(bj);
      m = S::madd(S::eq(bj, t), m, S::set1(bit));
    }
    S::store(ys + q, t);
    S::store(cd + q, m);
  }
  if constexpr (lowrec_rounds<Op>()) {  // bfloat16 / float16 operands (kernel_lowrec_mark.h)
    if (c.call->low) lowrec_mark<Op::kReduce == 1, MR * NR>(c.call->low->kind, blk, nb, ys, cd);
  }
  for (int r = 0; r < MR; ++r) {
    if (!rows.live[r]) continue;
    if constexpr (!kKey) {  // keys order -0 below +0 already
      for (int v = 0; v < NV; ++v) {
        const V a = fix_zero_sign<Op>(c, S::load(ys + r * NR + v * W), xb, wb, rows.nimg[r],
                                      rows.osi[r], o0 + v * W, nvalid - v * W);
        S::store(ys + r * NR + v * W, a);
      }
    }
    std::memcpy(yb + (p + r) * c.O + o0, ys + r * NR, sizeof(float) * nvalid);
    for (int64_t l = 0; l < nvalid; ++l) rb[(p + r) * c.O + o0 + l] = int32_t(cd[r * NR + l]);
  }
}

// The row stride of the transposed columns: K rounded up to an odd number of cache lines, so
// that one segment of each column does not land in one set of L1 (rows 4 KiB apart would).
inline int64_t cstride(int64_t K) { return ((K + 15) / 16 | 1) * 16; }

// The exact codes (kernel_densebwd_exact.h) of `rows` output rows of one tile: row r's x in
// xr[r], its nvalid y and masks at yr + r * O and cr + r * O (each mask replaced by its code),
// the transposed kernel columns `cols` (rows cs apart). Out of line: the tile's frame (its
// blocks' results) left its loop's bookkeeping on the stack.
template <class Op>
__attribute__((noinline)) void exact_codes(const float* const* xr, int rows, const float* cols,
                                           int64_t cs, int64_t K, int64_t kb, const float* yr,
                                           int32_t* cr, int64_t O, int64_t nvalid) {
  // A single block of 64 whole rows: its compares in one word (the last block may be short).
  const int64_t whole = kb == 64 ? K / 64 : 0;
  for (int r = 0; r < rows; ++r, yr += O, cr += O) {
    const float* xp = xr[r];
    for (int64_t l = 0; l < nvalid; ++l) {
      const uint32_t mask = uint32_t(cr[l]);
      const float* wo = cols + l * cs;
      if (mask != 0 && (mask & (mask - 1)) == 0 && __builtin_ctz(mask) < whole) {
        const int64_t k0 = int64_t(__builtin_ctz(mask)) * 64;
        const uint64_t word = dense_block_word<Op>(xp + k0, wo + k0, yr[l]);
        if (__builtin_popcountll(word) == 1) {
          cr[l] = int32_t(k0 + __builtin_ctzll(word));
          continue;
        }
      }
      // Two blocks or more: a tie (each block's result is one of its products, equal to y).
      cr[l] = mask & (mask - 1) ? -2 - int32_t(mask)
                                : winner_code_general<Op>(xp, wo, K, kb, mask, yr[l]);
    }
  }
}

// Rows p .. p + MR - 1 of block (grp, jb) of a recording tile (the dense record's and the
// convolution's): each block of kb kernel rows reduced by `reduce(k0, k1, acc)` -- the tile's
// loop over those rows, from the reduce's identity -- and its result stored (one store per
// accumulator and block, the only cost in the loop over blocks), then y and the masks
// (record_tile_end; `xf`: the floats of x, for the sign of a zero). Always inlined, and so is
// `reduce`: acc stays in registers as in the loop it came from.
template <class Op, class Reduce>
__attribute__((always_inline)) inline void record_blocks(const Ctx& c, const TileRows<MR>& rows,
                                                        const float* xf, const float* wb,
                                                        float* yb, int32_t* rb, int64_t p,
                                                        int64_t grp, int64_t jb, int64_t kb,
                                                        Reduce&& reduce) {
  using V = S::V;
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  const int64_t nb = (c.K + kb - 1) / kb;  // <= kMaxBlocks
  alignas(64) float blk[kMaxBlocks][MR * NR];
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t k0 = j * kb, k1 = k0 + kb < c.K ? k0 + kb : c.K;
    V acc[MR][NV];
    reduce(k0, k1, acc);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) S::store(blk[j] + r * NR + v * W, acc[r][v]);
  }
  record_tile_end<Op>(c, blk, nb, rows, xf, wb, yb, rb, p, o0, nvalid);
}

// The recording forwards' work (the dense record's and the convolution's), shared out as the
// forward's one-panel case: claims of a few tiles (about 2^20 terms) of one block (b, grp, jb)
// of output channels, handed out dynamically in `lanes` runs (kernel_lanes.h); a worker keeps
// its packed panel of all K rows (keys with `keys`) while its claims stay in one block, and
// runs each claim as tiles(b, grp, jb, tl0, tl1, wb, panel, extra): tiles tl0 .. tl1 - 1.
// With extra_floats > 0 a worker also owns that many floats (`extra`, else null), which
// repack(grp, jb, panel, extra) fills each time the worker packs a new panel.
struct NoRepack {
  void operator()(int64_t, int64_t, const float*, float*) const {}
};

template <class Tiles, class Repack = NoRepack>
void record_claims(Ctx& c, bool keys, Tiles&& tiles, int64_t extra_floats = 0,
                   Repack&& repack = {}) {
  const jaxconv::Call& call = *c.call;
  const int64_t ntiles = (c.P + MR - 1) / MR;
  const int64_t blocks = call.batch * c.G * c.nJB;
  const int64_t per = (int64_t(1) << 20) / (int64_t(MR) * NR * c.K);
  const int64_t tpc = per < 1 ? 1 : per > 64 ? 64 : per;
  const int64_t cpb = (ntiles + tpc - 1) / tpc;
  const int64_t claims = blocks * cpb;
  ClaimLanes lanes(c.prm.lanes, blocks, cpb);
  std::atomic<bool> failed{false};
  auto worker = [&](int64_t wi) {
    Owned<float> owned, extra;
    int64_t held = -1;
    for (int64_t u; (u = lanes.claim(wi)) >= 0;) {
      const int64_t blk = u / cpb, tl0 = (u % cpb) * tpc;
      const int64_t tl1 = tl0 + tpc < ntiles ? tl0 + tpc : ntiles;
      const int64_t jb = blk % c.nJB, grp = (blk / c.nJB) % c.G, b = blk / (c.nJB * c.G);
      if ((!owned && !(owned = allocate<float>(c.K * NR))) ||
          (extra_floats > 0 && !extra && !(extra = allocate<float>(extra_floats)))) {
        failed.store(true, std::memory_order_relaxed);
        return;
      }
      const float* wb = call.w + b * c.w_bs;
      if (blk != held) {
        pack_panel(c, wb, grp, jb, 0, c.K, keys, owned.get());
        if (extra) repack(grp, jb, static_cast<const float*>(owned.get()), extra.get());
      }
      held = blk;
      tiles(b, grp, jb, tl0, tl1, wb, static_cast<const float*>(owned.get()),
            static_cast<const float*>(extra.get()));
    }
  };
  parallel(c, claims < 256 ? claims : 256, worker);
  if (failed.load()) c.failed = true;
}

// Rows p .. p + MR - 1 of block (b, grp, jb): their y and masks (`rb`: the batch entry's), the
// blocks' reduce by block_reduce (pass A's loop). A keyed Op (`xb` and `panel` hold keys)
// reduces keys as the keyed forward does, and compares the blocks' results as floats: a block
// whose result is -0 holds a product equal to a +0 y under the backward's float compare, so it
// is marked too (a mask may name a block with no winner: the backward's scan of it finds
// nothing).
//
// With `cols` (the block's transposed kernel columns, (nvalid, K); constant-partial ops only),
// each mask then becomes the output's exact code (kernel_densebwd_exact.h): its masked blocks
// are scanned along k in x's rows, which the loop over blocks left in L1.
template <class Op, bool Bx = false>
void dense_record_tile(const Ctx& c, const float* xb, const float* wb, const float* panel,
                       const float* cols, float* yb, int32_t* rb, int64_t p, int64_t grp,
                       int64_t jb, int64_t kb) {
  const TileRows<MR> rows(c, p);
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = xb + (rows.live[r] ? p + r : 0) * c.img + grp * c.I;
  record_blocks<Op>(c, rows, xb, wb, yb, rb, p, grp, jb, kb,
                    [&](int64_t k0, int64_t k1, S::V(&acc)[MR][NV])
                        __attribute__((always_inline)) {
                          block_reduce<Op, Bx>(panel, xr, k0, k1, acc);
                        });
  if constexpr (ConstTerms<Op>::value || LowCodes<Op>::value) {
    if (!cols) return;
    const int64_t o0 = grp * c.Og + jb * NR;
    const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
    int live = 0;
    while (live < MR && rows.live[live]) ++live;  // the live rows come first
    const float* yr = yb + p * c.O + o0;
    int32_t* cr = rb + p * c.O + o0;
    if constexpr (LowCodes<Op>::value) {  // bfloat16 / float16 (kernel_lowdense_record.h)
      if (c.call->low) {
        if (c.call->low->kind == 1)
          lowdense_codes<Op, 1>(xr, live, cols, cstride(c.K), c.K, kb, yr, cr, c.O, nvalid);
        else
          lowdense_codes<Op, 2>(xr, live, cols, cstride(c.K), c.K, kb, yr, cr, c.O, nvalid);
        return;
      }
    }
    if constexpr (ConstTerms<Op>::value)
      exact_codes<Op>(xr, live, cols, cstride(c.K), c.K, kb, yr, cr, c.O, nvalid);
  }
}

// The recording forward's tiles with the tile op Op (a keyed one reads copies of x and of
// the kernel panels as keys). Returns true (y and the masks written).
template <class Op>
bool dense_record_run(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  constexpr bool kKey = keyed<Op>();
  constexpr bool kExact = ConstTerms<Op>::value && !kKey;  // kernel_densebwd_exact.h
  Owned<float> xkey;
  if constexpr (kKey) {
    if (!(xkey = key_copy(c))) {
      c.failed = true;
      return true;
    }
  }
  const float* xsrc = kKey ? xkey.get() : call.x;
  const int64_t kb = dense_block_rows(c.K);
  // bf16 / f16 operands: their winners are the products rounding to y; codes where the low
  // backward reads them (kernel_lowdense_record.h), else the masks (kernel_lowrec_mark.h).
  const bool exact = call.low ? lowdense_records<Op>(c) : kExact;
  // From the panel just packed (rows NR floats apart, in L2), not from w (rows O apart).
  auto transposed = [&](int64_t, int64_t jb, const float* panel, float* cols) {
    if constexpr (kExact || LowCodes<Op>::value) {
      const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
      transpose(panel, NR, cols, cstride(c.K), c.K, nvalid);
    }
  };
  record_claims(c, kKey,
                [&](int64_t b, int64_t grp, int64_t jb, int64_t tl0, int64_t tl1,
                    const float* wb, const float* panel, const float* cols) {
                  const float* xb = xsrc + b * c.x_bs;
                  float* yb = call.out + b * c.y_bs;
                  int32_t* rb = call.rec + b * c.y_bs;
                  if constexpr (Bc<Op>::kOn) {
                    if (c.prm.bcast != 0) {  // the forward tile's choice (kernel_bcast.h)
                      for (int64_t tl = tl0; tl < tl1; ++tl)
                        dense_record_tile<Op, true>(c, xb, wb, panel, cols, yb, rb, tl * MR,
                                                    grp, jb, kb);
                      return;
                    }
                  }
                  for (int64_t tl = tl0; tl < tl1; ++tl)
                    dense_record_tile<Op>(c, xb, wb, panel, cols, yb, rb, tl * MR, grp, jb,
                                          kb);
                },
                exact ? cstride(c.K) * NR : 0, transposed);
  return true;
}

// The recording forward: true when it wrote y and the masks (call.out, call.rec); false when
// the call is not its case (nothing written: the caller runs the forward and marks the masks
// not recorded).
template <class Op>
bool dense_record_forward(Ctx& c) {
  if (!dense_winner_case(c)) return false;
  if constexpr (!std::is_same_v<typename KeyOf<Op>::type, Op>) {
    if (c.prm.keyed) return dense_record_run<typename KeyOf<Op>::type>(c);  // as forward()
  }
  return dense_record_run<Op>(c);
}

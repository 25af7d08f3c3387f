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

// Rows p .. p + MR - 1 of block (b, grp, jb): their y and masks (`rb`: the batch entry's).
// Each block's reduce is stored (one store per accumulator and block, the only cost in the
// loop over blocks); the tile's end takes y as their reduce and sets the bits of the blocks
// equal to it (pass A's compare, on results held in L1). A keyed Op (`xb` and `panel` hold
// keys) reduces keys as the keyed forward does, and compares the blocks' results as floats:
// a block whose result is -0 holds a product equal to a +0 y under the backward's float
// compare, so it is marked too (a mask may name a block with no winner: the backward's scan
// of it finds nothing).
template <class Op, bool Bx = false>
void dense_record_tile(const Ctx& c, const float* xb, const float* wb, const float* panel,
                       float* yb, int32_t* rb, int64_t p, int64_t grp, int64_t jb, int64_t kb) {
  using V = S::V;
  const TileRows<MR> rows(c, p);
  const int64_t o0 = grp * c.Og + jb * NR;
  const int64_t nvalid = c.Og - jb * NR < NR ? c.Og - jb * NR : NR;
  const int64_t nb = (c.K + kb - 1) / kb;  // <= kMaxBlocks
  alignas(64) float blk[kMaxBlocks][MR * NR];
  const float* xr[MR];
  for (int r = 0; r < MR; ++r) xr[r] = xb + (rows.live[r] ? p + r : 0) * c.img + grp * c.I;
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t k0 = j * kb, k1 = k0 + kb < c.K ? k0 + kb : c.K;
    V acc[MR][NV];
    block_reduce<Op, Bx>(panel, xr, k0, k1, acc);
    for (int r = 0; r < MR; ++r)
      for (int v = 0; v < NV; ++v) S::store(blk[j] + r * NR + v * W, acc[r][v]);
  }
  record_tile_end<Op>(c, blk, nb, rows, xb, wb, yb, rb, p, o0, nvalid);
}

// The recording forward's tiles with the tile op Op (a keyed one reads copies of x and of
// the kernel panels as keys). Returns true (y and the masks written).
template <class Op>
bool dense_record_run(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  constexpr bool kKey = keyed<Op>();
  Owned<float> xkey;
  if constexpr (kKey) {
    if (!(xkey = key_copy(c))) {
      c.failed = true;
      return true;
    }
  }
  const float* xsrc = kKey ? xkey.get() : call.x;
  const int64_t kb = dense_block_rows(c.K);
  const int64_t tiles = (c.P + MR - 1) / MR;
  const int64_t blocks = call.batch * c.G * c.nJB;
  // Claims of a few tiles (about 2^20 terms), handed out dynamically as the forward's; a
  // worker keeps its packed panel while its claims stay in one block.
  const int64_t per = (int64_t(1) << 20) / (int64_t(MR) * NR * c.K);
  const int64_t tpc = per < 1 ? 1 : per > 64 ? 64 : per;
  const int64_t cpb = (tiles + tpc - 1) / tpc;
  const int64_t claims = blocks * cpb;
  std::atomic<int64_t> next{0};
  std::atomic<bool> failed{false};
  auto worker = [&](int64_t) {
    Owned<float> owned;
    int64_t held = -1;
    for (int64_t u; (u = next.fetch_add(1, std::memory_order_relaxed)) < claims;) {
      const int64_t blk = u / cpb, tl0 = (u % cpb) * tpc;
      const int64_t tl1 = tl0 + tpc < tiles ? tl0 + tpc : tiles;
      const int64_t jb = blk % c.nJB, grp = (blk / c.nJB) % c.G, b = blk / (c.nJB * c.G);
      if (!owned && !(owned = allocate<float>(c.K * NR))) {
        failed.store(true, std::memory_order_relaxed);
        return;
      }
      const float* wb = call.w + b * c.w_bs;
      if (blk != held) pack_panel(c, wb, grp, jb, 0, c.K, kKey, owned.get());
      held = blk;
      if constexpr (Bc<Op>::kOn) {
        if (c.prm.bcast != 0) {  // the forward tile's choice (kernel_bcast.h)
          for (int64_t tl = tl0; tl < tl1; ++tl)
            dense_record_tile<Op, true>(c, xsrc + b * c.x_bs, wb, owned.get(),
                                        call.out + b * c.y_bs, call.rec + b * c.y_bs, tl * MR,
                                        grp, jb, kb);
          continue;
        }
      }
      for (int64_t tl = tl0; tl < tl1; ++tl)
        dense_record_tile<Op>(c, xsrc + b * c.x_bs, wb, owned.get(), call.out + b * c.y_bs,
                              call.rec + b * c.y_bs, tl * MR, grp, jb, kb);
    }
  };
  parallel(c, claims < 256 ? claims : 256, worker);
  if (failed.load()) c.failed = true;
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

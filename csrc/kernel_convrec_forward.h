// The recording forward of a convolution by a max / min op: y, and per output the mask of the
// blocks of kernel rows (rows k = t * I + i: a tap's input channels, taps in order) whose
// reduce equals y, so that the backward (kernel_convrec_backward.h) scans only those blocks
// instead of every output's whole window.
//
// Python asks for it only when a gradient will be taken (the core's recording primitive); the
// plain forward never runs it. The loop is the forward's register tile over the packed kernel
// block (fwd_tile's tile_taps, the same embedded broadcast, key and add-port choices), but the
// reduce restarts every kb kernel rows and each block's result is stored: one vector store
// per accumulator and block, 1 / kb of the tile's work. The block loop, the tile's end and the
// claims are the dense record's (record_blocks, record_tile_end, record_claims): y is the
// blocks' reduce and the mask the bits of the blocks equal to it. Max and min are exact: y is
// the forward's bit for bit (a zero's sign fixed by the same rule; keys order -0 below +0), and
// every product equal to y lies in a marked block.
//
// Blocks: 64 kernel rows (dense_block_rows: doubled while there would be more than kMaxBlocks),
// so on a 3 x 3 kernel over 64 input channels one block is one tap. A mask is an int32 per
// output (the record is y's size again). Calls that are not its case (convrec_case: finite
// data, more than one block, not depthwise, not the dense record's) record nothing: the
// forward runs as usual and every mask is -1, which the backward reads as "not recorded".
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_dense_record.h, never on its own.
#pragma once

// Whether a convolution's forward records its winner blocks (finite data: with a NaN the
// blocks' reduce would not be the forward's; depthwise: a window is a handful of taps).
inline bool convrec_case(const Ctx& c) {
  return c.finite && !depthwise(c) && c.K > jaxconv::kRecordBlockRows && !dense_winner_case(c);
}

// Rows p .. p + MR - 1 of block (b, grp, jb): each kernel-row block's reduce (the forward's
// tap loop restarted at the block's first row, against the packed panel of all K rows), then
// y and the masks (record_blocks; `rb`: the batch entry's). `xs` holds x as the tile reads it
// (keys for a keyed Op), `xf` its floats; `pad` the pad row as the tile reads it.
template <class Op, bool Bx>
void convrec_tile(const Ctx& c, const float* xs, const float* xf, const float* wb,
                  const float* pad, const float* panel, float* yb, int32_t* rb, int64_t p,
                  int64_t grp, int64_t jb, int64_t kb) {
  const TileRows<MR> rows(c, p);
  record_blocks<Op>(c, rows, xf, wb, yb, rb, p, grp, jb, kb,
                    [&](int64_t k0, int64_t k1, S::V(&acc)[MR][NV])
                        __attribute__((always_inline)) {
                          for (int r = 0; r < MR; ++r)
                            for (int v = 0; v < NV; ++v) acc[r][v] = S::set1(Op::ident());
                          tile_taps<Op, false, MR, NV, Bx>(c, xs, pad, panel + k0 * NR, k0, k1,
                                                           rows, grp, acc);
                        });
}

// The recording forward's tiles with the tile op Op (record_claims: the forward's one-panel
// case). Returns true (y and masks written).
template <class Op>
bool convrec_run(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  constexpr bool kKey = keyed<Op>();
  Owned<float> xkey, padkey;
  const float* pad = c.padrow;  // the reduce's identity (finite data): never a winner
  if constexpr (kKey) {
    xkey = key_copy(c);
    padkey = allocate<float>(c.C + NR);
    if (!xkey || !padkey) {
      c.failed = true;
      return true;
    }
    for (int64_t j = 0; j < c.C + NR; ++j) padkey[j] = data_key(c.padrow[j]);
    pad = padkey.get();
  }
  const float* xsrc = kKey ? xkey.get() : call.x;
  const int64_t kb = dense_block_rows(c.K);
  record_claims(c, kKey,
                [&](int64_t b, int64_t grp, int64_t jb, int64_t tl0, int64_t tl1,
                    const float* wb, const float* panel, const float*) {
                  const float* xs = xsrc + b * c.x_bs;
                  const float* xf = call.x + b * c.x_bs;
                  float* yb = call.out + b * c.y_bs;
                  int32_t* rb = call.rec + b * c.y_bs;
                  if constexpr (Bc<Op>::kOn) {
                    if (c.prm.bcast != 0) {  // the forward tile's choice (kernel_bcast.h)
                      for (int64_t tl = tl0; tl < tl1; ++tl)
                        convrec_tile<Op, true>(c, xs, xf, wb, pad, panel, yb, rb, tl * MR, grp,
                                               jb, kb);
                      return;
                    }
                  }
                  for (int64_t tl = tl0; tl < tl1; ++tl)
                    convrec_tile<Op, false>(c, xs, xf, wb, pad, panel, yb, rb, tl * MR, grp, jb,
                                            kb);
                });
  return true;
}

// The recording forward of a convolution: true when it wrote y and the masks (call.out,
// call.rec); false when the call is not its case (nothing written). The tile op is the
// forward's (forward()): integer keys for max_min / min_max under `keyed`, x + w on the add
// ports under `fma_add` = 0 -- the same bits either way.
template <class Op>
bool convrec_forward(Ctx& c) {
  if (!convrec_case(c)) return false;
  if constexpr (!std::is_same_v<typename KeyOf<Op>::type, Op>) {
    if (c.prm.keyed) return convrec_run<typename KeyOf<Op>::type>(c);
  }
  if (!c.prm.fma_add) return convrec_run<typename AddOf<Op>::type>(c);
  return convrec_run<Op>(c);
}

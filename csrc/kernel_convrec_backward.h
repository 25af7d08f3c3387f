// The backward of a convolution by a max / min op given the recording forward's block masks
// (kernel_convrec_forward.h): each output's winners are looked for only in the blocks of
// kernel rows that its mask names, where the general backward (kernel_winner.h, pass 1)
// scans its whole window.
//
// Per output, along k: a block's rows within one tap are one input cell's channels (contiguous
// in x) against the output's kernel column, transposed once per call to (O, K) so that it is
// contiguous too. A block of 64 rows inside one tap (the usual case: every block of a 3 x 3
// kernel over 64 channels) is compared in one go, its matches gathered into one 64-bit word:
// four vector compares on AVX-512 for an output, against the K / NR vector terms (and a masked
// add each) that the general scan spends on it. Other blocks go tap by tap.
//
// Same bits as the general backward: every product equal to y lies in a marked block (the
// record compares each block's reduce with y as floats, so a block of -0 products under a +0
// result is marked); matches are counted with the float compare (a tie of +0 and -0 counts,
// as the general scan's recount of a zero result does); pass 1 walks the outputs in the
// general pass 1's order (blocks of NR output channels, then positions, then channels) and
// adds the same terms to dx, and its codes and dw terms feed the same pass 2 (win_route_dw).
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_winner.h, never on its own.
#pragma once

// The products of x's channels `xp` and the kernel column `wo` (both n <= 64 rows along k)
// that equal y, as the bits of one word. Kr: n known at compile time (a whole 64-row block).
template <class Op, int64_t Kr = 0>
__attribute__((always_inline)) inline uint64_t convrec_word(const float* xp, const float* wo,
                                                            int64_t n, float y) {
  const int64_t len = Kr > 0 ? Kr : n;
  const S::V yv = S::set1(y);
  uint64_t word = 0;
  int64_t k = 0;
  for (; k + W <= len; k += W) {
    const S::M e = S::eq(Op::template comb<S>(S::load(xp + k), S::load(wo + k)), yv);
    word |= uint64_t(mask_bits(e)) << k;
  }
  for (; k < len; ++k) word |= uint64_t(Op::template comb<Sc>(xp[k], wo[k]) == y) << k;
  return word;
}

// The products equal to y in the blocks of `mask` of one output (image n, position osi,
// group grp; `wo` its kernel column along k): their number, and the last one's k in *last.
template <class Op>
int64_t convrec_matches(const Ctx& c, const float* xb, const float* wo, uint32_t mask,
                        int64_t kb, int64_t n, int64_t osi, int64_t grp, float y,
                        int64_t* last) {
  const int64_t I = c.I;
  int64_t cnt = 0, at = -1;
  for (; mask; mask &= mask - 1) {
    const int64_t k0 = int64_t(__builtin_ctz(mask)) * kb, k1 = k0 + kb < c.K ? k0 + kb : c.K;
    for (int64_t t = k0 / I; t * I < k1; ++t) {
      const float* xr = cell(c, xb, n, osi, t, grp);
      if (!xr) continue;
      const int64_t ia = k0 > t * I ? k0 - t * I : 0;
      const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
      for (int64_t i = ia; i < ie; i += 64) {
        const int64_t len = ie - i < 64 ? ie - i : 64;
        const uint64_t word = convrec_word<Op>(xr + i, wo + t * I + i, len, y);
        cnt += __builtin_popcountll(word);
        if (word) at = t * I + i + 63 - __builtin_clzll(word);
      }
    }
  }
  *last = at;
  return cnt;
}

// The recorded backward (see the top of this file); false when the call has no record or is
// not the recording forward's case (the general backward serves it).
template <class Op>
bool convrec_backward(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  if (!call.rec || call.rec[0] < 0 || !convrec_case(c)) return false;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T, K = c.K;
  const int64_t kb = dense_block_rows(K);
  const int64_t nb = (K + kb - 1) / kb;
  pack_weights(c, false);  // pass 2's tie recount reads the packed float columns
  // Each output's kernel column along k: (batch, O, K).
  Owned<float> wt_owned = allocate<float>(call.batch * O * K);
  // Per block: its tap and first channel, and whether it is 64 rows inside one tap.
  Owned<int32_t> btab = allocate<int32_t>(2 * nb);
  if (!wt_owned || !btab) {
    c.failed = true;
    return true;
  }
  float* wt = wt_owned.get();
  constexpr int64_t kCols = 16;
  const int64_t ncb = (O + kCols - 1) / kCols;
  auto transpose_cols = [&](int64_t it) {
    const int64_t b = it / ncb, o0 = (it % ncb) * kCols;
    const int64_t nc = O - o0 < kCols ? O - o0 : kCols;
    transpose(call.w + b * c.w_bs + o0, O, wt + (b * O + o0) * K, K, K, nc);
  };
  parallel(c, call.batch * ncb, transpose_cols);
  for (int64_t j = 0; j < nb; ++j) {
    const int64_t k0 = j * kb, t = k0 / I, ia = k0 - t * I;
    btab[2 * j] = int32_t(t);
    btab[2 * j + 1] = kb == 64 && ia + 64 <= I ? int32_t(ia) : -1;
  }
  // Pass 1, per run of whole images and group (general pass 1's items: they own their
  // input gradient), in its order of outputs.
  const int64_t ipi = c.OS >= 32 ? 1 : (32 + c.OS - 1) / c.OS;
  const int64_t runs = (c.g.n + ipi - 1) / ipi;
  auto pass1 = [&](int64_t it) {
    const int64_t grp = it % c.G, bi = it / c.G;
    const int64_t b = bi / runs, n0 = (bi % runs) * ipi;
    const int64_t n1 = n0 + ipi < c.g.n ? n0 + ipi : c.g.n;
    const float* xb = call.x + b * c.x_bs;
    const float* yb = call.y + b * c.y_bs;
    const float* gb = call.g + b * c.y_bs;
    const int32_t* rb = call.rec + b * c.y_bs;
    float* dxb = call.out + b * c.x_bs;
    int32_t* cb = c.code + b * c.y_bs;
    float* vb = c.dwv + b * c.y_bs;
    // A unique winner's dx term waits in a register while the next winners are the same input
    // element (a large x wins for many output channels): dx[pend] = ((dx[pend] + t1) + t2) ...,
    // the general pass's sums in its order, without a store-to-load round trip per term.
    int64_t pend = -1;
    float pval = 0.0f;
    auto flush = [&]() {
      if (pend >= 0) dxb[pend] = pval;
      pend = -1;
    };
    for (int64_t jb = 0; jb < c.nJB; ++jb) {
      const int64_t ob = grp * Og + jb * NR;
      const int64_t oe = ob + (Og - jb * NR < NR ? Og - jb * NR : NR);
      for (int64_t p = n0 * c.OS; p < n1 * c.OS; ++p) {
        const int64_t n = p / c.OS, osi = p % c.OS;
        const int32_t* tabp = c.tab + osi * T;
        for (int64_t o = ob; o < oe; ++o) {
          const int64_t at = p * O + o;
          const uint32_t mask = uint32_t(rb[at]);
          const float yv = yb[at], gv = gb[at];
          const float* wo = wt + (b * O + o) * K;
          int64_t k = -1, cnt = -1, t = 0, i = 0;
          const int64_t j = __builtin_ctz(mask | 0x80000000u);
          if (mask != 0 && mask == (mask & -mask) && btab[2 * j + 1] >= 0) {
            // One marked block, 64 rows of one tap: its compares in one word, inline.
            t = btab[2 * j];
            const int64_t ia = btab[2 * j + 1];
            const int32_t off = tabp[t];
            const float* xr = off >= 0 ? xb + n * c.img + off + grp * I
                              : c.g.has_pad ? c.padrow + grp * I
                                            : nullptr;
            cnt = 0;
            if (xr) {
              const uint64_t word = convrec_word<Op, 64>(xr + ia, wo + t * I + ia, 64, yv);
              cnt = __builtin_popcountll(word);
              i = ia + (word ? __builtin_ctzll(word) : 0);
              k = t * I + i;
            }
          }
          if (cnt < 0 || cnt > 1) {
            cnt = convrec_matches<Op>(c, xb, wo, mask, kb, n, osi, grp, yv, &k);
            t = k / I;  // a tie or an unusual block: rare, a division is fine
            i = k - t * I;
          }
          if (cnt == 0) {
            cb[at] = -2;
          } else if (cnt == 1) {
            cb[at] = int32_t(k);
            const int32_t toff = tabp[t];
            const float wk = wo[k];
            float xv;
            if (toff >= 0) {
              const int64_t off = n * c.img + toff + grp * I + i;
              xv = xb[off];
              const float term = WinTerms<Op>::x(gv, xv, wk);
              if (off != pend) {
                flush();
                pend = off;
                pval = dxb[off];
              }
              pval += term;
            } else {
              xv = c.padrow[grp * I + i];  // a winner in the padding (cell()'s pad row)
            }
            vb[at] = WinTerms<Op>::w(gv, xv, wk);  // kernel_winner_terms.h
          } else {
            cb[at] = -1;
            flush();  // the tie's terms go straight to dx
            const float share = gv / float(cnt);
            for (uint32_t m = mask; m; m &= m - 1) {
              const int64_t k0 = int64_t(__builtin_ctz(m)) * kb, k1 = k0 + kb < K ? k0 + kb : K;
              for (int64_t t = k0 / I; t * I < k1; ++t) {
                if (tabp[t] < 0) continue;
                const int64_t off = n * c.img + tabp[t] + grp * I;
                const int64_t ia = k0 > t * I ? k0 - t * I : 0;
                const int64_t ie = k1 - t * I < I ? k1 - t * I : I;
                for (int64_t i = ia; i < ie; ++i) {
                  const float xv = xb[off + i], wv = wo[t * I + i];
                  if (Op::template comb<Sc>(xv, wv) == yv)
                    dxb[off + i] += share * Op::template dcx<Sc>(xv, wv);
                }
              }
            }
          }
        }
      }
    }
    flush();
  };
  parallel(c, call.batch * runs * c.G, pass1);
  win_route_dw<Op>(c, false);
  return true;
}

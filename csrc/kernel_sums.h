// The backward pass of sums: the input and kernel gradients of the op's elementwise rule
// (hx, hw), and the one-pass dense backward of odd rules.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), never on its own.
#pragma once

// ---- backward: sums (elementwise gradient rules hx, hw) -------------------------------------
// The input rule of vector v of a row. adder's is three vector operations per term (w - x,
// the clip, the fma); with w - x on the FMA ports for every vector they take two FMA slots
// and one add slot, so odd vectors subtract on the add ports instead (the same bits): 1.5 +
// 1.5 slots. Stand-alone loop of layer A's rows, Zen 4: 2.0 -> 1.7 cycles per vector-term.
template <class Op>
inline S::V hx_at(int v, S::V x, S::V w) {
  if constexpr (kIsAdder<Op>) {
    if (v & 1) return Op::template clip<S>(S::sub(w, x));
  }
  return Op::template hx<S>(x, w);
}

// Input gradient of one (position, tap, group) row, NVI vectors of input channels at a time:
// dx[i] += sum_o g[o] * hx(x[i], w[o, i]), with the tap's kernel transposed to (O, I); the
// sum over o is added to dx 64 channels at a time, as the paired pass does (its kDxRun).
template <class Op, int NVI>
void dx_block(const float* xr, float* dxr, const float* gg, const float* wt, int64_t Og,
              int64_t I) {
  using V = S::V;
  V acc[NVI], xv[NVI];
  for (int v = 0; v < NVI; ++v) xv[v] = S::load(xr + v * W);
  for (int64_t o0 = 0; o0 < Og; o0 += 64) {
    const int64_t o1 = o0 + 64 < Og ? o0 + 64 : Og;
    for (int v = 0; v < NVI; ++v) acc[v] = S::zero();
    for (int64_t o = o0; o < o1; ++o) {
      const V gs = S::set1(gg[o]);
      const float* wo = wt + o * I;
      for (int v = 0; v < NVI; ++v)
        acc[v] = S::fma(gs, hx_at<Op>(v, xv[v], S::load(wo + v * W)), acc[v]);
    }
    for (int v = 0; v < NVI; ++v) S::store(dxr + v * W, S::add(S::load(dxr + v * W), acc[v]));
  }
}

// Kernel gradient of RI kernel rows (tap t, input rows i0..) x NV vectors of output channels:
// dw[i, o] += sum_p g[p, o] * hw(x[p, i], w[i, o]), one pass over the positions.
template <class Op, int RI>
void dw_block(const Ctx& c, const float* xb, const float* wb, const float* gb, float* dwb,
              int64_t t, int64_t i0, int64_t grp, int64_t ob) {
  using V = S::V;
  const int64_t O = c.O;
  V acc[RI][NV], wv[RI][NV];
  for (int r = 0; r < RI; ++r)
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = S::zero();
      wv[r][v] = S::load(wb + (t * c.I + i0 + r) * O + ob + v * W);
    }
  for (int64_t p = 0; p < c.P; ++p) {
    const float* xr = cell(c, xb, p / c.OS, p % c.OS, t, grp);
    if (!xr) continue;
    V xs[RI];
    for (int r = 0; r < RI; ++r) xs[r] = S::set1(xr[i0 + r]);
    const float* gr = gb + p * O + ob;
    for (int v = 0; v < NV; ++v) {
      const V gv = S::load(gr + v * W);
      for (int r = 0; r < RI; ++r)
        acc[r][v] = S::fma(gv, Op::template hw<S>(xs[r], wv[r][v]), acc[r][v]);
    }
  }
  for (int r = 0; r < RI; ++r)
    for (int v = 0; v < NV; ++v) S::store(dwb + (t * c.I + i0 + r) * O + ob + v * W, acc[r][v]);
}

// Both gradients of a dense problem (one tap, no padding) for an op with kOddRule: each
// term's h = hx(x, w) feeds dx[p, k] += g[p, o] h and dw[k, o] -= g[p, o] h. An item owns
// ksb blocks of kKB kernel rows of one group (their dw rows, their dx columns); for each
// block of kPB positions it runs its row blocks one after another, each keeping the dx sums
// as vectors over o in L1 and the dw sums in registers. The ksb blocks share each block of
// g while it is in L2 (one block of rows per item read all of g from L3 once per 8 rows:
// E's l1 backward streamed 128 MiB). Every sum keeps its order (o ascending for dx, the
// position blocks ascending for dw), so the bits do not depend on ksb or on the split.
template <class Op>
void dense_odd_backward(Ctx& c) {
  using V = S::V;
  constexpr int kKB = 8;
  constexpr int64_t kPB = 16;
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, P = c.P;
  const int64_t nkb = (I + kKB - 1) / kKB;
  // Row blocks per item: up to 4, while at least 16 items remain for the threads.
  int64_t ksb = 4;
  while (ksb > 1 && call.batch * c.G * ((nkb + ksb - 1) / ksb) < 16) ksb /= 2;
  const int64_t nsb = (nkb + ksb - 1) / ksb;
  auto item = [&](int64_t it) {
    const int64_t sb = it % nsb, grp = (it / nsb) % c.G, b = it / (nsb * c.G);
    const int64_t kb1 = (sb + 1) * ksb < nkb ? (sb + 1) * ksb : nkb;
    alignas(64) float dxp[kPB * kKB * W];
    for (int64_t p0 = 0; p0 < P; p0 += kPB) {
      for (int64_t kb = sb * ksb; kb < kb1; ++kb) {
        const int64_t k0 = kb * kKB;
        const int kn = int(I - k0 < kKB ? I - k0 : kKB);
        const float* xb = call.x + b * c.x_bs + grp * I + k0;
        const float* wb = call.w + b * c.w_bs + k0 * O + grp * Og;
        const float* gb = call.g + b * c.y_bs + grp * Og;
        float* dxb = call.out + b * c.x_bs + grp * I + k0;
        float* dwb = call.out2 + b * c.w_bs + k0 * O + grp * Og;
        const int64_t pn = P - p0 < kPB ? P - p0 : kPB;
        std::memset(dxp, 0, sizeof(dxp));
        for (int64_t o = 0; o < Og; o += W) {
          V wv[kKB], dw[kKB];
          for (int k = 0; k < kKB; ++k) {
            wv[k] = k < kn ? S::load(wb + k * O + o) : S::zero();
            dw[k] = S::zero();
          }
          for (int64_t p = 0; p < pn; ++p) {
            const V gv = S::load(gb + (p0 + p) * O + o);
            const float* xr = xb + (p0 + p) * c.img;  // one position per image
            float* dr = dxp + p * kKB * W;
            for (int k = 0; k < kKB; ++k) {
              if (k >= kn) break;
              const V h = Op::template hx<S>(S::set1(xr[k]), wv[k]);
              S::store(dr + k * W, S::fma(gv, h, S::load(dr + k * W)));
              dw[k] = S::fnma(gv, h, dw[k]);
            }
          }
          for (int k = 0; k < kn; ++k) {
            float* d = dwb + k * O + o;
            S::store(d, p0 == 0 ? dw[k] : S::add(S::load(d), dw[k]));
          }
        }
        for (int64_t p = 0; p < pn; ++p)
          for (int k = 0; k < kn; ++k)
            dxb[(p0 + p) * c.img + k] = S::hsum(S::load(dxp + (p * kKB + k) * W));
      }
    }
  };
  parallel(c, call.batch * c.G * nsb, item);
}

// Each (batch, tap, group, block of NR input rows) of the kernel transposed to (Og, NR),
// zero-padded, into c.wpack, 16 x 16 at a time: the input gradient's operand (a run of whole
// images reuses each block). Shared by sum_backward and the one-pass loops.
inline void pack_kernel_blocks(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const int64_t nIB = (I + NR - 1) / NR;
  const int64_t blk = Og * NR;
  auto pack = [&](int64_t it) {
    const int64_t ib = it % nIB, grp = (it / nIB) % c.G, t = (it / (nIB * c.G)) % T;
    const int64_t b = it / (nIB * c.G * T);
    const float* src = call.w + b * c.w_bs + t * I * O + grp * Og;
    float* dst = c.wpack + it * blk;
    const int64_t nl = I - ib * NR < NR ? I - ib * NR : NR;
    transpose(src + ib * NR * O, O, dst, NR, nl, Og);  // kernel_dense_backward.h
    for (int64_t o = 0; o < Og; ++o)
      for (int64_t l = nl; l < NR; ++l) dst[o * NR + l] = 0.0f;
  };
  parallel(c, call.batch * T * c.G * nIB, pack);
}

template <class Op>
void sum_backward(Ctx& c, int64_t parts) {
  const jaxconv::Call& call = *c.call;
  if constexpr (Op::kOddRule) {
    // Input channels in whole vectors take the pair pass below (E l1 f+b, one thread, CPU
    // time under load: 29.9-31.4 -> 25.3-26.1 ms); this one serves the others.
    const bool paired = PairRule<Op>::kHas && c.I % W == 0;
    if (!paired && parts == 3 && c.T == 1 && c.OS == 1 && c.tab[0] == 0 && c.Og % W == 0) {
      dense_odd_backward<Op>(c);
      return;
    }
  }
  const int64_t I = c.I, O = c.O, Og = c.Og, T = c.T;
  const bool vec_i = I % W == 0;
  // pack_kernel_blocks's layout: (batch, tap, group, block of NR input rows), each (Og, NR).
  const int64_t nIB = (I + NR - 1) / NR;
  const int64_t blk = Og * NR;
  if (vec_i) {
    // adder / l1 / l2: both gradients in one pass (kernel_sumbwd_dense.h, which packs the
    // kernel itself; kernel_sums_paired.h).
    if constexpr (PairRule<Op>::kHas) {
      if (parts == 3 && dense_pair_fits(c)) {
        dense_pair_backward<Op>(c);
        return;
      }
    }
    if (parts & 1) pack_kernel_blocks(c);
    if constexpr (PairRule<Op>::kHas) {
      if (parts == 3 && pair_backward<Op>(c)) return;
    }
  }
  const int64_t ipi = c.OS >= 32 ? 1 : (32 + c.OS - 1) / c.OS;
  const int64_t runs = (c.g.n + ipi - 1) / ipi;
  // Each run's input cells are cut into bands, one item each (at least 32 items in all): an
  // item adds only the terms that land in its band, so items write disjoint dx, and each dx
  // element still sums its terms in the same order (taps ascending, at most one position per
  // tap), whatever the split.
  const int64_t cells = c.img / (c.C > 0 ? c.C : 1);
  const int64_t want = (32 + call.batch * runs * c.G - 1) / (call.batch * runs * c.G);
  const int64_t nband = want < cells ? want : (cells > 0 ? cells : 1);
  const int64_t band = (cells + nband - 1) / nband;
  auto dx_item = [&](int64_t it) {  // (batch, run, group, band)
    const int64_t bnd = it % nband, grp = (it / nband) % c.G, bi = it / (nband * c.G);
    const int64_t b = bi / runs, n0 = (bi % runs) * ipi;
    // Tap offsets within an image are cell * C: the band's offsets are [lo, hi).
    const int64_t lo = bnd * band * c.C, hi = (bnd + 1) * band * c.C;
    const int64_t n1 = n0 + ipi < c.g.n ? n0 + ipi : c.g.n;
    const float* xb = call.x + b * c.x_bs;
    const float* wb = call.w + b * c.w_bs;
    const float* gb = call.g + b * c.y_bs;
    float* dxb = call.out + b * c.x_bs;
    if (vec_i) {
      for (int64_t t = 0; t < T; ++t)
        for (int64_t ib = 0; ib < nIB; ++ib) {
            const float* wt = c.wpack + (((b * T + t) * c.G + grp) * nIB + ib) * blk;
            const int64_t nvi = ((I - ib * NR < NR) ? I - ib * NR : NR) / W;
            for (int64_t p = n0 * c.OS; p < n1 * c.OS; ++p) {
              const int32_t off = c.tab[(p % c.OS) * T + t];
              if (off < lo || off >= hi) continue;  // another band's, or padded (dropped)
              const int64_t base = (p / c.OS) * c.img + off + grp * I + ib * NR;
              const float* gg = gb + p * O + grp * Og;
              if (nvi == NV) {
                dx_block<Op, NV>(xb + base, dxb + base, gg, wt, Og, NR);
              } else {
                for (int64_t v = 0; v < nvi; ++v)
                  dx_block<Op, 1>(xb + base + v * W, dxb + base + v * W, gg, wt + v * W, Og,
                                  NR);
              }
            }
          }
      return;
    }
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t osi = 0; osi < c.OS; ++osi) {
        const float* gr = gb + (n * c.OS + osi) * O;
        for (int64_t t = 0; t < T; ++t) {
          const int32_t off = c.tab[osi * T + t];
          if (off < lo || off >= hi) continue;
          const int64_t base = n * c.img + off;
          {
            const float* gg = gr + grp * Og;
            for (int64_t i = 0; i < I; ++i) {
              const float xv = xb[base + grp * I + i];
              const float* wr = wb + (t * I + i) * O + grp * Og;
              const S::V xs = S::set1(xv);
              S::V acc = S::zero();
              int64_t o = 0;
              for (; o + W <= Og; o += W)
                acc = S::fma(S::load(gg + o), Op::template hx<S>(xs, S::load(wr + o)), acc);
              float s = S::hsum(acc);
              for (; o < Og; ++o) s += gg[o] * Op::template hx<Sc>(xv, wr[o]);
              dxb[base + grp * I + i] += s;
            }
          }
        }
      }
  };
  // Kernel gradient, per (batch, tap, block of kRows input rows): a pass over all positions.
  constexpr int kRows = MR / 2;
  const int64_t nib = (I + kRows - 1) / kRows;
  auto dw_item = [&](int64_t it) {
    const int64_t ib = it % nib, t = (it / nib) % T, b = it / (nib * T);
    const float* xb = call.x + b * c.x_bs;
    const float* wb = call.w + b * c.w_bs;
    const float* gb = call.g + b * c.y_bs;
    float* dwb = call.out2 + b * c.w_bs;
    const int64_t i1 = (ib + 1) * kRows < I ? (ib + 1) * kRows : I;
    for (int64_t grp = 0; grp < c.G; ++grp) {
      for (int64_t o0 = 0; o0 < Og; o0 += NR) {
        const int64_t nc = Og - o0 < NR ? Og - o0 : NR;
        const int64_t nvec = nc / W;
        const int64_t ob = grp * Og + o0;
        if (nc == NR && i1 - ib * kRows == kRows) {
          dw_block<Op, kRows>(c, xb, wb, gb, dwb, t, ib * kRows, grp, ob);
          continue;
        }
        for (int64_t i = ib * kRows; i < i1; ++i) {
          const float* wr = wb + (t * I + i) * O + ob;
          S::V acc[NV], wv[NV];
          float tacc[NR], twv[NR];
          for (int v = 0; v < NV; ++v) {
            acc[v] = S::zero();
            wv[v] = v < nvec ? S::load(wr + v * W) : S::zero();
          }
          for (int64_t l = nvec * W; l < nc; ++l) {
            tacc[l] = 0.0f;
            twv[l] = wr[l];
          }
          for (int64_t p = 0; p < c.P; ++p) {
            const float* xr = cell(c, xb, p / c.OS, p % c.OS, t, grp);
            if (!xr) continue;
            const float xv = xr[i];
            const S::V xs = S::set1(xv);
            const float* gr = gb + p * O + ob;
            for (int v = 0; v < nvec; ++v)
              acc[v] = S::fma(S::load(gr + v * W), Op::template hw<S>(xs, wv[v]), acc[v]);
            for (int64_t l = nvec * W; l < nc; ++l)
              tacc[l] += gr[l] * Op::template hw<Sc>(xv, twv[l]);
          }
          float* dst = dwb + (t * I + i) * O + ob;
          for (int v = 0; v < nvec; ++v) S::store(dst + v * W, acc[v]);
          for (int64_t l = nvec * W; l < nc; ++l) dst[l] = tacc[l];
        }
      }
    }
  };
  // Both gradients in one fork-join (they write disjoint outputs): the input gradient's
  // coarse items first, the kernel gradient's finer ones after, so that the finer items even
  // out the threads' finishing times.
  const int64_t ndx = (parts & 1) ? call.batch * runs * c.G * nband : 0;
  const int64_t ndw = (parts & 2) ? call.batch * T * nib : 0;
  auto both = [&](int64_t it) {
    if (it < ndx) dx_item(it);
    else dw_item(it - ndx);
  };
  if (ndx + ndw > 0) parallel(c, ndx + ndw, both);
}

// NanTwin<Op>::type: the op whose backward keeps NaN where Op's, built for operands whose
// terms are never NaN, may drop it: adder's input rule with ClipKeepNan (kernel_ops.h) where
// this instruction set's one-instruction clip returns +-1 for NaN. Op itself elsewhere.
template <class Op>
struct NanTwin {
  using type = Op;
};
template <>
struct NanTwin<Adder> {
  using type = std::conditional_t<S::kClipNoNanDropsNan, AdderOf<ClipKeepNan>, Adder>;
};

// The backward of Op's NaN twin, where it has one, the input gradient is asked for and an
// operand holds a value that is not finite (a NaN, or an infinity that may meet the same one:
// a NaN difference w - x); returns whether it ran. A finite call pays one scan of x and w
// (all_finite: memory-bound, shared by the threads) and keeps the one-instruction clip.
// The cotangent and a pad value need no scan: a NaN g makes the term's g * clip NaN with
// either clip, and a padded term's input gradient is dropped.
template <class Op>
bool nan_twin_backward(Ctx& c) {
  using Twin = typename NanTwin<Op>::type;
  if constexpr (std::is_same_v<Twin, Op>) {
    return false;
  } else {
    const jaxconv::Call& call = *c.call;
    if (!(call.parts & 1) ||
        all_finite(c, call.x, call.batch * c.x_bs, call.w, call.batch * c.w_bs))
      return false;
    sum_backward<Twin>(c, call.parts);
    return true;
  }
}

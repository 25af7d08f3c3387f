// Both gradients of adder / l1 on a dense problem (one tap, one output position per image,
// no padding) in one pass over the terms, with the positions outside and the output channels
// inside: a tile of PB positions x V vectors of input channels keeps its x values and its
// input-gradient sums in registers while it walks a block of output channels, each output
// channel's V kernel vectors loaded once and its V kernel-gradient sums updated PB times.
//
// Why: the convolution's pair pass (kernel_sums_paired.h) keeps the kernel-gradient sums in
// registers and walks the positions inside, loading 4 x 4 kernel vectors and the input-gradient
// partials of every position for each 16 vector-terms (1.75 loads per term). On a dense layer
// (E: 256 x 1024 @ 1024 x 1024) its x rows and cotangent rows lie 4 KiB apart and its
// partials (16 KiB of dx, 256 KiB of dw per block of channels) do not stay in L1: one thread
// took 20.6-22.1 ms for adder's backward there (layer A, as many terms: 14.9). Here a term
// costs 10 loads and 2 stores per 12 terms (PB = 6, V = 2), everything but the cotangent rows
// in L1: 14.9-15.3 ms (benchmarks/sumbwd_1t.cc); 12.6-13.6 with the cotangent read by the
// fused multiply-adds (mode 1 below).
//
// The floor (Zen 4, one thread; a 512-bit op a cycle on the FMA pipes and one on the add
// pipes, the peak probe's 57 G fma terms/s; vrangeps and min/add/sub on the add pipes,
// vfixupimmps on the FMA pipes, measured): per vector of 16 terms adder takes 2 + 2 (fma,
// fnma | sub, range): 2 cycles, 9.4 ms for E's 268 M terms; l2 2 + 1: 2 cycles, 9.4 ms; l1
// 3 + 1 (fixup, fnma, fma | sub): 3 cycles, 14.1 ms, or 7 + 7 per 3 terms in its split form
// (kernel_densebwd_memcot.h): 2.33 cycles, 11 ms. The tile loop alone (no packing, no
// transposes) ran adder 13.3-13.6 ms with a vbroadcastss per (position, channel) (6 per 24
// cycles, each taking a pipe slot when both kinds are full) and 11.4-11.7 with the embedded
// broadcast; l1 15.4-16.1 -> 13.5-13.9 split; l2 11.4-11.6: ~80% of each floor. The rest of
// the backward was ~1.5 ms: pack_kernel_blocks' pass over a 4 MiB copy of the kernel and the
// FFI's serial memsets of dx and dw (5 MiB). Each block of output channels now transposes
// its own kernel slice into L1 (dense_pair_block) and nothing is zeroed (the tiles' first run
// writes dx, the transposes every dw entry): one thread, CPU time, sumbwd_1t.cc, 7 alternating
// rounds, load 12-16: adder 13.46 -> 12.01 ms, l1 14.06 -> 13.46, l2 12.96 -> 12.31, the same
// bits; what is left besides the tile loop is dw's and the kernel's transposes (~0.5 ms).
// Trying two output channels per step (PB 4, 5 or 6; more scheduler room for the dw chains'
// six dependent fused multiply-adds) ran no faster (adder 12.4-13.6 against 12.4-12.6 ms).
//
// The structural ratio: a term of the backward is 4 vector operations on 2 pipes (2 cycles
// per 16 terms), the forward's about 1.2 cycles, max_plus's recorded backward a scatter. On
// E, one thread: adder's forward 6.5 ms + the backward's floor 9.4 = 15.9 ms at best, against
// max_plus's forward + backward ~10.3 ms (JAX, CPU time): >= 1.5x on this CPU, whatever the
// overheads; measured now ~18.5 ms (1.8x).
//
// Each dx element sums its output channels ascending in runs of kDxRun (from zero; each run
// then added to dx), each dw element its positions ascending from zero: pair_backward's sums
// in its order, so its bits, wherever it does not cut the images into runs (at least 8 blocks
// of 64 input channels, as on E); with fewer, dw sums the positions in one run instead of
// several. Neither depends on the threads.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_sums_paired.h, never on its own.
#pragma once

// Positions and vectors of input channels of one dense tile. Two vectors where a packed block
// of NR input channels holds a whole number of pairs (AVX-512: NR 32, W 16); else one (AVX2:
// NR 24, W 8, where a pair could straddle two blocks; 6 x values, 6 sums, a kernel vector,
// its dw sums and the cotangent fill 15 of the 16 registers). Without it AVX2's dense sums
// took the convolution's pair pass: E's adder forward+backward 2.3x lax on a Zen 3.
constexpr int kDensePB = 6;
constexpr int kDenseV = NR % (2 * W) == 0 ? 2 : 1;
// Output channels per block (a multiple of the input gradient's runs, kDxRun).
constexpr int64_t kDenseOB = 128;

// One tile: PB positions (x rows `xr`, row stride xs; cotangent rows `gr`, row stride gs; dx
// rows `dxr`, row stride xs) x V vectors of input channels, against `no` output channels
// (kernel vectors `wt` and kernel-gradient sums `dwl`, both row stride V * W). `first`: the
// tile's first run writes 0 + its sums to dx (which the caller did not zero: the same bits as
// adding them to a zeroed dx) instead of adding them to it.
//
// Mode 0: each cotangent broadcast into a register (PairRule); 1: read by the term's
// instructions (MemCot, kernel_densebwd_memcot.h); 2: as 1, l1 taking two terms in three in
// its product form. The same bits in every mode.
template <class Op, int PB, int V, int Mode>
void dense_pair_tile(const float* xr, const float* gr, float* dxr, int64_t xs, int64_t gs,
                     const float* wt, float* dwl, int64_t no, bool first) {
  using Vec = S::V;
  Vec xv[PB][V], acc[PB][V];
  for (int p = 0; p < PB; ++p)
    for (int v = 0; v < V; ++v) xv[p][v] = S::load(xr + p * xs + v * W);
  for (int64_t o0 = 0; o0 < no; o0 += kDxRun) {
    const int64_t o1 = o0 + kDxRun < no ? o0 + kDxRun : no;
    for (int p = 0; p < PB; ++p)
      for (int v = 0; v < V; ++v) acc[p][v] = S::zero();
    for (int64_t o = o0; o < o1; ++o) {
      Vec wv[V], dw[V];
      for (int v = 0; v < V; ++v) {
        wv[v] = S::load(wt + o * (V * W) + v * W);
        dw[v] = S::load(dwl + o * (V * W) + v * W);
      }
      for (int p = 0; p < PB; ++p) {
        if constexpr (Mode != 0) {
          const float* g = gr + p * gs + o;
          for (int v = 0; v < V; ++v)
            MemCot<Op>::term(g, xv[p][v], wv[v], acc[p][v], dw[v],
                             Mode == 2 && (p * V + v) % 3 != 0);
        } else {
          const Vec g = PairRule<Op>::cot(S::set1(gr[p * gs + o]));
          for (int v = 0; v < V; ++v) PairRule<Op>::term(g, xv[p][v], wv[v], acc[p][v], dw[v]);
        }
      }
      for (int v = 0; v < V; ++v) S::store(dwl + o * (V * W) + v * W, dw[v]);
    }
    for (int p = 0; p < PB; ++p)
      for (int v = 0; v < V; ++v) {
        float* d = dxr + p * xs + v * W;
        S::store(d, S::add(first && o0 == 0 ? S::zero() : S::load(d), acc[p][v]));
      }
  }
}

// The tile of the last pn < PB positions (one instantiation per count).
template <class Op, int V, int Mode>
void dense_pair_rest(int pn, const float* xr, const float* gr, float* dxr, int64_t xs,
                     int64_t gs, const float* wt, float* dwl, int64_t no, bool first) {
  switch (pn) {
    case 1: return dense_pair_tile<Op, 1, V, Mode>(xr, gr, dxr, xs, gs, wt, dwl, no, first);
    case 2: return dense_pair_tile<Op, 2, V, Mode>(xr, gr, dxr, xs, gs, wt, dwl, no, first);
    case 3: return dense_pair_tile<Op, 3, V, Mode>(xr, gr, dxr, xs, gs, wt, dwl, no, first);
    case 4: return dense_pair_tile<Op, 4, V, Mode>(xr, gr, dxr, xs, gs, wt, dwl, no, first);
    default: return dense_pair_tile<Op, 5, V, Mode>(xr, gr, dxr, xs, gs, wt, dwl, no, first);
  }
}

// One block of V vectors of input channels (from i0) of one (batch entry, group): every
// position, every output channel. Each block of output channels first transposes its
// (V * W, no) slice of the kernel into `wl` (its rows, V * W apart, are the tiles' kernel
// vectors): the item's own rows, read once, in L1 beside its kernel-gradient sums `dwl`,
// where a packed copy of the whole kernel (pack_kernel_blocks) took a pass of its own and
// 4 MiB of scratch on E.
template <class Op, int V, int Mode>
void dense_pair_block(const Ctx& c, int64_t b, int64_t grp, int64_t i0, float* wl, float* dwl) {
  const jaxconv::Call& call = *c.call;
  const int64_t I = c.I, O = c.O, Og = c.Og, P = c.P, xs = c.img;
  const float* xb = call.x + b * c.x_bs + grp * I + i0;
  const float* gb = call.g + b * c.y_bs + grp * Og;
  float* dxb = call.out + b * c.x_bs + grp * I + i0;
  float* dwb = call.out2 + b * c.w_bs + i0 * O + grp * Og;
  const float* wb = call.w + b * c.w_bs + i0 * O + grp * Og;
  for (int64_t o0 = 0; o0 < Og; o0 += kDenseOB) {
    const int64_t no = Og - o0 < kDenseOB ? Og - o0 : kDenseOB;
    const bool first = o0 == 0;
    transpose(wb + o0, O, wl, V * W, V * W, no);  // kernel_dense_backward.h
    for (int64_t k = 0; k < no * V * W; k += W) S::store(dwl + k, S::zero());
    int64_t p = 0;
    for (; p + kDensePB <= P; p += kDensePB)
      dense_pair_tile<Op, kDensePB, V, Mode>(xb + p * xs, gb + p * O + o0, dxb + p * xs, xs, O,
                                             wl, dwl, no, first);
    if (p < P)
      dense_pair_rest<Op, V, Mode>(int(P - p), xb + p * xs, gb + p * O + o0, dxb + p * xs, xs,
                                   O, wl, dwl, no, first);
    transpose(dwl, V * W, dwb + o0, O, no, V * W);  // kernel_dense_backward.h
  }
}

// Whether dense_pair_backward serves the call: a dense problem whose input channels are whole
// vectors, with enough blocks of them for the threads (else pair_backward, which cuts the
// positions into runs). A tile's kDenseV vectors must lie in one packed block of NR input
// channels (dense_pair_block reads them at i0 % NR): on AVX2 (NR = 24, kDenseV * W = 16) a
// tile from channel 16 read channels 24..31 from the next output channel's row of the block,
// and dx / dw of 48 of 272 channels were wrong (tests/test_native_sumbwd.py under
// JAXCONV_NATIVE_ISA=avx2): there kDenseV is 1.
inline bool dense_pair_fits(const Ctx& c) {
  const int64_t blocks = (c.I + kDenseV * W - 1) / (kDenseV * W);
  return NR % (kDenseV * W) == 0 && c.T == 1 && c.OS == 1 && c.tab[0] == 0 && c.I % W == 0 &&
         c.call->batch * c.G * blocks >= 8;
}

// Both gradients of adder / l1 / l2 on a dense problem (dense_pair_fits), into dx and dw
// that need not be zeroed first (every entry is written). Items are (batch entry, group, block of kDenseV vectors of input
// channels; a last block of one vector where I is an odd number of vectors); each owns its
// dx columns and dw rows.
template <class Op, int Mode>
void dense_pair_backward_mode(Ctx& c) {
  const jaxconv::Call& call = *c.call;
  const int64_t nvec = c.I / W;
  const int64_t blocks = (nvec + kDenseV - 1) / kDenseV;
  auto item = [&](int64_t it) {
    const int64_t blk = it % blocks, grp = (it / blocks) % c.G, b = it / (blocks * c.G);
    alignas(64) float wl[kDenseOB * kDenseV * W], dwl[kDenseOB * kDenseV * W];
    const int64_t i0 = blk * kDenseV * W;
    if (nvec - blk * kDenseV >= kDenseV)
      dense_pair_block<Op, kDenseV, Mode>(c, b, grp, i0, wl, dwl);
    else
      dense_pair_block<Op, 1, Mode>(c, b, grp, i0, wl, dwl);
  };
  parallel(c, call.batch * c.G * blocks, item);
}

// The mode by the tuning parameters (kernel_params.h): `bcast` (the embedded broadcast, as
// the forward's) and `l1_split` (l1's product form).
template <class Op>
void dense_pair_backward(Ctx& c) {
  if constexpr (MemCot<Op>::kOn) {
    if (c.prm.bcast != 0) {
      if (std::is_same_v<Op, L1> && c.prm.l1_split != 0)
        return dense_pair_backward_mode<Op, 2>(c);
      return dense_pair_backward_mode<Op, 1>(c);
    }
  }
  dense_pair_backward_mode<Op, 0>(c);
}

// A user op whose reduce is any associative callable `fold(a, b)` (not sum / max / min): the
// forward folds each output's products in the XLA engine's generic order, and the backward
// recomputes that fold per output and runs it backwards (the fold's own partials dfab,
// then the combine's dcxw), as JAX's derivative of the XLA engine's fold does.
//
// The order (jaxconv/_src/engines/xla/forward.py `_forward_block`, algebra.tree_reduce_last):
// per output, acc = ident; for each tap in order that reads an input cell (or the pad value),
// acc = fold(acc, tree(products of that tap over the input channels)), where tree pairs element
// j with j + n/2 level by level, an odd level first extended by the identity. Taps that only
// see identity padding are skipped (the XLA engine folds the identity there).
//
// Vectors run over output channels. Included by a generated user-op source (codegen.py) inside
// the anonymous namespace, after kernels.inc; the functor provides ident, comb, fold, and dcxw /
// dfab (both partials of the combine / the fold at once).
#pragma once

namespace fold_detail {

// Positions per forward work item.
constexpr int64_t kPosPerItem = 16;

// n vectors (64-byte aligned, as vector types need; malloc's alignment is less).
inline Owned<S::V> vectors(int64_t n) {
  const size_t bytes = (sizeof(S::V) * size_t(n > 0 ? n : 1) + 63) / 64 * 64;
  return Owned<S::V>(static_cast<S::V*>(std::aligned_alloc(64, bytes)));
}

// The kernel of batch entry b, group grp as (T, I, Ogp) with Ogp a multiple of W, zero-padded.
template <class F>
void pack_weights(Ctx& c, float* wp, int64_t Ogp) {
  const jaxconv::Call& call = *c.call;
  auto item = [&](int64_t it) {
    const int64_t grp = it % c.G, b = it / c.G;
    const float* wb = call.w + b * c.w_bs;
    float* dst = wp + it * c.T * c.I * Ogp;
    for (int64_t k = 0; k < c.T * c.I; ++k) {
      const float* src = wb + k * c.O + grp * c.Og;
      float* d = dst + k * Ogp;
      for (int64_t o = 0; o < c.Og; ++o) d[o] = src[o];
      for (int64_t o = c.Og; o < Ogp; ++o) d[o] = 0.0f;
    }
  };
  parallel(c, call.batch * c.G, item);
}

// The tree fold of buf[0..n) in place (buf holds n + 1 vectors); returns the root. Where
// `levels` is given, the tree's levels are kept: level L starts at levels[L].off with
// levels[L].n (even) elements, and its results start at off + n.
struct Level {
  int64_t off, n;
};
template <class F>
inline S::V tree(S::V* buf, int64_t n, Level* levels, int* nlev) {
  const S::V id = S::set1(F::ident());
  int64_t off = 0;
  int nl = 0;
  while (n > 1) {
    if (n & 1) buf[off + n++] = id;
    const int64_t h = n / 2;
    S::V* src = buf + off;
    S::V* dst = levels ? buf + off + n : buf + off;
    for (int64_t j = 0; j < h; ++j) dst[j] = F::template fold<S>(src[j], src[j + h]);
    if (levels) {
      levels[nl++] = Level{off, n};
      off += n;
    }
    n = h;
  }
  if (nlev) *nlev = nl;
  return buf[off];
}

// Tree storage for I leaves with every level kept: at most 2 I + 2 log2(I) + 2 vectors.
inline int64_t tree_size(int64_t I) { return 2 * I + 2 * 64 + 2; }

}  // namespace fold_detail

template <class F>
void fold_forward(Ctx& c, const float* wp, int64_t Ogp) {
  using namespace fold_detail;
  const jaxconv::Call& call = *c.call;
  const int64_t nvec = Ogp / W;
  const int64_t npb = (c.P + kPosPerItem - 1) / kPosPerItem;
  auto item = [&](int64_t it) {
    const int64_t pb = it % npb, v = (it / npb) % nvec, grp = (it / (npb * nvec)) % c.G;
    const int64_t b = it / (npb * nvec * c.G);
    Owned<S::V> hold = vectors(c.I + 1);
    S::V* buf = hold.get();
    if (!buf) {
      c.failed = true;  // benign race: every writer stores true
      return;
    }
    const float* xb = call.x + b * c.x_bs;
    const float* wg = wp + (b * c.G + grp) * c.T * c.I * Ogp + v * W;
    float* yb = call.out + b * c.y_bs;
    const int64_t o0 = grp * c.Og + v * W;
    const int64_t nl = c.Og - v * W < W ? c.Og - v * W : W;
    const int64_t p1 = (pb + 1) * kPosPerItem < c.P ? (pb + 1) * kPosPerItem : c.P;
    for (int64_t p = pb * kPosPerItem; p < p1; ++p) {
      S::V acc = S::set1(F::ident());
      for (int64_t t = 0; t < c.T; ++t) {
        const float* xr = cell(c, xb, p / c.OS, p % c.OS, t, grp);
        if (!xr) continue;
        const float* wt = wg + t * c.I * Ogp;
        for (int64_t i = 0; i < c.I; ++i)
          buf[i] = F::template comb<S>(S::set1(xr[i]), S::load(wt + i * Ogp));
        acc = F::template fold<S>(acc, tree<F>(buf, c.I, nullptr, nullptr));
      }
      alignas(64) float tmp[W];
      S::store(tmp, acc);
      std::memcpy(yb + p * c.O + o0, tmp, sizeof(float) * size_t(nl));
    }
  };
  parallel(c, call.batch * c.G * nvec * npb, item);
}

// Per work item (batch entry, group, vector of output channels, image): the image's part of a
// private input gradient of the group's channels and a private kernel gradient of the vector's
// columns (both summed over the items afterwards).
template <class F>
void fold_backward(Ctx& c, const float* wp, int64_t Ogp, float* dxp, float* dwp) {
  using namespace fold_detail;
  const jaxconv::Call& call = *c.call;
  const int64_t nvec = Ogp / W, T = c.T, I = c.I;
  const int64_t N = c.g.n, icells = c.img / c.C;  // input cells per image
  const int64_t cells = icells * N;                 // per batch entry
  const int64_t tsz = tree_size(I);
  auto item = [&](int64_t it) {
    const int64_t img = it % N, v = (it / N) % nvec, grp = (it / (N * nvec)) % c.G;
    const int64_t b = it / (N * nvec * c.G);
    // Per tap: the tree (every level) and its gradient; the accumulator before the tap.
    Owned<S::V> hold = vectors(T * (2 * tsz + 1));
    Owned<Level> lhold = allocate<Level>(T * 64);
    Owned<int> nhold = allocate<int>(T);
    if (!hold || !lhold || !nhold) {
      c.failed = true;
      return;
    }
    S::V* trees = hold.get();
    S::V* grads = trees + T * tsz;
    S::V* accs = grads + T * tsz;
    Level* levels = lhold.get();
    float* dw = dwp + it * T * I * W;
    std::memset(dw, 0, sizeof(float) * size_t(T * I * W));
    const float* xb = call.x + b * c.x_bs;
    const float* wg = wp + (b * c.G + grp) * T * I * Ogp + v * W;
    const float* gb = call.g + b * c.y_bs;
    float* dx = dxp ? dxp + ((b * c.G + grp) * nvec + v) * cells * I : nullptr;
    if (dx) std::memset(dx + img * icells * I, 0, sizeof(float) * size_t(icells * I));
    const int64_t o0 = grp * c.Og + v * W;
    const int64_t nl = c.Og - v * W < W ? c.Og - v * W : W;
    alignas(64) float gl[W];
    for (int l = 0; l < W; ++l) gl[l] = 0.0f;
    int* nlevs = nhold.get();
    for (int64_t p = img * c.OS; p < (img + 1) * c.OS; ++p) {
      const int64_t n = p / c.OS, osi = p % c.OS;
      S::V acc = S::set1(F::ident());
      for (int64_t t = 0; t < T; ++t) {
        const float* xr = cell(c, xb, n, osi, t, grp);
        if (!xr) continue;
        const float* wt = wg + t * I * Ogp;
        S::V* tr = trees + t * tsz;
        for (int64_t i = 0; i < I; ++i)
          tr[i] = F::template comb<S>(S::set1(xr[i]), S::load(wt + i * Ogp));
        accs[t] = acc;
        acc = F::template fold<S>(acc, tree<F>(tr, I, levels + t * 64, &nlevs[t]));
      }
      std::memcpy(gl, gb + p * c.O + o0, sizeof(float) * size_t(nl));
      S::V gacc = S::load(gl);
      for (int64_t t = T - 1; t >= 0; --t) {
        const float* xr = cell(c, xb, n, osi, t, grp);
        if (!xr) continue;
        S::V* tr = trees + t * tsz;
        S::V* gr = grads + t * tsz;
        const Level* lv = levels + t * 64;
        const int nlv = nlevs[t];
        const S::V root = nlv ? tr[lv[nlv - 1].off + lv[nlv - 1].n] : tr[0];
        const S::V a = accs[t];
        // Cotangents flow as JAX's transpose multiplies them: g * (d fold / d operand).
        S::V da, db;
        F::template dfab<S>(a, root, &da, &db);
        gr[nlv ? lv[nlv - 1].off + lv[nlv - 1].n : 0] = S::mul(gacc, db);
        gacc = S::mul(gacc, da);
        for (int L = nlv - 1; L >= 0; --L) {
          const int64_t off = lv[L].off, m = lv[L].n, h = m / 2;
          for (int64_t j = 0; j < h; ++j) {
            const S::V gp = gr[off + m + j];
            S::V da, db;
            F::template dfab<S>(tr[off + j], tr[off + j + h], &da, &db);
            gr[off + j] = S::mul(gp, da);
            gr[off + j + h] = S::mul(gp, db);
          }
        }
        const float* wt = wg + t * I * Ogp;
        const int32_t off = c.tab[osi * T + t];
        for (int64_t i = 0; i < I; ++i) {
          const S::V xs = S::set1(xr[i]);
          const S::V wv = S::load(wt + i * Ogp);
          S::V cx, cw;
          F::template dcxw<S>(xs, wv, &cx, &cw);
          float* d = dw + (t * I + i) * W;
          S::store(d, S::add(S::load(d), S::mul(gr[i], cw)));
          if (dx && off >= 0) {  // padded cells' gradient is dropped
            alignas(64) float hx[W];
            S::store(hx, S::mul(gr[i], cx));
            float s = 0.0f;
            for (int64_t l = 0; l < nl; ++l) s += hx[l];
            dx[(n * c.img + off) / c.C * I + i] += s;
          }
        }
      }
    }
  };
  parallel(c, call.batch * c.G * nvec * N, item);
  if (c.failed) return;
  // dw[b, k, o0 + l] = the sum over the images' items.
  auto dw_sum = [&](int64_t it) {
    const int64_t v = it % nvec, grp = (it / nvec) % c.G, b = it / (nvec * c.G);
    const int64_t o0 = grp * c.Og + v * W;
    const int64_t nl = c.Og - v * W < W ? c.Og - v * W : W;
    const float* src = dwp + it * N * T * I * W;
    float* dwb = call.out2 + b * c.w_bs;
    for (int64_t k = 0; k < T * I; ++k) {
      S::V s = S::load(src + k * W);
      for (int64_t m = 1; m < N; ++m) s = S::add(s, S::load(src + (m * T * I + k) * W));
      alignas(64) float tmp[W];
      S::store(tmp, s);
      std::memcpy(dwb + k * c.O + o0, tmp, sizeof(float) * size_t(nl));
    }
  };
  if (call.parts & 2) parallel(c, call.batch * c.G * nvec, dw_sum);
  if (!dxp) return;
  // dx[b, cell, grp * I + i] = the sum over the group's items.
  auto sum = [&](int64_t it) {
    const int64_t grp = it % c.G, b = it / c.G;
    float* dxb = call.out + b * c.x_bs;
    const float* src = dxp + (b * c.G + grp) * nvec * cells * I;
    for (int64_t q = 0; q < cells; ++q)
      for (int64_t i = 0; i < I; ++i) {
        float s = 0.0f;
        for (int64_t v = 0; v < nvec; ++v) s += src[(v * cells + q) * I + i];
        dxb[q * c.C + grp * I + i] = s;
      }
  };
  parallel(c, call.batch * c.G, sum);
}

// One call of a callable-reduce op's kernels. Returns 0, 1 (bfloat16 / float16 operands not
// widened) or 2 (an allocation failed).
template <class F>
int run_fold_op(const jaxconv::Call& call, bool backward) {
  // bfloat16 / float16 operands reach a fold as float32 copies (kinds.py `low_in_call`):
  // the in-call widening (kernel_bf16fuse_low.h) is the tiled loops' only.
  if (call.low && call.low->widen) return 1;
  Ctx c{};
  c.call = &call;
  c.g = call.geom;
  const jaxconv::Geom& g = c.g;
  c.T = g.k[0] * g.k[1] * g.k[2];
  c.I = g.i;
  c.O = g.o;
  c.G = g.g;
  c.Og = g.o / g.g;
  c.C = g.c;
  c.OS = g.os[0] * g.os[1] * g.os[2];
  c.P = g.n * c.OS;
  c.img = g.sp[0] * g.sp[1] * g.sp[2] * g.c;
  c.K = c.T * c.I;
  c.NR = NR;
  c.nJB = (c.Og + NR - 1) / NR;
  c.x_bs = g.n * c.img;
  c.w_bs = c.K * c.O;
  c.y_bs = c.P * c.O;
  // The zeroing rule (problem.h's Call::zero_dx): fold_backward's sums write every entry of
  // the parts asked for, so only an empty problem's gradients are zeroed (kernels.inc).
  if (call.batch == 0 || c.P == 0 || c.O == 0) {
    if (backward) zero_outputs(c);
    return 0;
  }
  const int64_t Ogp = (c.Og + W - 1) / W * W;
  c.tab = c.scratch.get<int32_t>(c.OS * c.T);
  c.padrow = c.scratch.get<float>(c.C + NR);
  float* wp = c.scratch.get<float>(call.batch * c.G * c.T * c.I * Ogp);
  if (!c.tab || !c.padrow || !wp) return 2;
  build_table(c);
  for (int64_t j = 0; j < c.C + NR; ++j) c.padrow[j] = g.has_pad ? g.pad : 0.0f;
  fold_detail::pack_weights<F>(c, wp, Ogp);
  if (!backward) {
    fold_forward<F>(c, wp, Ogp);
  } else {
    float* dxp = nullptr;
    if (call.parts & 1) {
      const int64_t cells = c.img / c.C * g.n;
      dxp = c.scratch.get<float>(call.batch * c.G * (Ogp / W) * cells * c.I);
      if (!dxp) return 2;
    }
    float* dwp = c.scratch.get<float>(call.batch * c.G * (Ogp / W) * g.n * c.T * c.I * W);
    if (!dwp) return 2;
    fold_backward<F>(c, wp, Ogp, dxp, dwp);
  }
  return c.failed ? 2 : 0;
}

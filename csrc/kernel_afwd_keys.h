// The integer keys of x and the finiteness scan of a max_min / min_max forward in one pass.
//
// Why: a keyed forward (the `keyed` parameter, kernel_ops.h's KeyMinMax) read x three times:
// all_finite's scan, the key copy, then the tiles reading the keys. The scan and the copy are
// each one pass over x from memory (layer A: 2 MiB, ~0.1 ms each on Zen 4, one thread, ~2% of
// the forward); here the copy checks the values it converts, and the scan covers w alone.
//
// Part of the kernel template: included by kernels.inc inside its anonymous namespace
// (once per instruction set), after kernel_forward.h, never on its own.
#pragma once

// Whether the forward of Op will run on integer keys: forward()'s choice for a finite call
// (a max_min / min_max forward, `keyed` set, not depthwise; the recording forward keys its own).
template <class Op>
bool keys_ahead(const Ctx& c, bool backward) {
  if constexpr (std::is_same_v<typename KeyOf<Op>::type, Op>) {
    return false;
  } else {
    return !backward && !c.call->rec && c.prm.keyed != 0 && !depthwise(c);
  }
}

// Whether x and (with `with_w`; else the packing checks it: kernel_densefwd_wcheck.h) w are
// all finite (all_finite's answer), leaving the keys of x in c.xkey (forward_packed reads them
// instead of making its own copy). Without scratch for the keys it is all_finite itself (and
// the forward copies the keys as before).
bool finite_keys(Ctx& c, bool with_w) {
  const jaxconv::Call& call = *c.call;
  const int64_t total = call.batch * c.x_bs, wn = with_w ? call.batch * c.w_bs : 0;
  float* xkey = c.scratch.get<float>(total + W);
  if (!xkey) return all_finite(c, call.x, total, call.w, wn);
  constexpr int64_t kChunk = 1 << 16;  // floats of x per item, as key_copy
  constexpr int64_t kWChunk = 1 << 15;  // floats of w per item, as all_finite
  const int64_t nx = (total + kChunk - 1) / kChunk;
  std::atomic<int> bad{0};
  auto item = [&](int64_t it) {
    S::M ok = S::mtrue();
    bool fin = true;
    if (it < nx) {
      const int64_t a = it * kChunk, e = a + kChunk < total ? a + kChunk : total;
      int64_t j = a;
      for (; j + W <= e; j += W) {
        const S::V v = S::load(call.x + j);
        ok = S::mand(ok, S::isfinite_m(v));
        S::store(xkey + j, data_key(v));
      }
      for (; j < e; ++j) {
        fin &= finite(call.x[j]);
        xkey[j] = data_key(call.x[j]);
      }
    } else {
      const int64_t a = (it - nx) * kWChunk, e = a + kWChunk < wn ? a + kWChunk : wn;
      int64_t j = a;
      for (; j + W <= e; j += W) ok = S::mand(ok, S::isfinite_m(S::load(call.w + j)));
      for (; j < e; ++j) fin &= finite(call.w[j]);
    }
    if (!fin || S::any(S::mnot(ok))) bad.store(1, std::memory_order_relaxed);
  };
  parallel(c, nx + (wn + kWChunk - 1) / kWChunk, item);
  const bool all = bad.load(std::memory_order_relaxed) == 0;
  if (all) c.xkey = xkey;
  return all;
}

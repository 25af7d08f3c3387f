"""The generic XLA engine: any ``Op`` as a loop over kernel taps, tiled to a memory bound.

Layout inside the engine is canonical: ``x`` is ``(N, *spatial, C)`` and ``w`` is
``(*window, I, O)`` with ``C = G * I`` and ``O = G * Og`` for ``G`` feature groups. A dense
product is the same problem with no spatial dimensions and one tap.

For every kernel tap the input is sliced with the tap's offset and the strides (no im2col
tensor is built), the products ``combine(x, w)`` of shape ``(rows, G, Og, I)`` are reduced over
the input channels ``I`` (the innermost axis, which XLA's CPU reductions like best), and the
partial results of the taps are accumulated with the reduce's binary form. XLA fuses the
broadcast, the combine and the reduction, so the 4-D products are never written to memory.
The batch is cut into blocks (``lax.map``) so that even an unfused 4-D block stays within
``max_block_bytes``.

Padding: with ``op.pad_value is None`` padded cells (and ``lhs_dilation`` holes) are filled
with 0 and a static mask replaces every padded tap's partial result by the identity, so a
padded tap is skipped whatever ``combine`` is (and 0 * inf never happens). With a pad value
the cells hold it and go through ``combine``.

Backward passes for sum, max, min and logsumexp are written by hand (``custom_vjp``): they
keep only ``x``, ``w`` and the output, recompute the products tap by tap and push the
cotangent through ``combine``'s own VJP (so an op whose combine has a custom gradient, such
as AdderNet's, gets its rule). Max/min send the gradient to the winning taps, split equally
among ties as ``jax.grad(jnp.max)`` does. Other reduces are differentiated automatically,
block by block under ``jax.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src import algebra
from jaxconv._src.algebra import Op

Array = jax.Array

DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Static description of a canonical convolution (hashable, a jit-static value)."""

    in_spatial: tuple[int, ...]
    window: tuple[int, ...]
    strides: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    lhs_dilation: tuple[int, ...]
    rhs_dilation: tuple[int, ...]
    groups: int

    @property
    def padded_spatial(self) -> tuple[int, ...]:
        return tuple(
            (s - 1) * d + 1 + lo + hi if s > 0 else lo + hi
            for s, d, (lo, hi) in zip(self.in_spatial, self.lhs_dilation, self.padding)
        )

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(
            max(0, (p - (k - 1) * d - 1) // s + 1)
            for p, k, d, s in zip(
                self.padded_spatial, self.window, self.rhs_dilation, self.strides)
        )

    @property
    def pad_config(self) -> list[tuple[int, int, int]]:
        """``lax.pad`` configuration for ``(N, *spatial, C)``."""
        cfg = [(lo, hi, d - 1) for (lo, hi), d in zip(self.padding, self.lhs_dilation)]
        return [(0, 0, 0), *cfg, (0, 0, 0)]

    def taps(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(k) for k in self.window)))

    def valid_mask(self) -> np.ndarray | None:
        """Boolean ``padded_spatial`` array: True where a real input cell sits."""
        if all(lo == 0 and hi == 0 for lo, hi in self.padding) and all(
            d == 1 for d in self.lhs_dilation
        ):
            return None
        m = np.ones(self.in_spatial, bool)
        for axis, ((lo, hi), d) in enumerate(zip(self.padding, self.lhs_dilation)):
            n = m.shape[axis]
            dil_shape = list(m.shape)
            dil_shape[axis] = (n - 1) * d + 1 if n > 0 else 0
            dm = np.zeros(dil_shape, bool)
            idx = [slice(None)] * m.ndim
            idx[axis] = slice(None, None, d)
            dm[tuple(idx)] = m
            # Negative padding crops.
            if lo < 0:
                dm = np.take(dm, range(-lo, dm.shape[axis]), axis=axis)
            if hi < 0:
                dm = np.take(dm, range(0, dm.shape[axis] + hi), axis=axis)
            widths = [(0, 0)] * m.ndim
            widths[axis] = (max(lo, 0), max(hi, 0))
            m = np.pad(dm, widths, constant_values=False)
        return m

    def tap_mask(self, mask: np.ndarray | None, tap: tuple[int, ...]) -> np.ndarray | None:
        """The mask of one tap over the output positions (``None``: all valid)."""
        if mask is None:
            return None
        idx = tuple(
            slice(k * d, k * d + (o - 1) * s + 1, s)
            for k, d, o, s in zip(tap, self.rhs_dilation, self.out_spatial, self.strides)
        )
        return mask[idx]


@dataclasses.dataclass(frozen=True)
class Config:
    op: Op
    geom: Geometry
    acc_dtype: Any
    max_block_bytes: int
    block: int  # images (rows) per block in the forward pass
    block_bwd: int  # images per block in the backward pass (several products live at once)


def block_size(
    geom: Geometry, n: int, in_features: int, out_per_group: int, itemsize: int,
    max_block_bytes: int,
) -> int:
    """Images per block so that one tap's ``(block, P, G, Og, I)`` products fit the bound."""
    per_image = max(1, math.prod(geom.out_spatial)) * in_features * out_per_group * itemsize
    return int(max(1, min(n, max_block_bytes // max(per_image, 1))))


def _tap_slice(xb: Array, geom: Geometry, tap: tuple[int, ...]) -> Array:
    start = (0, *(k * d for k, d in zip(tap, geom.rhs_dilation)), 0)
    limit = (
        xb.shape[0],
        *(k * d + (o - 1) * s + 1
          for k, d, o, s in zip(tap, geom.rhs_dilation, geom.out_spatial, geom.strides)),
        xb.shape[-1],
    )
    return lax.slice(xb, start, limit, (1, *geom.strides, 1))


def _tap_unslice(g: Array, geom: Geometry, tap: tuple[int, ...]) -> Array:
    """Transpose of ``_tap_slice``: scatters a tap's gradient back onto the padded input."""
    cfg = [(0, 0, 0)]
    for k, d, o, s, p in zip(
        tap, geom.rhs_dilation, geom.out_spatial, geom.strides, geom.padded_spatial
    ):
        lo = k * d
        used = (o - 1) * s + 1
        cfg.append((lo, p - lo - used, s - 1))
    cfg.append((0, 0, 0))
    return lax.pad(g, jnp.zeros((), g.dtype), cfg)


def _products(op: Op, xs: Array, wk: Array, groups: int) -> tuple[Array, Any]:
    """``combine`` over ``(Nb, P, G, Og, I)`` for one tap, and its VJP function."""
    nb = xs.shape[0]
    p = math.prod(xs.shape[1:-1])
    i = wk.shape[-1]
    og = wk.shape[1]
    xr = xs.reshape(nb, p, groups, 1, i)
    shape = (nb, p, groups, og, i)

    def f(xr_, wk_):
        return op.combine(jnp.broadcast_to(xr_, shape), jnp.broadcast_to(wk_[None, None], shape))

    return f, xr


def _pad_input(x: Array, op: Op, geom: Geometry) -> Array:
    fill = 0 if op.pad_value is None else op.pad_value
    return lax.pad(x, jnp.asarray(fill, x.dtype), geom.pad_config)


def _forward_block(cfg: Config, xb: Array, wt: Array, exact_nan: bool) -> Array:
    """One block of images: ``xb`` (Nb, *padded, C), ``wt`` (T, G, Og, I) -> (Nb, P, G, Og)."""
    op, geom = cfg.op, cfg.geom
    mask = geom.valid_mask() if op.pad_value is None else None
    ident = algebra.identity_value(op, cfg.acc_dtype)
    binary = algebra.binary(op)
    nb = xb.shape[0]
    p = max(1, math.prod(geom.out_spatial))
    g, og = wt.shape[1], wt.shape[2]
    acc = None
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(mask, tap)
        if m is not None and not m.any():
            continue  # a tap that only ever sees padding contributes the identity
        f, xr = _products(op, _tap_slice(xb, geom, tap), wt[t], g)
        part = algebra.reduce_last(op, f(xr, wt[t]), cfg.acc_dtype)
        if exact_nan:
            part = jnp.where(_nan_flags(op, xr, wt[t]), jnp.nan, part)
        if m is not None and not m.all():
            part = jnp.where(jnp.asarray(m.reshape(1, p, 1, 1)), part, ident)
        acc = part if acc is None else binary(acc, part)
    if acc is None:
        acc = jnp.broadcast_to(ident, (nb, p, g, og))
    return acc


def _nan_flags(op: Op, xr: Array, wk: Array) -> Array:
    """Which outputs of one tap have a NaN product, found channel by channel.

    XLA's vectorised CPU max/min reductions drop NaN. This loop over input channels uses
    only elementwise ops (so it keeps NaN) and holds one ``(Nb, P, G, Og)`` flag array.
    """
    shape = xr.shape[:3] + wk.shape[1:2]

    def body(i, flag):
        xi = lax.dynamic_index_in_dim(xr, i, axis=-1, keepdims=False)
        wi = lax.dynamic_index_in_dim(wk, i, axis=-1, keepdims=False)
        c = op.combine(jnp.broadcast_to(xi, shape), jnp.broadcast_to(wi[None, None], shape))
        return flag | jnp.isnan(c)

    return lax.fori_loop(0, xr.shape[-1], body, jnp.zeros(shape, bool))


def _blocks(x: Array, block: int) -> tuple[Array, int]:
    n = x.shape[0]
    nblk = -(-n // block)
    pad = nblk * block - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
    return x.reshape(nblk, block, *x.shape[1:]), n


def _forward(cfg: Config, x: Array, w: Array, exact_nan: bool) -> Array:
    """Canonical forward without custom gradient: (N, *S, C), (*K, I, O) -> (N, P, G, Og)."""
    geom = cfg.geom
    xp = _pad_input(x, cfg.op, geom)
    wt = _taps_major(w, geom.groups)
    xblocks, n = _blocks(xp, cfg.block)
    fn = functools.partial(_forward_block, cfg, wt=wt, exact_nan=exact_nan)
    if cfg.op.reduce_name not in algebra.HAND_VJP_REDUCES:
        fn = jax.checkpoint(fn)
    if xblocks.shape[0] == 1:
        out = fn(xblocks[0])[None]
    else:
        out = lax.map(fn, xblocks)
    return out.reshape(-1, *out.shape[2:])[:n]


def _taps_major(w: Array, groups: int) -> Array:
    """(*K, I, O) -> (T, G, Og, I)."""
    *k, i, o = w.shape
    t = math.prod(k)
    return w.reshape(t, i, groups, o // groups).transpose(0, 2, 3, 1)


def _taps_major_transpose(gt: Array, w_shape: tuple[int, ...], groups: int) -> Array:
    *k, i, o = w_shape
    return gt.transpose(0, 3, 1, 2).reshape(w_shape)


def _any_nonfinite(*arrays: Array) -> Array:
    return jnp.logical_not(
        functools.reduce(jnp.logical_and, [jnp.all(jnp.isfinite(a)) for a in arrays])
    )


def _forward_nan_safe(cfg: Config, x: Array, w: Array) -> Array:
    """Max/min reductions: a fast path for finite inputs, a NaN-propagating one otherwise."""
    if cfg.op.reduce in ("max", "min") and jnp.issubdtype(x.dtype, jnp.floating):
        return lax.cond(
            _any_nonfinite(x, w),
            lambda a, b: _forward(cfg, a, b, True),
            lambda a, b: _forward(cfg, a, b, False),
            x, w,
        )
    return _forward(cfg, x, w, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _hand_vjp_conv(cfg: Config, x: Array, w: Array) -> Array:
    return _forward_nan_safe(cfg, x, w)


def _hand_vjp_fwd(cfg: Config, x: Array, w: Array):
    y = _forward_nan_safe(cfg, x, w)
    return y, (x, w, y)


def _hand_vjp_bwd(cfg: Config, res, gy: Array):
    x, w, y = res
    op, geom = cfg.op, cfg.geom
    xp = _pad_input(x, op, geom)
    wt = _taps_major(w, geom.groups)
    mask = geom.valid_mask() if op.pad_value is None else None
    p = max(1, math.prod(geom.out_spatial))
    taps = geom.taps()
    red = op.reduce
    g_groups = wt.shape[1]

    def block_grads(carry, blk):
        gwt = carry
        xb, yb, gb = blk
        gb = gb.astype(cfg.acc_dtype)
        count = None
        if red in ("max", "min"):
            count = jnp.zeros(yb.shape, cfg.acc_dtype)
            for t, tap in enumerate(taps):
                m = geom.tap_mask(mask, tap)
                if m is not None and not m.any():
                    continue
                f, xr = _products(op, _tap_slice(xb, geom, tap), wt[t], g_groups)
                eq = (f(xr, wt[t]) == yb[..., None]).astype(cfg.acc_dtype)
                if m is not None and not m.all():
                    eq = eq * jnp.asarray(m.reshape(1, p, 1, 1, 1), cfg.acc_dtype)
                count = count + jnp.sum(eq, axis=-1)
            scale = jnp.where(count > 0, gb / jnp.maximum(count, 1), 0)
        gxb = jnp.zeros(xb.shape, x.dtype)
        for t, tap in enumerate(taps):
            m = geom.tap_mask(mask, tap)
            if m is not None and not m.any():
                continue
            f, xr = _products(op, _tap_slice(xb, geom, tap), wt[t], g_groups)
            c, vjp = jax.vjp(f, xr, wt[t])
            if red == "sum":
                dc = jnp.broadcast_to(gb[..., None], c.shape)
            elif red in ("max", "min"):
                dc = jnp.where(c == yb[..., None], scale[..., None], 0)
            else:  # logsumexp
                yb_ = yb[..., None]
                dc = gb[..., None] * jnp.where(
                    jnp.isneginf(yb_), 0, jnp.exp(c.astype(cfg.acc_dtype) - yb_))
            if m is not None and not m.all():
                dc = jnp.where(jnp.asarray(m.reshape(1, p, 1, 1, 1)), dc, 0)
            gxr, gwk = vjp(dc.astype(c.dtype))
            gxb = gxb + _tap_unslice(
                gxr.reshape(_tap_slice(xb, geom, tap).shape).astype(x.dtype), geom, tap)
            gwt = gwt.at[t].add(gwk.astype(gwt.dtype))
        return gwt, gxb

    xblocks, n = _blocks(xp, cfg.block_bwd)
    yblocks, _ = _blocks(y, cfg.block_bwd)
    gblocks, _ = _blocks(gy, cfg.block_bwd)
    gwt0 = jnp.zeros(wt.shape, jnp.promote_types(w.dtype, jnp.float32))
    gwt, gx_blocks = lax.scan(block_grads, gwt0, (xblocks, yblocks, gblocks))
    gxp = gx_blocks.reshape(-1, *gx_blocks.shape[2:])[:n]
    _, pad_vjp = jax.vjp(lambda a: _pad_input(a, op, geom), x)
    (gx,) = pad_vjp(gxp)
    gw = _taps_major_transpose(gwt, w.shape, geom.groups).astype(w.dtype)
    return gx.astype(x.dtype), gw


_hand_vjp_conv.defvjp(_hand_vjp_fwd, _hand_vjp_bwd)


def generic_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
) -> Array:
    """Generalized convolution on canonical layouts.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product.
      preferred_element_type: accumulation / output dtype, as in ``lax``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      ``(N, *out_spatial, O)``.
    """
    out_dtype = jnp.dtype(preferred_element_type) if preferred_element_type is not None \
        else jnp.result_type(x.dtype, w.dtype)
    dtype = jnp.result_type(x.dtype, w.dtype)
    x = x.astype(dtype)
    w = w.astype(dtype)
    acc_dtype = algebra.accumulation_dtype(op, dtype, preferred_element_type)
    mbb = DEFAULT_MAX_BLOCK_BYTES if max_block_bytes is None else int(max_block_bytes)
    n = x.shape[0]
    o = w.shape[-1]
    block = block_size(
        geom, n, w.shape[-2] * geom.groups, o // geom.groups,
        max(jnp.dtype(dtype).itemsize, jnp.dtype(acc_dtype).itemsize), mbb)
    block_bwd = block_size(
        geom, n, w.shape[-2] * geom.groups, o // geom.groups,
        max(jnp.dtype(dtype).itemsize, jnp.dtype(acc_dtype).itemsize), mbb // 4)
    cfg = Config(op, geom, jnp.dtype(acc_dtype), mbb, block, block_bwd)
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    if op.reduce_name in algebra.HAND_VJP_REDUCES:
        y = _hand_vjp_conv(cfg, x, w)
    else:
        y = _forward(cfg, x, w, False)
    y = y.reshape(n, *geom.out_spatial, o)
    if op.post is not None:
        y = op.post(y)
    return y.astype(out_dtype)

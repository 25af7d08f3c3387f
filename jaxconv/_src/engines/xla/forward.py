"""The XLA engine's forward pass: a rolled loop over kernel taps and batch blocks."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra, products
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps
from jaxconv._src.engines.xla.common import Config, _div, _rem, dominated_fill

Array = jax.Array


def _fwd_products(op: Op, xs: Array, wk: Array) -> Array:
    """``combine`` over ``(Nb, P, G, Og, I)``: ``xs`` (Nb, P, G, I), ``wk`` (G, Og, I)."""
    shape = (*xs.shape[:3], wk.shape[1], xs.shape[3])
    return op.combine(jnp.broadcast_to(xs[:, :, :, None, :], shape),
                      jnp.broadcast_to(wk[None, None], shape))


def _reduce_tap(op: Op, xs: Array, wk: Array, acc_dtype: Any) -> Array:
    """One tap's products reduced over the input channels: ``(Nb, P, G, Og)``.

    Args:
        op: the op.
        xs: the tap's input ``(Nb, P, G, I)``.
        wk: the tap's kernel ``(G, Og, I)``.
        acc_dtype: the accumulation dtype.

    Returns:
        The tap's partial result.
    """
    if op.reduce == "sum" and capabilities(op).combine == "mul":
        # A user's multiply-and-add: the tap is a matrix product. (Written as a broadcast
        # and a reduction, XLA CPU turns it into one tiny matrix-vector product per
        # position, ~100x slower.)
        return jnp.einsum("npgi,goi->npgo", xs, wk, preferred_element_type=acc_dtype,
                          precision=lax.Precision.HIGHEST)
    c = _fwd_products(op, xs, wk)
    if op.reduce != "logsumexp":
        return algebra.reduce_last(op, c, acc_dtype)
    # Two passes (max, then the shifted sum of exponentials). The barrier stops XLA from
    # sharing the products between them, which would write them to memory; recomputing
    # them in each fused reduction is cheaper than storing them.
    m = jnp.max(c, axis=-1).astype(acc_dtype)
    m = jnp.where(jnp.isfinite(m), m, 0).astype(acc_dtype)
    xs2, wk2 = lax.optimization_barrier((xs, wk))
    c2 = _fwd_products(op, xs2, wk2).astype(acc_dtype)
    # XLA CPU may fuse the product into ``c2 - m`` (an FMA: the unrounded product minus m),
    # which exceeds 0 by up to half an ulp of the product: e^512 = inf for x * w near 1e10.
    # No finite term exceeds the maximum, so a finite term's exponent is clamped at 0.
    d = c2 - m[..., None]
    s = jnp.sum(jnp.exp(jnp.where(jnp.isfinite(c2), jnp.minimum(d, 0), d)), axis=-1)
    return jnp.log(s) + m


def _live_taps(geom: Geometry, mask: np.ndarray | None) -> list[tuple[int, tuple, Any]]:
    """The taps that see at least one real input cell: ``(t, tap, mask over P or None)``.

    Args:
        geom: the product's geometry.
        mask: the padded input's validity mask, or ``None``.

    Returns:
        The live taps.
    """
    out = []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(mask, tap)
        if m is None or m.all():
            out.append((t, tap, None))
        elif m.any():
            out.append((t, tap, m.reshape(-1)))
    return out


def _tap_tables(geom: Geometry, live: list) -> tuple[Array, Array, Array | None]:
    """Per live tap: its start offsets ``(L, nsd)``, its kernel index ``(L,)`` and, where any
    tap sees padding, its validity over the output positions ``(L, P)``.

    Args:
        geom: the product's geometry.
        live: the live taps (`_live_taps`).

    Returns:
        ``(offsets, kernel indices, masks or None)``.
    """
    offs = np.array([taps.tap_offset(geom, tap) for _, tap, _ in live],
                    np.int32).reshape(len(live), len(geom.window))
    tix = np.array([t for t, _, _ in live], np.int32)
    masks = None
    if any(m is not None for _, _, m in live):
        p = max(1, math.prod(geom.out_spatial))
        masks = jnp.asarray(np.stack([np.ones(p, bool) if m is None else m
                                      for _, _, m in live]))
    return jnp.asarray(offs), jnp.asarray(tix), masks


def _forward_block(cfg: Config, xb: Array, wt: Array, fill: bool, rows: int | None = None
                   ) -> Array:
    """Images ``xb`` (N, *padded, C), ``wt`` (T, G, Og, I) -> (N, P, G, Og), ``rows``
    images (default: all) at a time.

    One rolled loop over the (block of ``rows`` images, tap) pairs: one compiled body
    whatever the window size and the number of blocks (a loop over blocks around a loop over
    taps is twice the loop code to compile); taps that only ever see padding are skipped
    statically. ``fill``: the padding holds `dominated_fill`'s value, so no mask is needed.

    Args:
        cfg: the engine's configuration.
        xb: the padded images.
        wt: the kernel, taps major.
        fill: whether the padding holds the dominated fill.
        rows: the images per step, ``None`` for all.

    Returns:
        The block's output.
    """
    op, geom = cfg.op, cfg.geom
    mask = geom.valid_mask() if op.pad_value is None and not fill else None
    ident = algebra.identity_value(op, cfg.acc_dtype)
    binary = algebra.binary(op)
    nb = rows or xb.shape[0]
    xb, n = taps.pad_rows(xb, nb)
    nblk = xb.shape[0] // nb
    p = max(1, math.prod(geom.out_spatial))
    g, og = wt.shape[1], wt.shape[2]
    live = _live_taps(geom, mask)
    if not live:
        return jnp.broadcast_to(ident, (n, p, g, og))
    offs, tix, masks = _tap_tables(geom, live)
    nl = len(live)

    def part(b: Any, j: Any) -> Array:
        xs = taps.tap_slice_at(xb, geom, offs[j], b * nb, nb)
        xs = xs.reshape(nb, p, g, xs.shape[-1] // g)
        wk = lax.dynamic_index_in_dim(wt, tix[j], axis=0, keepdims=False)
        out = _reduce_tap(op, xs, wk, cfg.acc_dtype)
        if masks is not None:
            mk = lax.dynamic_index_in_dim(masks, j, axis=0, keepdims=False)
            out = jnp.where(mk.reshape(1, p, 1, 1), out, ident)
        return out

    if nl == 1 and nblk == 1:
        return part(0, 0)[:n]

    def step(k: Any, acc: Array) -> Array:
        b = _div(k, nl)
        cur = lax.dynamic_slice_in_dim(acc, b * nb, nb, axis=0)
        return lax.dynamic_update_slice_in_dim(acc, binary(cur, part(b, _rem(k, nl))),
                                               b * nb, 0)

    # From the identity, so that the tap's reduction is compiled once (each copy of it is
    # a large part of the compile time).
    init = jnp.broadcast_to(ident, (nblk * nb, p, g, og))
    return lax.fori_loop(0, nblk * nl, step, init)[:n]


def _forward(cfg: Config, x: Array, w: Array, fill: bool = False) -> Array:
    """Canonical forward without custom gradient: (N, *S, C), (*K, I, O) -> (N, P, G, Og).

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        fill: pad with the dominated fill (no masks).

    Returns:
        The output ``(N, P, G, Og)``.
    """
    geom = cfg.geom
    xp = taps.pad_input(x, cfg.op, geom, dominated_fill(cfg.op) if fill else None)
    wt = taps.taps_major(w, geom.groups)
    if cfg.op.reduce_name in algebra.HAND_VJP_REDUCES:
        return _forward_block(cfg, xp, wt, fill, cfg.block)
    # Differentiated automatically: blocks under ``jax.checkpoint`` (a loop carrying the
    # whole output would keep it per step for the backward pass).
    xblocks, n = taps.blocks(xp, cfg.block)
    fn = jax.checkpoint(functools.partial(_forward_block, cfg, wt=wt, fill=fill))
    if xblocks.shape[0] == 1:
        out = fn(xblocks[0])[None]
    else:
        out = lax.map(fn, xblocks)
    return taps.unblock(out, n)


def _native_mul_forward(cfg: Config, x: Array, w: Array) -> Array:
    """A user's multiply-and-add as one native product of the padded input: ``(N, P, G, Og)``.

    Padded cells hold the pad value (they go through ``x * w``) or, with identity padding,
    0, whose products ``0 * w`` are the identity unless ``w`` is not finite: then (``lax.cond``)
    the masked tap loop runs instead.

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.

    Returns:
        The output.
    """
    geom = cfg.geom
    shape = (x.shape[0], max(1, math.prod(geom.out_spatial)), geom.groups, -1)

    def native(a: Array, b: Array) -> Array:
        xp = taps.pad_input(a, cfg.op, geom)
        return products.padded(xp, b, geom, cfg.acc_dtype).astype(cfg.acc_dtype).reshape(shape)

    if cfg.op.pad_value is not None or geom.valid_mask() is None:
        return native(x, w)
    return lax.cond(jnp.all(jnp.isfinite(w)), native,
                    lambda a, b: _forward(cfg, a, b).astype(cfg.acc_dtype), x, w)

"""The exact backward pass of sum, max, min and logsumexp products, recomputing the
products per tap (no product tensor stored)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import products
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps
from jaxconv._src.engines.xla.common import Config, dominated_fill, separable_kind
from jaxconv._src.engines.xla.forward import _fwd_products, _live_taps, _tap_tables
from jaxconv._src.engines.xla.winner import _winner_backward, _winner_ok

Array = jax.Array


def _cotangent_of_products(red: str, c: Array, yl: Array, gl: Array, sl: Array | None,
                           ml: np.ndarray | None, fast: bool, acc_dtype: Any) -> Array:
    """d out / d products times the output cotangent, elementwise in any layout.

    ``ml``: the tap's validity mask in this layout (None: every product is valid). ``fast``:
    the inputs, outputs and padding are such that the formulas below need only the
    arithmetic that XLA CPU fuses into its reduction kernels (add, multiply, abs, sign,
    exp); comparisons and selects on the products would be written to memory instead.
    For max/min that means finite ``x``, ``w`` and ``y`` with dominated padding: every
    product is ``<= y`` (``>=`` for min) and equals it exactly at the winners, since it is
    recomputed bit for bit, so ``1 - |sign(y - c)|`` marks the winners.

    Args:
        red: the reduce, ``"sum"``, ``"max"``, ``"min"`` or ``"logsumexp"``.
        c: the products.
        yl: the output, broadcast to the products' layout.
        gl: the output's cotangent, likewise.
        sl: the tie scale of max/min (the cotangent over the number of winners), or ``None``.
        ml: the tap's validity mask, or ``None``.
        fast: whether the fused formulas apply.
        acc_dtype: the accumulation dtype.

    Returns:
        The products' cotangents.
    """
    if red == "sum":
        if ml is None:
            return jnp.broadcast_to(gl, c.shape)
        return jnp.broadcast_to(gl * jnp.asarray(ml, gl.dtype), c.shape)
    if red in ("max", "min"):
        d = jnp.where(c == yl, sl, 0)
        if fast:
            return d
    else:
        # logsumexp: the softmax weight of each product; ``gl`` and ``yl`` come in with an
        # all -inf window's cotangent zeroed and its output replaced by 0 (no inf - inf).
        # No finite product exceeds the output, but XLA CPU may fuse a recomputed product
        # into ``c - y`` unrounded (an FMA), up to half an ulp above 0 (e^512 near 1e10):
        # a finite product's exponent is clamped at 0, as in the forward's shifted sum.
        u = c.astype(acc_dtype) - yl
        d = gl * jnp.exp(jnp.where(jnp.isfinite(c), jnp.minimum(u, 0), u))
    if ml is not None:
        d = jnp.where(jnp.asarray(ml), d, 0)
    return d


# Positions per step when the kernel gradient sums over them; the products of one step,
# (rows, G, Og, I), are reduced over their leading axis.
_DW_ROWS = 64
# Partial sums of the kernel gradient per tap (see `_dw_of_tap`).
_DW_PARTS = 8
# Partial sums of the input gradient per tap (see `_dx_of_tap`).
_DX_PARTS = 8


def _dw_rows(nbp: int, row_bytes: int, max_bytes: int) -> int:
    """Rows per kernel-gradient step: a divisor of ``nbp`` near ``_DW_ROWS`` if there is one,
    fewer where one step's products (``row_bytes`` per row) would pass ``max_bytes``.

    Args:
        nbp: the positions of a block (images times output positions).
        row_bytes: the bytes of one position's products.
        max_bytes: the bound of one step.

    Returns:
        The rows per step.
    """
    top = max(1, min(_DW_ROWS, nbp, max_bytes // max(row_bytes, 1)))
    for r in range(top, max(1, top // 4) - 1, -1):
        if nbp % r == 0:
            return r
    return top


def _dx_of_tap(op: Op, red: str, xs: Array, wk: Array, yf: Array, gf: Array,
               sf: Array | None, m_pos: np.ndarray | None, fast: bool, acc: Any,
               unroll: int = 8) -> Array:
    """One tap's input gradient ``(NP, G, I)``: a loop over the output channels.

    Each step adds ``dc * d combine / d x`` for one output channel, an elementwise update
    of the ``(NP, G, I)`` accumulator that XLA fuses into one vectorised loop (a reduction
    over the output channels as an axis is many times slower on CPU: the input is constant
    along it).

    Args:
        op: the op.
        red: the reduce's name.
        xs: the tap's input ``(NP, G, I)``.
        wk: the tap's kernel ``(G, Og, I)``.
        yf: the output ``(NP, G, Og)``.
        gf: its cotangent ``(NP, G, Og)``.
        sf: the tie scale, or ``None``.
        m_pos: the tap's validity per position, or ``None``.
        fast: whether the fused formulas apply.
        acc: the accumulation dtype.
        unroll: the loop's unroll factor.

    Returns:
        The tap's input gradient.
    """
    og = wk.shape[1]
    # Channels m * u + j go together in step j (m < parts), each into its own partial sum:
    # under a mesh that splits the output features over up to `parts` devices, each device
    # runs its own channels and the input gradient is all-reduced once per tap.
    parts = max(d for d in range(1, min(og, _DX_PARTS) + 1) if og % d == 0)
    u = og // parts
    ml = None if m_pos is None else m_pos.reshape(1, -1, 1, 1)
    wp = wk.reshape(wk.shape[0], parts, u, wk.shape[2])
    yp = yf.reshape(*yf.shape[:2], parts, u)
    gp = gf.reshape(*gf.shape[:2], parts, u)
    sp = None if sf is None else sf.reshape(*sf.shape[:2], parts, u)
    shape = (parts, *xs.shape)

    def chan(a: Array, k: Any) -> Array:  # (NP, G, parts, u) -> (parts, NP, G, 1)
        return lax.dynamic_index_in_dim(a, k, axis=3, keepdims=False).transpose(2, 0, 1)[
            ..., None]

    def body(k: Any, a: Array) -> Array:
        wo = lax.dynamic_index_in_dim(wp, k, axis=2, keepdims=False)  # (G, parts, I)
        wo = jnp.broadcast_to(wo.transpose(1, 0, 2)[:, None], shape)
        so = None if sp is None else chan(sp, k)
        c, vjp = jax.vjp(op.combine, jnp.broadcast_to(xs[None], shape), wo)
        dc = _cotangent_of_products(red, c, chan(yp, k), chan(gp, k), so, ml, fast, acc)
        return a + vjp(dc.astype(c.dtype))[0].astype(acc)

    out = lax.fori_loop(0, u, body, jnp.zeros(shape, acc), unroll=max(1, min(u, unroll)))
    return jnp.sum(out, axis=0)


def _dw_of_tap(op: Op, red: str, xs: Array, wk: Array, yf: Array, gf: Array,
               sf: Array | None, m_pos: np.ndarray | None, fast: bool, acc: Any,
               rows: int) -> Array:
    """One tap's kernel gradient ``(G, Og, I)``: a scan over blocks of ``rows`` positions
    (interleaved: step ``b`` holds positions ``b, b + NP / rows, ...``).

    Each step reduces the ``(rows, G, Og, I)`` products over their leading axis.

    Args:
        op: the op.
        red: the reduce's name.
        xs: the tap's input ``(NP, G, I)``.
        wk: the tap's kernel ``(G, Og, I)``.
        yf: the output ``(NP, G, Og)``.
        gf: its cotangent ``(NP, G, Og)``.
        sf: the tie scale, or ``None``.
        m_pos: the tap's validity per position, or ``None``.
        fast: whether the fused formulas apply.
        acc: the accumulation dtype.
        rows: the positions per step (divides ``NP``).

    Returns:
        The tap's kernel gradient.
    """
    nbp, g, i = xs.shape
    og = wk.shape[1]
    nblk = nbp // rows

    def steps(a: Array) -> Array:
        # Step b holds positions b, b + nblk, ...: the images (the positions' outer axis)
        # stay the outer axis of each step, so a mesh's batch split holds in every step.
        return a.reshape(rows, nblk, *a.shape[1:]).swapaxes(0, 1)

    seq = [steps(xs), steps(yf), steps(gf)]
    if sf is not None:
        seq.append(steps(sf))
    if m_pos is not None:
        seq.append(steps(jnp.asarray(m_pos)))
    shape = (rows, g, og, i)

    def body(a: Array, blk: list[Array]) -> tuple[Array, None]:
        xb_, yb_, gb_ = blk[:3]
        rest = blk[3:]
        sb_ = rest.pop(0)[..., None] if sf is not None else None
        mb_ = rest.pop(0).reshape(rows, 1, 1, 1) if m_pos is not None else None
        c, vjp = jax.vjp(op.combine, jnp.broadcast_to(xb_[:, :, None, :], shape),
                         jnp.broadcast_to(wk[None], shape))
        dc = _cotangent_of_products(red, c, yb_[..., None], gb_[..., None], sb_, mb_, fast,
                                    acc)
        dwb = vjp(dc.astype(c.dtype))[1].reshape(parts, rows // parts, g, og, i)
        return a + jnp.sum(dwb, axis=1, dtype=acc), None

    # The sum is kept in `parts` partial sums, one per slab of a step's rows, added up after
    # the scan: under a mesh that splits the batch over up to `parts` devices, each device
    # sums its own slab and the kernel gradient is all-reduced once per tap, not per step.
    parts = max(d for d in range(1, min(rows, _DW_PARTS) + 1) if rows % d == 0)
    out, _ = lax.scan(body, jnp.zeros((parts, *wk.shape), acc), seq)
    return jnp.sum(out, axis=0)


def _count_winners(op: Op, geom: Geometry, xb: Array, wt: Array, yb: Array, tap_list: list,
                   fast: bool, acc: Any, max_bytes: int) -> Array:
    """How many products of each window equal its max/min ``yb`` (ties split gradients).

    A loop over the taps, so that each tap's comparison stays inside its own fused reduction
    (unrolled, XLA CPU merges the taps' reductions into one kernel fed by stored products),
    and over chunks of output channels, so that one step's comparisons, which XLA may store,
    fit in ``max_bytes``.

    Args:
        op: the op.
        geom: the product's geometry.
        xb: the padded input block.
        wt: the kernel, taps major ``(T, G, Og, I)``.
        yb: the block's output ``(Nb, P, G, Og)``.
        tap_list: the live taps (`forward._live_taps`).
        fast: whether the fused formulas apply.
        acc: the accumulation dtype.
        max_bytes: the bound of one step's comparisons.

    Returns:
        The counts ``(Nb, P, G, Og)``.
    """
    nb = xb.shape[0]
    g = wt.shape[1]
    p = max(1, math.prod(geom.out_spatial))
    offs_j, t_j, masks_j = _tap_tables(geom, tap_list)
    og, i = wt.shape[2], wt.shape[3]
    fit = max(1, max_bytes // max(1, nb * p * g * i * 4))
    oc = max(d for d in range(1, og + 1) if og % d == 0 and d <= fit)

    def body(k: Any, count: Array) -> Array:
        xs = taps.tap_slice_at(xb, geom, offs_j[k])
        xs = xs.reshape(nb, p, g, xs.shape[-1] // g)
        wk = lax.dynamic_index_in_dim(wt, t_j[k], axis=0, keepdims=False)
        m = None
        if not fast and masks_j is not None:
            m = lax.dynamic_index_in_dim(masks_j, k, axis=0, keepdims=False)

        def chunk(j: Any, cnt: Array) -> Array:
            wc = lax.dynamic_slice_in_dim(wk, j * oc, oc, axis=1)
            yc = lax.dynamic_slice_in_dim(yb, j * oc, oc, axis=3)
            eq = _fwd_products(op, xs, wc) == yc[..., None]
            if m is not None:
                eq = eq & m.reshape(1, p, 1, 1, 1)
            part = lax.dynamic_slice_in_dim(cnt, j * oc, oc, axis=3)
            return lax.dynamic_update_slice_in_dim(
                cnt, part + jnp.sum(eq, axis=-1, dtype=acc), j * oc, axis=3)

        if oc == og:
            return chunk(0, count)
        return lax.fori_loop(0, og // oc, chunk, count)

    return lax.fori_loop(0, len(tap_list), body, jnp.zeros(yb.shape, acc))


_DX_ACC_BYTES = 2**20


def _backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array, fill: bool):
    """Gradients of sum, max, min and logsumexp products without storing any products.

    Per block and tap, the products are recomputed inside two fused reductions, laid out so
    that the reduced axis is the innermost one: ``(Nb, P, G, I, Og)`` summed over ``Og`` for
    the input gradient and ``(G, Og, I, Nb*P)`` summed over the positions for the kernel
    gradient. The cotangent goes through ``combine``'s own VJP (so AdderNet's custom rule
    applies). Max/min first count the winners of each window (ties split the gradient).

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        y: the output ``(N, P, G, Og)``.
        gy: its cotangent, likewise.
        fill: whether the padding holds `dominated_fill`'s value (no mask needed).

    Returns:
        ``(gx, gw)``.
    """
    op, geom = cfg.op, cfg.geom
    acc = cfg.acc_dtype
    kind = separable_kind(op) if jnp.issubdtype(x.dtype, jnp.floating) else None
    gw_sep = None
    if kind is not None:
        gx_sep, gw_sep = products.separable_gradients(op, geom, acc, kind, x, w, gy)
        if gx_sep is not None:
            return gx_sep, gw_sep
    xp = taps.pad_input(x, op, geom, dominated_fill(op) if fill else None)
    wt = taps.taps_major(w, geom.groups)
    mask = geom.valid_mask() if op.pad_value is None else None
    p = max(1, math.prod(geom.out_spatial))
    g, og, i = wt.shape[1:]
    red = op.reduce
    tap_list = [(t, tap, None if fill else m) for t, tap, m in _live_taps(geom, mask)]
    if not tap_list:  # every tap of every window sees only padding: nothing depends on x, w
        return jnp.zeros(x.shape, x.dtype), (gw_sep if gw_sep is not None
                                             else jnp.zeros(w.shape, w.dtype))

    def block_grads(gwt: Array, blk: tuple[Array, Array, Array]) -> tuple[Array, Array]:
        xb, yb, gb = blk
        nb = xb.shape[0]
        gb = gb.astype(acc)
        scale = None
        if red in ("max", "min"):
            count = _count_winners(op, geom, xb, wt, yb, tap_list, fill, acc,
                                   cfg.max_block_bytes // 2)
            scale = jnp.where(count > 0, gb / jnp.maximum(count, 1), 0)
        elif red == "logsumexp":
            gb = jnp.where(jnp.isneginf(yb), 0, gb)
            yb = jnp.where(jnp.isneginf(yb), 0, yb).astype(acc)
        # Layout for the input gradient: (Nb, P, G, I, Og).
        nbp = nb * p
        # Per-position views (NP, G, Og) of the output, its cotangent and the max/min scale.
        yf = yb.reshape(nbp, g, og)
        gf = gb.reshape(nbp, g, og)
        sf = None if scale is None else scale.reshape(nbp, g, og)
        # Kernel-gradient blocks of positions: ``dw_rows`` positions per step of a scan.
        rows = _dw_rows(nbp, g * og * i * 4, cfg.max_block_bytes // 2)
        nbp_pad = -(-nbp // rows) * rows

        def pad_rows(a: Array | None) -> Array | None:
            if a is None or nbp_pad == nbp:
                return a
            return jnp.concatenate([a, jnp.zeros((nbp_pad - nbp, *a.shape[1:]), a.dtype)])

        offs, tix, masks = _tap_tables(geom, tap_list)

        def tap_body(j: Any, carry: tuple[Array, Array]) -> tuple[Array, Array]:
            gwt, gxb = carry
            xs4 = taps.tap_slice_at(xb, geom, offs[j])
            xs = xs4.reshape(nbp, g, i)
            wk = lax.dynamic_index_in_dim(wt, tix[j], axis=0, keepdims=False)
            m_pos = None  # (NP,) validity of this tap
            if masks is not None:
                m_pos = jnp.tile(lax.dynamic_index_in_dim(masks, j, axis=0, keepdims=False), nb)
            dxs = _dx_of_tap(op, red, xs, wk, yf, gf, sf, m_pos, fill, acc, cfg.unroll)
            gxb = taps.tap_unslice_add(gxb, dxs.reshape(xs4.shape), geom, offs[j])
            if gw_sep is None:  # else the kernel gradient is already known (separable)
                if nbp_pad != nbp:
                    valid = jnp.ones((nbp,), bool) if m_pos is None else m_pos
                    m_pos = jnp.concatenate([valid, jnp.zeros((nbp_pad - nbp,), bool)])
                dwk = _dw_of_tap(op, red, pad_rows(xs), wk, pad_rows(yf), pad_rows(gf),
                                 pad_rows(sf), m_pos, fill, acc, rows)
                gwt = gwt.at[tix[j]].add(dwk.astype(gwt.dtype))
            return gwt, gxb

        gwt, gxb = lax.fori_loop(0, len(tap_list), tap_body,
                                 (gwt, jnp.zeros(xb.shape, acc)))
        return gwt, gxb.astype(x.dtype)

    block = cfg.block_bwd
    if gw_sep is not None:
        # Input gradient only: no products are held, and the loop over output channels runs
        # fastest on an accumulator of about 1 MiB (measured: 4 images of layer A, 256 rows
        # of a 1024-wide dense layer; the per-step overhead dominates smaller blocks).
        row = max(1, math.prod(xp.shape[1:]) * jnp.dtype(acc).itemsize)
        block = int(max(1, min(x.shape[0], _DX_ACC_BYTES // row)))
    xblocks, n = taps.blocks(xp, block)
    yblocks, _ = taps.blocks(y, block)
    gblocks, _ = taps.blocks(gy, block)
    gwt0 = jnp.zeros(wt.shape, jnp.promote_types(w.dtype, jnp.float32))
    if xblocks.shape[0] == 1:
        gwt, gxp = block_grads(gwt0, (xblocks[0], yblocks[0], gblocks[0]))
    else:
        gwt, gx_blocks = lax.scan(block_grads, gwt0, (xblocks, yblocks, gblocks))
        gxp = gx_blocks.reshape(-1, *gx_blocks.shape[2:])
    gxp = gxp[:n]
    _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
    (gx,) = pad_vjp(gxp)
    if gw_sep is not None:
        return gx.astype(x.dtype), gw_sep
    gw = taps.taps_major_transpose(gwt, w.shape, geom.groups).astype(w.dtype)
    return gx.astype(x.dtype), gw


def _hand_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array):
    """The hand-written backward pass of a sum, max, min or logsumexp product.

    Max/min take the winner path (`_winner_backward`) where its codes are exact (static);
    the others the exact pass with identity padding masked statically.

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        y: the output ``(N, P, G, Og)``.
        gy: its cotangent, likewise.

    Returns:
        ``(gx, gw)``.
    """
    if (jnp.issubdtype(x.dtype, jnp.floating) and cfg.op.reduce in ("max", "min")
            and _winner_ok(cfg, x, w)):
        return _winner_backward(cfg, x, w, y, gy)
    return _backward(cfg, x, w, y, gy, fill=False)

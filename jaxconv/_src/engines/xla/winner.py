"""The max/min backward pass by winner index: one fused reduction per tap names each
window's winner; ties and infinite outputs are recomputed a few at a time."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps
from jaxconv._src.engines.xla.common import Config, _div, _rem, interleave, interleaved_steps
from jaxconv._src.engines.xla.forward import _fwd_products

Array = jax.Array


# Tied windows (several winning products) that the winner path recomputes per step of its
# loop over them.
MAX_SPARSE_TIES = 1024


def _winner_base(geom: Geometry, in_per_group: int) -> int | None:
    """The code offset of `_winner_codes` (a power of two above every product's index
    ``t * I + i``), or None where the codes would not be exact float32 integers."""
    n_prod = len(geom.taps()) * in_per_group
    base = 1 << max(1, n_prod).bit_length()
    return base if 4 * base <= 2**24 else None


def winner_merge(red: str, va: Array, pa: tuple, vb: Array, pb: tuple) -> tuple:
    """Merges two partial max/min results (`winner_terms`) with the payloads summed over
    their winners: ``(value, payloads)``, elementwise.

    The larger value (smaller for ``"min"``) keeps its payloads; equal values (``-0 == 0``)
    add them; NaN beats every number (its window has no gradient, and the callers mask it).

    Args:
      red: ``"max"`` or ``"min"``.
      va: the first part's values.
      pa: the first part's payloads (each shaped as ``va``).
      vb: the second part's values.
      pb: the second part's payloads.

    Returns:
      ``(value, payloads)`` of the merged result.

    Example:
      >>> import jax.numpy as jnp
      >>> v, (n,) = winner_merge("max", jnp.array([3.0]), (jnp.array([2.0]),),
      ...                        jnp.array([3.0]), (jnp.array([1.0]),))
      >>> float(v[0]), float(n[0])
      (3.0, 3.0)
    """
    nan_a, nan_b = va != va, vb != vb  # noqa: PLR0124 - NaN test inside a reducer
    a_wins = ((va > vb) if red == "max" else (va < vb)) | nan_a
    b_wins = (((vb > va) if red == "max" else (vb < va)) | nan_b) & ~nan_a
    a_wins = a_wins & ~nan_b
    value = jnp.where(b_wins, vb, va)
    return value, tuple(jnp.where(a_wins, a, jnp.where(b_wins, b, a + b))
                        for a, b in zip(pa, pb, strict=True))


def winner_terms(red: str, c: Array, payloads: tuple) -> tuple[Array, tuple]:
    """The max (``red == "max"``) or min of ``c`` over its last axis and each payload summed
    over the entries that attain it: ``(value, sums)``.

    ``c`` is computed once (an optimization barrier: XLA stores it), and the max and the
    comparisons read those stored values. Recomputed in two kernels, ``c`` may be rounded
    differently in each (XLA contracts ``x * w - x`` into an fma in one kernel and not in
    another), and then no entry would equal the max. A NaN may be dropped by the max
    (XLA CPU's vectorised reductions): the callers mask NaN windows.

    Args:
      red: ``"max"`` or ``"min"``.
      c: the terms, reduced over the last axis.
      payloads: arrays shaped as ``c``, summed over the winning entries.

    Returns:
      ``(value, sums)``.

    Example:
      >>> import jax.numpy as jnp
      >>> ones, t = jnp.ones((1, 3)), jnp.array([[5.0, 1.0, 2.0]])
      >>> v, (n, s) = winner_terms("max", jnp.array([[1.0, 3.0, 3.0]]), (ones, t))
      >>> float(v[0]), float(n[0]), float(s[0])
      (3.0, 2.0, 3.0)
    """
    c = lax.optimization_barrier(c)
    value = (jnp.max if red == "max" else jnp.min)(c, axis=-1)
    eq = c == value[..., None]
    return value, tuple(jnp.sum(jnp.where(eq, p, jnp.zeros((), p.dtype)), axis=-1)
                        for p in payloads)


def _digit(flat: Array, shape: tuple[int, ...], d: int) -> Array:
    """Index ``d`` of the row-major ``shape`` at the nonnegative integers ``flat``."""
    return _rem(_div(flat, math.prod(shape[d + 1:])), shape[d])


def _block_tap(xbl: Array, geom: Geometry, offset: Array, b: Any) -> Array:
    """The tap at ``offset`` of block ``b`` of interleaved image blocks ``xbl``
    ``(B, nb, *padded, C)`` (`common.interleave`): ``(nb, *out_spatial, C)``.

    Args:
        xbl: the padded input in blocks.
        geom: the product's geometry.
        offset: the tap's offset ``(nsd,)`` (traced).
        b: the block.

    Returns:
        The block's strided tap slice.
    """
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(b, jnp.int32), zero, *(offset[d] for d in range(len(geom.window))),
             zero)
    xs = lax.dynamic_slice(xbl, start, (1, xbl.shape[1], *taps.span(geom), xbl.shape[-1]))[0]
    return lax.slice(xs, (0,) * xs.ndim, xs.shape, (1, *geom.strides, 1))


def _winner_codes(cfg: Config, xp: Array, wt: Array, base: int,
                  tmask: np.ndarray | None = None) -> tuple[Array, Array]:
    """Per output, its recomputed max/min and ``sum over its winning products of (base + t * I
    + i)`` in float32: ``(value, code)``.

    One winner gives a code in ``[base, 2 base)`` that names it; ties give ``>= 2 base``; a
    window with a NaN product gives garbage (the caller masks it). The winners are found
    together with the max, from one computation of the recomputed products (`winner_terms`),
    never by comparing the products with the forward's output: XLA may round a user's
    combine differently in the forward's kernel (e.g. ``x * w - x`` with or without an fma),
    and then no product would equal it. Where the two roundings order two nearly equal
    products differently, the gradient goes to this computation's winner. All sums are of
    integers below ``2**24``: exact.

    One loop over (block of images, tap, chunk of output channels). The blocks and chunks
    are interleaved (`common.interleave`: block ``b`` holds images ``b, b + B, ...``), so
    that under a mesh the batch and the output features stay the outer axes of every slice
    and the SPMD partitioner keeps each device's images and features on it.

    ``tmask`` (T, P): with identity padding, the static validity of each tap at each output
    position; the padded cells hold 0, whose products may beat the window's (or be NaN), so
    a tap's reduced part is replaced by the identity with no code (a select on the reduced
    ``(Nb, P, G, Og)`` part, outside the products' reduction) where the tap sees padding.

    Args:
        cfg: the engine's configuration.
        xp: the padded input.
        wt: the kernel, taps major.
        base: the code base (above every ``t * I + i``).
        tmask: the taps' validity ``(T, P)``, or ``None``.

    Returns:
        ``(value, code)``.
    """
    op, geom = cfg.op, cfg.geom
    red = op.reduce
    nt, g, og, i = wt.shape
    p = max(1, math.prod(geom.out_spatial))
    offs_j = jnp.asarray(np.array([[k * d for k, d in zip(tap, geom.rhs_dilation, strict=True)]
                                   for tap in geom.taps()], np.int32).reshape(nt, -1))
    tmask_j = None if tmask is None else jnp.asarray(tmask)

    nblk = interleaved_steps(xp.shape[0], cfg.block)
    xbl, n = interleave(xp, nblk)
    nb = xbl.shape[1]
    fit = max(1, (cfg.max_block_bytes // 2) // max(1, nb * p * g * i * 4))
    oc = max(d for d in range(1, og + 1) if og % d == 0 and d <= fit)
    nc = og // oc
    # Chunk j of the output channels holds channels m * nc + j: (nc, T, G, oc, I).
    wtc = wt.reshape(nt, g, oc, nc, i).transpose(3, 0, 1, 2, 4)
    dtype = jax.eval_shape(op.combine, jax.ShapeDtypeStruct((), xp.dtype),
                           jax.ShapeDtypeStruct((), wt.dtype)).dtype
    ident = jnp.asarray(-jnp.inf if red == "max" else jnp.inf, dtype)

    def step(s: Any, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        # One loop over (block of images, tap, chunk of output channels): one compiled body.
        b, k, j = _div(s, nt * nc), _rem(_div(s, nc), nt), _rem(s, nc)
        xs = _block_tap(xbl, geom, offs_j[k], b).reshape(nb, p, g, i)
        wc = lax.dynamic_slice(wtc, (j, k, 0, 0, 0), (1, 1, g, oc, i))[0, 0]
        at = (j, b, 0, 0, 0, 0)
        c = _fwd_products(op, xs, wc)
        code = jnp.broadcast_to(
            (base + k * i + jnp.arange(i)).astype(jnp.float32).reshape(1, 1, 1, 1, i), c.shape)
        val, (part,) = winner_terms(red, c, (code,))
        if tmask_j is not None:
            mk = lax.dynamic_index_in_dim(tmask_j, k, axis=0, keepdims=False).reshape(1, p, 1, 1)
            val, part = jnp.where(mk, val, ident), jnp.where(mk, part, 0)
        shape = (1, 1, *val.shape)
        cur_v, cur_c = (lax.dynamic_slice(a, at, shape)[0, 0] for a in carry)
        val, (part,) = winner_merge(red, cur_v, (cur_c,), val, (part,))
        return (lax.dynamic_update_slice(carry[0], val.reshape(shape), at),
                lax.dynamic_update_slice(carry[1], part.reshape(shape), at))

    shape = (nc, nblk, nb, p, g, oc)
    init = (jnp.broadcast_to(ident, shape), jnp.zeros(shape, jnp.float32))
    val, tot = lax.fori_loop(0, nblk * nt * nc, step, init)

    def back(a: Array) -> Array:
        # (nc, B, nb, P, G, oc) -> (N, P, G, Og): image a * B + b, channel m * nc + j.
        a = a.transpose(2, 1, 3, 4, 5, 0).reshape(nb * nblk, p, g, og)
        return a[:n]

    return back(val), back(tot)


def _batched_gather(xp: Array, index: Array, nsd: int, width: int | None = None) -> Array:
    """``xp[n, *index[n, ...]]`` (``width`` channels from the indexed one): a gather whose
    batch axis is the operand's, so that the SPMD partitioner keeps it on each device.

    Args:
        xp: the padded input ``(N, *padded, C)``.
        index: ``(N, ..., nsd + 1)`` int32 spatial and channel coordinates.
        nsd: the number of spatial dimensions.
        width: the channels read from each index (a trailing axis), ``None`` for one
            channel and no axis.

    Returns:
        ``(N, ...)``, with a trailing ``width`` axis unless ``width`` is ``None``.
    """
    dims = lax.GatherDimensionNumbers(
        offset_dims=(index.ndim - 1,) if width is not None else (),
        collapsed_slice_dims=tuple(range(1, nsd + 1 + (width is None))),
        start_index_map=tuple(range(1, nsd + 2)),
        operand_batching_dims=(0,), start_indices_batching_dims=(0,))
    return lax.gather(xp, index, dims, (1, *(1,) * nsd, width or 1),
                      mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _batched_scatter_add(acc: Array, index: Array, upd: Array, nsd: int) -> Array:
    """The transpose of `_batched_gather`: ``upd`` added onto ``acc`` at ``index``.

    Args:
        acc: the padded input's gradient ``(N, *padded, C)``.
        index: the coordinates, as for `_batched_gather`.
        upd: the values, shaped as `_batched_gather`'s result.
        nsd: the number of spatial dimensions.

    Returns:
        ``acc`` with ``upd`` added.
    """
    width = upd.ndim - (index.ndim - 1)
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(upd.ndim - 1,) if width else (),
        inserted_window_dims=tuple(range(1, nsd + 1 + (width == 0))),
        scatter_dims_to_operand_dims=tuple(range(1, nsd + 2)),
        operand_batching_dims=(0,), scatter_indices_batching_dims=(0,))
    return lax.scatter_add(acc, index, upd.astype(acc.dtype), dims,
                           mode=lax.GatherScatterMode.PROMISE_IN_BOUNDS)


def _kernel_dims(gather: bool) -> Any:
    """Gather / scatter numbers of one kernel entry ``wt[t, g, o, i]`` per output
    ``(N, P, G, Og)``, indexed by ``(t, i)`` with ``(g, o)`` the batch axes shared with the
    output (so that output features sharded stay on their device).

    Args:
        gather: the gather's numbers, else the scatter's.

    Returns:
        ``lax.GatherDimensionNumbers`` or ``lax.ScatterDimensionNumbers``.
    """
    if gather:
        return lax.GatherDimensionNumbers(
            offset_dims=(), collapsed_slice_dims=(0, 3), start_index_map=(0, 3),
            operand_batching_dims=(1, 2), start_indices_batching_dims=(2, 3))
    return lax.ScatterDimensionNumbers(
        update_window_dims=(), inserted_window_dims=(0, 3), scatter_dims_to_operand_dims=(0, 3),
        operand_batching_dims=(1, 2), scatter_indices_batching_dims=(2, 3))


def _nth_true(ranks: Array, q: Array) -> Array:
    """Per row, the index of the row's true entry of rank ``q`` (0-based), from the row's
    running count ``ranks`` of true entries (an inclusive prefix sum along the last axis):
    ``(..., k)`` int32 for ranks ``q`` ``(..., k)``, -1 where the row has no such entry.

    The entry of rank ``q`` sits after exactly those positions whose running count is at
    most ``q``. Rows (batch, output features) stay wherever a mesh puts them: one compare
    and one sum along the last axis, where a ``top_k`` or a compaction across rows would be
    gathered onto every device.

    Args:
        ranks: the running counts ``(..., P)``.
        q: the ranks wanted ``(..., k)``.

    Returns:
        The positions.

    Example:
        >>> import jax.numpy as jnp
        >>> ranks = jnp.cumsum(jnp.array([[0, 1, 0, 1, 1]]), axis=-1)
        >>> _nth_true(ranks, jnp.array([[0, 2, 3]])).tolist()
        [[1, 4, -1]]
    """
    at = jnp.sum(ranks[..., None, :] <= q[..., None], axis=-1, dtype=jnp.int32)
    return jnp.where(q < ranks[..., -1:], at, -1)


def _winner_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple:
    """Max/min gradients through each window's winner, found by `_winner_codes`.

    Any values, no branch on them. The padded cells hold ``op.pad_value`` (real products)
    or, with identity padding, 0 with the padded taps masked out (statically: of the codes
    and of the tied windows' products); a dominated fill is not used, since a non-finite
    kernel entry would make it NaN. Where a window has one winner, its cotangent goes
    through ``combine``'s VJP at that one product (gathered) and is scatter-added onto the
    input and the kernel. The tied windows are recomputed whole (their ``T x I`` products)
    in a ``while_loop`` that runs once per chunk of them (not at all without ties), and
    their cotangent is split equally among the products equal to the max of that
    recomputation. A window with a NaN has no gradient, as in the exact rule. Winners are
    never found by comparing recomputed products with ``y``: the forward's kernel may round
    a user's combine differently (see `_winner_codes`), so ``y`` only marks the NaN windows.

    Every gather and scatter keeps the output's batch and feature axes as its own (batch
    axes of the gather, rows of the tied windows' ``top_k``): under a mesh the SPMD
    partitioner runs them where the images and features are, and the only collectives are
    lax's all-reduces of the gradients (and the tied windows' count, one scalar).

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.
        y: the forward's output ``(N, P, G, Og)``.
        gy: its cotangent, likewise.

    Returns:
        ``(gx, gw)``.
    """
    op, geom = cfg.op, cfg.geom
    xp = taps.pad_input(x, op, geom)
    wt = taps.taps_major(w, geom.groups)
    n = x.shape[0]
    nt, g, og, i = wt.shape
    nsd = len(geom.window)
    p = max(1, math.prod(geom.out_spatial))
    # Identity padding: the validity of each tap at each output position, (T, P) (None:
    # every product is real).
    mask = geom.valid_mask() if op.pad_value is None else None
    tmask = None
    if mask is not None:
        tmask = np.stack([geom.tap_mask(mask, tap).reshape(p) for tap in geom.taps()])
        if tmask.all():
            tmask = None
    base = _winner_base(geom, i)
    val, tot = _winner_codes(cfg, xp, wt, base, tmask)
    flat = jnp.clip(tot - base, 0, nt * i - 1).astype(jnp.int32)
    # A window with a NaN (the forward's, or the recomputed products') has no gradient.
    real = jnp.logical_not(jnp.isnan(y) | jnp.isnan(val))
    single = (tot >= base) & (tot < 2 * base) & real
    tie = (tot >= 2 * base) & real
    gdt = jnp.promote_types(x.dtype, jnp.float32)

    def coords(pp: Array, tt: Array) -> list[Array]:
        """Padded-input coordinates read at flat output position ``pp`` by tap ``tt``
        (arithmetic: gathers from coordinate tables are as many more kernels to compile)."""
        out = []
        for d in range(nsd):
            od = _digit(pp, geom.out_spatial, d)
            kd = _digit(tt, geom.window, d)
            out.append(od * geom.strides[d] + kd * geom.rhs_dilation[d])
        return out

    shp = (n, p, g, og)
    p_i = lax.broadcasted_iota(jnp.int32, shp, 1)
    g_i = lax.broadcasted_iota(jnp.int32, shp, 2)
    t_w, i_w = _div(flat, i), _rem(flat, i)
    xi = jnp.stack([*coords(p_i, t_w), g_i * i + i_w], axis=-1)
    wi = jnp.stack([t_w, i_w], axis=-1)
    mode = lax.GatherScatterMode.PROMISE_IN_BOUNDS
    ct = jnp.where(single, gy, 0).astype(xp.dtype)
    _, vjp = jax.vjp(op.combine, _batched_gather(xp, xi, nsd),
                     lax.gather(wt, wi, _kernel_dims(True), (1, 1, 1, 1), mode=mode))
    dx, dw = vjp(ct)
    # Only the winners carry a cotangent: the VJP's 0 * inf at another window's gathered
    # product (a NaN window's, which has no gradient) would scatter a NaN.
    dx, dw = jnp.where(single, dx, 0), jnp.where(single, dw, 0)
    gxp = _batched_scatter_add(jnp.zeros(xp.shape, gdt), xi, dx, nsd)
    gwt = lax.scatter_add(jnp.zeros(wt.shape, gdt), wi, dw.astype(gdt), _kernel_dims(False),
                          mode=mode)

    # Tied windows, per row (image, group, output feature) the next k of its positions at a
    # time: (rows, k, T, I) products per step, within the bound.
    tie_r = tie.transpose(0, 2, 3, 1)  # (N, G, Og, P)
    rows = n * g * og
    k = max(1, min(p, MAX_SPARSE_TIES // max(1, rows),
                   cfg.max_block_bytes // max(1, 8 * rows * nt * i * 4)))
    ranks = jnp.cumsum(tie_r, axis=-1, dtype=jnp.int32)
    most = jnp.max(ranks[..., -1], initial=0)
    g_r = gy.transpose(0, 2, 3, 1)
    w_r = wt.transpose(1, 2, 0, 3)[None, :, :, None]  # (1, G, Og, 1, T, I)
    kt = jnp.arange(nt, dtype=jnp.int32).reshape(1, 1, 1, 1, nt)
    kg = lax.broadcasted_iota(jnp.int32, (n, g, og, k, nt), 1)
    tm = None if tmask is None else jnp.asarray(tmask.T)  # (P, T)
    red = op.reduce
    ident = -jnp.inf if red == "max" else jnp.inf

    def tie_chunk(carry: tuple) -> tuple:
        j, gxp, gwt = carry
        found = _nth_true(ranks, j * k + lax.broadcasted_iota(jnp.int32, (n, g, og, k), 3))
        valid = found >= 0
        sel = jnp.maximum(found, 0)
        pp = jnp.broadcast_to(sel[..., None], (n, g, og, k, nt))
        kxi = jnp.stack([*coords(pp, jnp.broadcast_to(kt, pp.shape)), kg * i], axis=-1)
        xk = _batched_gather(xp, kxi, nsd, i)  # (N, G, Og, k, T, I)
        ck, vjpk = jax.vjp(op.combine, xk, jnp.broadcast_to(w_r, xk.shape).astype(w.dtype))
        # The winners are those equal to the max of these very products: the barrier makes
        # XLA compute them once, so that the max and the comparisons read the same values.
        ck = lax.optimization_barrier(ck)
        if tm is not None:  # padded taps are not products
            on = jnp.broadcast_to(tm[sel][..., None], ck.shape)
            ck = jnp.where(on, ck, jnp.asarray(ident, ck.dtype))
        top = (jnp.max if red == "max" else jnp.min)(ck, axis=(4, 5), keepdims=True)
        eq = ck == top
        if tm is not None:
            eq = eq & on
        cnt = jnp.maximum(jnp.sum(eq, axis=(4, 5)), 1)
        gk = jnp.take_along_axis(g_r, sel, axis=-1).astype(gdt)
        sk = jnp.where(valid, gk / cnt, 0)[..., None, None]
        keep = eq & valid[..., None, None]  # the winners; likewise no 0 * inf elsewhere
        dxk, dwk = vjpk(jnp.where(keep, sk, 0).astype(ck.dtype))
        dxk, dwk = jnp.where(keep, dxk, 0), jnp.where(keep, dwk, 0)
        gwk = jnp.sum(dwk.astype(gdt), axis=(0, 3)).transpose(2, 0, 1, 3)  # (T, G, Og, I)
        return j + 1, _batched_scatter_add(gxp, kxi, dxk, nsd), gwt + gwk

    _, gxp, gwt = lax.while_loop(lambda c: c[0] * k < most, tie_chunk,
                                 (jnp.int32(0), gxp, gwt))
    _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
    gx = pad_vjp(gxp.astype(x.dtype))[0]
    return gx, taps.taps_major_transpose(gwt, w.shape, geom.groups).astype(w.dtype)


def _winner_ok(cfg: Config, x: Array, w: Array) -> bool:
    """Whether `_winner_backward`'s codes and int32 flat indices are exact here (static).

    Args:
        cfg: the engine's configuration.
        x: the input.
        w: the kernel.

    Returns:
        True if the winner path is exact.
    """
    geom = cfg.geom
    xp_size = x.shape[0] * math.prod(geom.padded_spatial) * x.shape[-1]
    return (_winner_base(geom, w.shape[-2]) is not None and max(xp_size, w.size) < 2**31
            and (not geom.window or math.prod(geom.out_spatial) > 0))

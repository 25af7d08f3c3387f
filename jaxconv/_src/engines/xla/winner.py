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
from jaxconv._src.engines.xla.common import Config, _div, _rem
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
    g, og, i = wt.shape[1:]
    p = max(1, math.prod(geom.out_spatial))
    nt = len(geom.taps())
    offs = np.array([[k * d for k, d in zip(tap, geom.rhs_dilation, strict=True)]
                     for tap in geom.taps()], np.int32).reshape(nt, len(geom.window))
    offs_j = jnp.asarray(offs)
    tmask_j = None if tmask is None else jnp.asarray(tmask)

    nb = cfg.block
    fit = max(1, (cfg.max_block_bytes // 2) // max(1, nb * p * g * i * 4))
    oc = max(d for d in range(1, og + 1) if og % d == 0 and d <= fit)
    nc = og // oc
    xp, n = taps.pad_rows(xp, nb)
    nblk = xp.shape[0] // nb
    dtype = jax.eval_shape(op.combine, jax.ShapeDtypeStruct((), xp.dtype),
                           jax.ShapeDtypeStruct((), wt.dtype)).dtype
    ident = jnp.asarray(-jnp.inf if red == "max" else jnp.inf, dtype)

    def step(s: Any, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        # One loop over (block of images, tap, chunk of output channels): one compiled body.
        b, k, j = _div(s, nt * nc), _rem(_div(s, nc), nt), _rem(s, nc)
        xs = taps.tap_slice_at(xp, geom, offs_j[k], b * nb, nb).reshape(nb, p, g, i)
        wc = lax.dynamic_slice(wt, (k, 0, j * oc, 0), (1, g, oc, i))[0]
        at = (b * nb, 0, 0, j * oc)
        c = _fwd_products(op, xs, wc)
        code = jnp.broadcast_to(
            (base + k * i + jnp.arange(i)).astype(jnp.float32).reshape(1, 1, 1, 1, i), c.shape)
        val, (part,) = winner_terms(red, c, (code,))
        if tmask_j is not None:
            mk = lax.dynamic_index_in_dim(tmask_j, k, axis=0, keepdims=False).reshape(1, p, 1, 1)
            val, part = jnp.where(mk, val, ident), jnp.where(mk, part, 0)
        cur_v, cur_c = (lax.dynamic_slice(a, at, part.shape) for a in carry)
        val, (part,) = winner_merge(red, cur_v, (cur_c,), val, (part,))
        return (lax.dynamic_update_slice(carry[0], val, at),
                lax.dynamic_update_slice(carry[1], part, at))

    shape = (nblk * nb, p, g, og)
    init = (jnp.broadcast_to(ident, shape), jnp.zeros(shape, jnp.float32))
    val, tot = lax.fori_loop(0, nblk * nt * nc, step, init)
    return val[:n], tot[:n]


def _digit(flat: Array, shape: tuple[int, ...], d: int) -> Array:
    """Index ``d`` of the row-major ``shape`` at the nonnegative integers ``flat``."""
    return _rem(_div(flat, math.prod(shape[d + 1:])), shape[d])


def _next_true(flags: Array, k: int) -> Array:
    """The indices of the first ``k`` true entries of the flat ``flags`` in order (int32),
    -1 past the last one.

    A ``top_k`` of float32 keys (exact below ``2**24`` entries), else a sort: either
    compiles to one operation, where ``jnp.nonzero``'s prefix sum is some twenty kernels.

    Args:
        flags: the flags.
        k: how many indices.

    Returns:
        The indices ``(k,)``.
    """
    idx = jnp.arange(flags.size, dtype=jnp.int32)
    if flags.size <= 2**24:
        key = jnp.where(flags, -idx.astype(jnp.float32), -jnp.inf)
        top, _ = lax.top_k(key, k)
        return jnp.where(top > -jnp.inf, -top, -1).astype(jnp.int32)
    big = jnp.iinfo(jnp.int32).max
    first = lax.sort(jnp.where(flags, idx, big))[:k]
    return jnp.where(first < big, first, -1)


def _winner_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple:
    """Max/min gradients through each window's winner, found by `_winner_codes`.

    Any values, no branch on them. The padded cells hold ``op.pad_value`` (real products)
    or, with identity padding, 0 with the padded taps masked out (statically: of the codes
    and of the tied windows' products); a dominated fill is not used, since a non-finite
    kernel entry would make it NaN. Where a window has one winner, its cotangent goes
    through ``combine``'s VJP at that one product (gathered) and is scatter-added onto the
    input and the kernel. The tied windows (the next ones in index order, by `_next_true`)
    are recomputed whole (their ``T x I`` products), `MAX_SPARSE_TIES` at a time in a
    ``while_loop`` that runs once per such chunk (not at all without ties), and their
    cotangent is split equally among the products equal to the max of that recomputation. A
    window with a NaN has no gradient, as in the exact rule. Winners are never found by
    comparing recomputed products with ``y``: the forward's kernel may round a user's
    combine differently (see `_winner_codes`), so ``y`` only marks the NaN windows.

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
    n_ties = jnp.sum(tie, dtype=jnp.int32)
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

    # Flat (row-major) strides of the padded input and of the taps-major kernel: scatters
    # and gathers with one int32 index per element (a multi-dimensional index per element
    # would be stored as an (elements, rank) array).
    xstr = np.cumprod((1, *xp.shape[::-1]))[:-1][::-1].astype(np.int64)

    def x_index(nn: Array, pos: list[Array], chan: Array) -> Array:
        idx = nn * int(xstr[0]) + chan
        for j, a in enumerate(pos):
            idx = idx + a * int(xstr[j + 1])
        return idx

    def w_index(tt: Array, gg: Array, oo: Array, ii: Array) -> Array:
        return ((tt * g + gg) * og + oo) * i + ii

    shp = (n, p, g, og)
    n_i = lax.broadcasted_iota(jnp.int32, shp, 0)
    p_i = lax.broadcasted_iota(jnp.int32, shp, 1)
    g_i = lax.broadcasted_iota(jnp.int32, shp, 2)
    o_i = lax.broadcasted_iota(jnp.int32, shp, 3)
    t_w, i_w = _div(flat, i), _rem(flat, i)
    xi = x_index(n_i, coords(p_i, t_w), g_i * i + i_w).reshape(-1)
    wi = w_index(t_w, g_i, o_i, i_w).reshape(-1)
    xf, wf = xp.reshape(-1), wt.reshape(-1)
    ct = jnp.where(single, gy, 0).astype(xf.dtype).reshape(-1)
    _, vjp = jax.vjp(op.combine, xf[xi], wf[wi])
    dx, dw = vjp(ct)
    gxf = jnp.zeros(xf.shape, gdt).at[xi].add(dx.astype(gdt))
    gwf = jnp.zeros(wf.shape, gdt).at[wi].add(dw.astype(gdt))

    # Tied windows, a chunk of k at a time: (k, T, I) products each, within the bound.
    total = n * p * g * og
    k = max(1, min(MAX_SPARSE_TIES, total, cfg.max_block_bytes // max(1, 8 * nt * i * 4)))
    flat_tie = tie.reshape(-1)
    idx = jnp.arange(total, dtype=jnp.int32)
    kt = jnp.arange(nt).reshape(1, nt, 1)
    ki = jnp.arange(i).reshape(1, 1, i)
    tmask_j = None if tmask is None else jnp.asarray(tmask.T)
    gf_all = gy.reshape(-1)
    red = op.reduce
    ident = -jnp.inf if red == "max" else jnp.inf

    def tie_chunk(carry: tuple) -> tuple:
        j, last, gxf, gwf = carry
        found = _next_true(flat_tie & (idx > last), k)
        valid = found >= 0
        sel = jnp.maximum(found, 0)
        kn, kp, kg, ko = (_digit(sel, shp, d) for d in range(4))
        kxi = jnp.broadcast_to(
            x_index(kn.reshape(k, 1, 1), coords(kp.reshape(k, 1, 1), kt),
                    kg.reshape(k, 1, 1) * i + ki), (k, nt, i))
        kwi = jnp.broadcast_to(
            w_index(kt, kg.reshape(k, 1, 1), ko.reshape(k, 1, 1), ki), (k, nt, i))
        ck, vjpk = jax.vjp(op.combine, xf[kxi], wf[kwi])
        # The winners are those equal to the max of these very products: the barrier makes
        # XLA compute them once, so that the max and the comparisons read the same values.
        ck = lax.optimization_barrier(ck)
        if tmask_j is not None:  # padded taps are not products
            on = jnp.broadcast_to(tmask_j[kp].reshape(k, nt, 1), ck.shape)
            ck = jnp.where(on, ck, jnp.asarray(ident, ck.dtype))
        top = (jnp.max if red == "max" else jnp.min)(ck, axis=(1, 2), keepdims=True)
        eq = ck == top
        if tmask_j is not None:
            eq = eq & on
        cnt = jnp.maximum(jnp.sum(eq, axis=(1, 2)), 1)
        sk = jnp.where(valid, gf_all[sel].astype(gdt) / cnt, 0).reshape(k, 1, 1)
        dxk, dwk = vjpk(jnp.where(eq, sk, 0).astype(ck.dtype))
        # The next chunk starts after this one's last window (where this one is not full,
        # it was the last chunk).
        return (j + 1, found[k - 1], gxf.at[kxi].add(dxk.astype(gdt)),
                gwf.at[kwi].add(dwk.astype(gdt)))

    _, _, gxf, gwf = lax.while_loop(lambda c: c[0] * k < n_ties, tie_chunk,
                                    (jnp.int32(0), jnp.int32(-1), gxf, gwf))
    _, pad_vjp = jax.vjp(lambda a: taps.pad_input(a, op, geom), x)
    gx = pad_vjp(gxf.reshape(xp.shape).astype(x.dtype))[0]
    gwt = gwf.reshape(wt.shape)
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

"""A convolution as an implicit GEMM (GPU, interpret mode): every tap inside one kernel,
forward and gradients."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.engines import taps
from jaxconv._src.engines.pallas.config import Config
from jaxconv._src.engines.pallas.platforms import (
    BlockSizes,
    _call_options,
    _fit,
    _next_pow2,
    _pad_to,
    _padded,
    _round_up,
)
from jaxconv._src.engines.primal import primal

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static layout of the implicit-GEMM forward (every tap inside one kernel).

    The padded input is split into stride phases (``xp[r::s]`` per spatial dimension); in
    phase ``r`` the tap at offset ``k * d = q * s + r`` reads the cell ``o + q`` for output
    ``o``. Each phase is cropped / zero-padded to ``lengths = out + max q`` and flattened to
    rows ``(n, l)``, so a tap is a constant row shift of one phase: ``base = phase * rows_p +
    sum_d q_d * stride_d``. The kernel computes "virtual" output rows ``(n, l)`` for every
    ``l < lengths`` (the rows with ``l >= out`` are dropped afterwards, ~10% extra work for
    a 3x3 SAME layer of 32 x 32).
    """

    lengths: tuple[int, ...]
    phases: tuple[tuple[int, ...], ...]
    tap_phase: tuple[int, ...]
    shifts: tuple[int, ...]
    used: tuple[int, ...]
    masks: np.ndarray  # (T_used, prod(lengths)): 1 where a real output's tap reads a real cell
    skips: bool  # identity padding: the forward masks the taps that read padding


def _plan(geom: Geometry, op: Op) -> _Plan:
    """The `_Plan` of a geometry: the taps that read input (per-tap masks), phases and shifts.

    Args:
        geom: the product's geometry.
        op: the op (taps wholly in the padding are skipped without a pad value).

    Returns:
        The plan.
    """
    vmask = geom.valid_mask() if op.pad_value is None else None
    used, qs, rs, masks = [], [], [], []
    for t, tap in enumerate(geom.taps()):
        m = geom.tap_mask(vmask, tap)
        if m is not None and not m.any():
            continue
        off = taps.tap_offset(geom, tap)
        used.append(t)
        qs.append(tuple(o // st for o, st in zip(off, geom.strides, strict=True)))
        rs.append(tuple(o % st for o, st in zip(off, geom.strides, strict=True)))
        masks.append(m)
    nsd = len(geom.window)
    lengths = tuple(geom.out_spatial[d] + max((q[d] for q in qs), default=0)
                    for d in range(nsd))
    phases = tuple(sorted(set(rs)))
    strides = [math.prod(lengths[d + 1:]) for d in range(nsd)]
    shifts = tuple(sum(q[d] * strides[d] for d in range(nsd)) for q in qs)
    out_masks = np.zeros((len(used), *lengths), np.int32)
    region = tuple(slice(0, o) for o in geom.out_spatial)
    for j, m in enumerate(masks):
        out_masks[(j, *region)] = 1 if m is None else m
    return _Plan(lengths, phases, tuple(phases.index(r) for r in rs), shifts, tuple(used),
                 out_masks.reshape(len(used), math.prod(lengths)), vmask is not None)


def _phase_rows(xp: Array, geom: Geometry, plan: _Plan) -> Array:
    """Padded input ``(N, *P, C)`` -> phases ``(R, N * prod(lengths), C)``.

    Args:
        xp: the padded input.
        geom: the product's geometry.
        plan: the plan.

    Returns:
        The phase rows.
    """
    out = []
    for r in plan.phases:
        sl = xp[(slice(None), *(slice(ri, None, st) for ri, st in zip(r, geom.strides,
                                                                     strict=True)))]
        sl = sl[(slice(None), *(slice(0, ln) for ln in plan.lengths))]
        sl = _pad_to(sl, (sl.shape[0], *plan.lengths, sl.shape[-1]))
        out.append(sl.reshape(-1, sl.shape[-1]))
    return jnp.stack(out)


def _implicit_kernel(
    *refs: Any, bases: tuple[int, ...], term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, acc_dtype: Any, k_total: int,
    has_y: bool, has_mask: bool,
) -> None:
    """One ``(bm, bn)`` output tile, every tap and every K column walked inside the kernel.

    ``a_ref`` is the whole phase-row input ``(1, R * rows_p, Kp)`` (Triton reads it through
    pointers: only the ``(bm, 1)`` columns the kernel indexes are loaded), ``b_ref`` the
    taps' weights ``(T, 1, Kp, bn)``, ``mask_ref`` ``(bm, T)``.

    Args:
        *refs: ``a_ref``, ``b_ref``, then ``y_ref`` (with ``has_y``), ``mask_ref`` (with
            ``has_mask``), and the output ``o_ref``.
        bases: each used tap's first row in ``a_ref``.
        term: ``term(x, w, y)``, the value each product contributes.
        binary: the reduce of two partial results.
        ident: the reduce's identity.
        acc_dtype: the accumulation dtype.
        k_total: the real number of input channels.
        has_y: whether a ``y_ref`` is passed (for a term that compares with the output).
        has_mask: whether a ``mask_ref`` is passed.
    """
    refs = list(refs)
    a_ref, b_ref = refs[0], refs[1]
    pos = 2
    y_ref = mask_ref = None
    if has_y:
        y_ref, pos = refs[pos], pos + 1
    if has_mask:
        mask_ref, pos = refs[pos], pos + 1
    o_ref = refs[pos]
    shape = o_ref.shape[1:]
    bm = shape[0]
    row0 = pl.program_id(1) * bm
    y = y_ref[0] if y_ref is not None else None
    acc = jnp.full(shape, ident, acc_dtype)
    for t, base in enumerate(bases):
        def step(k: Any, acc: Array, t: int = t, base: int = base) -> Array:
            col = a_ref[0, pl.ds(row0 + base, bm), pl.ds(k, 1)]
            row = b_ref[t, 0, pl.ds(k, 1), :]
            c = term(jnp.broadcast_to(col, shape), jnp.broadcast_to(row, shape), y)
            return binary(acc, c.astype(acc_dtype))

        new = lax.fori_loop(0, k_total, step, acc)
        if mask_ref is not None:
            # Rows whose tap reads padding keep their value: the tap is skipped there.
            new = jnp.where(mask_ref[:, pl.ds(t, 1)] != 0, new, acc)
        acc = new
    o_ref[0] = acc


def _to_virtual(y: Array, plan: _Plan, g: int, rows_to: int, cols_to: int) -> Array:
    """``(N, *Os, G * Og)`` -> virtual-row canonical ``(G, rows_to, cols_to)``."""
    n, o = y.shape[0], y.shape[-1]
    y = _pad_to(y, (n, *plan.lengths, o)).reshape(-1, g, o // g).transpose(1, 0, 2)
    return _pad_to(y, (g, rows_to, cols_to))


@dataclasses.dataclass(frozen=True)
class _Layout:
    """Padded extents of the implicit-GEMM kernels for one problem."""

    n: int
    g: int
    i: int
    og: int
    rows: int  # virtual output rows N * prod(lengths)
    bs: BlockSizes
    mp: int  # rows padded to the row tile
    mr: int  # rows padded to the dw kernel's row chunk
    red: int  # the dw kernel's row chunk
    np_: int
    kp: int
    rows_p: int  # rows per phase in the kernels' input (room for the largest shift)
    nph_p: int  # phases, padded
    nt: int
    nt_p: int  # used taps, padded
    bases: tuple[int, ...]  # per used tap: its first row in the phase-row input

    @property
    def total_rows(self) -> int:
        """The rows of the kernels' input, every phase padded: ``nph_p * rows_p``."""
        return self.nph_p * self.rows_p


def _layout(cfg: Config, plan: _Plan, x: Array, w: Array) -> _Layout:
    """The padded extents and block sizes of one problem's implicit-GEMM kernels.

    Args:
        cfg: the call's configuration.
        plan: the plan.
        x: the input.
        w: the kernel.

    Returns:
        The layout.
    """
    n, g = x.shape[0], cfg.geom.groups
    i, og = w.shape[-2], w.shape[-1] // g
    rows = n * math.prod(plan.lengths)
    bs = _fit(cfg.backend.blocks, rows, og, i)
    # Rows are always cut into bm-row blocks, so they are padded to a multiple of bm only
    # (no power of two: that would add programs); K and N are whole blocks somewhere.
    mp = _round_up(rows, bs.bm)
    np_, kp = _padded(og, bs.bn, bs.pow2), _padded(i, bs.bk, bs.pow2)
    red = _round_up(bs.red, bs.bm)
    red = min(_next_pow2(red), _next_pow2(mp)) if bs.pow2 else min(red, mp)
    mr = _round_up(mp, red)
    rows_p = _padded(mr + max(plan.shifts), bs.bm, bs.pow2)
    nph = len(plan.phases)
    nph_p = _next_pow2(nph) if bs.pow2 else nph
    nt = len(plan.used)
    nt_p = _next_pow2(nt) if bs.pow2 else nt
    bases = tuple(ph * rows_p + sh for ph, sh in zip(plan.tap_phase, plan.shifts, strict=True))
    return _Layout(n, g, i, og, rows, bs, mp, mr, red, np_, kp, rows_p, nph_p, nt, nt_p, bases)


def _implicit_operands(
    cfg: Config, plan: _Plan, lay: _Layout, x: Array, w: Array
) -> tuple[Array, Array]:
    """Phase-row input ``(G, R * rows_p, Kp)`` and used taps' weights ``(T, G, Kp, Np)``.

    Args:
        cfg: the call's configuration.
        plan: the plan.
        lay: the layout.
        x: the input.
        w: the kernel.

    Returns:
        ``(a, b)``.
    """
    xr = _phase_rows(taps.pad_input(x, cfg.op, cfg.geom), cfg.geom, plan)  # (R, rows, C)
    xr = xr.reshape(len(plan.phases), lay.rows, lay.g, lay.i).transpose(2, 0, 1, 3)
    a = _pad_to(xr, (lay.g, lay.nph_p, lay.rows_p, lay.kp)).reshape(
        lay.g, lay.total_rows, lay.kp)
    wt = w.reshape(-1, lay.i, lay.g, lay.og).transpose(0, 2, 1, 3)[jnp.asarray(plan.used)]
    return a, _pad_to(wt, (lay.nt_p, lay.g, lay.kp, lay.np_))


def _mask_table(plan: _Plan, lay: _Layout, rows_to: int, front: int = 0) -> Array:
    """``(front + rows_to, T_p)`` int32: tap validity per virtual output row."""
    mk = np.zeros((front + rows_to, lay.nt_p), np.int32)
    mk[front:front + lay.rows, :lay.nt] = np.tile(plan.masks, (1, lay.n)).T
    return jnp.asarray(mk)


def _from_virtual(out: Array, plan: _Plan, lay: _Layout, geom: Geometry) -> Array:
    """Virtual-row canonical ``(G, >= rows, >= Og)`` -> ``(N, *Os, G * Og)``."""
    out = out[:, :lay.rows, :lay.og].reshape(lay.g, lay.n, *plan.lengths, lay.og)
    out = out[(slice(None), slice(None), *(slice(0, o) for o in geom.out_spatial))]
    return jnp.moveaxis(out, 0, -2).reshape(lay.n, *geom.out_spatial, lay.g * lay.og)


def _contract_implicit(
    cfg: Config, x: Array, w: Array, *, term: Callable[..., Array],
    binary: Callable[[Array, Array], Array], ident: Any, y: Array | None = None,
) -> Array:
    """The forward (or tie count) as one kernel with the taps inside: ``(N, *Os, O)``.

    ``y``: the forward's output ``(N, *Os, O)``, for a ``term`` that compares with it.

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.
        term: ``term(x, w, y)``, the value each product contributes.
        binary: the reduce of two partial results.
        ident: the reduce's identity.
        y: the forward's output, or ``None``.

    Returns:
        The output ``(N, *out_spatial, O)``.
    """
    geom = cfg.geom
    plan = _plan(geom, cfg.op)
    out_shape = (x.shape[0], *geom.out_spatial, w.shape[-1])
    if not plan.used:
        return jnp.full(out_shape, ident, cfg.acc_dtype)
    lay = _layout(cfg, plan, x, w)
    bs = lay.bs
    a, b = _implicit_operands(cfg, plan, lay, x, w)
    in_specs = [
        pl.BlockSpec((1, lay.total_rows, lay.kp), lambda gi, i_, j: (gi, 0, 0)),
        pl.BlockSpec((lay.nt_p, 1, lay.kp, bs.bn), lambda gi, i_, j: (0, gi, 0, j)),
    ]
    args = [a, b]
    out_spec = pl.BlockSpec((1, bs.bm, bs.bn), lambda gi, i_, j: (gi, i_, j))
    if y is not None:
        in_specs.append(out_spec)
        args.append(_to_virtual(y.astype(cfg.acc_dtype), plan, lay.g, lay.mp, lay.np_))
    if plan.skips:
        in_specs.append(pl.BlockSpec((bs.bm, lay.nt_p), lambda gi, i_, j: (i_, 0)))
        args.append(_mask_table(plan, lay, lay.mp))
    kernel = functools.partial(
        _implicit_kernel, bases=lay.bases, term=term, binary=binary, ident=ident,
        acc_dtype=cfg.acc_dtype, k_total=lay.i, has_y=y is not None, has_mask=plan.skips)
    out = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((lay.g, lay.mp, lay.np_), cfg.acc_dtype),
        grid=(lay.g, lay.mp // bs.bm, lay.np_ // bs.bn),
        in_specs=in_specs,
        out_specs=out_spec,
        name="jaxconv_semiring_conv",
        **_call_options(cfg.backend, 3),
    )(*args)
    return _from_virtual(out, plan, lay, geom)


def _implicit_dw_kernel(
    at_ref: Any, b_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    bases: tuple[int, ...], combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any, red: int,
) -> None:
    """``dw`` of one tap (a grid axis), ``(bk, bn)`` tile, summed over a chunk of rows.

    ``at_ref``: phase rows transposed ``(1, bk, R * rows_p)``; ``b_ref`` ``(1, 1, bk, bn)``;
    ``y``/``s`` ``(1, red, bn)`` virtual rows; ``mask_ref`` ``(red, T_p)``.

    Args:
        at_ref: the transposed phase rows.
        b_ref: the tap's weights.
        y_ref: the forward's output rows.
        s_ref: the cotangent rows.
        mask_ref: the rows' tap masks.
        o_ref: the output tile.
        bases: each used tap's first row.
        combine: the op's combine.
        combine_vjp: its VJP.
        rule: the reduce's gradient weight, ``rule(c, y, s)``.
        acc_dtype: the accumulation dtype.
        red: the rows of one chunk.
    """
    t = pl.program_id(1)
    base = jnp.int32(0)
    for tt, bt in enumerate(bases):  # the tap's first row: scalar selects, no table load
        base = lax.select(t == tt, jnp.int32(bt), base)
    row0 = base + pl.program_id(4) * red
    shape = o_ref.shape[-2:]
    wv = b_ref[0, 0]

    def step(i: Any, acc: Array) -> Array:
        xv = jnp.broadcast_to(at_ref[0, :, pl.ds(row0 + i, 1)], shape)
        yv, sv = y_ref[0, pl.ds(i, 1), :], s_ref[0, pl.ds(i, 1), :]
        valid = mask_ref[pl.ds(i, 1), pl.ds(t, 1)] != 0
        c = combine(xv, wv)
        dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
        d = combine_vjp(xv, wv, dc)[1].astype(acc_dtype)
        return acc + jnp.where(valid, d, 0)

    o_ref[...] = lax.fori_loop(0, red, step, jnp.zeros(shape, acc_dtype)).reshape(o_ref.shape)


def _implicit_dx_kernel(
    a_ref: Any, bt_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    phase_taps: tuple[tuple[tuple[int, int], ...], ...], rows_p: int, front: int,
    n_total: int, combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any,
) -> None:
    """``dx`` of a ``(bm, bk)`` tile of phase rows: every tap reading that phase, every n.

    Input row ``q`` of a phase gets the terms of the output rows ``q - shift`` of the taps
    in that phase. ``bt_ref`` ``(T_p, 1, Np, bk)``; ``y``/``s`` ``(1, front + rows, Np)`` and
    ``mask_ref`` ``(front + rows, T_p)`` start with ``front`` zero rows (shifts reach back).

    Args:
        a_ref: the phase rows.
        bt_ref: the transposed weights.
        y_ref: the forward's output rows.
        s_ref: the cotangent rows.
        mask_ref: the rows' tap masks.
        o_ref: the output tile.
        phase_taps: per phase, its taps as ``(tap, shift)``.
        rows_p: the rows per phase.
        front: the zero rows ahead of ``y``, ``s`` and the mask.
        n_total: the real number of output features.
        combine: the op's combine.
        combine_vjp: its VJP.
        rule: the reduce's gradient weight, ``rule(c, y, s)``.
        acc_dtype: the accumulation dtype.
    """
    shape = o_ref.shape[1:]
    bm = shape[0]
    row0 = pl.program_id(1) * bm
    phase = lax.div(row0, jnp.int32(rows_p))  # (jnp floor division trips Triton)
    q0 = row0 - phase * rows_p
    xv = a_ref[0]

    for ph, tap_list in enumerate(phase_taps):
        @pl.when(phase == ph)
        def _(tap_list: tuple[tuple[int, int], ...] = tap_list) -> None:
            acc = jnp.zeros(shape, acc_dtype)
            for t, shift in tap_list:
                start = q0 - shift + front
                valid = mask_ref[pl.ds(start, bm), pl.ds(t, 1)] != 0

                def step(j: Any, acc: Array, t: int = t, start: Any = start,
                         valid: Array = valid) -> Array:
                    wv = jnp.broadcast_to(bt_ref[t, 0, pl.ds(j, 1), :], shape)
                    yv = y_ref[0, pl.ds(start, bm), pl.ds(j, 1)]
                    sv = s_ref[0, pl.ds(start, bm), pl.ds(j, 1)]
                    c = combine(xv, wv)
                    dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
                    d = combine_vjp(xv, wv, dc)[0].astype(acc_dtype)
                    return acc + jnp.where(valid, d, 0)

                acc = lax.fori_loop(0, n_total, step, acc)
            o_ref[0] = acc

    # Rows of the padding phases (a power-of-two count) are never read back.
    @pl.when(phase >= len(phase_taps))
    def _() -> None:
        o_ref[0] = jnp.zeros(shape, acc_dtype)


def _backward_implicit(
    cfg: Config, x: Array, w: Array, s: Array, y: Array, rule: Callable[..., Array]
) -> tuple[Array, Array]:
    """``dx``, ``dw`` with the taps inside the kernels; ``s``, ``y`` are ``(N, *Os, O)``.

    Args:
        cfg: the call's configuration.
        x: the input.
        w: the kernel.
        s: the output's cotangent.
        y: the forward's output.
        rule: the reduce's gradient weight, ``rule(c, y, s)``.

    Returns:
        ``(dx, dw)``.
    """
    op, geom, acc_dtype = cfg.op, cfg.geom, cfg.acc_dtype
    plan = _plan(geom, op)
    xp = taps.pad_input(x, op, geom)
    t_all = math.prod(geom.window)
    g = geom.groups
    if not plan.used:
        return (jnp.zeros(x.shape, x.dtype), jnp.zeros(w.shape, w.dtype))
    lay = _layout(cfg, plan, x, w)
    bs = lay.bs
    a, b = _implicit_operands(cfg, plan, lay, x, w)
    comb = primal(op.combine)
    comb_vjp = primal(lambda xv, wv, dc: jax.vjp(op.combine, xv, wv)[1](dc))
    kw = dict(combine=comb, combine_vjp=comb_vjp, rule=rule, acc_dtype=acc_dtype)

    # dw: grid (G, taps, K tiles, N tiles, row chunks); the chunks' partial sums added here.
    nred = lay.mr // lay.red
    yv = _to_virtual(y, plan, g, lay.mr, lay.np_)
    sv = _to_virtual(s, plan, g, lay.mr, lay.np_)
    part = pl.pallas_call(
        functools.partial(_implicit_dw_kernel, bases=lay.bases, red=lay.red, **kw),
        out_shape=jax.ShapeDtypeStruct((nred, lay.nt_p, g, lay.kp, lay.np_), acc_dtype),
        grid=(g, lay.nt, lay.kp // bs.bk, lay.np_ // bs.bn, nred),
        in_specs=[
            pl.BlockSpec((1, bs.bk, lay.total_rows), lambda gi, t, kk, j, r: (gi, kk, 0)),
            pl.BlockSpec((1, 1, bs.bk, bs.bn), lambda gi, t, kk, j, r: (t, gi, kk, j)),
            pl.BlockSpec((1, lay.red, bs.bn), lambda gi, t, kk, j, r: (gi, r, j)),
            pl.BlockSpec((1, lay.red, bs.bn), lambda gi, t, kk, j, r: (gi, r, j)),
            pl.BlockSpec((lay.red, lay.nt_p), lambda gi, t, kk, j, r: (r, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, 1, bs.bk, bs.bn),
                               lambda gi, t, kk, j, r: (r, t, gi, kk, j)),
        name="jaxconv_semiring_conv_grad_w",
        **_call_options(cfg.backend, 5),
    )(jnp.swapaxes(a, 1, 2), b, yv, sv, _mask_table(plan, lay, lay.mr))
    gw_used = jnp.sum(part, axis=0)[:lay.nt, :, :lay.i, :lay.og]
    gw_full = jnp.zeros((t_all, g, lay.i, lay.og), acc_dtype).at[
        jnp.asarray(plan.used)].set(gw_used)
    gw = gw_full.transpose(0, 2, 1, 3).reshape(w.shape)

    # dx over phase rows: grid (G, R * rows_p / bm, K tiles).
    front = max(plan.shifts)
    yrows = _padded(front + lay.rows_p, bs.bm, bs.pow2)
    yf = _pad_to(jnp.pad(yv, ((0, 0), (front, 0), (0, 0))), (g, yrows, lay.np_))
    sf = _pad_to(jnp.pad(sv, ((0, 0), (front, 0), (0, 0))), (g, yrows, lay.np_))
    mk = _pad_to(_mask_table(plan, lay, lay.mr, front), (yrows, lay.nt_p))
    phase_taps = tuple(
        tuple((t, sh) for t, (tp, sh) in enumerate(zip(plan.tap_phase, plan.shifts,
                                                        strict=True)) if tp == ph)
        for ph in range(len(plan.phases)))
    dxr = pl.pallas_call(
        functools.partial(_implicit_dx_kernel, phase_taps=phase_taps, rows_p=lay.rows_p,
                          front=front, n_total=lay.og, **kw),
        out_shape=jax.ShapeDtypeStruct((g, lay.total_rows, lay.kp), acc_dtype),
        grid=(g, lay.total_rows // bs.bm, lay.kp // bs.bk),
        in_specs=[
            pl.BlockSpec((1, bs.bm, bs.bk), lambda gi, i_, kk: (gi, i_, kk)),
            pl.BlockSpec((lay.nt_p, 1, lay.np_, bs.bk), lambda gi, i_, kk: (0, gi, 0, kk)),
            pl.BlockSpec((1, yrows, lay.np_), lambda gi, i_, kk: (gi, 0, 0)),
            pl.BlockSpec((1, yrows, lay.np_), lambda gi, i_, kk: (gi, 0, 0)),
            pl.BlockSpec((yrows, lay.nt_p), lambda gi, i_, kk: (0, 0)),
        ],
        out_specs=pl.BlockSpec((1, bs.bm, bs.bk), lambda gi, i_, kk: (gi, i_, kk)),
        name="jaxconv_semiring_conv_grad_x",
        **_call_options(cfg.backend, 3),
    )(a, jnp.swapaxes(b, 2, 3), yf, sf, mk)
    # Phase rows back onto the padded input (the transpose of _phase_rows).
    gxp = jnp.zeros(xp.shape, acc_dtype)
    n, c = x.shape[0], x.shape[-1]
    for ph, r in enumerate(plan.phases):
        v = dxr[:, ph * lay.rows_p: ph * lay.rows_p + lay.rows, :lay.i]
        v = v.transpose(1, 0, 2).reshape(n, *plan.lengths, c)
        avail = [-(-(p - ri) // st) for p, ri, st in zip(geom.padded_spatial, r, geom.strides,
                                                          strict=True)]
        keep = [min(ln, av) for ln, av in zip(plan.lengths, avail, strict=True)]
        v = v[(slice(None), *(slice(0, k) for k in keep))]
        idx = (slice(None), *(slice(ri, ri + st * k, st)
                              for ri, st, k in zip(r, geom.strides, keep, strict=True)))
        gxp = gxp.at[idx].add(v)
    _, pad_vjp = jax.vjp(lambda v: taps.pad_input(v, op, geom), x)
    (gx,) = pad_vjp(gxp.astype(x.dtype))
    return gx.astype(x.dtype), gw.astype(w.dtype)


def _implicit(cfg: Config) -> bool:
    """Whether the forward runs as one kernel with the taps inside (rank-1 backends)."""
    return cfg.backend.style == "rank1"

"""The Pallas semiring matmul kernels (forward and gradient) and their calls."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import accumulation_dtype
from jaxconv._src.engines.pallas.platforms import (
    Backend,
    BlockSizes,
    _call_options,
    _chunk,
    _fit,
    _ident,
    _next_pow2,
    _on_platforms,
    _pad_to,
    _padded,
    _round_up,
    _take,
    platform_backends,
)
from jaxconv._src.engines.primal import primal

Array = jax.Array


def _walk(
    backend: Backend, total: int, extent: int, load: Callable[[Any, int], tuple[Array, ...]],
    step: Callable[[Array, tuple[Array, ...], int], Array], acc: Array,
) -> Array:
    """``acc = step(acc, views, j)`` for every index ``0 <= i < total`` of a walked axis.

    ``load(start, size)`` returns the operands' slices ``[start, start + size)`` along the
    walked axis; ``step`` takes entry ``j`` of them (`_take`). ``"rank1"``: one dynamic
    slice of size 1 per index. ``"chunked"``: aligned chunks (``extent``, the padded length of
    the axis, is a multiple of the chunk), each walked with static slices; the last chunk only
    as far as ``total``.

    Args:
        backend: the backend (its style and chunk).
        total: the real length of the walked axis.
        extent: its padded length.
        load: ``load(start, size)``, the operands' slices.
        step: ``step(acc, views, j)``.
        acc: the initial accumulator.

    Returns:
        The accumulator.
    """
    if backend.style == "rank1":
        return lax.fori_loop(0, total, lambda i, a: step(a, load(i, 1), 0), acc)
    size = _chunk(backend, extent)

    def chunk(a: Array, views: tuple[Array, ...], count: int) -> Array:
        for j in range(count):
            a = step(a, views, j)
        return a

    full = total // size
    if full == 1:
        acc = chunk(acc, load(0, size), size)  # one chunk: static offsets only
    elif full:
        acc = lax.fori_loop(
            0, full,
            lambda c, a: chunk(a, load(pl.multiple_of(c * size, size), size), size), acc)
    if total % size:
        acc = chunk(acc, load(full * size, size), total % size)
    return acc


def _grid_walk(
    axis: int, total: int, size: int, views: Callable[[], tuple[Array, ...]],
    step: Callable[[Array, tuple[Array, ...], int], Array], o_ref: Any,
    start: Callable[[], Array],
) -> None:
    """The ``"chunked"`` style's walk when the walked axis is grid axis ``axis``.

    Each program sees one ``size``-wide block of the walked axis (a BlockSpec block, so no
    dynamic offset inside the kernel: Mosaic's layout rules) and walks it with static
    slices, accumulating into the output block, which stays resident while the axis (the
    last, ``"arbitrary"``) advances. The last block is walked only as far as ``total``.

    Args:
        axis: the grid axis that walks.
        total: the real length of the walked axis.
        size: the block's width.
        views: the operands' blocks.
        step: ``step(acc, views, j)``.
        o_ref: the output block (the accumulator).
        start: the accumulator's initial value.
    """
    kb = pl.program_id(axis)

    @pl.when(kb == 0)
    def _init() -> None:
        o_ref[0] = start()

    def run(count: int) -> None:
        vs = views()
        acc = o_ref[0]
        for j in range(count):
            acc = step(acc, vs, j)
        o_ref[0] = acc

    full, rem = divmod(total, size)
    if full:
        pl.when(kb < full)(lambda: run(size))
    if rem:
        pl.when(kb == full)(lambda: run(rem))


def _contract_kernel(
    *refs: Any,
    backend: Backend,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    k_total: int,
    has_y: bool,
    has_acc: bool,
    has_mask: bool,
    grid_k: bool = False,
) -> None:
    """One ``(bm, bn)`` output tile: ``acc = binary(acc, term(combine(a[:, k], b[k, :])))``.

    ``grid_k``: K is the last grid axis (blocks of ``bk``), walked by ``_grid_walk``.

    Args:
        *refs: ``a_ref``, ``b_ref``, then ``y_ref``, ``acc_ref``, ``mask_ref`` where their flags
            say so, and the output ``o_ref``.
        backend: the backend.
        term: ``term(x, w, y)``, the value each product contributes.
        binary: the reduce of two partial results.
        ident: the reduce's identity.
        acc_dtype: the accumulation dtype.
        k_total: the real contraction length.
        has_y: whether a ``y_ref`` is passed.
        has_acc: whether an initial accumulator ``acc_ref`` is passed.
        has_mask: whether a ``mask_ref`` is passed.
        grid_k: whether the contraction is a grid axis (`_grid_walk`).
    """
    refs = list(refs)
    a_ref, b_ref = refs[0], refs[1]
    pos = 2
    y_ref = acc_ref = mask_ref = None
    if has_y:
        y_ref, pos = refs[pos], pos + 1
    if has_acc:
        acc_ref, pos = refs[pos], pos + 1
    if has_mask:
        mask_ref, pos = refs[pos], pos + 1
    o_ref = refs[pos]
    shape = o_ref.shape[1:]
    start = acc_ref[0] if acc_ref is not None else jnp.full(shape, ident, acc_dtype)
    y = y_ref[0] if y_ref is not None else None

    def load(k: Any, size: int) -> tuple[Array, Array]:
        return a_ref[0, :, pl.ds(k, size)], b_ref[0, pl.ds(k, size), :]

    def step(acc: Array, views: tuple[Array, Array], j: int) -> Array:
        col = jnp.broadcast_to(_take(views[0], j, 1), shape)  # a[:, k] across the tile
        row = jnp.broadcast_to(_take(views[1], j, 0), shape)  # b[k, :] down the tile
        return binary(acc, term(col, row, y).astype(acc_dtype))

    if grid_k:
        _grid_walk(3, k_total, a_ref.shape[-1], lambda: (a_ref[0], b_ref[0]), step, o_ref,
                   lambda: start)
        if mask_ref is not None:
            @pl.when(pl.program_id(3) == pl.num_programs(3) - 1)
            def _skip() -> None:
                o_ref[0] = jnp.where(mask_ref[...] != 0, o_ref[0], start)
        return
    # The loop runs over the real K only: the zero padding of K never reaches combine.
    acc = _walk(backend, k_total, a_ref.shape[-1], load, step, start)
    if mask_ref is not None:
        # Rows whose tap lies in padding keep their previous value: the tap is skipped.
        acc = jnp.where(mask_ref[...] != 0, acc, start)
    o_ref[0] = acc


def _contract(
    a: Array,
    b: Array,
    *,
    backend: Backend,
    term: Callable[..., Array],
    binary: Callable[[Array, Array], Array],
    ident: Any,
    acc_dtype: Any,
    blocks: BlockSizes,
    k_total: int,
    y: Array | None = None,
    acc: Array | None = None,
    mask: Array | None = None,
) -> Array:
    """Padded operands ``a (G, Mp, Kp)``, ``b (G, Kp, Np)`` -> ``(G, Mp, Np)``.

    Grid ``(G, Mp / bm, Np / bn)``, every axis parallel.

    Args:
        a: the left operand ``(G, Mp, Kp)``.
        b: the right operand ``(G, Kp, Np)``.
        backend: the backend.
        term: ``term(x, w, y)``, the value each product contributes.
        binary: the reduce of two partial results.
        ident: the reduce's identity.
        acc_dtype: the accumulation dtype.
        blocks: the block sizes.
        k_total: the real contraction length.
        y: the forward's output ``(G, Mp, Np)``, for a term that compares with it.
        acc: an initial accumulator ``(G, Mp, Np)``.
        mask: a row mask ``(Mp, 1)``.

    Returns:
        The result ``(G, Mp, Np)``.
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    # The chunked (TPU) form: K is the last grid axis, each program one (bm, bk) block.
    grid_k = backend.style == "chunked"
    if grid_k:
        grid = (g, mp // bm, np_ // bn, kp // bk)
        out_spec = pl.BlockSpec((1, bm, bn), lambda gi, i, j, kk: (gi, i, j))
        in_specs = [
            pl.BlockSpec((1, bm, bk), lambda gi, i, j, kk: (gi, i, kk)),
            pl.BlockSpec((1, bk, bn), lambda gi, i, j, kk: (gi, kk, j)),
        ]
        mask_spec = pl.BlockSpec((bm, 1), lambda gi, i, j, kk: (i, 0))
    else:
        grid = (g, mp // bm, np_ // bn)
        out_spec = pl.BlockSpec((1, bm, bn), lambda gi, i, j: (gi, i, j))
        in_specs = [
            pl.BlockSpec((1, bm, kp), lambda gi, i, j: (gi, i, 0)),
            pl.BlockSpec((1, kp, bn), lambda gi, i, j: (gi, 0, j)),
        ]
        mask_spec = pl.BlockSpec((bm, 1), lambda gi, i, j: (i, 0))
    args = [a, b]
    if y is not None:
        in_specs.append(out_spec)
        args.append(y)
    if acc is not None:
        in_specs.append(out_spec)
        args.append(acc)
    if mask is not None:
        in_specs.append(mask_spec)
        args.append(mask)
    kernel = functools.partial(
        _contract_kernel, backend=backend, term=term, binary=binary, ident=ident,
        acc_dtype=acc_dtype, k_total=k_total, has_y=y is not None, has_acc=acc is not None,
        has_mask=mask is not None, grid_k=grid_k)
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((g, mp, np_), acc_dtype),
        grid=grid,
        in_specs=in_specs,
        out_specs=out_spec,
        name="jaxconv_semiring_matmul",
        **_call_options(backend, len(grid), arbitrary_last=grid_k),
    )(*args)


def _combine_term(op: Op) -> Callable[..., Array]:
    """The term of a forward: the combine of the two values (``y`` unused)."""
    comb = primal(op.combine)
    return lambda xv, wv, y: comb(xv, wv)


def _matmul_one(backend: Backend, op: Op, acc_dtype: Any, a: Array, b: Array) -> Array:
    """The op's batched matrix product ``(G, M, K) x (G, K, N) -> (G, M, N)``, padded inside.

    Args:
        backend: the backend.
        op: the op.
        acc_dtype: the accumulation dtype.
        a: the left operand.
        b: the right operand.

    Returns:
        The product.
    """
    g, m, k = a.shape
    n = b.shape[-1]
    bs = _fit(backend.blocks, m, n, k)
    mp, np_, kp = (_padded(m, bs.bm, bs.pow2), _padded(n, bs.bn, bs.pow2),
                   _padded(k, bs.bk, bs.pow2))
    return _contract(
        _pad_to(a, (g, mp, kp)), _pad_to(b, (g, kp, np_)), backend=backend,
        term=_combine_term(op), binary=algebra.binary(op), ident=_ident(op, acc_dtype),
        acc_dtype=acc_dtype, blocks=bs, k_total=k)[:, :m, :n]


def semiring_matmul(
    a: Array,
    b: Array,
    op: Op,
    *,
    acc_dtype: Any | None = None,
    blocks: BlockSizes | None = None,
    interpret: bool | None = None,
    backend: Backend | None = None,
) -> Array:
    """``out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])`` as one Pallas kernel.

    The kernel is chosen per platform when the program is lowered (interpret mode on CPU,
    Triton on CUDA / ROCm, Mosaic on TPU). Forward only (no gradient rule).

    Args:
      a: ``(G, M, K)`` or ``(M, K)`` left operand.
      b: ``(G, K, N)`` or ``(K, N)`` right operand.
      op: the product (``op.rewrite`` and ``op.pad_value`` are not used; ``op.post`` is).
      acc_dtype: accumulation and output dtype (default: the XLA engine's choice).
      blocks: tile sizes for every platform (default: each platform's).
      interpret: ``True``: interpret mode on every platform.
      backend: one `Backend` for every platform (tests).

    Returns:
      ``(G, M, N)`` (or ``(M, N)``) in ``acc_dtype``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import ops
      >>> semiring_matmul(jnp.zeros((2, 3)), jnp.ones((3, 4)), ops.max_plus).shape
      (2, 4)
    """
    squeeze = a.ndim == 2
    if squeeze:
        a, b = a[None], b[None]
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    acc_dtype = jnp.dtype(acc_dtype or accumulation_dtype(op, dtype, None))
    backends = platform_backends(interpret=interpret, blocks=blocks, backend=backend)
    out = _on_platforms(
        backends, lambda be: functools.partial(_matmul_one, be, op, acc_dtype), a, b)
    if op.post is not None:
        out = op.post(out)
    return out[0] if squeeze else out


def _grad_kernel(
    a_ref: Any, bt_ref: Any, y_ref: Any, s_ref: Any, mask_ref: Any, o_ref: Any, *,
    backend: Backend, combine: Callable[..., Array], combine_vjp: Callable[..., Any],
    rule: Callable[..., Array], acc_dtype: Any, red_total: int, wrt: int,
    grid_n: bool = False,
) -> None:
    """One gradient tile; ``wrt=0``: ``dx (bm, bk)`` summed over n, ``wrt=1``: ``dw (bk, bn)``.

    ``wrt=0``: ``a_ref`` is ``a (bm, bk)``, ``bt_ref`` is ``b^T (Np, bk)``, ``y``/``s`` are
    ``(bm, Np)``, ``mask`` ``(bm, 1)``; step ``j`` takes row ``j`` of ``b^T`` and column ``j``
    of ``y`` and ``s``, over the real features only. ``wrt=1``: ``a_ref`` is ``a^T (bk, R)``
    for a chunk of ``R`` rows, ``bt_ref`` is ``b (bk, bn)``, ``y``/``s`` are ``(R, bn)``,
    ``mask`` ``(R, 1)``; step ``i`` takes column ``i`` of ``a^T`` and row ``i`` of ``y``, ``s``
    and the mask. Masked rows (padding, padded taps) contribute exactly 0.

    Args:
        a_ref: ``a`` (``wrt=0``) or ``a^T`` (``wrt=1``), as above.
        bt_ref: ``b^T`` (``wrt=0``) or ``b`` (``wrt=1``), as above.
        y_ref: the forward's output.
        s_ref: the cotangent.
        mask_ref: the row mask.
        o_ref: the output tile.
        backend: the backend.
        combine: the op's combine.
        combine_vjp: its VJP.
        rule: the reduce's gradient weight, ``rule(c, y, s)``.
        acc_dtype: the accumulation dtype.
        red_total: the real length of the reduced axis.
        wrt: 0 for ``dx``, 1 for ``dw``.
        grid_n: whether the output features are a grid axis (`_grid_walk`).
    """
    shape = o_ref.shape[-2:]
    if wrt == 0:
        xv = a_ref[0]
        valid_rows = mask_ref[...] != 0

        def load(i: Any, size: int) -> tuple[Array, ...]:
            return (bt_ref[0, pl.ds(i, size), :], y_ref[0, :, pl.ds(i, size)],
                    s_ref[0, :, pl.ds(i, size)])
    else:
        wv = bt_ref[0]

        def load(i: Any, size: int) -> tuple[Array, ...]:
            return (a_ref[0, :, pl.ds(i, size)], y_ref[0, pl.ds(i, size), :],
                    s_ref[0, pl.ds(i, size), :], mask_ref[pl.ds(i, size), :])

    def step(acc: Array, views: tuple[Array, ...], j: int) -> Array:
        if wrt == 0:
            x = xv
            w = jnp.broadcast_to(_take(views[0], j, 0), shape)
            yv, sv = _take(views[1], j, 1), _take(views[2], j, 1)
            valid = valid_rows
        else:
            x = jnp.broadcast_to(_take(views[0], j, 1), shape)
            w = wv
            yv, sv = _take(views[1], j, 0), _take(views[2], j, 0)
            valid = _take(views[3], j, 0) != 0
        c = combine(x, w)
        dc = jnp.where(valid, rule(c.astype(acc_dtype), yv, sv), 0).astype(c.dtype)
        d = combine_vjp(x, w, dc)[wrt].astype(acc_dtype)
        # Skipped (padded) taps carry no gradient, even where the VJP is 0 * inf there.
        return acc + jnp.where(valid, d, 0)

    if grid_n:
        # dx of the chunked (TPU) form: the output features are the last grid axis.
        _grid_walk(3, red_total, bt_ref.shape[-2],
                   lambda: (bt_ref[0], y_ref[0], s_ref[0]), step, o_ref,
                   lambda: jnp.zeros(shape, acc_dtype))
        return
    extent = bt_ref.shape[-2] if wrt == 0 else a_ref.shape[-1]
    o_ref[...] = _walk(backend, red_total, extent, load, step,
                       jnp.zeros(shape, acc_dtype)).reshape(o_ref.shape)


def _grad_call(
    a: Array, b: Array, y: Array, s: Array, mask: Array, *, backend: Backend, op: Op,
    rule: Callable[..., Array], acc_dtype: Any, blocks: BlockSizes, m_total: int,
    n_total: int, wrt: int,
) -> Array:
    """Padded ``a (G, Mp, Kp)``, ``b (G, Kp, Np)``, ``y, s (G, Mp, Np)``, ``mask (Mp, 1)``.

    Returns ``dx (G, Mp, Kp)`` (``wrt=0``: grid over ``(G, M, K)`` tiles, a loop over the
    output features) or ``dw (G, Kp, Np)`` (``wrt=1``: grid over ``(G, K, N)`` tiles and
    chunks of ``blocks.red`` rows, a loop over a chunk's rows; the chunks' partial sums are
    added here, outside the kernel).

    Args:
        a: the left operand.
        b: the right operand.
        y: the forward's output.
        s: the cotangent.
        mask: the row mask.
        backend: the backend.
        op: the op.
        rule: the reduce's gradient weight, ``rule(c, y, s)``.
        acc_dtype: the accumulation dtype.
        blocks: the block sizes.
        m_total: the real number of rows.
        n_total: the real number of output features.
        wrt: 0 for ``dx``, 1 for ``dw``.

    Returns:
        ``dx`` or ``dw``, padded, as above.
    """
    g, mp, kp = a.shape
    np_ = b.shape[-1]
    bm, bn, bk = blocks.bm, blocks.bn, blocks.bk
    comb = primal(op.combine)
    comb_vjp = primal(lambda xv, wv, dc: jax.vjp(op.combine, xv, wv)[1](dc))
    kernel = functools.partial(
        _grad_kernel, backend=backend, combine=comb, combine_vjp=comb_vjp, rule=rule,
        acc_dtype=acc_dtype, red_total=n_total if wrt == 0 else 0, wrt=wrt)
    if wrt == 0 and backend.style == "chunked":
        return pl.pallas_call(
            functools.partial(kernel, grid_n=True),
            out_shape=jax.ShapeDtypeStruct((g, mp, kp), acc_dtype),
            grid=(g, mp // bm, kp // bk, np_ // bn),
            in_specs=[
                pl.BlockSpec((1, bm, bk), lambda gi, i, kk, jn: (gi, i, kk)),
                pl.BlockSpec((1, bn, bk), lambda gi, i, kk, jn: (gi, jn, kk)),
                pl.BlockSpec((1, bm, bn), lambda gi, i, kk, jn: (gi, i, jn)),
                pl.BlockSpec((1, bm, bn), lambda gi, i, kk, jn: (gi, i, jn)),
                pl.BlockSpec((bm, 1), lambda gi, i, kk, jn: (i, 0)),
            ],
            out_specs=pl.BlockSpec((1, bm, bk), lambda gi, i, kk, jn: (gi, i, kk)),
            name="jaxconv_semiring_grad_x",
            **_call_options(backend, 4, arbitrary_last=True),
        )(a, jnp.swapaxes(b, 1, 2), y, s, mask)
    if wrt == 0:
        grid = (g, mp // bm, kp // bk)
        in_specs = [
            pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk)),
            pl.BlockSpec((1, np_, bk), lambda gi, i, kk: (gi, 0, kk)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((1, bm, np_), lambda gi, i, kk: (gi, i, 0)),
            pl.BlockSpec((bm, 1), lambda gi, i, kk: (i, 0)),
        ]
        return pl.pallas_call(
            kernel,
            out_shape=jax.ShapeDtypeStruct((g, mp, kp), acc_dtype),
            grid=grid,
            in_specs=in_specs,
            out_specs=pl.BlockSpec((1, bm, bk), lambda gi, i, kk: (gi, i, kk)),
            name="jaxconv_semiring_grad_x",
            **_call_options(backend, 3),
        )(a, jnp.swapaxes(b, 1, 2), y, s, mask)
    # dw: rows in chunks of `red` (a multiple of bm; padded rows carry a 0 mask).
    red = min(_round_up(blocks.red, bm), mp)
    if blocks.pow2:
        red = min(_next_pow2(red), mp)
    mr = _round_up(mp, red)
    at = _pad_to(jnp.swapaxes(a, 1, 2), (g, kp, mr))
    y, s, mask = _pad_to(y, (g, mr, np_)), _pad_to(s, (g, mr, np_)), _pad_to(mask, (mr, 1))
    nred = mr // red
    kernel = functools.partial(kernel, red_total=min(red, m_total) if nred == 1 else red)
    part = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((nred, g, kp, np_), acc_dtype),
        grid=(g, kp // bk, np_ // bn, nred),
        in_specs=[
            pl.BlockSpec((1, bk, red), lambda gi, kk, j, r: (gi, kk, r)),
            pl.BlockSpec((1, bk, bn), lambda gi, kk, j, r: (gi, kk, j)),
            pl.BlockSpec((1, red, bn), lambda gi, kk, j, r: (gi, r, j)),
            pl.BlockSpec((1, red, bn), lambda gi, kk, j, r: (gi, r, j)),
            pl.BlockSpec((red, 1), lambda gi, kk, j, r: (r, 0)),
        ],
        out_specs=pl.BlockSpec((1, 1, bk, bn), lambda gi, kk, j, r: (r, gi, kk, j)),
        name="jaxconv_semiring_grad_w",
        **_call_options(backend, 4),
    )(at, b, y, s, mask)
    return part[0] if nred == 1 else jnp.sum(part, axis=0)

"""Canonical-layout helpers shared by the engines (XLA, Pallas, forward mode, packed).

Inside an engine ``x`` is ``(N, *spatial, C)`` and ``w`` is ``(*window, I, O)`` with
``C = G * I`` and ``O = G * Og`` for ``G`` feature groups (`jaxconv._src.core.geometry`). A
kernel tap reads a strided slice of the padded input; these are that slice, its transpose,
the taps-major kernel layout, batch blocking, padding and the dtype resolution that the
Pallas engine's and the packed product's direct entry points start with.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import accumulation_dtype
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.products import pad_input as pad_input
from jaxconv._src.core.products import span as span
from jaxconv._src.core.products import tap_input as tap_input
from jaxconv._src.core.products import tap_offset as tap_offset
from jaxconv._src.core.products import tap_slice as tap_slice

Array = jax.Array


def tap_slice_at(xp: Array, geom: Geometry, offset: Array, row: Any = 0,
                 rows: int | None = None) -> Array:
    """`tap_slice` at a traced ``offset`` ``(nsd,)`` (a tap inside a loop or scan), of
    ``rows`` images (default: all) from image ``row`` on.

    Args:
        xp: the padded input ``(N, *padded_spatial, C)``.
        geom: the product's geometry.
        offset: the tap's offset into the padded window, ``(nsd,)`` int32 (traced).
        row: the first image.
        rows: how many images, ``None`` for all.

    Returns:
        The tap's strided slice ``(rows, *out_spatial, C)``.
    """
    zero = jnp.zeros((), jnp.int32)
    start = (jnp.asarray(row, jnp.int32), *(offset[d] for d in range(len(geom.window))), zero)
    rows = xp.shape[0] if rows is None else rows
    xs = lax.dynamic_slice(xp, start, (rows, *span(geom), xp.shape[-1]))
    return lax.slice(xs, (0,) * xs.ndim, xs.shape, (1, *geom.strides, 1))


def tap_unslice(g: Array, geom: Geometry, tap: tuple[int, ...]) -> Array:
    """Transpose of `tap_slice`: scatters a tap's gradient back onto the padded input.

    Args:
        g: the tap's gradient ``(N, *out_spatial, C)``.
        geom: the product's geometry.
        tap: the tap's index in the window.

    Returns:
        ``g`` placed on the padded input's shape, zeros elsewhere.
    """
    cfg = [(0, 0, 0)]
    for lo, used, s, p in zip(tap_offset(geom, tap), span(geom), geom.strides,
                              geom.padded_spatial, strict=True):
        cfg.append((lo, p - lo - used, s - 1))
    cfg.append((0, 0, 0))
    return lax.pad(g, jnp.zeros((), g.dtype), cfg)


def tap_unslice_add(acc: Array, g: Array, geom: Geometry, offset: Array) -> Array:
    """``acc + tap_unslice(g)`` for a tap at a traced ``offset`` (a tap inside a loop): the
    gradient ``g`` (N, *out_spatial, C) of `tap_slice_at` added onto the padded input's
    gradient ``acc``.

    Args:
        acc: the padded input's gradient so far.
        g: the tap's gradient.
        geom: the product's geometry.
        offset: the tap's offset, ``(nsd,)`` int32 (traced).

    Returns:
        ``acc`` with ``g`` added at the tap's strided positions.
    """
    cfg = [(0, 0, 0), *((0, 0, s - 1) for s in geom.strides), (0, 0, 0)]
    spread = lax.pad(g.astype(acc.dtype), jnp.zeros((), acc.dtype), cfg)
    zero = jnp.zeros((), jnp.int32)
    start = (zero, *(offset[d] for d in range(len(geom.window))), zero)
    cur = lax.dynamic_slice(acc, start, spread.shape)
    return lax.dynamic_update_slice(acc, cur + spread, start)


def taps_major(w: Array, groups: int) -> Array:
    """``(*K, I, O) -> (T, G, Og, I)``: one ``(G, Og, I)`` kernel slice per tap.

    Args:
        w: the kernel ``(*K, I, O)``.
        groups: the number of feature groups.

    Returns:
        The kernel ``(T, G, Og, I)``, ``T`` the number of taps.
    """
    *k, i, o = w.shape
    return w.reshape(math.prod(k), i, groups, o // groups).transpose(0, 2, 3, 1)


def taps_major_transpose(gt: Array, w_shape: tuple[int, ...], groups: int) -> Array:
    """Inverse of `taps_major`: ``(T, G, Og, I) -> w_shape``.

    Args:
        gt: a kernel (or its gradient) ``(T, G, Og, I)``.
        w_shape: the kernel's shape ``(*K, I, O)``.
        groups: the number of feature groups (implied by ``gt``'s shape).

    Returns:
        ``gt`` in the kernel's shape.
    """
    del groups  # implied by gt's shape; kept for symmetry with taps_major
    return gt.transpose(0, 3, 1, 2).reshape(w_shape)


def pad_rows(x: Array, block: int) -> tuple[Array, int]:
    """``x`` with zero rows appended up to a multiple of ``block`` rows, and ``N``.

    Args:
        x: an array ``(N, ...)``.
        block: the block's number of rows.

    Returns:
        The padded array and ``N``.
    """
    n = x.shape[0]
    pad = -(-n // block) * block - n
    if pad:
        x = jnp.concatenate([x, jnp.zeros((pad, *x.shape[1:]), x.dtype)], axis=0)
    return x, n


def blocks(x: Array, block: int) -> tuple[Array, int]:
    """``(N, ...) -> (ceil(N / block), block, ...)`` (zero rows pad the last block), ``N``.

    Args:
        x: an array ``(N, ...)``.
        block: the block's number of rows.

    Returns:
        The blocked array and ``N``.
    """
    x, n = pad_rows(x, block)
    return x.reshape(-1, block, *x.shape[1:]), n


def unblock(y: Array, n: int) -> Array:
    """Inverse of `blocks`: ``(B, block, ...) -> (n, ...)``.

    Args:
        y: a blocked array ``(B, block, ...)``.
        n: the number of rows to keep.

    Returns:
        The first ``n`` rows, ``(n, ...)``.
    """
    return y.reshape(-1, *y.shape[2:])[:n]


def resolve_dtypes(
    x: Array, w: Array, op: Op, preferred_element_type: Any | None
) -> tuple[Array, Array, Any, Any]:
    """The dtype prologue of a direct engine call (Pallas ``generic_conv``).

    Returns ``x`` and ``w`` cast to their common dtype, the output dtype
    (``preferred_element_type`` or the common dtype) and the accumulation dtype
    (`capabilities.accumulation_dtype`).

    Args:
        x: the input.
        w: the kernel.
        op: the op (its accumulation dtype).
        preferred_element_type: the output dtype asked for, or ``None``.

    Returns:
        ``(x, w, out_dtype, acc_dtype)``.
    """
    dtype = jnp.result_type(x.dtype, w.dtype)
    out_dtype = dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
    acc_dtype = jnp.dtype(accumulation_dtype(op, dtype, preferred_element_type))
    return x.astype(dtype), w.astype(dtype), out_dtype, acc_dtype


def finish(y: Array, op: Op, out_dtype: Any) -> Array:
    """The epilogue of a direct engine call: ``op.post`` (if any), then the output dtype.

    Args:
        y: the accumulated result.
        op: the op (its ``post``).
        out_dtype: the output dtype.

    Returns:
        The output.
    """
    if op.post is not None:
        y = op.post(y)
    return y.astype(out_dtype)

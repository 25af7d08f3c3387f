"""The NaN of AdderNet's input gradient that the AVX-512 kernels' clip drops.

The native kernels clip ``w - x`` to ``[-1, 1]`` with one ``vrangeps`` on AVX-512 (one
instruction on the add ports, where ``min(max())`` takes two), and on Zen 4 it returns ``+-1``
for a NaN: ``dX = sum g * clip(w - x, -1, 1)`` then lost the NaN that the rule, written with
``jnp.clip`` (and the XLA engine, and the AVX2 / base builds), gives wherever a term's
difference is NaN. It is restored here, only where the kernel gradient is not finite.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import products
from jaxconv._src.core.geometry import Geometry

Array = jax.Array


def _nan_cells(
    geom: Geometry, x: Array, w: Array, out_shape: tuple[int, ...], zero: Array
) -> Array:
    """Which input cells ``(N, *S, C)`` meet a NaN difference ``w - x`` in some term: a NaN
    ``x`` read by some output, a NaN ``w`` at a tap that reads the cell, or ``x`` and ``w``
    the same infinity.

    ``reach(b)`` counts, per cell and input channel, the entries of ``b`` (a kernel-shaped
    0/1 indicator) at the taps and output channels that read it: the transpose of a standard
    product, with ones as its cotangent (finite values only, so no ``0 * inf``).

    Args:
        geom: the product's geometry.
        x: the input.
        w: the kernel.
        out_shape: the output's shape.
        zero: a float32 0 that XLA cannot fold, added to the constant cotangent so that no
            product is loop-invariant (XLA would hoist it out of the loop and always run
            it: the one of a ones kernel cost 45 ms on layer A, 1.5x the backward).

    Returns:
        A bool array shaped as ``x``.
    """
    f32 = jnp.float32
    ones = jnp.ones(out_shape, f32) + zero

    def reach(b: Array) -> Array:
        _, vjp = jax.vjp(lambda a: products.standard(a, b, geom), jnp.zeros(x.shape, f32))
        return vjp(ones)[0] > 0

    return (
        (jnp.isnan(x) & reach(jnp.ones(w.shape, f32)))
        | reach(jnp.isnan(w).astype(f32))
        | ((x == jnp.inf) & reach((w == jnp.inf).astype(f32)))
        | ((x == -jnp.inf) & reach((w == -jnp.inf).astype(f32)))
    )


def restore_input_nan(
    geom: Geometry, x: Array, w: Array, gx: Array, gw: Array, out_shape: tuple[int, ...]
) -> Array:
    """``gx`` (AdderNet's input gradient from the native kernel) with NaN where a term's
    ``clip(w - x, -1, 1)`` is NaN (`_nan_cells`).

    A NaN difference ``w - x`` also makes its term of the kernel gradient ``g (x - w)`` NaN,
    and ``gw`` can hold a NaN or an infinity only where an operand (or the cotangent) is not
    finite: so one ``isfinite`` reduction of ``gw`` (the kernel's size) decides, and the
    cells are found and set inside a ``while_loop`` that runs its body once where ``gw`` is
    not finite and else not at all (a ``cond`` would run both branches under ``vmap``).

    Args:
        geom: the product's geometry.
        x: the input (float32, canonical).
        w: the kernel (float32, canonical).
        gx: the kernel's input gradient, shaped as ``x``.
        gw: the kernel gradient (the native kernel's or the separable one).
        out_shape: the output's shape.

    Returns:
        The input gradient.
    """
    needed = jnp.logical_not(jnp.all(jnp.isfinite(gw)))

    def body(carry: tuple[Array, Array]) -> tuple[Array, Array]:
        # ``+ 0 * i`` keeps the work inside the loop: XLA hoists loop-invariant code out.
        z = carry[0].astype(x.dtype) * jnp.asarray(0, x.dtype)
        cells = _nan_cells(geom, x + z, w + z, out_shape, z.astype(jnp.float32))
        return carry[0] + 1, jnp.where(cells, jnp.asarray(jnp.nan, gx.dtype), carry[1])

    _, gx = lax.while_loop(lambda c: (c[0] == 0) & needed, body, (jnp.int32(0), gx))
    return gx

"""Standard (multiply-and-add) products on the canonical layout, in `lax`, for every engine.

Each engine, the per-example rule of `jaxconv._src.core.primitive` and the rewrites use these
rather than their own copies:

- `standard`: the standard product of a geometry (its padding and dilations); `padded`: the
  same on an input already padded (`pad_input`); a dense problem (no spatial dimensions) is
  a batched matrix product;
- `rewritten`: an op's native rewrite (``op.rewrite(product, x, w)``) on those products;
- the separable gradients of the sums whose terms are ``x * w`` (``"mul"``), ``x - w``
  (``"adder"``: AdderNet, l1) or ``(x - w) ** 2`` (``"sqdiff"``: l2): `separable_gradients`
  (the kernel side, and both sides for ``"mul"``) and `difference_input_gradient` (the input
  side of ``sum g * (x - w)``).

The products run at ``HIGHEST`` precision unless a problem says otherwise: they stand for
exact float sums.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem

Array = jax.Array

_HIGHEST = lax.Precision.HIGHEST


def dimension_numbers(nsd: int) -> lax.ConvDimensionNumbers:
    """The canonical layouts' dimension numbers: ``(N, *S, C)``, ``(*K, I, O)``.

    Example:
      >>> dimension_numbers(2).lhs_spec
      (0, 3, 1, 2)
    """
    spatial = tuple(range(1, nsd + 1))
    return lax.ConvDimensionNumbers(lhs_spec=(0, nsd + 1, *spatial),
                                    rhs_spec=(nsd + 1, nsd, *range(nsd)),
                                    out_spec=(0, nsd + 1, *spatial))


def pad_input(x: Array, op: Op, geom: Geometry, fill: Any = None) -> Array:
    """Pads ``(N, *S, C)`` and inserts the ``lhs_dilation`` holes.

    ``fill`` defaults to ``op.pad_value``, or 0 with identity padding (the padded taps are
    then masked, and 0 keeps ``combine`` finite there).
    """
    if fill is None:
        fill = 0 if op.pad_value is None else op.pad_value
    return lax.pad(x, jnp.asarray(fill, x.dtype), geom.pad_config)


def _dense(x: Array, w: Array, groups: int, out_dtype: Any, precision: Any) -> Array:
    n = x.shape[0]
    return jnp.einsum("ngi,igo->ngo", x.reshape(n, groups, -1),
                      w.reshape(w.shape[0], groups, -1), precision=precision,
                      preferred_element_type=out_dtype).reshape(n, -1)


def padded(xp: Array, w: Array, geom: Geometry, out_dtype: Any = None) -> Array:
    """The standard product of the padded input ``xp`` (N, *padded, C) and ``w`` (*K, I, O):
    ``(N, *out_spatial, O)`` (a dense product when there are no spatial dimensions)."""
    nsd = len(geom.window)
    if nsd == 0:
        return _dense(xp, w, geom.groups, out_dtype, _HIGHEST)
    return lax.conv_general_dilated(
        xp, w, geom.strides, [(0, 0)] * nsd, None, geom.rhs_dilation,
        dimension_numbers(nsd), geom.groups, precision=_HIGHEST,
        preferred_element_type=out_dtype)


def standard(x: Array, w: Array, geom: Geometry, out_dtype: Any = None) -> Array:
    """The standard product of ``x`` (N, *S, C) and ``w`` (*K, I, O) with the geometry's
    padding and dilations (zero padding): ``(N, *out_spatial, O)``."""
    nsd = len(geom.window)
    if nsd == 0:
        return _dense(x, w, geom.groups, out_dtype, _HIGHEST)
    return lax.conv_general_dilated(
        x, w, geom.strides, geom.padding, geom.lhs_dilation, geom.rhs_dilation,
        dimension_numbers(nsd), geom.groups, precision=_HIGHEST,
        preferred_element_type=out_dtype)


def rewritten(problem: Problem, x: Array, w: Array) -> Array:
    """An op's native rewrite (``op.rewrite(product, x, w)``, e.g. ``xnor``, ``l2``) with
    ``product`` the standard convolution of this geometry in the canonical layout (a batched
    matrix product ``(G, M, K) x (K, G, N)`` for a dense problem); a pad value is written into
    the input first, so that the product's zero padding is the sum's identity."""
    op, geom = problem.op, problem.geom
    nsd = len(geom.window)
    kw = dict(precision=problem.precision, preferred_element_type=problem.acc_dtype)
    if nsd == 0:
        m, g = x.shape[0], geom.groups
        product = functools.partial(
            lax.dot_general, dimension_numbers=(((2,), (0,)), ((1,), (1,))), **kw)
        y = op.rewrite(product, x.reshape(m, g, -1), w.reshape(w.shape[0], g, -1))
        return jnp.transpose(y, (1, 0, 2)).reshape(m, -1).astype(problem.acc_dtype)
    pads, lhs_dil = geom.padding, geom.lhs_dilation
    if op.pad_value is not None and (any(lo or hi for lo, hi in pads)
                                     or any(d != 1 for d in lhs_dil)):
        x = pad_input(x, op, geom)
        pads, lhs_dil = ((0, 0),) * nsd, (1,) * nsd
    product = functools.partial(
        lax.conv_general_dilated, window_strides=geom.strides, padding=pads,
        lhs_dilation=lhs_dil, rhs_dilation=geom.rhs_dilation,
        dimension_numbers=dimension_numbers(nsd),
        feature_group_count=geom.groups, **kw)
    return op.rewrite(product, x, w).astype(problem.acc_dtype)


def separable_gradients(op: Op, geom: Geometry, acc: Any, kind: str, x: Array, w: Array,
                        gy: Array) -> tuple[Array | None, Array]:
    """The kernel gradient of a separable sum (and the input gradient for ``"mul"``;
    ``None`` for ``"adder"``, whose clipped input rule is not separable, and for
    ``"sqdiff"``, whose input gradient is `difference_input_gradient`).

    Args:
      op: the product (its pad value).
      geom: the canonical geometry.
      acc: the accumulation dtype.
      kind: ``"mul"``, ``"adder"`` or ``"sqdiff"``.
      x: ``(N, *S, C)``.
      w: ``(*K, I, O)``.
      gy: the output cotangent, ``(N, *out_spatial, O)`` in any shape of that size.

    Returns:
      ``(gx or None, gw)`` in the operands' dtypes.
    """
    # Padded cells hold the pad value (0 for identity padding: no contribution to sum g*x).
    xp = pad_input(x, op, geom).astype(acc)
    n = x.shape[0]
    g4 = gy.astype(acc).reshape(n, *geom.out_spatial, w.shape[-1])
    _, vjp = jax.vjp(functools.partial(padded, geom=geom), xp, w.astype(acc))
    gxp, gw = vjp(g4)
    if kind == "mul":
        _, pad_vjp = jax.vjp(lambda a: pad_input(a, op, geom), x)
        return pad_vjp(gxp.astype(x.dtype))[0], gw.astype(w.dtype)
    # adder (sqdiff: twice that): minus w times the sum of the cotangent over the positions
    # each tap sees.
    p = max(1, math.prod(geom.out_spatial))
    gsum = jnp.sum(gy.astype(acc).reshape(n, p, -1), axis=0)  # (P, O)
    mask = geom.valid_mask() if op.pad_value is None else None
    if mask is None:
        s = jnp.broadcast_to(jnp.sum(gsum, axis=0), (len(geom.taps()), gsum.shape[-1]))
    else:
        masks = np.stack([geom.tap_mask(mask, tap).reshape(p) for tap in geom.taps()])
        s = jnp.asarray(masks, acc) @ gsum  # (T, O)
    s = s.reshape(*geom.window, 1, w.shape[-1])
    gw = gw - w.astype(acc) * s
    return None, (2 * gw if kind == "sqdiff" else gw).astype(w.dtype)


def separable_kernel_gradient(problem: Problem, kind: str, x: Array, w: Array,
                              g: Array) -> Array:
    """The kernel gradient of a separable sum, in standard products (`separable_gradients`).

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from jaxconv import ops
      >>> geom = Geometry((3,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> p = Problem(ops.adder, geom, "auto", np.dtype("float32"), 2**20)
      >>> x, w = jnp.arange(3.0).reshape(1, 3, 1), jnp.zeros((2, 1, 1))
      >>> separable_kernel_gradient(p, "adder", x, w, jnp.ones((1, 2, 1)))[:, 0, 0]
      Array([1., 3.], dtype=float32)
    """
    return separable_gradients(problem.op, problem.geom, jnp.dtype(problem.acc_dtype), kind,
                               x, w, g)[1]


def difference_input_gradient(op: Op, geom: Geometry, x: Array, w: Array, g: Array) -> Array:
    """``sum g[p, o] * (x[cell, i] - w[t, i, o])`` over the outputs that read each cell: the
    input gradient of the sum of ``x - w`` terms (twice it is l2's), in standard products:
    ``x`` times the cotangent summed over those outputs, minus the standard input gradient.

    Args:
      op: the product (unused cells of a pad value are not input cells).
      geom: the canonical geometry.
      x: ``(N, *S, C)``.
      w: ``(*K, I, O)``.
      g: the output cotangent ``(N, *out_spatial, O)``.

    Returns:
      ``(N, *S, C)``.
    """
    del op
    grp = geom.groups
    _, vjp = jax.vjp(lambda x_: standard(x_, w, geom), x)
    (prod,) = vjp(g)
    xg = jnp.zeros((*x.shape[:-1], grp), x.dtype)
    ones = jnp.ones((*w.shape[:-2], 1, w.shape[-1]), w.dtype)
    _, vjp = jax.vjp(lambda x_: standard(x_, ones, geom), xg)
    (gsum,) = vjp(g)
    return x * jnp.repeat(gsum, x.shape[-1] // grp, axis=-1) - prod

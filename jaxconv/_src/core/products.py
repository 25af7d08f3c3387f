"""Standard (multiply-and-add) products on the canonical layout, in `lax`, for every engine.

Each engine, the per-example rule of `jaxconv._src.core.batching` and the rewrites use these
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

import dataclasses
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

    Args:
      nsd: the number of spatial dimensions.

    Returns:
      The dimension numbers of ``lax.conv_general_dilated`` for the canonical layouts.

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

    Args:
        x: the input ``(N, *S, C)``.
        op: the op (its ``pad_value``).
        geom: the product's geometry (its padding and input dilation).
        fill: the padding value, ``None`` for the default above.

    Returns:
        The padded input ``(N, *padded_spatial, C)``.
    """
    if fill is None:
        fill = 0 if op.pad_value is None else op.pad_value
    return lax.pad(x, jnp.asarray(fill, x.dtype), geom.pad_config)


def span(geom: Geometry) -> tuple[int, ...]:
    """Extent of one tap's strided slice in the padded input, per spatial dimension.

    Args:
        geom: the product's geometry.

    Returns:
        The slice's extent per spatial dimension.
    """
    return tuple((o - 1) * s + 1 for o, s in zip(geom.out_spatial, geom.strides, strict=True))


def tap_offset(geom: Geometry, tap: tuple[int, ...]) -> tuple[int, ...]:
    """Where tap ``tap`` starts in the padded input.

    Args:
        geom: the product's geometry.
        tap: the tap's index in the window.

    Returns:
        Its offset per spatial dimension.
    """
    return tuple(k * d for k, d in zip(tap, geom.rhs_dilation, strict=True))


def tap_slice(xp: Array, geom: Geometry, tap: tuple[int, ...]) -> Array:
    """The cells of padded ``xp`` that tap ``tap`` reads for every output position.

    ``(N, *padded, C) -> (N, *out_spatial, C)``: a static strided slice.

    Args:
        xp: the padded input.
        geom: the product's geometry.
        tap: the tap's index in the window.

    Returns:
        The tap's slice ``(N, *out_spatial, C)``.
    """
    lo = tap_offset(geom, tap)
    hi = tuple(s + e for s, e in zip(lo, span(geom), strict=True))
    return lax.slice(xp, (0, *lo, 0), (xp.shape[0], *hi, xp.shape[-1]),
                     (1, *geom.strides, 1))


def tap_input(xp: Array, geom: Geometry, tap: tuple[int, ...], groups: int) -> Array:
    """One tap's input as ``(N, P, G, I)``: `tap_slice` with the positions flattened
    and the channels split into groups.

    Args:
        xp: the padded input.
        geom: the product's geometry.
        tap: the tap's index in the window.
        groups: the number of feature groups.

    Returns:
        The tap's input ``(N, P, G, I)``.
    """
    xs = tap_slice(xp, geom, tap)
    n, c = xs.shape[0], xs.shape[-1]
    return xs.reshape(n, max(1, math.prod(xs.shape[1:-1])), groups, c // groups)


def _dense(x: Array, w: Array, groups: int, out_dtype: Any, precision: Any) -> Array:
    """A grouped dense product ``(N, G*I) x (I, G*O) -> (N, G*O)`` (no spatial dimensions).

    Args:
        x: the input ``(N, G*I)``.
        w: the kernel ``(I, G*O)``.
        groups: the number of feature groups.
        out_dtype: the accumulation and output dtype, ``None`` for the default.
        precision: lax's precision.

    Returns:
        The product ``(N, G*O)``.
    """
    n = x.shape[0]
    if groups == 1:
        # One plain matrix product: the einsum's size-1 group axis made XLA copy the kernel
        # transposed for the input gradient and transpose the kernel gradient (two 4 MiB
        # copies on a 1024 x 1024 kernel; l2_exact's dense backward, ~10% of its time).
        return lax.dot_general(x, w, (((1,), (0,)), ((), ())), precision=precision,
                               preferred_element_type=out_dtype)
    return jnp.einsum("ngi,igo->ngo", x.reshape(n, groups, -1),
                      w.reshape(w.shape[0], groups, -1), precision=precision,
                      preferred_element_type=out_dtype).reshape(n, -1)


def _highest(x: Array, w: Array, geom: Geometry, padding: Any, lhs_dilation: Any,
             out_dtype: Any) -> Array:
    """The standard product at lax's highest precision with the geometry's strides, kernel
    dilation and groups, and the given padding and input dilation (a grouped dense product
    when there are no spatial dimensions).

    Args:
        x: the input ``(N, *S, C)``.
        w: the kernel ``(*K, I, O)``.
        geom: the product's geometry.
        padding: lax's ``(low, high)`` pairs.
        lhs_dilation: lax's input dilation (``None``: none).
        out_dtype: the output dtype, ``None`` for the default.

    Returns:
        The product ``(N, *out_spatial, O)``.
    """
    nsd = len(geom.window)
    if nsd == 0:
        return _dense(x, w, geom.groups, out_dtype, _HIGHEST)
    return lax.conv_general_dilated(
        x, w, geom.strides, padding, lhs_dilation, geom.rhs_dilation, dimension_numbers(nsd),
        geom.groups, precision=_HIGHEST, preferred_element_type=out_dtype)


def padded(xp: Array, w: Array, geom: Geometry, out_dtype: Any = None) -> Array:
    """The standard product of the padded input ``xp`` (N, *padded, C) and ``w`` (*K, I, O):
    ``(N, *out_spatial, O)`` (a dense product when there are no spatial dimensions).

    Args:
        xp: the padded input.
        w: the kernel.
        geom: the product's geometry.
        out_dtype: the output dtype, ``None`` for the default.

    Returns:
        The product ``(N, *out_spatial, O)``.
    """
    return _highest(xp, w, geom, [(0, 0)] * len(geom.window), None, out_dtype)


def standard(x: Array, w: Array, geom: Geometry, out_dtype: Any = None) -> Array:
    """The standard product of ``x`` (N, *S, C) and ``w`` (*K, I, O) with the geometry's
    padding and dilations (zero padding): ``(N, *out_spatial, O)``.

    Args:
        x: the input.
        w: the kernel.
        geom: the product's geometry.
        out_dtype: the output dtype, ``None`` for the default.

    Returns:
        The product ``(N, *out_spatial, O)``.
    """
    return _highest(x, w, geom, geom.padding, geom.lhs_dilation, out_dtype)


def rewritten(problem: Problem, x: Array, w: Array, per_example: bool = False) -> Array:
    """An op's native rewrite (``op.rewrite(product, x, w)``, e.g. ``xnor``, ``l2``) with
    ``product`` the standard convolution of this geometry in the canonical layout (a batched
    matrix product ``(G, M, K) x (K, G, N)`` for a dense problem); a pad value is written into
    the input first, so that the product's zero padding is the sum's identity.

    ``per_example``: the call is ``jax.vmap``-ed over examples with a shared kernel; the
    product's kernel gradient then partitions over sharded examples (`_per_example_product`).

    Args:
        problem: the canonical problem (its op, geometry, precision and accumulation dtype).
        x: the input in the canonical layout.
        w: the kernel in the canonical layout.
        per_example: whether the call is batched over examples with a shared kernel.

    Returns:
        The op's product ``(N, *out_spatial, O)``.
    """
    op, geom = problem.op, problem.geom
    nsd = len(geom.window)
    kw = dict(precision=problem.precision, preferred_element_type=problem.acc_dtype)
    if nsd == 0:
        m, g = x.shape[0], geom.groups
        product = functools.partial(
            _widened_on_cpu, dimension_numbers=(((2,), (0,)), ((1,), (1,))), **kw)
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
    if per_example:
        product = _per_example_product(product, dataclasses.replace(
            geom, padding=tuple(pads), lhs_dilation=tuple(lhs_dil)))
    return op.rewrite(product, x, w).astype(problem.acc_dtype)


def _widened_on_cpu(a: Array, b: Array, **kw: Any) -> Array:
    """``lax.dot_general(a, b, **kw)``; on CPU, bf16 / f16 operands of a wider float
    accumulation are converted to it first.

    XLA CPU's dot thunk has no kernel for ``bf16 x bf16 -> f32`` (nor f16): where its fusion
    keeps such a batched dot (``xnor``'s dense rewrite on transposed operands, ``jit`` of a
    17x63 by 63x65 ``dot_general`` contracting the first axis), the call failed at run time
    with ``UNIMPLEMENTED: Unsupported element type for DotThunk::Execute``. The products of
    two bf16 / f16 numbers are exact in float32, so the converted product has the same terms;
    other platforms keep their narrow dots.

    Args:
        a: the left operand.
        b: the right operand.
        **kw: ``lax.dot_general``'s keyword arguments.

    Returns:
        The product.
    """
    acc = kw.get("preferred_element_type")
    plain = functools.partial(lax.dot_general, **kw)
    narrow = [v.dtype for v in (a, b) if jnp.issubdtype(v.dtype, jnp.floating)
              and acc is not None and jnp.issubdtype(acc, jnp.floating)
              and jnp.finfo(v.dtype).bits < jnp.finfo(acc).bits]
    if not narrow:
        return plain(a, b)
    return lax.platform_dependent(
        a, b, cpu=lambda u, v: plain(u.astype(acc), v.astype(acc)), default=plain)


def _valid_geometry(geom: Geometry, padded_spatial: tuple[int, ...]) -> Geometry:
    """``geom`` on an input already padded (and dilated) to ``padded_spatial``."""
    nsd = len(geom.window)
    return Geometry(tuple(padded_spatial), geom.window, geom.strides, ((0, 0),) * nsd,
                    (1,) * nsd, geom.rhs_dilation, geom.groups)


def per_example_kernel_grad(xp: Array, ct: Array, geom: Geometry, acc: Any) -> Array:
    """The kernel gradients of the standard valid product, one per example: ``xp`` (B, N,
    *padded, C) and the cotangent ``ct`` (B, N, *out_spatial, O) -> (B, *window, I, O).

    Per tap, one matrix product with the examples as its batch dimension. (``jax.vmap`` of
    the product's kernel gradient is a convolution with one feature group per example,
    which XLA's SPMD partitioner gets wrong when the examples are sharded: measured on
    jax 0.10 with 8 CPU devices, Shardy returned the first device's examples right and the
    others wrong, and GSPMD failed to compile. A matrix product's batch dimension
    partitions like the batch.)

    Args:
        xp: the padded inputs ``(B, N, *padded, C)``.
        ct: the cotangents ``(B, N, *out_spatial, O)``.
        geom: the product's geometry.
        acc: the accumulation dtype.

    Returns:
        The kernel gradients ``(B, *window, I, O)``.
    """
    b, n = xp.shape[:2]
    vg = _valid_geometry(geom, xp.shape[2:-1])
    g = geom.groups
    p = max(1, math.prod(geom.out_spatial))
    flat = xp.reshape(b * n, *xp.shape[2:])
    cts = ct.reshape(b, n * p, g, -1)
    parts = []
    for tap in vg.taps():
        xs = tap_input(flat, vg, tap, g).reshape(b, n * p, g, -1)
        parts.append(jnp.einsum("bmgi,bmgo->bigo", xs, cts, precision=_HIGHEST,
                                preferred_element_type=acc))
    out = jnp.stack(parts, axis=1)  # (B, T, I, G, Og)
    return out.reshape(b, *geom.window, out.shape[2], g * out.shape[-1])


@functools.lru_cache(maxsize=256)
def _kernel_grad_fn(geom: Geometry, w_shape: tuple[int, ...], acc: Any) -> Any:
    """``(xp, ct) -> gw``, the kernel gradient of `padded` (``xp`` padded), batched by
    `per_example_kernel_grad` under ``jax.vmap``.

    Args:
        geom: the product's geometry.
        w_shape: the kernel's shape.
        acc: the accumulation dtype.

    Returns:
        The gradient function, cached per arguments.
    """
    acc = jnp.dtype(acc)

    @jax.custom_batching.custom_vmap
    def grad(xp: Array, ct: Array) -> Array:
        _, vjp = jax.vjp(lambda b: padded(xp, b, geom, acc), jnp.zeros(w_shape, acc))
        return vjp(ct.astype(acc))[0]

    @grad.def_vmap
    def rule(size: int, batched: list[bool], xp: Array, ct: Array) -> tuple[Array, bool]:
        xp, ct = (a if on else jnp.broadcast_to(a, (size, *a.shape))
                  for a, on in zip((xp, ct), batched, strict=True))
        return per_example_kernel_grad(xp, ct, geom, acc), True

    return grad


def _per_example_product(product: Any, geom: Geometry) -> Any:
    """``product`` (a standard convolution of ``geom``, padding included) whose kernel
    gradient is `_kernel_grad_fn`'s: under ``jax.vmap`` (per-example gradients) one matrix
    product per tap with the examples as its batch dimension, which XLA partitions over
    sharded examples (see `per_example_kernel_grad`).

    Args:
        product: the standard convolution ``(lhs, rhs) -> y``.
        geom: its geometry.

    Returns:
        ``product`` with that kernel gradient, as a ``jax.custom_vjp``.
    """

    @jax.custom_vjp
    def prod(lhs: Array, rhs: Array) -> Array:
        return product(lhs, rhs)

    def fwd(lhs: Array, rhs: Array) -> tuple[Array, tuple[Array, Array]]:
        return product(lhs, rhs), (lhs, rhs)

    def bwd(res: tuple[Array, Array], ct: Array) -> tuple[Array, Array]:
        lhs, rhs = res
        _, vjp = jax.vjp(lambda a: product(a, rhs), lhs)
        pgeom = dataclasses.replace(geom, in_spatial=tuple(lhs.shape[1:-1]))
        lp = lax.pad(lhs, jnp.asarray(0, lhs.dtype), pgeom.pad_config)
        acc = jnp.promote_types(ct.dtype, jnp.float32)
        grhs = _kernel_grad_fn(pgeom, tuple(rhs.shape), acc)(lp, ct)
        return vjp(ct)[0], grhs.astype(rhs.dtype)

    prod.defvjp(fwd, bwd)
    return prod


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
    return None, _adder_terms(op, geom, acc, kind, w, g4, gw)


def _adder_terms(op: Op, geom: Geometry, acc: Any, kind: str, w: Array, gy: Array,
                 gw: Array) -> Array:
    """A separable kernel gradient from the standard product's ``gw``: itself for ``"mul"``;
    for ``"adder"`` (``"sqdiff"``: twice that) minus ``w`` times the sum of the cotangent
    ``gy`` over the positions each tap sees.

    Args:
        op: the op (its pad value decides whether padded taps count).
        geom: the product's geometry.
        acc: the accumulation dtype.
        kind: ``"mul"``, ``"adder"`` or ``"sqdiff"``.
        w: the kernel.
        gy: the output's cotangent.
        gw: the standard product's kernel gradient.

    Returns:
        The op's kernel gradient, in ``w``'s dtype.
    """
    if kind == "mul":
        return gw.astype(w.dtype)
    n = gy.shape[0]
    p = max(1, math.prod(geom.out_spatial))
    g3 = gy.astype(acc).reshape(n, p, -1)
    # Per position and output channel: the cotangent's sum, and how many are > 0, < 0, any.
    sums = jnp.stack([jnp.sum(g3, axis=0), jnp.sum(g3 > 0, axis=0, dtype=acc),
                      jnp.sum(g3 < 0, axis=0, dtype=acc),
                      jnp.full(g3.shape[1:], n, acc)])  # (4, P, O)
    mask = geom.valid_mask() if op.pad_value is None else None
    if mask is None:
        per_tap = jnp.broadcast_to(jnp.sum(sums, axis=1, keepdims=True),
                                   (4, len(geom.taps()), g3.shape[-1]))
    else:
        masks = np.stack([geom.tap_mask(mask, tap).reshape(p) for tap in geom.taps()])
        per_tap = jnp.asarray(masks, acc) @ sums  # (4, T, O)
    s, pos, neg, total = per_tap.reshape(4, *geom.window, 1, w.shape[-1])
    wa = w.astype(acc)
    gw = gw - wa * s
    # An infinite w makes each term g (x - w) an infinity of the sign of -g w (NaN at g = 0),
    # so their sum is NaN where the cotangents its tap meets hold both signs or a zero; the
    # form above would give +-inf (finite - w * sum g). A tap that meets no term (negative
    # padding, dilation) has no term to sum: 0 whatever w holds, where the form gives
    # NaN * 0 for a NaN or infinite w.
    mixed = (pos < total) & (neg < total)
    gw = jnp.where(jnp.isinf(wa) & mixed, jnp.nan, gw)
    gw = jnp.where(~jnp.isfinite(wa) & (total == 0), 0, gw)
    return (2 * gw if kind == "sqdiff" else gw).astype(w.dtype)


def separable_kernel_gradient(problem: Problem, kind: str, x: Array, w: Array,
                              g: Array) -> Array:
    """The kernel gradient of a separable sum, in standard products (`separable_gradients`),
    for per-example gradients: under ``jax.vmap`` the product's kernel gradient is
    `per_example_kernel_grad`, which partitions over sharded examples.

    Args:
      problem: the canonical problem.
      kind: ``"mul"``, ``"adder"`` or ``"sqdiff"`` (`capabilities.Capabilities.separable`).
      x: the canonical input.
      w: the canonical kernel.
      g: the output's cotangent.

    Returns:
      The kernel gradient, in ``w``'s dtype.

    Example:
      >>> import jax.numpy as jnp, numpy as np
      >>> from jaxconv import ops
      >>> geom = Geometry((3,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> p = Problem(ops.adder, geom, "auto", np.dtype("float32"), 2**20)
      >>> x, w = jnp.arange(3.0).reshape(1, 3, 1), jnp.zeros((2, 1, 1))
      >>> separable_kernel_gradient(p, "adder", x, w, jnp.ones((1, 2, 1)))[:, 0, 0]
      Array([1., 3.], dtype=float32)
    """
    op, geom, acc = problem.op, problem.geom, jnp.dtype(problem.acc_dtype)
    xp = pad_input(x, op, geom).astype(acc)
    g4 = g.astype(acc).reshape(x.shape[0], *geom.out_spatial, w.shape[-1])
    gw = _kernel_grad_fn(geom, tuple(w.shape), acc)(xp, g4)
    return _adder_terms(op, geom, acc, kind, w, g4, gw)


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

"""``conv_general_dilated`` and ``dot_general`` with lax's signatures and any ``Op``."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import canonical, validation
from jaxconv._src.core.algebra import Op, identity_value
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.ops import resolve, standard

Array = jax.Array


def with_out_sharding(y: Array, out_sharding: Any) -> Array:
    """``y`` constrained to ``out_sharding`` (checked first), or ``y`` when it is ``None``.

    Args:
        y: a product's output.
        out_sharding: the ``out_sharding`` given (``None``, a sharding or a
            ``PartitionSpec``).

    Returns:
        ``y``, with a sharding constraint unless ``out_sharding`` is ``None``.

    Raises:
        ValueError: ``out_sharding`` does not fit (`validation.out_sharding`).
    """
    if out_sharding is None:
        return y
    validation.out_sharding(out_sharding, y.shape)
    return jax.lax.with_sharding_constraint(y, out_sharding)


def _common_options(
    op: Op, lhs: Array, rhs: Array, engine: Any, max_block_bytes: Any,
    preferred_element_type: Any, precision: Any,
) -> tuple[str, int, Any]:
    """Validates the options both products share: ``(engine, max_block_bytes, pet)``.

    Args:
        op: the op (generic or the standard product).
        lhs: the left operand.
        rhs: the right operand.
        engine: the ``engine`` given.
        max_block_bytes: the ``max_block_bytes`` given.
        preferred_element_type: the ``preferred_element_type`` given.
        precision: the ``precision`` given.

    Returns:
        The engine's name, the block bound and the output dtype (or ``None``).

    Raises:
        TypeError, ValueError: an option that is not allowed; the message names it.
    """
    engine = validation.engine_name(engine)
    mbb = validation.max_block_bytes(max_block_bytes)
    preferred_element_type = validation.preferred_element_type(
        preferred_element_type, lhs, rhs, generic=not op.lax_product)
    validation.precision(precision)
    return engine, mbb, preferred_element_type


def _empty_contraction(op: Op, shape: tuple[int, ...], lhs: Array, rhs: Array,
                       preferred_element_type: Any, out_sharding: Any) -> Array:
    """The result of reducing over nothing: the reduce's identity (then ``op.post``).

    Args:
        op: the op.
        shape: the output's shape.
        lhs: the left operand.
        rhs: the right operand.
        preferred_element_type: the output dtype, ``None`` for the operands' common one.
        out_sharding: the output's sharding, ``None`` for none.

    Returns:
        The output filled with the identity.
    """
    dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    y = jnp.full(shape, identity_value(op, dtype), dtype)
    if op.post is not None:
        y = op.post(y)
    return with_out_sharding(y, out_sharding)


def conv_general_dilated(
    lhs: Any,
    rhs: Any,
    window_strides: Any,
    padding: Any,
    lhs_dilation: Any = None,
    rhs_dilation: Any = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
    *,
    op: Op | str = standard,
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """General dilated convolution whose product is ``op``.

    Same arguments, defaults and output shape as `jax.lax.conv_general_dilated`
    (1-, 2- and 3-D, any ``dimension_numbers``, string or explicit padding, strides, both
    dilations, feature groups); ``op`` replaces multiply-and-add:

    ```python
    out[n, o, co] = REDUCE_{k, ci} op.combine(x[n, o*stride + k*dilation - pad_lo, ci],
                                              w[k, ci, co])
    ```

    An empty contraction (zero input channels) gives the reduce's identity everywhere, for
    every op: 0 for sums (as lax), ``-inf`` for ``max_plus`` and ``log``, ``+inf`` for
    ``min_plus``.

    Args:
      lhs: input, laid out as ``dimension_numbers[0]`` (default ``NC...``).
      rhs: kernel, laid out as ``dimension_numbers[1]`` (default ``OI...``).
      window_strides: one stride per spatial dimension.
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)`` pairs.
      lhs_dilation: input dilation (holes are treated exactly like padding).
      rhs_dilation: kernel dilation.
      dimension_numbers: as in lax: ``None``, three layout strings or
        ``ConvDimensionNumbers``.
      feature_group_count: feature groups (``C_in`` for depthwise).
      batch_group_count: only for ``ops.standard`` (lax semantics).
      precision: passed to lax for the standard op and native rewrites.
      preferred_element_type: accumulation and output dtype.
      out_sharding: output sharding, as in lax.
      op: the product: an `jaxconv.Op` or a built-in op's name.
      engine: ``"auto"``, ``"xla"``, ``"native"`` (compiled CPU kernels) or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products (forward and
        backward); default 64 MiB.

    Returns:
      The convolution, laid out as ``dimension_numbers[2]``.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.ones((1, 5, 5, 2)); w = jnp.ones((3, 3, 2, 4))
      >>> y = jaxconv.conv_general_dilated(x, w, (1, 1), "SAME",
      ...     dimension_numbers=("NHWC", "HWIO", "NHWC"), op="max_plus")
      >>> y.shape, float(y[0, 0, 0, 0])
      ((1, 5, 5, 4), 2.0)
    """
    op = resolve(op)
    lhs = validation.as_array("lhs", lhs)
    rhs = validation.as_array("rhs", rhs)
    if lhs.ndim != rhs.ndim:
        raise ValueError(
            f"`lhs` and `rhs` must have the same rank, got lhs.shape={lhs.shape} and "
            f"rhs.shape={rhs.shape}."
        )
    if lhs.ndim < 2:
        raise ValueError(
            f"`lhs` needs rank >= 2 (batch, feature, spatial...), got shape {lhs.shape}.")
    nsd = lhs.ndim - 2
    strides = validation.int_tuple("window_strides", window_strides, nsd, default=None)
    lhs_dil = validation.int_tuple("lhs_dilation", lhs_dilation, nsd)
    rhs_dil = validation.int_tuple("rhs_dilation", rhs_dilation, nsd)
    groups = validation.positive_int("feature_group_count", feature_group_count)
    bgroups = validation.positive_int("batch_group_count", batch_group_count)
    dn = validation.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    pad = validation.padding_pairs(padding, nsd, lhs_dil)
    validation.window_sizes(rhs.shape, dn.rhs_spec)
    engine, mbb, preferred_element_type = _common_options(
        op, lhs, rhs, engine, max_block_bytes, preferred_element_type, precision)

    c_in = lhs.shape[dn.lhs_spec[1]]
    i_k = rhs.shape[dn.rhs_spec[1]]
    o_k = rhs.shape[dn.rhs_spec[0]]
    layout = validation.describe_layout(dn, dimension_numbers, lhs.shape, i_k * groups)
    if c_in % groups:
        raise ValueError(
            f"`feature_group_count`={groups} must divide the input channels of `lhs` "
            f"({c_in}); lhs.shape={lhs.shape}. {layout}"
        )
    if o_k % groups:
        raise ValueError(
            f"`feature_group_count`={groups} must divide the output features of `rhs` "
            f"({o_k}); rhs.shape={rhs.shape}. {layout}"
        )
    if i_k * groups != c_in:
        raise ValueError(
            f"`rhs` in-features ({i_k}) x `feature_group_count` ({groups}) must equal the input "
            f"channels of `lhs` ({c_in}); lhs.shape={lhs.shape}, rhs.shape={rhs.shape}. "
            f"{layout}"
        )
    if bgroups != 1 and not op.lax_product:
        raise ValueError(
            f"`batch_group_count`={bgroups} is supported only for ops.standard (lax); op "
            f"{op.display_name!r} needs batch_group_count=1."
        )
    if op.lax_product:
        return lax.conv_general_dilated(
            lhs, rhs, strides, pad, lhs_dil, rhs_dil, dn, groups, bgroups, precision,
            preferred_element_type, out_sharding=out_sharding)
    validation.check_op(op, lhs, rhs)
    if c_in == 0:
        # An empty contraction: every output is the reduce's identity (lax gives 0, the
        # identity of the standard op's sum); no engine sees K = 0.
        out = jax.eval_shape(functools.partial(
            lax.conv_general_dilated, window_strides=strides, padding=pad, lhs_dilation=lhs_dil,
            rhs_dilation=rhs_dil, dimension_numbers=dn, feature_group_count=groups), lhs, rhs)
        return _empty_contraction(op, out.shape, lhs, rhs, preferred_element_type, out_sharding)

    in_spatial = tuple(lhs.shape[d] for d in dn.lhs_spec[2:])
    window = tuple(rhs.shape[d] for d in dn.rhs_spec[2:])
    dil_in = tuple((s - 1) * d + 1 if s else 0 for s, d in zip(in_spatial, lhs_dil, strict=True))
    dil_win = tuple((k - 1) * d + 1 if k else 0 for k, d in zip(window, rhs_dil, strict=True))
    if isinstance(pad, str):
        pads = tuple(tuple(p) for p in lax.padtype_to_pads(dil_in, dil_win, strides, pad))
    else:
        pads = pad
    for ax, (s, (lo, hi), k) in enumerate(zip(dil_in, pads, dil_win, strict=True)):
        if s + lo + hi < k or k == 0:
            raise ValueError(
                f"window larger than the padded input in spatial dimension {ax}: dilated "
                f"window {k} > padded input {s + lo + hi} (input {in_spatial[ax]}, padding "
                f"{(lo, hi)}, lhs_dilation {lhs_dil[ax]}); op {op.display_name!r} needs at least "
                "one output position."
            )

    x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    w = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    geom = Geometry(in_spatial, window, strides, pads, lhs_dil, rhs_dil, groups)
    y = canonical.canonical_conv(x, w, geom, op, engine=engine,
                                 preferred_element_type=preferred_element_type,
                                 max_block_bytes=mbb, precision=precision)
    src = [0] * lhs.ndim
    src[dn.out_spec[0]] = 0
    src[dn.out_spec[1]] = nsd + 1
    for i, d in enumerate(dn.out_spec[2:]):
        src[d] = 1 + i
    return with_out_sharding(jnp.transpose(y, src), out_sharding)


def dot_general(
    lhs: Any,
    rhs: Any,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    out_sharding: Any = None,
    op: Op | str = standard,
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """General dot product whose product is ``op``, with `jax.lax.dot_general`'s API.

    ``out[b, m, n] = REDUCE_k op.combine(lhs[b, m, k], rhs[b, k, n])`` over the contracting
    dimensions; batch, free and output dimension order are lax's. An empty contraction
    gives the reduce's identity everywhere (0 for sums, as lax; ``-inf`` for ``max_plus``).

    Args:
      lhs: left operand.
      rhs: right operand.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: passed to lax for the standard op and native rewrites.
      preferred_element_type: accumulation and output dtype.
      out_sharding: output sharding, as in lax.
      op: the product: an `jaxconv.Op` or a built-in op's name.
      engine: ``"auto"``, ``"xla"``, ``"native"`` (compiled CPU kernels) or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      Array of shape ``batch + lhs free + rhs free``.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> a = jnp.array([[0., 1.], [2., 3.]]); b = jnp.array([[1., 0.], [0., 5.]])
      >>> jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op="max_plus")
      Array([[1., 6.],
             [3., 8.]], dtype=float32)
    """
    op = resolve(op)
    lhs = validation.as_array("lhs", lhs)
    rhs = validation.as_array("rhs", rhs)
    (lc, rc), (lb, rb) = validation.dot_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    engine, mbb, preferred_element_type = _common_options(
        op, lhs, rhs, engine, max_block_bytes, preferred_element_type, precision)
    dnums = ((lc, rc), (lb, rb))
    if op.lax_product:
        return lax.dot_general(lhs, rhs, dnums, precision, preferred_element_type,
                               out_sharding=out_sharding)
    validation.check_op(op, lhs, rhs)
    if math.prod(lhs.shape[d] for d in lc) == 0:
        out = jax.eval_shape(functools.partial(lax.dot_general, dimension_numbers=dnums),
                             lhs, rhs)
        return _empty_contraction(op, out.shape, lhs, rhs, preferred_element_type, out_sharding)
    lf = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
    rf = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
    bshape = tuple(lhs.shape[d] for d in lb)
    lfs = tuple(lhs.shape[d] for d in lf)
    rfs = tuple(rhs.shape[d] for d in rf)
    b, m, k, n = (math.prod(bshape), math.prod(lfs), math.prod(lhs.shape[d] for d in lc),
                  math.prod(rfs))
    a3 = jnp.transpose(lhs, lb + lf + lc).reshape(b, m, k)
    r3 = jnp.transpose(rhs, rb + rc + rf).reshape(b, k, n)
    # A dense product is a convolution with no spatial dimensions, one tap and ``b`` groups.
    x = a3.transpose(1, 0, 2).reshape(m, b * k)
    w = r3.transpose(1, 0, 2).reshape(k, b * n)
    geom = Geometry((), (), (), (), (), (), b)
    y = canonical.canonical_conv(x, w, geom, op, engine=engine,
                                 preferred_element_type=preferred_element_type,
                                 max_block_bytes=mbb, precision=precision)
    y = y.reshape(m, b, n).transpose(1, 0, 2).reshape(bshape + lfs + rfs)
    return with_out_sharding(y, out_sharding)

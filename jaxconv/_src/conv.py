"""``conv_general_dilated`` and ``dot_general`` with lax's signatures and any ``Op``."""

from __future__ import annotations

import functools
import math
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import validation
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import resolve, standard
from jaxconv._src.engines import forward_mode
from jaxconv._src.engines import native as engine_native
from jaxconv._src.engines import xla as engine_xla

Array = jax.Array


def _is_standard(op: Op) -> bool:
    return op is standard or op == standard


def _dispatch_engine(engine: str, generic_args: tuple, generic_kwargs: dict) -> Array:
    """Runs the chosen engine on a canonical problem (``x``, ``w``, ``geom``, ``op``)."""
    if forward_mode.has_jvp_tracer(*generic_args[:2]):
        # Differentiated forward (jax.jvp / jacfwd): the engines' backward passes are
        # custom VJPs, which JAX cannot push tangents through.
        return forward_mode.generic_conv(*generic_args, **generic_kwargs)
    if engine == "pallas" or (engine == "auto" and _pallas_is_default()):
        from jaxconv._src.engines import pallas as engine_pallas

        return engine_pallas.generic_conv(*generic_args, **generic_kwargs)
    if engine == "native" or (engine == "auto" and _native_is_default(generic_args,
                                                                      generic_kwargs)):
        return _native_conv(generic_args, generic_kwargs)
    return engine_xla.generic_conv(*generic_args, **generic_kwargs)


_native_warned = False


def _native_is_default(generic_args: tuple, generic_kwargs: dict) -> bool:
    """Whether ``engine="auto"`` picks the native engine: on CPU, where it has a kernel.

    Where the compiled library cannot be loaded, ``auto`` falls back to the XLA engine with
    one warning per process.
    """
    global _native_warned
    x, w, geom, op = generic_args
    if op.native is None or jax.default_backend() != "cpu":
        return False
    if not engine_native.available():
        if not _native_warned:
            _native_warned = True
            warnings.warn(
                "jaxconv: the native CPU engine could not be loaded "
                f"({engine_native.load_error()}); engine='auto' uses the XLA engine.",
                RuntimeWarning, stacklevel=4)
        return False
    return engine_native.serves(op, geom, x, w, generic_kwargs.get("preferred_element_type"))


def _native_conv(generic_args: tuple, generic_kwargs: dict) -> Array:
    x, w, geom, op = generic_args
    if not engine_native.available():
        raise RuntimeError(
            f"engine='native' (op {op.name!r}): the compiled CPU kernels could not be loaded "
            f"({engine_native.load_error()}); reinstall jaxconv from source with a C++17 "
            "compiler, or use engine='auto' / 'xla'.")
    return engine_native.generic_conv(*generic_args, **generic_kwargs)


def _pallas_is_default() -> bool:
    """Whether ``engine="auto"`` picks the Pallas kernel.

    Not yet: the kernel is verified in interpret mode only and has not been timed on a GPU or
    TPU, so ``auto`` stays on the XLA engine (which XLA compiles for every backend) until it
    has been measured there. ``engine="pallas"`` forces it.
    """
    return False


def _with_out_sharding(y: Array, out_sharding: Any) -> Array:
    if out_sharding is None:
        return y
    return jax.lax.with_sharding_constraint(y, out_sharding)


def _common_options(
    op: Op, lhs: Array, rhs: Array, engine: Any, max_block_bytes: Any,
    preferred_element_type: Any, precision: Any,
) -> tuple[str, int, Any]:
    """Validates the options both products share: ``(engine, max_block_bytes, pet)``."""
    engine = validation.engine_name(engine)
    mbb = validation.max_block_bytes(max_block_bytes)
    preferred_element_type = validation.preferred_element_type(
        preferred_element_type, lhs, rhs, generic=not _is_standard(op))
    validation.precision(precision)
    return engine, mbb, preferred_element_type


def _rewritten(op: Op, product: Any, lhs: Array, rhs: Array, out_sharding: Any) -> Array:
    """The op's native rewrite (given the lax ``product`` to call), then its post-map."""
    y = op.rewrite(product, lhs, rhs)
    if op.post is not None:
        y = op.post(y)
    return _with_out_sharding(y, out_sharding)


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

    Same arguments, defaults and output shape as :func:`jax.lax.conv_general_dilated`
    (1-, 2- and 3-D, any ``dimension_numbers``, string or explicit padding, strides, both
    dilations, feature groups); ``op`` replaces multiply-and-add::

        out[n, o, co] = REDUCE_{k, ci} op.combine(x[n, o*stride + k*dilation - pad_lo, ci],
                                                  w[k, ci, co])

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
      op: the product: an :class:`jaxconv.Op` or a built-in op's name.
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
    if c_in % groups:
        raise ValueError(
            f"`feature_group_count`={groups} must divide the input channels of `lhs` "
            f"({c_in})."
        )
    if o_k % groups:
        raise ValueError(
            f"`feature_group_count`={groups} must divide the output features of `rhs` "
            f"({o_k})."
        )
    if i_k * groups != c_in:
        raise ValueError(
            f"`rhs` in-features ({i_k}) x `feature_group_count` ({groups}) must equal the input "
            f"channels of `lhs` ({c_in}); lhs.shape={lhs.shape}, rhs.shape={rhs.shape}."
        )
    if bgroups != 1 and not _is_standard(op):
        raise ValueError(
            f"`batch_group_count`={bgroups} is supported only for ops.standard (lax); op "
            f"{op.name!r} needs batch_group_count=1."
        )
    if _is_standard(op):
        return lax.conv_general_dilated(
            lhs, rhs, strides, pad, lhs_dil, rhs_dil, dn, groups, bgroups, precision,
            preferred_element_type, out_sharding=out_sharding)
    validation.check_op(op, lhs, rhs)
    forward_mode.check_op(op, lhs, rhs)

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
                f"{(lo, hi)}, lhs_dilation {lhs_dil[ax]}); op {op.name!r} needs at least one "
                "output position."
            )

    if op.rewrite is not None:
        x, pads_r, lhs_dil_r = lhs, pads, lhs_dil
        if op.pad_value is not None and (
            any(lo or hi for lo, hi in pads) or any(d != 1 for d in lhs_dil)
        ):
            cfg = [(0, 0, 0)] * lhs.ndim
            for d_ax, (lo, hi), ld in zip(dn.lhs_spec[2:], pads, lhs_dil, strict=True):
                cfg[d_ax] = (lo, hi, ld - 1)
            x = lax.pad(lhs, jnp.asarray(op.pad_value, lhs.dtype), cfg)
            pads_r, lhs_dil_r = ((0, 0),) * nsd, (1,) * nsd
        product = functools.partial(
            lax.conv_general_dilated, window_strides=strides, padding=pads_r,
            lhs_dilation=lhs_dil_r, rhs_dilation=rhs_dil, dimension_numbers=dn,
            feature_group_count=groups, precision=precision,
            preferred_element_type=preferred_element_type)
        return _rewritten(op, product, x, rhs, out_sharding)

    x = jnp.transpose(lhs, (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1]))
    w = jnp.transpose(rhs, (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0]))
    geom = engine_xla.Geometry(in_spatial, window, strides, pads, lhs_dil, rhs_dil, groups)
    y = _dispatch_engine(engine, (x, w, geom, op),
                         dict(preferred_element_type=preferred_element_type, max_block_bytes=mbb))
    src = [0] * lhs.ndim
    src[dn.out_spec[0]] = 0
    src[dn.out_spec[1]] = nsd + 1
    for i, d in enumerate(dn.out_spec[2:]):
        src[d] = 1 + i
    return _with_out_sharding(jnp.transpose(y, src), out_sharding)


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
    """General dot product whose product is ``op``, with :func:`jax.lax.dot_general`'s API.

    ``out[b, m, n] = REDUCE_k op.combine(lhs[b, m, k], rhs[b, k, n])`` over the contracting
    dimensions; batch, free and output dimension order are lax's.

    Args:
      lhs: left operand.
      rhs: right operand.
      dimension_numbers: ``((lhs_contracting, rhs_contracting), (lhs_batch, rhs_batch))``.
      precision: passed to lax for the standard op and native rewrites.
      preferred_element_type: accumulation and output dtype.
      out_sharding: output sharding, as in lax.
      op: the product: an :class:`jaxconv.Op` or a built-in op's name.
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
    if _is_standard(op):
        return lax.dot_general(lhs, rhs, dnums, precision, preferred_element_type,
                               out_sharding=out_sharding)
    validation.check_op(op, lhs, rhs)
    forward_mode.check_op(op, lhs, rhs)
    if op.rewrite is not None:
        product = functools.partial(lax.dot_general, dimension_numbers=dnums, precision=precision,
                                    preferred_element_type=preferred_element_type)
        return _rewritten(op, product, lhs, rhs, out_sharding)

    lf = tuple(d for d in range(lhs.ndim) if d not in lc + lb)
    rf = tuple(d for d in range(rhs.ndim) if d not in rc + rb)
    bshape = tuple(lhs.shape[d] for d in lb)
    lfs = tuple(lhs.shape[d] for d in lf)
    rfs = tuple(rhs.shape[d] for d in rf)
    b, m, k, n = (math.prod(bshape), math.prod(lfs), math.prod(lhs.shape[d] for d in lc),
                  math.prod(rfs))
    a3 = jnp.transpose(lhs, lb + lf + lc).reshape(b, m, k)
    r3 = jnp.transpose(rhs, rb + rc + rf).reshape(b, k, n)
    if k == 0:
        raise ValueError(f"op {op.name!r} needs a non-empty contraction, got size 0.")
    # A dense product is a convolution with no spatial dimensions, one tap and ``b`` groups.
    x = a3.transpose(1, 0, 2).reshape(m, b * k)
    w = r3.transpose(1, 0, 2).reshape(k, b * n)
    geom = engine_xla.Geometry((), (), (), (), (), (), b)
    y = _dispatch_engine(engine, (x, w, geom, op),
                         dict(preferred_element_type=preferred_element_type, max_block_bytes=mbb))
    y = y.reshape(m, b, n).transpose(1, 0, 2).reshape(bshape + lfs + rfs)
    return _with_out_sharding(y, out_sharding)

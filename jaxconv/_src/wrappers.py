"""Friendly channels-last wrappers: `conv` and `dense`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxconv._src.conv import conv_general_dilated, dot_general
from jaxconv._src.core import validation
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.ops import standard

Array = jax.Array

_SPATIAL = "DHWXYZ"


def _ints(name: str, v: int | Sequence[int], n: int) -> tuple[int, ...]:
    """``v`` as ``n`` ints (an int is repeated).

    Args:
        name: the argument's name, for the message.
        v: an int or a sequence of ints.
        n: the number wanted.

    Returns:
        The ints as a tuple.

    Raises:
        ValueError: a sequence of another length.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return (v,) * n
    t = tuple(v)
    if len(t) != n:
        raise ValueError(f"`{name}` must be an int or {n} ints, got {v!r}.")
    return t


# Names other libraries use for the same arguments -> the lax / Flax name jaxconv uses.
_RENAMED = {
    "dilation": "kernel_dilation", "rhs_dilation": "kernel_dilation",
    "lhs_dilation": "input_dilation", "groups": "feature_group_count",
    "stride": "strides", "window_strides": "strides",
}


def _refuse_unknown(fn: str, unknown: dict[str, Any]) -> None:
    """Raises a ``TypeError`` for the first of ``unknown`` (with the lax / Flax name).

    Args:
        fn: the function's name.
        unknown: the unexpected keywords.

    Raises:
        TypeError: if there is any.
    """
    for name in unknown:
        if name in _RENAMED:
            raise TypeError(
                f"`{fn}` takes `{_RENAMED[name]}=` (the lax / Flax name), not `{name}=`.")
        raise TypeError(f"`{fn}` got an unexpected keyword argument `{name}`.")


def conv(
    x: Any,
    w: Any,
    strides: int | Sequence[int] = 1,
    padding: Any = "SAME",
    *,
    input_dilation: int | Sequence[int] = 1,
    kernel_dilation: int | Sequence[int] = 1,
    feature_group_count: int = 1,
    op: Op | str = standard,
    precision: Any = None,
    preferred_element_type: Any = None,
    engine: str = "auto",
    max_block_bytes: int | None = None,
    **unknown: Any,
) -> Array:
    """A channels-last convolution: ``x (N, *spatial, C)``, ``w (*window, C // G, O)``.

    The number of spatial dimensions is ``w.ndim - 2``; ints broadcast to every spatial
    dimension. Argument names are Flax's (``flax.nnx.Conv``): ``kernel_dilation``,
    ``input_dilation``, ``feature_group_count``. Everything else is
    `jaxconv.conv_general_dilated`.

    Args:
      x: input, ``(N, *spatial, C)``.
      w: kernel, ``(*window, C // feature_group_count, O)`` (Flax's layout).
      strides: an int or one per spatial dimension.
      padding: ``'SAME'``, ``'SAME_LOWER'``, ``'VALID'`` or ``(low, high)`` pairs.
      input_dilation: input dilation (holes treated like padding), lax's ``lhs_dilation``.
      kernel_dilation: kernel dilation (an int or one per spatial dimension), lax's
        ``rhs_dilation``.
      feature_group_count: feature groups (``C`` for a depthwise convolution).
      op: the product.
      precision: lax precision.
      preferred_element_type: accumulation and output dtype.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products.
      **unknown: refused: a ``TypeError`` names the keyword (and the lax / Flax name of a
        renamed one, such as ``stride=``).

    Returns:
      ``(N, *out_spatial, O)``.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> x = jnp.arange(5.0).reshape(1, 5, 1); w = jnp.zeros((3, 1, 1))
      >>> jaxconv.conv(x, w, op="max_plus")[0, :, 0]       # a running max of 3
      Array([1., 2., 3., 4., 4.], dtype=float32)
    """
    _refuse_unknown("conv", unknown)
    x = validation.as_array("x", x)
    w = validation.as_array("w", w)
    nsd = w.ndim - 2
    if nsd < 0 or x.ndim != w.ndim or nsd > len(_SPATIAL):
        raise ValueError(
            f"`x` must be (N, *spatial, C) and `w` (*window, I, O) with the same rank, got "
            f"x.shape={x.shape} and w.shape={w.shape}.")
    sp = _SPATIAL[:nsd]
    dn = ("N" + sp + "C", sp + "IO", "N" + sp + "C")
    return conv_general_dilated(
        x, w, _ints("strides", strides, nsd), padding, _ints("input_dilation",
                                                              input_dilation, nsd),
        _ints("kernel_dilation", kernel_dilation, nsd), dn, feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type, op=op, engine=engine,
        max_block_bytes=max_block_bytes)


def dense(
    x: Any,
    w: Any,
    *,
    op: Op | str = standard,
    precision: Any = None,
    preferred_element_type: Any = None,
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """A dense product ``x (..., in) op w (in, out) -> (..., out)``.

    Args:
      x: input, last axis contracted.
      w: kernel ``(in, out)``.
      op: the product.
      precision: lax precision.
      preferred_element_type: accumulation and output dtype.
      engine: ``"auto"``, ``"xla"``, ``"native"`` or ``"pallas"``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      ``(..., out)``.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> jaxconv.dense(jnp.array([[1., 2.]]), jnp.array([[0., 1.], [3., 0.]]), op="min_plus")
      Array([[1., 2.]], dtype=float32)
    """
    x = validation.as_array("x", x)
    w = validation.as_array("w", w)
    if w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(
            f"`dense` needs x (..., in) and w (in, out), got x.shape={x.shape}, "
            f"w.shape={w.shape}.")
    return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision,
                       preferred_element_type, op=op, engine=engine,
                       max_block_bytes=max_block_bytes)

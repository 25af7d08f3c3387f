"""The native engine's bfloat16 / float16 routes, compiled side by side for the tests that
compare their bits (tests/test_native_low_forward.py, test_native_low_user.py,
test_native_lowrec.py).

A route is chosen by ``JAXCONV_NATIVE_LOW`` (`jaxconv._src.engines.native.low_route`), read
while the function is traced: `compiled` sets it around the lowering only (`low_route.chosen`).

Example:
    >>> f = native_conv("max_plus", window_strides=(1, 1), padding="SAME")
    >>> new = compiled(f, (x, w), "record")
    >>> old = compiled(f, (x, w), "convert")
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import jaxconv
from jaxconv._src.engines.native.low_route import LowRoute, chosen

DN = ("NHWC", "HWIO", "NHWC")
DENSE = (((1,), (0,)), ((), ()))


def native_conv(op: Any, acc: Any = None, **geom: Any) -> Callable[[Any, Any], Any]:
    """The native NHWC / HWIO convolution with `op`.

    Args:
        op: a built-in op's name or a ``jaxconv.Op``.
        acc: the ``preferred_element_type``.
        **geom: ``conv_general_dilated``'s geometry (strides, padding, dilations, groups).

    Returns:
        ``f(x, w)``.
    """

    def f(x: jax.Array, w: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(
            x, w, dimension_numbers=DN, op=op, engine="native", preferred_element_type=acc, **geom
        )

    return f


def native_dense(op: Any) -> Callable[[Any, Any], Any]:
    """The native dense product ``x @ w`` with `op`.

    Args:
        op: a built-in op's name or a ``jaxconv.Op``.

    Returns:
        ``f(x, w)``.
    """
    return lambda x, w: jaxconv.dot_general(x, w, DENSE, op=op, engine="native")


def compiled(
    f: Callable[[Any, Any], Any],
    args: tuple[Any, ...],
    name: LowRoute,
    vmapped: bool = False,
    derivative: str | None = None,
) -> Any:
    """`f` (or a derivative of it) jitted and compiled for `args` on the route `name`.

    Args:
        f: the product, ``f(x, w)``.
        args: ``(x, w)``, and the cotangent last for ``derivative="vjp"``.
        name: the route (``JAXCONV_NATIVE_LOW``'s value).
        vmapped: map `f` over a leading axis of x and w.
        derivative: ``None`` (the forward), ``"grad"`` (both gradients of a fixed weighting
            of the float32 result: ``(dx, dw)``) or ``"vjp"`` (``(y, dx, dw)`` of the given
            cotangent).

    Returns:
        The compiled function.
    """
    # A new function object each time: jit would reuse a trace of the same one (and its route).
    g = jax.vmap(f) if vmapped else lambda x, w: f(x, w)
    if derivative == "grad":

        def loss(x: jax.Array, w: jax.Array) -> jax.Array:
            y = g(x, w).astype(jnp.float32)
            return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape))

        fn = jax.grad(loss, argnums=(0, 1))
    elif derivative == "vjp":

        def fn(x: jax.Array, w: jax.Array, ct: jax.Array) -> Any:
            y, vjp = jax.vjp(g, x, w)
            return (y, *vjp(ct))
    else:
        fn = g
    with chosen(name):
        return jax.jit(fn).lower(*args).compile()

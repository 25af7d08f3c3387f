"""The log semiring (``x + w`` under logsumexp) on the native engine: exp space, exact kernel
where needed.

``exp(x + w - mx - mw) = exp(x - mx) exp(w - mw)``, so the product is one standard
convolution of the shifted exponentials (``mx`` the per-sample maximum of ``x``, ``mw`` the
per-output-channel maximum of ``w``), and its gradients are the convolution's transposes
(the softmax weight of a term is ``exp(x - mx) exp(w - mw) exp(mx + mw - y)``). That path is
taken only where it is as exact as the kernel: no NaN or ``+inf`` input and every window's
shifted sum at least ``exp(MIN_EXPONENT)`` (its largest term within ~80 of the shift, never
an all ``-inf`` window). Otherwise the whole call runs the native two-pass kernel
(``csrc/kernel_logsum.h``: a running maximum, any range of values exact to rounding).

The convolutions are computed outside the ``lax.cond`` that picks the result: XLA's CPU
backend runs a convolution inside a conditional's branch far slower (seconds, not
milliseconds, on a 3x3x64x64 layer), and the exact branch is the rare one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import products
from jaxconv._src.core.problem import Problem

Array = jax.Array

# The exp-space result is used where every window's shifted sum is at least
# exp(MIN_EXPONENT): its largest term is then within ~80 of the shift and every term that
# matters in float32 is a normal number.
MIN_EXPONENT = -60.0


def _shifted(problem: Problem, x: Array, w: Array) -> tuple[Array, Array, Array]:
    """``exp(x - mx)``, ``exp(w - mw)`` and the shift ``mx + mw`` broadcastable to the
    output (``(N, 1.., O)``), with non-finite maxima replaced by 0."""
    nsd = len(problem.geom.window)
    mx = jnp.max(x, axis=tuple(range(1, x.ndim)), keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0)
    mw = jnp.max(w, axis=tuple(range(w.ndim - 1)), keepdims=True)
    mw = jnp.where(jnp.isfinite(mw), mw, 0)
    shift = mx.reshape(x.shape[0], *(1,) * nsd, 1) + mw.reshape(*(1,) * (nsd + 1), -1)
    return jnp.exp(x - mx), jnp.exp(w - mw), shift


def _inputs_ok(x: Array, w: Array) -> Array:
    """No NaN and no ``+inf`` in either operand."""
    return jnp.all(x < jnp.inf) & jnp.all(w < jnp.inf)


def forward(problem: Problem, x: Array, w: Array,
            exact: Callable[[Array, Array], Array]) -> Array:
    """``y`` (N, *out_spatial, O): exp space, or ``exact(x, w)`` (the native kernel).

    Args:
      problem: a log-semiring problem (identity padding).
      x: the canonical input, float32.
      w: the canonical kernel, float32.
      exact: the native kernel's forward.

    Returns:
      The product.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> x, w = jnp.zeros((1, 4, 2)), jnp.zeros((3, 2, 1))
      >>> y = jaxconv.conv_general_dilated(x, w, (1,), "VALID", op="log",
      ...                                  dimension_numbers=("NWC", "WIO", "NWC"))
      >>> round(float(y[0, 0, 0]), 4)  # log(6): six terms exp(0)
      1.7918
    """
    ex, ew, shift = _shifted(problem, x, w)
    s = products.standard(ex, ew, problem.geom)
    ok = jnp.all(s >= math.exp(MIN_EXPONENT)) & _inputs_ok(x, w)
    return lax.cond(ok, lambda s_, sh, a, b: jnp.log(s_) + sh,
                    lambda s_, sh, a, b: exact(a, b), s, shift, x, w)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             exact: Callable[[Array, Array, Array, Array], tuple[Array, Array]]
             ) -> tuple[Array, Array]:
    """``(gx, gw)``: the softmax rule through the exp-space convolution's transposes, or
    ``exact(x, w, y, g)`` (the native kernel) where the forward took the exact kernel."""
    ex, ew, shift = _shifted(problem, x, w)
    ok = jnp.all(y - shift >= MIN_EXPONENT) & _inputs_ok(x, w)
    # d y / d s = 1 / s = exp(shift - y); below the threshold the branch is discarded.
    gs = g * jnp.exp(jnp.minimum(shift - y, -MIN_EXPONENT))
    _, vjp = jax.vjp(functools.partial(products.standard, geom=problem.geom), ex, ew)
    gex, gew = vjp(gs)
    return lax.cond(ok, lambda a, b, *_: (a, b), lambda a, b, *r: exact(*r),
                    gex * ex, gew * ew, x, w, y, g)

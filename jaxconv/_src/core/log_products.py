"""The log semiring (``x + w`` under logsumexp) in exp space, for every engine.

``exp(x + w - mx - mw) = exp(x - mx) exp(w - mw)``, so the product is one standard
convolution of the shifted exponentials (``mx`` the per-sample maximum of ``x``, ``mw`` the
per-output-channel maximum of ``w``): ``y = log(conv(exp(x - mx), exp(w - mw))) + mx + mw``,
and its gradients are that convolution's transposes (with ``s = exp(y - mx - mw)``,
``d y / d s = 1 / s``, and back through the exponentials). Zero padding in exp space is the
identity padding.

That path is taken only where it is as exact as the engine's own: no NaN or ``+inf`` input
and every window's shifted sum at least ``exp(MIN_EXPONENT)`` (its largest term within ~80
of the shift, never an all ``-inf`` window). Otherwise the whole call runs the ``exact``
callable the engine passes in (the XLA engine's tap engine, the native two-pass kernel).

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
# exp(MIN_EXPONENT): its largest term is then within ~80 of the shift, every term that
# matters in float32 is a normal number, and the standard convolution's sum is accurate to a
# few ulps.
MIN_EXPONENT = -60.0
# The exp-space gradient's d y / d s = exp(shift - y) carries y's rounding, up to half an ulp
# of y: beyond this magnitude (half an ulp 2^-12) the backward takes the exact branch (at
# |y| = 3e9 the factor was off by up to e^128: infinite or zero gradients).
MAX_EXP_SPACE_Y = 2.0**12


def _shifted(problem: Problem, x: Array, w: Array) -> tuple[Array, Array, Array]:
    """``exp(x - mx)``, ``exp(w - mw)`` and the shift ``mx + mw`` broadcastable to the
    output (``(N, 1.., O)``), in the accumulation dtype, with non-finite maxima replaced
    by 0.

    Args:
        problem: the canonical problem.
        x: the input.
        w: the kernel.

    Returns:
        The two exponentials and the shift.
    """
    nsd = len(problem.geom.window)
    xa, wa = x.astype(problem.acc_dtype), w.astype(problem.acc_dtype)
    mx = jnp.max(xa, axis=tuple(range(1, xa.ndim)), keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0)
    mw = jnp.max(wa, axis=tuple(range(wa.ndim - 1)), keepdims=True)
    mw = jnp.where(jnp.isfinite(mw), mw, 0)
    shift = mx.reshape(x.shape[0], *(1,) * nsd, 1) + mw.reshape(*(1,) * (nsd + 1), -1)
    return jnp.exp(xa - mx), jnp.exp(wa - mw), shift


def _inputs_ok(x: Array, w: Array) -> Array:
    """No NaN and no ``+inf`` in either operand (``NaN < inf`` is false)."""
    return jnp.all(x < jnp.inf) & jnp.all(w < jnp.inf)


def forward(problem: Problem, x: Array, w: Array,
            exact: Callable[[Array, Array], Array]) -> Array:
    """``y`` (``(N, *out_spatial, O)``, the accumulation dtype): exp space, or
    ``exact(x, w)`` where a window or an input needs it.

    Args:
      problem: a log-semiring problem (``x + w`` under logsumexp, identity padding).
      x: the canonical input.
      w: the canonical kernel.
      exact: the engine's exact forward of the same problem, ``(N, *out_spatial, O)``.

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
    acc = problem.acc_dtype
    return lax.cond(ok, lambda s_, sh, a, b: jnp.log(s_) + sh,
                    lambda s_, sh, a, b: exact(a, b).astype(acc), s, shift, x, w)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             exact: Callable[[Array, Array, Array, Array], tuple[Array, Array]]
             ) -> tuple[Array, Array]:
    """``(gx, gw)`` in the operands' dtypes: the softmax rule through the exp-space
    convolution's transposes, or ``exact(x, w, y, g)`` where the forward took the exact path.

    Args:
      problem: the forward's problem.
      x: the canonical input.
      w: the canonical kernel.
      y: the forward's output, ``(N, *out_spatial, O)``.
      g: its cotangent, shaped as ``y``.
      exact: the engine's exact backward of the same problem, given ``(x, w, y, g)``.

    Returns:
      The input and kernel gradients.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> x, w = jnp.zeros((1, 4, 2)), jnp.zeros((3, 2, 1))
      >>> f = lambda w: jaxconv.conv_general_dilated(
      ...     x, w, (1,), "VALID", op="log", dimension_numbers=("NWC", "WIO", "NWC")).sum()
      >>> round(float(jax.grad(f)(w)[0, 0, 0]), 4)  # each of six equal terms weighs 1/6
      0.3333
    """
    ex, ew, shift = _shifted(problem, x, w)
    acc = problem.acc_dtype
    yo, go = y.astype(acc), g.astype(acc)
    ok = (jnp.all(yo - shift >= MIN_EXPONENT) & jnp.all(jnp.abs(yo) <= MAX_EXP_SPACE_Y)
          & _inputs_ok(x, w))
    # d y / d s = 1 / s = exp(shift - y); where that exceeds exp(-MIN_EXPONENT) the exact
    # branch is taken, and the bound keeps the discarded values finite.
    gs = go * jnp.exp(jnp.minimum(shift - yo, -MIN_EXPONENT))
    _, vjp = jax.vjp(functools.partial(products.standard, geom=problem.geom), ex, ew)
    gex, gew = vjp(gs)

    def exact_branch(a: Array, b: Array, *args: Array) -> tuple[Array, Array]:
        gx, gw = exact(*args)
        return gx.astype(x.dtype), gw.astype(w.dtype)

    return lax.cond(ok, lambda a, b, *_: (a, b), exact_branch,
                    (gex * ex).astype(x.dtype), (gew * ew).astype(w.dtype), x, w, y, g)

"""The log semiring (``x + w`` under logsumexp) in exp space, with its exact fallback."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core import algebra, products
from jaxconv._src.core.algebra import Op
from jaxconv._src.engines.xla.backward import _hand_backward
from jaxconv._src.engines.xla.common import Config
from jaxconv._src.engines.xla.nan import _forward_dispatch

Array = jax.Array


# The fast log-semiring path is used only when every window's sum of exponentials, shifted
# by the per-sample and per-channel maxima, is at least exp(LOG_FAST_MIN_EXPONENT): then its
# largest term is within ~80 of the shift, every term that matters in float32 is a normal
# number, and the native convolution's sum is accurate to a few ulps.
LOG_FAST_MIN_EXPONENT = -60.0


def is_log_semiring(op: Op) -> bool:
    """Whether ``op`` is ``x + w`` under logsumexp with identity padding (``ops.log``)."""
    return algebra.capabilities(op).log_semiring


def _log_exp_space(cfg: Config, x: Array, w: Array) -> tuple[Array, Array, Array, Array]:
    """``exp(x - mx)``, ``exp(w - mw)``, their native product ``s`` and the shift
    ``mx + mw`` (broadcastable to the output), in the accumulation dtype.

    ``mx`` is the per-sample maximum of ``x``, ``mw`` the per-output-channel maximum of ``w``
    (zero where not finite).
    """
    geom, acc = cfg.geom, cfg.acc_dtype
    n, nsd = x.shape[0], len(geom.window)
    xa, wa = x.astype(acc), w.astype(acc)
    mx = jnp.max(xa, axis=tuple(range(1, xa.ndim)), keepdims=True)
    mx = jnp.where(jnp.isfinite(mx), mx, 0)
    mw = jnp.max(wa, axis=tuple(range(wa.ndim - 1)), keepdims=True)
    mw = jnp.where(jnp.isfinite(mw), mw, 0)
    ex, ew = jnp.exp(xa - mx), jnp.exp(wa - mw)
    shift = mx.reshape(n, *(1,) * nsd, 1) + mw.reshape(*(1,) * (nsd + 1), -1)
    return ex, ew, _exp_product(cfg, ex, ew), shift


def _exp_product(cfg: Config, ex: Array, ew: Array) -> Array:
    """The standard product of the exp-space operands (zero padding is the identity)."""
    return products.standard(ex, ew, cfg.geom)


def _log_inputs_ok(x: Array, w: Array) -> Array:
    """No NaN and no ``+inf`` in either operand (the exp-space path's precondition)."""
    return (jnp.all(jnp.logical_not(jnp.isnan(x)) & (x < jnp.inf))
            & jnp.all(jnp.logical_not(jnp.isnan(w)) & (w < jnp.inf)))


def _log_fast_or_exact(cfg: Config, x: Array, w: Array) -> Array:
    """The log semiring as a native product in exp space, or the exact engine where needed.

    ``y = log(conv(exp(x - mx), exp(w - mw))) + mx + mw`` (`_log_exp_space`). Zero
    padding in exp space is the identity. Falls back to the exact tap engine (``lax.cond``)
    when any input is NaN or ``+inf``, or when any window's shifted sum is below
    ``exp(LOG_FAST_MIN_EXPONENT)`` -- windows far below the maximum of their sample and
    channel, windows of only ``-inf`` and underflow.
    """
    _, _, s, shift = _log_exp_space(cfg, x, w)
    ok = jnp.all(s >= math.exp(LOG_FAST_MIN_EXPONENT)) & _log_inputs_ok(x, w)
    out_shape = (x.shape[0], max(1, math.prod(cfg.geom.out_spatial)), cfg.geom.groups, -1)
    return lax.cond(
        ok,
        lambda s_, sh_, a, b: (jnp.log(s_) + sh_).reshape(out_shape),
        lambda s_, sh_, a, b: _forward_dispatch(cfg, a, b).astype(cfg.acc_dtype).reshape(
            out_shape),
        s, shift, x, w,
    )


def _log_backward(cfg: Config, x: Array, w: Array, y: Array, gy: Array) -> tuple[Array, Array]:
    """The softmax rule in exp space where the forward took it: with ``s = exp(y - shift)``,
    ``d y / d s = 1 / s``, so the cotangent ``g / s`` goes through the native product's own
    transpose and back through the exponentials. Elsewhere (``lax.cond``, the same test as
    the forward's) the exact tap backward."""
    ex, ew, _, shift = _log_exp_space(cfg, x, w)
    n, o = x.shape[0], w.shape[-1]
    yo = y.reshape(n, *cfg.geom.out_spatial, o).astype(cfg.acc_dtype)
    go = gy.reshape(yo.shape).astype(cfg.acc_dtype)
    ok = jnp.all(yo - shift >= LOG_FAST_MIN_EXPONENT) & _log_inputs_ok(x, w)

    def fast(ex: Array, ew: Array, yo: Array, go: Array, x: Array, w: Array, y: Array,
             gy: Array) -> tuple[Array, Array]:
        gs = go * jnp.exp(shift - yo)
        _, vjp = jax.vjp(functools.partial(_exp_product, cfg), ex, ew)
        gex, gew = vjp(gs)
        return (gex * ex).astype(x.dtype), (gew * ew).astype(w.dtype)

    def exact(ex: Array, ew: Array, yo: Array, go: Array, x: Array, w: Array, y: Array,
              gy: Array) -> tuple[Array, Array]:
        # The rare exact branch is compiled without unrolling (less code to compile).
        gx, gw = _hand_backward(dataclasses.replace(cfg, unroll=1), x, w, y, gy)
        return gx.astype(x.dtype), gw.astype(w.dtype)

    return lax.cond(ok, fast, exact, ex, ew, yo, go, x, w, y, gy)

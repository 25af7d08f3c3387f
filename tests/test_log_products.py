"""The core's exp-space log product (`jaxconv._src.core.log_products`), shared by the engines.

Values and gradients against ``jax.grad`` of a brute-force ``jax.nn.logsumexp`` over explicit
windows; the exact path is a sentinel callable, so each regime shows which path it took. The
engines' programs keep every convolution outside the conditional (XLA's CPU backend runs a
convolution inside a conditional's branch far slower).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import ops
from jaxconv._src.core import engine as registry
from jaxconv._src.core import log_products
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines import native

INF = math.inf
GEOM = Geometry((6,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
PROBLEM = Problem(ops.log, GEOM, "auto", np.dtype("float32"), 2**20)
SENTINEL = 7.0


def _brute(x: jax.Array, w: jax.Array) -> jax.Array:
    """``y[n, p, o] = logsumexp_{k, c} xp[n, p + k, c] + w[k, c, o]`` over explicit windows."""
    xp = jnp.pad(x, ((0, 0), (1, 1), (0, 0)), constant_values=-INF)
    win = jnp.stack([xp[:, k:k + x.shape[1]] for k in range(w.shape[0])], axis=2)  # N,P,K,C
    return jax.nn.logsumexp(win[..., None] + w[None, None], axis=(2, 3))


def _data(regime: str) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4)).astype(np.float32)
    if regime == "neg_inf_window":  # output (0, 2)'s window holds only -inf
        x[0, 1:4] = -INF
    elif regime == "spread":  # windows far below their sample's maximum
        x[1, 0] += 200.0
    elif regime == "nan":
        x[1, 3, 1] = np.nan
    elif regime == "pos_inf":
        w[2, 0, 1] = INF
    return x, w


def _exact_forward(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.full((a.shape[0], *GEOM.out_spatial, b.shape[-1]), SENTINEL, jnp.float32)


def _exact_backward(a, b, y, g) -> tuple[jax.Array, jax.Array]:
    return jnp.full(a.shape, SENTINEL, a.dtype), jnp.full(b.shape, SENTINEL, b.dtype)


@pytest.mark.parametrize("regime", ["normal", "neg_inf_window", "spread", "nan", "pos_inf"])
def test_exp_space_or_the_exact_path(regime: str) -> None:
    x, w = _data(regime)
    y = jax.jit(lambda a, b: log_products.forward(PROBLEM, a, b, _exact_forward))(x, w)
    g = np.random.default_rng(4).standard_normal(y.shape).astype(np.float32)
    y_ref = _brute(x, w)
    gx, gw = jax.jit(lambda a, b, c, d: log_products.backward(
        PROBLEM, a, b, c, d, _exact_backward))(x, w, y_ref, g)
    if regime != "normal":
        np.testing.assert_array_equal(y, SENTINEL)
        np.testing.assert_array_equal(gx, SENTINEL)
        np.testing.assert_array_equal(gw, SENTINEL)
        return
    _, vjp = jax.vjp(_brute, x, w)
    gx_ref, gw_ref = vjp(g)
    np.testing.assert_allclose(y, y_ref, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-6)


def _sub_jaxprs(value: object):
    if isinstance(value, jax.extend.core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, jax.extend.core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def _convolutions(jaxpr, inside_cond: bool = False) -> list[bool]:
    """For each convolution of ``jaxpr`` (nested programs included): inside a cond?"""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(inside_cond)
        for value in eqn.params.values():
            for sub in _sub_jaxprs(value):
                found += _convolutions(sub, inside_cond or eqn.primitive.name == "cond")
    return found


@pytest.mark.parametrize("engine", ["xla", "native"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_engines_keep_convolutions_outside_the_cond(engine: str, direction: str) -> None:
    if engine == "native" and not native.available():
        pytest.skip(f"native engine not built: {native.load_error()}")
    eng = registry.get(engine)
    problem = Problem(ops.log, GEOM, engine, np.dtype("float32"), 2**20)
    x, w = _data("normal")
    if direction == "forward":
        jaxpr = jax.make_jaxpr(lambda a, b: eng.forward(problem, a, b))(x, w)
    else:
        y = _brute(x, w)
        jaxpr = jax.make_jaxpr(lambda a, b, c, d: eng.backward(
            problem, a, b, c, d, (True, True)))(x, w, y, jnp.ones_like(y))
    where = _convolutions(jaxpr.jaxpr)
    assert where and not any(where), where

"""Forward-mode differentiation (jax.jvp, jax.jacfwd) of generic products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

DN = ("NWC", "WIO", "NWC")
TANH_MUL = jaxconv.Op(lambda x, w: jnp.tanh(x * w), "sum", name="tanh_mul")
MAX_TIMES = jaxconv.ops.max_times

FORMULAS = {  # name -> (combine, reduce over axes, identity)
    "standard": (jnp.multiply, jnp.sum, 0.0),
    "l1": (lambda x, w: -jnp.abs(x - w), jnp.sum, 0.0),
    "l2": (lambda x, w: -((x - w) ** 2), jnp.sum, 0.0),
    "max_plus": (jnp.add, jnp.max, -jnp.inf),
    "min_plus": (jnp.add, jnp.min, jnp.inf),
    "max_min": (jnp.minimum, jnp.max, -jnp.inf),
    "min_max": (jnp.maximum, jnp.min, jnp.inf),
    "log": (jnp.add, jax.nn.logsumexp, -jnp.inf),
    "tanh_mul": (lambda x, w: jnp.tanh(x * w), jnp.sum, 0.0),
    "max_times": (jnp.multiply, jnp.max, -jnp.inf),
}


def _op(name):
    return {"tanh_mul": TANH_MUL, "max_times": MAX_TIMES}.get(name) or jaxconv.ops.get(name)


def brute_force(name, x, w, lo=1, hi=1):
    """A 1-D stride-1 conv with (lo, hi) identity padding, written with jnp broadcasting."""
    combine, reduce, ident = FORMULAS[name]
    n_out = x.shape[1] + lo + hi - w.shape[0] + 1
    pos = jnp.arange(n_out)[:, None] + jnp.arange(w.shape[0])[None, :] - lo   # (Wout, K)
    valid = (pos >= 0) & (pos < x.shape[1])
    xg = x[:, jnp.clip(pos, 0, x.shape[1] - 1)]                                # (N, Wout, K, C)
    terms = combine(xg[..., None], w[None, None])                              # (N,Wout,K,C,O)
    terms = jnp.where(valid[None, :, :, None, None], terms, ident)
    return reduce(terms, axis=(2, 3))


def _ours(name):
    return lambda x, w: jaxconv.conv_general_dilated(
        x, w, (1,), ((1, 1),), dimension_numbers=DN, op=_op(name))


@pytest.mark.parametrize("name", list(FORMULAS))
def test_jvp_matches_brute_force(name):
    rng = np.random.default_rng(0)
    x, tx = (jnp.asarray(rng.standard_normal((2, 5, 2)), jnp.float32) for _ in range(2))
    w, tw = (jnp.asarray(rng.standard_normal((3, 2, 3)), jnp.float32) for _ in range(2))
    y, ty = jax.jvp(_ours(name), (x, w), (tx, tw))
    y0, ty0 = jax.jvp(lambda a, b: brute_force(name, a, b), (x, w), (tx, tw))
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ty, ty0, rtol=1e-4, atol=1e-4)


def test_jvp_matches_finite_differences():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x, tx = (jnp.asarray(rng.standard_normal((1, 5, 2))) for _ in range(2))
        w, tw = (jnp.asarray(rng.standard_normal((2, 2, 3))) for _ in range(2))
        f = _ours("log")
        _, ty = jax.jvp(f, (x, w), (tx, tw))
        eps = 1e-6
        fd = (f(x + eps * tx, w + eps * tw) - f(x - eps * tx, w - eps * tw)) / (2 * eps)
        np.testing.assert_allclose(ty, fd, rtol=1e-6, atol=1e-8)


def test_ties_are_averaged_like_jnp_max():
    x = jnp.zeros((1, 4, 2))
    w = jnp.zeros((3, 2, 1))
    rng = np.random.default_rng(2)
    tx = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    tw = jnp.asarray(rng.standard_normal(w.shape), jnp.float32)
    _, ty = jax.jvp(_ours("max_plus"), (x, w), (tx, tw))
    _, ty0 = jax.jvp(lambda a, b: brute_force("max_plus", a, b), (x, w), (tx, tw))
    np.testing.assert_allclose(ty, ty0, rtol=1e-5, atol=1e-6)


def test_jacfwd_equals_jacrev_and_jit():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((1, 4, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 2)), jnp.float32)
    f = _ours("max_min")
    np.testing.assert_allclose(jax.jacfwd(f, 1)(x, w), jax.jacrev(f, 1)(x, w), atol=1e-6)
    jitted = jax.jit(lambda a, b, t: jax.jvp(f, (a, b), (t, b))[1])
    _, ty0 = jax.jvp(lambda a, b: brute_force("max_min", a, b), (x, w), (x, w))
    np.testing.assert_allclose(jitted(x, w, x), ty0, rtol=1e-5, atol=1e-6)


def test_dot_general_jvp():
    rng = np.random.default_rng(4)
    a, ta = (jnp.asarray(rng.standard_normal((3, 4)), jnp.float32) for _ in range(2))
    b = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    _, t = jax.jvp(lambda a: jaxconv.dot_general(a, b, dn, op="min_plus"), (a,), (ta,))
    _, t0 = jax.jvp(lambda a: jnp.min(a[:, :, None] + b[None], axis=1), (a,), (ta,))
    np.testing.assert_allclose(t, t0, rtol=1e-6)


@pytest.mark.parametrize("name", ["xnor", "adder"])
def test_reverse_only_ops_raise_clear_error(name):
    x = jnp.ones((1, 4, 2))
    w = jnp.ones((3, 2, 2))
    f = lambda x: jaxconv.conv_general_dilated(  # noqa: E731
        x, w, (1,), "SAME", dimension_numbers=DN, op=name)
    with pytest.raises(TypeError, match=f"op '{name}'.*reverse-mode"):
        jax.jvp(f, (x,), (x,))


def test_hessian_of_dense_log():
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))

    def f(b):
        return jnp.sum(jaxconv.dot_general(a, b, dn, op="log") ** 2)

    def formula(b):
        return jnp.sum(jax.nn.logsumexp(a[:, :, None] + b[None], axis=1) ** 2)

    np.testing.assert_allclose(jax.hessian(f)(b), jax.hessian(formula)(b), rtol=1e-4,
                               atol=1e-5)

"""Kernel convolutions (polynomial, gaussian, sharpened cosine) against loop references."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import ops

DN = ("NHWC", "HWIO", "NHWC")


def _windows(x, kh, kw, pad):
    """Yields (n, i, j, window (kh, kw, C), in-bounds mask) for a stride-1 'SAME'/'VALID' conv."""
    n, h, w, c = x.shape
    (plo_h, phi_h), (plo_w, phi_w) = pad
    oh, ow = h + plo_h + phi_h - kh + 1, w + plo_w + phi_w - kw + 1
    for b, i, j in itertools.product(range(n), range(oh), range(ow)):
        win = np.zeros((kh, kw, c))
        mask = np.zeros((kh, kw), bool)
        for a, e in itertools.product(range(kh), range(kw)):
            r, s = i + a - plo_h, j + e - plo_w
            if 0 <= r < h and 0 <= s < w:
                win[a, e] = x[b, r, s]
                mask[a, e] = True
        yield b, i, j, win, mask


def _loop(x, w, pad, f):
    kh, kw, _, o = w.shape
    out = {}
    for b, i, j, win, mask in _windows(x, kh, kw, pad):
        for co in range(o):
            out[b, i, j, co] = f(win, mask, w[..., co])
    shape = tuple(max(k[d] for k in out) + 1 for d in range(4))
    res = np.zeros(shape)
    for k, v in out.items():
        res[k] = v
    return res


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 5, 4, 3)).astype(np.float32)
    w = rng.uniform(-1, 1, (3, 2, 3, 4)).astype(np.float32)
    return x, w


def test_polynomial(data):
    x, w = data
    op = ops.polynomial(c=0.5, p=3)
    got = jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, op=op)
    want = _loop(x.astype(np.float64), w.astype(np.float64), ((1, 1), (0, 1)),
                 lambda win, m, k: (np.sum(win * k * m[..., None]) + 0.5) ** 3)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_gaussian_skips_padded_taps(data):
    x, w = data
    op = ops.gaussian(gamma=0.3)
    got = jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN, op=op)
    want = _loop(x.astype(np.float64), w.astype(np.float64), ((1, 1), (0, 1)),
                 lambda win, m, k: np.exp(-0.3 * np.sum(((win - k) ** 2) * m[..., None])))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_sharpened_cosine(data):
    x, w = data
    p, q = 1.7, 0.1
    got = jaxconv.sharpened_cosine_conv(x, w, (1, 1), "VALID", dimension_numbers=DN, p=p, q=q,
                                        eps=0.0)

    def f(win, m, k):
        s = np.sum(win * k)
        return np.sign(s) * abs(s / ((np.linalg.norm(win) + q) * (np.linalg.norm(k) + q))) ** p

    want = _loop(x.astype(np.float64), w.astype(np.float64), ((0, 0), (0, 0)), f)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    g = jax.grad(lambda w: jnp.sum(jaxconv.sharpened_cosine_conv(
        x, w, (1, 1), "VALID", dimension_numbers=DN, p=p, q=q)))(jnp.asarray(w))
    assert np.all(np.isfinite(g))


def test_factories_hashable_and_validated():
    assert ops.polynomial(1.0, 2) == ops.polynomial(c=1, p=2.0)
    assert hash(ops.gaussian(2.0)) == hash(ops.gaussian(2))
    assert ops.polynomial(1.0, 2) != ops.polynomial(1.0, 3)
    jax.jit(lambda x, op: x, static_argnums=1)(1.0, ops.gaussian(1.0))
    with pytest.raises(ValueError, match="gamma"):
        ops.gaussian(-1.0)
    with pytest.raises(TypeError, match="`p`"):
        ops.polynomial(1.0, "2")


def test_dense_and_gradient():
    rng = np.random.default_rng(1)
    a = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
    dn = (((1,), (0,)), ((), ()))
    op = ops.gaussian(0.2)
    got = jaxconv.dot_general(a, b, dn, op=op)
    want = jnp.exp(-0.2 * jnp.sum((a[:, :, None] - b[None]) ** 2, axis=1))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    g1 = jax.grad(lambda b: jnp.sum(jaxconv.dot_general(a, b, dn, op=op)))(b)
    g2 = jax.grad(lambda b: jnp.sum(jnp.exp(-0.2 * jnp.sum((a[:, :, None] - b[None]) ** 2, 1))))(b)
    np.testing.assert_allclose(g1, g2, rtol=1e-4, atol=1e-6)

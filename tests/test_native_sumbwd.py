"""The sums' one-pass backward (adder, l1, l2_exact) against their stated rules in float64:
the dense pass (csrc/kernel_sumbwd_dense.h: positions outside, output channels inside) on
ragged shapes, and l2_exact's native gradients keeping their precision where x ~ w (each
term's g * (x - w) summed, no cancellation of x * sum(g) against sum(g * w))."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv

DN = (((1,), (0,)), ((), ()))


def _rule(name: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray):
    """The op's stated gradients of a dense product, brute force in float64.

    Args:
        name: ``adder``, ``l1`` or ``l2_exact``.
        x: the input ``(P, I)``.
        w: the kernel ``(I, O)``.
        ct: the output's cotangent ``(P, O)``.

    Returns:
        ``(dx, dw)``.
    """
    d = x.astype(np.float64)[:, :, None] - w.astype(np.float64)[None]  # (P, I, O)
    g = ct.astype(np.float64)[:, None, :]
    if name == "adder":  # AdderNet: dx = sum g clip(w - x, -1, 1), dw = sum g (x - w)
        return np.sum(g * np.clip(-d, -1, 1), axis=2), np.sum(g * d, axis=0)
    if name == "l1":
        return -np.sum(g * np.sign(d), axis=2), np.sum(g * np.sign(d), axis=0)
    return -2 * np.sum(g * d, axis=2), 2 * np.sum(g * d, axis=0)


def _grads(name: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray):
    """The native dense product's gradients for the cotangent ``ct``."""

    def f(a, b):
        return jaxconv.dot_general(a, b, DN, op=name, engine="native")

    _, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
    return tuple(np.asarray(v) for v in vjp(jnp.asarray(ct)))


# 272 input channels: 8 blocks of two vectors and a last one of one (W = 16; on AVX2's W = 8,
# 17 blocks); 13 positions: two tiles of 6 and one of 1; 136 output channels: two blocks of
# 64 and a ragged one of 8. Integer data: many x == w (l1's zero subgradient).
@pytest.mark.parametrize("name", ["adder", "l1", "l2_exact"])
def test_dense_pass_follows_the_stated_rules(name):
    rng = np.random.default_rng(31)
    x = rng.integers(-3, 4, (13, 272)).astype(np.float32)
    w = rng.integers(-3, 4, (272, 136)).astype(np.float32)
    ct = rng.standard_normal((13, 136)).astype(np.float32)
    dx, dw = _grads(name, x, w, ct)
    rdx, rdw = _rule(name, x, w, ct)
    scale = 1.0 if name != "l2_exact" else 10.0
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_l2_exact_gradients_do_not_cancel(kind):
    """Data at 1000 +- 0.01: x * sum(g) and sum(g * w) agree to ~6 digits, so the expanded
    form's gradients would keep about one (relative error ~1e-2); the native pass's terms
    g * (x - w) keep a product's rounding."""
    rng = np.random.default_rng(7)
    if kind == "dense":
        x = (1000 + 0.01 * rng.standard_normal((24, 256))).astype(np.float32)
        w = (1000 + 0.01 * rng.standard_normal((256, 64))).astype(np.float32)
        ct = rng.standard_normal((24, 64)).astype(np.float32)
        dx, dw = _grads("l2_exact", x, w, ct)
        rdx, rdw = _rule("l2_exact", x, w, ct)
    else:
        x = (1000 + 0.01 * rng.standard_normal((2, 6, 6, 32))).astype(np.float32)
        w = (1000 + 0.01 * rng.standard_normal((3, 3, 32, 16))).astype(np.float32)
        kw = dict(
            window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )

        def f(a, b):
            return jaxconv.conv_general_dilated(a, b, op="l2_exact", engine="native", **kw)

        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
        ct = rng.standard_normal(y.shape).astype(np.float32)
        dx, dw = (np.asarray(v) for v in vjp(jnp.asarray(ct)))
        # The same sums in float64: each output's window as a dense product's row.
        xd, wd, g = x.astype(np.float64), w.astype(np.float64), ct.astype(np.float64)
        rdx, rdw = np.zeros_like(xd), np.zeros_like(wd)
        for i in range(3):
            for j in range(3):
                d = xd[:, i : i + 4, j : j + 4, :, None] - wd[i, j][None, None, None]
                t = g[:, :, :, None, :] * d  # (N, 4, 4, I, O)
                rdx[:, i : i + 4, j : j + 4, :] += -2 * t.sum(axis=4)
                rdw[i, j] = 2 * t.sum(axis=(0, 1, 2))
    for got, ref in ((dx, rdx), (dw, rdw)):
        err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
        assert err < 1e-5, err

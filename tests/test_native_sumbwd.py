"""The sums' one-pass backward (adder, l1, l2_exact) against their stated rules in float64:
the dense pass (csrc/kernel_sumbwd_dense.h: positions outside, output channels inside) on
ragged shapes, and l2_exact's native gradients keeping their precision where x ~ w (each
term's g * (x - w) summed, no cancellation of x * sum(g) against sum(g * w)), on both of
its routes (``JAXCONV_NATIVE_L2``: centred standard products, or the sums' kernel)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import l2_route

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

    # Jitted, a new function per call: a route is read when the call is traced.
    grads = jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))
    return tuple(np.asarray(v) for v in grads(x, w, ct))


# 272 input channels: 8 blocks of two vectors and a last one of one (W = 16; on AVX2's W = 8,
# 34 blocks of one vector, kDenseV = 1); 13 positions: two tiles of 6 and one of 1; 136 output channels: two blocks of
# 64 and a ragged one of 8. Integer data: many x == w (l1's zero subgradient).
# The l2_exact cases on the kernel's route too, and 20 input channels (not whole vectors:
# the one-pass dense loop of an odd rule, dense_odd_backward).
@pytest.mark.parametrize(
    "name, route, i",
    [
        ("adder", "products", 272),
        ("l1", "products", 272),
        ("l2_exact", "products", 272),
        ("l2_exact", "native", 272),
        ("l2_exact", "native", 20),
    ],
)
def test_dense_pass_follows_the_stated_rules(name, route, i):
    rng = np.random.default_rng(31)
    x = rng.integers(-3, 4, (13, i)).astype(np.float32)
    w = rng.integers(-3, 4, (i, 136)).astype(np.float32)
    ct = rng.standard_normal((13, 136)).astype(np.float32)
    with l2_route.chosen(route):
        dx, dw = _grads(name, x, w, ct)
    rdx, rdw = _rule(name, x, w, ct)
    scale = 1.0 if name != "l2_exact" else 10.0
    np.testing.assert_allclose(dx, rdx, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(dw, rdw, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("route", l2_route.ROUTES)
@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_l2_exact_gradients_do_not_cancel(kind, route):
    """Data at 1000 +- 0.01: x * sum(g) and sum(g * w) agree to ~6 digits, so the expanded
    form's gradients would keep about one (relative error ~1e-2); the native pass's terms
    g * (x - w) keep a product's rounding."""
    rng = np.random.default_rng(7)
    if kind == "dense":
        x = (1000 + 0.01 * rng.standard_normal((24, 256))).astype(np.float32)
        w = (1000 + 0.01 * rng.standard_normal((256, 64))).astype(np.float32)
        ct = rng.standard_normal((24, 64)).astype(np.float32)
        with l2_route.chosen(route):
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

        ct = rng.standard_normal((2, 4, 4, 16)).astype(np.float32)
        with l2_route.chosen(route):
            grads = jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))
            dx, dw = (np.asarray(v) for v in grads(x, w, ct))
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


# 32 input channels: the paired pass; 20: the per-gradient loops (dx_block / dw_block's
# ragged rows). Groups, a stride and padding, with and without a pad value (the pad row's
# terms feed the kernel gradient only).
@pytest.mark.parametrize("pad_value", [None, 0.5])
@pytest.mark.parametrize("i, groups", [(32, 1), (20, 2)])
def test_l2_exact_native_route_matches_per_product_gradients(i, groups, pad_value):
    """l2_exact's kernel route against the XLA engine's per-product gradients."""
    rng = np.random.default_rng(41)
    x = rng.standard_normal((2, 7, 6, i * groups)).astype(np.float32)
    w = rng.standard_normal((3, 3, i, 24)).astype(np.float32)
    op = jaxconv.ops.l2_exact.replace(pad_value=pad_value)
    kw = dict(
        window_strides=(1, 2),
        padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )

    def grads(engine):
        def f(a, b):
            return jaxconv.conv_general_dilated(a, b, op=op, engine=engine, **kw)

        y = f(x, w)
        ct = np.random.default_rng(42).standard_normal(y.shape).astype(np.float32)
        return [np.asarray(v) for v in jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))(x, w, ct)]

    with l2_route.chosen("native"):
        got = grads("native")
    with jax.numpy_rank_promotion("allow"):
        ref = grads("xla")
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.max(np.abs(b)))

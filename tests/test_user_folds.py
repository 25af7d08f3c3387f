"""Native user kernels beyond sum / max / min (issue 22 items 1 and 3).

A callable ``reduce`` that is none of the built-in ones is compiled as the kernel's fold
(``csrc/kernel_fold.h``) in the XLA engine's order; combines with custom derivative rules
(``jax.custom_vjp`` / ``jax.custom_jvp``) compute their primal in the kernel and their
gradient from the user's rule. Values are checked against the numpy loop reference and the
XLA engine, gradients against the XLA engine (JAX's derivative of its generic fold) and an
explicit formula of the user's rule.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import assert_grads_match_xla, data, loop_reference, table
from geometries import conv as _conv
from geometries import grads as _grads
from native_checks import (
    assert_gradients_match_finite_differences,
    assert_gradients_match_xla,
    assert_matches_reference_and_xla,
    assert_specials_as_xla,
)

import jaxconv
from jaxconv._src.engines import native

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

F32 = np.float32


def smoothed_max(a, b):
    """A softplus-smoothed max (associative: 0.5 * logaddexp(2a, 2b))."""
    return 0.5 * jnp.logaddexp(a / 0.5, b / 0.5)


def scaled_max(a, b):
    """max written through exact scalings: not recognised as the built-in max, and equal
    operands split the cotangent (jnp.maximum's rule)."""
    return 2.0 * jnp.maximum(a / 2.0, b / 2.0)


def _np_smoothed_max(a, b):
    return 0.5 * np.logaddexp(2 * a, 2 * b)


def _np_prob_or(a, b):
    return a + b - a * b


def _np_sigmoid_mul(x, w):
    return 1.0 / (1.0 + np.exp(-(x * w)))


@jax.custom_vjp
def ste(v):
    """A straight-through sign as users write it (larq's rule: 1{|v| <= 1})."""
    return jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype)


ste.defvjp(lambda v: (ste(v), v),
           lambda v, g: (g * (jnp.abs(v) <= 1.0).astype(g.dtype),))


@jax.custom_jvp
def ste_round(v):
    """Rounding with an identity derivative (a custom JVP)."""
    return jnp.round(v)


ste_round.defjvp(lambda p, t: (ste_round(p[0]), t[0]))


@jax.custom_vjp
def adder_rule(x, w):
    """AdderNet's product with its rule, a custom VJP of both operands."""
    return -jnp.abs(x - w)


adder_rule.defvjp(lambda x, w: (-jnp.abs(x - w), (x, w)),
                  lambda r, g: (g * jnp.clip(r[1] - r[0], -1.0, 1.0), g * (r[0] - r[1])))


@jax.custom_vjp
def ste_int(v):
    """A straight-through sign whose backward is written with Python int literals."""
    return jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype)


ste_int.defvjp(lambda v: (ste_int(v), v),
               lambda v, g: (g * jnp.where(jnp.abs(v) <= 1, 1, 0),))


@jax.custom_vjp
def clipped_cotangent(v):
    """A sign whose backward is not linear in the cotangent."""
    return jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype)


clipped_cotangent.defvjp(lambda v: (clipped_cotangent(v), v),
                         lambda v, g: (jnp.clip(g, -0.5, 0.5),))


FOLDS = {
    # name: (op, numpy combine, numpy fold, identity)
    "softplus_max": (jaxconv.Op(lambda x, w: x * w, smoothed_max, identity=-math.inf),
                     np.multiply, _np_smoothed_max, -math.inf),
    "prob_or": (jaxconv.Op(lambda x, w: jax.nn.sigmoid(x * w), lambda a, b: a + b - a * b,
                           identity=0.0), _np_sigmoid_mul, _np_prob_or, 0.0),
    "softplus_max_pad": (jaxconv.Op(lambda x, w: x - w, smoothed_max, identity=-math.inf,
                                    pad_value=-1.5),
                         np.subtract, _np_smoothed_max, -math.inf),
    "scaled_max": (jaxconv.Op(lambda x, w: x + w, scaled_max, identity=-math.inf),
                   np.add, np.maximum, -math.inf),
}
GEOMETRIES = table("2d_same", "1d_stride", "rhs_dil_groups", "depthwise", "lhs_dil_empty", "wide")
COVER = [("softplus_max", "2d_same"), ("softplus_max", "wide"), ("prob_or", "rhs_dil_groups"),
         ("prob_or", "lhs_dil_empty"), ("softplus_max_pad", "1d_stride"),
         ("softplus_max_pad", "depthwise"), ("scaled_max", "2d_same")]


def _data(geometry, seed=0, specials=False, ties=False):
    return data(GEOMETRIES[geometry], seed, specials, ties)


_reference = loop_reference


# --- callable folds ---------------------------------------------------------------------------

@pytest.mark.parametrize("name, geometry", COVER)
def test_fold_matches_reference_and_xla(name, geometry):
    op, combine, fold, identity = FOLDS[name]
    x, w, kw = _data(geometry)
    assert_matches_reference_and_xla(op, kw, x, w, combine, fold, identity)


@pytest.mark.parametrize("name, geometry", [("softplus_max", "rhs_dil_groups"),
                                            ("prob_or", "wide"),
                                            ("softplus_max_pad", "1d_stride"),
                                            ("scaled_max", "lhs_dil_empty"),
                                            ("softplus_max", "depthwise")])
def test_fold_gradients_match_xla_engine(name, geometry):
    op = FOLDS[name][0]
    x, w, kw = _data(geometry, seed=4)
    assert_gradients_match_xla(op, kw, x, w, seed=5)


def test_fold_gradient_matches_finite_differences():
    op, combine, fold, identity = FOLDS["softplus_max"]
    x, w, kw = _data("1d_stride", seed=6)
    ct = np.random.default_rng(7).standard_normal(
        _conv(op, "native", kw)(x, w).shape).astype(F32)
    gx, gw = _grads(op, "native", kw, x, w, ct)

    def f(a, b):
        y = _reference(a, b, kw, combine, fold, identity, None)
        return float(np.sum(y * ct))

    assert_gradients_match_finite_differences(f, x.astype(np.float64), w.astype(np.float64),
                                              (gx, gw), eps=1e-5, seed=8)


@pytest.mark.parametrize("name", ["softplus_max", "prob_or", "scaled_max"])
def test_fold_nan_and_infinity_as_the_xla_engine(name):
    op = FOLDS[name][0]
    x, w, kw = _data("2d_same", seed=3, specials=True)
    assert_specials_as_xla(op, kw, x, w)


@pytest.mark.parametrize("name", ["softplus_max", "prob_or"])
def test_fold_gradients_with_nan_and_infinity_as_the_xla_engine(name):
    op = FOLDS[name][0]
    x, w, kw = _data("2d_same", seed=3, specials=True)
    ct = np.random.default_rng(5).standard_normal(
        _conv(op, "xla", kw)(x, w).shape).astype(F32)
    got = _grads(op, "native", kw, x, w, ct)
    with jax.numpy_rank_promotion("allow"):
        want = _grads(op, "xla", kw, x, w, ct)
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert np.isnan(b).any()
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_fold_ties_gradients_as_the_xla_engine():
    # max inside the fold: equal operands split the cotangent as jnp.maximum's rule does.
    op = FOLDS["scaled_max"][0]
    x, w, kw = _data("2d_same", seed=11, ties=True)
    assert_gradients_match_xla(op, kw, x, w, seed=12)


def test_fold_explain_says_native_forward_and_backward():
    # (softplus_max is a logsumexp at temperature 0.5: tests/test_tempered_reduce.py.)
    plan = jaxconv.explain(FOLDS["prob_or"][0], platform="cpu")
    assert plan.engine == "native"
    text = " ".join(plan.details)
    assert "callable reduce compiled as the kernel's fold" in text
    assert "gradient" in text and "natively" in text


# --- combines with custom derivative rules ------------------------------------------------------

RULE_OPS = {
    "ste_of_product": jaxconv.Op(lambda x, w: ste(x * w), "sum"),
    "library_ste_sign": jaxconv.Op(lambda x, w: jaxconv.quantizers.ste_sign(x * w), "sum"),
    "relu_diff_max": jaxconv.Op(lambda x, w: jax.nn.relu(x - w), "max"),
    "round_ste_sum": jaxconv.Op(lambda x, w: ste_round(2.0 * x * w), "sum"),
    "adder_rule_min": jaxconv.Op(adder_rule, "min", pad_value=0.5),
    "ste_int_literals": jaxconv.Op(lambda x, w: ste_int(x * w), "sum"),
}


@pytest.mark.parametrize("name", sorted(RULE_OPS))
def test_rule_combines_run_natively_and_explain_says_so(name):
    plan = jaxconv.explain(RULE_OPS[name], platform="cpu")
    assert plan.engine == "native", plan
    assert any("compiled user kernel" in d for d in plan.details)
    assert any("custom derivative rule runs per product" in d for d in plan.details)


@pytest.mark.parametrize("name, geometry", [("ste_of_product", "2d_same"),
                                            ("library_ste_sign", "rhs_dil_groups"),
                                            ("relu_diff_max", "wide"),
                                            ("round_ste_sum", "1d_stride"),
                                            ("adder_rule_min", "depthwise"),
                                            ("ste_int_literals", "2d_same")])
def test_rule_combines_match_xla_values_and_gradients(name, geometry):
    op = RULE_OPS[name]
    x, w, kw = _data(geometry, seed=21, ties=name == "relu_diff_max")
    got = np.asarray(_conv(op, "native", kw)(x, w))
    with jax.numpy_rank_promotion("allow"):
        want = np.asarray(_conv(op, "xla", kw)(x, w))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    ct = np.random.default_rng(22).standard_normal(got.shape).astype(F32)
    assert_grads_match_xla(op, kw, x, w, ct)


def test_ste_gradient_is_the_users_rule_exactly():
    # sign(x w) forward; d/dx = sum_o g * 1{|x w| <= 1} * w (larq's rule), by numpy.
    rng = np.random.default_rng(31)
    x = rng.uniform(-2, 2, (9, 24)).astype(F32)
    w = rng.uniform(-2, 2, (24, 20)).astype(F32)
    g = rng.standard_normal((9, 20)).astype(F32)
    dn = (((1,), (0,)), ((), ()))
    op = RULE_OPS["ste_of_product"]

    def loss(a, b):
        return jnp.sum(jaxconv.dot_general(a, b, dn, op=op, engine="native") * g)

    y = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=op, engine="native"))(x, w)
    prod = x[:, :, None].astype(np.float64) * w[None].astype(np.float64)
    np.testing.assert_array_equal(np.asarray(y), np.where(prod >= 0, 1.0, -1.0).sum(1))
    gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
    inside = (np.abs(x[:, :, None] * w[None]) <= 1.0).astype(np.float64)
    want_x = np.einsum("po,pko,ko->pk", g, inside, w)
    want_w = np.einsum("po,pko,pk->ko", g, inside, x)
    np.testing.assert_allclose(np.asarray(gx), want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gw), want_w, rtol=1e-5, atol=1e-5)


def test_float_truncated_to_an_integer_is_not_translated():
    """Int literals take the operands' dtype; a float converted to an integer (truncation)
    is not held that way: it stays on the XLA engine, and explain says why."""
    op = jaxconv.Op(lambda x, w: (x * w).astype(jnp.int32).astype(x.dtype), "max")
    plan = jaxconv.explain(op, platform="cpu")
    assert plan.engine == "xla"
    assert any("not native" in d and "int32" in d for d in plan.details), plan.details


def test_rule_not_linear_in_the_cotangent_stays_on_the_xla_engine():
    op = jaxconv.Op(lambda x, w: clipped_cotangent(x * w), "sum")
    plan = jaxconv.explain(op, platform="cpu")
    assert plan.engine == "xla"
    assert any("not native" in d and "not linear in the cotangent" in d for d in plan.details)


def test_fold_under_vmap_is_the_batched_call():
    op = FOLDS["softplus_max"][0]
    x, w, kw = _data("2d_same", seed=13)
    f = _conv(op, "native", kw)
    mapped = np.asarray(jax.vmap(lambda a, b: f(a[None], b)[0])(x, np.stack([w, -w])))
    for k, wk in enumerate((w, -w)):
        np.testing.assert_array_equal(mapped[k], np.asarray(f(x[k:k + 1], wk))[0])


@pytest.mark.parametrize("scale", [0.25, -8.0, 2.0 ** -126])
def test_division_by_a_power_of_two_is_exact(scale):
    # Compiled as a multiply by the reciprocal: the same bits as the division.
    special = np.array([-7.25, -1.0, -0.0, 0.0, 1e-30, 3.0, 1e30, 3e38, np.inf, -np.inf,
                        np.nan], F32)
    op = jaxconv.Op(lambda x, w: (x - w) / scale, "max")
    x, w = special.reshape(-1, 1), special.reshape(1, -1)
    dn = (((1,), (0,)), ((), ()))
    got = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=op, engine="native"))(x, w)
    with np.errstate(all="ignore"):
        want = (x - w) / F32(scale)
    np.testing.assert_array_equal(np.asarray(got), want)

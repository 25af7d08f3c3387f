"""A callable reduce ``c * logaddexp(a / c, b / c)``: a logsumexp at temperature ``c``.

Recognised from its traced program and probe pairs (`capabilities.smoothing_temperature`), on a
covering set of spellings and near misses that must stay folds; the recognised op runs as
``c`` times the built-in logsumexp of ``combine / c`` (`factoring.factored_form`). Values
against the numpy loop reference folding with the plain formula (NaN and infinities
included), gradients against ``jax.grad`` of a brute-force formulation folding tap by tap
with the user's own callable (the fold path's math), on the engine ``"auto"`` picks and on
the XLA engine.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import assert_grads_match_brute_force
from reference import conv_reference

import jaxconv
from jaxconv._src.core import factoring
from jaxconv._src.core.capabilities import capabilities, smoothing_temperature
from jaxconv._src.engines import native

DN = ("NHWC", "HWIO", "NHWC")


def _tempered(c):
    def fold(a, b):
        return c * jnp.logaddexp(a / c, b / c)
    return fold


def _softplus_form(c):
    def fold(a, b):
        return jnp.maximum(a, b) + c * jax.nn.softplus(-jnp.abs(a - b) / c)
    return fold


def _by_reciprocal(c):
    def fold(a, b):
        return c * jnp.logaddexp(a * (1.0 / c), b * (1.0 / c))
    return fold


def _np_tempered(c):
    def fold(a, b):
        with np.errstate(invalid="ignore"):
            return c * np.logaddexp(a / c, b / c)
    return fold


FOLDS = {
    # name: (fold, temperature recognised)
    "lae_0.5": (_tempered(0.5), 0.5),
    "lae_2": (_tempered(2.0), 2.0),
    "lae_0.1": (_tempered(0.1), 0.1),
    "lae_neg_0.5": (_tempered(-0.5), -0.5),  # a smoothed min
    "softplus_0.5": (_softplus_form(0.5), 0.5),
    "reciprocal_0.25": (_by_reciprocal(0.25), 0.25),
    # Near misses: folds (or a plain logsumexp, recognised_reduce's), not a temperature.
    "lae_1": (_tempered(1.0), None),
    "mixed_scales": (lambda a, b: 0.5 * jnp.logaddexp(a / 0.5, b / 0.25), None),
    "lae_plus_one": (lambda a, b: jnp.logaddexp(a, b) + 1.0, None),
    "tempered_plus_eps": (lambda a, b: 0.5 * jnp.logaddexp(a / 0.5, b / 0.5) + 1e-3, None),
    "outer_scale_only": (lambda a, b: 0.5 * jnp.logaddexp(a, b), None),
    "naive_tempered": (lambda a, b: 0.5 * jnp.log(jnp.exp(a / 0.5) + jnp.exp(b / 0.5)), None),
    "scaled_max": (lambda a, b: 2.0 * jnp.maximum(a / 2.0, b / 2.0), None),
}


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_smoothing_temperature(name):
    fold, want = FOLDS[name]
    got = smoothing_temperature(fold)
    assert got == (None if want is None else float(np.float32(want)))


@pytest.mark.parametrize("name, identity, want", [
    ("lae_0.5", -math.inf, 0.5),
    ("lae_0.5", math.inf, None),  # not its identity: stays a fold
    ("lae_neg_0.5", math.inf, -0.5),
    ("lae_neg_0.5", -math.inf, None),
    ("mixed_scales", -math.inf, None),
])
def test_temperature_needs_the_identity(name, identity, want):
    op = jaxconv.Op(lambda x, w: x * w, FOLDS[name][0], identity=identity)
    caps = capabilities(op)
    assert caps.temperature == want  # (float32 literals: exact for these)
    assert caps.reduce == "custom"
    form = factoring.factored_form(op, jnp.float32)
    if want is None:
        assert form is None or form.temperature is None
    else:
        assert form.temperature == want and form.inner.reduce == "logsumexp"


def _ours(op, engine):
    def f(a, b):
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, op=op,
                                            engine=engine)
    return f


CASES = [
    # (fold name, temperature c, combine, numpy combine, engine)
    ("lae_0.5", 0.5, lambda a, b: a * b, np.multiply, "auto"),
    ("lae_2", 2.0, lambda a, b: a + b, np.add, "xla"),
    ("lae_neg_0.5", -0.5, lambda a, b: a * b, np.multiply, "auto"),
    ("softplus_0.5", 0.5, lambda a, b: jnp.tanh(a) * b, lambda a, b: np.tanh(a) * b, "auto"),
    ("lae_1", 1.0, lambda a, b: -(a - b) ** 2, lambda a, b: -(a - b) ** 2, "auto"),
    ("reciprocal_0.25", 0.25, lambda a, b: a - b, np.subtract, "xla"),
]


@pytest.mark.parametrize("name, c, combine, np_combine, engine", CASES)
def test_values_and_gradients(name, c, combine, np_combine, engine):
    fold = FOLDS[name][0]
    identity = -math.inf if c > 0 else math.inf
    op = jaxconv.Op(combine, fold, identity=identity)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    ref = conv_reference(x, w, (1, 1), "SAME", None, None, DN, combine=np_combine,
                         reduce=_np_tempered(c), identity=identity)
    ours = _ours(op, engine)
    np.testing.assert_allclose(np.asarray(ours(x, w)), ref, rtol=2e-5, atol=2e-5)
    ct = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    assert_grads_match_brute_force(ours, x, w, ct, combine, fold, 2e-4, 2e-5)


@pytest.mark.parametrize("c, engine", [(0.5, "auto"), (2.0, "xla"), (-0.5, "auto")])
def test_nan_and_infinities(c, engine):
    identity = -math.inf if c > 0 else math.inf
    op = jaxconv.Op(lambda a, b: a + b, _tempered(c), identity=identity, pad_value=0.0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 3, 4)).astype(np.float32)
    x[0, 1, 1, :] = -np.inf      # a window whose centre terms are all -inf
    x[0, 3, 2, 0] = np.inf
    x[1, 2, 2, 1] = np.nan
    x[1, 0, 0, :] = np.inf
    w[0, 0, 2, 3] = -np.inf
    ref = conv_reference(x, w, (1, 1), "SAME", None, None, DN, combine=np.add,
                         reduce=_np_tempered(c), identity=identity, pad_value=0.0)
    got = np.asarray(_ours(op, engine)(x, w))
    assert np.isnan(ref).any() and np.isinf(ref).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=2e-5)


def test_empty_windows_are_the_identity():
    # lhs dilation leaves windows that read no input cell: the op's identity (+inf for c < 0).
    for c in (0.5, -0.5):
        identity = -math.inf if c > 0 else math.inf
        op = jaxconv.Op(lambda a, b: a * b, _tempered(c), identity=identity)
        x = np.ones((1, 3, 1), np.float32)
        w = np.ones((1, 1, 2), np.float32)
        y = jaxconv.conv_general_dilated(x, w, (1,), [(0, 0)], lhs_dilation=(2,),
                                         dimension_numbers=("NWC", "WIO", "NWC"), op=op)
        np.testing.assert_array_equal(np.asarray(y)[0, :, 0], [1.0, identity, 1.0, identity,
                                                               1.0])


@pytest.mark.parametrize("dtype, c, tol", [("float32", 0.5, 2e-5), ("float64", 0.1, 1e-12)])
def test_dense_values_match_the_reference(dtype, c, tol):
    # float64: the temperature is the literal in float64 (float32's 0.1 would be off by 1e-8).
    op = jaxconv.Op(lambda a, b: a * b, _tempered(c), identity=-math.inf)
    rng = np.random.default_rng(2)
    with jax.enable_x64(dtype == "float64"):
        x = rng.standard_normal((5, 7)).astype(dtype)
        w = rng.standard_normal((7, 3)).astype(dtype)
        y = jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op=op)
        assert y.dtype == np.dtype(dtype)
    prod = x[:, :, None].astype(np.float64) * w[None]
    want = c * np.logaddexp.reduce(prod / c, axis=1)
    np.testing.assert_allclose(np.asarray(y), want, rtol=tol, atol=tol)


def test_explain_says_what_happens():
    op = jaxconv.Op(lambda a, b: a * b, _tempered(0.5), identity=-math.inf)
    plan = jaxconv.explain(op, platform="cpu")
    text = " ".join(plan.details)
    assert "c * logaddexp(a / c, b / c) with c = 0.5" in text
    assert "built-in 'logsumexp'" in text
    assert "kernel's fold" not in text and "generic fold" not in text
    if native.available():
        assert plan.engine == "native"
    prob_or = jaxconv.Op(lambda a, b: a * b, lambda a, b: a + b - a * b, identity=0.0)
    fold = jaxconv.explain(prob_or, platform="cpu")
    assert not any("logaddexp(a / c" in d for d in fold.details)


@pytest.mark.parametrize("c, engine", [(0.5, "auto"), (-2.0, "xla")])
def test_spreads_beyond_exp_range(c, engine):
    # Terms / c spread far beyond 88 (exp's float32 range): the running maximum keeps the
    # values and the softmax-weight gradients finite and equal to the user's fold's.
    fold = _tempered(c)
    identity = -math.inf if c > 0 else math.inf
    op = jaxconv.Op(lambda a, b: a + b, fold, identity=identity)
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1, 4, 4, 2)) * 300).astype(np.float32)
    w = (rng.standard_normal((3, 3, 2, 3)) * 300).astype(np.float32)
    ref = conv_reference(x, w, (1, 1), "SAME", None, None, DN, combine=np.add,
                         reduce=_np_tempered(c), identity=identity)
    ours = _ours(op, engine)
    np.testing.assert_allclose(np.asarray(ours(x, w)), ref, rtol=1e-5, atol=1e-3)
    ct = jnp.asarray(rng.standard_normal(ref.shape), jnp.float32)
    got = assert_grads_match_brute_force(ours, x, w, ct, lambda p, q: p + q, fold, 1e-4, 1e-4)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)

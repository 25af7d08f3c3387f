"""User ops whose combine is a built-in's run on the built-in kernels (``native/twins.py``).

A covering set of the five pairs (the combine written several ways, the reduce as a string or
a callable) on one geometry with ties, NaN and infinities: the native result equals the
numpy loop reference, the XLA engine and the built-in op bit for bit, the gradients equal the
XLA engine's (ties split equally) and the built-in's; near misses stay user kernels.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from geometries import GEOMETRIES, conv, data, grads, loop_reference
from native_checks import assert_gradients_match_xla

import jaxconv
from jaxconv._src.engines import native
from jaxconv._src.engines.native.twins import builtin_twin

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

INF = math.inf
# name: (user op, its built-in twin, numpy combine, numpy reduce, identity)
TWINS = {
    "fuzzy_max_min": (jaxconv.Op(lambda a, b: jnp.minimum(a, b), lambda a, b: jnp.maximum(a, b),
                                 identity=-INF, name="fuzzy"), jaxconv.ops.max_min,
                      np.minimum, np.maximum, -INF),
    "min_max": (jaxconv.Op(jax.lax.max, jnp.minimum, identity=INF), jaxconv.ops.min_max,
                np.maximum, np.minimum, INF),
    "min_plus": (jaxconv.Op(lambda a, b: b + a, "min"), jaxconv.ops.min_plus, np.add,
                 np.minimum, INF),
    "max_plus": (jaxconv.Op(jnp.add, "max", identity=-INF), jaxconv.ops.max_plus, np.add,
                 np.maximum, -INF),
    "log": (jaxconv.Op(lambda a, b: a + b, jnp.logaddexp, identity=-INF), jaxconv.ops.log,
            np.add, np.logaddexp, -INF),
}


@pytest.mark.parametrize("name, specials", [("fuzzy_max_min", False), ("fuzzy_max_min", True),
                                            ("min_max", True), ("min_plus", False),
                                            ("max_plus", True), ("log", False)])
def test_twin_is_the_builtin(name, specials):
    op, builtin, combine, reduce, identity = TWINS[name]
    assert builtin_twin(op).native == builtin.native
    x, w, kw = data(GEOMETRIES["2d_same"], seed=1, specials=specials, ties=not specials)
    got = np.asarray(conv(op, "native", kw)(x, w))
    np.testing.assert_array_equal(got, np.asarray(conv(builtin, "native", kw)(x, w)))
    with jax.numpy_rank_promotion("allow"):
        xla = np.asarray(conv(op, "xla", kw)(x, w))
    ref = loop_reference(x, w, kw, combine, reduce, identity, None)
    for want in (ref, xla):
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    if name != "log" and not specials:  # max / min: the same products, the same bits
        np.testing.assert_array_equal(got, xla)
    if not specials:
        assert_gradients_match_xla(op, kw, x, w, seed=2)
        ct = np.random.default_rng(3).standard_normal(got.shape).astype(np.float32)
        for a, b in zip(grads(op, "native", kw, x, w, ct), grads(builtin, "native", kw, x, w, ct),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("dtype", ["float32", "int32"])
def test_explain_names_the_builtin(dtype):
    # int32: the built-in's wide kernels, which no user kernel has.
    plan = jaxconv.explain(TWINS["fuzzy_max_min"][0], dtype=dtype, platform="cpu")
    assert plan.engine == "native"
    assert any("built-in kernel 'max_min'" in d for d in plan.details), plan.details
    if dtype == "int32":
        x, w, kw = data(GEOMETRIES["2d_same"], seed=5, ties=True)
        x, w = x.astype(np.int32), w.astype(np.int32)
        got = np.asarray(conv(TWINS["fuzzy_max_min"][0], "native", kw)(x, w))
        ref = loop_reference(x.astype(np.float64), w.astype(np.float64), kw, np.minimum,
                             np.maximum, -INF, None)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("op", [
    jaxconv.Op(lambda a, b: a * b, "max"),                       # no built-in kernel
    jaxconv.Op(jnp.minimum, "min"),                              # min under min
    jaxconv.Op(jnp.minimum, "sum"),
    jaxconv.Op(jnp.minimum, jnp.maximum, identity=0.0),          # not max's identity
    jaxconv.Op(lambda a, b: jax.nn.relu(a) + b, "max"),          # more than one primitive
    jaxconv.Op(lambda a, b: a + b, "max", pad_value=0.0).replace(rewrite=lambda p, x, w: p(x, w)),
], ids=["mul_max", "min_min", "min_sum", "identity", "relu", "rewrite"])
def test_near_misses_are_not_twins(op):
    assert builtin_twin(op) is None


def test_pad_value_is_kept():
    op = jaxconv.Op(jnp.minimum, jnp.maximum, identity=-INF, pad_value=0.5)
    twin = builtin_twin(op)
    assert twin.native == "max_min" and twin.pad_value == 0.5
    x, w, kw = data(GEOMETRIES["2d_same"], seed=4)
    got = np.asarray(conv(op, "native", kw)(x, w))
    np.testing.assert_array_equal(got, loop_reference(x, w, kw, np.minimum, np.maximum, -INF,
                                                      0.5))


def _windows(x, w, combine, reduce, identity):
    """The per-product formulation of a SAME 3x3 stride-1 product (NHWC / HWIO) in ``jnp``:
    every term ``combine(x, w)`` of each window, padded taps the identity, reduced at once
    (``jnp.max``'s gradient splits a tie equally): the reference for the factored forms'
    values and JAX-derived gradients."""
    kh, kw, c, o = w.shape
    _, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    valid = jnp.pad(jnp.ones((h, wd), bool), 1)
    terms = [jnp.where(valid[i:i + h, j:j + wd][None, :, :, None, None],
                       combine(xp[:, i:i + h, j:j + wd, :, None], w[i, j][None, None, None]),
                       identity)
             for i in range(kh) for j in range(kw)]
    return reduce(jnp.concatenate(terms, axis=3), axis=3)


# A difference of the operands runs as their sum, one side negated once per element
# (`factoring.negated_subtrahends`): name -> (op, built-in kernel, combine, reduce, identity).
NEGATED = {
    "tanh_sub_max": (jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max"), "max_plus",
                     lambda x, w: jnp.tanh(x - w), jnp.max, -INF, np.maximum),
    "w_sub_x_min": (jaxconv.Op(lambda x, w: w - x, jnp.minimum, identity=INF), "min_plus",
                    lambda x, w: w - x, jnp.min, INF, np.minimum),
    "sub_logsumexp": (jaxconv.Op(lambda x, w: x - w, "logsumexp"), "log",
                      lambda x, w: x - w, jax.nn.logsumexp, -INF, np.logaddexp),
}


@pytest.mark.parametrize("name, specials", [("tanh_sub_max", True), ("tanh_sub_max", False),
                                            ("w_sub_x_min", True), ("w_sub_x_min", False),
                                            ("sub_logsumexp", False)])
def test_difference_runs_on_the_sum_kernels(name, specials):
    op, kernel, combine, reduce, identity, np_reduce = NEGATED[name]
    details = jaxconv.explain(op, platform="cpu").details
    assert any(f"built-in kernel '{kernel}'" in d for d in details), details
    assert any("a difference of the operands runs as their sum" in d for d in details)
    x, w, kw = data(GEOMETRIES["2d_same"], seed=6, specials=specials, ties=not specials)
    if specials:  # infinities and signed zeros in the kernel too
        w.reshape(-1)[:4] = [INF, -INF, -0.0, 0.0]
    got = np.asarray(conv(op, "native", kw)(x, w))
    ref = loop_reference(x, w, kw, lambda a, b: np.asarray(combine(a, b)), np_reduce, identity,
                         None)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6)
    if kernel != "log":  # max / min: the per-product terms' bits (XLA's max drops NaN)
        per_product = _windows(jnp.asarray(x), jnp.asarray(w), combine, reduce, identity)
        np.testing.assert_array_equal(got[~np.isnan(ref)],
                                      np.asarray(per_product)[~np.isnan(ref)])
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_array_equal(np.asarray(conv(op, "xla", kw)(x, w)), got)
    if specials:
        return
    ct = np.random.default_rng(7).standard_normal(got.shape).astype(np.float32)

    def loss(a, b):
        return jnp.sum(_windows(a, b, combine, reduce, identity) * ct)

    want_grads = jax.grad(loss, (0, 1))(jnp.asarray(x), jnp.asarray(w))
    for g, r in zip(grads(op, "native", kw, x, w, ct), want_grads, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-6, atol=2e-6)


def test_adder_net_as_written_is_no_builtin():
    """``-|x - w|`` under a sum as a researcher writes it: JAX's derivative of ``abs`` at 0 is
    1 (so at ``x == w`` the partials are -1 and 1) and is finite at NaN, where ``l1``'s exact
    subgradient is 0 and ``adder`` has its own rule: no built-in computes its gradient."""
    op = jaxconv.Op(lambda x, w: -jnp.abs(x - w), "sum")
    assert builtin_twin(op) is None
    at_tie = jax.grad(op.combine, (0, 1))(jnp.float32(1.0), jnp.float32(1.0))
    assert [float(g) for g in at_tie] == [-1.0, 1.0]
    assert [float(g) for g in jax.grad(jaxconv.ops.l1.combine, (0, 1))(
        jnp.float32(1.0), jnp.float32(1.0))] == [0.0, 0.0]


@pytest.mark.parametrize("xs, ws, negated", [((2, 64), (64, 48), False),
                                             ((64, 8), (8, 48), True)])
def test_negation_only_where_it_pays(xs, ws, negated):
    """A kernel with more elements than the output is not negated (a copy and a pass over it
    cost more than the sum kernels save): the difference stays in the product, on the
    kernels of ``x - w`` (``max_minus``, as `explain` says); the numbers are the same either
    way."""
    op = NEGATED["tanh_sub_max"][0]
    rng = np.random.default_rng(11)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    dn = (((1,), (0,)), ((), ()))
    f = jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op=op, engine="native"))
    assert ("stablehlo.negate" in f.lower(x, w).as_text()) == negated
    assert any("the difference stays in the product" in d and "'max_minus'" in d
               for d in jaxconv.explain(op, platform="cpu").details)
    want = np.max(np.tanh(x[:, :, None] - w[None]), axis=1)
    np.testing.assert_allclose(np.asarray(f(x, w)), want, rtol=1e-6, atol=1e-6)

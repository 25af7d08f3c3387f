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

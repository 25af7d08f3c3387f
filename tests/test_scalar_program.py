"""Scalar programs (``jaxconv._src.core.scalar_program``) and the monotone form of an op.

The flat program of a traced function must compute what the function computes (checked on
arrays against the function itself); the monotone split and the NaN analysis are checked on a
covering set of functions; ops in monotone form against the numpy loop reference, NaN,
infinities and windows that read only padding included.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import conv_reference

import jaxconv
from jaxconv._src.core import factoring
from jaxconv._src.core import scalar_program as sp

F32 = np.float32


def _grid() -> tuple[np.ndarray, np.ndarray]:
    vals = np.array([-3.5, -1.0, -0.25, -0.0, 0.0, 0.5, 1.0, 2.0, 7.0, np.inf, -np.inf, np.nan],
                    F32)
    x, w = np.meshgrid(vals, vals[::-1])
    return x.ravel(), w.ravel()


FUNCTIONS = {
    "tanh_sub": lambda x, w: jnp.tanh(x - w),
    "clip_mul": lambda x, w: jnp.clip(x * w, -1.0, 1.0),
    "where": lambda x, w: jnp.where(x > w, x - w, 0.5 * w),
    "relu": lambda x, w: jax.nn.relu(x - w),
    "powers": lambda x, w: x ** 3 + jnp.square(w) - x ** -2,
    "round_sign": lambda x, w: jnp.round(x) + jnp.sign(w) + jnp.floor(x * w),
    "const_capture": lambda x, w: x * np.float32(3.0) + jnp.pi - jnp.float32(2.0) * w,
    "logaddexp": jnp.logaddexp,
    "bools": lambda x, w: jnp.where((x > 0) & ~(w < 0) | (x == w), x, w),
    "maxmin": lambda x, w: jnp.maximum(x, w) - jnp.minimum(x, 2.0),
}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_program_computes_the_function(name):
    fn = FUNCTIONS[name]
    program = sp.trace(fn, F32, 2)
    x, w = _grid()
    got = np.asarray(sp.evaluate(program, jnp.asarray(x), jnp.asarray(w))[0])
    want = np.asarray(fn(jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_array_equal(got, want)


def test_calls_are_inlined_and_constants_folded():
    program = sp.trace(FUNCTIONS["clip_mul"], F32, 2)
    assert program.primitives() == ("max", "min", "mul")
    assert not any(n.name == "convert_element_type" for n in program.nodes)
    assert sp.trace(FUNCTIONS["relu"], F32, 2).custom_jvp
    # A folded constant: 2 * 3 is one literal.
    folded = sp.trace(lambda x, w: x * (jnp.float32(2.0) * 3.0), F32, 2)
    assert len(folded.nodes) == 1 and folded.nodes[0].args[1] == sp.Const(6.0, np.dtype(F32))


_VECTOR = jnp.arange(3.0)


@pytest.mark.parametrize("fn, reason", [
    (lambda x, w: jnp.sort(jnp.stack([x, w]))[0], "primitive"),
    (lambda x, w: jnp.sum(x * _VECTOR) + w, "non-scalar constant"),
    (lambda x, w: x * np.asarray(_VECTOR)[1] + w, None),  # a numpy scalar of it: fine
    (lambda x, w: jaxconv.ops.adder.combine(x, w), "custom VJP"),
    (lambda x, w: x.astype(jnp.int32) + w.astype(jnp.int32), "int32"),
])
def test_untranslatable_reasons(fn, reason):
    if reason is None:
        sp.trace(fn, F32, 2)
        return
    with pytest.raises(sp.Untranslatable, match=reason):
        sp.trace(fn, F32, 2)


@pytest.mark.parametrize("fn, inner, outer, direction", [
    (FUNCTIONS["tanh_sub"], ("sub",), ("tanh",), 1),
    (FUNCTIONS["clip_mul"], ("mul",), ("max", "min"), 1),
    (lambda x, w: jnp.exp(-jnp.square(x - w)), ("square", "sub"), ("exp", "neg"), -1),
    (lambda x, w: -2.0 * (x + w) + 1.0, ("add",), ("add", "mul"), -1),
    (lambda x, w: (x * w) ** 3 / 4.0, ("mul",), ("div", "integer_pow"), 1),
    (lambda x, w: 1.0 - jax.nn.sigmoid(x * w), ("mul",), ("logistic", "sub"), -1),
])
def test_monotone_split(fn, inner, outer, direction):
    split = sp.monotone_split(sp.trace(fn, F32, 2))
    assert split is not None
    assert (split.inner.primitives(), split.outer.primitives(), split.direction) == \
        (inner, outer, direction)
    x, w = _grid()
    c = sp.evaluate(split.inner, jnp.asarray(x), jnp.asarray(w))[0]
    np.testing.assert_array_equal(np.asarray(sp.evaluate(split.outer, c)[0]),
                                  np.asarray(fn(jnp.asarray(x), jnp.asarray(w))))


@pytest.mark.parametrize("fn", [
    lambda x, w: jnp.square(x - w),        # not monotone
    lambda x, w: jnp.log(x * w),           # not total: log(-1) is NaN
    lambda x, w: jnp.sqrt(x - w),
    lambda x, w: (x * w) * 0.0,            # constant: 0 * inf is NaN
    lambda x, w: jnp.tanh(x - w) + (x - w),  # the inner value is used twice
    lambda x, w: x + jnp.inf,              # an infinite constant
    FUNCTIONS["relu"],                     # a custom_jvp function (its rule would be lost)
    lambda x, w: x * w,                    # nothing outside
])
def test_no_monotone_split(fn):
    assert sp.monotone_split(sp.trace(fn, F32, 2)) is None


@pytest.mark.parametrize("fn, expected", [
    (lambda x, w: x + w, True),
    (lambda x, w: -jnp.abs(x - w) * 3.0, True),
    (lambda x, w: jnp.tanh(x * w) * 2.0, True),
    (lambda x, w: jnp.tanh(x * w * x), False),  # (x * w) * x: inf * 0 is not ruled out
    (lambda x, w: jnp.clip(jnp.exp(x) * w, -1.0, 1.0), False),  # inf * 0
    (lambda x, w: x * w - w, True),                              # inf - finite
    (lambda x, w: x * w - w * x, False),                         # inf - inf
    (lambda x, w: jnp.log(x) + w, False),
    (lambda x, w: x / w, False),
    (lambda x, w: x / 2.0 + w, True),
])
def test_nan_free(fn, expected):
    assert sp.nan_free(sp.trace(fn, F32, 2)) is expected


def test_nan_free_is_conservative_on_values():
    x, w = _grid()
    finite = np.isfinite(x) & np.isfinite(w)
    for fn in FUNCTIONS.values():
        program = sp.trace(fn, F32, 2)
        if sp.nan_free(program):
            out = np.asarray(fn(jnp.asarray(x[finite]), jnp.asarray(w[finite])))
            assert not np.isnan(out).any()


# --- ops in monotone form, against the numpy loop reference -----------------------------------

def _np_tanh_sub(x, w):
    return np.tanh(np.subtract(x, w))


def _np_exp_neg(x, w):
    return np.exp(-np.multiply(x, w))


MONOTONE_OPS = {
    "tanh_sub_max": (jaxconv.Op(FUNCTIONS["tanh_sub"], "max"), _np_tanh_sub, np.maximum,
                     -math.inf),
    "exp_neg_min": (jaxconv.Op(lambda x, w: jnp.exp(-(x * w)), "min"), _np_exp_neg,
                    np.minimum, math.inf),
    "tanh_sub_max_pad": (jaxconv.Op(FUNCTIONS["tanh_sub"], "max", pad_value=0.5),
                         _np_tanh_sub, np.maximum, -math.inf),
    # Declaring max's own identity is the default: the op still factors.
    "clip_mul_max_identity": (jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max",
                                         identity=-math.inf),
                              lambda x, w: np.clip(x * w, -1.0, 1.0), np.maximum, -math.inf),
    # Operand maps: tanh of the input and exp of the kernel run once per element.
    "tanh_x_times_w_sum_pad": (jaxconv.Op(lambda x, w: jnp.tanh(x) * w, "sum", pad_value=0.5),
                               lambda x, w: np.tanh(x) * w, np.add, 0.0),
    "maps_and_outer_min": (jaxconv.Op(lambda x, w: -jnp.tanh(jnp.abs(x) - jnp.exp(w)), "min"),
                           lambda x, w: -np.tanh(np.abs(x) - np.exp(w)), np.minimum, math.inf),
}
GEOMETRIES = {
    "same": ((2, 6, 5, 3), (3, 3, 3, 4), dict(window_strides=(1, 1), padding="SAME")),
    # Large padding with lhs dilation: some windows read only padding (the identity).
    "empty_windows": ((1, 3, 3, 2), (2, 2, 2, 3), dict(
        window_strides=(2, 2), padding=((3, 3), (2, 2)), lhs_dilation=(3, 3))),
}


@pytest.mark.parametrize("name, geometry", [("tanh_sub_max", "same"),
                                            ("exp_neg_min", "empty_windows"),
                                            ("tanh_sub_max", "empty_windows"),
                                            ("tanh_sub_max_pad", "empty_windows"),
                                            ("clip_mul_max_identity", "empty_windows"),
                                            ("tanh_x_times_w_sum_pad", "empty_windows"),
                                            ("maps_and_outer_min", "same")])
def test_factored_form_matches_reference(name, geometry):
    op, combine, reduce, identity = MONOTONE_OPS[name]
    xs, ws, kw = GEOMETRIES[geometry]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(xs).astype(F32)
    w = rng.standard_normal(ws).astype(F32)
    x[0, 1, 1, 0] = np.nan
    x[0, 0, 0, 1] = np.inf
    assert factoring.factored_form(op, F32) is not None
    dn = ("NHWC", "HWIO", "NHWC")
    ref = conv_reference(x, w, kw["window_strides"], kw["padding"], kw.get("lhs_dilation"),
                         None, dn, combine=combine, reduce=reduce, identity=identity,
                         pad_value=op.pad_value)
    for engine in ("xla", "auto"):
        y = jaxconv.conv_general_dilated(x, w, op=op, dimension_numbers=dn, engine=engine,
                                         **kw)
        np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fn, lhs, rhs, core", [
    (lambda x, w: jnp.tanh(x) * w, ("tanh",), None, ("mul",)),
    (lambda x, w: jnp.abs(x) - jnp.exp(w) * 2.0, ("abs",), ("exp", "mul"), ("sub",)),
    (lambda x, w: jnp.where(x > 0, x, 0.1 * x) * jnp.sign(w) + x, None, ("sign",),
     ("add", "gt", "mul", "select_n")),  # x reaches the core twice: not split
])
def test_operand_split(fn, lhs, rhs, core):
    split = sp.operand_split(sp.trace(fn, F32, 2))
    assert split is not None
    assert (None if split.lhs is None else split.lhs.primitives()) == lhs
    assert (None if split.rhs is None else split.rhs.primitives()) == rhs
    assert split.core.primitives() == core
    x, w = _grid()
    a = jnp.asarray(x) if split.lhs is None else sp.evaluate(split.lhs, jnp.asarray(x))[0]
    b = jnp.asarray(w) if split.rhs is None else sp.evaluate(split.rhs, jnp.asarray(w))[0]
    np.testing.assert_array_equal(np.asarray(sp.evaluate(split.core, a, b)[0]),
                                  np.asarray(fn(jnp.asarray(x), jnp.asarray(w))))


def _specials(dtype: object) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of signed zeros, infinities, NaN, denormals, the extremes and a few normal
    values of `dtype` (x, w flattened)."""
    info = np.finfo(dtype)
    vals = np.array([0.0, info.smallest_subnormal, info.tiny, 0.5, 1.0, 3.25,
                     float(info.max), np.inf], np.float64).astype(dtype)
    vals = np.concatenate([vals, -vals, np.array([np.nan], dtype)])
    x, w = np.meshgrid(vals, vals)
    return x.ravel(), w.ravel()


@pytest.mark.parametrize("fn, dtype, lhs, rhs", [
    (lambda x, w: x - w, F32, None, ("neg",)),
    (lambda x, w: w - x, jnp.bfloat16, ("neg",), None),
    (lambda x, w: jnp.tanh(x) - jnp.exp(w), np.float16, ("tanh",), ("exp", "neg")),
])
def test_negated_subtrahends_are_the_same_numbers_and_derivative(fn, dtype, lhs, rhs):
    """a - b and a + (-b): the same bits (signed zeros, infinities, denormals; NaN where NaN)
    and JAX's derivative the same, bit for bit."""
    program = sp.trace(fn, F32, 2)
    summed = factoring.negated_subtrahends(program)
    split = sp.operand_split(summed)
    assert "sub" not in summed.primitives() and split.core.primitives() == ("add",)
    assert (None if split.lhs is None else split.lhs.primitives()) == lhs
    assert (None if split.rhs is None else split.rhs.primitives()) == rhs
    x, w = (jnp.asarray(a) for a in _specials(dtype))

    def run(p):
        def one(a, b):
            return sp.evaluate(p, a, b)[0]
        # DAZ / FTZ off on XLA CPU: denormals are read and written as they are.
        return [np.asarray(v) for v in (one(x, w), *jax.vmap(jax.grad(one, (0, 1)))(x, w))]

    bits = np.dtype(f"u{np.dtype(dtype).itemsize}")
    for got, want in zip(run(summed), run(program), strict=True):
        nan = np.isnan(want.astype(np.float32))
        np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan)
        np.testing.assert_array_equal(got.view(bits)[~nan], want.view(bits)[~nan])


def test_no_negated_subtrahend():
    for fn in (lambda x, w: x * w, lambda x, w: x - 2.0 * x + w, lambda x, w: (x - w) - w):
        program = sp.trace(fn, F32, 2)
        got = factoring.negated_subtrahends(program)
        # x * w and x - 2x: no difference of the two operands; (x - w) - w: the first one only.
        assert got is None or got.primitives() == ("add", "neg", "sub")


def test_a_factored_multiply_and_add_is_a_standard_convolution():
    plan = jaxconv.explain(jaxconv.Op(lambda x, w: jnp.tanh(x) * w, "sum"), platform="cpu")
    assert plan.engine == "xla"
    assert any("('tanh',) of the input" in d for d in plan.details)
    assert any("rewrite into standard lax products" in d for d in plan.details)


def test_factored_form_gradient_is_the_per_product_gradient():
    """Away from ties, the gradient of f(max c) is that of max f(c): the winner's f'(c)."""
    op = MONOTONE_OPS["tanh_sub_max"][0]
    per_product = jaxconv.Op(lambda x, w: jnp.tanh(x - w) + 0.0 * jnp.abs(x), "max")
    assert factoring.factored_form(per_product, F32) is None
    xs, ws, kw = GEOMETRIES["same"]
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(xs), F32)
    w = jnp.asarray(rng.standard_normal(ws), F32)
    dn = ("NHWC", "HWIO", "NHWC")

    def loss(o):
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(jaxconv.conv_general_dilated(
            a, b, op=o, dimension_numbers=dn, engine="xla", **kw))), argnums=(0, 1))

    for got, want in zip(loss(op)(x, w), loss(per_product)(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


# --- float64 (jax_enable_x64): a combine's literals take the operands' dtype -----------------

X64_OPS = {
    # The factored form's outer clip carries the literals -1.0 and 1.0.
    "clip_mul_max": (jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max"),
                     lambda a, b: np.clip(a * b, -1.0, 1.0), np.maximum, -math.inf),
    "where_literal_sum": (jaxconv.Op(lambda a, b: jnp.where(a > 0.5, a * b, 2.0 * b), "sum"),
                          lambda a, b: np.where(a > 0.5, a * b, 2.0 * b), np.add, 0.0),
    "tanh_map_plus_one_min": (jaxconv.Op(lambda a, b: jnp.tanh(a) - b + 1.0, "min"),
                              lambda a, b: np.tanh(a) - b + 1.0, np.minimum, math.inf),
}


@pytest.mark.parametrize("name, engine", [("clip_mul_max", "xla"), ("clip_mul_max", "pallas"),
                                          ("clip_mul_max", "auto"),
                                          ("where_literal_sum", "pallas"),
                                          ("tanh_map_plus_one_min", "xla")])
def test_x64_user_op_literals_take_the_operands_dtype(name, engine):
    op, combine, reduce, identity = X64_OPS[name]
    xs, ws, kw = GEOMETRIES["same"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xs) * 2
    w = rng.standard_normal(ws)
    dn = ("NHWC", "HWIO", "NHWC")
    ref = conv_reference(x, w, kw["window_strides"], kw["padding"], None, None, dn,
                         combine=combine, reduce=reduce, identity=identity)
    with jax.enable_x64(True):
        def f(a, b):
            return jaxconv.conv_general_dilated(a, b, op=op, dimension_numbers=dn,
                                                engine=engine, **kw)

        xj, wj = jnp.asarray(x), jnp.asarray(w)
        y = f(xj, wj)
        gx, gw = jax.grad(lambda a, b: jnp.sum(jnp.sin(f(a, b))), argnums=(0, 1))(xj, wj)
    assert y.dtype == gx.dtype == gw.dtype == np.float64
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-12, atol=1e-12)
    assert np.isfinite(np.asarray(gx)).all() and np.isfinite(np.asarray(gw)).all()


def test_program_traced_for_float64_runs_on_float32():
    """Capabilities are probed on float32: a float64 program's literals follow the arguments."""
    with jax.enable_x64(True):
        program = sp.trace(FUNCTIONS["clip_mul"], np.float64, 2)
        x, w = _grid()
        got = sp.evaluate(program, jnp.asarray(x), jnp.asarray(w))[0]
    assert got.dtype == np.float32
    with np.errstate(invalid="ignore"):  # inf * 0
        want = np.clip(x * w, -1.0, 1.0)
    np.testing.assert_array_equal(np.asarray(got), want)

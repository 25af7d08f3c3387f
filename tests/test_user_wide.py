"""User ops on float64, int32 and int64 operands in the native engine: the combine compiled by
the native code generator for the wide kernels (csrc/userop_wide.h), against the numpy loop
reference (tests/reference.py) and the XLA engine: values (integers exact and wrapping, float64
literals in float64), NaN / infinities / signed zeros, float64 gradients (ties split equally)
against the XLA engine and finite differences, and what ``explain`` says.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import user_kernels
from tests import geometries
from tests.reference import conv_reference

DN = ("NHWC", "HWIO", "NHWC")
F64, I32, I64 = np.float64, np.int32, np.int64


def _conv(op: Any, engine: str, **kw: Any) -> Any:
    """`geometries.conv` with this file's defaults (NHWC, 1x1 strides, SAME)."""
    return geometries.conv(op, engine, {"window_strides": (1, 1), "padding": "SAME",
                                        "dimension_numbers": DN, **kw})


def _data(dtype: Any, seed: int, o: int = 7, small: bool = False) -> tuple:
    rng = np.random.default_rng(seed)
    shape, wshape = (2, 6, 5, 4), (3, 3, 4, o)
    if np.dtype(dtype).kind == "i":
        info = np.iinfo(dtype)
        lo, hi = (-4, 4) if small else (info.min, info.max)
        return (rng.integers(lo, hi, shape, dtype=dtype, endpoint=True),
                rng.integers(lo, hi, wshape, dtype=dtype, endpoint=True))
    if small:  # few distinct values: many ties
        return (rng.integers(-2, 3, shape).astype(dtype),
                rng.integers(-2, 3, wshape).astype(dtype))
    return rng.standard_normal(shape).astype(dtype), rng.standard_normal(wshape).astype(dtype)


def _reference(x: np.ndarray, w: np.ndarray, combine: Any, reduce: str, pad_value: Any,
               **kw: Any) -> np.ndarray:
    kw = {"window_strides": (1, 1), "padding": "SAME", **kw}
    if reduce == "sum":
        red, identity = np.add, 0
    elif x.dtype.kind == "i":
        info = np.iinfo(x.dtype)
        red, identity = ((np.maximum, info.min) if reduce == "max" else (np.minimum, info.max))
    else:
        red, identity = (np.maximum, -np.inf) if reduce == "max" else (np.minimum, np.inf)
    return conv_reference(x, w, kw.pop("window_strides"), kw.pop("padding"),
                          dimension_numbers=DN, combine=combine, reduce=red,
                          identity=identity, pad_value=pad_value, dtype=x.dtype, **kw)


def _clip(a: Any, b: Any) -> Any:
    return jnp.clip(a * b, -1.0, 1.0)


def _gauss(a: Any, b: Any) -> Any:
    return jnp.exp(-0.5 * (a - b) ** 2)


def _affine(a: Any, b: Any) -> Any:
    return a * b + 3


def _pick(a: Any, b: Any) -> Any:
    return jnp.where(a > b, a - b, b * 2)


def _dist(a: Any, b: Any) -> Any:
    return jnp.abs(a - b) * 2


# A covering set: each reduce, each dtype, a libm function, a select, a pad value, literals in
# the operands' dtype, strides / dilation / groups; numpy formulas in the operands' dtype
# (integers wrap as XLA's).
CASES = [
    (jaxconv.Op(_clip, "max", name="clip_max"), F64, lambda a, b: np.clip(a * b, -1.0, 1.0),
     {}),
    (jaxconv.Op(_gauss, "sum", name="gauss"), F64, lambda a, b: np.exp(-0.5 * (a - b) ** 2),
     {"window_strides": (2, 1)}),
    (jaxconv.Op(_affine, "min", name="affine_min"), I32, lambda a, b: a * b + np.int32(3),
     {"rhs_dilation": (1, 2)}),
    (jaxconv.Op(_pick, "max", name="pick_max", pad_value=-7), I64,
     lambda a, b: a - b if a > b else b * np.int64(2), {}),
    (jaxconv.Op(_dist, "sum", name="dist_sum"), I32, lambda a, b: np.abs(a - b) * np.int32(2),
     {"feature_group_count": 2}),
    (jaxconv.Op(_affine, "min", name="affine_min"), F64, lambda a, b: a * b + 3.0,
     {"padding": "VALID"}),
]


@pytest.mark.parametrize("op,dtype,combine,kw", CASES)
def test_user_ops_on_wide_dtypes_against_reference_and_xla(op: Any, dtype: Any, combine: Any,
                                                           kw: dict) -> None:
    with jax.enable_x64(True):
        groups = kw.get("feature_group_count", 1)
        x, w = _data(dtype, seed=1, o=8 if groups > 1 else 7)
        if groups > 1:
            w = w[:, :, :2, :]
        f = _conv(op, "native", **kw)
        assert "jaxconv_wide_forward" in f.lower(x, w).as_text()
        y = np.asarray(f(x, w))
        assert y.dtype == dtype
        yx = np.asarray(_conv(op, "xla", **kw)(x, w))
        ref = _reference(x, w, combine, op.reduce, op.pad_value, **kw)
        if op.reduce == "sum" and dtype == F64:  # libm's exp, and the order of the sum
            np.testing.assert_allclose(y, yx, rtol=1e-13, atol=1e-13)
            np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-13)
        else:  # max / min of exact products, and integers (exact, wrapping)
            np.testing.assert_array_equal(y, yx)
            np.testing.assert_array_equal(y, ref)


def test_integer_user_op_wraps_like_xla() -> None:
    op = jaxconv.Op(_affine, "min", name="affine_min")
    with jax.enable_x64(True):
        big = np.iinfo(I32).max
        x = np.asarray([big, -big - 1, 3], I32).reshape(1, 1, 3, 1)
        w = np.asarray([2, 5], I32).reshape(1, 1, 1, 2)
        y = np.asarray(_conv(op, "native", padding="VALID")(x, w))
        np.testing.assert_array_equal(y, np.asarray(_conv(op, "xla", padding="VALID")(x, w)))
        wrapped = (x.astype(I64) * w.reshape(1, 1, 1, 2) + 3).astype(I32)  # modulo 2^32
        np.testing.assert_array_equal(y, wrapped)
        assert y[0, 0, 0, 0] == 1  # 2 * big + 3, wrapped


@pytest.mark.parametrize("finite", [False, True])
def test_float64_user_op_nan_inf_and_signed_zeros(finite: bool) -> None:
    """NaN in, NaN out, 0 * inf = NaN, -0 below +0, as the XLA engine; finite operands take
    the plain loop, whose zero results are recomputed exactly (a -0 and a +0 product tie)."""
    op = jaxconv.Op(_clip, "max", name="clip_max")  # clip keeps NaN and the sign of 0
    with jax.enable_x64(True):
        if finite:
            rows = [[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [0.0, -0.0, 0.0], [1.0, 1.0, 0.0]]
            cols = [[-1.0, 1.0, -1.0], [-0.0, -1.0, 0.0]]
        else:
            rows = [[np.nan, 1.0, 2.0], [np.inf, -np.inf, 0.0], [0.0, -0.0, 0.0],
                    [-0.0, -0.0, -0.0], [1.0, -1.0, 1.0]]
            cols = [[-0.0, 0.0, np.inf], [1.0, -0.0, 2.0]]
        x = np.asarray(rows, F64).reshape(1, len(rows), 3, 1)
        w = np.asarray(cols, F64).T.reshape(1, 3, 1, 2)
        a = np.asarray(_conv(op, "native", padding="VALID")(x, w))
        b = np.asarray(_conv(op, "xla", padding="VALID")(x, w))
        np.testing.assert_array_equal(a, b)
        real = ~np.isnan(a)
        np.testing.assert_array_equal(np.signbit(a[real]), np.signbit(b[real]))
        if finite:
            assert (a == 0).any() and not np.signbit(a[a == 0]).all()


def _grads(op: Any, engine: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray) -> tuple:
    f = _conv(op, engine)
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("op,small", [
    (jaxconv.Op(_clip, "max", name="clip_max"), True),  # ties split equally
    (jaxconv.Op(_affine, "min", name="affine_min"), False),
    (jaxconv.Op(_gauss, "sum", name="gauss"), False),
])
def test_float64_user_op_gradients_are_native(op: Any, small: bool) -> None:
    with jax.enable_x64(True):
        x, w = _data(F64, seed=3, small=small)
        if small:
            x, w = x * 0.5, w * 0.75  # products on a grid inside the clip: exact ties
        ct = np.random.default_rng(4).standard_normal((2, 6, 5, 7))
        f = _conv(op, "native")
        text = jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1))).lower(
            x, w).as_text()
        assert "jaxconv_wide_backward" in text
        got = _grads(op, "native", x, w, ct)
        want = _grads(op, "xla", x, w, ct)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
        if not small:  # finite differences of the reference (no ties)
            numpy_comb = {"affine_min": lambda a, b: a * b + 3.0,
                          "gauss": lambda a, b: np.exp(-0.5 * (a - b) ** 2)}[op.name]
            rng = np.random.default_rng(5)
            for arr, grad, which in ((x, got[0], 0), (w, got[1], 1)):
                idx = tuple(rng.integers(0, s) for s in arr.shape)
                e = np.zeros_like(arr)
                e[idx] = 1e-6
                args = [(x + e, w), (x - e, w)] if which == 0 else [(x, w + e), (x, w - e)]
                lp, lm = (np.sum(_reference(a, b, numpy_comb, op.reduce, None) * ct)
                          for a, b in args)
                np.testing.assert_allclose(float(grad[idx]), (lp - lm) / 2e-6, rtol=1e-5,
                                           atol=1e-7)


def test_integer_user_op_has_no_gradient_as_on_xla() -> None:
    op = jaxconv.Op(_affine, "min", name="affine_min")
    with jax.enable_x64(True):
        x, w = _data(I32, seed=2, small=True)

        def grads(engine: str) -> Any:
            f = _conv(op, engine)
            return jax.grad(lambda a, b: jnp.sum(f(a, b)).astype(F64), argnums=(0, 1),
                            allow_int=True)(x, w)

        for a, b in zip(grads("native"), grads("xla"), strict=True):
            assert a.dtype == b.dtype == jax.dtypes.float0


def test_explain_says_what_a_wide_user_op_does() -> None:
    with jax.enable_x64(True):
        plan = jaxconv.explain(jaxconv.Op(_clip, "max", name="clip_max"), dtype="float64",
                               platform="cpu")
        assert plan.engine == "native", plan.details
        assert any(d.startswith("compiled user kernel on float64 (the wide kernels")
                   for d in plan.details), plan.details
        assert any(d.startswith("backward: the wide kernels (the winners") for d in plan.details)
        plan = jaxconv.explain(jaxconv.Op(_dist, "sum", name="dist_sum"), dtype="int32",
                               platform="cpu")
        assert plan.engine == "native", plan.details
        assert "backward: none (integer operands have no gradient)" in plan.details
        # what stays on the XLA engine says why (integer division: tests/test_native_wide.py)
        # (a * b: x + w, or x - w = x + (-w), under logsumexp is the built-in log,
        # tests/test_native_twins.py)
        lse = jaxconv.Op(lambda a, b: a * b, "logsumexp", name="lse")
        plan = jaxconv.explain(lse, dtype="float64", platform="cpu")
        assert plan.engine == "xla"
        assert any("has no kernel on float64" in d for d in plan.details), plan.details
        assert user_kernels.built(lse, "float64") is None  # explain compiled nothing refused

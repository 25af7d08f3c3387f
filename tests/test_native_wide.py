"""The native engine's wide kernels (csrc/kernel_wide.h): the built-in ops on float64, int32
and int64 operands, against the numpy plain loops (tests/reference.py) and the XLA engine.
Their backward is the XLA engine's (checked against it for float64).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import ffi
from tests.reference import NUMPY_OPS, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
F64, I32, I64 = np.float64, np.int32, np.int64


def _conv(op: Any, engine: str, **kw: Any) -> Any:
    kw = {"window_strides": (1, 1), "padding": "SAME", **kw}
    return jax.jit(lambda a, b: jaxconv.conv_general_dilated(
        a, b, dimension_numbers=DN, op=op, engine=engine, **kw))


def _data(dtype: Any, seed: int = 0, shape: tuple = (2, 7, 6, 5), o: int = 19) -> tuple:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        info = np.iinfo(dtype)
        x = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
        w = rng.integers(info.min, info.max, (3, 3, shape[-1], o), dtype=dtype, endpoint=True)
        return x, w
    x = rng.standard_normal(shape).astype(dtype)
    w = rng.standard_normal((3, 3, shape[-1], o)).astype(dtype)
    return x, w


def _wrapped_reference(op: str, x: np.ndarray, w: np.ndarray, **kw: Any) -> np.ndarray:
    """The numpy plain loops in the operands' dtype: an integer x + w wraps (as XLA's)."""
    r = NUMPY_OPS["l2" if op == "l2_exact" else op]
    identity = r.identity
    if x.dtype.kind == "i" and np.isinf(r.identity):  # max/min: the dtype's extremes
        info = np.iinfo(x.dtype)
        identity = info.min if r.identity < 0 else info.max
    kw = {"window_strides": (1, 1), "padding": "SAME", **kw}
    return conv_reference(x, w, kw.pop("window_strides"), kw.pop("padding"),
                          dimension_numbers=DN, combine=r.combine, reduce=r.reduce,
                          identity=identity, pad_value=r.pad_value, dtype=x.dtype, **kw)


# A covering set: each op, each dtype, strides / dilations / groups / explicit padding.
CASES = [
    ("max_plus", F64, {}),
    ("min_plus", I32, {"window_strides": (2, 1)}),
    ("max_min", I64, {"rhs_dilation": (1, 2)}),
    ("min_max", F64, {"padding": ((2, 0), (1, 1)), "lhs_dilation": (2, 1)}),
    ("max_plus", I32, {"feature_group_count": 5}),
    ("max_plus", I64, {}),
    ("adder", I32, {"window_strides": (1, 2)}),
    ("l1", F64, {}),
    ("l2_exact", I64, {"rhs_dilation": (2, 1)}),
    ("l2_exact", F64, {"padding": "VALID"}),
]


@pytest.mark.parametrize("op,dtype,kw", CASES)
def test_wide_kernels_against_reference_and_xla(op: str, dtype: Any, kw: dict) -> None:
    with jax.enable_x64(True):
        groups = kw.get("feature_group_count", 1)
        x, w = _data(dtype, o=20 if groups > 1 else 19)
        if groups > 1:
            w = w[:, :, :1, :]
        f = _conv(op, "native", **kw)
        assert "jaxconv_wide_forward" in f.lower(x, w).as_text()
        y = np.asarray(f(x, w))
        assert y.dtype == dtype
        yx = np.asarray(_conv(op, "xla", **kw)(x, w))
        ref = _wrapped_reference(op, x, w, **kw)
        if op in ("l1", "l2_exact", "adder") and dtype == F64:  # sums: within rounding
            np.testing.assert_allclose(y, yx, rtol=1e-13, atol=1e-12)
            np.testing.assert_allclose(y, ref, rtol=1e-13, atol=1e-12)
        else:  # max/min, and integer sums (exact, wrapping)
            np.testing.assert_array_equal(y, yx)
            np.testing.assert_array_equal(y, ref)


def test_integer_max_plus_wraps_like_xla() -> None:
    with jax.enable_x64(True):
        big = np.iinfo(I32).max
        x = np.full((1, 1, 2, 1), big, I32)
        w = np.asarray([1, -5], I32).reshape(1, 2, 1, 1)
        f = _conv("max_plus", "native", padding="VALID")
        y = np.asarray(f(x, w)).ravel()
        np.testing.assert_array_equal(y, np.asarray(_conv("max_plus", "xla", padding="VALID")(
            x, w)).ravel())
        assert y[0] == big - 5  # big + 1 wrapped to iinfo.min, below big - 5


@pytest.mark.parametrize("op", ["max_plus", "min_plus", "max_min", "min_max"])
def test_float64_nan_inf_and_signed_zeros(op: str) -> None:
    """The exact loop: NaN in, NaN out, infinities, -0 below +0, as the XLA engine."""
    with jax.enable_x64(True):
        rows = [[np.nan, 1.0, 2.0], [np.inf, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf],
                [0.0, -0.0, 0.0], [-0.0, -0.0, -0.0], [1.0, 1.0, 1.0]]
        x = np.asarray(rows, F64).reshape(1, len(rows), 3, 1)
        w = np.asarray([[-0.0, 0.0, np.inf], [-0.0, -0.0, -0.0]], F64).T.reshape(1, 3, 1, 2)
        a = np.asarray(_conv(op, "native", padding="VALID")(x, w))
        b = np.asarray(_conv(op, "xla", padding="VALID")(x, w))
        np.testing.assert_array_equal(a, b)  # NaN where NaN
        real = ~np.isnan(a)  # a NaN's sign bit carries no meaning
        np.testing.assert_array_equal(np.signbit(a[real]), np.signbit(b[real]))


def test_float64_gradient_is_the_xla_engines() -> None:
    with jax.enable_x64(True):
        x, w = _data(F64, seed=2)
        x = np.round(x, 1)  # ties
        w = np.round(w, 1)

        def grads(engine: str) -> Any:
            return jax.grad(lambda a, b: jnp.sum(_conv("max_plus", engine)(a, b) ** 2),
                            argnums=(0, 1))(x, w)

        for a, b in zip(grads("native"), grads("xla"), strict=True):
            assert a.dtype == F64
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dense_and_vmap() -> None:
    with jax.enable_x64(True):
        rng = np.random.default_rng(5)
        a = rng.standard_normal((3, 13, 33))
        b = rng.standard_normal((33, 21))

        def dense(engine: str) -> Any:
            return jax.vmap(lambda u: jaxconv.dot_general(
                u, b, (((1,), (0,)), ((), ())), op="min_plus", engine=engine))

        got = np.asarray(jax.jit(dense("native"))(a))
        np.testing.assert_array_equal(got, np.min(a[:, :, :, None] + b[None, None], axis=2))
        np.testing.assert_array_equal(got, np.asarray(jax.jit(dense("xla"))(a)))


@pytest.mark.parametrize("op,dtype,reason", [
    (jaxconv.Op(lambda a, b: a * b, "max", name="user"), F64,
     "on float64 only built-in ops have kernels"),
    (jaxconv.Op(jnp.add, "max", name="user"), I32, "on int32 only built-in ops have kernels"),
])
def test_wide_refusals_are_what_explain_says(op: Any, dtype: Any, reason: str) -> None:
    with jax.enable_x64(True):
        plan = jaxconv.explain(op, dtype=dtype, platform="cpu")
        assert plan.engine == "xla"
        assert any(d.startswith(f"not native: {reason}") for d in plan.details), plan.details


def test_explain_names_the_wide_kernel() -> None:
    assert ffi.has_wide()
    with jax.enable_x64(True):
        plan = jaxconv.explain("max_plus", dtype="float64", platform="cpu")
    assert plan.engine == "native"
    assert any("wide kernels" in d for d in plan.details)
    assert "backward: the XLA engine" in plan.details


def test_export_of_a_wide_call() -> None:
    """jax.export serializes the wide kernels' FFI call with jaxconv's disabled checks."""
    x = np.arange(12, dtype=I32).reshape(3, 4)
    w = np.arange(20, dtype=I32).reshape(4, 5) - 7

    def f(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op="max_plus",
                                   engine="native")

    exported = jax.export.export(jax.jit(f),
                                 disabled_checks=jaxconv.export_disabled_checks())(x, w)
    assert "jaxconv_wide_forward" in exported.mlir_module()
    np.testing.assert_array_equal(np.asarray(exported.call(x, w)),
                                  np.max(x[:, :, None] + w[None], axis=1))

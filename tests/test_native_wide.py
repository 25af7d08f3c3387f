"""The native engine's wide kernels (csrc/kernel_wide.h, kernel_wide_backward.h): the
built-in ops on float64, int32 and int64 operands, against the numpy plain loops
(tests/reference.py) and the XLA engine; their float64 gradients against the XLA engine and
``jax.grad`` of brute-force jnp formulations (ties split equally, NaN and infinities).
Integer operands have no gradient (float0, as on the XLA engine).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import ffi
from tests import geometries
from tests.reference import NUMPY_OPS, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
F64, I32, I64 = np.float64, np.int32, np.int64


def _conv(op: Any, engine: str, **kw: Any) -> Any:
    """`geometries.conv` with this file's defaults (NHWC, 1x1 strides, SAME)."""
    return geometries.conv(op, engine, {"window_strides": (1, 1), "padding": "SAME",
                                        "dimension_numbers": DN, **kw})


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


def _grads(op: Any, engine: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray,
           **kw: Any) -> tuple:
    f = _conv(op, engine, **kw)
    return jax.jit(jax.grad(lambda a, b: jnp.sum(f(a, b) * ct), argnums=(0, 1)))


def _assert_float64_gradients_match_xla(op: Any, x: np.ndarray, w: np.ndarray, seed: int,
                                        **kw: Any) -> Any:
    """Asserts that the native engine's float64 gradients of ``sum(conv * ct)`` (a random
    cotangent) are the XLA engine's: the same terms, summed in another order.

    Args:
        op: the op.
        x: the input.
        w: the kernel.
        seed: the cotangent's seed.
        **kw: the convolution's arguments.

    Returns:
        The native gradient function (its lowering can be inspected).
    """
    y = np.asarray(_conv(op, "xla", **kw)(x, w))
    ct = np.random.default_rng(seed).standard_normal(y.shape)
    f = _grads(op, "native", x, w, ct, **kw)
    for a, b in zip(f(x, w), _grads(op, "xla", x, w, ct, **kw)(x, w), strict=True):
        assert a.dtype == F64
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
    return f


# A covering set for the float64 backward: each op, strides / dilations / groups / explicit
# and lhs-dilated padding, adder's pad value (its padded cells count for dw only).
GRAD_CASES = [
    ("max_plus", {}),
    ("min_plus", {"window_strides": (2, 1)}),
    ("max_min", {"rhs_dilation": (1, 2)}),
    ("min_max", {"padding": ((2, 0), (1, 1)), "lhs_dilation": (2, 1)}),
    ("max_plus", {"feature_group_count": 5}),
    ("adder", {"window_strides": (1, 2)}),
    ("l1", {"padding": ((0, 2), (1, 0))}),
    ("l2_exact", {"rhs_dilation": (2, 1)}),
]


@pytest.mark.parametrize("op,kw", GRAD_CASES)
def test_float64_gradients_are_native_and_match_xla(op: str, kw: dict) -> None:
    """Data on a 0.5 grid: many ties between products (and x == w for max_min / min_max)."""
    with jax.enable_x64(True):
        groups = kw.get("feature_group_count", 1)
        x, w = _data(F64, seed=2, o=20 if groups > 1 else 19)
        if groups > 1:
            w = w[:, :, :1, :]
        x, w = np.round(x * 2) / 2, np.round(w * 2) / 2
        f = _assert_float64_gradients_match_xla(op, x, w, 3, **kw)
        assert "jaxconv_wide_backward" in f.lower(x, w).as_text()


@pytest.mark.parametrize("op,kw", [("max_plus", {"padding": ((2, 0), (1, 1))}),
                                   ("min_max", {"window_strides": (2, 1)}),
                                   ("max_min", {"padding": ((1, 1), (0, 2)),
                                                "lhs_dilation": (2, 1)})])
def test_float64_gradients_without_ties(op: str, kw: dict) -> None:
    """Continuous data: every window has one winner, routed directly (no rescan)."""
    with jax.enable_x64(True):
        x, w = _data(F64, seed=5)
        _assert_float64_gradients_match_xla(op, x, w, 6, **kw)


def _tie_counts(op: str, x: np.ndarray, w: np.ndarray, groups: int) -> np.ndarray:
    """How many products equal each output of a 3x3 SAME max_plus / min_plus (numpy)."""
    big = -np.inf if op == "max_plus" else np.inf
    xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=big)
    n, hh, ww, c = x.shape
    og, cg = w.shape[-1] // groups, c // groups
    prods = np.stack([xp[:, a:a + hh, b:b + ww, g * cg:(g + 1) * cg, None]
                      + w[a, b, None, None, None, :, g * og:(g + 1) * og]
                      for a in range(3) for b in range(3) for g in range(groups)], 0)
    prods = prods.reshape(3, 3, groups, n, hh, ww, cg, og)
    red = np.max if op == "max_plus" else np.min
    y = red(prods, axis=(0, 1, 6))
    return (prods == y[None, None, :, :, :, :, None]).sum(axis=(0, 1, 6))


@pytest.mark.parametrize("op,groups", [("max_plus", 1), ("min_plus", 2)])
def test_float64_gradients_with_sparse_ties(op: str, groups: int) -> None:
    """Data on a 1/4 grid: some outputs tie (some three ways or more) next to one-winner
    outputs in the same tile, over several blocks of output channels; each tied output is
    rescanned on its own, the others routed directly."""
    with jax.enable_x64(True):
        x, w = _data(F64, seed=7, shape=(2, 9, 8, 6), o=52)
        if groups > 1:
            w = w[:, :, :3, :]
        x, w = np.round(x * 4) / 4, np.round(w * 4) / 4
        counts = _tie_counts(op, x, w, groups)
        assert 0.05 < (counts > 1).mean() < 0.8 and counts.max() >= 3  # a mix of both
        _assert_float64_gradients_match_xla(op, x, w, 8, feature_group_count=groups)


@pytest.mark.parametrize("op,red,comb", [
    ("max_plus", jnp.max, jnp.add),
    ("min_plus", jnp.min, jnp.add),
    ("max_min", jnp.max, jnp.minimum),
    ("min_max", jnp.min, jnp.maximum),
    ("l1", jnp.sum, lambda a, b: -(a - b) * jnp.sign(a - b)),  # 0 at x == w, as l1's rule
    ("l2_exact", jnp.sum, lambda a, b: -((a - b) ** 2)),
])
def test_float64_dense_gradients_against_brute_force(op: str, red: Any, comb: Any) -> None:
    """jax.grad of the gathered products under jnp.max / jnp.min / jnp.sum: ties split
    equally, and the combine's own derivative (1/2 at x == w for min / max)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(7)
        a = rng.integers(-3, 4, (9, 6)).astype(F64)  # integers: ties everywhere
        b = rng.integers(-3, 4, (6, 11)).astype(F64)
        ct = rng.standard_normal((9, 11))

        def native(u: jax.Array, v: jax.Array) -> jax.Array:
            return jnp.sum(jaxconv.dot_general(u, v, (((1,), (0,)), ((), ())), op=op,
                                               engine="native") * ct)

        def brute(u: jax.Array, v: jax.Array) -> jax.Array:
            return jnp.sum(red(comb(u[:, :, None], v[None]), axis=1) * ct)

        got = jax.jit(jax.grad(native, argnums=(0, 1)))(a, b)
        want = jax.grad(brute, argnums=(0, 1))(a, b)
        for g, h in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("op", ["max_plus", "min_plus", "max_min", "min_max", "adder", "l1",
                                "l2_exact"])
def test_float64_gradients_with_nan_and_infinities(op: str) -> None:
    """NaN windows (no winner: zero gradient), infinite winners, all -inf windows; the sums'
    rules at NaN (adder's and l2's NaN, l1's 0), as the XLA engine."""
    with jax.enable_x64(True):
        rows = [[np.nan, 1.0, 2.0], [np.inf, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf],
                [0.0, -0.0, 0.0], [1.0, 1.0, 1.0], [np.inf, np.inf, 2.0]]
        x = np.asarray(rows, F64).reshape(1, len(rows), 3, 1)
        w = np.asarray([[-0.0, 0.0, 1.0], [1.0, 1.0, -np.inf]], F64).T.reshape(1, 3, 1, 2)
        ct = np.arange(1.0, 1.0 + 2 * len(rows)).reshape(1, len(rows), 1, 2)
        got = _grads(op, "native", x, w, ct, padding="VALID")(x, w)
        want = _grads(op, "xla", x, w, ct, padding="VALID")(x, w)
        for a, b in zip(got, want, strict=True):  # NaN where NaN; sums within rounding
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-14, atol=0)


def test_float64_gradients_under_vmap_of_kernels() -> None:
    """Per-example kernels (a leading batch of problems in one call)."""
    with jax.enable_x64(True):
        rng = np.random.default_rng(11)
        a = np.round(rng.standard_normal((3, 10, 7)), 1)
        b = np.round(rng.standard_normal((3, 7, 13)), 1)

        def loss(engine: str) -> Any:
            def one(u: jax.Array, v: jax.Array) -> jax.Array:
                return jnp.sum(jaxconv.dot_general(u, v, (((1,), (0,)), ((), ())),
                                                   op="max_plus", engine=engine) ** 2)
            return jax.jit(jax.vmap(jax.grad(one, argnums=(0, 1))))

        for g, h in zip(loss("native")(a, b), loss("xla")(a, b), strict=True):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [I32, I64])
def test_integer_operands_have_no_gradient_as_on_xla(dtype: Any) -> None:
    with jax.enable_x64(True):
        x, w = _data(dtype, seed=4)

        def grads(engine: str) -> Any:
            f = _conv("max_plus", engine)
            return jax.grad(lambda a, b: jnp.sum(f(a, b)).astype(F64), argnums=(0, 1),
                            allow_int=True)(x, w)

        for a, b in zip(grads("native"), grads("xla"), strict=True):
            assert a.dtype == b.dtype == jax.dtypes.float0
            assert a.shape == b.shape


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
    ("log", F64, "on float64 the built-in ops with kernels are max_plus, min_plus"),
    (jaxconv.Op(lambda a, b: a // (b * b + 1), "max", name="user"), I32,
     "it is not translated: primitive 'div' on int32 is not translated"),
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
    assert any(d.startswith("backward: the wide kernels (the winners") for d in plan.details)
    with jax.enable_x64(True):
        plan = jaxconv.explain("max_plus", dtype="int32", platform="cpu")
    assert "backward: none (integer operands have no gradient)" in plan.details


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

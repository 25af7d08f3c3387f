"""Tests for jaxconv.quantizers against formulas written independently in NumPy."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxconv import quantizers

DTYPES = [jnp.float32, jnp.bfloat16]


# --------------------------------------------------------------------------- references


def np_sign(x: np.ndarray) -> np.ndarray:
    """larq.math.sign in float64: -1 for x < 0, +1 for x >= 0 (incl. -0.0), NaN kept."""
    return np.where(np.isnan(x), np.nan, np.where(x < 0, -1.0, 1.0))


def np_pass(x: np.ndarray, clip: float | None) -> np.ndarray:
    """larq's clipped-identity derivative: 1 where |x| <= clip (inclusive)."""
    if clip is None:
        return np.ones_like(x)
    return (np.abs(x) <= clip).astype(np.float64)


def round_to(value: float, dtype: Any) -> float:
    """``value`` rounded to ``dtype`` (larq converts Python parameters to x's dtype)."""
    return float(np.asarray(value, dtype=np.float64).astype(dtype))


def ref_ste_sign(x, dtype, clip_value=1.0):
    c = None if clip_value is None else round_to(clip_value, dtype)
    return np_sign(x), np_pass(x, c)


def ref_approx_sign(x, dtype):
    ax = np.abs(x)
    return np_sign(x), np.where(ax <= 1.0, 2.0 - 2.0 * ax, 0.0)


def ref_swish_sign(x, dtype, beta=5.0):
    bx = beta * x
    with np.errstate(over="ignore"):
        grad = beta * (2.0 - bx * np.tanh(bx / 2.0)) / (1.0 + np.cosh(bx))
    return np_sign(x), grad


def ref_magnitude_aware_sign(x, dtype, clip_value=1.0):
    axes = tuple(range(x.ndim - 1))
    scale = np.mean(np.abs(x), axis=axes, keepdims=True)
    c = None if clip_value is None else round_to(clip_value, dtype)
    return scale * np_sign(x), scale * np_pass(x, c)


def ref_ste_heaviside(x, dtype, clip_value=1.0):
    c = None if clip_value is None else round_to(clip_value, dtype)
    fwd = np.where(np.isnan(x), np.nan, (x > 0).astype(np.float64))
    return fwd, np_pass(x, c)


def ref_ste_tern(x, dtype, threshold_value=0.05, ternary_weight_networks=False, clip_value=1.0):
    if ternary_weight_networks:
        t = round_to(0.7 * np.mean(np.abs(x)), dtype)
    else:
        t = round_to(threshold_value, dtype)
    if t > 0:
        fwd = np.where(x >= t, 1.0, np.where(x <= -t, -1.0, 0.0))
    else:  # threshold 0: the plain sign with sign(0) = 0
        fwd = np.where(x > 0, 1.0, np.where(x < 0, -1.0, 0.0))
    fwd = np.where(np.isnan(x), np.nan, fwd)
    c = None if clip_value is None else round_to(clip_value, dtype)
    return fwd, np_pass(x, c)


@dataclass(frozen=True)
class Case:
    name: str
    kwargs: dict = field(default_factory=dict)

    @property
    def fn(self) -> Callable[[jax.Array], jax.Array]:
        return functools.partial(getattr(quantizers, self.name), **self.kwargs)

    def ref(self, x: np.ndarray, dtype: Any) -> tuple[np.ndarray, np.ndarray]:
        return globals()[f"ref_{self.name}"](x, dtype, **self.kwargs)

    @property
    def exact_grad(self) -> bool:
        """True when the gradient is a 0/1 mask, compared without tolerance."""
        return self.name in ("ste_sign", "ste_heaviside", "ste_tern")

    @property
    def clip(self) -> float | None:
        if self.name == "approx_sign":
            return 1.0
        return self.kwargs.get("clip_value", 1.0)

    def __str__(self) -> str:
        args = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.name}({args})"


CASES = [
    Case("ste_sign"),
    Case("ste_sign", {"clip_value": 0.5}),
    Case("ste_sign", {"clip_value": None}),
    Case("approx_sign"),
    Case("swish_sign"),
    Case("swish_sign", {"beta": 1.0}),
    Case("swish_sign", {"beta": 10.0}),
    Case("magnitude_aware_sign"),
    Case("magnitude_aware_sign", {"clip_value": 0.5}),
    Case("magnitude_aware_sign", {"clip_value": None}),
    Case("ste_heaviside"),
    Case("ste_heaviside", {"clip_value": 0.25}),
    Case("ste_heaviside", {"clip_value": None}),
    Case("ste_tern"),
    Case("ste_tern", {"threshold_value": 0.3, "clip_value": 0.5}),
    Case("ste_tern", {"threshold_value": 0.0}),
    Case("ste_tern", {"ternary_weight_networks": True, "clip_value": None}),
]
CASE_IDS = [str(c) for c in CASES]


def make_input(case: Case, dtype: Any, seed: int = 0) -> np.ndarray:
    """A (n, 4) input holding 0, -0, the clip and threshold boundaries and random values."""
    rng = np.random.default_rng(seed)
    special = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 0.25, -0.25, 0.05, -0.05, 0.3, -0.3]
    special += [2.0, -2.0, 1e4, -1e4, 1e-3, -1e-3, 0.999, -1.001]
    for edge in (case.clip, case.kwargs.get("threshold_value")):
        if edge:
            e = jnp.asarray(edge, dtype)
            for v in (jnp.nextafter(e, jnp.asarray(0, dtype)), e, jnp.nextafter(e, 2 * e)):
                special += [float(v), -float(v)]
    values = np.concatenate([np.asarray(special), 1.5 * rng.standard_normal(40)])
    values = values[: 4 * (len(values) // 4)]
    return np.asarray(values, dtype=np.float64).astype(dtype).reshape(-1, 4)


def tolerances(case: Case, dtype: Any) -> dict[str, float]:
    if dtype == jnp.bfloat16:
        return {"rtol": 8e-3, "atol": 1e-6}
    if case.exact_grad:
        return {"rtol": 0.0, "atol": 0.0}
    return {"rtol": 2e-6, "atol": 1e-6}


def to64(a: Any) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


# One representative per quantizer and code path, for the transformation tests (each
# compiles anew, so they do not run over the whole grid).
REPRESENTATIVE = [
    Case("ste_sign"),
    Case("ste_sign", {"clip_value": None}),
    Case("approx_sign"),
    Case("swish_sign"),
    Case("magnitude_aware_sign"),
    Case("ste_heaviside"),
    Case("ste_tern"),
    Case("ste_tern", {"ternary_weight_networks": True}),
]
REPRESENTATIVE_IDS = [str(c) for c in REPRESENTATIVE]


# --------------------------------------------------------------------------- value tests


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_numpy(case: Case, dtype: Any) -> None:
    x = make_input(case, dtype)
    out = case.fn(jnp.asarray(x))
    assert out.dtype == dtype
    assert out.shape == x.shape
    want, _ = case.ref(to64(x), dtype)
    if case.name == "magnitude_aware_sign":
        np.testing.assert_allclose(to64(out), want, **tolerances(case, dtype))
    else:
        np.testing.assert_array_equal(to64(out), want)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_gradient_matches_numpy(case: Case, dtype: Any) -> None:
    x = make_input(case, dtype)
    xj = jnp.asarray(x)
    _, want = case.ref(to64(x), dtype)
    grad = jax.grad(lambda v: case.fn(v).sum())(xj)
    assert grad.dtype == dtype
    np.testing.assert_allclose(to64(grad), want, **tolerances(case, dtype))

    # A non-uniform cotangent is multiplied element by element.
    ct = np.asarray(np.random.default_rng(1).uniform(-2, 2, x.shape)).astype(dtype)
    _, vjp = jax.vjp(case.fn, xj)
    (g,) = vjp(jnp.asarray(ct))
    assert g.dtype == dtype
    np.testing.assert_allclose(to64(g), want * to64(ct), **tolerances(case, dtype))


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=REPRESENTATIVE_IDS)
def test_jit_matches_eager(case: Case) -> None:
    x = jnp.asarray(make_input(case, jnp.float32, seed=2))
    np.testing.assert_array_equal(jax.jit(case.fn)(x), case.fn(x))
    grad = jax.grad(lambda v: case.fn(v).sum())
    # XLA may fuse the transcendental gradient formulas differently under jit.
    np.testing.assert_allclose(jax.jit(grad)(x), grad(x), **tolerances(case, jnp.float32))


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=REPRESENTATIVE_IDS)
def test_vmap_matches_loop(case: Case) -> None:
    x = make_input(case, jnp.float32, seed=3)
    xs = jnp.asarray(x[: 2 * (len(x) // 2)].reshape(2, -1, 4))
    fn = jax.jit(case.fn)
    grad = jax.jit(jax.grad(lambda v: case.fn(v).sum()))
    out = jax.vmap(case.fn)(xs)
    np.testing.assert_array_equal(out, jnp.stack([fn(x) for x in xs]))
    np.testing.assert_allclose(
        jax.vmap(grad)(xs), jnp.stack([grad(x) for x in xs]), **tolerances(case, jnp.float32)
    )
    # Per-example reference: batch statistics (magnitude, TWN threshold) are per element.
    for x, o in zip(np.asarray(xs), np.asarray(out), strict=True):
        want, _ = case.ref(to64(x), jnp.float32)
        np.testing.assert_allclose(to64(o), want, rtol=1e-6)


@pytest.mark.parametrize("case", REPRESENTATIVE, ids=REPRESENTATIVE_IDS)
def test_strict_promotion(case: Case) -> None:
    for dtype in DTYPES:
        x = jnp.asarray(make_input(case, dtype, seed=4))
        with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
            out = case.fn(x)
            grad = jax.jit(jax.grad(lambda v: case.fn(v).astype(jnp.float32).sum()))(x)
        assert out.dtype == dtype
        assert grad.dtype == dtype


# --------------------------------------------------------------------------- specific points


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize("name", ["ste_sign", "ste_heaviside", "ste_tern"])
@pytest.mark.parametrize("clip", [1.0, 0.5, 2.0])
def test_clip_boundary_inclusive(name: str, clip: float, dtype: Any) -> None:
    c = jnp.asarray(clip, dtype)
    below = jnp.nextafter(c, jnp.asarray(0, dtype))
    above = jnp.nextafter(c, jnp.asarray(4, dtype))
    x = jnp.stack([-above, -c, -below, below, c, above])
    fn = functools.partial(getattr(quantizers, name), clip_value=clip)
    grad = jax.grad(lambda v: fn(v).sum())(x)
    np.testing.assert_array_equal(to64(grad), [0, 1, 1, 1, 1, 0])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_values_at_zero(dtype: Any) -> None:
    x = jnp.asarray([0.0, -0.0], dtype)
    for fn, want, dwant in [
        (quantizers.ste_sign, 1.0, 1.0),
        (quantizers.approx_sign, 1.0, 2.0),
        (functools.partial(quantizers.swish_sign, beta=5.0), 1.0, 5.0),
        (quantizers.ste_heaviside, 0.0, 1.0),
        (quantizers.ste_tern, 0.0, 1.0),
        (functools.partial(quantizers.ste_tern, threshold_value=0.0), 0.0, 1.0),
        (functools.partial(quantizers.ste_tern, ternary_weight_networks=True), 0.0, 1.0),
    ]:
        out = fn(x)
        grad = jax.grad(lambda v, fn=fn: fn(v).sum())(x)
        np.testing.assert_array_equal(to64(out), [want, want])
        assert not np.signbit(to64(out)).any()  # never -0.0
        np.testing.assert_array_equal(to64(grad), [dwant, dwant])


def test_ste_tern_threshold_boundary() -> None:
    t = 0.25  # exact in every float dtype
    x = jnp.asarray([-0.5, -t, -0.2499, 0.0, 0.2499, t, 0.5], jnp.float32)
    out = quantizers.ste_tern(x, threshold_value=t)
    np.testing.assert_array_equal(out, [-1, -1, 0, 0, 0, 1, 1])


def test_ste_tern_twn_threshold() -> None:
    # mean|x| = 4 / 8 = 0.5, threshold = 0.7 * 0.5 = 0.35
    x = jnp.asarray([-1.0, -0.34, -0.36, 0.0, 0.3, 0.4, 0.6, 1.0], jnp.float32)
    out = quantizers.ste_tern(x, ternary_weight_networks=True)
    np.testing.assert_array_equal(out, [-1, 0, -1, 0, 0, 1, 1, 1])
    # threshold_value is ignored when ternary_weight_networks is True
    out2 = quantizers.ste_tern(x, ternary_weight_networks=True, threshold_value=0.9)
    np.testing.assert_array_equal(out, out2)
    # the threshold is a constant: the gradient is the clipped identity
    grad = jax.grad(lambda v: quantizers.ste_tern(v, ternary_weight_networks=True).sum())(x)
    np.testing.assert_array_equal(grad, np.ones(8))


@pytest.mark.parametrize("shape", [(), (5,), (3, 4), (3, 3, 2, 4)])
def test_magnitude_aware_sign_scale_axes(shape: tuple[int, ...]) -> None:
    x = np.random.default_rng(5).standard_normal(shape).astype(np.float32)
    out = quantizers.magnitude_aware_sign(jnp.asarray(x))
    axes = tuple(range(len(shape) - 1))
    scale = np.mean(np.abs(x.astype(np.float64)), axis=axes, keepdims=True)
    np.testing.assert_allclose(to64(out), scale * np_sign(x.astype(np.float64)), rtol=1e-6)
    if len(shape) <= 1:  # nothing to average: |x| * sign(x) == x
        np.testing.assert_allclose(out, x, rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_swish_sign_large_inputs_finite_gradient(dtype: Any) -> None:
    x = jnp.asarray([-1e30, -1e4, -100.0, 100.0, 1e4, 1e30], dtype)
    grad = jax.grad(lambda v: quantizers.swish_sign(v, beta=10.0).sum())(x)
    assert np.all(np.isfinite(to64(grad)))
    np.testing.assert_allclose(to64(grad), 0.0, atol=1e-30)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_nan_propagates(case: Case) -> None:
    x = jnp.asarray([[np.nan, 0.5], [-0.5, 0.25]], jnp.float32)
    out = np.asarray(case.fn(x))
    if case.name == "magnitude_aware_sign":
        assert np.isnan(out[:, 0]).all()  # NaN poisons the mean of its own channel
        assert np.isfinite(out[:, 1]).all()
    elif case.kwargs.get("ternary_weight_networks"):
        assert np.isnan(out).all()  # NaN poisons the whole-array threshold
    else:
        assert np.isnan(out[0, 0])
        assert np.isfinite(out.ravel()[1:]).all()
    grad = jax.grad(lambda v: case.fn(v).sum())(x)
    if case.name != "magnitude_aware_sign":
        assert np.isfinite(np.asarray(grad)[1:]).all()


# --------------------------------------------------------------------------- sign helper


def test_sign_helper() -> None:
    x = jnp.asarray([-3.0, -0.0, 0.0, 2.0, np.nan, -np.inf, np.inf], jnp.float32)
    out = quantizers.sign(x)
    np.testing.assert_array_equal(out, [-1, 1, 1, 1, np.nan, -1, 1])
    assert out.dtype == jnp.float32
    assert quantizers.sign(jnp.asarray([0.0], jnp.bfloat16)).dtype == jnp.bfloat16
    ints = quantizers.sign(jnp.asarray([-2, 0, 3], jnp.int32))
    np.testing.assert_array_equal(ints, [-1, 1, 1])
    assert ints.dtype == jnp.int32
    np.testing.assert_array_equal(quantizers.sign(jnp.asarray([0, 7], jnp.uint8)), [1, 1])
    # Forward only: the true derivative (zero) is what autodiff sees.
    assert float(jax.grad(lambda v: quantizers.sign(v))(0.3)) == 0.0
    with pytest.raises(TypeError, match="`x`"):
        quantizers.sign(jnp.asarray([True]))
    with pytest.raises(TypeError, match="`x`"):
        quantizers.sign(jnp.asarray([1j]))


# --------------------------------------------------------------------------- lookup / errors


def test_get() -> None:
    for name in [
        "ste_sign",
        "approx_sign",
        "swish_sign",
        "magnitude_aware_sign",
        "ste_heaviside",
        "ste_tern",
    ]:
        assert quantizers.get(name) is getattr(quantizers, name)
        assert name in quantizers.__all__
    custom = functools.partial(quantizers.ste_sign, clip_value=None)
    assert quantizers.get(custom) is custom
    assert quantizers.get(None) is None
    with pytest.raises(ValueError, match="ste_sgn"):
        quantizers.get("ste_sgn")
    with pytest.raises(TypeError, match="`identifier`"):
        quantizers.get(3)  # type: ignore[arg-type]


def test_bad_arguments() -> None:
    x = jnp.ones((3,))
    with pytest.raises(TypeError):
        quantizers.ste_sign(x, 0.5)  # type: ignore[misc]  # params are keyword-only
    with pytest.raises(ValueError, match="`clip_value`"):
        quantizers.ste_sign(x, clip_value=-1.0)
    with pytest.raises(ValueError, match="`clip_value`"):
        quantizers.ste_heaviside(x, clip_value=float("nan"))
    with pytest.raises(TypeError, match="`clip_value`"):
        quantizers.magnitude_aware_sign(x, clip_value="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`clip_value`"):
        quantizers.ste_sign(x, clip_value=jnp.asarray(1.0))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`beta`"):
        quantizers.swish_sign(x, beta=0.0)
    with pytest.raises(ValueError, match="`threshold_value`"):
        quantizers.ste_tern(x, threshold_value=-0.1)
    with pytest.raises(TypeError, match="`ternary_weight_networks`"):
        quantizers.ste_tern(x, ternary_weight_networks=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`x`"):
        quantizers.ste_sign(jnp.ones((3,), jnp.int32))
    with pytest.raises(TypeError, match="`x`"):
        quantizers.approx_sign(jnp.ones((3,), jnp.bool_))


def test_accepts_python_scalars_and_lists() -> None:
    np.testing.assert_array_equal(quantizers.ste_sign([-0.5, 0.0]), [-1.0, 1.0])
    assert float(quantizers.approx_sign(0.0)) == 1.0
    assert float(jax.grad(quantizers.approx_sign)(0.5)) == 1.0

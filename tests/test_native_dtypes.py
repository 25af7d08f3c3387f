"""The native engine on bfloat16 and float16 operands (engines/native/engine.py, eligibility).

Built-in kernels and compiled user ops convert the operands inside the forward call
(csrc/kernel_bf16fuse_low.h); max/min results are rounded once (bit for bit the XLA
engine's products rounded in the dtype), sums accumulate in float32.
References: the numpy plain loops of tests/reference.py and the XLA engine.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import eligibility
from tests.reference import NUMPY_OPS, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
BF16, F16 = jnp.bfloat16, jnp.float16

CLIP = jaxconv.Op(lambda a, b: jnp.clip(a * b, -0.1, 0.1), "max", name="clip")
GAUSS = jaxconv.Op(lambda a, b: jnp.exp(-((a - b) ** 2)), "sum", name="gauss")
GATE = jaxconv.Op(lambda a, b: jnp.where(a > 0, a + b, -b), "min", name="gate")
TWICE = jaxconv.Op(lambda a, b: a * b + a, "max", name="twice")
MAXMIN = ("max_plus", "min_plus", "max_min", "min_max")


def _native_low_backward(text: str) -> bool:
    """Whether a lowered gradient runs a native bf16 / f16 max/min backward: the wide kernels
    on float32 copies (user ops), or the built-ins' one call (csrc/kernel_lowrec_backward.h)."""
    return "jaxconv_wide_backward" in text or "jaxconv_low_backward_recorded" in text


def _np(op: Any) -> tuple[Any, Any, float, float | None]:
    """(combine, reduce, identity, pad) in numpy (float64) for a built-in or a test op."""
    if isinstance(op, str):
        r = NUMPY_OPS["l2" if op == "l2_exact" else op]
        return r.combine, r.reduce, r.identity, r.pad_value
    return {"clip": (lambda a, b: np.clip(a * b, -0.1, 0.1), np.maximum, -np.inf, None),
            "gauss": (lambda a, b: np.exp(-((a - b) ** 2)), np.add, 0.0, None),
            "gate": (lambda a, b: np.where(a > 0, a + b, -b), np.minimum, np.inf, None),
            }[op.name]


def _conv(op: Any, engine: str) -> Any:
    return jax.jit(lambda a, b: jaxconv.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=DN, op=op, engine=engine))


def _loss(op: Any, engine: str) -> Any:
    return jax.jit(jax.grad(lambda a, b: jnp.sum(
        _conv(op, engine)(a, b).astype(jnp.float32) * jnp.cos(jnp.arange(3.0))[None, None, None]),
        argnums=(0, 1)))


def _data(dtype: Any, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 3)).astype(np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _is_maxmin(op: Any) -> bool:
    return op in MAXMIN or (not isinstance(op, str) and op.reduce in ("max", "min"))


# A covering set: every built-in kernel once, each dtype with max/min and sum ops, and user
# ops (a clip under max with a literal that is not a bf16 value, a select, a sum).
CASES = [("max_plus", BF16), ("min_plus", F16), ("max_min", F16), ("min_max", BF16),
         ("adder", BF16), ("l1", F16), ("l2_exact", BF16), (CLIP, BF16), (GATE, F16),
         (GAUSS, F16)]


@pytest.mark.parametrize("op,dtype", CASES)
def test_values_and_gradients_against_reference_and_xla(op: Any, dtype: Any) -> None:
    x, w = _data(dtype)
    # Served natively: the forward takes the operands' dtype (built-in and user kernels).
    text = _conv(op, "auto").lower(x, w).as_text()
    assert "jaxconv_low_forward" in text
    y = _conv(op, "native")(x, w)
    assert y.dtype == dtype
    with jax.numpy_rank_promotion("allow"):
        yx = _conv(op, "xla")(x, w)
        gx = _loss(op, "xla")(x, w)
    combine, reduce, identity, pad = _np(op)
    ref = conv_reference(np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1), "SAME",
                         dimension_numbers=DN, combine=combine, reduce=reduce,
                         identity=identity, pad_value=pad)
    got = np.asarray(y, np.float32)
    if _is_maxmin(op):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(yx))  # bit for bit
        np.testing.assert_array_equal(got, ref.astype(dtype).astype(np.float32))
    else:
        scale = np.abs(ref).max()
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * scale)
        np.testing.assert_allclose(got, np.asarray(yx, np.float32), rtol=1e-2,
                                   atol=1e-2 * scale)
    gn = _loss(op, "native")(x, w)
    for a, b in zip(gn, gx, strict=True):
        assert a.dtype == dtype
        if _is_maxmin(op):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        else:
            scale = float(np.abs(np.asarray(b, np.float32)).max())
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                       rtol=2e-2, atol=1e-2 * scale)


def _row(values: list[float], dtype: Any) -> jax.Array:
    return jnp.asarray(values, dtype).reshape(1, 1, len(values), 1)


def _conv_1x(op: Any, engine: str, x: jax.Array, w: jax.Array) -> jax.Array:
    with jax.numpy_rank_promotion("allow"):
        return jaxconv.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN,
                                            op=op, engine=engine)


@pytest.mark.parametrize("op,dtype", [("max_plus", BF16), ("min_plus", F16),
                                      ("max_min", BF16), ("l1", F16)])
def test_nan_inf_signed_zeros_and_overflow(op: str, dtype: Any) -> None:
    big = float(jnp.finfo(dtype).max)
    cases = [[np.nan, 1.0, 2.0], [np.inf, -np.inf, 0.0], [-np.inf, -np.inf, -np.inf],
             [0.0, -0.0, 0.0], [-0.0, 0.0, -0.0], [big, big, -big]]
    w = jnp.asarray([[0.0], [-0.0], [big / 2]], dtype).reshape(1, 3, 1, 1)
    for values in cases:
        x = _row(values, dtype)
        a = np.asarray(_conv_1x(op, "native", x, w), np.float32)
        b = np.asarray(_conv_1x(op, "xla", x, w), np.float32)
        np.testing.assert_array_equal(a, b)  # NaN where NaN, infinities, overflow
        real = ~np.isnan(a)  # a NaN's sign bit carries no meaning
        np.testing.assert_array_equal(np.signbit(a[real]), np.signbit(b[real]))


def test_signed_zero_products() -> None:
    """max orders -0 below +0, min above (the products +0, +0, -0)."""
    x = _row([0.0, 0.0, -0.0], BF16)
    w = jnp.full((1, 3, 1, 1), -0.0, BF16)  # x + (-0) keeps the sign of x
    hi = np.asarray(_conv_1x("max_plus", "native", x, w), np.float32).ravel()[0]
    lo = np.asarray(_conv_1x("min_plus", "native", x, w), np.float32).ravel()[0]
    assert hi == 0 and not np.signbit(hi) and lo == 0 and np.signbit(lo)


def test_ties_of_the_rounded_products_split_the_gradient() -> None:
    """1 + (2^-8 + 2^-10) and 1 + 2^-7 differ in float32 but are one bfloat16 value: a tie,
    as jax.grad of jnp.max over the bfloat16 products."""
    x = _row([1.0, 1.0 + 2.0**-7], BF16)
    w = jnp.asarray([2.0**-8 + 2.0**-10, 0.0], BF16).reshape(1, 2, 1, 1)
    y = _conv_1x("max_plus", "native", x, w)
    assert float(y.ravel()[0]) == 1.0 + 2.0**-7
    g = jax.grad(lambda a, b: _conv_1x("max_plus", "native", a, b).astype(
        jnp.float32).sum(), argnums=(0, 1))(x, w)
    terms = (x.reshape(2) + w.reshape(2)).astype(BF16)
    expect = jax.grad(lambda t: jnp.max(t).astype(jnp.float32))(terms)
    np.testing.assert_array_equal(np.asarray(g[0]).ravel(), np.asarray(expect))
    np.testing.assert_array_equal(np.asarray(g[1]).ravel(), np.asarray(expect))
    np.testing.assert_array_equal(np.asarray(expect, np.float32), [0.5, 0.5])


_BF16_MAX = float(jnp.finfo(BF16).max)


@pytest.mark.parametrize("op,xs,ws,dtype", [
    # a float32 product halfway between two bfloat16 values rounds to the even one:
    ("max_plus", [1.0, 1.0], [2.0**-8, 0.0], BF16),  # 1 + 2^-8 -> 1: a tie
    ("max_plus", [1.0 + 2.0**-7, 1.0 + 2.0**-6], [2.0**-8, 0.0], BF16),  # to 1 + 2^-6: a tie
    ("max_plus", [1.0 + 2.0**-7, 1.0 + 2.0**-7], [2.0**-8, 0.0], BF16),  # one winner
    ("min_plus", [1.0 + 2.0**-7, 1.0 + 2.0**-7], [2.0**-8, 0.0], BF16),  # not the odd 1 + 2^-7
    ("min_plus", [-1.0 - 2.0**-7, -1.0 - 2.0**-6], [-(2.0**-8), 0.0], BF16),
    # halfway past the largest finite value: rounds to infinity, a tie with one
    ("max_plus", [_BF16_MAX, float("inf")], [2.0**119, 0.0], BF16),
    ("max_plus", [-0.0, 0.0], [-0.0, 0.0], BF16),  # -0 and +0: a tie
    # float16's intervals: halfway to the even 1 (a tie), away from the odd 1 + 2^-10 (one
    # winner), and 65504 + 16 = 65520 rounding to infinity (a tie with one)
    ("max_plus", [1.0, 1.0], [2.0**-11, 0.0], F16),
    ("min_plus", [1.0 + 2.0**-10, 1.0 + 2.0**-10], [2.0**-11, 0.0], F16),
    ("max_plus", [65504.0, float("inf")], [16.0, 0.0], F16),
])
def test_products_on_rounding_boundaries_tie_as_rounded(op: str, xs: list, ws: list,
                                                        dtype: Any) -> None:
    """Products on the edges of a bfloat16 / float16 value's rounding interval win or tie as
    their rounded values do (jax.grad of jnp.max / jnp.min over the rounded products)."""
    x, w = _row(xs, dtype), jnp.asarray(ws, dtype).reshape(1, 2, 1, 1)
    grad = jax.jit(jax.grad(lambda a, b: _conv_1x(op, "native", a, b).astype(
        jnp.float32).sum(), argnums=(0, 1)))
    assert _native_low_backward(grad.lower(x, w).as_text())
    g = grad(x, w)
    terms = (x.reshape(2) + w.reshape(2)).astype(dtype)
    red = jnp.max if op == "max_plus" else jnp.min
    expect = np.asarray(jax.grad(lambda t: red(t).astype(jnp.float32))(terms), np.float32)
    for a in g:
        np.testing.assert_array_equal(np.asarray(a, np.float32).ravel(), expect)


@pytest.mark.parametrize("op,dtype,x0,w0", [
    # 1 + (2^-11 + 2^-13) rounds to 1 + 2^-10 in float16: a tie with 1 + 2^-10 + 0.
    ("max_plus", F16, 1.0, 2.0**-11 + 2.0**-13),
    # -1 - (2^-8 + 2^-10) rounds to -1 - 2^-7 in bfloat16: a tie under min.
    ("min_plus", BF16, -1.0, -(2.0**-8 + 2.0**-10)),
])
def test_ties_only_after_rounding_run_natively(op: str, dtype: Any, x0: float,
                                               w0: float) -> None:
    """The native backward (wide kernels on float32 copies) rounds each product to the dtype
    before comparing it with y: the two products tie, the gradient is split."""
    step = 2.0**-10 if dtype == F16 else 2.0**-7
    x1 = x0 + step if x0 > 0 else x0 - step
    x = _row([x0, x1], dtype)
    w = jnp.asarray([w0, 0.0], dtype).reshape(1, 2, 1, 1)

    def loss(a: jax.Array, b: jax.Array) -> jax.Array:
        return _conv_1x(op, "native", a, b).astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert _native_low_backward(grad.lower(x, w).as_text())
    g = grad(x, w)
    np.testing.assert_array_equal(np.asarray(g[0], np.float32).ravel(), [0.5, 0.5])
    np.testing.assert_array_equal(np.asarray(g[1], np.float32).ravel(), [0.5, 0.5])
    with jax.numpy_rank_promotion("allow"):
        gx = jax.grad(lambda a, b: _conv_1x(op, "xla", a, b).astype(jnp.float32).sum(),
                      argnums=(0, 1))(x, w)
    for a, b in zip(g, gx, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("op,dtype", [("max_plus", BF16), ("min_plus", F16),
                                      ("max_min", F16), ("min_max", BF16), (CLIP, BF16),
                                      (GATE, F16)])
def test_gradients_with_many_rounded_ties(op: str, dtype: Any) -> None:
    """Data on a coarse grid with a fine offset: many products tie only once rounded. The
    winners and shares are the XLA engine's; a gradient summing several shares is rounded
    once from float32 here, per addition there (one unit in the last place). User ops run
    the same backward, their combine compiled for the wide kernels."""
    rng = np.random.default_rng(9)
    x = jnp.asarray(np.round(rng.standard_normal((2, 6, 5, 4)) * 4) / 4 + 2.0**-9, dtype)
    w = jnp.asarray(np.round(rng.standard_normal((3, 3, 4, 3)) * 4) / 4 + 2.0**-10, dtype)
    got, want = _loss(op, "native")(x, w), _loss(op, "xla")(x, w)
    assert _native_low_backward(_loss(op, "native").lower(x, w).as_text())
    ulp = float(jnp.finfo(dtype).eps)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=ulp, atol=ulp / 4)


@pytest.mark.parametrize("op,dtype", [("max_plus", BF16), ("min_max", F16)])
def test_rounded_ties_across_kernel_panels_and_channel_blocks(op: str, dtype: Any) -> None:
    """The native scan lists winners per panel of 64 kernel rows and per block of output
    channels: 108 kernel rows, 70 output channels and 25 positions (an odd count) on a coarse
    grid tie within and across panels; the gradients are the XLA engine's (to one unit in
    the last place, as above)."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(np.round(rng.standard_normal((1, 5, 5, 12)) * 2) / 2 + 2.0**-9, dtype)
    w = jnp.asarray(np.round(rng.standard_normal((3, 3, 12, 70)) * 2) / 2 + 2.0**-10, dtype)
    mix = jnp.cos(jnp.arange(70.0)).reshape(1, 1, 1, 70)

    def grad(engine: str) -> Any:
        return jax.jit(jax.grad(lambda a, b: jnp.sum(
            _conv(op, engine)(a, b).astype(jnp.float32) * mix), argnums=(0, 1)))(x, w)

    ulp = float(jnp.finfo(dtype).eps)
    for a, b in zip(grad("native"), grad("xla"), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=ulp, atol=ulp / 4)


def test_sums_accumulate_in_float32() -> None:
    """One large term and 128 small ones: a bfloat16 accumulator would drop the small."""
    xv = np.concatenate([[-256.0], -np.ones(128)]).astype(np.float32)
    x = jnp.asarray(xv, BF16).reshape(1, 1, 1, 129)
    w = jnp.zeros((1, 1, 129, 1), BF16)
    acc = ml_dtypes.bfloat16(0)
    for v in -np.abs(xv):
        acc = ml_dtypes.bfloat16(acc + ml_dtypes.bfloat16(v))
    assert abs(float(acc) + 384.0) >= 64  # the case is discriminating
    for pref, expect in ((None, BF16), (jnp.float32, jnp.float32)):
        y = jaxconv.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=DN,
                                         op="l1", engine="native",
                                         preferred_element_type=pref)
        assert y.dtype == expect and float(y.ravel()[0]) == -384.0


@pytest.mark.parametrize("op,dtype,reason", [
    (TWICE, BF16, "in bfloat16 its combine rounds 'add' of a rounded value"),
    (jaxconv.Op(lambda a, b: a * 0.1, "max", name="lit"), F16,
     "its constant 0.10000000149011612 is not a float16 value"),
    (jaxconv.Op(lambda a, b: jnp.where(a * b > 0, a, b), "max", name="sel"), BF16,
     "in bfloat16 its combine rounds 'gt' of a rounded value"),
])
def test_refused_where_rounding_once_would_differ(op: Any, dtype: Any, reason: str) -> None:
    """The call refuses what explain refuses, with the same reason; auto runs the XLA
    engine."""
    x, w = _data(dtype)
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace(")", r"\)")):
        _conv(op, "native")(x, w)
    plan = jaxconv.explain(op, dtype=dtype, platform="cpu")
    assert plan.engine == "xla" and f"not native: {reason}" in plan.details
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_array_equal(np.asarray(_conv(op, "auto")(x, w)),
                                      np.asarray(_conv(op, "xla")(x, w)))


@pytest.mark.parametrize("op,dtype,acc,what", [
    ("max_plus", BF16, None, "rounded once to bfloat16"),
    ("max_plus", F16, None, "each product rounded to float16 before the winner compare"),
    (CLIP, BF16, None, "each product rounded to bfloat16 before the winner compare"),
    ("adder", BF16, None, "products and sum in float32"),
])
def test_explain_says_what_the_call_does(op: str, dtype: Any, acc: Any, what: str) -> None:
    plan = jaxconv.explain(op, dtype=dtype, platform="cpu")
    assert plan.engine == "native"
    assert any(what in d for d in plan.details), plan.details


def test_a_pad_value_is_the_dtypes_value() -> None:
    """A pad value between two bf16 values pads as the XLA engine pads: in bfloat16."""
    op = jaxconv.Op(jnp.add, "max", pad_value=1.0 + 2.0**-9 + 2.0**-12, name="padded")
    assert eligibility.rounds_once(op, BF16) is None
    x, w = _data(BF16, seed=3)
    x = x - 10.0  # padding wins at the border
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_array_equal(np.asarray(_conv(op, "native")(x, w)),
                                      np.asarray(_conv(op, "xla")(x, w)))


@pytest.mark.parametrize("op", ["max_plus", "min_max"])
def test_max_min_with_a_float32_result(op: str) -> None:
    """preferred_element_type=float32: the max of the bf16-rounded products, in float32."""
    x, w = _data(BF16, seed=4)

    def f(engine: str) -> Any:
        return jax.jit(lambda a, b: jaxconv.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=DN, op=op, engine=engine,
            preferred_element_type=jnp.float32))

    y = f("native")(x, w)
    assert y.dtype == jnp.float32
    assert "jaxconv_low_forward" in f("native").lower(x, w).as_text()
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_array_equal(np.asarray(y), np.asarray(f("xla")(x, w)))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y.astype(BF16), np.float32))


def test_kernel_gradient_of_winners_in_the_padding() -> None:
    """max(x, w) under min with a pad value, x shifted up so that the padding wins at the
    border: a winner in the padding has no input gradient and its kernel gradient reads the
    pad value (0: max(0, w) is w's where w > 0, else the pad's, so dw depends on it). The
    bf16 backward forms a one-winner output's kernel term in its first pass; the gradients
    are the XLA engine's."""
    op = jaxconv.Op(jnp.maximum, "min", pad_value=0.0, name="padded_min_max")
    x, w = _data(BF16, seed=6)
    x = x + 8.0
    assert "jaxconv_wide_backward" in _loss(op, "native").lower(x, w).as_text()
    ulp = float(jnp.finfo(BF16).eps)
    for a, b in zip(_loss(op, "native")(x, w), _loss(op, "xla")(x, w), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=ulp, atol=ulp / 4)

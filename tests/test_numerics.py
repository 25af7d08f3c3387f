"""Numerics: infinities, NaN, padding-only windows, ties, log's -inf windows, low precision.

Expected values come from the algebra written out by hand, from ``tests/reference.py`` (numpy
loops, IEEE arithmetic in float64) and, for gradients at ties, from ``jax.grad`` of a
brute-force formula that gathers every window into an explicit axis and takes ``jnp.max``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from reference import NUMPY_OPS, conv_reference, dot_general_reference

import jaxconv
from jaxconv import ops

INF = np.inf
NAN = np.nan
DN1 = ("NWC", "WIO", "NWC")
DN2 = ("NHWC", "HWIO", "NHWC")
ALL_OPS = list(ops.names())
GENERIC_OPS = [n for n in ALL_OPS if n != "standard"]
MAXMIN_OPS = ["max_plus", "min_plus", "max_min", "min_max"]


def jconv(x: Any, w: Any, *args: Any, **kw: Any) -> jax.Array:
    """``jaxconv.conv_general_dilated`` under ``jit`` (compiling beats op-by-op dispatch)."""
    return jax.jit(lambda a, b: jaxconv.conv_general_dilated(a, b, *args, **kw))(x, w)


def conv1(x: Any, w: Any, op: Any, padding: Any = "VALID", dtype: Any = jnp.float32,
          **kw: Any) -> np.ndarray:
    """A 1-D, one-channel convolution of the sequences ``x`` and ``w``."""
    xa = jnp.asarray(np.asarray(x, np.float64).astype(dtype)).reshape(1, -1, 1)
    wa = jnp.asarray(np.asarray(w, np.float64).astype(dtype)).reshape(-1, 1, 1)
    y = jconv(xa, wa, (1,), padding, dimension_numbers=DN1, op=op, **kw)
    return np.asarray(y.astype(jnp.float32))[0, :, 0]


# --------------------------------------------------------------------------------------------
# Infinities: the algebra's answer, NaN only where IEEE has one (-inf + inf).
# --------------------------------------------------------------------------------------------

# (op, x, w, expected): windows of length 2 slide over x.
INF_CASES = [
    ("max_plus", [-INF, 1, 2], [0, 0], [1, 2]),           # -inf is dominated
    ("max_plus", [INF, 1, 2], [0, 0], [INF, 2]),          # +inf wins
    ("max_plus", [0, 1, 2], [-INF, 0], [1, 2]),           # a -inf weight removes its tap
    ("max_plus", [-INF, -INF, 2], [0, 0], [-INF, 2]),     # nothing but -inf: -inf
    ("max_plus", [-INF, 1, 2], [INF, 0], [NAN, INF]),     # -inf + inf is NaN
    ("max_plus", [1, 2, 3], [INF, -INF], [INF, INF]),
    ("min_plus", [INF, 1, 2], [0, 0], [1, 1]),            # +inf is dominated in a min
    ("min_plus", [-INF, 1, 2], [0, 0], [-INF, 1]),
    ("min_plus", [0, 1, 2], [-INF, 0], [-INF, -INF]),
    ("min_plus", [INF, INF, 2], [0, 0], [INF, 2]),
    ("min_plus", [-INF, 1, 2], [INF, 0], [NAN, 2]),
    ("log", [-INF, 1, 2], [0, 0], [1, np.logaddexp(1, 2)]),
    ("log", [INF, 1, 2], [0, 0], [INF, np.logaddexp(1, 2)]),
    ("log", [0, 1, 2], [-INF, 0], [1, 2]),
    ("log", [-INF, -INF, 2], [0, 0], [-INF, 2]),
    ("log", [-INF, 1, 2], [INF, 0], [NAN, INF]),
    ("log", [1000, 1000, 0], [0, 0], [1000 + np.log(2), 1000]),  # no overflow
    ("log", [-1000, -1000, 0], [0, 0], [-1000 + np.log(2), 0]),  # no underflow
    ("max_min", [-INF, 1, 2], [0, INF], [1, 2]),
    ("max_min", [-INF, -INF, 2], [INF, INF], [-INF, 2]),
    ("min_max", [INF, 1, 2], [0, -INF], [1, 1]),
    ("min_max", [INF, INF, 2], [-INF, -INF], [INF, 2]),
]


@pytest.mark.parametrize("op,x,w,expected", INF_CASES)
def test_infinities_follow_the_algebra(op: str, x: list, w: list, expected: list) -> None:
    got = conv1(x, w, op)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    ref = NUMPY_OPS[op]
    xr = np.asarray(x, np.float32).reshape(1, -1, 1)
    wr = np.asarray(w, np.float32).reshape(-1, 1, 1)
    expect = conv_reference(xr, wr, (1,), "VALID", dimension_numbers=DN1, combine=ref.combine,
                            reduce=ref.reduce, identity=ref.identity)[0, :, 0]
    np.testing.assert_allclose(got, expect, rtol=1e-6)


@pytest.mark.parametrize("op", ["max_plus", "min_plus", "log", "max_min", "min_max"])
def test_infinities_at_scale_against_reference(op: str) -> None:
    """Random +-inf in input and kernel, borders and strides included, under jit."""
    rng = np.random.default_rng(10)
    x = rng.standard_normal((2, 6, 5, 3)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 4)).astype(np.float32)
    x[rng.random(x.shape) < 0.15] = -INF
    x[rng.random(x.shape) < 0.05] = INF
    w[rng.random(w.shape) < 0.15] = -INF if op != "min_plus" else INF
    f = jax.jit(lambda a, b: jaxconv.conv_general_dilated(
        a, b, (2, 1), "SAME", rhs_dilation=(1, 2), dimension_numbers=DN2, op=op))
    got = np.asarray(f(x, w))
    ref = NUMPY_OPS[op]
    expect = conv_reference(x, w, (2, 1), "SAME", rhs_dilation=(1, 2), dimension_numbers=DN2,
                            combine=ref.combine, reduce=ref.reduce, identity=ref.identity)
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-5)
    assert np.isnan(got).sum() == np.isnan(expect).sum()


# --------------------------------------------------------------------------------------------
# Windows made only of padding give the identity (in the dtype's own infinities).
# --------------------------------------------------------------------------------------------

IDENTITY = {"max_plus": -INF, "min_plus": INF, "max_min": -INF, "min_max": INF, "log": -INF,
            "xnor": 0.0, "l1": 0.0, "l2": 0.0, "l2_exact": 0.0, "standard": 0.0}


PAD_CASES = [(op, jnp.float32) for op in sorted(IDENTITY)] + [
    (op, dt) for op in ("max_plus", "min_plus", "log", "l1") for dt in (jnp.bfloat16, jnp.float16)]


@pytest.mark.parametrize("op,dtype", PAD_CASES)
def test_padding_only_windows_give_the_identity(op: str, dtype: Any) -> None:
    # Padded: [p, p, p, x0, x1]; windows of 2 -> [p p] [p p] [p x0] [x0 x1].
    x = [3.0, -2.0]
    w = [0.5, -1.0]
    got = conv1(x, w, op, padding=((3, 0),), dtype=dtype)
    assert got[0] == IDENTITY[op] and got[1] == IDENTITY[op], got
    ref = NUMPY_OPS["l2" if op == "l2_exact" else op]
    expect = conv_reference(np.reshape(x, (1, 2, 1)), np.reshape(w, (2, 1, 1)), (1,),
                            ((3, 0),), dimension_numbers=DN1, combine=ref.combine,
                            reduce=ref.reduce, identity=ref.identity)[0, :, 0]
    tol = 1e-6 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(got, expect, rtol=tol)


def test_adder_pads_with_zero_and_lhs_dilation_holes_are_padding() -> None:
    # adder: padded cells hold 0 and each adds -|w|.
    got = conv1([3.0, -2.0], [0.5, -1.0], "adder", padding=((3, 0),))
    np.testing.assert_allclose(got[:2], [-1.5, -1.5])
    # Holes of lhs_dilation behave as padding: max-plus skips them.
    got = conv1([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], "max_plus", padding=((0, 0),),
                lhs_dilation=(3,))
    np.testing.assert_array_equal(got, [1.0, 2.0, 2.0, 2.0, 3.0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_identities_are_the_dtypes_own_infinities(dtype: Any) -> None:
    """Near the dtype's largest finite value nothing overflows and padding is skipped."""
    big = float(jnp.finfo(dtype).max)
    got = conv1([big, -big], [0.0, 0.0, 0.0], "max_plus", padding="SAME", dtype=dtype)
    np.testing.assert_array_equal(got, [big, big])
    got = conv1([-big, big], [0.0, 0.0, 0.0], "min_plus", padding="SAME", dtype=dtype)
    np.testing.assert_array_equal(got, [-big, -big])
    got = conv1([-big, -big], [0.0, 0.0, 0.0], "log", padding="SAME", dtype=dtype)
    assert np.all(np.isfinite(got)) and np.all(got < -big / 2)


def test_integer_identities_are_the_dtype_extremes() -> None:
    """Integer max/min ops: a padding-only window gives iinfo.min / iinfo.max."""
    x = jnp.asarray([[5], [7]], jnp.int32).reshape(1, 2, 1)
    w = jnp.asarray([1, 2], jnp.int32).reshape(2, 1, 1)
    y = jconv(x, w, (1,), ((3, 0),), dimension_numbers=DN1, op="max_plus")
    assert y.dtype == jnp.int32
    np.testing.assert_array_equal(y[0, :, 0], [np.iinfo(np.int32).min] * 2 + [7, 9])
    y = jconv(x, w, (1,), ((3, 0),), dimension_numbers=DN1, op="min_plus")
    np.testing.assert_array_equal(y[0, :, 0], [np.iinfo(np.int32).max] * 2 + [7, 6])


# --------------------------------------------------------------------------------------------
# NaN in, NaN out, for every op, with vectorised (64-channel) reductions.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("op", ALL_OPS)
def test_nan_propagates(op: str) -> None:
    """A NaN in image 0 of the input and one in output channel 5 of the kernel."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 5, 5, 64)).astype(np.float32)
    w = rng.standard_normal((2, 2, 64, 8)).astype(np.float32)
    x[0, 2, 3, 17] = NAN
    w[1, 1, 33, 5] = NAN
    expect = np.zeros((2, 5, 5, 8), bool)
    expect[0, 1:3, 2:4, :] = True
    expect[:, :, :, 5] = True
    if ops.get(op).pad_value is None and op not in ("standard", "xnor"):
        # Tap (1, 1) of the kernel lies in the padding for the last row and column: a
        # skipped tap never reads its weight. (standard pads with real zeros as lax,
        # 0 * NaN = NaN; adder pads with 0 through combine; the xnor rewrite is a native
        # convolution over zero padding, so it gives NaN there too. The l2 rewrite counts
        # in-bounds NaN taps only.)
        expect[:, 4, :, 5] = False
        expect[:, :, 4, 5] = False
    f = jax.jit(lambda a, b: jaxconv.conv_general_dilated(a, b, (1, 1), "SAME",
                                                          dimension_numbers=DN2, op=op))
    got = np.isnan(np.asarray(f(x, w)))
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("op", ALL_OPS)
def test_nan_propagates_in_dot_general(op: str) -> None:
    rng = np.random.default_rng(12)
    a = rng.standard_normal((8, 128)).astype(np.float32)
    b = rng.standard_normal((128, 16)).astype(np.float32)
    a[3, 70] = NAN
    b[5, 9] = NAN
    y = np.asarray(jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op=op))
    expect = np.zeros(y.shape, bool)
    expect[3, :] = True
    expect[:, 9] = True
    np.testing.assert_array_equal(np.isnan(y), expect)


@pytest.mark.parametrize("op", ["max_plus", "min_plus", "max_min", "min_max", "log"])
def test_nan_wins_over_infinities(op: str) -> None:
    """NaN next to +-inf (the non-finite path of max/min) still gives NaN."""
    got = conv1([NAN, INF, -INF, 1.0, 2.0], [0.0, 0.0], op)
    assert np.isnan(got[0]) and not np.isnan(got[2:]).any()


# --------------------------------------------------------------------------------------------
# Ties: the gradient is split equally among tied taps, as jax.grad(jnp.max) does.
# --------------------------------------------------------------------------------------------

def brute_force_conv(x: jax.Array, w: jax.Array, op: jaxconv.Op, strides: tuple[int, int],
                     padding: tuple[tuple[int, int], ...], rhs_dilation: tuple[int, int],
                     ) -> jax.Array:
    """NHWC x HWIO: every window gathered into an explicit axis, then ``jnp.max``/``min``."""
    n, h, wd, c = x.shape
    kh, kw, _, o = w.shape
    (plo, phi), (qlo, qhi) = padding
    oh = (h + plo + phi - (kh - 1) * rhs_dilation[0] - 1) // strides[0] + 1
    ow = (wd + qlo + qhi - (kw - 1) * rhs_dilation[1] - 1) // strides[1] + 1
    ih = (np.arange(oh)[:, None] * strides[0] + np.arange(kh)[None, :] * rhs_dilation[0]
          - plo)  # (oh, kh)
    iw = (np.arange(ow)[:, None] * strides[1] + np.arange(kw)[None, :] * rhs_dilation[1]
          - qlo)  # (ow, kw)
    valid = ((ih >= 0) & (ih < h))[:, None, :, None] & ((iw >= 0) & (iw < wd))[None, :, None, :]
    g = x[:, np.clip(ih, 0, h - 1)[:, None, :, None], np.clip(iw, 0, wd - 1)[None, :, None, :]]
    # g: (n, oh, ow, kh, kw, c); products (n, oh, ow, kh, kw, c, o).
    prod = op.combine(g[..., None], w[None, None, None])
    ident = -jnp.inf if op.reduce == "max" else jnp.inf
    prod = jnp.where(valid[None, :, :, :, :, None, None], prod, ident)
    prod = prod.reshape(n, oh, ow, kh * kw * c, o)
    return jnp.max(prod, axis=3) if op.reduce == "max" else jnp.min(prod, axis=3)


GEOMETRIES = [((1, 1), ((1, 1), (1, 1)), (1, 1)), ((2, 1), ((0, 1), (2, 0)), (1, 2))]


@pytest.mark.parametrize("op,geometry", [(op, GEOMETRIES[i % 2])
                                         for i, op in enumerate(MAXMIN_OPS)])
def test_tie_gradients_match_jnp_max(op: str, geometry: tuple) -> None:
    strides, padding, rdil = geometry
    rng = np.random.default_rng(13)
    # Small integers: most windows have several tied winners.
    x = jnp.asarray(rng.integers(-2, 3, (2, 5, 5, 3)).astype(np.float32))
    w = jnp.asarray(rng.integers(-1, 2, (3, 2, 3, 2)).astype(np.float32))
    o = ops.get(op)

    def mine(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a, b, strides, padding, rhs_dilation=rdil,
                                            dimension_numbers=DN2, op=o)

    y = jax.jit(mine)(x, w)
    y_bf = jax.jit(lambda a, b: brute_force_conv(a, b, o, strides, padding, rdil))(x, w)
    np.testing.assert_array_equal(y, y_bf)
    ct = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
    g = jax.jit(jax.grad(lambda a, b: jnp.sum(mine(a, b) * ct), argnums=(0, 1)))(x, w)
    g_bf = jax.jit(jax.grad(lambda a, b: jnp.sum(
        brute_force_conv(a, b, o, strides, padding, rdil) * ct), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(g[0], g_bf[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g[1], g_bf[1], rtol=1e-5, atol=1e-5)


def test_tie_gradient_split_by_hand() -> None:
    """Three equal taps share the cotangent in thirds (max-plus, one window)."""
    x = jnp.asarray([1.0, 2.0, 0.0]).reshape(1, 3, 1)
    w = jnp.asarray([1.0, 0.0, 2.0]).reshape(3, 1, 1)
    gx, gw = jax.jit(jax.grad(lambda a, b: jnp.sum(jaxconv.conv_general_dilated(
        a, b, (1,), "VALID", dimension_numbers=DN1, op="max_plus")), argnums=(0, 1)))(x, w)
    np.testing.assert_allclose(gx.ravel(), [1 / 3] * 3, rtol=1e-6)
    np.testing.assert_allclose(gw.ravel(), [1 / 3] * 3, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# log: an all -inf window gives -inf and a zero gradient, never NaN.
# --------------------------------------------------------------------------------------------

def test_log_all_neg_inf_window_has_zero_gradient() -> None:
    x = jnp.asarray([-INF, -INF, -INF, 0.5, 1.0, -INF]).reshape(1, 6, 1)
    w = jnp.asarray([0.0, -1.0]).reshape(2, 1, 1)

    def f(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a, b, (1,), ((2, 1),), dimension_numbers=DN1,
                                            op="log")

    y = np.asarray(jax.jit(f)(x, w))[0, :, 0]
    # Windows: [p p] [p -inf] [-inf -inf] [-inf -inf] [-inf .5] [.5 1] [1 -inf] [-inf p].
    assert np.isneginf(y[:4]).all() and np.isneginf(y[-1])
    np.testing.assert_allclose(y[4:7], [0.5 - 1.0, np.logaddexp(0.5, 0.0), 1.0], rtol=1e-6)
    gx, gw = jax.jit(jax.grad(lambda a, b: jnp.sum(
        jnp.where(jnp.isfinite(f(a, b)), f(a, b), 0.0)), argnums=(0, 1)))(x, w)
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    ct_all = jax.jit(lambda a, b: jax.vjp(f, a, b)[1](jnp.ones((1, 8, 1))))(x, w)
    assert all(np.isfinite(g).all() for g in ct_all)
    np.testing.assert_array_equal(np.asarray(ct_all[0])[0, :3, 0], [0.0, 0.0, 0.0])


# --------------------------------------------------------------------------------------------
# Low precision: sums accumulate in float32 (or preferred_element_type).
# --------------------------------------------------------------------------------------------

def _bf16_sequential_sum(values: np.ndarray) -> float:
    acc = ml_dtypes.bfloat16(0)
    for v in values:
        acc = ml_dtypes.bfloat16(acc + ml_dtypes.bfloat16(v))
    return float(acc)


@pytest.mark.parametrize("op,dtype", [
    *[(op, jnp.bfloat16) for op in ("mul", "l1", "adder", "l2", "l2_exact", "log")],
    ("mul", jnp.float16), ("log", jnp.float16)])
def test_low_precision_sums_accumulate_in_float32(op: str, dtype: Any) -> None:
    """One large term and 128 small ones: low-precision accumulation would drop the small."""
    c = 129
    if op in ("mul",):
        xv = np.concatenate([[256.0], np.ones(c - 1)])
        wv = np.ones(c)
        o = jaxconv.Op(jnp.multiply, "sum", name="mul")
    elif op in ("l1", "adder"):
        xv = np.concatenate([[-256.0], -np.ones(c - 1)])
        wv = np.zeros(c)
        o = ops.get(op)
    elif op in ("l2", "l2_exact"):
        xv = np.concatenate([[16.0], np.ones(c - 1)])
        wv = np.zeros(c)
        o = ops.get(op)
    else:  # log: exp-sum of one large and many small terms
        xv = np.concatenate([[np.log(256.0)], np.zeros(c - 1)])
        wv = np.zeros(c)
        o = ops.log
    x = jnp.asarray(xv.astype(np.float32)).astype(dtype).reshape(1, 1, c)
    w = jnp.asarray(wv.astype(np.float32)).astype(dtype).reshape(1, c, 1)
    exact = {"mul": 384.0, "l1": -384.0, "adder": -384.0, "l2": -384.0, "l2_exact": -384.0,
             "log": float(np.log(np.sum(np.exp(np.asarray(x.astype(jnp.float32), np.float64)))))
             }[op]
    if dtype == jnp.bfloat16 and op != "log":
        terms = {"mul": xv * wv, "log": None}.get(op, -np.abs(xv - wv) ** (2 if "l2" in op
                                                                          else 1))
        assert abs(_bf16_sequential_sum(terms) - exact) >= 64  # the case is discriminating
    y = jconv(x, w, (1,), "VALID", dimension_numbers=DN1, op=o)
    assert y.dtype == dtype
    np.testing.assert_allclose(float(y.ravel()[0]), exact, rtol=4e-3)
    y32 = jconv(x, w, (1,), "VALID", dimension_numbers=DN1, op=o,
                preferred_element_type=jnp.float32)
    assert y32.dtype == jnp.float32
    np.testing.assert_allclose(float(y32.ravel()[0]), exact, rtol=1e-6)


def test_low_precision_dot_accumulates_in_float32() -> None:
    a = jnp.asarray(np.concatenate([[256.0], np.ones(128)]), jnp.bfloat16)[None]
    b = jnp.zeros((129, 1), jnp.bfloat16)
    y = jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op="l1",
                            preferred_element_type=jnp.float32)
    np.testing.assert_allclose(np.asarray(y), [[-384.0]])


@pytest.mark.parametrize("op,dtype", [("max_plus", jnp.bfloat16), ("min_max", jnp.bfloat16),
                                      ("l1", jnp.bfloat16), ("log", jnp.float16),
                                      ("min_plus", jnp.float16)])
def test_low_precision_against_reference(op: str, dtype: Any) -> None:
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 7, 3)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2)).astype(np.float32)
    xl, wl = jnp.asarray(x).astype(dtype), jnp.asarray(w).astype(dtype)
    y = jconv(xl, wl, (1,), "SAME", dimension_numbers=DN1, op=op)
    assert y.dtype == dtype
    ref = NUMPY_OPS[op]
    expect = conv_reference(np.asarray(xl.astype(jnp.float32)),
                            np.asarray(wl.astype(jnp.float32)), (1,), "SAME",
                            dimension_numbers=DN1, combine=ref.combine, reduce=ref.reduce,
                            identity=ref.identity)
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expect, rtol=1e-2, atol=2e-2)


# --------------------------------------------------------------------------------------------
# Integer inputs.
# --------------------------------------------------------------------------------------------

def test_integer_inputs() -> None:
    """standard as lax; sum/max ops exact in the integer dtype; xnor/log need floats."""
    rng = np.random.default_rng(15)
    x = rng.integers(-5, 6, (2, 6, 3)).astype(np.int32)
    w = rng.integers(-3, 4, (3, 3, 4)).astype(np.int32)
    y = jaxconv.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=DN1)
    np.testing.assert_array_equal(y, lax.conv_general_dilated(x, w, (1,), "SAME",
                                                              dimension_numbers=DN1))
    assert y.dtype == jnp.int32
    y8 = jaxconv.conv_general_dilated(x.astype(np.int8), w.astype(np.int8), (1,), "SAME",
                                      dimension_numbers=DN1, preferred_element_type=jnp.int32)
    np.testing.assert_array_equal(y8, y)
    for op in ["max_plus", "min_plus", "l1", "l2_exact", "max_min", "min_max"]:
        got = jconv(x, w, (1,), "SAME", dimension_numbers=DN1, op=op)
        assert got.dtype == jnp.int32, op
        ref = NUMPY_OPS["l2" if op == "l2_exact" else op]
        expect = conv_reference(x, w, (1,), "SAME", dimension_numbers=DN1,
                                combine=ref.combine, reduce=ref.reduce, identity=ref.identity)
        np.testing.assert_array_equal(got, expect, err_msg=op)
    for op in ["xnor", "log"]:
        with pytest.raises(TypeError, match=f"op '{op}'"):
            jaxconv.conv_general_dilated(x, w, (1,), "SAME", dimension_numbers=DN1, op=op)


def test_integer_dot_general() -> None:
    a = np.arange(12, dtype=np.int32).reshape(3, 4) - 5
    b = np.arange(8, dtype=np.int32).reshape(4, 2) - 3
    dn = (((1,), (0,)), ((), ()))
    got = jaxconv.dot_general(a, b, dn, op="max_plus")
    expect = dot_general_reference(a, b, dn, combine=np.add, reduce=np.maximum, identity=-INF)
    np.testing.assert_array_equal(got, expect)


# --------------------------------------------------------------------------------------------
# The l2 rewrite (2 x.w - x^2 - w^2) where it cannot be used as is: infinities, NaN, values
# whose squares overflow, integers. Expected: the numpy loop reference (float64, or the
# dtype's own wrapping arithmetic), which l2_exact also follows.
# --------------------------------------------------------------------------------------------

L2_SPECIAL = [
    ([1, INF, 2], [0.5, 0.25]),              # the case: -inf, never NaN
    ([1, -INF, 2, 3], [0.5, 0.25]),
    ([1, INF, 2], [INF, 0.25]),              # +inf meets +inf at one tap: NaN there only
    ([-INF, 1, 2], [-INF, 0.25]),
    ([INF, 1, 2], [-INF, 0.25]),             # opposite infinities: -inf
    ([1, 2, 3], [INF, 0.25]),
    ([1, NAN, 3, 4], [1, 0.25]),
    ([1, 2, 3], [NAN, 0.25]),
    ([2e19, 2e19, 2e19], [2e19, 2e19]),      # squares overflow f32, the distance is 0
    ([3e19, -1e19, 2e19], [1e19, 2e19]),     # large but representable results
    ([1e25, 2e25, -1e25], [1.0, 0.5]),       # a true overflow: -inf, as summed directly
]


def _l2_reference(x: Any, w: Any, padding: Any, dtype: Any) -> np.ndarray:
    combine, reduce, identity, _ = NUMPY_OPS["l2"]
    ref = conv_reference(np.asarray(x, dtype).reshape(1, -1, 1),
                         np.asarray(w, dtype).reshape(-1, 1, 1), (1,), padding,
                         dimension_numbers=DN1, combine=combine, reduce=reduce,
                         identity=identity, dtype=dtype)
    return ref[0, :, 0]


@pytest.mark.parametrize("padding", ["VALID", "SAME", ((2, 1),)])
@pytest.mark.parametrize(("x", "w"), L2_SPECIAL)
def test_l2_rewrite_non_finite_and_overflow(x: Any, w: Any, padding: Any) -> None:
    with np.errstate(all="ignore"):
        ref = _l2_reference(x, w, padding, np.float32)
    np.testing.assert_allclose(conv1(x, w, "l2", padding), ref, rtol=1e-6)
    np.testing.assert_allclose(conv1(x, w, "l2_exact", padding), ref, rtol=1e-6)


def test_l2_rewrite_special_values_in_channels_and_dot_general() -> None:
    """Many channels (the counts ride along in the norms), 2-D, and dot_general."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 6, 8)).astype(np.float32)
    w = rng.standard_normal((3, 3, 8, 4)).astype(np.float32)
    x[0, 1, 2, 3], x[1, 4, 4, 0], x[0, 5, 0, 7] = INF, -INF, NAN
    w[0, 1, 3, 2], w[2, 2, 5, 1] = INF, -INF
    x[1, 0, 0, 5] = INF
    kw = dict(dimension_numbers=DN2)
    with np.errstate(all="ignore"):
        ref = conv_reference(x, w, (1, 1), "SAME", **kw, combine=NUMPY_OPS["l2"][0],
                             reduce=NUMPY_OPS["l2"][1], identity=NUMPY_OPS["l2"][2],
                             dtype=np.float32)
    got = np.asarray(jconv(x, w, (1, 1), "SAME", op="l2", **kw))
    np.testing.assert_allclose(got, ref, rtol=2e-5, atol=1e-4)
    a = np.array([[1.0, INF, 2.0], [NAN, 2.0, 1.0], [1.0, 2.0, 3.0]], np.float32)
    b = np.array([[0.5, 2.0], [0.25, INF], [1.0, -INF]], np.float32)
    dn = (((1,), (0,)), ((), ()))
    with np.errstate(all="ignore"):
        ref = dot_general_reference(a, b, dn, combine=NUMPY_OPS["l2"][0],
                                    reduce=NUMPY_OPS["l2"][1], identity=NUMPY_OPS["l2"][2],
                                    dtype=np.float32)
    for op in ("l2", "l2_exact"):
        got = jax.jit(lambda p, q, op=op: jaxconv.dot_general(p, q, dn, op=op))(a, b)
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-6)


def test_l2_rewrite_gradient_is_finite_data_unchanged() -> None:
    """The scaling is exact: gradients of finite data equal those of l2_exact."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, 7, 3)), jnp.float32) * 1e3
    w = jnp.asarray(rng.standard_normal((3, 3, 2)), jnp.float32)
    grads = [jax.grad(lambda a, b, op=op: jnp.sum(jaxconv.conv_general_dilated(
        a, b, (1,), "SAME", dimension_numbers=DN1, op=op)), argnums=(0, 1))(x, w)
        for op in ("l2", "l2_exact")]
    for g, e in zip(grads[0], grads[1], strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.uint8, np.int32])
def test_l2_integers_keep_dtype_and_wrap(dtype: Any) -> None:
    rng = np.random.default_rng(7)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max, (1, 6, 3), endpoint=True).astype(dtype)
    w = rng.integers(info.min, info.max, (2, 3, 2), endpoint=True).astype(dtype)
    combine, reduce, identity, _ = NUMPY_OPS["l2"]
    with np.errstate(all="ignore"):
        ref = conv_reference(x, w, (1,), "SAME", dimension_numbers=DN1, combine=combine,
                             reduce=reduce, identity=identity, dtype=dtype)
    for op in ("l2", "l2_exact"):
        got = jconv(jnp.asarray(x), jnp.asarray(w), (1,), "SAME", dimension_numbers=DN1, op=op)
        assert got.dtype == dtype, op
        np.testing.assert_array_equal(np.asarray(got), ref.astype(dtype))


@pytest.mark.parametrize("geometry", [
    dict(padding=((2, 2),), lhs_dilation=(2,)),      # holes, padded explicitly with ones
    dict(padding=((1, 0),), rhs_dilation=(2,)),
    dict(padding="SAME", window_strides=(2,)),
])
def test_l2_rewrite_infinities_with_dilations_and_strides(geometry: dict) -> None:
    x = np.array([1.0, INF, 2.0, -INF, 3.0], np.float32).reshape(1, 5, 1)
    w = np.array([INF, 0.5, -INF], np.float32).reshape(3, 1, 1)
    kw = {"window_strides": (1,), **geometry}
    strides, padding = kw.pop("window_strides"), kw.pop("padding")
    combine, reduce, identity, _ = NUMPY_OPS["l2"]
    with np.errstate(all="ignore"):
        ref = conv_reference(x, w, strides, padding, dimension_numbers=DN1, combine=combine,
                             reduce=reduce, identity=identity, dtype=np.float32, **kw)
    got = jconv(x, w, strides, padding, dimension_numbers=DN1, op="l2", **kw)
    np.testing.assert_array_equal(np.asarray(got), ref)


# --------------------------------------------------------------------------------------------
# An empty input with padding: every window is padding only, on every engine.
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["native", "xla"])
@pytest.mark.parametrize("op", ["max_plus", "min_max", "adder", "l1"])
def test_empty_input_with_padding_gives_the_identity(op: str, engine: str) -> None:
    x = np.zeros((1, 0, 1), np.float32)
    w = (np.arange(6, dtype=np.float32) - 2.0).reshape(3, 1, 2)
    y = np.asarray(jconv(x, w, (1,), ((2, 2),), dimension_numbers=DN1, op=op, engine=engine))
    assert y.shape == (1, 2, 2)
    # adder pads with 0 (each padded tap adds -|w|); the others pad with their identity.
    expected = (-np.abs(w).sum(axis=(0, 1)) if op == "adder"
                else np.full(2, IDENTITY[op], np.float32))
    np.testing.assert_array_equal(y, np.broadcast_to(expected, y.shape))


# --------------------------------------------------------------------------------------------
# Signed zeros: every max orders -0 below +0, every min +0 above -0 (docs/numerics.md).
# --------------------------------------------------------------------------------------------


def _signed_max(a: Any, b: Any) -> Any:
    """``lax.max`` of two scalars: ``np.maximum`` returns either zero of a tie.

    Args:
        a: a number.
        b: a number.

    Returns:
        The max, ``+0`` where a ``+0`` meets a ``-0``.
    """
    if a == 0 and b == 0:
        return -0.0 if np.signbit(a) and np.signbit(b) else 0.0
    return np.maximum(a, b)


def _signed_min(a: Any, b: Any) -> Any:
    """``lax.min`` of two scalars.

    Args:
        a: a number.
        b: a number.

    Returns:
        The min, ``-0`` where a ``-0`` meets a ``+0``.
    """
    if a == 0 and b == 0:
        return -0.0 if np.signbit(a) or np.signbit(b) else 0.0
    return np.minimum(a, b)


SIGNED_ZERO_REFERENCE = {  # op -> (combine, reduce, identity), zeros ordered as lax does
    "max_plus": (np.add, _signed_max, -INF),
    "min_plus": (np.add, _signed_min, INF),
    "max_min": (_signed_min, _signed_max, -INF),
    "min_max": (_signed_max, _signed_min, INF),
}


@pytest.mark.parametrize(("op", "channels", "batching"), [
    ("max_plus", 16, None), ("min_plus", 17, "x"), ("max_min", 17, "w"), ("min_max", 16, None),
    ("user_max_plus", 16, None)])
def test_xla_engine_signs_zero_results_as_the_contract(op: str, channels: int,
                                                       batching: str | None) -> None:
    """Windows mixing ``+0`` and ``-0`` products, within a tap's channels and across taps,
    among dominated values: the XLA engine's zero results carry the contract's sign, bit for
    bit with the numpy loop (zeros ordered as ``lax.max`` / ``lax.min``) and with the native
    engine, also under ``vmap`` of the input or of the kernel. (XLA CPU's vectorised channel
    reduction returns whichever zero its lanes meet last, and inside it ``min(+0, -0)``
    may be ``+0``.) A user op computing ``x + w`` under max runs the same path."""
    name = "max_plus" if op == "user_max_plus" else op
    jop: Any = jaxconv.Op(lambda a, b: a + b, "max", name=op) if op != name else name
    rng = np.random.default_rng(channels)
    other = -3.0 if name.startswith("max") else 3.0  # dominated: zero products win
    # The winning zero (+0 in a max, -0 in a min) rare, so that some windows lack it.
    rare, common = (0.0, -0.0) if name.startswith("max") else (-0.0, 0.0)
    x = rng.choice(np.asarray([rare, common, other], np.float32), (2, 5, 6, channels),
                   p=[0.03, 0.17, 0.8])
    w = rng.choice(np.asarray([rare, common], np.float32), (3, 3, channels, 8), p=[0.2, 0.8])
    combine, reduce, identity = SIGNED_ZERO_REFERENCE[name]
    ref = conv_reference(x, w, (1, 1), "SAME", dimension_numbers=DN2, combine=combine,
                         reduce=reduce, identity=identity, dtype=np.float32)
    assert (ref == 0).all() and np.signbit(ref).any() and (~np.signbit(ref)).any()

    def conv(a: Any, b: Any, engine: str) -> np.ndarray:
        return np.asarray(jconv(a, b, (1, 1), "SAME", dimension_numbers=DN2, op=jop,
                                engine=engine))

    got = conv(x, w, "xla")
    np.testing.assert_array_equal(np.signbit(got), np.signbit(ref))
    np.testing.assert_array_equal(got, ref)
    if op == name:
        np.testing.assert_array_equal(np.signbit(conv(x, w, "native")), np.signbit(ref))
    if batching is not None:
        f = jax.jit(lambda a, b: jaxconv.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=DN2, op=jop, engine="xla"))
        if batching == "x":
            xb = np.stack([x, x[:, ::-1]])
            yb = np.asarray(jax.vmap(f, in_axes=(0, None))(xb, w))
            want = [ref, conv_reference(xb[1], w, (1, 1), "SAME", dimension_numbers=DN2,
                                        combine=combine, reduce=reduce, identity=identity,
                                        dtype=np.float32)]
        else:
            wb = np.stack([w, w[::-1, ::-1]])
            yb = np.asarray(jax.vmap(f, in_axes=(None, 0))(x, wb))
            want = [ref, conv_reference(x, wb[1], (1, 1), "SAME", dimension_numbers=DN2,
                                        combine=combine, reduce=reduce, identity=identity,
                                        dtype=np.float32)]
        np.testing.assert_array_equal(np.signbit(yb), np.signbit(np.stack(want)))

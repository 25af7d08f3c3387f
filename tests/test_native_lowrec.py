"""The bfloat16 / float16 max/min ops under a gradient: the forward records, per output, the
blocks of kernel rows that may hold a product rounding to y (csrc/kernel_lowrec_mark.h), and
the backward runs in one call on the low operands, scanning only those blocks
(csrc/kernel_lowrec_backward.h).

The reference route is the engine's own earlier one (no record; XLA's conversions around the
wide backward on float32 copies, every window scanned), taken by ``JAXCONV_NATIVE_LOW=call``:
y, dx and dw must be its bits. Values are checked against the numpy
plain loop, gradients against the XLA engine (one unit in the last place: a gradient that
sums several shares is rounded once here, per addition there).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import ffi
from tests.low_routes import compiled, native_conv, native_dense
from tests.reference import NUMPY_OPS, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
BF16, F16 = jnp.bfloat16, jnp.float16

pytestmark = pytest.mark.skipif(not ffi.available() or not ffi.has_low_recording(),
                                reason="the native library with the low recording forward")


def _data(kind: str, xs: tuple, ws: tuple, dtype: Any, seed: int) -> tuple[Any, Any]:
    """x and w of the dtype: normal, on a coarse grid (many ties once rounded), with a NaN and
    infinities, or with an all -inf corner (windows of -inf products)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 4) / 4 + 2.0**-9
        w = np.round(w * 4) / 4 + 2.0**-10
    elif kind == "nan":
        x[0, 1, 1, 0], x[-1, 2, 2, 1], w[0, 0, 0, 0] = np.nan, np.inf, -np.inf
    elif kind == "ninf":
        x[0, :3, :3, :] = -np.inf
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


SAME = {"window_strides": (1, 1), "padding": "SAME"}
# A covering set: every max/min op in both dtypes; one 64-row block per tap (the usual
# output), blocks across taps (40 channels), blocks of 128 rows (K > 24 x 64), no record
# (K <= 64: the one call's full scan), strides, dilations, explicit padding, groups, a vmap
# batch, a float32 result (y and g in float32), ties, NaN / infinities (not recorded: the
# full scan), all -inf windows.
CASES = [
    ("max_plus", BF16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "normal"),
    ("min_plus", F16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "ties"),
    ("max_min", F16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "ties"),
    ("min_max", BF16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "ties"),
    ("max_plus", F16, (2, 9, 9, 40), (3, 3, 40, 20),
     {"window_strides": (2, 2), "padding": "SAME"}, 1, "ties"),
    ("min_plus", BF16, (1, 6, 6, 200), (3, 3, 200, 17), SAME, 1, "normal"),
    ("max_min", BF16, (2, 9, 9, 48), (2, 2, 48, 33),
     {"window_strides": (1, 1), "padding": "VALID", "rhs_dilation": (2, 2)}, 1, "normal"),
    ("min_max", F16, (2, 8, 8, 64), (3, 3, 32, 32),
     {"window_strides": (1, 2), "padding": ((2, 0), (1, 1))}, 2, "ties"),
    ("max_plus", BF16, (2, 6, 6, 16), (3, 3, 16, 24), SAME, 1, "ties"),
    ("max_plus", BF16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "nan"),
    ("min_max", F16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "nan"),
    ("max_plus", F16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "ninf"),
    ("min_plus", BF16, (2, 8, 8, 64), (3, 3, 64, 24), SAME, 1, "ninf"),
]


@pytest.mark.parametrize("op,dtype,xs,ws,geom,groups,kind", CASES)
def test_recorded_route_has_the_earlier_routes_bits(op: str, dtype: Any, xs: tuple, ws: tuple,
                                                    geom: dict, groups: int, kind: str) -> None:
    x, w = _data(kind, xs, ws, dtype, 1)
    geom = {**geom, "feature_group_count": groups}
    out = jax.eval_shape(lambda a, b: jaxconv.conv_general_dilated(
        a, b, dimension_numbers=DN, op=op, **geom), x, w)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(out.shape), dtype)
    f = native_conv(op, **geom)
    new, old = (compiled(f, (x, w, ct), route, derivative="vjp") for route in ("record", "call"))
    assert "jaxconv_low_forward_record" in new.as_text()
    assert "jaxconv_low_backward_recorded" in new.as_text()
    assert "jaxconv_wide_backward" in old.as_text()
    got, want = new(x, w, ct), old(x, w, ct)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    r = NUMPY_OPS[op]
    x64, w64 = (np.asarray(a, np.float32).astype(np.float64) for a in (x, w))
    ref = conv_reference(x64, w64, geom["window_strides"], geom["padding"],
                         rhs_dilation=geom.get("rhs_dilation"), dimension_numbers=DN,
                         feature_group_count=groups, combine=r.combine, reduce=r.reduce,
                         identity=r.identity, pad_value=r.pad_value)
    with np.errstate(invalid="ignore"):
        want_y = ref.astype(np.float32).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), want_y)
    if kind in ("nan", "ninf"):
        return
    with jax.numpy_rank_promotion("allow"):
        xla = jax.vjp(lambda a, b: jaxconv.conv_general_dilated(
            a, b, dimension_numbers=DN, op=op, engine="xla", **geom), x, w)[1](ct)
    ulp = float(jnp.finfo(dtype).eps)
    for a, b in zip(got[1:], xla, strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=ulp, atol=ulp / 4)


@pytest.mark.parametrize("op,dtype,vmapped,acc", [
    ("max_plus", F16, True, None),
    ("min_max", BF16, False, jnp.float32),
    ("min_plus", BF16, False, jnp.float32),
])
def test_batches_and_float32_results_keep_the_bits(op: str, dtype: Any, vmapped: bool,
                                                   acc: Any) -> None:
    """A vmap batch (the batch read from the element counts), and a float32 result (y and the
    cotangent in float32: the call widens neither)."""
    lead = (2,) if vmapped else ()
    x, w = _data("ties", (*lead, 2, 7, 7, 64), (*lead, 3, 3, 64, 20), dtype, 3)
    ct_dtype = dtype if acc is None else acc
    ct = jnp.asarray(np.random.default_rng(4).standard_normal((*lead, 2, 7, 7, 20)), ct_dtype)
    f = native_conv(op, acc, **SAME)
    new, old = (compiled(f, (x, w, ct), route, vmapped, "vjp") for route in ("record", "call"))
    assert "jaxconv_low_backward_recorded" in new.as_text()
    for a, b in zip(new(x, w, ct), old(x, w, ct), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("op,dtype,k", [("max_plus", F16, 300), ("min_max", BF16, 1700),
                                        ("max_min", F16, 64)])
def test_dense_products_keep_the_bits(op: str, dtype: Any, k: int) -> None:
    """Dense products (the dense record's blocks; 1700 rows: blocks of 128; 64 rows: no
    record) on a grid (ties once rounded)."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(np.round(rng.standard_normal((9, k)) * 4) / 4, dtype)
    w = jnp.asarray(rng.standard_normal((k, 21)), dtype)
    ct = jnp.asarray(rng.standard_normal((9, 21)), dtype)

    new, old = (compiled(native_dense(op), (x, w, ct), route, derivative="vjp")
                for route in ("record", "call"))
    assert "jaxconv_low_backward_recorded" in new.as_text()
    for a, b in zip(new(x, w, ct), old(x, w, ct), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize("op,dtype", [("max_plus", BF16), ("max_plus", F16),
                                      ("min_plus", BF16), ("min_plus", F16)])
def test_a_tie_across_blocks_splits_the_gradient(op: str, dtype: Any) -> None:
    """Two products of one output that differ in float32 but round to one value, in two taps
    (two blocks of 64 kernel rows), the other products far below (above under min): the
    record marks both blocks (the winner of the float32 maximum's block and the other), so
    the gradient is split between them."""
    sign = 1.0 if op == "max_plus" else -1.0
    step = 2.0**-7 if dtype == BF16 else 2.0**-10
    x = np.full((1, 1, 2, 64), -4.0 * sign, np.float32)
    x[0, 0, 0, 5], x[0, 0, 1, 7] = sign * 1.0, sign * (1.0 + step)
    w = np.full((1, 2, 64, 1), -4.0 * sign, np.float32)
    w[0, 0, 5, 0], w[0, 1, 7, 0] = sign * (step / 2 + step / 8), 0.0
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

    def loss(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a, b, (1, 1), "VALID", dimension_numbers=DN, op=op,
                                            engine="native").astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "jaxconv_low_forward_record" in grad.lower(x, w).as_text()
    gx, gw = grad(x, w)
    assert float(gx[0, 0, 0, 5]) == float(gx[0, 0, 1, 7]) == 0.5
    assert float(gw[0, 0, 5, 0]) == float(gw[0, 1, 7, 0]) == 0.5
    assert float(jnp.abs(gx.astype(jnp.float32)).sum()) == 1.0


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_explain_says_what_the_backward_does(dtype: Any) -> None:
    name = np.dtype(dtype).name
    details = jaxconv.explain("min_max", dtype=dtype, platform="cpu").details
    assert any("may hold a product that rounds to its result" in d for d in details), details
    assert any(f"in one call on the {name} operands" in d for d in details), details


def test_bf16_max_times_tie_gradients_agree_fuzz_7100015() -> None:
    """Fuzz seed 7100015 (with --x64, drawn as u_clipmul_max): a bf16 max_times depthwise 3-D
    convolution (31 groups, strides (2, 1, 2), SAME_LOWER) on signed zeros, subnormals and
    values near the smallest normal. The native backward took every zero product for a winner
    of a 2^-126 result (its rounding interval's inner end was subnormal, a zero under DAZ), so
    34 dx and 18 dw entries were off by up to 1.33. Both engines' gradients against the float64
    loops run in the contract's mode (tests/test_native_denormal_ties.py: subnormals read as
    zero, products in float32 flushed, then rounded to bf16), and against each other."""
    import fuzz

    from tests.reference import conv_maxmin_grads_reference
    from tests.test_native_denormal_ties import _rules

    specs = fuzz._specs(jnp, jaxconv)
    ex = fuzz.Example(7100015, specs, x64=True, transform=None,
                      extras=fuzz._extra_specs(jnp, jaxconv))
    assert (ex.dtype, ex.data, ex.prob["kw"]["feature_group_count"]) == ("bfloat16", "zeros", 31)
    ex.spec = next(s for s in specs if s.name == "max_times")
    y = np.asarray(jax.jit(ex.fn("xla"))(ex.x, ex.w))
    g = np.ones(y.shape, ex.np_dtype)
    grads = [jax.jit(lambda a, b, c, e=e: jax.vjp(ex.fn(e), a, b)[1](c))(ex.x, ex.w, g)
             for e in ("xla", "native")]
    combine, partials = _rules("bfloat16", lambda p: p)
    p = ex.prob
    want = conv_maxmin_grads_reference(
        np.asarray(ex.x, np.float64), np.asarray(ex.w, np.float64), np.ones(y.shape),
        p["strides"], p["padding"], **p["kw"], combine=combine, partials=partials, reduce="max")
    tiny = float(np.finfo(np.float32).tiny)
    for a, b, ref in zip(*grads, want, strict=True):
        for got in (a, b):  # two bf16 roundings (XLA: a share, a sum); a share of 2^-126 flushes
            np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=2**-6,
                                       atol=4 * tiny)
        np.testing.assert_allclose(np.asarray(b, np.float32), np.asarray(a, np.float32),
                                   rtol=1e-2, atol=1e-2)


def _sparse_cotangent(shape: tuple, dtype: Any, seed: int) -> jax.Array:
    """A cotangent zero (+0, -0 and a bfloat16 subnormal: zero under DAZ) on about two thirds
    of the outputs, normal elsewhere."""
    rng = np.random.default_rng(seed)
    ct = rng.standard_normal(shape).astype(np.float32)
    pick = rng.integers(0, 6, shape)
    ct[pick == 0], ct[pick == 1], ct[pick == 2] = 0.0, -0.0, 0.0
    if dtype == BF16:
        ct[pick == 3] = 2.0**-130  # a bfloat16 subnormal
    else:
        ct[pick == 3] = -0.0
    return jnp.asarray(ct, dtype)


@pytest.mark.parametrize("op,dtype,kind,groups,strides", [
    ("max_plus", BF16, "normal", 1, (1, 1)),
    ("min_max", BF16, "ties", 2, (2, 1)),
    ("max_min", F16, "ties", 1, (1, 1)),
    ("min_plus", F16, "normal", 1, (1, 2)),
])
def test_zero_cotangents_keep_the_bits(op: str, dtype: Any, kind: str, groups: int,
                                       strides: tuple) -> None:
    """Cotangents zero on most outputs (+0, -0, a subnormal): y, dx and dw are the full
    scan's bits, with ties, groups and strides (the built-ins scan every output; a user op
    with finite partials skips the zero ones: test_native_low_user.py)."""
    x, w = _data(kind, (2, 8, 8, 64), (3, 3, 64 // groups, 24), dtype, 5)
    geom = {"window_strides": strides, "padding": "SAME", "feature_group_count": groups}
    out = jax.eval_shape(lambda a, b: jaxconv.conv_general_dilated(
        a, b, dimension_numbers=DN, op=op, **geom), x, w)
    ct = _sparse_cotangent(out.shape, dtype, 6)
    f = native_conv(op, **geom)
    new, old = (compiled(f, (x, w, ct), route, derivative="vjp") for route in ("record", "call"))
    assert "jaxconv_low_backward_recorded" in new.as_text()
    for a, b in zip(new(x, w, ct), old(x, w, ct), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


def ftz_case(op: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
    """x (1, 1, 4, 64), w (1, 2, 64, 1) in bfloat16 and a cotangent of the three positions
    (VALID) where one kernel entry wins at every position and its dw sums the three shares:
    2^-126 (1 + 2^-7) - 2^-125 is below 2^-126 and flushes to -0 (FTZ); the third share, +0,
    makes it +0. A backward that skipped the zero share without looking would leave -0."""
    x = np.zeros((1, 1, 4, 64), np.float32)
    w = np.full((1, 2, 64, 1), -100.0, np.float32)
    if op == "max_plus":
        w[0, 0, 5, 0] = 8.0
    else:  # x * w: the winner's dw term is its share times x = 1
        x[:] = 1.0
        w[:] = 0.5
        w[0, 0, 5, 0] = 8.0
    ct = np.array([2.0**-126 * (1 + 2.0**-7), -(2.0**-125), 0.0], np.float32)
    return (jnp.asarray(x, BF16), jnp.asarray(w, BF16),
            jnp.asarray(ct.reshape(1, 1, 3, 1), BF16))


def test_a_gradient_flushed_to_minus_zero_keeps_the_bits() -> None:
    """The dw entry of ftz_case's winner is +0 after its three shares (the last one +0), as
    the full scan leaves it (a user op's recorded backward, which skips the zero share, finds
    the -0 and runs its scan again: test_native_low_user.py)."""
    x, w, ct = ftz_case("max_plus")
    f = native_conv("max_plus", window_strides=(1, 1), padding="VALID")
    new, old = (compiled(f, (x, w, ct), route, derivative="vjp") for route in ("record", "call"))
    assert "jaxconv_low_forward_record" in new.as_text()
    got, want = new(x, w, ct), old(x, w, ct)
    assert np.asarray(want[2]).view(np.uint16)[0, 0, 5, 0] == 0  # +0, not -0 (0x8000)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))

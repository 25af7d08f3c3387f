"""A compiled user op's forward on bfloat16 / float16 operands converts inside the call, as the
built-in kernels' does (csrc/kernel_bf16fuse_low.h through the user library's own run_op):
the bits of XLA's conversions around the float32 call (the route before, taken here by
``JAXCONV_NATIVE_LOW=convert``), and the numpy reference's values. A callable reduce's fold
keeps the conversions next to the call; `jaxconv.explain` says which route a call takes.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import low_route
from tests.low_routes import compiled, native_conv, native_dense
from tests.reference import conv_reference
from tests.test_native_dtypes import CLIP, GATE, GAUSS, _np
from tests.test_native_low_forward import _nan_payloads, _values

DN = ("NHWC", "HWIO", "NHWC")
BF16, F16 = jnp.bfloat16, jnp.float16
NEG_ABS = jaxconv.Op(lambda a, b: -jnp.abs(a - b), "sum", name="neg_abs")
DIFF = jaxconv.Op(lambda a, b: a - b, "max", name="diff")  # float32's twin; a user kernel here
LSE = jaxconv.Op(lambda a, b: a * b, "logsumexp", name="lse_times")  # the untiled loop
FOLD = jaxconv.Op(lambda a, b: a * b, lambda a, b: 2.0 * jnp.maximum(a / 2.0, b / 2.0),
                  identity=-math.inf, name="scaled_fold")  # a max not recognised as one
NUMPY = {"neg_abs": (lambda a, b: -np.abs(a - b), np.add, 0.0, None),
         "diff": (lambda a, b: a - b, np.maximum, -np.inf, None),
         "lse_times": (np.multiply, np.logaddexp, -np.inf, None)}


def _reference_op(op: jaxconv.Op) -> tuple[Any, Any, float, float | None]:
    """(combine, reduce, identity, pad) in numpy for the ops above."""
    return NUMPY[op.name] if op.name in NUMPY else _np(op)


def _bits(a: jax.Array) -> np.ndarray:
    return np.asarray(a).view(np.uint16)


# The route's branches for user kernels: max / min (a clip, a select, a difference) and sums
# (a light combine and a heavy one, kernel_heavy.h) and a logsumexp (float32 y, no tiles),
# both dtypes, full and partial channel blocks, groups and strides, the depthwise loop (y
# rounded after the kernels), a vmap batch, specials (NaN payloads, infinities, signed zeros,
# rounding ties, subnormals).
CASES = [
    (CLIP, BF16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "specials"),
    (GATE, F16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "specials"),
    (DIFF, BF16, (2, 6, 6, 32), (3, 3, 8, 36), 4, (2, 1), False, "specials"),
    (DIFF, F16, (1, 5, 7, 24), (3, 2, 1, 24), 24, (1, 1), False, "specials"),
    (CLIP, F16, (3, 1, 5, 6, 8), (3, 1, 3, 8, 17), 1, (1, 1), True, "normal"),
    (NEG_ABS, BF16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "normal"),
    (GAUSS, F16, (2, 6, 6, 32), (3, 3, 8, 12), 4, (1, 2), False, "normal"),
    (NEG_ABS, F16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "specials"),
    (LSE, BF16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "normal"),
]


@pytest.mark.parametrize("op,dtype,xs,ws,groups,strides,vmapped,kind", CASES)
def test_user_in_call_conversions_are_xlas_bits(op: Any, dtype: Any, xs: tuple, ws: tuple,
                                                groups: int, strides: tuple, vmapped: bool,
                                                kind: str) -> None:
    x = jnp.asarray(_values(kind, xs, dtype, 1))
    w = jnp.asarray(_values(kind, ws, dtype, 2))
    if kind == "specials":
        x, w = _nan_payloads(x, 3), _nan_payloads(w, 4)
    f = native_conv(op, window_strides=strides, padding="SAME", feature_group_count=groups)
    new, old = (compiled(f, (x, w), route, vmapped) for route in ("record", "convert"))
    assert "jaxconv_low_forward" in new.as_text()
    assert "jaxconv_low_forward" not in old.as_text()
    maxmin = op.reduce in ("max", "min")
    call = next(line for line in new.as_text().splitlines()
                if 'custom_call_target="jaxconv_low_forward"' in line)
    assert "convert" not in call.split("custom-call(")[1].split(")")[0]  # the operands as given
    if maxmin:  # the result in the operands' dtype
        hlo = {"bfloat16": "bf16", "float16": "f16"}[np.dtype(dtype).name]
        assert call.split("=", 1)[1].strip().startswith(hlo + "[")
    y, ref_bits = new(x, w), old(x, w)
    assert y.dtype == ref_bits.dtype
    if y.dtype == jnp.float32:
        np.testing.assert_array_equal(np.asarray(y).view(np.uint32),
                                      np.asarray(ref_bits).view(np.uint32))
    else:
        np.testing.assert_array_equal(_bits(y), _bits(ref_bits))
    if kind == "specials" and not maxmin:
        return  # a sum of NaN / infinite terms: the bits above are the check
    if vmapped:  # the numpy reference per vmapped entry
        x, w, y = x[0], w[0], y[0]
    combine, reduce, identity, pad = _reference_op(op)
    flush = np.finfo(np.float32).tiny
    with np.errstate(invalid="ignore", over="ignore"):  # NaN / infinite products
        x64, w64 = (np.asarray(a).astype(np.float32).astype(np.float64) for a in (x, w))
        # The kernels (and XLA) read float32 subnormals (bfloat16's) as zeros: 0 * inf is NaN.
        x64, w64 = (np.where(np.abs(a) < flush, np.copysign(0.0, a), a) for a in (x64, w64))
        got = np.asarray(y).astype(np.float32)
        ref = conv_reference(x64, w64, strides, "SAME", dimension_numbers=DN,
                             feature_group_count=groups, combine=combine, reduce=reduce,
                             identity=identity, pad_value=pad)
    if not maxmin:
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
        return
    with np.errstate(invalid="ignore", over="ignore"):  # the exact result rounded once
        want = ref.astype(np.float32).astype(dtype).astype(np.float32)
    # The kernels flush float32 subnormals (bfloat16's) to zero, as the float32 call does.
    got = np.where(np.abs(got) < flush, 0.0, got)
    want = np.where(np.abs(want) < flush, 0.0, want)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    real = ~np.isnan(want)
    np.testing.assert_array_equal(got[real], want[real])


def test_dense_user_ops_convert_in_the_call() -> None:
    """dot_general (the dense layer's route) of a max and a sum user op: the same bits."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((5, 40)), BF16)
    w = jnp.asarray(rng.standard_normal((40, 33)), BF16)
    for op in (DIFF, NEG_ABS):
        new, old = (compiled(native_dense(op), (x, w), route) for route in ("record", "convert"))
        assert "jaxconv_low_forward" in new.as_text()
        assert "jaxconv_low_forward" not in old.as_text()
        a, b = np.asarray(new(x, w)), np.asarray(old(x, w))
        np.testing.assert_array_equal(a.view(np.uint16 if a.itemsize == 2 else np.uint32),
                                      b.view(np.uint16 if b.itemsize == 2 else np.uint32))


@pytest.mark.parametrize("op,dtype", [(CLIP, BF16), (NEG_ABS, F16)])
def test_gradients_unchanged(op: Any, dtype: Any) -> None:
    """Both gradients, whose winner scan reads the forward's y, are the old route's bits."""
    x = jnp.asarray(_values("normal", (2, 7, 9, 16), dtype, 6))
    w = jnp.asarray(_values("normal", (3, 3, 16, 20), dtype, 7))
    f = native_conv(op, window_strides=(1, 1), padding="SAME")
    new, old = (compiled(f, (x, w), route, derivative="grad") for route in ("record", "convert"))
    assert "jaxconv_low_forward" in new.as_text()
    for a, b in zip(new(x, w), old(x, w), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_a_fold_keeps_the_conversions_next_to_the_call() -> None:
    """A callable reduce's fold (accumulating in float32) reads float32 copies made next to
    the call; its values are the XLA engine's within a bfloat16 rounding."""
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 4)), BF16)
    w = jnp.asarray(rng.standard_normal((3, 3, 4, 3)), BF16)

    def f(engine: str) -> Any:
        return jax.jit(lambda a, b: jaxconv.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=DN, op=FOLD, engine=engine,
            preferred_element_type=jnp.float32))

    text = f("native").lower(x, w).as_text()
    assert "jaxconv_low_forward" not in text and "jaxconv_forward" in text
    with jax.numpy_rank_promotion("allow"):
        np.testing.assert_allclose(np.asarray(f("native")(x, w)), np.asarray(f("xla")(x, w)),
                                   rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("op,dtype", [(CLIP, BF16), (NEG_ABS, F16), ("max_plus", BF16)])
def test_explain_says_the_forward_converts_in_the_call(op: Any, dtype: Any) -> None:
    plan = jaxconv.explain(op, dtype=dtype, platform="cpu")
    assert plan.engine == "native"
    name = np.dtype(dtype).name
    assert any(f"the {name} operands widened to float32 inside the call" in d
               for d in plan.details), plan.details


# ---- the recording route of a user max / min op (csrc/kernel_lowrec_mark.h through the
# user's float32 library, csrc/kernel_lowrec_backward.h through its wide library) ----------

MAX_TIMES = jaxconv.Op(lambda a, b: a * b, "max", name="max_times")  # tropical max-times
CLIP1 = jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="clip1")
MIN_GATE = GATE  # where(a > 0, a + b, -b) under min
POW = jaxconv.Op(jnp.power, "max", name="pow_max")  # vmath.h forward, libm wide backward
DIV = jaxconv.Op(lambda a, b: a / b, "max", name="div_max")  # 0 / 0: a NaN of finite operands
NUMPY_REC = {"max_times": (np.multiply, np.maximum, -np.inf, None),
             "clip1": (lambda a, b: np.clip(a * b, -1.0, 1.0), np.maximum, -np.inf, None),
             "gate": (lambda a, b: np.where(a > 0, a + b, -b), np.minimum, np.inf, None)}


def _rec_data(kind: str, xs: tuple, ws: tuple, dtype: Any, seed: int) -> tuple[Any, Any]:
    """x and w of the dtype: normal; on a coarse grid (many ties once rounded); or specials
    (NaN payloads, infinities, signed zeros, rounding ties, subnormals: `_values`)."""
    if kind == "specials":
        return (_nan_payloads(jnp.asarray(_values(kind, xs, dtype, seed)), seed),
                _nan_payloads(jnp.asarray(_values(kind, ws, dtype, seed + 1)), seed + 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    if kind == "ties":
        x, w = np.round(x * 4) / 4 + 2.0**-9, np.round(w * 2) / 2
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _product(op: Any, dense: bool, engine: str = "native") -> Any:
    if dense:
        return lambda a, b: jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op=op,
                                                engine=engine)
    return lambda a, b: jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN,
                                                     op=op, engine=engine)


def _vjp(op: Any, dense: bool, recorded: bool, args: tuple) -> Any:
    """The compiled y, dx, dw of a cotangent, by the recording route or (`recorded` false) the
    route before it (XLA's conversions around the wide backward, every window scanned)."""
    f = _product(op, dense)

    def fb(x: jax.Array, w: jax.Array, ct: jax.Array) -> Any:
        y, vjp = jax.vjp(f, x, w)
        return (y, *vjp(ct))

    with low_route.chosen("record" if recorded else "call"):
        return jax.jit(fb).lower(*args).compile()


# Conv (layer A's shape, smaller: 9 blocks of 64 rows, one per tap; 40 channels: blocks across
# taps) and dense (300 rows: 5 blocks; 1700: blocks of 128); max and min; a monotone tail
# factored out (clip); both dtypes; normal data, ties, specials (not recorded: the one call's
# full scan); 36 kernel rows (no record: the one call's full scan).
REC_CASES = [
    (MAX_TIMES, BF16, False, (2, 8, 8, 64), (3, 3, 64, 24), "normal"),
    (MAX_TIMES, F16, False, (2, 8, 8, 64), (3, 3, 64, 24), "ties"),
    (CLIP1, F16, False, (2, 8, 8, 64), (3, 3, 64, 24), "normal"),
    (CLIP1, BF16, False, (2, 9, 9, 40), (3, 3, 40, 20), "ties"),
    (MIN_GATE, BF16, False, (2, 8, 8, 64), (3, 3, 64, 24), "ties"),
    (MIN_GATE, F16, False, (2, 8, 8, 64), (3, 3, 64, 24), "specials"),
    (MAX_TIMES, BF16, False, (2, 8, 8, 64), (3, 3, 64, 24), "specials"),
    (MAX_TIMES, F16, True, (9, 300), (300, 21), "ties"),
    (CLIP1, BF16, True, (9, 1700), (1700, 21), "normal"),
    (MIN_GATE, F16, True, (9, 300), (300, 21), "normal"),
    (MAX_TIMES, BF16, True, (9, 300), (300, 21), "specials"),
    (CLIP1, F16, False, (2, 6, 6, 4), (3, 3, 4, 8), "ties"),  # 36 rows: no record, one call
]


@pytest.mark.parametrize("op,dtype,dense,xs,ws,kind", REC_CASES)
def test_user_recorded_route_has_the_earlier_routes_bits(op: Any, dtype: Any, dense: bool,
                                                         xs: tuple, ws: tuple, kind: str) -> None:
    """y, dx and dw by the recording route are the earlier route's bits; y is the numpy
    reference rounded once; dx and dw are the XLA engine's within a unit in the last place
    (finite data)."""
    x, w = _rec_data(kind, xs, ws, dtype, 11)
    out = jax.eval_shape(_product(op, dense), x, w)
    ct = jnp.asarray(np.random.default_rng(12).standard_normal(out.shape), dtype)
    args = (x, w, ct)
    new, old = _vjp(op, dense, True, args), _vjp(op, dense, False, args)
    rows = int(np.prod(ws[:-1]))
    assert ("jaxconv_low_forward_record" in new.as_text()) == (rows > 64)
    assert "jaxconv_low_backward_recorded" in new.as_text()
    assert "jaxconv_low_backward_recorded" not in old.as_text()
    got, want = new(*args), old(*args)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(_bits(a), _bits(b))
    if kind == "specials":
        return  # the bits above are the check (NaN / infinite products)
    combine, reduce, identity, pad = NUMPY_REC[op.name]
    x64, w64 = (np.asarray(a, np.float32).astype(np.float64) for a in (x, w))
    if dense:
        ref = reduce.reduce(combine(x64[:, :, None], w64[None]), axis=1)
    else:
        ref = conv_reference(x64, w64, (1, 1), "SAME", dimension_numbers=DN, combine=combine,
                             reduce=reduce, identity=identity, pad_value=pad)
    want_y = ref.astype(np.float32).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), want_y)
    with jax.numpy_rank_promotion("allow"):
        xla = jax.vjp(_product(op, dense, "xla"), x, w)[1](ct)
    # Ties share a cotangent over many products: each share times the partial is rounded in
    # the dtype per term there, once here.
    ulp = float(jnp.finfo(dtype).eps) * (1 if kind == "normal" else 8)
    for a, b in zip(got[1:], xla, strict=True):
        b = np.asarray(b, np.float32)
        np.testing.assert_allclose(np.asarray(a, np.float32), b, rtol=ulp,
                                   atol=ulp / 4 * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("op,dtype,vmapped,acc", [
    (MAX_TIMES, F16, True, None),
    (CLIP1, BF16, False, jnp.float32),
    (MIN_GATE, F16, False, jnp.float32),
])
def test_user_batches_and_float32_results_keep_the_bits(op: Any, dtype: Any, vmapped: bool,
                                                        acc: Any) -> None:
    """A vmap batch (read from the element counts) and a float32 result (y and the cotangent
    in float32, widened by neither call): the earlier route's bits."""
    lead = (2,) if vmapped else ()
    x, w = _rec_data("ties", (*lead, 2, 7, 7, 64), (*lead, 3, 3, 64, 20), dtype, 14)
    ct = jnp.asarray(np.random.default_rng(15).standard_normal((*lead, 2, 7, 7, 20)),
                     dtype if acc is None else acc)

    def f(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN, op=op,
                                            engine="native", preferred_element_type=acc)

    g = jax.vmap(f) if vmapped else f

    def compiled(route: low_route.LowRoute) -> Any:
        def fb(a: jax.Array, b: jax.Array, c: jax.Array) -> Any:  # fresh: no cached trace
            y, vjp = jax.vjp(g, a, b)
            return (y, *vjp(c))

        with low_route.chosen(route):
            return jax.jit(fb).lower(x, w, ct).compile()

    new, old = compiled("record"), compiled("call")
    assert "jaxconv_low_backward_recorded" in new.as_text()
    assert "jaxconv_low_backward_recorded" not in old.as_text()
    for a, b in zip(new(x, w, ct), old(x, w, ct), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_user_tie_across_blocks_splits_the_gradient(dtype: Any) -> None:
    """Two max_times products that differ in float32 but round to one value, in two taps (two
    blocks of 64 rows): 1 * (1 + step) and a * b just below it. Both blocks are marked, and
    the gradient is split between them as the XLA engine splits it."""
    step, a, b = (2.0**-7, 5.0, 103 / 512) if dtype == BF16 else (2.0**-10, 7.0, 1171 / 8192)
    x = np.full((1, 1, 2, 64), 0.25, np.float32)
    w = np.full((1, 2, 64, 1), -1.0, np.float32)
    x[0, 0, 0, 5], w[0, 0, 5, 0] = 1.0, 1.0 + step
    x[0, 0, 1, 7], w[0, 1, 7, 0] = a, b
    assert a * b != 1.0 + step and np.float32(a * b).astype(dtype) == np.float32(1.0 + step)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)

    def grad(engine: str) -> Any:
        return jax.jit(jax.grad(lambda p, q: jaxconv.conv_general_dilated(
            p, q, (1, 1), "VALID", dimension_numbers=DN, op=MAX_TIMES, engine=engine
        ).astype(jnp.float32).sum(), argnums=(0, 1)))

    assert "jaxconv_low_forward_record" in grad("native").lower(x, w).as_text()
    gx, gw = grad("native")(x, w)
    assert float(gx[0, 0, 0, 5]) == float(jnp.asarray((1.0 + step) / 2, dtype))
    assert float(gw[0, 1, 7, 0]) == a / 2
    for got, want in zip((gx, gw), grad("xla")(x, w), strict=True):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("op,recorded,why", [
    (MAX_TIMES, True, None),
    (CLIP1, True, None),
    (POW, False, "not recorded: the forward vectorizes a function"),
    (DIV, False, "not recorded: finite operands can make a NaN product"),
])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_explain_says_which_backward_a_user_op_takes(op: Any, recorded: bool, why: str | None,
                                                     dtype: Any) -> None:
    name = np.dtype(dtype).name
    details = jaxconv.explain(op, dtype=dtype, platform="cpu").details
    assert any("may hold a product that rounds to its result" in d
               for d in details) == recorded, details
    assert any(f"in one call on the {name} operands" in d for d in details) == recorded, details
    if why is not None:
        assert any(why in d for d in details), details


@pytest.mark.parametrize("op", [POW, DIV])
def test_these_user_ops_keep_the_earlier_route(op: Any) -> None:
    """A combine whose function the forward vectorizes and the wide kernels take from libm
    (pow) does not record: the forward's marks could miss a backward winner; nor one that
    makes a NaN of finite operands (the recording tiles run the fast loop)."""
    x, w = _rec_data("normal", (2, 8, 8, 64), (3, 3, 64, 24), BF16, 13)
    ct = jnp.ones((2, 8, 8, 24), BF16)
    text = _vjp(op, False, True, (x, w, ct)).as_text()
    assert "jaxconv_low_forward_record" not in text
    assert "jaxconv_wide_backward" in text


@pytest.mark.parametrize("op,dtype,dense,xs,ws,kind", [
    (CLIP1, BF16, False, (2, 8, 8, 64), (3, 3, 64, 24), "normal"),
    (MAX_TIMES, F16, False, (2, 8, 8, 64), (3, 3, 64, 24), "ties"),
    (MIN_GATE, BF16, False, (2, 9, 9, 40), (3, 3, 40, 20), "ties"),
    (MAX_TIMES, BF16, True, (9, 300), (300, 21), "normal"),
])
def test_user_zero_cotangents_keep_the_bits(op: Any, dtype: Any, dense: bool, xs: tuple,
                                            ws: tuple, kind: str) -> None:
    """Outputs whose cotangent is zero, where the op's partials are finite (kFinitePartials:
    max-times; the clip runs it, its clip after the max), are skipped by the recorded
    backward: y, dx and dw are the earlier route's bits. where(a > 0, a + b, -b) declares
    nothing (every output scanned); blocks across taps (40 channels); a dense product."""
    from tests.test_native_lowrec import _sparse_cotangent

    x, w = _rec_data(kind, xs, ws, dtype, 21)
    out = jax.eval_shape(_product(op, dense), x, w)
    ct = _sparse_cotangent(out.shape, dtype, 22)
    args = (x, w, ct)
    new, old = _vjp(op, dense, True, args), _vjp(op, dense, False, args)
    assert "jaxconv_low_backward_recorded" in new.as_text()
    for a, b in zip(new(*args), old(*args), strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


def test_user_gradient_flushed_to_minus_zero_keeps_the_bits() -> None:
    """test_native_lowrec.py's ftz_case with max-times: the winner's dw sums the shares
    2^-126 (1 + 2^-7), -2^-125 (flushed to -0) and +0: +0, as the earlier route leaves it."""
    from tests.test_native_lowrec import ftz_case

    x, w, ct = ftz_case("max_times")

    def fb(route: str) -> Any:
        f = lambda a, b: jaxconv.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), "VALID", dimension_numbers=DN, op=MAX_TIMES, engine="native")

        def g(a: jax.Array, b: jax.Array, c: jax.Array) -> Any:
            y, vjp = jax.vjp(f, a, b)
            return (y, *vjp(c))

        with low_route.chosen(route):
            return jax.jit(g).lower(x, w, ct).compile()

    new, old = fb("record"), fb("call")
    assert "jaxconv_low_forward_record" in new.as_text()
    got, want = new(x, w, ct), old(x, w, ct)
    assert _bits(want[2])[0, 0, 5, 0] == 0
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(_bits(a), _bits(b))


@pytest.mark.parametrize("op,finite", [
    (MAX_TIMES, True), (MIN_GATE, False), (DIV, False), (POW, False),
    (jaxconv.Op(lambda a, b: a * b * 2.0, "max", name="twice"), False),
])
def test_wide_functor_declares_finite_partials(op: Any, finite: bool) -> None:
    """The bfloat16 / float16 backward's functor declares kFinitePartials exactly where its
    partials are finite for finite operands (scalar_program.always_finite, conservative): x * w's
    are w and x (a clip under max runs this product); 2 x w's are 2 w and 2 x (which
    overflow); a quotient's and a power's are not; where(a > 0, a + b, -b)'s traced partials
    hold a sum (not declared)."""
    from jaxconv._src.engines.native import codegen

    source = codegen.functor(op, np.float32, wide=True).source
    assert ("kFinitePartials = true" in source) == finite


def test_always_finite_is_conservative() -> None:
    """Sampled finite operands never make an infinite or NaN output where the analysis says
    finite; the analysis refuses the sums and products that can overflow."""
    from jaxconv._src.core import scalar_program as sp

    fns = {True: [lambda a, b: jnp.maximum(a, -b) * 0.5,
                  lambda a, b: jnp.clip(jnp.tanh(a), -1.0, 1.0) * 0.25,
                  lambda a, b: jnp.where(a > b, jnp.abs(a), jnp.floor(b))],
           False: [lambda a, b: a + b, lambda a, b: a * b, lambda a, b: a / b,
                   lambda a, b: jnp.exp(a) - b]}
    big = np.float32(3e38)
    for want, group in fns.items():
        for fn in group:
            assert sp.always_finite(sp.trace(fn, "float32", 2)) == want
            if want:
                vals = np.array([-big, -1.0, -0.0, 0.0, 2.0**-126, 1.5, big], np.float32)
                a, b = np.meshgrid(vals, vals)
                assert np.isfinite(np.asarray(fn(jnp.asarray(a), jnp.asarray(b)))).all()


@jax.custom_vjp
def _halved_rule(x: Any, w: Any) -> Any:
    """``x - w`` whose rule passes ``-g / 2`` to w (not the derivative: the rule must be the
    one that runs)."""
    return x - w


_halved_rule.defvjp(lambda x, w: (x - w, None), lambda r, g: (g, -0.5 * g))
PLAIN = {"max": jaxconv.Op(lambda x, w: x - w, "max", name="plain_sub_max"),
         "min": jaxconv.Op(lambda x, w: x - w, "min", name="plain_sub_min")}


@pytest.mark.parametrize("reduce,dtype", [("max", BF16), ("min", F16)])
def test_custom_vjp_max_min_combine_runs_natively(reduce: str, dtype: Any) -> None:
    """A ``jax.custom_vjp`` combine under max / min on bf16 / f16 runs on the native engine
    (issue 22: custom rules and every floating dtype; its primal's roundings are the
    question, `eligibility.rounds_once`, which refused the custom VJP's call before), as
    `explain` says: the forward bit for bit the numpy loops rounded once and the XLA
    engine's; the gradients the XLA engine's and the rule's (dw half the plain
    difference's), ties (integer data) split equally."""
    op = jaxconv.Op(_halved_rule, reduce, name=f"halved_{reduce}")
    assert jaxconv.explain(op, dtype=dtype).engine == "native"
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.integers(-3, 4, (2, 6, 5, 16)), dtype)
    w = jnp.asarray(rng.integers(-3, 4, (3, 3, 16, 8)), dtype)

    def conv(o: Any, engine: str) -> Any:
        return lambda a, b: jaxconv.conv_general_dilated(
            a, b, (1, 1), "SAME", dimension_numbers=DN, op=o, engine=engine)

    assert "jaxconv_low_forward" in jax.jit(conv(op, "auto")).lower(x, w).as_text()
    y = jax.jit(conv(op, "native"))(x, w)
    np.testing.assert_array_equal(_bits(y), _bits(jax.jit(conv(op, "xla"))(x, w)))
    red = np.maximum if reduce == "max" else np.minimum
    ref = conv_reference(np.asarray(x, np.float64), np.asarray(w, np.float64), (1, 1), "SAME",
                         dimension_numbers=DN, combine=np.subtract, reduce=red,
                         identity=-np.inf if reduce == "max" else np.inf)
    np.testing.assert_array_equal(np.asarray(y, np.float64), ref)
    g = jnp.asarray(rng.standard_normal(y.shape), dtype)

    def grads(o: Any, engine: str) -> Any:
        return jax.jit(lambda a, b: jax.vjp(conv(o, engine), a, b)[1](g))(x, w)

    (dxn, dwn), (dxx, dwx), (_, dwp) = (grads(op, "native"), grads(op, "xla"),
                                        grads(PLAIN[reduce], "xla"))
    for got, want in ((dxn, dxx), (dwn, dwx), (dwn, 0.5 * np.asarray(dwp, np.float32))):
        want = np.asarray(want, np.float32)
        np.testing.assert_allclose(np.asarray(got, np.float32), want,
                                   atol=0.02 * np.abs(want).max())

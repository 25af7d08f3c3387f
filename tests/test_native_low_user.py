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

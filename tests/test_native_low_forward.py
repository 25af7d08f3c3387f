"""The native forward on bfloat16 / float16 operands converts inside the call
(csrc/kernel_bf16fuse_low.h): the bits of XLA's conversions around the float32 call, and the
numpy reference's values.

The reference route (the float32 call between XLA's converts) is the engine's own fallback,
taken here by ``JAXCONV_NATIVE_LOW=convert``; every case also checks the numpy plain loop.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import low_route
from tests.low_routes import compiled, native_conv
from tests.reference import NUMPY_OPS, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
BF16, F16 = jnp.bfloat16, jnp.float16


def _values(kind: str, shape: tuple[int, ...], dtype: Any, seed: int) -> np.ndarray:
    """Test data of the dtype (as float32): normal, or specials (NaN with payloads, infinities,
    signed zeros, ties on rounding boundaries, subnormals of the dtype)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(shape).astype(np.float32)
    if kind == "specials":
        tiny = float(jnp.finfo(dtype).smallest_subnormal)
        pool = np.array([0.0, -0.0, np.inf, -np.inf, 1.0, 2.0**-8, 2.0**-11, tiny, -tiny * 3,
                         1.0 + 2.0**-7, 65504.0, 16.0], np.float32)
        pick = rng.random(shape)
        a = np.where(pick < 0.5, pool[rng.integers(0, len(pool), shape)], a)
        a[pick > 0.97] = np.nan
    return np.asarray(jnp.asarray(a).astype(dtype))


def _nan_payloads(a: jax.Array, seed: int) -> jax.Array:
    """`a` with a few NaNs of other payloads and signs (signalling ones too)."""
    bits = np.asarray(a).view(np.uint16).copy()
    nan = bits[np.isnan(np.asarray(a).astype(np.float32))]
    rng = np.random.default_rng(seed)
    exp = 0x7f80 if a.dtype == BF16 else 0x7c00
    nan[:] = exp | rng.integers(1, 0x40, nan.shape) | (rng.integers(0, 2, nan.shape) << 15)
    bits[np.isnan(np.asarray(a).astype(np.float32))] = nan
    return jnp.asarray(bits.view(a.dtype))


# A covering set of the route's branches: every max/min kernel and a sum, both dtypes, the
# register tiles' full and partial channel blocks, groups and strides, the depthwise loop
# (float32 y rounded after the kernels), a vmap batch (read from the element counts), specials.
CASES = [
    ("max_plus", BF16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "specials"),
    ("min_plus", F16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "specials"),
    ("max_min", F16, (2, 6, 6, 32), (3, 3, 8, 12), 4, (2, 1), False, "specials"),
    ("min_max", BF16, (2, 6, 6, 32), (3, 3, 8, 36), 4, (1, 1), False, "specials"),
    ("min_plus", BF16, (1, 5, 7, 24), (3, 2, 1, 24), 24, (1, 1), False, "specials"),
    ("max_plus", F16, (3, 1, 5, 6, 8), (3, 1, 3, 8, 17), 1, (1, 1), True, "normal"),
    ("adder", BF16, (2, 7, 9, 16), (3, 3, 16, 20), 1, (1, 1), False, "normal"),
]


@pytest.mark.parametrize("op,dtype,xs,ws,groups,strides,vmapped,kind", CASES)
def test_in_call_conversions_are_xlas_bits(op: str, dtype: Any, xs: tuple, ws: tuple,
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
    if op != "adder":  # max/min: nothing converts outside the call
        assert " convert(" not in new.as_text()
    y, ref_bits = new(x, w), old(x, w)
    assert y.dtype == ref_bits.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y).view(np.uint16),
                                  np.asarray(ref_bits).view(np.uint16))
    if vmapped:  # the numpy reference per vmapped entry
        x, w, y = x[0], w[0], y[0]
    r = NUMPY_OPS[op]
    with np.errstate(invalid="ignore"):  # signalling NaNs widen with a warning
        x64, w64 = (np.asarray(a).astype(np.float32).astype(np.float64) for a in (x, w))
        got = np.asarray(y).astype(np.float32)
    ref = conv_reference(x64, w64, strides, "SAME", dimension_numbers=DN,
                         feature_group_count=groups, combine=r.combine, reduce=r.reduce,
                         identity=r.identity, pad_value=r.pad_value)
    if op == "adder":
        np.testing.assert_allclose(got, ref, rtol=1e-2, atol=1e-2 * np.abs(ref).max())
    else:  # max/min: the reference's exact result rounded once to the dtype
        with np.errstate(invalid="ignore"):
            want = ref.astype(np.float32).astype(dtype).astype(np.float32)
        # The kernels flush float32 subnormals (bfloat16's) to zero, as the float32 call does.
        flush = np.finfo(np.float32).tiny
        got = np.where(np.abs(got) < flush, 0.0, got)
        want = np.where(np.abs(want) < flush, 0.0, want)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        real = ~np.isnan(want)
        np.testing.assert_array_equal(got[real], want[real])


# The FFI targets of `jax.grad` of a recording bf16 max_plus, per JAXCONV_NATIVE_LOW route.
ROUTE_TARGETS = {
    "record": {"jaxconv_low_forward_record", "jaxconv_low_backward_recorded"},
    "call": {"jaxconv_low_forward", "jaxconv_wide_backward"},
    "convert": {"jaxconv_forward", "jaxconv_wide_backward"},
}


@pytest.mark.parametrize("route", sorted(ROUTE_TARGETS))
def test_jaxconv_native_low_selects_the_route(route: str, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    """``JAXCONV_NATIVE_LOW``, read while tracing, picks the FFI calls (the compiled HLO's
    custom-call targets) and `explain`'s lines; every route gives the default's bits."""
    x = jnp.asarray(_values("normal", (2, 8, 8, 64), BF16, 5))
    w = jnp.asarray(_values("normal", (3, 3, 64, 24), BF16, 6))
    ct = jnp.asarray(_values("normal", (2, 8, 8, 24), BF16, 7))
    f = native_conv("max_plus", window_strides=(1, 1), padding="SAME")
    new, got = (compiled(f, (x, w, ct), r, derivative="vjp") for r in ("record", route))
    for fn, r in ((new, "record"), (got, route)):
        assert set(re.findall(r'custom_call_target="(jaxconv_[a-z_]+)"', fn.as_text())
                   ) == ROUTE_TARGETS[r]
    for a, b in zip(got(x, w, ct), new(x, w, ct), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    monkeypatch.setenv("JAXCONV_NATIVE_LOW", route)
    details = " ".join(jaxconv.explain("max_plus", dtype=BF16, platform="cpu").details)
    assert ("widened to float32 inside the call" in details) == (route != "convert")
    assert ("JAXCONV_NATIVE_LOW=convert chooses this route" in details) == (route == "convert")
    assert ("in one call on the bfloat16 operands" in details) == (route == "record")
    assert (f"JAXCONV_NATIVE_LOW={route}: no record" in details) == (route != "record")


def test_jaxconv_native_low_refuses_other_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JAXCONV_NATIVE_LOW", "fast")
    x = jnp.zeros((1, 4, 4, 8), BF16)
    w = jnp.zeros((3, 3, 8, 8), BF16)
    with pytest.raises(ValueError, match="JAXCONV_NATIVE_LOW must be one of record, call, "
                                         "convert, got 'fast'"):
        jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN,
                                     op="max_plus", engine="native")
    with pytest.raises(ValueError, match="route must be one of record, call, convert"):
        with low_route.chosen("fast"):  # type: ignore[arg-type]
            pass

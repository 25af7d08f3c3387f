"""The min form's ops (adder, l1) on bfloat16 / float16 operands without a float32 copy of x
(csrc/kernel_lowtile_minform.h): centre() widens x as it shifts it, and the exact loop widens
it where the min form does not apply. The bits of XLA's conversions around the float32 call,
on every branch: the min form, a centring that fails on x (an input beyond 2^96, NaN,
infinities), one that fails on a weight it did not sample (a kernel column past the first 64),
odd channel counts (the vector tails) and a dense product.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.low_routes import compiled, native_conv, native_dense
from tests.reference import NUMPY_OPS, conv_reference
from tests.test_native_low_forward import _nan_payloads, _values

DN = ("NHWC", "HWIO", "NHWC")
BF16, F16 = jnp.bfloat16, jnp.float16


def _data(kind: str, xs: tuple, ws: tuple, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """x and w of the case's kind: "normal", "specials" (NaN payloads, infinities, zeros,
    subnormals, ties), "big_x" (one input of 2^100), "big_w" (one weight of 2^100 in the
    kernel's last output channel, past the centring's sample)."""
    x = _values("specials" if kind == "specials" else "normal", xs, dtype, 1)
    w = _values("specials" if kind == "specials" else "normal", ws, dtype, 2)
    if kind == "big_x":
        x = x.copy()
        x.reshape(-1)[x.size // 2 + 3] = np.asarray(2.0**100, dtype)
    if kind == "big_w":
        w = w.copy()
        w[1, 0, 0, -1] = np.asarray(-(2.0**100), dtype)
    x, w = jnp.asarray(x), jnp.asarray(w)
    if kind == "specials":
        x, w = _nan_payloads(x, 3), _nan_payloads(w, 4)
    return x, w


CASES = [
    ("adder", BF16, (2, 7, 9, 16), (3, 3, 16, 20), "specials"),
    ("l1", F16, (2, 7, 9, 16), (3, 3, 16, 20), "specials"),
    ("l1", BF16, (2, 5, 6, 3), (3, 3, 3, 5), "normal"),
    ("adder", F16, (1, 6, 5, 19), (2, 3, 19, 33), "normal"),
    ("adder", BF16, (2, 7, 9, 16), (3, 3, 16, 20), "big_x"),
    ("l1", BF16, (1, 6, 6, 8), (3, 3, 8, 72), "big_w"),
    ("adder", F16, (1, 6, 6, 8), (3, 3, 8, 72), "normal"),
]


@pytest.mark.parametrize("op,dtype,xs,ws,kind", CASES)
def test_min_form_low_x_is_xlas_bits(op: str, dtype: Any, xs: tuple, ws: tuple, kind: str) -> None:
    x, w = _data(kind, xs, ws, dtype)

    f = native_conv(op, window_strides=(1, 1), padding="SAME")
    new, old = (compiled(f, (x, w), route) for route in ("record", "convert"))
    assert "jaxconv_low_forward" in new.as_text()
    y, ref_bits = new(x, w), old(x, w)
    assert y.dtype == ref_bits.dtype == dtype
    np.testing.assert_array_equal(
        np.asarray(y).view(np.uint16), np.asarray(ref_bits).view(np.uint16)
    )
    r = NUMPY_OPS[op]
    with np.errstate(invalid="ignore", over="ignore"):
        x64, w64 = (np.asarray(a).astype(np.float32).astype(np.float64) for a in (x, w))
        got = np.asarray(y).astype(np.float32)
        ref = (
            conv_reference(
                x64,
                w64,
                (1, 1),
                "SAME",
                dimension_numbers=DN,
                combine=r.combine,
                reduce=r.reduce,
                identity=r.identity,
                pad_value=r.pad_value,
            )
            .astype(np.float32)
            .astype(dtype)
        )
    ref = np.asarray(ref).astype(np.float32)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
    fin = np.isfinite(ref)
    np.testing.assert_array_equal(got[~fin], ref[~fin])  # NaN compares equal here
    if fin.any():
        np.testing.assert_allclose(
            got[fin], ref[fin], rtol=2e-2, atol=2e-2 * np.abs(ref[fin]).max()
        )


@pytest.mark.parametrize("op,dtype", [("adder", BF16), ("l1", F16)])
def test_min_form_low_x_dense_is_xlas_bits(op: str, dtype: Any) -> None:
    x = jnp.asarray(_values("normal", (9, 37), dtype, 5))
    w = jnp.asarray(_values("normal", (37, 21), dtype, 6))

    f = native_dense(op)
    new, old = (compiled(f, (x, w), route) for route in ("record", "convert"))
    np.testing.assert_array_equal(
        np.asarray(new(x, w)).view(np.uint16), np.asarray(old(x, w)).view(np.uint16)
    )

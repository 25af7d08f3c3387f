"""Ties among zero, subnormal and smallest-normal products of max / min ops, both engines,
against the numpy loops run with the contract's floating-point mode (docs/numerics.md,
"Signed zeros and denormals"): subnormal float32 / bfloat16 inputs read as zeros of their
sign, products are computed in float32 and a subnormal product flushes to a zero of its sign
(float16 subnormals are normal float32 numbers: kept), bfloat16 / float16 products are then
rounded to the dtype; the winners of a result are the products equal to it (``-0 == +0``)
and share its cotangent equally.

The root cause of fuzz seed 7100015: the bfloat16 winner test compares each float32 product
with the inner end of y's rounding interval, which for ``y = +-2^-126`` was a subnormal
float32, read as zero under DAZ: every zero product tied with the smallest-normal result
(csrc/kernel_wide_lowwin.h, bf16_inner).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jaxconv
from tests.reference import conv_maxmin_grads_reference, conv_reference

DN = ("NHWC", "HWIO", "NHWC")
TINY32 = float(np.finfo(np.float32).tiny)
NP_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}

MUL_MIN = jaxconv.Op(jnp.multiply, "min", name="dnt_mul_min")
CLIP_MAX = jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="dnt_clip_max")
OPS = {
    "max_times": ("max", lambda p: p),
    "clip_max": ("max", lambda p: min(max(p, -1.0), 1.0)),
    "mul_min": ("min", lambda p: p),
}
JAX_OPS = {"max_times": "max_times", "clip_max": CLIP_MAX, "mul_min": MUL_MIN}


def _max(a: Any, b: Any) -> Any:
    """np.maximum ordering -0 below +0 (the contract's max; no NaN in this data)."""
    return np.where(a == b, np.where(np.signbit(a), b, a), np.maximum(a, b))


def _min(a: Any, b: Any) -> Any:
    """np.minimum ordering +0 above -0."""
    return np.where(a == b, np.where(np.signbit(a), a, b), np.minimum(a, b))


def _flush(v: float) -> float:
    """A float32 subnormal as the zero of its sign (DAZ on inputs, FTZ on results)."""
    return math.copysign(0.0, v) if abs(v) < TINY32 else v


def _rules(dtype: str, tail: Callable[[float], float]) -> tuple[Any, Any]:
    """(combine, partials) of ``tail(x * w)`` on scalars in the contract's mode."""
    low = dtype != "float32"
    read = (lambda v: v) if dtype == "float16" else _flush

    def combine(x: float, w: float) -> float:
        p = tail(_flush(float(np.float32(read(x) * read(w)))))
        return float(np.float32(p).astype(NP_DTYPES[dtype])) if low else p

    def partials(x: float, w: float) -> tuple[float, float]:
        p = float(np.float32(read(x) * read(w)))
        inside = float(tail(p) == p)  # the clip's derivative (the products stay inside)
        return inside * read(w), inside * read(x)

    return combine, partials


def _pools(dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of x and of w, both signs of each: x zeros, the smallest normal t of the
    compute (float32's; float16's own, 2^-14) and a subnormal (t / 4, read as zero; float16:
    its smallest subnormal 2^-24, kept); w zeros, 1 and 1/2 (t / 2 is subnormal: it flushes;
    float16: 2^-15, kept) and, for float16, 2^-11 (t * 2^-11 rounds to zero). So most results
    are +-t or zero, with many zero products beside them."""
    t = 2.0**-14 if dtype == "float16" else TINY32
    xs = [0.0, t, 2.0**-24 if dtype == "float16" else t / 4]
    ws = [0.0, 1.0, 0.5] + ([2.0**-11] if dtype == "float16" else [])
    return tuple(np.array([s * v for v in vals for s in (1.0, -1.0)]) for vals in (xs, ws))


def _data(dtype: str, xs: tuple[int, ...], ws: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(1)
    return tuple(
        pool[rng.integers(0, len(pool), shape)].astype(NP_DTYPES[dtype])
        for pool, shape in zip(_pools(dtype), (xs, ws), strict=True)
    )


def _check(got: Any, want: np.ndarray, scale: np.ndarray, dtype: str, who: str) -> None:
    """Within two roundings of the dtype per unit of the gradient's terms' magnitudes
    (``scale``: the sum of their absolute values; the XLA engine rounds each share and each
    addition in the dtype, so a sum that cancels is off by more than a unit of its own), and
    values the engines flush (a share times the smallest normal) compare with zero. A tie
    split among extra winners moves a term by half of it or more."""
    eps = float(ml_dtypes.finfo(NP_DTYPES[dtype]).eps)
    floor = 2.0**-23 if dtype == "float16" else 8 * TINY32
    err = np.abs(np.asarray(got, np.float64) - want)
    bad = err > 2 * eps * scale + floor
    assert not bad.any(), (
        f"{who}: {int(bad.sum())} of {bad.size} differ, first at "
        f"{tuple(np.argwhere(bad)[0])}: got {np.asarray(got)[bad][0]!r}, "
        f"want {want[bad][0]!r}"
    )


CASES = [  # (op, dtype, x shape, w shape): K = 72 and 144 rows (the recorded route), 36 (one
    # call), a dense product (1x1 kernel, 150 rows)
    ("max_times", "bfloat16", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("max_times", "bfloat16", (1, 4, 6, 16), (3, 3, 16, 5)),
    ("max_times", "bfloat16", (2, 5, 5, 4), (3, 3, 4, 6)),
    ("max_times", "float16", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("max_times", "float32", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("clip_max", "bfloat16", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("clip_max", "float16", (2, 5, 5, 4), (3, 3, 4, 6)),
    ("clip_max", "float32", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("mul_min", "bfloat16", (2, 5, 5, 8), (3, 3, 8, 6)),
    ("mul_min", "float32", (2, 5, 5, 4), (3, 3, 4, 6)),
    ("max_times", "bfloat16", (9, 1, 1, 150), (1, 1, 150, 7)),
    ("mul_min", "bfloat16", (9, 1, 1, 150), (1, 1, 150, 7)),
]


@pytest.mark.parametrize("name,dtype,xs,ws", CASES)
def test_denormal_ties_split_as_the_reference(name: str, dtype: str, xs: tuple, ws: tuple) -> None:
    reduce, tail = OPS[name]
    combine, partials = _rules(dtype, tail)
    x, w = _data(dtype, xs, ws)
    x64, w64 = (np.asarray(a, np.float64) for a in (x, w))
    want_y = conv_reference(
        x64,
        w64,
        (1, 1),
        "SAME",
        dimension_numbers=DN,
        combine=np.vectorize(combine, otypes=[np.float64]),
        reduce=_max if reduce == "max" else _min,
        identity=-np.inf if reduce == "max" else np.inf,
    )
    g = np.random.default_rng(3).standard_normal(want_y.shape).astype(NP_DTYPES[dtype])
    rule = dict(dimension_numbers=DN, combine=combine, reduce=reduce)
    g64 = np.asarray(g, np.float64)
    want = conv_maxmin_grads_reference(x64, w64, g64, (1, 1), "SAME", partials=partials, **rule)
    scale = conv_maxmin_grads_reference(
        x64,
        w64,
        np.abs(g64),
        (1, 1),
        "SAME",
        partials=lambda a, b: tuple(abs(p) for p in partials(a, b)),
        **rule,
    )
    t = 2.0**-14 if dtype == "float16" else TINY32
    assert (np.abs(want_y) == t).any(), "no smallest-normal result drawn"
    for engine in ("xla", "native"):

        def f(a: jax.Array, b: jax.Array, e: str = engine) -> jax.Array:
            return jaxconv.conv_general_dilated(
                a, b, (1, 1), "SAME", dimension_numbers=DN, op=JAX_OPS[name], engine=e
            )

        if engine == "native":  # the native kernels, forward and backward, not a fallback
            text = jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c)).lower(x, w, g).as_text()
            assert re.search(r"@jaxconv_\w*forward", text), text
            assert re.search(r"@jaxconv_\w*backward", text), text
        y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(w))
        got_y = np.asarray(y, np.float64)
        np.testing.assert_array_equal(got_y, want_y, err_msg=f"{engine} forward")
        assert np.array_equal(np.signbit(got_y), np.signbit(want_y)), f"{engine}: zero signs"
        for got, ref, sc, who in zip(
            jax.jit(vjp)(jnp.asarray(g)), want, scale, ("dx", "dw"), strict=True
        ):
            _check(got, ref, sc, dtype, f"{engine} {who}")

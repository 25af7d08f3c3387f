"""Dense bfloat16 / float16 max/min products under a gradient: the low recording forward keeps an
exact winner code per output (csrc/kernel_lowdense_record.h: one winner's k, two or three
winners listed, else a tie's blocks) and the backward scatters the cotangent from it
(csrc/kernel_lowdense_backward.h); the built-in ops, and user max / min ops whose functor
declares ``kLowCodes`` (codegen.low_codes).

The reference route is the engine's earlier one (no record: the wide backward on float32
copies, every output's window scanned), taken by ``JAXCONV_NATIVE_LOW=call``: y, dx and dw
must be its bits, over normal data, ties (a coarse grid, small integers), subnormals, zeros of
both signs, sums that overflow, NaN / infinities (not recorded), vmap batches and float32
results. Values are checked against the numpy plain loop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv._src.engines.native import codegen, ffi, low_route
from tests.reference import NUMPY_OPS, conv_reference

BF16, F16 = jnp.bfloat16, jnp.float16
LIST = -2 - (1 << 24)  # csrc/kernel_lowdense_case.h: kLowList

pytestmark = pytest.mark.skipif(
    not ffi.available() or not ffi.has_low_recording(),
    reason="the native library with the low recording forward",
)


def _data(kind: str, xs: tuple, ws: tuple, dtype: Any, seed: int) -> tuple[Any, Any]:
    """x and w of the dtype, drawn as `kind` says."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    big = 3e4 if dtype == F16 else 1.5e38
    if kind == "ties":
        x, w = np.round(x * 4) / 4 + 2.0**-9, np.round(w * 4) / 4 + 2.0**-10
    elif kind == "ints":
        x, w = np.round(x * 2), np.round(w * 2)
    elif kind == "ints3":  # -3..3: nearly every output a tie of many winners
        x, w = (rng.integers(-3, 4, a.shape).astype(np.float32) for a in (x, w))
    elif kind == "tiny":  # float16 subnormals; bfloat16 products near the smallest normal
        scale = 2.0**-14 if dtype == F16 else 2.0**-124
        x, w = x * scale, w * scale
    elif kind == "zeros":
        x = np.where(np.abs(x) < 0.7, 0.0, x) * np.sign(rng.standard_normal(xs))
        w = np.where(np.abs(w) < 0.7, -0.0, w)
    elif kind == "big":  # finite operands whose sums reach infinity
        x, w = np.clip(x, -1, 1) * big, np.clip(w, -1, 1) * big
    elif kind == "nan":
        x[0, 1], x[-1, 2], w[0, 0] = np.nan, np.inf, -np.inf
    elif kind == "ninf":
        x[0, :] = -np.inf
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _compiled(op: str | jaxconv.Op, recorded: bool, vmapped: bool, acc: Any, args: list) -> Any:
    """The compiled y, dx, dw of a cotangent, by the recorded route or the earlier one."""

    def f(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.dot_general(
            a,
            b,
            (((a.ndim - 1,), (0,)), ((), ())),
            op=op,
            engine="native",
            preferred_element_type=acc,
        )

    g = jax.vmap(f) if vmapped else f

    def fb(x: jax.Array, w: jax.Array, ct: jax.Array) -> Any:
        y, vjp = jax.vjp(g, x, w)
        return (y, *vjp(ct))

    with low_route.chosen("record" if recorded else "call"):
        return jax.jit(fb).lower(*args).compile()


def _codes(op: str | jaxconv.Op, x: Any, w: Any) -> np.ndarray:
    """The record the forward keeps for the backward (the vjp's int32 residual)."""
    y, vjp = jax.vjp(
        lambda a, b: jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op=op, engine="native"),
        x,
        w,
    )
    recs = [
        a
        for a in jax.tree_util.tree_leaves(vjp)
        if getattr(a, "dtype", None) == jnp.int32 and a.shape == y.shape
    ]
    assert len(recs) == 1
    return np.asarray(recs[0])


def _recorded_y_with_earlier_bits(
    op: str | jaxconv.Op, kind: str, dtype: Any, seed: int
) -> tuple[Any, Any, jax.Array]:
    """A 9 x 200 @ 200 x 70 problem of ``kind`` data: asserts the recorded route compiles to
    the recording target and gives the earlier route's bits (y, dx, dw); returns x, w, y."""
    x, w = _data(kind, (9, 200), (200, 70), dtype, seed)
    ct = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((9, 70)), dtype)
    args = [x, w, ct]
    new, old = _compiled(op, True, False, None, args), _compiled(op, False, False, None, args)
    assert "jaxconv_low_forward_record" in new.as_text()
    got = new(*args)
    for a, b in zip(got, old(*args), strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))
    return x, w, got[0]


OPS = ("max_plus", "min_plus", "max_min", "min_max")
KINDS = ("normal", "ties", "ints", "tiny", "zeros", "big", "nan", "ninf")

# User max / min ops (compiled kernels) whose functors declare kLowCodes: a clip (run as
# max-times, the clip a monotone tail applied to the result), the tropical max-times (products
# that overflow to infinity on "big" data), a min of products and a select under min.
CLIP_MAX = jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="clip_max")
MAX_TIMES = jaxconv.Op(lambda a, b: a * b, "max", name="max_times")
MIN_TIMES = jaxconv.Op(lambda a, b: a * b, "min", name="min_times")
MIN_GATE = jaxconv.Op(lambda a, b: jnp.where(a > 0, a + b, -b), "min", name="min_gate")
USER_NUMPY = {
    "min_gate": (lambda a, b: np.where(a > 0, a + b, -b), np.minimum, np.inf),
    "clip_max": (lambda a, b: np.clip(a * b, -1.0, 1.0), np.maximum, -np.inf),
    "max_times": (np.multiply, np.maximum, -np.inf),
    "min_times": (np.multiply, np.minimum, np.inf),
}
USER_OPS = (CLIP_MAX, MAX_TIMES, MIN_TIMES, MIN_GATE)


# A covering set: every kind of data twice, every op with both dtypes.
CODE_CASES = [
    (kind, OPS[(2 * i + j) % 4], (BF16, F16)[(i // 2 + j) % 2])
    for i, kind in enumerate(KINDS)
    for j in range(2)
]


@pytest.mark.parametrize("kind,op,dtype", CODE_CASES)
def test_codes_route_has_the_earlier_routes_bits(op: str, dtype: Any, kind: str) -> None:
    x, w, y = _recorded_y_with_earlier_bits(op, kind, dtype, 1)
    if kind == "tiny" and dtype == BF16:
        return  # float32 subnormal operands: the native engines read them as zero (DAZ)
    r = NUMPY_OPS[op]
    x64, w64 = (np.asarray(a, np.float32).astype(np.float64) for a in (x, w))
    ref = conv_reference(
        x64[:, None, None, :],
        w64[None, None],
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        combine=r.combine,
        reduce=r.reduce,
        identity=r.identity,
        pad_value=r.pad_value,
    )
    with np.errstate(invalid="ignore", over="ignore"):
        want = ref[:, 0, 0].astype(np.float32).astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want)


@pytest.mark.parametrize(
    "op,dtype,k,kind",
    [
        ("max_plus", BF16, 2000, "ties"),  # blocks of 128 rows, two winners listed at most
        ("min_max", F16, 2000, "ints"),
        ("min_plus", F16, 128, "ties"),  # two blocks
        ("max_min", BF16, 1000, "normal"),  # a short last block
        ("max_plus", F16, 33000, "ints"),  # K > 2^15: no winners listed, every tie rescanned
    ],
)
def test_kernel_rows_and_block_sizes_keep_the_bits(op: str, dtype: Any, k: int, kind: str) -> None:
    x, w = _data(kind, (3, k), (k, 18), dtype, 5)
    ct = jnp.asarray(np.random.default_rng(6).standard_normal((3, 18)), dtype)
    args = [x, w, ct]
    new, old = _compiled(op, True, False, None, args), _compiled(op, False, False, None, args)
    for a, b in zip(new(*args), old(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize(
    "op,dtype",
    [("max_plus", BF16), ("max_min", F16)]
    + [(CLIP_MAX, BF16), (MAX_TIMES, F16), (MIN_TIMES, BF16), (MIN_GATE, F16)],
)
def test_tie_heavy_items_keep_the_bits(op: Any, dtype: Any) -> None:
    """Small integers over 1024 kernel rows and two items of 64 columns: nearly every output a
    tie of many winners, so each item widens and transposes its kernel columns once
    (csrc/kernel_lowdense_backward.h) before its ties are scanned; a user op's by the wide
    library's compare. (A clip under max runs as max-times with the clip applied to the
    result, a monotone tail factored out: its ties are max-times's.)"""
    x, w = _data("ints3", (40, 1024), (1024, 128), dtype, 7)
    ct = jnp.asarray(np.random.default_rng(8).standard_normal((40, 128)), dtype)
    args = [x, w, ct]
    assert (_codes(op, x, w).astype(np.int64) < -2).mean() > 0.5  # mostly ties' blocks
    new, old = _compiled(op, True, False, None, args), _compiled(op, False, False, None, args)
    for a, b in zip(new(*args), old(*args), strict=True):
        np.testing.assert_array_equal(np.asarray(a).view(np.uint16), np.asarray(b).view(np.uint16))


@pytest.mark.parametrize(
    "op,dtype,vmapped,acc",
    [
        ("max_plus", BF16, True, None),
        ("min_max", F16, True, None),
        ("min_plus", F16, False, jnp.float32),
        ("max_min", BF16, False, jnp.float32),
        (MAX_TIMES, F16, True, None),
        (CLIP_MAX, F16, False, jnp.float32),
    ],
)
def test_batches_and_float32_results_keep_the_bits(
    op: Any, dtype: Any, vmapped: bool, acc: Any
) -> None:
    """A vmap batch (one record per batch element), and a float32 result (y and the cotangent
    in float32)."""
    lead = (2,) if vmapped else ()
    x, w = _data("ties", (*lead, 6, 130), (*lead, 130, 40), dtype, 3)
    ct = jnp.asarray(
        np.random.default_rng(4).standard_normal((*lead, 6, 40)), dtype if acc is None else acc
    )
    args = [x, w, ct]
    new = _compiled(op, True, vmapped, acc, args)
    old = _compiled(op, False, vmapped, acc, args)
    for a, b in zip(new(*args), old(*args), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


@pytest.mark.parametrize("op,dtype", [(op, BF16) for op in OPS] + [(op, F16) for op in USER_OPS])
def test_the_record_holds_codes(op: Any, dtype: Any) -> None:
    """Tied data gives every kind of code: one winner, winners listed, ties rescanned (a user
    op's too: its functors declare kLowCodes)."""
    x, w = _data("ints", (9, 200), (200, 70), dtype, 1)
    r = _codes(op, x, w).astype(np.int64)
    assert (r >= 0).any() and (r <= LIST).any() and ((r < -2) & (r > LIST)).any()
    # Not finite: not recorded (-1), the earlier full scan.
    x, w = _data("nan", (9, 200), (200, 70), dtype, 1)
    assert (_codes(op, x, w) == -1).all()


# Every kind of data once (ties, overflow, NaN / infinities twice), ops and dtypes across them.
USER_CASES = [
    (kind, USER_OPS[(i + j) % 4], (BF16, F16)[(i // 2 + j) % 2])
    for i, kind in enumerate(KINDS)
    for j in range(2 if kind in ("ties", "big", "nan") else 1)
]


@pytest.mark.parametrize("kind,op,dtype", USER_CASES)
def test_user_codes_route_has_the_earlier_routes_bits(op: Any, dtype: Any, kind: str) -> None:
    """A user op's codes and scatter: the earlier route's bits (the full scan of the wide
    kernels' user library); y the numpy reference rounded once."""
    x, w, y = _recorded_y_with_earlier_bits(op, kind, dtype, 21)
    if kind == "tiny" and dtype == BF16:
        return  # float32 subnormal products: the native engines flush them (DAZ / FTZ)
    combine, reduce, _ = USER_NUMPY[op.name]
    x64, w64 = (np.asarray(a, np.float32).astype(np.float64) for a in (x, w))
    with np.errstate(invalid="ignore", over="ignore"):
        ref = reduce.reduce(combine(x64[:, :, None], w64[None]).astype(np.float32), axis=1)
        want = ref.astype(dtype).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(y, np.float32), want)


@pytest.mark.parametrize(
    "fn,reduce,codes",
    [
        (lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", True),
        (lambda a, b: a * b, "min", True),
        (lambda a, b: jnp.where(a > 0, a + b, -b), "min", True),
        (lambda a, b: jnp.tanh(a - b), "max", False),  # vectorized here, libm there
        (jnp.power, "max", False),
        (lambda a, b: a / b, "max", False),  # 0 / 0: a NaN of finite operands
        (lambda a, b: a * b, "sum", False),
    ],
)
def test_functors_declare_low_codes_alike(fn: Any, reduce: str, codes: bool) -> None:
    """The float32 functor (the forward's) and the wide one (the backward's) declare kLowCodes
    alike: both sides read the record by it."""
    op = jaxconv.Op(fn, reduce)
    f32 = codegen.functor(op)
    assert f32.low_codes == codes
    assert (codegen.LOW_CODES in f32.source) == codes
    if reduce != "sum":
        wide = codegen.functor(op, np.float32, wide=True)
        assert wide.low_codes == codes and (codegen.LOW_CODES in wide.source) == codes


def test_explain_says_a_user_op_records_codes() -> None:
    details = " ".join(jaxconv.explain(CLIP_MAX, dtype=BF16, platform="cpu").details)
    assert "kLowCodes" in details and "up to three winners" in details
    details = " ".join(
        jaxconv.explain(jaxconv.Op(jnp.power, "max"), dtype=BF16, platform="cpu").details
    )
    assert "kLowCodes" not in details

"""The decision which max / min calls record their winners in the forward
(jaxconv/_src/engines/native/records.py), on the op and dtype alone.

Checked: `records.refusal` gives the first reason a float32 / bfloat16 / float16 max / min op
does not record (a pad_value; on the low dtypes a function the forward vectorizes and the wide
kernels take from libm; a NaN product of finite operands), ``None`` where it records or where
the op is not a max / min op, and never a reason where `records.records_op` admits the op. The
routes themselves (the kernels, their bits) are checked in test_native_convrec.py,
test_native_dense.py, test_native_lowrec.py and test_native_low_user.py; `explain`'s wording
there too.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import jaxconv
from jaxconv import ops
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines import native
from jaxconv._src.engines.native import ffi, low_route, records

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native engine not built: {native.load_error()}"
)

GEOM = Geometry((9,), (3,), (1,), ((0, 0),), (1,), (1,), 1)
PAD = "a pad_value (the recording forward pads with the identity)"
NAN = "finite operands can make a NaN product (the recording tiles run the fast loop)"
LIBM = (
    "the forward vectorizes a function that the wide kernels take from libm, so the "
    "forward's marks might miss a backward winner"
)

MAX_TIMES = jaxconv.Op(lambda a, b: a * b, "max", name="records_max_times")
PADDED = jaxconv.Op(lambda a, b: a * b, "max", pad_value=0.0, name="records_padded")
DIV = jaxconv.Op(lambda a, b: a / b, "max", name="records_div")  # 0 / 0 of finite operands
POW = jaxconv.Op(jnp.power, "max", name="records_pow")  # vectorized forward, libm wide; NaN too
SUM = jaxconv.Op(lambda a, b: a * b, "sum", name="records_sum_times")

# op, dtype -> the first refusal (None: it records, or it is no max / min op).
CASES = [
    (MAX_TIMES, "float32", None),
    (MAX_TIMES, "bfloat16", None),
    (MAX_TIMES, "float16", None),
    (ops.max_plus, "float32", None),
    (ops.min_plus, "bfloat16", None),
    (PADDED, "float32", PAD),
    (PADDED, "bfloat16", PAD),
    (DIV, "float32", NAN),
    (DIV, "float16", NAN),
    (POW, "float32", NAN),  # float32 has no libm mismatch to refuse: the NaN comes first
    (POW, "bfloat16", LIBM),
    (SUM, "float32", None),
    (MAX_TIMES, "float64", None),
]


def _problem(op: jaxconv.Op, dtype: str) -> Problem:
    return Problem(op, GEOM, "auto", np.dtype(dtype), 2**20, dtype=np.dtype(dtype))


@pytest.mark.parametrize("op,dtype,want", CASES, ids=[f"{c[0].display_name}-{c[1]}" for c in CASES])
def test_refusal_is_the_first_reason(op: jaxconv.Op, dtype: str, want: str | None) -> None:
    if not (ffi.has_recording() and ffi.has_low_recording()):
        pytest.skip("the native library has no recording entries")
    with low_route.chosen("record"):
        problem = _problem(op, dtype)
        got = records.refusal(problem, dtype)
        assert got == want
        recorded = op is not SUM and dtype != "float64" and want is None
        assert records.records_op(problem, dtype) == recorded


@pytest.mark.parametrize("op", [MAX_TIMES, ops.max_plus])
def test_another_low_route_is_no_refusal_of_the_op(op: jaxconv.Op) -> None:
    """Under ``JAXCONV_NATIVE_LOW=call`` a bfloat16 max op does not record, and `refusal`
    blames nothing about the op (`explain` names the variable itself)."""
    with low_route.chosen("call"):
        problem = _problem(op, "bfloat16")
        assert not records.records_op(problem, "bfloat16")
        assert records.refusal(problem, "bfloat16") is None


def test_record_lines_say_why_a_float32_op_does_not_record() -> None:
    """The float32 explain line carries `refusal`'s reason; a recording op gets the
    recording line; a low dtype's reason goes into the backward line (the engine's)."""
    lines = records.record_lines(_problem(DIV, "float32"), "float32")
    assert lines == (
        f"under a derivative the forward does not record its winner blocks: {NAN}; "
        "the backward rescans every output's window",
    )
    (line,) = records.record_lines(_problem(MAX_TIMES, "float32"), "float32")
    assert "records, per output, which blocks of" in line
    assert records.record_lines(_problem(DIV, "bfloat16"), "bfloat16") == ()

"""Which max / min calls record their winners in the forward, and `explain`'s words on it.

Under a derivative a max / min op's forward may record, per output, the blocks of kernel rows
that hold its winners (``csrc/kernel_dense_record.h``, ``csrc/kernel_convrec_forward.h``; on
bfloat16 / float16 the blocks that may hold a product rounding to the result,
``csrc/kernel_lowrec_mark.h``), so that the backward scans only those. This module decides,
statically and from the op and dtype alone, which calls take that route (`records_op`; the
shapes and the data decide the rest in the engine and the kernels), whether a user op's
libraries for it were built (`user_built`), and says why or why not (`record_lines`,
`refusal`). It compiles nothing while planning.

Example:
    >>> import numpy as np
    >>> from jaxconv import ops
    >>> from jaxconv._src.core.geometry import Geometry
    >>> g = Geometry((5,), (3,), (1,), ((0, 0),), (1,), (1,), 1)
    >>> p = Problem(ops.max_plus, g, "auto", np.dtype("float32"), 2**20)
    >>> records_op(p, "float32") == (ffi.has_recording() and ffi.kernel_id(p.op) is not None)
    True
    >>> refusal(p, "float64") is None
    True
"""

from __future__ import annotations

import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.native import codegen, ffi, translation, user_kernels
from jaxconv._src.engines.native.kinds import (
    low,
    low_in_call,
    rounded_user,
    rounded_winners,
    winner,
)
from jaxconv._src.engines.native.low_route import low_route
from jaxconv._src.engines.native.translation import Refusal

# The built-in float32 kernels with a recording forward (``x - w`` under max / min: the
# kernels of `twins.builtin_twin`).
_RECORDING_BUILTINS = ("max_plus", "min_plus", "max_min", "min_max", "max_minus", "min_minus")


def records_op(problem: Problem, dtype: DTypeLike) -> bool:
    """Whether the op and dtype have the recording forward (`NativeEngine.records_winners`,
    geometry aside): built-in max_plus / min_plus / max_min / min_max (and the kernels of
    ``x - w`` under max / min, `twins.builtin_twin`) on float32, identity
    padding, a library that has it; on bfloat16 / float16 (`low_records`) the four whose
    backward the wide kernels serve.

    Args:
        problem: the canonical problem.
        dtype: the operands' dtype.

    Returns:
        True when the op and dtype have it.
    """
    op = problem.op
    if low(dtype):
        return low_records(problem)
    if np.dtype(dtype) != np.float32 or op.pad_value is not None or not ffi.has_recording():
        return False
    if op.native is None:
        return user_f32_records(problem)
    return op.native in _RECORDING_BUILTINS and ffi.kernel_id(op) is not None


def user_f32_records(problem: Problem) -> bool:
    """Whether a user max / min op on float32 records as the built-ins do: its float32 library
    (the forward's and the backward's: the template's recording tiles and recorded scans,
    ``run_op``) translates, and finite operands make no NaN product (the recording tiles run
    the fast loop; the plain forward of such a combine runs the safe one). Translation only:
    nothing is compiled while planning (`user_built` checks the library at lowering).

    Args:
        problem: the canonical problem (its twin already served).

    Returns:
        True when it records.
    """
    if not winner(problem):
        return False
    f32 = translation.translation(problem.op, "float32")
    return isinstance(f32, codegen.Functor) and f32.nan_free


def low_records(problem: Problem) -> bool:
    """Whether a bfloat16 / float16 max / min op has the low recording forward and the
    recorded backward in one call (``csrc/kernel_lowrec_mark.h``,
    ``csrc/kernel_lowrec_backward.h``): a built-in op the wide backward serves
    (`kinds.rounded_winners`) or a user op that `user_records` admits, identity padding, its
    forward converting in the call, and ``JAXCONV_NATIVE_LOW`` at ``record`` (`low_route`).

    Args:
        problem: the canonical problem (its twin already served).

    Returns:
        True when it has them.
    """
    if problem.op.native is None and not user_records(problem):
        return False
    return (
        (problem.op.native is None or rounded_winners(problem))
        and problem.op.pad_value is None
        and low_in_call(problem)
        and ffi.has_low_recording()
        and low_route() == "record"
    )


def user_records(problem: Problem) -> bool:
    """Whether a user max / min op on bfloat16 / float16 takes the low recording route: its
    float32 library (the forward's; its recording tiles are the template's, run_op) and its
    library for the wide kernels (the backward's, ``csrc/userop_wide.h``) translate, and the
    two compute its products bit for bit (`codegen.same_products`: no function that the
    float32 kernels vectorize and the wide ones take from libm; the marks are the forward's
    products, the scan the backward's) and finite operands make no NaN product (the recording
    tiles run the fast loop). Translation only: nothing is compiled while planning.

    Args:
        problem: the canonical problem (its twin already served).

    Returns:
        True when it does.
    """
    op = problem.op
    if not winner(problem) or not ffi.has_wide_backward():
        return False
    f32 = translation.translation(op, "float32")
    wide = translation.translation(op, "float32", True)
    return (
        isinstance(f32, codegen.Functor)
        and isinstance(wide, codegen.Functor)
        and f32.nan_free
        and codegen.same_products(f32)
        and codegen.same_products(wide)
    )


def user_built(problem: Problem) -> bool:
    """Whether a user op's recording route has its libraries (compiled at first use): the
    float32 one, and on bfloat16 / float16 also `kinds.rounded_user`; a built-in op: True.

    Args:
        problem: the canonical problem (its twin already served).

    Returns:
        False where a library could not be built (the plain route then runs, falling back
        as it does).
    """
    if problem.op.native is not None:
        return True
    got = user_kernels.user_kernel(problem.op, "float32")
    if isinstance(got, Refusal):
        return False
    return not low(problem.operand_dtype) or rounded_user(problem) is not None


def refusal(problem: Problem, dtype: DTypeLike) -> str | None:
    """Why a float32, bfloat16 or float16 max / min op's forward does not record its winners
    (`records_op` false): the first reason, or ``None`` where it records, where it is no such
    op, or where nothing about the op is to blame (a library built without the recording
    entries; a built-in op whose kernels have none; ``JAXCONV_NATIVE_LOW`` choosing another
    route, which `explain` says itself).

    Args:
        problem: the canonical problem (its twin already served).
        dtype: the operands' dtype.

    Returns:
        The reason as text, or ``None``.

    Example:
        >>> import numpy as np
        >>> import jaxconv
        >>> from jaxconv._src.core.geometry import Geometry
        >>> g = Geometry((5,), (3,), (1,), ((0, 0),), (1,), (1,), 1)
        >>> op = jaxconv.Op(lambda a, b: a * b, "max", pad_value=0.0, name="padded_times")
        >>> p = Problem(op, g, "auto", np.dtype("float32"), 2**20)
        >>> refusal(p, "float32")
        'a pad_value (the recording forward pads with the identity)'
    """
    op = problem.op
    is_low = low(dtype)
    if (
        (np.dtype(dtype) != np.float32 and not is_low)
        or not winner(problem)
        or records_op(problem, dtype)
    ):
        return None
    if op.pad_value is not None:
        return "a pad_value (the recording forward pads with the identity)"
    if op.native is not None:
        return None
    if not (low_in_call(problem) and ffi.has_low_recording() if is_low else ffi.has_recording()):
        return None
    f32 = translation.translation(op, "float32")
    if not isinstance(f32, codegen.Functor):
        return None
    if is_low and not codegen.same_products(f32):
        return (
            "the forward vectorizes a function that the wide kernels take from libm, so "
            "the forward's marks might miss a backward winner"
        )
    if not f32.nan_free:
        return "finite operands can make a NaN product (the recording tiles run the fast loop)"
    return None


def record_lines(problem: Problem, dtype: DTypeLike) -> tuple[str, ...]:
    """`explain`'s line on the recording forward (`records_op`), on float32 also on why a max /
    min op's forward does not record (`refusal`), or none.

    Args:
        problem: the canonical problem (its twin already served).
        dtype: the operands' dtype.

    Returns:
        The line, or ``()``.
    """
    if not records_op(problem, dtype):
        why = refusal(problem, dtype) if np.dtype(dtype) == np.float32 else None
        if why is None:
            return ()
        return (
            f"under a derivative the forward does not record its winner blocks: {why}; "
            "the backward rescans every output's window",
        )
    held = "may hold a product that rounds to its result" if low(dtype) else "hold its winners"
    rows = ffi.native_constant("record_block_rows")
    lists = "a bfloat16 / float16 dense max_plus, min_plus, max_min or min_max up to three winners"
    f32 = translation.translation(problem.op, "float32") if problem.op.native is None else None
    if low(dtype) and isinstance(f32, codegen.Functor) and f32.low_codes:
        lists = (
            "this op's bfloat16 / float16 dense call (one position per output, no "
            "padding) up to three winners, more as a tie's blocks (its functor declares "
            "kLowCodes: both kernels compute its products bit for bit)"
        )
    return (
        f"under a derivative the forward records, per output, which blocks of {rows} "
        "kernel rows (on a convolution: a tap's input channels, taps in order) "
        f"{held} (finite data, more than {rows} rows, not depthwise), and "
        "the backward compares only those blocks' products with the result to "
        "find the winners (ties split equally; a float32 dense x + w or x - w "
        f"records its single winner itself, and {lists}, and their backward "
        "scatters); otherwise the backward rescans every output's window",
    )

"""What kind of call a canonical problem is to the native kernels: the facts that both the
engine's routes (`engine`) and the decision which max / min calls record their winners
(`records`) branch on.

- `winner`: the op's reduce is a max or min (its gradient goes to the winning taps);
- `low`: bfloat16 / float16 operands, run on the float32 kernels;
- `exp_space`: the built-in ``log`` kernel behind the exp-space convolution;
- `low_in_call`: a bfloat16 / float16 forward converts inside the call;
- `rounded_winners`, `rounded_user`: the wide backward serves a bfloat16 / float16 max / min
  op, each product rounded to the operands' dtype before the winner compare.

Nothing here is compiled while planning except `rounded_user`'s library (at first use).
"""

from __future__ import annotations

import numpy as np
from jax.typing import DTypeLike

from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.problem import Problem
from jaxconv._src.engines.native import eligibility, ffi, user_kernels
from jaxconv._src.engines.native.low_route import low_route
from jaxconv._src.engines.native.translation import Refusal


def winner(problem: Problem) -> bool:
    """Whether the op's reduce is a max or min (its gradient goes to the winning taps).

    Args:
        problem: the canonical problem.

    Returns:
        True for a max or min reduce.
    """
    op = problem.op
    reduce = op.reduce_name if op.native is not None else capabilities(op).reduce
    return reduce in ("max", "min")


def low(dtype: DTypeLike) -> bool:
    """Whether operands of `dtype` are converted to float32 around the kernels.

    Args:
        dtype: the operands' dtype.

    Returns:
        True for bfloat16 and float16.

    Example:
        >>> low("bfloat16"), low("float32")
        (True, False)
    """
    return np.dtype(dtype) in eligibility.LOW_PRECISION


def exp_space(problem: Problem) -> bool:
    """Whether the built-in log kernel runs behind the exp-space convolution
    (`jaxconv._src.core.log_products`): ``x + w`` under logsumexp with identity padding.

    Args:
        problem: the canonical problem.

    Returns:
        True for the exp-space route.
    """
    return problem.op.native == "log" and capabilities(problem.op).log_semiring


def low_in_call(problem: Problem) -> bool:
    """Whether a bfloat16 / float16 forward widens its operands and rounds its result inside
    the call (csrc/kernel_bf16fuse_low.h): a built-in kernel (not the exp-space ``log``) or a
    user op's float32 library (its ``run_op`` is the same template's; not a callable reduce's
    fold, csrc/kernel_fold.h), a library that has the entry, and ``JAXCONV_NATIVE_LOW`` not
    ``convert`` (`low_route`).

    Args:
        problem: the canonical problem (its twin already served).

    Returns:
        True for the in-call conversions.
    """
    op = problem.op
    if exp_space(problem) or not ffi.has_low_forward() or low_route() == "convert":
        return False
    if op.native is not None:
        return ffi.kernel_id(op) is not None
    return capabilities(op).reduce != "custom"


def rounded_winners(problem: Problem) -> bool:
    """Whether the wide backward serves a bf16 / f16 max/min op: the built-in kernels, whose
    products it rounds to the operands' dtype before the winner compare.

    Args:
        problem: the canonical problem.

    Returns:
        True where the built-in wide kernels serve it.
    """
    return problem.op.native in ffi.WIDE_KERNELS and winner(problem) and ffi.has_wide_backward()


def rounded_user(problem: Problem) -> user_kernels.Kernel | None:
    """A user max/min op's library for the wide backward on float32 copies of bf16 / f16
    operands (compiled at first use), or ``None`` (a built-in op, or none can be built).

    Args:
        problem: the canonical problem.

    Returns:
        The compiled kernel, or ``None``.
    """
    if problem.op.native is not None or not winner(problem) or not ffi.has_wide_backward():
        return None
    got = user_kernels.user_kernel(problem.op, "float32", wide=True)
    return None if isinstance(got, Refusal) else got

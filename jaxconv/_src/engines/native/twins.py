"""User ops that are a built-in op: run on the built-in's kernels.

A user op whose combine's traced program is exactly one primitive of the two operands (in
either order) and whose canonical reduce is the one a built-in kernel pairs with it computes
the same numbers as that built-in, forward and backward:

- ``x + w`` under ``max`` / ``min`` / ``logsumexp``: ``max_plus`` / ``min_plus`` / ``log``;
- ``min(x, w)`` under ``max``: ``max_min``; ``max(x, w)`` under ``min``: ``min_max``;
- ``x - w`` (in that order) under ``max`` / ``min``, float32: the kernels ``"max_minus"`` /
  ``"min_minus"`` (``csrc/kernel_dense_minus.h``), declared here rather than as public ops:
  the built-in loops with the difference as their combine (its partials 1 and -1), so that
  ``tanh(x - w)`` under a max runs them where the core keeps the difference in the product
  (`factoring.negation_pays`: a dense kernel is not copied negated).

The gradients agree: ``x + w`` has partials 1 and 1 (``x - w``: 1 and -1), and JAX's
derivative of ``min`` / ``max`` splits a tie ``x == w`` equally, as the built-ins' rules do.
The reduce is the canonical one (`capabilities.capabilities`: a callable ``jnp.maximum`` with
identity ``-inf`` is ``"max"``), the combine is recognised from its traced program
(`capabilities.single_primitive`, calls inlined), never from the function's identity or name.
Such an op then takes the built-in's integer-key scan, dominated padding, wide (float64 /
integer) and low-precision kernels, hand-written backward and (dense float32 max / min) the
recording forward, instead of a compiled user kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxconv._src.core import ops as builtin_ops
from jaxconv._src.core import scalar_program as sp
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities, simple_primitive, single_primitive
from jaxconv._src.core.problem import Problem

# (combine primitive, canonical reduce) -> the built-in op with that kernel.
_TWINS = {
    ("add", "max"): builtin_ops.max_plus,
    ("add", "min"): builtin_ops.min_plus,
    ("min", "max"): builtin_ops.max_min,
    ("max", "min"): builtin_ops.min_max,
    ("add", "logsumexp"): builtin_ops.log,
}


def _subtract(x: Any, w: Any) -> Any:
    """``x - w``, the combine of the difference kernels.

    Args:
        x: the input's values.
        w: the kernel's values.

    Returns:
        ``x - w``.
    """
    return x - w


# Canonical reduce -> the kernel of ``x - w`` under it (float32 kernels only: the wide ones
# have none, so float64 / integer / bf16 / f16 operands keep the compiled user kernels).
_DIFFERENCES = {
    "max": Op(_subtract, "max", name="max_minus", native="max_minus", forward_mode=True),
    "min": Op(_subtract, "min", name="min_minus", native="min_minus", forward_mode=True),
}


def difference(program: Any) -> bool:
    """Whether a traced combine is exactly ``x - w``: one live ``sub`` of the first argument
    and the second, in that order, in the program's dtype.

    Args:
      program: a `scalar_program.ScalarProgram` of two arguments.

    Returns:
      True for ``x - w`` (not ``w - x``).

    Example:
      >>> from jaxconv._src.core import scalar_program as sp
      >>> difference(sp.trace(lambda x, w: x - w, "float32", 2))
      True
      >>> difference(sp.trace(lambda x, w: w - x, "float32", 2))
      False
    """
    live = program.live()
    if program.n_args != 2 or len(program.outputs) != 1 or len(live) != 1 \
            or program.outputs[0] != live[0]:
        return False
    node = program.nodes[live[0]]
    return (node.name == "sub" and not node.params and node.dtype == program.dtype
            and tuple(node.args) == (sp.Arg(0), sp.Arg(1)))


@functools.lru_cache(maxsize=512)
def builtin_twin(op: Op, dtype: np.dtype = np.dtype(np.float32)) -> Op | None:
    """The built-in op whose kernels compute `op` (same values and gradients), or ``None``.

    Args:
      op: a user op (``op.native is None``).
      dtype: the operands' dtype (the combine is traced in it).

    Returns:
      The built-in op, with `op`'s name and pad value, or ``None``.

    Example:
      >>> import math
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> fuzzy = jaxconv.Op(jnp.minimum, jnp.maximum, identity=-math.inf, name="fuzzy")
      >>> builtin_twin(fuzzy).native
      'max_min'
      >>> builtin_twin(jaxconv.Op(lambda x, w: x * w, "max")) is None
      True
    """
    if op.native is not None or op.rewrite is not None or op.post is not None:
        return None
    caps = capabilities(op)
    canonical = caps.canonical
    if canonical.identity is not None or caps.temperature is not None:
        return None
    floating = jnp.issubdtype(dtype, jnp.floating)
    try:
        # Scalar programs are traced on floats; an integer combine must also be that one
        # primitive in its own dtype (`simple_primitive`, below).
        program = sp.combine_program(op.combine, np.dtype(dtype if floating else np.float32))
    except sp.Untranslatable:
        return None
    if program.custom_jvp:
        return None  # a custom derivative rule: the user's, not the built-in's
    prim = single_primitive(program)
    twin = _TWINS.get((prim, caps.reduce)) if prim is not None else None
    if twin is None and np.dtype(dtype) == np.float32 and difference(program):
        twin = _DIFFERENCES.get(caps.reduce)
    if twin is None or (not floating and simple_primitive(op.combine, dtype) != prim):
        return None
    if canonical.pad_value is not None and twin.native == "log":
        return None  # the log kernel's exp-space path assumes identity padding
    return twin.replace(name=op.name or twin.name, pad_value=canonical.pad_value)


def served(problem: Problem) -> Problem:
    """`problem` with its op replaced by its `builtin_twin`, when it has one.

    Args:
      problem: the canonical problem.

    Returns:
      The problem the native kernels run.
    """
    op = problem.op
    if op.native is not None:
        return problem
    dtype = problem.dtype if problem.dtype is not None else problem.acc_dtype
    twin = builtin_twin(op, np.dtype(dtype))
    return problem if twin is None else dataclasses.replace(problem, op=twin)

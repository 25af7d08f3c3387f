"""A user op's translation to the native kernels' C++ source, or why it has none.

Translation is cheap and compiles nothing (`codegen.functor`, cached per op); compiling is
`user_kernels.user_kernel`'s, when the engine first lowers the op.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.engines.native import codegen


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why the native engine does not serve an op.

    Attributes:
      reason: the reason, as `explain` prints it.
      compile_failed: whether the op's kernels were translated but could not be compiled.
    """

    reason: str
    compile_failed: bool


@functools.lru_cache(maxsize=256)
def translation(op: Op, dtype: str = "float32", wide: bool = False
                ) -> codegen.Functor | Refusal:
    """A user op's kernel source, or why it has none (translation only: nothing compiled).

    Args:
      op: an op without a built-in kernel.
      dtype: the dtype its kernels compute in: ``"float32"`` (also for bfloat16 / float16
        operands), or the wide kernels' ``"float64"``, ``"int32"``, ``"int64"``.
      wide: float32 on the wide kernels (the winner backward of a max/min op on bfloat16 /
        float16 operands: `codegen.functor`).

    Returns:
      A `codegen.Functor`, or a `Refusal`.

    Example:
      >>> import jaxconv
      >>> translation(jaxconv.Op(lambda x, w: x * w, "sum")).reason
      'it is a multiply-and-add (a standard convolution is faster)'
    """
    if op.native is not None or op.rewrite is not None:
        return Refusal("it is a built-in op or a rewrite", compile_failed=False)
    caps = capabilities(op)
    if caps.reduce == "sum" and caps.separable == "mul" and np.dtype(dtype).kind == "f":
        return Refusal("it is a multiply-and-add (a standard convolution is faster)",
                       compile_failed=False)
    try:
        return codegen.functor(op, dtype, wide)
    except codegen.Untranslatable as e:
        return Refusal(f"it is not translated: {e}", compile_failed=False)



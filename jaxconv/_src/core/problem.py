"""The canonical problem: everything static an engine needs to compute one product.

A `Problem` is hashable (a primitive's parameter, a jit-static value). The layouts are
canonical: `x` is `(N, *spatial, C)`, `w` is `(*window, I, O)` with `C = G * I` and
`O = G * Og` for `G` feature groups, the output `(N, *out_spatial, O)`; a dense product is
the same problem with no spatial dimensions and one tap.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.geometry import Geometry

DEFAULT_MAX_BLOCK_BYTES = 64 * 2**20


@dataclasses.dataclass(frozen=True)
class Problem:
    """A canonical generalized convolution: everything static an engine needs.

    Attributes:
      op: the product.
      geom: the geometry (canonical layouts: `x` is `(N, *spatial, C)`, `w` is
        `(*window, I, O)`, the output `(N, *out_spatial, O)`).
      engine: the engine asked for (`"auto"` or a registered engine's name).
      acc_dtype: the dtype of the output (partial results accumulate in it).
      max_block_bytes: the bound on the bytes of intermediate tiles.
      precision: the `lax` precision of native products (rewrites such as `xnor`, `l2`).
      dtype: the operands' common dtype (`None`: the accumulation dtype).
      options: static, hashable settings that only the engine asked for reads (the Pallas
        engine: its backend per platform); `()`: the engine's defaults.

    Example:
      >>> import numpy as np
      >>> from jaxconv import ops
      >>> g = Geometry((5,), (3,), (1,), ((1, 1),), (1,), (1,), 1)
      >>> Problem(ops.max_plus, g, "auto", np.dtype("float32"), 2**20).with_groups(1) == (
      ...     Problem(ops.max_plus, g, "auto", np.dtype("float32"), 2**20))
      True
    """

    op: Op
    geom: Geometry
    engine: str
    acc_dtype: np.dtype
    max_block_bytes: int
    precision: Any = None
    dtype: np.dtype | None = None
    options: tuple[Any, ...] = ()

    def with_groups(self, groups: int) -> Problem:
        """The same problem with ``groups`` feature groups (a vmapped kernel folds into them).

        Args:
          groups: the new number of feature groups.

        Returns:
          The new problem.
        """
        return dataclasses.replace(self, geom=dataclasses.replace(self.geom, groups=groups))

    @property
    def operand_dtype(self) -> np.dtype:
        """The operands' common dtype (the accumulation dtype when not recorded)."""
        return np.dtype(self.acc_dtype if self.dtype is None else self.dtype)

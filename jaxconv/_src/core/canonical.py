"""The entry of the core: a canonical product, factored, handed to the `conv` primitive.

`canonical_conv` takes operands already in the canonical layout (the front end moved them
there), factors one-operand maps and the monotone tail out of the op
(`jaxconv._src.core.factoring`), builds the `Problem`, checks an engine asked by name, binds
the primitive and applies the factored tail and `op.post`. Importing this module registers
every rule of the primitives (lowering, differentiation, batching).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

# The rules' modules are imported for their registrations.
from jaxconv._src.core import (  # noqa: F401
    algebra,
    batching,
    differentiation,
    factoring,
    lowering,
    planner,
)
from jaxconv._src.core import engine as registry
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import accumulation_dtype
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.primitive import conv
from jaxconv._src.core.problem import DEFAULT_MAX_BLOCK_BYTES, Problem

Array = jax.Array


def _hashable_precision(precision: Any) -> Any:
    """``precision`` as a hashable value (a list becomes a tuple)."""
    if isinstance(precision, list):
        return tuple(precision)
    return precision


def canonical_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    engine: str = "auto",
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
    precision: Any = None,
) -> Array:
    """The generalized convolution of canonical operands, by the engine the planner picks.

    Args:
      x: `(N, *spatial, C)` input.
      w: `(*window, C // groups, O)` kernel.
      geom: the static geometry (padding resolved to pairs).
      op: the product.
      engine: `"auto"` or a registered engine (`"xla"`, `"native"`, `"pallas"`).
      preferred_element_type: accumulation and output dtype, as in `lax`.
      max_block_bytes: bound on the bytes of intermediate tiles (default 64 MiB).
      precision: the `lax` precision of native products.

    Returns:
      `(N, *out_spatial, O)` in the output dtype (`preferred_element_type`, else the
      operands' common dtype), after `op.post`.
    """
    dtype = jnp.result_type(x.dtype, w.dtype)
    x, w = x.astype(dtype), w.astype(dtype)
    out_dtype = dtype if preferred_element_type is None else jnp.dtype(preferred_element_type)
    acc_dtype = jnp.dtype(accumulation_dtype(op, dtype, preferred_element_type))
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    mbb = DEFAULT_MAX_BLOCK_BYTES if max_block_bytes is None else int(max_block_bytes)
    bare = op.replace(post=None)
    form = factoring.factored_form(bare, dtype,
                                   (x.size, w.size, n * math.prod(geom.out_spatial) * o))
    inner = bare if form is None else form.inner
    if form is not None and form.lhs_map is not None:
        x = form.lhs_map(x)
    if form is not None and form.rhs_map is not None:
        w = form.rhs_map(w)
    problem = Problem(inner, geom, engine, acc_dtype, mbb, _hashable_precision(precision),
                      jnp.dtype(dtype))
    if engine not in (registry.AUTO, planner.FALLBACK):
        planner.check_engine(problem, dtype)
    y = conv(x, w, problem)
    if form is not None and form.outer is not None:
        y = _apply_outer(y, form.outer, op, geom)
    if op.post is not None:
        y = op.post(y)
    return y.astype(out_dtype)


def _apply_outer(y: Array, outer: Any, op: Op, geom: Geometry) -> Array:
    """`outer(y)`, keeping the reduce's identity on windows that read no input cell.

    Args:
        y: the reduced output.
        outer: the monotone map applied after the reduce.
        op: the op (its identity and pad value).
        geom: the product's geometry.

    Returns:
        ``outer(y)``, the identity at empty windows.
    """
    out = outer(y)
    empty = geom.empty_windows() if op.pad_value is None else None
    if empty is None:
        return out
    mask = jnp.asarray(empty).reshape(1, *empty.shape, 1)
    return jnp.where(mask, algebra.identity_value(op, y.dtype), out)

"""Which ``max`` / ``min`` / ``clamp`` nodes of a user combine may run as the plain vector
instructions in the fast loop of a max/min reduce.

lax's ``max`` / ``min`` return NaN when either operand is NaN and order ``-0`` below ``+0``;
the vector instructions return their second operand on a NaN and either zero on a ``+-0`` tie
(``csrc/simd.h``: ``maxp`` / ``minp`` cost about eight instructions, ``max`` / ``min`` one).
The kernels' fast loop runs only on finite operands of a NaN-free program, and a max/min
reduce fixes the sign of a zero result from the exact combine (``combx``): so a node may be
relaxed when every path from it to the output goes through operations that carry a NaN
argument to a NaN result and map ``+0`` and ``-0`` to results that differ at most in the sign
of a zero. Then the relaxed product differs from the exact one only in the sign of a zero
(fixed at the end) or where the exact one is NaN; the winner scan compares products with
``==`` against a ``y`` that is NaN wherever a window holds a NaN product, so it matches the
same taps.
"""

from __future__ import annotations

from jaxconv._src.core import scalar_program as sp

# NaN in -> NaN out, and f(+0) == f(-0) up to the sign of a zero result, in every argument.
_TRANSPARENT = frozenset({
    "add", "add_any", "sub", "mul", "neg", "abs", "max", "min", "clamp", "square", "exp",
    "exp2", "expm1", "log", "log1p", "tanh", "logistic", "sqrt", "erf", "sin", "cos",
    "floor", "ceil", "round", "convert_element_type"})
# ... in these arguments only (a division's numerator, a select's two values).
_TRANSPARENT_ARGS = {"div": (0,), "select_n": (1, 2)}
_RELAXABLE = frozenset({"max", "min", "clamp"})


def _passes(node: sp.Node, position: int) -> bool:
    """Whether `node` is transparent (module docstring) in its argument `position`.

    Args:
        node: the consuming node.
        position: the argument's index.

    Returns:
        True if it is.
    """
    if node.name == "integer_pow":
        return int(node.params["y"]) > 0
    if node.name == "convert_element_type" and node.dtype.kind == "b":
        return False  # x != 0: NaN becomes true
    if node.name in _TRANSPARENT:
        return True
    return position in _TRANSPARENT_ARGS.get(node.name, ())


def relaxed_nodes(program: sp.ScalarProgram, output: int = 0) -> frozenset[int]:
    """The ``max`` / ``min`` / ``clamp`` nodes of `program` that the fast loop may relax.

    Args:
      program: a combine's program.
      output: the index of the output the kernels reduce.

    Returns:
      The node indices.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core import scalar_program as sp
      >>> p = sp.trace(lambda x, w: jnp.minimum(x, w) - 0.5 * w, "float32", 2)
      >>> sorted(relaxed_nodes(p)) == [0]
      True
      >>> relaxed_nodes(sp.trace(lambda x, w: 1.0 / jnp.minimum(x, w), "float32", 2))
      frozenset()
    """
    out = program.outputs[output]
    live = program.live_of(out)
    # ok[k]: every use of node k reaches the output through transparent arguments only.
    ok = {k: True for k in live}
    for j in reversed(live):
        node = program.nodes[j]
        for position, r in enumerate(node.args):
            if isinstance(r, (sp.Arg, sp.Const)):
                continue
            ok[int(r)] = ok[int(r)] and ok[j] and _passes(node, position)
    return frozenset(k for k in live if ok[k] and program.nodes[k].name in _RELAXABLE
                     and program.nodes[k].dtype == program.dtype)

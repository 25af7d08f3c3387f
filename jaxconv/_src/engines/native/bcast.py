"""The embedded broadcast for a user combine: its first instruction that reads ``x``.

The forward's register tile reads each input value once per row. The built-ins read it as an
AVX-512 embedded broadcast (``{1to16}``, an operand of the combine's own instruction) instead
of a separate broadcast shared by the row (``csrc/kernel_bcast.h``); a generated user functor
gets the same when its traced combine reads ``x`` exactly once, in a sum, a difference or a
product (``x * w`` under a max, ``clip(x * w)`` once its monotone tail is split off,
``min(x - w, 2 * w)``). The code generator asks for it under a max or min reduce only: under
a sum (``-|x - w|``, ``-(x - w)^2`` as written by hand) the form measured 8-13% slower on
Zen 4 (one thread, under load), the difference moving from the add ports to the FMA ports.
`members` writes what ``csrc/kernel_bcast_user.h`` needs: which
instruction computes that node from ``x`` in memory (``kBcX``), the node's other operand
(``bv(w)``) and the rest of the combine from the node's value (``bpost(t, w)``), so that
``comb(x, w) == bpost(first(x, bv(w)), w)`` bit for bit. Everything is read from the traced
program, never from the function's name.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from jaxconv._src.core import scalar_program as sp

# csrc/kernel_bcast_user.h's UserBcForm.
_ADD_FMA, _ADD, _SUB_XV, _SUB_VX, _MUL = 1, 2, 3, 4, 5
_F32 = np.dtype(np.float32)

SPECIALIZATION = "template <> struct Bc<UserOp> : UserBc<UserOp> {};\n"


def form(program: sp.ScalarProgram, add_ports: bool = False) -> tuple[int, int, sp.Ref] | None:
    """The node of `program`'s first output that reads ``x``, if it has a broadcast form.

    Args:
        program: a float32 combine's program (two arguments).
        add_ports: sums on the add ports (a sum reduce's combine), else on the FMA ports.

    Returns:
        ``(kBcX, node, other operand)``, or ``None`` when ``x`` is read by more than one
        node or more than once, or by an operation without such a form.

    Example:
      >>> import jax.numpy as jnp
      >>> p = sp.combine_program(lambda x, w: jnp.clip(x * w, -1.0, 1.0), np.float32)
      >>> form(p)[0], form(sp.combine_program(lambda x, w: x * jnp.exp(x - w), np.float32))
      (5, None)
    """
    if program.dtype != _F32 or program.n_args != 2 or len(program.outputs) != 1:
        return None
    x = sp.Arg(0)
    readers = [k for k in program.live_of(program.outputs[0])
               if x in program.nodes[k].args]
    if len(readers) != 1 or program.outputs[0] == x:
        return None
    (k,) = readers
    node = program.nodes[k]
    if node.dtype != _F32 or node.args.count(x) != 1 or len(node.args) != 2:
        return None
    other = node.args[1] if node.args[0] == x else node.args[0]
    if node.name in ("add", "add_any"):
        kind = _ADD if add_ports else _ADD_FMA
    elif node.name == "sub":
        kind = _SUB_XV if node.args[0] == x else _SUB_VX
    elif node.name == "mul":
        kind = _MUL
    else:
        return None
    return kind, k, other


def members(program: sp.ScalarProgram, ref: Callable[[sp.Ref], str],
            expr: Callable[[sp.Node, bool, bool], str], relax: frozenset[int] = frozenset(),
            add_ports: bool = False) -> str | None:
    """The functor members of `program`'s broadcast form (``kBcX``, ``bv``, ``bpost``).

    Args:
        program: the combine's program, as the functor's ``comb`` is written from it.
        ref: the code generator's C++ name of a value (a node or an argument).
        expr: the code generator's C++ expression of a float32 node, given whether it is a
            plain vector max / min and whether sums run on the add ports (as ``comb``'s).
        relax: the nodes ``comb`` writes as plain vector max / min (`relaxed.relaxed_nodes`).
        add_ports: sums and differences on the add ports, as ``comb``'s.

    Returns:
        The C++ source of the members, or ``None`` when the combine has no broadcast form.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.engines.native import codegen
      >>> src = members(sp.combine_program(lambda x, w: x * w, np.float32), codegen._ref,
      ...               lambda node, plain, add: codegen._expr(node, np.float32, plain, add))
      >>> "kBcX = 5" in src, "const VT<T> v0 = t;" in src
      (True, True)
    """
    found = form(program, add_ports)
    if found is None:
        return None
    kind, k, other = found
    out = program.outputs[0]
    lines = [f"  static constexpr int kBcX = {kind};",
             "  template <class T> static VT<T> bv(VT<T> w) {", "    (void)w;"]
    for j in sorted(program.live_of(other)):
        lines.append(f"    const VT<T> v{j} = {expr(program.nodes[j], j in relax, add_ports)};")
    lines += [f"    return {ref(other)};", "  }",
              "  template <class T> static VT<T> bpost(VT<T> t, VT<T> w) {", "    (void)w;",
              f"    const VT<T> v{k} = t;", f"    (void)v{k};"]
    # The nodes after the cut at node k (whose value is t).
    needed: set[int] = set()
    stack = [out] if isinstance(out, int) else []
    while stack:
        j = stack.pop()
        if j not in needed and j != k:
            needed.add(j)
            stack.extend(a for a in program.nodes[j].args if isinstance(a, int))
    for j in sorted(needed):
        lines.append(f"    const VT<T> v{j} = {expr(program.nodes[j], j in relax, add_ports)};")
    lines += [f"    return {ref(out)};", "  }"]
    return "\n".join(lines)


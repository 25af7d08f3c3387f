"""The equations of a jaxpr, those of its sub-jaxprs included (calls, custom rules, loops).

Several questions about a user's traced function are a search for one kind of equation
anywhere in its program: does it call a ``custom_vjp`` function, does it apply ``max``
(which a fused reduction may compute without NaN propagation), does it hold any custom
derivative rule. `iter_eqns` answers the walking part once; each question is then a
predicate over the equations it yields.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from jax.extend import core as jex_core


def sub_jaxprs(eqn: Any) -> list[Any]:
    """The open jaxprs among an equation's parameters (also inside tuples and lists).

    Args:
        eqn: a jaxpr equation.

    Returns:
        The jaxprs (a ``ClosedJaxpr`` parameter gives its ``jaxpr``).
    """
    out = []
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jex_core.ClosedJaxpr):
                out.append(item.jaxpr)
            elif isinstance(item, jex_core.Jaxpr):
                out.append(item)
    return out


def iter_eqns(jaxpr: Any, descend: Callable[[Any], bool] | None = None) -> Iterator[Any]:
    """Every equation of ``jaxpr`` in program order, a call's own equations right after it.

    Args:
        jaxpr: a ``Jaxpr`` or ``ClosedJaxpr``.
        descend: whether to walk into an equation's sub-jaxprs (default: always).

    Yields:
        The equations.

    Example:
        >>> import jax
        >>> j = jax.make_jaxpr(lambda a, b: jax.nn.relu(a - b))(1.0, 2.0)
        >>> [e.primitive.name for e in iter_eqns(j)]
        ['sub', 'custom_jvp_call', 'jit', 'max']
    """
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        yield eqn
        if descend is None or descend(eqn):
            for sub in sub_jaxprs(eqn):
                yield from iter_eqns(sub, descend)

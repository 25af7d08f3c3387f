"""`iter_eqns` walks every equation of a program, nested calls, rules and branches included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core.jaxpr_walk import iter_eqns
from jaxconv.quantizers import ste_sign


def _names(fn, descend=None) -> list[str]:
    return [e.primitive.name for e in iter_eqns(jax.make_jaxpr(fn)(1.0, 2.0), descend)]


def test_a_call_is_followed_by_its_own_equations() -> None:
    names = _names(lambda a, b: jax.nn.relu(a - b) * jnp.exp(b))
    assert names == ["sub", "custom_jvp_call", "jit", "max", "exp", "mul"]


def test_branches_in_a_tuple_and_nested_jits_are_walked() -> None:
    def f(a, b):
        inner = jax.jit(lambda u: jnp.tanh(u))
        return lax.cond(a > b, lambda u: inner(u), lambda u: jnp.sin(u), a)

    names = _names(f)
    assert {"gt", "cond", "tanh", "sin"} <= set(names)
    assert names.index("cond") < names.index("tanh")


def test_descend_keeps_a_walk_out_of_chosen_equations() -> None:
    fn = lambda a, b: jax.nn.relu(a) + ste_sign(b)  # noqa: E731
    every = _names(fn)
    outside = _names(fn, descend=lambda e: e.primitive.name != "custom_jvp_call")
    assert "max" in every and "max" not in outside
    assert any(n.startswith("custom_vjp") for n in outside)

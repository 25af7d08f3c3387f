"""Signs of zero for max/min products (XLA CPU's vectorised reductions do not order them).

docs/numerics.md: every max orders ``-0`` below ``+0`` and every min ``+0`` above ``-0``.
XLA CPU's vectorised code does not: its reduction over the input channels returns
whichever zero its lanes meet last (a max of the products ``[+0, -0]`` may come out
``-0``), and inside such a fused reduction ``min(+0, -0)`` may come out ``+0``. Only a zero
result can be wrong, and only where some operand or product is ``-0``: the engine then
recomputes, per output, whether the window holds a zero of the contract's sign (one more
tap pass of 0/1 indicators, in a loop that runs only then; a ``min`` / ``max`` combine's
zero takes its sign from the operands) and signs every zero result by it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.engines.xla.common import Config
from jaxconv._src.engines.xla.forward import _forward

Array = jax.Array

SMALL_BIT = 16  # -0, or a nonzero value an addition can cancel into a flushed zero
NEG_ZERO_BIT = 32  # -0, or a negative denormal (read as -0)


def zero_indicators(a: Array) -> list[Array]:
    """The indicators of `SMALL_BIT` and `NEG_ZERO_BIT` over a floating ``a``.

    A sum ``x + w`` is ``-0`` only from ``-0 + -0`` or when a tiny difference flushes to
    zero; the exact sum is a multiple of the smaller term's unit in the last place, so both
    terms then lie below ``smallest_normal * 2**(nmant + 2)``. A ``+0`` term never makes a
    ``-0`` sum (so ReLU outputs and zero weights do not set the bit).

    Args:
        a: a floating array.

    Returns:
        ``[small, negative zero]``, bool arrays shaped as ``a``.

    Example:
        >>> import jax.numpy as jnp
        >>> [m.tolist() for m in zero_indicators(jnp.array([-0.0, 0.0, 1.0]))]
        [[True, False, False], [True, False, False]]
    """
    fi = jnp.finfo(a.dtype)
    mag = jnp.abs(a)
    small = float(fi.smallest_normal) * 2.0 ** (int(fi.nmant) + 2)
    plus_zero = (a == 0) & ~jnp.signbit(a)
    return [(mag < small) & ~plus_zero, jnp.signbit(a) & (mag < fi.smallest_normal)]


def negative_zero_possible(op: Op, fx: Array, fw: Array, y: Array) -> Array:
    """Whether a zero result of ``y`` may carry the wrong sign: a bool scalar.

    Args:
        op: the canonical max/min op.
        fx: the input's value flags (``nan._value_flags``, with the bits above).
        fw: the kernel's value flags.
        y: the forward's output.

    Returns:
        From the operand flags where the combine is ``x + w``, ``min`` or ``max`` (no pass
        over the output); else whether ``y`` holds a zero that the contract may flip (a
        ``-0`` max, a ``+0`` min).
    """
    kind = capabilities(op).combine

    def has(f: Array, bit: int) -> Array:
        return (f & bit) != 0

    if kind == "add":
        return has(fx, SMALL_BIT) & has(fw, SMALL_BIT)
    if kind in ("min", "max"):  # the product is one of the operands
        return has(fx, NEG_ZERO_BIT) | has(fw, NEG_ZERO_BIT)
    return jnp.any(_suspect(op.reduce, y))


def _suspect(red: str, y: Array) -> Array:
    """Zero results whose sign the window may overrule: ``-0`` of a max, ``+0`` of a min.

    Args:
        red: ``"max"`` or ``"min"``.
        y: the output.

    Returns:
        A bool array shaped as ``y``.
    """
    return (y == 0) & (jnp.signbit(y) == (red == "max"))


@functools.cache
def _indicator_op(op: Op) -> Op:
    """The op whose max over a window is 1 where a product is a zero of the contract's sign
    (``+0`` for a max, ``-0`` for a min), else 0 (``-inf`` for an all-padding window).

    Args:
        op: the canonical max/min op.

    Returns:
        The indicator op (cached, so that its compiled passes are shared).
    """
    want_neg = op.reduce == "min"
    kind = capabilities(op).combine

    def combine(x: Array, w: Array) -> Array:
        c = op.combine(x, w)
        if kind == "min":  # a zero min is -0 where a zero operand is -0
            neg = ((x == 0) & jnp.signbit(x)) | ((w == 0) & jnp.signbit(w))
        elif kind == "max":  # a zero max is +0 where a zero operand is +0
            neg = ~(((x == 0) & ~jnp.signbit(x)) | ((w == 0) & ~jnp.signbit(w)))
        else:
            neg = jnp.signbit(c)
        return ((c == 0) & (neg == want_neg)).astype(c.dtype)

    return Op(combine, "max", pad_value=op.pad_value, name=f"{op.name}_zero_sign")


def fix_zero_signs(cfg: Config, x: Array, w: Array, y: Array, needed: Array) -> Array:
    """``y`` with the sign of each zero result decided as docs/numerics.md says.

    A ``while_loop`` that runs its body once where ``needed`` and else not at all (no
    select over the output on the common path): the body is one tap pass of the indicator
    op over the same windows, padding and blocks as the forward.

    Args:
        cfg: the engine's configuration (a max/min op on floating operands).
        x: the input.
        w: the kernel.
        y: the forward's output ``(N, P, G, Og)``.
        needed: `negative_zero_possible`.

    Returns:
        The output, zeros signed by the contract.
    """
    icfg = dataclasses.replace(cfg, op=_indicator_op(cfg.op))
    seen_zero = jnp.asarray(-0.0 if cfg.op.reduce == "min" else 0.0, y.dtype)

    def body(carry: tuple[Array, Any]) -> tuple[Array, Array]:
        i, out = carry
        # ``* (1 + 0 * i)`` keeps the pass inside the loop (XLA hoists loop-invariant code)
        # and every value, -0 included (an added 0 would turn -0 into +0).
        one = 1 + i.astype(x.dtype) * jnp.asarray(0, x.dtype)
        seen = _forward(icfg, x * one, w * one.astype(w.dtype)) > 0
        return i + 1, jnp.where(out == 0, jnp.where(seen, seen_zero, -seen_zero), out)

    _, y = lax.while_loop(lambda c: (c[0] == 0) & needed, body, (jnp.int32(0), y))
    return y

"""The factored form of an op: what does not need both operands, taken out of the product.

A combine such as ``tanh(x) * w`` or ``ste(x) * ste(w)`` has parts that read one operand
only (maps applied once per element, with their own derivative rules) and a monotone map of
the result that commutes with a max/min reduce. `factored_form` splits them off from the
op's traced scalar program, so that the product left inside is one an engine serves fast (a
built-in reduce of a simpler combine, or one standard lax product), and `per_product_rule`
says why an op whose custom rule reads both operands stays on the per-product path.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxconv._src.core import scalar_program as sp
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities, single_primitive, smoothing_temperature

Array = jax.Array

_DUAL = {"max": "min", "min": "max"}


@dataclasses.dataclass(frozen=True, eq=False)
class ProgramFn:
    """A `ScalarProgram`'s first output as an elementwise function of arrays of one shape
    (hashable by identity: one object per cached program)."""

    program: Any
    name: str

    def __call__(self, *args: Array) -> Array:
        """Evaluates the program on the operands, broadcast to one shape.

        Args:
            *args: the program's arguments.

        Returns:
            Its first output.
        """
        shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
        args = tuple(jnp.broadcast_to(a, shape) for a in args)
        return sp.evaluate(self.program, *args)[0]


@dataclasses.dataclass(frozen=True)
class Tempered:
    """``combine(x, w) / c``: the terms of a logsumexp at temperature ``c`` (hashable, equal
    for the same combine and ``c``)."""

    combine: Callable[[Any, Any], Any]
    c: float

    def __call__(self, x: Array, w: Array) -> Array:
        """The user's combine divided by the temperature (in its own dtype).

        Args:
            x: the input's values.
            w: the kernel's values.

        Returns:
            ``combine(x, w) / c``.
        """
        return self.combine(x, w) / self.c


@dataclasses.dataclass(frozen=True)
class Scale:
    """``y * c``: the output map of a logsumexp at temperature ``c``."""

    c: float

    def __call__(self, y: Array) -> Array:
        """Scales the reduced result back (in its own dtype).

        Args:
            y: the logsumexp of the scaled terms.

        Returns:
            ``c * y``.
        """
        return self.c * y


@dataclasses.dataclass(frozen=True, eq=False)
class FactoredForm:
    """``op`` as ``outer(inner(lhs_map(x), rhs_map(w)))``: see `factored_form`.

    Attributes:
      inner: the op the engines compute.
      outer: the monotone map of the reduced result (a `Scale` for a tempered logsumexp),
        or ``None``.
      lhs_map: the map of the input applied before the product, or ``None``.
      rhs_map: the map of the kernel applied before the product, or ``None``.
      temperature: ``c`` when the op's callable reduce is ``c * logaddexp(a / c, b / c)``
        (`capabilities.smoothing_temperature`), run as ``c`` times the built-in logsumexp of
        ``combine / c``; else ``None``.
      negated: whether a difference of the operands runs as a sum, one operand's map
        negated (`negated_subtrahends`).
    """

    inner: Op
    outer: ProgramFn | Scale | None
    lhs_map: ProgramFn | None
    rhs_map: ProgramFn | None
    temperature: float | None = None
    negated: bool = False

    def describe(self) -> list[str]:
        """One line per factor, for `jaxconv.explain`."""
        lines = []
        if self.negated:
            lines.append("a difference of the operands runs as their sum, one side negated "
                         "once per element (a - b is a + (-b) exactly, in IEEE floats and "
                         "in wrapping integers: the same numbers, the same derivative); a "
                         "product whose negated operand has more elements than its output "
                         "keeps the difference in the product (negation_pays)")
        for what, fn in (("input", self.lhs_map), ("kernel", self.rhs_map)):
            if fn is not None:
                rule = " (with its custom derivative rule)" if fn.program.rules() else ""
                lines.append(f"the map {fn.program.primitives()} of the {what} runs once per "
                             f"element, before the product{rule}")
        if self.temperature is not None:
            c = self.temperature
            kind = "max" if c > 0 else "min"
            lines.append(f"the callable reduce is c * logaddexp(a / c, b / c) with c = {c!r} "
                         f"(a smoothed {kind}, recognised from its traced program): it runs "
                         f"as the built-in 'logsumexp' of combine / {c!r}, the result times "
                         f"{c!r} once per output (the gradient: softmax weights of the terms "
                         f"/ {c!r})")
        elif self.outer is not None:
            lines.append(f"the monotone map {self.outer.program.primitives()} runs once per "
                         f"output, after the {self.inner.reduce}")
        return lines


def factored_form(op: Op, dtype: Any,
                  sizes: tuple[int, int, int] | None = None) -> FactoredForm | None:
    """Moves what does not need to run once per product out of the product.

    - ``max_t f(c_t) = f(max_t c_t)`` for a total monotone ``f`` (``min`` if decreasing):
      when ``op``'s combine ends in a chain of total, monotone unary maps (``tanh``, ``clip``
      by constants, ``exp``, scaling by a constant, ...) and its reduce is ``max`` or ``min``
      with the default identity, the chain runs once per output.
    - ``combine(x, w) = core(u(x), v(w))``: the part of the combine that depends on one
      operand only runs once per element of that operand (``tanh(x) * w``: ``tanh`` of the
      input, then a product of ``*`` under the reduce).
    - ``x - w = x + (-w)`` exactly: under a max, min or logsumexp a difference of the
      operands runs as a sum, ``-w`` (or ``-x``) once per element, so that ``tanh(x - w)``
      under a max runs on the built-in ``x + w`` kernels (`negated_subtrahends`).

    Values are the same (NaN and infinities included: the maps are applied to the same
    numbers). Only a gradient tie can differ for the monotone map: where ``f`` is flat (a
    saturated ``clip``), taps whose products differ but map to one value share the cotangent
    per product, and the largest product takes it here -- with ``f``'s derivative there, zero
    on a flat part.

    Args:
      op: the product.
      dtype: the operands' dtype.
      sizes: the elements of the input, the kernel and the output, when known: the third
        rewrite is then kept only where it pays (`negation_pays`); without them it is kept
        wherever it applies (as `jaxconv.explain`, which has no shapes, describes it).

    Returns:
      A `FactoredForm`, or ``None`` when nothing factors out (or the op declares a native
      kernel or a rewrite).

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> op = jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max")
      >>> form = factored_form(op, jnp.float32)
      >>> form.inner.reduce, float(form.outer(jnp.float32(0.0))), form.lhs_map
      ('max', 0.0, None)
      >>> form.rhs_map.program.primitives(), form.negated
      (('neg',), True)
      >>> factored_form(op, jnp.float32, (256 * 1024, 1024 * 1024, 256 * 1024)).negated
      False
    """
    dtype = np.dtype(dtype)
    form = _factored_form(op, dtype)
    if form is not None and form.negated and sizes is not None \
            and not negation_pays(form, *sizes):
        form = kept_difference_form(op, dtype)
    return form


def kept_difference_form(op: Op, dtype: Any) -> FactoredForm | None:
    """`factored_form` without the third rewrite: a difference of the operands stays in the
    product (what runs where `negation_pays` is false, such as a dense layer's kernel).

    Args:
      op: the product.
      dtype: the operands' dtype.

    Returns:
      A `FactoredForm`, or ``None`` when nothing else factors out.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> form = kept_difference_form(jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max"), jnp.float32)
      >>> form.negated, form.rhs_map
      (False, None)
    """
    return _factored_form(op, np.dtype(dtype), negate=False)


def negation_pays(form: FactoredForm, lhs_size: int, rhs_size: int, out_size: int) -> bool:
    """Whether negating an operand once per element costs less than it saves.

    A map that is the negation alone is one more pass over its operand and a copy of it (a
    longer map fuses the negation into its own pass); the built-in ``x + w`` kernels save a
    few percent of the product. Measured on Zen 4 (one thread): layer A (a 3x3 kernel of 37k
    elements, 524k outputs) 8% less time; a dense 1024 x 1024 kernel with 256 x 1024 outputs
    6% more time and three times the memory, where the compiled difference (with its embedded
    broadcast) is faster. So: only where such operands have at most as many elements as the
    output.

    Args:
      form: a form with ``negated`` set.
      lhs_size: the input's elements.
      rhs_size: the kernel's elements.
      out_size: the output's elements.

    Returns:
      True if the negated form should run.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> form = factored_form(jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max"), jnp.float32)
      >>> negation_pays(form, 8 * 32 * 32 * 64, 9 * 64 * 64, 8 * 32 * 32 * 64)
      True
      >>> negation_pays(form, 256 * 1024, 1024 * 1024, 256 * 1024)
      False
    """
    copied = sum(size for fn, size in ((form.lhs_map, lhs_size), (form.rhs_map, rhs_size))
                 if fn is not None and fn.program.primitives() == ("neg",))
    return copied <= out_size


def per_product_rule(op: Op, dtype: Any) -> str | None:
    """Why a custom derivative rule in ``op``'s combine runs once per product, if it does.

    A ``jax.custom_vjp`` / ``jax.custom_jvp`` function of one operand only (``ste(x)``) is
    factored out by `factored_form`; this says why one is not (it reads both operands, or its
    backward is not linear in the cotangent), for `jaxconv.explain`.

    Args:
      op: the op.
      dtype: the operands' dtype.

    Returns:
      The reason as a sentence, or ``None`` when no rule runs once per product.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxconv
      >>> per_product_rule(jaxconv.Op(lambda x, w: jax.nn.relu(x) * w), jnp.float32) is None
      True
    """
    return _factored(op, np.dtype(dtype))[1]


def linear_rule(node: Any, dtype: np.dtype) -> bool:
    """Whether a custom-rule node's backward is linear in the cotangent (always true of a
    custom JVP, whose tangent rule JAX transposes), checked by transposing it abstractly.

    Args:
        node: a custom-rule node of a `scalar_program.ScalarProgram`.
        dtype: the program's dtype.

    Returns:
        True if the backward is linear in the cotangent.
    """
    if node.name == "custom_jvp_call":
        return True
    # Each distinct non-constant argument becomes one argument of a one-node program.
    variables = list(dict.fromkeys(a for a in node.args if not isinstance(a, sp.Const)))
    if not variables:
        return False
    single = sp.ScalarProgram((dataclasses.replace(node, args=tuple(
        a if isinstance(a, sp.Const) else sp.Arg(variables.index(a)) for a in node.args)),),
        (0,), len(variables), dtype, False)

    def fn(*v: Array) -> Array:
        return sp.evaluate(single, *v)[0]

    s = jax.ShapeDtypeStruct((), dtype)
    xs = [s] * len(variables)
    try:
        jax.eval_shape(lambda g, *x: jax.linear_transpose(
            lambda c: jax.vjp(fn, *x)[1](c), g)(tuple(x)), s, *xs)
    except Exception:  # noqa: BLE001 - a rule JAX cannot transpose is not linear
        return False
    return True


def _factored_form(op: Op, dtype: np.dtype, negate: bool = True) -> FactoredForm | None:
    """The `FactoredForm` of `_factored` (cached there)."""
    return _factored(op, dtype, negate)[0]


@functools.lru_cache(maxsize=512)
def _factored(op: Op, dtype: np.dtype,
              negate: bool = True) -> tuple[FactoredForm | None, str | None]:
    """Factors one-operand maps and a monotone tail out of ``op``'s combine, once per dtype.

    Args:
        op: the op.
        dtype: the operands' dtype.
        negate: allow a difference to run as a sum (`_operand_split`).

    Returns:
        ``(form, None)`` when the op factors, ``(None, reason)`` when a custom rule keeps it
        from the native engine, else ``(None, None)``.
    """
    if op.rewrite is not None or op.native is not None:
        return None, None
    caps = capabilities(op)
    if caps.temperature is not None:
        return _tempered(op, caps.temperature, dtype)
    canonical = caps.canonical
    try:
        # Custom-rule calls stay whole: one of a single operand is moved out with its rule.
        program = sp.rules_program(op.combine, dtype)
    except sp.Untranslatable:
        return None, None
    rules = program.rules()
    name = op.name or "user op"
    reduce, outer = canonical.reduce, None
    split = None
    if caps.reduce in _DUAL and canonical.identity is None:
        split = sp.monotone_split(program)
    if split is not None:
        program = split.inner
        outer = ProgramFn(split.outer, f"{name} (outer)")
        reduce = caps.reduce if split.direction > 0 else _DUAL[caps.reduce]
    operands, negated = _operand_split(program, reduce, negate)
    if operands is not None and rules:
        side_rules = [p.nodes[k] for p in (operands.lhs, operands.rhs) if p is not None
                      for k in p.rules()]
        if not all(linear_rule(n, dtype) for n in side_rules):
            return None, ("its combine calls a custom-VJP function whose backward is not "
                          "linear in the cotangent, so its rule runs once per product (on the "
                          "XLA engine's generic path, slow)")
    lhs_map = rhs_map = None
    pad_value = canonical.pad_value
    if operands is not None:
        if operands.lhs is not None:
            lhs_map = ProgramFn(operands.lhs, f"{name} (input map)")
            if pad_value is not None:
                with jax.ensure_compile_time_eval():
                    pad_value = float(lhs_map(jnp.asarray(pad_value, dtype)))
        if pad_value is None or math.isfinite(pad_value):
            program = operands.core
            rhs_map = None if operands.rhs is None else ProgramFn(operands.rhs,
                                                                   f"{name} (kernel map)")
        else:
            lhs_map, pad_value = None, canonical.pad_value
    if rules and (program.rules() or lhs_map is None and rhs_map is None):
        # A rule on a value of both operands: the combine runs whole, once per product.
        return None, ("its combine calls a function with a custom derivative rule "
                      "(custom_vjp / custom_jvp) on a value that depends on both operands, so "
                      "the rule runs once per product (see the engine's line below); a rule of one "
                      "operand only, as in ste(x) * ste(w), is factored out")
    if outer is None and lhs_map is None and rhs_map is None:
        return None, None
    # What is left a multiply-and-add (ste(x) * ste(w), tanh(x) * w): one standard product,
    # as op="xnor" runs, its gradient lax's own.
    standard = reduce == "sum" and canonical.identity is None \
        and single_primitive(program) == "mul"
    inner = Op(ProgramFn(program, f"{name} (inner)"), reduce, identity=canonical.identity,
               pad_value=pad_value, name=f"{name} (inner)", forward_mode=op.forward_mode,
               rewrite=_standard_product if standard else None)
    return FactoredForm(inner, outer, lhs_map, rhs_map, negated=negated), None


def _operand_split(program: Any, reduce: Any, negate: bool = True) -> tuple[Any, bool]:
    """`scalar_program.operand_split`, a difference of the operands taken as a sum first when
    that leaves the built-in kernels' ``x + w`` inside a max, min or logsumexp.

    ``x - w`` is ``x + (-w)`` exactly (`negated_subtrahends`), so ``tanh(x -
    w)`` under a max runs as the kernel map ``-w`` (once per element) and ``max_plus``
    instead of a compiled kernel of ``x - w``. Under a sum (no such built-in) and where the
    negation would stay inside the product, the program is split as written.

    Args:
        program: the combine's program (its monotone tail already split off).
        reduce: the reduce the product left inside runs.
        negate: allow the difference to run as a sum.

    Returns:
        The `scalar_program.OperandSplit` (or ``None``), and whether a difference was negated.
    """
    split = sp.operand_split(program)
    if not negate or reduce not in ("max", "min", "logsumexp"):
        return split, False
    summed = negated_subtrahends(program)
    if summed is None:
        return split, False
    alt = sp.operand_split(summed)
    if alt is None or single_primitive(alt.core) != "add":
        return split, False
    return alt, True


def negated_subtrahends(program: Any) -> Any:
    """``program`` with each difference of the two operands' parts written as a sum.

    A ``sub(a, b)`` node whose ``a`` depends on one argument only and ``b`` on the other only
    becomes ``add(a, neg(b))``: the same number in IEEE arithmetic (``a - b`` is defined as
    ``a + (-b)``; ``neg`` is exact: infinities, NaN-ness and signed zeros agree, and integers
    wrap alike), and JAX's derivative is the same (``1`` and ``-1``). `neg(b)` is then a
    value of one operand, which `operand_split` moves out of the product: ``tanh(x - w)``
    under a max becomes ``x + w'`` with ``w' = -w`` (the built-in ``max_plus``'s combine).

    Args:
      program: a traced program of two arguments.

    Returns:
      The rewritten program, or ``None`` when no difference of that kind is live.

    Example:
      >>> from jaxconv._src.core import scalar_program as sp
      >>> p = negated_subtrahends(sp.trace(lambda x, w: x - w, "float32", 2))
      >>> p.primitives(), sp.operand_split(p).rhs.primitives()
      (('add', 'neg'), ('neg',))
    """
    if program.n_args != 2 or program.custom_jvp:
        return None
    live = set(program.live())
    deps: dict[int, frozenset[int]] = {}

    def deps_of(r: Any) -> frozenset[int]:
        if isinstance(r, sp.Arg):
            return frozenset((r.index,))
        return deps[r] if isinstance(r, int) else frozenset()

    nodes: list[Any] = []
    remap: dict[int, int] = {}
    changed = False
    for k, node in enumerate(program.nodes):
        args = tuple(remap[a] if isinstance(a, int) else a for a in node.args)
        deps[k] = frozenset().union(*(deps_of(a) for a in node.args))
        if (k in live and node.name == "sub" and not node.params and node.dtype == program.dtype
                and len(deps_of(node.args[0])) == 1 and len(deps_of(node.args[1])) == 1
                and deps_of(node.args[0]) != deps_of(node.args[1])):
            nodes.append(sp.Node(jax.lax.neg_p, {}, (args[1],), node.dtype))
            node = sp.Node(jax.lax.add_p, {}, (args[0], len(nodes) - 1), node.dtype)
            changed = True
        else:
            node = dataclasses.replace(node, args=args)
        nodes.append(node)
        remap[k] = len(nodes) - 1
    if not changed:
        return None
    outputs = tuple(remap[r] if isinstance(r, int) else r for r in program.outputs)
    return dataclasses.replace(program, nodes=tuple(nodes), outputs=outputs)


def _tempered(op: Op, c: float, dtype: np.dtype) -> tuple[FactoredForm, str | None]:
    """``op`` (a callable reduce ``c * logaddexp(a / c, b / c)``) as ``c`` times the built-in
    logsumexp of ``combine / c``, the terms' one-operand maps factored out as for any op.

    Empty windows: the inner logsumexp gives ``-inf``, scaled to ``-inf * c``, the op's own
    identity (``-inf`` for ``c > 0``, ``+inf`` for ``c < 0``).

    Args:
        op: the op.
        c: its temperature.
        dtype: the operands' dtype.

    Returns:
        ``(form, reason)`` as `_factored`.
    """
    if dtype == np.float64:
        # The literal in the operands' dtype (float32's 0.1 is not float64's).
        c = smoothing_temperature(op.reduce, dtype) or c
    name = op.name or "user op"
    scaled = Op(Tempered(op.combine, c), "logsumexp", pad_value=op.pad_value,
                name=f"{name} (logsumexp at temperature {c!r})", forward_mode=op.forward_mode)
    form, why = _factored(scaled, dtype)
    if form is None:
        return FactoredForm(scaled, Scale(c), None, None, c), why
    return FactoredForm(form.inner, Scale(c), form.lhs_map, form.rhs_map, c, form.negated), why


def _standard_product(product: Callable[..., Array], lhs: Array, rhs: Array) -> Array:
    """The rewrite of a factored multiply-and-add: the standard product of the mapped
    operands, in full float32 precision on every platform (as the generic engine's)."""
    return product(lhs, rhs, precision=jax.lax.Precision.HIGHEST)

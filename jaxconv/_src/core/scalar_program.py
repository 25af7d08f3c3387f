"""An op's scalar functions as a flat program of elementwise primitives.

A user's ``combine(x, w)`` (and its partial derivatives, from ``jax.grad``) is traced once on
scalars of the call's dtype into a jaxpr, whose calls (``jit``, ``custom_jvp_call``, ...) are
inlined and whose constant subexpressions are folded. The result, a `ScalarProgram`, is what
the native engine's code generator translates to C++, and what the planner analyses:

- `monotone_split`: ``combine = f(inner(x, w))`` with ``f`` a chain of total, monotone unary
  maps (``tanh``, ``clip`` with constants, ``exp``, ``x * 2``, ...). Under a max or min,
  ``max_t f(c_t) = f(max_t c_t)`` (``min`` for a decreasing ``f``), so ``f`` runs once per
  output instead of once per product.
- `nan_free`: whether finite inputs can make a NaN (the kernels' fast max/min loop assumes
  they cannot).

Nothing here runs the user's function on values: tracing is abstract, and constants are
folded with the primitives themselves.
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

Array = jax.Array


class Untranslatable(ValueError):
    """A scalar function that has no flat program (the reason is the message)."""


@dataclasses.dataclass(frozen=True)
class Const:
    """A scalar constant of the program."""

    value: float | bool | int  # an int for an integer dtype
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class Arg:
    """The program's ``index``-th argument."""

    index: int


Ref = Const | Arg | int  # an int is the index of a node


@dataclasses.dataclass(frozen=True, eq=False)
class Node:
    """One elementwise primitive applied to earlier values."""

    primitive: Any
    params: dict[str, Any]
    args: tuple[Ref, ...]
    dtype: np.dtype

    @property
    def name(self) -> str:
        """The primitive's name (``"mul"``, ``"tanh"``, ...)."""
        return self.primitive.name

    @property
    def rule(self) -> bool:
        """Whether the node calls a function with a custom derivative rule (kept whole)."""
        return self.name in RULE_CALLS


@dataclasses.dataclass(frozen=True, eq=False)
class ScalarProgram:
    """A flat program: `nodes` in order, the values of `outputs`, `n_args` arguments.

    Attributes:
      nodes: the primitives, each reading arguments, constants or earlier nodes.
      outputs: the program's results.
      n_args: how many scalar arguments it takes.
      dtype: the arguments' dtype.
      custom_jvp: whether a ``custom_jvp`` function was inlined (its rule is then not part of
        the program: only its primal computation is).
    """

    nodes: tuple[Node, ...]
    outputs: tuple[Ref, ...]
    n_args: int
    dtype: np.dtype
    custom_jvp: bool

    def rules(self) -> list[int]:
        """The live nodes that call a function with a custom derivative rule."""
        return [k for k in self.live() if self.nodes[k].rule]

    def primitives(self) -> tuple[str, ...]:
        """The names of the primitives the live part of the program uses, sorted."""
        return tuple(sorted({self.nodes[k].name for k in self.live()}))

    def live(self) -> list[int]:
        """The nodes the outputs depend on, in order."""
        return self.live_of(*self.outputs)

    def live_of(self, *refs: Ref) -> list[int]:
        """The nodes `refs` depend on, in order.

        Args:
            *refs: references into the program (node indices, arguments or constants).

        Returns:
            The indices of the nodes they read, directly or not, ascending.
        """
        seen: set[int] = set()
        stack = [r for r in refs if isinstance(r, int)]
        while stack:
            k = stack.pop()
            if k in seen:
                continue
            seen.add(k)
            stack.extend(a for a in self.nodes[k].args if isinstance(a, int))
        return sorted(seen)


# Primitives that call another jaxpr: inlined.
_CALLS = {"jit": "jaxpr", "pjit": "jaxpr", "closed_call": "call_jaxpr",
          "core_call": "call_jaxpr", "remat": "jaxpr", "checkpoint": "jaxpr",
          "custom_jvp_call": "call_jaxpr"}
# Calls of functions with custom derivative rules: kept whole (``keep_rules``) or refused /
# inlined.
RULE_CALLS = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"})
# Primitives that are the identity on scalars.
_PASS = ("broadcast_in_dim", "reshape", "squeeze", "copy", "copy_p", "expand_dims")
# Reductions that are the identity when they reduce no axis: `jax.grad` emits one for each
# argument when traced inside `jax.shard_map` (the translation must not depend on where an
# op is first used: its result is cached per op).
_NO_AXES = ("reduce_sum", "reduce_max", "reduce_min", "reduce_prod")
ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "neg", "abs", "sign", "max", "min", "exp", "exp2", "log",
    "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt", "cbrt", "pow", "integer_pow",
    "square", "floor", "ceil", "round", "eq", "ne", "lt", "le", "gt", "ge", "select_n",
    "clamp", "convert_element_type", "and", "or", "not", "xor", "is_finite",
    "sin", "cos", "tan", "atan", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "erf",
    "erfc", "rem", "nextafter", "add_any",
})
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(jnp.bfloat16),
           np.dtype(np.float16))


# Primitives that give the same number on small integers held in a float dtype as on the
# integers themselves: an integer value made of Python int literals (``jnp.where(c, 1, 0)`` in
# a rule's backward) is held in the arguments' float dtype, as the literal would be there.
_INT_AS_FLOAT = frozenset({"select_n", "max", "min", "neg", "abs", "sign", "add", "sub",
                           "mul", "clamp", "convert_element_type", "eq", "ne", "lt", "le",
                           "gt", "ge"})


def _scalar_dtype(aval: Any, what: str, as_float: np.dtype | None = None,
                  own: np.dtype | None = None) -> np.dtype:
    """The dtype of a scalar value of a traced program.

    Args:
        aval: the value's abstract value.
        what: what the value is, for the message.
        as_float: the float dtype an integer value made of int literals is held in, if any.
        own: the arguments' dtype: an integer one is translated too (a program on integers).

    Returns:
        Its dtype.

    Raises:
        Untranslatable: not a scalar, or neither a float nor a bool.
    """
    shape = getattr(aval, "shape", None)
    dtype = np.dtype(getattr(aval, "dtype", np.float32))
    if shape != ():
        raise Untranslatable(f"{what} is not a scalar (shape {shape})")
    if dtype.kind in "iu" and as_float is not None:
        return as_float
    if dtype.kind in "iu" and dtype == own:
        return dtype
    if dtype != np.dtype(bool) and dtype not in _FLOATS:
        raise Untranslatable(f"{what} has dtype {dtype.name} (only floats and bools are "
                             "translated)")
    return dtype


class _Builder:
    def __init__(self, arg_dtype: np.dtype, keep_rules: bool = False,
                 primal: bool = False) -> None:
        """An empty program.

        Args:
            arg_dtype: the arguments' dtype.
            keep_rules: keep calls of custom-rule functions as one node (else inline them).
            primal: inline a custom VJP's primal function (else refuse it).
        """
        self.arg_dtype = arg_dtype
        self.keep_rules = keep_rules
        self.primal = primal
        self.nodes: list[Node] = []
        self.custom_jvp = False

    def const(self, value: Any, what: str) -> Const:
        """A scalar constant of the program.

        Args:
            value: the constant's value.
            what: where it comes from, for the message.

        Returns:
            The constant.

        Raises:
            Untranslatable: a non-scalar or untranslatable constant.
        """
        arr = np.asarray(value)
        if arr.shape != ():
            raise Untranslatable(f"{what} captures a non-scalar constant of shape {arr.shape}")
        if arr.dtype.kind in "iu" and self.arg_dtype in _FLOATS and arr.shape == ():
            held = float(np.asarray(arr).astype(self.arg_dtype))
            if held == int(arr):  # an int literal exact in the arguments' dtype: held there
                return Const(held, self.arg_dtype)
        dtype = _scalar_dtype(arr, what, own=self.arg_dtype)
        if dtype.kind in "iu":  # exact, even beyond 2^53
            return Const(int(arr), dtype)
        return Const(bool(arr) if dtype == np.dtype(bool) else float(arr), dtype)

    def inline(self, closed: Any, args: list[Ref]) -> list[Ref]:
        """Appends the equations of a jaxpr, called on ``args``, to the program.

        Calls (``pjit``, custom rules unless kept) are inlined recursively.

        Args:
            closed: a jaxpr or closed jaxpr.
            args: the references its inputs stand for.

        Returns:
            The references of its outputs.

        Raises:
            Untranslatable: an equation the program cannot hold.
        """
        jaxpr = getattr(closed, "jaxpr", closed)
        consts = list(getattr(closed, "consts", ()))
        env: dict[Any, Ref] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = self.const(c, "the function")
        for v, a in zip(jaxpr.invars, args, strict=True):
            env[v] = a

        def read(v: Any) -> Ref:
            if hasattr(v, "val"):  # a literal
                return self.const(v.val, "the function")
            return env[v]

        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            ins = [read(v) for v in eqn.invars]
            if self.keep_rules and name in RULE_CALLS:
                outs = [self.rule(eqn, ins)]
            elif name in _CALLS:
                if name == "custom_jvp_call":
                    self.custom_jvp = True
                outs = self.inline(eqn.params[_CALLS[name]], ins)
            elif name.startswith("custom_vjp") and self.primal:
                outs = self.inline(eqn.params["call_jaxpr"], ins)
            elif name.startswith("custom_vjp"):
                raise Untranslatable("it calls a function with a custom VJP (such as a "
                                     "straight-through estimator)")
            elif name in _PASS or (name in _NO_AXES and not eqn.params.get("axes")):
                outs = ins[:1]
            elif name in ELEMENTWISE:
                outs = [self.add(eqn, ins)]
            else:
                raise Untranslatable(f"primitive {name!r} is not translated")
            for v, r in zip(eqn.outvars, outs, strict=True):
                if type(v).__name__ != "DropVar":
                    env[v] = r
        return [read(v) for v in jaxpr.outvars]

    def rule(self, eqn: Any, ins: list[Ref]) -> int:
        """A call of a function with a custom derivative rule, as one opaque node.

        Args:
            eqn: the equation of the call.
            ins: the references of its inputs.

        Returns:
            The node's index.

        Raises:
            Untranslatable: the function returns several values or a non-scalar.
        """
        if len(eqn.outvars) != 1:
            raise Untranslatable("it calls a function with a custom derivative rule that "
                                 "returns several values")
        dtype = _scalar_dtype(eqn.outvars[0].aval, "the result of a custom-rule function",
                              own=self.arg_dtype)
        return self._node(eqn, ins, dtype)

    def add(self, eqn: Any, ins: list[Ref]) -> Ref:
        """One primitive equation: a node, or a folded constant if all its inputs are constants.

        Args:
            eqn: the equation.
            ins: the references of its inputs.

        Returns:
            The reference of its output.
        """
        (out,) = eqn.outvars
        name = eqn.primitive.name
        if all(isinstance(a, Const) for a in ins):
            vals = [np.asarray(a.value, a.dtype) for a in ins]
            with jax.ensure_compile_time_eval():  # concrete even inside a caller's jit
                folded = np.asarray(eqn.primitive.bind(*vals, **eqn.params))
            return self.const(folded, f"the constant {name!r}")
        params = dict(eqn.params)
        as_float = None
        # An integer value made of int literals (held in the arguments' float dtype, see
        # _INT_AS_FLOAT), or a bool converted to an integer; a float converted to an integer
        # truncates: refused.
        if (np.dtype(getattr(out.aval, "dtype", np.float32)).kind in "iu"
                and self.arg_dtype in _FLOATS and name in _INT_AS_FLOAT
                and (name != "convert_element_type"
                     or self.dtype_of(ins[0]) == np.dtype(bool))):
            as_float = self.arg_dtype
            if name == "convert_element_type":
                params["new_dtype"] = self.arg_dtype
        dtype = _scalar_dtype(out.aval, f"the result of {name!r}", as_float, self.arg_dtype)
        if name == "convert_element_type" and self.dtype_of(ins[0]) == dtype:
            return ins[0]
        return self._node(eqn, ins, dtype, params)

    def dtype_of(self, r: Ref) -> np.dtype | None:
        """The dtype of a reference (a constant, a node or an argument).

        Args:
            r: the reference.

        Returns:
            Its dtype.
        """
        if isinstance(r, Const):
            return r.dtype
        if isinstance(r, int):
            return self.nodes[r].dtype
        return self.arg_dtype

    def _node(self, eqn: Any, ins: list[Ref], dtype: np.dtype,
              params: dict[str, Any] | None = None) -> int:
        """Appends a node for ``eqn`` on ``ins`` of ``dtype`` (with ``params`` if given, else
        the equation's); returns its index."""
        params = dict(eqn.params) if params is None else params
        self.nodes.append(Node(eqn.primitive, params, tuple(ins), dtype))
        return len(self.nodes) - 1


def trace(fn: Callable[..., Any], dtype: Any, n_args: int,
          keep_rules: bool = False, primal: bool = False) -> ScalarProgram:
    """The flat program of ``fn`` on ``n_args`` scalars of ``dtype``.

    Args:
      fn: a scalar function written with ``jax.numpy`` / ``lax``.
      dtype: the arguments' dtype.
      n_args: the number of arguments.
      keep_rules: keep each call of a ``jax.custom_vjp`` / ``jax.custom_jvp`` function as
        one node (`Node.rule`) that `evaluate` calls with its rule, instead of refusing a
        custom VJP and inlining a custom JVP's primal.
      primal: inline a ``jax.custom_vjp`` function's primal (its forward's values: the
        program computes the primal only, its derivative is not the rule's).

    Returns:
      A `ScalarProgram` (its ``outputs`` are ``fn``'s results, flattened).

    Raises:
      Untranslatable: when ``fn`` cannot be traced on scalars or uses something that is not
        an elementwise primitive on scalars (the message says what).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core import scalar_program
      >>> p = scalar_program.trace(lambda x, w: jnp.tanh(x - w), "float32", 2)
      >>> p.primitives()
      ('sub', 'tanh')
    """
    dtype = np.dtype(dtype)
    s = jax.ShapeDtypeStruct((), dtype)
    try:
        # Outside any mesh in context: under an explicit-axes mesh `jax.grad` would put
        # `reshard`s of its scalar cotangents in the program (and a refusal is cached).
        with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
            closed = jax.make_jaxpr(fn)(*([s] * n_args))
    except Exception as e:  # noqa: BLE001 - any tracing failure means "not translatable"
        raise Untranslatable(f"it cannot be traced on scalars ({type(e).__name__}: {e})") \
            from None
    b = _Builder(dtype, keep_rules, primal)
    outs = b.inline(closed, [Arg(i) for i in range(n_args)])
    return ScalarProgram(tuple(b.nodes), tuple(outs), n_args, dtype, b.custom_jvp)


@functools.lru_cache(maxsize=512)
def combine_program(combine: Callable[..., Any], dtype: Any) -> ScalarProgram:
    """`trace` of ``combine(x, w)``, once per function and dtype (cached).

    Args:
        combine: the combine.
        dtype: the operands' dtype.

    Returns:
        The program.
    """
    return trace(combine, dtype, 2)


@functools.lru_cache(maxsize=512)
def primal_program(combine: Callable[..., Any], dtype: Any) -> ScalarProgram:
    """`trace` of ``combine(x, w)``'s primal values, custom-VJP functions inlined (cached):
    for questions about the forward's roundings, never for derivatives.

    Args:
        combine: the combine.
        dtype: the operands' dtype.

    Returns:
        The program.
    """
    return trace(combine, dtype, 2, primal=True)


@functools.lru_cache(maxsize=512)
def rules_program(combine: Callable[..., Any], dtype: Any) -> ScalarProgram:
    """`trace` of ``combine(x, w)`` keeping its custom-rule calls whole (cached).

    Args:
        combine: the combine.
        dtype: the operands' dtype.

    Returns:
        The program.
    """
    return trace(combine, dtype, 2, keep_rules=True)


@functools.lru_cache(maxsize=512)
def partials_program(combine: Callable[..., Any], dtype: Any) -> ScalarProgram:
    """The program of ``(d combine / dx, d combine / dw)`` from ``jax.grad`` (cached).

    Args:
        combine: the combine.
        dtype: the operands' dtype.

    Returns:
        The program, with two outputs.
    """
    return trace(jax.grad(combine, argnums=(0, 1)), dtype, 2)


def evaluate(program: ScalarProgram, *args: Array) -> list[Array]:
    """Runs `program` elementwise on arrays of one shape (the primitives themselves).

    Args:
      program: the program.
      *args: its arguments, arrays of one shape.

    Returns:
      Its outputs, arrays of that shape.

    The program's literals and conversions in its own dtype take the arguments' dtype (a
    ``-1.0`` traced for float64 arguments is a float64 constant, and a float32 one when the
    program runs on float32 arrays), as a Python literal in the user's function would.

    A custom-rule node (`Node.rule`) is the user's function traced on scalars, with its rule:
    on arrays the program is mapped over their elements (``jax.vmap``), so that the rule
    applies element by element, exactly as on scalars.
    """
    shape = jnp.shape(args[0])
    if shape != () and any(node.rule for node in program.nodes):
        flat = [jnp.ravel(a) for a in args]
        outs = jax.vmap(lambda *s: evaluate(program, *s))(*flat)
        return [o.reshape(shape) for o in outs]
    own = np.dtype(args[0].dtype) if args else program.dtype
    vals: list[Array] = []

    def dtype_of(dtype: np.dtype) -> np.dtype:
        return own if dtype == program.dtype else dtype

    def read(r: Ref) -> Array:
        if isinstance(r, Const):  # typed like the first argument (its varying mesh axes)
            return jnp.full_like(args[0], r.value, dtype=dtype_of(r.dtype), shape=shape)
        if isinstance(r, Arg):
            return args[r.index]
        return vals[r]

    for node in program.nodes:
        params = node.params
        if node.name == "convert_element_type" and own != program.dtype:
            params = {**params, "new_dtype": dtype_of(np.dtype(params["new_dtype"]))}
        ins = [read(a) for a in node.args]
        if node.rule:
            vals.append(node.primitive.bind(*ins, **node.primitive.get_bind_params(params))[0])
        else:
            vals.append(node.primitive.bind(*ins, **params))
    return [read(r) for r in program.outputs]


# --- analyses ---------------------------------------------------------------------------------

def _finite_const(r: Ref) -> bool:
    """Whether ``r`` is a finite float constant."""
    return isinstance(r, Const) and isinstance(r.value, float) and math.isfinite(r.value)


def _direction(node: Node, var: int) -> int | None:
    """+1 / -1 when `node`, as a function of its argument `var` (the others constant), is a
    total non-decreasing / non-increasing map (never NaN from a non-NaN input); else None.

    Args:
        node: a node of a program.
        var: the index of the argument varied.

    Returns:
        +1, -1 or ``None``.
    """
    name, args = node.name, node.args
    others = [a for i, a in enumerate(args) if i != var]
    if name in ("tanh", "logistic", "exp", "exp2", "expm1", "atan", "erf", "asinh", "cbrt",
                "floor", "ceil", "round", "sign", "sinh"):
        return 1
    if name == "neg":
        return -1
    if name == "integer_pow":
        y = node.params["y"]
        return 1 if y > 0 and y % 2 == 1 else None
    if not all(isinstance(a, Const) and not (isinstance(a.value, float) and math.isnan(a.value))
               for a in others):
        return None
    if name in ("max", "min"):
        return 1
    if name == "clamp":
        return 1 if var == 1 else None
    if not all(_finite_const(a) for a in others):
        return None
    if name == "add":
        return 1
    if name == "sub":
        return 1 if var == 0 else -1
    if name in ("mul", "div"):
        if name == "div" and var != 0:
            return None
        c = others[0].value
        return None if c == 0 else (1 if c > 0 else -1)
    return None


@dataclasses.dataclass(frozen=True, eq=False)
class MonotoneSplit:
    """``program = outer(inner(x, w))``, `outer` a monotone chain (see `monotone_split`).

    Attributes:
      inner: the program of ``inner(x, w)``.
      outer: the program of ``outer(c)`` (one argument).
      direction: ``+1`` (non-decreasing ``outer``) or ``-1`` (non-increasing).
    """

    inner: ScalarProgram
    outer: ScalarProgram
    direction: int


def monotone_split(program: ScalarProgram) -> MonotoneSplit | None:
    """Splits off the longest total, monotone unary tail of a one-output program.

    A tail step is a node whose only non-constant argument is the previous value, used by
    nothing else. ``None`` when there is no such tail, when nothing would be left inside, or
    when a ``custom_jvp`` function was inlined (its rule would be lost on the JAX side).

    Args:
      program: a traced program with one output.

    Returns:
      The split (inner program, monotone outer tail, its direction), or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core import scalar_program as sp
      >>> s = sp.monotone_split(sp.trace(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "float32", 2))
      >>> s.inner.primitives(), s.outer.primitives(), s.direction
      (('mul',), ('max', 'min'), 1)
    """
    if len(program.outputs) != 1 or program.custom_jvp:
        return None
    uses: dict[int, int] = {}
    for k in program.live():
        for a in program.nodes[k].args:
            if isinstance(a, int):
                uses[a] = uses.get(a, 0) + 1
    chain: list[tuple[int, int]] = []  # (node, position of the variable argument), outermost 1st
    direction = 1
    r = program.outputs[0]
    while isinstance(r, int):
        node = program.nodes[r]
        variables = [i for i, a in enumerate(node.args) if not isinstance(a, Const)]
        if len(variables) != 1 or node.dtype != program.dtype:
            break
        var = variables[0]
        d = _direction(node, var)
        inner_ref = node.args[var]
        if d is None or not isinstance(inner_ref, int) or uses.get(inner_ref, 0) != 1:
            break
        if program.nodes[inner_ref].dtype != program.dtype:
            break
        chain.append((r, var))
        direction *= d
        r = inner_ref
    if not chain:
        return None
    inner = dataclasses.replace(program, outputs=(r,))
    outer_nodes: list[Node] = []
    prev: Ref = Arg(0)
    for k, var in reversed(chain):
        node = program.nodes[k]
        args = tuple(prev if i == var else a for i, a in enumerate(node.args))
        outer_nodes.append(dataclasses.replace(node, args=args))
        prev = len(outer_nodes) - 1
    outer = ScalarProgram(tuple(outer_nodes), (prev,), 1, program.dtype, False)
    return MonotoneSplit(inner, outer, direction)


_BOUNDED = ("tanh", "logistic", "atan", "erf", "erfc", "sign", "is_finite")
_GROWING = ("exp", "exp2", "expm1", "sinh", "cosh", "square", "integer_pow")
_KEEPS = ("neg", "abs", "floor", "ceil", "round", "max", "min", "clamp", "select_n")


def nan_free(program: ScalarProgram) -> bool:
    """Whether finite arguments can never make a NaN output (a conservative analysis).

    Each value is finite, maybe infinite, or maybe NaN: sums and products of finite values
    may overflow to infinity, and infinity meets infinity (``inf - inf``, ``0 * inf``) in a
    NaN; ``log``, ``sqrt``, ``div``, ``pow``, ... may make a NaN from finite values.

    Args:
      program: a traced program.

    Returns:
      ``True`` only when no finite arguments can give a NaN.

    Example:
      >>> from jaxconv._src.core import scalar_program as sp
      >>> sp.nan_free(sp.trace(lambda x, w: x * w, "float32", 2))
      True
      >>> sp.nan_free(sp.trace(lambda x, w: x * w - w * x, "float32", 2))
      False
    """
    finite, inf, nan = 0, 1, 2
    state: list[int] = []

    def of(r: Ref) -> int:
        if isinstance(r, Arg):
            return finite
        if isinstance(r, Const):
            if isinstance(r.value, bool) or math.isfinite(r.value):
                return finite
            return nan if math.isnan(r.value) else inf
        return state[r]

    for node in program.nodes:
        s = [of(a) for a in node.args]
        name = node.name
        from_bool = name == "convert_element_type" and isinstance(node.args[0], int) and \
            program.nodes[node.args[0]].dtype == np.dtype(bool)
        if node.dtype == np.dtype(bool) or from_bool:
            out = finite
        elif name in ("add", "sub"):
            out = nan if max(s) == nan or s.count(inf) > 1 else inf  # inf - inf
        elif name == "mul":
            # inf * 0, unless the other factor is a nonzero finite constant.
            scaled = any(_finite_const(a) and a.value != 0 for a in node.args)
            out = nan if max(s) == nan or (inf in s and not scaled) else inf
        elif name in _KEEPS:
            out = max(s[1:] if name == "select_n" else s)
        elif name in _BOUNDED:
            out = nan if max(s) == nan else finite
        elif name in _GROWING:
            out = nan if max(s) == nan else inf
        elif name == "div" and _finite_const(node.args[1]) and node.args[1].value != 0:
            out = nan if s[0] == nan else inf
        else:
            out = nan
        state.append(out)
    return all(of(r) != nan for r in program.outputs)


def always_finite(program: ScalarProgram) -> bool:
    """Whether finite arguments always give finite outputs (a conservative analysis): each
    value is built from the arguments and finite constants by maps that keep finite values
    finite (negation, ``abs``, ``max``, ``min``, ``select_n``, rounding, bounded functions
    such as ``tanh``, comparisons) or by a product with a constant of magnitude at most 1;
    sums and other products may overflow to infinity.

    Args:
      program: a traced program.

    Returns:
      ``True`` only when no finite arguments can give an infinite or NaN output.

    Example:
      >>> from jaxconv._src.core import scalar_program as sp
      >>> sp.always_finite(sp.trace(lambda x, w: jnp.maximum(x, -w) * 0.5, "float32", 2))
      True
      >>> sp.always_finite(sp.trace(lambda x, w: x * w, "float32", 2))
      False
    """
    fin: list[bool] = []

    def of(r: Ref) -> bool:
        if isinstance(r, Arg):
            return True
        if isinstance(r, Const):
            return isinstance(r.value, bool) or math.isfinite(r.value)
        return fin[r]

    for node in program.nodes:
        s = [of(a) for a in node.args]
        name = node.name
        from_bool = name == "convert_element_type" and isinstance(node.args[0], int) and \
            program.nodes[node.args[0]].dtype == np.dtype(bool)
        if node.dtype == np.dtype(bool) or from_bool:
            out = True
        elif name in _KEEPS:
            out = all(s[1:] if name == "select_n" else s)
        elif name in _BOUNDED:
            out = all(s)
        elif name == "mul":
            out = all(s) and any(_finite_const(a) and abs(a.value) <= 1 for a in node.args)
        else:
            out = False
        fin.append(out)
    return all(of(r) for r in program.outputs)


@dataclasses.dataclass(frozen=True, eq=False)
class OperandSplit:
    """``program(x, w) = core(lhs(x), rhs(w))`` (see `operand_split`).

    Attributes:
      lhs: the one-argument program of ``x``'s own part, or ``None`` (``x`` itself).
      rhs: the same for ``w``.
      core: the two-argument program of what is left.
    """

    lhs: ScalarProgram | None
    rhs: ScalarProgram | None
    core: ScalarProgram


def operand_split(program: ScalarProgram) -> OperandSplit | None:
    """Splits off the parts of a two-argument program that depend on one argument only.

    ``tanh(x) * w`` is ``core(a, b) = a * b`` of ``a = tanh(x)`` and ``b = w``: the map of an
    operand runs once per element of the input (or kernel), not once per product. A side is
    split when exactly one of its values reaches the rest of the program.

    Args:
      program: a traced program of two arguments.

    Returns:
      The split (the core and each side's map), or ``None`` when neither side is split or
      when a ``custom_jvp`` function was inlined.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core import scalar_program as sp
      >>> s = sp.operand_split(sp.trace(lambda x, w: jnp.tanh(x) * w, "float32", 2))
      >>> s.lhs.primitives(), s.rhs, s.core.primitives()
      (('tanh',), None, ('mul',))
    """
    if len(program.outputs) != 1 or program.custom_jvp or program.n_args != 2:
        return None
    live = program.live()
    deps: dict[int, frozenset[int]] = {}

    def deps_of(r: Ref) -> frozenset[int]:
        if isinstance(r, Arg):
            return frozenset((r.index,))
        return deps[r] if isinstance(r, int) else frozenset()

    for k in live:
        deps[k] = frozenset().union(*(deps_of(a) for a in program.nodes[k].args))
    out = program.outputs[0]
    both = frozenset((0, 1))
    if deps_of(out) != both:
        return None
    frontier: dict[int, set[Ref]] = {0: set(), 1: set()}
    for k in live:
        if deps[k] != both:
            continue
        for a in program.nodes[k].args:
            d = deps_of(a)
            if len(d) == 1:
                frontier[next(iter(d))].add(a)
    maps: dict[int, int] = {}
    for side, refs in frontier.items():
        if len(refs) == 1:
            (r,) = refs
            if isinstance(r, int) and program.nodes[r].dtype == program.dtype:
                maps[side] = r
    if not maps:
        return None

    def side_program(side: int) -> ScalarProgram | None:
        if side not in maps:
            return None
        new: dict[int, Ref] = {}
        nodes: list[Node] = []
        for k in program.live_of(maps[side]):
            node = program.nodes[k]
            args = tuple(Arg(0) if isinstance(a, Arg) else new.get(a, a) for a in node.args)
            nodes.append(dataclasses.replace(node, args=args))
            new[k] = len(nodes) - 1
        return ScalarProgram(tuple(nodes), (new[maps[side]],), 1, program.dtype, False)

    remap: dict[int, Ref] = {k: Arg(side) for side, k in maps.items()}
    nodes = []
    for k in live:
        if k in remap or (len(deps[k]) == 1 and next(iter(deps[k])) in maps):
            continue
        node = program.nodes[k]
        nodes.append(dataclasses.replace(
            node, args=tuple(remap.get(a, a) if isinstance(a, int) else a for a in node.args)))
        remap[k] = len(nodes) - 1
    core = ScalarProgram(tuple(nodes), (remap[out],), 2, program.dtype, False)
    return OperandSplit(side_program(0), side_program(1), core)

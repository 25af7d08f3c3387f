"""The native engine's code generator: a user op as a C++ functor of the kernel template.

A user op's ``combine`` and its partial derivatives (`scalar_program`) are written as C++
over the kernel template's vector type (``csrc/userop.h``: lax's semantics, NaN in, NaN
out), with the reduce, identity and NaN behaviour the kernels need (``csrc/kernels.inc``):

- ``max`` / ``min``: ``comb`` per product, the winner backward through ``dcx`` / ``dcw``;
- ``sum``: ``step = acc + comb``, the backward through ``hx`` / ``hw``;
- ``logsumexp``: ``comb`` per product in the one pass of ``csrc/kernel_logsum.h`` (a
  running maximum, rescaled when it moves, and the sum of exponentials), the backward through
  ``exp(comb - y) * dcx`` / ``dcw``.
- a callable reduce that is none of the built-in ones (``"custom"``): the fold ``fold(a, b)``
  and its partials (``dfab``), traced once like ``combine``, run by
  ``csrc/kernel_fold.h`` in the XLA engine's order, forward and backward.

Every float32 functor also declares ``kCombOps``, the vector operations of one combine
(`comb_ops`, from the traced program): a heavy combine's forward runs its own register tile
(``csrc/kernel_heavy.h``).

A ``jax.custom_vjp`` / ``jax.custom_jvp`` call in ``combine`` (or the fold) is compiled as the
primal it wraps (`primal_program`); the partials come from ``jax.grad``, so they are the
user's rule, applied per product.

float64, int32 and int64 operands get the same functor on the wide kernels' vector types
(``csrc/userop_wide.h``: the same ``u_*`` functions, literals in the operands' dtype, integers
wrapping as XLA's), run by ``csrc/kernel_wide.h`` (forward) and ``kernel_wide_backward.h``
(float64's backward) under a ``max``, ``min`` or ``sum`` reduce.

What is not translated (a ``prod`` reduce, a primitive outside
`scalar_program.ELEMENTWISE`, a dtype other than float32 / float64 / int32 / int64, a custom
VJP whose backward is not linear in the cotangent, integer division) raises `Untranslatable`
with the reason.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np

from jaxconv._src.core import factoring
from jaxconv._src.core import scalar_program as sp
from jaxconv._src.core.algebra import Op, identity_value
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.engines.native import bcast, relaxed
from jaxconv._src.engines.primal import primal

Untranslatable = sp.Untranslatable

REDUCES = {"max": "MaxR", "min": "MinR", "sum": "SumR", "logsumexp": "LseR"}
# The wide kernels' reduces (csrc/userop_wide.h's UserOp::kReduce) and element types.
WIDE_REDUCES = {"max": 0, "min": 1, "sum": 2}
WIDE_TYPES = {np.dtype(np.float64): "double", np.dtype(np.int32): "int32_t",
              np.dtype(np.int64): "int64_t", np.dtype(np.float32): "float"}
_F32 = np.dtype(np.float32)
_BOOL = np.dtype(bool)
# Integer programs: only what wraps or compares (lax's integer division and remainder round
# toward zero with XLA's own rule for a zero divisor; not translated).
_INTEGER = {"add", "sub", "mul", "neg", "abs", "sign", "max", "min", "eq", "ne", "lt", "le",
            "gt", "ge", "select_n", "clamp", "convert_element_type", "integer_pow", "square",
            "add_any", "and", "or", "xor", "not"}
# Evaluated lane by lane with libm on the wide kernels (userop_wide.h), as SCALAR_LIBM is on
# float32's.
_WIDE_LIBM = {"exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "erf",
              "pow"}

_BINARY = {"add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem",
           "nextafter", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "xor"}
_UNARY = {"neg", "abs", "sign", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic",
          "sqrt", "rsqrt", "cbrt", "floor", "ceil", "sin", "cos", "tan", "atan", "sinh",
          "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "is_finite", "not", "square"}
# Evaluated lane by lane with libm (correct, not vectorized; csrc/userop.h).
SCALAR_LIBM = frozenset({"atan2", "rem", "nextafter", "cbrt", "tan", "atan", "sinh", "cosh",
                         "asinh", "acosh", "atanh", "erfc"})


def literal(value: float | bool | int, dtype: object = _F32) -> str:
    """A number as an exact C++ literal of the kernel's dtype (rounded to it first, as the
    program: float32's a float literal, float64's a double, an integer's a ``long long``).

    Args:
        value: the number (a bool is 0 or 1).
        dtype: the kernel's dtype.

    Returns:
        The C++ expression.

    Example:
      >>> literal(0.1), literal(0.1, "float64"), literal(-2**63, "int64")
      ('0x1.99999a0000000p-4f', '0x1.999999999999ap-4', '(-9223372036854775807LL - 1)')
    """
    dtype = np.dtype(dtype)
    if dtype.kind == "i":
        v = int(value)
        return f"({v + 1}LL - 1)" if v == -2**63 else f"{v}LL"
    if dtype != _F32:
        v = float(value)
        if math.isnan(v):
            return '__builtin_nan("")'
        if math.isinf(v):
            return "__builtin_inf()" if v > 0 else "-__builtin_inf()"
        return v.hex()
    with np.errstate(over="ignore"):
        v = float(np.float64(float(value)).astype(np.float32))
    if math.isnan(v):
        return '__builtin_nanf("")'
    if math.isinf(v):
        return "__builtin_inff()" if v > 0 else "-__builtin_inff()"
    return f"{v.hex()}f"


def _ref(r: sp.Ref, dtype: np.dtype = _F32) -> str:
    """The C++ name of a reference: a constant's broadcast, ``x`` / ``w``, or node ``v<k>``.

    Args:
        r: the reference.
        dtype: the kernel's dtype (a constant's literal is of it).

    Returns:
        The C++ expression.
    """
    if isinstance(r, sp.Const):
        return f"T::set1({literal(r.value, dtype)})"
    if isinstance(r, sp.Arg):
        return ("x", "w")[r.index]
    return f"v{int(r)}"


def _expr(node: sp.Node, dtype: np.dtype = _F32, plain: bool = False,
          add_ports: bool = False) -> str:
    """The C++ expression of one program node on the kernels' vector type ``T``.

    Args:
        node: the node.
        dtype: the kernel's dtype (the program's).
        plain: a ``max`` / ``min`` / ``clamp`` as the plain vector instructions (NaN and
            the sign of a zero tie not kept: `relaxed.relaxed_nodes`; float32 kernels only).
        add_ports: a sum or difference on the add ports rather than the FMA ports (the same
            bits; a sum's combine, whose reduce leaves the add ports nearly idle).

    Returns:
        The expression.

    Raises:
        Untranslatable: a dtype or primitive the kernels do not have.
    """
    name = node.name
    a = [_ref(r, dtype) for r in node.args]
    if node.dtype not in (dtype, _BOOL):
        raise Untranslatable(f"it computes in {node.dtype.name} (its kernels are "
                             f"{dtype.name})")
    if dtype.kind == "i" and name not in _INTEGER:
        raise Untranslatable(f"primitive {name!r} on {dtype.name} is not translated")
    if dtype.kind == "i" and name in ("and", "or", "xor", "not") and node.dtype != _BOOL:
        raise Untranslatable(f"bitwise {name!r} on {dtype.name} is not translated")
    if add_ports and name in ("add", "sub", "add_any"):
        return f"T::{'sub' if name == 'sub' else 'add'}({a[0]}, {a[1]})"
    if plain and name in ("max", "min"):
        return f"T::{name}({a[0]}, {a[1]})"
    if plain and name == "clamp":
        return f"T::min(T::max({a[1]}, {a[0]}), {a[2]})"
    if name == "div" and _power_of_two(node.args[1], dtype):
        # x / 2^k is x * 2^-k exactly (both round the same real number): a multiply, not a
        # divide (several times its throughput).
        recip = literal(1.0 / float(node.args[1].value), dtype)
        return f"T::mul({a[0]}, T::set1({recip}))"
    if name in _BINARY:
        return f"u_{name}<T>({a[0]}, {a[1]})"
    if name == "add_any":  # the sum of two cotangents
        return f"u_add<T>({a[0]}, {a[1]})"
    if name in _UNARY:
        return f"u_{name}<T>({a[0]})"
    if name == "round":
        method = int(node.params.get("rounding_method", 0))
        return f"u_round_{'even' if method == 1 else 'away'}<T>({a[0]})"
    if name == "clamp":
        return f"u_clamp<T>({a[0]}, {a[1]}, {a[2]})"
    if name == "select_n":
        if len(a) != 3:
            raise Untranslatable("select_n with more than two cases is not translated")
        return f"u_select<T>({a[0]}, {a[1]}, {a[2]})"
    if name == "convert_element_type":
        # Booleans are 0 / 1 floats: bool -> float is the identity, float -> bool is != 0.
        if node.dtype == np.dtype(bool):
            return f"u_ne<T>({a[0]}, T::zero())"
        return a[0]
    if name == "integer_pow":
        if dtype.kind == "i" and int(node.params["y"]) < 0:
            raise Untranslatable(f"a negative integer power on {dtype.name}")
        return _integer_pow(a[0], int(node.params["y"]), literal(1, dtype))
    raise Untranslatable(f"primitive {name!r} is not translated")


# Vector operations of one call of the kernels' translation of a primitive (csrc/vmath.h and
# simd.h on AVX-512, counted in the compiled loops; a division or square root counted as the
# few operations its latency and throughput are worth); every other primitive is one. Only
# the forward's choice of register tile reads them (`comb_ops`, csrc/kernel_heavy.h).
_VECTOR_OPS = {"exp": 15, "exp2": 13, "expm1": 22, "log": 24, "log1p": 30, "tanh": 36,
               "logistic": 22, "pow": 80, "sin": 40, "cos": 40, "erf": 40, "div": 6,
               "sqrt": 6, "rsqrt": 12} | {p: 40 for p in SCALAR_LIBM}


def comb_ops(program: sp.ScalarProgram, outputs: int = 1) -> int:
    """The vector operations one evaluation of `program`'s first `outputs` outputs costs
    (common subexpressions once): the declared cost the forward kernel picks its register
    tile from (``kCombOps``), and that of a sum's two partials, from which its backward takes
    the one-pass loop (``kGradOps``, ``csrc/kernel_sums_heavy.h``).

    Args:
        program: a combine's program (or its partials' program).
        outputs: how many of its outputs, from the first.

    Returns:
        The estimate (a sum over its live nodes, `_VECTOR_OPS` or one each).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv._src.core import scalar_program as sp
      >>> comb_ops(sp.combine_program(lambda x, w: jnp.exp(-(x - w) ** 2), np.float32))
      18
    """
    return sum(_VECTOR_OPS.get(program.nodes[k].name, 1)
               for k in program.live_of(*program.outputs[:outputs]))


def _power_of_two(r: sp.Ref, dtype: np.dtype = _F32) -> bool:
    """Whether `r` is a constant +-2^k whose reciprocal is a normal number of float `dtype`.

    Args:
        r: a reference of a program.
        dtype: the kernel's dtype.

    Returns:
        True for such a constant.
    """
    if dtype.kind != "f" or not isinstance(r, sp.Const) or isinstance(r.value, bool):
        return False
    v = abs(float(r.value))
    if not math.isfinite(v) or v == 0.0:
        return False
    m, e = math.frexp(v)
    info = np.finfo(dtype)
    return m == 0.5 and info.minexp <= 1 - e <= info.maxexp - 1


def _integer_pow(x: str, y: int, one: str = "1.0f") -> str:
    """``x ** y`` by the multiplications of JAX's own lowering (the same rounding).

    Args:
        x: the base's C++ expression.
        y: the exponent.
        one: the literal 1 of the kernel's dtype.

    Returns:
        The C++ expression.
    """
    if y == 0:
        return f"T::set1({one})"
    recip, y = y < 0, abs(y)
    acc = None
    while y > 0:
        if y & 1:
            acc = x if acc is None else f"T::mul({acc}, {x})"
        y >>= 1
        if y > 0:
            x = f"T::mul({x}, {x})"
    return f"u_div<T>(T::set1({one}), {acc})" if recip else acc


def _kernel_dtype(dtype: np.dtype) -> np.dtype:
    """`dtype` if native kernels compute in it (float32, or the wide kernels' dtypes).

    Args:
        dtype: a program's dtype.

    Returns:
        The dtype.

    Raises:
        Untranslatable: no kernels compute in it.
    """
    if dtype != _F32 and dtype not in WIDE_TYPES:
        raise Untranslatable(f"its dtype is {dtype.name} (the native kernels compute in "
                             "float32, float64, int32 or int64)")
    return dtype


def function(name: str, program: sp.ScalarProgram, output: int,
             relax: frozenset[int] = frozenset(), add_ports: bool = False,
             ref: sp.Ref | None = None) -> str:
    """One templated static member ``name(x, w)`` returning `program`'s `output`.

    Args:
        name: the member's name.
        program: the program (its dtype is the kernel's).
        output: the index of the output returned.
        relax: the nodes written as plain vector max / min (`relaxed.relaxed_nodes`).
        add_ports: sums and differences on the add ports (`_expr`).
        ref: return this value of the program instead of the output (an intermediate).

    Returns:
        The member's C++ source.

    Raises:
        Untranslatable: the program's dtype has no kernels, or a node has no translation.
    """
    dtype = _kernel_dtype(program.dtype)
    lines = [f"  template <class T> static VT<T> {name}(VT<T> x, VT<T> w) {{",
             "    (void)x;", "    (void)w;"]
    result = program.outputs[output] if ref is None else ref
    live = set(program.live_of(result))
    for k, node in enumerate(program.nodes):
        if k in live:
            lines.append(f"    const VT<T> v{k} = {_expr(node, dtype, k in relax, add_ports)};")
    lines.append(f"    return {_ref(result, dtype)};")
    lines.append("  }")
    return "\n".join(lines)


def both_function(name: str, program: sp.ScalarProgram) -> str:
    """One templated static member ``name(x, w, a, b)`` storing `program`'s two outputs
    through ``a`` and ``b`` (their common subexpressions computed once).

    Args:
        name: the member's name.
        program: the program (float32, two outputs).

    Returns:
        The member's C++ source.

    Raises:
        Untranslatable: the program is not float32, or a node has no translation.
    """
    if program.dtype != _F32:
        raise Untranslatable(f"its dtype is {program.dtype.name} (the fold kernels are "
                             "float32)")
    lines = [f"  template <class T> static void {name}(VT<T> x, VT<T> w, VT<T>* a, VT<T>* b) {{",
             "    (void)x;", "    (void)w;"]
    live = set(program.live_of(*program.outputs[:2]))
    for k, node in enumerate(program.nodes):
        if k in live:
            lines.append(f"    const VT<T> v{k} = {_expr(node)};")
    lines.append(f"    *a = {_ref(program.outputs[0])};")
    lines.append(f"    *b = {_ref(program.outputs[1])};")
    lines.append("  }")
    return "\n".join(lines)


def signed_function(name: str, program: sp.ScalarProgram) -> tuple[str, tuple[bool, bool]]:
    """One templated static member ``name(x, w, a, b)`` storing `program`'s two outputs, each
    possibly negated, through ``a`` and ``b``, and which of them are negated.

    For the heavy sums' one-pass backward (``csrc/kernel_sums_heavy.h``): there each partial
    only multiplies the cotangent into a sum, so a negated partial is added with a
    fused negative multiply-add (``c - g a`` is ``c + g (-a)`` exactly: the same bits) and its
    negation costs nothing. Negations are carried out of products (``(-a) b`` is ``-(a b)``
    exactly, rounding to nearest being symmetric) up to the outputs; a value whose sign
    matters elsewhere (an exponential's argument) is negated where it is used. Sums,
    differences and doublings go to the add ports (the same bits).

    Args:
        name: the member's name.
        program: the partials' program (float32, two outputs).

    Returns:
        The member's C++ source and, per output, whether it stores the negated partial.

    Raises:
        Untranslatable: the program is not float32, or a node has no translation.

    Example:
      >>> import jax.numpy as jnp
      >>> p = partials_of(lambda x, w: jnp.exp(-(x - w) ** 2), np.float32)
      >>> signed_function("dparts", p)[1]
      (True, False)
    """
    if program.dtype != _F32:
        raise Untranslatable(f"its dtype is {program.dtype.name} (the fold kernels are "
                             "float32)")
    lines = [f"  template <class T> static void {name}(VT<T> x, VT<T> w, VT<T>* a, VT<T>* b) {{",
             "    (void)x;", "    (void)w;"]
    signed: dict[int, tuple[str, bool]] = {}  # node -> (C++ magnitude, negated)
    defined: set[int] = set()  # nodes whose own value v<k> is written

    def sign_of(r: sp.Ref) -> tuple[str, bool]:
        return signed[r] if isinstance(r, int) else (_ref(r), False)

    def need(r: sp.Ref) -> None:
        if isinstance(r, int) and r not in defined:
            mag, neg = signed[r]
            lines.append(f"    const VT<T> v{r} = {f'T::neg({mag})' if neg else mag};")
            defined.add(r)

    for k in program.live_of(*program.outputs[:2]):
        node = program.nodes[k]
        if node.name == "neg" and node.dtype == _F32:
            mag, neg = sign_of(node.args[0])
            signed[k] = (mag, not neg)
            continue
        if (node.name == "mul" and node.dtype == _F32 and len(node.args) == 2
                and any(sign_of(r)[1] for r in node.args)):
            (ma, na), (mb, nb) = (sign_of(r) for r in node.args)
            expr = f"T::mul({ma}, {mb})"
            for c, m in ((node.args[0], mb), (node.args[1], ma)):
                if isinstance(c, sp.Const) and float(c.value) == 2.0:
                    expr = f"T::add({m}, {m})"
            lines.append(f"    const VT<T> m{k} = {expr};")
            signed[k] = (f"m{k}", na != nb)
            continue
        for r in node.args:
            need(r)
        expr = _doubling(node) or _expr(node, _F32, False, True)
        lines.append(f"    const VT<T> v{k} = {expr};")
        signed[k] = (f"v{k}", False)
        defined.add(k)
    negs = []
    for out, r in zip("ab", program.outputs[:2], strict=True):
        mag, neg = sign_of(r)
        lines.append(f"    *{out} = {mag};")
        negs.append(neg)
    lines.append("  }")
    return "\n".join(lines), (negs[0], negs[1])


def _doubling(node: sp.Node) -> str | None:
    """``a + a`` for a product of a value and the constant 2 (the same bits, on the add
    ports), else ``None``.

    Args:
        node: a node of a scalar program.

    Returns:
        The C++ expression ``T::add(a, a)``, or ``None`` where `node` is not ``2 * a``.
    """
    if node.name != "mul" or len(node.args) != 2:
        return None
    for k in (0, 1):
        c, a = node.args[k], node.args[1 - k]
        if isinstance(c, sp.Const) and not isinstance(a, sp.Const) and float(c.value) == 2.0:
            return f"T::add({_ref(a)}, {_ref(a)})"
    return None


def terms_function(name: str, comb: sp.ScalarProgram, term: sp.Ref,
                   parts: sp.ScalarProgram) -> str:
    """One templated static member ``name(x, w, t, a, b)`` storing a logsumexp backward's
    per-term values through ``t`` (`term`, a value of `comb`: the combine or, where it ends
    in a negation, its argument), ``a`` and ``b`` (the two outputs of `parts`).

    The backward's exponential loads the FMA ports; here sums, differences and doublings go
    to the add ports (the same bits). Each program is written in its own block; the compiler
    computes their common subexpressions (``x - w`` in both) once.

    Args:
        name: the member's name.
        comb: the combine's program (float32).
        term: the value of `comb` stored through ``t``.
        parts: the partials' program (float32, two outputs).

    Returns:
        The member's C++ source.

    Raises:
        Untranslatable: a node has no translation.
    """
    lines = [f"  template <class T> static void {name}(VT<T> x, VT<T> w, VT<T>* t, VT<T>* a, "
             "VT<T>* b) {", "    (void)x;", "    (void)w;"]
    for program, stores in ((comb, (("t", term),)),
                            (parts, (("a", parts.outputs[0]), ("b", parts.outputs[1])))):
        lines.append("    {")
        live = set(program.live_of(*(r for _, r in stores)))
        for k, node in enumerate(program.nodes):
            if k in live:
                expr = _doubling(node) or _expr(node, _F32, False, True)
                lines.append(f"      const VT<T> v{k} = {expr};")
        lines.extend(f"      *{out} = {_ref(r)};" for out, r in stores)
        lines.append("    }")
    lines.append("  }")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Functor:
    """The generated functor of one op.

    Attributes:
      source: the complete C++ translation unit.
      primitives: the primitives the forward and backward use.
      scalar: those of them evaluated lane by lane with libm (not vectorized).
      nan_free: whether finite inputs never make a NaN product (the fast max/min loop).
      name: the op's name, for messages only (it is not in the source).
      dtype: the operands' dtype it is built for (float32: the float32 kernels; float64,
        int32, int64: the wide kernels).
      low_codes: whether it declares ``kLowCodes`` (`low_codes`): on bfloat16 / float16, a
        dense recording forward keeps exact winner codes and the backward scatters them.
    """

    source: str
    primitives: tuple[str, ...]
    scalar: tuple[str, ...]
    nan_free: bool
    name: str = ""
    dtype: str = "float32"
    low_codes: bool = False


PRELUDE = """\
// Generated by jaxconv: a user op's combine and partial derivatives as a functor of the
// kernel template (csrc/kernels.inc). Do not edit: the cache key is this text.
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <cmath>
#define JAXCONV_USER_OP 1
#include "kernels.inc"

namespace {{
#include "userop.h"

struct UserOp : {reduce} {{
  static constexpr bool kDominated = false;
  static constexpr bool kNanFree = {nan_free};
  static constexpr int kCombOps = {ops};
  static float ident() {{ return {ident}; }}
"""

EPILOGUE = """\
}};
{extra}
}}  // namespace

#define JAXCONV_EXPORT extern "C" __attribute__((visibility("default")))
JAXCONV_EXPORT int jaxconv_user_run(const jaxconv::Call* call, int backward) {{
  return {run}<UserOp>(*call, backward != 0);
}}
JAXCONV_EXPORT int jaxconv_user_abi() {{ return jaxconv::kAbiVersion; }}
"""


WIDE_PRELUDE = """\
// Generated by jaxconv: a user op's combine and partial derivatives as a functor of the wide
// kernels (csrc/userop_wide.h). Do not edit: the cache key is this text.
#define JAXCONV_WIDE_NS jaxconv_wide_user
#if defined(__AVX512F__)
#define JAXCONV_WIDE_BYTES 64
#elif defined(__AVX2__)
#define JAXCONV_WIDE_BYTES 32
#else
#define JAXCONV_WIDE_BYTES 16
#endif
#include "userop_wide.h"

namespace JAXCONV_WIDE_NS {{

struct UserOp {{
  using E = {ctype};
  static constexpr int kReduce = {reduce};
  static constexpr bool kNanFree = {nan_free};
  static E ident() {{ return {ident}; }}
"""

WIDE_EPILOGUE = """\
}};

}}  // namespace JAXCONV_WIDE_NS

#define JAXCONV_EXPORT extern "C" __attribute__((visibility("default")))
JAXCONV_EXPORT int jaxconv_user_run(const jaxconv::WideCall* call, int backward) {{
  return JAXCONV_WIDE_NS::run_wide_user<JAXCONV_WIDE_NS::UserOp>(*call, backward != 0);
}}
JAXCONV_EXPORT int jaxconv_user_abi() {{ return jaxconv::kAbiVersion; }}
"""


def functor(op: Op, dtype: object = np.float32, wide: bool = False) -> Functor:
    """The C++ source of `op`'s kernels.

    Args:
      op: a user op with a ``sum``, ``max``, ``min`` or ``logsumexp`` reduce (after
        `capabilities.capabilities`' canonicalization of a callable reduce) and no rewrite.
      dtype: the operands' dtype: float32 (the float32 kernels), or float64, int32, int64
        (the wide kernels: ``sum``, ``max`` or ``min``).
      wide: float32 on the wide kernels: the backward of a ``max`` / ``min`` op on float32
        copies of bfloat16 / float16 operands, each product rounded to their dtype before it
        is matched against the forward's result (``csrc/kernel_wide_backward.h``).

    Returns:
      A `Functor`.

    Raises:
      Untranslatable: with the reason, when the op cannot be compiled.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> from jaxconv._src.engines.native import codegen
      >>> f = codegen.functor(jaxconv.Op(lambda x, w: x * w, "max"))
      >>> f.primitives, f.nan_free
      (('mul',), True)
    """
    dtype = _kernel_dtype(np.dtype(dtype))
    caps = capabilities(op)
    if op.rewrite is not None:
        raise Untranslatable("it is a rewrite of a standard product")
    if dtype != _F32 or wide:
        return _wide_functor(op, caps, dtype)
    if caps.reduce == "custom":
        return _fold_functor(op, caps, dtype)
    if caps.reduce not in REDUCES:
        raise Untranslatable(f"its reduce {caps.reduce!r} has no native kernel (served: "
                             f"{sorted(REDUCES)})")
    if op.pad_value is not None and not math.isfinite(float(op.pad_value)):
        raise Untranslatable("its pad_value is not finite")
    comb = primal_program(op.combine, dtype)
    if len(comb.outputs) != 1:
        raise Untranslatable("its combine returns more than one value")
    parts = partials_of(op.combine, dtype)
    with jax.ensure_compile_time_eval():
        ident = float(identity_value(caps.canonical, dtype))
    # A sum's step adds on the add ports and leaves them idle otherwise, while its combine's
    # products and polynomials load the FMA ports: its own sums go to the add ports.
    sums = caps.reduce == "sum"
    body = [function("comb", comb, 0, add_ports=sums), function("dcx", parts, 0, add_ports=sums),
            function("dcw", parts, 1, add_ports=sums)]
    if caps.reduce == "sum":
        body.append("  template <class T> static VT<T> step(VT<T> acc, VT<T> x, VT<T> w) {\n"
                    "    return T::add(acc, comb<T>(x, w));\n  }")
        body.append("  template <class T> static VT<T> hx(VT<T> x, VT<T> w) "
                    "{ return dcx<T>(x, w); }")
        body.append("  template <class T> static VT<T> hw(VT<T> x, VT<T> w) "
                    "{ return dcw<T>(x, w); }")
        # Heavy partials: both from one evaluation, in one backward pass
        # (csrc/kernel_sums_heavy.h).
        body.append(f"  static constexpr int kGradOps = {comb_ops(parts, 2)};")
        body.append(both_function("dcxw", parts))
        # The same partials for the one-pass loop: negations left to its multiply-adds
        # (kNegCx / kNegCw: dparts stores the negated partial), sums on the add ports.
        dparts, (neg_cx, neg_cw) = signed_function("dparts", parts)
        body.append(f"  static constexpr bool kNegCx = {'true' if neg_cx else 'false'};")
        body.append(f"  static constexpr bool kNegCw = {'true' if neg_cw else 'false'};")
        body.append(dparts)
    nan_free = sp.nan_free(comb)
    relax = relaxed.relaxed_nodes(comb) if caps.reduce in ("max", "min") and nan_free else None
    if relax:
        # The fast loop's combine (finite operands, zero signs fixed from combx); the exact
        # one for NaN / infinite operands and the sign of a zero result.
        body[0] = function("comb", comb, 0, relax)
        body.append(function("comb_safe", comb, 0))
        body.append("  template <class T> static VT<T> combx(VT<T> x, VT<T> w) "
                    "{ return comb_safe<T>(x, w); }")
    elif caps.reduce != "sum":
        body.append("  template <class T> static VT<T> comb_safe(VT<T> x, VT<T> w) "
                    "{ return comb<T>(x, w); }")
    used = set(comb.primitives()) | set(parts.primitives())
    codes = low_codes(caps.reduce, comb, used)
    if codes:
        body.append(LOW_CODES)
    # The forward's embedded broadcast of x (csrc/kernel_bcast_user.h), from `comb` as written:
    # max / min only (under a sum, -|x - w| and -(x - w)^2 measured 8-13% slower with it).
    broadcast = bcast.members(
        comb, _ref, lambda node, plain, add: _expr(node, _F32, plain, add),
        relax or frozenset()) if caps.reduce in ("max", "min") else None
    if broadcast is not None:
        body.append(broadcast)
    out = comb.outputs[0]
    if caps.reduce == "logsumexp" and isinstance(out, int) and comb.nodes[out].name == "neg":
        # A combine -z: the logsumexp's exponent comb L + c is formed as c - z L, the negation
        # folded into its FMA (csrc/kernel_logsum.h `lse_u`; the same bits).
        body.append(function("comb_neg", comb, 0, ref=comb.nodes[out].args[0]))
    if caps.reduce == "logsumexp":
        # The backward's per-term values, on the add ports where they can go
        # (csrc/kernel_lsebwd_ivec.h); kTermNeg: its t is comb_neg's z (exponent c - z L).
        neg = isinstance(out, int) and comb.nodes[out].name == "neg"
        body.append(f"  static constexpr bool kTermNeg = {'true' if neg else 'false'};")
        body.append(terms_function("bterms", comb, comb.nodes[out].args[0] if neg else out,
                                   parts))
    # Only the program reaches the source, never the op's name or anything else the user
    # wrote: primitive names come from the tables above, numbers from `literal`.
    source = (PRELUDE.format(reduce=REDUCES[caps.reduce],
                             nan_free="true" if nan_free else "false", ident=literal(ident),
                             ops=comb_ops(comb))
              + "\n".join(body) + "\n"
              + EPILOGUE.format(extra=bcast.SPECIALIZATION if broadcast else "", run="run_op"))
    prims = tuple(sorted(used))
    return Functor(source, prims, tuple(p for p in prims if p in SCALAR_LIBM), nan_free,
                   display_name(op), low_codes=codes)


def _wide_functor(op: Op, caps: object, dtype: np.dtype) -> Functor:
    """The functor of an op on the wide kernels (float64, int32, int64): the same members as
    float32's, on ``csrc/userop_wide.h``'s vector types.

    Args:
        op: the op.
        caps: its capabilities.
        dtype: the operands' dtype.

    Returns:
        The functor.

    Raises:
        Untranslatable: a reduce the wide kernels lack, or a combine that does not translate.
    """
    reduce = caps.reduce  # type: ignore[attr-defined]
    if dtype == _F32 and reduce not in ("max", "min"):
        raise Untranslatable(f"its reduce {reduce!r} has no rounded-winner backward")
    if reduce not in WIDE_REDUCES:
        raise Untranslatable(f"its reduce {reduce!r} has no kernel on {dtype.name} (served: "
                             f"{sorted(WIDE_REDUCES)})")
    comb = primal_program(op.combine, dtype)
    if len(comb.outputs) != 1:
        raise Untranslatable("its combine returns more than one value")
    body = [function("comb", comb, 0)]
    used = set(comb.primitives())
    if dtype.kind == "f":  # integers have no gradient
        parts = partials_of(op.combine, dtype)
        body += [function("dcx", parts, 0), function("dcw", parts, 1)]
        used |= set(parts.primitives())
    with jax.ensure_compile_time_eval():
        ident = identity_value(caps.canonical, dtype).item()  # type: ignore[attr-defined]
    nan_free = sp.nan_free(comb) if dtype.kind == "f" else True
    codes = dtype == _F32 and low_codes(reduce, comb, used)
    if codes:
        body.append(LOW_CODES)
    if dtype == _F32 and sp.always_finite(parts):
        body.append(FINITE_PARTIALS)
    source = (WIDE_PRELUDE.format(ctype=WIDE_TYPES[dtype], reduce=WIDE_REDUCES[reduce],
                                  nan_free="true" if nan_free else "false",
                                  ident=literal(ident, dtype))
              + "\n".join(body) + "\n" + WIDE_EPILOGUE.format())
    prims = tuple(sorted(used))
    return Functor(source, prims, tuple(p for p in prims if p in SCALAR_LIBM | _WIDE_LIBM),
                   nan_free, display_name(op), dtype.name, codes)


# The member a max / min functor declares where `low_codes` holds (csrc/kernel_lowdense_record.h's
# LowCodes, kernel_lowdense_backward.h's lowdense_op).
LOW_CODES = "  static constexpr bool kLowCodes = true;"

# The member a float32 wide functor (the bfloat16 / float16 backward) declares where its
# partials are finite wherever the operands are (`scalar_program.always_finite`): an output
# whose cotangent is zero then adds only zeros, and the recorded backward skips its scan
# (csrc/kernel_lowrec_backward.h, FiniteRule).
FINITE_PARTIALS = "  static constexpr bool kFinitePartials = true;"


def low_codes(reduce: str, comb: sp.ScalarProgram, primitives: set[str]) -> bool:
    """Whether a max / min op's bfloat16 / float16 dense record may hold exact winner codes
    (``csrc/kernel_lowdense_record.h``) and its backward scatter them
    (``csrc/kernel_lowdense_backward.h``): the forward (float32 kernels) matches each product
    against the result's rounding bound (bfloat16) or rounded value (float16), the backward
    (wide kernels) rescans a tie's blocks against the bound, and the earlier route's scan
    finds its winners with that bound too, so the three must see the same products: none of
    the primitives of the combine and its partials is one that the float32 kernels vectorize
    and the wide kernels take from libm (`same_products`), and finite operands make no NaN
    product (the recording tiles run the fast loop, whose relaxed max / min differ from the
    exact ones only in the sign of a zero, which no compare sees). The float32 functor and the
    wide one of an op decide alike: both sides read the record by it.

    Args:
      reduce: the op's reduce.
      comb: the combine's program.
      primitives: the primitives of the combine and its partials.

    Returns:
        True when the functor declares ``kLowCodes``.
    """
    return reduce in ("max", "min") and sp.nan_free(comb) and not primitives & _WIDE_LIBM


def same_products(functor: Functor) -> bool:
    """Whether the float32 kernels and the wide kernels (on float32: the bfloat16 / float16
    backward's) compute the functor's values bit for bit: none of its primitives is one that
    the float32 kernels vectorize (``csrc/vmath.h``) and the wide kernels take from libm.

    Args:
      functor: a functor of either.

    Returns:
      True when they do.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> same_products(functor(jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max")))
      True
      >>> same_products(functor(jaxconv.Op(lambda x, w: jnp.tanh(x * w) + x, "max")))
      False
    """
    return not set(functor.primitives) & _WIDE_LIBM


def has_rules(fn: object, dtype: object = np.float32) -> bool:
    """Whether `fn` (on two scalars) calls a ``jax.custom_vjp`` / ``jax.custom_jvp`` function.

    Args:
        fn: a binary function.
        dtype: the dtype it is traced in.

    Returns:
        True if it does (False when it cannot be traced).

    Example:
      >>> import jax
      >>> has_rules(lambda x, w: jax.nn.relu(x - w)), has_rules(lambda x, w: x - w)
      (True, False)
    """
    try:
        return bool(sp.rules_program(fn, np.dtype(dtype)).rules())
    except Untranslatable:
        return False


def primal_program(fn: object, dtype: np.dtype) -> sp.ScalarProgram:
    """`fn`'s program on two scalars, a ``jax.custom_vjp`` / ``jax.custom_jvp`` call inside
    it replaced by the primal computation it wraps.

    The kernels compute that primal; the derivative programs (`sp.partials_program`) come
    from ``jax.grad`` of `fn` itself, so they are the user's rules, evaluated per product.

    Args:
        fn: a binary function.
        dtype: the dtype it is traced in.

    Returns:
        The program.

    Raises:
        Untranslatable: it cannot be traced, or a rule's backward is not linear in the
            cotangent.
    """
    try:
        return sp.combine_program(fn, dtype)
    except Untranslatable:
        ruled = sp.rules_program(fn, dtype)
        if not ruled.rules():
            raise
    # The kernels multiply the cotangent by the rule's derivative at cotangent 1: exact only
    # for a backward linear in the cotangent (as a VJP rule should be).
    if not all(factoring.linear_rule(ruled.nodes[k], dtype) for k in ruled.rules()):
        raise Untranslatable("it calls a custom-VJP function whose backward is not linear in "
                             "the cotangent")
    return sp.combine_program(primal(fn), dtype)


def partials_of(fn: object, dtype: np.dtype) -> sp.ScalarProgram:
    """`sp.partials_program` of `fn`, where the primal of a custom-VJP call inside it may stay
    in the gradient's program as long as nothing the partials read depends on it.

    Args:
        fn: a binary function.
        dtype: the dtype it is traced in.

    Returns:
        The program of the two partial derivatives.

    Raises:
        Untranslatable: the derivative cannot be traced or reads a custom-VJP result.
    """
    try:
        return sp.partials_program(fn, dtype)
    except Untranslatable:
        if not has_rules(fn, dtype):
            raise
    program = sp.trace(jax.grad(fn, argnums=(0, 1)), dtype, 2, keep_rules=True)
    if program.rules():
        raise Untranslatable("its derivative reads the result of a custom-VJP function")
    return program


def _fold_functor(op: Op, caps: object, dtype: np.dtype) -> Functor:
    """The functor of an op whose reduce is a callable fold (``csrc/kernel_fold.h``).

    Args:
        op: the op.
        caps: its capabilities.
        dtype: the operands' dtype.

    Returns:
        The functor.

    Raises:
        Untranslatable: a non-finite pad value, or a combine or fold that does not translate.
    """
    if op.pad_value is not None and not math.isfinite(float(op.pad_value)):
        raise Untranslatable("its pad_value is not finite")
    comb = primal_program(op.combine, dtype)
    fold = primal_program(op.reduce, dtype)
    for what, program in (("combine", comb), ("reduce", fold)):
        if len(program.outputs) != 1:
            raise Untranslatable(f"its {what} returns more than one value")
    parts = partials_of(op.combine, dtype)
    fparts = partials_of(op.reduce, dtype)
    with jax.ensure_compile_time_eval():
        ident = float(identity_value(caps.canonical, dtype))  # type: ignore[attr-defined]
    body = [function("comb", comb, 0), function("fold", fold, 0),
            both_function("dcxw", parts), both_function("dfab", fparts)]
    # kernel_fold.h reads only ident, comb, fold, dcxw and dfab (both partials at once, their
    # common subexpressions computed once); the reduce base and the flags are the template's
    # requirements of every functor.
    source = (PRELUDE.format(reduce="MaxR", nan_free="false", ident=literal(ident), ops=0)
              + "\n".join(body) + "\n"
              + EPILOGUE.format(extra='#include "kernel_fold.h"\n', run="run_fold_op"))
    used = tuple(sorted(set(comb.primitives()) | set(parts.primitives())
                        | set(fold.primitives()) | set(fparts.primitives())))
    return Functor(source, used, tuple(p for p in used if p in SCALAR_LIBM), False,
                   display_name(op))


def display_name(op: Op) -> str:
    """The op's name for messages: its ``name``, else its combine's function name.

    Args:
        op: the op.

    Returns:
        The name.
    """
    if op.name:
        return str(op.name)
    return str(getattr(op.combine, "__qualname__", None) or type(op.combine).__name__)

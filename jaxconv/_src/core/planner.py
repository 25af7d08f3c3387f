"""The planner: which engine computes a problem on a platform, decided statically.

Engines implement the protocol of `jaxconv._src.core.engine` and register themselves there;
the planner looks them up by name and reads their `refusal`, never importing one.

The choice depends only on the platform being lowered for, the engine asked for, the op's
declared capabilities, the shapes and the dtypes -- never on values, so one compiled function
has one path.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from jax.typing import DTypeLike

from jaxconv._src.core import engine as registry
from jaxconv._src.core.capabilities import accumulation_dtype, capabilities

if TYPE_CHECKING:
    from jaxconv._src.core.engine import Engine
    from jaxconv._src.core.problem import Problem

# The engines `"auto"` prefers on each platform, fastest first, before the XLA engine (which
# serves everything). Pallas joins a platform's list once measured faster there
# (`python -m benchmarks.device_check`).
PREFERRED: dict[str, tuple[str, ...]] = {"cpu": ("native",)}
FALLBACK = "xla"


def engines() -> tuple[str, ...]:
    """The values `engine=` accepts: `"auto"` and every registered engine."""
    return (registry.AUTO, *registry.names())


def engine_name(problem: Problem, dtype: DTypeLike, platform: str) -> str:
    """The engine that computes `problem` (inputs of `dtype`) when lowered for `platform`.

    `"auto"` picks the first engine of `PREFERRED[platform]` that serves the problem (reads
    its `refusal`), else the XLA engine: on CPU the native engine where it has a kernel for
    the op, dtype and geometry (and its library loads); on GPU and TPU the XLA engine.

    Args:
        problem: the canonical problem (its op and the engine asked for).
        dtype: the operands' dtype.
        platform: the platform being lowered for.

    Returns:
        The engine's name.
    """
    asked = problem.engine
    if problem.op.rewrite is not None:
        return FALLBACK  # a rewrite is a native lax product: the best code on every platform
    if asked != registry.AUTO:
        return asked
    for name in PREFERRED.get(platform, ()):
        if name in registry.names() and _refusal(name, problem, dtype, platform) is None:
            return name
    return FALLBACK


def _refusal(name: str, problem: Problem, dtype: DTypeLike, platform: str | None) -> str | None:
    """Engine ``name``'s refusal of the problem, or why it is not available (`None`: it serves).

    Args:
        name: the engine's name.
        problem: the canonical problem.
        dtype: the operands' dtype.
        platform: the platform, ``None`` when not known yet.

    Returns:
        The reason, or ``None``.
    """
    try:
        found = registry.get(name)
    except ImportError as e:
        return f"engine {name!r} is not available ({e})"
    return found.refusal(problem, dtype, platform)


def check_engine(problem: Problem, dtype: DTypeLike) -> None:
    """Raises a clear error, before any tracing, when the engine asked for cannot serve.

    Args:
        problem: the canonical problem.
        dtype: the operands' dtype.

    Raises:
        RuntimeError: the engine is not available in this process.
        ValueError: it does not serve the problem (its refusal is quoted).
    """
    name = problem.engine
    if problem.op.rewrite is not None:
        return
    try:
        found = registry.get(name)
    except ImportError as e:
        raise RuntimeError(
            f"engine={name!r} is not available ({e}); use engine='auto' or engine='xla'."
        ) from None
    load_error = found.load_error()
    if load_error is not None:
        raise RuntimeError(
            f"engine={name!r} cannot be used: {load_error}. Use engine='auto' or engine='xla'.")
    why = found.refusal(problem, dtype, None)
    if why is not None:
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.display_name!r} with {dtype} inputs "
            f"and this geometry ({why}); use engine='auto' (which falls back "
            "to the XLA engine) or engine='xla'.")


def engine_for(problem: Problem, platform: str, dtype: DTypeLike | None = None) -> Engine:
    """The engine for `problem` on `platform` (see `engine_name`).

    Args:
        problem: the canonical problem.
        platform: the platform being lowered for.
        dtype: the operands' dtype, ``None`` for the problem's.

    Returns:
        The engine.

    Raises:
        ValueError: the engine asked for does not serve the problem on ``platform``.
    """
    if dtype is None:
        dtype = problem.operand_dtype
    name = engine_name(problem, dtype, platform)
    found = registry.get(name)
    if name != FALLBACK and found.refusal(problem, dtype, platform) is not None:
        raise ValueError(
            f"engine={name!r} does not serve op {problem.op.display_name!r} with {dtype} inputs on "
            f"platform {platform!r}; use engine='auto' or engine='xla'."
        )
    return found


# --- explain ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    """How an op is computed: the engine the planner picks and the path inside it.

    Attributes:
      op: the op's name.
      platform: the platform planned for.
      engine: ``"native"``, ``"xla"`` or ``"pallas"``.
      details: one line per fact (the path, why another engine was not taken, where a
        compiled user kernel lives).
    """

    op: str
    platform: str
    engine: str
    details: tuple[str, ...]

    def __str__(self) -> str:
        """The op, platform and engine, then one line per detail."""
        lines = [f"op {self.op!r} on {self.platform}: engine {self.engine!r}"]
        return "\n".join(lines + [f"  - {d}" for d in self.details])


def explain(op: Any, *, dtype: DTypeLike = "float32", platform: str | None = None,
            engine: str = "auto") -> Plan:
    """Which engine and path compute ``op`` (a convolution or dense product with it).

    The answer is the call's own decision: the same checks (an error the call would raise
    is raised here), the same planner, each engine's own `refusal`. For a user op on CPU
    the native engine compiles its kernels here (once, as the first call would) and says
    where they are cached.

    Args:
      op: an `Op` or the name of a built-in op.
      dtype: the operands' dtype.
      platform: ``"cpu"``, ``"cuda"``, ``"rocm"`` or ``"tpu"``; default: JAX's default backend.
      engine: the engine asked for (``"auto"`` lets the planner choose).

    Returns:
      A `Plan` (``print`` it for a report).

    Raises:
      TypeError, ValueError, RuntimeError: as the call would, for this op, dtype and engine.

    Example:
      >>> import jaxconv
      >>> plan = jaxconv.explain("max_plus", platform="cpu")
      >>> plan.engine in ("native", "xla")
      True
    """
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from jaxconv._src.core import factoring, ops, problem, validation  # noqa: PLC0415
    from jaxconv._src.core.geometry import Geometry  # noqa: PLC0415

    op = ops.get(op)
    validation.engine_name(engine)
    platform = platform or jax.default_backend()
    dtype = jnp.dtype(dtype)
    operand = jax.ShapeDtypeStruct((1,), dtype)
    if op.rewrite is None:
        validation.check_op(op, operand, operand)
    details: list[str] = []
    form = factoring.factored_form(op.replace(post=None), dtype)
    inner = op.replace(post=None) if form is None else form.inner
    if form is not None:
        details.extend(form.describe())
    rule = factoring.per_product_rule(op.replace(post=None), dtype)
    if rule is not None:
        details.append(rule)
    if callable(op.reduce) and capabilities(op).reduce != "custom":
        details.append(f"the callable reduce is {capabilities(op).reduce!r} "
                       "(recognised from its traced program)")
    geom = Geometry((8, 8), (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1), 1)
    acc = np.dtype(accumulation_dtype(inner, dtype, None))
    prob = problem.Problem(inner, geom, engine, acc, problem.DEFAULT_MAX_BLOCK_BYTES, None,
                           dtype)
    if engine != registry.AUTO:
        check_engine(prob, dtype)
    chosen = engine_name(prob, dtype, platform)
    if engine == registry.AUTO and inner.rewrite is None:
        for name in PREFERRED.get(platform, ()):
            if name == chosen:
                break
            details.append(f"not {name}: {_refusal(name, prob, dtype, platform)}")
    # Describing may build an engine's kernels (as the first call would); a build that
    # fails changes the call's decision, so decide again.
    lines = engine_for(prob, platform, dtype).describe(prob, dtype)
    if engine != registry.AUTO:
        check_engine(prob, dtype)
    again = engine_name(prob, dtype, platform)
    if again != chosen:
        details.append(f"not {chosen}: {_refusal(chosen, prob, dtype, platform)}")
        chosen, lines = again, registry.get(again).describe(prob, dtype)
    details.extend(lines)
    if form is not None and form.negated:
        details.extend(_kept_difference(op, dtype, geom, platform, engine))
    return Plan(op.display_name, platform, chosen, tuple(details))


def _kept_difference(op: Any, dtype: Any, geom: Any, platform: str,
                     engine: str) -> list[str]:
    """What computes a product whose difference of the operands is not negated
    (`factoring.negation_pays` false: a negated operand larger than the output, such as a
    dense layer's kernel), for `explain`: the engine the planner picks for the product left
    inside, and the first lines of its `describe`.

    Args:
        op: the op.
        dtype: the operands' dtype.
        geom: the geometry `explain` plans on.
        platform: the platform.
        engine: the engine asked for.

    Returns:
        The lines (empty where nothing factors without the negation).
    """
    import numpy as np  # noqa: PLC0415

    from jaxconv._src.core import factoring, problem  # noqa: PLC0415

    form = factoring.kept_difference_form(op.replace(post=None), dtype)
    inner = op.replace(post=None) if form is None else form.inner
    acc = np.dtype(accumulation_dtype(inner, dtype, None))
    prob = problem.Problem(inner, geom, engine, acc, problem.DEFAULT_MAX_BLOCK_BYTES, None,
                           dtype)
    name = engine_name(prob, dtype, platform)
    lines = engine_for(prob, platform, dtype).describe(prob, dtype)
    head = "; ".join(lines[:2]) if lines else "its generic path"
    return [f"where the negation does not pay (negation_pays), the difference stays in the "
            f"product: engine {name!r}, {head}"]

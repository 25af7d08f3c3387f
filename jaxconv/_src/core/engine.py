"""The engine protocol and the registry of engines.

An engine computes the three primitives of `jaxconv._src.core.primitive` on canonical
problems (`Problem`). Engines live in `jaxconv._src.engines` and register themselves here
(`register`); the core never imports an engine: it looks engines up by name (`get`).

The protocol, in the style of a typed structural interface:

- `refusal(problem, dtype, platform)`: why the engine does not serve the problem with
  operands of `dtype` when lowered for `platform` (`None` for "not known yet"), or `None`
  when it does. It is the one eligibility decision: the planner reads it and `explain`
  prints it. It is static (shapes, dtypes, the op's declared capabilities) and cheap: it
  compiles nothing.
- `forward(problem, x, w) -> y`;
- `backward(problem, x, w, y, g, need) -> (gx, gw)`, `need` saying which are used;
- `tangent(problem, x, w, y, tx, tw, active) -> ty`, `active` saying which tangents are
  nonzero;
- `describe(problem, dtype)`: optional, the path taken, one line per fact (`explain`);
- `opaque_call(platform)`: optional (`False`): whether the engine lowers to a custom call
  that JAX's SPMD partitioner cannot see into on `platform`; the core then partitions the
  call itself (`jaxconv._src.core.partitioning`) and the engine runs on local shapes;
- `backward_reads_output(problem)`: optional (`False`): whether `backward` weighs a
  logsumexp's cotangent by `exp(c - y)` with the `y` it is given (a native max/min scan also
  matches products against it), so that a device's backward over its share of the
  contraction, given the global `y`, is its part of the global backward (the core then
  reduces a sharded logsumexp contraction across devices instead of gathering it; max/min
  contractions are reduced for every engine);
- `records_winners(problem, platform)`: optional (`False`): whether, when a gradient will
  be taken, the engine's forward keeps a record of where each output's winners are
  (`forward_recording`) that its backward takes back (`backward_recorded`) instead of
  finding them again; the core then runs the recording forward once and carries the record
  to the backward as a residual (the native engine: dense max/min products);
- `per_example_kernel_gradient(problem)`: optional (`Engine` answers `None`): a function
  `(x, w, y, g) -> gw` (or `-> (gx, gw)`, see `PerExampleRule`) that JAX can batch like its
  own products, used for per-example kernel gradients under `jax.vmap`.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import jax
from jax.typing import DTypeLike

if TYPE_CHECKING:
    from jaxconv._src.core.problem import Problem

Array = jax.Array

AUTO = "auto"


@dataclasses.dataclass(frozen=True)
class PerExampleRule:
    """Standard products computing a kernel gradient, batched by JAX under `jax.vmap`.

    Attributes:
      fn: `fn(x, w, y, g)` on one example's canonical operands.
      both: `True` when `fn` returns `(gx, gw)`, `False` when it returns `gw`.
    """

    fn: Callable[[Array, Array, Array, Array], Array | tuple[Array, Array]]
    both: bool


@runtime_checkable
class Engine(Protocol):
    """What the core asks of an engine (see the module docstring).

    Engines subclass this protocol to inherit the defaults of the optional members
    (`load_error`, `describe`, `opaque_call`, `per_example_kernel_gradient`).

    Example:
      >>> from jaxconv._src.core import engine
      >>> isinstance(engine.get("xla"), engine.Engine)
      True
    """

    name: str

    def load_error(self) -> str | None:
        """Why the engine cannot run at all in this process (`None`: it can)."""
        return None

    def refusal(self, problem: Problem, dtype: DTypeLike, platform: str | None) -> str | None:
        """Why the engine does not serve `problem` (`None`: it does).

        Args:
            problem: the canonical problem.
            dtype: the operands' dtype.
            platform: the platform being lowered for, ``None`` when not known yet.

        Returns:
            A sentence for ``explain`` and the error of ``engine="..."``, or ``None``.
        """
        ...

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        """The product `(N, *out_spatial, O)` in the problem's accumulation dtype.

        Args:
            problem: the canonical problem.
            x: the input ``(N, *S, C)``.
            w: the kernel ``(*K, I, O)``.

        Returns:
            The output.
        """
        ...

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        """The input and kernel gradients, from the forward's `y` and its cotangent `g`.

        Args:
            problem: the canonical problem.
            x: the input.
            w: the kernel.
            y: the forward's output.
            g: the output's cotangent.
            need: which gradients are needed, ``(input, kernel)``; the others may be zeros.

        Returns:
            ``(gx, gw)``.
        """
        ...

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        """The forward-mode tangent of the output, linear in `(tx, tw)`.

        Args:
            problem: the canonical problem.
            x: the input.
            w: the kernel.
            y: the forward's output.
            tx: the input's tangent.
            tw: the kernel's tangent.
            active: which tangents are not zero.

        Returns:
            The output's tangent.
        """
        ...

    def describe(self, problem: Problem, dtype: DTypeLike) -> tuple[str, ...]:
        """The path this engine takes for `problem`, one line per fact (for `explain`).

        Args:
            problem: the canonical problem.
            dtype: the operands' dtype.

        Returns:
            The lines.
        """
        del problem, dtype
        return ()

    def opaque_call(self, platform: str) -> bool:
        """Whether the lowering for `platform` is a custom call the partitioner would
        replicate (the core then partitions it over batch and output features).

        Args:
            platform: the platform being lowered for.

        Returns:
            True for an opaque custom call.
        """
        del platform
        return False

    def backward_reads_output(self, problem: Problem) -> bool:
        """Whether `backward` finds max/min winners (logsumexp weights) from the `y` given.

        Args:
            problem: the canonical problem.

        Returns:
            True if the backward needs the forward's output.
        """
        del problem
        return False

    def records_winners(self, problem: Problem, platform: str) -> bool:
        """Whether the forward records the winners for the backward (`forward_recording`).

        Args:
            problem: the canonical problem.
            platform: the platform being lowered for.

        Returns:
            True if `forward_recording` keeps a record that `backward_recorded` reads.
        """
        del problem, platform
        return False

    def forward_recording(self, problem: Problem, x: Array, w: Array) -> tuple[Array, Array]:
        """The forward and its record of the winners (by default none: `-1` everywhere).

        The record is an int32 array of the output's shape whose meaning is the engine's own;
        the core only carries it (a batch or output-feature split keeps it with its outputs).

        Args:
            problem: the canonical problem.
            x: the input.
            w: the kernel.

        Returns:
            ``(y, record)``.
        """
        y = self.forward(problem, x, w)
        return y, jax.numpy.full(y.shape, -1, jax.numpy.int32)

    def backward_recorded(self, problem: Problem, x: Array, w: Array, y: Array,
                          record: Array, g: Array, need: tuple[bool, bool]
                          ) -> tuple[Array, Array]:
        """`backward` given the record of `forward_recording` (by default it is ignored).

        Args:
            problem: the canonical problem.
            x: the input.
            w: the kernel.
            y: the forward's output.
            record: the recording forward's record of the winners.
            g: the output's cotangent.
            need: which gradients are needed.

        Returns:
            ``(gx, gw)``.
        """
        del record
        return self.backward(problem, x, w, y, g, need)

    def per_example_kernel_gradient(self, problem: Problem) -> PerExampleRule | None:
        """Per-example kernel gradients in standard products, or `None` (the core's rule).

        Args:
            problem: the canonical problem.

        Returns:
            ``(fn, both)`` as the core's `batching._per_example_rule`, or ``None``.
        """
        del problem
        return None


_lock = threading.Lock()
_factories: dict[str, Callable[[], Engine]] = {}
_engines: dict[str, Engine] = {}


def register(name: str, factory: Callable[[], Engine]) -> None:
    """Registers an engine under `name`, built by `factory` on first use.

    A factory lets an engine with heavy imports (Pallas) load only when it is asked for.

    Args:
      name: the value of `engine=` that selects it.
      factory: a function returning the engine (it may raise `ImportError`).

    Example:
      >>> from jaxconv._src.core import engine
      >>> "xla" in engine.names()
      True
    """
    if name == AUTO:
        raise ValueError(f"`name` {AUTO!r} is the planner's choice, not an engine.")
    with _lock:
        _factories[name] = factory
        _engines.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered engines' names, in registration order.

    Returns:
      The names.
    """
    return tuple(_factories)


def get(name: str) -> Engine:
    """The engine registered as `name` (built on first use; `ImportError` if it cannot be).

    Args:
      name: a registered engine's name.

    Returns:
      The engine.
    """
    with _lock:
        found = _engines.get(name)
        factory = _factories.get(name)
    if found is not None:
        return found
    if factory is None:
        raise ValueError(f"`engine` must be one of {(AUTO, *names())}, got {name!r}.")
    built = factory()
    with _lock:
        _engines[name] = built
    return built

"""The Pallas engine on the core's protocol, and `generic_conv`, the engine called through
the core's primitive with its own block sizes or backend (tests, tuning)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxconv._src.core import algebra, canonical, primitive
from jaxconv._src.core import engine as registry
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import capabilities
from jaxconv._src.core.geometry import Geometry
from jaxconv._src.core.problem import DEFAULT_MAX_BLOCK_BYTES, Problem
from jaxconv._src.engines import taps
from jaxconv._src.engines.pallas.config import Spec
from jaxconv._src.engines.pallas.orchestration import _backward, _forward
from jaxconv._src.engines.pallas.platforms import (
    Backend,
    BlockSizes,
    _on_platforms,
    platform_backends,
)

Array = jax.Array


def _spec_of(problem: Problem) -> Spec:
    """The problem's static Pallas parameters; `Problem.options` holds the backends (per
    platform) when the caller chose them (`generic_conv`), else each platform's default."""
    backends = problem.options or platform_backends()
    return Spec(problem.op, problem.geom, problem.acc_dtype, backends, problem.max_block_bytes)


def forward(problem: Problem, x: Array, w: Array) -> Array:
    """The product of canonical ``x`` and ``w`` in the accumulation dtype.

    Args:
      problem: the canonical problem.
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, I, O)`` kernel.

    Returns:
      ``(N, *out_spatial, O)``.
    """
    spec = _spec_of(problem)
    y = _on_platforms(
        spec.backends, lambda be: functools.partial(_forward, spec.config(be)), x, w)
    return y.astype(problem.acc_dtype)


def backward(problem: Problem, x: Array, w: Array, y: Array, g: Array,
             need: tuple[bool, bool]) -> tuple[Array, Array]:
    """The input and kernel gradients from the forward's ``y`` (not recomputed).

    ``sum``, ``max``, ``min`` and ``logsumexp`` have gradient kernels; other reduces
    (``prod``, user callables) take the XLA engine's gradient of the same product.

    Args:
      problem: the canonical problem.
      x: the input.
      w: the kernel.
      y: the forward's output.
      g: its cotangent.
      need: which gradients are used (both are computed).

    Returns:
      ``(gx, gw)``.
    """
    del need
    spec = _spec_of(problem)
    g = g.astype(problem.acc_dtype)
    if problem.op.reduce_name in algebra.HAND_VJP_REDUCES:
        return _on_platforms(
            spec.backends, lambda be: functools.partial(_backward, spec.config(be)), x, w, y, g)

    def f(xv: Array, wv: Array) -> Array:
        return canonical.canonical_conv(
            xv, wv, problem.geom, problem.op, engine="xla",
            preferred_element_type=problem.acc_dtype, max_block_bytes=problem.max_block_bytes)

    _, vjp = jax.vjp(f, x, w)
    gx, gw = vjp(g)
    return gx.astype(x.dtype), gw.astype(w.dtype)


class PallasEngine(registry.Engine):
    """The Pallas kernels on the core's protocol: every problem on every platform
    (interpret mode on CPU); forward-mode tangents are the XLA engine's formulas."""

    name = "pallas"

    def refusal(self, problem: Problem, dtype: Any, platform: str | None) -> str | None:
        """None: the Pallas engine serves every problem it is asked for."""
        del problem, dtype, platform
        return None

    def forward(self, problem: Problem, x: Array, w: Array) -> Array:
        """The Pallas forward (`orchestration.forward`)."""
        return forward(problem, x, w)

    def backward(self, problem: Problem, x: Array, w: Array, y: Array, g: Array,
                 need: tuple[bool, bool]) -> tuple[Array, Array]:
        """The Pallas backward (`orchestration.backward`)."""
        return backward(problem, x, w, y, g, need)

    def tangent(self, problem: Problem, x: Array, w: Array, y: Array, tx: Array, tw: Array,
                active: tuple[bool, bool]) -> Array:
        """The XLA engine's forward-mode tangent (no Pallas tangent kernels)."""
        return registry.get("xla").tangent(problem, x, w, y, tx, tw, active)

    def describe(self, problem: Problem, dtype: Any) -> tuple[str, ...]:
        """One line: Pallas kernels under the op's reduce, and where each platform runs them."""
        del dtype
        return (f"Pallas kernels under {capabilities(problem.op).reduce!r} "
                "(interpret mode on CPU, Triton on GPU, Mosaic on TPU)",)

    def opaque_call(self, platform: str) -> bool:
        """Whether the core wraps the kernels in `custom_partitioning` on `platform`.

        A Triton (CUDA / ROCm) kernel is a custom call that the SPMD partitioner replicates
        (every device computing the whole batch), and the interpret-mode loops on CPU
        partition badly (all-gathers); wrapped, each device runs the kernels on its local
        batch and output features. GPU custom calls are partitioned this way elsewhere too
        (NVIDIA TransformerEngine's JAX bindings). Mosaic (TPU) is not wrapped: there a
        `custom_partitioning` call fails to compile on several devices (jax#38196); JAX
        refuses a Mosaic call on a multi-device automatic mesh, and explicit-axes meshes
        partition it by `shard_map` instead.

        Args:
            platform: the platform being lowered for.

        Returns:
            True on ``"cpu"``, ``"cuda"`` and ``"rocm"``.

        Example:
            >>> from jaxconv._src.engines.pallas.engine import ENGINE
            >>> ENGINE.opaque_call("cuda"), ENGINE.opaque_call("tpu")
            (True, False)
        """
        return platform in ("cpu", "cuda", "rocm")


ENGINE = PallasEngine()


def generic_conv(
    x: Array,
    w: Array,
    geom: Geometry,
    op: Op,
    *,
    preferred_element_type: Any | None = None,
    max_block_bytes: int | None = None,
    interpret: bool | None = None,
    blocks: BlockSizes | None = None,
    backend: Backend | None = None,
) -> Array:
    """Generalized convolution on canonical layouts with Pallas kernels of a chosen form.

    The call goes through the core's primitive (``jit``, ``grad``, ``jvp`` and ``vmap``
    as for ``engine="pallas"``), the op taken as given (no factoring); the backends travel
    in `Problem.options`. The kernels are chosen per platform when the program is lowered:
    interpret mode on CPU, Triton on CUDA / ROCm, Mosaic on TPU.

    Args:
      x: ``(N, *spatial, C)`` input.
      w: ``(*window, C // groups, O)`` kernel.
      geom: the static geometry (padding already resolved to pairs).
      op: the product.
      preferred_element_type: accumulation / output dtype, as in ``lax``.
      max_block_bytes: bound on intermediate bytes; the Pallas kernels keep one
        ``(bm, bn)`` tile per program, so it only matters for the XLA-engine backward of
        reduces without a kernel gradient (``prod``, user callables).
      interpret: ``True``: interpret mode on every platform (debugging); default: each
        platform's kernel.
      blocks: tile sizes for every platform (default: each platform's).
      backend: one `Backend` for every platform (tests; overrides the other two).

    Returns:
      ``(N, *out_spatial, O)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxconv import ops
      >>> from jaxconv._src.core.geometry import Geometry
      >>> geom = Geometry((4,), (2,), (1,), ((0, 0),), (1,), (1,), 1)
      >>> generic_conv(jnp.arange(4.0).reshape(1, 4, 1), jnp.zeros((2, 1, 1)), geom,
      ...              ops.max_plus)[0, :, 0]
      Array([1., 2., 3.], dtype=float32)
    """
    x, w, out_dtype, acc_dtype = taps.resolve_dtypes(x, w, op, preferred_element_type)
    n, o = x.shape[0], w.shape[-1]
    if n == 0 or o == 0:
        return jnp.zeros((n, *geom.out_spatial, o), out_dtype)
    mbb = DEFAULT_MAX_BLOCK_BYTES if max_block_bytes is None else int(max_block_bytes)
    backends = platform_backends(interpret=interpret, blocks=blocks, backend=backend)
    problem = Problem(op.replace(post=None), geom, ENGINE.name, acc_dtype, mbb, None,
                      jnp.dtype(x.dtype), backends)
    return taps.finish(primitive.conv(x, w, problem), op, out_dtype)

"""Where the Pallas kernels run: block sizes and backends per platform, chosen at lowering."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxconv._src.core import algebra
from jaxconv._src.core.algebra import Op

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the semiring matmul: ``bm x bn`` output tiles, ``bk``-deep K blocks.

    ``pow2``: pad every extent a kernel sees whole to a power of two and keep tiles powers
    of two (Triton only handles power-of-two block shapes). ``red``: rows of M one program
    of the ``dw`` kernel reduces (the partial sums of the chunks are added outside).
    """

    bm: int
    bn: int
    bk: int
    pow2: bool = False
    red: int = 256


@dataclasses.dataclass(frozen=True)
class Backend:
    """How the kernels of one platform are built.

    Args:
      kind: ``"interpret"`` (any platform, the CPU's), ``"triton"`` (CUDA / ROCm) or
        ``"mosaic"`` (TPU).
      blocks: the tile sizes.
      style: ``"rank1"``: one column of ``a`` and one row of ``b`` loaded per step at a
        dynamic offset (Triton's pointer loads); ``"chunked"``: aligned ``lane``-wide chunks
        loaded, then walked with static slices (Mosaic's layout rules).
      lane: chunk width of the ``"chunked"`` style (128 on TPU).
      num_warps: Triton warps per program.
      num_stages: Triton software-pipelining stages.
    """

    kind: str
    blocks: BlockSizes
    style: str = "rank1"
    lane: int = 128
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        """Checks ``kind`` and ``style`` (``ValueError`` naming the field)."""
        if self.kind not in ("interpret", "triton", "mosaic"):
            raise ValueError(f"Backend: `kind` must be 'interpret', 'triton' or 'mosaic', "
                             f"got {self.kind!r}.")
        if self.style not in ("rank1", "chunked"):
            raise ValueError(f"Backend: `style` must be 'rank1' or 'chunked', got {self.style!r}.")


GPU_BLOCKS = BlockSizes(64, 64, 32, pow2=True, red=256)


TPU_BLOCKS = BlockSizes(128, 128, 128, red=128)


INTERPRET_BLOCKS = BlockSizes(8, 8, 8, red=16)


# The platforms ``lax.platform_dependent`` dispatches on, and their kernels.
PLATFORM_BACKENDS: dict[str, Backend] = {
    "cpu": Backend("interpret", INTERPRET_BLOCKS),
    "cuda": Backend("triton", GPU_BLOCKS),
    "rocm": Backend("triton", GPU_BLOCKS),
    "tpu": Backend("mosaic", TPU_BLOCKS, style="chunked"),
}


def platform_backends(
    *, interpret: bool | None = None, blocks: BlockSizes | None = None,
    backend: Backend | None = None,
) -> tuple[tuple[str, Backend], ...]:
    """The ``(platform, Backend)`` pairs a call dispatches on.

    Args:
      interpret: ``True``: interpret mode on every platform (debugging); ``None`` / ``False``:
        each platform's kernel (CPU has no compiled Pallas, so it always interprets).
      blocks: tile sizes for every platform (default: each platform's).
      backend: one backend for every platform (overrides the other two).

    Returns:
      A hashable tuple, a static argument.
    """
    if backend is not None:
        return tuple((p, backend) for p in PLATFORM_BACKENDS)
    out = []
    for p, be in PLATFORM_BACKENDS.items():
        if interpret:
            be = Backend("interpret", INTERPRET_BLOCKS)
        if blocks is not None:
            be = dataclasses.replace(be, blocks=blocks)
        out.append((p, be))
    return tuple(out)


def _on_platforms(
    backends: tuple[tuple[str, Backend], ...], make: Callable[[Backend], Callable[..., Any]],
    *args: Any,
) -> Any:
    """``make(backend)(*args)`` for the platform the program is lowered for.

    Args:
        backends: ``(platform, backend)`` pairs.
        make: builds the function of one backend.
        *args: its arguments.

    Returns:
        The result (one branch per backend under ``lax.platform_dependent``).
    """
    kinds = {be for _, be in backends}
    if len(kinds) == 1:
        return make(next(iter(kinds)))(*args)
    cache: dict[Backend, Callable[..., Any]] = {}
    branches = {p: cache.setdefault(be, make(be)) for p, be in backends}
    return lax.platform_dependent(*args, **branches)


def _ident(op: Op, dtype: Any) -> float | int:
    """The reduce's identity as a Python scalar: a kernel may not capture array constants."""
    with jax.ensure_compile_time_eval():
        return np.asarray(algebra.identity_value(op, dtype)).item()


def _round_up(v: int, m: int) -> int:
    """``v`` rounded up to a multiple of ``m``."""
    return -(-v // m) * m


def _next_pow2(v: int) -> int:
    """The smallest power of two ``>= v`` (1 for ``v <= 1``)."""
    return 1 << max(0, int(v) - 1).bit_length()


def _fit(blocks: BlockSizes, m: int, n: int, k: int) -> BlockSizes:
    """Shrinks tiles for small problems (never above the block size).

    Tiles become multiples of 8 (then they equal the whole padded extent), or powers of two
    (at least 16) with ``pow2``.

    Args:
        blocks: the backend's block sizes.
        m: the rows.
        n: the output features.
        k: the contraction length.

    Returns:
        The block sizes for this problem.
    """
    if blocks.pow2:
        def fit(b: int, v: int) -> int:
            return min(b, max(16, _next_pow2(v)))
    else:
        def fit(b: int, v: int) -> int:
            return min(b, _round_up(v, 8))
    return dataclasses.replace(blocks, bm=fit(blocks.bm, m), bn=fit(blocks.bn, n),
                               bk=fit(blocks.bk, k))


def _padded(v: int, block: int, pow2: bool) -> int:
    """Extent of a padded axis: a multiple of ``block`` (a power of two with ``pow2``)."""
    return max(block, _next_pow2(v)) if pow2 else _round_up(v, block)


def _pad_to(a: Array, shape: tuple[int, ...]) -> Array:
    """``a`` zero-padded at the end of each axis up to ``shape``.

    Args:
        a: the array.
        shape: the shape wanted (no axis shorter than ``a``'s).

    Returns:
        The padded array.
    """
    widths = [(0, s - d) for d, s in zip(a.shape, shape, strict=True)]
    if all(hi == 0 for _, hi in widths):
        return a
    return jnp.pad(a, widths)


def _call_options(backend: Backend, ndims: int, arbitrary_last: bool = False
                  ) -> dict[str, Any]:
    """``pallas_call`` keywords selecting the backend.

    Every grid axis is parallel, except the last with ``arbitrary_last`` (a reduction the
    TPU runs in order, accumulating into the resident output block).

    Args:
        backend: the backend.
        ndims: the grid's number of axes.
        arbitrary_last: whether the last grid axis is a sequential reduction.

    Returns:
        The keywords.
    """
    if backend.kind == "interpret":
        return {"interpret": True}
    if backend.kind == "triton":
        from jax.experimental.pallas import triton as pltriton

        return {"compiler_params": pltriton.CompilerParams(
            num_warps=backend.num_warps, num_stages=backend.num_stages)}
    from jax.experimental.pallas import tpu as pltpu

    sem = ("parallel",) * (ndims - 1) + ("arbitrary" if arbitrary_last else "parallel",)
    return {"compiler_params": pltpu.CompilerParams(dimension_semantics=sem)}


def _chunk(backend: Backend, extent: int) -> int:
    """Width of the static chunks the ``"chunked"`` style walks an axis of ``extent`` in."""
    return backend.lane if extent % backend.lane == 0 else extent


def _take(v: Array, j: int, axis: int) -> Array:
    """Static slice ``j:j+1`` of ``v`` along ``axis`` (``v`` itself when it has one entry)."""
    if v.shape[axis] == 1:
        return v
    return lax.slice_in_dim(v, j, j + 1, axis=axis)

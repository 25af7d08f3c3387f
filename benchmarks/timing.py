"""Paired, interleaved timing, compiled memory and compile time: what every benchmark shares.

A ratio measured on a shared, noisy machine is only meaningful when both sides run under
the same load. `paired` therefore times the reference (usually lax) and the function under
test alternately, once each per round, swapping their order every round, and reports the
median (and the best) of the per-round ratios, not a ratio of medians.

Example::

    from benchmarks import timing
    r = timing.paired(jax.jit(lax_conv), jax.jit(my_conv), (x, w), rounds=11)
    print(f"{r.ratio:.2f}x lax (best {r.best:.2f}x, spread {r.spread:.0%})")
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Paired:
    """One paired measurement of ``fn`` against ``ref``.

    Attributes:
      ratio: the median of the rounds' ``fn / ref`` time ratios.
      best: the smallest of those ratios.
      spread: their interquartile range over the median (0 with fewer than two rounds).
      ms: the median milliseconds of one call of ``fn``.
      ref_ms: the median milliseconds of one call of ``ref``.
    """

    ratio: float
    best: float
    spread: float
    ms: float
    ref_ms: float


def _seconds(fn: Callable[..., Any], args: Sequence[Any], calls: int) -> float:
    """Seconds per call of ``fn(*args)`` over ``calls`` calls, waiting for the last result."""
    t0 = time.perf_counter()
    out = None
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / calls


def calls_for(fn: Callable[..., Any], args: Sequence[Any], target_s: float,
              most: int = 100) -> int:
    """How many calls of ``fn`` make one sample of about ``target_s`` seconds (1 to
    ``most``), from one timed call (after a warm-up call)."""
    jax.block_until_ready(fn(*args))
    return max(1, min(most, int(target_s / max(_seconds(fn, args, 1), 1e-6))))


def paired(ref: Callable[..., Any], fn: Callable[..., Any], args: Sequence[Any] = (), *,
           rounds: int = 7, calls: int | tuple[int, int] = 1, warmup: int = 1) -> Paired:
    """Times ``ref`` and ``fn`` on ``args`` paired and interleaved.

    Args:
      ref: the reference (e.g. the jitted lax product).
      fn: the function under test (jitted).
      args: the arguments of both.
      rounds: rounds; each times both once, in an order that alternates between rounds.
      calls: calls per sample, the same for both or ``(ref_calls, fn_calls)``.
      warmup: untimed calls of each before the first round (compilation).

    Returns:
      A `Paired` with the median and best ratio, the spread and the median times.
    """
    ref_calls, fn_calls = (calls, calls) if isinstance(calls, int) else calls
    for _ in range(warmup):
        jax.block_until_ready(ref(*args))
        jax.block_until_ready(fn(*args))
    t_ref, t_fn = [], []
    for r in range(rounds):
        if r % 2:
            t_fn.append(_seconds(fn, args, fn_calls))
            t_ref.append(_seconds(ref, args, ref_calls))
        else:
            t_ref.append(_seconds(ref, args, ref_calls))
            t_fn.append(_seconds(fn, args, fn_calls))
    ratios = [f / b for f, b in zip(t_fn, t_ref, strict=True)]
    med = statistics.median(ratios)
    spread = 0.0
    if len(ratios) >= 2:
        q1, q3 = np.percentile(ratios, [25, 75])
        spread = float((q3 - q1) / med)
    return Paired(med, min(ratios), spread, 1e3 * statistics.median(t_fn),
                  1e3 * statistics.median(t_ref))


def memory_bytes(fn: Callable[..., Any], args: Sequence[Any]) -> int | None:
    """Temp + output bytes of ``jax.jit(fn)`` compiled for ``args``, or ``None`` where the
    backend has no memory analysis."""
    try:
        stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without memory analysis
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def compile_seconds(fn: Callable[..., Any], args: Sequence[Any], *,
                    fresh: bool = False) -> float:
    """Seconds to compile ``jax.jit(fn)`` for ``args``, after lowering (``fresh``: JAX's
    caches cleared first, so nothing compiled before is reused)."""
    if fresh:
        jax.clear_caches()
    lowered = jax.jit(fn).lower(*args)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0

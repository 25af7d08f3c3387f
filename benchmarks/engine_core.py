"""The engine core's yardsticks: vmap against the batched call, compile time, eager reuse.

    python -m benchmarks.engine_core            # layer A, every built-in op and two user ops
    python -m benchmarks.engine_core --smoke    # tiny shapes, a few seconds (run by the tests)
    python -m benchmarks.engine_core --compile --engine xla   # compile and run time vs lax

For each op on layer A (8x32x32x64 NHWC -> 64, 3x3 SAME, f32):

- `vmap / batched`: `jax.vmap` over single images against the batched call, forward and
  forward+backward: paired, interleaved timing (each round times both once, alternately;
  the figure is the median of the rounds' ratios) and the compiled temp memory of each;
- `compile s`: the compile time of `jax.jit(jax.grad(conv))`, next to lax's;
- `eager / jit`: a repeated un-jitted call against the jitted one, after the first call.

With `--compile` (and `--engine`, default `auto`), for each op: the compile time of
`jax.jit(jax.grad(conv))` (median of `--compiles` fresh compilations, caches cleared between
them) next to lax's, measured alternately in the same run, and the run time of the forward
and of forward+backward as a ratio to lax's (paired, interleaved, median of the rounds).
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from benchmarks import timing

Array = jax.Array
DN = ("NHWC", "HWIO", "NHWC")
USER_OPS = {
    "user_tanh_max": jaxconv.Op(lambda a, b: jnp.tanh(a - b), "max", identity=-np.inf,
                                name="user_tanh_max"),
    "user_clip_max": jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max",
                                identity=-np.inf, name="user_clip_max"),
}
OPS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2", "l2_exact", "log",
       "xnor", *USER_OPS)


def _op(name: str) -> Any:
    return USER_OPS.get(name) or jaxconv.ops.get(name)


def paired_ratio(ref: Callable[[], Any], fn: Callable[[], Any], rounds: int) -> float:
    """The median of the rounds' ``fn / ref`` time ratios (`timing.paired`)."""
    return timing.paired(ref, fn, rounds=rounds).ratio


def temp_mib(fn: Callable[..., Any], *args: Any) -> float:
    return (timing.memory_bytes(fn, args) or 0) / 2**20


def compile_seconds(fn: Callable[..., Any], *args: Any) -> float:
    """Seconds to compile ``jax.jit(fn)`` for ``args`` (after lowering; caches cleared)."""
    return timing.compile_seconds(fn, args, fresh=True)


def paired_compile(ref: Callable[..., Any], fn: Callable[..., Any], args: tuple,
                   repeats: int) -> tuple[float, float]:
    """Median compile seconds of ``ref`` and ``fn``, compiled alternately."""
    refs, fns = [], []
    for _ in range(repeats):
        refs.append(compile_seconds(ref, *args))
        fns.append(compile_seconds(fn, *args))
    return statistics.median(refs), statistics.median(fns)


def _row(name: str, conv: Callable, x: Array, w: Array, rounds: int) -> dict[str, Any]:
    """One op's measurements (see the module docstring)."""

    def loss(a, b):
        return jnp.sum(conv(a, b))

    def per_image(a, b):
        return conv(a[None], b)

    vmapped = jax.vmap(per_image, in_axes=(0, None))
    grad = jax.grad(loss, argnums=(0, 1))
    # An unbatched layer mapped over the batch inside a summed loss (equinox style) ...
    grad_of_vmap = jax.grad(lambda a, b: jnp.sum(vmapped(a, b)), argnums=(0, 1))
    # ... and per-example gradients (each example's kernel gradient kept apart), of a loss
    # whose cotangent differs per example (a summed loss's is one constant, which lets
    # JAX skip the per-example products), against the batched gradient of the same loss.
    def sq_loss(a, b):
        return 0.5 * jnp.sum(conv(a, b) ** 2)

    sq_grad = jax.grad(sq_loss, argnums=(0, 1))
    per_example = jax.vmap(jax.grad(lambda a, b: sq_loss(a[None], b), argnums=(0, 1)),
                           in_axes=(0, None))
    row: dict[str, Any] = {"op": name}
    row["compile"] = compile_seconds(lambda a, b: grad(a, b), x, w)
    jb, jv, gb, gvm, gsq, gpe = (jax.jit(f) for f in (conv, vmapped, grad, grad_of_vmap,
                                                      sq_grad, per_example))
    row["vmap_fwd"] = paired_ratio(lambda: jb(x, w), lambda: jv(x, w), rounds)
    row["vmap_fb"] = paired_ratio(lambda: gb(x, w), lambda: gvm(x, w), rounds)
    row["per_example"] = paired_ratio(lambda: gsq(x, w), lambda: gpe(x, w), rounds)
    row["mem_fwd"] = (temp_mib(conv, x, w), temp_mib(vmapped, x, w))
    row["mem_fb"] = (temp_mib(grad, x, w), temp_mib(grad_of_vmap, x, w))
    conv(x, w).block_until_ready()  # the first eager call compiles
    row["eager"] = paired_ratio(lambda: jb(x, w), lambda: conv(x, w), rounds)
    return row


def _conv(name: str, engine: str = "auto") -> Callable[[Array, Array], Array]:
    if name == "lax":
        def conv(a, b):
            return lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN)
    else:
        def conv(a, b, op=_op(name)):
            return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN,
                                                op=op, engine=engine)
    return conv


def _data(shape: tuple[int, ...], cout: int) -> tuple[Array, Array]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) * 0.1, jnp.float32)
    return x, w


def compile_run(shape: tuple[int, ...], cout: int, ops: tuple[str, ...], engine: str,
                rounds: int, compiles: int) -> list[dict]:
    """Compile time of ``jit(grad)`` next to lax's and run time ratios to lax, per op."""
    x, w = _data(shape, cout)
    print(f"engine={engine}: compile s of jit(grad) (median of {compiles}, lax alternately); "
          f"run time / lax (forward; forward+backward), median of {rounds} paired rounds")

    def grad_of(conv):
        return jax.grad(lambda a, b: jnp.sum(conv(a, b)), argnums=(0, 1))

    ref = _conv("lax")
    jref, gref = jax.jit(ref), jax.jit(grad_of(ref))
    rows = []
    for name in ops:
        conv = _conv(name, engine)
        lax_s, op_s = paired_compile(grad_of(ref), grad_of(conv), (x, w), compiles)
        jf, gf = jax.jit(conv), jax.jit(grad_of(conv))
        fwd = paired_ratio(lambda: jref(x, w), lambda jf=jf: jf(x, w), rounds)
        fb = paired_ratio(lambda: gref(x, w), lambda gf=gf: gf(x, w), rounds)
        row = {"op": name, "compile": op_s, "compile_lax": lax_s, "fwd": fwd, "fb": fb}
        rows.append(row)
        print(f"{name:14s} compile {op_s:.2f} s (lax {lax_s:.2f} s)  fwd {fwd:.2f}x  "
              f"f+b {fb:.2f}x lax", flush=True)
    return rows


def run(shape: tuple[int, ...], cout: int, ops: tuple[str, ...], rounds: int) -> list[dict]:
    x, w = _data(shape, cout)
    print("vmap/batched: time of jax.vmap over single images / the batched call (forward; "
          "grad of the summed vmapped loss; per-example gradients of a squared loss / its "
          "batched gradient); temp+output MiB batched/"
          "vmapped; compile s of jit(grad); eager / jitted call")
    rows = []
    for name in ("lax", *ops):
        row = _row(name, _conv(name), x, w, rounds)
        rows.append(row)
        print(f"{name:14s} fwd {row['vmap_fwd']:.2f}x  f+b {row['vmap_fb']:.2f}x  "
              f"per-example {row['per_example']:.2f}x  MiB fwd {row['mem_fwd'][0]:.1f}/"
              f"{row['mem_fwd'][1]:.1f} f+b {row['mem_fb'][0]:.1f}/{row['mem_fb'][1]:.1f}  "
              f"compile {row['compile']:.2f} s  eager/jit {row['eager']:.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two ops")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", nargs="*", default=None)
    parser.add_argument("--compile", action="store_true",
                        help="only compile time and run time against lax")
    parser.add_argument("--engine", default="auto", help="engine for --compile")
    parser.add_argument("--compiles", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    if args.compile:
        shape, cout = ((2, 6, 6, 4), 4) if args.smoke else ((8, 32, 32, 64), 64)
        ops = tuple(args.ops or ("max_plus", "adder", "log", "user_tanh_max",
                                 "user_clip_max"))
        return compile_run(shape, cout, ops, args.engine, 2 if args.smoke else args.rounds,
                           1 if args.smoke else args.compiles)
    if args.smoke:
        return run((2, 6, 6, 4), 4, tuple(args.ops or ("max_plus", "user_clip_max")), 2)
    return run((8, 32, 32, 64), 64, tuple(args.ops or OPS), args.rounds)


if __name__ == "__main__":
    main()

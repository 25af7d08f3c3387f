"""The engine core's yardsticks: vmap against the batched call, compile time, eager reuse.

    python -m benchmarks.engine_core            # layer A, every built-in op and two user ops
    python -m benchmarks.engine_core --smoke    # tiny shapes, a few seconds (run by the tests)

For each op on layer A (8x32x32x64 NHWC -> 64, 3x3 SAME, f32):

- `vmap / batched`: `jax.vmap` over single images against the batched call, forward and
  forward+backward: paired, interleaved timing (each round times both once, alternately;
  the figure is the median of the rounds' ratios) and the compiled temp memory of each;
- `compile s`: the compile time of `jax.jit(jax.grad(conv))`, next to lax's;
- `eager / jit`: a repeated un-jitted call against the jitted one, after the first call.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv

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


def _block(tree: Any) -> None:
    jax.tree_util.tree_map(lambda a: a.block_until_ready(), tree)


def paired_ratio(ref: Callable[[], Any], fn: Callable[[], Any], rounds: int) -> tuple:
    """`(median ratio fn/ref, best ratio, median ref seconds)`, timed alternately."""
    _block(ref())
    _block(fn())
    ratios, refs = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        _block(ref())
        t1 = time.perf_counter()
        _block(fn())
        t2 = time.perf_counter()
        ratios.append((t2 - t1) / (t1 - t0))
        refs.append(t1 - t0)
    return statistics.median(ratios), min(ratios), statistics.median(refs)


def temp_mib(fn: Callable[..., Any], *args: Any) -> float:
    stats = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / 2**20


def compile_seconds(fn: Callable[..., Any], *args: Any) -> float:
    lowered = jax.jit(fn).lower(*args)
    t0 = time.perf_counter()
    lowered.compile()
    return time.perf_counter() - t0


def run(shape: tuple[int, ...], cout: int, ops: tuple[str, ...], rounds: int) -> list[dict]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, shape[-1], cout)) * 0.1, jnp.float32)

    def lax_conv(a, b):
        return lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN)

    lax_loss = jax.grad(lambda a, b: jnp.sum(lax_conv(a, b)), argnums=(0, 1))
    rows = []
    lax_compile = compile_seconds(lax_loss, x, w)
    for name in ops:
        op = _op(name)

        def conv(a, b, op=op):
            return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN,
                                                op=op)

        def loss(a, b, conv=conv):
            return jnp.sum(conv(a, b))

        grad = jax.grad(loss, argnums=(0, 1))

        def per_image(a, b, conv=conv):
            return conv(a[None], b)[0]

        def per_image_grad(a, b, loss=loss):
            return jax.grad(lambda u, v: loss(u[None], v), argnums=(0, 1))(a, b)

        vmapped = jax.vmap(per_image, in_axes=(0, None))
        vmapped_grad = jax.vmap(per_image_grad, in_axes=(0, None))
        row: dict[str, Any] = {"op": name}
        jb, jv = jax.jit(conv), jax.jit(vmapped)
        row["vmap_fwd"] = paired_ratio(lambda: jb(x, w), lambda: jv(x, w), rounds)[0]
        row["mem_fwd"] = (temp_mib(conv, x, w), temp_mib(vmapped, x, w))
        gb, gv = jax.jit(grad), jax.jit(vmapped_grad)
        row["vmap_fb"] = paired_ratio(lambda: gb(x, w), lambda: gv(x, w), rounds)[0]
        row["mem_fb"] = (temp_mib(grad, x, w), temp_mib(vmapped_grad, x, w))
        row["compile"] = (compile_seconds(grad, x, w), lax_compile)
        conv(x, w).block_until_ready()  # the first eager call compiles
        row["eager"] = paired_ratio(lambda: jb(x, w), lambda: conv(x, w), rounds)[0]
        rows.append(row)
        print(f"{name:14s} vmap/batched fwd {row['vmap_fwd']:.2f}x f+b {row['vmap_fb']:.2f}x  "
              f"temp MiB fwd {row['mem_fwd'][0]:.1f}/{row['mem_fwd'][1]:.1f} "
              f"f+b {row['mem_fb'][0]:.1f}/{row['mem_fb'][1]:.1f}  "
              f"compile jit(grad) {row['compile'][0]:.2f} s (lax {row['compile'][1]:.2f} s)  "
              f"eager/jit {row['eager']:.2f}x", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, two ops")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ops", nargs="*", default=None)
    args = parser.parse_args(argv)
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, "
          f"{jax.devices()[0].client.platform_version if hasattr(jax.devices()[0], 'client') else ''}")
    if args.smoke:
        return run((2, 6, 6, 4), 4, tuple(args.ops or ("max_plus", "user_clip_max")), 2)
    return run((8, 32, 32, 64), 64, tuple(args.ops or OPS), args.rounds)


if __name__ == "__main__":
    main()

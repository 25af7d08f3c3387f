"""bfloat16 / float16 products against the same op in float32 (issue 22: bf16 at no more
than its own float32 time), paired and interleaved in one process.

Each round times, one after the other, the op in float32, in the low dtype, (with ``--old``)
in the low dtype by the conversions XLA runs around the float32 call (the path before
``csrc/kernel_bf16fuse_low.h``), and (with ``--norec``) in the low dtype without the recording
forward and the one-call backward (the path before ``csrc/kernel_lowrec_backward.h``: XLA's
conversions around the backward, every output's window scanned), forward and
forward+backward (``jax.grad`` of a sum of the float32-converted output, both gradients).
Per row: the median over rounds of the per-round ratio to float32 (which cancels drift of a
shared machine's load), the per-call minimum in ms, and the median over rounds of the
per-round ratio of process CPU time (every thread, XLA's included).

``--ops`` takes built-in op names and the user ops of `USER_OPS` (a combine compiled by the
native engine's code generator, as researchers write them).

Example::

    python -m benchmarks.low_own --layers A,E --ops max_plus,min_max --rounds 9 --old --norec
    JAXCONV_NATIVE_THREADS=1 python -m benchmarks.low_own --ops clip_max,gauss_sum --old
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv
from jaxconv._src.engines.native import low_route

# The native engine's low route (JAXCONV_NATIVE_LOW) each kind is traced with.
ROUTES = {"old": "convert", "norec": "call"}

LAYERS = {"A": ((8, 32, 32, 64), (3, 3, 64, 64)), "E": ((256, 1024), (1024, 1024))}

# User ops (compiled kernels), by the name --ops takes.
USER_OPS = {
    "clip_max": jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="clip_max"),
    "tanh_sub_max": jaxconv.Op(lambda a, b: jnp.tanh(a - b), "max", name="tanh_sub_max"),
    "max_times": jaxconv.Op(lambda a, b: a * b, "max", name="max_times"),
    "neg_abs_sum": jaxconv.Op(lambda a, b: -jnp.abs(a - b), "sum", name="neg_abs_sum"),
    "gauss_sum": jaxconv.Op(lambda a, b: jnp.exp(-(a - b) ** 2), "sum", name="gauss_sum"),
    "fuzzy_max_min": jaxconv.Op(jnp.minimum, jnp.maximum, identity=-math.inf,
                                name="fuzzy_max_min"),
}


def product(layer: str, op: str) -> Callable[[Any, Any], Any]:
    """The layer's product with `op` (a SAME 3x3 convolution, or a dense product).

    Args:
        layer: ``"A"`` or ``"E"``.
        op: a built-in op's name, or a key of `USER_OPS`.

    Returns:
        ``f(x, w)``.
    """
    op = USER_OPS.get(op, op)
    if layer == "E":
        return lambda x, w: jaxconv.dot_general(x, w, (((1,), (0,)), ((), ())), op=op)
    dn = ("NHWC", "HWIO", "NHWC")
    return lambda x, w: jaxconv.conv_general_dilated(x, w, (1, 1), "SAME",
                                                     dimension_numbers=dn, op=op)


def compiled(f: Callable, kind: str) -> tuple[Callable, Callable]:
    """The jitted forward and forward+backward of `f`, traced on the native engine's low route
    of `kind` (`ROUTES`, ``JAXCONV_NATIVE_LOW``): the in-call conversions and the records
    (``"f32"``, ``"new"``), XLA's conversions around the float32 call (``"old"``), or without
    the low recording forward and the one-call backward (``"norec"``).

    Args:
        f: the product.
        kind: ``"f32"``, ``"new"``, ``"old"`` or ``"norec"``.

    Returns:
        ``(fwd, fwd_bwd)``.
    """
    fwd = jax.jit(f)
    fb = jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * 1e-3),
                          argnums=(0, 1)))
    with low_route.chosen(ROUTES.get(kind, "record")):  # read while tracing
        return fwd.lower(*_ARGS[id(f)]).compile(), fb.lower(*_ARGS[id(f)]).compile()


_ARGS: dict[int, tuple[Any, Any]] = {}


def timed(fn: Callable, args: tuple) -> tuple[float, float]:
    """One call's wall and process CPU seconds.

    Args:
        fn: a compiled function.
        args: its arguments.

    Returns:
        ``(wall, cpu)``.
    """
    c0, t0 = time.process_time(), time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, time.process_time() - c0


def run(layers: list[str], ops: list[str], dtypes: list[str], rounds: int, old: bool,
        parts: tuple[int, ...] = (0, 1), norec: bool = False) -> None:
    """Times every (layer, op, dtype) row and prints it.

    Args:
        layers: layer names.
        ops: built-in op names.
        dtypes: ``"bfloat16"`` / ``"float16"``.
        rounds: timed rounds.
        old: also time the conversions around the float32 call.
        parts: 0 (the forward) and / or 1 (forward+backward).
        norec: also time the low dtype without the recording forward and one-call backward.
    """
    print(f"# load {os.getloadavg()[0]:.1f}, threads "
          f"{os.environ.get('JAXCONV_NATIVE_THREADS', 'all')}; ratios: median over rounds "
          "of per-round ratios to the op in float32 (cpu: the same, of process CPU time)")
    k = jax.random.split(jax.random.PRNGKey(0), 2)
    for layer in layers:
        xs, ws = LAYERS[layer]
        x32 = jax.random.normal(k[0], xs, jnp.float32)
        w32 = jax.random.normal(k[1], ws, jnp.float32)
        for op in ops:
            for dt in dtypes:
                kinds = {"f32": (x32, w32), "new": (x32.astype(dt), w32.astype(dt))}
                if old:
                    kinds["old"] = kinds["new"]
                if norec:
                    kinds["norec"] = kinds["new"]
                fns = {}
                for name, args in kinds.items():
                    g = product(layer, op)
                    _ARGS[id(g)] = args
                    fns[name] = compiled(g, name)
                    for fn in fns[name]:
                        jax.block_until_ready(fn(*args))
                res = {(n, j): [] for n in fns for j in parts}
                names = list(fns)
                for i in range(rounds):
                    for j in parts:
                        # Each round in another order: none always runs first or after another.
                        for name in names[i % len(names):] + names[:i % len(names)]:
                            res[(name, j)].append(timed(fns[name][j], kinds[name]))
                line = f"{layer} {op:9s} {dt:8s}"
                for j, part in ((j, ("fwd", "f+b")[j]) for j in parts):
                    base = np.array(res[("f32", j)])
                    line += f" | {part} f32 {base[:, 0].min() * 1e3:6.2f}ms"
                    for name in fns:
                        if name == "f32":
                            continue
                        r = np.array(res[(name, j)])
                        ratio = np.median(r[:, 0] / base[:, 0])
                        cpu = np.median(r[:, 1] / np.maximum(base[:, 1], 1e-9))
                        line += (f" {name} {r[:, 0].min() * 1e3:6.2f}ms {ratio:.3f}x"
                                 f" (cpu {cpu:.3f}x)")
                print(line, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring).

    Args:
        argv: the arguments, ``sys.argv[1:]`` by default.

    Returns:
        The exit status.
    """
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", default="A")
    p.add_argument("--ops", default="max_plus,min_plus,max_min,min_max,adder")
    p.add_argument("--dtypes", default="bfloat16,float16")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--old", action="store_true", help="also time XLA's conversions route")
    p.add_argument("--parts", default="fwd,fb", help="fwd and / or fb (forward+backward)")
    p.add_argument("--norec", action="store_true",
                   help="also time the route without the low recording forward")
    a = p.parse_args(argv)
    parts = tuple(("fwd", "fb").index(q) for q in a.parts.split(","))
    run(a.layers.split(","), a.ops.split(","), a.dtypes.split(","), a.rounds, a.old, parts,
        a.norec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

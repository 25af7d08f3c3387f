"""Bit-packed XNOR (``jaxconv.packed``) against the float XNOR rewrite, on the current backend.

Usage:

```python
python benchmarks/packed_xnor.py [--reps 7] [--quick]
```

For each layer it reports, packed / float:

- weight bytes (float32 kernel vs ``uint32`` packed kernel);
- activation bytes (float32 input vs packed input);
- compiled temp memory of the forward pass (``memory_analysis().temp_size_in_bytes``);
- forward time, median of ``--reps`` runs after a warm-up, for the packed product with
  float inputs (packing included) and with already-packed inputs.

The float baseline is ``jaxconv.conv_general_dilated(..., op="xnor")``, i.e. a native
convolution of the signs. XLA has no bit-GEMM on CPU: the popcount loop is vectorised XLA
code, so expect the packed path to be slower there; its sure gain is memory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv
from jaxconv import packed

NHWC = ("NHWC", "HWIO", "NHWC")


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    jax.block_until_ready(fn())  # warm-up (compilation)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _temp_bytes(fn: Callable[..., Any], *args: Any) -> int:
    mem = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else -1


def _compare(
    layer: str, float_xnor: Callable[..., Any], packed_float_in: Callable[..., Any],
    packed_packed_in: Callable[..., Any], x: jax.Array, w: jax.Array, reps: int,
) -> dict[str, Any]:
    """Checks the packed layer against ``ops.xnor`` and measures bytes and times of all three
    (float ``x`` and ``w``; packed ``w`` with float ``x``; packed ``w`` and ``x``)."""
    wq, xq = packed.pack_kernel(w), packed.pack_signs(x)
    f_ref, f_pf, f_pp = jax.jit(float_xnor), jax.jit(packed_float_in), jax.jit(packed_packed_in)
    ref = f_ref(x, w)
    if not (np.array_equal(ref, f_pf(x, wq)) and np.array_equal(ref, f_pp(xq, wq))):
        raise AssertionError("packed result differs from ops.xnor")
    return dict(
        layer=layer,
        w_bytes=(w.nbytes, wq.nbytes),
        x_bytes=(x.nbytes, xq.nbytes),
        temp=(_temp_bytes(float_xnor, x, w), _temp_bytes(packed_float_in, x, wq),
              _temp_bytes(packed_packed_in, xq, wq)),
        time=(_median_time(lambda: f_ref(x, w), reps), _median_time(lambda: f_pf(x, wq), reps),
              _median_time(lambda: f_pp(xq, wq), reps)),
    )


def bench_conv(n: int, hw: int, c: int, o: int, reps: int) -> dict[str, Any]:
    """One SAME 3x3 convolution layer ``(n, hw, hw, c) -> (n, hw, hw, o)``."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, hw, hw, c)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, c, o)).astype(np.float32))

    def float_xnor(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=NHWC,
                                            op="xnor")

    def packed_float_in(a: jax.Array, b: jax.Array) -> jax.Array:
        return packed.packed_conv(a, b, (1, 1), "SAME")

    def packed_packed_in(a: jax.Array, b: jax.Array) -> jax.Array:
        return packed.packed_conv(a, b, (1, 1), "SAME", in_features=c)

    return _compare(f"conv {n}x{hw}x{hw}x{c} -> {o}, 3x3 SAME", float_xnor, packed_float_in,
                    packed_packed_in, x, w, reps)


def bench_dense(m: int, k: int, o: int, reps: int) -> dict[str, Any]:
    """One dense layer ``(m, k) @ (k, o)``."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((k, o)).astype(np.float32))
    dims = (((1,), (0,)), ((), ()))

    def float_xnor(a: jax.Array, b: jax.Array) -> jax.Array:
        return jaxconv.dot_general(a, b, dims, op="xnor")

    def packed_float_in(a: jax.Array, b: jax.Array) -> jax.Array:
        return packed.packed_dense(a, b)

    def packed_packed_in(a: jax.Array, b: jax.Array) -> jax.Array:
        return packed.packed_dense(a, b, in_features=k)

    return _compare(f"dense {m}x{k} @ {k}x{o}", float_xnor, packed_float_in, packed_packed_in,
                    x, w, reps)


def _mib(b: int) -> str:
    return f"{b / 2**20:.3f}"


def main() -> None:
    """Runs the benchmark and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--quick", action="store_true", help="small layers only")
    args = parser.parse_args()
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}, "
          f"os.cpu_count(): {os.cpu_count()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    if args.quick:
        rows = [bench_conv(2, 16, 64, 64, args.reps), bench_dense(64, 512, 256, args.reps)]
    else:
        rows = [
            bench_conv(8, 32, 32 * 2, 64, args.reps),  # PERF_NOTES layer A
            bench_conv(8, 16, 256, 256, args.reps),
            bench_dense(256, 1024, 1024, args.reps),
        ]
    print()
    print("| layer | weights MiB float / packed (ratio) | activations MiB float / packed "
          "(ratio) | temp MiB float / packed(float in) / packed(packed in) | forward ms "
          "float / packed(float in) / packed(packed in) | time ratio packed(packed in) / "
          "float |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        (wf, wp), (xf, xp), (tf, tpf, tpp), (sf, spf, spp) = (
            r["w_bytes"], r["x_bytes"], r["temp"], r["time"])
        print(f"| {r['layer']} | {_mib(wf)} / {_mib(wp)} ({wf / wp:.0f}x) | {_mib(xf)} / "
              f"{_mib(xp)} ({xf / xp:.0f}x) | {_mib(tf)} / {_mib(tpf)} / {_mib(tpp)} | "
              f"{sf * 1e3:.2f} / {spf * 1e3:.2f} / {spp * 1e3:.2f} | {spp / sf:.1f}x |")


if __name__ == "__main__":
    main()

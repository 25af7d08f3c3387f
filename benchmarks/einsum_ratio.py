"""Timing of ``jaxconv.einsum``: against ``jnp.einsum`` (standard op) and against a direct
``jaxconv.dot_general`` (max-plus), for a batched matmul and a three-operand chain.

    python benchmarks/einsum_ratio.py

Median of several jitted runs after warm-up; prints the ratios (einsum time / baseline).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv


def median_time(f, *args, reps: int = 15) -> float:
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def main() -> None:
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((16, 64, 128)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((16, 128, 64)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((64, 32)), jnp.float32)
    big_a = jnp.asarray(rng.standard_normal((32, 256, 256)), jnp.float32)
    big_b = jnp.asarray(rng.standard_normal((32, 256, 256)), jnp.float32)
    dn = (((2,), (1,)), ((0,), (0,)))
    print(f"backend {jax.default_backend()}, {os.cpu_count()} CPUs visible")
    cases = {
        "standard bij,bjk->bik vs jnp.einsum": (
            jax.jit(lambda a, b: jaxconv.einsum("bij,bjk->bik", a, b)),
            jax.jit(lambda a, b: jnp.einsum("bij,bjk->bik", a, b)), (big_a, big_b)),
        "max_plus bij,bjk->bik vs dot_general": (
            jax.jit(lambda a, b: jaxconv.einsum("bij,bjk->bik", a, b, op="max_plus")),
            jax.jit(lambda a, b: jaxconv.dot_general(a, b, dn, op="max_plus")), (a, b)),
        "max_plus bij,bjk,kl->bil vs two dot_generals": (
            jax.jit(lambda a, b, c: jaxconv.einsum("bij,bjk,kl->bil", a, b, c, op="max_plus")),
            jax.jit(lambda a, b, c: jaxconv.dot_general(
                jaxconv.dot_general(a, b, dn, op="max_plus"), c, (((2,), (0,)), ((), ())),
                op="max_plus")), (a, b, c)),
    }
    for name, (ours, base, args) in cases.items():
        np.testing.assert_allclose(ours(*args), base(*args), rtol=1e-4, atol=1e-4)
        t1, t0 = median_time(ours, *args), median_time(base, *args)
        print(f"{name}: {t1 * 1e3:.2f} ms / {t0 * 1e3:.2f} ms = {t1 / t0:.2f}x")


if __name__ == "__main__":
    main()

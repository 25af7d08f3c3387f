"""Two builds of the native extension, paired and interleaved: per-thread CPU time of the
same products, one process per build and round, the builds alternating.

A build is an installed ``jaxconv`` package folder holding ``_native*.so`` and ``_csrc/``
(e.g. a copy of ``site-packages/jaxconv`` taken before a change); ``--old`` names one, and
the new one is the installed package. Each process runs with ``JAXCONV_NATIVE_THREADS=1``
and XLA's single-threaded CPU runtime, times forward+backward (``jax.grad`` of
``sum(y * ct)`` in both operands) by ``time.process_time`` (so the kernels' one thread) and
prints the median per call. Per case: the median over rounds of the per-round ratio
new / old (which cancels drift of a shared machine's load) and each build's median.

Example::

    python -m benchmarks.build_ab --old /tmp/old_jaxconv --cases f64_A,f64_E,bf16_A --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# name -> (dtype, x shape, w shape, op)
CASES = {
    "f64_A": ("float64", (8, 32, 32, 64), (3, 3, 64, 64), "max_plus"),
    "f64_E": ("float64", (256, 1024), (1024, 1024), "max_plus"),
    "f64_A_adder": ("float64", (8, 32, 32, 64), (3, 3, 64, 64), "adder"),
    "bf16_A": ("bfloat16", (8, 32, 32, 64), (3, 3, 64, 64), "max_plus"),
}

_CHILD = r"""
import importlib.util, json, os, statistics, sys, time
lib = sys.argv[1]
if lib:  # the other build's extension, in place before jaxconv imports its own
    import glob
    path = glob.glob(os.path.join(lib, "_native*.so"))[0]
    spec = importlib.util.spec_from_file_location("jaxconv._native", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules["jaxconv._native"] = mod
import jax, jax.numpy as jnp, numpy as np
import jaxconv
from jaxconv._src.engines.native import ffi
dtype, xs, ws, op, calls = json.loads(sys.argv[2])
jax.config.update("jax_enable_x64", dtype == "float64")
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal(xs), dtype)
w = jnp.asarray(rng.standard_normal(ws), dtype)
if len(xs) == 2:
    f = lambda a, b: jaxconv.dot_general(a, b, (((1,), (0,)), ((), ())), op=op,
                                         engine="native")
else:
    f = lambda a, b: jaxconv.conv_general_dilated(
        a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), op=op,
        engine="native")
ct = jnp.asarray(rng.standard_normal(jax.eval_shape(f, x, w).shape), dtype)
g = jax.jit(jax.grad(lambda a, b: jnp.sum((f(a, b) * ct).astype(jnp.float32)), argnums=(0, 1)))
jax.block_until_ready(g(x, w))
times = []
for _ in range(calls):
    t0 = time.process_time()
    jax.block_until_ready(g(x, w))
    times.append(time.process_time() - t0)
print(json.dumps({"cpu_ms": 1e3 * statistics.median(times), "so": ffi.extension().__file__}))
"""


def run(lib: str, case: str, calls: int) -> float:
    """One process of one build: the median CPU time per call (ms) of `case`.

    Args:
        lib: the other build's package folder, ``""`` for the installed one.
        case: a key of `CASES`.
        calls: timed calls.

    Returns:
        Milliseconds.
    """
    env = dict(os.environ, JAXCONV_NATIVE_THREADS="1",
               XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    arg = json.dumps([*CASES[case], calls])
    out = subprocess.run([sys.executable, "-c", _CHILD, lib, arg], env=env, check=True,
                         capture_output=True, text=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["cpu_ms"])


def main() -> None:
    """Parses the arguments and prints one row per case."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the old build's jaxconv package folder")
    p.add_argument("--cases", default="f64_A,f64_E,bf16_A")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5)
    a = p.parse_args()
    print(f"load {os.getloadavg()[0]:.1f}; one kernel thread; CPU time per f+b call")
    for case in a.cases.split(","):
        old, new = [], []
        for r in range(a.rounds):
            order = [("old", a.old), ("new", "")] if r % 2 == 0 else [("new", ""), ("old", a.old)]
            for name, lib in order:
                (old if name == "old" else new).append(run(lib, case, a.calls))
        ratios = [n / o for n, o in zip(new, old, strict=True)]
        print(f"{case:12s} old {statistics.median(old):8.2f} ms  new {statistics.median(new):8.2f}"
              f" ms  new/old {statistics.median(ratios):.3f} (rounds {min(ratios):.3f}-"
              f"{max(ratios):.3f})  load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

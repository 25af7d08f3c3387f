"""How steady the native engine's tuning search is: repeated searches, what they pick, what
the picks cost.

Runs the first-use search (``tuning.search``, the same as a fresh ``JAXCONV_CACHE_DIR``) a
number of times in this process, optionally beside a busy loop pinned to one CPU
(``--busy-cpu``) and with synthetic noise on every timing (``--noise``: each time x
exp(N(0, sigma)), one in ten x U(1.2, 2), seeded), and prints each search's CPU and wall time
and the parameters it set apart from the defaults, then how often each set came out. Each set
that came out is then timed against the defaults on layer A's forward (max_plus and adder,
3x3 on 8 x 32 x 32 x 64 -> 64; VALID on a 34 x 34 input, the same work as SAME) and layer E's
(max_plus, dense 256 x 1024 @ 1024 x 1024), and E's adder and l1 backward: single-threaded,
each call timed in the thread's CPU time by the extension (``_native.time_forward`` /
``time_backward``), the defaults and the set back to back,
alternating which runs first, median of the pairs' ratios. Wall time is not used: on a shared
machine it measures the neighbours.

Example::

    python -m benchmarks.tuning_search --searches 10 --busy-cpu 1
    python -m benchmarks.tuning_search --searches 30 --noise 0.2 --cost-rounds 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from typing import Any

# (direction, op id, n, h, w, c, k, o) of `_native.time_forward` / `time_backward`: layer A
# (VALID on the SAME-padded input) and layer E (dense) of benchmarks/native.py, and E's adder
# and l1 backward (both gradients), where `bcast` and `l1_split` act.
COST_PROBLEMS = {"A max_plus": ("fwd", 0, 8, 34, 34, 64, 3, 64),
                 "A adder": ("fwd", 4, 8, 34, 34, 64, 3, 64),
                 "E max_plus": ("fwd", 0, 256, 1, 1, 1024, 1, 1024),
                 "E adder bwd": ("bwd", 4, 256, 1, 1, 1024, 1, 1024),
                 "E l1 bwd": ("bwd", 5, 256, 1, 1, 1024, 1, 1024)}


def _noisy(real: Any, sigma: float, rng: random.Random) -> Any:
    """`real` (a timing function) with multiplicative noise and occasional disturbed runs."""

    def timed(problem: tuple[int, ...], values: dict[str, int], reps: int) -> float:
        t = real(problem, values, reps) * math.exp(rng.gauss(0.0, sigma))
        return t * rng.uniform(1.2, 2.0) if rng.random() < 0.1 else t

    return timed


def cost(values: dict[str, int], base: dict[str, int], rounds: int) -> dict[str, float]:
    """`values`' single-threaded time over the defaults' on each `COST_PROBLEMS` entry
    (median of `rounds` back-to-back pairs, alternating which runs first).

    Args:
      values: the parameter set.
      base: the defaults.
      rounds: pairs per problem.

    Returns:
      ``{problem: ratio}``.
    """
    from jaxconv import _native  # noqa: PLC0415

    out = {}
    for name, prob in COST_PROBLEMS.items():
        ratios = []
        for r in range(rounds):
            order = [(base, "base"), (values, "set")][:: 1 if r % 2 == 0 else -1]
            probe = _native.time_backward if prob[0] == "bwd" else _native.time_forward
            t = {tag: probe(*prob[1:], 1, vals) for vals, tag in order}
            ratios.append(t["set"] / t["base"])
        out[name] = statistics.median(ratios)
    _native.release_probes()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--searches", type=int, default=10)
    p.add_argument("--busy-cpu", type=int, default=None,
                   help="run a busy loop pinned to this CPU meanwhile")
    p.add_argument("--noise", type=float, default=0.0,
                   help="sigma of synthetic log-normal noise on every timing (0: none)")
    p.add_argument("--cost-rounds", type=int, default=9,
                   help="paired rounds per problem when costing each pick (0: skip)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.busy_cpu is not None and a.busy_cpu not in os.sched_getaffinity(0):
        p.error(f"--busy-cpu {a.busy_cpu}: not one of this process's CPUs")
    from jaxconv._src.engines.native import tuning  # noqa: PLC0415

    base = tuning.defaults()
    real = tuning._time
    if a.noise > 0:
        tuning._time = _noisy(real, a.noise, random.Random(7))
    spin = None
    if a.busy_cpu is not None:
        spin = subprocess.Popen(["taskset", "-c", str(a.busy_cpu), sys.executable, "-c",
                                 "while True:\n    pass\n"], stdin=subprocess.DEVNULL)
        time.sleep(0.1)
    runs = []
    try:
        for _ in range(a.searches):
            c0, w0 = time.thread_time(), time.perf_counter()
            chosen, report = tuning.search()
            cpu, wall = time.thread_time() - c0, time.perf_counter() - w0
            diff = {k: v for k, v in chosen.items() if v != base[k]}
            runs.append(dict(cpu_s=cpu, wall_s=wall, diff=diff, why=tuning.summary(report)))
            label = ", ".join(f"{k}={v}" for k, v in sorted(diff.items())) or "defaults"
            print(f"search: {cpu:.3f} s CPU, {wall:.3f} s wall, load "
                  f"{os.getloadavg()[0]:.1f}: {label}", flush=True)
    finally:
        tuning._time = real
        if spin is not None:
            spin.kill()
            spin.wait()
    counts: dict[str, int] = {}
    for r in runs:
        key = json.dumps(r["diff"], sort_keys=True)
        counts[key] = counts.get(key, 0) + 1
    print(f"# {a.searches} searches (noise sigma {a.noise}, busy CPU {a.busy_cpu}): CPU "
          f"{statistics.median(r['cpu_s'] for r in runs):.3f} s median, "
          f"{max(r['cpu_s'] for r in runs):.3f} max; not the defaults "
          f"{sum(1 for r in runs if r['diff'])}/{a.searches}")
    costs = {}
    for key, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        line = f"{n:3d} x {key}"
        if a.cost_rounds > 0 and key != "{}":
            costs[key] = cost({**base, **json.loads(key)}, base, a.cost_rounds)
            line += ": " + ", ".join(f"{k} {v:.2f}x" for k, v in costs[key].items())
        print(line, flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(runs=runs, counts=counts, costs=costs, noise=a.noise,
                           busy_cpu=a.busy_cpu), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One training step on a mesh of 8 simulated CPU devices against one device, same cores.

The 8 devices share the host's cores, so the ideal ratio is about 1 (the same work, split
8 ways); a product that is replicated instead of partitioned costs up to 8x. For each op
the step is ``jax.value_and_grad`` of ``sum(tanh(conv(x, w)))`` followed by an SGD update of
``w`` (x 16x32x32x16 NHWC, w 3x3x16x32, SAME; ``--smoke``: 16x8x8x4, w 3x3x4x8), data
parallel: ``x`` sharded ``P('data')``, ``w`` replicated. The two are timed paired and
interleaved (`benchmarks.timing.paired`: the median of the rounds' ratios). The table also
lists the collectives in the compiled 8-device forward and step (the HLO evidence).

Timings from a machine shared with other work are noisy: report them with that caveat.

Example::

    python -m benchmarks.sharding
    python -m benchmarks.sharding --ops max_plus adder --rounds 9 --json out.json
    python -m benchmarks.sharding --smoke
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from typing import Any

import jax

COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
               "reduce-scatter")
OPS = ("max_plus", "adder", "tanh_max", "log")


def _op(name: str) -> Any:
    import jax.numpy as jnp  # noqa: PLC0415

    import jaxconv  # noqa: PLC0415

    if name == "tanh_max":  # a compiled user op
        return jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max", name="tanh_max")
    return name


def collectives(hlo: str) -> list[str]:
    """The kinds of collective in compiled HLO text, with their counts (``"all-reduce x2"``).

    Example:
      >>> collectives("%a = f32[2] all-reduce(%b), %c = f32[2] all-reduce(%d)")
      ['all-reduce x2']
    """
    out = []
    for c in COLLECTIVES:
        n = len(re.findall(rf"\b{c}(-start)?\(", hlo))
        if n:
            out.append(f"{c} x{n}")
    return out


def run(ops: Sequence[str], smoke: bool, rounds: int) -> list[dict[str, Any]]:
    """Times each op's step on 8 devices against one; the rows of the table."""
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding  # noqa: PLC0415
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415

    import jaxconv  # noqa: PLC0415
    from benchmarks import timing  # noqa: PLC0415

    if len(jax.devices()) < 8:
        raise SystemExit("needs 8 devices: run as a module before anything else uses JAX")
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    n, hw, c, o = (16, 8, 4, 8) if smoke else (16, 32, 16, 32)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.uniform(-1, 1, (n, hw, hw, c)), jnp.float32)
    w = jnp.asarray(rng.uniform(-1, 1, (3, 3, c, o)), jnp.float32)
    one = jax.devices()[0]
    x1, w1 = jax.device_put(x, one), jax.device_put(w, one)
    x8 = jax.device_put(x, NamedSharding(mesh, P("data")))
    w8 = jax.device_put(w, NamedSharding(mesh, P()))
    rows = []
    for name in ops:
        op = _op(name)

        def conv(a, b, op=op):
            return jaxconv.conv_general_dilated(a, b, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                                op=op)

        def step(a, b, conv=conv):
            loss, g = jax.value_and_grad(lambda b_: jnp.sum(jnp.tanh(conv(a, b_))))(b)
            return loss, b - 1e-3 * g

        fwd, train = jax.jit(conv), jax.jit(step)
        fwd_hlo = fwd.lower(x8, w8).compile().as_text()
        step_hlo = train.lower(x8, w8).compile().as_text()
        l1, _ = train(x1, w1)
        l8, _ = train(x8, w8)
        rel = abs(float(l8) - float(l1)) / max(abs(float(l1)), 1e-30)
        # Each call waits for its result: the host's CPU devices run queued independent
        # calls concurrently, and a one-device call still running on device 0 would hold the
        # 8-device step's all-reduce past XLA's rendezvous timeout on a loaded machine.
        def one(train=train):
            return jax.block_until_ready(train(x1, w1))

        def eight(train=train):
            return jax.block_until_ready(train(x8, w8))

        calls = timing.calls_for(one, (), 0.05 if smoke else 0.3)
        res = timing.paired(one, eight, (), rounds=rounds, calls=calls)
        rows.append(dict(op=name, one_ms=res.ref_ms, eight_ms=res.ms, ratio=res.ratio,
                         best=res.best, spread=res.spread, loss_rel_diff=rel,
                         fwd_collectives=collectives(fwd_hlo),
                         step_collectives=collectives(step_hlo)))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ops", nargs="+", default=list(OPS), help=f"ops (default: {OPS})")
    p.add_argument("--rounds", type=int, default=7, help="paired rounds (default 7)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, few rounds")
    p.add_argument("--json", default=None, metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    unknown = [o for o in args.ops if o not in OPS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {OPS}")
    jax.config.update("jax_num_cpu_devices", 8)
    rows = run(args.ops, args.smoke, 3 if args.smoke else args.rounds)
    print(f"{'op':10} {'1 dev ms':>9} {'8 dev ms':>9} {'ratio':>6} {'spread':>6}  "
          "8-dev forward collectives | step collectives")
    for r in rows:
        print(f"{r['op']:10} {r['one_ms']:9.2f} {r['eight_ms']:9.2f} {r['ratio']:6.2f} "
              f"{r['spread']:6.2f}  {', '.join(r['fwd_collectives']) or 'none'} | "
              f"{', '.join(r['step_collectives']) or 'none'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=dict(smoke=args.smoke, rounds=args.rounds), rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Data-parallel training of a jaxconv model over every device of a ``jax.sharding.Mesh``.

The same file runs unchanged on a TPU slice, on GPUs, or on a CPU with simulated devices:

```python
python examples/tpu_training.py                      # all devices of the default backend
XLA_FLAGS=--xla_force_host_platform_device_count=8 python examples/tpu_training.py
python examples/tpu_training.py --cpu-devices 8      # same, via jax.config
```

Several processes (one per host, joined by ``jax.distributed``; on CPU the collectives go
through gloo) run the same command with their own ``--process-id``, the coordinator being the
address of process 0's host. Two processes on one machine, two CPU devices each:

```python
python examples/tpu_training.py --cpu-devices 2 --steps 5 \
    --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 0 &
python examples/tpu_training.py --cpu-devices 2 --steps 5 \
    --coordinator 127.0.0.1:12355 --num-processes 2 --process-id 1
```

Parameters and optimiser state are replicated (``NamedSharding(mesh, P())``); each batch is
split along a ``'data'`` mesh axis (``NamedSharding(mesh, P('data'))``). ``jax.jit``
partitions the step (Shardy), inserting the gradient all-reduce itself; jaxconv's products
partition as lax's (each device's native kernels run on its own slice of the batch), so
nothing else changes; the compiled step's collectives are printed. The model is a small CNN
on the digits data (a ``--op`` conv, e.g. ``max_plus``, a standard 1x1 mixing conv, ReLU,
max-pool and a standard dense head), trained with adam. Before training (one process), one
sharded step is compared with the same step on a single device.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Array = jax.Array


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Data-parallel training of a jaxconv CNN over "
                                "all devices of a mesh (TPU, GPU or simulated CPU devices).")
    p.add_argument("--op", default="max_plus", help="product of the custom conv layer "
                   "(default max_plus)")
    p.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    p.add_argument("--per-device-batch", type=int, default=16,
                   help="examples per device per step (default 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="adam learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cpu-devices", type=int, default=None, metavar="N",
                   help="simulate N CPU devices (jax_num_cpu_devices; before any device use)")
    p.add_argument("--log-every", type=int, default=1,
                   help="print the loss every K steps (default: every step)")
    g = p.add_argument_group("several processes (one per host; jax.distributed)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0; turns the multi-process mode on")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")
    g.add_argument("--json", default=None, metavar="PATH",
                   help="write the losses and the collectives of the compiled step as JSON")
    return p.parse_args(argv)


def init_distributed(args: argparse.Namespace) -> None:
    """Joins the processes (before any device use); on CPU, collectives go through gloo."""
    if args.coordinator is None:
        return
    if args.num_processes is None or args.process_id is None:
        raise ValueError("--coordinator needs --num-processes and --process-id")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


class Net(nnx.Module):
    """``op`` conv16 -> standard 1x1 conv16 -> ReLU -> 2x2 max-pool -> standard dense head."""

    def __init__(self, op: str, in_channels: int, spatial: tuple[int, int], n_classes: int,
                 *, rngs: nnx.Rngs):
        from jaxconv import nnx as jnn

        self.conv = jnn.Conv(in_channels, 16, (3, 3), use_bias=False, op=op, rngs=rngs)
        self.mix = jnn.Conv(16, 16, (1, 1), rngs=rngs)
        self.head = jnn.Linear((spatial[0] // 2) * (spatial[1] // 2) * 16, n_classes,
                               rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = nnx.relu(self.mix(self.conv(x)))
        x = nnx.max_pool(x, (2, 2), strides=(2, 2))
        return self.head(x.reshape(x.shape[0], -1))


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits (NHWC in [0, 1]), or a synthetic stand-in if scikit-learn is missing."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - the examples extra installs scikit-learn
        rng = np.random.RandomState(seed)
        y = rng.randint(0, 10, 2048).astype(np.int32)
        protos = rng.rand(10, 8, 8, 1).astype(np.float32)
        x = np.clip(protos[y] + 0.3 * rng.randn(2048, 8, 8, 1), 0, 1).astype(np.float32)
        return x, y
    d = load_digits()
    return (d.images / 16.0).astype(np.float32)[..., None], d.target.astype(np.int32)


def build(args: argparse.Namespace, x: np.ndarray) -> tuple[Any, Any, Any]:
    """Model graph, pure-dict parameters and the optax transformation."""
    model = Net(args.op, x.shape[-1], x.shape[1:3], 10, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    return graphdef, state, optax.adam(args.lr)


def make_step(graphdef: Any, state_template: Any, tx: optax.GradientTransformation):
    """A pure training step ``(params, opt_state, x, y) -> (params, opt_state, loss)``."""

    def loss_fn(params: dict, x: Array, y: Array) -> Array:
        st = jax.tree.map(lambda v: v, state_template)
        nnx.replace_by_pure_dict(st, params)
        logits = nnx.merge(graphdef, st)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(params: dict, opt_state: Any, x: Array, y: Array):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def sharded_vs_single(step: Any, params: dict, opt_state: Any, x: np.ndarray, y: np.ndarray,
                      mesh: Mesh) -> float:
    """Max abs difference between one data-parallel step and the same step on one device."""
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    f = jax.jit(step, in_shardings=(rep, rep, dat, dat), out_shardings=(rep, rep, rep))
    p1, _, l1 = f(params, opt_state, x, y)
    dev = jax.devices()[0]
    single = jax.jit(step)
    put = lambda t: jax.device_put(t, dev)  # noqa: E731
    p2, _, l2 = single(put(params), put(opt_state), put(x), put(y))
    diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))), p1, p2))
    return max([abs(float(l1) - float(l2))] + diffs)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Trains; returns ``{"losses": [...], "step_diff": float, "devices": int}``."""
    args = parse_args(argv)
    if args.cpu_devices is not None:
        jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    init_distributed(args)
    devices = jax.devices()
    print(f"{len(devices)} devices ({devices[0].platform}, {jax.process_count()} "
          "process(es)): " + ", ".join(str(d) for d in devices[:8])
          + (" ..." if len(devices) > 8 else ""))
    mesh = Mesh(np.array(devices), ("data",))
    rep, dat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    x_all, y_all = load_data(args.seed)
    graphdef, state, tx = build(args, x_all)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)
    step = make_step(graphdef, state, tx)
    batch = args.per_device_batch * len(devices)

    diff = None
    if jax.process_count() == 1:  # one device of another process cannot run the step
        diff = sharded_vs_single(step, params, opt_state, x_all[:batch], y_all[:batch], mesh)
        print(f"one sharded step vs the same step on one device: max abs diff {diff:.2e}")

    # Every process holds the same host values; each array is built from this process's
    # devices' parts of them (in a real job each host would load only its part).
    def put(a: Any, sharding: NamedSharding) -> Array:
        return jax.make_array_from_callback(np.shape(a), sharding, lambda i: a[i])

    params = jax.tree.map(lambda a: put(np.asarray(a), rep), params)
    opt_state = jax.tree.map(lambda a: put(np.asarray(a), rep), opt_state)
    train_step = jax.jit(step, in_shardings=(rep, rep, dat, dat),
                         out_shardings=(rep, rep, rep), donate_argnums=(0, 1))
    rng = np.random.RandomState(args.seed)
    losses: list[float] = []
    collectives: list[str] = []
    t0 = time.perf_counter()
    for s in range(1, args.steps + 1):
        idx = rng.randint(0, len(x_all), batch)
        xb = put(x_all[idx], dat)  # each device receives its slice of the batch
        yb = put(y_all[idx], dat)
        if s == 1:
            hlo = train_step.lower(params, opt_state, xb, yb).compile().as_text()
            collectives = sorted({c for c in ("all-gather", "all-reduce", "all-to-all",
                                              "collective-permute", "reduce-scatter")
                                  if f" {c}(" in hlo or f" {c}-start(" in hlo})
            print(f"collectives in the compiled step: {', '.join(collectives) or 'none'}")
        params, opt_state, loss = train_step(params, opt_state, xb, yb)
        losses.append(float(loss))
        if s % args.log_every == 0 or s == 1 or s == args.steps:
            print(f"step {s:4d}  loss {losses[-1]:.4f}  (global batch {batch}, "
                  f"{time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps on "
          f"{len(devices)} devices (op {args.op})")
    result = {"losses": losses, "step_diff": diff, "devices": len(devices),
              "processes": jax.process_count(), "collectives": collectives}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f)
    return result


if __name__ == "__main__":
    main()

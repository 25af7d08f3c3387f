"""Train a small Flax NNX CNN whose layers use a custom product on scikit-learn's digits.

The data ships with scikit-learn (1797 8x8 images, offline): pixels scaled to [0, 1] (X/16),
a stratified 80/20 split (``random_state=0``). Pass ``--data my.npz`` (arrays ``x_train``,
``y_train``, ``x_test``, ``y_test``; images NHW or NHWC; uint8 images are divided by 255) to
train on your own data, e.g. MNIST.

Each op uses the layout and optimiser that work for it (the literature keeps the first
layer and the head real-valued for binary nets, and puts batch norm after adder and
morphological layers):

=========  ===============================================================  ==============
op         layers (all 3x3 SAME convs, 2x2 max-pool, standard Dense head)   optimiser
=========  ===============================================================  ==============
standard   conv16-ReLU, conv32-ReLU, pool                                   adam 3e-3
xnor       *standard* conv16 - BN - xnor conv32 (no bias) - pool - BN        adam 1e-3, xnor
                                                                            kernels clipped
                                                                            to [-1, 1]
adder/l1   op conv16 - BN - ReLU, op conv32 - BN - ReLU, pool               SGD 0.9, lr 0.1,
                                                                            wd 5e-4,
                                                                            adder_scale(0.2)
l2         as adder                                                         adam 1e-3,
                                                                            adder_scale(0.2)
max_plus   (8 max_plus | 8 min_plus) - *standard* 1x1 conv16 - BN - ReLU,    adam 1e-3
& other    (16 max_plus | 16 min_plus) - *standard* 1x1 conv32 - BN - ReLU,
max/min    pool
=========  ===============================================================  ==============

The head (``Linear`` to the classes) is always standard. Learning rates follow a cosine
decay over the run. Progress is printed per epoch; the test accuracy at the end. With
``--ckpt-dir`` the trained state is saved with Orbax (and restored once to check it);
``--plot curves.png`` writes the training curves. ``--engine xla`` (or ``native``) fixes the
engine of the custom-product layers (default ``auto``: the native kernels on CPU where they
serve the op).

Run:

```python
python examples/train_digits.py --op adder
python examples/train_digits.py --op xnor --epochs 30 --plot xnor.png --ckpt-dir /tmp/xnor
```
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxconv
from jaxconv import checkpoint as jc_checkpoint
from jaxconv import nnx as jnn
from jaxconv.optim import adder_scale, clip_latent_weights

Array = jax.Array

DISTANCE_OPS = ("adder", "l1", "l2", "l2_exact")
SGD_OPS = ("adder", "l1")  # AdderNet's recipe; l2 trains better with adam + adder_scale
MORPH_DUALS = {"max_plus": "min_plus", "min_plus": "max_plus", "max_min": "min_max",
               "min_max": "max_min", "log": "log"}
OPS = ("standard", "xnor", *DISTANCE_OPS, *MORPH_DUALS)


def layout_of(op: str) -> str:
    """The model family used for ``op``."""
    if op in ("standard", "xnor"):
        return op
    return "distance" if op in DISTANCE_OPS else "morph"


def default_lr(op: str) -> float:
    """Peak learning rate of each recipe (TRAINING_NOTES)."""
    if op in SGD_OPS:
        return 0.1
    return 3e-3 if op == "standard" else 1e-3


def _pool(x: Array) -> Array:
    return nnx.max_pool(x, (2, 2), strides=(2, 2))


class DigitsNet(nnx.Module):
    """Two conv blocks, a 2x2 max-pool and a standard dense head; ``op`` picks the layout."""

    def __init__(self, op: str, in_channels: int, spatial: tuple[int, int], n_classes: int, *,
                 rngs: nnx.Rngs, engine: str = "auto"):
        self.op = op
        self.layout = layout_of(op)
        c = in_channels
        if self.layout == "standard":
            self.conv1 = jnn.Conv(c, 16, (3, 3), rngs=rngs)
            self.conv2 = jnn.Conv(16, 32, (3, 3), rngs=rngs)
        elif self.layout == "xnor":
            self.conv1 = jnn.Conv(c, 16, (3, 3), rngs=rngs)  # standard first layer
            self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
            self.conv2 = jnn.Conv(16, 32, (3, 3), use_bias=False, op="xnor", rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        elif self.layout == "distance":
            self.conv1 = jnn.Conv(c, 16, (3, 3), use_bias=False, op=op, engine=engine,
                                  rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
            self.conv2 = jnn.Conv(16, 32, (3, 3), use_bias=False, op=op, engine=engine,
                                  rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        else:
            dual = MORPH_DUALS[op]
            self.conv1 = jnn.Conv(c, 8, (3, 3), use_bias=False, op=op, engine=engine,
                                  rngs=rngs)
            self.conv1_dual = jnn.Conv(c, 8, (3, 3), use_bias=False, op=dual, engine=engine,
                                       rngs=rngs)
            self.mix1 = jnn.Conv(16, 16, (1, 1), rngs=rngs)  # standard 1x1 mixing
            self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
            self.conv2 = jnn.Conv(16, 16, (3, 3), use_bias=False, op=op, engine=engine,
                                  rngs=rngs)
            self.conv2_dual = jnn.Conv(16, 16, (3, 3), use_bias=False, op=dual, engine=engine,
                                       rngs=rngs)
            self.mix2 = jnn.Conv(32, 32, (1, 1), rngs=rngs)
            self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
        flat = (spatial[0] // 2) * (spatial[1] // 2) * 32
        self.head = jnn.Linear(flat, n_classes, rngs=rngs)  # standard head

    def describe(self) -> str:
        """One line naming each layer and its product."""
        op = self.op
        dual = MORPH_DUALS.get(op, op)
        return {
            "standard": "conv16[standard]-ReLU, conv32[standard]-ReLU, pool, dense[standard]",
            "xnor": "conv16[standard]-BN, conv32[xnor, no bias], pool, BN, dense[standard]",
            "distance": f"conv16[{op}]-BN-ReLU, conv32[{op}]-BN-ReLU, pool, dense[standard]",
            "morph": (f"conv8[{op}]|conv8[{dual}]-1x1conv16[standard]-BN-ReLU, "
                      f"conv16[{op}]|conv16[{dual}]-1x1conv32[standard]-BN-ReLU, "
                      "pool, dense[standard]"),
        }[self.layout]

    def __call__(self, x: Array) -> Array:
        if self.layout == "standard":
            x = _pool(nnx.relu(self.conv2(nnx.relu(self.conv1(x)))))
        elif self.layout == "xnor":
            x = self.bn2(_pool(self.conv2(self.bn1(self.conv1(x)))))
        elif self.layout == "distance":
            x = nnx.relu(self.bn1(self.conv1(x)))
            x = _pool(nnx.relu(self.bn2(self.conv2(x))))
        else:
            x = jnp.concatenate([self.conv1(x), self.conv1_dual(x)], axis=-1)
            x = nnx.relu(self.bn1(self.mix1(x)))
            x = jnp.concatenate([self.conv2(x), self.conv2_dual(x)], axis=-1)
            x = _pool(nnx.relu(self.bn2(self.mix2(x))))
        return self.head(x.reshape(x.shape[0], -1))


def op_kernel_mask(params: dict[str, Any], model: DigitsNet) -> dict[str, Any]:
    """True for the kernels of the layers with a non-standard product."""

    def is_custom(name: str) -> bool:
        layer = getattr(model, name, None)
        return isinstance(layer, jnn.Conv) and layer.op.name != "standard"

    return {name: {k: (k == "kernel" and is_custom(name)) for k in sub}
            for name, sub in params.items()}


def make_optimizer(op: str, lr: float, total_steps: int, mask: Any) -> optax.GradientTransformation:
    """The optimiser of each recipe, with a cosine-decayed learning rate."""
    schedule = optax.cosine_decay_schedule(lr, max(total_steps, 1))
    if op in SGD_OPS:
        return optax.chain(
            optax.masked(adder_scale(0.2), mask),
            optax.add_decayed_weights(5e-4),
            optax.sgd(schedule, momentum=0.9),
        )
    if layout_of(op) == "distance":
        return optax.chain(optax.masked(adder_scale(0.2), mask), optax.adam(schedule))
    return optax.adam(schedule)


def load_data(path: str | None, fast: bool, seed: int) -> tuple[np.ndarray, ...]:
    """Returns ``x_train, y_train, x_test, y_test`` with NHWC float32 images in [0, 1]."""
    if path is None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[..., None]
        y = digits.target.astype(np.int32)
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=0.2, stratify=y, random_state=0)
    else:
        with np.load(path) as d:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
            if missing:
                raise SystemExit(f"--data {path}: missing arrays {sorted(missing)}")
            x_tr, y_tr, x_te, y_te = (d[k] for k in ("x_train", "y_train", "x_test", "y_test"))

        def prep(a: np.ndarray) -> np.ndarray:
            scale = 255.0 if a.dtype == np.uint8 else 1.0
            a = a.astype(np.float32) / scale
            if a.ndim == 3:
                a = a[..., None]
            if a.ndim != 4:
                raise SystemExit(f"--data: images must be NHW or NHWC, got shape {a.shape}")
            return a

        x_tr, x_te = prep(x_tr), prep(x_te)
        y_tr, y_te = y_tr.astype(np.int32).ravel(), y_te.astype(np.int32).ravel()
    if fast:  # a small subset for tests
        rng = np.random.RandomState(seed)
        tr = rng.permutation(len(x_tr))[:256]
        te = rng.permutation(len(x_te))[:128]
        x_tr, y_tr, x_te, y_te = x_tr[tr], y_tr[tr], x_te[te], y_te[te]
    return x_tr, y_tr, x_te, y_te


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train a Flax CNN with a custom product (jaxconv) on scikit-learn's "
        "digits or your own .npz data.")
    p.add_argument("--op", default="adder", choices=OPS, help="the product of the custom "
                   "layers (default: adder)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: "
                   "the op's recipe)")
    p.add_argument("--seed", type=int, default=0, help="initialisation/shuffling seed")
    p.add_argument("--data", default=None, metavar="PATH.npz", help="your own data: arrays "
                   "x_train, y_train, x_test, y_test (images NHW or NHWC)")
    p.add_argument("--ckpt-dir", default=None, help="save the trained state here (Orbax)")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="write training curves")
    p.add_argument("--fast", action="store_true", help="tiny subset (for tests)")
    p.add_argument("--engine", default="auto", choices=("auto", "xla", "native"),
                   help="the engine of the custom-product layers (default: auto)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> float:
    """Trains, prints progress and returns the final test accuracy."""
    args = parse_args(argv)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = load_data(args.data, args.fast, args.seed)
    n_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = DigitsNet(args.op, x_tr.shape[-1], x_tr.shape[1:3], n_classes,
                      rngs=nnx.Rngs(args.seed), engine=args.engine)
    lr = args.lr if args.lr is not None else default_lr(args.op)
    print(f"jaxconv {jaxconv.__version__} | jax {jax.__version__} on "
          f"{jax.devices()[0].platform} | op {args.op}")
    print(f"data: {len(x_tr)} train / {len(x_te)} test, images {x_tr.shape[1:]}, "
          f"{n_classes} classes")
    print(f"model: {model.describe()}")

    model.train()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    model.eval()
    eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    params_d = nnx.to_pure_dict(params)
    rest_d = nnx.to_pure_dict(rest)
    mask = op_kernel_mask(params_d, model)
    batch = min(args.batch_size, len(x_tr))
    steps_per_epoch = len(x_tr) // batch
    tx = make_optimizer(args.op, lr, steps_per_epoch * args.epochs, mask)
    opt_state = tx.init(params_d)
    clip = layout_of(args.op) == "xnor"
    opt_name = ("adam" if layout_of(args.op) != "distance" else
                f"adder_scale(0.2) on the {args.op} kernels, "
                + ("SGD momentum 0.9, wd 5e-4" if args.op in SGD_OPS else "adam"))
    print(f"optimiser: {opt_name}, lr {lr:g} cosine decay, batch {batch}, {args.epochs} epochs"
          + (", xnor kernels clipped to [-1, 1]" if clip else ""))

    def forward(gd: Any, p: dict, r: dict, x: Array) -> tuple[Array, dict]:
        # Pure function of pure-dict parameters and batch statistics.
        m = nnx.merge(gd, _with(params, p), _with(rest, r))
        return m(x), nnx.to_pure_dict(nnx.state(m, nnx.Not(nnx.Param)))

    @jax.jit
    def train_step(p: dict, r: dict, opt_state: Any, x: Array, y: Array):
        def loss_fn(p: dict):
            logits, new_r = forward(graphdef, p, r, x)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, (new_r, jnp.mean(jnp.argmax(logits, -1) == y))

        (loss, (new_r, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        p = optax.apply_updates(p, updates)
        if clip:
            p = clip_latent_weights(p, mask)
        return p, new_r, opt_state, loss, acc

    @jax.jit
    def predict(p: dict, r: dict, x: Array) -> Array:
        return forward(eval_graphdef, p, r, x)[0]

    # Batch norm for evaluation uses "precise" statistics: recomputed with the current
    # weights on (up to) 1024 training images, instead of the running averages, which lag
    # behind while adder/morphological activations move quickly at a high learning rate.
    bns = [m for m in (getattr(model, n, None) for n in ("bn1", "bn2"))
           if isinstance(m, nnx.BatchNorm)]
    for bn in bns:
        bn.momentum = 0.0
    model.train()
    calib_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
    for bn in bns:
        bn.momentum = 0.9
    x_calib = jnp.asarray(x_tr[:1024])

    @jax.jit
    def calibrate(p: dict, r: dict) -> dict:
        return forward(calib_graphdef, p, r, x_calib)[1]

    def evaluate(p: dict, r: dict, x: np.ndarray, y: np.ndarray) -> float:
        if bns:
            r = calibrate(p, r)
        preds = [np.asarray(jnp.argmax(predict(p, r, x[i:i + 512]), -1))
                 for i in range(0, len(x), 512)]
        return float(np.mean(np.concatenate(preds) == y))

    history: dict[str, list[float]] = {"loss": [], "train_acc": [], "test_acc": []}
    rng = np.random.RandomState(args.seed)
    for epoch in range(1, args.epochs + 1):
        te = time.perf_counter()
        perm = rng.permutation(len(x_tr))
        losses, accs = [], []
        for s in range(steps_per_epoch):
            idx = perm[s * batch:(s + 1) * batch]
            params_d, rest_d, opt_state, loss, acc = train_step(
                params_d, rest_d, opt_state, jnp.asarray(x_tr[idx]), jnp.asarray(y_tr[idx]))
            losses.append(float(loss))
            accs.append(float(acc))
        test_acc = evaluate(params_d, rest_d, x_te, y_te)
        history["loss"].append(float(np.mean(losses)))
        history["train_acc"].append(float(np.mean(accs)))
        history["test_acc"].append(test_acc)
        print(f"epoch {epoch:3d}/{args.epochs}  loss {history['loss'][-1]:.4f}  "
              f"train acc {history['train_acc'][-1]:6.2%}  test acc {test_acc:6.2%}  "
              f"({time.perf_counter() - te:.1f} s)", flush=True)
        if not math.isfinite(history["loss"][-1]):
            print("loss is not finite; stopping", file=sys.stderr)
            break

    test_acc = evaluate(params_d, rest_d, x_te, y_te)
    print(f"test accuracy: {test_acc:.2%} (op {args.op}, {len(x_te)} test images, "
          f"{time.perf_counter() - t0:.0f} s)")

    if bns:
        rest_d = calibrate(params_d, rest_d)
    nnx.update(model, _with(params, params_d), _with(rest, rest_d))
    model.eval()
    if args.ckpt_dir:
        jc_checkpoint.save(args.ckpt_dir, model)
        fresh = DigitsNet(args.op, x_tr.shape[-1], x_tr.shape[1:3], n_classes,
                          rngs=nnx.Rngs(args.seed + 1), engine=args.engine)
        jc_checkpoint.restore(args.ckpt_dir, fresh)
        fresh.eval()
        same = bool(jnp.allclose(fresh(jnp.asarray(x_te[:64])), model(jnp.asarray(x_te[:64])),
                                 rtol=1e-5, atol=1e-5))
        print(f"checkpoint saved to {os.path.abspath(args.ckpt_dir)} (Orbax; restored "
              f"{'identical' if same else 'DIFFERENT'} outputs)")
        if not same:
            raise SystemExit("restored checkpoint gives different outputs")
    if args.plot:
        plot_history(history, args.plot, args.op)
        print(f"training curves written to {args.plot}")
    return test_acc


def _with(state: nnx.State, pure: dict) -> nnx.State:
    """A copy of ``state`` holding the arrays of the pure dict ``pure``."""
    new = jax.tree.map(lambda v: v, state)
    nnx.replace_by_pure_dict(new, pure)
    return new


def plot_history(history: dict[str, list[float]], path: str, op: str) -> None:
    """Writes loss and accuracy curves to a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    a1.plot(epochs, history["loss"])
    a1.set(xlabel="epoch", ylabel="training loss", title=f"loss ({op})")
    a2.plot(epochs, history["train_acc"], label="train")
    a2.plot(epochs, history["test_acc"], label="test")
    a2.set(xlabel="epoch", ylabel="accuracy", title=f"accuracy ({op})")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()

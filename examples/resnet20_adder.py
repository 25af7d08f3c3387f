"""AdderNet ResNet-20 on CIFAR-shaped data (32x32x3, 10 classes) with Flax NNX and optax.

The recipe of Chen et al., "AdderNet: Do We Really Need Multiplications in Deep Learning?"
(CVPR 2020), on He et al.'s CIFAR ResNet-20: a standard 3x3 stem, three stages of
``--blocks`` basic blocks (16, 32, 64 channels times ``--width / 16``; ResNet-20 is 3 blocks
per stage), every 3x3 convolution of the blocks an ``adder`` convolution followed by batch
norm (the 1x1 shortcut projections too), global average pooling and a standard ``Linear``
head: the first and last layers stay standard, as in the paper. Training: SGD with momentum
0.9, weight decay 5e-4, a cosine learning rate from ``--lr``, and AdderNet's adaptive
gradient scale (`jaxconv.optim.adder_scale`) on the adder kernels only, selected with
`jaxconv.optim.kernel_mask`. Augmentation: random crops of the 4-padded image and
horizontal flips.

Data: ``--data cifar10.npz`` with arrays ``x_train``, ``y_train``, ``x_test``, ``y_test``
(images ``NHWC`` 32x32x3, uint8 or float in [0, 1]; standardised per channel with the
training set's statistics), or ``--random N`` for N random images (a smoke run).

Run:

```
python examples/resnet20_adder.py --data cifar10.npz --epochs 200
python examples/resnet20_adder.py --random 64 --width 4 --blocks 1 --steps 2 --summary
```
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import jaxconv
from jaxconv import nnx as jnn
from jaxconv.optim import adder_scale, kernel_mask

Array = jax.Array


class Block(nnx.Module):
    """A basic residual block: two 3x3 adder convolutions, each followed by batch norm."""

    def __init__(self, cin: int, cout: int, stride: int, op: str, rngs: nnx.Rngs):
        conv = dict(op=op, use_bias=False, rngs=rngs)
        self.conv1 = jnn.Conv(cin, cout, (3, 3), strides=stride, **conv)
        self.bn1 = nnx.BatchNorm(cout, rngs=rngs)
        self.conv2 = jnn.Conv(cout, cout, (3, 3), **conv)
        self.bn2 = nnx.BatchNorm(cout, rngs=rngs)
        if stride != 1 or cin != cout:
            self.proj = jnn.Conv(cin, cout, (1, 1), strides=stride, **conv)
            self.proj_bn = nnx.BatchNorm(cout, rngs=rngs)
        else:
            self.proj = self.proj_bn = None

    def __call__(self, x: Array) -> Array:
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        short = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(y + short)


class ResNet(nnx.Module):
    """CIFAR ResNet-(6n+2) whose blocks use ``op``; stem and head are standard."""

    def __init__(self, *, width: int = 16, blocks: int = 3, classes: int = 10,
                 op: str = "adder", rngs: nnx.Rngs):
        self.stem = jnn.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, rngs=rngs)
        layers = []
        cin = width
        for stage, mult in enumerate((1, 2, 4)):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                layers.append(Block(cin, width * mult, stride, op, rngs))
                cin = width * mult
        self.blocks = nnx.List(layers)
        self.head = jnn.Linear(cin, classes, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def load_npz(path: str) -> tuple[np.ndarray, ...]:
    """``x_train, y_train, x_test, y_test`` from a user's ``.npz``, checked and scaled."""
    d = np.load(path)
    missing = {"x_train", "y_train", "x_test", "y_test"} - set(d.files)
    if missing:
        raise ValueError(f"{path}: missing arrays {sorted(missing)} (has {d.files}).")
    out = []
    for split in ("train", "test"):
        x, y = d[f"x_{split}"], d[f"y_{split}"].astype(np.int32).reshape(-1)
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"{path}: x_{split} must be NHWC images with 3 channels, got "
                             f"shape {x.shape}.")
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        out += [x, y]
    return tuple(out)


def random_data(n: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``n`` random 32x32x3 images with random labels (train) and ``n // 4`` (test)."""
    rng = np.random.default_rng(seed)
    m = max(n // 4, 1)
    return (rng.random((n, 32, 32, 3), np.float32), rng.integers(0, 10, n).astype(np.int32),
            rng.random((m, 32, 32, 3), np.float32), rng.integers(0, 10, m).astype(np.int32))


def augment(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random crops of the 4-padded images and horizontal flips."""
    n, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    dy, dx = rng.integers(0, 9, n), rng.integers(0, 9, n)
    out = np.stack([padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def make_optimizer(model: ResNet, steps: int, lr: float, eta: float, op: str
                   ) -> nnx.Optimizer:
    """SGD(0.9) with weight decay and a cosine rate; adder_scale on the op's kernels only."""
    schedule = optax.cosine_decay_schedule(lr, max(steps, 1))
    tx = optax.chain(
        optax.masked(adder_scale(eta), kernel_mask(model, op=op)),
        optax.add_decayed_weights(5e-4),
        optax.sgd(schedule, momentum=0.9),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model: ResNet, optimizer: nnx.Optimizer, x: Array, y: Array) -> Array:
    def loss_fn(m: ResNet) -> Array:
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def predict(model: ResNet, x: Array) -> Array:
    return jnp.argmax(model(x), axis=-1)


def evaluate(model: ResNet, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(x), batch):
        correct += int(np.sum(np.asarray(predict(model, jnp.asarray(x[i:i + batch])))
                              == y[i:i + batch]))
    model.train()
    return correct / len(x)


def main(argv: Sequence[str] | None = None) -> float:
    """Trains and returns the test accuracy."""
    p = argparse.ArgumentParser(prog="resnet20_adder.py", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="a .npz with x_train, y_train, x_test, y_test (NHWC)")
    src.add_argument("--random", type=int, metavar="N", help="N random images (smoke run)")
    p.add_argument("--op", default="adder", help="the blocks' op (default: adder)")
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (16)")
    p.add_argument("--blocks", type=int, default=3, help="blocks per stage (3: ResNet-20)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--eta", type=float, default=0.1, help="adder_scale's eta (0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summary", action="store_true", help="print the model summary")
    args = p.parse_args(argv)
    if min(args.width, args.blocks, args.epochs, args.batch_size) < 1:
        p.error("--width, --blocks, --epochs and --batch-size must be >= 1")
    x_tr, y_tr, x_te, y_te = (load_npz(args.data) if args.data else random_data(args.random,
                                                                                 args.seed))
    mean, std = x_tr.mean(axis=(0, 1, 2)), x_tr.std(axis=(0, 1, 2)) + 1e-6
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    bs = min(args.batch_size, len(x_tr))
    per_epoch = len(x_tr) // bs
    steps = per_epoch * args.epochs if args.steps is None else args.steps
    model = ResNet(width=args.width, blocks=args.blocks, op=args.op,
                   rngs=nnx.Rngs(args.seed))
    print(f"ResNet-{6 * args.blocks + 2} ({args.op} blocks, width {args.width}): "
          f"{len(x_tr)} train / {len(x_te)} test images, {steps} steps of {bs}")
    if args.summary:
        print(jaxconv.nnx.summary(model))
    optimizer = make_optimizer(model, steps, args.lr, args.eta, args.op)
    rng = np.random.default_rng(args.seed)
    t0, step, loss = time.perf_counter(), 0, math.nan
    while step < steps:
        order = rng.permutation(len(x_tr))
        for i in range(per_epoch):
            if step >= steps:
                break
            idx = order[i * bs:(i + 1) * bs]
            loss = float(train_step(model, optimizer, jnp.asarray(augment(x_tr[idx], rng)),
                                    jnp.asarray(y_tr[idx])))
            step += 1
            if step % max(per_epoch, 1) == 0 or step == steps:
                print(f"step {step:6d}/{steps}  loss {loss:.4f}  "
                      f"{time.perf_counter() - t0:.1f} s", flush=True)
    acc = evaluate(model, x_te, y_te, bs)
    print(f"test accuracy {acc:.4f}")
    return acc


if __name__ == "__main__":
    main(sys.argv[1:])

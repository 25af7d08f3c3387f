"""Your own ``mymult`` / ``myadd`` inside a jit-compiled conv + dense, with gradients.

The forum question: *"how do I replace the multiplication (and the sum) inside conv2d and a
dense layer by my own functions, and still jit and differentiate?"* With jaxconv you write
them for scalars with ``jnp`` inside, wrap them in a `jaxconv.Op`, and call
`jaxconv.conv_general_dilated` / `jaxconv.dot_general` (lax's signatures) from
any pure function. This script

1. defines ``mymult(a, b) = -(a - b)**2`` (a distance) and ``myadd(a, b) = logaddexp(a, b)``
   (a soft maximum, identity ``-inf``);
2. builds a pure ``model(params, x)``: a 3x3 SAME conv, a ReLU and a dense layer, both with
   the custom product, and compiles it and the gradient of a loss with ``jax.jit``;
3. checks the outputs against a plain Python loop over every output cell, window tap and
   channel, and the gradients against central finite differences of that loop (float64);
4. prints the maximum absolute errors and exits with status 1 if they are too large.

Run:

```python
python examples/jit_function.py
```
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxconv


def mymult(a, b):
    """The user's product, written for scalars with jnp inside."""
    return -((a - b) ** 2)


def myadd(a, b):
    """The user's sum: associative and commutative, identity -inf."""
    return jnp.logaddexp(a, b)


OP = jaxconv.Op(mymult, myadd, identity=-math.inf, name="soft_distance")
DN = ("NHWC", "HWIO", "NHWC")


def model(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    """A pure function: conv (custom product) -> ReLU -> flatten -> dense (custom product)."""
    h = jaxconv.conv_general_dilated(x, params["w_conv"], (1, 1), "SAME",
                                     dimension_numbers=DN, op=OP)
    h = jax.nn.relu(h + params["b_conv"].reshape(1, 1, 1, -1))
    h = h.reshape(h.shape[0], -1)
    return jaxconv.dot_general(h, params["w_dense"], (((1,), (0,)), ((), ())), op=OP)


def loss(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error of the model."""
    return jnp.mean((model(params, x) - y) ** 2)


# --- the plain Python loop (float64, no jax) --------------------------------------------

def _py_mult(a: float, b: float) -> float:
    return -((a - b) ** 2)


def _py_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def loop_model(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The same model, one scalar product at a time; padded taps are skipped."""
    w, b, wd = params["w_conv"], params["b_conv"], params["w_dense"]
    n, hh, ww, c = x.shape
    kh, kw, _, co = w.shape
    h = np.zeros((n, hh, ww, co))
    for bi in range(n):
        for i in range(hh):
            for j in range(ww):
                for o in range(co):
                    acc = -math.inf
                    for di in range(kh):
                        for dj in range(kw):
                            ii, jj = i + di - (kh - 1) // 2, j + dj - (kw - 1) // 2
                            if not (0 <= ii < hh and 0 <= jj < ww):
                                continue  # padding: the tap is absent
                            for ci in range(c):
                                acc = _py_add(acc, _py_mult(x[bi, ii, jj, ci], w[di, dj, ci, o]))
                    h[bi, i, j, o] = max(acc + b[o], 0.0)
    flat = h.reshape(n, -1)
    out = np.zeros((n, wd.shape[1]))
    for bi in range(n):
        for o in range(wd.shape[1]):
            acc = -math.inf
            for k in range(flat.shape[1]):
                acc = _py_add(acc, _py_mult(flat[bi, k], wd[k, o]))
            out[bi, o] = acc
    return out


def loop_loss(params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((loop_model(params, x) - y) ** 2))


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the comparison; returns the exit status (0 if everything agrees)."""
    p = argparse.ArgumentParser(description="A jit-compiled conv + dense with a user-written "
                                "mymult/myadd, checked against a plain Python loop.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fd-checks", type=int, default=6,
                   help="gradient entries checked by finite differences (default 6)")
    args = p.parse_args(argv)

    keys = jax.random.split(jax.random.key(args.seed), 5)
    params = {
        "w_conv": 0.5 * jax.random.normal(keys[0], (3, 3, 2, 3)),
        "b_conv": 0.1 * jax.random.normal(keys[1], (3,)),
        "w_dense": 0.5 * jax.random.normal(keys[2], (5 * 5 * 3, 4)),
    }
    x = jax.random.uniform(keys[3], (2, 5, 5, 2))
    y = jax.random.normal(keys[4], (2, 4))

    fwd = jax.jit(model)
    grad = jax.jit(jax.grad(loss))
    out = fwd(params, x)
    g = grad(params, x, y)

    np_params = {k: np.asarray(v, np.float64) for k, v in params.items()}
    xn, yn = np.asarray(x, np.float64), np.asarray(y, np.float64)
    want = loop_model(np_params, xn)
    fwd_err = float(np.max(np.abs(np.asarray(out, np.float64) - want)))
    print("op: combine = mymult(a, b) = -(a - b)**2, reduce = myadd = logaddexp "
          "(identity -inf)")
    print(f"output shape {out.shape}; max |jit(model) - python loop| = {fwd_err:.2e}")

    rng = np.random.RandomState(args.seed)
    eps = 1e-5
    grad_err = 0.0
    for t in range(args.fd_checks):
        name = ("w_conv", "b_conv", "w_dense")[t % 3]
        idx = tuple(rng.randint(s) for s in np_params[name].shape)
        plus = {k: v.copy() for k, v in np_params.items()}
        minus = {k: v.copy() for k, v in np_params.items()}
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (loop_loss(plus, xn, yn) - loop_loss(minus, xn, yn)) / (2 * eps)
        got = float(g[name][idx])
        err = abs(got - fd) / max(1.0, abs(fd))
        grad_err = max(grad_err, err)
        print(f"  d loss / d {name}{list(idx)}: jax.grad {got:+.6f}  finite diff {fd:+.6f}")
    print(f"max relative gradient error = {grad_err:.2e}")

    ok = fwd_err < 1e-4 * max(1.0, float(np.max(np.abs(want)))) and grad_err < 1e-3
    print("OK: jit-compiled custom product matches the plain loop" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""Generates the plots and the per-op pages of the documentation.

Run from the repository root:

```python
python docs/make_plots.py
```

Each built-in op gets ``docs/ops/<name>.png`` (its response to a 1-D signal, computed with
``jaxconv.conv_general_dilated``) and ``docs/ops/<name>.md`` (formula, padding, gradient,
source, plot). Both are committed; rerun the script after changing an op.
"""

from __future__ import annotations

import inspect
import pathlib
import textwrap

import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jaxconv  # noqa: E402
from jaxconv import ops  # noqa: E402

HERE = pathlib.Path(__file__).parent / "ops"

# name -> (combine, reduce, padding default, gradient)
TABLE = {
    "standard": ("x * w", "sum", "zeros (lax)", "exact; `lax.conv_general_dilated` itself"),
    "xnor": ("sign(x) * sign(w), sign(0) = +1", "sum", "identity (skipped taps)",
             "straight-through on both sides, `1{|x| <= 1}` (larq `ste_sign`)"),
    "adder": ("-|x - w|", "sum", "`pad_value=0` (a padded tap adds `-|w|`)",
              "AdderNet: `dW = sum g (x - w)`, `dX = sum g clip(w - x, -1, 1)`"),
    "l1": ("-|x - w|", "sum", "identity", "exact subgradient"),
    "l2": ("-(x - w)^2", "sum", "identity",
           "exact (computed as `2 x.w - x^2 - w^2` with native convolutions)"),
    "l2_exact": ("-(x - w)^2", "sum", "identity", "exact (generic engine, no cancellation)"),
    "max_plus": ("x + w", "max", "identity (-inf in effect)",
                 "to the winning tap, ties split equally"),
    "min_plus": ("x + w", "min", "identity (+inf in effect)",
                 "to the winning tap, ties split equally"),
    "max_min": ("min(x, w)", "max", "identity", "to the winning tap"),
    "min_max": ("max(x, w)", "min", "identity", "to the winning tap"),
    "max_times": ("x * w", "max", "identity", "to the winning tap, ties split equally"),
    "log": ("x + w", "logsumexp", "identity (-inf in effect)",
            "exact (softmax); an all -inf window gives -inf and zero gradient"),
}
FORWARD_MODE = {"xnor": "no (custom VJP only: `TypeError`)",
                "adder": "no (custom VJP only: `TypeError`)"}


def signal() -> np.ndarray:
    t = np.linspace(0, 1, 96)
    rng = np.random.default_rng(0)
    return (np.sin(2 * np.pi * 2 * t) + (t > 0.6) * 1.0
            + 0.15 * rng.standard_normal(t.size)).astype(np.float32)


def kernel(name: str) -> np.ndarray:
    k = np.linspace(-1, 1, 9)
    if name in ("max_plus", "min_plus", "log", "max_min", "min_max"):
        return (-0.5 * k**2).astype(np.float32)  # a parabolic structuring element
    return (np.exp(-4 * k**2) / 3).astype(np.float32)


def response(name: str, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    y = jaxconv.conv_general_dilated(
        jnp.asarray(x).reshape(1, -1, 1), jnp.asarray(w).reshape(-1, 1, 1), (1,), "SAME",
        dimension_numbers=("NWC", "WIO", "NWC"), op=name)
    return np.asarray(y).reshape(-1)


def plot(name: str) -> None:
    x, w = signal(), kernel(name)
    y = response(name, x, w)
    # The kernel gets its own panel beside the signal, so that it hides no part of it.
    fig = plt.figure(figsize=(7, 3.4))
    grid = fig.add_gridspec(2, 2, width_ratios=(5, 1))
    a0 = fig.add_subplot(grid[0, 0])
    a1 = fig.add_subplot(grid[1, 0], sharex=a0)
    a0.plot(x, color="0.4", lw=1, label="input x")
    a0.legend(loc="upper left", fontsize=8, frameon=False)
    a0.tick_params(labelbottom=False)
    a1.plot(y, color="C0", lw=1.5, label=f"{name}(x, w), 'SAME'")
    a1.legend(loc="upper left", fontsize=8, frameon=False)
    ak = fig.add_subplot(grid[0, 1])
    ak.plot(w, "C1.-", lw=1)
    ak.set_title("kernel w", fontsize=8)
    ak.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(HERE / f"{name}.png", dpi=72)
    plt.close(fig)


def page(name: str) -> str:
    op = ops.get(name)
    combine, reduce, pad, grad = TABLE[name]
    doc = textwrap.dedent(inspect.cleandoc(op.doc)) if op.doc else ""
    return f"""# `{name}`

| property | value |
|---|---|
| combine | `{combine}` |
| reduce | {reduce} |
| padding default | {pad} |
| gradient | {grad} |
| forward mode (`jax.jvp`) | {FORWARD_MODE.get(name, "yes")} |

    out[n, o, co] = {reduce.upper()} over (k, ci) of
                    combine(x[n, o*s + k*d - pad, ci], w[k, ci, co])

{doc}

```python
import jaxconv
y = jaxconv.conv_general_dilated(x, w, (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"), op="{name}")
```

Response of a one-channel 1-D convolution (`'SAME'` padding) to a noisy signal:

![{name}]({name}.png)
"""


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for name in TABLE:
        plot(name)
        (HERE / f"{name}.md").write_text(page(name))


if __name__ == "__main__":
    main()

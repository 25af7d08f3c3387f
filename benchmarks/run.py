"""Time and memory of jaxconv's products against ``lax`` on a fixed set of layers.

Every number is taken under ``jax.jit``: for the forward pass and for forward+backward
(``jax.vjp`` with a fixed cotangent, both gradients). Each op is timed against ``lax`` on
the same shapes in pairs, interleaved round by round (alternating which runs first), so that
a machine shared with other work skews both alike; the ratio is the median of the per-round
ratios, and a row whose ratios spread widely (or whose ``standard`` op, which is lax itself,
is measured far from 1.0x) is flagged UNRELIABLE. Extra memory is
the compiled executable's temp + output bytes (``compiled.memory_analysis()``), next to
lax's. When ``torch`` is importable, the forum recipe (``F.unfold`` + broadcast + reduce)
is timed for ``adder`` and ``max_plus`` with the same thread count, as a ratio to lax; the
table says so when torch is not installed.

Examples:

    python -m benchmarks.run --layers A,E --ops max_plus,adder --repeats 5 --json out.json
    python -m benchmarks.run --smoke
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from benchmarks import timing
from jaxconv import ops

MiB = 2**20

# Bytes above which the torch recipe's (N, L, K, O) tensor is not built (shared machines).
TORCH_RECIPE_MAX_BYTES = 1536 * MiB


@dataclasses.dataclass(frozen=True)
class Layer:
    """One benchmark problem: a convolution (NHWC-style layouts) or a dense product."""

    name: str
    description: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    kind: str = "conv"  # "conv" | "dense"
    padding: str = "SAME"
    groups: int = 1

    @property
    def dimension_numbers(self) -> tuple[str, str, str]:
        nsd = len(self.x_shape) - 2
        sp = {1: "W", 2: "HW", 3: "DHW"}[nsd]
        return (f"N{sp}C", f"{sp}IO", f"N{sp}C")


def _layers(smoke: bool) -> dict[str, Layer]:
    if smoke:
        return {
            "A": Layer("A", "2x8x8x8 -> 8, 3x3 SAME", (2, 8, 8, 8), (3, 3, 8, 8)),
            "B": Layer("B", "2x6x6x16 -> 16, 3x3 SAME", (2, 6, 6, 16), (3, 3, 16, 16)),
            "C": Layer("C", "depthwise 3x3 on 2x8x8x8", (2, 8, 8, 8), (3, 3, 1, 8), groups=8),
            "D": Layer("D", "1-D 2x32x8 -> 8, k=5 SAME", (2, 32, 8), (5, 8, 8)),
            "E": Layer("E", "dense 16x32 @ 32x32", (16, 32), (32, 32), kind="dense"),
        }
    return {
        "A": Layer("A", "8x32x32x64 -> 64, 3x3 SAME", (8, 32, 32, 64), (3, 3, 64, 64)),
        "B": Layer("B", "32x16x16x128 -> 128, 3x3 SAME", (32, 16, 16, 128), (3, 3, 128, 128)),
        "C": Layer("C", "depthwise 3x3 on 8x32x32x64", (8, 32, 32, 64), (3, 3, 1, 64),
                   groups=64),
        "D": Layer("D", "1-D 16x1024x64 -> 64, k=5 SAME", (16, 1024, 64), (5, 64, 64)),
        "E": Layer("E", "dense 256x1024 @ 1024x1024", (256, 1024), (1024, 1024), kind="dense"),
    }


def _user_mult(x: Any, w: Any) -> Any:
    return x * w


def _user_add(a: Any, b: Any) -> Any:
    return a + b


# A user op built from plain functions: multiply-and-add written by hand, which must give
# the same numbers as lax while going through the generic engine.
USER_OP = jaxconv.Op(_user_mult, reduce=_user_add, identity=0.0, name="user_mul_add")


def _soft_mult(x: Any, w: Any) -> Any:
    return jnp.tanh(x - w)


def _soft_or(a: Any, b: Any) -> Any:
    return jnp.maximum(a, b)


# A user op the engine cannot map to a native product (a tanh-distance with a hand-written
# max): the generic tap loop with the hand-written max backward.
USER_GENERIC_OP = jaxconv.Op(_soft_mult, reduce=_soft_or, identity=-float("inf"),
                             name="user_tanh_max")
USER_OPS = {"user": USER_OP, "user_generic": USER_GENERIC_OP}


def _op(name: str) -> jaxconv.Op:
    return USER_OPS[name] if name in USER_OPS else ops.get(name)


ALL_OPS = ("standard", "xnor", "l2", "adder", "max_plus", "log", "user", "user_generic")


def _product_fn(layer: Layer, op: jaxconv.Op | None) -> Callable[[Any, Any], Any]:
    """``f(x, w)``: lax itself when ``op`` is None, else jaxconv with ``op``."""
    if layer.kind == "dense":
        dn = (((1,), (0,)), ((), ()))
        if op is None:
            return lambda x, w: lax.dot_general(x, w, dn)
        return lambda x, w: jaxconv.dot_general(x, w, dn, op=op)
    nsd = len(layer.x_shape) - 2
    kwargs = dict(dimension_numbers=layer.dimension_numbers, feature_group_count=layer.groups)
    if op is None:
        return lambda x, w: lax.conv_general_dilated(
            x, w, (1,) * nsd, layer.padding, **kwargs)
    return lambda x, w: jaxconv.conv_general_dilated(
        x, w, (1,) * nsd, layer.padding, op=op, **kwargs)


def _fwd_bwd(f: Callable[[Any, Any], Any]) -> Callable[[Any, Any, Any], Any]:
    def g(x, w, ct):
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(ct)

    return g


# A row is flagged when the per-round ratios spread more than this (interquartile range over
# the median), or when the ``standard`` op (lax itself) is measured outside these bounds.
NOISY_SPREAD = 0.25
STANDARD_BOUNDS = (0.8, 1.25)


def _measure(f_lax: Callable[[Any, Any], Any], f: Callable[[Any, Any], Any], x: Any, w: Any,
             ct: Any, repeats: int) -> dict[str, Any]:
    """The op against lax, paired and interleaved, forward and forward+backward."""
    fwd, fwd_lax = jax.jit(f), jax.jit(f_lax)
    both, both_lax = jax.jit(_fwd_bwd(f)), jax.jit(_fwd_bwd(f_lax))
    tf = timing.paired(fwd_lax, fwd, (x, w), rounds=repeats)
    tb = timing.paired(both_lax, both, (x, w, ct), rounds=repeats)
    mem = timing.memory_bytes
    return {
        "fwd_ms": tf.ms, "fwd_bwd_ms": tb.ms,
        "lax_fwd_ms": tf.ref_ms, "lax_fwd_bwd_ms": tb.ref_ms,
        "fwd_ratio": tf.ratio, "fwd_bwd_ratio": tb.ratio,
        "fwd_spread": tf.spread, "fwd_bwd_spread": tb.spread,
        "fwd_mem": mem(f, (x, w)), "fwd_bwd_mem": mem(_fwd_bwd(f), (x, w, ct)),
        "lax_fwd_mem": mem(f_lax, (x, w)), "lax_fwd_bwd_mem": mem(_fwd_bwd(f_lax), (x, w, ct)),
    }


def _flags(name: str, row: dict[str, Any]) -> list[str]:
    """Why a row's ratio should not be trusted (empty when it can be)."""
    flags = []
    for kind in ("fwd", "fwd_bwd"):
        if row[f"{kind}_spread"] > NOISY_SPREAD:
            flags.append(f"{kind} ratios spread {row[f'{kind}_spread']:.0%}")
        lo, hi = STANDARD_BOUNDS
        if name == "standard" and not lo <= row[f"{kind}_ratio"] <= hi:
            flags.append(f"standard (lax itself) measured at {row[f'{kind}_ratio']:.2f}x lax in "
                         f"{kind}: timing noise (a busy machine, too few rounds) exceeds the "
                         "differences measured")
    return flags


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _torch_recipe(layer: Layer, op_name: str, x: np.ndarray, w: np.ndarray, ct: np.ndarray,
                  repeats: int, threads: int) -> dict[str, Any] | None:
    """The forum recipe in PyTorch: ``F.unfold`` (2-D) + broadcast combine + reduce."""
    try:
        import torch
        import torch.nn.functional as F  # noqa: N812 - torch's own convention
    except ImportError:
        return None
    if layer.kind != "conv" or len(layer.x_shape) != 4 or layer.groups != 1:
        return {"skipped": "recipe is for 2-D, ungrouped convolutions"}
    n, h, wd, c = layer.x_shape
    kh, kw, ci, co = layer.w_shape
    big = n * h * wd * kh * kw * ci * co * 4
    if big > TORCH_RECIPE_MAX_BYTES:
        return {"skipped": f"(N, L, K, O) tensor of {big / MiB:.0f} MiB"}
    torch.set_num_threads(threads)
    xt = torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)), requires_grad=True)
    wt = torch.tensor(np.ascontiguousarray(w.transpose(3, 2, 0, 1)), requires_grad=True)
    gt = torch.tensor(np.ascontiguousarray(ct.transpose(0, 3, 1, 2)))

    def fwd():
        cols = F.unfold(xt, (kh, kw), padding=(kh // 2, kw // 2))  # (N, C*kh*kw, L)
        wf = wt.reshape(co, -1).t()  # (K, O)
        if op_name == "adder":
            prod = -(cols.transpose(1, 2)[..., None] - wf[None, None]).abs()
            out = prod.sum(2)
        else:
            out = (cols.transpose(1, 2)[..., None] + wf[None, None]).amax(2)
        return out.transpose(1, 2).reshape(n, co, h, wd)

    def fwd_only():
        with torch.no_grad():
            return fwd()

    def both():
        xt.grad = None
        wt.grad = None
        fwd().backward(gt)

    def timed(fn):
        fn()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(ts)

    return {"fwd_ms": timed(fwd_only), "fwd_bwd_ms": timed(both)}


def _fmt_mem(b: int | None) -> str:
    return "n/a" if b is None else f"{b / MiB:.1f}"


def run(layers: Sequence[str], op_names: Sequence[str], repeats: int, smoke: bool,
        torch_recipe: bool = True, out: Any = sys.stdout) -> dict[str, Any]:
    """Runs the benchmark and returns its results (also printed as a table to ``out``)."""
    all_layers = _layers(smoke)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    meta = {
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0]),
        "threads": threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "repeats": repeats,
        "smoke": smoke,
    }
    print(f"# jaxconv benchmarks: jax {meta['jax']} on {meta['device']}, {threads} threads "
          f"(XLA CPU's pool uses every core it may run on); lax and the op timed in pairs, "
          f"interleaved, {repeats} rounds after warm-up; ratio = median of the per-round ratios",
          file=out)
    has_torch = torch_recipe and _torch_available()
    meta["torch"] = has_torch
    if torch_recipe and not has_torch:
        print("# torch is not installed: the torch recipe column stays empty "
              "(pip install torch to fill it, or pass --no-torch)", file=out)
    header = (f"{'layer':5} {'op':9} {'fwd ms':>8} {'x lax':>6} {'f+b ms':>8} {'x lax':>6} "
              f"{'mem fwd MiB (lax)':>18} {'mem f+b MiB (lax)':>18} {'torch x lax f / f+b':>20}"
              f"  note")
    print(header, file=out)
    print("-" * len(header), file=out)
    rows = []
    flagged = 0
    rng = np.random.default_rng(0)
    for lname in layers:
        layer = all_layers[lname]
        x = rng.standard_normal(layer.x_shape).astype(np.float32)
        w = rng.standard_normal(layer.w_shape).astype(np.float32)
        y_shape = jax.eval_shape(_product_fn(layer, None), x, w).shape
        ct = rng.standard_normal(y_shape).astype(np.float32)
        xj, wj, cj = jnp.asarray(x), jnp.asarray(w), jnp.asarray(ct)
        for name in op_names:
            res = _measure(_product_fn(layer, None), _product_fn(layer, _op(name)), xj, wj, cj,
                           repeats)
            row = {"layer": lname, "layer_description": layer.description, "op": name, **res}
            row["flags"] = _flags(name, row)
            flagged += bool(row["flags"])
            torch_txt = ""
            if torch_recipe and name in ("adder", "max_plus"):
                tr = _torch_recipe(layer, name, x, w, ct, max(1, min(repeats, 3)), threads)
                if tr is None:
                    torch_txt = "no torch"
                else:
                    row["torch_recipe"] = tr
                    if "skipped" in tr:
                        torch_txt = "skipped"
                    else:
                        tr["fwd_ratio"] = tr["fwd_ms"] / res["lax_fwd_ms"]
                        tr["fwd_bwd_ratio"] = tr["fwd_bwd_ms"] / res["lax_fwd_bwd_ms"]
                        torch_txt = f"{tr['fwd_ratio']:.1f} / {tr['fwd_bwd_ratio']:.1f}"
            rows.append(row)
            mem_f = f"{_fmt_mem(res['fwd_mem'])} ({_fmt_mem(res['lax_fwd_mem'])})"
            mem_b = f"{_fmt_mem(res['fwd_bwd_mem'])} ({_fmt_mem(res['lax_fwd_bwd_mem'])})"
            note = "UNRELIABLE: " + "; ".join(row["flags"]) if row["flags"] else ""
            print(f"{lname:5} {name:9} {res['fwd_ms']:8.2f} {row['fwd_ratio']:6.2f} "
                  f"{res['fwd_bwd_ms']:8.2f} {row['fwd_bwd_ratio']:6.2f} {mem_f:>18} "
                  f"{mem_b:>18} {torch_txt:>20}  {note}", file=out, flush=True)
    if flagged:
        print(f"# {flagged} row(s) flagged UNRELIABLE: rerun on an idle machine or with more "
              "--repeats", file=out)
    return {"meta": meta, "results": rows}


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Time and memory of jaxconv ops against lax (ratios in the same run). "
                    "Layers: A) 8x32x32x64->64 3x3 SAME, B) 32x16x16x128->128 3x3, "
                    "C) depthwise 3x3 on A, D) 1-D 16x1024x64->64 k=5, "
                    "E) dense 256x1024 @ 1024x1024.")
    p.add_argument("--layers", default="A,B,C,D,E",
                   help="comma-separated layer names (default: A,B,C,D,E)")
    p.add_argument("--ops", default=",".join(ALL_OPS),
                   help=f"comma-separated ops among {','.join(ALL_OPS)} (default: all); "
                        "'user' is a user op built from plain functions (x*w, a+b), 'user_generic' "
                        "one the engine cannot rewrite (tanh(x-w), max)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes and 1 repeat (a quick check for CI)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch forum recipe")
    args = p.parse_args(argv)
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    op_names = [s.strip() for s in args.ops.split(",") if s.strip()]
    known = _layers(args.smoke)
    for lname in layers:
        if lname not in known:
            p.error(f"unknown layer {lname!r}; choose among {','.join(known)}")
    for name in op_names:
        if name not in ALL_OPS:
            p.error(f"unknown op {name!r}; choose among {','.join(ALL_OPS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    repeats = 1 if args.smoke else args.repeats
    result = run(layers, op_names, repeats, args.smoke, torch_recipe=not args.no_torch)
    if args.json:
        d = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(d, exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The first thing to run on a GPU or TPU: correctness of every engine, then timing vs lax.

Run ``python -m benchmarks.device_check`` on the device (at most ~5 minutes; ``--budget-s``
bounds the timing part) or ``python -m benchmarks.device_check --smoke`` anywhere (tiny
shapes, seconds on CPU, where the Pallas kernels run in interpret mode).

1. **Correctness.** Each engine (``pallas``, and ``native`` where its library loads) against
   the XLA engine, on the device, for every built-in generic op and a user op with a
   ``custom_vjp`` combine: forward and both gradients of a small grouped 2-D convolution,
   a dense product, and the packed XNOR product with ``engine="pallas"``. Max/min ops are
   expected bit for bit in the forward; the rest within 1e-4 relative.
2. **Timing.** Paired and interleaved: each round times lax and the op once each, alternating,
   and the figure is the median of the rounds' op/lax ratios (a shared device drifts the same
   for both). lax runs at ``precision=lax.Precision.HIGHEST`` (true f32, the fair yardstick
   for a semiring kernel without tensor cores). Layers A (8x32x32x64 -> 64, 3x3 SAME), B
   (32x16x16x128 -> 128) and E (dense 256x1024 @ 1024x1024); forward, and forward+backward.

Prints a table (engine, op, layer, pass, ms, lax ms, ratio) and, with ``--json PATH``, the
rows as JSON. The exit status is 1 when a correctness check fails.

Example::

    python -m benchmarks.device_check
    python -m benchmarks.device_check --ops max_plus --layers B --rounds 20 --json out.json
    python -m benchmarks.device_check --smoke
"""

from __future__ import annotations

import argparse
import json
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
from benchmarks.run import Layer
from jaxconv import ops, quantizers
from jaxconv._src import packed as pk

HIGHEST = lax.Precision.HIGHEST
CHECK_OPS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact", "log",
             "ste_times")
TIME_OPS = ("max_plus", "adder", "log")
TIME_ENGINES = ("xla", "pallas")


def _ste_times(x: Any, w: Any) -> Any:
    return quantizers.ste_sign(x * w)


# A user op whose combine carries a custom_vjp (larq's straight-through sign) on each
# product: the sign reads both operands, so it cannot be factored out of the product (a
# one-operand rule such as ``ste_sign(x) * w`` is a lax rewrite that reaches no kernel).
STE_TIMES = jaxconv.Op(_ste_times, "sum", name="ste_times")


def _op(name: str) -> jaxconv.Op:
    return STE_TIMES if name == "ste_times" else ops.get(name)


def layers(smoke: bool) -> dict[str, Layer]:
    """The timed layers (tiny ones with ``smoke``)."""
    if smoke:
        return {
            "A": Layer("A", "2x6x6x8 -> 8, 3x3 SAME", (2, 6, 6, 8), (3, 3, 8, 8)),
            "B": Layer("B", "2x4x4x16 -> 16, 3x3 SAME", (2, 4, 4, 16), (3, 3, 16, 16)),
            "E": Layer("E", "dense 16x32 @ 32x16", (16, 32), (32, 16), kind="dense"),
        }
    return {
        "A": Layer("A", "8x32x32x64 -> 64, 3x3 SAME", (8, 32, 32, 64), (3, 3, 64, 64)),
        "B": Layer("B", "32x16x16x128 -> 128, 3x3 SAME", (32, 16, 16, 128), (3, 3, 128, 128)),
        "E": Layer("E", "dense 256x1024 @ 1024x1024", (256, 1024), (1024, 1024), kind="dense"),
    }


def product(layer: Layer, op: jaxconv.Op | None, engine: str = "xla") -> Callable[..., Any]:
    """``f(x, w)`` of a layer: lax at HIGHEST precision when ``op`` is None, else jaxconv."""
    if layer.kind == "dense":
        dn = (((1,), (0,)), ((), ()))
        if op is None:
            return lambda x, w: lax.dot_general(x, w, dn, precision=HIGHEST)
        return lambda x, w: jaxconv.dot_general(x, w, dn, op=op, engine=engine)
    nsd = len(layer.x_shape) - 2
    kw = dict(dimension_numbers=layer.dimension_numbers, feature_group_count=layer.groups)
    if op is None:
        return lambda x, w: lax.conv_general_dilated(
            x, w, (1,) * nsd, layer.padding, precision=HIGHEST, **kw)
    return lambda x, w: jaxconv.conv_general_dilated(
        x, w, (1,) * nsd, layer.padding, op=op, engine=engine, **kw)


def _with_grad(f: Callable[..., Any]) -> Callable[..., Any]:
    def g(x: Any, w: Any, ct: Any) -> Any:
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(ct.astype(y.dtype))

    return g


def _engines() -> list[str]:
    out = ["pallas"]
    try:
        from jaxconv._src.engines import native  # type: ignore[attr-defined]

        if getattr(native, "available", lambda: False)() and jax.default_backend() == "cpu":
            out.append("native")
    except ImportError:
        pass
    return out


def _rel_err(got: Any, expect: Any) -> float:
    got, expect = np.asarray(got, np.float64), np.asarray(expect, np.float64)
    same = (got == expect) | (np.isnan(got) & np.isnan(expect))
    if same.all():
        return 0.0
    diff = np.where(same, 0.0, np.abs(got - expect))
    return float(np.max(diff) / max(1.0, float(np.max(np.abs(np.where(same, 0, expect))))))


def _data(shape: Sequence[int], seed: int, dtype: Any = np.float32) -> Any:
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def check_correctness(engines: Sequence[str], op_names: Sequence[str], smoke: bool = False
                      ) -> list[dict[str, Any]]:
    """Each engine against the XLA engine on small problems, forward and gradients.

    With ``smoke``, the dense problem only (besides the packed product).
    """
    conv = Layer("conv", "2x7x6x6 -> 8, 3x3 SAME, 2 groups", (2, 7, 6, 6), (3, 3, 3, 8),
                 groups=2)
    dense = Layer("dense", "9x37 @ 37x11", (9, 37), (37, 11), kind="dense")
    rows = []
    for layer in (dense,) if smoke else (conv, dense):
        x, w = _data(layer.x_shape, 1), _data(layer.w_shape, 2)
        for name in op_names:
            op = _op(name)
            ref_f = jax.jit(_with_grad(product(layer, op, "xla")))
            y_shape = jax.eval_shape(product(layer, op, "xla"), x, w).shape
            ct = _data(y_shape, 3)
            ref_y, ref_g = ref_f(x, w, ct)
            for engine in engines:
                if engine == "native" and op.native is None:
                    continue  # no compiled kernel declared for this op
                t0 = time.perf_counter()
                try:
                    y, g = jax.jit(_with_grad(product(layer, op, engine)))(x, w, ct)
                    fwd_err = _rel_err(y, ref_y)
                    grad_err = max(_rel_err(a, b) for a, b in zip(g, ref_g, strict=True))
                    exact = op.reduce in ("max", "min")
                    ok = (fwd_err == 0.0 if exact else fwd_err < 1e-4) and grad_err < 1e-4
                    err = ""
                except Exception as e:  # noqa: BLE001 - report every failure, keep going
                    fwd_err = grad_err = float("nan")
                    ok, err = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                rows.append(dict(engine=engine, op=name, layer=layer.name, ok=ok,
                                 fwd_err=fwd_err, grad_err=grad_err, error=err,
                                 s=time.perf_counter() - t0))
    if "pallas" in engines:
        rows.append(_check_packed())
    return rows


def _check_packed() -> dict[str, Any]:
    x, w = _data((2, 5, 4, 40), 4), _data((3, 3, 20, 6), 5)
    wq = pk.pack_kernel(w)
    t0 = time.perf_counter()

    def run(engine: str) -> Any:
        return jax.jit(lambda a, b: pk.packed_conv(
            a, b, window_strides=(1, 1), padding="SAME", feature_group_count=2,
            engine=engine))(x, wq)

    try:
        err = _rel_err(run("pallas"), run("xla"))
        ok, msg = err == 0.0, ""
    except Exception as e:  # noqa: BLE001
        err, ok, msg = float("nan"), False, f"{type(e).__name__}: {str(e)[:200]}"
    return dict(engine="pallas", op="packed_xnor", layer="conv", ok=ok, fwd_err=err,
                grad_err=float("nan"), error=msg, s=time.perf_counter() - t0)


def paired_time(fn: Callable[..., Any], ref: Callable[..., Any], args: Sequence[Any],
                rounds: int, target_s: float) -> tuple[float, float, float]:
    """Interleaved timing: ``(op ms, lax ms, median of the rounds' op/lax ratios)``, each
    sample about ``target_s`` seconds long."""
    calls = (timing.calls_for(ref, args, target_s), timing.calls_for(fn, args, target_s))
    r = timing.paired(ref, fn, args, rounds=rounds, calls=calls, warmup=0)
    return r.ms, r.ref_ms, r.ratio


def time_layers(layer_set: dict[str, Layer], op_names: Sequence[str], engines: Sequence[str],
                rounds: int, budget_s: float, grad: bool, target_s: float
                ) -> list[dict[str, Any]]:
    """Timing rows, each compared with lax on the same inputs; stops when over budget."""
    t_start = time.perf_counter()
    rows = []
    for lname, layer in layer_set.items():
        x, w = _data(layer.x_shape, 6), _data(layer.w_shape, 7)
        y_shape = jax.eval_shape(product(layer, None), x, w).shape
        ct = _data(y_shape, 8)
        for name in op_names:
            op = _op(name)
            outs = {}
            for engine in engines:
                for mode in (("fwd", "fwd+bwd") if grad else ("fwd",)):
                    row = dict(engine=engine, op=name, layer=lname, mode=mode)
                    if time.perf_counter() - t_start > budget_s:
                        rows.append(dict(row, skipped="time budget"))
                        continue
                    if mode == "fwd":
                        fn = jax.jit(product(layer, op, engine))
                        ref = jax.jit(product(layer, None))
                        args: tuple[Any, ...] = (x, w)
                    else:
                        fn = jax.jit(_with_grad(product(layer, op, engine)))
                        ref = jax.jit(_with_grad(product(layer, None)))
                        args = (x, w, ct)
                    try:
                        t0 = time.perf_counter()
                        jax.block_until_ready(fn(*args))
                        compile_s = time.perf_counter() - t0
                        ms, lax_ms, ratio = paired_time(fn, ref, args, rounds, target_s)
                        row.update(ms=ms, lax_ms=lax_ms, ratio=ratio, compile_s=compile_s)
                        if mode == "fwd":
                            outs[engine] = fn(*args)
                    except Exception as e:  # noqa: BLE001 - a failing row must not stop the rest
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                    rows.append(row)
            if "xla" in outs:
                for r in rows:
                    if (r["op"], r["layer"], r.get("mode")) == (name, lname, "fwd") and \
                            r["engine"] in outs and r["engine"] != "xla":
                        r["err_vs_xla"] = _rel_err(outs[r["engine"]], outs["xla"])
    return rows


def _print_checks(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'engine':8} {'op':12} {'problem':6} {'pass':5} {'fwd err':>9} {'grad err':>9}")
    for r in rows:
        print(f"{r['engine']:8} {r['op']:12} {r['layer']:6} {'yes' if r['ok'] else 'NO':5} "
              f"{r['fwd_err']:9.2e} {r['grad_err']:9.2e} {r['error']}")


def _print_times(rows: Sequence[dict[str, Any]]) -> None:
    print(f"{'engine':8} {'op':10} {'layer':6} {'mode':8} {'ms':>9} {'lax ms':>9} "
          f"{'ratio':>7} {'compile s':>9} {'err vs xla':>10}")
    for r in rows:
        head = f"{r['engine']:8} {r['op']:10} {r['layer']:6} {r['mode']:8}"
        if "skipped" in r or "error" in r:
            print(f"{head} {r.get('skipped') or r.get('error')}")
            continue
        err = r.get("err_vs_xla")
        print(f"{head} {r['ms']:9.3f} {r['lax_ms']:9.3f} {r['ratio']:7.2f} "
              f"{r['compile_s']:9.1f} {'' if err is None else f'{err:10.1e}'}")


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the checks and the timing; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few rounds (CPU CI)")
    p.add_argument("--ops", default=None, help=f"timed ops (default {','.join(TIME_OPS)})")
    p.add_argument("--layers", default=None, help="timed layers (default A,B,E; smoke: E)")
    p.add_argument("--engines", default=",".join(TIME_ENGINES), help="timed engines")
    p.add_argument("--rounds", type=int, default=None, help="timing rounds (default 15)")
    p.add_argument("--budget-s", type=float, default=200.0,
                   help="stop starting timing rows after this many seconds")
    p.add_argument("--no-grad", action="store_true",
                   help="time the forward only (always with --smoke)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--json", default=None, help="write the rows to this file")
    args = p.parse_args(argv)
    smoke = args.smoke
    all_layers = layers(smoke)
    lnames = [s for s in (args.layers or ("E" if smoke else "A,B,E")).split(",") if s]
    bad = [s for s in lnames if s not in all_layers]
    if bad:
        p.error(f"unknown layer(s) {bad}; choose from {sorted(all_layers)}")
    op_names = [s for s in (args.ops or ("max_plus" if smoke else ",".join(TIME_OPS))
                            ).split(",") if s]
    for name in op_names:
        try:
            _op(name)
        except ValueError as e:
            p.error(str(e))
    engines = [s for s in args.engines.split(",") if s]
    rounds = args.rounds or (2 if smoke else 15)
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
    print(f"jaxconv {getattr(jaxconv, '__version__', '?')}, smoke={smoke}")
    t0 = time.perf_counter()
    checks: list[dict[str, Any]] = []
    if not args.no_check:
        check_ops = ("max_plus", "ste_times") if smoke else CHECK_OPS
        checks = check_correctness(_engines(), check_ops, smoke)
        print(f"\n## correctness against the XLA engine ({time.perf_counter() - t0:.0f} s)")
        _print_checks(checks)
    t1 = time.perf_counter()
    times = time_layers({k: all_layers[k] for k in lnames}, op_names, engines, rounds,
                        args.budget_s, grad=not (args.no_grad or smoke),
                        target_s=0.002 if smoke else 0.02)
    print(f"\n## time vs lax (HIGHEST), median of {rounds} paired rounds "
          f"({time.perf_counter() - t1:.0f} s)")
    _print_times(times)
    if args.json:
        meta = dict(jax=jax.__version__, backend=jax.default_backend(),
                    devices=[str(d) for d in jax.devices()], smoke=smoke, rounds=rounds)
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, checks=checks, times=times), f, indent=1, default=str)
    return 0 if all(r["ok"] for r in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

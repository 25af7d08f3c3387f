"""The user zoo: ops written the way researchers write them, timed against ``lax``.

Each op is what a new user types (a callable ``jnp.logaddexp`` reduce, a straight-through
sign written as a ``jax.custom_vjp``, a smoothed max, a ``clip`` under max, ...), run with
``engine="auto"``: whatever path the library picks for it is what is timed. Forward, and
forward+backward (``jax.vjp`` with a fixed cotangent, both gradients), each as the median of
paired, interleaved per-round ratios to ``lax`` in the op's own dtype (`benchmarks.timing`).

Layers: A (8x32x32x64 -> 64, 3x3 SAME) and E (dense 256x1024 @ 1024x1024). On layer E,
tropical-gemm (an optional package, ``pip install tropical-gemm``; never required) is timed
as the peer of dense max-plus and max-times, in float32 and float64, against the same lax
product.

The rows bound by an exponential per term (`exp_floor.EXP_BOUND`: the seed op, the smoothed
max, the Gaussian) get a second line: the share of this CPU's exp-limited peak they reach,
forward and forward+backward, the ratio to lax an op at that peak would have (the floor), and
the vector operations per exponential in the compiled kernel's loops (`benchmarks.exp_floor`
says how each is computed; ``--no-floor`` skips the probe).

Example::

    python -m benchmarks.user_zoo --layers A,E --rounds 7
    python -m benchmarks.user_zoo --ops ste_xnor,seed_myadd --layers A --rounds 3
    python -m benchmarks.user_zoo --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from benchmarks import exp_floor, machine, timing
from benchmarks.native import LAYERS, SMOKE, Layer, fwd_bwd, terms


@jax.custom_vjp
def ste(v: Any) -> Any:
    """A straight-through sign as users write it: sign forward, ``1{|v| <= 1}`` backward."""
    return jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype)


def _ste_fwd(v: Any) -> tuple[Any, Any]:
    return ste(v), v


def _ste_bwd(v: Any, g: Any) -> tuple[Any]:
    return (g * (jnp.abs(v) <= 1.0).astype(g.dtype),)


ste.defvjp(_ste_fwd, _ste_bwd)


def stable_logaddexp(a: Any, b: Any) -> Any:
    """A hand-written stable ``log(exp(a) + exp(b))``."""
    m = jnp.maximum(a, b)
    return m + jnp.log(jnp.exp(a - m) + jnp.exp(b - m))


def smoothed_max(a: Any, b: Any) -> Any:
    """A softplus-smoothed max with temperature 0.5, ``max(a, b) + t * softplus(-|a - b| / t)``
    written as ``t * logaddexp(a / t, b / t)`` (defined at two ``-inf``; not a built-in)."""
    return 0.5 * jnp.logaddexp(a / 0.5, b / 0.5)


@dataclasses.dataclass(frozen=True)
class ZooOp:
    """One zoo entry: the op (an `Op` or a built-in name), its operands' dtype, a line."""

    op: Any
    dtype: str
    what: str


ZOO = {
    "seed_myadd": ZooOp(jaxconv.Op(lambda a, b: -(a - b) ** 2, jnp.logaddexp,
                                   identity=-math.inf, name="seed_myadd"), "float32",
                        "Op(lambda a, b: -(a - b)**2, jnp.logaddexp, identity=-inf)"),
    "handwritten_lae": ZooOp(jaxconv.Op(lambda a, b: a + b, stable_logaddexp,
                                        identity=-math.inf, name="handwritten_lae"),
                             "float32", "x + w under a hand-written stable logaddexp"),
    "builtin_log": ZooOp("log", "float32", 'op="log" (x + w under logsumexp)'),
    "ste_xnor": ZooOp(jaxconv.Op(lambda a, b: ste(a) * ste(b), "sum", name="ste_xnor"),
                      "float32", "ste(x) * ste(w), ste a jax.custom_vjp"),
    "builtin_xnor": ZooOp("xnor", "float32", 'op="xnor" (the yardstick of the STE rows)'),
    "ste_sign_xnor": ZooOp(jaxconv.Op(lambda a, b: jaxconv.quantizers.ste_sign(a)
                                      * jaxconv.quantizers.ste_sign(b), "sum",
                                      name="ste_sign_xnor"), "float32",
                           "ste_sign(x) * ste_sign(w) (jaxconv.quantizers)"),
    "fuzzy_max_min": ZooOp(jaxconv.Op(lambda a, b: jnp.minimum(a, b),
                                      lambda a, b: jnp.maximum(a, b), identity=-math.inf,
                                      name="fuzzy_max_min"), "float32",
                           "min(x, w) under a callable max"),
    "gauss_sum": ZooOp(jaxconv.Op(lambda a, b: jnp.exp(-(a - b) ** 2), "sum",
                                  name="gauss_sum"), "float32", "exp(-(x - w)**2) under sum"),
    "softplus_max": ZooOp(jaxconv.Op(lambda a, b: a * b, smoothed_max, identity=-math.inf,
                                     name="softplus_max"), "float32",
                          "x * w under a softplus-smoothed max (callable)"),
    "clip_max": ZooOp(jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max",
                                 name="clip_max"), "float32", "clip(x * w, -1, 1) under max"),
    "tropical_max_times": ZooOp(jaxconv.Op(lambda a, b: a * b, "max",
                                           name="tropical_max_times"), "float32",
                                "x * w under max"),
    "bf16_adder": ZooOp("adder", "bfloat16", 'op="adder" on bfloat16 (vs lax bf16)'),
    "max_plus_f64": ZooOp("max_plus", "float64", 'op="max_plus" in float64 (x64)'),
}
# tropical-gemm's counterpart of a zoo op on a dense layer: (zoo op, its function stem).
PEERS = {"max_plus_f64": "maxplus", "tropical_max_times": "maxmul"}


def _x64(dtype: str) -> contextlib.AbstractContextManager[Any]:
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


def product(layer: Layer, op: Any | None) -> Callable[[Any, Any], Any]:
    """``f(x, w)``: lax's product when ``op`` is None, else jaxconv's (engine ``"auto"``)."""
    if layer.dense:
        dn = (((1,), (0,)), ((), ()))
        if op is None:
            return lambda x, w: lax.dot_general(x, w, dn)
        return lambda x, w: jaxconv.dot_general(x, w, dn, op=op)
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
              feature_group_count=layer.groups)
    if op is None:
        return lambda x, w: lax.conv_general_dilated(x, w, **kw)
    return lambda x, w: jaxconv.conv_general_dilated(x, w, op=op, **kw)


def tropical_gemm() -> Any | None:
    """The optional peer package, or ``None`` when it is not installed."""
    try:
        import tropical_gemm as tg  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return tg


def peer_functions(tg: Any, stem: str, dtype: str, x: np.ndarray, w: np.ndarray
                   ) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """tropical-gemm's forward and forward+backward (argmax, both gradients) of a dense
    product, on numpy arrays."""
    sfx = "_f64" if dtype == "float64" else ""
    m, k = x.shape
    n = w.shape[1]
    fwd = getattr(tg, f"{stem}_matmul{sfx}")
    with_argmax = getattr(tg, f"{stem}_matmul_with_argmax{sfx}")
    ct = np.ones((m, n), x.dtype)  # the backward takes (M, N) cotangents and argmax

    if stem == "maxplus":
        ga, gb = getattr(tg, f"backward_a{sfx}"), getattr(tg, f"backward_b{sfx}")

        def both(a: Any, b: Any) -> Any:
            c, arg = with_argmax(a, b)
            arg = arg.reshape(m, n)
            return c, ga(ct, arg, k), gb(ct, arg, k)
    else:
        ga, gb = getattr(tg, f"maxmul_backward_a{sfx}"), getattr(tg, f"maxmul_backward_b{sfx}")

        def both(a: Any, b: Any) -> Any:
            c, arg = with_argmax(a, b)
            arg = arg.reshape(m, n)
            return c, ga(ct, arg, b), gb(ct, arg, a)

    return fwd, both


def cpu_model() -> str:
    """The CPU model from ``lscpu`` (or ``/proc/cpuinfo``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown"


def threads() -> int:
    """CPU threads this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _data(layer: Layer, dtype: str, seed: int) -> Iterator[Any]:
    rng = np.random.default_rng(seed)
    for shape in (layer.x_shape, layer.w_shape):
        yield jnp.asarray(rng.standard_normal(shape), jnp.dtype(dtype))


def run(layers: list[Layer], names: list[str], rounds: int, backward: bool,
        peers: bool, out: Any = None, peak: dict[str, dict[int, float]] | None = None
        ) -> list[dict]:
    """Times every zoo op on every layer; prints one line per (layer, op) and returns rows.
    With ``peak`` (`machine.peak` of the fma and exp kinds at `machine.threads`), an
    exp-bound row gets its floor columns (`exp_floor.columns`) and a second line."""
    out = sys.stdout if out is None else out
    rows = []
    tg = tropical_gemm() if peers else None
    for layer in layers:
        for name in names:
            entry = ZOO[name]
            with _x64(entry.dtype):
                x, w = _data(layer, entry.dtype, 0)
                ref = product(layer, None)
                f = product(layer, entry.op)
                ct = jnp.ones(jax.eval_shape(ref, x, w).shape, x.dtype)
                engine = jaxconv.explain(entry.op, dtype=entry.dtype).engine
                row = dict(layer=layer.name, op=name, dtype=entry.dtype, engine=engine)
                fw = timing.paired(jax.jit(ref), jax.jit(f), (x, w), rounds=rounds)
                row.update(fwd=fw.ratio, fwd_ms=fw.ms, lax_fwd_ms=fw.ref_ms)
                if backward:
                    fb = timing.paired(jax.jit(fwd_bwd(ref, ct)), jax.jit(fwd_bwd(f, ct)),
                                       (x, w), rounds=rounds)
                    row.update(fwd_bwd=fb.ratio, fwd_bwd_ms=fb.ms, lax_fwd_bwd_ms=fb.ref_ms)
                if layer.dense and name in PEERS and peers:
                    row.update(_peer(tg, PEERS[name], entry.dtype, ref, ct, x, w, rounds,
                                     backward))
                if peak and name in exp_floor.EXP_BOUND and engine == "native":
                    row.update(_floor(name, entry, layer, ref, x, w, row, peak))
            rows.append(row)
            print(_format(row), file=out, flush=True)
            if "exp_fraction" in row:
                print(exp_floor.describe(row), file=out, flush=True)
    return rows


def _floor(name: str, entry: ZooOp, layer: Layer, ref: Callable, x: Any, w: Any, row: dict,
           peak: dict[str, dict[int, float]]) -> dict:
    kind = exp_floor.EXP_BOUND[name]
    n = terms(layer, jax.eval_shape(ref, x, w).shape)
    got: dict[str, Any] = dict(exp_kind=kind, terms=n)
    got.update(exp_floor.columns(row, n, peak, machine.threads(), kind))
    details = jaxconv.explain(entry.op, dtype=entry.dtype).details
    lib = exp_floor.kernel_library(details, str(machine.native_module().isa()))
    if lib is not None:
        for p, fn in zip(("fwd", "bwd"), exp_floor.FUNCTIONS[kind], strict=True):
            ops = exp_floor.loop_ops(lib, fn)
            if ops is not None:
                got[f"{p}_loop_ops"] = dataclasses.asdict(ops)
    return got


def _peer(tg: Any, stem: str, dtype: str, ref: Callable, ct: Any, x: Any, w: Any,
          rounds: int, backward: bool) -> dict:
    if tg is None:
        return dict(peer="tropical-gemm not installed")
    xn, wn = np.asarray(x), np.asarray(w)
    fwd, both = peer_functions(tg, stem, dtype, xn, wn)
    got = dict(peer=f"tropical-gemm {stem}")
    p = timing.paired(jax.jit(ref), fwd, (xn, wn), rounds=rounds)
    got.update(peer_fwd=p.ratio)
    if backward:
        p = timing.paired(jax.jit(fwd_bwd(ref, ct)), both, (xn, wn), rounds=rounds)
        got.update(peer_fwd_bwd=p.ratio)
    return got


def _format(r: dict) -> str:
    s = (f"{r['layer']} {r['op']:>18} {r['dtype']:>8} {r['engine']:>6}  fwd {r['fwd']:8.2f}x "
         f"({r['fwd_ms']:9.2f} ms vs lax {r['lax_fwd_ms']:7.2f})")
    if "fwd_bwd" in r:
        s += (f"  fwd+bwd {r['fwd_bwd']:8.2f}x ({r['fwd_bwd_ms']:9.2f} ms vs lax "
              f"{r['lax_fwd_bwd_ms']:7.2f})")
    if "peer" in r:
        s += f"  | {r['peer']}"
        if "peer_fwd" in r:
            s += f": fwd {r['peer_fwd']:.2f}x lax"
        if "peer_fwd_bwd" in r:
            s += f", fwd+bwd {r['peer_fwd_bwd']:.2f}x lax"
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="A,E")
    p.add_argument("--ops", default=",".join(ZOO))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--no-peers", action="store_true", help="skip tropical-gemm")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the exp-limited peak probe (and the exp rows' floor lines)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    names = [n for n in a.ops.split(",") if n]
    layer_names = [n for n in a.layers.split(",") if n]
    unknown = [n for n in names if n not in ZOO] + [n for n in layer_names
                                                    if n not in ("A", "E")]
    if unknown:
        p.error(f"unknown op or layer (ops: {sorted(ZOO)}; layers: A, E): {unknown}")
    table = SMOKE if a.smoke else LAYERS
    layers = [table[n] for n in layer_names]
    rounds = 1 if a.smoke else a.rounds
    tg = None if a.no_peers else tropical_gemm()
    print(f"# user zoo: jax {jax.__version__}, cpu {cpu_model()!r}, {threads()} threads, "
          f"JAXCONV_NATIVE_THREADS={os.environ.get('JAXCONV_NATIVE_THREADS', 'unset')}, "
          f"{rounds} paired rounds; tropical-gemm "
          f"{'absent' if tg is None else getattr(tg, '__version__', 'present')}; layers: "
          + "; ".join(x.describe() for x in layers), flush=True)
    peak = None
    if not a.no_floor and any(n in exp_floor.EXP_BOUND for n in names):
        peak = machine.peak((machine.threads(),), seconds=0.02 if a.smoke else 0.2,
                            kinds=("fma", *machine.EXP_KINDS))
        print(machine.describe_peak(peak), flush=True)
    rows = run(layers, names, rounds, not a.no_backward, not a.no_peers, peak=peak)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(meta=dict(cpu=cpu_model(), threads=threads(), jax=jax.__version__,
                                     smoke=a.smoke, rounds=rounds), results=rows), fh,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

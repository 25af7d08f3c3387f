"""The native CPU engine against ``lax`` (and the XLA engine): paired, interleaved timing.

Built-in ops, and user ops compiled into the native kernel at first use (``user_*``: see
`USER_OPS`); ``--compile-cost`` times compiling one user op in a fresh process with an
empty kernel cache, then loading it from the cache in a second process.

Each round times lax once and the op once, alternately, under ``jax.jit``; the figure is the
median (and the best) of the rounds' op/lax ratios, which cancels load drift on a shared
machine. Forward, and forward+backward (``jax.vjp`` with a fixed cotangent, both gradients).
Also: the compiled executable's temp + output bytes next to lax's, and the compile time of
``jax.jit(jax.grad(conv))`` next to lax's.

Every table starts with the CPU (model, family / model number), the native ISA, the threads and
the kernel parameters the library reports (and why the search chose them), and the peak
probe's rates (``benchmarks/machine.py``):
each forward row says what fraction of the machine's limit for that op's inner step it reaches
(``peak``: terms per second over the probe's rate at the same thread count; every window tap
counted, padded or not). ``--busy`` times every row a second time beside one competing busy
process (started and killed by the benchmark), right after the quiet timing, and prints both;
``--busy-cpu N`` pins that process to CPU N (``taskset``-style), so that it competes with one
of the call's threads rather than wherever the OS puts it. Each busy row says the 1-minute load
average at its start.

Example::

    python -m benchmarks.native --layers A,E --ops max_plus,adder --rounds 15
    python -m benchmarks.native --layers A,E --ops user_tanh,user_clip --engines native,xla
    python -m benchmarks.native --compile-cost
    python -m benchmarks.native --layers A --ops max_plus,adder --busy
    python -m benchmarks.native --layers A --ops max_plus,l1 --rounds 5 --busy --busy-cpu 1
    python -m benchmarks.native --smoke
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from benchmarks import machine, timing
from jaxconv._src.engines import native

MiB = 2**20
OPS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact")


def _tanh_diff(x: Any, w: Any) -> Any:
    return jnp.tanh(x - w)


def _clip_mul(x: Any, w: Any) -> Any:
    return jnp.clip(x * w, -1.0, 1.0)


def _tanh_x_mul(x: Any, w: Any) -> Any:
    return jnp.tanh(x) * w


def _gauss(x: Any, w: Any) -> Any:
    return jnp.exp(-jnp.square(x - w))


# User ops (none has a built-in kernel): the first two are the yardsticks (a monotone
# map of the product: applied once per output), the last two run their map per product.
USER_OPS = {
    "user_tanh": jaxconv.Op(_tanh_diff, "max", name="user_tanh"),
    "user_clip": jaxconv.Op(_clip_mul, "max", name="user_clip"),
    "user_tanh_mul": jaxconv.Op(_tanh_x_mul, "max", name="user_tanh_mul"),
    "user_gauss": jaxconv.Op(_gauss, "sum", name="user_gauss"),
}


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    groups: int = 1
    dense: bool = False

    def describe(self) -> str:
        kind = "dense" if self.dense else f"{len(self.x_shape) - 2}-D"
        return f"{self.name} {kind} x{self.x_shape} w{self.w_shape} g{self.groups}"


LAYERS = {
    "A": Layer("A", (8, 32, 32, 64), (3, 3, 64, 64)),
    "B": Layer("B", (32, 16, 16, 128), (3, 3, 128, 128)),
    "C": Layer("C", (8, 32, 32, 64), (3, 3, 1, 64), groups=64),
    "D": Layer("D", (16, 1024, 64), (5, 64, 64)),
    "E": Layer("E", (256, 1024), (1024, 1024), dense=True),
}
SMOKE = {
    "A": Layer("A", (2, 8, 8, 8), (3, 3, 8, 8)),
    "C": Layer("C", (2, 8, 8, 8), (3, 3, 1, 8), groups=8),
    "E": Layer("E", (16, 32), (32, 16), dense=True),
}


def product(layer: Layer, op: str | None, engine: str) -> Callable[[Any, Any], Any]:
    """``f(x, w)``: lax's product when ``op`` is None, else jaxconv's with ``op`` / ``engine``."""
    op = USER_OPS.get(op, op)
    if layer.dense:
        dn = (((1,), (0,)), ((), ()))
        if op is None:
            return lambda x, w: lax.dot_general(x, w, dn)
        return lambda x, w: jaxconv.dot_general(x, w, dn, op=op, engine=engine)
    nsd = len(layer.x_shape) - 2
    sp = {1: "W", 2: "HW", 3: "DHW"}[nsd]
    dnum = (f"N{sp}C", f"{sp}IO", f"N{sp}C")
    kw = dict(window_strides=(1,) * nsd, padding="SAME", dimension_numbers=dnum,
              feature_group_count=layer.groups)
    if op is None:
        return lambda x, w: lax.conv_general_dilated(x, w, **kw)
    return lambda x, w: jaxconv.conv_general_dilated(x, w, op=op, engine=engine, **kw)


def fwd_bwd(f: Callable, ct: Any) -> Callable:
    def g(x, w):
        y, vjp = jax.vjp(f, x, w)
        return y, vjp(ct)
    return g


def compile_seconds(f: Callable, args: tuple) -> float:
    """Seconds to compile ``jax.jit(jax.grad(sum of f))`` (both gradients)."""
    return timing.compile_seconds(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=(0, 1)),
                                  args)


def terms(layer: Layer, y_shape: tuple[int, ...]) -> int:
    """Product terms of one forward call: each output combines a whole window (w's shape
    without its output-channel axis for a convolution, the contracted size for a dense)."""
    per_out = layer.w_shape[0] if layer.dense else int(np.prod(layer.w_shape[:-1]))
    return int(np.prod(y_shape)) * per_out


def _time(row: dict, prefix: str, ref_f: Callable, f: Callable, ref_fb: Callable | None,
          fb: Callable | None, args: tuple, rounds: int, inner: int) -> None:
    fw = timing.paired(ref_f, f, args, rounds=rounds, calls=inner, warmup=2)
    row.update({f"{prefix}fwd_ratio": fw.ratio, f"{prefix}fwd_best": fw.best,
                f"{prefix}fwd_ms": fw.ms, f"{prefix}lax_fwd_ms": fw.ref_ms})
    if fb is not None:
        r = timing.paired(ref_fb, fb, args, rounds=rounds, calls=inner, warmup=2)
        row.update({f"{prefix}fwd_bwd_ratio": r.ratio, f"{prefix}fwd_bwd_best": r.best,
                    f"{prefix}fwd_bwd_ms": r.ms, f"{prefix}lax_fwd_bwd_ms": r.ref_ms})


@contextlib.contextmanager
def competitor(cpu: int | None = None) -> Iterator[None]:
    """One competing busy process while the block runs (`machine.Spinner`), pinned to CPU
    ``cpu`` when given (else wherever the OS schedules it).

    Example::

        with competitor(1):
            time_something()
    """
    with machine.Spinner() as spin:
        if cpu is not None and spin.proc is not None:
            os.sched_setaffinity(spin.proc.pid, {cpu})
        yield


def run(layers: list[Layer], ops_: list[str], engines: list[str], rounds: int, inner: int,
        backward: bool, out: Any = sys.stdout, busy: bool = False,
        peak: dict[str, dict[int, float]] | None = None, busy_cpu: int | None = None
        ) -> list[dict]:
    """Times each (layer, op, engine) against lax and prints one row each; with ``busy``
    each row is timed again beside one competing process (pinned to ``busy_cpu`` if given),
    right after the quiet timing."""
    rows = []
    rng = np.random.default_rng(0)
    nthreads = machine.threads()
    for layer in layers:
        x = jnp.asarray(rng.standard_normal(layer.x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(layer.w_shape), jnp.float32)
        ref = product(layer, None, "xla")
        y_shape = jax.eval_shape(ref, x, w).shape
        ct = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
        ref_f = jax.jit(ref)
        ref_fb = jax.jit(fwd_bwd(ref, ct))
        lax_mem = timing.memory_bytes(ref, (x, w))
        lax_compile = compile_seconds(ref, (x, w)) if backward else None
        for op in ops_:
            for engine in engines:
                f = product(layer, op, engine)
                row = dict(layer=layer.name, op=op, engine=engine)
                f_j = jax.jit(f)
                fb_j = jax.jit(fwd_bwd(f, ct)) if backward else None
                _time(row, "", ref_f, f_j, ref_fb, fb_j, (x, w), rounds, inner)
                if busy:
                    row["busy_load"] = os.getloadavg()[0]
                    with competitor(busy_cpu):
                        _time(row, "busy_", ref_f, f_j, ref_fb, fb_j, (x, w), rounds, inner)
                if backward:
                    row.update(compile_s=compile_seconds(f, (x, w)), lax_compile_s=lax_compile)
                row.update(mem=timing.memory_bytes(f, (x, w)), lax_mem=lax_mem)
                kind = machine.PEAK_KIND.get(op, "fma")
                limit = (peak or {}).get(kind, {})
                limit_t = limit.get(nthreads) or (max(limit.values()) if limit else None)
                row["gterms_per_s"] = terms(layer, y_shape) / (row["fwd_ms"] * 1e-3) * 1e-9
                row["peak_kind"] = kind
                row["peak_fraction"] = row["gterms_per_s"] / limit_t if limit_t else None
                rows.append(row)
                print(_format(row), file=out, flush=True)
    return rows


def _format(r: dict) -> str:
    s = (f"{r['layer']} {r['op']:>9} {r['engine']:>6}  fwd {r['fwd_ratio']:6.2f}x "
         f"(best {r['fwd_best']:5.2f}x, {r['fwd_ms']:8.2f} ms vs lax {r['lax_fwd_ms']:7.2f})")
    if r.get("peak_fraction") is not None:
        s += f"  {r['gterms_per_s']:6.1f} G/s = {r['peak_fraction']:4.0%} {r['peak_kind']} peak"
    if "fwd_bwd_ratio" in r:
        s += (f"  fwd+bwd {r['fwd_bwd_ratio']:6.2f}x (best {r['fwd_bwd_best']:5.2f}x, "
              f"{r['fwd_bwd_ms']:8.2f} ms vs lax {r['lax_fwd_bwd_ms']:7.2f})"
              f"  compile {r['compile_s']:5.2f}s vs {r['lax_compile_s']:4.2f}s")
    if r["mem"] is not None and r["lax_mem"]:
        s += f"  mem {r['mem'] / MiB:6.2f} MiB ({r['mem'] / r['lax_mem']:4.2f}x lax)"
    if "busy_fwd_ratio" in r:
        s += (f"\n{'':>19}busy: fwd {r['busy_fwd_ratio']:6.2f}x (best {r['busy_fwd_best']:5.2f}x, "
              f"{r['busy_fwd_ms']:8.2f} ms vs lax {r['busy_lax_fwd_ms']:7.2f})")
        if "busy_fwd_bwd_ratio" in r:
            s += (f"  fwd+bwd {r['busy_fwd_bwd_ratio']:6.2f}x (best "
                  f"{r['busy_fwd_bwd_best']:5.2f}x, {r['busy_fwd_bwd_ms']:8.2f} ms vs lax "
                  f"{r['busy_lax_fwd_bwd_ms']:7.2f})")
        s += f"  load {r['busy_load']:.1f}"
    return s


_COMPILE_SCRIPT = """
import json, sys, time
t0 = time.perf_counter()
import jax.numpy as jnp
from benchmarks.native import USER_OPS
from jaxconv._src.engines import native
t1 = time.perf_counter()
k = native.user_kernel(USER_OPS[sys.argv[1]])
t2 = time.perf_counter()
print(json.dumps(dict(seconds=t2 - t1, compiled=k.compiled, import_s=t1 - t0)))
"""


def compile_cost(names: list[str], out: Any = sys.stdout) -> list[dict]:
    """First use of each user op in a fresh process with an empty cache, then a second
    process (a cache hit): translation + compilation + loading, in seconds."""
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    rows = []
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, JAXCONV_CACHE_DIR=cache)
        for name in names:
            row = dict(op=name)
            for run_name in ("first", "second"):
                proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, name], env=env,
                                      capture_output=True, text=True, check=True)
                got = json.loads(proc.stdout.strip().splitlines()[-1])
                row[f"{run_name}_s"] = got["seconds"]
                row[f"{run_name}_compiled"] = got["compiled"]
            rows.append(row)
            print(f"{name:>14}: first use {row['first_s']:5.2f} s (compiled: "
                  f"{row['first_compiled']}), second process {row['second_s']:5.3f} s "
                  f"(compiled: {row['second_compiled']})", file=out, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", default="A,B,C,D,E")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--engines", default="native", help="comma list of native, xla")
    p.add_argument("--rounds", type=int, default=11)
    p.add_argument("--inner", type=int, default=3)
    p.add_argument("--no-backward", action="store_true")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, two rounds")
    p.add_argument("--json", default=None)
    p.add_argument("--busy", action="store_true",
                   help="also time every row beside one competing busy process")
    p.add_argument("--busy-cpu", type=int, default=None,
                   help="pin the --busy process to this CPU (default: not pinned)")
    p.add_argument("--no-peak", action="store_true", help="skip the peak probe")
    p.add_argument("--compile-cost", action="store_true",
                   help="time compiling the user ops (fresh processes, empty cache)")
    a = p.parse_args(argv)
    if a.compile_cost:
        compile_cost(list(USER_OPS))
        return 0
    table = SMOKE if a.smoke else LAYERS
    names = [n for n in a.layers.split(",") if n]
    unknown = [n for n in names if n not in LAYERS] + [o for o in a.ops.split(",")
                                                        if o not in OPS and o not in USER_OPS]
    if unknown:
        p.error(f"unknown layer or op: {unknown}")
    if a.busy_cpu is not None and a.busy_cpu not in os.sched_getaffinity(0):
        p.error(f"--busy-cpu {a.busy_cpu}: not one of this process's CPUs "
                f"{sorted(os.sched_getaffinity(0))}")
    layers = [table[n] for n in names if n in table]
    rounds, inner = (2, 1) if a.smoke else (a.rounds, a.inner)
    if not native.available():
        print(f"native engine unavailable: {native.load_error()}", file=sys.stderr)
        return 1
    meta = machine.info()
    counts = tuple(sorted({1, meta["threads"]}))
    peak_notes: list[str] = []
    peak = {} if a.no_peak else machine.peak(counts, seconds=0.02 if a.smoke else 0.2,
                                             notes=peak_notes)
    print(machine.describe(meta))
    print(machine.describe_peak(peak, peak_notes))
    print(f"# jax {jax.__version__}, rounds {rounds}x{inner}"
          f"{', quiet then beside one busy process' if a.busy else ''}"
          f"{f' pinned to CPU {a.busy_cpu}' if a.busy and a.busy_cpu is not None else ''}; layers: "
          + "; ".join(x.describe() for x in layers))
    rows = run(layers, a.ops.split(","), a.engines.split(","), rounds, inner,
               not a.no_backward, busy=a.busy, peak=peak, busy_cpu=a.busy_cpu)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(meta=dict(meta, smoke=a.smoke, busy=a.busy, busy_cpu=a.busy_cpu,
                                     jax=jax.__version__,
                                     peak={k: {str(t): v for t, v in d.items()}
                                           for k, d in peak.items()},
                                     peak_notes=peak_notes),
                           results=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

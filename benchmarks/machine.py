"""What a benchmark table was measured on: the CPU, the native engine's ISA, threads and kernel
parameters, a peak probe of the CPU's vector units, and a competing process for busy runs.

Every table of ``benchmarks/native.py`` starts with `describe` (the CPU, ISA, threads and the
parameters the native library reports), so that a table read later says where it came from.
`peak` asks the native library's probe (``jaxconv._native.peak_probe``) how many terms per
second this CPU can do for the inner step of each kind of kernel; a table then says what
fraction of that limit an op reaches. `Spinner` runs one competing process (a busy loop, not
pinned) beside a measurement: the "busy machine" of issue 23.

Example::

    from benchmarks import machine
    print(machine.describe(machine.info()))
    with machine.Spinner():
        ...  # time something beside one busy process
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from typing import Any

# The probe kind whose inner step each built-in op's kernel runs: max/min of sums (add then
# max or min), max/min of max/min (two compares, the same ports), the absolute-difference
# sums in their min form (min then add), the squared difference (subtract, then FMA).
PEAK_KIND = {"max_plus": "add_max", "min_plus": "add_max", "max_min": "add_max",
             "min_max": "add_max", "adder": "min_add", "l1": "min_add", "l2_exact": "fma"}
PEAK_KINDS = ("fma", "add_max", "min_add")
# The exp-limited steps, run by the kernels' own exponentials (csrc/kernel_expfloor_probe.h):
# ``exp2`` the logsumexp kernels' term (2^(x L + w), csrc/simd_exp.h), ``exp`` vmath.h's exp
# of compiled user combines (benchmarks/exp_floor.py divides by them).
EXP_KINDS = ("exp2", "exp")


def native_module() -> Any | None:
    """The compiled ``jaxconv._native`` module, or ``None`` where it cannot be loaded."""
    try:
        from jaxconv import _native  # noqa: PLC0415 - optional, compiled
    except ImportError:
        return None
    return _native


def cpu_model() -> dict[str, str]:
    """The CPU's model name, vendor, family and model number (``/proc/cpuinfo`` on Linux,
    ``platform`` elsewhere); missing fields are left out.

    Example::

        >>> sorted(cpu_model())  # doctest: +SKIP
        ['family', 'model', 'model_name', 'vendor']
    """
    keys = {"model name": "model_name", "vendor_id": "vendor", "cpu family": "family",
            "model": "model"}
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block is enough
                name, _, value = line.partition(":")
                if name.strip() in keys:
                    out[keys[name.strip()]] = value.strip()
    except OSError:
        pass
    if "model_name" not in out:
        out["model_name"] = platform.processor() or platform.machine()
    return out


def kernel_params(mod: Any | None = None) -> dict[str, Any] | None:
    """The tuning parameters the native kernels run with (after the first use's choice):
    ``jaxconv._native.params()``
    (``None`` without the module or, in an older build, without ``params``).

    Example: ``kernel_params()`` -> ``{'panel_kib': 16, 'block_kib': 192, ...}``."""
    if mod is None:
        mod = native_module()
    if mod is not None:
        # The set the first native call will pick (cached search or JAXCONV_NATIVE_PARAMS),
        # not the compiled-in defaults that precede it (`info` passes the module in).
        from jaxconv._src.engines.native import tuning  # noqa: PLC0415

        tuning.ensure()
    fn = getattr(mod, "params", None)
    if not callable(fn):
        return None
    try:
        got = fn()
    except Exception as e:  # noqa: BLE001 - report, never fail a benchmark on it
        return {"error": f"params(): {e}"}
    return dict(got) if isinstance(got, dict) else {"value": got}


def threads() -> int:
    """The threads a native call may use: ``JAXCONV_NATIVE_THREADS`` if set and positive,
    else the CPUs this process may run on."""
    env = os.environ.get("JAXCONV_NATIVE_THREADS", "")
    if env.strip().isdigit() and int(env) > 0:
        return int(env)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def tuning_origin() -> dict[str, Any] | None:
    """Where the kernel parameters came from (``default``, ``cache``, ``search``, ...) and,
    after a search (fresh or cached), its one-line account of why (`tuning.summary`: the
    scores, margins, load and rounds); ``None`` without the native module."""
    if native_module() is None:
        return None
    from jaxconv._src.engines.native import tuning  # noqa: PLC0415

    got = tuning.params()
    return {"source": got["source"], "why": got["why"], "entry": got["entry"]}


def info() -> dict[str, Any]:
    """The machine a table comes from: CPU, ISA, threads, kernel parameters (and why they
    were chosen), load average."""
    mod = native_module()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return dict(cpu=cpu_model(), isa=str(mod.isa()) if mod is not None else None,
                threads=threads(), cpus=os.cpu_count(), params=kernel_params(mod),
                tuning=tuning_origin(), load_1min=load)


def describe(meta: dict[str, Any]) -> str:
    """Comment lines (``# ...``) for the head of a table: the machine, then where the kernel
    parameters came from."""
    cpu = meta["cpu"]
    fam = f" (family {cpu['family']}, model {cpu['model']})" if "family" in cpu else ""
    s = (f"# cpu: {cpu.get('model_name', '?')}{fam}; {meta['cpus']} cpus; isa {meta['isa']}; "
         f"threads {meta['threads']}")
    if meta.get("load_1min") is not None:
        s += f"; load {meta['load_1min']:.2f}"
    params = meta.get("params")
    s += "; params " + (", ".join(f"{k}={v}" for k, v in params.items()) if params
                        else "(none reported)")
    origin = meta.get("tuning")
    if origin:
        s += f"\n# tuning ({origin['source']})" + (f": {origin['why']}" if origin["why"] else "")
    return s


def peak(thread_counts: tuple[int, ...] = (1, 2), seconds: float = 0.1,
         notes: list[str] | None = None, kinds: tuple[str, ...] = PEAK_KINDS
         ) -> dict[str, dict[int, float]]:
    """G terms/s this CPU reaches for each probe kind of ``kinds`` (`PEAK_KINDS`: ``fma``,
    ``add_max``, ``min_add``; `EXP_KINDS`: ``exp2``, ``exp``) at each thread count, with the
    ISA the native kernels use; empty if the native module has no probe (or, for the exp
    kinds, a build older than them).

    The probe pins each of its threads to a CPU of its own and times each in its own CPU
    time: the rate is then the sum of the threads' rates while they ran, which other
    processes' time slices do not lower (on a machine at load ~10 the wall-clock rate of the
    same run read 31-37 G terms/s at 2 threads, this one 116). Where the threads could not
    each have a CPU (fewer CPUs than threads, pinning refused, a thread found off its CPU),
    the wall-clock rate is used and a line is appended to `notes`.

    Example::

        >>> p = peak((1,), seconds=0.02)  # doctest: +SKIP
        >>> p["fma"][1] > 0  # doctest: +SKIP
        True
    """
    mod = native_module()
    probe = getattr(mod, "peak_probe", None)
    if probe is None:
        return {}
    isa = str(mod.isa())
    out: dict[str, dict[int, float]] = {}
    for kind in kinds:
        out[kind] = {}
        for t in thread_counts:
            try:
                got = probe(kind, t, seconds, isa)
            except ValueError:  # a build without this kind
                del out[kind]
                break
            placed = bool(got.get("distinct_cpus", False)) and "gterms_per_s_cpu" in got
            out[kind][t] = float(got["gterms_per_s_cpu" if placed else "gterms_per_s"])
            if not placed and notes is not None:
                notes.append(f"{kind} at {t} threads: not each on a CPU of its own, "
                             f"wall-clock rate (ran side by side {got.get('overlap', 0):.0%})")
    return out


def describe_peak(p: dict[str, dict[int, float]], notes: list[str] | None = None) -> str:
    """One comment line with the probe's rates (and `peak`'s notes, if any)."""
    if not p:
        return "# peak: (no probe in this build)"
    parts = [f"{k} " + "/".join(f"{v:.0f}" if v >= 20 else f"{v:.1f}" for v in p[k].values())
             for k in p]
    ts = "/".join(str(t) for t in next(iter(p.values())))
    s = f"# peak G terms/s at {ts} threads: " + ", ".join(parts)
    s += " (threads pinned to CPUs of their own, each timed in its CPU time)"
    if notes:
        s += "; except: " + "; ".join(notes)
    return s


_SPIN = "while True:\n    pass\n"


class Spinner:
    """One competing busy process (a Python spin loop, not pinned to a CPU) while the
    ``with`` block runs; it is killed on exit, whatever happens inside.

    Example::

        with Spinner():
            time_something()
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Spinner:
        self.proc = subprocess.Popen([sys.executable, "-c", _SPIN], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)  # let it get going
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

"""The native engine across processes: results that do not depend on the thread count or on
the work split (fine forward claims, banded input gradient), the forced instruction sets, and
the peak probe (``jaxconv._native.peak_probe``) that the benchmark tables divide by.

Each check that needs a different ``JAXCONV_NATIVE_THREADS`` / ``JAXCONV_NATIVE_ISA`` runs a
script in a fresh process (the library reads them once).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxconv._src.engines import native
from jaxconv._src.engines.native import ffi

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Each script prints {case: [y, dx, dw] as hex of their bytes} of native products.
_PRELUDE = r"""
import json, sys, numpy as np, jax, jax.numpy as jnp, jaxconv

def bits(op, x, w, **kw):
    f = lambda x, w: jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", op=op,
        engine="native", dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw)
    y = jax.jit(f)(x, w)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)))(x, w)
    return [np.asarray(a).tobytes().hex() for a in (y, dx, dw)]
"""

_THREAD_SCRIPT = r"""
import json, os, subprocess, sys, time, numpy as np, jax, jax.numpy as jnp, jaxconv
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 13, 11, 24)).astype(np.float32)
w = rng.standard_normal((3, 3, 24, 40)).astype(np.float32)
# "busy": every call again beside a spinner pinned to one CPU, where the threads of a call
# move apart and wait for each other (csrc/kernel_busy_*.h); afterwards no thread of this
# process may keep a CPU set other than the one it had before.
busy = sys.argv[1] == "busy"
out, calls, want = {}, 12 if busy else 1, os.sched_getaffinity(0)
spin = None
for op in ("max_plus", "adder", "l1"):
    f = lambda x, w: jaxconv.conv_general_dilated(x, w, (1, 1), "SAME", op=op,
        engine="native", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    fj, gj = jax.jit(f), jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), (0, 1)))
    y, (dx, dw) = jax.block_until_ready((fj(x, w), gj(x, w)))
    if busy and spin is None:
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        os.sched_setaffinity(spin.pid, {max(os.sched_getaffinity(0))})
    for _ in range(calls - 1):
        assert np.array_equal(fj(x, w), y) and all(map(np.array_equal, gj(x, w), (dx, dw)))
    out[op] = [np.asarray(a).tobytes().hex() for a in (y, dx, dw)]
if spin is not None:
    spin.kill()
    spin.wait()
    # A helper task that started as its call ended may still be on its way back (a thread
    # that moved waits for the CPU it moved to): give the pool a moment to settle.
    for _ in range(200):
        out["moved"] = [t for t in os.listdir("/proc/self/task")
                        if os.sched_getaffinity(int(t)) != want]
        if not out["moved"]:
            break
        time.sleep(0.01)
print(json.dumps(out))
"""


def _run_script(env_extra, script=_THREAD_SCRIPT, *argv):
    """Runs ``script`` (with ``argv``) in a fresh process under ``env_extra``, once per module:
    a second test asking for the same run reads the first one's results.

    Args:
        env_extra: environment variables set for the process.
        script: the script, printing its results as JSON on its last line.
        *argv: the script's arguments.

    Returns:
        The script's results (a copy: a test may change it).
    """
    return copy.deepcopy(_run_script_once(tuple(sorted(env_extra.items())), script, argv))


@functools.cache
def _run_script_once(env_items, script, argv):
    env = dict(os.environ, **dict(env_items))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, *argv], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _assert_same_on_one_and_all_threads(script, *argv, **env_extra):
    """Asserts that ``script`` gives the same bits on one thread and on all of them.

    Args:
        script: the script (see `_run_script`).
        *argv: its arguments.
        **env_extra: other environment variables set for both runs.
    """
    one, many = (_run_script(dict(env_extra, JAXCONV_NATIVE_THREADS=threads), script, *argv)
                 for threads in ("1", "0"))
    assert one == many


def test_results_do_not_depend_on_the_thread_count():
    """One thread, all threads, and all threads beside a busy process (where a call's helper
    moves off its caller's CPU and a waiting thread takes in a descheduled one, csrc/
    kernel_busy_*.h): the same bits, and no thread is left with a changed CPU set."""
    one, many, busy = (_run_script({"JAXCONV_NATIVE_THREADS": threads}, _THREAD_SCRIPT, mode)
                       for threads, mode in (("1", "quiet"), ("0", "quiet"), ("0", "busy")))
    assert busy.pop("moved") == []
    assert one == many == busy


_SPLIT_SCRIPT = _PRELUDE + r"""
rng = np.random.default_rng(3)
# Several kernel blocks of output channels (a thread's packed panel changes block between its
# claims), and a kernel block too large for one panel (the fixed-item path).
# The first has more bands than images, the second several images per run (small outputs).
cases = [((3, 9, 11, 24), (3, 3, 24, 200)), ((2, 6, 7, 160), (3, 3, 160, 70))]
out = {}
for xs, ws in cases:
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    for op in sys.argv[1].split(","):
        out[f"{ws[-1]}/{op}"] = bits(op, x, w)
print(json.dumps(out))
"""


# One process pair per parameter set (a process starts JAX and compiles per op: more ops per
# pair, fewer starts).
@pytest.mark.parametrize(("names", "params"), [
    ("max_plus,max_min,min_max,adder,l1,l2_exact", ""),
    # The other register tile, with claims of a different size and, in the second case, cut
    # panels of the smallest size shared in one item per block.
    ("max_plus,max_min,adder", "tile=1,panel_kib=4,items=1"),
])
def test_dynamic_work_split_does_not_change_results(names, params):
    """The forward's fine dynamic claims (a thread keeps its packed panel between claims of
    one block) and the sums' backward (input gradient cut into bands of input cells, one
    fork-join with the kernel gradient) give the one-thread numbers bit for bit, for plain,
    keyed (max_min, min_max) and min-form (adder, l1) kernels, under the default tuning
    parameters and another set (JAXCONV_NATIVE_PARAMS)."""
    _assert_same_on_one_and_all_threads(_SPLIT_SCRIPT, names, JAXCONV_NATIVE_PARAMS=params)


_WINNER_SCRIPT = _PRELUDE + r"""
rng = np.random.default_rng(7)
# x * w: a compiled user kernel (tanh(x - w) runs on max_plus, x + (-w)).
tanh_max = jaxconv.Op(lambda x, w: jnp.tanh(x * w), "max", name="tanh_prod_max")
# (x, w, groups, data): one long image (the input gradient cut into bands of input cells,
# windows across their borders), several kernel blocks with groups, images smaller than a
# scan item; integer data (ties split between taps), and signed zeros (the keyed ops' float
# recount of a zero result).
cases = [((1, 45, 38, 8), (3, 3, 4, 12), 2, "ties"), ((2, 7, 9, 24), (3, 3, 24, 150), 1, "normal"),
         ((5, 3, 4, 16), (3, 3, 8, 40), 2, "ties"), ((1, 30, 20, 8), (5, 5, 8, 16), 1, "zeros")]
out = {}
for xs, ws, groups, kind in cases:
    if kind == "normal":
        x, w = (rng.standard_normal(s).astype(np.float32) for s in (xs, ws))
    else:
        x, w = (rng.integers(-2, 3, s).astype(np.float32) for s in (xs, ws))
        if kind == "zeros":
            x = np.maximum(x, 0) * np.where(rng.random(xs) < 0.5, -1, 1).astype(np.float32)
            w = np.abs(w)
    for op in sys.argv[1].split(","):
        op = tanh_max if op == "tanh_max" else op
        out[f"{xs}/{kind}/{op}"] = bits(op, x, w, feature_group_count=groups)
print(json.dumps(out))
"""


def test_winner_backward_split_does_not_change_results():
    """The max/min backward's scan shared in small items of positions, then its input
    gradient in bands of input cells and its kernel gradient in column blocks (one fork-join)
    give the one-thread numbers bit for bit: ties, signed zeros, groups, several kernel
    blocks, images smaller than an item and one long image, for built-in, keyed and compiled
    user ops."""
    _assert_same_on_one_and_all_threads(_WINNER_SCRIPT,
                                        "max_plus,min_max,max_min,min_plus,tanh_max")


@pytest.mark.parametrize("kind", ["fma", "add_max", "min_add", "exp2", "exp"])
def test_peak_probe_reports_positive_rates(kind):
    mod = ffi._load()
    for threads in (1, 2):
        got = mod.peak_probe(kind, threads, 0.005)
        assert got["gterms_per_s"] > 0 and got["threads"] == threads
        assert got["isa"] in ("avx512", "avx2", "base") and got["lanes"] in (4, 8, 16)
    base = mod.peak_probe(kind, 1, 0.005, "base")
    assert base["isa"] == "base" and base["lanes"] == 4 and base["gterms_per_s"] > 0


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU sets are Linux's")
def test_peak_probe_places_its_threads_on_cpus_of_their_own():
    """The probe pins each thread to a CPU of its own where the process has enough, says
    whether every thread stayed there, gives the calling thread its CPU set back, and its
    CPU-time rate (which other processes' time slices do not lower) is positive."""
    mod = ffi._load()
    before = os.sched_getaffinity(0)
    one = mod.peak_probe("add_max", 1, 0.01)
    assert one["distinct_cpus"] is True and one["gterms_per_s_cpu"] > 0
    assert 0 < one["overlap"] <= 1.05
    many = mod.peak_probe("add_max", len(before) + 1, 0.01)
    assert many["distinct_cpus"] is False  # more threads than CPUs
    if len(before) >= 2:
        two = mod.peak_probe("add_max", 2, 0.01)
        assert isinstance(two["distinct_cpus"], bool) and two["gterms_per_s_cpu"] > 0
    assert os.sched_getaffinity(0) == before


@pytest.mark.parametrize("args,match", [
    (("fmaa", 1, 0.01), "kind"), (("fma", 0, 0.01), "threads"), (("fma", 1, 0.0), "seconds"),
    (("fma", 1, 0.01, "sse9"), "isa")])
def test_peak_probe_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        ffi._load().peak_probe(*args)


def test_instruction_sets_agree():
    """The AVX2 and baseline builds (forced) give the dispatched build's numbers: max/min
    forward bit for bit, sums and gradients to rounding."""
    # The dispatched build's run is the thread test's all-threads run (one process for both).
    best = _run_script({"JAXCONV_NATIVE_THREADS": "0"}, _THREAD_SCRIPT, "quiet")
    for isa in ("avx2", "base"):
        other = _run_script({"JAXCONV_NATIVE_THREADS": "0", "JAXCONV_NATIVE_ISA": isa},
                            _THREAD_SCRIPT, "quiet")
        assert other["max_plus"][0] == best["max_plus"][0], isa  # max/min: bit for bit
        for op in ("max_plus", "adder", "l1"):
            # Gradient sums are accumulated in an order that follows the vector width.
            for a, b in zip(other[op], best[op], strict=True):
                fa = np.frombuffer(bytes.fromhex(a), np.float32)
                fb = np.frombuffer(bytes.fromhex(b), np.float32)
                np.testing.assert_allclose(fa, fb, rtol=1e-4, atol=1e-4)

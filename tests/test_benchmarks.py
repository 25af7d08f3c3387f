"""The benchmark CLI runs end to end on tiny shapes (``--smoke``) and writes its JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_extras(meta: dict, row: dict) -> None:
    assert row["fwd_mem"] is not None and row["lax_fwd_mem"] is not None


BUSY_CPU = max(os.sched_getaffinity(0))


def _native_busy_extras(meta: dict, row: dict) -> None:
    # Every row timed quiet and beside one busy process pinned to BUSY_CPU (the load said
    # with it), the table headed by the CPU, ISA, threads and peak rates.
    assert meta["busy"] is True and meta["cpu"]["model_name"]
    assert meta["busy_cpu"] == BUSY_CPU and row["busy_load"] >= 0
    assert all(v > 0 for d in meta["peak"].values() for v in d.values())


# id: (module, arguments after --smoke, text the table prints, row fields that must be > 0,
#      further checks of the JSON's meta and row)
SMOKES = {
    "run": ("benchmarks.run", ["--layers", "A", "--ops", "max_plus", "--no-torch"],
            ["max_plus", "threads"],
            ["fwd_ms", "fwd_bwd_ms", "lax_fwd_ms", "lax_fwd_bwd_ms", "fwd_ratio",
             "fwd_bwd_ratio"], _run_extras),
    "native_busy": ("benchmarks.native",
                    ["--busy", "--busy-cpu", str(BUSY_CPU), "--layers", "A", "--ops",
                     "max_plus"],
                    ["# cpu: ", "isa ", "busy: fwd", "# peak G terms/s",
                     f"pinned to CPU {BUSY_CPU}"],
                    ["busy_fwd_ratio", "busy_fwd_bwd_ratio", "busy_fwd_ms", "gterms_per_s",
                     "peak_fraction"], _native_busy_extras),
}


@pytest.mark.parametrize("name", list(SMOKES))
def test_benchmark_cli_smoke(tmp_path, name):
    """A benchmark CLI with ``--smoke`` exits cleanly, prints its table and writes one row
    of positive timings for layer A and max_plus to its JSON."""
    module, args, texts, keys, extras = SMOKES[name]
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", module, "--smoke", *args, "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    for text in texts:
        assert text in proc.stdout, text
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["smoke"] is True and meta["threads"] >= 1
    (row,) = data["results"]
    assert row["layer"] == "A" and row["op"] == "max_plus"
    for key in keys:
        assert row[key] > 0, key
    extras(meta, row)


def test_benchmark_cli_rejects_unknown_names():
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--ops", "nope"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode != 0 and "unknown op" in proc.stderr


def test_engine_core_benchmark_smoke():
    from benchmarks import engine_core

    rows = engine_core.main(["--smoke"])
    assert [r["op"] for r in rows] == ["lax", "max_plus", "user_clip_max"]
    for r in rows:
        assert r["vmap_fwd"] > 0 and r["compile"] > 0 and r["mem_fb"][0] > 0


def test_benchmark_pairs_timings_and_says_what_is_missing(monkeypatch):
    import io

    sys.path.insert(0, ROOT)
    from benchmarks import run as bench

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    out = io.StringIO()
    result = bench.run(["A"], ["standard", "adder"], repeats=3, smoke=True, out=out)
    text = out.getvalue()
    assert "torch is not installed" in text and "no torch" in text
    assert "interleaved" in text and result["meta"]["torch"] is False
    for row in result["results"]:
        assert row["fwd_spread"] >= 0 and row["fwd_bwd_spread"] >= 0
        assert isinstance(row["flags"], list)


def test_benchmark_flags_meaningless_ratios():
    sys.path.insert(0, ROOT)
    from benchmarks import run as bench

    calm = {"fwd_ratio": 1.02, "fwd_bwd_ratio": 0.97, "fwd_spread": 0.05,
            "fwd_bwd_spread": 0.1}
    assert bench._flags("standard", calm) == []
    assert bench._flags("adder", {**calm, "fwd_ratio": 3.0}) == []
    busy = bench._flags("standard", {**calm, "fwd_ratio": 0.29})
    assert len(busy) == 1 and "0.29x" in busy[0]
    noisy = bench._flags("max_plus", {**calm, "fwd_bwd_spread": 0.6})
    assert len(noisy) == 1 and "spread 60%" in noisy[0]


def test_native_benchmark_rejects_a_cpu_it_cannot_use():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bad = max(os.sched_getaffinity(0)) + 1
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.native", "--smoke", "--busy", "--busy-cpu", str(bad)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and f"--busy-cpu {bad}" in proc.stderr


def test_spinner_competes_and_is_killed():
    sys.path.insert(0, ROOT)
    from benchmarks import machine

    with machine.Spinner() as spin:
        proc = spin.proc
        assert proc is not None and proc.poll() is None  # running
    assert proc.poll() is not None and spin.proc is None  # killed and reaped
    try:
        with machine.Spinner() as spin:
            proc = spin.proc
            raise KeyError("inside")
    except KeyError:
        pass
    assert proc.poll() is not None


def test_machine_description_tolerates_missing_parameters():
    sys.path.insert(0, ROOT)
    from benchmarks import machine

    class NoParams:
        def isa(self):
            return "avx2"

    class Params:
        def params(self):
            return {"mr": 6, "nv": 4}

    assert machine.kernel_params(NoParams()) is None
    assert machine.kernel_params(Params()) == {"mr": 6, "nv": 4}
    meta = dict(cpu={"model_name": "Some CPU", "family": "6", "model": "143"}, cpus=4,
                isa="avx2", threads=4, params=None, load_1min=0.5)
    line = machine.describe(meta)
    assert "Some CPU (family 6, model 143)" in line and "params (none reported)" in line
    assert "mr=6" in machine.describe(dict(meta, params={"mr": 6}))


def test_machine_description_reports_the_tuning_parameters():
    sys.path.insert(0, ROOT)
    from benchmarks import machine
    from jaxconv import _native

    got = machine.kernel_params()
    assert got == dict(_native.params())
    assert set(got) == set(_native.param_fields())
    line = machine.describe(machine.info())
    assert all(f"{k}={v}" in line for k, v in got.items())
    assert machine.describe_peak({}) == "# peak: (no probe in this build)"
    assert "fma 50/90" in machine.describe_peak({"fma": {1: 50.0, 2: 90.0}})
    # Where the kernel parameters came from, and why (after a search: its scores and load).
    origin = machine.tuning_origin()
    assert f"# tuning ({origin['source']})" in line
    # The probe's rates, and a note where its threads could not each have a CPU.
    notes: list[str] = []
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    got = machine.peak((1, cpus + 1), seconds=0.005, notes=notes)
    assert all(v > 0 for d in got.values() for v in d.values())
    assert len(notes) == 3 and all(f"at {cpus + 1} threads: not each on a CPU" in n
                                   for n in notes)
    assert "except: " in machine.describe_peak(got, notes)



def test_tuning_search_benchmark_counts_the_picks(tmp_path, monkeypatch):
    """``benchmarks.tuning_search`` runs the search, counts its picks, costs them against the
    defaults and puts the real timing back after a noisy run."""
    sys.path.insert(0, ROOT)
    from benchmarks import tuning_search
    from jaxconv._src.engines.native import tuning

    real_time, real_search = tuning._time, tuning.search
    monkeypatch.setattr(tuning, "search", lambda: real_search(rounds=1, confirm_rounds=1))
    out = tmp_path / "t.json"
    assert tuning_search.main(["--searches", "2", "--noise", "0.1", "--cost-rounds", "1",
                               "--json", str(out)]) == 0
    assert tuning._time is real_time
    data = json.loads(out.read_text())
    assert len(data["runs"]) == 2 and sum(data["counts"].values()) == 2
    assert all(r["cpu_s"] > 0 and r["why"].startswith("searched at ") for r in data["runs"])
    for key, ratios in data["costs"].items():
        assert key != "{}" and set(ratios) == set(tuning_search.COST_PROBLEMS)
        assert all(v > 0 for v in ratios.values())


# The one-thread kernel harnesses (benchmarks/*_1t.cc) build against today's csrc/: nothing
# else compiles them, and a harness that no longer builds is found only when a measurement is
# due. -fsyntax-only instantiates the kernel templates they call without generating code.
HARNESSES = ["fwd_1t.cc", "dense_bwd_1t.cc", "sumbwd_1t.cc", "lowdense_1t.cc", "lowuser_1t.cc"]


@pytest.mark.parametrize("harness", HARNESSES)
def test_kernel_harness_compiles(harness):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx is not None, "the harnesses need a C++ compiler (the native build has one)"
    flags = ["-std=c++17", "-fsyntax-only", "-ffp-contract=off", "-mavx512f", "-mavx512dq",
             "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2", "-Wno-ignored-attributes",
             "-Werror", f"-I{os.path.join(ROOT, 'csrc')}"]
    done = subprocess.run([cxx, *flags, os.path.join(ROOT, "benchmarks", harness)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]

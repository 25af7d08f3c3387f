"""The benchmark CLI runs end to end on tiny shapes (``--smoke``) and writes its JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_benchmark_cli_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--layers", "A", "--ops",
         "max_plus", "--no-torch", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "max_plus" in proc.stdout and "threads" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True and data["meta"]["threads"] >= 1
    (row,) = data["results"]
    assert row["layer"] == "A" and row["op"] == "max_plus"
    for key in ("fwd_ms", "fwd_bwd_ms", "lax_fwd_ms", "lax_fwd_bwd_ms", "fwd_ratio",
                "fwd_bwd_ratio"):
        assert row[key] > 0, key
    assert row["fwd_mem"] is not None and row["lax_fwd_mem"] is not None


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

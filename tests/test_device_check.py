"""``python -m benchmarks.device_check --smoke`` runs end to end on CPU and reports its rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_check_smoke(tmp_path):
    out = tmp_path / "check.json"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.device_check", "--smoke", "--json", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "correctness against the XLA engine" in proc.stdout
    assert "time vs lax (HIGHEST)" in proc.stdout
    data = json.loads(out.read_text())
    assert data["meta"]["smoke"] is True
    checks = data["checks"]
    assert {r["op"] for r in checks} >= {"max_plus", "ste_times", "packed_xnor"}
    assert all(r["ok"] for r in checks), checks
    times = data["times"]
    assert {r["engine"] for r in times} == {"xla", "pallas"}
    for r in times:
        assert r["ms"] > 0 and r["lax_ms"] > 0 and r["ratio"] > 0, r
    assert all(r["err_vs_xla"] == 0.0 for r in times if r["engine"] == "pallas")


def test_device_check_rejects_unknown_names():
    env = dict(os.environ, PYTHONPATH=ROOT)
    for flag, value in (("--ops", "nope"), ("--layers", "Z")):
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.device_check", "--smoke", flag, value],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 2 and value in proc.stderr

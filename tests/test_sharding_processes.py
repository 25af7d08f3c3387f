"""Two processes on 127.0.0.1 (``jax.distributed``, gloo CPU collectives), two CPU devices
each, train as one process with four devices does: the same losses, and the compiled
data-parallel step holds no all-gather (only the gradients' all-reduces)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "tpu_training.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(op: str, devices: int, out: str, *extra: str) -> list[str]:
    return [sys.executable, EXAMPLE, "--op", op, "--cpu-devices", str(devices), "--steps", "3",
            "--per-device-batch", "4", "--json", out, *extra]


def _env() -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return env


# A native op and an op on the XLA engine (the model's other layers are lax's). The XLA
# engine's hand-written backward passes still gather inside their tap loops (issue 21.1):
# only the native op's step is checked for collectives.
PARTITIONED = ("max_plus",)


@pytest.mark.parametrize("op", ["max_plus", "log"])
def test_two_processes_train_as_one(tmp_path, op: str) -> None:
    port = _free_port()
    outs = [str(tmp_path / f"p{i}.json") for i in range(2)]
    procs = [subprocess.Popen(
        _command(op, 2, outs[i], "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                 "--process-id", str(i)),
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        logs = [p.communicate(timeout=420) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, logs, strict=True):
        assert p.returncode == 0, err[-3000:]
    single = str(tmp_path / "single.json")
    proc = subprocess.run(_command(op, 4, single), cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=420, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]

    ref = json.loads(open(single).read())
    assert ref["devices"] == 4 and ref["processes"] == 1
    for out in outs:
        res = json.loads(open(out).read())
        assert res["devices"] == 4 and res["processes"] == 2
        np.testing.assert_allclose(res["losses"], ref["losses"], rtol=1e-5, atol=1e-6)
        if op in PARTITIONED:
            assert set(res["collectives"]) <= {"all-reduce"}, res["collectives"]
    if op in PARTITIONED:
        assert set(ref["collectives"]) <= {"all-reduce"}, ref["collectives"]

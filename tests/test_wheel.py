"""The wheel: built from this tree, installed into a fresh virtual environment that cannot see
the source tree, and run where no C++ compiler can be found (what `pip install jaxconv` gives a
user without a toolchain).

The wheel is built once per session (`pip wheel`, scikit-build-core, as a release builds it)
with a compiler reached through a symlink that is deleted afterwards, so the compiler the wheel
records (``_csrc/build_config.json``) is gone at run time, as a manylinux build's
``/opt/rh/...`` compiler is on a user's machine. The new environment gets the wheel alone
(``--no-deps --no-index``); its dependencies are the running environment's, added to its path
by a ``.pth`` file (``pip check`` then confirms they satisfy the wheel's requirements), which
saves installing jaxlib again. It runs with ``PATH`` holding only its own ``bin``, outside the
source tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import site
import subprocess
import sys
import textwrap
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILERS = ("c++", "g++", "gcc", "cc", "clang++", "clang")
HEADERS = ("kernels.inc", "simd.h", "vmath.h", "problem.h", "userop.h", "build_config.json")

pytestmark = pytest.mark.slow


def _check(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=900, **kw)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def real_compiler() -> str:
    """The compiler this machine builds with (``$CXX`` first, as CMake picks it)."""
    names = (os.environ.get("CXX", ""), "c++", "g++", "clang++")
    found = next((shutil.which(n) for n in names if n and shutil.which(n)), None)
    assert found is not None, "building the wheel needs a C++ compiler"
    return os.path.realpath(found)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory, real_compiler) -> pathlib.Path:
    """The wheel, built once from this tree into a build directory of its own."""
    tmp = tmp_path_factory.mktemp("wheel")
    toolchain = tmp / "toolchain"
    toolchain.mkdir()
    (toolchain / "c++").symlink_to(real_compiler)
    env = {**os.environ, "CXX": str(toolchain / "c++")}
    # At -O0 (the packaging, the run without a compiler and the user op compiled against the
    # shipped headers do not depend on it; every other test runs the -O3 build): a quarter of
    # the -O3 compile time.
    settings = (f"build-dir={tmp / 'build'}", "cmake.define.JAXCONV_OPT_FLAG=-O0",
                "cmake.define.CMAKE_CXX_FLAGS_RELEASE=-DNDEBUG")
    _check([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
            *(f"--config-settings={s}" for s in settings), str(ROOT)], env=env)
    shutil.rmtree(toolchain)  # the compiler the wheel was built with is gone
    (found,) = (tmp / "dist").glob("jaxconv-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> pathlib.Path:
    """A new virtual environment with the wheel installed, and this one's dependencies."""
    root = tmp_path_factory.mktemp("venv") / "env"
    _check([sys.executable, "-m", "venv", "--without-pip", str(root)])
    python = root / "bin" / "python"
    _check([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
            "--no-index", "--no-compile", str(wheel)])
    purelib = _check([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     env={"PATH": str(root / "bin")}).stdout.strip()
    # Appended after the new environment's own site-packages: its jaxconv comes first. The
    # lines are plain paths, so the editable install's own .pth files there are not run.
    (pathlib.Path(purelib) / "_running_env_deps.pth").write_text("\n".join(site.getsitepackages()))
    return root


def test_wheel_carries_the_extension_and_the_kernel_headers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert any(n.startswith("jaxconv/_native.") for n in names)
    assert {f"jaxconv/_csrc/{h}" for h in HEADERS} <= names
    assert "jaxconv/__init__.py" in names and not any(n.startswith("tests/") for n in names)
    config = json.loads(zipfile.ZipFile(wheel).read("jaxconv/_csrc/build_config.json"))
    assert not os.path.exists(config["cxx"])  # the fixture's symlinked compiler is gone
    assert config["flags"][0] == "-O0"  # the fixture's flag reached the build and its record
    assert not wheel.name.endswith("-none-any.whl")  # a platform wheel: it holds a binary


def test_dependencies_satisfy_the_wheel(venv):
    proc = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"),
                           "check"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0 or proc.stdout.strip(), proc.stderr[-3000:]  # it ran
    problems = [line for line in proc.stdout.splitlines() if line.lower().startswith("jaxconv")]
    assert problems == []


# Run in the new environment: the built-in native kernels against a numpy brute force, a user
# op under engine="auto" (no compiler: the XLA engine, one warning), then, with a compiler on
# the PATH (argv[1]), a user op compiled against the headers the wheel ships.
_PROBE = textwrap.dedent("""
    import json, os, shutil, sys, warnings
    import numpy as np
    import jax.numpy as jnp
    import jaxconv, jaxconv._native
    from jaxconv._src.engines.native import user_kernels

    def brute(x, w, combine, reduce):  # VALID, stride 1, NHWC / HWIO
        p = np.lib.stride_tricks.sliding_window_view(x, w.shape[:2], axis=(1, 2))
        terms = combine(p[..., None], np.transpose(w, (2, 0, 1, 3)))
        return reduce(terms, axis=(3, 4, 5))

    def conv(x, w, op, engine):
        return np.asarray(jaxconv.conv_general_dilated(
            x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), op=op,
            engine=engine))

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 6, 3), dtype=np.float32)
    w = rng.standard_normal((3, 2, 3, 5), dtype=np.float32)
    out = {"jaxconv": jaxconv.__file__, "native": jaxconv._native.__file__,
           "on_path": [n for n in %(compilers)r if shutil.which(n)],
           "compiler": user_kernels.compiler(), "isa": str(jaxconv._native.isa())}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["max_plus"] = float(np.max(np.abs(
            conv(x, w, "max_plus", "native") - brute(x, w, np.add, np.max))))
        out["adder"] = float(np.max(np.abs(
            conv(x, w, "adder", "native") - brute(x, w, lambda a, b: -np.abs(a - b), np.sum))))
        op = jaxconv.Op(lambda a, b: jnp.clip(a * b, -1.0, 1.0), "max", name="wheel_op")
        ref = brute(x, w, lambda a, b: np.clip(a * b, -1, 1), np.max)
        out["user_auto"] = float(np.max(np.abs(conv(x, w, op, "auto") - ref)))
        out["user_auto_again"] = float(np.max(np.abs(conv(x[:1], w, op, "auto") - ref[:1])))
    out["warnings"] = [(c.category.__name__, str(c.message)) for c in caught]
    try:
        conv(x, w, op, "native")
        out["native_error"] = None
    except ValueError as e:
        out["native_error"] = str(e)

    os.environ["PATH"] = sys.argv[1]
    hinge = jaxconv.Op(lambda a, b: jnp.where(a > b, a - b, 0.5 * (b - a)), "min", name="hinge")
    out["compiled"] = float(np.max(np.abs(conv(x, w, hinge, "native") - brute(
        x, w, lambda a, b: np.where(a > b, a - b, 0.5 * (b - a)), np.min))))
    print(json.dumps(out))
""") % {"compilers": COMPILERS}


def test_native_kernels_run_without_a_compiler(venv, tmp_path):
    env = {"PATH": str(venv / "bin"), "HOME": str(tmp_path), "JAX_PLATFORMS": "cpu",
           "JAXCONV_CACHE_DIR": str(tmp_path / "cache")}
    proc = _check([str(venv / "bin" / "python"), "-c", _PROBE, os.environ["PATH"]], env=env,
                  cwd=tmp_path)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert pathlib.Path(out["jaxconv"]).is_relative_to(venv)  # the wheel, not the source tree
    assert pathlib.Path(out["native"]).is_relative_to(venv)
    assert out["on_path"] == [] and out["compiler"] is None
    assert out["max_plus"] == 0.0  # a max of exact sums: bit for bit
    assert out["adder"] < 1e-4
    assert out["user_auto"] < 1e-6 and out["user_auto_again"] < 1e-6
    ((category, message),) = out["warnings"]  # one warning, for the first call only
    assert category == "RuntimeWarning"
    assert "wheel_op" in message and "XLA engine" in message
    assert "no C++ compiler" in message
    assert "wheel_op" in out["native_error"] and "compile" in out["native_error"]
    assert out["compiled"] < 1e-6

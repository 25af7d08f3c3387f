"""csrc/simd_exp.h's 2^u (the logsumexp kernels' exponential) against numpy.

The vmath test driver (tests/vmath_driver.cc) is compiled for AVX-512 and AVX2 (where this CPU
has them) and for the base instruction set, and run on the vector struct ``S`` and the scalar
``Sc``: ``lse_exp2`` within 2.5 ulp of float64 ``exp2`` on [-125, 128) (AVX-512's polynomial on
|r| <= 1/2) or [-125, 128 - 1/16) (AVX2 and base: the table of the eight 2^(j/8) and a cubic),
over a dense sweep that puts about 2^17 inputs on every table entry and every input u = k/8
(r = 0: the entry alone); NaN kept, below -125 a value in [0.7, 1.5] * 2^-125 (never zero, never
a denormal); ``lse_exp2z`` the same with exact zeros below -125 (``-inf`` included); S and Sc
the same bits.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")
DRIVER = os.path.join(os.path.dirname(__file__), "vmath_driver.cc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
if CXX is None:  # the build needs a compiler too: CI always has one
    pytest.fail("no C++ compiler found", pytrace=False)

ISA_FLAGS = {"avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2"],
             "avx2": ["-mavx2", "-mfma"], "base": []}
ISA_CPU = {"avx512": {"avx512f", "avx512dq", "avx512vl", "avx512bw"}, "avx2": {"avx2", "fma"}}
# The top of the accurate range: the table form's 2^(k >> 3) must stay below 2^128.
TOP = {"avx512": 128.0, "avx2": 128.0 - 1 / 16, "base": 128.0 - 1 / 16}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return set()
    return set(flags.split())


ISAS = [i for i in ISA_FLAGS if i == "base"
        or (os.uname().machine == "x86_64" and ISA_CPU[i] <= _cpu_flags())]
CONFIGS = [(isa, mode) for isa in ISAS for mode in ("vec", "scalar")]


def _inputs():
    sweep = np.linspace(-125.0, 127.99, 2**20, dtype=np.float32)
    eighths = np.arange(-1000, 1023, dtype=np.float32) / 8  # r = 0: each entry times 2^k
    near = np.array([0.0, -0.0, 0.5, -0.5, 0.49999997, -0.49999997, 1.0, -1.0, 64.0, 127.0,
                     127.5, 127.9999, -124.5, -124.99999, -125.0, -125.00001, -126.0, -149.0,
                     0.0625, -0.0625, 0.06249999, 0.06250001, 127.9374, 127.93749,
                     -1e30, -np.inf, np.nan, -np.nan, 1e-30, -1e-30, 1e-45], np.float32)
    x = np.concatenate([sweep, eighths, near])
    return np.resize(x, -(-len(x) // 16) * 16)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("simd_exp")
    x = _inputs()
    xf = d / "x.bin"
    x.tofile(xf)
    got = {}
    for isa in ISAS:
        exe = d / f"drv_{isa}"
        subprocess.run([CXX, "-O2", "-std=c++17", "-I", CSRC, *ISA_FLAGS[isa], DRIVER, "-o",
                        str(exe)], check=True)
        for mode in ("vec", "scalar"):
            out = d / f"{isa}_{mode}"
            out.mkdir()
            subprocess.run([str(exe), mode, str(xf), str(xf), str(out), "lse_exp2", "lse_exp2z"],
                           check=True)
            got[isa, mode] = {n: np.fromfile(out / f"{n}.bin", np.float32)
                              for n in ("lse_exp2", "lse_exp2z")}
    return x, got


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
@pytest.mark.parametrize("name", ["lse_exp2", "lse_exp2z"])
def test_accuracy_in_range(outputs, config, name):
    x, got = outputs
    y = got[config][name]
    inside = (x >= -125.0) & (x < TOP[config[0]])
    exact = np.exp2(x[inside].astype(np.float64))
    ulp = np.spacing(exact.astype(np.float32)).astype(np.float64)
    err = np.abs(y[inside] - exact) / ulp
    assert err.max() <= 2.5, (err.max(), x[inside][np.argmax(err)])
    assert y[x == 0.0][0] == 1.0


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
def test_special_values(outputs, config):
    x, got = outputs
    y, yz = got[config]["lse_exp2"], got[config]["lse_exp2z"]
    nan = np.isnan(x)
    assert np.all(np.isnan(y[nan])) and np.all(np.isnan(yz[nan]))
    below = x < -125.0  # -inf included
    assert below.any() and np.isneginf(x[below]).any()
    scaled = y[below].astype(np.float64) / 2.0**-125
    assert np.all((scaled >= 0.7) & (scaled <= 1.5))
    assert np.all(yz[below] == 0.0)
    assert np.array_equal(y[~below], yz[~below], equal_nan=True)


@pytest.mark.parametrize("isa", ISAS)
def test_vector_and_scalar_agree(outputs, isa):
    _, got = outputs
    for name in ("lse_exp2", "lse_exp2z"):
        a, b = got[isa, "vec"][name], got[isa, "scalar"][name]
        assert np.array_equal(a.view(np.uint32), b.view(np.uint32))

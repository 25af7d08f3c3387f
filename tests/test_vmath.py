"""csrc/simd.h's elementwise operations and csrc/vmath.h's functions against numpy.

A small driver (tests/vmath_driver.cc) is compiled once per instruction set this CPU has, and
run on the vector struct `S` and on the scalar struct `Sc`. The primitives must match numpy
bit for bit; the transcendental functions within an ulp bound of the float64 result, with
their special values (+-0, +-inf, NaN positions) exact, and the same bits from S and Sc.
"""

import math
import os
import shutil
import subprocess

import numpy as np
import pytest

CSRC = os.path.join(os.path.dirname(__file__), os.pardir, "csrc")
DRIVER = os.path.join(os.path.dirname(__file__), "vmath_driver.cc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
if CXX is None:
    pytest.skip("no C++ compiler found", allow_module_level=True)

ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2"],
    "avx2": ["-mavx2", "-mfma"],
    "base": [],
}
ISA_CPU = {"avx512": {"avx512f", "avx512dq", "avx512vl", "avx512bw"}, "avx2": {"avx2", "fma"}}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _x86():
    return os.uname().machine in ("x86_64", "AMD64")


# (binary's instruction set, struct): the scalar struct once without and once with FMA.
CONFIGS = [("avx512", "vec"), ("avx2", "vec"), ("base", "vec"), ("base", "scalar"),
           ("avx512", "scalar")]

# Max ulp error allowed (vs the float64 result), per function.
ULP = {"exp": 2, "exp2": 2, "expm1": 2, "log": 2, "log1p": 2, "log2": 2, "tanh": 3,
       "logistic": 3, "sin": 2, "cos": 2, "erf": 2, "pow": 3}
F64 = {
    "exp": np.exp,
    "exp2": np.exp2,
    "expm1": np.expm1,
    "log": np.log,
    "log1p": np.log1p,
    "log2": np.log2,
    "tanh": np.tanh,
    "sin": np.sin,
    "cos": np.cos,
    "erf": np.vectorize(math.erf, otypes=[np.float64]),
    "logistic": lambda x: 1.0 / (1.0 + np.exp(-x)),
}


def _f32(bits):
    return np.asarray(bits, dtype=np.uint32).view(np.float32)


def _specials():
    maxf, tiny = np.finfo(np.float32).max, np.finfo(np.float32).tiny
    v = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, maxf, -maxf, tiny, -tiny, 1.0, -1.0,
         0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 0.49999997, -0.49999997, 8388607.5, -8388607.5,
         8388608.0, 16777215.0, 16777216.0, 2.0, 3.0, -3.0, 10.0, -10.0, 0.625, -0.625]
    # Overflow / underflow thresholds of the exponentials, tanh / logistic saturation.
    for c in (88.0, 88.37, 88.38, 88.72, 88.7228, 88.72284, 88.7229, 89.0, 103.0, 103.97,
              103.98, 104.0, 126.0, 127.0, 127.99, 128.0, 128.01, 149.0, 149.5, 150.0, 151.0,
              17.0, 17.4, 9.0, 9.01, 15.0, 16.7, 30.0, 1e10,
              # Near multiples of pi/2 (sin / cos), either side of the 2^23 reduction switch.
              1.5707964, 3.1415927, 4.712389, 6.2831855, 9.424778, 1e5 * np.pi, 8388607.0,
              8388608.0, 8388609.0, 16777216.0 * np.pi, 1e22, 2.0**100, 2.0**127):
        v += [c, -c]
    x = np.array(v, np.float32)
    b = x.view(np.uint32)
    near = (b[:, None].astype(np.int64) + np.arange(-3, 4)[None, :]).ravel()
    near = near[(near >= 0) & (near < 2**32)]
    # Denormals, tiny values (log1p / expm1 / tanh near 0), values around 1 (log, log1p).
    small = np.concatenate([np.arange(1, 4096), np.arange(1, 2**23, 4099),
                            np.arange(0x3000_0000, 0x3300_0000, 3989),
                            np.arange(0x3F70_0000, 0x3F90_0000, 61)])
    small = np.concatenate([small, small | 0x8000_0000])
    return np.concatenate([_f32(near), _f32(small)])


def _sweep():
    # 2^20 bit patterns evenly spaced over all floats (both signs, NaNs included).
    return _f32(np.arange(2**20, dtype=np.uint64) * 4096 + 1234)


def _pad(*arrays):
    n = -(-max(len(a) for a in arrays) // 16) * 16
    return [np.resize(a, n).astype(np.float32) for a in arrays]


def _function_inputs():
    x = np.concatenate([_sweep(), _specials()])
    return _pad(x, x)


def _primitive_inputs():
    x = np.concatenate([_sweep()[::8], _specials()])
    y = np.random.default_rng(0).permutation(x)
    # Every pair of special values (equal operands, zeros of both signs, NaNs included).
    s = _specials()[:256]
    sx, sy = np.meshgrid(s, s)
    return _pad(np.concatenate([x, sx.ravel()]), np.concatenate([y, sy.ravel()]))


def _pow_inputs():
    rng = np.random.default_rng(1)
    n = 2**17
    # Positive x anywhere, y such that |y log x| stays within the float range (and beyond).
    x = _f32(rng.integers(1, 0x7F80_0000, n))
    lx = np.abs(np.log(x.astype(np.float64)))
    y = (rng.uniform(-110, 110, n) / np.maximum(lx, 1e-30)).astype(np.float32)
    # Negative x with integer y, x near 1 with large y, small integer powers.
    xn = -_f32(rng.integers(0x3000_0000, 0x4300_0000, n // 4))
    yn = rng.integers(-40, 40, n // 4).astype(np.float32)
    x1 = (1 + rng.uniform(-1e-3, 1e-3, n // 4)).astype(np.float32)
    y1 = rng.uniform(-8e4, 8e4, n // 4).astype(np.float32)
    xi = rng.uniform(-8, 8, n // 4).astype(np.float32)
    yi = rng.integers(-12, 12, n // 4).astype(np.float32)
    yi[::3] += 0.5
    s = np.concatenate([_specials()[:300], [1.0, -1.0, 0.5, -0.5, 2.0, 3.0, -3.0, 1e-30]])
    s = s.astype(np.float32)
    sx, sy = np.meshgrid(s, s)
    return _pad(np.concatenate([x, xn, x1, xi, sx.ravel()]),
                np.concatenate([y, yn, y1, yi, sy.ravel()]))


PRIMS = ["neg", "sqrt", "rsqrt", "floor", "ceil", "trunc", "round_even", "round_away", "sign",
         "div", "maxp", "minp", "copysign", "le", "gt", "ge", "ne", "isnan", "isfinite",
         "mand", "mor", "mxor", "mnot", "mtrue", "band", "bor", "bxor", "bandn", "iadd", "isub",
         "shl", "shr", "sar", "itof", "ftoi", "from_bits", "dmad"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """{(isa, mode): {name: result}} for every config this CPU can run."""
    d = tmp_path_factory.mktemp("vmath")
    cpu = _cpu_flags()
    isas = [i for i in ISA_FLAGS if i == "base" or (_x86() and ISA_CPU[i] <= cpu)]
    procs = {}
    for isa in isas:
        exe = str(d / f"driver_{isa}")
        cmd = [CXX, "-std=c++17", "-O2", "-ffp-contract=off", "-fno-math-errno",
               *ISA_FLAGS[isa], "-I", CSRC, DRIVER, "-o", exe]
        procs[isa] = (exe, subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True))
    data = {}
    with np.errstate(all="ignore"):
        inputs = (("prim", _primitive_inputs(), PRIMS),
                  ("fun", _function_inputs(), [f for f in ULP if f != "pow"]),
                  ("pow", _pow_inputs(), ["pow"]))
    for tag, (x, y), names in inputs:
        x.tofile(d / f"{tag}_x.bin")
        y.tofile(d / f"{tag}_y.bin")
        data[tag] = (x, y, names)
    runs = []
    for isa, (exe, p) in procs.items():
        _, err = p.communicate()
        assert p.returncode == 0, err
        for mode in ("vec", "scalar"):
            for tag, (*_, names) in data.items():
                if (isa, mode) in CONFIGS:
                    out = d / f"{isa}_{mode}_{tag}"
                    out.mkdir()
                    cmd = [exe, mode, str(d / f"{tag}_x.bin"), str(d / f"{tag}_y.bin"), str(out)]
                    runs.append((isa, mode, tag, out, subprocess.Popen([*cmd, *names])))
    res = {}
    for isa, mode, tag, out, p in runs:
        assert p.wait() == 0
        x, y, names = data[tag]
        for n in names:
            res.setdefault((isa, mode), {})[n] = (x, y, np.fromfile(out / f"{n}.bin", np.float32))
    return res


def _get(outputs, config, name):
    if config not in outputs:
        pytest.skip(f"this CPU lacks {config[0]}")
    return outputs[config][name]


def _same_bits(got, want):
    """Equal bit for bit, except that any NaN matches any NaN (and only a NaN)."""
    gn, wn = np.isnan(got), np.isnan(want)
    bad = (gn != wn) | (~wn & (got.view(np.uint32) != want.view(np.uint32)))
    return bad


def _round_away(x):
    a = np.abs(x.astype(np.float64))
    f = np.floor(a)
    return np.copysign(np.where(a - f >= 0.5, f + 1, f), x).astype(np.float32)


def _jax_max(x, y, fn, zero_op):
    r = fn(x, y)
    both0 = (x == 0) & (y == 0)
    zb = zero_op(x.view(np.uint32), y.view(np.uint32)).view(np.float32)
    return np.where(both0, zb, r)


def _u32(f):
    return lambda x, y: f(x.view(np.uint32), y.view(np.uint32)).astype(np.uint32).view(np.float32)


def _ftoi(x):
    ok = np.abs(x) < 2147483520.0
    return np.where(ok, np.trunc(np.where(ok, x, 0)), 0).astype(np.int32).view(np.float32)


def _mask(m):
    return m.astype(np.float32)


PRIM_REF = {
    "neg": lambda x, y: -x,
    "sqrt": lambda x, y: np.sqrt(x),
    "rsqrt": lambda x, y: np.float32(1) / np.sqrt(x),
    "floor": lambda x, y: np.floor(x),
    "ceil": lambda x, y: np.ceil(x),
    "trunc": lambda x, y: np.trunc(x),
    "round_even": lambda x, y: np.rint(x),
    "round_away": lambda x, y: _round_away(x),
    "sign": lambda x, y: np.where((x == 0) | np.isnan(x), x, np.copysign(np.float32(1), x)),
    "div": lambda x, y: x / y,
    "maxp": lambda x, y: _jax_max(x, y, np.maximum, np.bitwise_and),
    "minp": lambda x, y: _jax_max(x, y, np.minimum, np.bitwise_or),
    "copysign": lambda x, y: np.copysign(x, y),
    "le": lambda x, y: _mask(x <= y),
    "gt": lambda x, y: _mask(x > y),
    "ge": lambda x, y: _mask(x >= y),
    "ne": lambda x, y: _mask(x != y),
    "isnan": lambda x, y: _mask(np.isnan(x)),
    "isfinite": lambda x, y: _mask(np.isfinite(x)),
    "mand": lambda x, y: _mask((x < y) & (x > 0)),
    "mor": lambda x, y: _mask((x < y) | (x > 0)),
    "mxor": lambda x, y: _mask((x < y) ^ (x > 0)),
    "mnot": lambda x, y: _mask(~(x <= y)),
    "mtrue": lambda x, y: np.ones_like(x),
    "band": _u32(np.bitwise_and),
    "bor": _u32(np.bitwise_or),
    "bxor": _u32(np.bitwise_xor),
    "bandn": _u32(lambda a, b: a & ~b),
    "iadd": _u32(np.add),
    "isub": _u32(np.subtract),
    "shl": _u32(lambda a, b: a << 3),
    "shr": _u32(lambda a, b: a >> 3),
    "sar": _u32(lambda a, b: (a.view(np.int32) >> 3).view(np.uint32)),
    "itof": lambda x, y: x.view(np.int32).astype(np.float32),
    "ftoi": lambda x, y: _ftoi(x),
    "from_bits": lambda x, y: np.full_like(x, np.uint32(0x80800001).view(np.float32)),
    "dmad": lambda x, y: (x.astype(np.float64) * y + x).astype(np.float32),
}


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
@pytest.mark.parametrize("name", PRIMS)
def test_primitive_exact(outputs, config, name):
    x, y, got = _get(outputs, config, name)
    with np.errstate(all="ignore"):
        want = PRIM_REF[name](x, y).astype(np.float32)
    bad = _same_bits(got, want)
    assert not bad.any(), (x[bad][:5], y[bad][:5], got[bad][:5], want[bad][:5])


def _ulp_error(got, exact):
    """|got - exact| in ulps of float32 at `exact`; inf counts as 2^128."""
    lim = 2.0**128
    g = np.clip(got.astype(np.float64), -lim, lim)
    e = np.clip(exact, -lim, lim)
    _, ex = np.frexp(np.maximum(np.abs(e), 2.0**-126))
    return np.abs(g - e) / np.ldexp(1.0, ex - 24)


def _exact(name, x, y):
    with np.errstate(all="ignore"):
        if name == "pow":
            return np.power(x.astype(np.float64), y.astype(np.float64))
        return F64[name](x.astype(np.float64))


@pytest.fixture(scope="module")
def exact_of():
    """The float64 result of a function, computed once (every config has the same inputs)."""
    cache = {}

    def get(name, x, y):
        if name not in cache:
            cache[name] = _exact(name, x, y)
        return cache[name]

    return get


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
@pytest.mark.parametrize("name", list(ULP))
def test_function_accuracy(outputs, exact_of, config, name):
    x, y, got = _get(outputs, config, name)
    exact = exact_of(name, x, y)
    nan = np.isnan(exact)
    bad = np.isnan(got) != nan
    assert not bad.any(), ("NaN positions", x[bad][:5], y[bad][:5], got[bad][:5])
    # Exact results: +-0 and +-inf (the sign of zero included), and +-1 at the special inputs
    # (tanh(+-inf), logistic(inf), exp(0), pow(x, 0), pow(1, y), pow(-1, +-inf)).
    with np.errstate(all="ignore"):
        e32 = exact.astype(np.float32)
    at_special = np.isinf(x) | np.isinf(y) | (x == 0) | (y == 0) | (x == 1)
    special = np.isin(exact, [0.0, np.inf, -np.inf]) | (np.isin(exact, [1.0, -1.0]) & at_special)
    bad = special & (got.view(np.uint32) != e32.view(np.uint32))
    assert not bad.any(), ("special values", x[bad][:5], y[bad][:5], got[bad][:5])
    err = _ulp_error(got[~nan], exact[~nan])
    worst = int(np.argmax(err))
    print(f"{name} {config}: max ulp error {err[worst]:.3f}")
    assert err[worst] <= ULP[name], (x[~nan][worst], y[~nan][worst], got[~nan][worst])


@pytest.mark.parametrize("config", CONFIGS, ids="-".join)
@pytest.mark.parametrize("name", ["expm1", "log1p", "tanh", "sign", "trunc", "ceil"])
def test_signed_zero(outputs, config, name):
    """f(-0.0) is -0.0 and f(+0.0) is +0.0 for the odd functions."""
    x, _, got = _get(outputs, config, name)
    for z in (0.0, -0.0):
        at = (x == 0) & (np.signbit(x) == np.signbit(z))
        assert at.any()
        assert (got[at] == 0).all() and (np.signbit(got[at]) == np.signbit(z)).all()


@pytest.mark.parametrize("isa", ["avx512", "base"])
@pytest.mark.parametrize("name", list(ULP))
def test_vector_matches_scalar(outputs, isa, name):
    """S and Sc of one instruction set agree bit for bit (a vector loop and its scalar tail)."""
    _, _, vec = _get(outputs, (isa, "vec"), name)
    x, y, sc = _get(outputs, (isa, "scalar"), name)
    bad = _same_bits(vec, sc)
    assert not bad.any(), (x[bad][:5], y[bad][:5], vec[bad][:5], sc[bad][:5])

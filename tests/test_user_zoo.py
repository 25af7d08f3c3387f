"""The user-zoo benchmark (``benchmarks/user_zoo.py``): each entry computes what it claims
(against the numpy loop reference), and the CLI runs end to end on tiny shapes, with and
without the optional tropical-gemm peer."""

from __future__ import annotations

import io
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from reference import NUMPY_OPS, conv_reference

import jaxconv
from benchmarks import user_zoo


def _np_sign(v):
    return np.where(v >= 0, 1.0, -1.0)


def _np_smoothed_max(a, b):
    return 0.5 * np.logaddexp(a / 0.5, b / 0.5)


_INF = math.inf
# Zoo op -> (numpy combine, numpy reduce, identity, pad_value); built-ins from NUMPY_OPS.
NUMPY = {
    "seed_myadd": (lambda a, b: -(a - b) ** 2, np.logaddexp, -_INF, None),
    "handwritten_lae": (np.add, np.logaddexp, -_INF, None),
    "ste_xnor": (lambda a, b: _np_sign(a) * _np_sign(b), np.add, 0.0, None),
    "ste_sign_xnor": (lambda a, b: _np_sign(a) * _np_sign(b), np.add, 0.0, None),
    "fuzzy_max_min": (np.minimum, np.maximum, -_INF, None),
    "gauss_sum": (lambda a, b: np.exp(-(a - b) ** 2), np.add, 0.0, None),
    "softplus_max": (np.multiply, _np_smoothed_max, -_INF, None),
    "clip_max": (lambda a, b: np.clip(a * b, -1.0, 1.0), np.maximum, -_INF, None),
    "tropical_max_times": (np.multiply, np.maximum, -_INF, None),
}
BUILTIN = {"builtin_log": "log", "builtin_xnor": "xnor", "bf16_adder": "adder",
           "max_plus_f64": "max_plus"}


def test_the_zoo_has_the_issue_rows():
    assert len(user_zoo.ZOO) >= 10
    assert set(NUMPY) | set(BUILTIN) == set(user_zoo.ZOO)


@pytest.mark.parametrize("name", sorted(user_zoo.ZOO))
def test_zoo_op_matches_numpy_reference(name):
    entry = user_zoo.ZOO[name]
    if name in BUILTIN:
        ref_op = NUMPY_OPS[BUILTIN[name]]
        combine, reduce, identity, pad = (ref_op.combine, ref_op.reduce, ref_op.identity,
                                          ref_op.pad_value)
    else:
        combine, reduce, identity, pad = NUMPY[name]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 5, 3))
    w = rng.standard_normal((3, 3, 3, 2))
    dtype = jnp.dtype(entry.dtype)
    with user_zoo._x64(entry.dtype):
        xj, wj = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
        y = user_zoo.product(user_zoo.Layer("t", x.shape, w.shape), entry.op)(xj, wj)
        xr, wr = np.asarray(xj, np.float64), np.asarray(wj, np.float64)
    assert y.dtype == dtype
    ref = conv_reference(xr, wr, (1, 1), "SAME", None, None, ("NHWC", "HWIO", "NHWC"),
                         combine=combine, reduce=reduce, identity=identity, pad_value=pad)
    tol = {"bfloat16": 2e-2, "float32": 1e-5, "float64": 1e-12}[entry.dtype]
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=tol, atol=tol)


def test_ste_is_a_straight_through_sign():
    g = jax.grad(lambda v: jnp.sum(user_zoo.ste(v)))(jnp.asarray([-2.0, -1.0, 0.5, 1.5]))
    np.testing.assert_array_equal(np.asarray(g), [0.0, 1.0, 1.0, 0.0])


@pytest.mark.parametrize("peer", ["absent", "present"])
def test_cli_smoke(peer, monkeypatch, tmp_path):
    if peer == "absent":
        monkeypatch.setitem(sys.modules, "tropical_gemm", None)  # import raises ImportError
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    rc = user_zoo.main(["--smoke", "--layers", "A,E", "--ops", "ste_xnor,tropical_max_times",
                        "--json", str(tmp_path / "zoo.json")])
    text = out.getvalue()
    assert rc == 0
    assert "cpu " in text and "threads" in text
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    assert len(lines) == 4 and all("fwd+bwd" in ln for ln in lines)
    peer_line = next(ln for ln in lines if ln.startswith("E tropical_max_times"))
    if peer == "absent" or user_zoo.tropical_gemm() is None:
        assert "tropical-gemm not installed" in peer_line
    else:
        assert "tropical-gemm maxmul: fwd" in peer_line


def test_cli_rejects_unknown_names():
    with pytest.raises(SystemExit):
        user_zoo.main(["--smoke", "--ops", "nope"])


def test_explain_agrees_with_the_zoo_ops():
    """The zoo's fast entries take the paths this round added (explain says so)."""
    seed = jaxconv.explain(user_zoo.ZOO["seed_myadd"].op, platform="cpu")
    assert any("'logsumexp' (recognised" in d for d in seed.details)
    ste = jaxconv.explain(user_zoo.ZOO["ste_xnor"].op, platform="cpu")
    assert any("rewrite into standard lax products" in d for d in ste.details)
    smooth = jaxconv.explain(user_zoo.ZOO["softplus_max"].op, platform="cpu")
    assert any("built-in 'logsumexp' of combine / 0.5" in d for d in smooth.details)


def test_exp_floor_columns_follow_their_definitions():
    """``fraction`` = e n / t_op / R_exp, ``floor`` = e n / R_exp / t_lax, ``floor_fma`` =
    e R_fma / (p R_exp), with e exponentials per term (1 forward, 2 forward+backward) and p
    lax's FMA passes (1 forward, 3 forward+backward)."""
    from benchmarks import exp_floor

    row = dict(fwd_ms=20.0, lax_fwd_ms=4.0, fwd_bwd_ms=50.0, lax_fwd_bwd_ms=10.0)
    got = exp_floor.columns(row, 10**9, {"exp": {2: 100.0}, "fma": {2: 600.0}}, 2, "exp")
    assert got["exp_fraction"] == pytest.approx(0.5)  # 1e9 / 20 ms / 1e11
    assert got["exp_floor"] == pytest.approx(2.5)  # 10 ms / 4 ms
    assert got["exp_floor_fma"] == pytest.approx(6.0)
    assert got["fwd_bwd_exp_fraction"] == pytest.approx(0.4)  # 2e9 / 50 ms / 1e11
    assert got["fwd_bwd_exp_floor"] == pytest.approx(2.0)  # 20 ms / 10 ms
    assert got["fwd_bwd_exp_floor_fma"] == pytest.approx(4.0)
    assert exp_floor.columns(row, 10**9, {}, 2, "exp") == {}
    assert "at 50% of it" in exp_floor.describe(dict(row, exp_kind="exp", **got))


def test_cli_prints_the_exp_floor_of_exp_bound_rows(monkeypatch):
    """An exp-bound row gets its floor line (the probe's exp rates, the share of them it
    reaches, the kernel loop's operations per exponential on AVX-512); other rows none."""
    from benchmarks import machine

    if "exp2" not in machine.peak((1,), seconds=0.002, kinds=("exp2",)):
        pytest.skip("no native probe with the exp kinds")
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    assert user_zoo.main(["--smoke", "--layers", "A", "--ops", "seed_myadd,clip_max",
                          "--no-backward"]) == 0
    text = out.getvalue()
    assert "exp2 " in next(ln for ln in text.splitlines() if ln.startswith("# peak"))
    lines = text.splitlines()
    seed = next(i for i, ln in enumerate(lines) if "seed_myadd" in ln)
    assert lines[seed + 1].strip().startswith("exp floor (exp2")
    if machine.native_module().isa() == "avx512":
        assert "vector ops / exp" in lines[seed + 1]
    clip = next(i for i, ln in enumerate(lines) if "clip_max" in ln)
    assert clip + 1 == len(lines) or "exp floor" not in lines[clip + 1]

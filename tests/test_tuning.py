"""The native kernels' run-time tuning (jaxconv/_src/engines/native/tuning.py): every
parameter set gives the reference's numbers, the override and the mode are validated, the
search's cache is written, reused and cleared."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from geometries import table
from reference import NUMPY_OPS, conv_reference

import jaxconv
from jaxconv import _native
from jaxconv._src.engines.native import tuning

NATIVE_OPS = ("max_plus", "min_plus", "max_min", "min_max", "adder", "l1", "l2_exact")
SUMS = ("adder", "l1", "l2_exact")

# name -> (x shape, w shape, conv kwargs), NHWC / HWIO: padding and strides, groups,
# depthwise, a dense (1x1) product with a long kernel block, an odd channel count, a dense
# product of several kernel blocks.
CASES = table(("same_stride", "2d_stride_rhs_dil"), ("groups", "groups_8"), "depthwise", "dense",
              ("wide", "wide_80"), "dense_wide")

# A covering set: each value of each parameter, cut panels (block_kib=0) of the smallest and
# largest size, one-panel blocks, both forms of the sums and of max_min / min_max, one item
# per block and many, one claim counter and several (more than dense_wide's blocks too).
PARAM_SETS = (
    dict(panel_kib=4, block_kib=0, items=1, keyed=0, min_form=0, fma_add=0, tile=1, bcast=1,
         lanes=1),
    dict(panel_kib=4, block_kib=0, items=4096, keyed=1, min_form=1, fma_add=0, tile=0, bcast=0,
         lanes=2),
    dict(panel_kib=1024, block_kib=0, items=16, keyed=0, min_form=1, fma_add=1, tile=1, bcast=0,
         lanes=16),
    dict(panel_kib=32, block_kib=65536, items=4096, keyed=1, min_form=0, fma_add=1, tile=0,
         bcast=1, lanes=3),
    dict(panel_kib=64, block_kib=192, items=2, keyed=0, min_form=1, fma_add=0, tile=1, bcast=1,
         lanes=1),
    dict(panel_kib=16, block_kib=65536, items=16, keyed=1, min_form=1, fma_add=1, tile=1,
         bcast=0, lanes=2),
)


@pytest.fixture
def restore_params():
    """Puts the process's parameters back after a test that changes them."""
    tuning.ensure()
    saved = dict(_native.params())
    yield
    _native.set_params(saved)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A private cache, no override, and a process that has not picked its parameters yet;
    the search is the real one, one round."""
    monkeypatch.setenv("JAXCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(tuning.ENV_PARAMS, raising=False)
    monkeypatch.setenv(tuning.ENV_TUNE, "on")
    calls = []
    real = tuning.search

    def counted(rounds: int = 1):
        calls.append(rounds)
        return real(rounds=1)

    monkeypatch.setattr(tuning, "search", counted)
    saved = dict(_native.params())
    tuning._reset_for_tests()
    yield calls
    tuning._reset_for_tests()
    _native.set_params(saved)


def _conv(name, kw):
    return jax.jit(lambda x, w: jaxconv.conv_general_dilated(
        x, w, op=name, engine="native", dimension_numbers=("NHWC", "HWIO", "NHWC"), **kw))


def _reference(name, x, w, kw):
    npop = NUMPY_OPS["l2" if name == "l2_exact" else name]
    kw = dict(kw)
    return conv_reference(x, w, kw.pop("window_strides"), kw.pop("padding"), None,
                          kw.pop("rhs_dilation", None), ("NHWC", "HWIO", "NHWC"),
                          kw.pop("feature_group_count", 1), combine=npop.combine,
                          reduce=npop.reduce, identity=npop.identity, pad_value=npop.pad_value)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", NATIVE_OPS)
def test_every_parameter_set_gives_the_reference_numbers(name, case, restore_params):
    """max/min: the default parameters' bits under every set; sums: the default's bits where
    the form is the same (the panels never change a sum's order), the reference's numbers to
    rounding under the other form."""
    xs, ws, kw = CASES[case]
    rng = np.random.default_rng(3)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    f = _conv(name, kw)
    ref = _reference(name, x, w, kw)
    _native.set_params(tuning.defaults())
    base = np.asarray(f(x, w))
    np.testing.assert_allclose(base, ref, rtol=2e-5, atol=2e-5 * np.max(np.abs(ref)))
    for values in PARAM_SETS:
        _native.set_params(values)
        assert _native.params() == values
        y = np.asarray(f(x, w))
        if name not in SUMS or values["min_form"] == tuning.defaults()["min_form"]:
            np.testing.assert_array_equal(y, base, err_msg=str(values))
        else:
            np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-5 * np.max(np.abs(ref)),
                                       err_msg=str(values))


def test_the_override_is_parsed_and_validated():
    assert tuning.parse("") == {} and tuning.parse("default") == {}
    assert tuning.parse(" panel_kib = 32 ,keyed=0") == {"panel_kib": 32, "keyed": 0}
    bad = {
        "panel=32": "unknown tuning parameter 'panel'",
        "keyed=yes": "'keyed' must be an integer",
        "keyed=2": r"'keyed' must be in \[0, 1\]",
        "panel_kib=2": r"'panel_kib' must be in \[4, 1024\]",
        "keyed": "is not 'name=integer'",
        "keyed=0,keyed=1": "given twice",
    }
    for text, message in bad.items():
        with pytest.raises(ValueError, match=message):
            tuning.parse(text)
    with pytest.raises(ValueError, match="JAXCONV_NATIVE_PARAMS"):
        tuning.parse("items=0")
    with pytest.raises(ValueError, match="unknown tuning parameter"):
        _native.set_params({**tuning.defaults(), "mr": 3})
    with pytest.raises(ValueError, match="must be in"):
        _native.set_params({**tuning.defaults(), "items": 0})


def test_a_bad_environment_raises_at_first_use(fresh, monkeypatch):
    x = np.ones((1, 4, 4, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    monkeypatch.setenv(tuning.ENV_PARAMS, "keyed=3")
    with pytest.raises(ValueError, match=r"JAXCONV_NATIVE_PARAMS: parameter 'keyed'"):
        _conv("max_plus", dict(window_strides=(1, 1), padding="SAME"))(x, w)
    monkeypatch.delenv(tuning.ENV_PARAMS)
    monkeypatch.setenv(tuning.ENV_TUNE, "sometimes")
    with pytest.raises(ValueError, match="JAXCONV_NATIVE_TUNE must be one of on, off, rerun"):
        tuning.ensure()


def test_a_forced_set_is_used(fresh, monkeypatch):
    """The override replaces the fields it names (over the search or the defaults), and the
    calls run with it: `_native.params()` and `explain` say so."""
    monkeypatch.setenv(tuning.ENV_TUNE, "off")
    monkeypatch.setenv(tuning.ENV_PARAMS, "panel_kib=48,keyed=0")
    expected = {**tuning.defaults(), "panel_kib": 48, "keyed": 0}
    x = np.ones((1, 4, 4, 2), np.float32)
    w = np.ones((3, 3, 2, 2), np.float32)
    _conv("max_min", dict(window_strides=(1, 1), padding="SAME"))(x, w)
    assert _native.params() == expected
    got = tuning.params()
    assert got["params"] == expected and got["source"] == "default+JAXCONV_NATIVE_PARAMS"
    text = str(jaxconv.explain("max_min", platform="cpu", engine="native"))
    assert "tuning (default+JAXCONV_NATIVE_PARAMS): panel_kib=48 " in text
    assert fresh == []  # "off": no search


def test_the_search_is_cached_reused_rerun_and_cleared(fresh, monkeypatch, tmp_path):
    first = tuning.ensure()
    assert len(fresh) == 1
    got = tuning.params()
    assert got["source"] == "search"
    entry = tmp_path / "tuning" / f"params-{tuning.cache_key()}.json"
    assert got["entry"] == str(entry)
    record = json.loads(entry.read_text())
    assert record["params"] == first and record["isa"] == _native.isa()
    # A second process (here: a fresh start) reads the entry without searching.
    tuning._reset_for_tests()
    assert tuning.ensure() == first and len(fresh) == 1
    assert tuning.params()["source"] == "cache"
    # A damaged or foreign entry is searched again and rewritten.
    entry.write_text(json.dumps({**record, "params": {**first, "keyed": 7}}))
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 2 and json.loads(entry.read_text())["params"]["keyed"] in (0, 1)
    # "rerun" searches although the entry is there.
    monkeypatch.setenv(tuning.ENV_TUNE, "rerun")
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 3 and tuning.params()["source"] == "search"
    # Cleared: the entry is gone and the next start searches.
    assert tuning.clear_cache() == 1 and not entry.exists()
    monkeypatch.setenv(tuning.ENV_TUNE, "on")
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 4 and entry.exists()
    # retune(): a search now, stored, applied.
    tuning.retune()
    assert len(fresh) == 5 and tuning.params()["source"] == "search"
    # Another CPU model has its own entry: searched, stored beside the first.
    monkeypatch.setattr(tuning, "cpu_model", lambda: "Another CPU")
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 6 and tuning.params()["entry"] != str(entry) and entry.exists()
    assert tuning.clear_cache() == 2


def test_the_search_picks_a_valid_set():
    chosen, timings = tuning.search(rounds=1)
    assert tuning.validate(chosen) == chosen and set(chosen) == set(tuning.fields())
    assert set(timings) == {"panels", "tile", "bcast", "fma_add", "keyed", "min_form"}
    assert all(v > 0 for part in timings.values() for v in part.values())


@pytest.mark.parametrize(("tile_score", "taken"), [(0.91, False), (0.85, True)])
def test_the_other_tile_needs_a_clear_gain(monkeypatch, tile_score, taken):
    """A small, noisy lead of the other register tile leaves the default (one such search
    cached a forward 1.5x slower); a clear one takes it."""
    def scores(cands, probs, rounds):
        other = [c for c in cands if c["tile"] != tuning.defaults()["tile"]]
        return [tile_score if other and c is other[0] else 1.0 for c in cands]

    monkeypatch.setattr(tuning, "_scores", scores)
    chosen, timings = tuning.search(rounds=1)
    assert timings["tile"][str(1 - tuning.defaults()["tile"])] == tile_score
    assert (chosen["tile"] != tuning.defaults()["tile"]) == taken


_ISA_SCRIPT = r"""
import json, sys, numpy as np, jax, jaxconv
from jaxconv import _native
sys.path.insert(0, sys.argv[1])
import test_tuning as t
out = {}
for case in ("groups", "dense", "same_stride"):
    xs, ws, kw = t.CASES[case]
    rng = np.random.default_rng(5)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    for name in ("max_plus", "min_max", "adder"):
        f = t._conv(name, kw)
        got = []
        for values in (dict(_native.params(), tile=0), *t.PARAM_SETS):
            _native.set_params(values)
            got.append(np.asarray(f(x, w)).tobytes().hex())
        out[f"{case}/{name}"] = got
print(json.dumps([_native.isa(), out]))
"""


@pytest.mark.parametrize("isa", ["avx2", "base"])
def test_lower_instruction_sets_give_the_same_numbers_under_every_set(isa):
    """The forced lower instruction sets' alternative tiles and variants: max/min and the
    sums under the default form give the default set's bits (in that instruction set)."""
    import os  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAXCONV_NATIVE_ISA=isa, JAXCONV_NATIVE_TUNE="off")
    proc = subprocess.run([sys.executable, "-c", _ISA_SCRIPT, here], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    got_isa, out = json.loads(proc.stdout.strip().splitlines()[-1])
    if got_isa != isa:
        assert isa == "avx2" and got_isa == "base"  # a CPU without AVX2
    for key, runs in out.items():
        name = key.split("/")[1]
        for values, run in zip(PARAM_SETS, runs[1:], strict=True):
            if name != "adder" or values["min_form"] == 1:
                assert run == runs[0], (key, values)

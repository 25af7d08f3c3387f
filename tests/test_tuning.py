"""The native kernels' run-time tuning (jaxconv/_src/engines/native/tuning.py): every
parameter set gives the reference's numbers, the override and the mode are validated, the
search's cache is written, reused and cleared."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from geometries import table
from reference import NUMPY_OPS, NUMPY_PARTIALS, conv_grads_reference, conv_reference

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
         lanes=1, l1_split=0),
    dict(panel_kib=4, block_kib=0, items=4096, keyed=1, min_form=1, fma_add=0, tile=0, bcast=0,
         lanes=2, l1_split=1),
    dict(panel_kib=1024, block_kib=0, items=16, keyed=0, min_form=1, fma_add=1, tile=1, bcast=0,
         lanes=16, l1_split=0),
    dict(panel_kib=32, block_kib=65536, items=4096, keyed=1, min_form=0, fma_add=1, tile=0,
         bcast=1, lanes=3, l1_split=1),
    dict(panel_kib=64, block_kib=192, items=2, keyed=0, min_form=1, fma_add=0, tile=1, bcast=1,
         lanes=1, l1_split=0),
    dict(panel_kib=16, block_kib=65536, items=16, keyed=1, min_form=1, fma_add=1, tile=1,
         bcast=0, lanes=2, l1_split=1),
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

    def counted(rounds: int = 1, confirm_rounds: int = 1):
        calls.append(rounds)
        return real(rounds=1, confirm_rounds=1)

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


# The backward's problems: a dense product whose 272 input channels make the dense sums
# backward's blocks (csrc/kernel_sumbwd_dense.h: eight of two vectors and one of one; `bcast`
# and `l1_split` pick its form) with 13 positions (two tiles of 6 and a rest) and 136 output
# channels (a ragged last block), and a 3x3 convolution (the max/min winner scan reads x the
# way `bcast` says); (x shape, w shape, padding), NHWC / HWIO, stride 1.
BACKWARD_CASES = {"dense": ((13, 1, 1, 272), (1, 1, 272, 136), ((0, 0), (0, 0))),
                  "conv": ((2, 6, 5, 32), (3, 3, 32, 24), ((1, 1), (1, 1)))}


@pytest.mark.parametrize("case", sorted(BACKWARD_CASES))
@pytest.mark.parametrize("name", NATIVE_OPS)
def test_every_parameter_set_gives_the_reference_gradients(name, case, restore_params):
    """The backward (both gradients) under the defaults matches the numpy loop reference, and
    under every set (each value of `bcast` and `l1_split`, which act in it) gives the
    defaults' bits: no parameter changes a gradient's sum order."""
    xs, ws, pads = BACKWARD_CASES[case]
    rng = np.random.default_rng(11)
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal(ws).astype(np.float32)
    out = (xs[0], xs[1] + sum(pads[0]) - ws[0] + 1, xs[2] + sum(pads[1]) - ws[1] + 1, ws[3])
    g = rng.standard_normal(out).astype(np.float32)
    npname = "l2" if name == "l2_exact" else name
    npop = NUMPY_OPS[npname]
    reduce = {np.add: "sum", np.maximum: "max", np.minimum: "min"}[npop.reduce]
    want_dx, want_dw = conv_grads_reference(x, w, g, pads, combine=npop.combine,
                                            partials=NUMPY_PARTIALS[npname], reduce=reduce,
                                            pad_value=npop.pad_value)

    def grads():
        f = lambda a, b: jaxconv.conv_general_dilated(  # noqa: E731
            a, b, (1, 1), pads, op=name, engine="native",
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        _, vjp = jax.vjp(f, x, w)
        return tuple(np.asarray(v) for v in vjp(g))

    _native.set_params(tuning.defaults())
    base = grads()
    for got, want in zip(base, (want_dx, want_dw), strict=True):
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5 * np.max(np.abs(want)))
    for values in (*PARAM_SETS, *({**tuning.defaults(), "bcast": b, "l1_split": s}
                                  for b in (0, 1) for s in (0, 1))):
        _native.set_params(values)
        for got, want in zip(grads(), base, strict=True):
            np.testing.assert_array_equal(got, want, err_msg=str(values))


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
    monkeypatch.setenv(tuning.ENV_PARAMS, "panel_kib=48,keyed=0,bcast=0,l1_split=0")
    expected = {**tuning.defaults(), "panel_kib": 48, "keyed": 0, "bcast": 0, "l1_split": 0}
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
    # The entry keeps the search's scores and conditions, and explain shows why.
    report = record["search"]
    assert set(report["steps"]) == {name for name, _ in tuning._STEPS}
    assert report["conditions"]["rounds"] == 1 and report["conditions"]["cpu_s"] > 0
    assert got["search"] == report and got["why"].startswith("searched at ")
    text = str(jaxconv.explain("max_plus", platform="cpu", engine="native"))
    assert "tuning (search): " in text and "; searched at " in text
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
    chosen, report = tuning.search(rounds=1, confirm_rounds=1)
    assert tuning.validate(chosen) == chosen and set(chosen) == set(tuning.fields())
    steps = report["steps"]
    assert set(steps) == {"panels", "tile", "bcast", "l1_split", "fma_add", "keyed", "min_form"}
    searched = {k: v for k, v in steps.items() if "skipped" not in v}
    assert all(v > 0 for step in searched.values() for v in step["screen"].values())
    # The backward is timed where a parameter acts in it: bcast in both directions, l1_split
    # (AVX-512 with bcast) in the backward alone; the others in the forward.
    assert set(steps["bcast"]["screen_dirs"]["0"]) == {"fwd", "bwd"}
    assert any(p.startswith("bwd l1 ") for p in steps["bcast"]["problems"])
    if "skipped" in steps["l1_split"]:
        assert steps["l1_split"]["skipped"].startswith("acts ")
    else:
        assert set(steps["l1_split"]["screen_dirs"]["0"]) == {"bwd"}
        assert all(p.startswith("bwd ") for p in steps["l1_split"]["problems"])
    assert all(p.startswith("fwd ") for p in steps["panels"]["problems"])
    cond = report["conditions"]
    assert cond["rounds"] == 1 and cond["confirm_rounds"] == 1 and cond["wall_s"] > 0
    assert isinstance(cond["busy"], bool) and len(cond["load_per_cpu"]) == 2


def test_the_probes_time_forwards_and_backwards_and_free_their_data():
    """The search's probes: positive single-threaded times of each built-in op's forward and
    backward (the same problem's data kept between calls, freed by `release_probes`, which
    the search calls when it ends); a problem that is not small and non-empty is refused."""
    base = tuning.defaults()
    _native.release_probes()
    for op in range(7):  # max_plus .. l2_exact
        assert _native.time_forward(op, 2, 6, 6, 16, 3, 16, 1, base) > 0
        assert _native.time_backward(op, 2, 6, 6, 16, 3, 16, 1, base) > 0
        assert _native.time_backward(op, 13, 1, 1, 272, 1, 136, 2, base) > 0
    assert _native.release_probes() == 14 and _native.release_probes() == 0
    for bad in ((0, 1, 2, 2, 4, 3, 4, 1), (0, 1, 4, 4, 4, 3, 4, 0), (99, 1, 4, 4, 4, 3, 4, 1)):
        with pytest.raises(ValueError):
            _native.time_backward(*bad, base)
    tuning.search(rounds=1, confirm_rounds=1)
    assert _native.release_probes() == 0


def _synthetic(monkeypatch, screen, confirm, final=0.9):
    """Replaces the timings with synthetic scores: in step `name`, the first candidate after
    the current choice screens at ``screen[name]`` and re-times (paired) at
    ``confirm[name]``, every other candidate at 1.0; a pair timed a second time (the chosen
    set against the defaults, after the step that made it) at `final`. Returns the list of
    paired re-timings asked for: (base, candidate)."""

    def step(base, cand):
        diff = {k for k in cand if cand[k] != base[k]}
        return "panels" if diff <= {"panel_kib", "block_kib"} else diff.pop()

    def scores(cands, probs, rounds):
        name = step(cands[0], cands[1])
        return [1.0, screen.get(name, 1.0)] + [1.0] * (len(cands) - 2)

    paired = []

    def pair(base, cand, probs, rounds):
        again = (base, cand) in paired
        paired.append((dict(base), dict(cand)))
        got = final if again else confirm.get(step(base, cand), 1.0)
        return got, [got] * len(probs)

    monkeypatch.setattr(tuning, "_scores", scores)
    monkeypatch.setattr(tuning, "_paired", pair)
    return paired


@pytest.mark.parametrize("name", ["panels", "tile", "bcast", "l1_split", "fma_add", "keyed",
                                  "min_form"])
@pytest.mark.parametrize(("screen", "confirm", "taken"), [
    (0.97, 0.5, False),  # a noise-level lead in the screening: not even re-timed
    (0.80, 0.97, False),  # a lead the paired re-timing does not confirm
    (0.80, 0.80, True),  # a real lead, confirmed
])
def test_only_a_confirmed_clear_lead_replaces_a_default(monkeypatch, name, screen, confirm,
                                                          taken):
    """Every searched parameter needs its margin twice: in the screening (best of rounds) and
    in the paired re-timing against the current choice (one search under load cached
    tile=1, block_kib=4096 on leads of a few percent: layer A's forward ~1.8x slower)."""
    if tuning._applies(name, tuning.defaults()) is not None:
        pytest.skip(f"{name} is not searched here: {tuning._applies(name, tuning.defaults())}")
    paired = _synthetic(monkeypatch, {name: screen}, {name: confirm})
    chosen, report = tuning.search(rounds=1, confirm_rounds=3)
    step = report["steps"][name]
    assert step["screen"][step["challenger"]] == screen
    assert (step["confirm"] is None) == (screen >= tuning._MARGINS[name])
    # One re-timing; a set that one step changed is not timed against the defaults again.
    assert len(paired) == (0 if screen >= tuning._MARGINS[name] else 1)
    base = tuning.defaults()
    if name == "panels":
        expected = {**base, "panel_kib": tuning._PANELS[1][0], "block_kib": tuning._PANELS[1][1]}
    else:
        expected = {**base, name: 1 - base[name]}
    assert chosen == (expected if taken else base)
    assert (step["chosen"] == step["challenger"]) == taken
    assert (report["final"] is not None) == taken
    # The account names the step, its scores and its margin.
    why = tuning.summary(report)
    assert f"{name} {step['chosen']} ({step['challenger']} {screen:.2f}x" in why


@pytest.mark.parametrize(("score", "margin", "taken"), [(0.91, 0.9, False), (0.85, 0.9, True),
                                                        (0.96, 0.95, False),
                                                        (0.93, 0.95, True)])
def test_the_margins(monkeypatch, score, margin, taken):
    """The register tile needs 10% (its timings spread most), the others 5%: a lead just
    short of the margin, screened and confirmed, keeps the default."""
    name = "tile" if margin == 0.9 else "keyed"
    _synthetic(monkeypatch, {name: score}, {name: score})
    chosen, report = tuning.search(rounds=1, confirm_rounds=3)
    assert report["steps"][name]["margin"] == margin
    assert (chosen[name] != tuning.defaults()[name]) == taken


def test_a_set_that_does_not_beat_the_defaults_is_dropped(monkeypatch):
    """Two confirmed steps whose set, timed against the defaults, is not faster: the
    defaults stay (and the report says so)."""
    paired = []

    def scores(cands, probs, rounds):
        diff = {k for c in cands[1:] for k in c if c[k] != cands[0][k]}
        lead = diff <= {"panel_kib", "block_kib"} or diff == {"tile"}
        return [1.0] + [0.8 if lead and i == 1 else 1.0 for i in range(1, len(cands))]

    def pair(base, cand, probs, rounds):
        paired.append((dict(base), dict(cand)))
        both = cand["tile"] != base["tile"] and cand["panel_kib"] != base["panel_kib"]
        return (1.02 if both else 0.8), [1.0] * len(probs)

    monkeypatch.setattr(tuning, "_scores", scores)
    monkeypatch.setattr(tuning, "_paired", pair)
    chosen, report = tuning.search(rounds=1, confirm_rounds=3)
    assert len(paired) == 3 and paired[-1][0] == tuning.defaults()
    assert report["final"]["score"] == 1.02 and report["final"]["kept"] is False
    assert chosen == tuning.defaults()
    assert "dropped" in tuning.summary(report)


def test_a_step_scores_each_direction_and_says_when_they_disagree(monkeypatch):
    """bcast is screened on forwards and backwards: its score is the geometric mean over its
    problems, the report keeps each direction's, and a challenger that leads by the margin
    in one direction and trails by it in the other is flagged (one value serves both)."""
    seen = []

    def scores(cands, probs, rounds):
        diff = {k for c in cands[1:] for k in c if c[k] != cands[0][k]}
        seen.append((tuple(sorted(diff)), {p[0] for p in probs}))
        if diff == {"bcast"}:
            return [1.0, 1.2 if probs[0][0] == "bwd" else 0.8]
        return [1.0] * len(cands)

    monkeypatch.setattr(tuning, "_scores", scores)
    chosen, report = tuning.search(rounds=1, confirm_rounds=1)
    assert (("bcast",), {"fwd"}) in seen and (("bcast",), {"bwd"}) in seen
    step = report["steps"]["bcast"]
    n_fwd = sum(p.startswith("fwd ") for p in step["problems"])
    n_bwd = len(step["problems"]) - n_fwd
    assert step["screen_dirs"]["0"] == {"fwd": 0.8, "bwd": 1.2}
    want = (0.8**n_fwd * 1.2**n_bwd) ** (1 / (n_fwd + n_bwd))
    assert step["screen"]["0"] == pytest.approx(want)
    assert step["directions_disagree"] is True and step["confirm"] is None
    assert chosen == tuning.defaults()
    assert "bcast 1 (0 1.0" in tuning.summary(report)
    assert "[fwd 0.80x, bwd 1.20x], fwd and bwd disagree)" in tuning.summary(report)


def test_a_step_of_fewer_problems_retimes_more_rounds(monkeypatch):
    """A one-problem step's confirmation takes three times the paired rounds of a
    three-problem one (its median then rests on as many pairs): under synthetic noise 1 of 20
    searches took l1_split=0 with 7 (a true 1.18x loss on l1's backward)."""
    rounds_seen = {}

    def scores(cands, probs, rounds):
        return [1.0, 0.8] + [1.0] * (len(cands) - 2)

    def pair(base, cand, probs, rounds):
        diff = {k for k in cand if cand[k] != base[k]}
        rounds_seen.setdefault("panels" if "panel_kib" in diff else diff.pop(), rounds)
        return 1.0, [1.0] * len(probs)

    monkeypatch.setattr(tuning, "_scores", scores)
    monkeypatch.setattr(tuning, "_paired", pair)
    _, report = tuning.search(rounds=1, confirm_rounds=7)
    assert rounds_seen["panels"] == 7 and rounds_seen["keyed"] == 21
    assert report["steps"]["keyed"]["confirm_rounds"] == 21


def test_a_changed_step_whose_problems_are_slower_in_the_set_goes_back(monkeypatch):
    """The set against the defaults: faster over all its problems (panels 0.8x) but one
    step's own problem slower (keyed 1.1x): that step goes back to its default, the rest
    stays, and the report says so."""

    def scores(cands, probs, rounds):
        diff = {k for c in cands[1:] for k in c if c[k] != cands[0][k]}
        lead = diff <= {"panel_kib", "block_kib"} or diff == {"keyed"}
        return [1.0] + [0.8 if lead and i == 1 else 1.0 for i in range(1, len(cands))]

    def pair(base, cand, probs, rounds):
        if cand["keyed"] != base["keyed"] and cand["panel_kib"] != base["panel_kib"]:
            per = [1.1 if p[1] == tuning._OPS["max_min"] else 0.8 for p in probs]
            return tuning._geomean(per), per
        return 0.8, [0.8] * len(probs)

    monkeypatch.setattr(tuning, "_scores", scores)
    monkeypatch.setattr(tuning, "_paired", pair)
    chosen, report = tuning.search(rounds=1, confirm_rounds=3)
    base = tuning.defaults()
    assert report["final"]["kept"] is True and report["final"]["reverted"] == ["keyed"]
    assert chosen == {**base, "panel_kib": tuning._PANELS[1][0],
                      "block_kib": tuning._PANELS[1][1]}
    assert "keyed reverted" in tuning.summary(report)


def test_tied_challengers_retime_the_first_listed(monkeypatch):
    """Panel sizes the screening cannot tell apart (within 3%): the first listed is re-timed,
    so that the cached choice does not follow the noise."""
    paired = []

    def scores(cands, probs, rounds):
        if {k for c in cands[1:] for k in c if c[k] != cands[0][k]} <= {"panel_kib", "block_kib"}:
            return [1.0, 1.0, 1.0, 0.88, 0.87, 0.86]  # 16/1024, 128/1024 and 16/4096 tie
        return [1.0] * len(cands)

    def pair(base, cand, probs, rounds):
        paired.append((dict(base), dict(cand)))
        return 0.88, [0.88] * len(probs)

    monkeypatch.setattr(tuning, "_scores", scores)
    monkeypatch.setattr(tuning, "_paired", pair)
    chosen, report = tuning.search(rounds=1, confirm_rounds=3)
    assert tuning._PANELS[3] == (16, 1024) and len(paired) == 1
    assert (chosen["panel_kib"], chosen["block_kib"]) == (16, 1024)
    assert report["steps"]["panels"]["challenger"] == "16/1024"
    assert report["final"] == {"score": 0.88, "problems": [0.88] * 3, "kept": True}


def test_the_paired_retiming_alternates_and_takes_medians(monkeypatch):
    """`_paired` times the pair back to back, the current choice first in even rounds, and
    one disturbed pair does not move a problem's median."""
    calls = []
    slow = {3}  # the fourth pair's challenger run is disturbed (5x)

    def fake_time(prob, values, reps):
        calls.append(values["tile"])
        pair = (len(calls) - 1) // 2
        t = 1.0 if values["tile"] == 0 else 0.9
        return t * (5.0 if values["tile"] == 1 and pair in slow else 1.0)

    monkeypatch.setattr(tuning, "_time", fake_time)
    base = tuning.defaults()
    score, per = tuning._paired(dict(base, tile=0), dict(base, tile=1), [tuning._DENSE], 7)
    assert calls == [0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1]
    assert per == [pytest.approx(0.9)] and score == pytest.approx(0.9)


def test_an_entry_made_under_load_is_searched_again_when_quiet(fresh, monkeypatch, tmp_path):
    """The entry records the load; one made under load is redone by the first process that
    starts on a quiet machine, and kept while the machine stays busy."""
    monkeypatch.setattr(tuning, "_load_per_cpu", lambda: 3.0)
    tuning.ensure()
    entry = tmp_path / "tuning" / f"params-{tuning.cache_key()}.json"
    assert json.loads(entry.read_text())["search"]["conditions"]["busy"] is True
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 1 and tuning.params()["source"] == "cache"  # still busy: kept
    monkeypatch.setattr(tuning, "_load_per_cpu", lambda: 0.2)
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 2
    assert tuning.params()["source"] == "search (the entry was made under load)"
    assert json.loads(entry.read_text())["search"]["conditions"]["busy"] is False
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 2 and tuning.params()["source"] == "cache"


def test_an_entry_of_the_earlier_search_is_searched_again(fresh, tmp_path):
    """Entries of the search before the confirmations (no record format) and of the
    forward-only search (format 2) are not trusted."""
    tuning.ensure()
    entry = tmp_path / "tuning" / f"params-{tuning.cache_key()}.json"
    record = json.loads(entry.read_text())
    old = {k: v for k, v in record.items() if k not in ("search_version", "search")}
    entry.write_text(json.dumps({**old, "params": {**record["params"], "tile": 1},
                                 "timings": {}}))
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 2 and tuning.params()["source"] == "search"
    record = json.loads(entry.read_text())
    assert record["search_version"] == tuning._SEARCH_VERSION
    # An entry of the forward-only search (format 2: no backward scores) is searched again.
    entry.write_text(json.dumps({**record, "search_version": 2}))
    tuning._reset_for_tests()
    tuning.ensure()
    assert len(fresh) == 3 and tuning.params()["source"] == "search"
    assert json.loads(entry.read_text())["search_version"] == tuning._SEARCH_VERSION == 3


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

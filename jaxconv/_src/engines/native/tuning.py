"""Per-CPU tuning of the native kernels: parameters chosen at run time, searched once per CPU.

The forward kernels take a few run-time parameters (``csrc/kernel_params.h``, one list):

- ``panel_kib``: KiB of a kernel panel when a kernel block is cut into panels;
- ``block_kib``: a kernel block (K rows x one register tile's columns) up to this many KiB
  is one panel, so that a tile runs all its taps at once;
- ``items``: the forward shrinks its tiles per work item until at least this many items;
- ``keyed``: ``max_min`` / ``min_max`` on integer keys (1) or on float min / max (0);
- ``min_form``: ``adder`` / ``l1`` forward as ``2 sum min(x, w) - sum x - sum w`` (1) or
  the direct ``-|x - w|`` loop (0);
- ``fma_add``: ``max_plus`` / ``min_plus`` and the min form add as ``fma(a, 1, b)`` on the
  FMA ports (1) or as ``add`` (0), the same bits;
- ``tile``: the forward's register tile, the instruction set's (0: 6 x 4 vectors on AVX-512,
  4 x 3 on AVX2) or an alternative with as many accumulators (1: 8 x 3, 6 x 2), both
  compiled in;
- ``bcast`` (AVX-512 only): the forward's combine reads each input value as an embedded
  broadcast (1) or from one broadcast register per tile row (0), the same bits; the dense
  adder / l1 backward reads its cotangent the same way, and the max / min backward's winner
  scan its x;
- ``lanes``: the forward's kernel blocks are cut into this many runs with a work counter
  each, a thread starting in its own, so that each thread packs only its blocks (1: one
  counter, every thread packs every block), the same bits;
- ``l1_split`` (AVX-512 with ``bcast``): ``l1``'s dense backward takes two terms in three as
  ``g * sign(x - w)`` added to both gradients (1) or every term as two fused multiply-adds
  (0), the same bits.

``bcast`` and ``l1_split`` act in the backward, and the search times them there too (small
single-threaded backwards, both gradients: ``time_backward`` in ``csrc/tune_probe.cc``).
One ``bcast`` serves both directions: on Zen 4 both want 1 (0 is 1.1-1.3x slower forward,
1.07-1.2x backward); a search whose screening finds them disagreeing by the margin says so
(``directions_disagree``), the sign that a CPU would want them apart.

No parameter changes a max/min result's bits; only ``min_form`` changes a sum's rounding
(both forms stay within the documented bound of a product's sum).

How a process picks its parameters, at the native engine's first use (`ensure`):

1. ``JAXCONV_NATIVE_TUNE`` = ``on`` (the default) takes the entry of this CPU from the cache,
   or runs the search (`search`: single-threaded timings of a few small representative
   forwards and backwards, a few tenths of a second of CPU time) and stores it; ``rerun``
   searches again and overwrites the entry; ``off`` keeps the compiled-in defaults (no
   search, no file). An entry whose search ran under load (load average above one per CPU)
   is searched again by the first process that starts on a quiet machine (load under half a
   CPU each), once.
2. ``JAXCONV_NATIVE_PARAMS`` overrides fields on top: ``"panel_kib=32,keyed=0"`` (comma
   separated ``name=integer``; ``default`` alone means the compiled-in defaults). A name not
   in the list, a value that is not an integer or out of its range raises ``ValueError``.

The cache lives next to the user-kernel cache: ``<cache>/tuning/params-<key>.json`` where
``<cache>`` is ``$JAXCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxconv``, else
``~/.cache/jaxconv``, and ``<key>`` hashes the CPU model, the instruction set, the jaxconv
version, the kernels' ABI and the parameter list. An entry is read only from a trusted
directory (the user-kernel cache's rule) and only if it names its key, this search's record
format and every field within range; anything else is searched again. `clear_cache` (or
deleting the directory) clears it; `retune` searches again now.

The search is built against noise: a parameter leaves its current value only when a
challenger leads by the parameter's margin (5%, the register tile 10%) in a screening and
again in paired, interleaved re-timings (medians), and a set other than the defaults must
beat them once more, paired. The entry keeps every score and the conditions (load, CPUs,
rounds, the search's own CPU time): `params` (``why``) and ``explain`` show them.

`params` says what this process runs with, where it came from and why.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import platform
import statistics
import tempfile
import threading
import time
from typing import Any

from jaxconv._src.version import __version__

ENV_PARAMS = "JAXCONV_NATIVE_PARAMS"
ENV_TUNE = "JAXCONV_NATIVE_TUNE"
_TUNE_MODES = ("on", "off", "rerun")

_lock = threading.RLock()
_state: dict[str, Any] = {"done": False, "params": None, "source": None, "path": None,
                          "report": None}


def _native() -> Any:
    """The extension module (imported on first use)."""
    from jaxconv._src.engines.native import ffi  # noqa: PLC0415 - only once the engine is used

    return ffi.extension()


def fields() -> dict[str, tuple[int, int, int]]:
    """The parameters the compiled kernels take: ``{name: (default, lowest, highest)}``.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> tuning.fields()["keyed"]
      (1, 0, 1)
    """
    return {str(k): (int(d), int(lo), int(hi))
            for k, (d, lo, hi) in _native().param_fields().items()}


def defaults() -> dict[str, int]:
    """The compiled-in parameters (tuned once, on an AMD Zen 5)."""
    return {k: d for k, (d, _, _) in fields().items()}


def validate(values: dict[str, Any], *, where: str = "params") -> dict[str, int]:
    """Checks a (partial) parameter set: known names, integers within their ranges.

    Args:
      values: ``{name: value}``.
      where: what to name in an error (an argument or an environment variable).

    Returns:
      The same set with ``int`` values.

    Raises:
      ValueError: naming the parameter and what is allowed.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> tuning.validate({"keyed": 0})
      {'keyed': 0}
    """
    known = fields()
    out: dict[str, int] = {}
    for name, value in values.items():
        if name not in known:
            raise ValueError(f"{where}: unknown tuning parameter {name!r}; the parameters are "
                             f"{', '.join(sorted(known))}.")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where}: parameter {name!r} must be an integer, got {value!r}.")
        _, lo, hi = known[name]
        if not lo <= value <= hi:
            raise ValueError(f"{where}: parameter {name!r} must be in [{lo}, {hi}], "
                             f"got {value}.")
        out[name] = value
    return out


def parse(text: str) -> dict[str, int]:
    """Parses a ``JAXCONV_NATIVE_PARAMS`` value into a (partial) parameter set.

    Args:
      text: ``"name=integer,..."`` (spaces ignored), or ``"default"`` / ``""`` (no override).

    Returns:
      ``{name: value}``, validated.

    Raises:
      ValueError: naming the variable, the item and what is allowed.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> tuning.parse("panel_kib=32, keyed=0")
      {'panel_kib': 32, 'keyed': 0}
    """
    text = text.strip()
    if text in ("", "default"):
        return {}
    values: dict[str, Any] = {}
    for item in text.split(","):
        name, eq, value = (s.strip() for s in item.partition("="))
        if not eq or not name:
            raise ValueError(f"{ENV_PARAMS}: {item.strip()!r} is not 'name=integer' (the value "
                             "is a comma-separated list such as 'panel_kib=32,keyed=0', or "
                             "'default').")
        if name in values:
            raise ValueError(f"{ENV_PARAMS}: parameter {name!r} is given twice.")
        try:
            values[name] = int(value, 10)
        except ValueError:
            values[name] = value
    return validate(values, where=ENV_PARAMS)


def tune_mode() -> str:
    """``JAXCONV_NATIVE_TUNE``: ``"on"`` (default), ``"off"`` or ``"rerun"``.

    Raises:
      ValueError: for any other value.
    """
    mode = os.environ.get(ENV_TUNE, "on").strip().lower() or "on"
    mode = {"1": "on", "0": "off"}.get(mode, mode)
    if mode not in _TUNE_MODES:
        raise ValueError(f"{ENV_TUNE} must be one of {', '.join(_TUNE_MODES)} (or 1 / 0), "
                         f"got {os.environ.get(ENV_TUNE)!r}.")
    return mode


def cpu_model() -> str:
    """This CPU's model name (``/proc/cpuinfo``), else the platform's processor string."""
    with contextlib.suppress(OSError):
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu model", "Processor"):
                return value.strip()
    return platform.processor() or platform.machine()


def cache_key() -> str:
    """The cache entry's key: a hash of the CPU model, the instruction set, the jaxconv
    version, the kernels' ABI and the parameter list."""
    mod = _native()
    text = json.dumps([cpu_model(), str(mod.isa()), __version__, int(mod.abi()),
                       sorted(fields().items())])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def cache_dir() -> pathlib.Path:
    """Where tuned parameters are kept: ``tuning`` beside the user-kernel cache."""
    from jaxconv._src.engines.native import user_kernels  # noqa: PLC0415

    return user_kernels.cache_dir().parent / "tuning"


def _entry() -> pathlib.Path:
    """The cache file of this CPU's parameters."""
    return cache_dir() / f"params-{cache_key()}.json"


def _read(path: pathlib.Path) -> tuple[dict[str, int], dict[str, Any]] | None:
    """A verified entry's parameters and search report, or ``None`` (missing, untrusted,
    malformed, or written by another version of the search).

    Args:
        path: the entry's file.

    Returns:
        ``(params, report)``, or ``None``.
    """
    from jaxconv._src.engines.native import user_kernels  # noqa: PLC0415

    where = user_kernels.cache(str(path.parent))
    if not where.trusted or not path.exists():
        return None
    try:
        if user_kernels.distrust(path) is not None:
            return None
        meta = json.loads(path.read_text())
        if (not isinstance(meta, dict) or meta.get("key") != cache_key()
                or meta.get("search_version") != _SEARCH_VERSION):
            return None
        got, report = meta.get("params"), meta.get("search")
        if not isinstance(got, dict) or set(got) != set(fields()) or not isinstance(report, dict):
            return None
        return validate(got), report
    except (OSError, ValueError):
        return None


def _stale(report: dict[str, Any]) -> bool:
    """Whether an entry is to be searched again now: it was made under load (`_BUSY_LOAD`)
    and the machine is quiet now (`_QUIET_LOAD`), so that a search under load is redone once
    a quiet moment comes, and never repeated while the machine stays busy.

    Args:
        report: the cache entry's search report (its ``conditions`` say the load).

    Returns:
        True when the entry should be searched again.
    """
    cond = report.get("conditions")
    if not isinstance(cond, dict) or not cond.get("busy"):
        return False
    now = _load_per_cpu()
    return now is not None and now < _QUIET_LOAD


def _write(path: pathlib.Path, values: dict[str, int], report: dict[str, Any]) -> bool:
    """Writes the parameters to the cache atomically, if the cache is trusted and writable.

    Args:
        path: the entry's file.
        values: the parameters.
        report: the search's report (its scores and conditions), kept in the record.

    Returns:
        True if written.
    """
    from jaxconv._src.engines.native import user_kernels  # noqa: PLC0415

    user_kernels.cache.cache_clear()  # the directory may have been removed meanwhile
    where = user_kernels.cache(str(path.parent))
    if not (where.trusted and where.writable):
        return False
    record = {"key": cache_key(), "cpu": cpu_model(), "isa": str(_native().isa()),
              "params": values, "search_version": _SEARCH_VERSION, "search": report}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".params-")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers see the old entry or the new one, never a part
    except OSError:
        return False  # a full or read-only disk: this process keeps what it measured
    return True


# The search's problems (single-threaded, VALID): (n, h, w, c, k, o): a dense (1x1) product
# and a 3x3 one whose kernel blocks (K x 64 on AVX-512: 1 MiB, 288 KiB) exceed the default
# one-panel limit, and a 3x3 one whose block (147 KiB) does not; for the backward, a dense
# product whose input channels make 16 blocks of the dense sums backward
# (kernel_sumbwd_dense.h: 12.6 M terms, ~0.6 ms on Zen 4).
_DENSE = (128, 1, 1, 1024, 1, 256)
_CONV_BIG = (1, 10, 10, 128, 3, 128)
_CONV = (2, 18, 18, 64, 3, 64)
_DENSE_BWD = (96, 1, 1, 512, 1, 256)
# (panel_kib, block_kib) candidates, the compiled-in default first.
_PANELS = ((16, 192), (64, 192), (128, 192), (16, 1024), (128, 1024), (16, 4096))
_OPS = {"max_plus": 0, "max_min": 2, "adder": 4, "l1": 5}
_FWD, _BWD = "fwd", "bwd"
# The search's steps in order: (name, problems), each problem (direction, op, shape): the
# forward, or the backward (both gradients) at the forward's output. "panels" sets panel_kib
# and block_kib together; each other step is one 0/1 parameter of that name. `bcast` acts in
# the forward, in the dense adder / l1 backward (which reads its cotangent the same way) and
# in the max / min backward's winner scan (a rescan: the probe keeps no record), and is timed
# in both directions; `l1_split` acts only in l1's dense backward, and only with `bcast` on
# AVX-512 (`_applies`).
_STEPS = (("panels", ((_FWD, "max_plus", _DENSE), (_FWD, "max_plus", _CONV_BIG),
                      (_FWD, "max_plus", _CONV))),
          ("tile", ((_FWD, "max_plus", _DENSE), (_FWD, "max_plus", _CONV_BIG),
                    (_FWD, "max_plus", _CONV))),
          ("bcast", ((_FWD, "max_plus", _DENSE), (_FWD, "max_plus", _CONV),
                     (_BWD, "adder", _DENSE_BWD), (_BWD, "l1", _DENSE_BWD),
                     (_BWD, "max_plus", _CONV))),
          ("l1_split", ((_BWD, "l1", _DENSE_BWD),)),
          ("fma_add", ((_FWD, "max_plus", _DENSE),)),
          ("keyed", ((_FWD, "max_min", _DENSE),)),
          ("min_form", ((_FWD, "adder", _CONV),)))
# A challenger replaces the current choice only when its time relative to it is below the
# step's margin, both in the screening and in the paired re-timing. Under load the screening
# reads 5-10% leads that are not there (one search cached tile=1, block_kib=4096: layer A's
# forward ~1.8x slower on Zen 4); the other register tile's timings spread most, and the min
# form changes a sum's rounding.
_MARGINS = {"panels": 0.95, "tile": 0.9, "bcast": 0.95, "l1_split": 0.95, "fma_add": 0.95,
            "keyed": 0.95, "min_form": 0.95}
# Challengers whose screening is within this of the fastest count as tied: the first listed
# of them is the one re-timed.
_TIE = 0.03
# Paired rounds (current, challenger, then challenger, current, ...) of a confirmation, times
# ceil(_CONFIRM_PAIRS / the step's problem count): a one-problem step re-times 21 rounds. With
# 7 alone, 1 of 20 searches under synthetic noise (benchmarks/tuning_search.py --noise 0.2)
# took l1_split=0 (one problem, a true 1.18x loss: E's l1 backward 1.16x slower).
_CONFIRM_ROUNDS = 7
_CONFIRM_PAIRS = 3
# The search's record format (an entry of another format is searched again): 3 adds the
# backward's problems and scores (the bcast and l1_split steps).
_SEARCH_VERSION = 3
# Load average per CPU above which a search counts as made under load, and below which a
# later process searches such an entry again (once the machine is quiet).
_BUSY_LOAD = 1.0
_QUIET_LOAD = 0.5


def _time(problem: tuple[Any, ...], values: dict[str, int], reps: int) -> float:
    """The time of one probe problem under ``values`` (thread CPU time, the kernel's own).

    Args:
        problem: ``(direction, op id, n, h, w, c, k, o)``, direction ``"fwd"`` or ``"bwd"``.
        values: the parameters.
        reps: how many calls.

    Returns:
        The time the extension reports (its best of `reps`).
    """
    direction, op, n, h, w, c, k, o = problem
    probe = _native().time_backward if direction == _BWD else _native().time_forward
    return float(probe(op, n, h, w, c, k, o, reps, values))


def _applies(name: str, chosen: dict[str, int]) -> str | None:
    """Why step `name` is not searched under the current choice, or ``None`` when it is.

    Args:
        name: the step.
        chosen: the parameters chosen so far.

    Returns:
        The reason (kept in the report), or ``None``.
    """
    if name == "l1_split":
        if str(_native().isa()) != "avx512":
            return "acts on AVX-512 only"
        if chosen["bcast"] == 0:
            return "acts with bcast=1 only"
    return None


def _label(problem: tuple[Any, ...]) -> str:
    """A problem's name in the report: ``"bwd l1 96x1x1x512 k1 o256"``.

    Args:
        problem: ``(direction, op id, n, h, w, c, k, o)``.

    Returns:
        The name.
    """
    direction, op, n, h, w, c, k, o = problem
    name = next((nm for nm, i in _OPS.items() if i == op), str(op))
    return f"{direction} {name} {n}x{h}x{w}x{c} k{k} o{o}"


def _geomean(ratios: list[float]) -> float:
    """The geometric mean of positive ratios (``inf`` if one is not).

    Args:
        ratios: the ratios, at least one.

    Returns:
        Their geometric mean.

    Example:
        >>> round(_geomean([2.0, 0.5]), 6)
        1.0
    """
    prod = 1.0
    for r in ratios:
        prod *= r if r > 0 else float("inf")
    return prod ** (1.0 / len(ratios))


def _scores(cands: list[dict[str, int]], problems: list[tuple[Any, ...]],
            rounds: int) -> list[float]:
    """The screening: each candidate's geometric mean over `problems` of its best time
    relative to the first candidate's (rounds interleaved, so that a slow moment hits every
    candidate).

    Args:
        cands: the candidate parameter sets, the current choice first.
        problems: the problems timed (`_time`).
        rounds: how many interleaved rounds.

    Returns:
        One score per candidate (1.0 for the first; lower is faster).
    """
    t = [[float("inf")] * len(problems) for _ in cands]
    for _ in range(rounds):
        for i, cand in enumerate(cands):
            for j, prob in enumerate(problems):
                t[i][j] = min(t[i][j], _time(prob, cand, 2))
    return [_geomean([a / b if a > 0 and b > 0 else float("inf")
                      for a, b in zip(row, t[0], strict=True)]) for row in t]


def _paired(base: dict[str, int], cand: dict[str, int], problems: list[tuple[Any, ...]],
            rounds: int) -> tuple[float, list[float]]:
    """The confirmation: `cand`'s time relative to `base`'s in paired rounds.

    Each round times both sets back to back on each problem (``base`` first in even rounds,
    ``cand`` first in odd ones), so that a slow moment hits both members of a pair; a pair's
    ratio is ``cand / base`` in thread CPU time, and a problem's ratio is the median over
    rounds (one disturbed pair does not move it).

    Args:
        base: the current choice.
        cand: the challenger.
        problems: the problems timed (`_time`).
        rounds: how many paired rounds.

    Returns:
        ``(score, per_problem)``: the geometric mean over problems of the median ratios, and
        those medians.
    """
    ratios: list[list[float]] = [[] for _ in problems]
    for r in range(rounds):
        for j, prob in enumerate(problems):
            if r % 2:
                tc, tb = _time(prob, cand, 1), _time(prob, base, 1)
            else:
                tb, tc = _time(prob, base, 1), _time(prob, cand, 1)
            ratios[j].append(tc / tb if tc > 0 and tb > 0 else float("inf"))
    medians = [statistics.median(rs) for rs in ratios]
    return _geomean(medians), medians


def _load_per_cpu() -> float | None:
    """The 1-minute load average over the CPUs this process may use (``None`` if unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return load / max(cpus, 1)


def _by_direction(problems: list[tuple[Any, ...]], values: list[float]) -> dict[str, float]:
    """The geometric mean of per-problem `values` in each direction (``fwd``, ``bwd``).

    Args:
        problems: the problems (`_time`).
        values: one positive value per problem.

    Returns:
        ``{direction: geometric mean}`` over the directions present.
    """
    out = {}
    for d in (_FWD, _BWD):
        vs = [v for p, v in zip(problems, values, strict=True) if p[0] == d]
        if vs:
            out[d] = _geomean(vs)
    return out


def _screen(cands: list[dict[str, int]], problems: list[tuple[Any, ...]],
            rounds: int) -> tuple[list[float], list[dict[str, float]]]:
    """`_scores` in each direction, and over all problems.

    Args:
        cands: the candidate parameter sets, the current choice first.
        problems: the problems timed (`_time`).
        rounds: how many interleaved rounds.

    Returns:
        ``(scores, directions)``: one score per candidate over every problem (the geometric
        mean of its directions' scores weighted by their problem counts), and per candidate
        ``{direction: score}``.
    """
    per = {d: _scores(cands, [p for p in problems if p[0] == d], rounds)
           for d in (_FWD, _BWD) if any(p[0] == d for p in problems)}
    counts = {d: sum(1 for p in problems if p[0] == d) for d in per}
    total = sum(counts.values())
    scores, dirs = [], []
    for i in range(len(cands)):
        prod = 1.0
        for d, sc in per.items():
            prod *= (sc[i] if sc[i] > 0 else float("inf")) ** counts[d]
        scores.append(prod ** (1.0 / total))
        dirs.append({d: sc[i] for d, sc in per.items()})
    return scores, dirs


def search(rounds: int = 3, confirm_rounds: int = _CONFIRM_ROUNDS
           ) -> tuple[dict[str, int], dict[str, Any]]:
    """Measures the candidate parameters on small problems and returns the best set.

    Each candidate runs single-threaded on fixed data, timed in the thread's CPU time (time
    spent descheduled on a busy machine does not count). In turn (`_STEPS`): the panel sizes
    and the register tile (max_plus forwards on a dense and two 3x3 problems), the embedded
    broadcasts (max_plus forwards, a 3x3 and the dense problem, and backwards (both
    gradients): the dense adder and l1, which read their cotangent that way, and max_plus's
    3x3 winner scan), l1's split
    backward (l1's dense backward; AVX-512 with ``bcast`` only, else not searched), the adds
    (max_plus, dense), integer keys or float min/max (max_min, dense) and the min form or the
    direct loop (adder, 3x3). ``items`` and ``lanes`` (the thread split, which a
    single-threaded timing cannot judge) keep their defaults.

    A step first screens its candidates against the current choice (best of `rounds`
    interleaved rounds, in each direction; the step's score is the geometric mean over its
    problems). The fastest, if it leads by the step's margin (`_MARGINS`), is then re-timed
    against the current choice in `confirm_rounds` paired rounds (times
    ``ceil(_CONFIRM_PAIRS / problems)``: a one-problem step takes three times as many; medians
    of the pairs' ratios, `_paired`) and taken only if it still leads by the margin (of
    challengers within `_TIE` of the fastest, the first listed is the one re-timed). If the
    set that results is not the defaults and more than one step changed it, it is timed
    against them once more (paired, on the problems of the steps that changed) and dropped
    for the defaults unless it is faster; a changed step whose own problems are not faster in
    that timing goes back to its defaults.

    Args:
      rounds: screening rounds per candidate.
      confirm_rounds: paired rounds of a confirmation.

    Returns:
      ``(params, report)``: the chosen set and what the choice rests on: ``steps`` (per step:
      ``problems`` (their names), ``screen`` {label: time relative to the current choice},
      ``screen_dirs`` {label: {"fwd" | "bwd": the same in one direction}}, ``challenger``,
      ``confirm`` (its paired relative time, or ``None`` when it was not re-timed),
      ``confirm_problems``, ``confirm_dirs``, ``margin``, ``chosen``, and
      ``directions_disagree`` where the screening's challenger leads by the margin in one
      direction and trails by it in the other; a step that does not
      apply under the choice so far has only ``skipped`` (why) and ``chosen``), ``final``
      (the chosen set against the defaults: ``score``, ``problems``, ``kept``, and
      ``reverted``, the steps put back; or ``None`` when they are the defaults) and
      ``conditions`` (load per CPU before and after, CPUs, rounds, the search's CPU and wall
      seconds, when).

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> chosen, report = tuning.search(rounds=1, confirm_rounds=1)
      >>> sorted(chosen) == sorted(tuning.fields())
      True
    """
    try:
        return _search(rounds, confirm_rounds)
    finally:
        _native().release_probes()  # the probes' data, kept between their calls


def _search(rounds: int, confirm_rounds: int) -> tuple[dict[str, int], dict[str, Any]]:
    """`search`'s steps (the probes keep their problems' data until `search` frees them).

    Args:
      rounds: screening rounds per candidate.
      confirm_rounds: paired rounds of a confirmation.

    Returns:
      ``(params, report)``, as `search`.
    """
    cpu0, wall0, load0 = time.thread_time(), time.perf_counter(), _load_per_cpu()
    base = defaults()
    chosen = dict(base)
    steps: dict[str, Any] = {}
    changed: list[tuple[Any, ...]] = []
    moved: list[str] = []
    own: dict[str, list[tuple[Any, ...]]] = {}
    for name, problems in _STEPS:
        skip = _applies(name, chosen)
        if skip is not None:
            steps[name] = {"skipped": skip, "chosen": str(chosen[name])}
            continue
        probs = [(d, _OPS[op], *shape) for d, op, shape in problems]
        if name == "panels":
            cands = [dict(chosen, panel_kib=p, block_kib=b) for p, b in _PANELS]
            labels = [f"{p}/{b}" for p, b in _PANELS]
            first = cands.index(chosen) if chosen in cands else None
            if first is None:
                cands.insert(0, dict(chosen))
                labels.insert(0, f"{chosen['panel_kib']}/{chosen['block_kib']}")
            else:
                cands.insert(0, cands.pop(first))
                labels.insert(0, labels.pop(first))
        else:
            cands = [dict(chosen), dict(chosen, **{name: 1 - chosen[name]})]
            labels = [str(chosen[name]), str(1 - chosen[name])]
        margin = _MARGINS[name]
        scores, dirs = _screen(cands, probs, rounds)
        # The first listed of the challengers within `_TIE` of the fastest: among candidates
        # that the screening cannot tell apart (the large blocks on Zen 4) the choice, and
        # so the cached set, does not follow the noise from one search to the next.
        fastest = min(scores[1:])
        best = next(i for i in range(1, len(cands)) if scores[i] <= fastest * (1.0 + _TIE))
        step: dict[str, Any] = {"problems": [_label(p) for p in probs],
                                "screen": dict(zip(labels, scores, strict=True)),
                                "screen_dirs": dict(zip(labels, dirs, strict=True)),
                                "challenger": labels[best], "confirm": None, "margin": margin,
                                "chosen": labels[0]}
        by_dir = dirs[best]
        if len(by_dir) == 2 and min(by_dir.values()) < margin and max(by_dir.values()) * margin > 1:
            # The directions disagree beyond the margin: one value for both costs one of them
            # (on Zen 4 bcast=1 leads in both: 1.1-1.3x forward, 1.07-1.2x backward).
            step["directions_disagree"] = True
        if scores[best] < margin:
            # A step of fewer problems re-times more rounds: its median has as many pairs
            # behind it as the three-problem steps' geometric mean (only a step that screened
            # a lead pays for them).
            n_rounds = confirm_rounds * -(-_CONFIRM_PAIRS // len(probs))
            score, per_problem = _paired(cands[0], cands[best], probs, n_rounds)
            step.update(confirm=score, confirm_problems=per_problem, confirm_rounds=n_rounds,
                        confirm_dirs=_by_direction(probs, per_problem))
            if score < margin:
                chosen = dict(cands[best])
                step["chosen"] = labels[best]
                changed.extend(p for p in probs if p not in changed)
                moved.append(name)
                own[name] = probs
        steps[name] = step
    final = None
    if chosen != base:
        if len(moved) == 1:  # one step changed it, confirmed against the defaults already
            score, per_problem = steps[moved[0]]["confirm"], steps[moved[0]]["confirm_problems"]
        else:
            score, per_problem = _paired(base, chosen, changed, confirm_rounds)
        final = {"score": score, "problems": per_problem, "kept": score < 1.0}
        if not final["kept"]:
            chosen = dict(base)
        elif len(moved) > 1:
            # Each changed step's own problems must be faster too: the set's geometric mean
            # over all of them can hide one step's loss behind another's gain (one noisy
            # search took l1_split=0, 1.2x slower on l1's backward, behind the panels' 0.8x).
            ratio = dict(zip(changed, per_problem, strict=True))
            slower = [n for n in moved if _geomean([ratio[p] for p in own[n]]) >= 1.0]
            if slower:
                for n in slower:
                    for field in (("panel_kib", "block_kib") if n == "panels" else (n,)):
                        chosen[field] = base[field]
                final["reverted"] = slower
    load1 = _load_per_cpu()
    loads = [x for x in (load0, load1) if x is not None]
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    conditions = {"load_per_cpu": [load0, load1], "cpus": cpus, "busy": bool(loads) and
                  max(loads) > _BUSY_LOAD, "rounds": rounds, "confirm_rounds": confirm_rounds,
                  "cpu_s": round(time.thread_time() - cpu0, 4),
                  "wall_s": round(time.perf_counter() - wall0, 4),
                  "when": datetime.datetime.now(datetime.UTC).isoformat(
                      timespec="seconds")}
    return validate(chosen), {"steps": steps, "final": final, "conditions": conditions}


def _directions(dirs: dict[str, float] | None) -> str:
    """A step's scores by direction for `summary`: ``" [fwd 1.15x, bwd 1.08x]"`` where the
    step timed a backward, ``" [bwd]"`` where it timed only backwards, else ``""``.

    Args:
        dirs: ``{direction: score}``, or ``None``.

    Returns:
        The text.
    """
    if not dirs or _BWD not in dirs:
        return ""
    if len(dirs) == 1:
        return f" [{_BWD}]"
    return " [" + ", ".join(f"{d} {dirs[d]:.2f}x" for d in (_FWD, _BWD) if d in dirs) + "]"


def summary(report: dict[str, Any] | None) -> str:
    """One line saying what a search measured and why it chose what it did.

    Args:
      report: `search`'s report (as kept in the cache entry), or ``None``.

    Returns:
      E.g. ``"searched at load 4.9/CPU (2 CPUs), 3 + 7 paired rounds, 0.31 s CPU: panels
      16/192 (16/1024 0.93x, paired 0.97x, needs < 0.95); tile 0 (1 1.04x); bcast 1 (0
      1.12x [fwd 1.15x, bwd 1.08x]); l1_split 1 (0 1.03x [bwd]); ..."`` (a step that timed
      backwards gives its scores by direction), or ``""``.
    """
    if not report:
        return ""
    cond = report.get("conditions", {})
    loads = [x for x in cond.get("load_per_cpu", []) if x is not None]
    load = f"load {max(loads):.1f}/CPU" if loads else "load unknown"
    parts = []
    steps = report.get("steps", {})
    for name in [n for n, _ in _STEPS if n in steps]:
        step = steps[name]
        if "skipped" in step:
            parts.append(f"{name} {step['chosen']} (not searched: {step['skipped']})")
            continue
        lead = (f"{step['challenger']} {step['screen'][step['challenger']]:.2f}x"
                + _directions(step.get("screen_dirs", {}).get(step["challenger"])))
        if step.get("confirm") is not None:
            lead += f", paired {step['confirm']:.2f}x" + _directions(step.get("confirm_dirs"))
        if step["chosen"] == step["challenger"] or step.get("confirm") is not None:
            lead += f", needs < {step['margin']:.2f}"
        if step.get("directions_disagree"):
            lead += ", fwd and bwd disagree"
        parts.append(f"{name} {step['chosen']} ({lead})")
    final = report.get("final")
    if final:
        parts.append(f"the set {final['score']:.2f}x the defaults"
                     + ("" if final["kept"] else ", dropped")
                     + "".join(f", {n} reverted" for n in final.get("reverted", ())))
    return (f"searched at {load} ({cond.get('cpus', '?')} CPUs), {cond.get('rounds', '?')} + "
            f"{cond.get('confirm_rounds', '?')} paired rounds, {cond.get('cpu_s', 0):.2f} s "
            f"CPU{' (under load)' if cond.get('busy') else ''}: " + "; ".join(parts))


def _apply(values: dict[str, int], source: str, path: pathlib.Path | None,
           report: dict[str, Any] | None) -> None:
    """Sets the parameters in the extension and records where they came from.

    Args:
        values: the parameters.
        source: where they come from (for ``explain``).
        path: the cache file, or ``None``.
        report: the search's report behind them, or ``None``.
    """
    _native().set_params(values)
    _state.update(done=True, params=dict(values), source=source, path=path, report=report)


def _search_and_store(path: pathlib.Path) -> tuple[dict[str, int], dict[str, Any],
                                                   pathlib.Path | None]:
    """Runs the search and stores it in `path`; returns the set, its report and the path
    (``None`` when it could not be written)."""
    values, report = search()
    return values, report, path if _write(path, values, report) else None


def ensure() -> dict[str, int]:
    """Picks this process's parameters once (see the module docstring) and sets them.

    Returns:
      The parameters set.

    Raises:
      ValueError: for a bad ``JAXCONV_NATIVE_PARAMS`` or ``JAXCONV_NATIVE_TUNE``.
    """
    with _lock:
        if _state["done"]:
            return dict(_state["params"])
        override = parse(os.environ.get(ENV_PARAMS, ""))
        mode = tune_mode()
        values, source, path, report = defaults(), "default", None, None
        if mode != "off" and set(override) != set(values):
            path = _entry()
            got = _read(path) if mode == "on" else None
            if got is not None and not _stale(got[1]):
                (values, report), source = got, "cache"
            else:
                values, report, path = _search_and_store(path)
                source = "search" if got is None else "search (the entry was made under load)"
        if override:
            values = {**values, **override}
            source = f"{source}+{ENV_PARAMS}"
        _apply(values, source, path, report)
        return dict(values)


def params() -> dict[str, Any]:
    """The parameters this process runs with, where they came from, the cache entry, and why
    the search chose them.

    Returns:
      ``{"params": {...}, "source": "default" | "cache" | "search" (``"search (the entry was
      made under load)"`` when a busy search was redone on a quiet machine; with
      ``"+JAXCONV_NATIVE_PARAMS"`` when overridden) | "set", "entry": path or None,
      "search": the search's report (`search`) or None, "why": its `summary`}``, after
      `ensure`.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> sorted(tuning.params())
      ['entry', 'params', 'search', 'source', 'why']
    """
    ensure()
    with _lock:
        return {"params": dict(_native().params()), "source": _state["source"],
                "entry": None if _state["path"] is None else str(_state["path"]),
                "search": _state["report"], "why": summary(_state["report"])}


def set_params(values: dict[str, int]) -> None:
    """Sets (some of) the parameters of this process's later calls, by hand.

    Args:
      values: ``{name: integer}``; missing names keep their current value.

    Raises:
      ValueError: for an unknown name or a value out of range.
    """
    ensure()
    with _lock:
        _apply({**dict(_native().params()), **validate(values)}, "set", _state["path"],
               _state["report"])


def retune() -> dict[str, int]:
    """Runs the search now, stores it in the cache and sets it (``JAXCONV_NATIVE_PARAMS``
    still overrides the fields it names).

    Returns:
      The parameters set.
    """
    with _lock:
        values, report, path = _search_and_store(_entry())
        override = parse(os.environ.get(ENV_PARAMS, ""))
        _apply({**values, **override}, "search" + (f"+{ENV_PARAMS}" if override else ""), path,
               report)
        return {**values, **override}


def clear_cache() -> int:
    """Deletes every stored parameter entry (all CPUs); the next search runs again.

    Returns:
      How many entries were removed.
    """
    removed = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in cache_dir().glob("params-*.json"):
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed += 1
    return removed


def _reset_for_tests() -> None:
    """Forgets this process's choice so that the next `ensure` picks again (tests)."""
    with _lock:
        _state.update(done=False, params=None, source=None, path=None, report=None)

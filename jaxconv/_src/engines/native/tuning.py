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
  broadcast (1) or from one broadcast register per tile row (0), the same bits;
- ``lanes``: the forward's kernel blocks are cut into this many runs with a work counter
  each, a thread starting in its own, so that each thread packs only its blocks (1: one
  counter, every thread packs every block), the same bits.

No parameter changes a max/min result's bits; only ``min_form`` changes a sum's rounding
(both forms stay within the documented bound of a product's sum).

How a process picks its parameters, at the native engine's first use (`ensure`):

1. ``JAXCONV_NATIVE_TUNE`` = ``on`` (the default) takes the entry of this CPU from the cache,
   or runs the search (`search`: single-threaded timings of a few small representative
   forwards, about 0.15 s of CPU time) and stores it; ``rerun`` searches again and overwrites
   the entry; ``off`` keeps the compiled-in defaults (no search, no file).
2. ``JAXCONV_NATIVE_PARAMS`` overrides fields on top: ``"panel_kib=32,keyed=0"`` (comma
   separated ``name=integer``; ``default`` alone means the compiled-in defaults). A name not
   in the list, a value that is not an integer or out of its range raises ``ValueError``.

The cache lives next to the user-kernel cache: ``<cache>/tuning/params-<key>.json`` where
``<cache>`` is ``$JAXCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxconv``, else
``~/.cache/jaxconv``, and ``<key>`` hashes the CPU model, the instruction set, the jaxconv
version, the kernels' ABI and the parameter list. An entry is read only from a trusted
directory (the user-kernel cache's rule) and only if it names its key and every field within
range; anything else is searched again. `clear_cache` (or deleting the directory) clears it;
`retune` searches again now.

`params` says what this process runs with and where it came from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import platform
import tempfile
import threading
from typing import Any

from jaxconv._src.version import __version__

ENV_PARAMS = "JAXCONV_NATIVE_PARAMS"
ENV_TUNE = "JAXCONV_NATIVE_TUNE"
_TUNE_MODES = ("on", "off", "rerun")

_lock = threading.RLock()
_state: dict[str, Any] = {"done": False, "params": None, "source": None, "path": None}


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


def _read(path: pathlib.Path) -> dict[str, int] | None:
    """A verified entry's parameters, or ``None`` (missing, untrusted or malformed).

    Args:
        path: the entry's file.

    Returns:
        The parameters, or ``None``.
    """
    from jaxconv._src.engines.native import user_kernels  # noqa: PLC0415

    where = user_kernels.cache(str(path.parent))
    if not where.trusted or not path.exists():
        return None
    try:
        if user_kernels.distrust(path) is not None:
            return None
        meta = json.loads(path.read_text())
        if not isinstance(meta, dict) or meta.get("key") != cache_key():
            return None
        got = meta.get("params")
        if not isinstance(got, dict) or set(got) != set(fields()):
            return None
        return validate(got)
    except (OSError, ValueError):
        return None


def _write(path: pathlib.Path, values: dict[str, int], timings: dict[str, Any]) -> bool:
    """Writes the parameters to the cache atomically, if the cache is trusted and writable.

    Args:
        path: the entry's file.
        values: the parameters.
        timings: the search's measurements, kept in the record.

    Returns:
        True if written.
    """
    from jaxconv._src.engines.native import user_kernels  # noqa: PLC0415

    user_kernels.cache.cache_clear()  # the directory may have been removed meanwhile
    where = user_kernels.cache(str(path.parent))
    if not (where.trusted and where.writable):
        return False
    record = {"key": cache_key(), "cpu": cpu_model(), "isa": str(_native().isa()),
              "params": values, "timings": timings}
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".params-")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)  # readers see the old entry or the new one, never a part
    except OSError:
        return False  # a full or read-only disk: this process keeps what it measured
    return True


# The search's problems (single-threaded, VALID): (op, n, h, w, c, k, o): a dense (1x1)
# product and a 3x3 one whose kernel blocks (K x 64 on AVX-512: 1 MiB, 288 KiB) exceed the
# default one-panel limit, and a 3x3 one whose block (147 KiB) does not.
_DENSE = (0, 128, 1, 1, 1024, 1, 256)
_CONV_BIG = (0, 1, 10, 10, 128, 3, 128)
_CONV = (0, 2, 18, 18, 64, 3, 64)
# (panel_kib, block_kib) candidates, the compiled-in default first.
_PANELS = ((16, 192), (64, 192), (128, 192), (16, 1024), (128, 1024), (16, 4096))
_OPS = {"max_plus": 0, "max_min": 2, "adder": 4}
# A choice that changes a sum's rounding must win by this much to replace the default.
_ROUNDING_MARGIN = 0.95
# The other register tile must win by this much: its timings here spread by ~10% from run to
# run, and one search that read tile=1 at 0.91x cached a layer-A forward ~1.5x slower (Zen 4).
_TILE_MARGIN = 0.9


def _time(problem: tuple[int, ...], values: dict[str, int], reps: int) -> float:
    """The time of one forward problem under ``values`` (thread CPU time, the kernel's own).

    Args:
        problem: ``(op, n, h, w, c, k, o)``.
        values: the parameters.
        reps: how many calls.

    Returns:
        The time the extension reports.
    """
    op, n, h, w, c, k, o = problem
    return float(_native().time_forward(op, n, h, w, c, k, o, reps, values))


def _scores(cands: list[dict[str, int]], problems: list[tuple[int, ...]],
            rounds: int) -> list[float]:
    """Each candidate's geometric mean over `problems` of its best time relative to the
    first candidate's (rounds interleaved, so that a slow moment hits every candidate).

    Args:
        cands: the candidate parameter sets, the default first.
        problems: the forward problems timed.
        rounds: how many interleaved rounds.

    Returns:
        One score per candidate (1.0 for the first; lower is faster).
    """
    t = [[float("inf")] * len(problems) for _ in cands]
    for _ in range(rounds):
        for i, cand in enumerate(cands):
            for j, prob in enumerate(problems):
                t[i][j] = min(t[i][j], _time(prob, cand, 2))
    scores = []
    for row in t:
        prod = 1.0
        for a, b in zip(row, t[0], strict=True):
            prod *= a / b if a > 0 and b > 0 else float("inf")
        scores.append(prod ** (1.0 / len(row)))
    return scores


def search(rounds: int = 3) -> tuple[dict[str, int], dict[str, Any]]:
    """Measures the candidate parameters on small problems and returns the best set.

    Each candidate runs single-threaded on fixed data, timed in the thread's CPU time (time
    spent descheduled on a busy machine does not count), best of `rounds` interleaved
    rounds. In turn: the panel sizes and the register tile (max_plus on a dense and two 3x3
    problems), the embedded broadcasts (max_plus, a 3x3 and the dense problem), the adds
    (max_plus, dense), integer keys or float min/max (max_min, dense) and the min form or the
    direct loop (adder, 3x3; the min form, which rounds differently, and the other register
    tile, whose timings spread most, are taken only for a clear gain). ``items`` and
    ``lanes`` (the thread split, which a single-threaded timing cannot judge) keep their
    defaults.

    Args:
      rounds: interleaved rounds per candidate.

    Returns:
      ``(params, timings)``: the chosen set and, per choice, each candidate's time relative
      to the first.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> chosen, _ = tuning.search(rounds=1)
      >>> sorted(chosen) == sorted(tuning.fields())
      True
    """
    chosen = defaults()
    timings: dict[str, Any] = {}

    def pick(name: str, cands: list[dict[str, int]], labels: list[str], op: str,
             problems: list[tuple[int, ...]], margin: float = 1.0) -> None:
        probs = [(_OPS[op], *p[1:]) for p in problems]
        scores = _scores(cands, probs, rounds)
        timings[name] = dict(zip(labels, scores, strict=True))
        best = min(range(len(cands)), key=scores.__getitem__)
        if scores[best] < margin * scores[0]:
            chosen.update(cands[best])
        else:
            chosen.update(cands[0])

    pick("panels", [dict(chosen, panel_kib=p, block_kib=b) for p, b in _PANELS],
         [f"{p}/{b}" for p, b in _PANELS], "max_plus", [_DENSE, _CONV_BIG, _CONV])
    for name, op, problems, margin in (("tile", "max_plus", [_DENSE, _CONV_BIG, _CONV],
                                         _TILE_MARGIN),
                                        ("bcast", "max_plus", [_DENSE, _CONV], 1.0),
                                        ("fma_add", "max_plus", [_DENSE], 1.0),
                                        ("keyed", "max_min", [_DENSE], 1.0),
                                        ("min_form", "adder", [_CONV], _ROUNDING_MARGIN)):
        first = chosen[name]
        pick(name, [dict(chosen), dict(chosen, **{name: 1 - first})],
             [str(first), str(1 - first)], op, problems, margin)
    return validate(chosen), timings


def _apply(values: dict[str, int], source: str, path: pathlib.Path | None) -> None:
    """Sets the parameters in the extension and records where they came from.

    Args:
        values: the parameters.
        source: where they come from (for ``explain``).
        path: the cache file, or ``None``.
    """
    _native().set_params(values)
    _state.update(done=True, params=dict(values), source=source, path=path)


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
        values, source, path = defaults(), "default", None
        if mode != "off" and set(override) != set(values):
            path = _entry()
            got = _read(path) if mode == "on" else None
            if got is not None:
                values, source = got, "cache"
            else:
                values, timings = search()
                source = "search"
                if not _write(path, values, timings):
                    path = None
        if override:
            values = {**values, **override}
            source = f"{source}+{ENV_PARAMS}"
        _apply(values, source, path)
        return dict(values)


def params() -> dict[str, Any]:
    """The parameters this process runs with, where they came from, and the cache entry.

    Returns:
      ``{"params": {...}, "source": "default" | "cache" | "search" (with
      ``"+JAXCONV_NATIVE_PARAMS"`` when overridden) | "set", "entry": path or None}``, after
      `ensure`.

    Example:
      >>> from jaxconv._src.engines.native import tuning
      >>> sorted(tuning.params())
      ['entry', 'params', 'source']
    """
    ensure()
    with _lock:
        return {"params": dict(_native().params()), "source": _state["source"],
                "entry": None if _state["path"] is None else str(_state["path"])}


def set_params(values: dict[str, int]) -> None:
    """Sets (some of) the parameters of this process's later calls, by hand.

    Args:
      values: ``{name: integer}``; missing names keep their current value.

    Raises:
      ValueError: for an unknown name or a value out of range.
    """
    ensure()
    with _lock:
        _apply({**dict(_native().params()), **validate(values)}, "set", _state["path"])


def retune() -> dict[str, int]:
    """Runs the search now, stores it in the cache and sets it (``JAXCONV_NATIVE_PARAMS``
    still overrides the fields it names).

    Returns:
      The parameters set.
    """
    with _lock:
        values, timings = search()
        path: pathlib.Path | None = _entry()
        if not _write(path, values, timings):
            path = None
        override = parse(os.environ.get(ENV_PARAMS, ""))
        _apply({**values, **override}, "search" + (f"+{ENV_PARAMS}" if override else ""), path)
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
        _state.update(done=False, params=None, source=None, path=None)

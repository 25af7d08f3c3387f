"""Test configuration: 8 simulated CPU devices (for sharding tests), strict rank promotion, a
kernel cache of the session's own."""

import os
import sys
import tempfile

# XLA's CPU backend at LLVM optimization level 1 instead of 3: XLA compiles are most of the
# suite's time (~70% of the NaN-gradient tests', by cProfile) and level 1 took ~25% less
# there. Every test passes at level 1; level 0 broke a sharded bit-exact check (its FMA
# contraction differed between the sharded and the one-device program). Set only where the
# caller set no level: `XLA_FLAGS=--xla_backend_optimization_level=3 pytest` runs level 3.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=1").strip()

import jax  # noqa: E402

# User ops compiled by the native engine go to a cache of this test session, not the user's.
os.environ.setdefault("JAXCONV_CACHE_DIR", tempfile.mkdtemp(prefix="jaxconv-test-cache-"))
# The suite runs the compiled-in tuning parameters (the same numbers in every process);
# tests/test_tuning.py runs the search and every parameter set itself.
os.environ.setdefault("JAXCONV_NATIVE_TUNE", "off")
# User ops compile at -O1: half the compile time of the package's -O3 for the same bits (the
# flags keep -ffp-contract=off, no fast-math; test_user_kernels.py compares the two levels).
# The tests check values, never speed.
os.environ.setdefault("JAXCONV_USER_OPT", "-O1")

jax.config.update("jax_num_cpu_devices", 8)
# No implicit rank promotion anywhere in the library: a silent broadcast is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Make `tests/reference.py` importable as `reference` under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))


# The files that take longest, longest first. With `--dist loadfile --no-loadscope-reorder`
# (pyproject's addopts) pytest-xdist hands whole files to its two workers in collection order,
# each worker taking the next file when it runs low; a long file handed out last (xdist's
# default order is by test count, so a long file of a few tests went last) keeps one worker
# busy while the other is idle. Run long files first and the short ones fill the gaps. The
# other files keep their alphabetical order after these; the list is a schedule, not a
# selection (every collected test runs). test_sharding.py and test_user_kernels.py (the two
# longest files of a full run, ~150 s and ~130 s of 2800) came near the end alphabetically,
# with less than their own length of short files left behind them.
LONG_FILES_FIRST = (
    "test_wheel.py",
    "test_sharding.py",
    "test_user_kernels.py",
    "test_native.py",
    "test_engine.py",
    "test_sharding_processes.py",
    "test_examples.py",
    "test_tuning.py",
    "test_native_dense.py",
    "test_user_zoo.py",
)


def pytest_collection_modifyitems(config, items):
    """Moves the files of ``LONG_FILES_FIRST`` to the front (a stable sort by file rank)."""
    del config
    rank = {name: i for i, name in enumerate(LONG_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

"""Test configuration: 8 simulated CPU devices (for sharding tests), strict rank promotion, a
kernel cache of the session's own."""

import os
import sys
import tempfile

import jax

# User ops compiled by the native engine go to a cache of this test session, not the user's.
os.environ.setdefault("JAXCONV_CACHE_DIR", tempfile.mkdtemp(prefix="jaxconv-test-cache-"))
# The suite runs the compiled-in tuning parameters (the same numbers in every process);
# tests/test_tuning.py runs the search and every parameter set itself.
os.environ.setdefault("JAXCONV_NATIVE_TUNE", "off")

jax.config.update("jax_num_cpu_devices", 8)
# No implicit rank promotion anywhere in the library: a silent broadcast is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Make `tests/reference.py` importable as `reference` under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))

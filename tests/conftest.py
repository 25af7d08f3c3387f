"""Test configuration: 8 simulated CPU devices (for sharding tests), strict rank promotion."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
# No implicit rank promotion anywhere in the library: a silent broadcast is a bug.
jax.config.update("jax_numpy_rank_promotion", "raise")

# Make `tests/reference.py` importable as `reference` under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))

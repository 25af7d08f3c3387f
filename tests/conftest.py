"""Test configuration: 8 simulated CPU devices (for sharding tests), float32 defaults."""

import os
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

# Make `tests/reference.py` importable as `reference` under --import-mode=importlib.
sys.path.insert(0, os.path.dirname(__file__))

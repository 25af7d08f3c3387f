"""The engines: each registers itself with the core (`jaxconv._src.core.engine`).

Importing this package registers, in this order, the XLA engine (the fallback that serves
everything), the native engine (its library loads on first use) and the Pallas engine, whose
module (and ``jax.experimental.pallas``) loads only when it is asked for.
"""

# The order of registration is the order `engine=` lists its values in.
from jaxconv._src.engines import xla as _xla  # noqa: I001, F401 - registers "xla"
from jaxconv._src.engines import native as _native  # noqa: F401 - registers "native"

import importlib

from jaxconv._src.core import engine as _registry

_registry.register(
    "pallas", lambda: importlib.import_module("jaxconv._src.engines.pallas").ENGINE)

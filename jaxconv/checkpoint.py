"""Saving and restoring NNX models with orbax.

The implementation lives in ``jaxconv._src.checkpoint``; this module re-exports its public names.
"""

from jaxconv._src.checkpoint import restore as restore
from jaxconv._src.checkpoint import save as save

__all__ = (
    "restore",
    "save",
)

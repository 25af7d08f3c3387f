"""The package version: the one place it is written (``pyproject.toml`` reads it from here).

Example:
  >>> from jaxconv._src.version import __version__
  >>> __version__.count(".") >= 2
  True
"""

__version__ = "0.1.0"

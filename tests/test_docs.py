"""Runs the doctests of the public modules' docstrings (``>>>`` examples)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "jaxconv._src.algebra",
    "jaxconv._src.ops",
    "jaxconv._src.conv",
    "jaxconv._src.einsum",
    "jaxconv._src.transpose",
    "jaxconv._src.mixed",
    "jaxconv._src.kernel_ops",
    "jaxconv._src.transpose_modules",
    "jaxconv._src.wrappers",
    "jaxconv.nnx",
    "jaxconv.linen",
    "jaxconv.quantizers",
    "jaxconv.optim",
]


@pytest.mark.parametrize("name", MODULES)
def test_doctests(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"

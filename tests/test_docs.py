"""Runs the doctests (``>>>`` examples) of every jaxconv module's docstrings."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import jaxconv


def _modules() -> list[str]:
    names = ["jaxconv"]
    for info in pkgutil.walk_packages(jaxconv.__path__, prefix="jaxconv."):
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_doctests(name):
    module = importlib.import_module(name)
    flags = doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS
    result = doctest.testmod(module, optionflags=flags, verbose=False)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in {name}"

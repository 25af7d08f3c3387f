"""A griffe extension for the docs build: reads ``Example:`` and RST-style ``Example::``
headings as Google's ``Examples:`` section, so that ``>>>`` examples render as code."""

from __future__ import annotations

import re
from typing import Any

import griffe

_RST_EXAMPLE = re.compile(r"^(\s*)Examples?::?\s*$", re.MULTILINE)


class RSTExamples(griffe.Extension):
    """Rewrites ``Example::`` to ``Examples:`` (the doctest section) in every docstring."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _RST_EXAMPLE.sub(r"\1Examples:", obj.docstring.value)

"""A MkDocs hook that renders the docs' LaTeX to MathML at build time.

``pymdownx.arithmatex`` (generic mode) leaves ``\\(...\\)`` and ``\\[...\\]`` in
``<span class="arithmatex">`` / ``<div class="arithmatex">``; this hook replaces each with the
MathML that ``latex2mathml`` makes from it. Browsers render MathML natively, so the built
site needs no script and no network to show its formulas.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*'
    r"(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])\s*</(?P=tag)>",
    re.DOTALL,
)
# Inside \texttt{...} / \text{...} an escaped underscore is a plain one.
_TEXT_ARG = re.compile(r"\\(?:texttt|text)\{[^{}]*\}")


def _to_mathml(match: re.Match[str]) -> str:
    block = match.group("block") is not None
    latex = html.unescape(match.group("block") if block else match.group("inline"))
    latex = _TEXT_ARG.sub(lambda m: m.group(0).replace(r"\_", "_"), latex)
    return convert(latex.strip(), display="block" if block else "inline")


def on_page_content(html_text: str, **kwargs: Any) -> str:
    """Replaces every arithmatex span and div of a page with MathML."""
    return _MATH.sub(_to_mathml, html_text)

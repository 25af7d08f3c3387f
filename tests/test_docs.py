"""The docs: doctests of every module, Markdown-only docstrings, the site build, its pages."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import subprocess
import sys

import pytest

import jaxconv

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC_MODULES = ("jaxconv", "jaxconv.ops", "jaxconv.nnx", "jaxconv.linen", "jaxconv.quantizers",
                  "jaxconv.optim", "jaxconv.checkpoint", "jaxconv.packed")
# Sphinx / reST markup that mkdocstrings shows as raw text.
SPHINX = re.compile(r":(?:py:)?(?:func|class|mod|data|meth|attr|obj|exc|const|ref|math):`"
                    r"|^\s*\.\. [a-z]+::", re.MULTILINE)


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


def _public_docstrings():
    seen = set()
    for mod_name in PUBLIC_MODULES:
        module = importlib.import_module(mod_name)
        yield mod_name, inspect.getdoc(module)
        names = getattr(module, "__all__", None) or [n for n in dir(module)
                                                      if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if inspect.ismodule(obj) or id(obj) in seen:
                continue
            seen.add(id(obj))
            yield f"{mod_name}.{name}", inspect.getdoc(obj)
            if isinstance(obj, jaxconv.Op):
                yield f"{mod_name}.{name}.doc", obj.doc
            if inspect.isclass(obj):
                for member, value in vars(obj).items():
                    if not member.startswith("_") and (inspect.isfunction(value) or
                                                       isinstance(value, property)):
                        yield f"{mod_name}.{name}.{member}", inspect.getdoc(value)


def test_public_docstrings_are_markdown():
    """No Sphinx roles or directives in any public docstring (mkdocstrings renders Markdown)."""
    bad = [f"{where}: {m.group(0).strip()}" for where, doc in _public_docstrings() if doc
           for m in [SPHINX.search(doc)] if m]
    assert not bad, "Sphinx markup in docstrings (run /work/docs_convert.py):\n" + "\n".join(bad)


def test_public_examples_import_public_modules():
    """A reader copies the examples: they import the public modules, never ``jaxconv._src``."""
    bad = [where for where, doc in _public_docstrings() if doc and "jaxconv._src" in
           "\n".join(line for line in doc.splitlines() if ">>>" in line or "import" in line)]
    assert not bad, bad


def test_api_reference_lists_every_public_module():
    api = (ROOT / "docs" / "api.md").read_text()
    for mod in PUBLIC_MODULES[1:]:
        assert f"::: {mod}" in api, mod


def test_site_builds_without_raw_markup(tmp_path):
    """``mkdocs build --strict`` (the test extra installs mkdocs: CI builds the site); the pages
    hold no raw reST, no raw LaTeX (math is MathML, made at build time), load nothing from the
    network, and the op tables have a header."""
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    raw = re.compile(r":(?:func|class|mod|data|meth|attr|obj|exc|math):(?:`|<code>)"
                     r"|\.\. math::|\w::\s*</p>")
    # A script, stylesheet or font fetched from another host breaks the site offline.
    remote = re.compile(r'<(?:script|link|img)\b[^>]*\b(?:src|href)="(?:https?:)?//')
    offenders = []
    for page in site.rglob("*.html"):
        text = page.read_text(errors="replace")
        if raw.search(text) or 'class="arithmatex"' in text or remote.search(text):
            offenders.append(str(page.relative_to(site)))
    assert not offenders, offenders
    assert not list(site.rglob("*.py")), "the hooks and scripts of docs/ are not pages"
    api = (site / "api" / "index.html").read_text()
    for name in ("jaxconv.packed", "jaxconv.checkpoint", "kernel_mask"):
        assert name in api, name
    assert api.count("<math ") >= 5 and "\\frac" not in api
    op_page = (site / "ops" / "max_plus" / "index.html").read_text()
    headers = re.findall(r"<thead>(.*?)</thead>", op_page, re.DOTALL)
    assert headers and all(re.search(r"<th[^>]*>\s*\S", h) for h in headers), headers


def test_packed_conv_documents_each_argument():
    """Every parameter of ``PackedConv`` has its own entry under Args (griffe reads a
    comma-joined line as one unknown, required parameter)."""
    import griffe

    doc = griffe.Docstring(inspect.getdoc(jaxconv.packed.PackedConv), parser="google")
    names = {p.name for section in doc.parse() if section.kind.value == "parameters"
             for p in section.value}
    params = set(inspect.signature(jaxconv.packed.PackedConv.__init__).parameters) - {"self"}
    assert names == params


def test_training_loop_page_runs(capsys):
    """The complete NNX loop of docs/training.md: masked adder_scale, clipping, checkpoint."""
    text = (ROOT / "docs" / "training.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/training.md", "exec"), {"__name__": "docs_training"})
    out = capsys.readouterr().out
    assert "step 2: loss" in out and "restored: identical outputs" in out
    assert "adder" in out and "ste_sign" in out  # the summary

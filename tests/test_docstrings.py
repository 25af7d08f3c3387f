"""Every function in the package has a Google docstring (read from the source's AST).

The rule, for each ``def`` at module level or in a class body (functions nested in a function
are part of its body and documented by it):

* it has a docstring;
* if it takes arguments (other than ``self`` / ``cls``), the docstring has an ``Args:`` section
  that names each of them (``name:``, ``*name:``, ``**name:``, or several as ``a, b:``);
* if it also returns a value (a ``return`` with a value in its own body), the docstring has a
  ``Returns:`` (or ``Yields:``) section (a function of no arguments may say what it returns
  in its summary);
* exceptions to the ``Args:`` and ``Returns:`` rules, where they would only repeat what is
  written next to them: a tiny private helper (a leading underscore and a body of at most
  three lines) may be described by its one-line summary; ``__init__`` may leave its
  arguments, and so its docstring, to the class docstring's ``Args:`` (Google style); the
  other dunder methods but ``__call__`` implement a Python protocol; an engine's methods
  named as a method of the ``Engine`` protocol (``core/engine.py``) are documented there;
* a public function (one that ``jaxconv`` or a public submodule exports) shows an example.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pathlib
import re

import jaxconv

PACKAGE = pathlib.Path(jaxconv.__file__).resolve().parent
PUBLIC_MODULES = ("jaxconv", "jaxconv.ops", "jaxconv.quantizers", "jaxconv.optim",
                  "jaxconv.checkpoint", "jaxconv.packed", "jaxconv.prebuild", "jaxconv.nnx",
                  "jaxconv.linen")
TINY_LINES = 3


def _engine_protocol_methods() -> set[str]:
    """The method names of the ``Engine`` protocol."""
    tree = ast.parse((PACKAGE / "_src" / "core" / "engine.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Engine":
            return {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    raise AssertionError("core/engine.py defines no Engine class")


def _parameters(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[str]:
    """The names a docstring's Args must give: every parameter but self / cls."""
    a = fn.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    names += [p.arg for p in (a.vararg, a.kwarg) if p is not None]
    return [n for n in names if n not in ("self", "cls")]


def _args_names(doc: str) -> set[str] | None:
    """The names an ``Args:`` section documents, or None without one."""
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return None
    indent = None
    names: set[str] = set()
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break  # the next section
        if depth == indent:
            head = line.strip().split(":", 1)[0]
            head = re.sub(r"\s*\(.*\)$", "", head)  # "name (type)"
            names.update(n.strip().lstrip("*") for n in head.split(","))
    return names


def _returns_value(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """Whether ``fn``'s own body (not a nested function's) returns a value other than None."""
    stack = list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Return) and node.value is not None and not (
                isinstance(node.value, ast.Constant) and node.value.value is None):
            return True
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef,
                                 ast.Lambda)):
            stack.extend(ast.iter_child_nodes(node))
    return False


def _body_lines(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Source lines of the body, without the docstring."""
    body = fn.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return body[-1].end_lineno - body[0].lineno + 1


def _defs(tree: ast.Module):
    """(qualified name, def, enclosing class or None) of each module- and class-level def."""
    def walk(nodes, prefix, cls):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield prefix + node.name, node, cls
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body, f"{prefix}{node.name}.", node)
            elif isinstance(node, (ast.If, ast.Try)):  # defs under `if TYPE_CHECKING:` etc.
                yield from walk(node.body + node.orelse, prefix, cls)
    yield from walk(tree.body, "", None)


def module_problems(rel: str, source: str, protocol: set[str]) -> list[str]:
    """Each def of one module that breaks the rule, as ``rel::name: what is missing``."""
    out = []
    for name, fn, cls in _defs(ast.parse(source)):
        if fn.name == "__init__" and cls is not None and \
                _args_names(ast.get_docstring(cls) or "") is not None:
            continue
        doc = ast.get_docstring(fn)
        if not doc:
            out.append(f"{rel}::{name}: no docstring")
            continue
        params = _parameters(fn)
        if not params:
            continue
        if fn.name.startswith("__") and fn.name not in ("__init__", "__call__"):
            continue
        if cls is not None and fn.name in protocol and "/engines/" in rel:
            continue
        if fn.name.startswith("_") and not fn.name.startswith("__") and \
                _body_lines(fn) <= TINY_LINES:
            continue
        documented = _args_names(doc)
        if documented is None:
            out.append(f"{rel}::{name}: no Args section")
            continue
        missing = [p for p in params if p not in documented]
        if missing:
            out.append(f"{rel}::{name}: Args does not name {', '.join(missing)}")
        if _returns_value(fn) and not re.search(r"^\s*(Returns|Yields):\s*$", doc, re.MULTILINE):
            out.append(f"{rel}::{name}: no Returns section")
    return out


def problems() -> list[str]:
    """Each def of the package that breaks the rule, as ``path::name: what is missing``."""
    protocol = _engine_protocol_methods()
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).as_posix()
        out += module_problems(rel, path.read_text(), protocol)
    return out


def test_every_function_has_a_google_docstring() -> None:
    found = problems()
    assert not found, "\n".join(found)


def test_public_functions_show_an_example() -> None:
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        names = getattr(module, "__all__", None) or [n for n in dir(module)
                                                       if not n.startswith("_")]
        for name in names:
            obj = getattr(module, name)
            if inspect.isfunction(obj) and obj.__module__.startswith("jaxconv"):
                if "Example" not in (inspect.getdoc(obj) or ""):
                    missing.append(f"{module_name}.{name}")
    assert not missing, missing


def test_the_rule_sees_what_it_should() -> None:
    # The checker itself, on a small module: what it reports and what it lets pass.
    src = '''
def documented(a, *rest, **kw):
    """Sum.

    Args:
        a: one.
        *rest: more.
        **kw: options.
    """
def no_doc(a):
    return a
def no_args(a):
    """Summary only."""
    return a
def partial(a, b):
    """Partial.

    Args:
        a: one.

    Returns:
        a.
    """
    return a
def no_returns(a):
    """No Returns.

    Args:
        a: one.
    """
    def inner():
        return a
    if a:
        return a
    return None
def nothing(a):
    """Returns nothing of its own.

    Args:
        a: one.
    """
    def inner():
        return a
    return None
def _tiny(a):
    """Tiny private helper."""
    return a
class K:
    """A class.

    Args:
        v: the value.
    """
    def __init__(self, v):
        self.v = v
    def __repr__(self):
        """Text."""
        return "K"
'''
    names = {name: fn for name, fn, _ in _defs(ast.parse(src))}
    assert _args_names(ast.get_docstring(names["documented"])) == {"a", "rest", "kw"}
    assert _body_lines(names["_tiny"]) == 1 and _body_lines(names["partial"]) == 1
    assert module_problems("m.py", src, set()) == [
        "m.py::no_doc: no docstring", "m.py::no_args: no Args section",
        "m.py::partial: Args does not name b", "m.py::no_returns: no Returns section"]
    # An engine's protocol method is documented by the protocol; elsewhere it is not exempt.
    engine = 'class E:\n    """An engine."""\n    def forward(self, p):\n        """Run."""\n'
    assert module_problems("x/engines/e.py", engine, {"forward"}) == []
    assert module_problems("x/core/e.py", engine, {"forward"}) == [
        "x/core/e.py::E.forward: no Args section"]

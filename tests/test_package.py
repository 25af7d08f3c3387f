"""The package's surface: every public submodule is an attribute after ``import jaxconv``."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jaxconv

_ROOT = str(pathlib.Path(jaxconv.__file__).resolve().parents[1])


def _run(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([_ROOT, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, check=False, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_import_is_light_and_submodules_are_attributes() -> None:
    out = _run(
        "import sys, jaxconv\n"
        "print('flax' in sys.modules, 'optax' in sys.modules)\n"
        "jaxconv.optim.adder_scale; jaxconv.checkpoint.save\n"
        "for name in ('ops', 'nnx', 'linen', 'quantizers', 'optim', 'checkpoint', 'packed'):\n"
        "    assert getattr(jaxconv, name).__name__ == 'jaxconv.' + name, name\n"
        "print('flax' in sys.modules)\n"
    )
    assert out.split() == ["False", "False", "True"]


def test_every_builtin_op_is_public() -> None:
    import jaxconv

    assert set(jaxconv.ops.BUILTIN_OPS) <= set(jaxconv.ops.__all__)
    for name, op in jaxconv.ops.BUILTIN_OPS.items():
        assert getattr(jaxconv.ops, name) is op
    assert "max_times" in jaxconv.ops.__all__


def test_binary_is_declared_not_recognised() -> None:
    import jax.numpy as jnp

    import jaxconv
    from jaxconv import ops

    assert ops.xnor.binary and ops.xnor.replace(pad_value=1.0).binary
    assert not any(op.binary for name, op in ops.BUILTIN_OPS.items() if name != "xnor")
    # The same combine in a user op is not declared binary: packing is not guessed.
    assert not jaxconv.Op(ops.xnor.combine, "sum").binary
    assert not jaxconv.Op(lambda x, w: jnp.sign(x) * jnp.sign(w), "sum").binary


def test_lax_product_is_declared_not_recognised() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import pytest
    from jax import lax

    import jaxconv
    from jaxconv import ops

    assert ops.standard.lax_product
    assert not any(op.lax_product for name, op in ops.BUILTIN_OPS.items() if name != "standard")
    mine = ops.standard.replace(name="mine")
    declared = jaxconv.Op(ops.standard.combine, "sum", name="declared", lax_product=True)
    undeclared = jaxconv.Op(ops.standard.combine, "sum", name="standard", semiring=True,
                            combine_kind="mul", forward_mode=True)
    assert mine.lax_product and declared.lax_product and not undeclared.lax_product
    # The field takes part in equality like every other: the undeclared copy is not standard.
    assert undeclared != ops.standard and undeclared == ops.standard.replace(lax_product=False)
    # Changing the math drops the declaration, changing the name keeps it.
    for change in ({"pad_value": 1.0}, {"combine": jnp.multiply}, {"post": jnp.tanh}):
        assert not ops.standard.replace(**change).lax_product, change

    x = jax.random.normal(jax.random.key(0), (4, 3, 6))   # NCW, 4 = 2 batch groups x 2
    w = jax.random.normal(jax.random.key(1), (4, 3, 2))   # OIW
    want = lax.conv_general_dilated(x, w, (1,), "SAME", batch_group_count=2)
    for op in (mine, declared):  # batch groups: lax only, so lax itself is called
        got = jaxconv.conv_general_dilated(x, w, (1,), "SAME", batch_group_count=2, op=op)
        np.testing.assert_array_equal(got, want)
        jaxpr = jax.make_jaxpr(lambda a, b, op=op: jaxconv.dot_general(
            a, b, (((1,), (1,)), ((), ())), op=op))(x, w)
        assert [e.primitive.name for e in jaxpr.eqns] == ["dot_general"]
    for op in (undeclared, jaxconv.Op(jnp.multiply, "sum")):
        with pytest.raises(ValueError, match="batch_group_count"):
            jaxconv.conv_general_dilated(x, w, (1,), "SAME", batch_group_count=2, op=op)
    # Padding with 1 is not lax's product: the engines pad with ones.
    ones = ops.standard.replace(pad_value=1.0)
    got = jaxconv.conv_general_dilated(x, w, (1,), ((1, 0),), op=ones)
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 0)), constant_values=1.0)
    np.testing.assert_allclose(got, lax.conv_general_dilated(xp, w, (1,), "VALID"),
                               rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="lax_product"):
        jaxconv.Op(jnp.multiply, "max", lax_product=True)
    with pytest.raises(ValueError, match="lax_product"):
        jaxconv.Op(jnp.multiply, "sum", pad_value=0.0, lax_product=True)
    with pytest.raises(TypeError, match="lax_product"):
        jaxconv.Op(jnp.multiply, "sum", lax_product=1)


_OPS_MODULES = ("jaxconv.ops", "jaxconv._src.core.ops")


def _builtin_op_comparisons(source: str, builtins: set[str], *, defines: bool = False,
                            ) -> list[str]:
    """The comparisons (``is``, ``==``, ``in``, ...) in ``source`` that recognise a built-in
    op: an operand that names one (imported from the ops module, reached through it, or,
    with ``defines``, defined in ``source`` itself), a name attribute compared with a
    built-in's name, or a table keyed by built-in ops."""
    import ast

    tree = ast.parse(source)
    names = set(builtins) if defines else set()
    modules = set(_OPS_MODULES)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in _OPS_MODULES:
            names |= {a.asname or a.name for a in node.names if a.name in builtins}
        elif isinstance(node, ast.ImportFrom) and node.module in ("jaxconv", "jaxconv._src.core"):
            modules |= {a.asname or a.name for a in node.names if a.name == "ops"}
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.name in _OPS_MODULES and a.asname}

    def builtin(node: ast.AST) -> bool:
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(builtin(e) for e in node.elts)
        if isinstance(node, ast.Name):
            return node.id in names
        return (isinstance(node, ast.Attribute) and node.attr in builtins
                and ast.unparse(node.value) in modules)

    def by_name(operands: list[ast.AST]) -> bool:
        named = any(isinstance(e, ast.Attribute) and e.attr in ("name", "display_name")
                    for e in operands)
        return named and any(isinstance(e, ast.Constant) and e.value in builtins
                             for e in operands)

    return sorted(
        (f"line {node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
         if (isinstance(node, ast.Compare) and (
             any(builtin(e) for e in (node.left, *node.comparators))
             or by_name([node.left, *node.comparators])))
         or (isinstance(node, ast.Dict) and any(k is not None and builtin(k)
                                                for k in node.keys))),
        key=lambda f: int(f.split(":")[0].split()[1]))


def test_no_op_is_recognised_by_comparison_with_a_builtin() -> None:
    from jaxconv import ops

    builtins = set(ops.BUILTIN_OPS)
    # The checker finds what it looks for.
    sample = ("from jaxconv._src.core.ops import standard as s, xnor\n"
              "from jaxconv._src.core import ops as o\nimport jaxconv\n"
              "a = op is s or op == o.standard\nb = op in (xnor,)\n"
              "c = op != jaxconv.ops.adder\nd = op.name == 'xnor' or op.reduce == 'sum'\n"
              "e = {o.l1: 1}\n")
    found = _builtin_op_comparisons(sample, builtins)
    assert [f.split(":")[0] for f in found] == ["line 4", "line 4", "line 5", "line 6",
                                                "line 7", "line 8"], found

    src = pathlib.Path(jaxconv.__file__).parent
    bad = {}
    for path in sorted(src.rglob("*.py")):
        hits = _builtin_op_comparisons(path.read_text(), builtins,
                                       defines=path.name == "ops.py" and path.parent.name == "core")
        if hits:
            bad[str(path.relative_to(src))] = hits
    assert not bad, bad


def test_version_is_written_once() -> None:
    """`jaxconv/_src/version.py` holds the version; pyproject reads it from there and the
    installed metadata and `jaxconv.__version__` agree with it."""
    import importlib.metadata
    import tomllib

    from jaxconv._src import version

    root = pathlib.Path(_ROOT)
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    provider = meta["tool"]["scikit-build"]["metadata"]["version"]
    assert provider["input"] == "jaxconv/_src/version.py"
    assert jaxconv.__version__ == version.__version__
    assert importlib.metadata.version("jaxconv") == version.__version__


def _imports(path: pathlib.Path) -> list[str]:
    """The modules a source file imports (``from a import b`` gives ``a`` and ``a.b``)."""
    import ast

    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_the_internals_import_nothing_above_them() -> None:
    """Nothing in `jaxconv/_src` imports the package's face (`jaxconv`, its public modules),
    and one module, `engines/native/ffi.py`, imports the compiled extension."""
    src = pathlib.Path(_ROOT) / "jaxconv" / "_src"
    upward, extension = [], []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src).as_posix()
        for name in _imports(path):
            if name == "jaxconv._native":
                extension.append(rel)
            elif name == "jaxconv" or (name.startswith("jaxconv.")
                                       and not name.startswith("jaxconv._")):
                upward.append((rel, name))
    assert upward == []
    assert sorted(set(extension)) == ["engines/native/ffi.py"]

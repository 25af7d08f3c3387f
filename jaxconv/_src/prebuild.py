"""Compiling user ops' native kernels ahead of time (`compile_kernels`, ``python -m
jaxconv.prebuild``), e.g. once for a cluster's shared cache before many workers start."""

from __future__ import annotations

import argparse
import importlib
import os
import pathlib
import sys
from collections.abc import Iterable
from typing import NamedTuple

import numpy as np

from jaxconv._src.core import factoring
from jaxconv._src.core.algebra import Op


class KernelInfo(NamedTuple):
    """What `compile_kernels` did for one op.

    Attributes:
      op: the op.
      path: its compiled library in the kernel cache (``None``: it has none).
      compiled: whether it was compiled now (``False``: found in the cache, or none).
      reason: why it has no compiled kernel (``None`` when it has one).
      failed: whether the reason is a failed compile (no compiler, a compiler error).
    """

    op: Op
    path: pathlib.Path | None
    compiled: bool
    reason: str | None
    failed: bool


def compile_kernels(ops: Op | Iterable[Op]) -> list[KernelInfo]:
    """Compiles the native CPU kernels of user ops now, into the kernel cache.

    A user op's kernels are otherwise compiled at its first use on CPU (1.5-2 s each). Run
    this once, with ``JAXCONV_CACHE_DIR`` pointing at a directory every worker reads, before
    many processes start (the command line ``python -m jaxconv.prebuild`` does the same).
    Built-in ops, and ops that are not compiled (see `jaxconv.explain`), are reported, not
    refused.

    Args:
      ops: an `Op`, or an iterable of them.

    Returns:
      One `KernelInfo` per op, in order.

    Raises:
      TypeError: an element of `ops` is not a `jaxconv.Op`.

    Example:
      >>> import jax.numpy as jnp
      >>> import jaxconv
      >>> op = jaxconv.Op(lambda x, w: jnp.tanh(x - w), "max", name="tanh_max")
      >>> user, builtin = jaxconv.compile_kernels([op, jaxconv.ops.max_plus])
      >>> user.path.parent.name, builtin.reason
      ('kernels', "built-in kernel 'max_plus'")
    """
    items = [ops] if isinstance(ops, Op) else list(ops)
    for k, op in enumerate(items):
        if not isinstance(op, Op):
            raise TypeError(f"`ops`[{k}] must be a jaxconv.Op, got {type(op).__name__}")
    return [_compile_one(op) for op in items]


def _compile_one(op: Op) -> KernelInfo:
    """Compiles one op's native kernel (through the cache) and says what happened.

    Args:
        op: the op.

    Returns:
        Its `KernelInfo`: the library's path, whether it was compiled now, or why not.
    """
    from jaxconv._src.engines import native  # noqa: PLC0415 - loads the extension module
    from jaxconv._src.engines.native.translation import Refusal  # noqa: PLC0415

    if op.native is not None:
        return KernelInfo(op, None, False, f"built-in kernel {op.native!r}", False)
    form = factoring.factored_form(op, np.float32)
    inner = op if form is None else form.inner
    got = native.user_kernel(inner)
    if isinstance(got, Refusal):
        return KernelInfo(op, None, False, got.reason, got.compile_failed)
    return KernelInfo(op, got.path, got.compiled, None, False)


def _collect(value: object) -> list[Op]:
    """The ops in ``value``: itself, or those in a list, tuple or dict's values.

    Args:
        value: any value of a module.

    Returns:
        The ops found (none for any other value).
    """
    if isinstance(value, Op):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list | tuple):
        return [v for v in value if isinstance(v, Op)]
    return []


def _ops_of(target: str) -> list[Op]:
    """The ops a target names.

    Args:
        target: ``"module"`` (every op at its top level, also in lists, tuples and dicts) or
            ``"module:attr.path"``.

    Returns:
        The ops.

    Raises:
        ValueError: the attribute holds no op.
    """
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    if attr:
        value: object = module
        for part in attr.split("."):
            value = getattr(value, part)
        found = _collect(value)
        if not found:
            raise ValueError(f"{target} is not a jaxconv.Op or a list, tuple or dict of them")
        return found
    return [op for v in vars(module).values() for op in _collect(v)]


def main(argv: list[str] | None = None) -> int:
    """``python -m jaxconv.prebuild``: compiles the user ops found in modules.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0, or 1 when a compile failed or no op was found.

    Example:
      >>> import jaxconv.prebuild
      >>> jaxconv.prebuild.main(["jaxconv.ops:max_plus"])
      skipped   'max_plus': built-in kernel ...
      0
    """
    parser = argparse.ArgumentParser(
        prog="python -m jaxconv.prebuild",
        description="Compile the native CPU kernels of jaxconv user ops into the kernel cache "
                    "(JAXCONV_CACHE_DIR), e.g. once for a cluster's shared cache.")
    parser.add_argument("targets", nargs="+", metavar="MODULE[:NAME]",
                        help="a module whose top-level Ops (and lists, tuples, dicts of Ops) "
                             "are compiled, or one of its attributes")
    parser.add_argument("--cache-dir", help="sets JAXCONV_CACHE_DIR for this run")
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["JAXCONV_CACHE_DIR"] = args.cache_dir
    sys.path.insert(0, os.getcwd())
    ops = [op for target in args.targets for op in _ops_of(target)]
    if not ops:
        print("no jaxconv.Op found in " + ", ".join(args.targets), file=sys.stderr)
        return 1
    from jaxconv._src.engines.native import codegen  # noqa: PLC0415

    status = 0
    for info in compile_kernels(ops):
        name = codegen.display_name(info.op)
        if info.path is not None:
            print(f"{'compiled' if info.compiled else 'cached':9} {name!r}: {info.path}")
        else:
            print(f"{'FAILED' if info.failed else 'skipped':9} {name!r}: {info.reason}")
            status = status or int(info.failed)
    return status

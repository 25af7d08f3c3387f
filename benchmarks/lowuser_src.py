"""Writes a user op's generated sources for benchmarks/lowuser_1t.cc: its float32 library
(``f32.cc``: the forward, the low recording forward, float32's backward) and its wide float32
library (``wide.cc``: the low recorded backward), and ``build.sh``, which compiles both
against a checkout's ``csrc/`` with the flags the native engine uses for user ops on this
machine's instruction set (``build.sh CSRC OUTDIR``).

Example::

    python -m benchmarks.lowuser_src clip_max /tmp/u
    sh /tmp/u/build.sh csrc /tmp/u/new && sh /tmp/u/build.sh /tmp/old/csrc /tmp/u/old
"""

from __future__ import annotations

import pathlib
import sys

import numpy as np

from benchmarks.low_own import USER_OPS
from jaxconv._src.engines.native import codegen, ffi, user_kernels


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module's docstring).

    Args:
        argv: ``[op, directory]``; ``sys.argv[1:]`` by default.

    Returns:
        The exit status.
    """
    op_name, out = argv if argv is not None else sys.argv[1:]
    d = pathlib.Path(out)
    d.mkdir(parents=True, exist_ok=True)
    op = USER_OPS[op_name]
    (d / "f32.cc").write_text(codegen.functor(op, np.float32).source)
    (d / "wide.cc").write_text(codegen.functor(op, np.float32, wide=True).source)
    isa = ffi.isa()
    cxx = user_kernels.compiler()
    cmd = user_kernels._command(cxx, isa, pathlib.Path("SRC"), pathlib.Path("OUT"))
    flags = " ".join(a for a in cmd[1:] if not a.startswith("-I") and a not in ("SRC", "OUT", "-o"))
    (d / "build.sh").write_text(
        f'set -e\nmkdir -p "$2"\n'
        f'{cxx} {flags} -I"$1" {d}/f32.cc -o "$2/f32.so" &\n'
        f'{cxx} {flags} -I"$1" {d}/wide.cc -o "$2/wide.so"\nwait\n')
    print(f"{d}: f32.cc wide.cc build.sh ({isa})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""User ops compiled into the native CPU engine, at first use, and cached on disk.

`codegen.functor` writes an op's kernels as a C++ translation unit of the kernel template;
this module compiles it with the compiler and flags the package was built with, for the
instruction set the built-in kernels run here, into a shared library in a per-user cache:

- the cache directory is ``$JAXCONV_CACHE_DIR``, else ``$XDG_CACHE_HOME/jaxconv/kernels``,
  else ``~/.cache/jaxconv/kernels``; deleting it clears the cache;
- a library's name is a hash of (source, instruction set, compiler, flags, jaxconv version,
  ABI), so a second process, or a second run, loads it without compiling;
- processes that compile the same op at once serialize on a file lock; the library is written
  to a temporary name and renamed into place;
- ``$JAXCONV_CXX`` overrides the compiler.

The library is loaded once per process and its entry point registered with the extension
module under an op id derived from the same hash.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading
import time
from typing import Any

from jaxconv._src.engines import codegen

_lock = threading.Lock()
_loaded: dict[str, Any] = {}  # key -> ctypes library (kept alive for the process)


class CompileError(RuntimeError):
    """A user op could not be compiled (no compiler, or the compiler failed)."""


@dataclasses.dataclass(frozen=True)
class Kernel:
    """A compiled, registered user op.

    Attributes:
      op_id: the id the FFI calls pass (``csrc/problem.h``'s ``kUserBase`` and up).
      path: the shared library.
      compiled: whether this process compiled it (``False``: found in the cache).
      seconds: the time to compile (or load) it.
      functor: what was generated.
    """

    op_id: int
    path: pathlib.Path
    compiled: bool
    seconds: float
    functor: codegen.Functor


def cache_dir() -> pathlib.Path:
    """Where compiled user ops are kept (see the module docstring).

    Returns:
      The directory (not created).

    Example:
      >>> from jaxconv._src.engines import user_kernels
      >>> user_kernels.cache_dir().name
      'kernels'
    """
    env = os.environ.get("JAXCONV_CACHE_DIR")
    if env:
        return pathlib.Path(env) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxconv" / "kernels"


def _native() -> Any:
    from jaxconv import _native  # noqa: PLC0415 - only once the native engine is used

    return _native


def _package_files() -> pathlib.Path:
    return pathlib.Path(_native().__file__).parent / "_csrc"


@functools.cache
def _build_config() -> dict[str, Any]:
    path = _package_files() / "build_config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CompileError(f"the kernel headers are not installed ({path}: {e})") from None


def compiler() -> str | None:
    """The C++ compiler user ops are built with (``None``: none found).

    ``$JAXCONV_CXX``, else the one the package was built with, else ``c++`` / ``g++`` /
    ``clang++`` on the ``PATH``.
    """
    env = os.environ.get("JAXCONV_CXX")
    if env is not None:
        return shutil.which(env)
    try:
        built = _build_config().get("cxx")
    except CompileError:
        built = None
    if built and shutil.which(built):
        return built
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _command(cxx: str, isa: str, src: pathlib.Path, out: pathlib.Path) -> list[str]:
    cfg = _build_config()
    return [cxx, *cfg["flags"], *cfg["isa_flags"].get(isa, []), "-std=c++17", "-fPIC",
            "-shared", "-fvisibility=hidden", f"-I{_package_files()}", str(src), "-o", str(out)]


def _key(source: str, isa: str, cxx: str) -> str:
    from jaxconv import __version__  # noqa: PLC0415

    cfg = _build_config()
    text = json.dumps([source, isa, cxx, cfg["flags"], cfg["isa_flags"].get(isa, []),
                       __version__, int(_native().abi())])
    headers = b"".join((_package_files() / f).read_bytes() for f in cfg["headers"])
    return hashlib.sha256(text.encode() + headers).hexdigest()[:32]


@contextlib.contextmanager
def _file_lock(path: pathlib.Path):
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _compile(source: str, cxx: str, isa: str, lib: pathlib.Path) -> None:
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent, prefix=".build-") as tmp:
        src = pathlib.Path(tmp) / "op.cc"
        src.write_text(source)
        out = pathlib.Path(tmp) / lib.name
        proc = subprocess.run(_command(cxx, isa, src, out), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise CompileError(f"the C++ compiler ({cxx}) failed:\n{tail}")
        os.replace(out, lib)
        lib.with_suffix(".cc").write_text(source)


def _load(key: str, lib_path: pathlib.Path) -> int:
    """Loads the library (once per process), checks its ABI and registers it; the op id."""
    native = _native()
    op_id = int(native.user_base()) + int(key[:10], 16)
    with _lock:
        if key not in _loaded:
            lib = ctypes.CDLL(str(lib_path))
            lib.jaxconv_user_abi.restype = ctypes.c_int
            if lib.jaxconv_user_abi() != native.abi():
                raise CompileError(f"{lib_path} was built for another ABI")
            address = ctypes.cast(lib.jaxconv_user_run, ctypes.c_void_p).value
            native.register_user_kernel(op_id, address)
            _loaded[key] = lib
    return op_id


def build(functor: codegen.Functor) -> Kernel:
    """Compiles (or finds in the cache), loads and registers `functor`'s kernels.

    Args:
      functor: the generated source (`codegen.functor`).

    Returns:
      A `Kernel`.

    Raises:
      CompileError: no compiler was found, or it failed (the message has its output).
    """
    t0 = time.perf_counter()
    isa = str(_native().isa())
    cxx = compiler()
    if cxx is None:
        raise CompileError("no C++ compiler was found (set JAXCONV_CXX, or install g++ or "
                           "clang++)")
    key = _key(functor.source, isa, cxx)
    lib = cache_dir() / f"jaxconv_{key}.so"
    compiled = False
    if key not in _loaded and not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(lib.with_suffix(".lock")):
            if not lib.exists():  # another process may have built it meanwhile
                _compile(functor.source, cxx, isa, lib)
                compiled = True
    op_id = _load(key, lib)
    return Kernel(op_id, lib, compiled, time.perf_counter() - t0, functor)

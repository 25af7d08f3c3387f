"""User ops compiled into the native CPU engine, at first use, and cached on disk.

`codegen.functor` writes an op's kernels as a C++ translation unit of the kernel template;
this module compiles it with the compiler and flags the package was built with, for the
instruction set the built-in kernels run here, into a shared library in a per-user cache:

- the cache directory is ``$JAXCONV_CACHE_DIR/kernels``, else
  ``$XDG_CACHE_HOME/jaxconv/kernels``, else ``~/.cache/jaxconv/kernels``; deleting it clears
  the cache;
- a library's name is a hash of (source, instruction set, compiler, flags, jaxconv version,
  ABI), so a second process, or a second run, loads it without compiling;
- an entry is trusted only when the directory and every directory above it are owned by this
  user (or root) and not writable by others (a sticky directory such as ``/tmp`` excepted
  above it), and the entry's files too, as ssh treats its keys; otherwise kernels go to a
  private temporary directory for the process, with one warning saying why;
- an entry is verified before it is loaded: a record ``jaxconv_<key>.json`` (size and
  SHA-256 of the library), written only after a complete build, must match the library, or
  the entry is rebuilt (a damaged or truncated file is never loaded);
- a directory that cannot be created or written is used to read entries only; what it lacks
  is compiled into the private directory (one warning);
- processes that compile the same op at once serialize on a file lock; the library and its
  record are written to temporary names and renamed into place;
- ``$JAXCONV_CXX`` overrides the compiler; a compile at first use is logged at INFO level on
  the ``"jaxconv"`` logger, with the op's name and the library's path;
- ``$JAXCONV_USER_OPT`` (``-O0`` ... ``-O3``, ``-Os``) replaces the package's optimization
  flag for user ops (the test suite compiles its ops at ``-O1``, about half the compile time
  of ``-O3``): the flags keep ``-ffp-contract=off`` and no fast-math option, so every level
  computes the same IEEE operations in the same order, only slower (tests/test_user_kernels.py
  compares ``-O1`` with ``-O3`` bit for bit; GCC 12 at ``-O1`` once widened an AVX-512 mask
  with a 2-byte store read back as 4 bytes, which ``lane_bits`` in
  csrc/kernel_wide_lowwin.h now rules out); the flag is part of the cache key.

The library is loaded once per process and its entry point registered with the extension
module under an op id derived from the same hash.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import fcntl
import functools
import grp
import hashlib
import json
import logging
import os
import pathlib
import pwd
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

from jaxconv._src.core.algebra import Op
from jaxconv._src.engines.native import codegen, ffi, translation
from jaxconv._src.version import __version__

logger = logging.getLogger("jaxconv")

_lock = threading.Lock()
_dirs_lock = threading.Lock()  # one decision per directory, one private directory (threads)
_loaded: dict[str, tuple[Any, pathlib.Path]] = {}  # key -> (ctypes library, its path)
_MISSING = "missing"


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
      The directory asked for (not created, and not necessarily trusted: see `cache`).

    Example:
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.cache_dir().name
      'kernels'
    """
    env = os.environ.get("JAXCONV_CACHE_DIR")
    if env:
        return pathlib.Path(env) / "kernels"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "jaxconv" / "kernels"


@dataclasses.dataclass(frozen=True)
class Cache:
    """What this process may do with a cache directory.

    Attributes:
      path: the directory (symbolic links resolved when it exists).
      trusted: whether entries found there may be loaded.
      writable: whether new entries may be written there.
      reason: why it is not trusted, or not writable (``None``: it is both).
    """

    path: pathlib.Path
    trusted: bool
    writable: bool
    reason: str | None


def distrust(path: str | os.PathLike[str], *, directory: bool = False,
             sticky_ok: bool = False) -> str | None:
    """Why the file or directory `path` cannot be trusted with code (``None``: it can).

    Trusted means owned by this user or by root and writable by nobody else (a sticky
    directory, where others cannot rename or delete what is not theirs, with `sticky_ok`; a
    group of which this user is the only member and whose name is the user's counts as
    nobody else).

    Args:
      path: what to check (a symbolic link is itself refused).
      directory: whether it must be a directory (else a regular file).
      sticky_ok: accept a group- or world-writable directory with the sticky bit.

    Returns:
      ``None``, or the reason as text.

    Example:
      >>> import tempfile
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.distrust(tempfile.mkdtemp(), directory=True) is None
      True
    """
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{os.fspath(path)} is a symbolic link"
    if directory != stat.S_ISDIR(st.st_mode) or not (directory or stat.S_ISREG(st.st_mode)):
        return f"{os.fspath(path)} is not a {'directory' if directory else 'regular file'}"
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return (f"{os.fspath(path)} is owned by uid {st.st_uid}, not by this user ({uid}) "
                "or root")
    writers = st.st_mode & (0o002 if _private_group(st.st_gid) else 0o022)
    if writers and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        return (f"{os.fspath(path)} is writable by its group or others "
                f"(mode {stat.S_IMODE(st.st_mode):o})")
    return None


@functools.cache
def _private_group(gid: int) -> bool:
    """Whether `gid` is this user's own group (named after the user, no other member): the
    default of many Linux distributions, whose umask 002 makes files group-writable.

    Args:
        gid: a group id.

    Returns:
        True for such a group.
    """
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _tighten(path: pathlib.Path) -> None:
    """Takes the group and others' write permission off what this process created."""
    os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & ~0o022)


def _makedirs(path: pathlib.Path) -> None:
    """``mkdir -p`` that leaves the directories it creates writable by their owner only, so
    that a umask of 002 does not make the cache untrusted by its own rule.

    Args:
        path: the directory.
    """
    missing = []
    p = path
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            d.mkdir()
            _tighten(d)


def _writable(path: pathlib.Path) -> bool:
    """Whether this process can create a file in ``path`` (by trying).

    Args:
        path: the directory.

    Returns:
        True if a probe file could be created (and was removed).
    """
    # Permission bits say nothing for root or on a read-only mount: try.
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


@functools.cache
def cache(path: str) -> Cache:
    """Decides, once per process and directory, whether `path` is trusted and writable.

    Args:
      path: the cache directory asked for (`cache_dir`).

    Returns:
      A `Cache`.

    Example:
      >>> import tempfile
      >>> from jaxconv._src.engines.native import user_kernels
      >>> c = user_kernels.cache(tempfile.mkdtemp() + "/kernels")
      >>> c.trusted, c.writable
      (True, True)
    """
    asked = pathlib.Path(path)
    try:
        _makedirs(asked)
    except OSError as e:
        return Cache(asked, False, False, f"it cannot be created ({e.strerror or e})")
    real = pathlib.Path(os.path.realpath(asked))
    try:
        why = distrust(real, directory=True)
        for parent in real.parents:
            why = why or distrust(parent, directory=True, sticky_ok=True)
    except OSError as e:
        why = f"it cannot be inspected ({e.strerror or e})"
    if why is not None:
        return Cache(real, False, False, why)
    if not _writable(real):
        return Cache(real, True, False, "it is not writable")
    return Cache(real, True, True, None)


@functools.cache
def private_dir() -> pathlib.Path:
    """This process's own kernel directory (mode 700, removed at exit), made on first use.

    Returns:
      The directory.

    Example:
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.private_dir().is_dir()
      True
    """
    path = pathlib.Path(tempfile.mkdtemp(prefix="jaxconv-kernels-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@functools.cache
def _warn_private(asked: str, reason: str, private: str) -> None:
    """Warns once per reason that kernels go into a private directory instead of ``asked``.

    Args:
        asked: the cache directory asked for.
        reason: why it is not used.
        private: the directory used instead.
    """
    warnings.warn(f"jaxconv: the kernel cache {asked} is not used for new kernels ({reason}); "
                  f"user ops are compiled into {private}, for this process only (see the "
                  "README's 'Kernel cache').", RuntimeWarning, stacklevel=2)


def _package_files() -> pathlib.Path:
    """The kernel headers and build configuration installed with the extension."""
    return pathlib.Path(ffi.extension().__file__).parent / "_csrc"


@functools.cache
def _build_config() -> dict[str, Any]:
    """The compiler flags the extension was built with (``build_config.json``), read once.

    Returns:
        The configuration: ``flags``, ``isa_flags`` per instruction set, ``headers``.

    Raises:
        CompileError: the file is not installed.
    """
    path = _package_files() / "build_config.json"
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CompileError(f"the kernel headers are not installed ({path}: {e})") from None


def compiler() -> str | None:
    """The C++ compiler user ops are built with (``None``: none found).

    ``$JAXCONV_CXX``, else the one the package was built with, else ``c++`` / ``g++`` /
    ``clang++`` on the ``PATH``.

    Returns:
      The compiler's path, or ``None``.

    Example:
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.compiler() is None or isinstance(user_kernels.compiler(), str)
      True
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


_OPT_LEVELS = ("-O0", "-O1", "-O2", "-O3", "-Os")


def _flags() -> list[str]:
    """The compiler flags of user ops: the package's, its optimization flag replaced by
    ``$JAXCONV_USER_OPT`` when that is set.

    Returns:
        The flags (without the instruction set's).

    Raises:
        ValueError: ``$JAXCONV_USER_OPT`` is not one of ``-O0``, ``-O1``, ``-O2``, ``-O3``,
            ``-Os``.
    """
    flags = list(_build_config()["flags"])
    opt = os.environ.get("JAXCONV_USER_OPT")
    if opt is None or opt == "":
        return flags
    if opt not in _OPT_LEVELS:
        raise ValueError(f"JAXCONV_USER_OPT must be one of {', '.join(_OPT_LEVELS)}, got {opt!r}")
    return [opt, *(f for f in flags if not f.startswith("-O"))]


def _command(cxx: str, isa: str, src: pathlib.Path, out: pathlib.Path) -> list[str]:
    """The compiler's command line for one user kernel.

    Args:
        cxx: the compiler.
        isa: the instruction set built for.
        src: the source file.
        out: the library to write.

    Returns:
        The command.
    """
    cfg = _build_config()
    return [cxx, *_flags(), *cfg["isa_flags"].get(isa, []), "-std=c++17", "-fPIC",
            "-shared", "-fvisibility=hidden", f"-I{_package_files()}", str(src), "-o", str(out)]


def _key(source: str, isa: str, cxx: str) -> str:
    """The cache key of a kernel: its source, ISA, compiler, flags, version, ABI and headers.

    Args:
        source: the kernel's C++ source.
        isa: the instruction set.
        cxx: the compiler (``""`` for the compiler-independent key of a prebuilt kernel).

    Returns:
        32 hex digits.
    """
    cfg = _build_config()
    text = json.dumps([source, isa, cxx, _flags(), cfg["isa_flags"].get(isa, []),
                       __version__, int(ffi.extension().abi())])
    headers = b"".join((_package_files() / f).read_bytes() for f in cfg["headers"])
    return hashlib.sha256(text.encode() + headers).hexdigest()[:32]


@contextlib.contextmanager
def _file_lock(path: pathlib.Path) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    Args:
        path: the lock file.

    Yields:
        Nothing; the lock is held meanwhile.
    """
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _digest(path: pathlib.Path) -> tuple[int, str]:
    """The size and SHA-256 of a file, read through one descriptor (no symbolic link).

    Args:
        path: the file.

    Returns:
        ``(size, hex digest)``.
    """
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return size, h.hexdigest()


def verify(directory: pathlib.Path, key: str) -> str | None:
    """Why the entry `key` in `directory` must not be loaded (``None``: it may).

    Args:
      directory: a trusted cache directory.
      key: the entry's hash (`_key`).

    Returns:
      ``None``; ``"missing"`` when there is no library; else what is wrong with it.
    """
    lib = directory / f"jaxconv_{key}.so"
    record = directory / f"jaxconv_{key}.json"
    try:
        if not os.path.lexists(lib):
            return _MISSING
        why = distrust(lib) or (distrust(record) if os.path.lexists(record) else
                                "it has no record of a complete build")
        if why is not None:
            return why
        meta = json.loads(record.read_text())
        size, digest = _digest(lib)
    except (OSError, ValueError) as e:
        return f"it cannot be read ({e})"
    if not isinstance(meta, dict) or meta.get("key") != key:
        return "its record is not one of this entry"
    if meta.get("size") != size:
        return f"the library has {size} bytes where {meta.get('size')} were written"
    if meta.get("sha256") != digest:
        return "the library's SHA-256 differs from the one written"
    return None


def _compile(source: str, cxx: str, isa: str, directory: pathlib.Path, key: str) -> None:
    """Builds the entry `key` in temporary files and renames them into place, the record
    last; the caller holds the entry's lock.

    Args:
        source: the kernel's C++ source.
        cxx: the compiler.
        isa: the instruction set.
        directory: the cache directory.
        key: the entry's key.

    Raises:
        CompileError: the compiler failed.
    """
    stem = f"jaxconv_{key}"
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as tmp:
        src = pathlib.Path(tmp) / f"{stem}.cc"
        src.write_text(source)
        out = pathlib.Path(tmp) / f"{stem}.so"
        proc = subprocess.run(_command(cxx, isa, src, out), capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
            raise CompileError(f"the C++ compiler ({cxx}) failed:\n{tail}")
        size, digest = _digest(out)
        record = pathlib.Path(tmp) / f"{stem}.json"
        record.write_text(json.dumps({"key": key, "size": size, "sha256": digest,
                                      "any_compiler": _key(source, isa, "")}))
        for f in (src, out, record):
            _tighten(f)
        # No reader may pair the old record with the new library.
        (directory / record.name).unlink(missing_ok=True)
        os.replace(out, directory / out.name)
        os.replace(src, directory / src.name)
        os.replace(record, directory / record.name)


def _load(key: str, lib_path: pathlib.Path) -> int:
    """Loads the library (once per process), checks its ABI and registers it; the op id.

    Args:
        key: the entry's key.
        lib_path: the library.

    Returns:
        The op id its kernels are registered under.

    Raises:
        CompileError: it does not load or has another ABI.
    """
    native = ffi.extension()
    op_id = int(native.user_base()) + int(key[:10], 16)
    with _lock:
        if key not in _loaded:
            try:
                lib = ctypes.CDLL(str(lib_path))
                lib.jaxconv_user_abi.restype = ctypes.c_int
                abi = lib.jaxconv_user_abi()
                run = lib.jaxconv_user_run
            except (OSError, AttributeError) as e:
                raise CompileError(f"{lib_path} could not be loaded ({e})") from None
            if abi != native.abi():
                # Another layout of the kernels' call structures (problem.h kAbiVersion): a
                # cached entry under this key cannot hold one (the key hashes the ABI).
                raise CompileError(f"{lib_path} was built for another ABI ({abi}; this "
                                   f"jaxconv's is {native.abi()}): delete it to rebuild it")
            native.register_user_kernel(op_id, ctypes.cast(run, ctypes.c_void_p).value)
            _loaded[key] = (lib, lib_path)
    return op_id


def _build_in(directory: pathlib.Path, key: str, functor: codegen.Functor, cxx: str,
              isa: str) -> tuple[int, pathlib.Path, bool]:
    """Verifies, else (re)builds, and loads the entry `key` in a trusted writable directory.

    Args:
        directory: the cache directory.
        key: the entry's key.
        functor: the op's generated functor.
        cxx: the compiler.
        isa: the instruction set.

    Returns:
        ``(op id, library path, whether it was compiled now)``.
    """
    lib = directory / f"jaxconv_{key}.so"
    _makedirs(directory)  # it may have been deleted (the cache cleared) since `cache` saw it
    with _file_lock(directory / f"jaxconv_{key}.lock"):
        why = verify(directory, key)
        if why is not None:
            if why != _MISSING:
                logger.warning("jaxconv: the cached kernel %s is not loaded (%s); rebuilding "
                               "it", lib, why)
            logger.info("jaxconv: compiling the native kernels of op %r into %s (once; "
                        "later processes load them from there)", functor.name, lib)
            _compile(functor.source, cxx, isa, directory, key)
        op_id = _load(key, lib)
    return op_id, lib, why is not None


def _prebuilt(where: Cache, functor: codegen.Functor, isa: str) -> str | None:
    """Without a compiler: the key of a verified library of `functor` in a trusted cache that
    some compiler built (e.g. ``python -m jaxconv.prebuild`` on a machine that has one).

    Args:
        where: the cache.
        functor: the op's generated functor.
        isa: the instruction set.

    Returns:
        The entry's key, or ``None``.
    """
    if not where.trusted:
        return None
    want = _key(functor.source, isa, "")
    for record in sorted(where.path.glob("jaxconv_*.json")):
        try:
            meta = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(meta, dict):
            continue
        key = meta.get("key")
        if (meta.get("any_compiler") == want and isinstance(key, str)
                and record.name == f"jaxconv_{key}.json" and verify(where.path, key) is None):
            return key
    return None


def build(functor: codegen.Functor) -> Kernel:
    """Finds in the cache (verified) or compiles, loads and registers `functor`'s kernels.

    Args:
      functor: the generated source (`codegen.functor`).

    Returns:
      A `Kernel`.

    Without a compiler, a library of the same source that another compiler built into the
    cache (same flags, instruction set, jaxconv version) is loaded.

    Raises:
      CompileError: no compiler was found (and nothing pre-built), it failed (the message has
        its output), or no directory could hold the library.
    """
    t0 = time.perf_counter()
    isa = str(ffi.extension().isa())
    cxx = compiler()
    asked = cache_dir()
    with _dirs_lock:
        where = cache(str(asked))
    key = _key(functor.source, isa, cxx) if cxx is not None else _prebuilt(where, functor, isa)
    if key is None:
        raise CompileError("no C++ compiler was found (set JAXCONV_CXX, or install g++ or "
                           "clang++), and the kernel cache holds no pre-built library of it")
    if key in _loaded:
        op_id = _load(key, _loaded[key][1])
        return Kernel(op_id, _loaded[key][1], False, time.perf_counter() - t0, functor)
    try:
        if cxx is None:  # pre-built, verified by `_prebuilt`
            lib = where.path / f"jaxconv_{key}.so"
            op_id = _load(key, lib)
            return Kernel(op_id, lib, False, time.perf_counter() - t0, functor)
        if where.trusted and not where.writable and verify(where.path, key) is None:
            lib = where.path / f"jaxconv_{key}.so"
            op_id = _load(key, lib)
            return Kernel(op_id, lib, False, time.perf_counter() - t0, functor)
        if where.trusted and where.writable:
            directory = where.path
        else:
            with _dirs_lock:
                directory = private_dir()
            _warn_private(str(asked), str(where.reason), str(directory))
        op_id, lib, compiled = _build_in(directory, key, functor, cxx, isa)
    except OSError as e:
        raise CompileError(f"the kernel cache could not be used ({e})") from None
    return Kernel(op_id, lib, compiled, time.perf_counter() - t0, functor)


_built_lock = threading.Lock()
_built: dict[tuple[Op, str, bool], Kernel | translation.Refusal] = {}


def built(op: Op, dtype: str = "float32", wide: bool = False
          ) -> Kernel | translation.Refusal | None:
    """What compiling ``op``'s kernels gave, ``None`` if not tried yet.

    Read by the eligibility decision, which never compiles.

    Args:
      op: a user op.
      dtype: the dtype its kernels compute in (`translation.translation`).
      wide: float32 on the wide kernels (`translation.translation`).

    Returns:
      Its `Kernel`, the `translation.Refusal` saying why it has none, or ``None``.

    Example:
      >>> import jaxconv
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.built(jaxconv.Op(lambda x, w: x - w, "max", name="never_built"))
    """
    with _built_lock:
        return _built.get((op, dtype, wide))


def user_kernel(op: Op, dtype: str = "float32", wide: bool = False
                ) -> Kernel | translation.Refusal:
    """The compiled kernels of a user op, or why it has none (compiled once per op and
    dtype).

    Args:
      op: an op without a built-in kernel (``op.native is None``).
      dtype: the dtype its kernels compute in: ``"float32"`` (also for bfloat16 / float16
        operands), or the wide kernels' ``"float64"``, ``"int32"``, ``"int64"``.
      wide: float32 on the wide kernels: the winner backward of a max/min op on bfloat16 /
        float16 operands (`translation.translation`).

    Returns:
      A `Kernel`, or a `translation.Refusal` saying why the op is not compiled.

    Example:
      >>> import jaxconv
      >>> from jaxconv._src.engines.native import user_kernels
      >>> user_kernels.user_kernel(jaxconv.Op(lambda x, w: x * w, "sum")).reason
      'it is a multiply-and-add (a standard convolution is faster)'
    """
    key = (op, dtype, wide)
    with _built_lock:
        if key in _built:
            return _built[key]
    got = translation.translation(op, dtype, wide)
    if isinstance(got, translation.Refusal):
        return got
    if not ffi.available():
        return translation.Refusal(
            f"the native library could not be loaded ({ffi.load_error()})",
            compile_failed=False)
    try:
        out = build(got)
    except CompileError as e:
        out = translation.Refusal(f"it could not be compiled: {e}", compile_failed=True)
    with _built_lock:
        return _built.setdefault(key, out)

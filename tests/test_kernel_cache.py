"""The cache of compiled user kernels: damage, permissions, trust, hostile names, the first-use
log line and pre-building.

What could crash a process (loading a damaged library) runs in a fresh process; each case
checks the result against the XLA engine. Compiles take ~2 s, so the cases share one op: a
damaged entry is a copy of one library built once for the module.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pathlib
import pwd
import shutil
import stat
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
from subprocess_helpers import run_user_op

import jaxconv
from jaxconv._src.engines import native
from jaxconv._src.engines.native import codegen, ffi, user_kernels

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"native engine not built: {native.load_error()}")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _op(name="cache_op"):
    # Not factored (abs is not monotone), so this op itself is compiled.
    return jaxconv.Op(lambda x, w: jnp.abs(x - w) - jnp.minimum(x, w), "max", name=name)


def _run(cache, **env):
    return run_user_op(cache, "jnp.abs(x - w) - jnp.minimum(x, w)", "cache_op", **env)


def _key(functor, cxx=None):
    return user_kernels._key(functor.source, native.isa(), cxx or user_kernels.compiler())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One library of `_op`, compiled (not loaded) into a directory of its own: (dir, key)."""
    directory = tmp_path_factory.mktemp("template") / "kernels"
    directory.mkdir()
    functor = codegen.functor(_op())
    key = _key(functor)
    user_kernels._compile(functor.source, user_kernels.compiler(), native.isa(), directory,
                          key)
    return directory, key


def _entry(built, cache, cxx=None):
    """A copy of the built library in `cache`, as the entry a process with `cxx` looks up."""
    template, key = built
    new = _key(codegen.functor(_op()), shutil.which(cxx) if cxx else None)
    (cache / "kernels").mkdir()
    lib = cache / "kernels" / f"jaxconv_{new}.so"
    shutil.copy(template / f"jaxconv_{key}.so", lib)
    record = json.loads((template / f"jaxconv_{key}.json").read_text())
    lib.with_suffix(".json").write_text(json.dumps(dict(record, key=new)))
    assert user_kernels.verify(lib.parent, new) is None
    return lib, new


# --- 25.7: a damaged entry is rebuilt, never loaded -------------------------------------------

def _truncate(lib):
    with open(lib, "r+b") as f:
        f.truncate(1000)


def _empty(lib):
    lib.write_bytes(b"")


def _garbage(lib):
    lib.write_bytes(np.random.default_rng(0).bytes(lib.stat().st_size))


def _no_record(lib):
    lib.with_suffix(".json").unlink()


# What each damage leaves, as `verify` names it: any reason but "missing" makes the engine log
# a WARNING and rebuild the entry (`user_kernels._build_in`), whatever the reason.
DAMAGES = [(_truncate, "bytes where"), (_empty, "has 0 bytes"), (_garbage, "SHA-256 differs"),
           (_no_record, "no record of a complete build")]


@pytest.mark.parametrize("damage, why", DAMAGES)
def test_damaged_entry_is_not_verified(tmp_path, built, damage, why):
    """Every kind of damage is caught before a load (the rebuild that follows is the same for
    all of them: `test_damaged_entry_is_rebuilt_or_skipped` runs it in a fresh process)."""
    lib, key = _entry(built, tmp_path)
    damage(lib)
    assert why in user_kernels.verify(lib.parent, key)


# The rebuild in a fresh process, once with a compiler and once without: a garbage library of
# the right size (caught by its SHA-256 alone, the damage most likely to crash a load), and a
# truncated one where the rebuild fails.
@pytest.mark.parametrize("damage, cxx", [(_garbage, None), (_truncate, "false")])
def test_damaged_entry_is_rebuilt_or_skipped(tmp_path, built, damage, cxx):
    lib, key = _entry(built, tmp_path, cxx)
    damage(lib)
    out = _run(tmp_path, **({"JAXCONV_CXX": cxx} if cxx else {}))
    assert out["equal_to_xla"]
    if cxx is None:  # rebuilt in place, verified, loaded
        assert out["warnings"] == [] and out["compiled"] is True
        assert out["path"] == str(lib) and out["native_equal_to_xla"]
        assert user_kernels.verify(lib.parent, key) is None
        assert "rebuilding" in out["stderr"]  # the logger's WARNING, with the reason
        assert dict(DAMAGES)[damage] in out["stderr"]
    else:  # the rebuild fails: the promised warning under auto, an error under native
        (warning,) = out["warnings"]
        assert "cache_op" in warning and "XLA engine" in warning and "compiler" in warning
        assert "cache_op" in out["native_error"] and "compile" in out["native_error"]
        assert user_kernels.verify(lib.parent, key) is not None


@pytest.mark.parametrize("damage", [None, _truncate])
def test_without_a_compiler_a_prebuilt_library_loads(tmp_path, built, damage):
    """A worker with no compiler loads what a machine with one pre-built into the cache,
    only once verified."""
    lib, _ = _entry(built, tmp_path)
    if damage:
        damage(lib)
    out = _run(tmp_path, JAXCONV_CXX="/nonexistent/c++")
    assert out["equal_to_xla"]
    if damage is None:
        assert out["compiled"] is False and out["warnings"] == [] and out["path"] == str(lib)
        assert out["native_equal_to_xla"]
    else:
        (warning,) = out["warnings"]
        assert "no C++ compiler" in warning and "pre-built" in warning
        assert "cache_op" in out["native_error"]


def test_record_is_written_after_a_complete_build(built):
    directory, key = built
    lib = directory / f"jaxconv_{key}.so"
    record = json.loads(lib.with_suffix(".json").read_text())
    assert record["size"] == lib.stat().st_size and len(record["sha256"]) == 64
    assert user_kernels.verify(directory, key) is None
    assert user_kernels.verify(directory, "0" * 32) == "missing"
    assert not list(directory.glob(".build-*"))  # no temporary left
    for f in directory.iterdir():
        assert not f.stat().st_mode & 0o022, f  # written so that the trust rule accepts it


def test_entry_writable_by_others_or_of_another_owner_is_not_loaded(tmp_path, built):
    lib, key = _entry(built, tmp_path)
    os.chmod(lib, 0o666)
    assert "writable by its group or others" in user_kernels.verify(lib.parent, key)
    os.chmod(lib, 0o644)
    assert user_kernels.verify(lib.parent, key) is None
    if os.getuid() == 0:  # only root can give a file away
        os.chown(lib.with_suffix(".json"), 12345, -1)
        assert "owned by uid 12345" in user_kernels.verify(lib.parent, key)


# --- the ABI (csrc/problem.h kAbiVersion: the layout of Call, Geom and WideCall) ---------------

def test_another_abi_gives_another_key(monkeypatch):
    """The key hashes the extension's ABI: after a layout change, every kernel of the older
    ABI is looked up under a key no entry has, so it is rebuilt, never loaded."""
    functor = codegen.functor(_op())
    now = _key(functor)
    real = ffi.extension()

    class Older:
        def __getattr__(self, name):
            return getattr(real, name)

        def abi(self):
            return real.abi() - 1

    monkeypatch.setattr(ffi, "extension", Older)
    assert _key(functor) != now


def test_library_of_another_abi_is_never_run(tmp_path, built):
    """A verified entry whose library reports another ABI (`jaxconv_user_abi`) is refused at
    load, in a fresh process: "auto" warns and runs the XLA engine, "native" raises, both
    naming the ABI."""
    functor = codegen.functor(_op())
    source = functor.source.replace("return jaxconv::kAbiVersion;",
                                    "return jaxconv::kAbiVersion - 1;")
    assert source != functor.source
    (tmp_path / "kernels").mkdir()
    key = _key(functor)
    user_kernels._compile(source, user_kernels.compiler(), native.isa(), tmp_path / "kernels",
                          key)
    assert user_kernels.verify(tmp_path / "kernels", key) is None
    out = _run(tmp_path)
    assert out["equal_to_xla"]
    (warning,) = out["warnings"]
    assert "cache_op" in warning and "XLA engine" in warning and "another ABI" in warning
    assert "another ABI" in out["native_error"] and "delete it" in out["native_error"]


# --- 25.8 and 25.10: a directory that cannot be written or trusted ----------------------------

def _world_writable(tmp_path):
    os.chmod(tmp_path, 0o777)
    return tmp_path, "writable by its group or others"


def _under_a_file(tmp_path):
    (tmp_path / "file").write_text("")
    return tmp_path / "file" / "cache", "cannot be created"


def _parent_world_writable(tmp_path):
    (tmp_path / "shared").mkdir()
    os.chmod(tmp_path / "shared", 0o777)  # no sticky bit: others may rename what is inside
    (tmp_path / "shared" / "mine").mkdir(mode=0o755)
    return tmp_path / "shared" / "mine", "shared is writable by its group or others"


def test_unusable_directory_warns_once_and_compiles_privately(tmp_path):
    """In a fresh process: one warning with the reason, the op compiled into the process's
    private directory. What happens after `user_kernels.cache` said "not trusted / not
    writable" does not depend on the reason (`user_kernels.build`), so one directory runs it
    here; `test_trust_rule` checks the reason of each unusable directory."""
    asked, why = _world_writable(tmp_path)
    out = _run(asked)
    (warning,) = out["warnings"]
    assert why in warning and "for this process only" in warning
    assert out["compiled"] is True and out["equal_to_xla"] and out["native_equal_to_xla"]
    assert not out["path"].startswith(str(tmp_path))
    assert not list(tmp_path.rglob("*.so"))  # nothing was written where it is not trusted
    assert "compiling" not in out["stderr"]  # the first-use log line is INFO: silent


@pytest.mark.parametrize("where", [_world_writable, _under_a_file, _parent_world_writable])
def test_trust_rule(tmp_path, where):
    asked, why = where(tmp_path)
    got = user_kernels.cache(str(asked / "kernels"))
    assert not got.trusted and not got.writable and why in got.reason


def test_read_only_directory_is_read(tmp_path, monkeypatch):
    """A trusted directory this process cannot write (a pre-built cache on a read-only mount;
    root writes through permission bits, so the probe is what says no): its verified entries
    load, what it lacks is compiled privately, with one warning."""
    there = jaxconv.Op(lambda x, w: jnp.abs(x - w) + jnp.minimum(x, w), "max", name="ro_a")
    absent = jaxconv.Op(lambda x, w: jnp.abs(x - w) + jnp.maximum(x, w), "min", name="ro_b")
    directory = tmp_path / "kernels"
    directory.mkdir()
    functor = codegen.functor(there)
    user_kernels._compile(functor.source, user_kernels.compiler(), native.isa(), directory,
                          _key(functor))
    monkeypatch.setenv("JAXCONV_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(user_kernels, "_writable", lambda path: False)
    entries = sorted(directory.iterdir())
    got = user_kernels.build(functor)
    assert got.path.parent == directory and not got.compiled
    with pytest.warns(RuntimeWarning, match="not writable.*for this process only"):
        other = user_kernels.build(codegen.functor(absent))
    assert other.compiled and other.path.parent == user_kernels.private_dir()
    assert sorted(directory.iterdir()) == entries  # nothing written there


def test_trusted_directories():
    plain = user_kernels.cache(str(pathlib.Path(user_kernels.private_dir()) / "a" / "kernels"))
    assert plain.trusted and plain.writable and plain.reason is None
    for d in (plain.path, plain.path.parent):  # made writable by their owner only
        assert not d.stat().st_mode & 0o022


def test_group_writable_only_for_a_private_group(tmp_path):
    os.chmod(tmp_path, 0o770)
    group = grp.getgrgid(os.getgid())
    user = pwd.getpwuid(os.getuid()).pw_name
    private = group.gr_name == user and set(group.gr_mem) <= {user}
    assert (user_kernels.distrust(tmp_path, directory=True) is None) == private
    if os.getuid() == 0:  # root can hand the directory to a group of others
        os.chown(tmp_path, -1, 54321)
        assert "writable by its group" in user_kernels.distrust(tmp_path, directory=True)


def test_sticky_parent_and_links(tmp_path):
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp
    assert user_kernels.cache(str(sticky / "me" / "kernels")).trusted
    assert "writable" in user_kernels.distrust(sticky, directory=True)
    assert user_kernels.distrust(sticky, directory=True, sticky_ok=True) is None
    (tmp_path / "link").symlink_to(sticky)
    assert "symbolic link" in user_kernels.distrust(tmp_path / "link", directory=True)
    assert "not a directory" in user_kernels.distrust(__file__, directory=True)


# --- 25.9: nothing a user passes reaches the generated source ---------------------------------

HOSTILE = ["two\nlines", '*/ int x = 1; /*', 'a"b\\', "x\n#include </etc/passwd>\n",
           "}; extern \"C\" void f() {}  //"]


def test_name_never_reaches_the_source():
    want = codegen.functor(_op("plain")).source
    for name in HOSTILE:
        f = codegen.functor(_op(name))
        assert f.source == want and f.name == name
    assert codegen.functor(jaxconv.Op(lambda x, w: x - w, "max")).name.endswith("<lambda>")


@pytest.mark.parametrize("value", [0.1, -1e-45, 3.4028235e38, 1e39, -1e39, 2.0 ** -149,
                                   np.float32(7.25), True, float("nan"), float("-inf")])
def test_constants_are_exact_float32_literals(value):
    got = codegen.literal(value)
    with np.errstate(over="ignore"):  # 1e39 rounds to inf in float32, as the program does
        f32 = np.array([float(value)]).astype(np.float32)[0]
    if np.isnan(f32):
        assert got == '__builtin_nanf("")'
    elif np.isinf(f32):
        assert got == ("-" if f32 < 0 else "") + "__builtin_inff()"
    else:
        assert got.endswith("f") and np.float32(float.fromhex(got[:-1])) == f32


@pytest.mark.parametrize("name", HOSTILE[:2])
def test_hostile_name_compiles_and_runs(name):
    op = _op(name)
    x = np.linspace(-2, 2, 12, dtype=np.float32).reshape(3, 4)
    w = np.linspace(1, -1, 8, dtype=np.float32).reshape(4, 2)
    dn = (((1,), (0,)), ((), ()))
    got = jaxconv.dot_general(x, w, dn, op=op, engine="native")
    a, b = x[:, :, None], w[None]
    want = jnp.max(jnp.abs(a - b) - jnp.minimum(a, b), axis=1)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# --- 24.6: the first-use log line and pre-building --------------------------------------------

def test_compile_kernels_logs_once_and_fills_the_cache(caplog, monkeypatch, tmp_path):
    monkeypatch.setenv("JAXCONV_CACHE_DIR", str(tmp_path))
    # A combine no other test compiles, so that it is compiled here.
    op = jaxconv.Op(lambda x, w: jnp.abs(x - w) - jnp.maximum(x, w), "min", name="prebuilt_op")
    with caplog.at_level(logging.INFO, logger="jaxconv"):
        (info,) = jaxconv.compile_kernels([op])
        again = jaxconv.compile_kernels(op)
    records = [r for r in caplog.records if r.name == "jaxconv"]
    (record,) = records
    assert record.levelno == logging.INFO
    assert "'prebuilt_op'" in record.getMessage() and str(info.path) in record.getMessage()
    assert info.compiled and info.reason is None and not info.failed
    assert again[0].path == info.path
    assert user_kernels.verify(info.path.parent, info.path.stem.removeprefix("jaxconv_")) is None
    plan = jaxconv.explain(op, platform="cpu")
    assert any(str(info.path) in d for d in plan.details)


def test_compile_kernels_reports_what_it_does_not_compile():
    builtin, mult = jaxconv.compile_kernels(
        [jaxconv.ops.max_plus, jaxconv.Op(lambda x, w: x * w, "sum", name="mymult")])
    assert builtin.path is None and "built-in" in builtin.reason and not builtin.failed
    assert mult.path is None and "multiply-and-add" in mult.reason
    with pytest.raises(TypeError, match=r"`ops`\[1\] must be a jaxconv.Op"):
        jaxconv.compile_kernels([jaxconv.ops.max_plus, "max_plus"])


def test_prebuild_command_fills_a_shared_cache(tmp_path):
    (tmp_path / "my_ops.py").write_text(textwrap.dedent("""
        import jax.numpy as jnp
        import jaxconv
        OPS = [jaxconv.Op(lambda x, w: jnp.abs(x - w) - jnp.minimum(x, w), "max",
                          name="cache_op"),
               jaxconv.ops.max_plus]
    """))
    cache = tmp_path / "shared"
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    proc = subprocess.run([sys.executable, "-m", "jaxconv.prebuild", "my_ops:OPS",
                           "--cache-dir", str(cache)], env=env, capture_output=True, text=True,
                          cwd=tmp_path, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("compiled") and "'cache_op'" in lines[0]
    assert lines[1].startswith("skipped") and "built-in" in lines[1]
    out = _run(cache)  # a worker: loads the library, compiles nothing
    assert out["compiled"] is False and out["warnings"] == [] and out["equal_to_xla"]
    assert out["path"].startswith(str(cache))
    bad = subprocess.run([sys.executable, "-m", "jaxconv.prebuild", "json"], env=env,
                         capture_output=True, text=True, check=False, timeout=300)
    assert bad.returncode == 1 and "no jaxconv.Op" in bad.stderr


def test_private_directory_is_private():
    assert stat.S_IMODE(os.stat(user_kernels.private_dir()).st_mode) == 0o700

"""The AVX-512 kernels' hot loops keep their accumulators in registers (benchmarks/spill_check.py).

A structural check of the machine code, not a timing: the built AVX-512 kernel object is
disassembled and every checked function's innermost vector loops must hold no stack store
(beyond the few accepted in ``spill_check.KNOWN_SPILLS``). It is deterministic for one
compiler, flags and source: CI builds the extension with GCC 12 from a clean clone in the
checkout's ``build/`` folder (``pip install -e .``), where the object is. A second test
compiles a small register tile with and without an escaping pointer to its accumulators (the
pattern that once made the forward 2.3x slower) and checks that the detector tells them apart.
A third reads the wide kernel object's per-output loops that must not store to the stack at
all (``spill_check.STACK_FREE_KERNELS``).

x86-64 only: elsewhere there is no AVX-512 build to read.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks import spill_check

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="the AVX-512 kernels are built on x86-64 only",
)

AVX512 = ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-mavx2"]

# A 6 x 4 tile of AVX-512 max-plus accumulators over taps and kernel rows (fwd_tile's shape);
# with ESCAPE, a rarely taken call inside the row loop is handed a pointer to them.
TILE = r"""
#include <immintrin.h>
#include <cstdint>
__attribute__((noinline)) void sink(const __m512* a, float* out) {
  for (int v = 0; v < 4; ++v) _mm512_storeu_ps(out + 16 * v, a[v]);
}
extern "C" void tile(const float* const* x, const float* w, int64_t taps, int64_t n, float* y) {
  __m512 acc[6][4];
  for (int r = 0; r < 6; ++r)
    for (int v = 0; v < 4; ++v) acc[r][v] = _mm512_set1_ps(-1e30f);
  for (int64_t t = 0; t < taps; ++t) {
    const float* xt = x[t];
    for (int64_t i = 0; i < n; ++i) {
      __m512 wv[4];
      for (int v = 0; v < 4; ++v) wv[v] = _mm512_loadu_ps(w + (t * n + i) * 64 + 16 * v);
      for (int r = 0; r < 6; ++r) {
        const __m512 xb = _mm512_set1_ps(xt[r * n + i]);
        for (int v = 0; v < 4; ++v)
          acc[r][v] = _mm512_max_ps(acc[r][v], _mm512_add_ps(xb, wv[v]));
      }
#ifdef ESCAPE
      if (xt[i] != xt[i]) sink(acc[0], y);
#endif
    }
  }
  for (int r = 0; r < 6; ++r)
    for (int v = 0; v < 4; ++v) _mm512_storeu_ps(y + r * 64 + 16 * v, acc[r][v]);
}
"""


def test_built_avx512_kernels_do_not_spill():
    path = spill_check.find_object("avx512")
    assert path is not None, "no AVX-512 kernel object under build/ (pip install -e .)"
    funcs, problems = spill_check.check(spill_check.disassemble(path), "avx512")
    assert not problems, "\n".join(problems) + "\n" + spill_check.report(funcs)
    names = {f.name.split("<", 1)[0] for f in funcs}
    assert names == set(spill_check.HOT_KERNELS)


def test_built_low_recorded_scan_keeps_its_term_in_registers():
    # The bfloat16 / float16 recorded backward's loop over outputs (low_rec_usual): no value
    # carried from output to output on the stack (a call in that loop once put it there).
    path = spill_check.find_object("avx512", stem="wide")
    assert path is not None, "no AVX-512 wide kernel object under build/ (pip install -e .)"
    funcs, problems = spill_check.check_stack_free(spill_check.disassemble(path))
    assert not problems, "\n".join(problems) + "\n" + spill_check.report(funcs, verbose=True)
    assert all(f.loops for f in funcs) and funcs


@pytest.mark.parametrize("escape", [False, True])
def test_detector_sees_escaped_accumulators(tmp_path: Path, escape: bool):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx is not None, "the check's self-test needs a C++ compiler"
    src, obj = tmp_path / "tile.cc", tmp_path / "tile.o"
    src.write_text(TILE)
    flags = ["-O3", "-std=c++17", "-ffp-contract=off", *AVX512, *(["-DESCAPE"] * escape)]
    subprocess.run([cxx, *flags, "-c", str(src), "-o", str(obj)], check=True)
    fn = spill_check.measure("tile", spill_check.parse(spill_check.disassemble(str(obj)))["tile"])
    assert len(fn.hot_loops) == 1, spill_check.report([fn], verbose=True)
    if escape:
        assert fn.worst >= 24, spill_check.report([fn], verbose=True)  # every accumulator
    else:
        assert fn.worst == 0, spill_check.report([fn], verbose=True)

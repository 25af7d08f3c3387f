"""The exp-limited floor of ops whose every product term needs an exponential.

lax's convolution does one FMA per term; a logsumexp reduce of a combine that does not factor
(the seed op ``-(x - w)**2``, a smoothed max of ``x * w``) or a Gaussian ``exp(-(x - w)**2)``
under a sum needs one exponential per term in the forward and one more per term in the
backward (both gradients of a term come from one exponential: ``csrc/kernel_logsum.h``'s
backward, ``csrc/kernel_sums_heavy.h``). The peak probe's exp kinds
(``benchmarks/machine.py``, ``csrc/kernel_expfloor_probe.h``) measure how many such terms
per second this CPU does with the kernels' own exponentials and nothing else in the loop:
``exp2`` (``s += 2^(x L + w)``: the logsumexp kernels' term, ``csrc/simd_exp.h``) and
``exp`` (``s += exp(x - w)``: ``csrc/vmath.h``'s exp, which compiled user combines call).

For one row (an op timed against lax in the same paired run), with ``R_exp`` the probe's rate
of the row's kind and ``R_fma`` the FMA probe's rate, both at the row's thread count, and
``n`` the forward's product terms (`benchmarks.native.terms`):

- ``fraction`` = ``e n / t_op / R_exp``: the share of the exp-limited peak the op reaches,
  where ``e`` is the exponentials per term (1 forward, 2 forward+backward) and ``t_op`` the
  op's median time;
- ``floor`` = ``e n / R_exp / t_lax``: the ratio to lax (lax's median time ``t_lax`` in the
  same run) an op running at that peak would have: the best ratio this CPU allows, given how
  fast lax runs here (``fraction`` = ``floor`` / the op's ratio, up to the medians);
- ``floor_fma`` = ``e R_fma / (p R_exp)`` with ``p`` lax's FMA passes (1 forward, 3 forward
  and backward): the same bound against a lax running at the FMA probe's peak.

The probe times each thread in its own CPU time (other processes do not lower it) while the
ops are timed by wall clock: on a busy machine ``fraction`` reads low and ``floor`` high.

`loop_ops` counts what the compiled kernel's innermost loop spends per exponential (vector
instructions, and of them the FMAs and multiplies), from ``objdump`` of the kernel
(AVX-512 builds: each exponential there ends in one ``vscalefps``).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

from benchmarks import spill_check

# The zoo rows (benchmarks/user_zoo.py) bound by an exponential per term, and the probe kind
# of their kernels' exponential. Not x + w under logsumexp (op="log", the hand-written
# logaddexp, its twin): e^(x + w) = e^x e^w factors into one standard product of
# exponentials of the operands, no exponential per term (measured at 135% of "exp2").
EXP_BOUND = {"seed_myadd": "exp2", "softplus_max": "exp2", "gauss_sum": "exp"}
# The kernel functions whose innermost loops hold each pass's exponentials, per probe kind.
FUNCTIONS = {"exp2": ("lse_tile<", "lse_backward_ivec<"),
             "exp": ("fwd_tile<", "fused_sum_backward<")}
# FMAs and multiplies: the FMA ports' instructions (on Zen 4 the rest of an exponential --
# adds, max / min, compares, roundings, vscalefps -- runs on the add ports: the port
# micro-benchmark in docs/performance.md).
_FMA_PIPE = ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub", "vmul")
# Register moves, loads, stores and broadcasts: not operations on the data.
_MOVES = ("vmov", "vbroadcast", "vpbroadcast", "vzeroupper")


@dataclasses.dataclass(frozen=True)
class LoopOps:
    """One innermost loop's vector work per exponential.

    Attributes:
        exps: exponentials in the loop (``vscalefps``).
        vector_ops: vector instructions per exponential, moves and broadcasts left out.
        fma_pipe_ops: of those, FMAs and multiplies (the FMA ports').
    """

    exps: int
    vector_ops: float
    fma_pipe_ops: float


def loop_ops(library: str, function: str) -> LoopOps | None:
    """The first innermost loop (in address order: the source's order, so a logsumexp
    tile's one-pass loop before its two-pass fallback's) holding an exponential among the
    functions of ``library`` whose name contains ``function``, counted per exponential on
    its hot path (`_hot_path`);
    ``None`` without objdump, or where no loop holds one (an AVX2 / baseline build: no
    ``vscalefps``)."""
    try:
        funcs = spill_check.parse(spill_check.disassemble(library))
    except (OSError, ValueError):
        return None
    for name, insns in funcs.items():
        if function not in name:
            continue
        for loop in sorted(spill_check.innermost_loops(insns), key=lambda b: b[0].addr):
            body = _hot_path(loop)
            exps = sum(1 for i in body if i.mnemonic.startswith("vscalef"))
            if exps == 0:
                continue
            vec = [i for i in body if re.search(r"%[xyz]mm", i.operands)
                   and not i.mnemonic.startswith(_MOVES)]
            fma = [i for i in vec if i.mnemonic.startswith(_FMA_PIPE)]
            return LoopOps(exps, len(vec) / exps, len(fma) / exps)
    return None


def _hot_path(loop: list[Any]) -> list[Any]:
    """The instructions of a loop from its top to the jump back there: the path every
    iteration runs. Blocks GCC puts out of line (below the back edge: a logsumexp's rescale
    when a term exceeds its reference, rare) are left out."""
    top = min(i.addr for i in loop)
    back = [i.addr for i in loop if i.mnemonic.startswith("j")
            and re.match(rf"{top:x}\s", i.operands + " ")]
    if not back:
        return loop
    return [i for i in loop if i.addr <= max(back)]


def kernel_library(details: tuple[str, ...] | list[str], isa: str) -> str | None:
    """The library a call's kernels live in: the compiled user kernel named in
    ``jaxconv.explain(...).details``, else the built-in kernels' object of ``isa`` in this
    checkout's build folder (``None`` when neither is found)."""
    for d in details:
        m = re.search(r"compiled user kernel \([^)]*\): (\S+)", d)
        if m and os.path.exists(m.group(1)):
            return m.group(1)
    return spill_check.find_object(isa)


def columns(row: dict[str, Any], n_terms: int, peak: dict[str, dict[int, float]],
            threads: int, kind: str) -> dict[str, float]:
    """The floor columns of one timed row (``fwd_ms``, ``lax_fwd_ms`` and, when timed,
    ``fwd_bwd_ms``, ``lax_fwd_bwd_ms``; module docstring): ``exp_fraction``, ``exp_floor``,
    ``exp_floor_fma`` and their ``fwd_bwd`` counterparts; empty without the probe's rates.

    Example::

        >>> r = dict(fwd_ms=10.0, lax_fwd_ms=2.0)
        >>> columns(r, 10**9, {"exp2": {1: 200.0}, "fma": {1: 1000.0}}, 1, "exp2")
        {'exp_rate': 200.0, 'exp_fraction': 0.5, 'exp_floor': 2.5, 'exp_floor_fma': 5.0}
    """
    r_exp = peak.get(kind, {}).get(threads)
    r_fma = peak.get("fma", {}).get(threads)
    if not r_exp:
        return {}
    out = {"exp_rate": r_exp}
    for prefix, timed, exps, passes in (("", "fwd", 1, 1), ("fwd_bwd_", "fwd_bwd", 2, 3)):
        ms, lax_ms = row.get(f"{timed}_ms"), row.get(f"lax_{timed}_ms")
        if ms is None or lax_ms is None:
            continue
        floor_s = exps * n_terms / (r_exp * 1e9)
        out[f"{prefix}exp_fraction"] = floor_s / (ms * 1e-3)
        out[f"{prefix}exp_floor"] = floor_s / (lax_ms * 1e-3)
        if r_fma:
            out[f"{prefix}exp_floor_fma"] = exps * r_fma / (passes * r_exp)
    return out


def describe(row: dict[str, Any]) -> str:
    """The floor columns of a row as a second line (empty when the row has none)."""
    if "exp_fraction" not in row:
        return ""
    s = (f"    exp floor ({row['exp_kind']} {row['exp_rate']:.1f} G terms/s): fwd at "
         f"{row['exp_fraction']:.0%} of it, floor {row['exp_floor']:.2f}x lax "
         f"({row.get('exp_floor_fma', float('nan')):.2f}x an FMA-peak lax)")
    if "fwd_bwd_exp_fraction" in row:
        s += (f"; fwd+bwd at {row['fwd_bwd_exp_fraction']:.0%}, floor "
              f"{row['fwd_bwd_exp_floor']:.2f}x lax "
              f"({row.get('fwd_bwd_exp_floor_fma', float('nan')):.2f}x)")
    for p in ("fwd", "bwd"):
        ops = row.get(f"{p}_loop_ops")
        if ops:
            s += (f"; {p} loop {ops['vector_ops']:.1f} vector ops / exp "
                  f"({ops['fma_pipe_ops']:.1f} FMA / mul)")
    return s

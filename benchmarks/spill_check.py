"""Stack stores in the native kernels' hot loops: a structural check of the built code.

The forward's register tile keeps MR x NV accumulators in vector registers for a whole tap
(csrc/kernel_forward.h, ``tile_taps``). When GCC cannot keep them there -- a merge once passed
a pointer to the accumulator array to an out-of-line function next to the tile loop -- it
stores every accumulator to the stack and loads it back on every kernel row, and the forward
runs 2.3x slower with every result still right: no correctness test sees it. This check reads
the machine code instead.

It disassembles the built kernel object of one instruction set (``objdump -d``; the
extension itself is stripped, its objects in the build folder are not), finds each hot
function's natural loops from its control flow (a back edge ``u -> h`` where ``h`` dominates
``u``), keeps the innermost ones, and counts in each the stores to the stack frame (a memory
destination based on ``%rsp``, or on ``%rbp`` in a function that keeps a frame pointer), the
loads from it and the calls. A loop is *hot* when it is vector code: at least
`HOT_VECTOR_OPS` instructions on vector registers, and at least `HOT_VECTOR_SHARE` of its
instructions (a tile's loop over kernel rows: a load and a reduce per accumulator and little
else; the functions' other innermost loops -- copies, masks, the zero-sign fix at the tile's
end -- hold a handful, or mostly scalar code). A hot loop with a stack store is a spill,
unless `KNOWN_SPILLS` names the function with at least that many. A spilled accumulator
stays a vector instruction (a store and a load per row), so a spill never makes a loop cold.

Checked functions (`HOT_KERNELS`): the forward tiles (``fwd_tile``, each op, Safe, tile shape
and bcast choice that GCC keeps out of line), the recording forward's tiles (``convrec_tile``,
``dense_record_tile``), the dense backward's pass A (``dense_block_masks``), the winner scan
(``win_scan_rows``), the log-sum-exp tile (``lse_tile``) and backward (``lse_backward_ivec``),
the sums backward's paired passes and dx blocks (``pair_backward``,
``dense_pair_backward_mode``, ``dx_block``). The check
fails when one of them is missing from the object, or has no hot loop, so that it cannot pass
by finding nothing. Not checked:
the depthwise tile (``dw_tile``: a branch per row in its tap loop, mostly scalar code; 7 stack
stores per tap) and ``sum_backward`` (12 per step): both spill today, by their design.
``sum_backward``'s 12 are its kernel gradient's ragged loop (``dw_item``: output channels
short of a whole NR block or rows short of a block, its ``acc[v < nvec]`` and scalar tails
kept in stack arrays), not ``dw_block`` (the full blocks: none), and neither runs where the
paired pass serves (input channels whole vectors, both gradients: layer A's adder, l1).

The wide kernel object (``wide_<isa>.cc.o``) is read too, for `STACK_FREE_KERNELS`: loops
of mostly scalar code that must hold no stack store at all (the vector-share rule does not
apply to them).

Only the AVX-512 build is held to it (`CHECKED_ISAS`): AVX2 and the baseline have 16 vector
registers, and their tiles of ops with temporaries (adder, l1, l2, the safe max/min) spill by
design; ``--isa avx2`` / ``--isa base`` print the same table and exit 0.

Example::

    python -m benchmarks.spill_check                 # the AVX-512 object of the current build
    python -m benchmarks.spill_check --isa avx2 -v   # every innermost loop, hot or not
    python -m benchmarks.spill_check --object /tmp/scratch/kernels_avx512.o   # any object

Exit status: 0 clean, 1 spills (or a checked function missing), 2 no object or no objdump.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HOT_VECTOR_OPS = 12
"""Vector instructions (on ``%xmm``/``%ymm``/``%zmm`` registers) that a hot loop holds at
least: the smallest checked loop (``dx_block``) holds 13, the other innermost loops of the
checked functions at most 11 (AVX-512 build, GCC 12)."""

HOT_VECTOR_SHARE = 0.7
"""The share of a hot loop's instructions that are vector ones: 0.76 or more in the checked
loops; the AVX2 and baseline tiles' zero-sign fix-ups, which call out of line per output and
hold 27 to 61 vector instructions, 0.5 or less."""

HOT_KERNELS = (
    "fwd_tile",
    "convrec_tile",
    "dense_record_tile",
    "dense_block_masks",
    "win_scan_rows",
    "lse_tile",
    "lse_backward_ivec",
    "pair_backward",
    "dense_pair_backward_mode",
    "dx_block",
)
"""The functions checked, by the name of their template (each instantiation kept out of line
is checked on its own)."""

STACK_FREE_KERNELS = ("low_rec_usual",)
"""Functions of the wide kernel object (``wide_<isa>.cc.o``) none of whose innermost loops,
hot or not, may store to the stack: per-output loops of mostly scalar code that carry a
running value from output to output (``low_rec_usual``: the pending input gradient term of
the bfloat16 / float16 recorded backward, csrc/kernel_lowrec_backward.h). When such a loop
also held a call (a vector's push_back), GCC kept that value on the stack, a store and a load
per output, and the loop ran 1.4x the float32 one's time; the vector-share rule of hot loops
does not see it (the loop is mostly scalar)."""

STACK_FREE_KNOWN: dict[str, int] = {
    # y's bits (the bound's input) saved and reloaded within one output's iteration, beside
    # the bound's scratch registers (GCC 12, AVX-512; checked on bfloat16 max_plus): not a
    # value carried from output to output, which takes two stores of its own.
    # The bfloat16 bound's clamp at 2^-126 (kernel_wide_lowwin.h's bf16_inner, twelfth
    # session) adds scratch to the same iteration: 4-5 stores in the bfloat16 loops; measured
    # beside it (one thread, CPU time, layer A, 9 rounds), bfloat16 min_max / max_plus
    # forward+backward at 0.95x their float32 time, so no carried value went to the stack.
    "low_rec_usual<WideOp<0, 0>, WideGrad<0>, false, true, 1>": 5,
    "low_rec_usual<WideOp<0, 0>, WideGrad<0>, true, true, 1>": 5,
    "low_rec_usual<WideOp<0, 1>, WideGrad<1>, false, false, 1>": 4,
    "low_rec_usual<WideOp<0, 1>, WideGrad<1>, true, false, 1>": 4,
    "low_rec_usual<WideOp<1, 0>, WideGrad<2>, false, true, 2>": 2,
    "low_rec_usual<WideOp<1, 0>, WideGrad<2>, true, true, 2>": 2,
    "low_rec_usual<WideOp<2, 1>, WideGrad<3>, false, false, 2>": 2,
    "low_rec_usual<WideOp<2, 1>, WideGrad<3>, true, false, 2>": 2,
}
"""Stack stores accepted in `STACK_FREE_KERNELS`' innermost loops, per function."""

KNOWN_SPILLS: dict[str, dict[str, int]] = {
    # Adder's blend step on the default 6 x 4 tile (rows in the padding: a minority of taps)
    # needs 24 accumulators, 4 kernel vectors, x, a temporary and two constants: all 32 zmm
    # registers, and GCC 12 keeps two accumulators on the stack in that loop only. (Adder is
    # AdderOf<ClipNoNan>, csrc/kernel_ops.h: the clip is its backward's, the forward the same.)
    "avx512": {"fwd_tile<AdderOf<ClipNoNan>, false, 6, 4, false>": 2},
}
"""Spills measured and accepted, per instruction set: the function (its name as the report
prints it, without the clone suffix) and the most stack stores one of its hot loops may hold."""

CHECKED_ISAS = ("avx512",)
"""The instruction sets whose problems fail the check (see the module's docstring)."""

_STACK_READ_ONLY = (
    "cmp",
    "test",
    "bt",
    "ucomis",
    "comis",
    "vucomis",
    "vcomis",
    "vptest",
    "ptest",
    "prefetch",
    "ktest",
    "kortest",
)


@dataclasses.dataclass(frozen=True)
class Insn:
    """One instruction of the disassembly: its address, mnemonic and operand text."""

    addr: int
    mnemonic: str
    operands: str


@dataclasses.dataclass(frozen=True)
class Loop:
    """An innermost natural loop: where it starts and what its instructions do to the stack.

    Attributes:
        head: the address of the loop's header.
        size: its instructions.
        vector_ops: the instructions that name a vector register.
        stack_stores: stores to the stack frame.
        stack_loads: instructions that read the stack frame.
        calls: calls.
    """

    head: int
    size: int
    vector_ops: int
    stack_stores: int
    stack_loads: int
    calls: int

    @property
    def hot(self) -> bool:
        """Whether this is a tile's loop over kernel rows (see `HOT_VECTOR_OPS`)."""
        return self.vector_ops >= HOT_VECTOR_OPS and self.vector_ops >= HOT_VECTOR_SHARE * self.size


@dataclasses.dataclass(frozen=True)
class Function:
    """A checked function and its innermost loops."""

    name: str
    loops: tuple[Loop, ...]

    @property
    def hot_loops(self) -> tuple[Loop, ...]:
        """The loops that are the function's hot ones."""
        return tuple(lp for lp in self.loops if lp.hot)

    @property
    def worst(self) -> int:
        """The most stack stores in one hot loop."""
        return max((lp.stack_stores for lp in self.hot_loops), default=0)


def find_object(isa: str, repo: str = REPO, stem: str = "kernels") -> str | None:
    """The kernel object of one instruction set in the build folder of this checkout.

    scikit-build-core builds in ``build/<wheel tag>`` (pyproject.toml); with several tags
    there, the running interpreter's wins, then the newest.

    Args:
        isa: ``avx512``, ``avx2`` or ``base``.
        repo: the checkout.
        stem: ``kernels`` (the float32 kernels) or ``wide`` (the wide engine's kernels).

    Returns:
        The path of ``<stem>_<isa>.cc.o``, or None when there is none.
    """
    pattern = os.path.join(
        repo, "build", "*", "CMakeFiles", "_native.dir", "csrc", f"{stem}_{isa}.cc.o"
    )
    found = glob.glob(pattern)
    if not found:
        return None
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}-"
    return max(found, key=lambda p: (tag in p, os.path.getmtime(p)))


def disassemble(path: str) -> str:
    """``objdump -d`` of an object: demangled names, no raw bytes, one line per instruction.

    Raises:
        FileNotFoundError: objdump is not installed.
        subprocess.CalledProcessError: objdump failed on the file.
    """
    objdump = shutil.which("objdump")
    if objdump is None:
        raise FileNotFoundError("objdump (GNU binutils) is not on PATH")
    return subprocess.run(
        [objdump, "-d", "-C", "-w", "--no-show-raw-insn", path],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


_HEADER = re.compile(r"^[0-9a-f]+ <(.*)>:$")
_INSN = re.compile(r"^\s+([0-9a-f]+):\s+(\S+)\s*(.*)$")


def parse(text: str) -> dict[str, list[Insn]]:
    """The functions of a disassembly, by demangled name (``(anonymous namespace)::`` dropped).

    Example:
        >>> fn = parse("0000000000000000 <f>:\\n   0:\\tret\\n")
        >>> fn["f"][0].mnemonic
        'ret'
    """
    funcs: dict[str, list[Insn]] = {}
    cur: list[Insn] | None = None
    for line in text.splitlines():
        m = _HEADER.match(line)
        if m:
            cur = funcs.setdefault(m.group(1).replace("(anonymous namespace)::", ""), [])
            continue
        m = _INSN.match(line)
        if m and cur is not None:
            cur.append(Insn(int(m.group(1), 16), m.group(2), m.group(3)))
    return funcs


def _operands(text: str) -> list[str]:
    """The operands of an instruction (AT&T order: the destination last), without the
    disassembler's ``<symbol>`` and ``# comment`` tails."""
    text = text.split("#", 1)[0].split("<", 1)[0].strip()
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def _jump_target(insn: Insn) -> int | None:
    """The address a direct jump goes to, None for an indirect one or a non-jump."""
    if not insn.mnemonic.startswith("j"):
        return None
    m = re.match(r"([0-9a-f]+)\s", insn.operands + " ")
    return int(m.group(1), 16) if m else None


def _blocks(insns: Sequence[Insn]) -> tuple[list[list[Insn]], list[list[int]]]:
    """The function's basic blocks and each block's successors (indices)."""
    addrs = {ins.addr for ins in insns}
    leaders = {insns[0].addr}
    for i, ins in enumerate(insns):
        if ins.mnemonic.startswith(("j", "ret", "ud2")):
            t = _jump_target(ins)
            if t is not None and t in addrs:
                leaders.add(t)
            if i + 1 < len(insns):
                leaders.add(insns[i + 1].addr)
    blocks: list[list[Insn]] = []
    for ins in insns:
        if ins.addr in leaders:
            blocks.append([])
        blocks[-1].append(ins)
    index = {b[0].addr: i for i, b in enumerate(blocks)}
    succ: list[list[int]] = []
    for i, b in enumerate(blocks):
        last, out = b[-1], []
        t = _jump_target(last)
        if t is not None and t in index:
            out.append(index[t])
        falls = not last.mnemonic.startswith(("jmp", "ret", "ud2"))
        if falls and i + 1 < len(blocks):
            out.append(i + 1)
        succ.append(out)
    return blocks, succ


def _dominators(succ: Sequence[Sequence[int]]) -> list[set[int]]:
    """Each block's dominators (blocks not reachable from the entry: none)."""
    n = len(succ)
    pred: list[list[int]] = [[] for _ in range(n)]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    reach, stack = {0}, [0]
    while stack:
        for v in succ[stack.pop()]:
            if v not in reach:
                reach.add(v)
                stack.append(v)
    dom = [set(reach) if i in reach else set() for i in range(n)]
    dom[0] = {0}
    changed = True
    while changed:
        changed = False
        for v in sorted(reach - {0}):
            ps = [dom[p] for p in pred[v] if p in reach]
            new = set.intersection(*ps) | {v} if ps else {v}
            if new != dom[v]:
                dom[v], changed = new, True
    return dom


def innermost_loops(insns: Sequence[Insn]) -> list[list[Insn]]:
    """The instructions of each innermost natural loop of a function, in address order."""
    if not insns:
        return []
    blocks, succ = _blocks(insns)
    dom = _dominators(succ)
    pred: list[list[int]] = [[] for _ in blocks]
    for u, vs in enumerate(succ):
        for v in vs:
            pred[v].append(u)
    bodies: dict[int, set[int]] = {}
    for u, vs in enumerate(succ):
        for h in vs:
            if h in dom[u]:  # a back edge u -> h
                body, stack = bodies.setdefault(h, {h}), [u]
                while stack:
                    x = stack.pop()
                    if x not in body:
                        body.add(x)
                        stack.extend(pred[x])
    inner = [h for h, body in bodies.items() if not any(g != h and g in body for g in bodies)]
    return [[ins for i in sorted(bodies[h]) for ins in blocks[i]] for h in sorted(inner)]


def _stack_base(insns: Sequence[Insn]) -> re.Pattern[str]:
    """What addresses the stack frame in a function: ``%rsp``, and ``%rbp`` when the prologue
    makes it the frame pointer (otherwise it is a register like any other)."""
    frame = any(i.mnemonic == "mov" and i.operands.strip() == "%rsp,%rbp" for i in insns[:16])
    return re.compile(r"\(%rsp[,)]|\(%rbp[,)]" if frame else r"\(%rsp[,)]")


def measure(name: str, insns: Sequence[Insn]) -> Function:
    """The innermost loops of one function and their stack traffic."""
    stack = _stack_base(insns)
    loops = []
    for body in innermost_loops(insns):
        stores = loads = vec = calls = 0
        for ins in body:
            ops = _operands(ins.operands)
            if ins.mnemonic.startswith("call"):
                calls += 1
                continue
            vec += any(r in ins.operands for r in ("%xmm", "%ymm", "%zmm"))
            if not ops:
                continue
            if stack.search(ops[-1]) and not ins.mnemonic.startswith(_STACK_READ_ONLY):
                stores += 1
            if any(stack.search(o) for o in ops[:-1]) or (
                stack.search(ops[-1]) and ins.mnemonic.startswith(_STACK_READ_ONLY)
            ):
                loads += 1
        loops.append(Loop(body[0].addr, len(body), vec, stores, loads, calls))
    return Function(name, tuple(loops))


def short_name(name: str) -> str:
    """A function's name without its parameter list and clone suffix:
    ``void fwd_tile<Adder, false, 6, 4, false>(Ctx const&, ...) [clone .constprop.0]`` ->
    ``fwd_tile<Adder, false, 6, 4, false>``."""
    name = re.sub(r" \[clone [^]]*\]", "", name)
    for ret in ("void ", "bool "):
        if name.startswith(ret):
            name = name[len(ret) :]
    depth = 0
    for i, ch in enumerate(name):
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0:
            return name[:i]
    return name


def _instantiations(parsed: dict, kernel: str, problems: list[str]) -> list[str]:
    """The names of a template's instantiations in a parsed object (its cold clones aside),
    sorted; none adds a problem.

    Args:
        parsed: `parse`'s functions by name.
        kernel: the template's name.
        problems: where a missing template is reported.

    Returns:
        The instantiations' names.
    """
    names = sorted(
        n for n in parsed if short_name(n).startswith(kernel + "<") and "[clone .cold]" not in n
    )
    if not names:
        problems.append(f"{kernel}: no instantiation in the object")
    return names


def check(
    text: str, isa: str, kernels: Iterable[str] = HOT_KERNELS
) -> tuple[list[Function], list[str]]:
    """Measures the hot kernels of a disassembly and lists what is wrong.

    Args:
        text: ``objdump -d -C`` output.
        isa: the instruction set, for `KNOWN_SPILLS`.
        kernels: the template names to check.

    Returns:
        The measured functions and the problems (empty: clean).
    """
    known = KNOWN_SPILLS.get(isa, {})
    funcs, problems = [], []
    parsed = parse(text)
    for kernel in kernels:
        for n in _instantiations(parsed, kernel, problems):
            fn = measure(short_name(n), parsed[n])
            funcs.append(fn)
            if not fn.hot_loops:
                problems.append(f"{fn.name}: no hot loop found")
            elif fn.worst > known.get(fn.name, 0):
                problems.append(
                    f"{fn.name}: {fn.worst} stack stores in a hot loop"
                    f" (accepted: {known.get(fn.name, 0)})"
                )
    return funcs, problems


def check_stack_free(
    text: str, kernels: Iterable[str] = STACK_FREE_KERNELS
) -> tuple[list[Function], list[str]]:
    """Measures functions none of whose innermost loops may store to the stack.

    Args:
        text: ``objdump -d -C`` output (of the wide kernel object).
        kernels: the template names to check (`STACK_FREE_KERNELS`).

    Returns:
        The measured functions and the problems (empty: clean).
    """
    funcs, problems = [], []
    # The wide kernels live in a namespace per instruction set (jaxconv_wide_avx512::...).
    parsed = {re.sub(r"\bjaxconv_wide_\w+::", "", n): v for n, v in parse(text).items()}
    for kernel in kernels:
        for n in _instantiations(parsed, kernel, problems):
            fn = measure(short_name(n), parsed[n])
            funcs.append(fn)
            if not fn.loops:
                problems.append(f"{fn.name}: no loop found")
            worst = max((lp.stack_stores for lp in fn.loops), default=0)
            if worst > STACK_FREE_KNOWN.get(fn.name, 0):
                problems.append(
                    f"{fn.name}: {worst} stack stores in an innermost loop"
                    f" (accepted: {STACK_FREE_KNOWN.get(fn.name, 0)})"
                )
    return funcs, problems


def report(funcs: Sequence[Function], verbose: bool = False) -> str:
    """One line per function (its hot loops as size/vector ops/stores/loads/calls), and with
    `verbose` every innermost loop."""
    lines = []
    for fn in funcs:
        shown = fn.loops if verbose else fn.hot_loops
        cells = " ".join(
            f"{'*' if lp.hot else ''}@{lp.head:x}:{lp.size}/{lp.vector_ops}/"
            f"{lp.stack_stores}/{lp.stack_loads}/{lp.calls}"
            for lp in shown
        )
        lines.append(f"{fn.worst:3d}  {fn.name}  {cells}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the check from the command line (see the module's docstring)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument(
        "--isa",
        default="avx512",
        choices=("avx512", "avx2", "base"),
        help="whose kernel object to read (default avx512)",
    )
    ap.add_argument("--object", help="the object file to read (default: this checkout's build)")
    ap.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="print every innermost loop, not only the hot ones",
    )
    args = ap.parse_args(argv)
    path = args.object or find_object(args.isa)
    if path is None:
        print(
            f"spill_check: no kernels_{args.isa}.cc.o under {REPO}/build (build the "
            "extension first: pip install -e .)",
            file=sys.stderr,
        )
        return 2
    try:
        text = disassemble(path)
    except (FileNotFoundError, subprocess.CalledProcessError) as e:
        print(f"spill_check: {e}", file=sys.stderr)
        return 2
    funcs, problems = check(text, args.isa)
    wide = None if args.object else find_object(args.isa, stem="wide")
    if wide is not None:
        try:
            wfuncs, wproblems = check_stack_free(disassemble(wide))
        except (FileNotFoundError, subprocess.CalledProcessError) as e:
            print(f"spill_check: {e}", file=sys.stderr)
            return 2
        print(f"# {wide}: every innermost loop of {', '.join(STACK_FREE_KERNELS)}")
        print(report(wfuncs, verbose=True))
        problems += wproblems
    print(f"# {path}")
    print(
        "# worst  function  hot loops as @head:instructions/vector ops/stack stores/"
        "stack loads/calls"
    )
    print(report(funcs, args.verbose))
    hot = sum(len(f.hot_loops) for f in funcs)
    print(f"# {len(funcs)} functions, {hot} hot loops, {len(problems)} problems")
    strict = args.isa in CHECKED_ISAS
    for p in problems:
        print(f"{'SPILL' if strict else 'note (not checked on ' + args.isa + ')'} {p}")
    return 1 if problems and strict else 0


if __name__ == "__main__":
    sys.exit(main())

"""Dense max-plus / min-plus against the peer tropical-gemm, forward and forward+backward.

One process, paired and interleaved (`benchmarks.timing.paired`): each round times jaxconv's
product (``jaxconv.dot_general`` on the native engine, jitted) and tropical-gemm's on the same
float32 operands, alternately. The ratio is tropical-gemm's time over jaxconv's, so above 1
means jaxconv is faster ("x the peer's speed"). Forward+backward is both gradients of a dense
product for a cotangent of ones: ``jax.vjp`` for jaxconv; for tropical-gemm its argmax forward
(``*_matmul_with_argmax``) and its two scatter backwards (``backward_a`` / ``backward_b``).
Each line also gives lax.dot's forward and forward+backward times from the same run.

tropical-gemm is an optional, benchmark-only package (``pip install tropical-gemm==0.4.0``);
without it only the lax columns are printed.

Example::

    python -m benchmarks.dense_peer --rounds 7
    python -m benchmarks.dense_peer --shape 256,1024,1024 --ops max_plus --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import jaxconv
from benchmarks import machine, timing
from benchmarks.native import fwd_bwd

# jaxconv's op and tropical-gemm's function stem.
PEER_STEMS = {"max_plus": "maxplus", "min_plus": "minplus"}
DN = (((1,), (0,)), ((), ()))


def tropical_gemm() -> Any | None:
    """The optional peer package, or ``None`` when it is not installed."""
    try:
        import tropical_gemm as tg  # noqa: PLC0415 - optional
    except ImportError:
        return None
    return tg


def peer(tg: Any, op: str, m: int, k: int, n: int) -> tuple[Callable, Callable]:
    """tropical-gemm's forward and forward+backward (argmax forward, both scatters) of an
    ``(m, k) @ (k, n)`` product, on numpy float32 arrays.

    Example::

        fwd, both = peer(tropical_gemm(), "max_plus", 4, 8, 2)  # doctest: +SKIP
    """
    stem = PEER_STEMS[op]
    fwd = getattr(tg, f"{stem}_matmul")
    with_argmax = getattr(tg, f"{stem}_matmul_with_argmax")
    ct = np.ones((m, n), np.float32)

    def both(a: np.ndarray, b: np.ndarray) -> Any:
        c, arg = with_argmax(a, b)
        arg = arg.reshape(m, n)
        return c, tg.backward_a(ct, arg, k), tg.backward_b(ct, arg, k)

    return fwd, both


def ours(op: str | None) -> Callable[[Any, Any], Any]:
    """jaxconv's dense product with ``op`` (lax.dot when ``op`` is None)."""
    if op is None:
        return lambda x, w: lax.dot_general(x, w, DN)
    return lambda x, w: jaxconv.dot_general(x, w, DN, op=op, engine="native")


def run(shape: tuple[int, int, int], ops: list[str], rounds: int, out: Any = None) -> list[dict]:
    """Times each op against lax.dot and (when installed) tropical-gemm; one line per op."""
    out = sys.stdout if out is None else out
    m, k, n = shape
    rng = np.random.default_rng(0)
    xn = rng.standard_normal((m, k)).astype(np.float32)
    wn = rng.standard_normal((k, n)).astype(np.float32)
    x, w = jnp.asarray(xn), jnp.asarray(wn)
    ct = jnp.ones((m, n), jnp.float32)
    tg = tropical_gemm()
    lax_f, lax_fb = jax.jit(ours(None)), jax.jit(fwd_bwd(ours(None), ct))
    rows = []
    for op in ops:
        f = jax.jit(ours(op))
        fb = jax.jit(fwd_bwd(ours(op), ct))
        row: dict[str, Any] = dict(op=op, shape=shape)
        r = timing.paired(lax_f, f, (x, w), rounds=rounds, warmup=2)
        row.update(fwd_ms=r.ms, lax_fwd_ms=r.ref_ms, fwd_lax=r.ratio)
        r = timing.paired(lax_fb, fb, (x, w), rounds=rounds, warmup=2)
        row.update(fb_ms=r.ms, lax_fb_ms=r.ref_ms, fb_lax=r.ratio)
        if tg is not None:
            pf, pfb = peer(tg, op, m, k, n)
            r = _paired_mixed(pf, (xn, wn), f, (x, w), rounds)
            row.update(peer_fwd_ms=r[1], peer_fwd_speed=r[0])
            r = _paired_mixed(pfb, (xn, wn), fb, (x, w), rounds)
            row.update(peer_fb_ms=r[1], peer_fb_speed=r[0])
        rows.append(row)
        print(_format(row), file=out, flush=True)
    return rows


def _paired_mixed(peer_fn: Callable, peer_args: tuple, fn: Callable, args: tuple,
                  rounds: int) -> tuple[float, float]:
    """(median of the rounds' peer / jaxconv time ratios, the peer's median ms): paired and
    interleaved as `timing.paired`, each side on its own arguments (numpy for the peer)."""
    r = timing.paired(lambda: peer_fn(*peer_args), lambda: fn(*args), (), rounds=rounds,
                      warmup=2)
    # paired's ratio is ours / peer's per round; its median inverted is the peer / ours median.
    return 1.0 / r.ratio, r.ref_ms


def _format(r: dict) -> str:
    s = (f"{r['op']:>9} {'x'.join(map(str, r['shape']))}: fwd {r['fwd_ms']:7.2f} ms "
         f"({r['fwd_lax']:.2f}x lax.dot {r['lax_fwd_ms']:.2f}), fwd+bwd {r['fb_ms']:7.2f} ms "
         f"({r['fb_lax']:.2f}x lax {r['lax_fb_ms']:.2f})")
    if "peer_fwd_speed" in r:
        s += (f" | tropical-gemm fwd {r['peer_fwd_ms']:7.2f} ms: jaxconv {r['peer_fwd_speed']:.2f}x"
              f" its speed; fwd+bwd {r['peer_fb_ms']:7.2f} ms: {r['peer_fb_speed']:.2f}x")
    else:
        s += " | tropical-gemm not installed"
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="256,1024,1024", help="M,K,N of (M, K) @ (K, N)")
    p.add_argument("--ops", default="max_plus,min_plus")
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    shape = tuple(int(s) for s in a.shape.split(","))
    ops = [o for o in a.ops.split(",") if o]
    bad = [o for o in ops if o not in PEER_STEMS]
    if len(shape) != 3 or bad:
        p.error(f"--shape needs M,K,N; --ops from {sorted(PEER_STEMS)} (got {bad})")
    meta = machine.info()
    print(machine.describe(meta))
    print(f"# load {os.getloadavg()[0]:.2f}; jax {jax.__version__}; {a.rounds} paired rounds; "
          f"tropical-gemm {'present' if tropical_gemm() else 'absent'}", flush=True)
    run(shape, ops, a.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

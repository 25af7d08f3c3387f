"""Differential fuzzing of jaxconv: native engine against XLA engine against numpy loops.

Not part of CI (pytest collects ``test_*.py`` only). Run it by hand, one process::

    python tests/fuzz.py --minutes 30              # float32 / bf16 / f16 / int32
    python tests/fuzz.py --minutes 10 --x64        # adds float64 / int64 (jax_enable_x64)
    python tests/fuzz.py --replay 1234 [--x64]     # rerun one example, with a traceback

Each example is drawn from its own seed (``--seed`` + index), so a failure's seed is its
reproducer. An example draws:

- a product: ``conv_general_dilated`` (1-3 spatial dims, random ``dimension_numbers``,
  strides, both dilations, string / explicit / negative padding, feature groups up to
  depthwise), ``dot_general`` (batch dims, any dimension order) or ``einsum``; sizes small (as
  ``tests/test_properties.py``) or wide (channels 15/16/17/31/33/63/65, larger images and
  dense operands, where the native kernels' vector tails and XLA CPU's multithreaded and
  YNNPACK-fused reductions run);
- an op: every built-in generic op of ``jaxconv.ops`` (some with a ``pad_value``) and user
  ``jaxconv.Op``s under ``sum``, ``max``, ``min``, ``logsumexp`` and callable reduces;
- a dtype: float32, bfloat16, float16, int32 (ops that take integers); float64 / int64
  with ``--x64``;
- data: normal, centred far from 0, small integers (many ties), NaN / +-inf sprinkled,
  signed zeros with denormals and values near the smallest normal, huge magnitudes;
- a transform: forward, ``jax.grad`` (a random cotangent), ``jax.jvp`` (under ``jit``),
  ``jax.vmap`` over x or over x and w, or ``vmap`` of ``grad`` (per-example gradients).

Extras, drawn from a second stream of the seed (``--no-extras`` turns them off and replays
seeds as the fuzzer drew them before they existed):

- user combines holding a clip, ``jnp.clip(x * w, -1.0, 1.0)`` under ``max`` and ``sum``
  (Python float literals: float64 operands under ``--x64``);
- focused draws: ``adder`` / ``l1`` / the clip under sum with NaN and infinities on bf16 /
  f16 / float64 (the wide and low kernels' clip and the engine's NaN restore), reverse mode;
  bf16 / f16 logsumexp tangents (``jax.jvp``, against finite differences) and gradients,
  with data also near 2500 (the log semiring's exact branches);
- a ``jax.export`` round trip (serialize, deserialize, call: bit for bit the jitted call) of
  the forward and the VJP, on both engines;
- with two or more devices (the driver asks for ``--devices 2`` simulated CPU devices), a
  batch of two examples sharded over two devices, through ``shard_map`` and through ``jit``
  of a sharded ``vmap``, forward and VJP, against the unsharded call.

The recent focus, drawn from a third stream of the seed (``--no-recent`` turns it off and
replays seeds as the fuzzer drew them before it existed), redraws half of the examples that
have no extras focus in an area the native engine changed recently (``RECENT``): bf16 / f16
max / min backward (recorded route, ties, signed zeros, denormals, NaN), logsumexp backward
and tangents (all -inf windows, spreads up to 1e4), user ops with ``custom_vjp`` /
``custom_jvp`` combines and callable reduces, the wide kernels (float64 / int32 / int64,
``--x64``), feature groups / strides / dilations / paddings at their edges, and dense products.

Routes: after its checks each example lowers its call on ``engine="auto"`` (forward, and
the VJP for floats) and reads which engine runs from the program (the native engine's
``@jaxconv_*`` custom calls), against ``jaxconv.explain(op, dtype=...)``: the engine it
plans, its ``not native: ...`` reason and its ``backward:`` line. A disagreement (explain
says native and the call runs XLA or the reverse, a fallback with no reason, a backward
elsewhere than explain says, explain saying native where ``engine="native"`` refuses) fails
the example (issue 22, item 6). Each example's route is appended to ``--engines`` (JSON
lines) and the run ends with a table of the reasons ``"auto"`` ran the XLA engine
(``--no-route`` skips all this).

It checks (the contracts of docs/numerics.md):

- forward: XLA engine and native engine against the float64 numpy loops
  (``tests/reference.py``, operands flushed as the engines flush denormals); NaN and
  infinities at the same places; max / min results bit-identical between the engines;
  sums within ``eps * K * |terms|``;
- gradients and tangents: engine against engine, and for float data the directional
  derivative against central finite differences of the float64 reference (smooth ops,
  normal data); a JVP against its engine's VJP (``<g, J t> == <J^T g, t>``);
- tangents: elementwise against central finite differences of the float64 reference where
  the one-sided differences agree (no kink within the step), for every float dtype of a sum
  or logsumexp and float32 / float64 max / min (bf16 / f16 rounded products tie where the
  float64 products do not);
- vmap: against a loop of unbatched calls on the same engine.

Failures are printed and appended as JSON lines to ``--log`` (default
``/tmp/jaxconv_fuzz.jsonl``); a summary of examples per category ends the run.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAXCONV_NATIVE_TUNE", "off")

_ARGS = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_ARGS.add_argument("--minutes", type=float, default=5.0, help="time budget")
_ARGS.add_argument("--examples", type=int, default=10**9, help="at most this many examples")
_ARGS.add_argument("--seed", type=int, default=None, help="first seed (default: from time)")
_ARGS.add_argument("--x64", action="store_true", help="enable x64: float64 / int64 too")
_ARGS.add_argument("--replay", type=int, default=None, help="run one seed, raise on failure")
_ARGS.add_argument("--transform", default=None,
                   help="only this transform (forward, grad, jvp, vmap, vmap_grad)")
_ARGS.add_argument("--log", default="/tmp/jaxconv_fuzz.jsonl", help="failures, JSON lines")
_ARGS.add_argument("--no-extras", action="store_true",
                   help="no clip ops, focused draws, export or sharding (earlier seeds' draws)")
_ARGS.add_argument("--no-recent", action="store_true",
                   help="no recent-area focus (the draws of seeds before it existed)")
_ARGS.add_argument("--engines", default="/tmp/jaxconv_fuzz_engines.jsonl",
                   help="each example's engine='auto' route and explain's reasons, JSON lines")
_ARGS.add_argument("--no-route", action="store_true",
                   help="do not lower engine='auto' nor compare it with jaxconv.explain")
_ARGS.add_argument("--devices", type=int, default=2,
                   help="simulated CPU devices (jax_num_cpu_devices); 1: no sharded checks")


# The native engine's backward custom calls (`jaxconv._src.engines.native.ffi`).
_BACKWARD_CALLS = frozenset({"jaxconv_backward", "jaxconv_wide_backward",
                             "jaxconv_backward_recorded", "jaxconv_low_backward_recorded"})
# The built-in ops that are rewrites into lax products (no native engine by design).
_LAX_OPS = ("xnor", "l2")
# jaxconv.explain's plan per (op name, dtype): the same op and dtype plan the same way.
_EXPLAINED: dict[tuple[str, str], Any] = {}


class Skip(Exception):
    """The example exercises a documented limitation; counted, not a failure."""


# --------------------------------------------------------------------------------------------
# Ops: the library's op and its numpy ground truth.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One op of the fuzzer: the jaxconv op, its numpy reference and what it supports."""

    name: str
    op: Any  # a built-in name or a jaxconv.Op
    combine: Callable[[Any, Any], Any]
    reduce: Callable[[Any, Any], Any]
    identity: float
    pad_value: float | None
    family: str  # "sum", "max", "min", "lse"
    term: str  # how big a term is: "mul", "add", "sq", "one"
    ints: bool = True  # integer operands accepted
    jvp: bool = True  # forward mode defined (not the surrogate rules)
    exact_grad: bool = True  # the gradient is the true derivative (finite differences apply)
    lax: bool = False  # a lax rewrite: both engines run lax
    low: bool = True  # bf16 / f16 operands accepted (a smoothed fold is not associative there)


def _specs(jnp: Any, jaxconv: Any) -> list[Spec]:
    from reference import NUMPY_OPS

    inf = math.inf
    fam = {"max_plus": "max", "min_plus": "min", "max_min": "max", "min_max": "min",
           "max_times": "max", "log": "lse"}
    term = {"xnor": "one", "adder": "add", "l1": "add", "l2": "sq", "max_plus": "add",
            "min_plus": "add", "max_min": "add", "min_max": "add", "max_times": "mul",
            "log": "add"}
    out = []
    for name, ref in NUMPY_OPS.items():
        if name == "standard":
            continue
        out.append(Spec(name, name, ref.combine, ref.reduce, ref.identity, ref.pad_value,
                        fam.get(name, "sum"), term[name],
                        ints=name not in ("xnor", "log", "l2", "max_times"),
                        jvp=name not in ("xnor", "adder"),
                        exact_grad=name not in ("xnor", "adder"),
                        lax=name in ("xnor", "l2")))
    l2e = NUMPY_OPS["l2"]
    out.append(Spec("l2_exact", "l2_exact", l2e.combine, l2e.reduce, 0.0, None, "sum", "sq"))
    for name, pv in (("max_plus", 0.5), ("min_max", -1.0), ("l1", 0.25), ("log", 0.0)):
        ref = NUMPY_OPS[name]
        base = next(s for s in out if s.name == name)
        out.append(Spec(f"{name}[pad={pv}]", jaxconv.ops.get(name).replace(pad_value=pv),
                        ref.combine, ref.reduce, ref.identity, pv, base.family, base.term,
                        ints=base.ints and pv == int(pv), jvp=base.jvp))

    def relu_diff(x: Any, w: Any) -> Any:
        return np.maximum(np.subtract(x, w), 0)

    user = [
        ("u_mul_sum", jaxconv.Op(jnp.multiply, "sum", name="fz_mul_sum"),
         np.multiply, np.add, 0.0, None, "sum", "mul"),
        ("u_relu_sum", jaxconv.Op(lambda x, w: jnp.maximum(x - w, 0), "sum",
                                  name="fz_relu_sum"),
         relu_diff, np.add, 0.0, None, "sum", "add"),
        ("u_sub_max", jaxconv.Op(lambda x, w: x - w, "max", name="fz_sub_max"),
         np.subtract, np.maximum, -inf, None, "max", "add"),
        ("u_mul_min", jaxconv.Op(jnp.multiply, "min", name="fz_mul_min"),
         np.multiply, np.minimum, inf, None, "min", "mul"),
        ("u_absadd_max", jaxconv.Op(lambda x, w: jnp.abs(x) + w, "max", name="fz_absadd_max"),
         lambda x, w: np.abs(x) + w, np.maximum, -inf, None, "max", "add"),
        ("u_sub_lse", jaxconv.Op(lambda x, w: x - w, "logsumexp", name="fz_sub_lse"),
         np.subtract, np.logaddexp, -inf, None, "lse", "add"),
        ("u_call_max", jaxconv.Op(jnp.add, lambda a, b: jnp.maximum(a, b), identity=-inf,
                                  name="fz_call_max"),
         np.add, np.maximum, -inf, None, "max", "add"),
        ("u_call_sum", jaxconv.Op(jnp.multiply, lambda a, b: a + b, identity=0.0,
                                  name="fz_call_sum"),
         np.multiply, np.add, 0.0, None, "sum", "mul"),
        ("u_sub_max[pad=0.5]", jaxconv.Op(lambda x, w: x - w, "max", pad_value=0.5,
                                          name="fz_sub_max_pad"),
         np.subtract, np.maximum, -inf, 0.5, "max", "add"),
        ("u_mul_sum[pad=1]", jaxconv.Op(jnp.multiply, "sum", pad_value=1.0,
                                        name="fz_mul_sum_pad"),
         np.multiply, np.add, 0.0, 1.0, "sum", "mul"),
    ]
    for name, op, comb, red, ident, pv, family, t in user:
        out.append(Spec(name, op, comb, red, ident, pv, family, t,
                        ints=family != "lse" and (pv is None or pv == int(pv))))
    return out


def _clip_mul(x: Any, w: Any) -> Any:
    return np.clip(np.multiply(x, w), -1.0, 1.0)


def _extra_specs(jnp: Any, jaxconv: Any) -> list[Spec]:
    """User combines holding a clip (drawn from the extras' stream, so that adding them did
    not change what the earlier seeds draw). Their literals are Python floats."""
    return [
        Spec("u_clipmul_max", jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "max",
                                         name="fz_clipmul_max"),
             _clip_mul, np.maximum, -math.inf, None, "max", "mul"),
        Spec("u_clipmul_sum", jaxconv.Op(lambda x, w: jnp.clip(x * w, -1.0, 1.0), "sum",
                                         name="fz_clipmul_sum"),
             _clip_mul, np.add, 0.0, None, "sum", "mul"),
    ]


def _recent_specs(jnp: Any, jaxconv: Any) -> list[Spec]:
    """User ops of the recent native paths (drawn from the recent focus's own stream):
    combines with custom derivative rules (``jax.custom_vjp``: a straight-through sign, and
    rules equal to the true derivative so that finite differences apply; ``jax.custom_jvp``:
    ``jax.nn.relu``) and callable reduces (a softplus-smoothed max, a probabilistic or)."""
    import jax

    @jax.custom_vjp
    def ste(v: Any) -> Any:
        return jnp.where(v >= 0, 1.0, -1.0).astype(v.dtype)

    ste.defvjp(lambda v: (ste(v), v), lambda v, g: (g * (jnp.abs(v) <= 1.0).astype(g.dtype),))

    @jax.custom_vjp
    def mul_rule(x: Any, w: Any) -> Any:
        return x * w

    mul_rule.defvjp(lambda x, w: (x * w, (x, w)), lambda r, g: (g * r[1], g * r[0]))

    @jax.custom_vjp
    def sub_rule(x: Any, w: Any) -> Any:
        return x - w

    sub_rule.defvjp(lambda x, w: (x - w, None), lambda r, g: (g, -g))

    def smoothed_max(a: Any, b: Any) -> Any:
        return 0.5 * jnp.logaddexp(a / 0.5, b / 0.5)

    def np_sign(v: Any) -> Any:
        return np.where(np.asarray(v) >= 0, 1.0, -1.0)

    inf = math.inf
    return [
        Spec("u_ste_xnor_sum", jaxconv.Op(lambda x, w: ste(x) * ste(w), "sum",
                                          name="fz_ste_xnor"),
             lambda x, w: np_sign(x) * np_sign(w), np.add, 0.0, None, "sum", "one",
             ints=False, jvp=False, exact_grad=False),
        Spec("u_vjp_mul_sum", jaxconv.Op(mul_rule, "sum", name="fz_vjp_mul_sum"),
             np.multiply, np.add, 0.0, None, "sum", "mul", ints=False, jvp=False),
        Spec("u_vjp_sub_max", jaxconv.Op(sub_rule, "max", name="fz_vjp_sub_max"),
             np.subtract, np.maximum, -inf, None, "max", "add", ints=False, jvp=False),
        Spec("u_vjp_mul_min", jaxconv.Op(mul_rule, "min", name="fz_vjp_mul_min"),
             np.multiply, np.minimum, inf, None, "min", "mul", ints=False, jvp=False),
        Spec("u_relu_max", jaxconv.Op(lambda x, w: jax.nn.relu(x * w), "max",
                                      name="fz_relu_max"),
             lambda x, w: np.maximum(np.multiply(x, w), 0), np.maximum, -inf, None, "max",
             "mul", ints=False),
        Spec("u_smax_fold", jaxconv.Op(lambda x, w: x * w, smoothed_max, identity=-inf,
                                       name="fz_smax_fold"),
             np.multiply, lambda a, b: 0.5 * np.logaddexp(2 * a, 2 * b), -inf, None, "lse",
             "mul", ints=False, low=False),
        Spec("u_por_fold", jaxconv.Op(lambda x, w: jax.nn.sigmoid(x * w),
                                      lambda a, b: a + b - a * b, identity=0.0,
                                      name="fz_por_fold"),
             lambda x, w: 1.0 / (1.0 + np.exp(-np.multiply(x, w))),
             lambda a, b: a + b - a * b, 0.0, None, "sum", "one", ints=False, low=False),
    ]


# The recent focus's areas (``Example._recent``).
RECENT = ("low_maxmin_bwd", "lse_bwd", "custom_rule", "wide", "geometry", "dense")


# --------------------------------------------------------------------------------------------
# Problems.
# --------------------------------------------------------------------------------------------

ODD = (15, 16, 17, 31, 33, 63, 65)


def _dilated(size: int, d: int) -> int:
    return (size - 1) * d + 1 if size > 0 else 0


def _conv_problem(rng: np.random.Generator, wide: bool,
                  edge: bool = False) -> dict[str, Any] | None:
    """Geometry and layouts of a convolution, as ``test_properties.problems`` draws them
    (wider when ``wide``); None when the draw has no output position. ``edge``: feature
    groups, strides and both dilations up to 3 and explicit paddings from -2 to 4 (the
    draw's other sizes as without it)."""
    from jax import lax

    if edge:
        return _edge_conv(rng, _conv_problem(rng, wide))

    nsd = int(rng.choice([1, 2, 2, 3]))
    depthwise = rng.random() < 0.15
    if wide:
        c = int(rng.choice(ODD))
        groups = c if depthwise else int(rng.choice([1, 1, 1, 3]))
        ci = max(1, c // groups)
        og = 1 if depthwise else max(1, int(rng.choice(ODD)) // groups)
        n = int(rng.integers(1, 5))
        top = {1: 40, 2: 12, 3: 6}[nsd]
        spatial = [int(rng.integers(3, top + 1)) for _ in range(nsd)]
    else:
        ci = int(rng.integers(1, 3))
        groups = int(rng.integers(1, 3))
        og = int(rng.integers(1, 3))
        n = int(rng.integers(1, 3))
        spatial = [int(rng.integers(1, 7 if nsd == 1 else 5)) for _ in range(nsd)]
    window = [int(rng.integers(1, 4)) for _ in range(nsd)]
    strides = [int(rng.integers(1, 3)) for _ in range(nsd)]
    rdil = [int(rng.integers(1, 3)) for _ in range(nsd)]
    ldil = [int(rng.choice([1, 1, 2])) for _ in range(nsd)]
    if all(d == 1 for d in ldil) and rng.random() < 0.5:
        padding: Any = str(rng.choice(["VALID", "SAME", "SAME_LOWER"]))
        dil_win = [_dilated(k, d) for k, d in zip(window, rdil, strict=True)]
        pads = lax.padtype_to_pads(spatial, dil_win, strides, padding)
    else:
        padding = tuple((int(rng.integers(-1, 3)), int(rng.integers(-1, 3)))
                        for _ in range(nsd))
        pads = padding
    for s, ld, k, rd, (lo, hi) in zip(spatial, ldil, window, rdil, pads, strict=True):
        din = _dilated(s, ld)
        if not (lo > -din and hi > -din and din + lo + hi >= _dilated(k, rd)):
            return None
    sp = "HWD"[:nsd]
    lhs_spec = "".join(rng.permutation(["N", "C", *sp]))
    rhs_spec = "".join(rng.permutation(["O", "I", *sp]))
    out_spec = "".join(rng.permutation(["N", "C", *sp]))
    sp_order = [ch for ch in rhs_spec if ch in sp]
    sizes_l = {"N": n, "C": groups * ci, **dict(zip(sp_order, spatial, strict=True))}
    sizes_r = {"O": groups * og, "I": ci, **dict(zip(sp_order, window, strict=True))}
    return dict(kind="conv", xshape=[sizes_l[ch] for ch in lhs_spec],
                wshape=[sizes_r[ch] for ch in rhs_spec], strides=tuple(strides),
                padding=padding, kw=dict(lhs_dilation=tuple(ldil), rhs_dilation=tuple(rdil),
                                          dimension_numbers=(lhs_spec, rhs_spec, out_spec),
                                          feature_group_count=groups),
                terms=ci * math.prod(window))


def _edge_conv(rng: np.random.Generator, base: dict[str, Any] | None
               ) -> dict[str, Any] | None:
    """``base``'s layouts and sizes with grouping, strides, dilations and padding at their
    edges: 2-4 feature groups (or depthwise), strides and dilations 1-3, explicit paddings
    -2..4 (None when the draw has no output position).

    Args:
        rng: the stream.
        base: a convolution drawn by `_conv_problem` (None: none).

    Returns:
        The problem, or None.
    """
    if base is None:
        return None
    lhs_spec, rhs_spec, _ = base["kw"]["dimension_numbers"]
    nsd = len(lhs_spec) - 2
    xs = dict(zip(lhs_spec, base["xshape"], strict=True))
    ws = dict(zip(rhs_spec, base["wshape"], strict=True))
    og = max(1, ws["O"] // base["kw"]["feature_group_count"])
    if rng.random() < 0.8:
        groups, ci = int(rng.choice([2, 3, 4])), ws["I"]
    else:  # depthwise, a channel multiplier of og
        groups, ci = max(2, xs["C"]), 1
    xs["C"], ws["I"], ws["O"] = groups * ci, ci, groups * og
    sp = [ch for ch in rhs_spec if ch not in "OI"]
    strides = tuple(int(rng.integers(1, 4)) for _ in range(nsd))
    rdil = tuple(int(rng.integers(1, 4)) for _ in range(nsd))
    ldil = tuple(int(rng.integers(1, 4)) for _ in range(nsd))
    pads = tuple((int(rng.integers(-2, 5)), int(rng.integers(-2, 5))) for _ in range(nsd))
    for ch, ld, rd, (lo, hi) in zip(sp, ldil, rdil, pads, strict=True):
        din = _dilated(xs[ch], ld)
        if not (lo > -din and hi > -din and din + lo + hi >= _dilated(ws[ch], rd)):
            return None
    kw = dict(base["kw"], lhs_dilation=ldil, rhs_dilation=rdil, feature_group_count=groups)
    return dict(base, xshape=[xs[ch] for ch in lhs_spec], wshape=[ws[ch] for ch in rhs_spec],
                strides=strides, padding=pads, kw=kw,
                terms=ci * math.prod(ws[ch] for ch in sp))


def _dot_problem(rng: np.random.Generator, wide: bool) -> dict[str, Any]:
    nb = int(rng.integers(0, 2))
    if wide:
        b = int(rng.integers(1, 4))
        m, k, nn = (int(rng.choice(ODD + (64, 130))) for _ in range(3))
    else:
        b, m, k, nn = (int(rng.integers(1, hi)) for hi in (4, 5, 6, 5))
    lr = list(rng.permutation(["b", "m", "k"] if nb else ["m", "k"]))
    rr = list(rng.permutation(["b", "k", "n"] if nb else ["k", "n"]))
    sizes = {"b": b, "m": m, "k": k, "n": nn}
    dn = (((lr.index("k"),), (rr.index("k"),)),
          ((lr.index("b"),), (rr.index("b"),)) if nb else ((), ()))
    if rng.random() < 0.3:  # the same contraction through einsum
        eq = "".join(lr) + "," + "".join(rr) + "->" + ("b" if nb else "") + "mn"
        return dict(kind="einsum", eq=eq, xshape=[sizes[r] for r in lr],
                    wshape=[sizes[r] for r in rr], dn=dn, terms=k)
    return dict(kind="dot", xshape=[sizes[r] for r in lr], wshape=[sizes[r] for r in rr],
                dn=dn, terms=k)


DATA = ("normal", "offset", "ints", "specials", "zeros", "huge")


def _data(rng: np.random.Generator, shape: list[int], kind: str, dtype: Any,
          term: str = "add") -> np.ndarray:
    """float64 values of ``kind`` (the caller casts to the dtype); ``term`` bounds huge
    values so that a product or a square of two stays finite in float32."""
    if np.issubdtype(dtype, np.integer):
        hi = 4 if rng.random() < 0.7 else 100
        return rng.integers(-hi, hi, size=shape).astype(np.float64)
    v = rng.standard_normal(shape)
    if kind == "offset":
        v = v + float(rng.choice([100.0, -1000.0]))
    elif kind == "ints":
        v = np.round(v * 1.5)
    elif kind == "specials":
        v = np.round(v * 2) if rng.random() < 0.5 else v
        mask = rng.random(shape)
        v[mask < 0.03] = np.nan
        v[(mask >= 0.03) & (mask < 0.06)] = np.inf
        v[(mask >= 0.06) & (mask < 0.09)] = -np.inf
    elif kind == "zeros":
        tiny = float(np.finfo(np.float32).tiny) if dtype != np.float16 else 6.1e-5
        pool = np.array([0.0, -0.0, 1.0, -1.0, tiny, -tiny, tiny * 0.25, -tiny * 0.25,
                         tiny * 1.5, -tiny * 1.5, 2.0])
        v = pool[rng.integers(0, len(pool), size=shape)]
    elif kind == "lse_edge":  # a log-sum-exp's edges: all -inf windows, spreads past 80
        v = v * float(rng.choice([1.0, 30.0, 1e4]))
        v[rng.random(shape) < float(rng.uniform(0.3, 0.9))] = -np.inf
    elif kind == "far":  # x + w near 5000: beyond the log semiring's exp-space |y| <= 2^12
        v = v + 2500.0
    elif kind == "huge":  # beyond 2^96 (the native l1 / adder direct loop) for x - w terms
        v = v * (2.0**100 if term in ("add", "one") else 2.0**40)
    return v


def _flush(a: np.ndarray, dtype: Any) -> np.ndarray:
    """Denormals of float32 / bfloat16 / float64 as zeros of their sign (the engines' FTZ/DAZ);
    float16 denormals are normal float32 numbers, kept."""
    if dtype in ("float16",) or not np.issubdtype(a.dtype, np.floating):
        return a
    tiny = np.finfo(np.float64 if dtype == "float64" else np.float32).tiny
    with np.errstate(invalid="ignore"):
        small = np.abs(a) < tiny
    return np.where(small, np.copysign(0.0, a), a)


# --------------------------------------------------------------------------------------------
# One example.
# --------------------------------------------------------------------------------------------


class Example:
    """A drawn example and the machinery to run and check it."""

    def __init__(self, seed: int, specs: list[Spec], x64: bool, transform: str | None,
                 extras: list[Spec] | None = None, recent: list[Spec] | None = None):
        import jax.numpy as jnp
        import ml_dtypes

        rng = np.random.default_rng(seed)
        # The extras' own stream: an example that draws no focus is the one the seed drew
        # before the extras existed (plus the export / sharded checks, run after it).
        xr = np.random.default_rng([seed, 7919])
        self.rng = rng
        self.seed = seed
        for _ in range(20):
            wide = rng.random() < 0.35
            prob = (_conv_problem(rng, wide) if rng.random() < 0.65
                    else _dot_problem(rng, wide))
            if prob is not None:
                break
        else:
            raise Skip("no valid geometry drawn")
        self.spec = specs[int(rng.integers(0, len(specs)))]
        self.focus = self.export = self.sharded = None
        self.native_refused: str | None = None
        if extras is not None:
            self.focus, spec = self._focus(xr, specs, extras, x64)
            self.spec = spec or self.spec
            if self.focus is not None and xr.random() < 0.5:  # the kernels' vector paths
                for _ in range(20):
                    p = (_conv_problem(xr, True) if xr.random() < 0.6
                         else _dot_problem(xr, True))
                    if p is not None:
                        prob, wide = p, True
                        break
            self.export = bool(xr.random() < 0.05)
            self.sharded = bool(xr.random() < 0.06)
        self.prob = prob
        self.wide = wide
        dtypes = ["float32"] * 4 + ["bfloat16", "float16"]
        if self.spec.ints:
            dtypes.append("int32")
        if x64:
            dtypes += ["float64"] * 4 + (["int64"] if self.spec.ints else [])
        self.dtype = str(rng.choice(dtypes))
        if self.focus in ("nan_clip", "low_lse"):
            low = ["bfloat16", "float16"] + (["float64"] if x64 else [])
            self.dtype = str(xr.choice(low))
        self.np_dtype = {"bfloat16": ml_dtypes.bfloat16}.get(self.dtype, np.dtype(self.dtype))
        self.is_int = self.dtype.startswith("int")
        self.data = "ints" if self.is_int else str(rng.choice(DATA))
        if self.data == "huge" and self.dtype not in ("float32", "float64"):
            self.data = "normal"
        transforms = ["forward", "forward", "grad", "jvp", "vmap", "vmap_grad"]
        self.transform = transform or str(rng.choice(transforms))
        if self.focus == "nan_clip":
            self.data = "specials"
            modes = ["grad", "grad", "vmap_grad"] + (["jvp"] if self.spec.jvp else [])
            self.transform = transform or str(xr.choice(modes))
        elif self.focus == "low_lse":
            self.data = str(xr.choice(["normal", "offset", "far"]))
            self.transform = transform or str(xr.choice(["jvp", "jvp", "grad"]))
        self.recent = None
        if recent is not None and self.focus is None:
            # The recent focus's own stream: without it (--no-recent) a seed draws as before.
            self._recent(np.random.default_rng([seed, 104729]), specs, extras or [], recent,
                         x64, transform)
        if self.is_int and self.transform in ("grad", "jvp", "vmap_grad"):
            self.transform = "forward"
        t = self.spec.term
        self.x = _data(rng, self.prob["xshape"], self.data, self.np_dtype, t).astype(
            self.np_dtype)
        self.w = _data(rng, self.prob["wshape"], self.data, self.np_dtype, t).astype(
            self.np_dtype)
        self.jnp = jnp

    def _recent(self, rr: np.random.Generator, specs: list[Spec], extras: list[Spec],
                recent: list[Spec], x64: bool, transform: str | None) -> None:
        """With probability 0.5, redraws the example in one of the areas changed recently
        (`RECENT`), setting ``recent`` and overriding the op, dtype, data, transform and
        problem as the area asks:

        - ``low_maxmin_bwd``: bf16 / f16 max / min ops (built-in, user, custom rules), mostly
          reverse mode, on ties, signed zeros and denormals, NaN / inf; wide problems (more
          than 64 kernel rows: the recorded route) half of the time;
        - ``lse_bwd``: logsumexp ops and the smoothed-max fold on all -inf windows and spreads
          up to 1e4, reverse mode and tangents, any float dtype;
        - ``custom_rule``: user ops with ``custom_vjp`` / ``custom_jvp`` combines and callable
          reduces, any float dtype;
        - ``wide`` (``--x64`` only): float64 / int32 / int64 on wide problems;
        - ``geometry``: feature groups, strides, dilations and paddings at their edges;
        - ``dense``: ``dot_general`` / ``einsum``, wide half of the time.

        Args:
            rr: the recent focus's stream.
            specs: the primary ops.
            extras: the extras' ops.
            recent: `_recent_specs`.
            x64: whether float64 / int64 are on.
            transform: the transform asked for (``None``: drawn).
        """
        if rr.random() >= 0.5:
            return
        areas = [a for a in RECENT if a != "wide" or x64]
        area = str(rr.choice(areas))
        floats = ["float32", "bfloat16", "float16"] + (["float64"] if x64 else [])

        def pick(pool: list[Spec]) -> Spec:
            return pool[int(rr.integers(0, len(pool)))]

        def problem(kind: str, wide: bool) -> dict[str, Any] | None:
            for _ in range(30):
                p = (_conv_problem(rr, wide, edge=kind == "edge") if kind != "dot"
                     else _dot_problem(rr, wide))
                if p is not None:
                    return dict(p, wide=wide)
            return None

        allspecs = specs + extras + recent
        spec, dtype, data, modes, prob = None, None, None, None, None
        wide = bool(rr.random() < 0.5)
        if area == "low_maxmin_bwd":
            spec = pick([s for s in allspecs if s.family in ("max", "min")])
            dtype = str(rr.choice(["bfloat16", "float16"]))
            data = str(rr.choice(["ints", "zeros", "zeros", "specials", "normal"]))
            modes = ["grad", "grad", "vmap_grad", "forward"]
            prob = problem("conv" if rr.random() < 0.6 else "dot", wide)
        elif area == "lse_bwd":
            spec = pick([s for s in allspecs if s.family == "lse"])
            dtype = str(rr.choice(["float32", "float32", *floats]))
            data = str(rr.choice(["lse_edge", "lse_edge", "far", "specials"]))
            modes = ["grad", "grad", "vmap_grad", "jvp", "forward"]
        elif area == "custom_rule":
            spec = pick(recent)
            dtype = str(rr.choice(["float32", "float32", *floats]))
            data = str(rr.choice(["normal", "normal", "ints", "zeros", "specials", "offset"]))
            modes = ["grad", "grad", "vmap_grad", "forward", "vmap"] + (
                ["jvp"] if spec.jvp else [])
        elif area == "wide":
            spec = pick(allspecs)
            dtype = str(rr.choice(["float64", "float64"]
                                  + (["int32", "int64"] if spec.ints else [])))
            prob = problem("conv" if rr.random() < 0.6 else "dot", True)
        elif area == "geometry":
            prob = problem("edge", bool(rr.random() < 0.3))
        elif area == "dense":
            prob = problem("dot", wide)
        self.recent = area
        self.spec = spec or self.spec
        if dtype is not None:
            self.dtype = dtype
        elif self.dtype.startswith("int") and not self.spec.ints:
            self.dtype = "float32"
        if self.dtype in ("bfloat16", "float16") and not self.spec.low:
            self.dtype = "float32"
        import ml_dtypes

        self.np_dtype = {"bfloat16": ml_dtypes.bfloat16}.get(self.dtype, np.dtype(self.dtype))
        self.is_int = self.dtype.startswith("int")
        if self.is_int:
            self.data = "ints"
        elif data is not None:
            self.data = data
        elif self.data == "ints" and not self.is_int and rr.random() < 0.5:
            self.data = "normal"
        if self.data in ("huge",) and self.dtype not in ("float32", "float64"):
            self.data = "normal"
        if modes is not None and transform is None:
            self.transform = str(rr.choice(modes))
        if prob is not None:
            self.wide = prob.pop("wide")
            self.prob = prob

    @staticmethod
    def _focus(xr: np.random.Generator, specs: list[Spec], extras: list[Spec],
               x64: bool) -> tuple[str | None, Spec | None]:
        """The extras' focus of an example and its op (None, None: the primary draw's).

        - ``clip``: a user combine holding a clip, any dtype, data and transform;
        - ``nan_clip``: ``adder``, ``l1`` or the clip under sum on bf16 / f16 / float64 with NaN
          and infinities, mostly reverse mode (the clip of adder's gradient, ``l1``'s sign);
        - ``low_lse``: a logsumexp op's tangent or gradient on bf16 / f16 / float64 data,
          also near 2500 (``x + w`` beyond the log semiring's exp-space bound, 2^12).
        """
        del x64
        u = xr.random()
        if u < 0.10:
            return "clip", extras[int(xr.integers(0, len(extras)))]
        if u < 0.18:
            pool = [s for s in specs if s.name in ("adder", "l1")] + [
                s for s in extras if s.family == "sum"]
            return "nan_clip", pool[int(xr.integers(0, len(pool)))]
        if u < 0.25:
            pool = [s for s in specs if s.family == "lse"]
            return "low_lse", pool[int(xr.integers(0, len(pool)))]
        return None, None

    def describe(self) -> dict[str, Any]:
        p = {k: v for k, v in self.prob.items() if k != "kw"}
        p.update(self.prob.get("kw", {}))
        return dict(seed=self.seed, op=self.spec.name, dtype=self.dtype, data=self.data,
                    transform=self.transform, wide=self.wide, focus=self.focus,
                    recent=self.recent,
                    export=self.export, sharded=self.sharded,
                    **{k: repr(v) for k, v in p.items()})

    def category(self) -> str:
        return f"{self.transform}/{self.prob['kind']}/{self.spec.family}/{self.dtype}/{self.data}"

    # --- calls ----------------------------------------------------------------------------

    def fn(self, engine: str) -> Callable[[Any, Any], Any]:
        import jaxconv

        p, op = self.prob, self.spec.op
        if p["kind"] == "conv":
            return lambda a, b: jaxconv.conv_general_dilated(
                a, b, p["strides"], p["padding"], **p["kw"], op=op, engine=engine)
        if p["kind"] == "dot":
            return lambda a, b: jaxconv.dot_general(a, b, p["dn"], op=op, engine=engine)
        return lambda a, b: jaxconv.einsum(p["eq"], a, b, op=op, engine=engine)

    def reference(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        from reference import conv_reference, dot_general_reference

        s, p = self.spec, self.prob
        x = _flush(np.asarray(x, np.float64), self.dtype)
        w = _flush(np.asarray(w, np.float64), self.dtype)
        with np.errstate(all="ignore"):
            if p["kind"] == "conv":
                y = conv_reference(x, w, p["strides"], p["padding"], **p["kw"],
                                   combine=s.combine, reduce=s.reduce, identity=s.identity,
                                   pad_value=s.pad_value)
            else:
                y = dot_general_reference(x, w, p["dn"], combine=s.combine, reduce=s.reduce,
                                          identity=s.identity)
        return y

    def run_engines(self, build: Callable[[str], Any], *args: Any) -> dict[str, Any]:
        """``build(engine)(*args)`` on both engines; native may refuse (recorded)."""
        import jax

        out: dict[str, Any] = {}
        for engine in ("xla", "native"):
            try:
                out[engine] = jax.tree.map(np.asarray, build(engine)(*args))
            except ValueError as e:
                if "does not serve" in str(e) and engine == "native":
                    self.native_refused = str(e)
                    continue
                raise
        return out

    def route(self) -> dict[str, Any]:
        """What ``engine="auto"`` does with this example and what `jaxconv.explain` says it does.

        The engine that runs is read from the lowered program (the native engine's custom
        calls, ``@jaxconv_*``): the forward of ``jit(f)`` and, for floats, the backward calls
        in ``jit`` of the VJP. `jaxconv.explain` (the op and dtype, ``engine="auto"``) gives the
        planned engine, the native engine's refusal (its ``not native: ...`` line) and its
        backward (a ``backward: the XLA engine`` line). Issue 22's item 6 makes every
        disagreement a bug: they are listed under ``"mismatch"`` (`run` fails on them).

        Returns:
            ``explain`` (its engine), ``forward`` / ``backward`` (the engine that runs;
            backward ``None`` for integers and the lax rewrites), ``reason`` (why the forward
            falls back, from ``explain``: its refusal, else its first line, such as a
            factored form's) and ``mismatch`` (a list of texts).
        """
        import re

        import jax

        import jaxconv

        key = (self.spec.name, self.dtype)
        if key not in _EXPLAINED:
            _EXPLAINED[key] = jaxconv.explain(self.spec.op, dtype=self.dtype, engine="auto")
        plan = _EXPLAINED[key]
        why = [d.removeprefix("not native: ") for d in plan.details
               if d.startswith("not native: ")]
        said_back = next((d for d in plan.details if d.startswith("backward:")), "")
        f = self.fn("auto")

        def calls(text: str) -> set[str]:
            return set(re.findall(r"custom_call @(jaxconv_\w+)", text))

        fwd = "native" if calls(jax.jit(f).lower(self.x, self.w).as_text()) else "xla"
        out = dict(explain=plan.engine, forward=fwd, backward=None,
                   reason=why[0] if why else (plan.details[0] if plan.engine == "xla"
                                               and plan.details else None), mismatch=[])
        if not (self.is_int or self.spec.lax):
            y = jax.eval_shape(f, self.x, self.w)
            g = jax.ShapeDtypeStruct(y.shape, y.dtype)
            text = jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c)).lower(
                self.x, self.w, g).as_text()
            out["backward"] = "native" if calls(text) & _BACKWARD_CALLS else "xla"
        bad = out["mismatch"]
        if plan.engine != fwd:
            bad.append(f"explain says engine {plan.engine!r}, the forward runs on {fwd}")
        if plan.engine == "xla" and not why and self.spec.op not in _LAX_OPS and not any(
                "rewrite" in d or "lax" in d for d in plan.details):
            bad.append("falls back to XLA and explain gives no reason")
        if plan.engine == "native" and self.native_refused:
            bad.append(f"explain says native, engine='native' refuses: {self.native_refused}")
        if fwd == "native" and out["backward"] is not None:
            said = "xla" if "the XLA engine" in said_back else "native"
            if said != out["backward"]:
                bad.append(f"explain says the backward runs on {said} ({said_back!r}), it "
                           f"runs on {out['backward']}")
        return out

    # --- checks ---------------------------------------------------------------------------

    def eps(self) -> float:
        import ml_dtypes

        if self.is_int:
            return 0.0
        return float(ml_dtypes.finfo(self.np_dtype).eps)

    def term_scale(self, x: np.ndarray, w: np.ndarray) -> float:
        with np.errstate(all="ignore"):
            ax = np.abs(np.asarray(x, np.float64))
            aw = np.abs(np.asarray(w, np.float64))
            mx = float(np.max(ax[np.isfinite(ax)], initial=0.0))
            mw = float(np.max(aw[np.isfinite(aw)], initial=0.0))
        pv = abs(self.spec.pad_value or 0.0)
        mx = max(mx, pv)
        return {"mul": mx * mw, "add": mx + mw, "sq": (mx + mw) ** 2, "one": 1.0}[
            self.spec.term] or 1.0

    def check_forward(self, got: np.ndarray, want: np.ndarray, who: str) -> None:
        got = np.asarray(got, np.float64)
        assert got.shape == want.shape, f"{who}: shape {got.shape} != {want.shape}"
        fam = self.spec.family
        if self.is_int:  # documented: integer max / min ops use iinfo.min / iinfo.max
            info = np.iinfo(self.dtype)
            want = np.where(np.isposinf(want), info.max,
                            np.where(np.isneginf(want), info.min, want))
        want = _flush(want, self.dtype)
        got_c = _flush(got, self.dtype)
        nan_g, nan_w = np.isnan(got_c), np.isnan(want)
        if self.spec.lax and self.prob["kind"] == "conv":
            # Documented (docs/numerics.md, NaN in, NaN out): the lax rewrites (xnor's signs,
            # l2) compute 0 * NaN for a NaN weight on a padded tap, which the loops skip.
            nan_w = nan_w | (nan_g & bool(np.isnan(np.asarray(self.w, np.float64)).any()))
        if not np.array_equal(nan_g, nan_w):
            i = tuple(np.argwhere(nan_g != nan_w)[0])
            raise AssertionError(f"{who}: NaN at different places, first at {i}: got "
                                 f"{got[i]!r}, want {want[i]!r}")
        fin = ~nan_w
        if self.data == "huge" and fam in ("sum", "lse") or self.dtype == "float16":
            # float32 / float16 sums overflow where the float64 reference does not.
            fin &= np.abs(want) < float(np.finfo(np.float16 if self.dtype == "float16"
                                                 else np.float32).max) / 4
            fin |= np.isinf(want) & np.isinf(got_c)
        inf_w = np.isinf(want) & fin
        if not np.array_equal(got_c[inf_w], want[inf_w]):
            i = tuple(np.argwhere(inf_w & (got_c != want))[0])
            raise AssertionError(f"{who}: infinity differs at {i}: got {got[i]!r}, want "
                                 f"{want[i]!r}")
        m = fin & ~inf_w
        eps = self.eps()
        np.seterr(invalid="ignore")
        # The output's rounding near zero: float16 results round to its subnormals (2^-24
        # apart); float32 / bfloat16 / float64 results below the smallest normal flush.
        floor = 0.0 if self.is_int else (2.0**-24 if self.dtype == "float16" else float(
            np.finfo(np.float64 if self.dtype == "float64" else np.float32).tiny))
        if self.is_int:
            bad = m & (got_c != want)
        elif fam in ("max", "min"):
            # One rounding of the combine in the dtype (bf16 / f16: computed in float32, then
            # rounded once more): within 1 ulp of the dtype.
            tol = eps * np.abs(want) if self.dtype in ("bfloat16", "float16") else 0.0
            if self.dtype in ("bfloat16", "float16") or self.spec.term != "one":
                tol = np.maximum(tol, 2.0**-24 * np.abs(want) * 1.0001)
            bad = m & (np.abs(got_c - want) > tol + floor)
        else:
            acc_eps = 2.0**-23 if self.dtype in ("bfloat16", "float16") else eps
            k = self.prob["terms"] + 2
            tol = (4 * acc_eps * k * self.term_scale(self.x, self.w)
                   + 2 * eps * np.abs(want))
            if fam == "lse":
                tol = tol / max(1.0, self.term_scale(self.x, self.w)) * 4 + 8 * eps * (
                    1 + np.abs(want))
            bad = m & (np.abs(got_c - want) > tol + floor)
        if bad.any():
            i = tuple(np.argwhere(bad)[0])
            raise AssertionError(f"{who}: {int(bad.sum())} of {bad.size} values differ, first "
                                 f"at {i}: got {got[i]!r}, want {want[i]!r}")

    def check_close(self, a: np.ndarray, b: np.ndarray, who: str, bitwise: bool = False,
                    rtol: float | None = None) -> None:
        a = np.asarray(a, np.float64)
        b = np.asarray(b, np.float64)
        assert a.shape == b.shape, f"{who}: shape {a.shape} != {b.shape}"
        if not np.array_equal(np.isnan(a), np.isnan(b)):
            i = tuple(np.argwhere(np.isnan(a) != np.isnan(b))[0])
            raise AssertionError(f"{who}: NaN at different places, first at {i}: {a[i]!r} vs "
                                 f"{b[i]!r}")
        if bitwise:
            same = (a == b) | np.isnan(a)
            same &= (np.signbit(a) == np.signbit(b)) | np.isnan(a)  # a NaN's sign is free
            if not same.all():
                i = tuple(np.argwhere(~same)[0])
                raise AssertionError(f"{who}: not bit-identical, {int((~same).sum())} differ, "
                                     f"first at {i}: {a[i]!r} vs {b[i]!r}")
            return
        if rtol is None:
            rtol = {"float32": 2e-4, "float64": 1e-9, "bfloat16": 3e-2, "float16": 4e-3}.get(
                self.dtype, 0.0)
        fin = np.isfinite(a) & np.isfinite(b)
        if not np.array_equal(a[~fin & ~np.isnan(a)], b[~fin & ~np.isnan(a)]):
            raise AssertionError(f"{who}: infinities differ")
        scale = float(np.max(np.abs(b[fin]), initial=0.0))
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
        bad = fin & (diff > rtol * (np.abs(b) + scale))
        if bad.any():
            i = tuple(np.argwhere(bad)[0])
            raise AssertionError(f"{who}: {int(bad.sum())} of {bad.size} differ, first at {i}: "
                                 f"{a[i]!r} vs {b[i]!r} (scale {scale:.3g})")

    def engines_agree(self, got: dict[str, Any], who: str) -> None:
        if "native" not in got:
            return
        fam = self.spec.family
        bitwise = (fam in ("max", "min") or self.is_int) and who == "forward"
        for a, b in zip(_leaves(got["xla"]), _leaves(got["native"]), strict=True):
            self.check_close(b, a, f"{who}: native vs xla", bitwise=bitwise)

    # --- transforms -----------------------------------------------------------------------

    def run(self) -> None:
        import jax

        self.native_refused = None
        t = self.transform
        if t == "forward":
            got = self.run_engines(lambda e: jax.jit(self.fn(e)), self.x, self.w)
            want = self.reference(self.x, self.w)
            for e, y in got.items():
                self.check_forward(y, want, f"forward {e} vs reference")
            self.engines_agree(got, "forward")
        elif t == "vmap":
            self.check_vmap()
        elif t == "grad":
            self.check_grad()
        elif t == "jvp":
            self.check_jvp()
        elif t == "vmap_grad":
            self.check_vmap_grad()
        if self.export:
            self.check_export()
        if self.sharded:
            self.check_sharded()

    def _float_only(self) -> None:
        if self.spec.lax and self.transform != "forward":
            raise Skip("lax rewrite: both engines run lax's own derivative")

    def cotangent(self, shape: tuple[int, ...]) -> np.ndarray:
        g = self.rng.standard_normal(shape)
        if self.data == "ints":
            g = np.round(g * 2)
        return g.astype(self.np_dtype)

    def check_grad(self) -> None:
        import jax

        self._float_only()
        y = np.asarray(jax.jit(self.fn("xla"))(self.x, self.w))
        g = self.cotangent(y.shape)

        def build(e: str) -> Any:
            f = self.fn(e)
            return jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))

        got = self.run_engines(build, self.x, self.w, g)
        self.engines_agree(got, "grad")
        self.finite_differences(got["xla"], g, "grad xla")

    def finite_differences(self, grads: Any, g: np.ndarray, who: str) -> None:
        """<grad, t> against the central difference of sum(g * reference) along t."""
        if not (self.spec.exact_grad and self.data in ("normal", "offset", "far")
                and self.dtype in ("float32", "float64") and not self.wide):
            return
        tx = self.rng.standard_normal(self.x.shape)
        tw = self.rng.standard_normal(self.w.shape)
        x = np.asarray(self.x, np.float64)
        w = np.asarray(self.w, np.float64)
        g64 = np.asarray(g, np.float64)
        h = 1e-6 * max(1.0, float(np.max(np.abs(x))), float(np.max(np.abs(w))))
        lp = float(np.sum(g64 * self.reference(x + h * tx, w + h * tw)))
        lm = float(np.sum(g64 * self.reference(x - h * tx, w - h * tw)))
        fd = (lp - lm) / (2 * h)
        dx, dw = (np.asarray(v, np.float64) for v in grads)
        got = float(np.sum(dx * tx) + np.sum(dw * tw))
        scale = float(np.sum(np.abs(dx * tx)) + np.sum(np.abs(dw * tw))) + 1e-3
        if abs(got - fd) > 1e-3 * scale + 1e-6 * abs(lp):
            # A max / min whose winner changes within h (a near tie) is not differentiable
            # there: check the one-sided differences bracket the engine's value.
            l0 = float(np.sum(g64 * self.reference(x, w)))
            lo, hi = sorted(((lp - l0) / h, (l0 - lm) / h))
            if not (self.spec.family in ("max", "min")
                    and lo - 1e-3 * scale <= got <= hi + 1e-3 * scale):
                raise AssertionError(f"{who}: <grad, t> = {got!r}, finite differences {fd!r} "
                                     f"(scale {scale:.3g})")

    def check_jvp(self) -> None:
        import jax

        self._float_only()
        if not self.spec.jvp:
            raise Skip("documented: xnor / adder gradients and custom_vjp combines are "
                       "reverse-only")
        tx = self.cotangent(self.x.shape)
        tw = self.cotangent(self.w.shape)

        def build(e: str) -> Any:
            f = self.fn(e)
            return jax.jit(lambda a, b, u, v: jax.jvp(f, (a, b), (u, v)))

        got = self.run_engines(build, self.x, self.w, tx, tw)
        self.engines_agree(got, "jvp")
        self.tangent_differences(got, tx, tw)
        y, ty = got["xla"]
        g = self.cotangent(y.shape)
        for e in got:
            f = self.fn(e)
            dx, dw = (np.asarray(v, np.float64) for v in
                      jax.jit(lambda a, b, c, f=f: jax.vjp(f, a, b)[1](c))(self.x, self.w, g))
            lhs = float(np.sum(np.asarray(g, np.float64) * np.asarray(got[e][1], np.float64)))
            rhs = float(np.sum(dx * np.asarray(tx, np.float64))
                        + np.sum(dw * np.asarray(tw, np.float64)))
            scale = float(np.sum(np.abs(dx * np.asarray(tx, np.float64)))
                          + np.sum(np.abs(dw * np.asarray(tw, np.float64)))) + 1e-6
            if not (math.isnan(lhs) and math.isnan(rhs)) and lhs != rhs and not (
                    abs(lhs - rhs) <= 20 * self.eps() * scale * 10):
                raise AssertionError(f"jvp {e}: <g, J t> = {lhs!r} but <J^T g, t> = {rhs!r}")

    def tangent_differences(self, got: dict[str, Any], tx: np.ndarray, tw: np.ndarray) -> None:
        """Each engine's tangent against the central difference of the float64 reference,
        element by element, where the one-sided differences agree (no kink within the step).

        Smooth data only (normal / offset / far), sums and logsumexp in every float dtype (the
        low-precision tangents: products and weights ``exp(c - y)`` in float32), max / min in
        float32 / float64 (a bf16 / f16 product rounds and may tie where the float64 ones do
        not, and the winner's share is then split)."""
        fam = self.spec.family
        if not (self.spec.exact_grad and self.data in ("normal", "offset", "far")) or (
                fam in ("max", "min") and self.dtype not in ("float32", "float64")):
            return
        x = np.asarray(self.x, np.float64)
        w = np.asarray(self.w, np.float64)
        t_x = np.asarray(tx, np.float64)
        t_w = np.asarray(tw, np.float64)
        h = 1e-6 * max(1.0, float(np.max(np.abs(x), initial=0.0)),
                       float(np.max(np.abs(w), initial=0.0)))
        yp = self.reference(x + h * t_x, w + h * t_w)
        ym = self.reference(x - h * t_x, w - h * t_w)
        y0 = self.reference(x, w)
        with np.errstate(all="ignore"):
            fd = (yp - ym) / (2 * h)
            left, right = (y0 - ym) / h, (yp - y0) / h
            fin = np.isfinite(fd) & np.isfinite(left) & np.isfinite(right)
            scale = float(np.max(np.abs(fd[fin]), initial=0.0)) + 1e-30
            smooth = fin & (np.abs(left - right) <= 1e-4 * (np.abs(fd) + scale))
        # The output's dtype bounds a low-precision tangent (f16 overflows past 65504).
        smooth &= np.abs(fd) < float(np.finfo(np.float32).max if self.dtype != "float16"
                                     else 65504.0) / 4
        eps = self.eps()
        acc_eps = 2.0**-23 if self.dtype in ("bfloat16", "float16") else eps
        k = self.prob["terms"] + 2
        # Terms' tangents are bounded by the operands' and the tangents' magnitudes; a
        # logsumexp's weights exp(c - y) carry eps * |y| of relative error each.
        mx, mw = (float(np.max(np.abs(v), initial=0.0)) for v in (x, w))
        mtx, mtw = (float(np.max(np.abs(v), initial=0.0)) for v in (t_x, t_w))
        dterm = {"mul": mtx * mw + mx * mtw, "add": mtx + mtw,
                 "sq": 2 * (mx + mw) * (mtx + mtw), "one": 0.0}[self.spec.term]
        with np.errstate(all="ignore"):
            ymax = float(np.max(np.abs(y0[np.isfinite(y0)]), initial=0.0))
        rel = 4 * acc_eps * k + (8 * acc_eps * (ymax + 1) if fam == "lse" else 0.0)
        tol = 4 * eps * np.abs(fd) + rel * dterm + 1e-6 * scale
        for e, (_, ty) in got.items():
            ty = np.asarray(ty, np.float64)
            with np.errstate(invalid="ignore"):
                bad = smooth & ~(np.abs(ty - fd) <= tol)
            if bad.any():
                i = tuple(np.argwhere(bad)[0])
                raise AssertionError(
                    f"jvp {e} vs finite differences: {int(bad.sum())} of {int(smooth.sum())} "
                    f"smooth values differ, first at {i}: {ty[i]!r} vs {fd[i]!r} "
                    f"(tolerance {tol[i]:.3g})")

    def check_export(self) -> None:
        """A ``jax.export`` round trip of the forward (and the VJP for floats) on both engines:
        the deserialized call gives the jitted call's bits."""
        import jax

        import jaxconv

        calls: list[tuple[str, Callable[[str], Any], tuple[Any, ...]]] = [
            ("forward", lambda e: jax.jit(self.fn(e)), (self.x, self.w))]
        if not self.is_int:
            y = np.asarray(jax.jit(self.fn("xla"))(self.x, self.w))
            g = self.cotangent(y.shape)

            def vjp(e: str) -> Any:
                f = self.fn(e)
                return jax.jit(lambda a, b, c: jax.vjp(f, a, b)[1](c))
            calls.append(("vjp", vjp, (self.x, self.w, g)))
        for name, build, args in calls:
            for e in ("xla", "native"):
                f = build(e)
                try:
                    direct = f(*args)
                except ValueError as err:
                    if "does not serve" in str(err):
                        continue
                    raise
                exp = jax.export.export(f, disabled_checks=jaxconv.export_disabled_checks())(
                    *args)
                back = jax.export.deserialize(exp.serialize())
                for a, b in zip(_leaves(back.call(*args)), _leaves(direct), strict=True):
                    self.check_close(a, b, f"export {name} {e}: round trip vs jit",
                                     bitwise=True)

    def check_sharded(self) -> None:
        """Two examples over two devices: ``shard_map`` (forward; for floats the VJP, the
        kernel gradient summed over devices) and ``jit`` of a ``vmap`` over a batch-sharded
        input, against unsharded calls on the same engine."""
        import jax
        from jax.sharding import Mesh, NamedSharding
        from jax.sharding import PartitionSpec as P

        if len(jax.devices()) < 2:
            return
        mesh = Mesh(np.asarray(jax.devices()[:2]), ("d",))
        xs = np.stack([self.x, _data(self.rng, list(self.x.shape), self.data, self.np_dtype,
                                     self.spec.term).astype(self.np_dtype)])
        bitwise = self.spec.family in ("max", "min") or self.is_int
        for e in ("xla", "native"):
            f = self.fn(e)
            one = jax.jit(f)
            try:
                loop = np.stack([np.asarray(one(xs[i], self.w)) for i in range(2)])
            except ValueError as err:
                if "does not serve" in str(err):
                    continue
                raise
            sm = jax.jit(jax.shard_map(lambda a, b, f=f: f(a[0], b)[None], mesh=mesh,
                                       in_specs=(P("d"), P()), out_specs=P("d")))
            self.check_close(sm(xs, self.w), loop, f"shard_map {e} vs unsharded",
                             bitwise=bitwise)
            xs_d = jax.device_put(xs, NamedSharding(mesh, P("d")))
            vm = jax.jit(jax.vmap(f, in_axes=(0, None)))(xs_d, self.w)
            self.check_close(vm, loop, f"sharded vmap {e} vs unsharded", bitwise=bitwise)
            if self.is_int:
                continue
            g = self.cotangent(loop.shape)

            def local(a: Any, b: Any, c: Any, f: Any = f) -> Any:
                dx, dw = jax.vjp(f, a[0], b)[1](c[0])
                return dx[None], dw
            dxs, dw = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P("d"), P(), P("d")),
                                            out_specs=(P("d"), P())))(xs, self.w, g)
            vjp1 = jax.jit(lambda a, b, c, f=f: jax.vjp(f, a, b)[1](c))
            parts = [vjp1(xs[i], self.w, g[i]) for i in range(2)]
            for i in range(2):
                self.check_close(dxs[i], parts[i][0], f"shard_map vjp {e} dx[{i}] vs unsharded")
            dw_sum = (np.asarray(parts[0][1], np.float64) + np.asarray(parts[1][1], np.float64))
            self.check_close(dw, dw_sum, f"shard_map vjp {e} dw vs unsharded sum")

    def _batched(self) -> tuple[np.ndarray, np.ndarray, bool]:
        b = int(self.rng.integers(2, 4))
        xs = np.stack([self.x] + [_data(self.rng, list(self.x.shape), self.data,
                                        self.np_dtype, self.spec.term).astype(self.np_dtype)
                                  for _ in range(b - 1)])
        both = self.rng.random() < 0.5
        ws = np.stack([self.w] + [_data(self.rng, list(self.w.shape), self.data,
                                        self.np_dtype, self.spec.term).astype(self.np_dtype)
                                  for _ in range(b - 1)]) if both else self.w
        return xs, ws, both

    def check_vmap(self) -> None:
        import jax

        xs, ws, both = self._batched()
        in_axes = (0, 0 if both else None)
        got = self.run_engines(lambda e: jax.jit(jax.vmap(self.fn(e), in_axes=in_axes)),
                               xs, ws)
        bitwise = self.spec.family in ("max", "min") or self.is_int
        for e, y in got.items():
            f = jax.jit(self.fn(e))
            loop = np.stack([np.asarray(f(xs[i], ws[i] if both else ws))
                             for i in range(xs.shape[0])])
            self.check_close(y, loop, f"vmap {e} vs loop", bitwise=bitwise)
        self.engines_agree(got, "forward")

    def check_vmap_grad(self) -> None:
        import jax

        self._float_only()
        xs, ws, both = self._batched()
        in_axes = (0, 0 if both else None)
        y = np.asarray(jax.jit(jax.vmap(self.fn("xla"), in_axes=in_axes))(xs, ws))
        g = self.cotangent(y.shape)

        def build(e: str) -> Any:
            f = self.fn(e)

            def one(a: Any, b: Any, c: Any) -> Any:
                return jax.vjp(f, a, b)[1](c)
            return jax.jit(jax.vmap(one, in_axes=(0, in_axes[1], 0)))

        got = self.run_engines(build, xs, ws, g)
        self.engines_agree(got, "vmap_grad")
        for e, (dxs, dws) in got.items():
            f = self.fn(e)
            one = jax.jit(lambda a, b, c, f=f: jax.vjp(f, a, b)[1](c))
            for i in range(xs.shape[0]):
                dx, dw = one(xs[i], ws[i] if both else ws, g[i])
                self.check_close(dxs[i], dx, f"vmap_grad {e} dx[{i}] vs loop")
                self.check_close(dws[i], dw, f"vmap_grad {e} dw[{i}] vs loop")


def _leaves(t: Any) -> list[Any]:
    import jax

    return jax.tree.leaves(t)


# --------------------------------------------------------------------------------------------
# Driver.
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _ARGS.parse_args(argv)
    import jax

    if args.x64:
        jax.config.update("jax_enable_x64", True)
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)
    import jax.numpy as jnp

    import jaxconv

    specs = _specs(jnp, jaxconv)
    extras = None if args.no_extras else _extra_specs(jnp, jaxconv)
    recent = None if args.no_recent else _recent_specs(jnp, jaxconv)
    if args.replay is not None:
        ex = Example(args.replay, specs, args.x64, args.transform, extras, recent)
        print(json.dumps(ex.describe(), indent=1))
        ex.run()
        print("ok" + (f" (native refused: {ex.native_refused})" if ex.native_refused else ""))
        if not args.no_route:
            r = ex.route()
            print(json.dumps(r, indent=1))
            if r["mismatch"]:
                raise AssertionError("; ".join(r["mismatch"]))
        return 0
    seed0 = args.seed if args.seed is not None else int(time.time()) % 10**6 * 1000
    stop = time.monotonic() + 60 * args.minutes
    counts: collections.Counter[str] = collections.Counter()
    outcome: collections.Counter[str] = collections.Counter()
    extra_counts: collections.Counter[str] = collections.Counter()
    failures = 0
    routes: list[dict[str, Any]] = []
    i = 0
    while time.monotonic() < stop and i < args.examples:
        seed = seed0 + i
        i += 1
        try:
            ex = Example(seed, specs, args.x64, args.transform, extras, recent)
        except Skip:
            outcome["no geometry"] += 1
            continue
        counts[ex.category()] += 1
        for flag in ("focus", "export", "sharded", "recent"):
            if getattr(ex, flag):
                extra_counts[getattr(ex, flag) if flag in ("focus", "recent") else flag] += 1
        t0 = time.monotonic()
        try:
            try:
                ex.run()
                outcome["native refused" if ex.native_refused else "passed"] += 1
            except Skip as e:
                outcome[f"skipped: {e}"] += 1
            if not args.no_route:
                r = ex.route()
                routes.append(dict(seed=seed, op=ex.spec.name, dtype=ex.dtype,
                                   kind=ex.prob["kind"], transform=ex.transform,
                                   refused=ex.native_refused, seconds=round(
                                       time.monotonic() - t0, 2), **r))
                if r["mismatch"]:
                    raise AssertionError("route: " + "; ".join(r["mismatch"]))
        except Exception as e:  # noqa: BLE001 - every failure is recorded, the run goes on
            failures += 1
            outcome["FAILED"] += 1
            rec = dict(ex.describe(), error=f"{type(e).__name__}: {e}"[:2000],
                       where=traceback.format_exc(limit=-3)[-1500:], x64=args.x64)
            print(f"FAIL seed={seed} {ex.category()} op={ex.spec.name}: "
                  f"{type(e).__name__}: {str(e)[:300]}", flush=True)
            with open(args.log, "a") as fh:
                fh.write(json.dumps(rec) + "\n")
        if i % 25 == 0:
            print(f"[{i} examples, {failures} failures]", flush=True)
    print(f"\n{i} examples from seed {seed0} ({'x64' if args.x64 else 'x32'}), "
          f"{failures} failures")
    for k, v in sorted(outcome.items()):
        print(f"  {k}: {v}")
    by_transform: collections.Counter[str] = collections.Counter()
    by_family: collections.Counter[str] = collections.Counter()
    by_dtype: collections.Counter[str] = collections.Counter()
    by_data: collections.Counter[str] = collections.Counter()
    by_kind: collections.Counter[str] = collections.Counter()
    for cat, n in counts.items():
        t, kind, fam, dt, data = cat.split("/")
        by_transform[t] += n
        by_kind[kind] += n
        by_family[fam] += n
        by_dtype[dt] += n
        by_data[data] += n
    for title, c in (("transform", by_transform), ("product", by_kind), ("reduce", by_family),
                     ("dtype", by_dtype), ("data", by_data), ("extras", extra_counts)):
        print(f"  by {title}: " + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    if routes:
        _route_summary(routes, args.engines)
    return 1 if failures else 0


def _route_summary(routes: list[dict[str, Any]], path: str) -> None:
    """Appends each example's route (`Example.route`) to ``path`` as JSON lines and prints
    which engine ran how often, and a table of the reasons ``engine="auto"`` did not run the
    native engine's forward (``explain``'s), with the ops and dtypes they came from.

    Args:
        routes: one record per example (seed, op, dtype, ``Example.route``'s fields).
        path: the JSON lines file.
    """
    with open(path, "a") as fh:
        for r in routes:
            fh.write(json.dumps(r) + "\n")
    ran = collections.Counter(f"{r['forward']}/{r['backward'] or '-'}" for r in routes)
    print("  engine='auto' ran (forward/backward): "
          + ", ".join(f"{k} {v}" for k, v in ran.most_common()))
    refused = collections.Counter(r["refused"] is not None for r in routes)
    print(f"  engine='native' refused {refused[True]} of {len(routes)} examples")
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in routes:
        if r["forward"] == "xla":
            why = r["reason"] or ("a lax rewrite" if r["op"].split("[")[0] in _LAX_OPS
                                  else "(no reason given)")
            reasons[why][f"{r['op']}:{r['dtype']}"] += 1
    if reasons:
        print("  why engine='auto' ran the XLA engine's forward (jaxconv.explain):")
        for why, c in sorted(reasons.items(), key=lambda kv: -sum(kv[1].values())):
            print(f"    {sum(c.values()):4d}  {why}\n          "
                  + ", ".join(f"{k} {v}" for k, v in c.most_common()))
    print(f"  routes appended to {path}")


if __name__ == "__main__":
    sys.exit(main())

"""A model summary: each layer's op and quantizers, binary parameters, memory float vs packed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flax import nnx

from jaxconv._src.core.algebra import Op
from jaxconv._src.layers.packed import PackedKernel, _is_sign


def _name(q: Any) -> str:
    """A quantizer's name for the table (``"-"`` for none).

    Args:
        q: the quantizer, ``None`` for none.

    Returns:
        Its name (that of the function a ``functools.partial`` wraps).
    """
    if q is None:
        return "-"
    base = getattr(q, "func", q)
    return getattr(base, "__name__", type(base).__name__)


def _packed_bytes(kernel_shape: tuple[int, ...]) -> int:
    """Bytes of a kernel ``(*window, I, O)`` packed to one bit, 32 in-features per word."""
    *window, i, o = kernel_shape
    return math.prod(window) * math.ceil(i / 32) * 4 * o


def _rows(model: nnx.Module) -> list[dict[str, Any]]:
    """One row per module of ``model`` that holds variables.

    Args:
        model: the nnx model.

    Returns:
        Dicts with the path, layer type, op, quantizers, parameter and binary counts, and the
        bytes as float and as packed.
    """
    rows = []
    for path, node in nnx.graph.iter_graph(model):
        if not isinstance(node, nnx.Module):
            continue
        variables = {k: v for k, v in vars(node).items() if isinstance(v, nnx.Variable)}
        if not variables:
            continue
        op = getattr(node, "op", None)
        kq = getattr(node, "kernel_quantizer", None)
        kernel = variables.get("kernel")
        params = binary = float_bytes = packed_bytes = 0
        for var in variables.values():
            value = np.asarray(var[...]) if var[...] is not None else None
            if value is None:
                continue
            if isinstance(var, PackedKernel):
                # Already packed: (*window, words, O), 32 in-features per uint32 word.
                per_group = getattr(node, "in_features", 32 * value.shape[-2]) // getattr(
                    node, "feature_group_count", 1)
                n = math.prod(value.shape[:-2]) * per_group * value.shape[-1]
                params += n
                binary += n
                float_bytes += n * 4
                packed_bytes += value.nbytes
                continue
            params += value.size
            float_bytes += value.nbytes
            is_binary_kernel = var is kernel and isinstance(op, Op) and value.ndim >= 2 and (
                _is_sign(kq) if kq is not None else op.binary)
            if is_binary_kernel:
                binary += value.size
                packed_bytes += _packed_bytes(value.shape)
            else:
                packed_bytes += value.nbytes
        rows.append({
            "path": "/".join(map(str, path)) or "<model>", "layer": type(node).__name__,
            "op": op.display_name if isinstance(op, Op) else ("xnor" if any(
                isinstance(v, PackedKernel) for v in variables.values()) else "-"),
            "input_quantizer": _name(getattr(node, "input_quantizer", None)),
            "kernel_quantizer": _name(kq), "params": params, "binary": binary,
            "float_bytes": float_bytes, "packed_bytes": packed_bytes,
        })
    return rows


def summary(model: nnx.Module) -> str:
    """A table of ``model``'s layers: op, quantizers, binary parameters and memory.

    One row per module holding parameters (or other variables, e.g. batch statistics):
    its path, type, op and quantizers (``-``: none), its parameter count, how many of them
    are binary (kernels quantized by a sign quantizer, or under ``op="xnor"``), and its
    memory with float parameters and with binary kernels packed to one bit (as
    `jaxconv.packed.pack_model` stores them: 32 in-features per ``uint32`` word).

    Args:
      model: an ``nnx.Module``.

    Returns:
      The table, as text, with a total row.

    Example:
      >>> from flax import nnx
      >>> import jaxconv
      >>> model = jaxconv.nnx.Conv(64, 64, (3, 3), op="xnor", use_bias=False,
      ...                          rngs=nnx.Rngs(0))
      >>> print(jaxconv.nnx.summary(model))  # doctest: +NORMALIZE_WHITESPACE
      path     layer op   input_q kernel_q params binary float KiB packed KiB
      <model>  Conv  xnor -       -         36864  36864     144.0        4.5
      total                                 36864  36864     144.0        4.5
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"`summary`: `model` must be an nnx.Module, got {type(model)!r}.")
    rows = _rows(model)
    head = ("path", "layer", "op", "input_q", "kernel_q", "params", "binary", "float KiB",
            "packed KiB")
    table = [[r["path"], r["layer"], r["op"], r["input_quantizer"], r["kernel_quantizer"],
              str(r["params"]), str(r["binary"]), f"{r['float_bytes'] / 1024:.1f}",
              f"{r['packed_bytes'] / 1024:.1f}"] for r in rows]
    total = ["total", "", "", "", "", str(sum(r["params"] for r in rows)),
             str(sum(r["binary"] for r in rows)),
             f"{sum(r['float_bytes'] for r in rows) / 1024:.1f}",
             f"{sum(r['packed_bytes'] for r in rows) / 1024:.1f}"]
    cells = [list(head), *table, total]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    right = {5, 6, 7, 8}
    lines = [" ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in cells]
    return "\n".join(lines)

"""``einsum`` over any `jaxconv.Op`: semiring einsum (max-plus, min-plus, log, yours).

The semantics are those of torch-semiring-einsum (and of jax#37986's request): for an
equation ``"ij,jk->ik"``

    out[i, k] = REDUCE over every summed index (j) of
                combine(...combine(combine(A[i, j], B[j, k]), C[...])...)

i.e. the operands are folded with ``combine`` and every index that is not in the output is
reduced with the op's ``reduce``. An index that appears in one operand only and not in the
output is reduced too (``"ij->i"`` with max-plus is ``max_j A[i, j]``); a repeated index in
one operand takes the diagonal (``"ii->i"``).

The work is a sequence of pairwise contractions in an order chosen by
``opt_einsum.contract_path``; each pairwise contraction is a `jaxconv.dot_general`
with the same ``op`` (memory-bounded, with the op's gradient rules). Splitting the fold into
pairwise contractions, and reducing an index owned by one operand before the contraction,
is exact when the op is a *semiring*: ``combine`` associative and commutative and
distributing over ``reduce`` (standard, max_plus, min_plus, max_min, min_max, log and
e.g. a user's max-times). With one or two operands any op is computed exactly as defined
above (an index owned by one operand is then contracted together with the other operand,
broadcast along it, unless the op is a known semiring). Three or more operands need a
semiring: built-in ops that are not (``xnor``, ``adder``, ``l1``, ``l2``, kernel ops with a
``post`` map) raise ``ValueError``; a user op is trusted to be one.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import opt_einsum
from opt_einsum import parser

from jaxconv._src.conv import dot_general
from jaxconv._src.core import algebra, validation
from jaxconv._src.core.algebra import Op
from jaxconv._src.core.capabilities import accumulation_dtype
from jaxconv._src.core.ops import resolve, standard

Array = jax.Array

def is_semiring(op: Op) -> bool | None:
    """Whether ``op`` is a semiring, as it declares (``Op.semiring``).

    Args:
      op: the product.

    Returns:
      True, False, or None (undeclared, e.g. a user op); an op with a post map is not.

    Example:
      >>> import jaxconv
      >>> is_semiring(jaxconv.ops.max_plus)
      True
    """
    if op.post is not None:
        return False
    return op.semiring


def _reduce_axes(op: Op, a: Array, axes: tuple[int, ...]) -> Array:
    """Reduces ``axes`` of ``a`` with ``op.reduce`` (NaN propagating for max/min).

    Args:
        op: the op (its reduce and accumulation dtype).
        a: the array.
        axes: the axes to reduce.

    Returns:
        ``a`` reduced over ``axes``, in ``a``'s dtype.
    """
    if not axes:
        return a
    keep = [d for d in range(a.ndim) if d not in axes]
    moved = jnp.transpose(a, keep + list(axes))
    flat = moved.reshape(*moved.shape[: len(keep)], -1)
    acc = accumulation_dtype(op, a.dtype, None)
    if flat.shape[-1] == 0:
        return jnp.broadcast_to(algebra.identity_value(op, acc), flat.shape[:-1])
    out = algebra.reduce_last(op, flat, acc)
    if op.reduce in ("max", "min") and jnp.issubdtype(flat.dtype, jnp.floating):
        # XLA's CPU max/min reductions can drop NaN; NaN in, NaN out.
        out = jnp.where(jnp.any(jnp.isnan(flat), axis=-1), jnp.nan, out)
    return out.astype(a.dtype)


def _diagonals(a: Array, term: str) -> tuple[Array, str]:
    """Takes the diagonal of every index repeated within one operand.

    Args:
        a: one operand.
        term: its subscripts.

    Returns:
        The operand and its subscripts, each index once (a diagonal's index last).
    """
    while True:
        seen: dict[str, int] = {}
        for pos, ch in enumerate(term):
            if ch in seen:
                i, j = seen[ch], pos
                a = jnp.diagonal(a, axis1=i, axis2=j)  # the diagonal becomes the last axis
                term = term[:i] + term[i + 1 : j] + term[j + 1 :] + ch
                break
            seen[ch] = pos
        else:
            return a, term


def _contract_pair(
    op: Op, a: Array, ta: str, b: Array, tb: str, keep: set[str], exact_broadcast: bool,
    dg_kwargs: dict[str, Any],
) -> tuple[Array, str]:
    """One pairwise contraction by ``dot_general``; returns the result and its indices.

    Args:
        op: the op.
        a: the first operand.
        ta: its subscripts.
        b: the second operand.
        tb: its subscripts.
        keep: the indices that stay (in the output or in a later operand).
        exact_broadcast: contract an index that only one operand has against the other
            broadcast along it (exact for any op) instead of reducing it first.
        dg_kwargs: the keywords of each ``dot_general``.

    Returns:
        The result and its subscripts.
    """
    only_a = [c for c in ta if c not in tb and c not in keep]
    only_b = [c for c in tb if c not in ta and c not in keep]
    if exact_broadcast:
        # Exact fold semantics for any op: an index owned by one operand is contracted with
        # the other operand broadcast along it.
        for c in only_a:
            b = jnp.broadcast_to(b[..., None], (*b.shape, a.shape[ta.index(c)]))
            tb = tb + c
        for c in only_b:
            a = jnp.broadcast_to(a[..., None], (*a.shape, b.shape[tb.index(c)]))
            ta = ta + c
    else:
        a = _reduce_axes(op, a, tuple(ta.index(c) for c in only_a))
        ta = "".join(c for c in ta if c not in only_a)
        b = _reduce_axes(op, b, tuple(tb.index(c) for c in only_b))
        tb = "".join(c for c in tb if c not in only_b)
    shared = [c for c in ta if c in tb]
    batch = [c for c in shared if c in keep]
    contract = [c for c in shared if c not in keep]
    if not contract:
        # No contraction: the elementwise combine of the broadcast operands (an outer product).
        out_terms = batch + [c for c in ta if c not in batch] + [c for c in tb if c not in ta]
        sizes = {**{c: a.shape[i] for i, c in enumerate(ta)},
                 **{c: b.shape[i] for i, c in enumerate(tb)}}
        shape = tuple(sizes[c] for c in out_terms)

        def expand(x: Array, t: str) -> Array:
            perm = [t.index(c) for c in out_terms if c in t]
            x = jnp.transpose(x, perm)
            present = [c for c in out_terms if c in t]
            idx = tuple(slice(None) if c in present else None for c in out_terms)
            return jnp.broadcast_to(x[idx], shape)

        return op.combine(expand(a, ta), expand(b, tb)), "".join(out_terms)
    dnums = (
        (tuple(ta.index(c) for c in contract), tuple(tb.index(c) for c in contract)),
        (tuple(ta.index(c) for c in batch), tuple(tb.index(c) for c in batch)),
    )
    y = dot_general(a, b, dnums, op=op.replace(post=None) if op.post else op, **dg_kwargs)
    free_a = [c for c in ta if c not in shared]
    free_b = [c for c in tb if c not in shared]
    return y, "".join(batch + free_a + free_b)


def einsum(
    subscripts: str,
    *operands: Any,
    op: Op | str = standard,
    optimize: Any = "greedy",
    precision: Any = None,
    preferred_element_type: Any = None,
    engine: str = "auto",
    max_block_bytes: int | None = None,
) -> Array:
    """Einstein summation whose product is ``op`` (semiring einsum).

    ``out = REDUCE over all summed indices of combine-fold over the operands``, computed as
    pairwise `jaxconv.dot_general` contractions in the order ``opt_einsum`` chooses.
    ``op=ops.standard`` is `jax.numpy.einsum` itself. Repeated indices within an
    operand take the diagonal; ``...`` broadcasting works as in numpy. See the module notes
    for when the pairwise order is exact (any op for one or two operands, a semiring for
    three or more).

    Args:
      subscripts: the equation, e.g. ``"bij,bjk->bik"`` (implicit output allowed).
      *operands: the arrays.
      op: the product: a `jaxconv.Op` or a built-in op's name.
      optimize: the ``opt_einsum`` path strategy (``"greedy"``, ``"optimal"``, ...), or an
        explicit path (list of tuples).
      precision: passed to lax for the standard op.
      preferred_element_type: accumulation and output dtype of each contraction.
      engine: the engine of each pairwise ``dot_general``.
      max_block_bytes: bound on the bytes of one block of intermediate products.

    Returns:
      The contraction, with the output indices in the equation's order.

    Example:
      >>> import jax.numpy as jnp, jaxconv
      >>> a = jnp.array([[0., 1.], [2., 3.]]); b = jnp.array([[1., 0.], [0., 5.]])
      >>> jaxconv.einsum("ij,jk->ik", a, b, op="max_plus")      # tropical matmul
      Array([[1., 6.],
             [3., 8.]], dtype=float32)
      >>> [f"{v:.3f}" for v in jaxconv.einsum("ij->i", a, op="log")]  # logsumexp over j
      ['1.313', '3.313']
    """
    op = resolve(op)
    if not isinstance(subscripts, str):
        raise TypeError(f"`subscripts` must be a string, got {type(subscripts).__name__}.")
    if not operands:
        raise ValueError("einsum needs at least one operand.")
    arrays = [validation.as_array(f"operands[{i}]", a) for i, a in enumerate(operands)]
    arrays = [jnp.asarray(a) for a in arrays]
    if op.lax_product:
        return jnp.einsum(subscripts, *arrays, optimize=optimize, precision=precision,
                          preferred_element_type=preferred_element_type)
    try:
        in_str, out_str, _ = parser.parse_einsum_input(
            [subscripts, *[a.shape for a in arrays]], shapes=True)
    except Exception as e:  # noqa: BLE001 - reported with the argument's name
        raise ValueError(f"einsum: invalid `subscripts` {subscripts!r}: {e}") from e
    terms = in_str.split(",")
    if len(terms) != len(arrays):
        raise ValueError(
            f"einsum: `subscripts` {subscripts!r} names {len(terms)} operands, got "
            f"{len(arrays)}.")
    if len(set(out_str)) != len(out_str):
        raise ValueError(f"einsum: output indices {out_str!r} repeat an index.")
    sizes: dict[str, int] = {}
    for i, (t, a) in enumerate(zip(terms, arrays, strict=True)):
        if len(t) != a.ndim:
            raise ValueError(
                f"einsum: operand {i} has {a.ndim} dimensions (shape {a.shape}) but its "
                f"subscripts {t!r} name {len(t)}.")
        for c, s in zip(t, a.shape, strict=True):
            if sizes.setdefault(c, s) != s:
                raise ValueError(
                    f"einsum: index {c!r} has size {sizes[c]} and {s} (operand {i}, shape "
                    f"{a.shape}).")
    for c in out_str:
        if c not in sizes:
            raise ValueError(f"einsum: output index {c!r} is in no operand.")
    semiring = is_semiring(op)
    if len(arrays) > 2 and semiring is False:
        raise ValueError(
            f"einsum: op {op.display_name!r} is not a semiring (its combine does not distribute "
            "over its reduce, or it has a post map), so a contraction of more than two operands "
            "cannot be split into pairwise products; contract two operands at a time.")
    dg_kwargs = dict(precision=precision, preferred_element_type=preferred_element_type,
                     engine=engine, max_block_bytes=max_block_bytes)
    exact_broadcast = len(arrays) == 2 and semiring is not True

    items: list[tuple[Array, str]] = [_diagonals(a, t) for a, t in zip(arrays, terms, strict=True)]
    if len(items) == 1:
        a, t = items[0]
        y = _reduce_axes(op, a, tuple(i for i, c in enumerate(t) if c not in out_str))
        t = "".join(c for c in t if c in out_str)
    else:
        eq = ",".join(t for _, t in items) + "->" + out_str
        path, _ = opt_einsum.contract_path(
            eq, *[a.shape for a, _ in items], shapes=True, optimize=optimize)
        for step in path:
            picked = [items[i] for i in step]
            for i in sorted(step, reverse=True):
                items.pop(i)
            rest = set(out_str).union(*[set(t) for _, t in items])
            a, ta = picked[0]
            if len(picked) == 1:
                keep = rest
                y1 = _reduce_axes(op, a, tuple(i for i, c in enumerate(ta) if c not in keep))
                items.append((y1, "".join(c for c in ta if c in keep)))
                continue
            for k, (b, tb) in enumerate(picked[1:], start=1):
                later = rest.union(*[set(t) for _, t in picked[k + 1 :]])
                a, ta = _contract_pair(op, a, ta, b, tb, later, exact_broadcast, dg_kwargs)
            items.append((a, ta))
        (y, t), = items
        y = _reduce_axes(op, y, tuple(i for i, c in enumerate(t) if c not in out_str))
        t = "".join(c for c in t if c in out_str)
    y = jnp.transpose(y, [t.index(c) for c in out_str])
    if op.post is not None:
        y = op.post(y)
    return y

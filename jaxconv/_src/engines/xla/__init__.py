"""The generic XLA engine: any ``Op`` as a loop over kernel taps, tiled to a memory bound.

It implements the core's engine protocol (`jaxconv._src.core.engine`): `forward`,
`backward` (the transpose of the tangent, reverse mode) and `tangent` (forward
mode), each the lowering (`jaxconv._src.core.lowering`) of one of the core's primitives
(`jaxconv._src.core.primitive`), whose batching rules (`jaxconv._src.core.batching`) fold
``vmap`` into the problem. It serves every op on every platform.

One module per idea: `common` (configuration, shared helpers), `forward` (the tap loop),
`nan` (NaN restoration for max/min), `backward` (the exact backward), `winner` (the max/min
backward by winner index), `log` (the log semiring), `forward_mode` (tangents), `engine`
(the protocol, registered as ``"xla"``). Standard products and rewrites are the core's
(`jaxconv._src.core.products`).

Layout inside the engine is canonical: ``x`` is ``(N, *spatial, C)`` and ``w`` is
``(*window, I, O)`` with ``C = G * I`` and ``O = G * Og`` for ``G`` feature groups. A dense
product is the same problem with no spatial dimensions and one tap.

Forward: for every kernel tap the input is sliced with the tap's offset and the strides (no
im2col tensor is built), the products ``combine(x, w)`` of shape ``(rows, G, Og, I)`` are
reduced over the input channels ``I`` (the innermost axis: XLA CPU fuses the broadcast, the
combine and the reduction into one kernel) and the taps' partial results are accumulated
with the reduce's binary form. The batch is cut into blocks of whole images whose products
fit ``max_block_bytes``; blocks and taps are one rolled loop over their pairs (nested loops
are twice the loop code to compile: XLA CPU's compile time is mostly LLVM compiling each
kernel, so this engine keeps the number of distinct kernels low). A user's multiply-and-add
tap is a matrix product.

Padding: with ``op.pad_value is None`` padded cells (and ``lhs_dilation`` holes) are skipped:
they hold 0 and a static mask replaces every padded tap's partial result by the identity (a
`dominated_fill` would need no mask, but a non-finite kernel entry turns it into NaN, and it
measured no faster). With a pad value the cells hold it and go through ``combine``.

The taps are a rolled loop (dynamic slices at each tap's offset), so the compiled code does
not grow with the window.

Max/min have no branch on the values: XLA CPU's vectorised max reductions drop NaN, so the
outputs with a NaN product are found by a native sum-convolution of 0/1 indicators
(`_nan_outputs`, in a loop whose trip count is 0 unless the operands hold the values that
make a NaN product: a NaN, or both infinities for ``x + w``) and set to NaN; the padding of
the tap loop is masked (no dominated fill, which a non-finite kernel entry would turn into
NaN).
Nor do they order signed zeros: where an operand can make a ``-0`` product, a second loop
with a zero trip count otherwise recomputes each zero result's sign from its window
(`zeros.fix_zero_signs`).
``ops.log`` still chooses from the values (``lax.cond``; under ``vmap`` the primitives fold
the mapped axis into the problem, so the predicate stays a scalar): a native convolution in
exp space unless a window needs the exact tap path (`log.forward`: the core's
`log_products` with the tap engine as its exact path), and its backward follows the same test.

Backward passes for sum, max, min and logsumexp are written by hand: they
keep only ``x``, ``w`` and the output and recompute the products, pushing the cotangent
through ``combine``'s own VJP (so AdderNet's custom rule applies). No product tensor is
stored: per tap, the input gradient is a loop over the output channels (an elementwise
update that XLA fuses into one vectorised loop), the kernel gradient a scan over blocks of
positions, and max/min first count each window's winners in a loop over taps and chunks of
output channels (the gradient is split equally among ties, as ``jax.grad(jnp.max)`` does).
Other reduces are differentiated automatically, block by block under ``jax.checkpoint``.

Faster backward paths where the op allows them:

- Separable sums (`separable_kind`): a user's ``x * w`` runs forward and backward as one
  native convolution of the padded input; AdderNet's kernel gradient ``sum g * (x - w)`` is
  the native convolution's kernel gradient minus ``w`` times the sum of the cotangent over
  each tap's positions, and only its clipped input gradient keeps the loop above.
- Max/min (`_winner_backward`; a pad value, or identity padding held as 0 with the padded
  taps masked statically): one fused reduction per tap writes, for each output, the sum of
  ``base + index`` over its winning products, which names the winner when there is one;
  the cotangent then goes through ``combine``'s VJP at that product and is scatter-added
  onto the input and the kernel (gathers and scatters per image: a mesh's batch and
  feature splits hold). Tied windows and infinite outputs are recomputed a few per row
  (image, output feature) at a time in a ``while_loop`` (no iteration without them) and split
  equally; there is no fallback branch.

The canonical-layout helpers (tap slices, taps-major kernels, batch blocks, padding, dtypes)
are `jaxconv._src.engines.taps`, shared with the other engines.
"""

from jaxconv._src.engines.xla.common import canonical_op as canonical_op
from jaxconv._src.engines.xla.common import dominated_fill as dominated_fill
from jaxconv._src.engines.xla.common import separable_kind as separable_kind
from jaxconv._src.engines.xla.engine import ENGINE as ENGINE
from jaxconv._src.engines.xla.engine import backward as backward
from jaxconv._src.engines.xla.engine import forward as forward
from jaxconv._src.engines.xla.engine import tangent as tangent

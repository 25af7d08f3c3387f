"""The Pallas engine: any ``Op`` as a blocked semiring matmul, for GPU (Triton) and TPU (Mosaic).

The core is a Pallas kernel for

    out[g, m, n] = REDUCE_k combine(a[g, m, k], b[g, k, n])

on a grid ``(G, M / bm, N / bn)`` whose axes are all parallel: each program owns one
``(bm, bn)`` output tile, keeps its accumulator in registers (GPU) / vregs (TPU), initialised
with the reduce's identity or with the running result of the previous taps, and walks K
inside the kernel by rank-1 steps ``acc = reduce(acc, combine(a[:, k], b[k, :]))``. Combine
and reduce are fused and no ``(bm, bk, bn)`` product is stored. K is a loop, not a grid
axis: the programs of a GPU grid run concurrently, so accumulating over a grid axis would
race. Only the binary form of the reduce is used, so any reduce works (``sum``, ``max``,
``min``, ``prod``, ``logsumexp``, a user's ``myadd``) and NaN propagates.

**One jitted function for every platform.** The platform is chosen when the program is
lowered, never from ``jax.default_backend()``: the engine traces one variant per
platform and joins them with ``lax.platform_dependent`` (``cpu``: interpret mode; ``cuda`` /
``rocm``: Triton; ``tpu``: Mosaic), so a function lowered for another platform than the
host's (cross-lowering, ``jax.export`` for that platform -- Triton calls need
``DisabledSafetyCheck.custom_call`` there, having no compatibility guarantee --, a CPU host
driving accelerators) gets that platform's kernel. The forward and the backward each
dispatch on their own, and the values that cross between them are unpadded, so the
platforms may use different tiles.
(One lowering for several platforms at once, ``lowering_platforms=("cpu", "cuda")``, is not
supported: jax 0.10 then lowers every branch for every platform, and a compiled Pallas
kernel has no CPU lowering.)

**GPU: Triton, chosen explicitly** through ``compiler_params=pallas.triton.CompilerParams``.
jax 0.10's default GPU backend for ``pallas_call`` is Mosaic GPU, which moves every block
through shared memory with TMA copies: its global strides must be multiples of 16 bytes and
the blocks must fit the 227 KiB of shared memory, so ragged channel counts (3, 10, 27, ...)
and full-K blocks fail there, and it has no lowering for a ``custom_vjp`` combine at all.
Triton addresses global memory through pointers, loads only what the kernel indexes (a
``(bm, 1)`` column, a ``(1, bn)`` row), and accepts any stride; its one rule is that block
shapes are powers of two, which `BlockSizes` ``pow2`` meets by padding whole extents
outside the kernel. The accumulator tile (64 x 64 f32, 32 registers per thread at 4 warps)
lives in registers; nothing is staged in shared memory.

**TPU: Mosaic** with the ``(8, 128)`` layout rules: every block's last two dimensions are
multiples of ``(8, 128)`` (16 sublanes for bf16 hold, as tiles are 128 or the whole padded
extent) or the full padded extent; operands are padded outside the kernel. No kernel uses a
dynamic offset inside a block: the walked axis (K in the forward, the output features in
``dx``) is the last grid axis, ``"arbitrary"`` (the TPU runs it in order and the output
block stays resident in VMEM as the accumulator), each program walking its ``128``-wide
block with static slices (lane / sublane broadcasts); ``dw`` reduces chunks of 128 rows, one
per program, whose partial sums are added outside. Every block is at most 128 x 128, so
VMEM use does not grow with the layer.

**Combine in a kernel: primal only.** The kernels evaluate ``combine`` (and, in the backward,
combine's VJP, traced to a jaxpr outside of any kernel logic) through
``jaxconv._src.engines.primal.primal``, which replaces every ``custom_vjp`` /
``custom_jvp`` call by the computation it wraps: AdderNet's combine, a straight-through
quantizer or ``jax.nn.relu`` lower on Triton and Mosaic. Gradients come from this engine's
own backward kernels, never from differentiating inside a kernel.

The engine has the XLA engine's semantics. **On GPU (and in interpret
mode) a convolution is an implicit GEMM: every tap inside one kernel.** The padded input is
split into stride phases and flattened to rows ``(n, position)``, so that a tap is a constant
row shift of one phase; the kernel walks the taps (statically) and K inside, computing one
"virtual" output row per phase position (the few rows past the output are dropped), and a
static per-tap row mask skips taps that read padding or an ``lhs_dilation`` hole (identity
padding; ops with a ``pad_value`` pad with the value). No im2col tensor, one launch per
layer. The gradients are one kernel each too: ``dw`` has the taps as a grid axis (and chunks
of ``red`` rows, whose partial sums are added outside, so the GPU has enough programs);
``dx`` runs over the phase rows, each program walking every tap of its phase and every output
feature. **On TPU** the input is sliced per tap and each tap is one kernel call (a
``lax.scan``) whose accumulator input is the previous taps' result, with a per-row mask: the
shifted row windows of the implicit form are unaligned dynamic sublane offsets, which Mosaic
handles poorly, and the whole input would have to sit in VMEM. Feature groups are the
kernels' leading grid axis; a dense product is a conv with one tap.

The gradient kernels (the engine's backward) serve ``sum``, ``max``, ``min`` and ``logsumexp``: they
recompute ``combine`` and push the output cotangent through combine's own VJP (AdderNet's and
the STE rules apply), with the reduce's rule: ``sum`` passes ``g``; ``max``/``min`` pass
``g / count`` to the taps equal to the output (ties split equally as ``jax.grad(jnp.max)``;
the count is one more forward pass); ``logsumexp`` passes ``g * exp(c - y)`` (the softmax).
Other reduces (``prod``, user callables) run the Pallas forward and take their gradient from
the XLA engine.

Block sizes: 64 x 64 output tiles on GPU (K and N padded to powers of two, rows to a multiple
of the tile), 128 x 128 x 128 on
TPU, 8 x 8 x 8 in interpret mode (CPU), small so that tests cover several blocks and ragged
edges. On CPU the kernels run in interpret mode: correct, but slow -- the XLA and native
engines are the CPU engines; this one is for accelerators.

One module per idea: `platforms` (block sizes and backends per platform), `matmul` (the
semiring matmul kernels), `config`, `per_tap` (one call per tap, TPU), `implicit` (the
implicit GEMM, GPU), `orchestration` (forward and backward passes), `engine` (the
protocol, registered as ``"pallas"`` when first asked for, and `generic_conv`). The kernels
are apart from their differentiation, which is the core's primitive (no ``custom_vjp``).
"""

from jaxconv._src.engines.pallas.engine import ENGINE as ENGINE
from jaxconv._src.engines.pallas.engine import generic_conv as generic_conv
from jaxconv._src.engines.pallas.matmul import semiring_matmul as semiring_matmul
from jaxconv._src.engines.pallas.platforms import GPU_BLOCKS as GPU_BLOCKS
from jaxconv._src.engines.pallas.platforms import INTERPRET_BLOCKS as INTERPRET_BLOCKS
from jaxconv._src.engines.pallas.platforms import PLATFORM_BACKENDS as PLATFORM_BACKENDS
from jaxconv._src.engines.pallas.platforms import TPU_BLOCKS as TPU_BLOCKS
from jaxconv._src.engines.pallas.platforms import Backend as Backend
from jaxconv._src.engines.pallas.platforms import BlockSizes as BlockSizes
from jaxconv._src.engines.pallas.platforms import platform_backends as platform_backends

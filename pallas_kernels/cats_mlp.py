"""The CATS gated MLP for decode steps, as two Pallas (Triton) kernels.

Math (cats_jax.sparsity.gated_mlp with a threshold): a = cats_activation(x W_gate, t), i.e. SiLU
with |a| <= t zeroed; y = (a * (x W_up)) W_down. W_gate must be read in full; the win is in not
reading the rows of W_up and W_down of the zeroed neurons. cats_activation is defined here, where
the kernel applies it, and cats_jax.sparsity re-exports it (the kernels import nothing from cats_jax).

Weights are neuron-major, so that a neuron's weights are contiguous rows: w_gu = [W_gate^T; W_up^T]
[2I, H] (gate rows, then up rows: one matrix, which the dense fallback of large batches reads in
one product) and w_down [I, H] (the Flax layout already). Gate and up are transposed once, when
the model is prepared for decoding (cats_jax.decode.prepare), not per call.

1. gate_up: a program owns `rows` neurons. It reads their W_gate^T rows in full (fp32
   accumulation), applies the CATS rule, then reads the W_up^T rows of only the neurons that some
   batch row keeps (masked loads: predicated-off rows move no bytes), and writes
   h = a * u [B, I] in the activation dtype (zeros for dropped neurons): a few KB. a, u and h
   are rounded to that dtype where the model's jnp path rounds them.
2. sparse_gemv(h, w_down): skips the W_down rows where h is zero for every batch row.

int8 weights (symmetric, one fp32 scale per output channel: per row of w_gu, so each neuron's
gate and up rows have their own, and per column of w_down): the kernels read int8 rows (half the
bytes) and apply the scales to the fp32 sums after the accumulation, never dequantizing a matrix.
gate_up scales the gate before the CATS rule, which must read the real activation. At batch 1 it
sums int8 rows on int8 tensor-core dots, x taken as three int8 digits against its largest |x|
(23 bits; common.int8_digits): sm_90 code of about 1.2 instructions a weight against 5 on the
multiply-adds int8 ran before (bench.sass; decisions.md).

For B > 1 the union of the rows kept by any batch row is read; each batch row uses its own
activations. Beyond a few rows the union is nearly dense (docs/batching.md), but the kernels'
dots still read the whole MLP faster than XLA's products at 8-16 rows, where the jnp path's
product of the neuron-major [2I, H] ran slower than dense's [H, 2I] and added threshold launches
(docs/decisions.md); batches beyond `MAX_KERNEL_BATCH` take the jnp path.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    DIGIT_ROWS,
    block_along,
    call,
    check_blocks,
    convert,
    from_int8_digits,
    int8_digits,
    iota,
    kernels_enabled,
    load,
    mask2d,
    next_pow2,
    padded_batch,
)
from pallas_kernels.sparse_gemv import GatherBlocks, GemvBlocks, check_scale, keep, sparse_gemv

f32 = jnp.float32


def cats_activation(gate: jax.Array, threshold: jax.Array, factor=None) -> jax.Array:
    """SiLU then zero |a| <= threshold (factor None: the magnitude criterion) or
    |a| * factor <= threshold (the weighted criterion: factor [I], each neuron's W_down row norm);
    computed in fp32 (the threshold test must not depend on the storage dtype of the gate output).
    threshold 0 is exactly dense: it only zeroes zeros."""
    a = jax.nn.silu(gate.astype(jnp.float32))
    return jnp.where(keep(a, threshold, factor), a, 0.0)


# Decode batches up to this size use the kernels (tensor-core dots take up to 16 rows as one tile);
# larger ones take the jnp path (module docstring).
MAX_KERNEL_BATCH = 16


@dataclasses.dataclass(frozen=True)
class GateUpBlocks:
    """Batch 1 multiplies and adds elementwise (int8 weights: int8 dots of x's digits with the tiles
    as stored, which take at least int8_dots_least()); batches 2..16 use tensor-core dots on rows
    padded to 16."""
    rows: int  # neurons per program
    cols: int  # hidden columns per loop step
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_blocks(self, "rows", "cols")

    def int8_dots_least(self) -> tuple[int, int]:
        """The fewest (rows, cols) an int8 dot takes: 8 neurons a warp, 32 columns."""
        return 8 * self.num_warps, 32

    def int8_dots_fit(self) -> bool:
        rows, cols = self.int8_dots_least()
        return self.rows >= rows and self.cols >= cols


# Per padded batch size: the winners of `python -m bench.kernels --tune` on an H100 at
# H = 4096, I = 14336, 50% sparsity (docs/benchmarks.md); blocks_for fits them to other shapes.
# Batches 2-16: 128 neurons a program on 8 warps (112 programs at Mistral-7B's I, 32 KB bf16 tiles
# in 3 stages) against 32 on 4: CATS 50% decode at 2 / 4 / 8 rows 0.5-0.8% / 0.2% / 0.6% faster
# (H100; 16 rows not timed; docs/decisions.md).
TABLE = {
    1: GateUpBlocks(rows=8, cols=1024, num_warps=4, num_stages=4),
    2: GateUpBlocks(rows=128, cols=128, num_warps=8, num_stages=3),
    4: GateUpBlocks(rows=128, cols=128, num_warps=8, num_stages=3),
}


# int8 weights' own blocks per batch, where they differ from TABLE's: batch 1 on int8 dots of x's
# digits (`--int8 --tune --batch 1`, H100: 38.8 us a call against 40.1 for the best multiply-adds,
# which int8 then had; int8 CATS 50% decode 2.690 -> 2.613 ms/step; docs/decisions.md).
INT8_TABLE = {1: GateUpBlocks(rows=64, cols=256, num_warps=4, num_stages=3)}


def blocks_for(batch: int, n_hidden: int, n_neurons: int, int8: bool = False) -> GateUpBlocks:
    """The table's blocks for this batch (int8: INT8_TABLE's where it has them), fitted to the
    shape (no block longer than its axis, nor shorter than its dots take)."""
    b = INT8_TABLE[batch] if int8 and batch in INT8_TABLE else TABLE[min(next_pow2(batch), max(TABLE))]
    rows, cols = (16, 16) if batch > 1 else b.int8_dots_least() if int8 else (1, 1)
    return dataclasses.replace(
        b, rows=max(min(b.rows, next_pow2(n_neurons)), rows), cols=max(block_along(n_hidden, b.cols), cols)
    )


def kernel_pays(batch: int) -> bool:
    """Whether the model should route a decode step of `batch` rows through the kernels."""
    return kernels_enabled() and batch <= MAX_KERNEL_BATCH


def _gate_up_kernel(x_ref, w_ref, t_ref, *refs, batch, bp, blk, n_hidden, n_neurons, weighted, scaled):
    *opt, h_ref = refs  # the factors [I] if weighted, then the scales [2I] if scaled
    dot = batch > 1  # tensor-core dots on padded batch rows; batch 1: multiply-add (float weights)
    digits = scaled and not dot  # int8 at batch 1: int8 dots of x's digits
    rows, cols = blk.rows, blk.cols
    i0 = pl.program_id(0) * rows
    row_ok = iota(rows, i0) < n_neurons if n_neurons % rows else None
    batch_ok = iota(bp) < batch if bp != batch else None
    if digits:  # the digits' scale: x's largest |x| (a program reads all of x, 8 KB at H = 4096)
        hp = next_pow2(n_hidden)
        x_ok = iota(hp) < n_hidden if hp != n_hidden else None
        xs = load(x_ref.at[pl.ds(0, 1), pl.ds(0, hp)], mask=mask2d(None, x_ok))
        amax = jnp.maximum(jnp.max(jnp.abs(xs.astype(f32))), 1e-30)

    def matvec(first, row_mask):
        """[bp, rows] = x @ w_ref[first + rows of this program]^T, loading only the rows in row_mask."""

        def step(k, acc):
            c0 = pl.multiple_of(k * cols, cols)
            col_ok = iota(cols, c0) < n_hidden if n_hidden % cols else None
            w = load(w_ref.at[pl.ds(first + i0, rows), pl.ds(c0, cols)], mask=mask2d(row_mask, col_ok))
            if dot:  # int8 w converts exactly (|q| <= 127) to x's dtype
                x = load(x_ref.at[pl.ds(0, bp), pl.ds(c0, cols)], mask=mask2d(batch_ok, col_ok))
                return acc + plgpu.dot(x, convert(w, x.dtype), trans_b=True)
            x = load(x_ref.at[pl.ds(0, 1), pl.ds(c0, cols)], mask=mask2d(None, col_ok))
            if digits:
                return acc + plgpu.dot(int8_digits(x.astype(f32), amax), w, trans_b=True)
            # Batch 1, float weights: multiply-add into a [rows, cols] accumulator, reduced once after
            # the loop (one reduced first per thread to [rows, cols / 8] took half the registers but
            # ran slower: docs/decisions.md)
            return acc + w.astype(f32) * x.astype(f32)

        if digits:
            init = jnp.zeros((DIGIT_ROWS, rows), jnp.int32)
        else:
            init = jnp.zeros((bp, rows) if dot else (rows, cols), f32)
        acc = jax.lax.fori_loop(0, pl.cdiv(n_hidden, cols), step, init)
        if digits:
            acc = from_int8_digits(acc, amax)[None, :]
        elif not dot:
            acc = jnp.sum(acc, axis=1)[None, :]
        if scaled:  # int8: each row's scale, once on the fp32 sums
            acc = acc * load(opt[-1].at[pl.ds(first + i0, rows)], mask=row_ok)[None, :]
        return acc

    f = load(opt[0].at[pl.ds(i0, rows)], mask=row_ok)[None, :] if weighted else None
    # [bp, rows]; padding rows and neurons give 0. The gate is scaled before the rule reads it.
    a = cats_activation(matvec(0, row_ok), t_ref[0], f)
    live = jnp.max(jnp.abs(a), axis=0) > 0  # neurons kept by some batch row (implies row_ok)
    u = matvec(n_neurons, live)
    # a and u are rounded to the activation dtype before their product, as in the model's jnp path
    # (a.astype(x.dtype) * up_proj(x)): decoding through the kernel then gives the jnp path's tokens.
    dt = h_ref.dtype
    h = (a.astype(dt).astype(f32) * u.astype(dt).astype(f32)).astype(dt)
    plgpu.store(h_ref.at[pl.ds(0, bp), pl.ds(i0, rows)], h, mask=mask2d(batch_ok, row_ok))


def gate_up(x, w_gu, threshold, factor=None, scale=None, *, blocks: GateUpBlocks | None = None):
    """h = cats_activation(x W_gate, t, factor) * (x W_up) [B, I] in x.dtype, from w_gu = [W_gate^T; W_up^T] [2I, H].

    w_gu float (x is rounded to its dtype), or int8 with scale fp32 [2I], one per row:
    x W_gate[:, i] = (x . q[i]) * scale[i] and x W_up[:, i] = (x . q[I + i]) * scale[I + i]."""
    if x.ndim != 2 or w_gu.ndim != 2 or w_gu.shape[0] % 2 or w_gu.shape[1] != x.shape[1]:
        raise ValueError(f"gate_up: x {x.shape}, w_gu {w_gu.shape}; expected [B, H], [2I, H]")
    batch, n_hidden = x.shape
    n_neurons = w_gu.shape[0] // 2
    blk = blocks or blocks_for(batch, n_hidden, n_neurons, int8=scale is not None)
    if scale is not None and batch == 1 and not blk.int8_dots_fit():
        raise ValueError(f"gate_up: int8 at batch 1 runs int8 dots: {blk} needs rows >= 8 * num_warps and cols >= 32 "
                         f"({blk.int8_dots_least()})")
    bp = padded_batch(batch, batch > 1)
    if factor is not None and jnp.shape(factor) != (n_neurons,):
        raise ValueError(f"gate_up: factor {jnp.shape(factor)}; expected one per neuron ({n_neurons},)")
    scale = check_scale("gate_up", w_gu, scale, 2 * n_neurons)
    kernel = functools.partial(_gate_up_kernel, batch=batch, bp=bp, blk=blk, n_hidden=n_hidden, n_neurons=n_neurons,
                               weighted=factor is not None, scaled=scale is not None)
    opt = tuple(jnp.asarray(v, f32) for v in (factor, scale) if v is not None)
    return call(kernel, jax.ShapeDtypeStruct((batch, n_neurons), x.dtype), grid=(pl.cdiv(n_neurons, blk.rows),),
                num_warps=blk.num_warps, num_stages=blk.num_stages, name="cats_gate_up")(
        x if scale is not None else x.astype(w_gu.dtype), w_gu, jnp.asarray(threshold, f32).reshape(1), *opt)


def cats_mlp(x, w_gu, w_down, threshold, factor=None, scales=None, *, blocks: GateUpBlocks | None = None,
             down_blocks: GemvBlocks | GatherBlocks | None = None, finish: bool = True, zeroed=None):
    """The CATS MLP of decode rows x [B, H] with neuron-major weights w_gu [2I, H], w_down [I, H]
    (factor: None, or the weighted criterion's [I]; scales: None for float weights, or for int8
    ones (s_gu [2I], s_down [H]), gate_up's and sparse_gemv's scale): (y [B, H] in x.dtype, the
    hidden activations h [B, I], zero where dropped). finish=False: y as the down projection's
    unfinished fp32 sums (sparse_gemv's finish), for a consumer kernel to scale and round; zeroed:
    the down projection's zeroed output buffer (sparse_gemv's) or None."""
    if w_gu.shape != (2 * w_down.shape[0], w_down.shape[1]):
        raise ValueError(f"cats_mlp: w_down {w_down.shape} must be [I, H] for w_gu {w_gu.shape} = [2I, H]")
    if scales is not None and len(scales) != 2:
        raise ValueError(f"cats_mlp: scales must be the pair (s_gu [2I], s_down [H]), not {len(scales)} arrays")
    s_gu, s_down = scales or (None, None)
    h = gate_up(x, w_gu, threshold, factor, s_gu, blocks=blocks)
    return sparse_gemv(h, w_down, blocks=down_blocks, scale=s_down, finish=finish, zeroed=zeroed), h

"""Sparse-input GEMV: y = x @ W for a few rows x (decode), skipping the rows of W whose inputs are zero.

x [B, in] (B = 1..8 decode rows), W [in, out] (the Flax kernel layout, input-major: the weights of
one input channel are one contiguous row). Row r of W is read only if some batch row has
x[b, r] != 0 (the union over the batch); each batch row still multiplies its own values, zeros
included. With `threshold` the test is fused: x[b, r] := 0 where |x[b, r]| <= threshold (TEAL's
rule); without it, the inputs are already sparse (the CATS MLP's hidden activations).

Grid: (output column blocks, split-K). A program walks its share of the input rows in steps of
`rows`, loading a [rows, cols] tile of W with a per-row mask: predicated-off rows issue no memory
traffic, so skipped rows cost nothing but the mask test. Each split writes fp32 partials
[splits, B, out] that one small XLA reduction sums: deterministic, and no atomics on bf16.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import block_along, call, iota, load, mask2d, next_pow2, padded_batch

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GemvBlocks:
    rows: int  # input rows (rows of W) per loop step
    cols: int  # output columns per program
    splits: int  # programs along the input axis (split-K)
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = False  # tensor-core dot on batch rows padded to 16, instead of multiply-add


# Per padded batch size: the winners of `python -m pallas_kernels.bench --tune` on an H100 for
# the CATS down projection (in = 14336, out = 4096, 50% sparsity); blocks_for fits them to other shapes.
TABLE = {
    1: GemvBlocks(rows=32, cols=256, splits=32, num_warps=4, num_stages=3),
    2: GemvBlocks(rows=32, cols=256, splits=16, num_warps=4, num_stages=3, dot=True),
    4: GemvBlocks(rows=32, cols=256, splits=16, num_warps=4, num_stages=3, dot=True),
    8: GemvBlocks(rows=32, cols=256, splits=16, num_warps=4, num_stages=3, dot=True),
}


def blocks_for(batch: int, n_in: int, n_out: int) -> GemvBlocks:
    """The table's blocks for this batch, fitted to the shape (no block longer than its axis)."""
    b = TABLE[min(next_pow2(batch), max(TABLE))]
    rows = max(min(b.rows, next_pow2(n_in)), 16 if b.dot else 1)
    cols = max(block_along(n_out, b.cols), 16 if b.dot else 1)
    return dataclasses.replace(b, rows=rows, cols=cols, splits=max(1, min(b.splits, pl.cdiv(n_in, rows))))


def _kernel(x_ref, w_ref, t_ref, o_ref, *, batch, bp, blk, n_in, n_out, rows_per_split, thresholded):
    rows, cols = blk.rows, blk.cols
    c0 = pl.program_id(0) * cols
    split = pl.program_id(1)
    col_ok = iota(cols, c0) < n_out if n_out % cols else None
    batch_ok = iota(bp) < batch if bp != batch else None
    row_tail = (n_in % rows_per_split) != 0  # the last split runs past the end of x / W
    t = t_ref[0]

    def step(k, acc):
        r0 = pl.multiple_of(split * rows_per_split + k * rows, rows)
        row_ok = iota(rows, r0) < n_in if row_tail else None
        if blk.dot:
            x = load(x_ref.at[pl.ds(0, bp), pl.ds(r0, rows)], mask=mask2d(batch_ok, row_ok))
        else:
            # batch 1: x arrives as a column [in, 1], so a tile of it broadcasts over W's rows
            x = load(x_ref.at[pl.ds(r0, rows), pl.ds(0, 1)], mask=mask2d(row_ok, None))
        xf = x.astype(f32)
        if thresholded:
            xf = jnp.where(jnp.abs(xf) > t, xf, 0.0)
        # [rows, 1]: the weight row is needed by some batch row
        live = (jnp.max(jnp.abs(xf), axis=0) > 0)[:, None] if blk.dot else xf != 0
        w = load(w_ref.at[pl.ds(r0, rows), pl.ds(c0, cols)], mask=live if col_ok is None else live & col_ok[None, :])
        if blk.dot:
            return acc + plgpu.dot(xf.astype(w.dtype), w)  # [bp, cols]; x is exact in w's dtype
        # Batch 1: elementwise multiply-add into a [rows, cols] accumulator, reduced once at the
        # end (a cross-warp reduction per step would cost more than the loads).
        return acc + xf * w.astype(f32)

    init = jnp.zeros((bp, cols) if blk.dot else (rows, cols), f32)
    acc = jax.lax.fori_loop(0, rows_per_split // rows, step, init)
    if blk.dot:
        plgpu.store(o_ref.at[split, pl.ds(0, bp), pl.ds(c0, cols)], acc, mask=mask2d(batch_ok, col_ok))
    else:
        plgpu.store(o_ref.at[split, pl.ds(c0, cols)], jnp.sum(acc, axis=0), mask=col_ok)


def sparse_gemv(x, w, threshold=None, *, blocks: GemvBlocks | None = None, out_dtype=None):
    """y = x' @ w with x' = x (threshold None) or x * (|x| > threshold), x' rounded to w's dtype.

    x [B, in], w [in, out], threshold a scalar. Returns [B, out] in out_dtype (default x.dtype),
    accumulated in fp32. Rows of w are read only where some batch row's x' is non-zero.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"sparse_gemv: x {x.shape} and w {w.shape} do not chain as [B, in] @ [in, out]")
    batch, n_in = x.shape
    n_out = w.shape[1]
    blk = blocks or blocks_for(batch, n_in, n_out)
    if batch > 1 and not blk.dot:
        raise ValueError(f"sparse_gemv: batch {batch} needs dot=True blocks (multiply-add is for batch 1)")
    out_dtype = out_dtype or x.dtype
    x = x.astype(w.dtype)
    t = jnp.zeros((1,), f32) if threshold is None else jnp.asarray(threshold, f32).reshape(1)
    bp = padded_batch(batch, blk.dot)
    rows_per_split = pl.cdiv(pl.cdiv(n_in, blk.splits), blk.rows) * blk.rows
    splits = pl.cdiv(n_in, rows_per_split)
    kernel = functools.partial(
        _kernel, batch=batch, bp=bp, blk=blk, n_in=n_in, n_out=n_out,
        rows_per_split=rows_per_split, thresholded=threshold is not None,
    )
    if not blk.dot:  # batch 1: x as a column, partials [splits, out]
        x = x.reshape(n_in, 1)
    partials = call(
        kernel,
        jax.ShapeDtypeStruct((splits, batch, n_out) if blk.dot else (splits, n_out), f32),
        grid=(pl.cdiv(n_out, blk.cols), splits),
        num_warps=blk.num_warps,
        num_stages=blk.num_stages,
        name="sparse_gemv",
    )(x, w, t)
    return jnp.sum(partials, axis=0).reshape(batch, n_out).astype(out_dtype)

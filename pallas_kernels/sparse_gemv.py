"""Sparse-input GEMV: y = x @ W for a few rows x (decode), skipping the rows of W whose inputs are zero.

x [B, in] (B = 1..16 decode rows), W [in, out] (the Flax kernel layout, input-major: the weights of
one input channel are one contiguous row). Row r of W is read only if some batch row has
x[b, r] != 0 (the union over the batch); each batch row still multiplies its own values, zeros
included. With `threshold` the test is fused: x[b, r] := 0 where |x[b, r]| <= threshold (TEAL's
rule); without it, the inputs are already sparse (the CATS MLP's hidden activations).

Grid: (output column blocks, split-K). A program walks its share of the input rows in steps of
`rows`, loading a [rows, cols] tile of W with a per-row mask: predicated-off rows issue no memory
traffic, so skipped rows cost nothing but the mask test. Batch 1 multiplies and adds elementwise
in many short splits (more loads in flight); batches 2..16 feed tensor-core dots on rows padded
to 16. Every split atomic-adds its fp32 sums into one zeroed fp32 buffer [R, P] (`sum_shape`: the
batch rows padded to a power of two, the columns to whole blocks), which an earlier kernel can
zero (`zeroed`) and a later one can finish: no launch of its own sums splits (fp32 partials per
split cost an XLA reduction a GEMV). Never atomics on bf16.

Batch 1 can instead take the gather path (GatherBlocks), whose work scales with the kept rows
rather than with the matrix: the masked tiles above still issue every tile, test every row and
add every partial sum, which left a floor that grows with the matrix (docs/benchmarks.md).
1. compact: per output segment and chunk of `chunk` input rows, list the kept rows first, in
   order (row numbers and values), and count them; also zero the gather's fp32 output (saves XLA
   a memset launch). All chunks in parallel, deterministic.
2. gather: grid (column blocks, chunks); a program walks its chunk's kept rows in steps of
   `rows`, loading those rows of W (each a contiguous run of `cols` weights), and atomic-adds its
   fp32 sums into the output.
Step 1 can also run in the epilogue of the kernel that makes x (`Compaction`, `compact_chunk`: the
add + norm before q|k|v and gate|up, the attention's combine before o); sparse_gemv then takes x
as `Compacted` and launches the gather alone.

A gated input (the MLP's down projection): x can be the gate|up GEMV's output as its kernel left
it (fp32 sums [B, >= 2 in], with its int8 scale or None); the input is then silu(gate) * up
(`gated_input`). The compaction computes it as it reads the chunk, the masked tiles as they load
each tile's inputs, so no launch of its own does.

int8 weights (weight-only quantization, symmetric, one fp32 scale per output column:
W ~ q * scale[None, :]): the kernels read the int8 rows as they are (a kept row is half the
bytes of a bf16 one; which rows are skipped does not change) and convert each loaded tile, to
fp32 for the multiply-adds, to x's dtype (exact: |q| <= 127) for the tensor-core dots. x keeps
its own dtype, and since x @ W = (x @ q) * scale, the scale multiplies the fp32 sums once, after
the accumulation: no matrix is ever dequantized.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import (
    atomic_add,
    block_along,
    call,
    check_blocks,
    convert,
    finished,
    iota,
    kernels_enabled,
    load,
    mask2d,
    next_pow2,
    padded_batch,
)

f32 = jnp.float32

# TEAL decode steps of up to this many rows use the kernels. Rows threshold independently, so a
# batch's union of kept rows is nearly dense beyond a few rows (real text's unions are only a
# little sparser than random ones, docs/batching.md), but the kernels' dots still beat XLA's
# products there. H100, TEAL 50% against dense: 2 rows 1.341x, 8 rows 1.128x, 16 rows 1.049x on
# the kernels against 0.989x off them (docs/decisions.md).
MAX_KERNEL_BATCH = 16
# Smaller weight matrices stay with XLA, unless TUNED lists their shape: the kernels' fixed cost
# exceeded XLA's dense GEMV there (Mistral-7B's o_proj, 4096 x 4096, lost on the H100 and the H200
# with the table's blocks; docs/benchmarks.md). Tests set it to 0 to run the kernels on tiny models.
MIN_KERNEL_WEIGHTS = 20_000_000
# int8 weights take the kernels up to this many rows, thresholded or not: XLA's GEMV of an int8
# matrix converted in the product ran at a third of the read ceiling (docs/benchmarks.md). At 9-16
# rows the kernels run the tiles they run at 8 (the dots pad the rows to 16 either way).
MAX_INT8_BATCH = 16


def score(value, factor=None):
    """What a sparsity threshold is compared with, in fp32: |value| (the papers' magnitude
    criterion) or |value| * factor (the weighted criterion: factor is the L2 norm of the weight row
    that the value multiplies, cats_jax.sparsity.weight_factors). One definition for the kernels
    and the jnp path (cats_jax.sparsity re-exports it)."""
    s = jnp.abs(value.astype(f32))
    return s if factor is None else s * factor


def keep(value, threshold, factor=None):
    """The sparsity rule: a value is kept where its score exceeds the threshold."""
    return score(value, factor) > threshold


def teal_input(x: jax.Array, threshold: jax.Array, factor=None) -> jax.Array:
    """x_j := 0 where |x_j| <= threshold (factor None) or |x_j| * factor_j <= threshold (the
    weighted criterion), in x's own dtype: the test reads the value that the layer multiplies
    (bf16 models: the bf16 input, compared in fp32). threshold 0 is exactly dense: it only zeroes zeros."""
    return jnp.where(keep(x, threshold, factor), x, jnp.zeros((), x.dtype))


def check_scale(name: str, w, scale, n: int):
    """The fp32 per-output-channel scale [n] of int8 weights w (W ~ w * scale), or None for float
    weights; a ValueError naming the problem for a missing, stray or misshapen scale."""
    if w.dtype == jnp.int8:
        if scale is None:
            raise ValueError(f"{name}: int8 weights need their fp32 scale [{n}] (one per output channel)")
        if jnp.shape(scale) != (n,):
            raise ValueError(f"{name}: scale {jnp.shape(scale)} for int8 weights {w.shape}; expected ({n},), "
                             "one per output channel")
        return jnp.asarray(scale, jnp.float32)
    if scale is not None:
        raise ValueError(f"{name}: a scale is only for int8 weights; these are {w.dtype} (pass scale=None)")
    return None


def gated_input(sums, scale, n: int, dtype):
    """silu(gate) * up [B, n] in dtype, from a gate|up GEMV's unfinished fp32 sums [B, >= 2n] (scale:
    their int8 scale [2n] or None): gate and up rounded to dtype (as sparse_gemv finishes them), then
    silu(gate) * up in fp32, rounded once (as XLA fuses the model's bf16 silu(gate) * up, with
    excess precision). The kernels' definition."""
    gu = finished(sums[:, :2 * n], scale, dtype).astype(f32)
    return _gated(gu[:, :n], gu[:, n:], dtype)


def _gated(g, u, dt):
    """silu(g) * u in fp32, rounded to dt (g, u: fp32 holding values of dt)."""
    return (g * jax.nn.sigmoid(g) * u).astype(dt)


def kernel_pays(batch: int, n_in: int, n_out: int) -> bool:
    """Whether a TEAL decode step of `batch` rows should run the kernel: a large matrix, or a shape
    whose tuned blocks beat XLA on this device (an entry in TUNED)."""
    return kernels_enabled() and batch <= MAX_KERNEL_BATCH and (
        n_in * n_out >= MIN_KERNEL_WEIGHTS or tuned_key(batch, n_in, n_out) in _tuned())


@dataclasses.dataclass(frozen=True)
class GemvBlocks:
    """Blocks of the masked-tile path (module docstring): batch 1 multiplies and adds, batches 2..16
    use dots."""
    rows: int  # input rows (rows of W) per loop step
    cols: int  # output columns per program
    splits: int  # programs along the input axis (split-K)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_blocks(self, "rows", "cols")


@dataclasses.dataclass(frozen=True)
class GatherBlocks:
    """Blocks of the batch-1 gather path (module docstring)."""
    rows: int = 32  # kept rows per loop step
    cols: int = 128  # output columns per program
    chunk: int = 512  # input rows per chunk (and per program)
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        check_blocks(self, "rows", "cols", "chunk")


# Per padded batch size: the winners of `python -m bench.kernels --tune` (and `--teal --tune`) on
# an H100 at 50% sparsity; blocks_for fits them to other shapes. Batch 1: one 128 x 128 tile per
# program; batches 2 and 4 (the CATS down projection): looping splits.
TABLE = {
    1: GemvBlocks(rows=128, cols=128, splits=1024, num_warps=4, num_stages=1),
    2: GemvBlocks(rows=32, cols=256, splits=16, num_warps=4, num_stages=3),
    4: GemvBlocks(rows=32, cols=256, splits=16, num_warps=4, num_stages=3),
}


# Per device kind, per (padded batch, in, out) that decode reaches (TEAL's fused q|k|v and gate|up,
# down, and o where its kernel beat XLA's): the fastest blocks at 50% sparsity (`python -m bench.kernels --teal
# --tune`; docs/benchmarks.md); other devices and shapes take TABLE's. A shape listed here takes
# the kernel even below MIN_KERNEL_WEIGHTS: list one only where the tuned kernel beats XLA.
# A key (padded batch, in, out, variant) holds the blocks of one kind of GEMV of that shape where
# they differ from the plain key's (TEAL's float GEMVs): "int8" (int8 weights), "cats" (CATS's
# down projection of float weights, whose input is already sparse: no threshold, no gate),
# "dense" (a float GEMV that reads every row: it takes the kernel only where listed, dense_pays) and
# "int8 dense" (an int8 GEMV that reads every row, dense int8 decode's: DENSE where none is listed);
# gemv_variant.
TUNED: dict[str, dict[tuple, GemvBlocks | GatherBlocks]] = {
    "NVIDIA H100 80GB HBM3": {
        # 64 x 64 masked tiles on 2 warps against the gathers below (kept for int8): TEAL 50% 2.880 ->
        # 2.805 ms/step in decode; TEAL's down (gated) kept its gather (2.886 -> 2.985 on the tiles)
        (1, 4096, 6144): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),  # Mistral-7B q|k|v
        (1, 4096, 4096): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),  # o (XLA: 16.6 us)
        (1, 4096, 28672): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),  # gate|up
        (1, 14336, 4096): GatherBlocks(rows=32, cols=64, chunk=512, num_warps=4, num_stages=3),  # down
        # int8 q|k|v, gate|up and down after the gathers' [pass rows, cols] sums (`--int8 --teal --tune`:
        # 12.7 / 31.5 / 19.7 -> 11.7 / 29.7 / 17.9 us): int8 TEAL 50% 2.150 -> 2.071 ms/step
        (1, 4096, 6144, "int8"): GatherBlocks(rows=32, cols=128, chunk=256, num_warps=4, num_stages=3),
        (1, 4096, 28672, "int8"): GatherBlocks(rows=32, cols=128, chunk=1024, num_warps=4, num_stages=3),
        (1, 14336, 4096, "int8"): GatherBlocks(rows=32, cols=128, chunk=512, num_warps=4, num_stages=3),
        # int8 o on 64 x 256 tiles (9.9 us against its gather's 11.6; `bench.kernels --int8 --teal
        # --tune`), with int8 down on its own gather then: int8 TEAL 50% 2.351 / 2.311 -> 2.158 / 2.178
        # ms/step, int8 CATS 3.298 / 3.282 -> 3.059 / 3.050 (one machine, alternating)
        (1, 4096, 4096, "int8"): GemvBlocks(rows=64, cols=256, splits=56, num_warps=4, num_stages=3),
        # dense float GEMVs on the tiles (the dense tune's best, tied with XLA's GEMVs; 12.3 -> 8.3
        # launches a layer): dense 5.216 / 5.209 -> 5.047 / 5.054 ms/step, CATS 4.164 / 4.171 -> 4.065 / 4.071
        (1, 4096, 6144, "dense"): GemvBlocks(rows=128, cols=64, splits=1024, num_warps=4, num_stages=1),
        (1, 4096, 4096, "dense"): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),
        (1, 4096, 28672, "dense"): GemvBlocks(rows=128, cols=64, splits=1024, num_warps=4, num_stages=1),
        (1, 14336, 4096, "dense"): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),
        # CATS's down on the tiles: no compaction launch; CATS 50% 4.356 -> 4.272 ms/step
        (1, 14336, 4096, "cats"): GemvBlocks(rows=64, cols=64, splits=1024, num_warps=2, num_stages=1),
        # gate|up at 2..8 rows: 4 splits, not the table's 16: 66.5 / 80.5 / 87.2 us against 71.9 /
        # 88.0 / 98.9 at 2 / 4 / 8 rows, 50%, when splits wrote fp32 partials; with the atomic adds,
        # 87.9 against 90.4 at 8 rows
        **{(b, 4096, 28672): GemvBlocks(rows=32, cols=256, splits=4, num_warps=4, num_stages=3) for b in (2, 4, 8)},
    },
    "NVIDIA H200": {
        (1, 4096, 6144): GatherBlocks(rows=32, cols=128, chunk=256, num_warps=4, num_stages=3),  # Mistral-7B q|k|v
        (1, 4096, 4096): GatherBlocks(rows=32, cols=128, chunk=256, num_warps=4, num_stages=3),  # o (XLA: 13.9 us)
        (1, 4096, 28672): GatherBlocks(rows=16, cols=128, chunk=512, num_warps=4, num_stages=3),  # gate|up
        (1, 14336, 4096): GatherBlocks(rows=32, cols=128, chunk=512, num_warps=4, num_stages=3),  # down
        (1, 4096, 12288): GemvBlocks(rows=128, cols=64, splits=1024, num_warps=4, num_stages=1),  # Llama-2-7B q|k|v
        (1, 4096, 22016): GemvBlocks(rows=64, cols=256, splits=224, num_warps=8, num_stages=1),  # gate|up
        (1, 11008, 4096): GemvBlocks(rows=128, cols=64, splits=1024, num_warps=4, num_stages=1),  # down
    },
}


# Batch 1 int8 GEMVs that read every row (dense int8 decode: skip_zeros=False) on shapes with no "int8
# dense" entry in TUNED: 128 x 128 tiles in 16 splits beat the table's one tile a program on
# Mistral-7B's q|k|v, o and down (15.5 / 12.2 / 28.6 us against 16.9 / 13.1 / 29.4; gate|up 50.1
# against 49.4) in `bench.kernels --int8 --teal --tune --tune-at 0` on an H100, and 17 blocks of more
# programs or warps did not beat them (docs/decisions.md)
DENSE = GemvBlocks(rows=128, cols=128, splits=16, num_warps=4, num_stages=1)


def _tuned() -> dict[tuple, GemvBlocks | GatherBlocks]:
    return TUNED.setdefault(jax.devices()[0].device_kind, {})


def gemv_variant(w_dtype, cats_down: bool = False, dense: bool = False) -> str | None:
    """Which of TUNED's variant keys a GEMV of these weights looks up first: "int8 dense" and "dense"
    for an int8 or float GEMV that reads every row, "int8" for other int8 ones, "cats" for CATS's
    down projection (cats_down) of float weights, None for TEAL's float GEMVs."""
    if w_dtype == jnp.int8:
        return "int8 dense" if dense else "int8"
    return "cats" if cats_down else "dense" if dense else None


def dense_pays(batch: int, n_in: int, n_out: int) -> bool:
    """Whether a float GEMV that reads every row should run the kernel: only where this device's
    TUNED lists blocks for it (they beat XLA's GEMV there)."""
    return kernels_enabled() and tuned_key(batch, n_in, n_out, "dense") in _tuned()


def tuned_key(batch: int, n_in: int, n_out: int, variant: str | None = None) -> tuple:
    """The TUNED key of a GEMV of `batch` rows of this shape and variant."""
    return (next_pow2(batch), n_in, n_out) + ((variant,) if variant else ())


def tuned_blocks(tuned: dict, batch: int, n_in: int, n_out: int, variant: str | None = None):
    """A device's TUNED entry (tuned) for this GEMV, as blocks_for looks it up: the variant's, else
    the shape's plain one, else None."""
    return (variant and tuned.get(tuned_key(batch, n_in, n_out, variant))) or tuned.get(tuned_key(batch, n_in, n_out))


def blocks_for(batch: int, n_in: int, n_out: int, col_multiple: int | None = None,
               dense: bool = False, variant: str | None = None, tuned: dict | None = None) -> GemvBlocks | GatherBlocks:
    """The tuned (else the table's) blocks for this batch, fitted to the shape (no block longer than
    its axis); dense: those of a GEMV that reads every row (DENSE at batch 1, else the table's).
    col_multiple: a length every column block must divide (segment boundaries). variant: the
    GEMV's gemv_variant, whose TUNED entry comes before the shape's plain one. tuned: a device's
    TUNED table (default: this device's)."""
    tuned = _tuned() if tuned is None else tuned
    if dense:  # their "dense" or "int8 dense" entry, else DENSE at batch 1
        b = (variant in ("dense", "int8 dense") and tuned.get(tuned_key(batch, n_in, n_out, variant))) or (
            DENSE if batch == 1 else TABLE[min(next_pow2(batch), max(TABLE))])
    else:
        b = tuned_blocks(tuned, batch, n_in, n_out, variant) or TABLE[min(next_pow2(batch), max(TABLE))]
    low = 16 if batch > 1 and isinstance(b, GemvBlocks) else 1  # tensor-core dots need 16
    cols = max(block_along(n_out, b.cols), low)
    if col_multiple is not None:
        cols = min(cols, col_multiple & -col_multiple)  # the largest power of two dividing it
    if isinstance(b, GatherBlocks):
        return dataclasses.replace(b, cols=cols, chunk=min(b.chunk, next_pow2(n_in)))
    rows = max(min(b.rows, next_pow2(n_in)), low)
    return dataclasses.replace(b, rows=rows, cols=cols, splits=max(1, min(b.splits, pl.cdiv(n_in, rows))))


def sum_shape(batch: int, n_in: int, segments: tuple[int, ...], dense: bool = False,
              variant: str | None = None) -> tuple[int, int] | None:
    """The fp32 buffer [R, P] that the masked tiles of a GEMV of `batch` rows add into (dense: one that
    reads every row, skip_zeros=False without thresholds; variant: the GEMV's): R the rows padded to a
    power of two, P the outputs padded to whole column blocks, for an earlier kernel to zero
    (sparse_gemv's `zeroed`); None where the blocks take the gather path, whose compaction zeroes its
    own output."""
    blk = _gemv_blocks(batch, n_in, segments, dense, variant)
    return None if isinstance(blk, GatherBlocks) else _sum_shape(batch, sum(segments), blk)


def _sum_shape(batch: int, n_out: int, blk: GemvBlocks) -> tuple[int, int]:
    return next_pow2(batch), pl.cdiv(n_out, blk.cols) * blk.cols


def _bounds(segments) -> tuple[int, ...]:
    """The first column of every output segment after the first."""
    return tuple(itertools.accumulate(segments))[:-1]


def _gemv_blocks(batch: int, n_in: int, segments, dense: bool, variant: str | None) -> GemvBlocks | GatherBlocks:
    """The blocks sparse_gemv takes when given none: the dense ones for a GEMV that reads every row."""
    if dense:
        return blocks_for(batch, n_in, sum(segments), dense=True, variant=variant)
    return _segmented_blocks(batch, n_in, segments, variant)


def _segmented_blocks(batch: int, n_in: int, segments, variant: str | None = None) -> GemvBlocks | GatherBlocks:
    """blocks_for a matrix of these output segments: no column block straddles a segment boundary."""
    bounds = _bounds(segments)
    return blocks_for(batch, n_in, sum(segments), math.gcd(*bounds) if bounds else None, variant=variant)


def _segment(c0, bounds):
    """The output segment holding column c0."""
    seg = jnp.int32(0)
    for b in bounds:
        seg = seg + (c0 >= b).astype(jnp.int32)
    return seg


def _threshold(t_refs, seg):
    """The threshold of output segment `seg`: one (1,) ref per segment, picked without a dynamic
    index (the model passes them apart, so no op stacks them per step)."""
    t = t_refs[0][0]
    for k in range(1, len(t_refs)):
        t = jnp.where(seg == k, t_refs[k][0], t)
    return t


def _pass_rows(blk: GemvBlocks | GatherBlocks, dtype) -> int:
    """The tile rows that one pass of a program's threads loads, each thread 16 bytes of a row."""
    per_row = max(1, blk.cols * jnp.dtype(dtype).itemsize // 16)  # threads a row takes
    return max(1, min(blk.rows, blk.num_warps * 32 // per_row))


def _add_passes(acc, prod):
    """acc [p, cols] plus a step's products [rows, cols] (p divides rows) summed down to p rows: the
    rows one pass of a program's threads loads, so each thread adds its own rows, no data moves. A
    step of one pass adds as it is: a sum over an axis of length one ran 10 us slower a call in XLA's
    Triton (int8 gate|up gather, H100), though `bench.sass` showed the same code."""
    passes = prod.shape[0] // acc.shape[0]
    return acc + (prod if passes == 1 else jnp.sum(prod.reshape(passes, *acc.shape), axis=0))


def _kernel(x_ref, w_ref, *refs, batch, bp, blk, n_in, n_out, rows_per_split, thresholded, weighted, bounds,
            skip_zeros, gated, gated_scaled, dt):
    dot = batch > 1  # tensor-core dots on padded batch rows; batch 1: multiply-add
    xs_ref, refs = (refs[0], refs[1:]) if gated_scaled else (None, refs)
    *t_refs, o_ref = refs
    f_ref = t_refs.pop() if weighted else None  # [segments, in]
    rows, cols = blk.rows, blk.cols
    c0 = pl.program_id(0) * cols
    split = pl.program_id(1)
    col_ok = iota(cols, c0) < n_out if n_out % cols else None
    batch_ok = iota(bp) < batch if bp != batch else None
    row_tail = (n_in % rows_per_split) != 0  # the last split runs past the end of x / W
    seg = _segment(c0, bounds)
    t = _threshold(t_refs, seg)

    def x_tile(r0, row_ok):
        """x's rows r0.. ([bp, rows]; batch 1: [rows, 1]); gated: silu(gate) * up from the gate|up sums."""
        def rows_at(ref, at, scale=False):  # scale: the sums' int8 scale, [1, 2 in] (batch 1: [2 in, 1])
            if dot:
                b = 1 if scale else bp
                return load(ref.at[pl.ds(0, b), pl.ds(at + r0, rows)], mask=mask2d(None if scale else batch_ok, row_ok))
            # batch 1: x arrives as a column [in, 1], so a tile of it broadcasts over W's rows
            return load(ref.at[pl.ds(at + r0, rows), pl.ds(0, 1)], mask=mask2d(row_ok, None))

        if not gated:
            return rows_at(x_ref, 0)
        g, u = (finished(rows_at(x_ref, at), None if xs_ref is None else rows_at(xs_ref, at, True), dt).astype(f32)
                for at in (0, n_in))
        return _gated(g, u, dt)

    def step(k, acc):
        r0 = pl.multiple_of(split * rows_per_split + k * rows, rows)
        row_ok = iota(rows, r0) < n_in if row_tail else None
        xf = x_tile(r0, row_ok).astype(f32)
        if thresholded:
            f = None
            if weighted:  # this segment's factors of the tile's rows, along x's row axis
                f = load(f_ref.at[seg, pl.ds(r0, rows)], mask=row_ok)
                f = f[None, :] if dot else f[:, None]
            xf = jnp.where(keep(xf, t, f), xf, 0.0)
        if skip_zeros:  # [rows, 1]: the weight row is needed by some batch row
            live = (jnp.max(jnp.abs(xf), axis=0) > 0)[:, None] if dot else xf != 0
            mask = live if col_ok is None else live & col_ok[None, :]
        else:  # every row is read (the input's tail masked), so W's loads need not wait for x's
            mask = mask2d(row_ok, col_ok)
        w = load(w_ref.at[pl.ds(r0, rows), pl.ds(c0, cols)], mask=mask,
                 eviction_policy="evict_first")  # W is streamed once; keep x in cache
        if dot:  # [bp, cols]; x' is exact in x's dtype; int8 w converts exactly to it
            return acc + plgpu.dot(xf.astype(dt), convert(w, dt))
        # Batch 1: elementwise multiply-add into the rows of one pass (_add_passes), reduced across
        # threads once at the end; a [rows, cols] accumulator held a tile of registers per thread
        return _add_passes(acc, xf * convert(w, f32, packed=True))

    init = jnp.zeros((bp, cols) if dot else (_pass_rows(blk, w_ref.dtype), cols), f32)
    acc = jax.lax.fori_loop(0, rows_per_split // rows, step, init)
    # Atomic adds into the zeroed buffer [R, P], padded to whole blocks: no mask (padding columns and
    # rows add zeros). Dots: the padding rows of acc are zeros, so folding its bp rows onto the
    # buffer's R adds each real row to itself and nothing else.
    r = o_ref.shape[0]
    if not dot:
        acc = jnp.sum(acc, axis=0)[None, :]
    elif r < acc.shape[0]:
        acc = acc.reshape(acc.shape[0] // r, r, cols).sum(axis=0)
    atomic_add(o_ref, (pl.ds(0, r), pl.ds(c0, cols)), acc)


@dataclasses.dataclass(frozen=True)
class CompactLayout:
    """Static: the shape of a batch-1 gather's compacted input (module docstring, step 1): `segments`
    output segments of a [n_in, n_out] matrix, each with its own threshold (thresholded; else the
    input's zeros are dropped) and, weighted, its own factors."""
    n_in: int
    n_out: int
    segments: int
    blocks: GatherBlocks
    thresholded: bool = True
    weighted: bool = False

    @property
    def chunks(self) -> int:
        return pl.cdiv(self.n_in, self.blocks.chunk)

    @property
    def span(self) -> int:
        """Output columns each compacting program zeroes: the output, padded to whole column blocks,
        in equal power-of-two spans."""
        cols = pl.cdiv(self.n_out, self.blocks.cols) * self.blocks.cols
        return next_pow2(pl.cdiv(cols, self.segments * self.chunks))

    def outputs(self, dtype) -> tuple[jax.ShapeDtypeStruct, ...]:
        """A compacting kernel's outputs, as Compacted holds them; values in dtype."""
        listed = (self.segments, self.chunks * self.blocks.chunk)
        return (jax.ShapeDtypeStruct(listed, jnp.int32), jax.ShapeDtypeStruct(listed, dtype),
                jax.ShapeDtypeStruct((self.segments, self.chunks), jnp.int32),
                jax.ShapeDtypeStruct((1, self.segments * self.chunks * self.span), f32))


class Compaction(NamedTuple):
    """How to compact a batch-1 gather's input: its layout, one (1,) fp32 threshold per segment and
    the weighted criterion's factors [segments, in] (or None). A kernel that produces the input can
    compact it as it stores it (`compact_chunk`: pallas_kernels.norm and .attention do), one launch
    fewer than a compaction of its own."""
    layout: CompactLayout
    thresholds: tuple
    factors: jax.Array | None = None

    def args(self) -> tuple:
        """The compacting kernel's inputs, in the order compact_chunk takes their refs."""
        return (*self.thresholds, *(() if self.factors is None else (self.factors,)))


class Compacted(NamedTuple):
    """A compacted input (Compaction's outputs): per segment and chunk the kept rows first (row
    numbers `idx`, values `val`) and their `count`, and the gather's fp32 output `out`, zeroed."""
    layout: CompactLayout
    idx: jax.Array
    val: jax.Array
    count: jax.Array
    out: jax.Array

    @property
    def shape(self) -> tuple[int, int, int]:
        """The [B, T, in] of the decode-step input it stands for."""
        return 1, 1, self.layout.n_in

    @property
    def dtype(self):
        """The input's dtype (its values')."""
        return self.val.dtype


def compaction_for(batch: int, n_in: int, segments: tuple[int, ...], thresholds, factors=None,
                   variant: str | None = None) -> Compaction | None:
    """The Compaction of a TEAL GEMV whose blocks (blocks_for; variant: the GEMV's) take the gather path;
    None for the masked tiles, where there is nothing to compact. thresholds: one per segment (scalars)."""
    blk = _segmented_blocks(batch, n_in, segments, variant)
    if batch != 1 or not isinstance(blk, GatherBlocks):
        return None
    layout = CompactLayout(n_in, sum(segments), len(segments), blk, weighted=factors is not None)
    return Compaction(layout, tuple(jnp.asarray(t, f32).reshape(1) for t in thresholds),
                      None if factors is None else jnp.asarray(factors, f32))


def compact_chunk(layout: CompactLayout, x, ok, seg, c, in_refs, out_refs):
    """In a kernel: compact chunk c of segment seg's input, x [chunk] (ok: inside the input), into
    the outputs of layout.outputs (out_refs), with the thresholds and factors (in_refs: Compaction.args):
    the kept rows' numbers and values first, in order, then the dropped ones (a permutation: every
    slot is written, value 0), and the number kept. It also zeroes this program's span of the
    gather's output (one launch fewer than an XLA memset)."""
    idx_ref, val_ref, cnt_ref, zero_ref = out_refs
    t_refs = list(in_refs)
    f_ref = t_refs.pop() if layout.weighted else None  # [segments, in]
    chunk, span = layout.blocks.chunk, layout.span
    p = seg * layout.chunks + c
    plgpu.store(zero_ref.at[pl.ds(0, 1), pl.ds(p * span, span)], jnp.zeros((1, span), f32))
    j = iota(chunk, c * chunk)
    xf = x.astype(f32)
    f = load(f_ref.at[seg, j], mask=ok) if layout.weighted else None
    live = (keep(xf, _threshold(t_refs, seg), f) if layout.thresholded else (xf != 0)) & ok
    n_live = jnp.sum(live.astype(jnp.int32))
    before = jnp.cumsum(live.astype(jnp.int32))  # kept rows up to and including this one
    pos = jnp.where(live, before - 1, n_live + iota(chunk) - before)
    plgpu.store(idx_ref.at[seg, c * chunk + pos], j)
    plgpu.store(val_ref.at[seg, c * chunk + pos], jnp.where(live, x, jnp.zeros_like(x)).astype(val_ref.dtype))
    plgpu.store(cnt_ref.at[seg, pl.ds(c, 1)], jnp.full((1,), n_live, jnp.int32))


def _compact_kernel(x_ref, *refs, layout, gated, gated_scaled):
    """Program (segment, chunk): compact_chunk of x's chunk. gated: x_ref holds gate|up sums (and
    the next ref their scale); the values are silu(gate) * up."""
    if gated_scaled:
        xs_ref, *refs = refs
    in_refs, out_refs = refs[:-4], refs[-4:]
    seg, c = pl.program_id(0), pl.program_id(1)
    n_in, chunk = layout.n_in, layout.blocks.chunk
    j = iota(chunk, c * chunk)
    ok = j < n_in
    if gated:
        dt = out_refs[1].dtype
        g, u = (finished(load(x_ref.at[pl.ds(at + c * chunk, chunk)], mask=ok),
                         load(xs_ref.at[pl.ds(at + c * chunk, chunk)], mask=ok) if gated_scaled else None,
                         dt).astype(f32) for at in (0, n_in))
        x = _gated(g, u, dt)
    else:
        x = load(x_ref.at[pl.ds(c * chunk, chunk)], mask=ok)
    compact_chunk(layout, x, ok, seg, c, in_refs, out_refs)


def _gather_kernel(idx_ref, val_ref, cnt_ref, w_ref, o_ref, *, blk, n_out, bounds):
    """Program (column block, chunk): the chunk's kept rows of W times their values, added into o."""
    rows, cols, chunk = blk.rows, blk.cols, blk.chunk
    c0 = pl.program_id(0) * cols
    c = pl.program_id(1)
    col_ok = iota(cols, c0) < n_out if n_out % cols else None
    seg = _segment(c0, bounds)
    count = jnp.sum(load(cnt_ref.at[seg, pl.ds(c, 1)]))

    base = c * chunk

    def row_list(k):
        inside = iota(rows, k * rows) < chunk  # the row list, masked past the chunk's
        return (load(idx_ref.at[seg, pl.ds(base + k * rows, rows)], mask=inside),
                load(val_ref.at[seg, pl.ds(base + k * rows, rows)], mask=inside))

    def weights(k, idx):
        ok = (iota(rows, k * rows) < count)[:, None]  # rows past the kept ones: no traffic
        return load(w_ref.at[idx[:, None], iota(cols, c0)[None, :]], mask=ok if col_ok is None else ok & col_ok[None, :],
                    eviction_policy="evict_first")

    def step(k, carry):
        acc, w, v, idx1, v1 = carry  # step k's tile and values, step k + 1's row list
        w1 = weights(k + 1, idx1)  # in flight while step k's tile is used
        nxt = row_list(k + 2)
        return _add_passes(acc, v.astype(f32)[:, None] * convert(w, f32, packed=True)), w1, v1, *nxt

    # sums into the rows one pass of the threads loads, as the masked tiles (fewer registers than
    # [rows, cols]); a step's weights are loaded a step ahead and its row list two (H100, int8 TEAL
    # 50%: 2.045 -> 2.025 ms/step; int8 then carries the tile a byte a register, 40 -> 72)
    init = jnp.zeros((_pass_rows(blk, w_ref.dtype), cols), f32)
    idx0, v0 = row_list(0)
    acc, *_ = jax.lax.fori_loop(0, pl.cdiv(count, rows), step, (init, weights(0, idx0), v0, *row_list(1)))
    atomic_add(o_ref, (pl.ds(0, 1), pl.ds(c0, cols)), jnp.sum(acc, axis=0)[None, :])


def compact(x, compaction: Compaction, dtype, gated_scale=None, gated: bool = False) -> Compacted:
    """Step 1 in a launch of its own: x [1, in] (gated: gate|up sums [1, >= 2 in], with their int8
    scale or None), values kept in dtype."""
    layout = compaction.layout
    kernel = functools.partial(_compact_kernel, layout=layout, gated=gated, gated_scaled=gated_scale is not None)
    outs = call(kernel, layout.outputs(dtype), grid=(layout.segments, layout.chunks), num_warps=4, num_stages=1,
                name="compact")(x.reshape(-1), *(() if gated_scale is None else (gated_scale,)), *compaction.args())
    return Compacted(layout, *outs)


def gather(xc: Compacted, w, bounds) -> jax.Array:
    """Step 2: the kept rows of w [in, out] times their values: [1, P >= out] fp32 (unscaled, padded)."""
    blk = xc.layout.blocks
    kernel = functools.partial(_gather_kernel, blk=blk, n_out=w.shape[1], bounds=bounds)
    return call(kernel, jax.ShapeDtypeStruct(xc.out.shape, f32), grid=(pl.cdiv(w.shape[1], blk.cols), xc.layout.chunks),
                num_warps=blk.num_warps, num_stages=blk.num_stages, name="gather_gemv", given=(0,))(
        xc.idx, xc.val, xc.count, w, xc.out)


def sparse_gemv(x, w, threshold=None, *, segments: tuple[int, ...] | None = None, factors=None,
                blocks: GemvBlocks | GatherBlocks | None = None, out_dtype=None, scale=None, finish: bool = True,
                gated: bool = False, x_scale=None, skip_zeros: bool = True, zeroed=None):
    """y = x' @ w with x' = x (threshold None) or x * keep(x, threshold, factors), x' rounded to w's
    dtype; or, for int8 w, y = (x' @ w) * scale with x' in x's own dtype.

    x [B, in], w [in, out] (float, or int8 with scale: fp32 [out], one per output column). Returns
    [B, out] in out_dtype (default x.dtype), accumulated in fp32.
    Rows of w are read only where some batch row's x' is non-zero (in that column block).
    segments: widths of consecutive output-column segments with their own thresholds (threshold
    then has one value per segment, best a sequence of scalars: an array is split per call):
    w = [W_q | W_k | W_v] reads x once for three projections.
    factors: None (magnitude criterion) or [segments, in] fp32, each segment's factor per input
    (the weighted criterion); needs a threshold.
    gated: x is a gate|up GEMV's unfinished fp32 sums [B, >= 2 in] (x_scale: their int8 scale [2 in]
    or None) and the input is gated_input(x, x_scale, in, out_dtype): silu(gate) * up.
    finish=False: the fp32 sums [R >= B, P >= out] as the kernels leave them, unscaled, rows past B
    and columns past `out` padding (zeros), for a consumer kernel that scales and rounds them as it
    loads them (pallas_kernels.norm, pallas_kernels.attention): no launch of its own finishes them.
    skip_zeros=False (masked tiles, no threshold): read every row of w without testing x first, for
    an input with no zeros worth skipping (dense int8 decode): the weight loads then need not wait
    for x's.
    x Compacted: batch 1's input as a kernel upstream compacted it (Compaction), thresholds applied:
    the gather alone runs.
    zeroed (masked tiles): the fp32 buffer [R, P] the tiles add into (sum_shape), zeroed by an earlier
    kernel (pallas_kernels.norm's zeros), instead of a memset launch of XLA's.
    """
    if isinstance(x, Compacted):
        segments = tuple(segments or (w.shape[1],))
        lay = x.layout
        if w.ndim != 2 or (lay.n_in, lay.n_out, lay.segments) != (*w.shape, len(segments)):
            raise ValueError(f"sparse_gemv: an input compacted for [{lay.n_in}, {lay.n_out}] in {lay.segments} "
                             f"segments does not fit w {w.shape} in segments {segments}")
        scale = check_scale("sparse_gemv", w, scale, w.shape[1])
        y = gather(x, w, _bounds(segments))
        return y if not finish else finished(y[:, :w.shape[1]], scale, out_dtype or x.val.dtype)
    if gated:
        if x.ndim != 2 or w.ndim != 2 or x.shape[1] < 2 * w.shape[0] or x.dtype != f32 or (
                x_scale is not None and jnp.shape(x_scale) != (2 * w.shape[0],)):
            raise ValueError(f"sparse_gemv: a gated input {x.shape} {x.dtype} (x_scale "
                             f"{None if x_scale is None else jnp.shape(x_scale)}) must be fp32 gate|up sums "
                             f"[B, >= {2 * w.shape[0]}] for w {w.shape}, x_scale None or [{2 * w.shape[0]}]")
        if out_dtype is None:
            raise ValueError("sparse_gemv: a gated input needs out_dtype (the activations' dtype)")
    elif x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"sparse_gemv: x {x.shape} and w {w.shape} do not chain as [B, in] @ [in, out]")
    batch, n_in = x.shape[0], w.shape[0]
    n_out = w.shape[1]
    segments = tuple(segments or (n_out,))
    if sum(segments) != n_out:
        raise ValueError(f"sparse_gemv: segments {segments} do not add up to w's {n_out} output columns")
    bounds = _bounds(segments)
    if threshold is None:
        ts = [jnp.zeros((1,), f32)]  # unused: the kernels skip zeros only
    else:  # one (1,) array per segment
        ts = [jnp.asarray(t, f32).reshape(1) for t in
              (threshold if isinstance(threshold, (tuple, list)) else jnp.asarray(threshold, f32).reshape(-1))]
        if len(ts) != len(segments):
            raise ValueError(f"sparse_gemv: {len(ts)} thresholds for {len(segments)} output segments")
    if factors is not None:
        if threshold is None or jnp.shape(factors) != (len(segments), n_in):
            raise ValueError(f"sparse_gemv: factors {jnp.shape(factors)} need a threshold and the shape "
                             f"[segments, in] = {(len(segments), n_in)}")
    fs = [] if factors is None else [jnp.asarray(factors, f32)]  # the kernels take them after the thresholds
    dense = not skip_zeros and threshold is None
    blk = blocks or _gemv_blocks(batch, n_in, segments, dense,
                                 gemv_variant(w.dtype, threshold is None and not gated and not dense, dense))
    if any(b % blk.cols for b in bounds):
        raise ValueError(f"sparse_gemv: column block {blk.cols} straddles a segment boundary {bounds}")
    scale = check_scale("sparse_gemv", w, scale, n_out)
    out_dtype = out_dtype or x.dtype
    dt = w.dtype if scale is None else out_dtype  # a gated input's dtype in the products
    if not gated and scale is None:
        x = x.astype(w.dtype)

    def done(y):
        """[B, P] fp32 sums -> [B, out] in out_dtype. The scale is applied here rather than in the
        kernels: XLA fuses the multiply into the slice / reduction and cast that follow the kernels
        anyway, while in-kernel it would scale every split's partial sums (and load the scale per
        program)."""
        if not finish:
            return y
        return finished(y[:batch, :n_out], scale, out_dtype)

    if isinstance(blk, GatherBlocks):
        if batch != 1:
            raise ValueError(f"sparse_gemv: the gather path (GatherBlocks) takes batch 1, not {batch}")
        layout = CompactLayout(n_in, n_out, len(segments), blk, threshold is not None, factors is not None)
        return done(gather(compact(x, Compaction(layout, tuple(ts), *fs), dt, x_scale, gated), w, bounds))
    dot = batch > 1
    bp = padded_batch(batch, dot)
    rows_per_split = pl.cdiv(pl.cdiv(n_in, blk.splits), blk.rows) * blk.rows
    splits = pl.cdiv(n_in, rows_per_split)
    kernel = functools.partial(
        _kernel, batch=batch, bp=bp, blk=blk, n_in=n_in, n_out=n_out,
        rows_per_split=rows_per_split, thresholded=threshold is not None, weighted=factors is not None, bounds=bounds,
        skip_zeros=not dense, gated=gated, gated_scaled=gated and x_scale is not None, dt=dt if gated else x.dtype,
    )
    col_blocks = pl.cdiv(n_out, blk.cols)
    xs = () if not gated or x_scale is None else (jnp.asarray(x_scale, f32).reshape(1, -1),)
    if not dot:  # batch 1: x as a column
        x, xs = x.reshape(-1, 1), tuple(v.reshape(-1, 1) for v in xs)
    shape, accumulate, given = _sum_shape(batch, n_out, blk), (0,), ()
    if zeroed is not None:
        if (zeroed.shape, zeroed.dtype) != (shape, f32):
            raise ValueError(f"sparse_gemv: zeroed {zeroed.shape} {zeroed.dtype} is not the output buffer "
                             f"{shape} float32 of these blocks")
        accumulate, given = (), (zeroed,)
    out = call(
        kernel, jax.ShapeDtypeStruct(shape, f32), grid=(col_blocks, splits),
        num_warps=blk.num_warps, num_stages=blk.num_stages, name="sparse_gemv", accumulate=accumulate,
        given=tuple(range(len(given))),
    )(x, w, *xs, *ts, *fs, *given)
    return done(out)

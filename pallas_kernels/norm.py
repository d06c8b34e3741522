"""The residual add and the RMSNorm after it, in one Pallas (Triton) launch per decode step.

    x, y = add_rms_norm(x, h, scale, eps)   # x + h, and rms_norm(x + h, scale, eps)

XLA runs this as three kernels (the add, the mean of squares, the scaling), each a launch of a
few bytes' work; a decode step has two per layer. The jnp definition is cats_jax.model.rms_norm
after a residual add in the activation dtype, and the kernel rounds where it does: x + h to
x's dtype, the normalised row to x's dtype before the scale, the product to x's dtype.

x [B, H], scale [H]. h [B, H] or a kernel's unfinished fp32 sums [R >= B, P >= H] (sparse_gemv with
finish=False) with their int8 scale h_scale [H] or None: h is scaled and rounded to x's dtype first,
as the projection would have finished it, so no launch of its own does that. One program per row
holds the whole row, on 8 warps per 4096 columns (`bench.kernels --norm`).

At batch 1, before a gather GEMV (TEAL's q|k|v and gate|up), the launch can also compact the
normalised row for it (sparse_gemv.Compaction): one program per segment and chunk of the gather
computes the row's rms, then its chunk of the output, and lists the chunk's kept inputs; the
compaction launch of its own is gone. Before GEMVs on the masked tiles (which add into a zeroed
fp32 buffer), extra programs can zero those buffers (`zeros`): one memset launch fewer each; a
compacting launch zeroes them in its own programs, a span each.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import sparse_gemv
from pallas_kernels.common import call, finished, iota, load, next_pow2
from pallas_kernels.sparse_gemv import teal_input

f32 = jnp.float32
ZERO_SPAN = 4096  # fp32 zeros a program writes (`zeros`)


def _summed(x_ref, h_ref, hs_ref, b, cols, ok, dt):
    """x + h in dt over row b's columns cols, h as its projection finishes it (int8 sums: times their scale)."""
    x = load(x_ref.at[b, cols], mask=ok).astype(f32)
    h = finished(load(h_ref.at[b, cols], mask=ok), None if hs_ref is None else load(hs_ref.at[cols], mask=ok), dt)
    return (x + h.astype(f32)).astype(dt)


def _inv_rms(s, n, eps):
    sf = s.astype(f32)
    return jax.lax.rsqrt(jnp.sum(sf * sf) / n + eps)


def _normed(s, inv_rms, scale, dt):
    y = (s.astype(f32) * inv_rms).astype(dt)
    return (scale.astype(f32) * y.astype(f32)).astype(dt)


def _zero_span(z_ref, width, k, span, mine=True):
    """Zero span k (`span` fp32 values) of a buffer [1, width], where `mine` (this program's turn)."""
    cols = iota(span, k * span)
    plgpu.store(z_ref.at[0, cols], jnp.zeros((span,), f32), mask=mine & (cols < width))


def _kernel(x_ref, h_ref, s_ref, *refs, n, eps, h_scaled, thresholded, batch, zeros):
    refs, z_refs = refs[:len(refs) - len(zeros)], refs[len(refs) - len(zeros):]
    hs_ref, (sum_ref, y_ref) = (refs[0] if h_scaled else None), refs[-2:]
    b = pl.program_id(0)

    @pl.when(b < batch)
    def _():
        cols = iota(next_pow2(n))
        ok = cols < n if n & (n - 1) else None
        dt = x_ref.dtype
        s = _summed(x_ref, h_ref, hs_ref, b, cols, ok, dt)
        plgpu.store(sum_ref.at[b, cols], s, mask=ok)
        y = _normed(s, _inv_rms(s, n, eps), load(s_ref.at[cols], mask=ok), dt)
        if thresholded:  # TEAL's rule of the product that reads y
            y = teal_input(y, refs[-3][0])
        plgpu.store(y_ref.at[b, cols], y, mask=ok)

    if zeros:  # programs past the rows: each zeroes one span of one buffer
        @pl.when(b >= batch)
        def _():
            q, first = b - batch, 0
            for z_ref, width in zip(z_refs, zeros):
                spans = pl.cdiv(width, ZERO_SPAN)
                _zero_span(z_ref, width, q - first, ZERO_SPAN, (q >= first) & (q < first + spans))
                first += spans


def _compact_kernel(x_ref, h_ref, s_ref, *refs, n, eps, h_scaled, layout, zeros):
    """Batch 1, program (segment, chunk) of the gather GEMV that reads y: the whole row's rms, then this
    chunk of x + h (stored by segment 0's programs) and of y, compacted (sparse_gemv.compact_chunk);
    and its span of each buffer in `zeros` zeroed."""
    hs_ref, refs = (refs[0], refs[1:]) if h_scaled else (None, refs)
    refs, z_refs = refs[:len(refs) - len(zeros)], refs[len(refs) - len(zeros):]
    in_refs, sum_ref, out_refs = refs[:-5], refs[-5], refs[-4:]
    seg, c = pl.program_id(0), pl.program_id(1)
    for z_ref, width in zip(z_refs, zeros):
        _zero_span(z_ref, width, seg * layout.chunks + c, next_pow2(pl.cdiv(width, layout.segments * layout.chunks)))
    dt = x_ref.dtype
    cols = iota(next_pow2(n))
    inv_rms = _inv_rms(_summed(x_ref, h_ref, hs_ref, 0, cols, cols < n if n & (n - 1) else None, dt), n, eps)
    j = iota(layout.blocks.chunk, c * layout.blocks.chunk)
    ok = j < n
    s = _summed(x_ref, h_ref, hs_ref, 0, j, ok, dt)
    plgpu.store(sum_ref.at[0, j], s, mask=ok & (seg == 0))
    y = _normed(s, inv_rms, load(s_ref.at[j], mask=ok), dt)
    sparse_gemv.compact_chunk(layout, y, ok, seg, c, in_refs, out_refs)


def add_rms_norm(x, h, scale, eps: float, h_scale=None, num_warps: int | None = None,
                 compaction: sparse_gemv.Compaction | None = None, threshold=None, zeros: tuple[int, ...] = ()):
    """(x + h, rms_norm(x + h, scale, eps)) for x [B, H] and h [B, >= H] (module docstring).
    num_warps: the default's 8 per 4096 columns (1 to 16), or the given (bench.kernels --norm).
    threshold: TEAL's rule applied to the normalised rows (sparsity.teal_input), for an XLA product
    that reads them: one launch fewer than a select of its own.
    compaction (batch 1): the normalised row comes back compacted for the gather GEMV that reads it
    (sparse_gemv.Compacted), one launch fewer than its own compaction.
    zeros: shapes (rows, width) of fp32 buffers that come back zeroed after the two (or the row
    and its compaction), for the GEMVs on the masked tiles that follow (sparse_gemv's `zeroed`,
    sum_shape)."""
    b, n = x.shape
    if (h.ndim != 2 or h.shape[0] < b or h.shape[1] < n or scale.shape != (n,) or scale.dtype != x.dtype
            or (h_scale is not None and jnp.shape(h_scale) != (n,))):
        raise ValueError(f"add_rms_norm: x {x.shape} {x.dtype}, h {h.shape}, scale {scale.shape} {scale.dtype}, "
                         f"h_scale {None if h_scale is None else jnp.shape(h_scale)} need h [>= B, >= H], scale [H] in "
                         "x's dtype and h_scale None or [H]")
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    warps = num_warps or max(1, min(16, next_pow2(n) // 512))
    extra = () if h_scale is None else (jnp.asarray(h_scale, f32),)
    flat = tuple(r * w for r, w in zeros)  # each buffer zeroed as one row
    bufs = tuple(jax.ShapeDtypeStruct((1, w), f32) for w in flat)
    if compaction is None:
        kernel = functools.partial(_kernel, n=n, eps=eps, h_scaled=h_scale is not None,
                                   thresholded=threshold is not None, batch=b, zeros=flat)
        rule = () if threshold is None else (jnp.asarray(threshold, f32).reshape(1),)
        x, y, *zeroed = call(kernel, (out, out, *bufs), grid=(b + sum(pl.cdiv(w, ZERO_SPAN) for w in flat),),
                             num_warps=warps, num_stages=1, name="add_rms_norm")(x, h, scale, *extra, *rule)
        return x, y, *(z.reshape(shape) for z, shape in zip(zeroed, zeros))
    if threshold is not None:
        raise ValueError("add_rms_norm: a compaction applies the thresholds itself (pass threshold=None)")
    layout = compaction.layout
    if b != 1 or layout.n_in != n:
        raise ValueError(f"add_rms_norm: a compaction for {layout.n_in} inputs needs x [1, {layout.n_in}], not {x.shape}")
    kernel = functools.partial(_compact_kernel, n=n, eps=eps, h_scaled=h_scale is not None, layout=layout,
                               zeros=flat)
    x, *listed = call(kernel, (out, *layout.outputs(x.dtype), *bufs), grid=(layout.segments, layout.chunks),
                      num_warps=warps, num_stages=1, name="add_rms_norm_compact")(x, h, scale, *extra,
                                                                                  *compaction.args())
    listed, zeroed = listed[:4], listed[4:]
    return x, sparse_gemv.Compacted(layout, *listed), *(z.reshape(shape) for z, shape in zip(zeroed, zeros))

"""The residual add and the RMSNorm after it, in one Pallas (Triton) launch per decode step.

    x, y = add_rms_norm(x, h, scale, eps)   # x + h, and rms_norm(x + h, scale, eps)

XLA runs this as three kernels (the add, the mean of squares, the scaling), each a launch of a
few bytes' work; a decode step has two per layer. The jnp definition is cats_jax.model.rms_norm
after a residual add in the activation dtype, and the kernel rounds where it does: x + h to
x's dtype, the normalised row to x's dtype before the scale, the product to x's dtype.

x [B, H], scale [H]. h [B, H] or a kernel's unfinished fp32 sums [B, P >= H] (sparse_gemv with
finish=False) with their int8 scale h_scale [H] or None: h is scaled and rounded to x's dtype first,
as the projection would have finished it, so no launch of its own does that. One program per row
holds the whole row (H up to a few thousand per 4 warps).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import call, finished, iota, load, next_pow2

f32 = jnp.float32


def _kernel(x_ref, h_ref, s_ref, *refs, n, eps, h_scaled):
    *hs_ref, sum_ref, y_ref = refs
    b = pl.program_id(0)
    cols = iota(next_pow2(n))
    ok = cols < n if n & (n - 1) else None
    dt = x_ref.dtype
    x = load(x_ref.at[b, cols], mask=ok).astype(f32)
    # h as the projection finishes it (int8 sums: times their scale), in x's dtype
    h = finished(load(h_ref.at[b, cols], mask=ok), load(hs_ref[0].at[cols], mask=ok) if h_scaled else None,
                 dt).astype(f32)
    s = (x + h).astype(dt)
    sf = s.astype(f32)
    y = (sf * jax.lax.rsqrt(jnp.sum(sf * sf) / n + eps)).astype(dt)
    out = (load(s_ref.at[cols], mask=ok).astype(f32) * y.astype(f32)).astype(dt)
    plgpu.store(sum_ref.at[b, cols], s, mask=ok)
    plgpu.store(y_ref.at[b, cols], out, mask=ok)


def add_rms_norm(x, h, scale, eps: float, h_scale=None, num_warps: int | None = None):
    """(x + h, rms_norm(x + h, scale, eps)) for x [B, H] and h [B, >= H] (module docstring).
    num_warps: the default's 4 per 4096 columns (1 to 8), or the given (bench.kernels --norm)."""
    b, n = x.shape
    if (h.ndim != 2 or h.shape[0] != b or h.shape[1] < n or scale.shape != (n,) or scale.dtype != x.dtype
            or (h_scale is not None and jnp.shape(h_scale) != (n,))):
        raise ValueError(f"add_rms_norm: x {x.shape} {x.dtype}, h {h.shape}, scale {scale.shape} {scale.dtype}, "
                         f"h_scale {None if h_scale is None else jnp.shape(h_scale)} need h [B, >= H], scale [H] in "
                         "x's dtype and h_scale None or [H]")
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    warps = num_warps or max(1, min(8, next_pow2(n) // 1024))
    kernel = functools.partial(_kernel, n=n, eps=eps, h_scaled=h_scale is not None)
    extra = () if h_scale is None else (jnp.asarray(h_scale, f32),)
    return call(kernel, (out, out), grid=(b,), num_warps=warps, num_stages=1, name="add_rms_norm")(x, h, scale, *extra)

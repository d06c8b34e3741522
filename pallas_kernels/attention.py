"""Decode attention in one Pallas (Triton) kernel: RoPE on q and the new key, the KV-cache write, and
GQA attention over the cache slots filled so far, split over the sequence (flash-decoding).

The jnp definition is cats_jax.model.attend (the model's attention at one token per row); the kernel
must equal it. Shapes: B rows, N query heads, K kv heads (G = N / K per kv head), D head dim (a
power of two), S cache slots.

- qkv [B, (N + 2K) D]: the fused q|k|v projection of each row's token, before RoPE; or that
  projection's unfinished fp32 sums [R >= B, P >= (N + 2K) D] (sparse_gemv with finish=False) with its
  int8 scale qkv_scale or None: the kernel scales and rounds them to the cache dtype as it loads
  them, as the projection would have finished them, so no launch of its own does that.
- positions [B]: each row's position p; its key and value go to slot p, and it attends to slots
  0..p (p - window + 1..p with a sliding window). Slots < p hold earlier tokens of the row.
- rope (cos, sin) [B, D / 2] fp32: RoPE's angles at each row's position (model.rope_angles),
  computed once a decode step for every layer: in each program, libdevice's sin and cos took ~700
  of its ~2800 sm_90 instructions and spilled registers (bench.sass).
- k_cache, v_cache [B, S, K, D]: updated in place (aliased): only slot p of each row is written.

Grid (B, K, splits): a program takes one row, one kv head (its G query heads share every key it
loads) and one span of `span` slots. It walks the filled slots of its span in blocks of `block`
(blocks past p are never loaded, so the cost grows with the context, not with S), keeping an
online softmax; the scores and the weighted values are tensor-core dots, the G query heads padded
to 16 rows; the program whose span holds p also folds in the new key and value from registers
and writes them to the cache. With one span (short contexts, enough rows and heads to fill the
GPU) the program normalises and stores the output itself; with several, each stores its partial
max, sum and [G, D] accumulator, and one more launch combines the splits (`combine`; its jnp
definition is `combine_reference`). That launch also hands o its input as o's GEMV wants it: with
o's TEAL threshold applied (XLA's product), or at batch 1 compacted for o's gather GEMV
(sparse_gemv.Compaction), so that neither takes a launch of its own. RoPE works on the two halves
of each head (rotate-half), so no lane permutation is needed: q . k = q1 . k1 + q2 . k2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import sparse_gemv
from pallas_kernels.common import call, finished, iota, load, mask2d, next_pow2
from pallas_kernels.sparse_gemv import teal_input

f32 = jnp.float32
_NEG = -1e30  # a finite "minus infinity": empty spans give exp(_NEG - m) = 0, never NaN


@dataclasses.dataclass(frozen=True)
class AttentionBlocks:
    block: int  # cache slots per loop step (at least 16: a dot operand)
    span: int  # cache slots per program (a multiple of block)
    num_warps: int = 4
    # 3: one block's loads in flight while the last one is used; at 2 Triton's loop waited for all
    # of them at each step (sm_90 machine code: DEPBAR.LE SB0, 0x0), a full memory latency a block
    num_stages: int = 3


def blocks_for(batch: int, num_kv_heads: int, groups: int, slots: int) -> AttentionBlocks:
    """Enough programs to spread the cache reads over the GPU (~128), at least one block each."""
    block = min(64, max(16, next_pow2(slots)))
    want = max(1, 128 // (batch * num_kv_heads))
    span = max(block, next_pow2(pl.cdiv(slots, want)))
    return AttentionBlocks(block=block, span=span)


def _rope(x1, x2, cos, sin):
    """HF rotate-half RoPE on the two halves of a head: (x1 cos - x2 sin, x2 cos + x1 sin)."""
    return x1 * cos - x2 * sin, x2 * cos + x1 * sin


def _kernel(qkv_ref, pos_ref, cos_ref, sin_ref, *refs, n_heads, n_kv, groups, gp, d, blk, window, scale, single,
            qkv_scaled):
    # kc_ref / vc_ref are the caches themselves (outputs aliased to the inputs): read, and slot pos written
    if qkv_scaled:
        qs_ref, *refs = refs
    *outs, kc_ref, vc_ref = refs
    b, kh, sp = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h = d // 2
    hp = max(h, 16)  # a half as a dot operand: at least 16 columns, the padding zeros
    h_ok = iota(hp) < h if hp != h else None
    pos = load(pos_ref.at[pl.ds(b, 1)])[0]
    cos, sin = (load(r.at[b, iota(hp)], mask=h_ok)[None, :] for r in (cos_ref, sin_ref))
    dt = kc_ref.dtype

    def projected(cols, mask=None):
        """Columns of row b's q|k|v as the projection finishes them: scaled (int8), rounded to dt."""
        return finished(load(qkv_ref.at[b, cols], mask=mask), load(qs_ref.at[cols], mask=mask) if qkv_scaled else None,
                        dt)

    g_ok = iota(gp) < groups  # query rows padded to gp (>= 16: tensor-core dots), the padding zeros
    q_ok = mask2d(g_ok, h_ok)
    q_cols = (kh * groups + iota(gp))[:, None] * d + iota(hp)[None, :]  # [gp, hp]: the first halves
    q1 = projected(q_cols, q_ok).astype(f32)
    q2 = projected(q_cols + h, q_ok).astype(f32)
    q1, q2 = _rope(q1, q2, cos, sin)
    q1, q2 = q1.astype(dt), q2.astype(dt)  # rounded to the activation dtype, as the jnp path's q is

    k_col = n_heads * d + kh * d
    v_col = (n_heads + n_kv) * d + kh * d
    kn1 = projected(iota(hp, k_col), h_ok).astype(f32)[None, :]
    kn2 = projected(iota(hp, k_col + h), h_ok).astype(f32)[None, :]
    kn1, kn2 = _rope(kn1, kn2, cos, sin)
    kn1, kn2 = kn1.astype(dt), kn2.astype(dt)
    vn = projected(iota(d, v_col))[None, :]

    lo_span = sp * blk.span
    lo = jnp.maximum(lo_span, 0 if window is None else pos - window + 1)  # first slot to read
    hi = jnp.minimum(lo_span + blk.span, pos)  # past the last (slot pos is the new token)
    start = lo - lo % blk.block

    def step(k, carry):
        m, l, acc = carry
        s0 = start + k * blk.block
        slots = iota(blk.block, s0)
        ok = (slots >= lo) & (slots < hi)
        k_ok = mask2d(ok, h_ok)
        k1 = load(kc_ref.at[b, slots[:, None], kh, iota(hp)[None, :]], mask=k_ok)
        k2 = load(kc_ref.at[b, slots[:, None], kh, iota(hp, h)[None, :]], mask=k_ok)
        v = load(vc_ref.at[b, pl.ds(s0, blk.block), kh, pl.ds(0, d)], mask=ok[:, None])
        # [gp, block] on the tensor cores: q . k = q1 . k1 + q2 . k2 (rotate-half halves)
        s = (plgpu.dot(q1, k1, trans_b=True) + plgpu.dot(q2, k2, trans_b=True)) * scale
        s = jnp.where(ok[None, :], s, _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(dt), v)  # p rounded as the jnp path's probs are
        return m_new, l * alpha + jnp.sum(p, axis=1), acc

    init = (jnp.full((gp,), _NEG, f32), jnp.zeros((gp,), f32), jnp.zeros((gp, d), f32))
    m, l, acc = jax.lax.fori_loop(0, pl.cdiv(jnp.maximum(hi - start, 0), blk.block), step, init)

    # the new token: in the span that holds slot pos only
    here = (pos >= lo_span) & (pos < lo_span + blk.span)
    s_new = jnp.sum(q1.astype(f32) * kn1.astype(f32) + q2.astype(f32) * kn2.astype(f32), axis=1) * scale  # [gp]
    s_new = jnp.where(here, s_new, _NEG)
    m_new = jnp.maximum(m, s_new)
    alpha, p_new = jnp.exp(m - m_new), jnp.exp(s_new - m_new)
    acc = acc * alpha[:, None] + p_new.astype(dt).astype(f32)[:, None] * vn.astype(f32)
    l = l * alpha + p_new
    m = m_new

    mine = jnp.full((1, hp), here) if h_ok is None else here & h_ok[None, :]
    at = iota(1, pos)[:, None]
    plgpu.store(kc_ref.at[b, at, kh, iota(hp)[None, :]], kn1, mask=mine)
    plgpu.store(kc_ref.at[b, at, kh, iota(hp, h)[None, :]], kn2, mask=mine)
    plgpu.store(vc_ref.at[b, pl.ds(pos, 1), kh, pl.ds(0, d)], vn, mask=jnp.full((1, d), here))
    if single:  # the whole context in this program: the output itself, [groups, d] of row b
        (o_ref,) = outs
        cols = (kh * groups + iota(gp))[:, None] * d + iota(d)[None, :]
        plgpu.store(o_ref.at[b, cols], (acc / l[:, None]).astype(o_ref.dtype), mask=g_ok[:, None])
        return
    m_ref, l_ref, acc_ref = outs
    plgpu.store(m_ref.at[b, kh, sp, pl.ds(0, gp)], m)
    plgpu.store(l_ref.at[b, kh, sp, pl.ds(0, gp)], l)
    plgpu.store(acc_ref.at[b, kh, sp, pl.ds(0, gp), pl.ds(0, d)], acc)


def decode_attention(qkv, positions, k_cache, v_cache, rope, *, num_heads: int, num_kv_heads: int,
                     sliding_window: int | None = None, blocks: AttentionBlocks | None = None, qkv_scale=None,
                     out_threshold=None, compaction: sparse_gemv.Compaction | None = None):
    """One decode token per row (module docstring): (out [B, N D] in k_cache's dtype, k_cache, v_cache).
    out_threshold: o's TEAL threshold, applied to out. compaction (batch 1): out comes back compacted
    for o's gather GEMV (sparse_gemv.Compacted) when the splits are combined (several spans); with one
    span it comes back as it is."""
    b, s, k, d = k_cache.shape
    if k != num_kv_heads or v_cache.shape != k_cache.shape or d & (d - 1) or d < 16:
        raise ValueError(f"decode_attention: caches {k_cache.shape} / {v_cache.shape} need [B, S, {num_kv_heads}, D] "
                         "with D a power of two, at least 16")
    width = (num_heads + 2 * k) * d
    cos, sin = rope
    if (qkv.ndim != 2 or qkv.shape[0] < b or qkv.shape[1] < width or positions.shape != (b,) or num_heads % k
            or (qkv_scale is not None and jnp.shape(qkv_scale) != (width,)) or cos.shape != (b, d // 2)
            or sin.shape != cos.shape):
        raise ValueError(f"decode_attention: qkv {qkv.shape}, positions {positions.shape}, rope {cos.shape} / "
                         f"{sin.shape}, qkv_scale {None if qkv_scale is None else jnp.shape(qkv_scale)} do not fit "
                         f"{num_heads} heads over caches {k_cache.shape} (qkv [>= B, >= {width}], rope [B, {d // 2}], "
                         f"qkv_scale None or [{width}])")
    groups = num_heads // k
    gp = max(16, next_pow2(groups))  # tensor-core dots take at least 16 rows
    blk = blocks or blocks_for(b, k, groups, s)
    if blk.block < 16 or blk.span % blk.block:
        raise ValueError(f"decode_attention: {blk} needs a block of at least 16 slots that divides the span")
    splits = pl.cdiv(s, blk.span)
    kernel = functools.partial(_kernel, n_heads=num_heads, n_kv=k, groups=groups, gp=gp, d=d, blk=blk,
                               window=sliding_window, scale=d ** -0.5, single=splits == 1,
                               qkv_scaled=qkv_scale is not None)
    if splits == 1:
        outs = (jax.ShapeDtypeStruct((b, num_heads * d), k_cache.dtype),)
    else:
        outs = (jax.ShapeDtypeStruct((b, k, splits, gp), f32), jax.ShapeDtypeStruct((b, k, splits, gp), f32),
                jax.ShapeDtypeStruct((b, k, splits, gp, d), f32))
    caches = tuple(jax.ShapeDtypeStruct(c.shape, c.dtype) for c in (k_cache, v_cache))
    *parts, k_cache, v_cache = call(kernel, (*outs, *caches), grid=(b, k, splits), num_warps=blk.num_warps,
                                    num_stages=blk.num_stages, name="decode_attention",
                                    given=(len(outs), len(outs) + 1))(
        qkv, positions.astype(jnp.int32), cos.astype(f32), sin.astype(f32),
        *(() if qkv_scale is None else (jnp.asarray(qkv_scale, f32),)), k_cache, v_cache)
    if splits == 1:
        out = parts[0]
        if out_threshold is not None:  # rare (one span: many rows and kv heads); an XLA select
            out = teal_input(out, out_threshold)
        return out, k_cache, v_cache
    return combine(*parts, groups=groups, dtype=k_cache.dtype, threshold=out_threshold, compaction=compaction), \
        k_cache, v_cache


def combine_reference(m, l, acc, groups: int, dtype):
    """The splits' partial softmax (max m, sum l [B, K, splits, gp], weighted values acc [B, K, splits, gp, D])
    combined, relative to each query head's global max: out [B, N D] in dtype (combine's definition)."""
    b, k, _, _, d = acc.shape
    top = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - top)
    out = jnp.sum(w[..., None] * acc, axis=2) / jnp.sum(w * l, axis=2)[..., None]  # [B, K, gp, D]
    return out[:, :, :groups].reshape(b, k * groups * d).astype(dtype)


def _combine_kernel(m_ref, l_ref, acc_ref, *refs, groups, d, n, splits, chunk, dt, thresholded, layout):
    """Program (row, chunk of the output's columns): combine_reference on those columns, then o's
    TEAL rule (thresholded), or compacted for o's gather GEMV (layout: batch 1)."""
    b, c = pl.program_id(0), pl.program_id(1)
    cols = iota(chunk, c * chunk)
    ok = cols < n
    head, dd = cols // d, cols % d
    kh, g = head // groups, head % groups
    sp = iota(next_pow2(splits))
    mask = (sp < splits)[:, None] & ok[None, :]  # [splits, chunk]
    at = (b, kh[None, :], sp[:, None], g[None, :])
    m = jnp.where(mask, load(m_ref.at[at], mask=mask), _NEG)
    w = jnp.exp(m - jnp.max(m, axis=0)[None, :])
    acc = load(acc_ref.at[(*at, dd[None, :])], mask=mask)
    out = (jnp.sum(w * acc, axis=0) / jnp.sum(w * load(l_ref.at[at], mask=mask), axis=0)).astype(dt)
    if layout is not None:
        sparse_gemv.compact_chunk(layout, out, ok, b, c, refs[:-4], refs[-4:])  # b = 0: one row, one segment
        return
    if thresholded:
        out = teal_input(out, refs[0][0])
    plgpu.store(refs[-1].at[b, cols], out, mask=ok)


def combine(m, l, acc, *, groups: int, dtype, threshold=None, compaction: sparse_gemv.Compaction | None = None):
    """The splits combined in one launch (combine_reference), with o's TEAL threshold applied or, at
    batch 1, compacted for o's gather GEMV: [B, N D] in dtype, or sparse_gemv.Compacted."""
    b, k, splits, _, d = acc.shape
    n = k * groups * d
    layout = None if compaction is None else compaction.layout
    if layout is not None and (b != 1 or layout.n_in != n or layout.segments != 1):
        raise ValueError(f"combine: a compaction for {layout.n_in} inputs in {layout.segments} segments "
                         f"does not fit {b} rows of {n} outputs")
    # 128 columns a program: 32 programs for a 4096-wide output, each a few loads per thread deep
    # (512: 8 programs, 203 registers and 192 loads per thread at 16 splits; bench.sass)
    chunk = layout.blocks.chunk if layout else min(128, next_pow2(n))
    kernel = functools.partial(_combine_kernel, groups=groups, d=d, n=n, splits=splits, chunk=chunk, dt=dtype,
                               thresholded=threshold is not None, layout=layout)
    args = compaction.args() if layout else (() if threshold is None else (jnp.asarray(threshold, f32).reshape(1),))
    outs = layout.outputs(dtype) if layout else jax.ShapeDtypeStruct((b, n), dtype)
    res = call(kernel, outs, grid=(b, pl.cdiv(n, chunk)), num_warps=4, num_stages=1, name="combine_splits")(
        m, l, acc, *args)
    return sparse_gemv.Compacted(layout, *res) if layout else res

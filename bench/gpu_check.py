"""GPU correctness check of the Pallas kernels (the CPU tests run them in interpret mode only).

    python -m bench.gpu_check [--seed N] [--no-model]

1. cats_mlp and sparse_gemv (masked tiles, and the batch-1 gather path) on fresh random inputs:
   real shapes and random ragged ones, B = 1..16, sparsity 0..95%, outputs NaN-poisoned; relative
   error against the fp32 reference (sparsity.gated_mlp at full fp32 matmul precision) and the
   same kept neurons (but for gates within 1e-5 of the threshold: summation order); the same with
   int8 weights (one fp32 scale per output channel) against the fp32 reference on the dequantized
   weights. The residual add + RMSNorm kernel, and the kernels that compact a gather's input as
   they make it (check_compacted).
2. The decode-attention kernel against model.attend: GQA ratios 1..8, sliding windows, positions
   near the cache's capacity, caches updated in place. It and the norm kernel also take their
   input as a GEMV leaves it (padded fp32 sums and an int8 scale).
3. Greedy decoding of a SmolLM2-sized random model and of its int8 copy (LM head int8 too, on the
   kernels' masked tiles at decode steps): the kernel decode path
   (cats_jax.decode with "pallas") against its jnp path, the same tokens expected in fp32 (dense;
   the sparse modes' tokens are reported, as a flipped threshold test may part them); and
   both paths teacher-forced on the same tokens and cache, their logits compared step by step
   (check_forced: tells a threshold test flipped by rounding from a kernel error), float and int8
   at batch 1 and 3 (--quick: 1); TEAL also with batch 1 on the gather path.
Exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from bench.kernels import kernel_weights, random_mlp, threshold_for
from cats_jax.quantize import dequantize, quantize_int8
from cats_jax.sparsity import MODES, cats_activation, gated_mlp
from pallas_kernels import cats_mlp as K
from pallas_kernels import sparse_gemv as G
from pallas_kernels.common import poisoned_outputs

f32 = jnp.float32
TOL = 1e-2  # bf16 output and bf16 hidden activations; fp32 accumulation
REAL = [(1, 4096, 14336), (8, 4096, 11008), (3, 576, 1536), (2, 5120, 13824), (5, 8192, 2816)]


def rel_err(y, ref) -> float:
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    if not np.isfinite(y).all():
        return float("nan")  # unwritten (poisoned) elements
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def check_mlp(b, h, i, sparsity, seed, quantized=False) -> bool:
    """gate_up, then sparse_gemv of the down projection (quantized: int8 weights, fp32 scales)."""
    wg, wu, wd = random_mlp(h, i, seed)
    w_gu, w_down, scales = kernel_weights(wg, wu, wd, quantized)
    if quantized:  # the reference reads the weights the kernel reads: q * scale
        s_gu, s_down = scales
        wg, wu, wd = dequantize(w_gu[:i].T, s_gu[:i]), dequantize(w_gu[i:].T, s_gu[i:]), dequantize(w_down, s_down)
    x = jax.random.normal(jax.random.key(seed + 1), (b, h), f32).astype(jnp.bfloat16)
    with jax.default_matmul_precision("highest"):
        g = jnp.dot(x.astype(f32), wg.astype(f32))
        t = threshold_for(jax.nn.silu(g), sparsity)
        a = cats_activation(g, t)
        ref = gated_mlp(x, wg, wu, wd, t)
    with poisoned_outputs():
        y, hidden = K.cats_mlp(x, w_gu, w_down, t, scales=scales)
    # the same neurons kept, but for a gate within fp32 summation noise of the threshold (threshold_for
    # puts it halfway between two values; at 55 k gates two can sit 1e-6 apart)
    flips = (np.asarray(hidden) == 0) != (np.asarray(a) == 0)
    ties = np.abs(np.abs(np.asarray(jax.nn.silu(g))) - t) <= 1e-5 * t
    same_kept = not np.any(flips & ~ties)
    err = rel_err(y, ref)
    ok = same_kept and err < TOL
    union = float(jnp.mean(jnp.all(a == 0, axis=0)))
    print(f"cats_mlp{' int8' if quantized else ''} B={b} H={h:5d} I={i:5d} sparsity {sparsity:.2f} (union {union:.2f}): "
          f"rel err {err:.2e}, same kept neurons {same_kept} ({int(flips.sum())} flipped at ties) -> "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_gemv(b, n_in, n_out, sparsity, seed, variant="masked", quantized=False) -> bool:
    """variant: "masked" (masked tiles: multiply-adds at batch 1, dots above, atomic adds), batch 1 and
    b rows; or "gather" (batch 1 only: compact, then gather); or "gated" (the gather, its input
    silu(gate) * up computed by the compaction from gate|up sums). quantized: int8 rows."""
    b = 1 if variant in ("gather", "gated") else b
    w, _, _ = random_mlp(n_in, n_out, seed)
    q, scale = quantize_int8(w) if quantized else (w, None)  # the kernel's weights
    w = dequantize(q, scale) if quantized else w  # the reference's
    given, gated = None, variant == "gated"  # gated: the input as silu(gate) * up of gate|up sums
    if gated:
        given = jax.random.normal(jax.random.key(seed + 1), (b, 2 * n_in), f32) * 2
        x = G.gated_input(given, None, n_in, jnp.bfloat16)
    else:
        x = jax.random.normal(jax.random.key(seed + 1), (b, n_in), f32).astype(jnp.bfloat16)
    t = threshold_for(x, sparsity)
    with jax.default_matmul_precision("highest"):
        ref = jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0) @ w.astype(f32)
    blk = G.GatherBlocks() if variant in ("gather", "gated") else G.blocks_for(b, n_in, n_out)
    with poisoned_outputs():
        if gated:
            y = G.sparse_gemv(given, q, t, blocks=blk, scale=scale, out_dtype=jnp.bfloat16, gated=True)
        else:
            y = G.sparse_gemv(x, q, t, blocks=blk, scale=scale)
    err = rel_err(y, ref)
    print(f"sparse_gemv {variant}{' int8' if quantized else ''} B={b} in={n_in:5d} out={n_out:5d} sparsity {sparsity:.2f}: rel err {err:.2e} -> "
          f"{'ok' if err < TOL else 'FAIL'}", flush=True)
    return err < TOL


def _unfinished(finished, key):
    """The q|k|v or down projection as a GEMV kernel leaves it (sparse_gemv's finish=False): fp32
    sums, columns of NaN past them (never to be read), and an int8-like scale, whose finished values
    in `finished`'s dtype stand for it in the reference."""
    scale = jax.random.uniform(key, (finished.shape[1],), f32, 0.01, 0.05)
    sums = finished.astype(f32) / scale
    pad = jnp.full((finished.shape[0], 64), jnp.nan, f32)
    return jnp.concatenate([sums, pad], axis=1), scale, (sums * scale).astype(finished.dtype)


def check_attention(b, heads, kv_heads, d, slots, window, seed, dtype=jnp.bfloat16, one_span=False,
                    unfinished=False) -> bool:
    """The decode-attention kernel against model.attend (fp32 inputs at full precision) on fresh
    random q|k|v and caches, positions anywhere in the cache (near capacity too): the output and
    the updated caches. one_span: one program per row and kv head (no combine of splits).
    unfinished: q|k|v as a GEMV's padded fp32 sums with their scale."""
    from cats_jax import model as M
    from cats_jax.config import ModelConfig
    from pallas_kernels.attention import AttentionBlocks, decode_attention
    from pallas_kernels.common import next_pow2

    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=heads,
                      num_kv_heads=kv_heads, head_dim=d, sliding_window=window, name="check")
    ks = jax.random.split(jax.random.key(seed), 4)
    qkv = jax.random.normal(ks[0], (b, (heads + 2 * kv_heads) * d), f32).astype(dtype)
    ck, cv = (jax.random.normal(k, (b, slots, kv_heads, d), f32).astype(dtype) for k in ks[1:3])
    pos = jax.random.randint(ks[3], (b,), 0, slots).at[0].set(slots - 1)
    given, q_scale = qkv, None
    if unfinished:
        given, q_scale, qkv = _unfinished(qkv, ks[3])
    q, key, val = jnp.split(qkv.astype(f32), [heads * d, (heads + kv_heads) * d], axis=1)
    with jax.default_matmul_precision("highest"):
        ref, (rk, rv) = M.attend(cfg, q.reshape(b, 1, heads, d), key.reshape(b, 1, kv_heads, d),
                                 val.reshape(b, 1, kv_heads, d), pos[:, None], (ck.astype(f32), cv.astype(f32)))
    with poisoned_outputs():
        blk = AttentionBlocks(block=16, span=next_pow2(slots)) if one_span else None
        out, gk, gv = jax.jit(lambda q, s, *a: decode_attention(q, *a, num_heads=heads, num_kv_heads=kv_heads,
                                                                sliding_window=window, blocks=blk, qkv_scale=s))(
            given, q_scale, pos, ck, cv, M.rope_angles(pos, M.rope_inv_freq(cfg)))
    err, kerr, verr = rel_err(out, ref[:, 0]), rel_err(gk, rk), rel_err(gv, rv)
    ok = max(err, kerr, verr) < TOL
    print(f"decode_attention{' one span' if one_span else ''}{' unfinished qkv' if unfinished else ''} B={b} heads {heads}/{kv_heads} D={d} slots {slots} window {window} positions "
          f"{np.asarray(pos).tolist()[:4]}: rel err out {err:.2e}, k cache {kerr:.2e}, v cache {verr:.2e} -> "
          f"{'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_norm(b, n, seed, unfinished=False) -> bool:
    """add_rms_norm (residual add + RMSNorm) against the fp32 reference. unfinished: h as a GEMV's
    padded fp32 sums with their scale."""
    from cats_jax.model import rms_norm
    from pallas_kernels.norm import add_rms_norm

    ks = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(ks[0], (b, n), f32).astype(jnp.bfloat16)
    h = jax.random.normal(ks[1], (b, n), f32) * 2
    scale = (1 + jax.random.normal(ks[2], (n,), f32) / 4).astype(jnp.bfloat16)
    given, h_scale = h, None
    if unfinished:
        given, h_scale, h = _unfinished(h.astype(jnp.bfloat16), ks[2])
    want_x = x.astype(f32) + h.astype(jnp.bfloat16).astype(f32)
    want_y = rms_norm(want_x, scale.astype(f32), 1e-5)
    with poisoned_outputs():
        got_x, got_y = add_rms_norm(x, given, scale, 1e-5, h_scale)
    ex, ey = rel_err(got_x, want_x), rel_err(got_y, want_y)
    ok = ex < TOL and ey < TOL
    print(f"add_rms_norm{' unfinished h' if unfinished else ''} B={b} H={n}: rel err sum {ex:.2e}, norm {ey:.2e} -> {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def check_compacted(n_in, n_out, segments, sparsity, seed) -> bool:
    """The kernels that compact a batch-1 gather's input as they store it (the add + norm before q|k|v
    and gate|up; the attention's combine before o), each followed by the gather, against the same
    kernel's plain output through sparse_gemv's own compaction (the same values, the same threshold
    tests: only the atomic adds' order differs). Also the combine's output with o's rule applied."""
    from cats_jax import model as M
    from cats_jax.config import ModelConfig
    from pallas_kernels import attention as A
    from pallas_kernels.norm import add_rms_norm

    ks = jax.random.split(jax.random.key(seed), 6)
    bf = jnp.bfloat16
    w = (jax.random.normal(ks[0], (n_in, n_out), f32) / np.sqrt(n_in)).astype(bf)
    blk = G.GatherBlocks(rows=32, cols=64, chunk=256)
    widths = [n_out // segments] * segments
    # norm: x + h, normalised; thresholds at `sparsity` of the output, one per segment (apart)
    x, h = (jax.random.normal(k, (1, n_in), f32).astype(bf) for k in ks[1:3])
    scale = (1 + jax.random.normal(ks[3], (n_in,), f32) / 4).astype(bf)
    want_x, y = add_rms_norm(x, h, scale, 1e-5)
    ts = [threshold_for(y, sparsity) * (1 + 0.1 * i) for i in range(segments)]
    layout = G.CompactLayout(n_in, n_out, segments, blk)
    comp = G.Compaction(layout, tuple(jnp.asarray(t, f32).reshape(1) for t in ts))
    # fp32 sums (finish=False): the atomic adds' order may move a bf16 output's last bit
    want = G.sparse_gemv(y, w, ts, segments=tuple(widths), blocks=blk, finish=False)
    with poisoned_outputs():
        got_x, yc = add_rms_norm(x, h, scale, 1e-5, compaction=comp)
        got = G.sparse_gemv(yc, w, segments=tuple(widths), finish=False)
    errs = {"norm sum": rel_err(got_x, want_x), "norm + gather": rel_err(got, want)}
    # combine: the splits of a random attention with n_in / 64 heads of 64 (its output is o's input),
    # compacted for o's single segment
    d = 64
    heads = n_in // d
    kv = math.gcd(heads, 8)
    cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=heads,
                      num_kv_heads=kv, head_dim=d, name="check")
    slots = 700
    qkv = jax.random.normal(ks[4], (1, (heads + 2 * kv) * d), f32).astype(bf)
    ck, cv = (jax.random.normal(k, (1, slots, kv, d), f32).astype(bf) for k in jax.random.split(ks[5]))
    pos = jnp.asarray([slots - 5], jnp.int32)
    rope = M.rope_angles(pos, M.rope_inv_freq(cfg))
    attend = lambda **kw: A.decode_attention(qkv, pos, ck, cv, rope, num_heads=heads, num_kv_heads=kv,
                                             blocks=A.AttentionBlocks(64, 128), **kw)[0]
    out = attend()
    t = threshold_for(out, sparsity)
    comp = G.Compaction(G.CompactLayout(n_in, n_out, 1, blk), (jnp.asarray(t, f32).reshape(1),))
    want = G.sparse_gemv(out, w, t, blocks=blk, finish=False)
    with poisoned_outputs():
        got = G.sparse_gemv(attend(compaction=comp), w, finish=False)
        kept = attend(out_threshold=t)
    errs["combine + gather"] = rel_err(got, want)
    errs["combine, o's rule"] = rel_err(kept, jnp.where(jnp.abs(out.astype(f32)) > t, out, 0))
    ok = all(e < 1e-5 for e in errs.values())
    print(f"compacted in the producer: in={n_in} out={n_out} segments {segments} sparsity {sparsity:.2f}: rel err "
          + ", ".join(f"{k} {e:.1e}" for k, e in errs.items()) + f" -> {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def _checked_model(dtype, mode, quantized, cfg=None):
    """The greedy checks' model (SmolLM2-135M-sized random weights unless cfg; quantized: its int8
    copy, the LM head too) with `mode`'s thresholds at 50%, calibrated on it (random tokens)."""
    from bench.decode import random_thresholds
    from cats_jax import model as M
    from cats_jax.config import preset

    cfg = cfg or preset("smollm2-135m")
    make = lambda: M.quantize_model(M.init_random(cfg, seed=0, dtype=dtype), head=True) if quantized else M.init_random(
        cfg, seed=0, dtype=dtype)
    thresholds = random_thresholds(make(), [0.5], 512, 0)[0.5]
    m = make()
    for site in MODES[mode]:
        m.set_thresholds(site, thresholds[site])
    m.set_mode(mode)
    return m


def check_greedy(dtype, mode="cats", steps=32, batch=(1, 3), quantized=False, gather=False) -> bool:
    """Greedy tokens through the kernels vs the jnp path of `mode` (cats: the MLP kernel; teal:
    the sparse GEMVs; quantized: the model's int8 copy, its LM head too, thresholds calibrated on it). In fp32 they
    must be equal; in bf16 the two paths round different accumulation orders, and a near-tie
    between the top two logits of a random model can flip a token, so bf16 is reported only.
    TEAL tests millions of values a sequence against thresholds (SmolLM2-sized, 70 tokens: 10.5 M,
    79 within 1e-5 of their threshold, relatively), so even in fp32 a few tests can flip between
    the paths' summation orders; check_forced tells such flips from errors."""
    from cats_jax import decode
    from cats_jax.generate import generate

    m = _checked_model(dtype, mode, quantized)
    cfg = m.cfg
    ref, kern = decode.prepare(m, "jnp"), decode.prepare(m, "pallas")
    rng = np.random.default_rng(0)
    ok = True
    with _kernels_on_small_matrices(gather):
        for b in batch:
            prompts = [rng.integers(3, cfg.vocab_size, size=int(rng.integers(4, 40))).tolist() for _ in range(b)]
            # fp32: XLA's dots in full fp32 too (its default on GPU rounds fp32 operands to TF32)
            with jax.default_matmul_precision("highest" if dtype == jnp.float32 else "default"):
                want = generate(ref, prompts, steps, eos_ids=())
                with poisoned_outputs():
                    got = generate(kern, prompts, steps, eos_ids=())
            same = got.tokens == want.tokens
            first = [next((k for k, (p, q) in enumerate(zip(g, w)) if p != q), None)
                     for g, w in zip(got.tokens, want.tokens)]
            # at a mismatch: the reference's margin between its top two logits there (full recompute)
            gaps = [None if k is None else _top2_gap(m, prompts[r] + want.tokens[r][:k]) for r, k in enumerate(first)]
            print(f"greedy {mode}{' int8+head' if quantized else ''}{' gather' if gather else ''} smollm2-135m-sized {jnp.dtype(dtype).name} B={b}: {steps} tokens, same tokens {same} "
                  f"(first mismatch per row {first}, reference top-2 logit margin there {gaps}); "
                  f"measured MLP sparsity {got.mlp_sparsity} kernel vs {want.mlp_sparsity} jnp; decode "
                  f"{got.decode_tokens_per_s:.0f} vs {want.decode_tokens_per_s:.0f} tok/s", flush=True)
            ok &= same
    return ok


@contextlib.contextmanager
def _kernels_on_small_matrices(gather: bool = False):
    """The GEMV kernels on every matrix of the checked model (its matrices are small); gather: batch 1
    on the gather path (its compactions in the add + norm and the attention's combine)."""
    min_weights, G.MIN_KERNEL_WEIGHTS = G.MIN_KERNEL_WEIGHTS, 0
    table, tuned = G.TABLE[1], G.TUNED
    if gather:
        G.TABLE[1], G.TUNED = G.GatherBlocks(rows=32, cols=64, chunk=256), {}
    try:
        yield
    finally:
        G.MIN_KERNEL_WEIGHTS, G.TABLE[1], G.TUNED = min_weights, table, tuned


def _top2_gap(model, tokens) -> float:
    with jax.default_matmul_precision("highest"):
        logits = model(jnp.asarray([tokens]))[0][0, -1].astype(jnp.float32)
    top = jnp.sort(logits)[-2:]
    return float(top[1] - top[0])


def check_forced(dtype, mode="teal", steps=32, batch=3, quantized=False, cfg=None, gather=False) -> bool:
    """Teacher-forced: the kernels' and the jnp path's decode steps on the same tokens (prompts, then
    the jnp path's greedy tokens, one step each from an empty cache) and the same cache (the jnp
    path's: a flip would otherwise carry on through the kernels' own cache into every later step of
    the row), their logits compared step by step. A threshold test that flips between the paths
    moves a step's logits a little; an error in a kernel moves most. Pass (fp32): the median step's
    max |logit difference| below 1e-4 of the logits' rms, and the same argmax at >= 90% of the
    steps. bf16 is reported only."""
    from cats_jax import decode
    from cats_jax import model as M
    from cats_jax.generate import generate

    m = _checked_model(dtype, mode, quantized, cfg)
    cfg = m.cfg
    ref, kern = decode.prepare(m, "jnp"), decode.prepare(m, "pallas")
    prompts = np.random.default_rng(1).integers(3, cfg.vocab_size, (batch, 16)).tolist()
    precision = "highest" if dtype == jnp.float32 else "default"
    with _kernels_on_small_matrices(gather), jax.default_matmul_precision(precision):
        seq = jnp.asarray([p + t for p, t in zip(prompts, generate(ref, prompts, steps, eos_ids=()).tokens)])

        step_of = [jax.jit(lambda w, tok, pos, cache, plan=dec.plan: decode.forward(w, tok, pos, cache, plan=plan)[:2])
                   for dec in (ref, kern)]
        cache, want, got = M.init_cache(cfg, batch, seq.shape[1], dtype), [], []
        for k in range(seq.shape[1] - 1):
            tok, pos = seq[:, k:k + 1], jnp.full((batch, 1), k, jnp.int32)
            with poisoned_outputs():
                got.append(step_of[1](kern.weights, tok, pos, cache)[0][:, 0])
            y, cache = step_of[0](ref.weights, tok, pos, cache)
            want.append(y[:, 0])
        want, got = (jnp.stack(v, axis=1).astype(f32) for v in (want, got))  # [B, steps, V]
    diff = jnp.max(jnp.abs(got - want), axis=-1) / jnp.sqrt(jnp.mean(want * want, axis=-1))  # [B, steps]
    agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(want, -1)))
    median, worst = float(jnp.median(diff)), float(jnp.max(jnp.where(jnp.isnan(diff), jnp.inf, diff)))
    ok = median < 1e-4 and agree >= 0.9 if dtype == jnp.float32 else True
    print(f"forced {mode}{' int8+head' if quantized else ''}{' gather' if gather else ''} {cfg.name}-sized {jnp.dtype(dtype).name} B={batch}: "
          f"{diff.size} steps, max |logit difference| / rms: median {median:.1e}, worst {worst:.1e}, steps above 1e-3 "
          f"{int(jnp.sum(diff > 1e-3))}; same argmax {agree:.1%} -> {'ok' if ok else 'FAIL'}", flush=True)
    return ok


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, help="seed of the random shapes and inputs (default: fresh)")
    p.add_argument("--no-model", action="store_true", help="skip the greedy-decoding checks (need flax)")
    p.add_argument("--greedy", default="dense,cats,teal", help="modes of the greedy-decoding checks (default dense,cats,teal)")
    p.add_argument("--no-kernels", action="store_true", help="skip the kernel-level checks (greedy checks only)")
    p.add_argument("--quick", action="store_true", help="a few small shapes only (e.g. under compute-sanitizer)")
    a = p.parse_args(argv)
    if jax.default_backend() != "gpu":
        p.error("this check needs a GPU; the CPU tests cover interpret mode")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little") % 2**30
    print(f"seed {seed}; device {jax.devices()[0].device_kind}")
    rng = np.random.default_rng(seed)
    sp = lambda: float(rng.uniform(0.0, 0.95))
    mlp_cases = [(b, h, i, sp()) for b, h, i in (REAL[2:3] if a.quick else REAL)]
    mlp_cases += [(int(rng.integers(1, 17)), int(rng.integers(16, 3000)), int(rng.integers(16, 6000)), sp())
                  for _ in range(2 if a.quick else 6)]
    gemv_cases = [(int(rng.integers(1, 17)), int(rng.integers(16, 15000)), int(rng.integers(16, 9000)), sp())
                  for _ in range(2 if a.quick else 5)]
    attention_cases = [(1, 32, 8, 128, 4096, None), (4, 32, 8, 128, 640, 256), (3, 9, 3, 64, 300, None),
                       (2, 24, 3, 128, 1000, None), (8, 8, 8, 64, 77, 16)][: 2 if a.quick else None]
    ok = True
    if not a.no_kernels:
        ok &= all([check_attention(*c, seed=seed + k, one_span=one, unfinished=u) for k, c in enumerate(attention_cases)
                   for one in (False, True) for u in (False, True)])
        ok &= all([check_mlp(*c, seed=seed + k) for k, c in enumerate(mlp_cases)])
        ok &= all([check_gemv(*c, seed=seed + k, variant=v, quantized=qz) for k, (b, *shape) in enumerate(gemv_cases)
                   for c, v in (((b, *shape), "masked"), ((1, *shape), "masked"), ((1, *shape), "gather"),
                                ((1, *shape), "gated"))
                   for qz in (False, True)])
        ok &= all([check_mlp(*c, seed=seed + k, quantized=True) for k, c in enumerate(mlp_cases)])
        ok &= all([check_norm(b, n, seed + k, u) for k, (b, n) in enumerate([(1, 4096), (5, 576), (2, 8192)])
                   for u in (False, True)])
        ok &= all([check_compacted(*c, sp(), seed + k) for k, c in enumerate([(4096, 6144, 3), (576, 1536, 2),
                                                                              (1024, 4096, 1)])])
    if not a.no_model:
        for mode in a.greedy.split(","):
            # a sparse mode's fp32 greedy tokens may part where a threshold test flips (check_greedy):
            # reported; the teacher-forced steps decide
            counted = mode == "dense"
            batches = (1,) if a.quick else (1, 3)
            same = check_greedy(jnp.float32, mode, batch=batches)
            same &= check_greedy(jnp.float32, mode, batch=batches, quantized=True)
            for b in batches:
                ok &= check_forced(jnp.float32, mode, batch=b)
                ok &= check_forced(jnp.float32, mode, batch=b, quantized=True)
            if mode == "teal":  # batch 1 on the gather path, its inputs compacted by the kernels that make them
                same &= check_greedy(jnp.float32, mode, batch=(1,), gather=True)
                ok &= check_forced(jnp.float32, mode, batch=1, gather=True)
            ok &= same or not counted
            check_greedy(jnp.bfloat16, mode, batch=(1,))
    print("ALL OK" if ok else "FAILURES")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

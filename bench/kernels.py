"""Benchmark the sparse decode kernels against XLA's dense jnp, on random bf16 weights.

    python -m bench.kernels                     # CATS MLP: shapes x sparsity x batch
    python -m bench.kernels --tune              # first pick block sizes per batch size (timed)
    python -m bench.kernels --teal [--tune]     # TEAL: each projection's sparse GEMV (and its bytes' stream)
    python -m bench.kernels --attention         # decode attention: block candidates per context
    python -m bench.kernels --norm              # residual add + RMSNorm: per kind of input and warp count
    python -m bench.kernels --int8 [--teal] [--tune]   # the kernels on int8 weights (bf16 XLA baseline)
    python -m bench.kernels --teal --tp 4 --models llama3-70b   # one device's shard under tensor parallelism

Per (shape, batch, sparsity): kernel time, XLA dense time (jnp, jitted), their ratio, the union
sparsity (neurons / input rows no batch row keeps), and the ideal time: the bytes that must be
read (CATS: all of W_gate, the union's rows of W_up and W_down; TEAL: the union's rows of W) over
the read bandwidth measured in the same run (the copy bandwidth is recorded too; on an H200
XLA's dense GEMVs read faster than a copy moves data, so the copy is no ceiling there). --teal
also times a kernel that only reads each matrix (`stream`): what reading all of its bytes costs a
launch in this timer, which no GEMV that reads them all can beat.
Thresholds for a target sparsity are the quantile of |SiLU(x W_gate)| (CATS) or |x| (TEAL) over the batch.

Timing: a jitted lax.fori_loop whose iterations depend on each other (each adds a vanishing
multiple of the previous output's sum to x[0, 0], so nothing can be skipped or hoisted); the
slope between two (static) trip counts cancels dispatch and synchronisation; median of repeats.
Times include that dependency (a few us, in kernel and dense times alike). The bandwidths
run first, which also brings the GPU clocks up. Weights smaller than a few L2 caches are copied
and the calls cycle through the copies (loop_timer), so every call reads them from HBM, as in
decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import platform
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from cats_jax import cli, sharding
from cats_jax.config import PRESETS
from cats_jax.quantize import quantize_int8
from pallas_kernels import attention as A
from pallas_kernels import cats_mlp as K
from pallas_kernels import sparse_gemv as G
from pallas_kernels.common import call, load, next_pow2

f32 = jnp.float32
SPARSITY = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.9)
BATCH = (1, 2, 4)  # the CATS kernel serves batches up to cats_mlp.MAX_KERNEL_BATCH
MODELS = ("mistral-7b", "llama3-8b", "llama2-7b")  # --tune tunes on the first


def _slope_us(make, n, reps):
    """us per iteration of loops make(k)() for the two trip counts in n: the slope cancels
    dispatch and synchronisation; median of `reps`."""
    loops = {k: make(k) for k in n}

    def run(k):
        t0 = time.perf_counter()
        jax.block_until_ready(loops[k]())
        return time.perf_counter() - t0

    run(n[0]), run(n[1])  # compile, warm up
    return statistics.median((run(n[1]) - run(n[0])) / (n[1] - n[0]) for _ in range(reps)) * 1e6


# Bytes of weights a timed loop streams per iteration at least: several times the GPU's L2 cache
# (50 MB on the H100 and H200), so that no call finds the previous call's rows still cached.
# Decode reads every other layer's weights between two calls of one; a loop calling one 50 MB
# q|k|v matrix again and again would time L2 reads at 50% sparsity (its kept rows fit).
MIN_STREAMED_BYTES = 200 * 2**20


def loop_timer(f, n=(10, 40), reps=5):
    """us per call of f(x, *args) -> array, see the module docstring. Trip counts are static: XLA
    then runs the loop without asking the host after every iteration. When args hold fewer than
    MIN_STREAMED_BYTES, their arrays (2-D and up) are copied until they do, and each iteration
    calls f on every copy in turn."""

    def timed(x, *args):
        nbytes = sum(getattr(a, "nbytes", 0) for a in args)
        copies = max(1, -(-MIN_STREAMED_BYTES // max(nbytes, 1)))
        sets = [args] + [tuple(jnp.copy(a) if getattr(a, "ndim", 0) >= 2 else a for a in args)
                         for _ in range(copies - 1)]

        def make(k):
            @jax.jit
            def loop(x, sets):
                def body(_, x):
                    for s in sets:
                        y = f(x, *s)
                        x = x.at[0, 0].add((jnp.sum(y.astype(f32)) * 1e-30).astype(x.dtype))
                    return x

                return jax.lax.fori_loop(0, k, body, x)

            return lambda: loop(x, sets)

        return _slope_us(make, n, reps) / copies

    return timed


def copy_bandwidth(gib=1.0) -> float:
    """Bytes/s of x + 1 over a large bf16 array (read + write)."""
    x = jnp.zeros((int(gib * 2**30) // 2,), jnp.bfloat16) + 1  # not zeros: never time on zeros
    one = jnp.ones((), jnp.bfloat16)

    def make(k):
        loop = jax.jit(lambda x: jax.lax.fori_loop(0, k, lambda _, x: x + one, x))
        return lambda: loop(x)

    return 2 * x.nbytes / (_slope_us(make, (2, 10), 5) * 1e-6)


def read_bandwidth(gib=1.0) -> float:
    """Bytes/s of reading a large bf16 array once per call (a sum): the ceiling of decode, which
    reads weights and writes little. On an H200 it is well above the copy bandwidth."""
    x = jnp.zeros((int(gib * 2**30) // 2,), jnp.bfloat16) + 1

    def make(k):
        # the scale depends on the previous sum (and is 1 in bf16), so no iteration can be hoisted
        body = lambda x: lambda _, c: jnp.sum(x * (1 + c * 1e-30).astype(x.dtype), dtype=f32)
        loop = jax.jit(lambda x: jax.lax.fori_loop(0, k, body(x), jnp.zeros((), f32)))
        return lambda: loop(x)  # x an argument, not a constant XLA could fold

    return x.nbytes / (_slope_us(make, (2, 10), 5) * 1e-6)


def _stream_kernel(x_ref, w_ref, o_ref, *, rows, cols):
    # x is an operand only so that the timer's dependency reaches the call
    i0 = pl.program_id(0) * rows

    def step(k, acc):
        return acc ^ load(w_ref.at[pl.ds(i0, rows), pl.ds(pl.multiple_of(k * cols, cols), cols)])

    acc = jax.lax.fori_loop(0, w_ref.shape[1] // cols, step, jnp.zeros((rows, cols), jnp.int32))
    plgpu.store(o_ref.at[pl.ds(i0, rows)], jnp.sum(acc, axis=1))


# (rows of 4 KB, words a step, warps): the best three of seven on an H100 at 25-235 MB
STREAM_BLOCKS = ((8, 256, 4), (4, 256, 4), (8, 512, 4))


def stream_words(w) -> jax.Array:
    """w's bytes as int32 words in rows of 4 KB [n, 1024], zeros padding n to a multiple of every
    STREAM_BLOCKS row count (so each block's grid reads all of them)."""
    per = 4 // w.dtype.itemsize
    rows = math.lcm(*(r for r, _, _ in STREAM_BLOCKS))
    flat = w.reshape(-1)
    flat = jnp.pad(flat, (0, -flat.size % (per * rows * 1024)))
    return jax.lax.bitcast_convert_type(flat.reshape(-1, per), jnp.int32).reshape(-1, 1024)


def stream(x, words, rows=8, cols=256, num_warps=4):
    """XOR of each 4 KB row of stream_words [n, 1024] over its words, summed per row [n]: a kernel that
    reads those bytes and does nothing else (its time is the floor of any kernel that reads them)."""
    kernel = functools.partial(_stream_kernel, rows=rows, cols=cols)
    return call(kernel, jax.ShapeDtypeStruct((words.shape[0],), jnp.int32), grid=(words.shape[0] // rows,),
                num_warps=num_warps, num_stages=1, name="stream")(x, words)


def stream_us(x, w) -> float:
    """us a call, in loop_timer, of the fastest STREAM_BLOCKS stream of w's bytes."""
    words = stream_words(w)
    return min(loop_timer(lambda x, words, b=b: stream(x, words, *b), n=(20, 100))(x, words) for b in STREAM_BLOCKS)


def random_mlp(h, i, seed=0, dtype=jnp.bfloat16):
    """Flax-layout weights [H, I], [H, I], [I, H] scaled like a trained layer; never zeros."""
    k = jax.random.split(jax.random.key(seed), 3)
    wg = (jax.random.normal(k[0], (h, i), f32) / np.sqrt(h)).astype(dtype)
    wu = (jax.random.normal(k[1], (h, i), f32) / np.sqrt(h)).astype(dtype)
    wd = (jax.random.normal(k[2], (i, h), f32) / np.sqrt(i)).astype(dtype)
    return wg, wu, wd


def kernel_weights(wg, wu, wd, int8=False):
    """The CATS kernel's weights from Flax-layout ones: (w_gu [2I, H] neuron-major, w_down [I, H],
    scales: None, or with int8 their per-output-channel scales (s_gu [2I], s_down [H]))."""
    if not int8:
        return jnp.concatenate([wg.T, wu.T]), wd, None
    (qg, sg), (qu, su), (qd, sd) = (quantize_int8(w) for w in (wg, wu, wd))
    return jnp.concatenate([qg.T, qu.T]), qd, (jnp.concatenate([sg, su]), sd)


def dense_mlp(x, wg, wu, wd):
    """What XLA makes of the dense bf16 MLP (the model's dense path)."""
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def threshold_for(values, sparsity: float) -> float:
    """The threshold that drops `sparsity` of |values| (the quantile), placed halfway between two
    of them so that no value sits on it (fp32 summation order then flips a neuron only where two
    values sit within its noise of each other)."""
    v = np.sort(np.abs(np.asarray(values, np.float64)).ravel())
    k = int(round(sparsity * v.size))
    return 0.0 if k == 0 else float((v[k - 1] + v[min(k, v.size - 1)]) / 2)


def thresholds_for(x, wg, sparsity):
    """Per target sparsity: the threshold, and the union sparsity it gives over the batch."""
    a = np.abs(np.asarray(jax.nn.silu(jnp.dot(x, wg, preferred_element_type=f32))))
    out = []
    for s in sparsity:
        t = threshold_for(a, s)
        out.append((jnp.asarray(t, f32), float(np.mean(np.all(a <= t, axis=0)))))
    return out


def config(model: str, tp: int = 1):
    """A preset's shapes, or with tp > 1 those of one device's shard (cats_jax.sharding)."""
    return PRESETS[model] if tp == 1 else sharding.local_config(PRESETS[model], tp)


def shapes(models, tp=1):
    """(label, H, I) per distinct MLP shape among the models (mistral-7b and llama3-8b share one)."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for m in models:
        cfg = config(m, tp)
        by_shape.setdefault((cfg.hidden_size, cfg.intermediate_size), []).append(m + (f" tp{tp} shard" if tp > 1 else ""))
    return [(" / ".join(ms), h, i) for (h, i), ms in by_shape.items()]


def _ceilings() -> tuple[float, float]:
    """(copy, read) bandwidth in bytes/s, measured now (which also brings the GPU clocks up)."""
    copy, read = copy_bandwidth(), read_bandwidth()
    print(f"copy bandwidth {copy / 1e12:.2f} TB/s, read bandwidth {read / 1e12:.2f} TB/s", flush=True)
    return copy, read


def bench(models=MODELS, sparsity=SPARSITY, batch=BATCH, int8=False, tp=1):
    """int8: the kernel reads the weights' int8 copy (one scale per output channel); XLA's dense
    MLP stays bf16, the baseline."""
    copy, bw = _ceilings()
    rows = []
    for label, h, i in shapes(models, tp):
        wg, wu, wd = random_mlp(h, i)
        w_gu, w_down, scales = kernel_weights(wg, wu, wd, int8)  # neuron-major, as decode.prepare stores them
        dense_t = loop_timer(dense_mlp)
        kern_t = loop_timer(lambda x, t, w_gu, wd, sc: K.cats_mlp(x, w_gu, wd, t, scales=sc)[0])
        for b in batch:
            x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(jnp.bfloat16)
            dense_us = dense_t(x, wg, wu, wd)
            for s, (t, union) in zip(sparsity, thresholds_for(x, wg, sparsity)):
                us = kern_t(x, t, w_gu, w_down, scales)
                ideal = h * i * (1 if int8 else 2) * (1 + 2 * (1 - union)) / bw * 1e6
                rows.append(dict(
                    shape=label + (" int8" if int8 else ""), H=h, I=i, batch=b, sparsity=s, union_sparsity=union,
                    kernel_us=us,
                    dense_us=dense_us, speedup=dense_us / us, ideal_us=ideal, pct_of_ideal=100 * ideal / us,
                ))
                print(_fmt_row(rows[-1]), flush=True)
    return dict(meta=_meta(copy, bw), rows=rows)


def _meta(copy, read):
    dev = jax.devices()[0]
    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        import triton

        versions["triton (installed; Pallas lowers through jaxlib's own)"] = triton.__version__
    except ImportError:
        pass
    return dict(
        device=getattr(dev, "device_kind", str(dev)), platform=dev.platform,
        date=datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        versions=versions, python=platform.python_version(),
        copy_bandwidth_TBps=copy / 1e12, read_bandwidth_TBps=read / 1e12,
        tables={"gate_up": {k: dataclasses.asdict(v) for k, v in K.TABLE.items()},
                "sparse_gemv": {k: dataclasses.asdict(v) for k, v in G.TABLE.items()},
                "sparse_gemv_tuned": {str(k): dataclasses.asdict(v) for k, v in G._tuned().items()}},
    )


HEADER = ("| shape (H x I) | B | sparsity | union sparsity | kernel us | XLA dense us | speedup | ideal us "
          "| % of ideal |")


def _fmt_row(r):
    return (
        f"| {r['shape']} ({r['H']}x{r['I']}) | {r['batch']} | {r['sparsity']:.0%} | {r['union_sparsity']:.1%} | "
        f"{r['kernel_us']:.1f} | {r['dense_us']:.1f} | {r['speedup']:.2f}x | {r['ideal_us']:.1f} "
        f"| {r['pct_of_ideal']:.0f}% |" + (f" {r['stream_us']:.1f} |" if "stream_us" in r else "")
    )


def markdown(result) -> str:
    m = result["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    teal = result.get("kind") == "teal"
    header = HEADER.replace("shape (H x I)", "projection (in x out)") + " stream us (all of W) |" if teal else HEADER
    ideal = ("the union's rows of W" if teal else "W_gate + the union's rows of W_up and W_down")
    floor = "; stream = a kernel that only reads all of W (`stream`), the floor of any that does" if teal else ""
    lines = [
        f"Device: {m['device']}; date: {m['date']}; {versions}, Python {m['python']}.",
        f"Bandwidth measured in the same run: copy {m['copy_bandwidth_TBps']:.2f} TB/s (read + write), "
        f"read {m['read_bandwidth_TBps']:.2f} TB/s; bf16 weights, random; batch rows x ~ N(0, 1); "
        f"ideal = ({ideal}) / read bandwidth{floor}.",
        "",
        header,
        "|" + "---|" * header.count(" |"),
        *(_fmt_row(r) for r in result["rows"]),
    ]
    return "\n".join(lines) + "\n"


# ---- block-size tuning ------------------------------------------------------------------------
GATE_UP_CANDIDATES = {
    1: [K.GateUpBlocks(r, c, w, s) for r, c, w, s in [(8, 512, 4, 4), (16, 512, 4, 4), (8, 1024, 4, 4),
                                                      # programs that fill whole waves at Mistral-7B's I on
                                                      # 132 SMs (sm_90 registers -> programs an SM): (8,
                                                      # 1024, 4) runs 1792 at 4 an SM, 3.39 waves
                                                      (16, 256, 4, 4), (8, 256, 2, 4), (2, 1024, 2, 4)]],
    **{b: [K.GateUpBlocks(r, c, w, s) for r, c, w, s in [(32, 128, 4, 4), (32, 128, 4, 3), (16, 256, 4, 3),
                                                          (64, 128, 4, 3), (32, 256, 8, 3), (16, 512, 4, 4),
                                                          (128, 128, 8, 3)]]
       for b in (2, 4, 8, 16)},
}
# int8 weights at batch 1 (int8 tensor-core dots of x's digits, >= 8 neurons a warp): 224-1792
# programs at Mistral-7B's I (78 registers at 64 x 128: 6 an SM)
GATE_UP_INT8 = [K.GateUpBlocks(r, c, w, s) for r, c, w, s in [
    (32, 128, 4, 3), (64, 128, 4, 3), (128, 128, 4, 3), (32, 256, 4, 3), (64, 256, 4, 3), (64, 128, 4, 5),
    (16, 128, 2, 3), (16, 256, 2, 4), (8, 256, 1, 4), (128, 128, 8, 3)]]
GEMV_CANDIDATES = {
    # masked tiles, many short splits (1-4 steps each), TEAL's layout
    1: [G.GemvBlocks(r, c, sp, w, s) for r, c, sp, w, s in [
        (64, 256, 224, 4, 1), (128, 128, 112, 4, 1), (32, 512, 448, 4, 1), (64, 512, 224, 8, 1),
        (128, 256, 112, 8, 1), (16, 1024, 896, 4, 1), (32, 256, 112, 4, 3), (64, 256, 56, 4, 3),
        (64, 128, 1024, 4, 1), (128, 64, 1024, 4, 1), (256, 64, 1024, 8, 1), (128, 128, 1024, 8, 1),
        (256, 128, 1024, 8, 1), (64, 64, 1024, 2, 1),
        # one small tile per program, as TEAL's split-K kernel runs (8-32 input rows x 128-512 outputs)
        (16, 256, 1024, 4, 1), (8, 256, 1024, 2, 1), (16, 512, 1024, 4, 1), (32, 128, 1024, 4, 1), (8, 512, 2048, 4, 1),
        # long splits: several 128-row tiles a program (its accumulator one pass of rows: 80 registers)
        (128, 128, 8, 4, 1), (128, 128, 16, 4, 1), (128, 256, 16, 8, 1), (64, 128, 32, 4, 1)]]
    # the gather path: compact the kept rows, then read only those
    + [G.GatherBlocks(*a) for a in [(32, 128, 512, 4, 3), (16, 128, 512, 4, 3), (32, 128, 256, 4, 3),
                                    (16, 256, 256, 4, 2), (32, 256, 512, 8, 3), (32, 128, 1024, 4, 3),
                                    # shorter programs (more of them: a finer last wave)
                                    (16, 128, 128, 4, 3), (16, 64, 256, 2, 3), (32, 64, 512, 4, 3),
                                    # wide columns: each kept row read as one 1-2 KB run (DRAM page locality)
                                    (4, 512, 128, 4, 3), (8, 512, 256, 4, 3),
                                    (4, 1024, 128, 4, 3), (4, 1024, 256, 8, 3),
                                    # more rows a step on 8 warps: fewer dependent steps a program,
                                    # the same bytes a thread (80 registers int8, 75 bf16 at 64 x 128)
                                    (64, 128, 256, 8, 3), (64, 128, 512, 8, 3), (64, 128, 1024, 8, 3),
                                    (128, 128, 1024, 8, 3)]],
    **{b: [G.GemvBlocks(r, c, sp, w, s) for r, c, sp, w, s in [(32, 256, 16, 4, 3), (64, 256, 32, 4, 3),
                                                               (32, 128, 32, 4, 3), (64, 128, 64, 4, 3),
                                                               (32, 256, 64, 4, 2), (16, 256, 128, 4, 2),
                                                               # fewer, longer splits (fewer atomic adds)
                                                               (32, 256, 4, 4, 3), (32, 256, 8, 4, 3),
                                                               (64, 256, 8, 8, 3), (32, 512, 8, 8, 3)]]
       for b in (2, 4, 8, 16)},
}


def candidates(table, batch):
    """A candidate table's entry for `batch` rows (batches past its largest key take that one's)."""
    return table[min(next_pow2(batch), max(table))]


def _time(label, f, *args, n=(10, 40)):
    try:
        return loop_timer(f, n=n)(*args)
    except Exception as e:  # a candidate that does not compile (registers, shared memory)
        print(f"{label}: failed: {type(e).__name__}: {str(e)[:200]}")
        return None


def _set_tuned(key, blocks):
    """A tune's winner as this device's sparse_gemv.TUNED entry (in this process), printed as the
    line to paste there."""
    G._tuned()[key] = blocks
    print(f"TUNED[{jax.devices()[0].device_kind!r}][{key}] = {blocks}", flush=True)


def tune(models=("mistral-7b",), batch=BATCH, sparsity=0.5, int8=False):
    """Time every candidate at `sparsity`: gate_up and sparse_gemv (the down projection). Print
    them; in this process the winners become the blocks the kernels take: gate_up's in
    cats_mlp.TABLE, the down projection's as this device's sparse_gemv.TUNED entry for its shape
    (where blocks_for looks first; printed as a line to paste there)."""
    copy, bw = _ceilings()
    out = []
    for label, h, i in shapes(models):
        wg, wu, wd = random_mlp(h, i)
        w_gu, w_down, scales = kernel_weights(wg, wu, wd, int8)
        s_gu, s_down = scales or (None, None)
        for b in batch:
            x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(jnp.bfloat16)
            ((t, union),) = thresholds_for(x, wg, [sparsity])
            hidden = K.gate_up(x, w_gu, t, scale=s_gu)
            kinds = (
                ("gate_up", GATE_UP_INT8 if int8 and b == 1 else candidates(GATE_UP_CANDIDATES, b),
                 lambda blk: (lambda x, t, w: K.gate_up(x, w, t, scale=s_gu, blocks=blk)), (x, t, w_gu)),
                ("sparse_gemv", candidates(GEMV_CANDIDATES, b),
                 lambda blk: (lambda hh, w: G.sparse_gemv(hh, w, blocks=blk, scale=s_down)), (hidden, w_down)),
            )
            for kind, cands, make, args in kinds:
                for blk in cands:
                    us = _time(f"{label} B={b} {kind} {blk}", make(blk), *args)
                    if us is not None:
                        out.append(dict(shape=label, H=h, I=i, batch=b, kernel=kind, blocks=dataclasses.asdict(blk),
                                        block_type=type(blk).__name__, us=us, union_sparsity=union))
                        print(f"{label} B={b} {kind} {blk}: {us:.1f} us", flush=True)
    print("\nbest per (shape, batch, kernel):")
    best = {}
    for r in out:
        key = (r["shape"], r["batch"], r["kernel"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for key, r in best.items():
        print(f"  {key}: {r['us']:.1f} us  {r['blocks']}")
    for (_, b, kind), r in best.items():  # the winners replace the tables' entries, in this process
        if kind == "sparse_gemv":  # where blocks_for looks first: the down projection [I, H] of this shape
            _set_tuned(G.tuned_key(b, r["I"], r["H"], G.gemv_variant(w_down.dtype, cats_down=True)),
                       getattr(G, r["block_type"])(**r["blocks"]))
        if kind == "gate_up":
            (K.INT8_TABLE if int8 and b == 1 else K.TABLE)[next_pow2(b)] = K.GateUpBlocks(**r["blocks"])
    return dict(meta=_meta(copy, bw), tune=out)


# ---- TEAL: sparse-input GEMVs of every projection ---------------------------------------------
def projections(models, tp=1, compare=True):
    """(label, n_in, segments) per distinct projection GEMV of the models, as TEAL runs them: q/k/v
    fused (one input, three thresholds), o, gate/up fused (and with compare, gate alone, which
    decode never runs: a tune skips it), down; tp > 1: one device's shard of each."""
    out = {}
    for m in models:
        c = config(m, tp)
        qkv = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim, c.num_kv_heads * c.head_dim)
        for name, n_in, segs in (("qkv", c.hidden_size, qkv), ("o", c.num_heads * c.head_dim, (c.hidden_size,)),
                                 ("gate|up", c.hidden_size, (c.intermediate_size,) * 2),
                                 ("gate", c.hidden_size, (c.intermediate_size,)),
                                 ("down", c.intermediate_size, (c.hidden_size,))):
            if name != "gate" or compare:
                out.setdefault((n_in, segs), f"{m} {name}" + (f" tp{tp} shard" if tp > 1 else ""))
    return [(label, n_in, segs) for (n_in, segs), label in out.items()]


def _gemv_thresholds(x, segs, sparsity):
    """One threshold per segment for `sparsity` of x's values, and the union sparsity (input rows
    no batch row keeps)."""
    t = threshold_for(x, sparsity)
    union = float(np.mean(np.all(np.abs(np.asarray(x, np.float32)) <= t, axis=0)))
    return tuple(jnp.full((), t, f32) for _ in segs), union  # one scalar per segment, as the model passes them


def _gemv_input(batch, n_in, gated):
    """A projection's input as decode hands it over, and its values: bf16 rows [B, in]; gated (the
    down projection): the gate|up GEMV's unfinished fp32 sums [B, 2 in], whose values are
    silu(gate) * up (sparse_gemv's gated input)."""
    key = jax.random.key(batch)
    if not gated:
        x = jax.random.normal(key, (batch, n_in), f32).astype(jnp.bfloat16)
        return x, x
    sums = 2 * jax.random.normal(key, (batch, 2 * n_in), f32)
    return sums, G.gated_input(sums, None, n_in, jnp.bfloat16)


def _gemv_call(x, w, t, segs, blocks, scale, sparsity, gated):
    """(f, args): the GEMV as TEAL's decode launches it (dense int8's at sparsity 0), for loop_timer.
    Its sums stay unfinished (the next kernel finishes them). The down projection (gated) computes
    silu(gate) * up from gate|up's sums, in its compaction or in its tiles. The other projections'
    gathers take their input compacted by the kernel that makes it (the add + norm, the
    attention's combine), so their compaction runs once, outside the timed loop. The buffer the
    masked tiles or a compacted input's gather add into costs an XLA memset or copy a call alike,
    where decode's add + norm and compactions zero it."""
    dense = sparsity == 0
    kw = dict(segments=segs, blocks=blocks, scale=scale, finish=False, gated=gated,
              out_dtype=jnp.bfloat16 if gated else None)
    if gated or not isinstance(blocks, G.GatherBlocks):
        if dense:
            return (lambda x, w: G.sparse_gemv(x, w, skip_zeros=False, **kw)), (x, w)
        return (lambda x, w, t: G.sparse_gemv(x, w, t, **kw)), (x, w, t)
    layout = G.CompactLayout(w.shape[0], w.shape[1], len(segs), blocks, thresholded=not dense)
    ts = tuple(jnp.asarray(v, f32).reshape(1) for v in (t if not dense else [0.0] * len(segs)))
    xc = G.compact(x, G.Compaction(layout, ts), jnp.bfloat16)

    def gather(val, idx, count, out, w):  # the compacted values carry the loop's dependency
        return G.sparse_gemv(G.Compacted(layout, idx, val, count, out), w, segments=segs, scale=scale, finish=False)

    return gather, (xc.val, xc.idx, xc.count, xc.out, w)


def bench_gemv(models=("mistral-7b",), sparsity=SPARSITY, batch=(1,), tune_at=None, int8=False, tp=1):
    """Per projection: sparse_gemv as decode launches it (_gemv_call) vs XLA's dense x @ W. With
    tune_at (a sparsity), first time GEMV_CANDIDATES per (projection, batch) there and use the best."""
    copy, bw = _ceilings()
    rows = []
    for label, n_in, segs in projections(models, tp, compare=tune_at is None):
        gated = label.split()[1] == "down"
        w = (jax.random.normal(jax.random.key(0), (n_in, sum(segs)), f32) / np.sqrt(n_in)).astype(jnp.bfloat16)
        wk, scale = quantize_int8(w) if int8 else (w, None)  # the kernel's weights; XLA's stay bf16
        floor = stream_us(jnp.ones((1, 1), jnp.bfloat16), wk)
        for b in batch:
            x, values = _gemv_input(b, n_in, gated)
            dense_us = loop_timer(lambda x, w: x @ w, n=(20, 100))(values, w)
            blk = None
            if tune_at is not None:
                t, _ = _gemv_thresholds(values, segs, tune_at)
                timed = []
                for cand in candidates(GEMV_CANDIDATES, b):
                    # a GEMV of every row has no compacted input upstream: a gather would need a
                    # compaction launch of its own, which this timer leaves out
                    if tune_at == 0 and isinstance(cand, G.GatherBlocks):
                        continue
                    cand = dataclasses.replace(cand, cols=min(cand.cols, math.gcd(*segs) & -math.gcd(*segs)))
                    f, args = _gemv_call(x, wk, t, segs, cand, scale, tune_at, gated)
                    us = _time(f"{label} B={b} {cand}", f, *args, n=(20, 100))
                    if us is not None:
                        timed.append((us, cand))
                        print(f"{label} ({n_in}->{sum(segs)}) B={b} {cand}: {us:.1f} us", flush=True)
                blk = min(timed, key=lambda r: r[0])[1]
                _set_tuned(G.tuned_key(b, n_in, sum(segs), G.gemv_variant(wk.dtype, dense=tune_at == 0)), blk)
            for s in sparsity:
                t, union = _gemv_thresholds(values, segs, s)
                blocks = blk or G._gemv_blocks(b, n_in, segs, s == 0, G.gemv_variant(wk.dtype, dense=s == 0))
                f, args = _gemv_call(x, wk, t, segs, blocks, scale, s, gated)
                us = loop_timer(f, n=(20, 100))(*args)
                ideal = n_in * (1 - union) * sum(segs) * (1 if int8 else 2) / bw * 1e6
                rows.append(dict(shape=label + (" int8" if int8 else ""), H=n_in, I=sum(segs), batch=b, sparsity=s, union_sparsity=union,
                                 kernel_us=us, dense_us=dense_us, speedup=dense_us / us, ideal_us=ideal,
                                 pct_of_ideal=100 * ideal / us, stream_us=floor,
                                 blocks=dataclasses.asdict(blk) if blk else None))
                print(_fmt_row(rows[-1]), flush=True)
    return dict(meta=_meta(copy, bw), rows=rows, kind="teal")


# `--attention`'s candidates; spans of 128 and 512 slots on the best warps and stages only (at 4096
# slots, one row of Mistral-7B: 2 programs an SM at 128, half of one at 512; on the H100 both lost to
# blocks_for's 256, as did 64 and 1024; the H200 has not timed them)
ATTENTION_CANDIDATES = [A.AttentionBlocks(block, span, warps, stages) for block in (32, 64)
                        for span in (64, 256, 1024, 4096) for warps in (4, 8) for stages in (2, 3) if span >= block] + [
    A.AttentionBlocks(block, span, 4, 3) for block in (32, 64) for span in (128, 512)]


def bench_attention(models=("mistral-7b",), contexts=(256, 4096), batch=(1,)):
    """decode_attention at the last slot of caches of `contexts` slots, per candidate blocks (a span
    of at least the context: one program per row and kv head, no combine), against the blocks
    blocks_for picks and XLA's attend (model.attend, jitted). The caches are threaded through the
    loop, as in decode; 8 copies (layers) are cycled."""
    from cats_jax import model as M

    rows = []
    for name in models:
        cfg = PRESETS[name]
        n, k, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        inv = M.rope_inv_freq(cfg)
        for b in batch:
            for s in contexts:
                keys = jax.random.split(jax.random.key(s), 3)
                qkv = jax.random.normal(keys[0], (b, (n + 2 * k) * d), f32).astype(jnp.bfloat16)
                caches = [tuple(jax.random.normal(kk, (b, s, k, d), f32).astype(jnp.bfloat16) for kk in keys[1:])
                          for _ in range(8)]
                pos = jnp.full((b,), s - 1, jnp.int32)
                rope = M.rope_angles(pos, inv)  # once a step in decode, outside the timed calls

                def attend_jnp(qkv, pos, kc, vc):
                    q, key, val = jnp.split(qkv, [n * d, (n + k) * d], axis=1)
                    out, (kc, vc) = M.attend(cfg, q.reshape(b, 1, n, d), key.reshape(b, 1, k, d),
                                             val.reshape(b, 1, k, d), pos[:, None], (kc, vc))
                    return out.reshape(b, n * d), kc, vc

                def timed(f):
                    def make(t):
                        @jax.jit
                        def loop(qkv, caches):
                            def body(_, c):
                                qkv, caches = c
                                out = []
                                for kc, vc in caches:
                                    o, kc, vc = f(qkv, pos, kc, vc)
                                    qkv = qkv.at[0, 0].add((jnp.sum(o.astype(f32)) * 1e-30).astype(qkv.dtype))
                                    out.append((kc, vc))
                                return qkv, out
                            return jax.lax.fori_loop(0, t, body, (qkv, caches))
                        return lambda: loop(qkv, caches)
                    try:
                        return _slope_us(make, (4, 16), 5) / len(caches)
                    except Exception as e:  # a candidate that does not compile
                        print(f"failed: {type(e).__name__}: {str(e)[:200]}")
                        return None

                dense = timed(attend_jnp)
                auto = A.blocks_for(b, k, n // k, s)
                for blk in [auto] + [c for c in ATTENTION_CANDIDATES if c.span <= s]:
                    us = timed(lambda qkv, pos, kc, vc, blk=blk: A.decode_attention(
                        qkv, pos, kc, vc, rope, num_heads=n, num_kv_heads=k, sliding_window=cfg.sliding_window,
                        blocks=blk))
                    rows.append(dict(shape=name, batch=b, slots=s, blocks=dataclasses.asdict(blk), auto=blk == auto,
                                     kernel_us=us, xla_us=dense))
                    print(f"{name} B={b} slots={s} {'auto ' if blk == auto else ''}{blk}: "
                          f"{us if us is None else round(us, 2)} us (XLA attend {dense:.2f})", flush=True)
    return rows


def bench_norm(models=("mistral-7b",), batch=(1,), warps=(1, 2, 4, 8, 16), trips=(20, 100), reps=5, calls=16):
    """The residual add + RMSNorm kernel per kind of h (bf16; a GEMV's fp32 sums; int8 sums with
    their scale, as decode steps hand them over) and warp count, against XLA's add and rms_norm:
    us per call, each call's x + h the next one's x (a chain of launches, as in a decode step).
    A loop iteration chains `calls` of them: with one call an iteration the loop's own cost, not
    the 2-3 us kernel, set the time (docs/decisions.md)."""
    from cats_jax import model as M
    from pallas_kernels import norm as N

    rows = []
    for name in models:
        n = config(name).hidden_size
        for b in batch:
            ks = jax.random.split(jax.random.key(n + b), 5)
            x0 = jax.random.normal(ks[0], (b, n), f32).astype(jnp.bfloat16)
            scale = (1 + jax.random.normal(ks[1], (n,), f32) / 4).astype(jnp.bfloat16)
            sums = jax.random.normal(ks[2], (b, n + 512), f32)  # padded, as the GEMV kernels leave them
            kinds = {"bf16 h": (jax.random.normal(ks[3], (b, n), f32).astype(jnp.bfloat16), None),
                     "fp32 sums": (sums, None),
                     "int8 sums": (sums, jax.random.uniform(ks[4], (n,), f32, 0.01, 0.05))}

            def timed(step):
                def body(_, c):  # every call's output carried (none dead), no fusion across calls
                    x, ys = c[0], []
                    for _ in range(calls):
                        x, y = jax.lax.optimization_barrier(step(x))
                        ys.append(y)
                    return x, *ys

                def make(t):
                    loop = jax.jit(lambda x: jax.lax.fori_loop(0, t, body, (x,) * (calls + 1)))
                    return lambda: loop(x0)
                try:
                    return _slope_us(make, trips, reps) / calls
                except Exception as e:  # a warp count that does not compile
                    print(f"failed: {type(e).__name__}: {str(e)[:200]}")
                    return None

            h_bf16 = kinds["bf16 h"][0]
            xla = timed(lambda x: (lambda s: (s, M.rms_norm(s, scale, 1e-5)))(x + h_bf16))
            for kind, (h, hs) in kinds.items():
                for w in warps:
                    us = timed(lambda x, h=h, hs=hs, w=w: N.add_rms_norm(x, h, scale, 1e-5, hs, num_warps=w))
                    rows.append(dict(shape=name, H=n, batch=b, h=kind, num_warps=w, kernel_us=us, xla_us=xla))
                    print(f"{name} H={n} B={b} {kind}, {w} warps: {us if us is None else round(us, 2)} us "
                          f"(XLA add + rms_norm {xla if xla is None else round(xla, 2)})", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS), help="presets whose MLP shapes to time (comma-separated)")
    p.add_argument("--sparsity", default=",".join(map(str, SPARSITY)), help="target per-row sparsities")
    p.add_argument("--batch", type=cli.counts, default=list(BATCH), help="decode batch sizes, comma-separated")
    p.add_argument("--json", type=Path, help="write all numbers here")
    p.add_argument("--markdown", type=Path, help="write the table (with device, date, versions) here")
    p.add_argument("--tune", action="store_true",
                   help="first time block-size candidates per batch size (first model's shape, 50%% sparsity), "
                        "then benchmark with the winners")
    p.add_argument("--teal", action="store_true",
                   help="TEAL: time the sparse-input GEMV of every projection (fused q/k/v, o, fused gate/up, down) "
                        "instead of the CATS MLP (sparsity 0: the dense GEMV that reads every row, as dense "
                        "int8 decode runs it); with --tune, block candidates per projection at --tune-at")
    p.add_argument("--tune-at", type=float, default=0.5,
                   help="the sparsity at which --teal --tune times candidates (default 0.5; 0 for the dense GEMVs, "
                        "on the masked tiles only)")
    p.add_argument("--int8", action="store_true",
                   help="the kernels read the weights' int8 copy (one fp32 scale per output channel); XLA's "
                        "dense baseline stays bf16")
    p.add_argument("--tp", type=int, default=1,
                   help="time the shapes one device computes under tensor parallelism over this many (its shard)")
    p.add_argument("--attention", action="store_true",
                   help="time decode attention (block candidates) at 256 and 4096 slots instead")
    p.add_argument("--norm", action="store_true",
                   help="time the residual add + RMSNorm kernel (per kind of input and warp count) instead")
    a = p.parse_args(argv)
    models = a.models.split(",")
    for m in models:
        if m not in PRESETS:
            p.error(f"unknown model {m!r} (choose from {', '.join(PRESETS)})")
    batch = a.batch
    try:
        [config(m, a.tp) for m in models]
    except sharding.TPError as e:
        p.error(f"--tp {a.tp}: {e}")
    if not 0 <= a.tune_at < 1:
        p.error(f"--tune-at {a.tune_at}: a sparsity in [0, 1)")
    if jax.default_backend() != "gpu":
        p.error("the benchmark needs a GPU (on the CPU the kernels only run in interpret mode)")
    levels = [float(s) for s in a.sparsity.split(",")]
    if a.attention or a.norm:
        rows = (bench_attention if a.attention else bench_norm)(models[:1], batch=batch)
        if a.json:
            a.json.write_text(json.dumps(dict(meta=_meta(*_ceilings()), rows=rows), indent=1))
        return
    if a.teal:
        result = bench_gemv(models, levels, batch, tune_at=a.tune_at if a.tune else None, int8=a.int8, tp=a.tp)
        tuned = None
    else:
        tuned = tune(models[:1], batch, int8=a.int8) if a.tune else None
        result = bench(models, levels, batch, int8=a.int8, tp=a.tp)
    if tuned:
        result["tune"] = tuned["tune"]
    print("\n" + markdown(result))
    if a.markdown:
        a.markdown.write_text(markdown(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

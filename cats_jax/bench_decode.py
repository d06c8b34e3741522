"""Decode speed with random weights at real model shapes: no checkpoint needed.

    PYTHONPATH=. python3 -m cats_jax.bench_decode --config mistral-7b --random-weights --batch 1,4,8
    python -m cats_jax.bench_decode --config mistral-7b --random-weights --mlp cats-pallas --sparsity 0.5
    python -m cats_jax.bench_decode --config smollm2-135m --random-weights --prompt-len 16 --new-tokens 8  # CPU smoke

Each batch runs cats_jax.generate.generate (the same jitted prefill and while_loop decode as
text generation) on random prompts of --prompt-len tokens, with EOS disabled so that every row
runs all --new-tokens: the first comes from prefill, the others from new_tokens - 1 decode steps.
Compilation is kept out of every timing; each figure is the median of --repeats runs.

Bytes per decode step, the roofline's minimum: every weight matrix once (the embedding table is
only gathered, B rows, so it counts only as a tied LM head) plus, per row, the K and V of the
positions it attends to, averaged over the steps. For CATS modes the bytes are still the dense
ones, so their GB/s is an effective bandwidth: above the ceiling means rows were skipped.
(The decode loop reads every slot of its cache, prompt + new tokens, each step; that excess is
not counted: for mistral-7b at 128 + 256 tokens it is 0.3% of the weights per row of the batch.)

Ceiling: y = x + 1 over a --copy-mib bf16 array, timed in the same run on the same device,
counting the bytes read and written.

Weights are created on the device in bf16 by one jitted init, never as fp32 host arrays. For
CATS, thresholds come from a quick calibration (cats_jax.calibrate) of that random model on one
row of random tokens: a per-layer quantile of |SiLU(x W_gate)| at --sparsity.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cats_jax.config import PRESETS, ModelConfig
from cats_jax.generate import generate
from cats_jax.model import Transformer


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Transformer:
    """Random weights made on the default device by one jitted init (bf16 in, bf16 out)."""
    make = functools.partial(Transformer, cfg, dtype=dtype)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: make(rngs=nnx.Rngs(seed))))
    state = jax.jit(lambda: nnx.split(make(rngs=nnx.Rngs(seed)))[1])()
    return nnx.merge(graphdef, state)


def copy_bandwidth(mib: int, repeats: int = 20) -> float:
    """Bytes/s of y = x + 1 over a bf16 array of `mib` MiB (read + write counted). The calls are
    queued back to back and waited for once, so dispatch overlaps the copies."""
    x = jnp.zeros((mib * 2**20 // 2,), jnp.bfloat16)
    f = jax.jit(lambda x: x + 1)
    jax.block_until_ready(f(x))
    t0 = time.perf_counter()
    for _ in range(repeats):
        y = f(x)
    jax.block_until_ready(y)
    return 2 * x.nbytes * repeats / (time.perf_counter() - t0)


def bytes_per_step(cfg: ModelConfig, model: Transformer, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Minimum bytes a dense decode step reads: weights once + each row's attended K/V (mean)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    weights = sum(p.size * p.dtype.itemsize for p in params)
    if not cfg.tie_word_embeddings:  # the table is gathered (B rows), not read
        weights -= cfg.vocab_size * cfg.hidden_size * params[0].dtype.itemsize
    ctx = np.arange(prompt_len + 1, prompt_len + new_tokens)  # keys seen by decode steps 1..new-1
    if cfg.sliding_window is not None:
        ctx = np.minimum(ctx, cfg.sliding_window)
    kv_per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * params[0].dtype.itemsize  # cache dtype
    return weights + batch * kv_per_pos * float(ctx.mean())


def calibrate_random(model: Transformer, sparsity: float, tokens: int, seed: int) -> np.ndarray:
    """Per-layer thresholds at `sparsity` from one row of random tokens (leaves the model dense-equivalent)."""
    from cats_jax import calibrate  # its data/checkpoint imports are only needed here

    row = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, tokens, dtype=np.int32)
    return calibrate.calibrate(model, [row], [sparsity], batch_size=1, seed=seed, progress=False).thresholds[0]


def run(cfg: ModelConfig, args: argparse.Namespace) -> str:
    """Benchmark cfg's shapes with main()'s options; prints rows as they come, returns the markdown table."""
    dev = jax.devices()[0]
    date = datetime.date.today().isoformat()
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, flax {flax.__version__}; "
          f"{cfg.name}: {cfg.num_params() / 1e9:.2f} B params", flush=True)
    ceiling = copy_bandwidth(args.copy_mib)
    print(f"copy ceiling: {ceiling / 1e9:.1f} GB/s", flush=True)
    model = random_model(cfg, args.seed)
    if args.mlp != "dense":
        model.set_cats_thresholds(calibrate_random(model, args.sparsity, args.calib_tokens, args.seed))
        model.set_mlp_impl(args.mlp)

    rows = []
    for batch in args.batch:
        rng = np.random.default_rng(args.seed + batch)
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
        bench = functools.partial(generate, model, prompts, args.new_tokens, eos_ids=(),
                                  prefill_chunk=args.prefill_chunk)
        compile_s = bench().compile_s  # first run: compiles and warms up
        runs = [bench() for _ in range(args.repeats)]
        steps = runs[0].decode_steps
        decode_s = statistics.median(r.decode_s for r in runs)
        prefill_s = statistics.median(r.prefill_s for r in runs)
        nbytes = bytes_per_step(cfg, model, batch, args.prompt_len, args.new_tokens)
        gbs = nbytes * steps / decode_s
        sparsity = runs[0].mlp_sparsity
        rows.append(
            f"| {args.mlp} | {'-' if sparsity is None else f'{args.sparsity:g} / {sparsity:.3f}'} | {batch} "
            f"| {args.prompt_len} | {args.new_tokens} | {prefill_s * 1e3:.1f} | {decode_s / steps * 1e3:.3f} "
            f"| {batch * steps / decode_s:.1f} | {nbytes / 1e9:.3f} | {gbs / 1e9:.1f} | {100 * gbs / ceiling:.1f}% "
            f"| {compile_s:.1f} |"
        )
        print(rows[-1], flush=True)

    return "\n".join([
        f"### decode: {cfg.name}, random bf16 weights, {args.mlp}"
        + (f" @ sparsity {args.sparsity:g}" if args.mlp != "dense" else ""),
        "",
        f"{dev.device_kind} ({dev.platform}), {date}, jax {jax.__version__}, flax {flax.__version__}. "
        f"Copy ceiling {ceiling / 1e9:.1f} GB/s (y = x + 1, {args.copy_mib} MiB bf16, read + write).",
        "",
        "| mlp | sparsity target / measured | batch | prompt | new | prefill ms | ms/step | tokens/s "
        "| GB/step (dense) | GB/s | % of copy | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m cats_jax.bench_decode",
        description="Decode tokens/s and achieved bandwidth vs a measured copy ceiling, random weights at preset shapes.",
    )
    ap.add_argument("--config", choices=sorted(PRESETS), default="mistral-7b", help="model shapes (config.PRESETS)")
    ap.add_argument("--random-weights", action="store_true", default=True,
                    help="random bf16 weights made on the device (the only mode; accepted for clarity)")
    ap.add_argument("--batch", type=lambda s: [int(b) for b in s.split(",")], default=[1], help="e.g. 1,4,8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--mlp", choices=("dense", "cats-jnp", "cats-pallas"), default="dense")
    ap.add_argument("--sparsity", type=float, default=0.5, help="CATS target sparsity (with --mlp cats-*)")
    ap.add_argument("--calib-tokens", type=int, default=256, help="random tokens for the CATS calibration")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    ap.add_argument("--copy-mib", type=int, default=None, help="copy-ceiling array size (default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--prefill-chunk", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="append the markdown table to this file (e.g. docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the first token comes from prefill)")
    if args.mlp != "dense" and not 0 < args.sparsity < 1:
        ap.error(f"--sparsity {args.sparsity} must be in (0, 1)")
    if args.copy_mib is None:
        args.copy_mib = 64 if jax.default_backend() == "cpu" else 1024
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    table = run(PRESETS[args.config], args)
    print("\n" + table)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + table)


if __name__ == "__main__":
    main()

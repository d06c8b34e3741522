"""Decode speed with random weights at real model shapes: no checkpoint needed.

    PYTHONPATH=. python3 -m bench.decode --config mistral-7b --random-weights --batch 1,4,8
    python -m bench.decode --config mistral-7b --random-weights --mode cats --sparsity 0.5
    python -m bench.decode --config mistral-7b --random-weights --mode teal --sparsity 0.4,0.5
    python -m bench.decode --config smollm2-135m --random-weights --prompt-len 16 --new-tokens 8  # CPU smoke

Each batch runs cats_jax.generate.generate (the same jitted prefill and while_loop decode as
text generation) on random prompts of --prompt-len tokens, with EOS disabled so that every row
runs all --new-tokens: the first comes from prefill, the others from new_tokens - 1 decode steps.
Compilation is kept out of every timing; each figure is the median of --repeats runs. "launches":
the kernels one decode step launches, counted in the decode loop's optimized HLO (kernel_launches).

Bytes per decode step, the roofline's minimum: every weight matrix once (the embedding table is
only gathered, B rows, so it counts only as a tied LM head) plus, per row, the K and V of the
positions it attends to, averaged over the steps. For CATS modes the bytes are still the dense
ones, so their GB/s is an effective bandwidth: above the ceiling means rows were skipped.
(The decode loop reads every slot of its cache, prompt + new tokens, each step; that excess is
not counted: for mistral-7b at 128 + 256 tokens it is 0.3% of the weights per row of the batch.)

Ceilings, timed in the same run on the same device over a --copy-mib bf16 array: copy (y = x + 1,
bytes read and written counted) and read (a sum: bytes read). Decode reads far more than it
writes, and on an H200 reading alone runs faster than copying, so both are shown. "vs dense": the
dense row's ms/step of the same batch in the same run over this row's.

Weights are created on the device in bf16 by one jitted init, never as fp32 host arrays; each
setting runs cats_jax.decode.prepare (fused q|k|v and gate|up), as generation does. --quantize
none,int8 runs every setting on the bf16 weights, then on their int8 copy (cats_jax.quantize: the
linear layers int8, the embedding and LM head bf16), whose rows are labelled "int8 ..." (with
--quantize-head the LM head is int8 too: "int8+head ..."); "vs dense"
is always against the first dense row of the batch, so the bf16 one when both run. "weight GB":
the bytes of the decode weights on the device (decode.prepare's, a tied embedding counted twice:
as the table and as the LM head, unless the head is int8: its own matrix). For sparse modes the
thresholds come from a quick calibration of that random model on one row of random tokens: per
layer and site, the quantile of the dense model's |values| at --sparsity (uniform allocation;
cats_jax.teal.sample_inputs). --impl pallas runs decode steps through the kernels.

--blocks-from own,KIND: each row again with device KIND's tuned GEMV blocks over this device's
(sparse_gemv.TUNED), labelled ", KIND blocks": whether one device's tune pays on another, against
this device's own rows of the same process.

--tp N: tensor parallel over the first N devices (cats_jax.sharding); the ceilings are then N times
one device's (the aggregate), so "% of read" is of N x read ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import itertools
import re
import statistics
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cats_jax.generate as generation
from bench.kernels import copy_bandwidth, read_bandwidth
from cats_jax import cli, decode, sharding
from cats_jax.config import PRESETS, QUANTIZATIONS, ModelConfig
from cats_jax.generate import generate
from cats_jax.model import Block, Transformer, quantize_model
from cats_jax.sparsity import MODES
from pallas_kernels import sparse_gemv


def random_model(cfg: ModelConfig, seed: int = 0, dtype=jnp.bfloat16) -> Transformer:
    """Random weights made on the default device with the model's own initializers: the embedding,
    final norm and head by one jitted init of the model without its layers, then every layer by one
    jitted init of a Block, compiled once (the whole model's init as one program took 36-42 s to
    compile on an H100). Quantize them with cats_jax.model.quantize_model."""
    def init(module):  # module(rngs) -> a function of a key to the module, its init jitted once
        graphdef = nnx.graphdef(nnx.eval_shape(lambda: module(nnx.Rngs(0))))
        state = jax.jit(lambda key: nnx.state(module(nnx.Rngs(key))))
        return lambda key: nnx.merge(graphdef, state(key))

    top, *keys = jax.random.split(jax.random.key(seed), cfg.num_layers + 1)
    model = init(lambda rngs: Transformer(dataclasses.replace(cfg, num_layers=0), dtype=dtype, rngs=rngs))(top)
    block = init(lambda rngs: Block(cfg, dtype, rngs))
    model.cfg = cfg
    model.layers = nnx.List([block(key) for key in keys])
    return model


def bytes_per_step(cfg: ModelConfig, model: Transformer, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Minimum bytes a dense decode step reads: weights once + each row's attended K/V (mean)."""
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    weights = sum(p.size * p.dtype.itemsize for p in params)  # an int8 model's int8 kernels and fp32 scales
    itemsize = model.embed.embedding.dtype.itemsize  # the float weights' and the cache's
    if model.lm_head is not None:  # the table is gathered (B rows), not read: the head is lm_head
        weights -= cfg.vocab_size * cfg.hidden_size * itemsize
    ctx = np.arange(prompt_len + 1, prompt_len + new_tokens)  # keys seen by decode steps 1..new-1
    if cfg.sliding_window is not None:
        ctx = np.minimum(ctx, cfg.sliding_window)
    kv_per_pos = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    return weights + batch * kv_per_pos * float(ctx.mean())


def weight_bytes(decoder: decode.Decoder) -> int:
    """Bytes of the decode weights on the device(s) (int8 kernels: 1 per weight, plus their fp32 scales)."""
    return sum(w.nbytes for w in jax.tree.leaves(decoder.weights))


def random_thresholds(model: Transformer, sparsity: list[float], tokens: int, seed: int) -> dict:
    """{level: {site: per-layer thresholds}} for every site (TEAL's and CATS's) at each level, from
    one row of random tokens: the quantile of the dense model's |values| (uniform allocation)."""
    from cats_jax import teal  # its data/checkpoint imports are only needed here

    row = np.random.default_rng(seed).integers(0, model.cfg.vocab_size, tokens, dtype=np.int32)
    sample = teal.sample_inputs(model, [row], batch_size=1, seed=seed, progress=False)  # changes the mode
    layers = range(model.cfg.num_layers)
    return {p: {site: [sample.threshold(site, i, p)[0] for i in layers] for site in MODES["teal"] + MODES["cats"]}
            for p in sparsity}


# HLO instructions that launch no kernel of their own
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "call", "while", "conditional",
              "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency"}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][a-z0-9\-]*)\((.*)$")


def kernel_launches(hlo: str) -> list[str]:
    """Kernel launches per decode step, as "opcode name" lines: the instructions of the decode loop's body (and of what it
    calls, such as command buffers) that run as GPU kernels, in the optimized HLO. Fusions, custom
    calls (the Pallas kernels, cuBLAS GEMMs) and copies count one each; a fusion's insides do not."""
    comps, name = {}, None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if head and not line.startswith(" "):
            name = head.group(1)
            comps[name] = []
        elif name and line.strip() != "}":
            comps[name].append(line)
    bodies = [m.group(1) for lines in comps.values() for ln in lines for m in [re.search(r"body=%?([\w.\-]+)", ln)] if m]

    def launched(comp: str) -> list[str]:
        found = []
        for ln in comps.get(comp, ()):
            m = _INSTRUCTION.match(ln)
            if not m:
                continue
            op = m.group(1)
            if op in ("call", "conditional") or (op == "custom-call" and "command_buffer" in ln):
                for c in re.findall(r"(?:to_apply|calls|branch_computations=\{[^}]*)=?%?([\w.\-]+)", ln):
                    found += launched(c)
            elif op not in _NO_KERNEL:
                found.append(f"{op} {ln.split('=')[0].strip()}")
        return found

    return max((launched(b) for b in bodies), key=len, default=[])


def latest_decode_hlo() -> str:
    """The optimized HLO of the decode loop generate() ran last."""
    return [c for key, c in generation._COMPILED.items() if key[0] is generation._decode][-1].as_text()


def run(cfg: ModelConfig, args: argparse.Namespace) -> str:
    """Benchmark cfg's shapes with main()'s options (every mode x sparsity x batch); prints rows as
    they come, returns the markdown table."""
    dev = jax.devices()[0]
    date = datetime.date.today().isoformat()
    print(f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}, flax {flax.__version__}; "
          f"{cfg.name}: {cfg.num_params() / 1e9:.2f} B params" + (f", tp {args.tp}" if args.tp > 1 else ""), flush=True)
    ceiling, read = (args.tp * f(args.copy_mib / 1024) for f in (copy_bandwidth, read_bandwidth))  # aggregate
    mesh = sharding.make_mesh(args.tp) if args.tp > 1 else None
    print(f"copy ceiling: {ceiling / 1e9:.1f} GB/s, read ceiling {read / 1e9:.1f} GB/s", flush=True)
    clock = time.perf_counter()

    def took(what):  # the setup's phases, so that a run's time outside the timed rows shows
        nonlocal clock
        jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
        print(f"{what}: {time.perf_counter() - clock:.1f} s", flush=True)
        clock = time.perf_counter()

    base = model = random_model(cfg, args.seed)
    took("random weights")
    sparse = [m for m in args.mode if m != "dense"]
    rows, dense_ms = [], {}
    settings = [("dense", None)] * ("dense" in args.mode) + [(m, p) for m in sparse for p in args.sparsity]
    for quant in args.quantize:
        clock = time.perf_counter()  # not the rows before
        model = base if quant == "none" else quantize_model(base, head=args.quantize_head)
        if quant != "none":
            took(f"{quant} copy")
        quant += "+head" if quant != "none" and args.quantize_head else ""
        thresholds = random_thresholds(model, args.sparsity, args.calib_tokens, args.seed) if sparse else {}
        if sparse:
            took(f"calibration ({args.calib_tokens} tokens)")
        for mode, level in settings:
            for site in MODES[mode]:
                model.set_thresholds(site, thresholds[level][site])
            model.set_mode(mode)
            decoder = decode.prepare(model, args.impl)
            if mesh is not None:
                decoder = sharding.shard(decoder, mesh)
            weight_gb = weight_bytes(decoder) / 1e9
            label = ("" if quant == "none" else f"{quant} ") + (
                mode if mode == "dense" else f"{mode} ({args.impl}) {level:g}")
            for batch, kind in itertools.product(args.batch, args.blocks_from or ["own"]):
                rng = np.random.default_rng(args.seed + batch)
                prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
                bench = functools.partial(generate, decoder, prompts, args.new_tokens, eos_ids=(),
                                          prefill_chunk=args.prefill_chunk)
                # each row traces and compiles its own decode loop: the kernels' blocks (sparse_gemv.TUNED)
                # are read when it is traced, keyed neither here nor in JAX's trace caches (a row may differ
                # from the last in its blocks alone: --blocks-from), and the launches below count this row's
                generation._COMPILED.clear()
                jax.clear_caches()
                with blocks_from(kind):
                    compile_s = bench().compile_s  # first run: compiles and warms up
                runs = [bench() for _ in range(args.repeats)]
                steps = runs[0].decode_steps
                decode_s = statistics.median(r.decode_s for r in runs)
                prefill_s = statistics.median(r.prefill_s for r in runs)
                nbytes = bytes_per_step(cfg, model, batch, args.prompt_len, args.new_tokens)
                gbs = nbytes * steps / decode_s
                measured = runs[0].mlp_sparsity
                launches = len(kernel_launches(latest_decode_hlo()))
                ms = decode_s / steps * 1e3
                if mode == "dense":
                    dense_ms.setdefault(batch, ms)
                speedup = f"{dense_ms[batch] / ms:.3f}x" if batch in dense_ms else "-"
                rows.append(
                    f"| {label}{'' if args.blocks_from is None else f', {kind} blocks'} | {'-' if measured is None else f'{measured:.3f}'} | {batch} "
                    f"| {args.prompt_len} | {args.new_tokens} | {prefill_s * 1e3:.1f} | {ms:.3f} | {speedup} "
                    f"| {batch * steps / decode_s:.1f} | {nbytes / 1e9:.3f} | {weight_gb:.3f} | {gbs / 1e9:.1f} "
                    f"| {100 * gbs / ceiling:.1f}% "
                    f"| {100 * gbs / read:.1f}% | {launches} ({launches / cfg.num_layers:.1f}) | {compile_s:.1f} |"
                )
                print(rows[-1], flush=True)

    head = " (LM head int8 too)" if args.quantize_head else ""
    return "\n".join([
        f"### decode: {cfg.name}, random bf16 weights" + "".join(f", their {q} copy{head}" for q in args.quantize if q != "none")
        + (f", tensor parallel over {args.tp} devices" if mesh else ""),
        "",
        f"{dev.device_kind} ({dev.platform}), {date}, jax {jax.__version__}, flax {flax.__version__}. "
        f"Copy ceiling {ceiling / 1e9:.1f} GB/s (y = x + 1, {args.copy_mib} MiB bf16, read + write); "
        f"read ceiling {read / 1e9:.1f} GB/s (a sum over the same array)"
        + (f"; both {args.tp} x one device's." if mesh else "."),
        "",
        "| mode (impl) sparsity | measured MLP sparsity | batch | prompt | new | prefill ms | ms/step | vs dense | tokens/s "
        "| GB/step (dense) | weight GB | GB/s | % of copy | % of read | launches/step (/layer) | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ])


@contextlib.contextmanager
def blocks_from(kind: str):
    """Inside, the kernels traced take device `kind`'s tuned GEMV blocks over this device's own
    (sparse_gemv.TUNED; "own": this device's alone), as --blocks-from rows are compiled."""
    own = jax.devices()[0].device_kind
    saved = sparse_gemv.TUNED.get(own, {})  # the table itself comes back, not a copy
    if kind != "own":
        sparse_gemv.TUNED[own] = {**saved, **sparse_gemv.TUNED[kind]}
    try:
        yield
    finally:
        sparse_gemv.TUNED[own] = saved


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description="Decode tokens/s and achieved bandwidth vs a measured copy ceiling, random weights at preset shapes.",
    )
    ap.add_argument("--config", choices=sorted(PRESETS), default="mistral-7b", help="model shapes (config.PRESETS)")
    ap.add_argument("--random-weights", action="store_true", default=True,
                    help="random bf16 weights made on the device (the only mode; accepted for clarity)")
    ap.add_argument("--batch", type=cli.counts, default=[1], help="decode rows, comma-separated, e.g. 1,4,8")
    ap.add_argument("--prompt-len", type=cli.count, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--mode", type=lambda s: s.split(","), default=["dense"],
                    help=f"sparsity modes, comma-separated ({', '.join(MODES)}); e.g. dense,cats,teal")
    ap.add_argument("--impl", choices=("pallas", "jnp"), default="pallas", help="sparse decode steps: kernels or jnp")
    ap.add_argument("--sparsity", type=cli.fractions, default=[0.5],
                    help="target sparsities of every site of the sparse modes, e.g. 0.4,0.5")
    ap.add_argument("--quantize", type=lambda s: s.split(","), default=["none"],
                    help=f"weights, comma-separated: none (bf16) and/or {', '.join(QUANTIZATIONS)} (their quantized copy), "
                         "e.g. none,int8")
    ap.add_argument("--quantize-head", action="store_true",
                    help="the int8 copy's LM head int8 too (its own matrix, also when tied); rows 'int8+head ...'")
    ap.add_argument("--calib-tokens", type=cli.count, default=256, help="random tokens for the calibration")
    ap.add_argument("--repeats", type=cli.count, default=3, help="timed runs per batch size (median)")
    ap.add_argument("--copy-mib", type=cli.count, default=None, help="copy-ceiling array size (default 1024 on GPU, 64 on CPU)")
    ap.add_argument("--prefill-chunk", type=cli.count, default=512)
    ap.add_argument("--blocks-from", type=lambda s: s.split(","), default=None,
                    help="rows with another device kind's tuned GEMV blocks (pallas_kernels.sparse_gemv.TUNED) over "
                         "this device's, comma-separated; 'own' for this device's alone, e.g. "
                         "'own,NVIDIA H100 80GB HBM3': a tune of one device tried on another in one process")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel over this many devices (default 1)")
    ap.add_argument("--out", type=Path, help="append the markdown table to this file (e.g. docs/benchmarks.md)")
    args = ap.parse_args(argv)
    if args.new_tokens < 2:
        ap.error("--new-tokens must be >= 2 (the first token comes from prefill)")
    for m in args.mode:
        if m not in MODES:
            ap.error(f"--mode: unknown mode {m!r} (choose from {', '.join(MODES)})")
    for q in args.quantize:
        if q not in ("none", *QUANTIZATIONS):
            ap.error(f"--quantize: unknown quantization {q!r} (choose from none, {', '.join(QUANTIZATIONS)})")
    for kind in args.blocks_from or ():
        if kind != "own" and kind not in sparse_gemv.TUNED:
            ap.error(f"--blocks-from: no tuned blocks for {kind!r} (choose from own, {', '.join(sparse_gemv.TUNED)})")
    if args.quantize_head and set(args.quantize) == {"none"}:
        ap.error("--quantize-head quantizes the LM head of the int8 copy: add int8 to --quantize (e.g. none,int8)")
    try:  # the devices and the shapes, before any work
        sharding.make_mesh(args.tp)
        sharding.local_config(PRESETS[args.config], args.tp)
    except ValueError as e:
        ap.error(f"--tp {args.tp}: {e}")
    cli.output_file(ap, "--out", args.out)
    try:  # generate's own check, before the model is built
        generation.check_context(PRESETS[args.config], args.prompt_len, args.new_tokens)
    except ValueError as e:
        ap.error(f"--prompt-len / --new-tokens: {e}")
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

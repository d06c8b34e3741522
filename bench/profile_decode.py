"""Where a decode step's time goes on the GPU: a jax.profiler trace of the decode loop, summed per kernel.

    python -m bench.profile_decode --config mistral-7b --batch 1,8 [--layers 8] [--mode teal --sparsity 0.5]

For each batch size: run cats_jax.generate once (compile), then once more under jax.profiler with
a Perfetto trace, and print the kernels a decode step launches (counted in its optimized HLO, as
bench.decode does), per kernel name the GPU time per decode step (summed over calls), its calls per
step and mean duration, and the GPU-busy time per step against the wall time per step (the
difference is idle GPU time: launch gaps, host syncs). Random bf16 weights, as bench.decode.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import gzip
import json
import re
import tempfile

import jax
import numpy as np

from bench.decode import kernel_launches, latest_decode_hlo, random_model, random_thresholds
from cats_jax import cli, decode
from cats_jax.config import PRESETS, QUANTIZATIONS
from cats_jax.generate import generate
from cats_jax.model import quantize_model
from cats_jax.sparsity import MODES


def gpu_kernel_events(trace_dir: str) -> list[dict]:
    """Complete ('X') events on the GPU's stream timelines of the newest trace under trace_dir."""
    path = sorted(glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True))[-1]
    events = json.load(gzip.open(path))["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu = {pid for pid, n in names.items() if "GPU" in n or "gpu" in n}
    # XLA's own ops and modules also appear on the device as summary rows; keep the stream rows
    kept = [e for e in events if e.get("ph") == "X" and e["pid"] in gpu
            and "Stream" in threads.get((e["pid"], e["tid"]), "Stream")]
    if not kept:  # say what the trace holds instead
        rows = collections.Counter((names.get(e.get("pid")), threads.get((e.get("pid"), e.get("tid"))))
                                   for e in events if e.get("ph") == "X")
        print("no GPU stream events; X events per (process, thread):", rows.most_common(12))
    return kept


def idle_gaps(events: list[dict], long_us: float = 20.0) -> tuple[float, int, float, int]:
    """Idle GPU time between consecutive kernels (events sorted by start; overlaps count as no gap):
    (us in gaps shorter than long_us, their count, us in longer gaps, their count). Short gaps are
    launch-to-launch latency; long ones are host round trips (the decode loop's per-step predicate)."""
    short_us = long_total = 0.0
    n_short = n_long = 0
    end = None
    for e in sorted(events, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            gap = e["ts"] - end
            if gap < long_us:
                short_us, n_short = short_us + gap, n_short + 1
            else:
                long_total, n_long = long_total + gap, n_long + 1
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    return short_us, n_short, long_total, n_long


def short(name: str) -> str:
    name = re.sub(r"\d+", "#", name)
    return name if len(name) < 70 else name[:67] + "..."


def profile(decoder, cfg, batch, args) -> None:
    rng = np.random.default_rng(batch)
    prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt_len)).tolist()
    run = lambda: generate(decoder, prompts, args.new_tokens, eos_ids=())
    run()
    launches = len(kernel_launches(latest_decode_hlo()))  # in the compiled loop: a regression shows here
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            gen = run()
        events = gpu_kernel_events(d)
    steps = gen.decode_steps
    # the prefill's kernels are counted too: few next to `steps` decode steps (reported as such)
    per = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        p = per[short(e["name"])]
        p[0] += e["dur"]
        p[1] += 1
    busy = sum(v[0] for v in per.values())
    wall_ms = gen.decode_s / steps * 1e3
    quant = f" {args.quantize}" if args.quantize else ""
    print(f"\n### {cfg.name} layers={cfg.num_layers} batch={batch} mode={args.mode}{quant} ({args.impl}): "
          f"{wall_ms:.3f} ms/step wall "
          f"(decode_s over {steps} steps), GPU busy {busy / 1e3 / steps:.3f} ms/step (prefill included), "
          f"{len(events)} kernel events; {launches} launches a decode step ({launches / cfg.num_layers:.1f} a layer)")
    gap_s, n_s, gap_l, n_l = idle_gaps(events)
    print(f"idle between kernels per step: {gap_s / steps:.1f} us in {n_s / steps:.1f} gaps under 20 us (launches), "
          f"{gap_l / steps:.1f} us in {n_l / steps:.2f} longer gaps (host round trips; prefill included)")
    print("| kernel | us/step | calls/step | us/call |\n|---|---|---|---|")
    for name, (dur, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"| {name} | {dur / steps:.1f} | {n / steps:.2f} | {dur / n:.2f} |")
    if args.save:  # one event per distinct kernel name, with its args (the HLO op it ran)
        seen = {}
        for e in events:
            seen.setdefault(e["name"], e)
        with open(f"{args.save}_b{batch}.json", "w") as f:
            json.dump(list(seen.values()), f, indent=0)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.profile_decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", choices=sorted(PRESETS), default="mistral-7b")
    ap.add_argument("--layers", type=cli.count, help="override the number of layers (faster start; per-layer costs the same)")
    ap.add_argument("--batch", type=cli.counts, default=[1, 8], help="decode rows, comma-separated")
    ap.add_argument("--prompt-len", type=cli.count, default=128)
    ap.add_argument("--new-tokens", type=cli.count, default=64)
    ap.add_argument("--mode", choices=sorted(MODES), default="dense")
    ap.add_argument("--impl", choices=("pallas", "jnp"), default="pallas")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--quantize", choices=QUANTIZATIONS, help="profile the model's quantized copy (as bench.decode)")
    ap.add_argument("--top", type=cli.count, default=25)
    ap.add_argument("--save", help="write one sample event per kernel name (with its HLO op) to SAVE_b<batch>.json")
    args = ap.parse_args(argv)
    cfg = PRESETS[args.config]
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    model = random_model(cfg)
    if args.quantize:
        model = quantize_model(model)
    if args.mode != "dense":
        for site, t in random_thresholds(model, [args.sparsity], 256, 0)[args.sparsity].items():
            model.set_thresholds(site, t)
    model.set_mode(args.mode)
    decoder = decode.prepare(model, args.impl)
    for b in args.batch:
        profile(decoder, cfg, b, args)


if __name__ == "__main__":
    main()

"""Peak host RAM of `python -m convert --hf` on a synthetic Mistral-7B-shaped checkpoint.

    .venv/bin/python scripts/measure_convert_memory.py --work /tmp/convert-mem

Writes a sharded bf16 safetensors checkpoint with random weights at the real shapes (~14.5 GB,
~5 GB shards, streamed to disk tensor by tensor), converts it to bf16 in a child process while
sampling its RSS, prints the peak against the checkpoint size, and deletes both directories
(unless --keep). A watchdog kills the converter if the machine's available memory runs low.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import ml_dtypes
import numpy as np
import psutil
from tqdm import tqdm

from cats_jax.config import preset


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg.vocab_size, h)}
    for n in range(cfg.num_layers):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
                   p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
                   p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
                   p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
                   p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                   p + "mlp.down_proj.weight": (h, i),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], rng) -> None:
    """The safetensors format written one tensor at a time (safetensors' save_file needs the whole
    shard in memory): u64 header length, JSON header with byte offsets, then the raw data."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for shape in shapes.values():
            w = (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(ml_dtypes.bfloat16)
            f.write(w.tobytes())


def make_checkpoint(out: Path, cfg, shard_bytes: float) -> tuple[int, int]:
    """Writes the checkpoint; returns (bytes of safetensors, number of shards)."""
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(cfg.to_hf()))
    shards, current, size = [], {}, 0
    for name, shape in hf_shapes(cfg).items():
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name], size = shape, size + nbytes
    shards.append(current)
    rng = np.random.default_rng(0)
    weight_map = {}
    for k, shard in enumerate(tqdm(shards, desc="writing synthetic shards", unit="shard")):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard, rng)
        weight_map |= {name: file for name in shard}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(f.stat().st_size for f in out.glob("*.safetensors")), len(shards)


def convert_and_watch(src: Path, dst: Path, min_available: float) -> tuple[float, float, float]:
    """(peak RSS in bytes from the kernel, peak of our own samples, wall seconds) of the converter."""
    cmd = [sys.executable, "-m", "convert", "--hf", str(src), "--out", str(dst), "--dtype", "bfloat16"]
    start = time.time()
    child = subprocess.Popen(cmd)
    proc, sampled = psutil.Process(child.pid), 0
    while child.poll() is None:
        try:
            sampled = max(sampled, proc.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        if psutil.virtual_memory().available < min_available:
            child.kill()
            raise SystemExit(f"killed the converter: available memory fell below {min_available / 1e9:.1f} GB")
        time.sleep(0.2)
    if child.wait() != 0:
        raise SystemExit(f"converter failed with exit code {child.returncode}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux: KiB
    return peak, sampled, time.time() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="scratch directory (needs ~30 GB of disk)")
    ap.add_argument("--preset", default="mistral-7b", help="model shape (cats_jax.config.PRESETS)")
    ap.add_argument("--layers", type=int, help="override the number of layers (a smaller trial run)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="safetensors shard size, as HF's default")
    ap.add_argument("--min-available-gb", type=float, default=1.5, help="watchdog: kill below this much free RAM")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic and converted checkpoints")
    args = ap.parse_args()
    cfg = preset(args.preset)
    if args.layers:
        import dataclasses

        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    src, dst = args.work / "hf", args.work / "converted"
    if args.work.exists():
        raise SystemExit(f"{args.work} exists; pass a new scratch directory")
    try:
        size, n_shards = make_checkpoint(src, cfg, args.shard_gb * 1e9)
        peak, sampled, seconds = convert_and_watch(src, dst, args.min_available_gb * 1e9)
        out_size = sum(f.stat().st_size for f in (dst / "params").rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)
    print(f"model: {args.preset}, {cfg.num_layers} layers, {cfg.num_params() / 1e9:.2f}B params")
    print(f"bf16 safetensors checkpoint: {size / 1e9:.2f} GB in {n_shards} shards, "
          f"converted params/: {out_size / 1e9:.2f} GB, conversion {seconds:.0f} s")
    print(f"converter peak RSS: {peak / 1e9:.2f} GB (kernel max RSS; sampled {sampled / 1e9:.2f} GB) "
          f"= {peak / size:.2f}x the checkpoint size")


if __name__ == "__main__":
    main()

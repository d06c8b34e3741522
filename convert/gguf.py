"""llama.cpp GGUF (llama architecture) -> cats-jax checkpoint.

Weights: the `gguf` package dequantizes every type it knows (F32/F16/BF16, Q8_0, Q4_0/Q4_1,
K-quants, ...) to fp32 numpy, one tensor at a time; rows come out as torch's [out, in].
llama.cpp's converter permutes the rows of attn_q / attn_k within each head (its RoPE pairs
adjacent elements, HF's rotate-half pairs the two halves); we undo that to get HF layout.
Tokenizer: rebuilt from the file's metadata by transformers' GGUF tokenizer builders (torch-free),
saved as HF tokenizer files with the chat template.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cats_jax import checkpoint
from cats_jax.cli import InputError
from cats_jax.config import ModelConfig
from convert import put, target_dtype, write

TOP_LEVEL = {
    "token_embd.weight": ("embed", "embedding"),
    "output_norm.weight": ("norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
IN_BLOCK = {
    "attn_q.weight": ("attn", "q_proj", "kernel"),
    "attn_k.weight": ("attn", "k_proj", "kernel"),
    "attn_v.weight": ("attn", "v_proj", "kernel"),
    "attn_output.weight": ("attn", "o_proj", "kernel"),
    "ffn_gate.weight": ("mlp", "gate_proj", "kernel"),
    "ffn_up.weight": ("mlp", "up_proj", "kernel"),
    "ffn_down.weight": ("mlp", "down_proj", "kernel"),
    "attn_norm.weight": ("input_norm", "scale"),
    "ffn_norm.weight": ("post_attn_norm", "scale"),
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")


def target_path(name: str) -> tuple[str, ...]:
    if name == "rope_freqs.weight":  # Llama-3.1 stores its rope scaling as per-frequency factors
        raise ValueError("GGUF tensor rope_freqs.weight (Llama-3.1 rope scaling) is not supported; "
                         "convert the HF checkpoint with --hf instead")
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = _BLOCK.fullmatch(name)
    if m and m.group(2) in IN_BLOCK:
        return ("layers", m.group(1), *IN_BLOCK[m.group(2)])
    raise ValueError(f"unexpected GGUF tensor {name!r} (not part of a llama model we support)")


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permute(): per head, rows [pair 0 even, pair 0 odd, pair 1 even, ...]
    back to HF's [first half of the head, second half]."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_metadata(reader) -> dict:
    return {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}


def save_tokenizer(meta: dict, out_dir: Path) -> None:
    """HF tokenizer files (tokenizer.json, tokenizer_config.json with the chat template, ...) built
    as transformers builds them from a GGUF. transformers' own gguf_file= loader imports torch,
    so we feed its builders the metadata read by the gguf package instead."""
    try:  # internal to transformers, so it may move: say so instead of a bare ImportError
        from transformers import TokenizersBackend
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
    except ImportError as e:
        raise RuntimeError(f"building a tokenizer from GGUF metadata needs transformers' GGUF tokenizer builders "
                           f"(written against transformers 5.23): {e}") from e

    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError("GGUF file has no tokenizer (metadata tokenizer.ggml.tokens is missing)")
    fields = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items() if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    tok_dict, tok_config = fields["tokenizer"], fields["tokenizer_config"]
    if tok_dict.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece vocabularies by default
        tok_config.setdefault("add_bos_token", True)
    tokens = tok_dict["tokens"]
    for special in ("bos", "eos", "unk", "pad"):
        index = tok_dict.get(f"{special}_token_id")
        tok_config[f"{special}_token"] = tokens[index] if index is not None else None
    backend, extra = convert_gguf_tokenizer(meta["general.architecture"], tok_dict)
    TokenizersBackend(tokenizer_object=backend, **tok_config, **extra).save_pretrained(out_dir)


def convert_gguf(path: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False,
                 quantization: str | None = None, quantize_head: bool = False) -> Path:
    """Convert a llama-architecture GGUF file into a cats-jax checkpoint at out (its linear layers
    quantized if quantization is given, and its LM head if quantize_head: cats_jax.quantize)."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    dt = target_dtype(dtype)
    checkpoint.check_out_dir(out, force)
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    try:
        reader = GGUFReader(path)  # memory-maps the file: tensors are read when dequantized
    except (ValueError, IndexError, OSError) as e:  # a file cut short fails to map its last tensors
        raise InputError(f"{path}: not a complete GGUF file ({e}); download it again") from e
    meta = read_metadata(reader)
    names = [t.name for t in reader.tensors]
    cfg = ModelConfig.from_gguf(meta, tied="output.weight" not in names)
    with tempfile.TemporaryDirectory() as tok_dir:
        save_tokenizer(meta, Path(tok_dir))  # first: it is quick, and a vocabulary we cannot build fails early
        params: dict = {}
        for t in tqdm(reader.tensors, desc="dequantizing", unit="tensor"):
            target = target_path(t.name)
            w = dequantize(t.data, t.tensor_type)
            if target[-2] == "q_proj":
                w = unpermute_rows(w, cfg.num_heads)
            elif target[-2] == "k_proj":
                w = unpermute_rows(w, cfg.num_kv_heads)
            put(params, target, w, dt, transpose=target[-1] == "kernel")
        return write(out, cfg, params, tok_dir, force, quantization, quantize_head)

"""HF transformers Llama / Mistral checkpoint (local dir or hub id) -> cats-jax checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import sys
from pathlib import Path

from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from cats_jax import checkpoint
from cats_jax.cli import InputError
from cats_jax.config import ModelConfig
from convert import put, target_dtype, write

# HF tensor name -> path in our params tree. Kernels (Linear weights) are transposed.
TOP_LEVEL = {
    "model.embed_tokens.weight": ("embed", "embedding"),
    "model.norm.weight": ("norm", "scale"),
    "lm_head.weight": ("lm_head", "kernel"),
}
IN_LAYER = {
    "self_attn.q_proj.weight": ("attn", "q_proj", "kernel"),
    "self_attn.k_proj.weight": ("attn", "k_proj", "kernel"),
    "self_attn.v_proj.weight": ("attn", "v_proj", "kernel"),
    "self_attn.o_proj.weight": ("attn", "o_proj", "kernel"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj", "kernel"),
    "mlp.up_proj.weight": ("mlp", "up_proj", "kernel"),
    "mlp.down_proj.weight": ("mlp", "down_proj", "kernel"),
    "input_layernorm.weight": ("input_norm", "scale"),
    "post_attention_layernorm.weight": ("post_attn_norm", "scale"),
}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")

# What snapshot_download fetches of a hub repo: not the .bin / .pth / .gguf / consolidated.safetensors
# (Mistral's own format) copies of the weights that many repos also hold.
HUB_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", *checkpoint.TOKENIZER_FILES]


def target_path(name: str, cfg: ModelConfig) -> tuple[str, ...] | None:
    """Where an HF tensor goes; None for tensors we do not keep."""
    if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return None  # recomputed from the config / the tied copy of embed_tokens
    if name in TOP_LEVEL:
        return TOP_LEVEL[name]
    m = _LAYER.fullmatch(name)
    if m and m.group(2) in IN_LAYER:
        return ("layers", m.group(1), *IN_LAYER[m.group(2)])
    raise ValueError(f"unexpected tensor {name!r} in the checkpoint (not part of a {cfg.model_type} model we support)")


def resolve(src: str | Path) -> Path:
    """A local HF checkpoint dir, or a hub id fetched (only the files we need) into the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise InputError(f"{src}: expected an HF checkpoint directory or a hub id, got a file")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(src), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo...: all say the same to the user
        raise InputError(
            f"{src!r} is not a local directory, and fetching it from the Hugging Face hub failed "
            f"({type(e).__name__}: {e}). Offline? Pass the path of a downloaded HF checkpoint instead."
        ) from e


def shard_of_tensor(src: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file that holds it (single file or sharded with an index)."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise InputError(f"{index}: no weight_map; download the checkpoint again")
        return {name: src / shard for name, shard in weight_map.items()}
    single = src / "model.safetensors"
    if not single.is_file():
        raise InputError(f"{src}: no model.safetensors or model.safetensors.index.json (only safetensors "
                         f"checkpoints are supported)")
    with _safetensors(single) as f:
        return {name: single for name in f.keys()}


@contextlib.contextmanager
def _safetensors(path: Path):
    """safe_open, with a damaged or missing file as one line (a truncated download, typically)."""
    try:
        with safe_open(path, "numpy") as f:
            yield f
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: not a readable safetensors file ({e}); download the checkpoint again") from e


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); download the checkpoint again") from e


def missing_tokenizer(src: Path) -> bool:
    """No tokenizer.json / tokenizer.model: the checkpoint could not encode text."""
    return not any((src / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def read_config(src: Path, name: str = "") -> ModelConfig:
    path = src / "config.json"
    if not path.is_file():
        raise InputError(f"{src}: no config.json (is it an HF checkpoint directory?)")
    cfg = ModelConfig.from_hf(_json(path), name=name or src.name)
    gen = src / "generation_config.json"
    if gen.is_file():  # instruct models list their end-of-turn tokens here, not in config.json
        eos = _json(gen).get("eos_token_id")
        extra = eos if isinstance(eos, list) else [] if eos is None else [eos]
        cfg = dataclasses.replace(cfg, eos_token_ids=tuple(dict.fromkeys([*cfg.eos_token_ids, *extra])))
    return cfg


def convert_hf(src: str | Path, out: str | Path, dtype: str = "bfloat16", force: bool = False,
               quantization: str | None = None, quantize_head: bool = False) -> Path:
    """Convert an HF safetensors checkpoint (dir or hub id) into a cats-jax checkpoint at out
    (its linear layers quantized if quantization is given, and its LM head if quantize_head:
    cats_jax.quantize)."""
    dt = target_dtype(dtype)
    checkpoint.check_out_dir(out, force)
    local = resolve(src)
    cfg = read_config(local, name=Path(src).name if local == Path(src).expanduser() else str(src))
    if missing_tokenizer(local):  # say it now, not when generate or calibrate first needs it
        print(f"warning: {local} has no tokenizer.json or tokenizer.model: the checkpoint will hold weights only; "
              f"copy the model's tokenizer files into {out} before generate, calibrate, eval or train",
              file=sys.stderr)
    params: dict = {}
    shards = shard_of_tensor(local)
    for name in tqdm(sorted(shards, key=lambda n: (shards[n], n)), desc="converting", unit="tensor"):
        path = target_path(name, cfg)
        if path is None:
            continue
        # One tensor per open: the mapping (and its resident pages) is dropped right after the copy.
        with _safetensors(shards[name]) as f:
            w = f.get_tensor(name)
        put(params, path, w, dt, transpose=path[-1] == "kernel")
        del w
    return write(out, cfg, params, local, force, quantization, quantize_head)

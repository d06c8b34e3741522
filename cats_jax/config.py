"""Model shapes and options for Llama / Mistral, from HF config.json, GGUF metadata or presets."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from cats_jax.cli import InputError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
QUANTIZATIONS = ("int8",)  # of the linear layers' weights (cats_jax.quantize); None: float weights


class ConfigError(InputError):
    """A config field we cannot honour: the message names the field."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 'llama3' frequency scaling (the only scaling type we implement)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Frozen (hashable) so it can be a static argument of jitted functions."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    model_type: str = "llama"
    name: str = ""
    quantization: str | None = None  # QUANTIZATIONS or None
    quantize_head: bool = False  # the LM head quantized too (its own matrix even when tied); needs quantization

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type={self.model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )
        if self.quantization not in (None, *QUANTIZATIONS):
            raise ConfigError(f"quantization={self.quantization!r} is not supported "
                              f"(supported: {', '.join(QUANTIZATIONS)}, or none)")
        if self.quantize_head and self.quantization is None:
            raise ConfigError("quantize_head=true needs a quantization: the LM head is quantized with the linear "
                              f"layers (choose from {', '.join(QUANTIZATIONS)})")

    # ---- HF config.json -------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "") -> ModelConfig:
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"config.json: model_type={model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ConfigError(f"config.json: {flag}=true is not supported")
        heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id", 2)
        sliding = hf.get("sliding_window") if model_type == "mistral" else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(hf.get("rope_theta", hf.get("rope_parameters", {}).get("rope_theta", 10000.0))),
            rope_scaling=_rope_scaling_from_hf(hf),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=sliding,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ()),
            model_type=model_type,
            name=name or hf.get("_name_or_path", ""),
        )

    # ---- GGUF metadata (llama.cpp key names) ----------------------------------------
    @classmethod
    def from_gguf(cls, meta: dict[str, Any], tied: bool) -> ModelConfig:
        """meta: the GGUF key/value metadata as plain values; tied: the file has no output.weight."""
        arch = meta.get("general.architecture")
        if arch != "llama":  # llama.cpp files Mistral-7B under 'llama' too (without its sliding window)
            raise ConfigError(f"GGUF: general.architecture={arch!r} is not supported (supported: 'llama')")
        scaling = meta.get(f"{arch}.rope.scaling.type", "none")
        if scaling != "none":
            raise ConfigError(f"GGUF: {arch}.rope.scaling.type={scaling!r} is not supported")

        def need(key):
            if f"{arch}.{key}" not in meta:
                raise ConfigError(f"GGUF: metadata key {arch}.{key} is missing")
            return meta[f"{arch}.{key}"]

        hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta["tokenizer.ggml.tokens"])),
            hidden_size=hidden,
            intermediate_size=int(need("feed_forward_length")),
            num_layers=int(need("block_count")),
            num_heads=heads,
            num_kv_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            rms_norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
            tie_word_embeddings=tied,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (int(eos),),
            model_type="llama",
            name=str(meta.get("general.name", "")),
        )

    def to_hf(self) -> dict[str, Any]:
        """The HF config.json of this model (used to build golden models in tests and to export)."""
        d = {
            "model_type": self.model_type,
            "architectures": ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "hidden_act": "silu",
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        return d

    # ---- our own config.json (written into converted checkpoints) -------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        return cls(**d)

    @classmethod
    def load(cls, ckpt_dir: str | Path) -> ModelConfig:
        path = Path(ckpt_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"{path}: no config.json (is {ckpt_dir} a converted cats-jax checkpoint?)")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError, KeyError) as e:  # truncated or edited: JSONDecodeError, unknown fields
            raise ConfigError(f"{path}: not a cats-jax config.json ({e}); re-convert the checkpoint "
                              f"(python -m convert ... --out {ckpt_dir} --force)") from e

    # ---- derived sizes ---------------------------------------------------------------
    def num_params(self) -> int:
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        attn = h * d * (2 * self.num_heads + 2 * self.num_kv_heads)
        per_layer = attn + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * per_layer + h + head


def _rope_scaling_from_hf(hf: dict[str, Any]) -> RopeScaling | None:
    rs = hf.get("rope_scaling")
    if rs is None:  # transformers 5 moved it into rope_parameters
        rp = hf.get("rope_parameters") or {}
        rs = rp if rp.get("rope_type", "default") != "default" else None
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (supported: 'llama3')")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )


# Real shapes, for benchmarks with random weights (no checkpoint needed).
PRESETS: dict[str, ModelConfig] = {
    "llama2-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
        num_kv_heads=32, head_dim=128, max_position_embeddings=4096, name="llama2-7b",
    ),
    "llama3-8b": ModelConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama3-8b",
    ),
    "mistral-7b": ModelConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
        num_kv_heads=8, head_dim=128, max_position_embeddings=32768, sliding_window=4096,
        model_type="mistral", name="mistral-7b",
    ),
    "llama3-70b": ModelConfig(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64,
        num_kv_heads=8, head_dim=128, rope_theta=500000.0, max_position_embeddings=8192,
        bos_token_id=128000, eos_token_ids=(128001, 128009), name="llama3-70b",
    ),
    "smollm2-135m": ModelConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
        num_kv_heads=3, head_dim=64, rope_theta=100000.0, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,), name="smollm2-135m",
    ),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r} (choose from: {', '.join(PRESETS)})")
    return PRESETS[name]

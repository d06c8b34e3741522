"""The Python API: `import cats_jax; cats_jax.load(DIR, sparsity=...).generate(prompt)`."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

import cats_jax
from cats_jax import checkpoint, data, thresholds
from cats_jax.generate import generate_text
from cats_jax.sparsity import CATS_SITE


def test_load_and_generate_match_the_submodules(word_ckpt):
    lm = cats_jax.load(word_ckpt, sparsity=0.5, dtype="float32")
    assert lm.model.plan.sites == (CATS_SITE,)
    text = lm.generate("w5 w6 w7", 8, chat=True)

    model = checkpoint.load_model(word_ckpt, dtype=jnp.float32)
    thresholds.load_into(model, word_ckpt, 0.5)
    (want,), _ = generate_text(model, data.load_tokenizer(word_ckpt), ["w5 w6 w7"], 8, chat=True)
    assert text == want and text.strip()
    assert lm.generate(["w5 w6 w7", "w9"], 8, chat=True)[0] == want


def test_load_dense_and_errors(word_ckpt):
    assert cats_jax.load(word_ckpt).model.plan.sites == ()
    with pytest.raises(ValueError, match="tensor parallelism over 2 devices: 1 cpu device"):
        cats_jax.load(word_ckpt, tp=2)  # tests/test_sharding.py loads with tp on fake devices
    with pytest.raises(thresholds.ThresholdsError, match="no thresholds for sparsity 0.7"):
        cats_jax.load(word_ckpt, sparsity=0.7)
    with pytest.raises(ValueError, match="mode='teal' needs a sparsity"):
        cats_jax.load(word_ckpt, mode="teal")


def test_import_is_cheap():
    code = ("import sys, cats_jax; "
            "print(sorted(m for m in ('jax', 'transformers', 'orbax', 'flax') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "[]\n"

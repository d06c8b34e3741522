"""Model-level properties that need no external oracle (HF comparisons live in test_model_vs_hf.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cats_jax import model as M
from cats_jax.config import ConfigError, ModelConfig

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16)


def _tokens(b, t, seed=0):
    return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY["vocab_size"])


@pytest.mark.parametrize("window", [None, 4])
def test_cached_decode_equals_full_forward(window):
    cfg = ModelConfig(**TINY, model_type="mistral" if window else "llama", sliding_window=window)
    m = M.init_random(cfg, dtype=jnp.float32)
    toks = _tokens(2, 9)
    full, _ = m(toks)
    cache = M.init_cache(cfg, 2, 12, jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    first, cache = m(toks[:, :5], pos[:, :5], cache)
    steps = [first]
    for t in range(5, 9):
        out, cache = m(toks[:, t : t + 1], pos[:, t : t + 1], cache)
        steps.append(out)
    np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=2e-5, rtol=2e-5)


def test_sliding_window_hides_old_tokens():
    cfg = ModelConfig(**{**TINY, "num_layers": 1}, model_type="mistral", sliding_window=3)
    m = M.init_random(cfg, dtype=jnp.float32)
    toks = _tokens(1, 8)
    changed = toks.at[0, 0].set((toks[0, 0] + 1) % TINY["vocab_size"])
    a, _ = m(toks)
    b, _ = m(changed)
    # one layer: position 7 sees positions 5..7 only, so token 0 cannot reach it
    np.testing.assert_array_equal(a[0, 7], b[0, 7])
    assert not np.allclose(a[0, 1], b[0, 1])


def test_cats_threshold_zero_is_dense_and_positive_threshold_changes_output():
    cfg = ModelConfig(**TINY)
    m = M.init_random(cfg, dtype=jnp.float32)
    toks = _tokens(1, 6)
    dense, _ = m(toks)
    m.set_mlp_impl("cats-jnp")
    np.testing.assert_array_equal(m(toks)[0], dense)
    m.set_cats_thresholds([0.05, 0.05])
    assert not np.allclose(m(toks)[0], dense)
    with pytest.raises(ValueError, match="one per layer"):
        m.set_cats_thresholds([0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="unknown MLP implementation"):
        m.set_mlp_impl("sparse-magic")


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        ModelConfig.from_hf({"model_type": "gpt2"})
    hf = ModelConfig(**TINY).to_hf()
    hf["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn'"):
        ModelConfig.from_hf(hf)


def test_config_round_trips_through_hf_and_json():
    from cats_jax.config import PRESETS

    for cfg in PRESETS.values():
        back = ModelConfig.from_hf(cfg.to_hf(), name=cfg.name)
        assert back == cfg
        assert ModelConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("mode", ["cats", "teal"])
def test_weighted_criterion_with_unit_factors_reproduces_magnitude_exactly(mode):
    from cats_jax import sparsity
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16, name="tiny")
    m = M.init_random(cfg, seed=1, dtype=jnp.float32)
    m.set_mode(mode)
    for site in m.sites:
        m.set_thresholds(site, [0.3, 0.5])
    toks = jax.random.randint(jax.random.key(0), (2, 7), 0, cfg.vocab_size)
    magnitude = m(toks)[0]
    m.set_criterion("weighted")
    np.testing.assert_array_equal(m.layers[0].mlp.input_factor["down_proj"][...],
                                  sparsity.weight_factors(m.layers[0].mlp.down_proj.kernel[...]))
    assert not np.allclose(m(toks)[0], magnitude)
    for layer in m.layers:
        for module in (layer.attn, layer.mlp):
            for f in module.input_factor.values():
                f[...] = jnp.ones_like(f[...])
    np.testing.assert_array_equal(m(toks)[0], magnitude)
    with pytest.raises(ValueError, match="unknown selection criterion 'wina'"):
        m.set_criterion("wina")

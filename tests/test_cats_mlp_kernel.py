"""The Pallas CATS MLP kernels (interpret mode on the CPU) against the jnp reference, and their
use by the model's decode steps. Outputs are NaN-poisoned, so an unwritten element fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cats_jax import model as M
from cats_jax.config import ModelConfig
from cats_jax.generate import generate
from cats_jax.sparsity import cats_activation, gated_mlp
from pallas_kernels.bench import threshold_for as _threshold
from pallas_kernels.cats_mlp import cats_mlp, gate_up
from pallas_kernels.common import interpret_on_cpu, poisoned_outputs
from pallas_kernels.sparse_gemv import sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


def _rel(y, ref):
    y, ref = np.asarray(y, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(y).all(), "unwritten (NaN-poisoned) or non-finite output"
    return np.linalg.norm(y - ref) / np.linalg.norm(ref)


def _mlp(b, h, i, seed):
    k = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(k[0], (b, h), f32).astype(bf16)
    wg = (jax.random.normal(k[1], (h, i), f32) / np.sqrt(h)).astype(bf16)
    wu = (jax.random.normal(k[2], (h, i), f32) / np.sqrt(h)).astype(bf16)
    wd = (jax.random.normal(k[3], (i, h), f32) / np.sqrt(i)).astype(bf16)
    return x, wg, wu, wd


# (batch, hidden, intermediate, sparsity): power-of-two and ragged shapes, 0..95% sparsity
CASES = [(1, 64, 128, 0.5), (1, 72, 200, 0.95), (1, 200, 96, 0.0), (2, 96, 80, 0.3), (3, 200, 96, 0.8),
         (5, 40, 144, 0.6), (8, 64, 48, 0.0), (8, 136, 160, 0.9)]


@pytest.mark.parametrize("b,h,i,sparsity", CASES)
def test_cats_mlp_equals_reference(b, h, i, sparsity):
    x, wg, wu, wd = _mlp(b, h, i, seed=b * 1000 + h + i)
    g = jnp.dot(x.astype(f32), wg.astype(f32))
    t = _threshold(jax.nn.silu(g), sparsity)
    with poisoned_outputs():
        hidden = gate_up(x, wg.T, wu.T, t)
        y = cats_mlp(x, wg.T, wu.T, wd, t)
    a = cats_activation(g, t)
    want = a * jnp.dot(x.astype(f32), wu.astype(f32))
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)  # the same neurons kept
    assert _rel(hidden, want) < 1e-2
    assert y.shape == (b, h) and y.dtype == bf16
    assert _rel(y, gated_mlp(x, wg, wu, wd, t)) < 1e-2


@pytest.mark.parametrize("b,n_in,n_out,sparsity", [(1, 96, 72, 0.5), (3, 200, 64, 0.9), (8, 48, 136, 0.0)])
def test_sparse_gemv_with_fused_threshold(b, n_in, n_out, sparsity):
    x, w, _, _ = _mlp(b, n_in, n_out, seed=n_in + n_out)
    t = _threshold(x, sparsity)
    with poisoned_outputs():
        y = sparse_gemv(x, w, t)
    xs = jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)
    assert _rel(y, xs @ w.astype(f32)) < 1e-2


@pytest.mark.parametrize("b", [1, 4])
def test_rows_of_dropped_neurons_are_never_read(b):
    """NaN in the W_up / W_down rows of neurons no batch row keeps: any read would poison y."""
    x, wg, wu, wd = _mlp(b, 64, 96, seed=7)
    g = jnp.dot(x.astype(f32), wg.astype(f32))
    t = _threshold(jax.nn.silu(g), 0.7)
    dead = np.asarray(jnp.all(cats_activation(g, t) == 0, axis=0))
    assert 0 < dead.sum() < dead.size
    wu_t = jnp.where(dead[:, None], jnp.nan, wu.T).astype(bf16)
    wd_nan = jnp.where(dead[:, None], jnp.nan, wd).astype(bf16)
    y = cats_mlp(x, wg.T, wu_t, wd_nan, t)
    assert _rel(y, gated_mlp(x, wg, wu, wd, t)) < 1e-2


def _tiny_model(dtype=bf16, sparsity=0.5):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    m = M.init_random(cfg, seed=3, dtype=dtype)
    # per-layer thresholds for ~`sparsity` on unit-variance inputs (what RMSNorm feeds the MLP)
    x = jax.random.normal(jax.random.key(0), (256, cfg.hidden_size), f32).astype(dtype)
    m.set_cats_thresholds(
        [_threshold(jax.nn.silu(jnp.dot(x, l.mlp.gate_proj.kernel[...], preferred_element_type=f32)), sparsity)
         for l in m.layers]
    )
    return m


def test_prepared_layout_keeps_the_jnp_path():
    m = _tiny_model()
    toks = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
    for impl in ("dense", "cats-jnp"):
        m.set_mlp_impl(impl)
        before, _ = m(toks)
        m.prepare_for_kernel()
        after, _ = m(toks)
        np.testing.assert_allclose(after, before, rtol=1e-2, atol=1e-2)
        m = _tiny_model()


def test_kernel_decode_gives_the_same_greedy_tokens():
    prompts = [[5, 17, 3, 88, 41], [9, 2], [60, 61, 62, 63, 1, 7, 30]]  # ragged: padding rows too
    ref = _tiny_model()
    ref.set_mlp_impl("cats-jnp")
    want = generate(ref, prompts, 8, eos_ids=())
    m = _tiny_model()
    m.set_mlp_impl("cats-pallas")
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(m, prompts, 8, eos_ids=())
    assert got.tokens == want.tokens
    assert got.mlp_sparsity == pytest.approx(want.mlp_sparsity, abs=0.02)
    assert 0.3 < got.mlp_sparsity < 0.7

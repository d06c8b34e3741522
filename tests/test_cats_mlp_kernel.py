"""The Pallas CATS MLP kernels (interpret mode on the CPU) against the jnp reference, and their
use by the model's decode steps. Outputs are NaN-poisoned, so an unwritten element fails; the
weight rows the kernels must skip are NaN too, so a row read by mistake fails as well."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.kernels import random_mlp, threshold_for
from cats_jax import model as M
from cats_jax.config import ModelConfig
from cats_jax.generate import generate
from cats_jax.sparsity import cats_activation, gated_mlp
from conftest import poisoned as _poisoned
from conftest import rel_err as _rel
from pallas_kernels.cats_mlp import gate_up
from pallas_kernels.common import interpret_on_cpu, poisoned_outputs
from pallas_kernels.sparse_gemv import sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


# (batch, hidden, intermediate, sparsity): power-of-two and ragged shapes, 0..95% sparsity,
# batch 1 (multiply-add path) and 2..8 (dot path, padded batch rows)
CASES = [(1, 64, 128, 0.5), (1, 72, 200, 0.95), (2, 96, 80, 0.3), (3, 200, 96, 0.8), (5, 40, 144, 0.6),
         (8, 64, 48, 0.0)]


@pytest.mark.parametrize("b,h,i,sparsity", CASES)
def test_cats_mlp_equals_reference(b, h, i, sparsity):
    wg, wu, wd = random_mlp(h, i, seed=b * 1000 + h + i)
    x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(bf16)
    g = jnp.dot(x.astype(f32), wg.astype(f32))
    t = threshold_for(jax.nn.silu(g), sparsity)
    a = cats_activation(g, t)
    dead = np.asarray(jnp.all(a == 0, axis=0))[:, None]  # neurons no batch row keeps
    hidden, y = _poisoned(
        lambda x, wg_t, wu_t, wd, t: (lambda h: (h, sparse_gemv(h, wd)))(gate_up(x, wg_t, wu_t, t)),
        x, wg.T, jnp.where(dead, jnp.nan, wu.T).astype(bf16), jnp.where(dead, jnp.nan, wd).astype(bf16), t,
    )
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)  # the same neurons kept
    assert _rel(hidden, a * jnp.dot(x.astype(f32), wu.astype(f32))) < 1e-2
    assert y.shape == (b, h) and y.dtype == bf16
    assert _rel(y, gated_mlp(x, wg, wu, wd, t)) < 1e-2


@pytest.mark.parametrize("b,n_in,n_out,sparsity", [(1, 96, 72, 0.5), (3, 200, 64, 0.9)])
def test_sparse_gemv_with_fused_threshold(b, n_in, n_out, sparsity):
    w, _, _ = random_mlp(n_in, n_out, seed=n_in + n_out)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(bf16)
    t = threshold_for(x, sparsity)
    dropped = np.asarray(jnp.all(jnp.abs(x) <= t, axis=0))[:, None]
    y = _poisoned(lambda x, w, t: sparse_gemv(x, w, t), x, jnp.where(dropped, jnp.nan, w).astype(bf16), t)
    xs = jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)
    assert _rel(y, xs @ w.astype(f32)) < 1e-2


def _tiny_model(sparsity=0.5):
    cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=16)
    m = M.init_random(cfg, seed=3)  # bf16, the dtype the kernels are for
    # per-layer thresholds for ~`sparsity` on unit-variance inputs (what RMSNorm feeds the MLP)
    x = jax.random.normal(jax.random.key(0), (256, cfg.hidden_size), f32).astype(bf16)
    m.set_cats_thresholds([
        threshold_for(jax.nn.silu(jnp.dot(x, l.mlp.gate_proj.kernel[...], preferred_element_type=f32)), sparsity)
        for l in m.layers
    ])
    return m


def test_neuron_major_layout_keeps_the_jnp_paths():
    m = _tiny_model()
    toks = jax.random.randint(jax.random.key(1), (2, 7), 0, 97)
    before = {}
    for impl in ("dense", "cats-jnp"):
        m.set_mlp_impl(impl)
        before[impl] = m(toks)[0]
    m.prepare_for_kernel()
    assert m.layers[0].mlp.gate_proj.kernel.shape == (96, 64)
    for impl in ("dense", "cats-jnp"):
        m.set_mlp_impl(impl)
        np.testing.assert_allclose(m(toks)[0], before[impl], rtol=2e-2, atol=2e-2)


def test_kernel_decode_gives_the_same_greedy_tokens():
    prompts = [[5, 17, 3, 88, 41], [9, 2], [60, 61, 62, 63, 1, 7, 30]]  # ragged: padding rows too
    ref = _tiny_model()
    ref.set_mlp_impl("cats-jnp")
    ref.prepare_for_kernel()  # the same layout as the kernel model: prefill is computed identically
    want = generate(ref, prompts, 8, eos_ids=())
    m = _tiny_model()
    m.set_mlp_impl("cats-pallas")
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(m, prompts, 8, eos_ids=())
    assert got.tokens == want.tokens
    assert got.mlp_sparsity == pytest.approx(want.mlp_sparsity, abs=0.02)
    assert 0.3 < got.mlp_sparsity < 0.7

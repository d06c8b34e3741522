"""The Pallas CATS MLP kernels (interpret mode on the CPU) against the jnp reference, and their
use by the model's decode steps. Outputs are NaN-poisoned, so an unwritten element fails; the
weight rows the kernels must skip are NaN too, so a row read by mistake fails as well."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.kernels import random_mlp, threshold_for
from cats_jax.sparsity import cats_activation, gated_mlp, weight_factors
from conftest import poisoned as _poisoned
from conftest import rel_err as _rel
from pallas_kernels.cats_mlp import gate_up
from pallas_kernels.sparse_gemv import sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


# (batch, hidden, intermediate, sparsity): power-of-two and ragged shapes, 0..95% sparsity,
# batch 1 (multiply-add path) and 2..16 (dot path, padded batch rows)
CASES = [(1, 64, 128, 0.5), (1, 72, 200, 0.95), (2, 96, 80, 0.3), (3, 200, 96, 0.8), (5, 40, 144, 0.6),
         (8, 64, 48, 0.0), (16, 48, 112, 0.7)]


@pytest.mark.parametrize("b,h,i,sparsity", CASES)
def test_cats_mlp_equals_reference(b, h, i, sparsity):
    wg, wu, wd = random_mlp(h, i, seed=b * 1000 + h + i)
    x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(bf16)
    g = jnp.dot(x.astype(f32), wg.astype(f32))
    t = threshold_for(jax.nn.silu(g), sparsity)
    a = cats_activation(g, t)
    dead = np.asarray(jnp.all(a == 0, axis=0))[:, None]  # neurons no batch row keeps
    hidden, y = _poisoned(
        lambda x, w_gu, wd, t: (lambda h: (h, sparse_gemv(h, wd)))(gate_up(x, w_gu, t)),
        x, jnp.concatenate([wg.T, jnp.where(dead, jnp.nan, wu.T).astype(bf16)]),
        jnp.where(dead, jnp.nan, wd).astype(bf16), t,
    )
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)  # the same neurons kept
    assert _rel(hidden, a * jnp.dot(x.astype(f32), wu.astype(f32))) < 1e-2
    assert y.shape == (b, h) and y.dtype == bf16
    assert _rel(y, gated_mlp(x, wg, wu, wd, t)) < 1e-2


@pytest.mark.parametrize("b,h,i,sparsity", [(1, 72, 200, 0.6), (3, 96, 80, 0.5)])
def test_cats_mlp_weighted_criterion_equals_reference(b, h, i, sparsity):
    """Neuron i is kept where |a_i| * ||W_down[i, :]|| > t: the kernel's choice is the jnp rule's."""
    wg, wu, wd = random_mlp(h, i, seed=b + h + i)
    wd = wd * jax.random.uniform(jax.random.key(i), (i, 1), f32, 0.1, 3.0)  # rows of different norms
    f = weight_factors(wd)
    x = jax.random.normal(jax.random.key(b), (b, h), f32).astype(bf16)
    g = jnp.dot(x.astype(f32), wg.astype(f32))
    t = threshold_for(jnp.abs(jax.nn.silu(g)) * f, sparsity)
    a = cats_activation(g, t, f)
    assert not np.array_equal(np.asarray(a) == 0, np.asarray(cats_activation(g, t)) == 0)
    dead = np.asarray(jnp.all(a == 0, axis=0))[:, None]
    hidden, y = _poisoned(
        lambda x, w_gu, wd, t, f: (lambda h: (h, sparse_gemv(h, wd)))(gate_up(x, w_gu, t, f)),
        x, jnp.concatenate([wg.T, jnp.where(dead, jnp.nan, wu.T).astype(bf16)]), jnp.where(dead, jnp.nan, wd).astype(bf16),
        t, f,
    )
    np.testing.assert_array_equal(np.asarray(hidden) == 0, np.asarray(a) == 0)  # the same neurons kept
    u = jnp.dot(x.astype(f32), wu.astype(f32))
    assert _rel(y, (a * u) @ wd.astype(f32)) < 1e-2
    # all factors 1: the magnitude criterion, bit for bit
    w_gu = jnp.concatenate([wg.T, wu.T]).astype(bf16)
    np.testing.assert_array_equal(_poisoned(lambda x, w, t: gate_up(x, w, t, jnp.ones(i, f32)), x, w_gu, t),
                                  _poisoned(lambda x, w, t: gate_up(x, w, t), x, w_gu, t))


@pytest.mark.parametrize("b,n_in,n_out,sparsity", [(1, 96, 72, 0.5), (3, 200, 64, 0.9)])
def test_sparse_gemv_with_fused_threshold(b, n_in, n_out, sparsity):
    w, _, _ = random_mlp(n_in, n_out, seed=n_in + n_out)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(bf16)
    t = threshold_for(x, sparsity)
    dropped = np.asarray(jnp.all(jnp.abs(x) <= t, axis=0))[:, None]
    y = _poisoned(lambda x, w, t: sparse_gemv(x, w, t), x, jnp.where(dropped, jnp.nan, w).astype(bf16), t)
    xs = jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)
    assert _rel(y, xs @ w.astype(f32)) < 1e-2

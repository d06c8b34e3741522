"""TEAL's sparse GEMV kernels (interpret mode on the CPU) against the jnp rule, fused q/k/v, and
the model's TEAL decode steps through the kernels. Outputs are NaN-poisoned and the weight rows a
kernel must skip are NaN, so an unwritten output or a row read by mistake fails."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.kernels import random_mlp, threshold_for
from conftest import rel_err as _rel
from pallas_kernels import sparse_gemv as G
from pallas_kernels.common import poisoned_outputs
from pallas_kernels.sparse_gemv import TABLE, sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


def _thresholded(x, t):
    return jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)


# (batch, in, segments, sparsities): ragged inputs, q|k|v-like segments with their own thresholds,
# batch 1 (atomic multiply-add) and 2..8 (dot, padded batch rows, partials), 0..95% sparsity
SEGMENT_CASES = [
    (1, 200, (64, 32, 32), (0.0, 0.5, 0.95)),
    (2, 96, (32, 16, 16), (0.3, 0.6, 0.9)),
    (5, 72, (48, 16), (0.8, 0.2)),
    (8, 130, (32, 32, 32), (0.95, 0.95, 0.5)),
]


@pytest.mark.parametrize("b,n_in,segments,sparsities", SEGMENT_CASES)
def test_sparse_gemv_segments_have_their_own_thresholds(b, n_in, segments, sparsities):
    n_out = sum(segments)
    w, _, _ = random_mlp(n_in, n_out, seed=b + n_in)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(bf16)
    t = jnp.stack([threshold_for(x, s) for s in sparsities])
    # rows no segment keeps are never needed: NaN them
    dropped = np.asarray(jnp.all(jnp.abs(x) <= t.min(), axis=0))[:, None]
    y = jax.jit(lambda x, w, t: sparse_gemv(x, w, t, segments=segments))
    with poisoned_outputs():
        got = y(x, jnp.where(dropped, jnp.nan, w).astype(bf16), t)
    assert got.shape == (b, n_out) and got.dtype == bf16
    cuts = np.cumsum(segments)[:-1]
    want = jnp.concatenate([_thresholded(x, ti) @ wi.astype(f32)
                            for ti, wi in zip(t, jnp.split(w, cuts, axis=1))], axis=1)
    assert _rel(got, want) < 1e-2


def test_batch_one_splits_add_atomically():
    n_in, n_out = 300, 80  # several splits per column block, tails on both axes
    w, _, _ = random_mlp(n_in, n_out, seed=7)
    x = jax.random.normal(jax.random.key(7), (1, n_in), f32).astype(bf16)
    t = threshold_for(x, 0.5)
    blocks = dataclasses.replace(TABLE[1], rows=32, cols=32, splits=4)
    with poisoned_outputs():
        got = jax.jit(lambda x, w, t: sparse_gemv(x, w, t, blocks=blocks))(x, w.astype(bf16), t)
    assert _rel(got, _thresholded(x, t) @ w.astype(f32)) < 1e-2


# the gather path (batch 1): lists the kept rows per chunk first, then reads only those rows
@pytest.mark.parametrize("n_in,segments,sparsities", [
    (300, (64, 32, 32), (0.0, 0.5, 0.95)),  # a ragged last chunk, q|k|v-like segments
    (200, (48, 40), (0.9, 0.3)),  # output columns not a whole number of column blocks
])
def test_gather_path_matches_the_rule(n_in, segments, sparsities):
    n_out = sum(segments)
    w, _, _ = random_mlp(n_in, n_out, seed=n_in)
    x = jax.random.normal(jax.random.key(n_in), (1, n_in), f32).astype(bf16)
    t = jnp.stack([threshold_for(x, s) for s in sparsities])
    dropped = np.asarray(jnp.all(jnp.abs(x) <= t.min(), axis=0))[:, None]
    blocks = G.GatherBlocks(rows=16, cols=16, chunk=128)
    with poisoned_outputs():
        got = jax.jit(lambda x, w, t: sparse_gemv(x, w, t, segments=segments, blocks=blocks))(
            x, jnp.where(dropped, jnp.nan, w).astype(bf16), t)
    cuts = np.cumsum(segments)[:-1]
    want = jnp.concatenate([_thresholded(x, ti) @ wi.astype(f32)
                            for ti, wi in zip(t, jnp.split(w, cuts, axis=1))], axis=1)
    assert got.shape == (1, n_out) and _rel(got, want) < 1e-2


def test_gather_path_skips_zero_inputs_without_a_threshold():
    # the CATS down projection: h is already sparse (exact zeros), no threshold
    n_in, n_out = 260, 48
    w, _, _ = random_mlp(n_in, n_out, seed=5)
    h = jax.random.normal(jax.random.key(5), (1, n_in), f32)
    h = jnp.where(jnp.abs(h) > threshold_for(h, 0.7), h, 0.0).astype(bf16)
    blocks = G.GatherBlocks(rows=16, cols=32, chunk=64)
    with poisoned_outputs():
        got = sparse_gemv(h, jnp.where(h.T == 0, jnp.nan, w).astype(bf16), blocks=blocks)
    assert _rel(got, h.astype(f32) @ w.astype(f32)) < 1e-2
    with pytest.raises(ValueError, match="gather path .* batch 1, not 2"):
        sparse_gemv(jnp.ones((2, n_in), bf16), w, blocks=blocks)


def test_sparse_gemv_rejects_bad_segments():
    x, w = jnp.ones((1, 8), bf16), jnp.ones((8, 48), bf16)
    with pytest.raises(ValueError, match="do not add up"):
        sparse_gemv(x, w, jnp.zeros(2), segments=(32, 8))
    with pytest.raises(ValueError, match="2 thresholds for 3"):
        sparse_gemv(x, w, jnp.zeros(2), segments=(16, 16, 16))

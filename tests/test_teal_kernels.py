"""TEAL's sparse GEMV kernels (interpret mode on the CPU) against the jnp rule, fused q/k/v, and
the model's TEAL decode steps through the kernels. Outputs are NaN-poisoned and the weight rows a
kernel must skip are NaN, so an unwritten output or a row read by mistake fails."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.kernels import random_mlp, threshold_for
from cats_jax import sparsity
from conftest import rel_err as _rel
from pallas_kernels import cats_mlp
from pallas_kernels import sparse_gemv as G
from pallas_kernels.common import interpret_on_cpu, poisoned_outputs
from pallas_kernels.sparse_gemv import TABLE, sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


def _thresholded(x, t):
    return jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)


# (batch, in, segments, sparsities): ragged inputs, q|k|v-like segments with their own thresholds,
# batch 1 (multiply-add) and 2..16 (dot, padded batch rows), both atomic adds, 0..95% sparsity
SEGMENT_CASES = [
    (1, 200, (64, 32, 32), (0.0, 0.5, 0.95)),
    (2, 96, (32, 16, 16), (0.3, 0.6, 0.9)),
    (5, 72, (48, 16), (0.8, 0.2)),
    (8, 130, (32, 32, 32), (0.95, 0.95, 0.5)),
    (16, 80, (32, 16), (0.5, 0.95)),
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


# the weighted criterion: each segment keeps input j where |x_j| * factor[segment, j] > its threshold
@pytest.mark.parametrize("b,n_in,segments,blocks", [
    (1, 200, (64, 32, 32), None),  # batch 1, masked tiles with atomic adds
    (3, 130, (32, 32, 32), None),  # dots, 3 rows folded onto 4
    (1, 300, (64, 32, 32), G.GatherBlocks(rows=16, cols=16, chunk=128)),  # the gather path
])
def test_sparse_gemv_weighted_criterion_matches_the_rule(b, n_in, segments, blocks):
    n_out, n_seg = sum(segments), len(segments)
    w, _, _ = random_mlp(n_in, n_out, seed=b + n_in)
    x = jax.random.normal(jax.random.key(b), (b, n_in), f32).astype(bf16)
    f = jax.random.uniform(jax.random.key(n_in), (n_seg, n_in), f32, 0.1, 3.0)
    t = jnp.stack([threshold_for(jnp.abs(x.astype(f32)) * f[i], 0.6) for i in range(n_seg)])
    kept = [np.asarray(sparsity.keep(x, t[i], f[i])) for i in range(n_seg)]
    assert not np.array_equal(kept[0], np.asarray(sparsity.keep(x, t[0])))  # the factors change the choice
    dropped = ~np.any(np.stack(kept), axis=(0, 1))[:, None]  # rows no segment keeps: NaN
    with poisoned_outputs():
        got = jax.jit(lambda x, w, t, f: sparse_gemv(x, w, t, segments=segments, factors=f, blocks=blocks))(
            x, jnp.where(dropped, jnp.nan, w).astype(bf16), t, f)
    cuts = np.cumsum(segments)[:-1]
    want = jnp.concatenate([sparsity.teal_input(x, ti, fi).astype(f32) @ wi.astype(f32)
                            for ti, fi, wi in zip(t, f, jnp.split(w, cuts, axis=1))], axis=1)
    assert got.shape == (b, n_out) and _rel(got, want) < 1e-2


@pytest.mark.parametrize("b", [1, 3])
def test_sparse_gemv_unit_factors_give_the_magnitude_result(b):
    w, _, _ = random_mlp(96, 64, seed=b)
    x = jax.random.normal(jax.random.key(b), (b, 96), f32).astype(bf16)
    t = jnp.stack([threshold_for(x, 0.5), threshold_for(x, 0.8)])
    y = jax.jit(lambda x, w, t, f: sparse_gemv(x, w, t, segments=(32, 32), factors=f))
    np.testing.assert_array_equal(y(x, w.astype(bf16), t, jnp.ones((2, 96), f32)),
                                  jax.jit(lambda x, w, t: sparse_gemv(x, w, t, segments=(32, 32)))(x, w.astype(bf16), t))
    with pytest.raises(ValueError, match="factors .* need a threshold"):
        sparse_gemv(x, w, segments=(32, 32), factors=jnp.ones((2, 96)))


def test_sparse_gemv_rejects_bad_segments():
    x, w = jnp.ones((1, 8), bf16), jnp.ones((8, 48), bf16)
    with pytest.raises(ValueError, match="do not add up"):
        sparse_gemv(x, w, jnp.zeros(2), segments=(32, 8))
    with pytest.raises(ValueError, match="2 thresholds for 3"):
        sparse_gemv(x, w, jnp.zeros(2), segments=(16, 16, 16))


@pytest.mark.parametrize("make", [lambda: G.GemvBlocks(rows=24, cols=64, splits=56),
                                  lambda: G.GatherBlocks(rows=32, cols=128, chunk=300),
                                  lambda: cats_mlp.GateUpBlocks(rows=8, cols=1024, num_warps=3),
                                  lambda: G.GemvBlocks(rows=64.0, cols=64, splits=8)])
def test_blocks_triton_cannot_take_are_refused_by_name(make):
    with pytest.raises(ValueError, match=r"(rows|chunk|num_warps)=.* must be a positive power of two"):
        make()


GATHER, TILES = G.GatherBlocks(rows=16, cols=16, chunk=128), G.GemvBlocks(rows=32, cols=32, splits=4)


@pytest.mark.parametrize("blocks,batch,sparsity", [(GATHER, 1, 0.6), (TILES, 1, 0.6), (GATHER, 1, 0.0),
                                                   (GATHER, 1, 0.95), (TILES, 3, 0.6), (TILES, 8, 0.95),
                                                   (TILES, 2, 0.0), (TILES, 2, 0.99)])  # 0.99: whole tiles skipped
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_gated_input_is_silu_gate_times_up(blocks, batch, sparsity, scaled, dtype):
    """The down projection of a gate|up GEMV's unfinished sums (padded with NaN, int8-scaled or not)
    equals sparse_gemv of gated_input, the same silu(gate) * up in jnp, and the rows it drops are
    never read. The gather's compaction computes the input, the masked tiles each tile's rows of it
    (at batch > 1 each row its own values, rows read where any row keeps them)."""
    n_in, n_out = 200, 48
    w, _, _ = random_mlp(n_in, n_out, seed=5)
    ks = jax.random.split(jax.random.key(6 + batch), 2)
    sums = jax.random.normal(ks[0], (batch, 2 * n_in), f32) * 2
    x_scale = jax.random.uniform(ks[1], (2 * n_in,), f32, 0.5, 1.5) if scaled else None
    padded = jnp.concatenate([sums, jnp.full((batch, 24), jnp.nan, f32)], axis=1)
    h = G.gated_input(padded, x_scale, n_in, dtype)
    gu = (sums * (1 if x_scale is None else x_scale)).astype(dtype).astype(f32)
    want_h = jax.nn.silu(gu[:, :n_in]) * gu[:, n_in:]
    assert h.dtype == dtype and _rel(h, want_h) < (1e-6 if dtype == f32 else 1e-2)
    t = threshold_for(h, sparsity)
    w = w.astype(dtype)
    dropped = np.asarray(jnp.all(jnp.abs(h.astype(f32)) <= t, axis=0))[:, None]
    w_nan = jnp.where(dropped, jnp.nan, w).astype(dtype)
    with poisoned_outputs():
        got = jax.jit(lambda s, w, t: sparse_gemv(s, w, t, blocks=blocks, out_dtype=dtype, gated=True, x_scale=x_scale))(
            padded, w_nan, t)
        want = jax.jit(lambda h, w, t: sparse_gemv(h, w, t, blocks=blocks, out_dtype=dtype))(h, w_nan, t)
    np.testing.assert_allclose(np.asarray(got, f32), np.asarray(want, f32), rtol=1e-6, atol=1e-6)
    assert _rel(got, _thresholded(h, t) @ w.astype(f32)) < (1e-5 if dtype == f32 else 1e-2)


def test_gated_input_rejects_bad_shapes():
    w = jnp.zeros((8, 4), f32)
    with pytest.raises(ValueError, match="gated input"):
        sparse_gemv(jnp.zeros((1, 15), f32), w, 0.1, gated=True, out_dtype=f32)  # needs >= 16 columns
    with pytest.raises(ValueError, match="gated input"):
        sparse_gemv(jnp.zeros((1, 16), bf16), w, 0.1, gated=True, out_dtype=f32)  # sums are fp32
    with pytest.raises(ValueError, match="out_dtype"):
        sparse_gemv(jnp.zeros((1, 16), f32), w, 0.1, gated=True)


def test_a_variant_entry_comes_before_the_shape_entry(monkeypatch):
    """TUNED's (batch, in, out, variant) entry is what int8 weights ("int8") and CATS's down projection
    ("cats") take before the shape's plain entry (TEAL's float GEMVs); with none, the plain one.
    sparse_gemv, sum_shape and compaction_for look up the same blocks."""
    kind = jax.devices()[0].device_kind
    plain, cats = G.GatherBlocks(rows=16, cols=32, chunk=32), G.GemvBlocks(rows=16, cols=32, splits=4)
    monkeypatch.setattr(G, "TUNED", {kind: {(1, 64, 96): plain, (1, 64, 96, "cats"): cats}})
    assert [G.gemv_variant(dt, down) for dt in (bf16, jnp.int8) for down in (False, True)] == [None, "cats", "int8", "int8"]
    assert G.blocks_for(1, 64, 96) == plain and G.blocks_for(1, 64, 96, variant="int8") == plain
    assert G.blocks_for(1, 64, 96, variant="cats") == cats
    assert G.sum_shape(1, 64, (96,)) is None and G.sum_shape(1, 64, (96,), variant="cats") == (1, 96)
    assert G.compaction_for(1, 64, (96,), [0.5]) is not None and G.compaction_for(1, 64, (96,), [0.5], variant="cats") is None
    x, w = jnp.ones((1, 64), bf16), jnp.ones((64, 96), bf16)
    with interpret_on_cpu():  # the kernels each call launches: a CATS down (no threshold) on the tiles, TEAL's on the gather
        launched = [re.findall(r"name=(\w+)", str(jax.make_jaxpr(f)(x, w))) for f in
                    (lambda x, w: sparse_gemv(x, w), lambda x, w: sparse_gemv(x, w, 0.5))]
    assert [[n for n in names if "gemv" in n] for names in launched] == [["sparse_gemv"], ["gather_gemv"]]


def test_a_dense_float_gemv_takes_the_kernel_only_where_listed(monkeypatch):
    """A float GEMV that reads every row runs the kernel only where TUNED lists its "dense" blocks
    (dense_pays), on those blocks; dense int8 takes its own "int8 dense" entry, else DENSE, never TEAL's
    int8 or float blocks."""
    kind = jax.devices()[0].device_kind
    listed, int8 = G.GemvBlocks(rows=16, cols=32, splits=4), G.GemvBlocks(rows=32, cols=16, splits=2)
    monkeypatch.setattr(G, "TUNED", {kind: {(1, 64, 96, "dense"): listed, (1, 64, 96): G.GatherBlocks(),
                                            (1, 64, 96, "int8"): G.GatherBlocks(), (1, 64, 128, "int8 dense"): int8}})
    assert G.gemv_variant(jnp.int8, dense=True) == "int8 dense" and G.gemv_variant(bf16, dense=True) == "dense"
    assert G.blocks_for(1, 64, 128, dense=True, variant="int8 dense") == int8
    assert G.blocks_for(1, 64, 96, dense=True, variant="int8 dense") == G.blocks_for(1, 64, 96, dense=True)  # DENSE
    with interpret_on_cpu():
        assert G.dense_pays(1, 64, 96) and not G.dense_pays(1, 64, 64) and not G.dense_pays(2, 64, 96)
    assert not G.dense_pays(1, 64, 96)  # kernels off (the CPU outside interpret mode)
    assert G.blocks_for(1, 64, 96, dense=True, variant="dense") == listed
    assert G.blocks_for(1, 64, 96, dense=True, variant="int8") == G.blocks_for(1, 64, 96, dense=True)
    assert G.sum_shape(1, 64, (96,), dense=True, variant="dense") == (1, 96)
    x, w = jax.random.normal(jax.random.key(0), (1, 64), f32), jax.random.normal(jax.random.key(1), (64, 96), f32)
    with interpret_on_cpu():
        jaxpr = jax.make_jaxpr(lambda x, w: sparse_gemv(x, w, skip_zeros=False))(x, w).jaxpr
        got = jax.jit(lambda x, w: sparse_gemv(x, w, skip_zeros=False))(x, w)
    (call,) = [e for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert call.params["grid_mapping"].grid == (96 // 32, 4)  # the listed blocks: 32 columns, 4 splits
    assert _rel(got, x @ w) < 1e-5


def test_a_tuned_shape_takes_the_kernel_below_the_size_rule(monkeypatch):
    """kernel_pays: large matrices, or a shape whose tuned blocks this device lists (they beat XLA)."""
    kind = jax.devices()[0].device_kind
    monkeypatch.setattr(G, "TUNED", {kind: {(1, 64, 96): G.GemvBlocks(rows=16, cols=32, splits=4)}})
    with interpret_on_cpu():
        assert G.kernel_pays(1, 64, 96) and not G.kernel_pays(1, 64, 64)
        assert G.kernel_pays(1, 8192, 4096)  # above MIN_KERNEL_WEIGHTS
        assert G.kernel_pays(16, 8192, 4096) and not G.kernel_pays(17, 8192, 4096)  # MAX_KERNEL_BATCH
    assert not G.kernel_pays(1, 64, 96)  # kernels off (the CPU outside interpret mode)

"""TEAL's sparse GEMV kernels (interpret mode on the CPU) against the jnp rule, fused q/k/v, and
the model's TEAL decode steps through the kernels. Outputs are NaN-poisoned and the weight rows a
kernel must skip are NaN, so an unwritten output or a row read by mistake fails."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bench.decode import random_thresholds
from bench.kernels import random_mlp, threshold_for
from cats_jax import model as M
from cats_jax.config import ModelConfig
from cats_jax.generate import generate
from cats_jax.sparsity import MODES
from conftest import rel_err as _rel
from pallas_kernels import sparse_gemv as G
from pallas_kernels.common import interpret_on_cpu, poisoned_outputs
from pallas_kernels.sparse_gemv import TABLE, sparse_gemv

f32, bf16 = jnp.float32, jnp.bfloat16


def _thresholded(x, t):
    return jnp.where(jnp.abs(x.astype(f32)) > t, x.astype(f32), 0.0)


# (batch, in, segments, sparsities): ragged inputs, q|k|v-like segments with their own thresholds,
# batch 1 (atomic multiply-add) and 2..8 (dot, padded batch rows), 0..95% sparsity
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


@pytest.mark.parametrize("atomic", [True, False])
def test_batch_one_partials_and_atomic_adds_agree(atomic):
    n_in, n_out = 300, 80  # several splits per column block, tails on both axes
    w, _, _ = random_mlp(n_in, n_out, seed=7)
    x = jax.random.normal(jax.random.key(7), (1, n_in), f32).astype(bf16)
    t = threshold_for(x, 0.5)
    blocks = dataclasses.replace(TABLE[1], rows=32, cols=32, splits=4, atomic=atomic)
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


CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16)


def _teal_model(mode="teal", sparsity=0.5):
    m = M.init_random(CFG, seed=3)
    for site, t in random_thresholds(m, [sparsity], tokens=64, seed=0)[sparsity].items():
        m.set_thresholds(site, t)
    m.set_mode(mode)
    return m


@pytest.mark.parametrize("mode", ["dense", "teal"])
def test_fused_qkv_gives_the_same_logits(mode):
    m = _teal_model(mode)
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
    before = m(toks)[0]
    m.prepare_for_decode()
    assert m.layers[0].attn.q_proj is None and m.layers[0].attn.qkv.shape == (64, (4 + 2 + 2) * 16)
    np.testing.assert_array_equal(m(toks)[0], before)


@pytest.fixture
def kernels_on_tiny_weights(monkeypatch):
    monkeypatch.setattr(G, "MIN_KERNEL_WEIGHTS", 0)  # a performance rule; these tests check correctness


@pytest.mark.parametrize("path", ["masked", "gather"])
def test_teal_kernel_decode_gives_the_same_greedy_tokens(kernels_on_tiny_weights, monkeypatch, path):
    if path == "gather":  # batch 1 on the gather path: two kernels (compact, gather) per GEMV
        monkeypatch.setitem(G.TABLE, 1, G.GatherBlocks(rows=16, cols=16, chunk=32))
        monkeypatch.setattr(G, "TUNED", {})
    prompt = [[5, 17, 3, 88, 41, 9, 2]]  # batch 1: the rows the TEAL kernels serve
    ref = _teal_model()
    ref.prepare_for_decode()
    want = generate(ref, prompt, 10, eos_ids=())
    m = _teal_model()
    m.set_mode("teal", "pallas")
    assert m.layers[0].mlp.gate_up is not None
    with interpret_on_cpu():  # a decode step runs 4 GEMVs per layer: q|k|v, o, gate|up, down
        jaxpr = str(jax.make_jaxpr(lambda t: m(t)[0])(jnp.array(prompt)[:, :1]))
    assert jaxpr.count("pallas_call") == 4 * CFG.num_layers * (2 if path == "gather" else 1)
    with interpret_on_cpu(), poisoned_outputs():
        got = generate(m, prompt, 10, eos_ids=())
    assert got.tokens == want.tokens


def test_teal_kernels_keep_the_jnp_path_for_prefill_and_big_batches(kernels_on_tiny_weights):
    # prompts of several tokens and batches above MAX_KERNEL_BATCH never reach the kernels: the
    # logits equal the jnp model's exactly
    toks = jax.random.randint(jax.random.key(2), (3, 6), 0, CFG.vocab_size)
    ref, m = _teal_model(), _teal_model()
    ref.prepare_for_decode()
    m.set_mode("teal", "pallas")
    with interpret_on_cpu():
        np.testing.assert_array_equal(m(toks)[0], ref(toks)[0])
        np.testing.assert_array_equal(m(toks[:, :1])[0], ref(toks[:, :1])[0])
    assert set(MODES["teal"]) == set(m.sites)


def test_gate_up_fusion_follows_the_mode():
    m = _teal_model()
    toks = jax.random.randint(jax.random.key(3), (2, 5), 0, CFG.vocab_size)
    want = {mode: (m.set_mode(mode), m(toks)[0])[1] for mode in ("teal", "cats")}
    m.set_mode("teal", "pallas")  # fuses gate|up
    np.testing.assert_array_equal(m(toks)[0], want["teal"])
    m.set_mode("cats", "pallas")  # the CATS kernel wants them apart and neuron-major
    assert m.layers[0].mlp.gate_up is None and m.layers[0].mlp.neuron_major
    np.testing.assert_allclose(m(toks)[0], want["cats"], rtol=2e-2, atol=2e-2)

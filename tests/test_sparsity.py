"""The sparsity rules (cats_jax.sparsity): the CATS activation, the reference gated MLP, sites,
modes and their weights. TEAL's input rule is tested with TEAL (test_teal.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cats_jax import sparsity
from cats_jax.sparsity import ATTN_SITES, CATS_SITE, MLP_SITES, MODES, TEAL_SITES, cats_activation, gated_mlp

f32, bf16 = jnp.float32, jnp.bfloat16


def gates(n=512, seed=0):
    return jax.random.normal(jax.random.key(seed), (n,), f32) * 3


# ---- the CATS activation ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_cats_threshold_zero_is_exactly_silu(dtype):
    g = jnp.concatenate([gates().astype(dtype), jnp.zeros(3, dtype), jnp.asarray([-0.0, -100.0], dtype)])
    a = cats_activation(g, jnp.float32(0))
    silu = jax.nn.silu(g.astype(f32))
    np.testing.assert_array_equal(a, silu)  # bitwise: threshold 0 only zeroes what SiLU made zero
    assert np.any(np.asarray(silu) == 0)  # the case that shows it: SiLU(0) and an underflowed SiLU(-100)


def test_cats_zeroes_at_the_threshold_and_keeps_above_it():
    g = gates()
    silu = np.asarray(jax.nn.silu(g))
    order = np.argsort(np.abs(silu))
    k, above = order[len(silu) // 2], order[len(silu) // 2 + 1]
    t = np.float32(np.abs(silu[k]))  # a threshold equal to one |a|: the test is strict (>)
    assert np.abs(silu[above]) > t
    a = np.asarray(cats_activation(g, t))
    assert a[k] == 0 and a[above] == silu[above]
    np.testing.assert_array_equal(a, np.where(np.abs(silu) > t, silu, 0))


def test_cats_test_reads_the_fp32_silu_not_the_storage_dtype():
    g = jnp.asarray([1.0], bf16)
    exact = float(jax.nn.silu(jnp.float32(1.0)))  # 0.7310586
    t = np.float32(0.7305)
    assert float(jnp.asarray(exact, bf16)) <= t < exact  # bf16's rounding of SiLU(1) would be zeroed
    a = cats_activation(g, t)
    assert a.dtype == f32
    np.testing.assert_array_equal(a, [exact])


def test_cats_compares_magnitudes():
    g = jnp.asarray([-1.0, -0.1, 0.1, 1.0], f32)
    a = np.asarray(cats_activation(g, jnp.float32(0.1)))
    silu = np.asarray(jax.nn.silu(g))  # [-0.269, -0.0475, 0.0525, 0.731]
    np.testing.assert_array_equal(a, [silu[0], 0, 0, silu[3]])


# ---- the selection criterion ---------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [f32, bf16])
def test_weighted_criterion_with_unit_factors_is_magnitude(dtype):
    g = jnp.concatenate([gates().astype(dtype), jnp.zeros(2, dtype)])
    ones = jnp.ones(g.shape, f32)
    for t in (0.0, 0.1, 0.5):
        np.testing.assert_array_equal(cats_activation(g, t, ones), cats_activation(g, t))
        np.testing.assert_array_equal(sparsity.teal_input(g, t, ones), sparsity.teal_input(g, t))
        assert sparsity.teal_input(g, t, ones).dtype == dtype


def test_weighted_criterion_keeps_where_value_times_factor_exceeds_the_threshold():
    x = jnp.asarray([0.5, -0.5, 2.0, -2.0, 0.0], bf16)
    c = jnp.asarray([3.0, 1.0, 0.1, 0.25, 9.0], f32)  # scores 1.5, 0.5, 0.2, 0.5, 0
    np.testing.assert_array_equal(sparsity.teal_input(x, 0.5, c), np.asarray([0.5, 0, 0, 0, 0], bf16))
    np.testing.assert_array_equal(sparsity.teal_input(x, 0.5), np.asarray([0, 0, 2.0, -2.0, 0], bf16))  # magnitude
    g = jnp.asarray([4.0, 4.0, -1.0], f32)
    a = np.asarray(jax.nn.silu(g))
    np.testing.assert_array_equal(cats_activation(g, 1.0, jnp.asarray([0.2, 1.0, 9.0])), [0, a[1], a[2]])


def test_weight_factors_are_the_l2_norms_of_the_input_rows():
    w = jnp.asarray([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]], bf16)  # Flax layout [in, out]
    f = sparsity.weight_factors(w)
    assert f.dtype == f32
    np.testing.assert_array_equal(f, [5.0, 0.0, 1.0])


# ---- the reference gated MLP ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def mlp():
    kx, kg, ku, kd = jax.random.split(jax.random.key(1), 4)
    h, i = 16, 48
    x = jax.random.normal(kx, (3, h), f32).astype(bf16)
    w = [(jax.random.normal(k, s, f32) / np.sqrt(s[0])).astype(bf16) for k, s in ((kg, (h, i)), (ku, (h, i)),
                                                                                     (kd, (i, h)))]
    return x, *w


def test_gated_mlp_dense_and_threshold_zero_agree_exactly(mlp):
    x, wg, wu, wd = mlp
    with jax.default_matmul_precision("highest"):
        dense = gated_mlp(x, wg, wu, wd)
        xf = x.astype(f32)
        want = (jax.nn.silu(xf @ wg.astype(f32)) * (xf @ wu.astype(f32))) @ wd.astype(f32)
        np.testing.assert_allclose(dense, want, rtol=1e-6, atol=1e-6)
        assert dense.dtype == f32
        np.testing.assert_array_equal(gated_mlp(x, wg, wu, wd, jnp.float32(0)), dense)


def test_gated_mlp_with_a_threshold_drops_those_neurons(mlp):
    x, wg, wu, wd = mlp
    with jax.default_matmul_precision("highest"):
        xf = x.astype(f32)
        a = jax.nn.silu(xf @ wg.astype(f32))
        t = jnp.quantile(jnp.abs(a), 0.5)
        kept = jnp.abs(a) > t
        want = (jnp.where(kept, a, 0) * (xf @ wu.astype(f32))) @ wd.astype(f32)
        got = gated_mlp(x, wg, wu, wd, t)
    assert 0 < float(sparsity.active_fraction(kept)) < 1
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, gated_mlp(x, wg, wu, wd), rtol=1e-3)


# ---- sites, modes, weights ---------------------------------------------------------------------
def test_modes_are_sets_of_known_sites():
    assert TEAL_SITES == ATTN_SITES + MLP_SITES and len(set(TEAL_SITES)) == 7
    assert MODES["dense"] == () and MODES["cats"] == (CATS_SITE,) and MODES["teal"] == TEAL_SITES
    assert MODES["cats+teal-attn"] == (CATS_SITE,) + ATTN_SITES
    for sites in MODES.values():
        assert set(sites) <= set(TEAL_SITES) | {CATS_SITE}


def test_site_weights_without_gqa_and_the_cats_site_counts_up_and_down(tiny_cfg):
    cfg = tiny_cfg(num_kv_heads=4, intermediate_size=256)  # 4 / 4 heads, intermediate 4 x hidden
    w = sparsity.site_weights(cfg)
    assert set(w) == set(TEAL_SITES) | {CATS_SITE}
    assert w["attn.k_proj"] == w["attn.v_proj"] == w["attn.q_proj"] == 1.0
    assert w["mlp.gate_proj"] == w["mlp.down_proj"] == 4.0
    assert w[CATS_SITE] == w["mlp.up_proj"] + w["mlp.down_proj"]


def test_weighted_mean_weights_by_skippable_rows(tiny_cfg):
    cfg = tiny_cfg()  # hidden 64, intermediate 128: MLP sites weigh 2, k and v 0.5
    assert sparsity.weighted_mean({"attn.q_proj": 0.0, "mlp.down_proj": 0.6}, cfg) == pytest.approx(0.4)
    assert sparsity.weighted_mean({"attn.k_proj": 0.3, CATS_SITE: 0.3}, cfg) == pytest.approx(0.3)
    per_layer = {"attn.q_proj": np.array([0.0, 1.0]), "attn.v_proj": np.array([1.0, 1.0])}
    np.testing.assert_allclose(sparsity.weighted_mean(per_layer, cfg), [1 / 3, 1.0])


def test_active_fraction_counts_nonzeros_over_an_axis():
    a = jnp.asarray([[0.0, 1.0, -2.0, 0.0], [3.0, 0.0, 0.0, 0.0]])
    assert float(sparsity.active_fraction(a)) == 3 / 8
    np.testing.assert_array_equal(sparsity.active_fraction(a, axis=1), [0.5, 0.25])

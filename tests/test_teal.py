"""TEAL: the input rule at every linear layer, modes, calibration of every site's thresholds,
TEAL's greedy allocation, the thresholds file and the CLIs (tiny model, local data)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cats_jax import calibrate, checkpoint, data, quantiles, sparsity, teal, thresholds
from cats_jax import model as M
from cats_jax.sparsity import ATTN_SITES, CATS_SITE, MODES, TEAL_SITES
from conftest import TINY, calibration_rows
from eval import __main__ as eval_cli

LEVELS = [0.25, 0.4, 0.5, 0.65]
TOKENS, SEQ = 2048, 128
FIXTURE_PIQA = "tests/fixtures/tasks/piqa/valid.jsonl"


def own_copy(tiny_ckpt, tmp_path_factory, name):
    """A copy of the shared tiny checkpoint without thresholds (the CATS tests write theirs)."""
    ckpt, text = tiny_ckpt
    out = tmp_path_factory.mktemp(name) / "ckpt"
    shutil.copytree(ckpt, out, ignore=shutil.ignore_patterns(thresholds.FILENAME))
    return out, text


@pytest.fixture(scope="module")
def uniform(tiny_ckpt, tmp_path_factory):
    """Uniform TEAL thresholds at LEVELS, calibrated through the CLI on 2048 tokens with a reservoir
    smaller than the data (so the exact quantiles take the second pass)."""
    ckpt, text = own_copy(tiny_ckpt, tmp_path_factory, "teal-uniform")
    calibrate.main(["--ckpt", str(ckpt), "--method", "teal", "--allocation", "uniform", "--sparsity",
                    ",".join(map(str, LEVELS)), "--data-file", str(text), "--tokens", str(TOKENS),
                    "--holdout-tokens", "512", "--seq-len", str(SEQ), "--batch-size", "8", "--reservoir", "20000"])
    return ckpt, text, thresholds.load(ckpt)


@pytest.fixture(scope="module")
def greedy(tiny_ckpt, tmp_path_factory):
    ckpt, text = own_copy(tiny_ckpt, tmp_path_factory, "teal-greedy")
    th = teal.run(ckpt, LEVELS, data.TextSource(str(text)), allocation="greedy", tokens=TOKENS, holdout_tokens=512,
                  seq_len=SEQ, batch_size=8, greedy_tokens=512, base_step=0.1, progress=False)
    return ckpt, text, th


def dense_inputs(ckpt, text):
    """|what each sampled site tests| of the dense model over the calibration rows: {site: [L, n]}."""
    model = checkpoint.load_model(ckpt)
    quantiles.set_dense_sites(model, teal.SAMPLED)
    graphdef, state = nnx.split(model)
    rows = calibration_rows(ckpt, text, TOKENS, SEQ)
    parts = [quantiles.abs_inputs(graphdef, state, jnp.asarray(np.stack(rows[i:i + 8])), teal.SAMPLED) for i in range(0, len(rows), 8)]
    return {s: np.concatenate([np.asarray(p[s]) for p in parts], axis=1).reshape(TINY.num_layers, -1) for s in teal.SAMPLED}


@nnx.jit
def logits(model, toks):
    return model(toks)[0]


def tokens(n=2, t=24, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, TINY.vocab_size, (n, t)))


def set_all(model, value):
    for site in TEAL_SITES + (CATS_SITE,):
        model.set_thresholds(site, np.full(TINY.num_layers, value))


# ---- the rule and the modes ----------------------------------------------------------------------
def test_teal_input_zeroes_at_or_below_threshold_in_the_input_dtype():
    x = jnp.asarray([-0.5, -0.2, 0.0, 0.2, 0.3, 1.0], jnp.bfloat16)
    y = sparsity.teal_input(x, x[3].astype(jnp.float32))  # bf16(0.2) = 0.2001953125: at the threshold
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), [-0.5, 0, 0, 0, 0.30078125, 1.0])
    # the test reads the bf16 value itself: fp32 0.2 lies below bf16(0.2), which is kept
    np.testing.assert_array_equal(sparsity.teal_input(x, jnp.float32(0.2)), [-0.5, x[1], 0, x[3], x[4], 1.0])
    np.testing.assert_array_equal(sparsity.teal_input(x, jnp.float32(0)), x)


@pytest.mark.parametrize("mode", list(MODES))
def test_threshold_zero_at_every_site_equals_dense_exactly(mode):
    model = M.init_random(TINY, seed=1, dtype=jnp.float32)
    dense = logits(model, tokens())
    model.set_mode(mode)
    set_all(model, 0.0)
    assert set(model.sites) == set(MODES[mode])
    np.testing.assert_array_equal(logits(model, tokens()), dense)


@pytest.mark.parametrize("mode", ["cats", "teal", "cats+teal-attn"])
def test_modes_touch_only_their_sites(mode):
    model = M.init_random(TINY, seed=2, dtype=jnp.float32)
    dense = logits(model, tokens())
    model.set_mode(mode)
    set_all(model, 1e9)  # every value of every site at or below its threshold
    for site in MODES[mode]:
        model.set_thresholds(site, np.zeros(TINY.num_layers))
    np.testing.assert_array_equal(logits(model, tokens()), dense)  # the other sites' thresholds are ignored
    # ...and only the mode's sites are tested: those are exactly the ones that sow
    (_, _), inter = nnx.capture(model.hidden, nnx.Intermediate)(tokens(), jnp.broadcast_to(jnp.arange(24), (2, 24)))
    assert set(M.sown_by_site(nnx.to_pure_dict(inter), "active_fraction")) == set(MODES[mode])
    model.set_thresholds(MODES[mode][-1], np.full(TINY.num_layers, 1e9))
    assert not np.array_equal(logits(model, tokens()), dense)


def test_mlp_teal_equals_the_rule_at_its_three_inputs():
    model = M.init_random(TINY, seed=3, dtype=jnp.float32)
    model.set_mode("teal")
    mlp = model.layers[0].mlp
    tg, tu, td = 0.3, 0.6, 0.05
    for proj, t in (("gate_proj", tg), ("up_proj", tu), ("down_proj", td)):
        mlp.input_threshold[proj][...] = jnp.float32(t)
    x = jax.random.normal(jax.random.key(0), (2, 5, TINY.hidden_size))
    w = {p: getattr(mlp, p).kernel[...] for p in ("gate_proj", "up_proj", "down_proj")}
    r = sparsity.teal_input
    h = jax.nn.silu(r(x, tg) @ w["gate_proj"]) * (r(x, tu) @ w["up_proj"])
    np.testing.assert_allclose(mlp(x), r(h, td) @ w["down_proj"], rtol=1e-5, atol=1e-6)


def test_attention_teal_thresholds_qkv_input_and_o_input():
    model = M.init_random(TINY, seed=4, dtype=jnp.float32)
    attn = model.layers[0].attn
    x = jax.random.normal(jax.random.key(1), (2, 7, TINY.hidden_size))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    ref = attn(sparsity.teal_input(x, 0.4), pos)[0]  # dense attention on the thresholded input
    model.set_mode("teal")
    for p in ("q_proj", "k_proj", "v_proj"):
        attn.input_threshold[p][...] = jnp.float32(0.4)
    np.testing.assert_allclose(attn(x, pos)[0], ref, rtol=1e-5, atol=1e-6)
    for p in ("q_proj", "k_proj", "v_proj"):
        attn.input_threshold[p][...] = jnp.float32(0)
    attn.input_threshold["o_proj"][...] = jnp.float32(0.1)
    (out, _), acts = nnx.capture(attn, M.Activation)(x, pos)
    o_in = nnx.to_pure_dict(acts)["o_proj_input"][0]
    np.testing.assert_allclose(out, sparsity.teal_input(o_in, 0.1) @ attn.o_proj.kernel[...], rtol=1e-5, atol=1e-6)


# ---- calibration: uniform -----------------------------------------------------------------------
def test_uniform_realised_per_site_on_calibration_data_within_half_point(uniform):
    ckpt, text, th = uniform
    assert th.method == "teal" and th.calibration["allocation"] == "uniform" and th.calibration["exact_quantile"]
    assert th.calibration["sample_per_layer"]["attn.q_proj"] < th.calibration["values_per_layer"]["attn.q_proj"]
    acts = dense_inputs(ckpt, text)
    ordered = {s: [np.sort(a) for a in v] for s, v in acts.items()}
    for level in th.levels:
        for site in TEAL_SITES + (CATS_SITE,):
            t = np.asarray(level.thresholds[site], np.float32)
            every = ordered[teal.SAME_INPUT.get(site, site)]
            exact = [quantiles.quantile_threshold(every[layer], level.sparsity)[0] for layer in range(TINY.num_layers)]
            np.testing.assert_array_equal(t, np.asarray(exact, np.float32), err_msg=site)  # not the sample's
            realised = np.mean(acts[teal.SAME_INPUT.get(site, site)] <= t[:, None], axis=1)
            np.testing.assert_allclose(realised, level.sparsity, atol=0.005, err_msg=site)
            np.testing.assert_allclose(level.realised[site]["calibration"], realised, atol=1e-6)
            if site != CATS_SITE:
                np.testing.assert_allclose(level.site_sparsity[site], level.sparsity)
        # k and v read q's input: at equal levels their thresholds are q's
        assert level.thresholds["attn.k_proj"] == level.thresholds["attn.q_proj"]


def test_held_apart_sparsity_is_measured_on_the_teal_model(uniform):
    _, _, th = uniform
    for level in th.levels:
        for site in ("attn.q_proj", "attn.k_proj", "attn.v_proj"):  # layer 0 reads the embeddings: no cascade
            assert abs(level.realised[site]["held_out"][0] - level.sparsity) < 0.03
        assert len(level.realised["effective"]["held_out"]) == TINY.num_layers
    assert th.calibration["held_out_tokens"] == 512


# ---- calibration: greedy ------------------------------------------------------------------------
def test_site_weights_follow_matrix_sizes():
    w = sparsity.site_weights(TINY)  # hidden 64, intermediate 128, 4 heads, 2 kv heads
    assert w == {"attn.q_proj": 1.0, "attn.k_proj": 0.5, "attn.v_proj": 0.5, "attn.o_proj": 1.0,
                 "mlp.gate_proj": 2.0, "mlp.up_proj": 2.0, "mlp.down_proj": 2.0, CATS_SITE: 4.0}


def test_greedy_path_takes_weighted_steps_and_interpolates_exactly():
    weights = np.array([1.0, 0.5, 2.0])
    cost = np.array([3.0, 1.0, 1.0])  # error of a level vector: levels @ cost

    def evaluate(cand):
        return cand @ cost

    path, err = teal.greedy_path(evaluate, weights, 0.1, 0.6)
    eff = teal.effective(path, weights)
    np.testing.assert_allclose(np.diff(eff), 0.1 / weights.sum())  # every step adds base_step / sum(w)
    steps = np.diff(path, axis=0)
    assert all(np.count_nonzero(s) == 1 for s in steps)  # one site per step, by its own step size
    np.testing.assert_allclose(steps.sum(1), [(0.1 / weights)[np.flatnonzero(s)[0]] for s in steps])
    # the cheapest error per unit of effective sparsity is site 2 (cost 1, weight 2): it goes first
    assert np.flatnonzero(steps[0])[0] == 2 and err[1] == pytest.approx(0.05)
    for target in (0.2, 0.33, 0.6):
        lv = teal.levels_at(path, weights, target)
        assert teal.effective(lv, weights) == pytest.approx(target)


def test_levels_at_a_target_the_last_step_reaches_only_after_rounding():
    weights = np.ones(30)  # 300 steps of 0.05 / 30 sum to 0.49999999999999...
    path, _ = teal.greedy_path(lambda cand: cand.sum(1), weights, 0.05, 0.5)
    assert teal.effective(path, weights)[-1] < 0.5
    np.testing.assert_allclose(teal.levels_at(path, weights, 0.5), path[-1])


def test_greedy_reaches_each_target_with_the_weighted_effective_sparsity(greedy):
    _, _, th = greedy
    assert th.calibration["allocation"] == "greedy" and th.calibration["greedy"]["base_step"] == 0.1
    w = sparsity.site_weights(TINY)
    for level in th.levels:
        eff = sparsity.weighted_mean({s: np.asarray(level.site_sparsity[s]) for s in TEAL_SITES}, TINY)
        np.testing.assert_allclose(eff, level.sparsity, atol=2e-6)  # levels are stored rounded to 1e-6
        np.testing.assert_allclose(level.realised["effective"]["calibration"], level.sparsity, atol=0.005)
        # every site sits on its step grid (base_step / weight) but the one interpolated last
        for layer in range(TINY.num_layers):
            off = [abs(q - round(q)) > 1e-4 for q in (level.site_sparsity[s][layer] * w[s] / 0.1 for s in TEAL_SITES)]
            assert sum(off) <= 1
        # allocation is not uniform: the sites' levels differ
        assert np.ptp([level.site_sparsity[s][0] for s in TEAL_SITES]) > 0.1


def test_greedy_layer_error_is_at_most_uniforms(greedy):
    _, _, th = greedy
    for p, err in th.calibration["greedy"]["layer_error"].items():
        assert np.all(np.asarray(err["greedy"]) <= np.asarray(err["uniform"]) + 1e-6), p


def test_greedy_error_matches_a_whole_sequence_forward(greedy):
    """The search scores only each row's last quarter (the earlier tokens enter as keys and values
    only); the stored error must equal the plain forward of the whole rows at those levels."""
    ckpt, text, th = greedy
    model = checkpoint.load_model(ckpt)
    rows = jnp.asarray(np.stack(calibration_rows(ckpt, text, 512, SEQ)))
    pos = jnp.broadcast_to(jnp.arange(SEQ), rows.shape)
    block = nnx.jit(lambda layer, x: layer(x, pos)[0])
    x1 = block(model.layers[0], model.embed(rows))  # dense input of layer 1
    dense = block(model.layers[1], x1)[:, SEQ * 3 // 4:]
    level = th.level(0.5)
    model.set_mode("teal")
    for site in TEAL_SITES:
        model.set_thresholds(site, level.thresholds[site])
    sparse = block(model.layers[1], x1)[:, SEQ * 3 // 4:]
    rel = float(jnp.linalg.norm((sparse - dense).ravel()) / jnp.linalg.norm(dense.ravel()))
    assert rel == pytest.approx(th.calibration["greedy"]["layer_error"]["0.5"]["greedy"][1], rel=1e-3)


# ---- the thresholds file and the modes it serves -----------------------------------------------
def test_teal_file_applies_in_each_mode_and_checks_the_model(uniform, greedy):
    ckpt, _, th = uniform
    model = checkpoint.load_model(ckpt)
    level = thresholds.apply(model, th, 0.5)
    assert model.sites == TEAL_SITES
    for site in TEAL_SITES:
        got = [float(M.site_threshold(layer, site)[...]) for layer in model.layers]
        np.testing.assert_allclose(got, level.thresholds[site])
    thresholds.apply(model, th, 0.5, mode="cats")
    assert model.sites == (CATS_SITE,)
    np.testing.assert_allclose([float(layer.mlp.threshold[...]) for layer in model.layers], level.thresholds[CATS_SITE])
    thresholds.apply(model, th, 0.5, mode="cats+teal-attn")
    assert model.sites == (CATS_SITE,) + ATTN_SITES
    with pytest.raises(thresholds.ThresholdsError, match="needs TEAL thresholds of uniform allocation"):
        thresholds.apply(model, greedy[2], 0.5, mode="cats+teal-attn")
    other = M.init_random(TINY, seed=7, dtype=jnp.float32)
    with pytest.raises(thresholds.ThresholdsError, match="another model.*embedding_sha256"):
        thresholds.apply(other, th, 0.5)
    # the file round-trips, its TEAL levels included
    again = thresholds.Thresholds.from_json(th.to_json())
    assert again.levels[2].site_sparsity == th.levels[2].site_sparsity and again.method == "teal"


def test_cats_thresholds_do_not_serve_teal_modes():
    model = M.init_random(TINY, seed=0, dtype=jnp.float32)
    level = thresholds.Level(0.5, {CATS_SITE: [0.1] * TINY.num_layers})
    cats = thresholds.Thresholds(thresholds.model_identity(model), "cats", [level], {})
    with pytest.raises(thresholds.ThresholdsError, match="mode 'teal' needs TEAL thresholds"):
        thresholds.apply(model, cats, 0.5, mode="teal")


# ---- eval ---------------------------------------------------------------------------------------
def test_eval_cli_reports_teal_rows_with_measured_effective_sparsity(uniform, tmp_path, capsys):
    ckpt, text, _ = uniform
    out = tmp_path / "eval.json"
    eval_cli.main(["--ckpt", str(ckpt), "--mode", "teal", "--sparsity", "dense,0.5", "--tasks", "piqa",
                   "--data-file", f"piqa={FIXTURE_PIQA}", "--ppl", str(text), "--ppl-tokens", "256",
                   "--context-length", "64", "--out", str(out), "--no-progress"])
    result = json.loads(out.read_text())
    dense, sparse = result["results"]
    assert [dense["setting"], sparse["setting"]] == ["dense", "teal-0.5"] and result["thresholds"]["mode"] == "teal"
    assert dense["sparsity"]["mean"] == 0 and dense["sparsity"]["per_site"] == {}
    assert set(sparse["sparsity"]["per_site"]) == set(TEAL_SITES)
    assert abs(sparse["sparsity"]["per_layer"][0] - 0.5) < 0.1  # other text than the calibration's: near, not exact
    assert sparse["perplexity"]["perplexity"] != dense["perplexity"]["perplexity"]
    assert "| teal-0.5 |" in capsys.readouterr().out


# ---- structure ----------------------------------------------------------------------------------
def cats_jax_imports(module: str) -> set[str]:
    """The cats_jax modules that cats_jax/<module>.py imports, anywhere in it."""
    import ast
    from pathlib import Path

    tree = ast.parse((Path(calibrate.__file__).parent / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "cats_jax":
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("cats_jax."):
            out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cats_jax.")}
    return out


def test_cats_and_teal_calibration_share_one_machinery_without_a_circle():
    assert "calibrate" not in cats_jax_imports("teal")
    assert not {"calibrate", "teal"} & cats_jax_imports("quantiles")
    assert "quantiles" in cats_jax_imports("teal") and "quantiles" in cats_jax_imports("calibrate")


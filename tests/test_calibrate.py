"""CATS thresholds: calibration precision, the thresholds file, text sources (tiny model, local data)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cats_jax import calibrate, checkpoint, cli, data, quantiles, thresholds
from cats_jax import model as M
from cats_jax.config import ModelConfig
from conftest import CALIBRATED_LEVELS as LEVELS
from conftest import TINY, calibration_rows, texts, write_jsonl

CATS = thresholds.CATS_SITE


def dense_abs_activations(model, rows):
    """|SiLU(gate)| of every MLP over rows, all values: [layers, n] (independent of the reservoir)."""
    model.set_mlp_impl("cats-jnp")
    model.set_cats_thresholds(np.zeros(TINY.num_layers))
    graphdef, state = nnx.split(model)
    return np.concatenate([np.asarray(abs_acts(graphdef, state, jnp.asarray(np.stack(rows[i:i + 8]))))
                           for i in range(0, len(rows), 8)], axis=1).reshape(TINY.num_layers, -1)


def abs_acts(graphdef, state, tokens):
    """|SiLU(gate)| of every MLP [layers, B * T, I] (the CATS site's sample input)."""
    return quantiles.abs_inputs(graphdef, state, tokens, (thresholds.CATS_SITE,))[thresholds.CATS_SITE]


def logits(model, tokens):
    """The model's logits, jitted (eager dispatch of every op is slow)."""
    graphdef, state = nnx.split(model)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return jax.jit(M.forward, static_argnums=0)(graphdef, state, tokens, positions)[0]


# ---- acceptance: realised sparsity within 0.5 points of target for every layer ----------------
def test_realised_sparsity_on_calibration_data_within_half_point(calibrated):
    ckpt, text, th = calibrated
    assert th.calibration["exact_quantile"] and th.calibration["tokens"] == 4096
    acts = dense_abs_activations(checkpoint.load_model(ckpt), calibration_rows(ckpt, text, 4096))
    for level in th.levels:
        t = np.asarray(level.thresholds[thresholds.CATS_SITE], np.float32)
        realised = np.mean(acts <= t[:, None], axis=1)
        np.testing.assert_allclose(realised, level.sparsity, atol=0.005)
        np.testing.assert_allclose(level.realised[thresholds.CATS_SITE]["calibration"], realised, atol=1e-6)


def test_sampled_reservoir_within_half_point(tiny_ckpt):
    ckpt, text = tiny_ckpt
    rows = calibration_rows(ckpt, text, 8192)
    model = checkpoint.load_model(ckpt)
    cal = calibrate.calibrate(model, rows, LEVELS, batch_size=8, reservoir=200_000, progress=False)
    assert not cal.exact and cal.values_per_layer == 8192 * TINY.intermediate_size
    acts = dense_abs_activations(model, rows)
    for p, t in zip(LEVELS, cal.thresholds):
        np.testing.assert_allclose(np.mean(acts <= t[:, None], axis=1), p, atol=0.005)


def test_held_out_sparsity_is_measured_on_the_cats_model(calibrated):
    ckpt, text, th = calibrated
    for level in th.levels:
        held = level.realised[thresholds.CATS_SITE]["held_out"]
        assert len(held) == TINY.num_layers
        np.testing.assert_allclose(held, level.sparsity, atol=0.05)  # other text, cascaded layers: near, not exact
    assert th.calibration["held_out_tokens"] == 1024


# ---- acceptance: threshold 0 is the dense model; CATS touches only the MLP activation -----------
def test_cats_at_threshold_zero_equals_dense_exactly():
    # fp32: in bf16 the CATS path reads the gate unrounded (fp32 accumulator) and dense does not
    model = M.init_random(TINY, seed=1, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24)))
    dense = logits(model, tokens)
    model.set_mlp_impl("cats-jnp")
    model.set_cats_thresholds(np.zeros(TINY.num_layers))
    np.testing.assert_array_equal(logits(model, tokens), dense)


def test_cats_changes_only_the_mlp_activation():
    """With every activation zeroed, each MLP outputs 0; the rest of the model (attention, norms,
    embeddings, head) must be bit-identical to the dense model whose down_proj is zero."""
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 16)))
    cats = M.init_random(TINY, seed=2, dtype=jnp.float32)
    cats.set_mlp_impl("cats-jnp")
    cats.set_cats_thresholds(np.full(TINY.num_layers, np.inf))
    no_mlp = M.init_random(TINY, seed=2, dtype=jnp.float32)
    for layer in no_mlp.layers:
        layer.mlp.down_proj.kernel[...] = jnp.zeros_like(layer.mlp.down_proj.kernel[...])
    np.testing.assert_array_equal(logits(cats, tokens), logits(no_mlp, tokens))
    dense = M.init_random(TINY, seed=2, dtype=jnp.float32)
    assert not np.allclose(logits(cats, tokens), logits(dense, tokens))


def test_zeroed_activations_are_exactly_those_at_or_below_threshold():
    model = M.init_random(TINY, seed=3, dtype=jnp.float32)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, TINY.vocab_size, (1, 16)))
    dense_acts = dense_abs_activations(model, [np.asarray(tokens[0])])
    t = np.array([0.05, 0.1, 0.2], np.float32)
    model.set_cats_thresholds(t)
    graphdef, state = nnx.split(model)
    cats_acts = np.asarray(abs_acts(graphdef, state, tokens)).reshape(TINY.num_layers, -1)
    # layer 0 sees the same input as the dense model; later layers' inputs change with the sparsity
    np.testing.assert_array_equal(cats_acts[0] == 0, dense_acts[0] <= t[0])
    np.testing.assert_array_equal(cats_acts[0][cats_acts[0] != 0], dense_acts[0][dense_acts[0] > t[0]])
    for layer in range(TINY.num_layers):
        nonzero = cats_acts[layer][cats_acts[layer] != 0]
        assert nonzero.size and nonzero.min() > t[layer]


# ---- quantiles and the reservoir ------------------------------------------------------------
def test_quantile_threshold_picks_the_nearer_side_of_ties():
    s = np.sort(np.array([0.1] * 10 + [0.2] * 80 + [0.3] * 10, np.float32))
    assert quantiles.quantile_threshold(s, 0.45) == (pytest.approx(0.1), 0.1)  # 10% is nearer to 45% than 90%
    assert quantiles.quantile_threshold(s, 0.6) == (pytest.approx(0.2), 0.9)
    v = np.sort(np.random.default_rng(0).random(1000).astype(np.float32))
    t, frac = quantiles.quantile_threshold(v, 0.37)
    assert frac == 0.37 and np.mean(v <= t) == 0.37


def test_reservoir_is_exact_then_a_uniform_sample():
    r = quantiles.Reservoir(1000, np.random.default_rng(0))
    r.add(np.arange(600, dtype=np.float32))
    assert r.exact and sorted(r.values) == list(range(600))
    for start in range(600, 100_000, 7000):
        r.add(np.arange(start, min(start + 7000, 100_000), dtype=np.float32))
    assert not r.exact and r.seen == 100_000 and len(r.values) == 1000 and len(set(r.values)) == 1000
    assert abs(np.mean(r.values) / 100_000 - 0.5) < 0.03  # uniform over the whole stream
    assert abs(np.mean(r.values < 50_000) - 0.5) < 0.05


# ---- the thresholds file --------------------------------------------------------------------
def test_thresholds_file_roundtrip_and_autoload(calibrated):
    ckpt, _, th = calibrated
    loaded = thresholds.load(ckpt)
    assert loaded.sparsities == LEVELS and loaded.method == "cats"
    assert loaded.levels[2].thresholds == th.levels[2].thresholds
    model = checkpoint.load_model(ckpt)
    level = thresholds.load_into(model, ckpt, 0.5)
    assert model.layers[0].mlp.impl == "cats-jnp"
    np.testing.assert_array_equal([float(l.mlp.threshold[...]) for l in model.layers], level.thresholds["mlp.act"])
    with pytest.raises(thresholds.ThresholdsError, match="no thresholds for sparsity 0.55.*0.3, 0.4, 0.5"):
        loaded.level(0.55)


def test_thresholds_of_another_model_are_refused(calibrated, tmp_path):
    ckpt, _, th = calibrated
    other_weights = M.init_random(TINY, seed=9, dtype=jnp.float32)
    with pytest.raises(thresholds.ThresholdsError, match="another model.*embedding_sha256"):
        thresholds.apply(other_weights, th, 0.5)
    deeper = M.init_random(ModelConfig(**{**TINY.__dict__, "num_layers": 4}), seed=0, dtype=jnp.float32)
    with pytest.raises(thresholds.ThresholdsError, match="num_layers: thresholds 3, model 4"):
        thresholds.apply(deeper, th, 0.5)
    (tmp_path / "thresholds.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(thresholds.ThresholdsError, match="not a cats-jax-thresholds"):
        thresholds.load(tmp_path)
    assert thresholds.load(tmp_path / "missing") is None


def test_same_weights_in_another_dtype_match(calibrated):
    ckpt, _, th = calibrated
    thresholds.apply(checkpoint.load_model(ckpt, jnp.bfloat16), th, 0.3)


# ---- text sources ---------------------------------------------------------------------------
def test_local_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    assert list(data.iter_documents(data.TextSource(str(tmp_path / "a.txt")))) == ["First paragraph.\n\nSecond paragraph.\n"]
    write_jsonl(tmp_path / "b.jsonl", ["one", "", "two"])
    assert list(data.iter_documents(data.TextSource(str(tmp_path / "b.jsonl")))) == ["one", "two"]
    with pytest.raises(data.DataError, match=r"b.jsonl:1: no text field 'content'"):
        list(data.iter_documents(data.TextSource(str(tmp_path / "b.jsonl"), field="content")))
    with pytest.raises(data.DataError, match="no such file"):
        list(data.iter_documents(data.TextSource(str(tmp_path / "missing.jsonl"))))


def test_pack_rows_and_cut_at_a_document_boundary():
    docs = iter([[1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11]])
    rows = list(data.pack(docs, 4, sep_id=0, max_rows=2))
    assert [r.tolist() for r in rows] == [[1, 2, 3, 0], [4, 5, 0, 6]]
    assert next(docs) == [10, 11]  # the rest of document [6..9] is dropped; the next starts fresh


def test_offline_hub_is_a_clear_error(monkeypatch, tiny_ckpt, capsys):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(data.DataError, match="falcon-refinedweb.*--data-file"):
        next(data.iter_documents(data.TextSource(data.REFINEDWEB)))
    with pytest.raises(SystemExit) as exit:
        cli.run(calibrate.main, ["--ckpt", str(tiny_ckpt[0]), "--sparsity", "0.55"])
    assert exit.value.code == 2
    assert "error: cannot stream dataset 'tiiuae/falcon-refinedweb'" in capsys.readouterr().err


def test_cli_calibrates_several_levels_in_one_pass(tiny_ckpt, tmp_path, capsys):
    src, text = tiny_ckpt
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, TINY, checkpoint.model_params(checkpoint.load_model(src)), src)
    calibrate.main(["--ckpt", str(ckpt), "--data-file", str(text), "--sparsity", "0.6,0.2", "--tokens", "1024",
                    "--holdout-tokens", "256", "--seq-len", "64", "--batch-size", "4"])
    out = capsys.readouterr().out
    assert "calibrated on 1024 tokens (exact quantiles), held apart 256 tokens" in out
    assert thresholds.load(ckpt).sparsities == [0.2, 0.6]
    with pytest.raises(SystemExit):
        calibrate.main(["--ckpt", str(ckpt), "--sparsity", "1.5"])


# ---- no lost work ---------------------------------------------------------------------------
def own_ckpt(tiny_ckpt, tmp_path):
    src, text = tiny_ckpt
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, TINY, checkpoint.model_params(checkpoint.load_model(src)), src)
    return ckpt, text


def test_one_document_txt_holds_apart_its_tail(tiny_ckpt, tmp_path):
    ckpt, _ = own_ckpt(tiny_ckpt, tmp_path)
    txt = tmp_path / "one.txt"
    txt.write_text(" ".join(texts(60, 2)))
    tok = data.load_tokenizer(ckpt)
    ids = tok(txt.read_text(), add_special_tokens=False)["input_ids"]
    cal, held = quantiles.calibration_rows(tok, data.TextSource(str(txt)), 256, 128, 64)
    assert [r.tolist() for r in held] == [ids[-128:-64], ids[-64:]]  # the tail, and the head calibrates
    assert [r.tolist() for r in cal] == [ids[i:i + 64] for i in range(0, 256, 64)]
    th = calibrate.run(ckpt, [0.5], data.TextSource(str(txt)), tokens=256, holdout_tokens=128, seq_len=64,
                       batch_size=4, progress=False)
    assert th.calibration["held_out_tokens"] == 128 and len(th.levels[0].realised[CATS]["held_out"]) == TINY.num_layers


def test_holdout_zero_means_no_held_apart_measurement(tiny_ckpt, tmp_path, capsys):
    ckpt, text = own_ckpt(tiny_ckpt, tmp_path)
    calibrate.main(["--ckpt", str(ckpt), "--data-file", str(text), "--sparsity", "0.5", "--tokens", "256",
                    "--holdout-tokens", "0", "--seq-len", "64"])
    assert "no held-apart measurement" in capsys.readouterr().out
    level = thresholds.load(ckpt).level(0.5)
    assert list(level.realised[CATS]) == ["calibration"]


def test_data_is_checked_before_the_pass(tiny_ckpt, tmp_path, monkeypatch, capsys):
    ckpt, text = own_ckpt(tiny_ckpt, tmp_path)
    monkeypatch.setattr(quantiles, "abs_inputs", lambda *a: pytest.fail("the pass ran on too little text"))
    with pytest.raises(SystemExit) as exit:
        cli.run(calibrate.main, ["--ckpt", str(ckpt), "--data-file", str(text), "--tokens", "1000000"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert "calib.jsonl: only" in err and "fewer --tokens" in err and len(err.splitlines()) == 1


def test_calibrated_levels_are_refused_before_the_pass_and_others_kept(calibrated, tmp_path, monkeypatch, capsys):
    src, text, _ = calibrated
    ckpt, _ = own_ckpt((src, text), tmp_path)
    (ckpt / thresholds.FILENAME).write_text((src / thresholds.FILENAME).read_text())  # the same weights
    args = ["--ckpt", str(ckpt), "--data-file", str(text), "--tokens", "256", "--holdout-tokens", "128",
            "--seq-len", "64", "--batch-size", "4"]
    with pytest.raises(SystemExit) as exit:
        cli.run(calibrate.main, args + ["--sparsity", "0.5,0.55"])
    assert exit.value.code == 2 and "already holds cats levels 0.5; pass --force" in capsys.readouterr().err
    calibrate.main(args + ["--sparsity", "0.55"])
    assert thresholds.load(ckpt).sparsities == sorted(LEVELS + [0.55])
    before = thresholds.load(ckpt).level(0.3).thresholds
    calibrate.main(args + ["--sparsity", "0.3", "--force"])
    after = thresholds.load(ckpt)
    assert after.sparsities == sorted(LEVELS + [0.55]) and after.level(0.3).thresholds != before


def test_thresholds_are_saved_before_the_held_apart_measurement(tiny_ckpt, tmp_path, monkeypatch):
    ckpt, text = own_ckpt(tiny_ckpt, tmp_path)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantiles, "measure_sparsity", interrupted)
    with pytest.raises(KeyboardInterrupt):
        calibrate.run(ckpt, [0.4, 0.6], data.TextSource(str(text)), tokens=256, holdout_tokens=128, seq_len=64,
                      batch_size=4, progress=False)
    saved = thresholds.load(ckpt)
    assert saved.sparsities == [0.4, 0.6] and "held_out" not in saved.levels[0].realised[CATS]


# ---- the selection criterion -----------------------------------------------------------------
def test_weighted_calibration_records_its_criterion_and_takes_quantiles_of_the_weighted_score(calibrated, tmp_path,
                                                                                              capsys):
    src, text, magnitude = calibrated
    ckpt, _ = own_ckpt((src, text), tmp_path)
    args = ["--ckpt", str(ckpt), "--data-file", str(text), "--tokens", "1024", "--holdout-tokens", "256",
            "--seq-len", "64", "--batch-size", "4", "--sparsity", "0.5"]
    calibrate.main(args + ["--criterion", "weighted"])
    th = thresholds.load(ckpt)
    assert th.criterion == "weighted" and magnitude.criterion == "magnitude"
    assert json.loads((ckpt / thresholds.FILENAME).read_text())["methods"]["cats"]["calibration"]["criterion"] == "weighted"
    # realised on the calibration text: the weighted score's quantile, measured with the weighted rule
    model = checkpoint.load_model(ckpt)
    level = thresholds.apply(model, th, 0.5)
    assert model.criterion == "weighted"
    realised = level.realised[CATS]
    np.testing.assert_allclose(realised["calibration"], 0.5, atol=0.005)
    np.testing.assert_allclose(realised["held_out"], 0.5, atol=0.1)
    rows = calibration_rows(ckpt, text, 1024, 64)
    quantiles.set_dense_sites(model, (CATS,))  # the dense model's weighted scores
    scores = np.asarray(quantiles.abs_inputs(*nnx.split(model), jnp.asarray(np.stack(rows)), (CATS,))[CATS])
    kept = scores.reshape(TINY.num_layers, -1) > np.asarray(level.thresholds[CATS])[:, None]
    np.testing.assert_allclose(1 - kept.mean(axis=1), realised["calibration"], atol=1e-6)
    # another level of the same criterion joins the file without --force (its save checks the criterion too)
    calibrate.main(args + ["--criterion", "weighted", "--sparsity", "0.3"])
    assert thresholds.load(ckpt).sparsities == [0.3, 0.5]
    # a file of one criterion asked for with the other: a clear error
    with pytest.raises(thresholds.ThresholdsError, match="calibrated with the weighted criterion, not magnitude; "
                                                         "pass --criterion weighted"):
        thresholds.apply(model, th, 0.5, criterion="magnitude")
    with pytest.raises(SystemExit) as exit:  # mixing criteria in one method's levels needs --force
        cli.run(calibrate.main, args + ["--sparsity", "0.3"])
    assert exit.value.code == 2 and "holds cats levels of the weighted criterion; pass --force" in capsys.readouterr().err
    calibrate.main(args + ["--sparsity", "0.3", "--force"])
    after = thresholds.load(ckpt)
    assert after.criterion == "magnitude" and after.sparsities == [0.3]  # the weighted levels went with --force


def test_up_rms_calibration_measures_and_stores_each_neurons_rms_of_the_up_projection(calibrated, tmp_path, capsys):
    src, text, _ = calibrated
    ckpt, _ = own_ckpt((src, text), tmp_path)
    args = ["--ckpt", str(ckpt), "--data-file", str(text), "--tokens", "1024", "--holdout-tokens", "256",
            "--seq-len", "64", "--batch-size", "4", "--sparsity", "0.5", "--criterion", "up-rms"]
    calibrate.main(args)
    th = thresholds.load(ckpt)
    assert th.criterion == "up-rms"
    # the factors: rms over the calibration tokens of u = x W_up, x the dense MLP's input
    model = checkpoint.load_model(ckpt)
    rows = jnp.asarray(np.stack(calibration_rows(ckpt, text, 1024, 64)))
    positions = jnp.broadcast_to(jnp.arange(rows.shape[1]), rows.shape)
    model.set_mode("dense")
    x, squares, acts = model.embed(rows), [], []
    for layer in model.layers:
        x = x + layer.attn(layer.input_norm(x), positions)[0]
        h = layer.post_attn_norm(x)
        u = h @ layer.mlp.up_proj.kernel[...]
        squares.append(np.mean(np.square(np.asarray(u, np.float64)), axis=(0, 1)))
        acts.append(np.abs(np.asarray(jax.nn.silu(h @ layer.mlp.gate_proj.kernel[...]))).reshape(-1, TINY.intermediate_size))
        x = x + layer.mlp(h)
    level = th.levels[0]
    np.testing.assert_allclose(th.factors(level), np.sqrt(squares), rtol=1e-4)
    # applied: the rule keeps neuron i where |a_i| * rms(u_i) > t; on the calibration text at the target
    level = thresholds.apply(model, th, 0.5)
    assert model.criterion == "up-rms"
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.input_factor["down_proj"][...]), th.factors(level)[1])
    np.testing.assert_allclose(level.realised[CATS]["calibration"], 0.5, atol=0.005)
    quantiles.set_dense_sites(model, (CATS,))
    scores = np.asarray(quantiles.abs_inputs(*nnx.split(model), rows, (CATS,))[CATS])  # what calibration sampled
    np.testing.assert_allclose(scores, np.stack(acts) * th.factors(level)[:, None, :], rtol=1e-4, atol=1e-5)
    # thresholds without their factors, and up-rms for TEAL: clear errors
    broken = json.loads((ckpt / thresholds.FILENAME).read_text())
    broken["methods"]["cats"]["calibration"]["factors"]["mlp.act"].pop()
    with pytest.raises(thresholds.ThresholdsError, match=r"up-rms thresholds need their factors \[3, 128\].*have \[2, 128\]"):
        thresholds.apply(model, thresholds.Thresholds.from_json(json.dumps(broken)), 0.5)
    with pytest.raises(SystemExit) as exit:
        cli.run(calibrate.main, args + ["--method", "teal", "--force"])
    assert exit.value.code == 2 and "--criterion up-rms is CATS's only" in capsys.readouterr().err


def test_a_file_without_a_criterion_is_magnitude(calibrated):
    _, _, th = calibrated
    section = json.loads(th.to_json())
    del section["methods"]["cats"]["calibration"]["criterion"]
    old = thresholds.Thresholds.from_json(json.dumps(section))
    assert old.criterion == "magnitude"
    model = M.init_random(TINY, seed=0, dtype=jnp.float32)
    thresholds.apply(model, old, 0.5, criterion="magnitude")
    with pytest.raises(thresholds.ThresholdsError, match="magnitude criterion, not weighted"):
        thresholds.apply(model, old, 0.5, criterion="weighted")


def test_clis_refuse_thresholds_of_the_other_criterion(calibrated, capsys):
    from cats_jax import generate
    from eval import __main__ as eval_cli

    ckpt, _, _ = calibrated
    for main, extra in ((generate.main, ["--prompt", "hi"]), (eval_cli.main, ["--tasks", "none", "--ppl", "none"])):
        with pytest.raises(SystemExit) as exit:
            cli.run(main, ["--ckpt", str(ckpt), "--sparsity", "0.5", "--criterion", "weighted", *extra])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and len(err.strip().splitlines()) == 1, err
        assert "calibrated with the magnitude criterion, not weighted" in err


# ---- per-layer allocation ---------------------------------------------------------------------
def test_allocation_across_layers_spreads_cats_sparsity_over_layers_at_the_target_mean(tiny_ckpt, tmp_path):
    ckpt, text = own_ckpt(tiny_ckpt, tmp_path)
    th = calibrate.run(ckpt, [0.3, 0.5], data.TextSource(str(text)), tokens=2048, holdout_tokens=512, seq_len=128,
                       batch_size=8, progress=False, allocation="layers", greedy_tokens=512)
    for lv in th.levels:
        per_layer = np.asarray(lv.site_sparsity[CATS])
        assert abs(per_layer.mean() - lv.sparsity) < 1e-6  # the model-wide skipped rows of uniform CATS
        assert np.ptp(per_layer) > 0.1  # spread over the layers
        np.testing.assert_allclose(lv.realised[CATS]["calibration"], per_layer, atol=0.01)  # each at its level
    assert th.calibration["allocation"] == "layers" and thresholds.load(ckpt).calibration["allocation"] == "layers"
    costs = th.calibration["greedy"]["layer_kl"]["0.5"]
    assert sum(costs["allocated"]) < sum(costs["uniform"])  # what the search minimises
    with pytest.raises(ValueError, match="allocation 'greedy' is not one of CATS's .TEAL's search within a layer"):
        calibrate.run(ckpt, [0.5], data.TextSource(str(text)), tokens=256, allocation="greedy")
    with pytest.raises(ValueError, match="allocation 'best' is not one of CATS's: choose from layers, uniform"):
        calibrate.run(ckpt, [0.5], data.TextSource(str(text)), tokens=256, allocation="best")


def test_calibrate_cli_refuses_teal_greedy_for_cats_before_reading(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        calibrate.main(["--ckpt", str(tmp_path / "missing"), "--allocation", "greedy", "--data-file", str(tmp_path / "none.txt")])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and "--allocation greedy is TEAL's search within a layer" in err

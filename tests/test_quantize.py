"""int8 weight-only quantization (cats_jax.quantize): the quantizer's bound, the int8 model against
its dequantized float twin, convert --quantize, thresholds tied to the quantization, the benchmark's
int8 rows, and the errors of bad input. Decode of int8 weights (jnp and the kernels in interpret
mode) against the int8 model: test_decode.py, test_sharding.py."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cats_jax
import convert
from bench.decode import random_thresholds
from cats_jax import calibrate, checkpoint, data, decode, quantize, sparsity, thresholds
from cats_jax import model as M
from cats_jax.cli import InputError, run
from cats_jax.config import ConfigError, ModelConfig
from conftest import hf_tensors, write_hf_dir
from convert.__main__ import main as convert_main
from eval.__main__ import main as eval_main

f32 = jnp.float32
CFG = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=16, name="tiny")


def test_quantizer_error_is_at_most_half_a_step_and_zero_columns_are_safe():
    w = np.random.default_rng(0).normal(size=(48, 40)).astype(np.float32)
    w[:, 3] = 0.0  # a zero column: scale 1, q 0 (not 0 / 0)
    w[5, 7] = 40.0  # an outlier sets its column's step, and only its column's
    q, s = quantize.quantize_int8(jnp.asarray(w))
    q, s = np.asarray(q), np.asarray(s)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (40,)
    assert np.abs(q).max() == 127 and np.isfinite(s).all() and (s > 0).all()
    assert s[3] == 1.0 and not q[:, 3].any()
    peak = np.abs(w).max(axis=0)
    np.testing.assert_allclose(s, np.where(peak > 0, peak / 127, 1.0), rtol=1e-6)
    assert (np.abs(w - q * s) <= s / 2 * (1 + 1e-6)).all()
    assert np.abs(q[5, 7]) == 127 and np.abs(q[:, 7]).sum() < np.abs(q[:, 8]).sum()


def _dequantized_twin(qm):
    """The float model (fp32) whose kernels are qm's dequantized weights (an int8 LM head: an untied float one)."""
    cfg = dataclasses.replace(qm.cfg, quantization=None, quantize_head=False,
                              tie_word_embeddings=qm.cfg.tie_word_embeddings and not qm.cfg.quantize_head)
    params = nnx.to_pure_dict(nnx.state(qm, nnx.Param))

    def walk(node):
        if "scales" in node:
            return {"kernel": quantize.dequantize(node["kernel"], node["scales"])}
        return {k: walk(v) if isinstance(v, dict) else v.astype(f32) for k, v in node.items()}

    return M.from_params(cfg, walk(params))


@pytest.mark.parametrize("mode,criterion", [("dense", "magnitude"), ("cats", "weighted")])
def test_int8_model_is_its_dequantized_twin(mode, criterion):
    """The int8 model's forward (x @ q) * s is the float forward of q * s: same logits, and the
    weighted criterion's factors are those of the dequantized weights."""
    m = M.init_random(CFG, seed=3, dtype=f32)
    qm = M.quantize_model(m)
    assert m.layers[0].mlp.up_proj.kernel.dtype == f32  # the source is left as it was
    assert qm.layers[0].mlp.up_proj.kernel.dtype == jnp.int8 and qm.cfg.quantization == "int8"
    twin = _dequantized_twin(qm)
    for model in (qm, twin):
        model.set_criterion(criterion)
    levels = random_thresholds(twin, [0.5], tokens=64, seed=0)[0.5] if mode != "dense" else {}
    for site, t in levels.items():
        for model in (qm, twin):
            model.set_thresholds(site, t)
    for model in (qm, twin):
        model.set_mode(mode)
    for a, b in zip(qm.layers[0].mlp.input_factor.values(), twin.layers[0].mlp.input_factor.values()):
        np.testing.assert_allclose(a[...], b[...], rtol=1e-6)
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, CFG.vocab_size)
    np.testing.assert_allclose(qm(toks)[0], twin(toks)[0], atol=1e-4)
    if mode == "dense":  # and near the float source
        np.testing.assert_allclose(qm(toks)[0], m(toks)[0], atol=0.1)


@pytest.mark.parametrize("tied", [False, True])
def test_int8_head_model_is_its_dequantized_twin(tied):
    """With head=True the LM head is its own int8 [H, V] with one scale per vocab entry (a tied
    model's embedding stays float for the gather); the logits (h @ q) * s in fp32 are the twin's."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=tied)
    m = M.init_random(cfg, seed=3, dtype=f32)
    qm = M.quantize_model(m, head=True)
    head = qm.lm_head
    assert qm.cfg.quantize_head and (head.kernel.dtype, head.kernel.shape, head.scales.shape) == (
        jnp.int8, (cfg.hidden_size, cfg.vocab_size), (cfg.vocab_size,))
    assert qm.embed.embedding.dtype == f32
    q, s = quantize.quantize_int8(m.embed.embedding[...].T if tied else m.lm_head.kernel[...])
    np.testing.assert_array_equal(head.kernel[...], q)
    np.testing.assert_array_equal(head.scales[...], s)
    toks = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    logits = qm(toks)[0]
    assert logits.dtype == f32
    np.testing.assert_allclose(logits, _dequantized_twin(qm)(toks)[0], atol=1e-4)
    float_head = M.quantize_model(m)(toks)[0]  # the int8 model with its float head: close, not equal
    assert 0 < np.abs(logits - float_head).max() < 0.05


@pytest.fixture(scope="module")
def int8_ckpt(word_ckpt, tmp_path_factory):
    """word_ckpt (fp32, CATS thresholds at 0.5) quantized by the convert CLI."""
    out = tmp_path_factory.mktemp("int8") / "ckpt"
    convert_main(["--ckpt", str(word_ckpt), "--quantize", "int8", "--dtype", "float32", "--out", str(out)])
    return out


def test_convert_quantize_writes_a_checkpoint_that_loads_and_generates(word_ckpt, int8_ckpt):
    assert json.loads((int8_ckpt / "config.json").read_text())["quantization"] == "int8"
    assert not (int8_ckpt / thresholds.FILENAME).exists()  # calibrated for the float weights: left behind
    model = checkpoint.load_model(int8_ckpt, jnp.bfloat16)  # the dtype of the float weights only
    q_proj = model.layers[0].attn.q_proj
    assert (q_proj.kernel.dtype, q_proj.scales.dtype, model.embed.embedding.dtype) == (jnp.int8, f32, jnp.bfloat16)
    lm = cats_jax.load(int8_ckpt, dtype="float32")
    text = lm.generate("w5 w6 w7", 6)
    want = M.quantize_model(checkpoint.load_model(word_ckpt, f32))
    (expected,), _ = cats_jax.generate.generate_text(want, data.load_tokenizer(word_ckpt), ["w5 w6 w7"], 6)
    assert text == expected and text.strip()


@pytest.fixture(scope="module")
def head_ckpt(word_ckpt, tmp_path_factory):
    """word_ckpt quantized with its LM head by the convert CLI."""
    out = tmp_path_factory.mktemp("int8head") / "ckpt"
    convert_main(["--ckpt", str(word_ckpt), "--quantize", "int8", "--quantize-head", "--dtype", "float32",
                  "--out", str(out)])
    return out


def test_convert_quantize_head_is_recorded_and_the_checkpoint_generates(word_ckpt, head_ckpt):
    recorded = json.loads((head_ckpt / "config.json").read_text())
    assert (recorded["quantization"], recorded["quantize_head"]) == ("int8", True)
    model = checkpoint.load_model(head_ckpt)  # no flag: config.json says it
    assert (model.lm_head.kernel.dtype, model.lm_head.scales.dtype) == (jnp.int8, f32)
    text = cats_jax.load(head_ckpt, dtype="float32").generate("w5 w6 w7", 6)
    source = checkpoint.load_model(word_ckpt, f32)
    want = M.quantize_model(source, head=True)
    (expected,), _ = cats_jax.generate.generate_text(want, data.load_tokenizer(word_ckpt), ["w5 w6 w7"], 6)
    assert text == expected and text.strip()
    # the head comes after every threshold: the int8 model's thresholds are this one's too
    assert thresholds.model_identity(model) == thresholds.model_identity(M.quantize_model(source))


def test_convert_hf_quantize_head_of_a_tied_model(tmp_path):
    """A tied model's int8 head is quantized from the embedding's transpose; the embedding stays float."""
    cfg = dataclasses.replace(CFG, tie_word_embeddings=True)
    params = checkpoint.numpy_params(M.init_random(cfg, seed=3, dtype=f32))
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params))
    out = tmp_path / "out"
    convert_main(["--hf", str(src), "--quantize", "int8", "--quantize-head", "--dtype", "float32", "--out", str(out)])
    loaded = ModelConfig.load(out)
    assert loaded.tie_word_embeddings and loaded.quantize_head
    got = checkpoint.load_params(out, loaded)
    q, s = quantize.quantize_int8(params["embed"]["embedding"].T)
    np.testing.assert_array_equal(got["lm_head"]["kernel"], q)
    np.testing.assert_array_equal(got["lm_head"]["scales"], s)
    np.testing.assert_array_equal(got["embed"]["embedding"], params["embed"]["embedding"])


def test_convert_hf_quantize_int8_stores_the_quantized_kernels(tmp_path):
    params = checkpoint.numpy_params(M.init_random(CFG, seed=3, dtype=f32))
    src = write_hf_dir(tmp_path / "hf", CFG, hf_tensors(CFG, params))
    convert_main(["--hf", str(src), "--quantize", "int8", "--dtype", "float32", "--out", str(tmp_path / "out")])
    got = checkpoint.load_params(tmp_path / "out", ModelConfig.load(tmp_path / "out"))
    for proj in ("q_proj", "o_proj"):
        q, s = quantize.quantize_int8(params["layers"]["1"]["attn"][proj]["kernel"])
        np.testing.assert_array_equal(got["layers"]["1"]["attn"][proj]["kernel"], q)
        np.testing.assert_array_equal(got["layers"]["1"]["attn"][proj]["scales"], s)
    assert got["lm_head"]["kernel"].dtype == f32 and "scales" not in got["lm_head"]  # the LM head stays float


def test_float_thresholds_on_the_int8_checkpoint_only_when_asked(word_ckpt, int8_ckpt, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(int8_ckpt, ckpt)
    shutil.copy(word_ckpt / thresholds.FILENAME, ckpt)  # the float model's thresholds
    with pytest.raises(thresholds.ThresholdsError, match="calibrated for the same weights with no quantization, "
                                                         "this model has int8: calibrate it"):
        cats_jax.load(ckpt, sparsity=0.5)
    with pytest.raises(SystemExit) as e:
        run(cats_jax.generate.main, ["--ckpt", str(ckpt), "--prompt", "w5", "--sparsity", "0.5"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--allow-quantization-mismatch" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        run(cats_jax.generate.main, ["--ckpt", str(ckpt), "--prompt", "w5", "--sparsity", "0.5", "--max-new-tokens",
                                     "2", "--allow-quantization-mismatch"])
    assert e.value.code == 0 and "measured MLP sparsity" in capsys.readouterr().err
    # and the int8 model's thresholds on the float model: refused too
    int8_th = thresholds.Thresholds(thresholds.model_identity(checkpoint.load_model(ckpt)), "cats",
                                    [thresholds.Level(0.5, {sparsity.CATS_SITE: [0.05] * 3})], {})
    float_model = checkpoint.load_model(word_ckpt)
    with pytest.raises(thresholds.ThresholdsError, match="with int8, this model has no quantization"):
        thresholds.apply(float_model, int8_th, 0.5)
    thresholds.apply(float_model, int8_th, 0.5, allow_quantization_mismatch=True)


def test_calibrating_the_int8_checkpoint(tiny_ckpt, tmp_path):
    """The int8 model calibrates as usual; its thresholds name it and apply to it with no flag."""
    src, text = tiny_ckpt
    ckpt = tmp_path / "int8"
    convert_main(["--ckpt", str(src), "--quantize", "int8", "--out", str(ckpt)])
    th = calibrate.run(ckpt, [0.5], data.TextSource(str(text)), tokens=512, holdout_tokens=128, seq_len=64,
                       batch_size=8, progress=False)
    assert th.model["quantization"] == "int8"
    level = thresholds.load_into(checkpoint.load_model(ckpt), ckpt, 0.5)
    assert 0.3 < np.mean(level.realised[sparsity.CATS_SITE]["calibration"]) < 0.7
    # eval's CLI on it with no flag: the int8 model scored dense and at its own thresholds
    out = tmp_path / "eval.json"
    eval_main(["--ckpt", str(ckpt), "--sparsity", "dense,0.5", "--tasks", "none", "--ppl", str(text), "--ppl-tokens",
               "200", "--context-length", "64", "--out", str(out), "--no-progress"])
    res = json.loads(out.read_text())
    assert res["model"]["quantization"] == "int8"
    dense, cats = res["results"]
    assert dense["sparsity"]["mean"] == 0.0 and 0.3 < cats["sparsity"]["mean"] < 0.7
    assert np.isfinite(dense["perplexity"]["perplexity"]) and dense["perplexity"]["tokens"] == 200


def _load_error(ckpt, out, edit=None, remove=None) -> str:
    """The one-line InputError of loading a copy of ckpt at out whose params are edited by edit(params)
    (rewritten) or lack the tensor directory `remove`."""
    if edit is None:
        shutil.copytree(ckpt, out)
        shutil.rmtree(out / "params" / remove)
    else:
        cfg = ModelConfig.load(ckpt)
        params = checkpoint.load_params(ckpt, cfg)
        edit(params)
        out.mkdir()
        (out / "config.json").write_text(cfg.to_json())
        checkpoint.write_params(out, params)
    with pytest.raises(InputError) as e:
        checkpoint.load_model(out)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_missing_or_misshapen_scales_are_one_clear_line(int8_ckpt, word_ckpt, tmp_path):
    said = _load_error(int8_ckpt, tmp_path / "missing", remove="layers.1.mlp.down_proj.scales")
    assert "1 of its quantization scales are missing (layers.1.mlp.down_proj.scales)" in said
    k_proj = lambda params: params["layers"]["0"]["attn"]["k_proj"]  # noqa: E731
    said = _load_error(int8_ckpt, tmp_path / "bad", lambda p: k_proj(p).update(scales=jnp.ones((33,), f32)))
    assert "tensor layers.0.attn.k_proj.scales has shape (33,), config.json says (32,)" in said

    claimed = tmp_path / "claimed"  # a float checkpoint whose config.json says int8
    shutil.copytree(word_ckpt, claimed)
    shutil.copy(int8_ckpt / "config.json", claimed)
    with pytest.raises(InputError, match="quantization scales are missing"):
        checkpoint.load_model(claimed)
    said = _load_error(int8_ckpt, tmp_path / "float", lambda p: k_proj(p).update(kernel=jnp.ones((64, 32), f32)))
    assert "tensor layers.0.attn.k_proj.kernel is float32, config.json says int8" in said  # its scales there


def test_missing_or_misshapen_head_scales_are_one_clear_line(head_ckpt, tmp_path):
    said = _load_error(head_ckpt, tmp_path / "missing", remove="lm_head.scales")
    assert "1 of its quantization scales are missing (lm_head.scales)" in said
    assert "--quantize int8 --quantize-head --out" in said  # what to re-run
    said = _load_error(head_ckpt, tmp_path / "bad", lambda p: p["lm_head"].update(scales=jnp.ones((321,), f32)))
    assert "tensor lm_head.scales has shape (321,), config.json says (320,)" in said


def test_quantize_head_without_a_quantization_is_refused(word_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--ckpt", str(word_ckpt), "--quantize-head", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "--quantize-head quantizes the LM head with the linear layers: add --quantize " \
                                 "int8" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="quantizing the LM head needs a quantization"):
        convert.write(tmp_path / "y", CFG, {}, None, False, None, quantize_head=True)
    with pytest.raises(ConfigError, match="quantize_head=true needs a quantization"):  # an edited config.json
        dataclasses.replace(CFG, quantize_head=True)
    from bench import decode as bench_decode

    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--quantize-head"])
    assert "add int8 to --quantize" in capsys.readouterr().err
    # a config.json written before the field existed loads as a float head
    old = {k: v for k, v in json.loads(M.quantize_model(M.init_random(CFG)).cfg.to_json()).items()
           if k != "quantize_head"}
    assert ModelConfig.from_json(json.dumps(old)) == dataclasses.replace(CFG, quantization="int8")


def test_bad_quantize_value_and_quantized_sources_are_refused(int8_ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        convert_main(["--ckpt", str(int8_ckpt), "--quantize", "int4", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'int4'" in capsys.readouterr().err
    with pytest.raises(InputError, match="is quantized already"):
        convert_main(["--ckpt", str(int8_ckpt), "--quantize", "int8", "--out", str(tmp_path / "y")])


def test_training_an_int8_base_is_refused(int8_ckpt, tmp_path, capsys):
    from train.__main__ import main as train_main

    with pytest.raises(SystemExit) as e:
        run(train_main, ["--ckpt", str(int8_ckpt), "--run", str(tmp_path / "run"), "--data", "x.txt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "holds int8 weights: fine-tuning (LoRA or full) needs a float checkpoint" in err
    assert not (tmp_path / "run").exists()


def test_bench_runs_int8_after_bf16_and_reports_the_weight_bytes():
    from bench import decode as bench_decode

    args = bench_decode.parse_args(["--batch", "1", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1",
                                    "--copy-mib", "4", "--mode", "dense", "--impl", "jnp", "--quantize", "none,int8"])
    table = bench_decode.run(CFG, args).splitlines()
    assert "| weight GB |" in table[4] and [r.split("|")[1] for r in table[6:8]] == [" dense ", " int8 dense "]
    model = bench_decode.random_model(CFG)
    bf16, int8 = (bench_decode.weight_bytes(decode.prepare(m)) for m in (model, M.quantize_model(model)))
    linear = 2 * CFG.hidden_size * (CFG.num_heads + CFG.num_kv_heads) * CFG.head_dim + 3 * CFG.hidden_size * \
        CFG.intermediate_size  # per layer; their outputs: one fp32 scale each
    outputs = (CFG.num_heads + 2 * CFG.num_kv_heads) * CFG.head_dim + CFG.hidden_size * 2 + 2 * CFG.intermediate_size
    assert bf16 - int8 == CFG.num_layers * (linear * (2 - 1) - 4 * outputs)
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--quantize", "int4"])


def test_bench_int8_head_rows_and_bytes(tiny_cfg):
    """--quantize-head: rows "int8+head"; a tied model's int8 head is read instead of its table
    (bytes per step), and the decode weights lose the head's bf16 copy of the table."""
    from bench import decode as bench_decode

    args = bench_decode.parse_args(["--batch", "1", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1",
                                    "--copy-mib", "4", "--impl", "jnp", "--quantize", "int8", "--quantize-head"])
    table = bench_decode.run(CFG, args).splitlines()
    assert "(LM head int8 too)" in table[0] and table[6].split("|")[1] == " int8+head dense "
    cfg = tiny_cfg(tie_word_embeddings=True)
    v, h = cfg.vocab_size, cfg.hidden_size
    model = bench_decode.random_model(cfg)
    int8, head = M.quantize_model(model), M.quantize_model(model, head=True)
    per_step = [bench_decode.bytes_per_step(cfg, m, 1, 4, 2) for m in (int8, head)]
    assert per_step[1] - per_step[0] == v * h + 4 * v - 2 * v * h
    on_device = [bench_decode.weight_bytes(decode.prepare(m)) for m in (int8, head)]
    assert on_device[1] - on_device[0] == v * h + 4 * v - 2 * v * h

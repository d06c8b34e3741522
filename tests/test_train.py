"""Fine-tuning on a tiny model (CPU): loss falls, LoRA touches only LoRA, merge is exact, resume
is exact, SIGTERM leaves a restorable checkpoint, CATS thresholds stay fixed."""

from __future__ import annotations

import json
import os
import re
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
from cats_jax.cli import InputError
from cats_jax.config import ModelConfig
from cats_jax.model import init_random
from train import data as train_data
from train.__main__ import main as train_main
from train.__main__ import parser
from train.lora import apply_lora, merge_lora
from train.trainer import TrainConfig, Trainer, make_schedule, token_nll

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


TINY = ModelConfig(vocab_size=len(SPECIALS) + 256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_ids=(2,), name="tiny")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny fp32 checkpoint with a tokenizer and CATS thresholds for sparsity 0.5 (0.25 zeroes
    about half of this random model's activations)."""
    tmp = tmp_path_factory.mktemp("ckpt")
    assert _tokenizer(tmp / "tok") == TINY.vocab_size
    model = init_random(TINY, seed=0, dtype=jnp.float32)
    out = checkpoint.save(tmp / "model", TINY, checkpoint.model_params(model), tokenizer_dir=tmp / "tok")
    level = thresholds.Level(0.5, {thresholds.CATS_SITE: [0.25, 0.25]})
    thresholds.Thresholds(thresholds.model_identity(model), "cats", [level], {"note": "test"}).save(out)
    return out


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": DOCS[i % 2]}) + "\n" for i in range(40)))
    return path


# One step program for most tests (a constant schedule keeps `steps` out of it), so that it is
# compiled once and then loaded from the compilation cache.
BASE = dict(seq_len=32, batch_size=2, grad_accum=2, steps=30, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
            dtype="float32", lr=3e-2, schedule="constant", warmup_steps=2, sparsity=0.5, eval_docs=2, eval_rows=4,
            log_every=5, eval_every=10, save_every=100)


def _cfg(ckpt, run_dir, data, **kw) -> TrainConfig:
    return TrainConfig(ckpt=str(ckpt), run_dir=str(run_dir), data=str(data), **{**BASE, **kw})


@pytest.fixture(scope="module")
def full_run(ckpt, data_file, tmp_path_factory):
    """A LoRA run of BASE (under CATS at 50%), uninterrupted; and its LoRA weights before training."""
    t = Trainer(_cfg(ckpt, tmp_path_factory.mktemp("full"), data_file), quiet=True)
    lora0 = _flat(t.master)
    assert t.run() == "done"
    return t, lora0


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
    model = init_random(TINY, dtype=jnp.float32)
    logits = nnx.jit(lambda m: m(jnp.arange(12)[None] * 7)[0])
    base = logits(model)
    apply_lora(model, rank=4, alpha=8.0, dropout=0.5)
    np.testing.assert_allclose(logits(nnx.view(model, deterministic=True)), base, atol=1e-5)  # B = 0 at first
    rng = np.random.default_rng(0)
    for path, v in nnx.iter_graph(model):  # give B some values
        if isinstance(v, nnx.LoRAParam) and path[-1] == "lora_b":
            v[...] = jnp.asarray(rng.normal(0, 0.1, v.shape), jnp.float32)
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
def test_lora_under_cats_loss_falls_base_and_thresholds_stay_export_matches(full_run, ckpt, tmp_path):
    t, lora0 = full_run
    log = _log(t.run_dir)
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

    # CATS thresholds are state, not parameters: still the calibrated ones.
    assert {layer.mlp.impl for layer in trained.layers} == {"cats-jnp"}
    assert [float(layer.mlp.threshold[...]) for layer in trained.layers] == [0.25, 0.25]

    # The exported checkpoint (LoRA folded in, thresholds along) computes what the trained model does.
    out = t.export(tmp_path / "merged")
    merged = checkpoint.load_model(out)
    thresholds.load_into(merged, out, 0.5)
    tokens = jnp.asarray(t.eval_batch[0][:2, :-1])
    np.testing.assert_allclose(merged(tokens)[0], trained(tokens)[0], atol=1e-4, rtol=1e-4)
    assert (out / "tokenizer.json").is_file()


def test_resume_equals_uninterrupted(full_run, ckpt, data_file, tmp_path):
    full, _ = full_run
    Trainer(_cfg(ckpt, tmp_path, data_file), quiet=True).run(until=13)  # then "killed"
    with pytest.raises(FileExistsError):  # a run dir is not reused by accident
        Trainer(_cfg(ckpt, tmp_path, data_file), quiet=True)
    with pytest.raises(ValueError, match="lr="):
        Trainer(_cfg(ckpt, tmp_path, data_file, lr=1.0), resume=True, quiet=True)
    resumed = Trainer(_cfg(ckpt, tmp_path, data_file), resume=True, quiet=True)
    assert resumed.step == 13
    resumed.run()
    for want, got in ((full.master, resumed.master), (full.opt_state, resumed.opt_state)):
        want, got = _flat(want), _flat(got)
        for k in want:
            np.testing.assert_array_equal(want[k], got[k], err_msg=k)


def test_full_finetune_keeps_fp32_masters_of_a_bf16_model_and_exports(ckpt, data_file, tmp_path):
    t = Trainer(_cfg(ckpt, tmp_path / "run", data_file, method="full", dtype="bfloat16", steps=3, eval_docs=0),
                quiet=True)
    before = _flat(t.master)
    assert {v.dtype for v in before.values()} == {np.dtype(np.float32)}
    t.run()
    after = _flat(t.master)
    assert all(not np.array_equal(before[k], after[k]) for k in before)
    out = t.export(tmp_path / "out")
    exported = checkpoint.load_model(out)
    thresholds.load_into(exported, out, 0.5)  # the thresholds now name the fine-tuned weights
    want, got = _flat(checkpoint.model_params(t.trained_model())), _flat(checkpoint.model_params(exported))
    for k in want:
        assert got[k].dtype == jnp.bfloat16
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_sigterm_saves_a_restorable_checkpoint(ckpt, data_file, tmp_path, compilation_cache):
    args = {**BASE, "steps": 100_000, "log_every": 1}
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in args.items()]
    cmd = [sys.executable, "-m", "train", f"--ckpt={ckpt}", f"--run={tmp_path}", f"--data={data_file}", "--quiet",
           *flags]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": compilation_cache,
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, deadline = tmp_path / "log.jsonl", time.time() + 120
    while not (log.is_file() and '"loss"' in log.read_text()):  # training has started
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 143 and "checkpoint saved" in out, out
    resumed = Trainer(_cfg(ckpt, tmp_path, data_file, **args), resume=True, quiet=True)
    assert 1 <= resumed.step < args["steps"] and resumed.packer.docs > BASE["eval_docs"]


def test_remat_gives_the_same_gradients():
    model = init_random(TINY, dtype=jnp.float32)
    ids, w = jnp.arange(34).reshape(2, 17) * 7, jnp.ones((2, 17))

    def grads(remat):
        model.remat = remat
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.to_pure_dict(rest)
        return jax.jit(jax.grad(lambda p: token_nll(nnx.merge(graphdef, p, rest), ids, w)[0]))(nnx.to_pure_dict(params))

    for a, b in zip(jax.tree.leaves(grads(False)), jax.tree.leaves(grads(True))):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_steps_within_the_warmup_clamp_it_and_say_so(tmp_path, capsys):
    for schedule in ("cosine", "linear", "constant"):
        cfg = TrainConfig(ckpt="c", run_dir="r", steps=20, schedule=schedule)  # the default warm-up is 50
        lr = make_schedule(cfg)
        assert cfg.warmup == 19 and float(lr(0)) == 0 and float(lr(19)) == pytest.approx(cfg.lr)
    assert float(make_schedule(TrainConfig(ckpt="c", run_dir="r", steps=1))(0)) == pytest.approx(1e-4)
    with pytest.raises(InputError, match="missing"):  # stops at the checkpoint, after the note
        train_main(["--ckpt", str(tmp_path / "missing"), "--run", str(tmp_path / "run"), "--steps", "20"])
    assert capsys.readouterr().err == "--warmup-steps 50 is not below --steps 20: warming up over 19 steps\n"


def test_too_little_eval_text_names_its_file_and_the_way_out(ckpt, data_file, tmp_path):
    short = tmp_path / "short.jsonl"
    short.write_text(json.dumps({"text": "ab"}) + "\n")
    name = re.escape(str(short))
    with pytest.raises(InputError, match=rf"{name}: .*fewer than one row of 33; give more text or a shorter --seq-len$"):
        Trainer(_cfg(ckpt, tmp_path / "a", data_file, eval_data=str(short)), quiet=True)
    with pytest.raises(InputError, match=rf"{name} \(its first 2 documents, held out\): .*or --eval-docs 0"):
        Trainer(_cfg(ckpt, tmp_path / "b", short), quiet=True)


def test_help_gives_every_option_a_text_and_its_default():
    p = parser()
    for action in p._actions[1:]:
        assert action.help, action.option_strings
        if action.default is not None and action.default is not False:
            assert "default" in p._get_formatter()._get_help_string(action), action.option_strings

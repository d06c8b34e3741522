"""Generation: the jitted prefill + decode loop against step-by-step full recompute, batching,
sliding window, EOS, sampling, stop strings, streaming and the CLI on tiny random fp32 models;
the real SmolLM2 against transformers' greedy output."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bench import decode as bench_decode
from cats_jax import checkpoint, thresholds
from cats_jax.config import ModelConfig
from cats_jax.generate import generate, generate_text, main, padded_length
from cats_jax.model import init_random
from cats_jax.sampling import Sampling, apply_repetition_penalty, sample
from pallas_kernels.common import interpret_on_cpu

LLAMA = ModelConfig(
    vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
    head_dim=8, eos_token_ids=(), name="tiny-llama",
)
# Window shorter than prompt + generation: decode must mask out the keys that slid out.
MISTRAL = dataclasses.replace(LLAMA, model_type="mistral", sliding_window=4, name="tiny-mistral")
NEW = 10


@pytest.fixture(scope="module")
def llama():
    return init_random(LLAMA, seed=1, dtype=jnp.float32)  # fp32: no argmax ties flipped by rounding


@pytest.fixture(scope="module")
def mistral():
    return init_random(MISTRAL, seed=2, dtype=jnp.float32)


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, LLAMA.vocab_size, n).tolist() for n in lengths]


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, tokens):
    return nnx.merge(graphdef, state)(tokens)[0]


def greedy_reference(model, prompt, n):
    """Greedy decoding with no cache: the whole sequence recomputed for every new token. The
    sequence is right-padded to one length (one compile); causal attention keeps the padding
    out of the logits at the last real token."""
    graphdef, state = nnx.split(model)
    toks = list(prompt)
    for _ in range(n):
        padded = np.zeros((1, 32), np.int32)
        padded[0, : len(toks)] = toks
        logits = _full_forward(graphdef, state, jnp.asarray(padded))
        toks.append(int(jnp.argmax(logits[0, len(toks) - 1])))
    return toks[len(prompt):]


@pytest.mark.parametrize(
    "which, lengths, chunk",
    [
        ("llama", (3, 7, 12), 512),
        # chunked prefill (two chunks of 8 tokens) and up to 23 positions past a window of 4
        ("mistral", (9, 11, 13), 8),
    ],
)
def test_greedy_equals_full_recompute_and_batch_equals_single(which, lengths, chunk, request):
    model = request.getfixturevalue(which)
    prompts = prompts_of(lengths)
    singles = [generate(model, [p], NEW, prefill_chunk=chunk).tokens[0] for p in prompts]
    for p, got in zip(prompts, singles):
        assert got == greedy_reference(model, p, NEW)
    batch = generate(model, prompts, NEW, prefill_chunk=chunk)
    assert batch.tokens == singles
    assert batch.decode_steps == NEW - 1 and not any(batch.hit_eos)


def test_padded_length_buckets():
    assert [padded_length(n, 512) for n in (1, 16, 17, 100, 512, 513)] == [16, 16, 32, 128, 512, 1024]
    assert [padded_length(n, 24) for n in (3, 16, 17, 30)] == [16, 16, 24, 48]  # chunk multiples


def test_bad_lengths_are_refused_before_compiling(llama):
    prompts = prompts_of((4,), seed=0)
    for kw, match in ((dict(prefill_chunk=0), "prefill_chunk=0"), (dict(stream_every=0), "stream_every=0")):
        with pytest.raises(ValueError, match=match):
            generate(llama, prompts, NEW, **kw)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        generate(llama, prompts, 0)


def test_eos_stops_each_row(llama):
    prompts = prompts_of((4, 9, 6), seed=3)
    free = generate(llama, prompts, NEW).tokens
    eos = free[0][2]  # row 0 emits it third
    got = generate(llama, prompts, NEW, eos_ids=[eos])
    for row, out, hit in zip(free, got.tokens, got.hit_eos):
        expect = row[: row.index(eos) + 1] if eos in row else row
        assert out == expect and hit == (eos in row)
    assert len(got.tokens[0]) == 3


def test_sampling_is_seeded_and_independent_of_chunking(llama):
    prompts = prompts_of((4, 9), seed=4)
    s = Sampling(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = generate(llama, prompts, NEW, s, seed=7)
    assert generate(llama, prompts, NEW, s, seed=7, stream_every=3).tokens == a.tokens
    assert generate(llama, prompts, NEW, s, seed=8).tokens != a.tokens


def test_repetition_penalty_in_the_loop(llama):
    """Greedy with a penalty on ids seen in the prompt (not its padding) or generated so far."""
    prompts = prompts_of((4, 9), seed=6)
    got = generate(llama, prompts, NEW, Sampling(repetition_penalty=3.0)).tokens
    graphdef, state = nnx.split(llama)
    for prompt, out in zip(prompts, got):
        toks = list(prompt)
        for _ in range(NEW):
            padded = np.zeros((1, 32), np.int32)
            padded[0, : len(toks)] = toks
            logits = _full_forward(graphdef, state, jnp.asarray(padded))[0, len(toks) - 1]
            seen = np.zeros(LLAMA.vocab_size, bool)
            seen[toks] = True
            toks.append(int(jnp.argmax(apply_repetition_penalty(logits, seen, 3.0))))
        assert out == toks[len(prompt):]


def test_sample_filters():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    keys = jax.random.split(jax.random.key(1), 64)
    draw = jax.vmap(lambda k, s: sample(logits, k, s), in_axes=(0, None))
    top1 = np.argmax(logits, -1)
    assert (sample(logits, keys[0], Sampling()) == top1).all()  # greedy
    assert (draw(keys, Sampling(temperature=1.0, top_k=1)) == top1).all()
    assert (draw(keys, Sampling(temperature=1.0, top_p=1e-6)) == top1).all()  # only the top token is left
    top3 = np.argsort(-np.asarray(logits), -1)[:, :3]
    got = np.asarray(draw(keys, Sampling(temperature=2.0, top_k=3)))  # [64, 4]
    assert all(np.isin(got[:, b], top3[b]).all() for b in range(4))
    assert len(np.unique(got[:, 0])) > 1  # it does sample
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0.0)


def test_repetition_penalty():
    logits = jnp.array([[2.0, -2.0, 1.0]])
    seen = jnp.array([[True, True, False]])
    np.testing.assert_allclose(apply_repetition_penalty(logits, seen, 2.0), [[1.0, -4.0, 1.0]])


def test_measured_mlp_sparsity(llama):
    prompts = prompts_of((3, 7, 12), seed=5)  # the shapes of the first test: compiled already
    dense = generate(llama, prompts, NEW)
    assert dense.mlp_sparsity is None  # dense MLPs sow nothing
    model = init_random(LLAMA, seed=1, dtype=jnp.float32)
    model.set_mlp_impl("cats-jnp")
    model.set_cats_thresholds([0.0, 0.0])  # exactly dense: nothing is zeroed
    cats = generate(model, prompts, NEW)
    assert cats.mlp_sparsity == 0.0 and cats.tokens == dense.tokens
    model.set_cats_thresholds([1e9, 1e9])  # a new threshold is new state, not a new compile
    assert generate(model, prompts, NEW).mlp_sparsity == 1.0


# ---- text layer and CLI, with a tiny word-level tokenizer ------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(LLAMA.vocab_size - 3)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template="{% for m in messages %}<s> {{ m.role }} {{ m.content }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant {% endif %}",
    )
    tok_dir = tmp_path_factory.mktemp("tok")
    hf.save_pretrained(tok_dir)
    cfg = dataclasses.replace(LLAMA, eos_token_ids=(2,))
    ckpt = checkpoint.save(tmp_path_factory.mktemp("ckpt") / "tiny", cfg, checkpoint.numpy_params(llama), tok_dir)
    return ckpt, hf


def test_text_stop_strings_and_streaming(tiny_ckpt):
    ckpt, tok = tiny_ckpt
    model = checkpoint.load_model(ckpt)
    (free,), _ = generate_text(model, tok, ["w5 w6 w7"], 12, chat=True)
    words = free.split()
    assert len(words) >= 4, free  # a stop string needs a few words to cut
    stop = " " + words[3]
    pieces = []
    (cut,), gen = generate_text(model, tok, ["w5 w6 w7"], 12, chat=True, stop=[stop], stream=pieces.append,
                                stream_every=2)
    assert cut == free[: free.index(stop)]
    assert "".join(pieces) == cut
    assert len(gen.tokens[0]) < 12  # stopped early, in the chunk that produced the stop string


def test_cli(tiny_ckpt, capsys):
    ckpt, tok = tiny_ckpt
    model = checkpoint.load_model(ckpt)
    (expect,), _ = generate_text(model, tok, ["w9 w10"], 12, chat=True)
    main(["--ckpt", str(ckpt), "--prompt", "w9 w10", "--chat", "--max-new-tokens", "12", "--dtype", "float32"])
    out, err = capsys.readouterr()
    assert out == expect + "\n"
    assert "prefill" in err and "tokens/s" in err and "sparsity" not in err
    # CATS from the checkpoint's thresholds.json, with the measured sparsity reported
    thresholds.Thresholds(
        thresholds.model_identity(model), "cats",
        [thresholds.Level(0.5, {thresholds.CATS_SITE: [1e9] * LLAMA.num_layers})], {},
    ).save(ckpt)
    main(["--ckpt", str(ckpt), "--prompt", "w9 w10", "--max-new-tokens", "12", "--dtype", "float32",
          "--sparsity", "0.5"])
    assert "measured MLP sparsity (decode): 1.000" in capsys.readouterr().err


def test_smollm2_batch_matches_transformers_greedy(smollm2_ckpt, fixtures_dir):
    """The real model, its tokenizer and chat template, three prompts in one batch: token for token
    transformers' greedy continuation (scripts/make_golden.py), row 0 stopping at its EOS."""
    from cats_jax import data

    golden = json.loads((fixtures_dir / "smollm2_golden.json").read_text())
    model = checkpoint.load_model(smollm2_ckpt)  # fp32: the dequantized weights exactly
    texts, gen = generate_text(model, data.load_tokenizer(smollm2_ckpt), golden["prompts"], 24, chat=True)
    assert gen.tokens == golden["greedy_ids"]
    assert gen.hit_eos == [True, False, False]
    assert texts == golden["greedy_text"]


# ---- decode benchmark ---------------------------------------------------------------------------


def test_bench_bytes_per_step_and_random_bf16_weights():
    model = bench_decode.random_model(MISTRAL)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert {p.dtype for p in params} == {jnp.dtype(jnp.bfloat16)}
    # untied: every weight but the embedding table (gathered, not read) + K/V of the attended
    # positions: decode steps see 9..12 keys, capped by the window of 4
    kv = 2 * MISTRAL.num_layers * MISTRAL.num_kv_heads * MISTRAL.head_dim * 2
    weights = (MISTRAL.num_params() - MISTRAL.vocab_size * MISTRAL.hidden_size) * 2
    assert bench_decode.bytes_per_step(MISTRAL, model, 3, 8, 5) == weights + 3 * kv * 4


def test_bench_rows_with_another_devices_blocks(monkeypatch, capsys):
    """--blocks-from own,KIND: each row twice, the second traced with KIND's tuned GEMV blocks over
    this device's own (restored after; kernels in interpret mode); an unknown kind is refused
    before any work."""
    from pallas_kernels import sparse_gemv as G

    own = jax.devices()[0].device_kind
    mine, theirs = G.GemvBlocks(rows=16, cols=32, splits=4), G.GatherBlocks()
    monkeypatch.setattr(G, "TUNED", {own: {(1, 64, 96): mine, (1, 64, 64): mine}, "other": {(1, 64, 96): theirs}})
    with bench_decode.blocks_from("other"):
        assert G._tuned() == {(1, 64, 96): theirs, (1, 64, 64): mine}
    assert G._tuned() == {(1, 64, 96): mine, (1, 64, 64): mine}
    with bench_decode.blocks_from("own"):
        assert G._tuned() == {(1, 64, 96): mine, (1, 64, 64): mine}
    with pytest.raises(SystemExit):
        bench_decode.parse_args(["--blocks-from", "own,nowhere"])
    assert "no tuned blocks for 'nowhere' (choose from own, " in capsys.readouterr().err
    # "other" lists dense blocks for the tiny model's four GEMVs: its row's step runs them on the kernels
    h, i, qkv = LLAMA.hidden_size, LLAMA.intermediate_size, (LLAMA.num_heads + 2 * LLAMA.num_kv_heads) * LLAMA.head_dim
    dense = G.GemvBlocks(rows=16, cols=16, splits=2)
    G.TUNED["other"] = {G.tuned_key(1, a, b, "dense"): dense for a, b in ((h, qkv), (h, h), (h, 2 * i), (i, h))}
    args = bench_decode.parse_args(["--batch", "1", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1",
                                    "--copy-mib", "4", "--impl", "pallas", "--blocks-from", "other,own,other"])
    with interpret_on_cpu():
        rows = [r.split("|") for r in bench_decode.run(LLAMA, args).splitlines() if r.startswith("| dense")]
    assert [r[1].strip() for r in rows] == ["dense, other blocks", "dense, own blocks", "dense, other blocks"]
    launches = [r[-3] for r in rows]  # each row traced with its own blocks, none taken from JAX's caches
    assert launches[0] == launches[2] != launches[1]
    assert G._tuned() == {(1, 64, 96): mine, (1, 64, 64): mine}


def test_bench_runs_and_reports(capsys):
    args = bench_decode.parse_args(["--batch", "2", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1",
                                    "--copy-mib", "4", "--mode", "dense,cats", "--impl", "jnp", "--sparsity", "0.5",
                                    "--calib-tokens", "32"])
    table = bench_decode.run(LLAMA, args)
    rows = [r for r in table.splitlines() if r.startswith("| cats (jnp) 0.5 |")]
    assert len(rows) == 1 and "Copy ceiling" in table
    assert len([r for r in table.splitlines() if r.startswith("| dense |")]) == 1
    measured = float(rows[0].split("|")[2])
    assert 0.2 < measured < 0.8  # thresholds calibrated on random tokens at 0.5, measured on others
    # a second run in the process reports each row's own launches (not those of the loop compiled last)
    launches = lambda t: [r.split("|")[-3] for r in t.splitlines() if r.startswith(("| dense |", "| cats (jnp)"))]
    first = launches(table)
    assert first[0] != first[1] and launches(bench_decode.run(LLAMA, args)) == first

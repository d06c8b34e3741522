"""Quality of a checkpoint, dense and at each calibrated sparsity of one mode (cats, teal,
cats+teal-attn): multiple-choice accuracy, perplexity and the measured sparsity per layer (in mode
cats the MLP activation sparsity; else the effective sparsity of the thresholded sites,
sparsity.weighted_mean), as one JSON record and one table.

Deterministic: data in file order, the first --limit examples, no sampling anywhere.

No finished work is lost: evaluate() hands the record to `on_result` each time one setting has
finished one task or the perplexity (the CLI writes it then), "complete" false until the end.
"""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cats_jax import checkpoint, cli, data, sharding, thresholds
from cats_jax.config import ModelConfig
from eval import scoring
from eval import tasks as task_lib

DENSE = "dense"


def _stderr(x: np.ndarray) -> float:
    """lm-eval's standard error of a mean: sample std (n - 1) / sqrt(n)."""
    return float(np.std(x, ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def mc_metrics(examples: list[task_lib.Example], ll: np.ndarray, metrics: tuple[str, ...]) -> dict:
    """acc / acc_norm (their standard errors, and each example's score) from the log-likelihood of
    every request, in order."""
    acc, acc_norm, pos = [], [], 0
    for ex in examples:
        lls = ll[pos:pos + len(ex.requests)]
        pos += len(ex.requests)
        acc.append(float(np.argmax(lls) == ex.gold))
        acc_norm.append(float(np.argmax(lls / np.array([len(c) for c in ex.choices], float)) == ex.gold))
    out = {"examples": len(examples), "correct": {}}
    for name, values in (("acc", acc), ("acc_norm", acc_norm)):
        if name in metrics:
            out[name], out[name + "_stderr"] = float(np.mean(values)), _stderr(np.array(values))
            # each example's score in order, "0"/"1": rows scored on the same examples compare pairwise (eval.compare)
            out["correct"][name] = "".join("1" if v else "0" for v in values)
    return out


def paired_difference(a: str, b: str) -> tuple[float, float]:
    """(mean of a - b, its standard error) of two runs' per-example scores ("0"/"1" strings, the
    same examples in the same order). Pairing removes the examples' own difficulty from the error:
    far below the unpaired sqrt(se_a^2 + se_b^2) when the runs mostly agree."""
    if len(a) != len(b):
        raise ValueError(f"the runs scored different examples ({len(a)} vs {len(b)})")
    d = np.array([int(x) - int(y) for x, y in zip(a, b)], float)
    return float(d.mean()), _stderr(d)


def ppl_documents(source: data.TextSource, tokenizer, max_tokens: int | None) -> list[list[int]]:
    """Token ids of the source's documents, the last one cut so that the total is max_tokens."""
    docs, total = [], 0
    for ids in data.encode(tokenizer, data.iter_documents(source)):
        if max_tokens is not None:
            ids = ids[:max_tokens - total]
        docs.append(ids)
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not docs:
        raise data.DataError(f"{source.name}: no text for perplexity")
    return docs


def versions() -> dict:
    out = {"python": platform.python_version()}
    for pkg in ("cats-jax", "jax", "flax", "numpy", "transformers", "tokenizers", "datasets"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    try:  # the exact code, when run from a git checkout
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                                           capture_output=True, timeout=10).stdout.strip() or None
    except OSError:
        out["git_commit"] = None
    return out


def evaluate(ckpt_dir, *, settings: list, task_files: dict[str, str | None], limit: int | None = None,
             ppl_source: data.TextSource | None = None, ppl_tokens: int | None = None, context_length: int = 1024,
             stride: int | None = None, batch_tokens: int = 2048, dtype: str | None = "float32",
             progress: bool = True, mode: str | None = None, on_result: Callable[[dict], None] | None = None,
             allow_quantization_mismatch: bool = False, tp: int = 1) -> dict:
    """settings: "dense" and/or target sparsities calibrated in DIR/thresholds.json, applied in
    `mode` (sparsity.MODES; default: the file's method).
    task_files: task name -> release-format file / save_to_disk dir, or None for the hub.
    on_result(record): called with the record so far each time a setting finishes a task or the
    perplexity, and with the whole record ("complete": true) at the end. allow_quantization_mismatch:
    apply thresholds of the same weights at another quantization (cats_jax.thresholds). tp > 1: the
    model's weights split over the first tp devices, each reading its own slice, and every forward
    pass split by them (cats_jax.sharding.model_shardings); a tp the shapes do not divide raises
    sharding.TPError before any weight is read."""
    stride = stride or context_length
    if not 1 <= stride <= context_length:  # scoring.rolling_windows' bound, said before any work
        raise cli.InputError(f"stride {stride}: at most the context length ({context_length}) new tokens a window")
    placement = None
    if tp != 1:
        mesh = sharding.make_mesh(tp)
        sharding.local_config(ModelConfig.load(ckpt_dir), tp)
        placement = sharding.model_shardings(mesh)
    model = checkpoint.load_model(ckpt_dir, checkpoint.DTYPES[dtype] if dtype else None, placement)
    tokenizer = data.load_tokenizer(ckpt_dir)
    th = thresholds.load(ckpt_dir, mode)
    if any(s != DENSE for s in settings):
        if th is None:
            raise thresholds.ThresholdsError(
                f"{ckpt_dir}: no {thresholds.FILENAME}; calibrate first (python -m cats_jax.calibrate)")
        th.check_model(model, allow_quantization_mismatch)
        mode = mode or th.method
        for s in settings:
            if s != DENSE:  # fail now, not after the dense run
                thresholds.apply(model, th, s, mode=mode, allow_quantization_mismatch=allow_quantization_mismatch)
    # Data once, for every setting.
    task_data = {}
    for name, path in task_files.items():
        examples, source = task_lib.load_examples(name, path, limit)
        groups = [g for ex in examples for g in scoring.request_groups(tokenizer, ex.requests, context_length)]
        task_data[name] = (examples, groups, source)
    ppl_docs = ppl_documents(ppl_source, tokenizer, ppl_tokens) if ppl_source else None

    def configure(setting):
        if setting == DENSE:
            model.set_mode(DENSE)
        else:
            thresholds.apply(model, th, setting, mode=mode, allow_quantization_mismatch=allow_quantization_mismatch)

    # Task-major: the programs compiled for a task's shapes serve every setting, then are dropped
    # (XLA:CPU keeps ~1 GB per program alive). Each setting has its own Scorer for its statistics.
    scorers = {s: scoring.Scorer(model, batch_tokens, progress) for s in settings}
    rows = [{"setting": DENSE if s == DENSE else f"{mode}-{s:g}", "target_sparsity": 0.0 if s == DENSE else s,
             "tasks": {}} for s in settings]
    record = {
        "model": {"ckpt": str(Path(ckpt_dir).absolute()), **thresholds.model_identity(model)},
        "thresholds": None if th is None else {"file": str(Path(ckpt_dir, thresholds.FILENAME).absolute()),
                                               "method": th.method, "mode": mode, "calibration": th.calibration},
        "data": {name: source for name, (_, _, source) in task_data.items()}
                | ({"perplexity": ppl_source.describe()} if ppl_source else {}),
        "limit": limit,
        "options": {"context_length": context_length, "stride": stride, "batch_tokens": batch_tokens,
                    "dtype": dtype or "as stored", "ppl_tokens": ppl_tokens, "tp": tp},
        "versions": versions(),
        "complete": False,
        "results": rows,
    }

    def finished(setting, row):  # one setting has finished one task or the perplexity
        scorer = scorers[setting]
        sp = scorer.layer_sparsity
        row["sparsity"] = {"mean": float(sp.mean()), "min": float(sp.min()), "max": float(sp.max()),
                           "per_layer": [round(float(v), 6) for v in sp], "tokens": scorer.tokens,
                           "per_site": {site: round(float(np.mean(v)), 6) for site, v in scorer.site_sparsity.items()}}
        if on_result is not None:
            on_result(record)

    for name, (examples, groups, _) in task_data.items():
        for setting, row in zip(settings, rows):
            configure(setting)
            t0 = time.perf_counter()
            ll = np.concatenate([g_ll for g_ll, _ in scorers[setting].score(groups, desc=f"{row['setting']} {name}")])
            seconds = time.perf_counter() - t0
            res = mc_metrics(examples, ll, task_lib.TASKS[name].metrics)
            res.update(seconds=round(seconds, 2), examples_per_s=round(len(examples) / seconds, 2))
            row["tasks"][name] = res
            finished(setting, row)
            if setting == DENSE:  # dense and sparse models compile to different programs
                scoring.release_programs()
        scoring.release_programs()
    if ppl_docs is not None:
        for setting, row in zip(settings, rows):
            configure(setting)
            t0 = time.perf_counter()
            row["perplexity"] = scoring.perplexity(scorers[setting], tokenizer, ppl_docs, context_length, stride)
            row["perplexity"]["seconds"] = round(time.perf_counter() - t0, 2)
            finished(setting, row)
            if setting == DENSE:
                scoring.release_programs()
        scoring.release_programs()
    record["complete"] = True
    if on_result is not None:
        on_result(record)
    return record


def _metric_columns(rows: list[dict]) -> list[tuple[str, str]]:
    tasks = dict.fromkeys(t for r in rows for t in r["tasks"])  # every task some setting finished, in order
    return [(t, m) for t in tasks for m in task_lib.TASKS[t].metrics]


def markdown(rows: list[dict]) -> str:
    """Rows = settings; columns = measured sparsity, perplexity, each task's metrics (percent);
    "-" where an interrupted run had not finished."""
    rows = [r for r in rows if "sparsity" in r]  # settings that finished something
    cols = _metric_columns(rows)
    has_ppl = any("perplexity" in r for r in rows)
    head = ["setting", "sparsity mean / min / max (%)"] + (["ppl"] if has_ppl else []) + [f"{t} {m}" for t, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        sp = r["sparsity"]
        cells = [r["setting"], f"{100 * sp['mean']:.1f} / {100 * sp['min']:.1f} / {100 * sp['max']:.1f}"]
        if has_ppl:
            cells.append(f"{r['perplexity']['perplexity']:.2f}" if "perplexity" in r else "-")
        cells += [f"{100 * r['tasks'][t][m]:.1f}" if t in r["tasks"] else "-" for t, m in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str | Path) -> None:
    """Accuracy (acc_norm where the task has it) and perplexity against target sparsity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["target_sparsity"] for r in rows]
    has_ppl = "perplexity" in rows[0]
    fig, axes = plt.subplots(1, 2 if has_ppl else 1, figsize=(11 if has_ppl else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for t in rows[0]["tasks"]:
        m = "acc_norm" if "acc_norm" in task_lib.TASKS[t].metrics else "acc"
        ax.plot(x, [100 * r["tasks"][t][m] for r in rows], marker="o", label=f"{t} ({m})")
    ax.set(xlabel="target sparsity (%)", ylabel="accuracy (%)", title="zero-shot accuracy")
    if rows[0]["tasks"]:
        ax.legend(fontsize=8)
    if has_ppl:
        ax = axes[0, 1]
        ax.plot(x, [r["perplexity"]["perplexity"] for r in rows], marker="o", color="black")
        ax.set(xlabel="target sparsity (%)", ylabel="token perplexity", title="perplexity")
    for a in axes[0]:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""python -m eval.compare A.json[:SETTING] [A2.json[:SETTING] ...] B.json[:SETTING]: eval runs' zero-shot
accuracy against a baseline B, task by task, with the paired standard error of each difference (the
same examples scored by both), and the mean over the tasks both ran. SETTING picks a row of a run
(e.g. dense, cats-0.5); default: its only row. --plot draws each row's differences."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from cats_jax import cli
from eval import harness


def _row(spec: str) -> tuple[str, dict]:
    path, _, setting = spec.partition(":")
    try:
        rows = json.loads(Path(path).read_text())["results"]
    except (OSError, ValueError, KeyError) as e:
        raise cli.InputError(f"{path}: not an eval results file ({e})") from None
    names = [r["setting"] for r in rows]
    if not setting and len(rows) != 1:
        raise cli.InputError(f"{path} holds the rows {', '.join(names)}: name one, e.g. {path}:{names[-1]}")
    row = rows[0] if not setting else next((r for r in rows if r["setting"] == setting), None)
    if row is None:
        raise cli.InputError(f"{path}: no row {setting!r} (it has {', '.join(names)})")
    return f"{path}:{row['setting']}", row


def compare(a: dict, b: dict, metric: str = "acc") -> list[tuple[str, float, float, float, float]]:
    """(task, A, B, A - B, paired standard error) per task both rows ran, then ("mean", ...) over them."""
    out = []
    for task in [t for t in a["tasks"] if t in b["tasks"]]:
        ca, cb = (r["tasks"][task].get("correct", {}).get(metric) for r in (a, b))
        if ca is None or cb is None:
            raise ValueError(f"{task}: a row has no per-example {metric} (written before eval recorded them, or a "
                             f"task without {metric}); run eval again")
        diff, se = harness.paired_difference(ca, cb)
        out.append((task, a["tasks"][task][metric], b["tasks"][task][metric], diff, se))
    if not out:
        raise ValueError("the rows share no task")
    n = len(out)
    mean = [sum(r[i] for r in out) / n for i in (1, 2, 3)]
    out.append(("mean", *mean, math.sqrt(sum(r[4] ** 2 for r in out)) / n))  # the tasks' examples are independent
    return out


def plot(results: list[tuple[str, list]], base: str, path: str | Path, metric: str) -> None:
    """Each row's difference from the baseline, per task and their mean, with 2 paired standard errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(results) + 2), 4))
    tasks = list(dict.fromkeys(r[0] for _, rows in results for r in rows))
    width = 0.8 / len(tasks)
    for k, task in enumerate(tasks):
        xs, ds, es = [], [], []
        for i, (_, rows) in enumerate(results):
            for name, _, _, d, se in rows:
                if name == task:
                    xs.append(i + (k - (len(tasks) - 1) / 2) * width)
                    ds.append(100 * d)
                    es.append(200 * se)
        ax.errorbar(xs, ds, yerr=es, fmt="o" if task == "mean" else ".", capsize=3,
                    color="black" if task == "mean" else None, label=task)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(results)), [name for name, _ in results], rotation=15, ha="right", fontsize=8)
    ax.set(ylabel=f"{metric} - baseline (points)", title=f"against {base}; bars: 2 paired standard errors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN",
                    help="results JSON of python -m eval, optionally :SETTING; the rows to compare, then the baseline")
    ap.add_argument("--metric", choices=("acc", "acc_norm"), default="acc", help="default acc")
    ap.add_argument("--plot", metavar="FILE", help="also draw each row's differences (a .png)")
    ap.add_argument("--labels", help="comma-separated names of the runs in the plot, baseline last (default: FILE:SETTING)")
    args = ap.parse_args(argv)
    if len(args.runs) < 2:
        ap.error("give at least two runs: the rows to compare, then the baseline")
    cli.output_file(ap, "--plot", args.plot)
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.runs):
        ap.error(f"--labels names {len(labels)} runs; {len(args.runs)} were given")
    *named, (name_b, b) = [_row(r) for r in args.runs]
    results = []
    for name_a, a in named:
        try:
            rows = compare(a, b, args.metric)
        except ValueError as e:
            raise cli.InputError(f"{name_a} vs {name_b}: {e}") from None
        results.append((name_a, rows))
        print(f"A = {name_a}\nB = {name_b}\n")
        print(f"| task | A {args.metric} | B {args.metric} | A - B | paired s.e. |\n|---|---|---|---|---|")
        for task, va, vb, d, se in rows:
            print(f"| {task} | {100 * va:.1f} | {100 * vb:.1f} | {100 * d:+.1f} | {100 * se:.1f} |")
        print()
    if args.plot:
        if labels is not None:
            results = [(label, rows) for label, (_, rows) in zip(labels, results)]
            name_b = labels[-1]
        plot(results, name_b, args.plot, args.metric)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    cli.run(main)

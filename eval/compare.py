"""python -m eval.compare A.json[:SETTING] B.json[:SETTING]: two eval runs' zero-shot accuracy, task by
task, with the paired standard error of each difference (the same examples scored by both), and
the mean over the tasks both ran. SETTING picks a row of a run (e.g. dense, cats-0.5); default: its
only row."""

from __future__ import annotations

import argparse
import json
import math

from cats_jax import cli
from eval import harness


def _row(spec: str) -> tuple[str, dict]:
    path, _, setting = spec.partition(":")
    try:
        rows = json.loads(open(path).read())["results"]
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


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("a", help="results JSON of python -m eval, optionally :SETTING")
    ap.add_argument("b", help="the other run, the same way")
    ap.add_argument("--metric", choices=("acc", "acc_norm"), default="acc", help="default acc")
    args = ap.parse_args(argv)
    (name_a, a), (name_b, b) = _row(args.a), _row(args.b)
    try:
        rows = compare(a, b, args.metric)
    except ValueError as e:
        raise cli.InputError(str(e)) from None
    print(f"A = {name_a}\nB = {name_b}\n")
    print(f"| task | A {args.metric} | B {args.metric} | A - B | paired s.e. |\n|---|---|---|---|---|")
    for task, va, vb, d, se in rows:
        print(f"| {task} | {100 * va:.1f} | {100 * vb:.1f} | {100 * d:+.1f} | {100 * se:.1f} |")


if __name__ == "__main__":
    cli.run(main)
